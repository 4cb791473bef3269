"""Batch-1 CPU decode kernels, C++ ops in ``torchchat/csrc/`` built into one library:
``torch.ops.torchchat.gemv`` (one row times a float32, bfloat16 or int8 weight), ``gemv_int4`` and
``dequantize_int4`` (quantize.Int4Linear's 4-bit layout), ``decode_attention`` (one query position
over the filled part of the KV cache), and ``decode_layers`` (all of a model's transformer blocks for one
position of one sequence, with the same row kernels: see ``use_fused_decode``).

A decode step at batch 1 multiplies one row of activations by every weight matrix, so it is bound
by how fast the weights stream from memory. On AVX2 CPUs PyTorch's own kernels fall short of that:
MKL's float32 matrix-vector product runs on one thread, and oneDNN (like Inductor's fused loop)
converts bfloat16 at about half the memory's rate. ``gemv.cpp`` reads each weight once, converts it
in registers and splits the rows over torch's threads.

The library is compiled against the installed torch at first use (~30 s, once: it is kept in
``$TORCHCHAT_CACHE``, default ``~/.cache/torchchat``, keyed by the sources, torch version and compiler;
Inductor needs the same compiler for ``--compile``) and loaded with ``torch.ops.load_library``.
Without a compiler, on a CPU without AVX2, or with ``TORCHCHAT_CPU_KERNELS=0`` (for A/B
measurements), ``available()`` is False and callers use torch's kernels.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.utils.cpp_extension

CSRC = Path(__file__).with_name("csrc")
# Compiled; csrc's headers are in the build's key too.
SOURCES = (CSRC / "gemv.cpp", CSRC / "decode_attention.cpp", CSRC / "decode_layers.cpp")
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
CACHE_DTYPES = (torch.float16, torch.float32)  # KV caches the attention kernels read (csrc/attend.h)
_ENV_SWITCH = "TORCHCHAT_CPU_KERNELS"
SLICE_BYTES = 64 * 2**20  # float32 weight that float32_linear converts at a time


@torch.compiler.assume_constant_result  # Dynamo bakes the answer in rather than tracing the build
def available() -> bool:
    """Are the ``torch.ops.torchchat`` ops loaded (built, AVX2, not switched off)?"""
    return _load()


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Is ``x @ weight.T`` one row on CPU with a weight type and layout the op takes?"""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() == x.size(-1)
            and weight.dim() == 2 and weight.size(1) == x.size(-1) and weight.dtype in WEIGHT_DTYPES
            and weight.is_contiguous() and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and available())


@functools.cache
def _load() -> bool:
    if os.environ.get(_ENV_SWITCH, "1") == "0" or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False
    try:
        torch.ops.load_library(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(e)]
        print(f"torchchat: CPU decode kernels unavailable ({reason[0]}); using torch's", file=sys.stderr)
        return False
    torch.library.register_fake("torchchat::gemv")(_gemv_shape)
    torch.library.register_fake("torchchat::gemv_int4")(_gemv_int4_shape)
    torch.library.register_fake("torchchat::dequantize_int4")(_dequantize_int4_shape)
    torch.library.register_fake("torchchat::decode_attention")(_decode_attention_shape)
    torch.library.register_fake("torchchat::decode_layers")(_decode_layers_shape)
    return True


def _gemv_shape(x, weight, scale=None):
    """The op's output for tracing (Dynamo, Inductor): (..., out) in x's dtype."""
    return x.new_empty(*x.shape[:-1], weight.size(0))


def _gemv_int4_shape(x, packed, scales_and_mins, group_size):
    """The op's output for tracing: (..., out) in x's dtype."""
    return x.new_empty(*x.shape[:-1], packed.size(0))


def _dequantize_int4_shape(packed, scales_and_mins, group_size):
    """The op's output for tracing: (out, in) float32."""
    return packed.new_empty(packed.size(0), 2 * packed.size(1), dtype=torch.float32)


def _decode_attention_shape(q, k_cache, v_cache, input_pos):
    """The op's output for tracing: q's shape and dtype."""
    return torch.empty_like(q)


