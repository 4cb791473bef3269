"""GGUF files (llama.cpp): ModelArgs from the ``llama.*`` metadata, tensors read one at a time.

The header is parsed by gguf_reader and the file memory-mapped, so a tensor's bytes are read only when
it is loaded. A quantized tensor of a type torchchat keeps quantized (gguf_quants.layout) can be read
straight into a quantized layout (``LazyTensor.load_quantized``), or dequantized (``load``). Q and K of a llama
GGUF are already in Meta's interleaved-pair RoPE layout (llama.cpp's converter undid Hugging Face's permutation), so
no tensor is permuted here.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from torchchat.checkpoints import gguf_quants
from torchchat.checkpoints.common import (
    GGUF_MAGIC, CheckpointError, LazyTensor, QuantizedTensor, checked_args, corrupt_error, default_context, magic,
    require_file,
)
from torchchat.checkpoints.gguf_reader import GGUFFile, read_gguf, release
from torchchat.model import ModelArgs, RopeScaling, rope_frequencies

_TOP = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
        "output.weight": "output.weight"}
_LAYER = {"attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
          "attn_output": "attention.wo", "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2",
          "ffn_up": "feed_forward.w3", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 RoPE scaling, stored by llama.cpp as per-frequency divisors
_FLOATS = {QType.F32: np.float32, QType.F16: np.float16, QType.F64: np.float64}
_REQUIRED = object()


def open_gguf(path: Path) -> GGUFFile:
    """The parsed header of ``path`` (data memory-mapped); the last one is reused while the file is unchanged."""
    path = Path(path)
    require_file(path, "GGUF file", "check --gguf-path")
    if magic(path, 4) != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF'): give a .gguf file, "
                              f"or --checkpoint-path/--checkpoint-dir for other formats")
    stat = path.stat()
    try:
        return _cached_reader(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except Exception as e:  # GGUFFormatError, UnicodeDecodeError, OSError...: any failure is a damaged file
        raise corrupt_error(path, e) from e


@functools.lru_cache(maxsize=1)
def _cached_reader(path: str, size: int, mtime_ns: int) -> GGUFFile:
    # The model arguments, the weights, the tokenizer and the chat template are all read from one file:
    # parse it once (a real vocabulary, 49k tokens and 49k merges, is ~0.1 s). Size and mtime are part
    # of the key so that a rewritten file is parsed again.
    return read_gguf(path)


class _File:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader = open_gguf(self.path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str, default=_REQUIRED):
        if key not in self.reader.fields:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path} lacks the GGUF metadata key '{key}': re-convert the model "
                                      f"with llama.cpp's convert_hf_to_gguf.py")
            return default
        return self.reader.fields[key]


def model_args(path: Path, name: str) -> ModelArgs:
    """ModelArgs from the metadata of a llama-architecture GGUF (no tensor data is read)."""
    f = _File(path)
    arch = f.meta("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path} holds a '{arch}' model: torchchat runs llama-architecture GGUFs only")

    def llama(key, default=_REQUIRED):
        return f.meta(f"llama.{key}", default)

    n_heads = _uniform(path, "attention.head_count", llama("attention.head_count"))
    scaling_type = llama("rope.scaling.type", "none")
    if scaling_type != "none":
        raise CheckpointError(f"{path} uses '{scaling_type}' RoPE scaling, which torchchat does not support")
    args = checked_args(
        path,
        dim=int(llama("embedding_length")),
        n_layers=int(llama("block_count")),
        n_heads=n_heads,
        n_kv_heads=_uniform(path, "attention.head_count_kv", llama("attention.head_count_kv", n_heads)),
        vocab_size=_vocab_size(f),
        hidden_dim=int(llama("feed_forward_length")),
        norm_eps=_float32(llama("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_float32(llama("rope.freq_base", 10000.0)),
        max_context=int(llama("context_length", default_context(name))),
        tie_embeddings="output.weight" not in f.tensors,
    )
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        value = llama(key, args.head_dim)
        if value != args.head_dim:
            raise CheckpointError(f"{path}: llama.{key} ({value}) differs from dim / n_heads ({args.head_dim}), "
                                  f"which torchchat's model does not support")
    if _ROPE_FREQS in f.tensors:
        args = args.with_(rope_scaling=_infer_rope_scaling(f, args))
    return args


def tensors(path: Path, args: ModelArgs) -> dict[str, LazyTensor]:
    """Every tensor of the file under torchchat's name (an unknown one under its own name)."""
    f = _File(path)
    out = {}
    for t in f.reader.tensors:
        if not _can_dequantize(t.tensor_type):
            raise CheckpointError(f"tensor {t.name} in {path} is of type {t.tensor_type.name}, which gguf cannot "
                                  f"dequantize: re-quantize the model (e.g. Q8_0, Q4_K_M) with llama-quantize")
        if t.name == _ROPE_FREQS:
            _check_rope_freqs(f, args)
            continue
        layout = gguf_quants.layout(t.tensor_type) if len(t.shape) == 2 else None
        quantized = functools.partial(_read_quantized, t, layout) if layout else None
        out[_torch_name(t.name)] = LazyTensor(t.name, _torch_shape(t), functools.partial(_dequantize, t),
                                              file_type=t.tensor_type.name, load_quantized=quantized)
    return out


