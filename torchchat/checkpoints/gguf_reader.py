"""The header of a GGUF file: metadata as Python values, tensors as memory-mapped numpy arrays.

gguf.GGUFReader makes a numpy view of every element of every metadata array, which takes seconds for
a real vocabulary (SmolLM2: 49k tokens and 49k merges). This reads the same header in one pass, and
gives what gguf.GGUFReader's ``fields[key].contents()`` and ``tensors`` give, tensor data in the same
dtype and shape, so that ``gguf.quants.dequantize`` takes it as before (tests/test_gguf_reader.py
compares the two). The layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    magic "GGUF", version (uint32), tensor count (uint64), key/value count (uint64)
    key/values: key (string), value type (uint32), value
        string: length (uint64), UTF-8 bytes; array: item type (uint32), count (uint64), items
    tensor infos: name (string), n_dims (uint32), dims (uint64 each, innermost first), type (uint32),
        offset (uint64) from the start of the data
    padding to ``general.alignment`` (default 32), then the tensor data
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

_VERSIONS = (2, 3)  # those gguf.GGUFReader reads; version 1 had 32-bit counts
_DEFAULT_ALIGNMENT = 32
_SCALARS = {  # value type -> its numpy type code (the byte order is the file's)
    GGUFValueType.UINT8: "u1", GGUFValueType.INT8: "i1", GGUFValueType.UINT16: "u2", GGUFValueType.INT16: "i2",
    GGUFValueType.UINT32: "u4", GGUFValueType.INT32: "i4", GGUFValueType.UINT64: "u8", GGUFValueType.INT64: "i8",
    GGUFValueType.FLOAT32: "f4", GGUFValueType.FLOAT64: "f8", GGUFValueType.BOOL: "?",
}
_TYPED_DATA = {  # tensor types whose data gguf.GGUFReader gives as numbers; the others are bytes
    GGMLQuantizationType.F16: "f2", GGMLQuantizationType.F32: "f4", GGMLQuantizationType.F64: "f8",
    GGMLQuantizationType.I8: "i1", GGMLQuantizationType.I16: "i2", GGMLQuantizationType.I32: "i4",
    GGMLQuantizationType.I64: "i8",
}


class GGUFFormatError(ValueError):
    """The file does not follow the GGUF layout (truncated, or damaged)."""


class GGUFTensor(NamedTuple):
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # innermost first, as GGUF lists dimensions
    data: np.ndarray  # memory-mapped: numbers for float and int types, else bytes of shape (..., row bytes)


class GGUFFile(NamedTuple):
    """A parsed GGUF header. Shared by everything that reads the file: do not modify the values."""

    fields: Mapping[str, Any]  # key -> str, int, float, bool, or a list of them
    tensors: list[GGUFTensor]  # in file order


def read_gguf(path) -> GGUFFile:
    """The metadata and the tensor index of a GGUF file; tensor data stays on disk until it is read.
    Raises GGUFFormatError (or a ValueError from decoding) on a truncated or damaged file."""
    mapped = np.memmap(path, mode="r")
    header = _Header(memoryview(mapped))
    fields = header.fields()
    infos = header.tensor_infos()
    alignment = fields.get("general.alignment", _DEFAULT_ALIGNMENT)
    data_start = -(-header.pos // alignment) * alignment  # rounded up to the alignment
    tensors = [_tensor(mapped, header.order, data_start, *info) for info in infos]
    return GGUFFile(MappingProxyType(fields), tensors)


def release(data: np.ndarray) -> None:
    """Drop the pages of a memory-mapped tensor's bytes from this process once they are read into memory of its own
    (converted, dequantized): a read-only file mapping re-reads them from the file if touched again. Why: touched
    pages count in the process's memory, so a 98 MB file loaded into 98 MB of tensors would otherwise count twice.
    Linux only (elsewhere the pages stay until the file is unmapped)."""
    if not sys.platform.startswith("linux") or data.nbytes == 0:
        return
    start = data.ctypes.data
    aligned = start - start % mmap.PAGESIZE  # madvise takes whole pages; a neighbour's shared page is re-read
    _libc().madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + data.nbytes - aligned), mmap.MADV_DONTNEED)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


class _Header:
    """A cursor over the header bytes, in the file's byte order."""

    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0
        if bytes(self._take(4)) != b"GGUF":
            raise GGUFFormatError("it does not start with the magic 'GGUF'")
        raw = self._take(4)
        # Little-endian is the norm; llama.cpp also writes big-endian files, told apart by the version.
        self.order = next((o for o in "<>" if struct.unpack(o + "I", raw)[0] in _VERSIONS), None)
        if self.order is None:
            raise GGUFFormatError(f"GGUF version {struct.unpack('<I', raw)[0]} is not supported "
                                  f"(supported: {', '.join(map(str, _VERSIONS))})")
        self._u32, self._u64 = struct.Struct(self.order + "I"), struct.Struct(self.order + "Q")
        self.n_tensors, self.n_fields = self.uint64(), self.uint64()

    def fields(self) -> dict[str, Any]:
        fields = {}
        for _ in range(self.n_fields):
            key, vtype = self.string(), self.uint32()
            if key in fields:
                raise GGUFFormatError(f"the metadata key '{key}' appears twice")
            fields[key] = self.value(vtype, key)
            if key == "general.alignment":
                _check_alignment(vtype, fields[key])
        return fields

    def tensor_infos(self) -> list[tuple[str, int, tuple[int, ...], int]]:
        """(name, type, dims, offset in the data) of each tensor."""
        infos, names = [], set()
        for _ in range(self.n_tensors):
            name = self.string()
            if name in names:
                raise GGUFFormatError(f"the tensor '{name}' appears twice")
            names.add(name)
            dims = tuple(self.array(GGUFValueType.UINT64, self.uint32()))
            infos.append((name, self.uint32(), dims, self.uint64()))
        return infos

    def value(self, vtype: int, key: str):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.array(vtype, 1)[0]
        if vtype == GGUFValueType.ARRAY:
            item_type, count = self.uint32(), self.uint64()
            if item_type == GGUFValueType.STRING:
                return self.strings(count)
            if item_type in _SCALARS:
                return self.array(item_type, count)
            if item_type == GGUFValueType.ARRAY:  # flattened, as gguf.GGUFReader's contents() gives it
                return [item for _ in range(count) for item in self.value(item_type, key)]
            vtype = item_type
        raise GGUFFormatError(f"the metadata key '{key}' has the unknown value type {vtype}")

    def array(self, vtype: int, count: int) -> list:
        dtype = np.dtype(self.order + _SCALARS[vtype])
        self._need(count * dtype.itemsize)
        values = np.frombuffer(self.buf, dtype, count, self.pos).tolist()
        self.pos += count * dtype.itemsize
        return values

    def strings(self, count: int) -> list[str]:
        # The hot loop of a vocabulary (~100k strings): locals only, one bounds check per string.
        buf, pos, size, length_at, out = self.buf, self.pos, len(self.buf), self._u64.unpack_from, []
        for _ in range(count):
            if pos + 8 > size:
                self.pos = pos
                self._need(8)
            start = pos + 8
            pos = start + length_at(buf, start - 8)[0]
            if pos > size:
                self.pos = start
                self._need(pos - start)
            out.append(str(buf[start:pos], "utf-8"))
        self.pos = pos
        return out

    def string(self) -> str:
        return str(self._take(self.uint64()), "utf-8")

    def uint32(self) -> int:
        return self._u32.unpack(self._take(4))[0]

    def uint64(self) -> int:
        return self._u64.unpack(self._take(8))[0]

    def _take(self, n: int) -> memoryview:
        self._need(n)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GGUFFormatError(f"the header needs {n} bytes at byte {self.pos}, past the end of the file "
                                  f"({len(self.buf)} bytes)")


