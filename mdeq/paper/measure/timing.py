"""How a measurement is timed, and on what: the one timing loop (``timeit``), the full profile's GPU check.

Why one module: Fig. 4b's time and the benchmarks (``benchmarks/``) time with the same loop, so a time means
the same wherever it is drawn. The figures' modules share the rest: memory released between two models
(``_release_memory``) and the warning that a solve run to its whole budget at untrained weights raises
(``_UNCONVERGED``), which they silence.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import time
from typing import Any, Callable

import torch

__all__ = ["sync", "timeit", "check_gpu"]

_UNCONVERGED = "IFT backward solve did not converge"  # expected here: untrained weights, budgets run to the end


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int = 1, *,
           after: Callable[[], Any] | None = None) -> list[float]:
    """Wall times in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, device-synchronised.

    ``after`` runs after each timed call, outside the timing (e.g. reading the solver's statistics).
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return out


def check_gpu(device: str, what: str) -> None:
    """The full profile measures on a GPU: with ``device="auto"`` and none visible, stop and say so."""
    if device == "auto" and not torch.cuda.is_available():
        raise RuntimeError(f"the full profile {what} on a GPU and none is visible; pass device='cpu' to run on this "
                           f"CPU anyway (labelled as such; slow at full resolution), or use profile='smoke'")


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
