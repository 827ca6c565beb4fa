"""How does Anderson acceleration solve z = f(z)?

Called as every solver is (``mdeq/core/solvers.py``); ``anderson``'s docstring gives the update.
"""
from __future__ import annotations

from typing import Callable

import torch

from mdeq.core.solver_common import _checked_options, _coef, _setup

__all__ = ["anderson"]


@_checked_options
def anderson(f: Callable, z0, *, max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "rel",
             memory: int = 6, lam: float = 1e-4, beta: float = 1.0, stagnation_patience: int = 50,
             divergence_factor: float = 1e6, check_every: int = 1, exclude_initial: bool = False,
             throw: bool = False, warn: bool = True, trace_steps: bool = False):
    """Anderson acceleration with history ``memory`` (m), regularisation ``lam``, mixing ``beta``.

    Minimises ||sum_i a_i g_i|| with sum_i a_i = 1 over the last m residuals g_i = f(x_i) - x_i,
    then x_new = sum_i a_i (f(x_i) - (1 - beta) g_i). The Gram matrix of the residuals is kept and
    updated by one row per step (O(m D)) instead of being recomputed over the whole history.
    """
    if not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta!r}")
    x, F, mon, result = _setup("anderson", f, z0, max_iter, tol, stop_mode,
                               stagnation_patience=stagnation_patience, divergence_factor=divergence_factor,
                               check_every=check_every, exclude_initial=exclude_initial, throw=throw, warn=warn,
                               trace_steps=trace_steps)
    B, D = x.shape
    m = memory
    Fh = x.new_empty(B, m, D)   # f(x_i); only filled slots are read
    G = x.new_empty(B, m, D)    # g_i = f(x_i) - x_i
    H = x.new_zeros(B, m, m)    # Gram matrix G G^T
    nstep = 0
    while True:
        fx = F(x)
        g = mon.record(x, fx)
        if mon.should_stop(nstep):
            break
        slot = nstep % m
        Fh[:, slot] = fx
        G[:, slot] = g
        n = min(nstep + 1, m)
        row = _coef(G[:, :n], g).squeeze(1)              # (B, n): g_j . g for every filled slot
        H[:, slot, :n] = row
        H[:, :n, slot] = row
        Hn = H[:, :n, :n]
        scale = Hn.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)[:, None, None]
        A = Hn / scale + lam * torch.eye(n, dtype=x.dtype, device=x.device)
        ones = x.new_ones(B, n, 1)
        w = torch.linalg.solve_ex(A, ones).result  # solve_ex: no host sync for an error check on a GPU
        alpha = (w / w.sum(1, keepdim=True)).transpose(1, 2)  # (B, 1, n)
        x = torch.bmm(alpha, Fh[:, :n]).squeeze(1)
        if beta != 1.0:
            x = x - (1 - beta) * torch.bmm(alpha, G[:, :n]).squeeze(1)
        nstep += 1
    return result(nstep)