def _check_alignment(vtype: int, alignment) -> None:
    if vtype != GGUFValueType.UINT32:
        raise GGUFFormatError(f"general.alignment is of type {vtype}, not UINT32 ({GGUFValueType.UINT32.value})")
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"general.alignment ({alignment}) is not a power of two")


def _tensor(mapped: np.memmap, order: str, data_start: int, name: str, raw_type: int, dims: tuple[int, ...],
            offset: int) -> GGUFTensor:
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise GGUFFormatError(f"tensor '{name}' has the unknown type {raw_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_elements = int(np.prod(dims, dtype=object))  # exact: a damaged header may hold huge dimensions
    n_bytes = n_elements * type_size // block_size
    start = data_start + offset
    if start + n_bytes > len(mapped):
        raise GGUFFormatError(f"tensor '{name}' (bytes {start} to {start + n_bytes}) runs past the end of the "
                              f"file ({len(mapped)} bytes)")
    np_dims = tuple(reversed(dims))  # outermost first, as numpy lists dimensions
    raw = mapped[start:start + n_bytes]
    if qtype in _TYPED_DATA:
        data = raw.view(np.dtype(order + _TYPED_DATA[qtype])).reshape(np_dims)
    else:
        data = raw.reshape(quant_shape_to_byte_shape(np_dims, qtype))
    return GGUFTensor(name, qtype, dims, data)
