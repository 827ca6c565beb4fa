"""How PyTorch's CPU tensors reuse freed memory: the C allocator set to keep it (glibc only).

Why: an implicit training step allocates and frees hundreds of state-sized tensors (a (B, D) iterate,
f's outputs, VJPs) and two (B, T + 1, D) solver histories. glibc's malloc serves large blocks with
``mmap`` and gives freed memory back to the kernel, so each such tensor starts on fresh pages that the
kernel must fault in and zero. On this project's 2-core CPU that cost about 20 % of an MDEQ-small step
at batch 128 (``docs/step_time.md``, "Where a training step's time goes"). With ``mmap`` off and no trimming, freed
blocks stay in the heap and the next tensor of that size reuses them. The numbers do not change; the
cost is that the process keeps its peak memory until it exits. It is what the PyTorch CPU tuning guides
get from jemalloc or tcmalloc, done with the C library already loaded.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Turn off ``mmap`` for large blocks and heap trimming, for the rest of this process; True if it took
    effect (calling it again changes nothing). Returns False where the C library is not glibc (macOS,
    Windows, musl), changing nothing.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # mmap off first: the trim threshold alone also freezes glibc's adaptive mmap threshold at
        # 128 KiB, which makes every large tensor an mmap (measured: a step twice as slow)
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False
