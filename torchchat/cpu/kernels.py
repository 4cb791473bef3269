"""CPU decode kernels, C++ ops in ``torchchat/csrc/`` built into one library: ``torch.ops.torchchat.gemv`` (a few
rows times a float32, bfloat16 or int8 weight; int8 with a scale a row or a float16 scale a block of 32, llama.cpp's
Q8_0, either with the rows of x in int16), ``gemv_int4`` and ``dequantize_int4`` (quantize.Int4Linear's 4-bit
layout), ``decode_attention`` (one query position of each sequence over the filled part of its KV cache row), and
``decode_layers`` (all of a model's transformer blocks for one position of each sequence of a batch, with the same
row kernels: see ``torchchat.cpu.install``), and ``prompt_linear`` (a prompt's many rows times a weight of any of
those formats: single-threaded MKL GEMMs on chunks of the weight's rows that the kernels' threads claim one at a
time, so a thread the OS deschedules on a busy machine holds up little).

A decode step multiplies one row of activations per sequence by every weight matrix, so it is bound by how fast
the weights stream from memory. On AVX2 CPUs PyTorch's own kernels fall short of that: MKL's float32
matrix-vector product runs on one thread, and oneDNN (like Inductor's fused loop) converts bfloat16 at about half
the memory's rate. ``gemv.cpp`` reads each weight once for all the rows of a step, converts it in registers and
splits the weight's rows over torch's threads; each sequence's result is bit-identical to a batch of one.

The library is compiled against the installed torch at first use (~30 s, once: it is kept in
``$TORCHCHAT_CACHE``, default ``~/.cache/torchchat``, keyed by the sources, torch version and compiler;
Inductor needs the same compiler for ``--compile``) and loaded with ``torch.ops.load_library``.
Without a compiler, on a CPU without AVX2, or with ``TORCHCHAT_CPU_KERNELS=0`` (for A/B
measurements), ``available()`` is False and callers use torch's kernels.
"""

from __future__ import annotations

import contextlib
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

from torchchat.cpu import run_queue

CSRC = Path(__file__).parent.parent / "csrc"  # torchchat/csrc
# Compiled; csrc's headers are in the build's key too.
SOURCES = (CSRC / "gemv.cpp", CSRC / "decode_attention.cpp", CSRC / "decode_layers.cpp", CSRC / "work_pool.cpp",
           CSRC / "prompt_linear.cpp")
# -ffp-contract=off: a float expression is computed as written (no multiply-add fused at the compiler's choice), so a
# row's arithmetic is the same in every kernel that inlines it: batch rows bit-identical to a batch of one.
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c++20", "-w")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
CACHE_DTYPES = (torch.float16, torch.float32)  # KV caches the attention kernels read (csrc/attend.h)
_ENV_SWITCH = "TORCHCHAT_CPU_KERNELS"
SLICE_BYTES = 64 * 2**20  # float32 weight that float32_linear converts at a time
# The most rows (a decode step's sequences, a short prompt) given to the row kernels; more go to torch's GEMMs. The
# largest batch at which every weight format's op still wins, measured on SmolLM2's 210 block matrices (1 thread,
# CPU time: the 2-core machine was shared; op / torch): float32 against MKL 0.92 at 4 rows, 0.87 at 12, 1.22 at 16
# (MKL's AVX-512 GEMM wins once the products are compute-bound); bfloat16 against float32 GEMMs on converted
# slices 0.61 at 8, 0.84 at 16, 1.20 at 24; int8 against aten's int8 kernel 0.74 at 8, 0.99 at 32; int4 against
# dequantizing for a float32 GEMM 0.31 at 8, 0.85 at 32.
MAX_GEMV_ROWS = 12


_loaded: bool | None = None  # available()'s answer, once asked