def weight_types(path: Path) -> dict[str, int]:
    """How many of the file's weight matrices (2-D tensors) are of each type, most first: {"Q4_1": 210, "Q8_0": 1}."""
    counts = {}
    for t in _File(path).reader.tensors:
        if len(t.shape) == 2:
            counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def kept_quantized(file_type: str) -> str | None:
    """The layout ("int4", "int8") a tensor of this GGUF type runs in by default, None if it is dequantized."""
    return gguf_quants.layout(QType[file_type])


def _read_quantized(t, layout: str) -> QuantizedTensor:
    convert = gguf_quants.to_int4 if layout == "int4" else gguf_quants.to_int8
    tensors = tuple(convert(t))
    release(t.data)
    return QuantizedTensor(layout, tensors, t.tensor_type.name)


def _torch_name(name: str) -> str:
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}.weight"
    return name


def _torch_shape(t) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first


def _dequantize(t) -> torch.Tensor:
    """One tensor, read from the memory map into a fresh (writable) torch tensor; its file pages are released."""
    shape = _torch_shape(t)
    if t.tensor_type in _FLOATS:
        out = torch.from_numpy(np.array(t.data, dtype=_FLOATS[t.tensor_type])).reshape(shape)
    elif t.tensor_type == QType.BF16:  # bytes -> int16 -> bfloat16, without a float32 round trip
        out = torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(shape)
    else:
        out = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape)
    release(t.data)
    return out


@functools.cache
def _can_dequantize(qtype: QType) -> bool:
    if qtype in _FLOATS or qtype == QType.BF16:
        return True
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:  # ask gguf itself, on one zero block: its set of dequantizers grows from release to release
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _vocab_size(f: _File) -> int:
    emb = f.tensors.get("token_embd.weight")
    if emb is not None:
        return _torch_shape(emb)[0]
    tokens = f.reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise CheckpointError(f"{f.path} has neither token_embd.weight nor a token list: re-convert the model")
    return len(tokens)


def _uniform(path: Path, key: str, value) -> int:
    """A per-layer metadata array is accepted when all layers agree."""
    if isinstance(value, list):
        if not value or len(set(value)) != 1:
            raise CheckpointError(f"{path}: llama.{key} varies by layer ({value}), which torchchat does not support")
        value = value[0]
    return int(value)


def _float32(value) -> float:
    # GGUF stores float32: 1e-5 comes back as 9.99999974e-06. The shortest decimal that rounds to the
    # same float32 gives back the number that was written.
    return float(str(np.float32(value)))


def _infer_rope_scaling(f: _File, args: ModelArgs) -> RopeScaling:
    """llama.cpp keeps Llama 3.1 scaling as divisors of the frequencies; the largest is the factor."""
    divisors = _dequantize(f.tensors[_ROPE_FREQS]).float()
    scaling = RopeScaling(factor=_float32(divisors.max().item()))  # Llama 3.x's other parameters
    _check_rope_freqs(f, args.with_(rope_scaling=scaling))
    return scaling


def _check_rope_freqs(f: _File, args: ModelArgs) -> None:
    divisors = _dequantize(f.tensors[_ROPE_FREQS]).float()
    expected = rope_frequencies(args.with_(rope_scaling=None)) / rope_frequencies(args)
    if divisors.shape != expected.shape or not torch.allclose(divisors, expected, rtol=1e-4):
        raise CheckpointError(f"{f.path}: its {_ROPE_FREQS} is not Llama 3 RoPE scaling with {args.rope_scaling}; "
                              f"this RoPE variant is not supported")
