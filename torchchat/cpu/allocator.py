"""The C allocator's threshold for giving large blocks their own memory map (glibc's ``M_MMAP_THRESHOLD``).

Why: a prompt's forward allocates temporaries of a few MB each (activations, a quantized weight's dequantized
slices: ``kernels.float32_linear``). Past glibc's threshold (128 KB, raised only when such a block is freed) each one
is a fresh ``mmap``, whose pages fault in (zeroed) on first touch, every forward. A model loaded from float weights
had raised the threshold by freeing them; one loaded straight into quantized layers frees nothing large, and its
512-token SmolLM2 prefill measured 0.74 s against 0.61-0.64 s once the thresholds were raised. With a fixed threshold
of 32 MB (glibc's own upper bound for the dynamic one) those blocks come from the heap, and with the heap's trim
threshold at twice that (what glibc's dynamic rule sets) its top is not given back after every forward, so they are
reused.
"""

from __future__ import annotations

import ctypes
import functools
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
THRESHOLD_BYTES = 32 * 2**20


@functools.cache
def keep_large_blocks_in_heap() -> bool:
    """Set the thresholds once per process (glibc only); False where they could not be set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        trim = libc.mallopt(ctypes.c_int(M_TRIM_THRESHOLD), ctypes.c_int(2 * THRESHOLD_BYTES))
        return bool(trim and libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(THRESHOLD_BYTES)))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