def available() -> bool:
    """Are the ``torch.ops.torchchat`` ops loaded (built, AVX2, not switched off)?

    The answer is kept in a module global: Dynamo, tracing a compiled step (always after an eager one asked), reads
    it as a constant under a guard rather than tracing the build. Not ``torch.compiler.assume_constant_result``,
    which imports Dynamo (and sympy: ~75 MB of a 135M model's ~300 MB run) into every run, compiled or not."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def takes_rows(x: torch.Tensor) -> bool:
    """Is x (..., in) a CPU input of at most MAX_GEMV_ROWS rows in a dtype the row kernels take, with the ops
    loaded? (The weight's checks are the caller's: ``supports``, or Int4Linear's own.)"""
    return (x.device.type == "cpu" and x.dim() >= 1 and 0 < x.numel() <= MAX_GEMV_ROWS * x.size(-1)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and available())


def takes_prompt(x: torch.Tensor) -> bool:
    """Does ``torch.ops.torchchat.prompt_linear`` take x (..., in): more than MAX_GEMV_ROWS rows (a prompt, a scored
    text) on CPU, in a float dtype, with the op loaded and torch's MKL under it? The weight's checks are the
    caller's (a contiguous float32, bfloat16, int8 or 4-bit weight as ``gemv_operands`` gives it)."""
    return (x.device.type == "cpu" and x.dim() >= 1 and x.numel() > MAX_GEMV_ROWS * x.size(-1)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and available() and _prompt_linear())


@functools.cache
def _prompt_linear() -> bool:
    return bool(torch.ops.torchchat.prompt_linear_available())


STALE_JUDGEMENT_S = 0.05  # the pool's workers have been asleep for a while: they are not in the run queue


def _busy(threads: int) -> bool:
    """The pool's judgement if it is recent; else the run queue's, which the pool then follows."""
    ops = torch.ops.torchchat
    if ops.work_pool_busy():
        return True
    if ops.work_pool_idle_s() < STALE_JUDGEMENT_S or not run_queue.overcommitted(threads):
        return False
    ops.work_pool_assume_busy()
    return True


@contextlib.contextmanager
def one_torch_thread_when_busy(device: torch.device):
    """Speed, a prompt on a busy machine: while the kernels' pool judges the machine busy (its workers did not keep
    up: csrc/work_pool.h), torch's own ops (elementwise, attention) run on one thread and the pool keeps its count
    for the prompt's GEMMs (prompt_linear). OpenMP splits each op statically, so beside a CPU hog every one of a
    prompt's ~700 small ops waited for the thread sharing the hog's core: 0.32 of their quiet speed, below one
    thread's. Elsewhere (another device, quiet, one thread, no kernels) nothing changes. ``device``: the prompt's.

    Where the pool has not judged of late (no region for STALE_JUDGEMENT_S: a run's first prompt, a chat's next
    turn), the run queue decides, and the pool runs as on a busy machine from then on if it says so (run_queue)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1 or not available() or not _busy(threads):
        yield
        return
    torch.ops.torchchat.work_pool_hold_threads(threads)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.ops.torchchat.work_pool_hold_threads(0)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Is ``x @ weight.T`` at most MAX_GEMV_ROWS rows on CPU with a weight type and layout the op takes?"""
    return (weight.device.type == "cpu" and weight.dim() == 2 and weight.size(1) == x.size(-1)
            and weight.dtype in WEIGHT_DTYPES and weight.is_contiguous() and takes_rows(x))


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
    torch.library.register_fake("torchchat::prompt_linear")(_prompt_linear_shape)
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


def _decode_attention_shape(q, k_cache, v_cache, input_pos, rows):
    """The op's output for tracing: q's shape and dtype."""
    return torch.empty_like(q)


def _prompt_linear_shape(x, weight, aux=None, group_size=0):
    """The op's output for tracing: (..., out) in x's dtype."""
    return x.new_empty(*x.shape[:-1], weight.size(0))


def _decode_layers_shape(x, norms, eps, linears, group_sizes, k_caches, v_caches, rope, input_pos, rows):
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