def _decode_layers_shape(x, norms, eps, linears, group_sizes, k_caches, v_caches, rope, input_pos):
    """The op's output for tracing: x's shape and dtype (it also writes the caches)."""
    return torch.empty_like(x)


def _build() -> Path:
    """The shared library for this source, torch and compiler; compiled once, shared by processes."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++ or g++) on PATH")
    torch_lib = Path(torch.__file__).parent / "lib"
    command = [compiler, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
               *(f"-I{path}" for path in torch.utils.cpp_extension.include_paths()),
               *(str(source) for source in SOURCES),
               f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    sources = b"".join(path.read_bytes() for path in sorted(CSRC.glob("*.[ch]*")))
    key = hashlib.sha256(sources + " ".join(command + [torch.__version__]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TORCHCHAT_CACHE", Path.home() / ".cache" / "torchchat"))
    target = cache / f"kernels-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print("torchchat: building the CPU decode kernels (once, ~30 s)", file=sys.stderr)
        # Compile to a private name, then rename: ranks starting together never load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            subprocess.run(command + ["-o", tmp], check=True, capture_output=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


def float32_linear(x: torch.Tensor, out_features: int, weight_rows, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` as float32 GEMMs, for many-row inputs (prompts) whose weight is stored in a
    format torch's fast GEMM does not take (bf16 without native instructions, int8). ``weight_rows(start,
    end)`` gives rows [start, end) of W in float32; they are converted a slice at a time, so the transient
    copy stays small even for a 128k-row output layer. Returns (..., out_features) in x's dtype."""
    xf = x.float()
    out = x.new_empty(*x.shape[:-1], out_features)  # (..., out_features)
    step = max(1, SLICE_BYTES // (4 * x.size(-1)))
    for start in range(0, out_features, step):
        end = min(start + step, out_features)
        part = torch.nn.functional.linear(xf, weight_rows(start, end))  # (..., end - start), float32
        out[..., start:end] = part if bias is None else part + bias[start:end].float()
    return out


class GemvLinear(torch.nn.Module):
    """A bias-free linear layer that sends a one-row input (a batch-1 decode step) to the op.

    Holds the very ``weight`` Parameter of the layer it replaces (a tied output layer stays tied) and
    gives every other input (a prompt, several sequences) to ``F.linear``, so prefill is unchanged.
    """

    def __init__(self, weight: torch.nn.Parameter):
        super().__init__()
        self.weight = weight  # (out, in)
        self.out_features, self.in_features = weight.shape

    def gemv_operands(self):
        """(weight, aux, group_size) as ``torch.ops.torchchat.decode_layers`` takes a linear, or None for a
        weight type it does not take (see use_fused_decode)."""
        ok = self.weight.dtype in (torch.float32, torch.bfloat16) and self.weight.is_contiguous()
        return (self.weight, None, 0) if ok else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype and supports(x, self.weight):
            return torch.ops.torchchat.gemv(x, self.weight)  # (..., out)
        return torch.nn.functional.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, one-row gemv"


def use_gemv(model: torch.nn.Module) -> int:
    """Replace, in place, the model's bias-free ``nn.Linear`` layers (exactly that type: quantized ones
    call the op themselves) with ``GemvLinear``. Returns how many; 0 where the op is unavailable."""
    if not available():
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and child.bias is None:
                setattr(parent, name, GemvLinear(child.weight))
                count += 1
    return count


def use_decode_attention(model: torch.nn.Module) -> int:
    """Send the model's one-position attention steps to ``torch.ops.torchchat.decode_attention``, which
    reads only the filled cache positions (a compiled step's shapes stay static). Needs float16 or float32
    CPU caches (``Transformer.setup_caches`` first). Returns how many attention layers; 0 where unavailable."""
    from torchchat.model import Attention

    if not available():
        return 0
    count = 0
    for module in model.modules():
        cache = getattr(module, "kv_cache", None)
        if isinstance(module, Attention) and cache is not None and cache.k.dtype in CACHE_DTYPES \
                and cache.k.device.type == "cpu":
            module.decode_attention = torch.ops.torchchat.decode_attention
            count += 1
    return count


def use_fused_decode(model: torch.nn.Module) -> int:
    """Send the model's steps of one position of one sequence (batch-1 decode) through all its layers to
    ``torch.ops.torchchat.decode_layers``: one call a token, ~5 thread wake-ups a layer instead of ~15 ops
    and their dispatches (csrc/decode_layers.cpp says why). Every block must qualify: caches float16 or
    float32 on CPU (``Transformer.setup_caches`` first), norms float32 or bfloat16 with one eps, and each linear giving
    ``gemv_operands()`` (GemvLinear: float32/bfloat16; quantize's Int8Linear, Int4Linear). Prompts and
    larger batches keep the modules' own path. Call it again after replacing any of the model's modules or
    parameters. Returns how many layers; 0 where it does not apply."""
    from torchchat.model import Transformer

    blocks = list(model.layers.values()) if isinstance(model, Transformer) else []
    if not available() or not blocks or not all(_fusable(block, blocks[0]) for block in blocks):
        return 0
    model.decode_layers = FusedDecode()
    return len(blocks)


class FusedDecode:
    """``Transformer.decode_layers`` as ``use_fused_decode`` sets it: ``decode_layers`` with the op's arguments
    gathered once.

    Speed: gathering the ~230 tensors of SmolLM2's 30 blocks from their modules takes ~1 ms of Python a token
    (nn.Module attribute lookups and the garbage collector's passes over the new lists), a tenth of an
    int4 token. Eager steps reuse them while the caches they were gathered with are the model's (a larger
    batch re-allocates every cache: ``Transformer.setup_caches``). A compiled step gathers them in its
    traced code: Dynamo lifts them as the graph's inputs and passes them itself at every call (its own
    per-call cost, docs/performance.md).
    """

    def __init__(self):
        self._arguments: tuple | None = None
        self._first_cache: torch.Tensor | None = None  # the first block's k cache when they were gathered

    def __call__(self, model, h: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return decode_layers(model, h, rope, input_pos)
        first_cache = next(iter(model.layers.values())).attention.kv_cache.k
        if self._arguments is None or self._first_cache is not first_cache:
            self._arguments, self._first_cache = _decode_layers_arguments(model), first_cache
        return torch.ops.torchchat.decode_layers(h, *self._arguments, rope, input_pos)  # (1, 1, dim)


def decode_layers(model, h: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """h (1, 1, dim) through every block of the model in one op call; writes the position into the caches."""
    return torch.ops.torchchat.decode_layers(h, *_decode_layers_arguments(model), rope, input_pos)  # (1, 1, dim)


def _decode_layers_arguments(model) -> tuple:
    """The op's (norms, eps, linears, group_sizes, k_caches, v_caches) for the model's blocks."""
    norms, tensors, group_sizes, k_caches, v_caches = [], [], [], [], []
    for block in model.layers.values():
        norms += [block.attention_norm.weight, block.ffn_norm.weight]
        for linear in _block_linears(block):
            weight, aux, group_size = linear.gemv_operands()
            tensors += [weight, aux]
            group_sizes.append(group_size)
        k_caches.append(block.attention.kv_cache.k)
        v_caches.append(block.attention.kv_cache.v)
    eps = next(iter(model.layers.values())).attention_norm.eps
    return norms, eps, tensors, group_sizes, k_caches, v_caches


def _block_linears(block) -> tuple:
    """In the order the ops take them: wq, wk, wv, wo, w1, w3, w2."""
    attention, ffn = block.attention, block.feed_forward
    return attention.wq, attention.wk, attention.wv, attention.wo, ffn.w1, ffn.w3, ffn.w2


def _fusable(block, first) -> bool:
    cache = block.attention.kv_cache
    norms = (block.attention_norm, block.ffn_norm)
    return (cache is not None and cache.k.dtype in CACHE_DTYPES and cache.k.device.type == "cpu"
            and all(norm.eps == first.attention_norm.eps for norm in norms)
            and all(norm.weight.dtype in (torch.float32, torch.bfloat16) for norm in norms)
            and all(getattr(linear, "gemv_operands", lambda: None)() is not None for linear in _block_linears(block)))
