"""How does limited-memory Broyden's method solve z = f(z) (paper, Appendix B.1)?

The paper's solver, forward and backward. It is called as every solver is (``mdeq/core/solvers.py``);
``broyden``'s docstring says how the inverse-Jacobian estimate is kept and restarted, and which two stores
of its history (``history``) give the same iterates.
"""
from __future__ import annotations

from typing import Callable

import torch

from mdeq.core.solver_common import _checked_options, _coef, _dot, _setup

__all__ = ["broyden", "HISTORIES"]

HISTORIES = ("auto", "low_rank", "residuals")


@_checked_options
def broyden(f: Callable, z0, *, max_iter: int = 30, tol: float = 1e-3, stop_mode: str = "rel",
            memory: int = 18, restart_factor: float | None = 10.0, stagnation_patience: int = 50,
            divergence_factor: float = 1e6, check_every: int = 1, exclude_initial: bool = False,
            throw: bool = False, warn: bool = True, trace_steps: bool = False, history: str = "auto"):
    """Limited-memory Broyden's method for g(z) = f(z) - z = 0 (paper, Appendix B.1).

    Keeps the inverse-Jacobian estimate B = -I + U V^T per sample, updated by Sherman-Morrison
    ("good" Broyden), step size 1, so the first step is z1 = z0 + g(z0) = f(z0) (the sign the
    released code fixed in commit eb3d85f). At most ``memory`` (m) updates are kept; once full, the
    oldest update is dropped (a ring buffer), so memory is O(m B D) whatever ``max_iter`` is.

    Dropping old updates can make the estimate inconsistent, and a sample's iterate can then run
    away. A sample whose absolute residual exceeds ``restart_factor`` times its lowest is restarted
    from its lowest iterate with an empty history (B = -I) while the others go on, at most once from
    the same lowest iterate (a second restart from it would repeat the step that blew up, forever);
    ``None`` disables this. ``stats.extra["restarts"]`` counts restarted samples.

    ``history`` says how the updates are stored; both give the same iterates (up to float rounding):
    - ``low_rank``: u_j and v_j as (B, m, D) buffers; four passes over them per iteration.
    - ``residuals``: every residual g_0..g_k in a (B, max_iter + 1, D) buffer, and u_j, v_j and the
      step as float64 coefficients over it (u_j, v_j and the steps all lie in the span of the
      residuals), with the residuals' Gram matrix: one reduction and one expansion per iteration,
      and no D-sized work for u_j, v_j. It is the faster store while the whole solve fits.
    - ``auto``: ``residuals`` when it needs no more memory than ``low_rank`` (max_iter + 1 <= 2 m,
      e.g. the paper's training solves) and ``low_rank`` otherwise (long solves of Figs. 5-6).
    """
    if not (isinstance(memory, int) and memory >= 1):
        raise ValueError(f"memory must be a positive int, got {memory!r}")
    if restart_factor is not None and not restart_factor > 1:
        raise ValueError(f"restart_factor must be > 1 or None, got {restart_factor!r}")
    if history not in HISTORIES:
        raise ValueError(f"history must be one of {HISTORIES}, got {history!r}")
    m = min(memory, max_iter) if isinstance(max_iter, int) else memory
    if history == "auto":
        history = "residuals" if isinstance(max_iter, int) and max_iter + 1 <= 2 * m else "low_rank"
    z, F, mon, result = _setup("broyden", f, z0, max_iter, tol, stop_mode,
                               stagnation_patience=stagnation_patience, divergence_factor=divergence_factor,
                               check_every=check_every, exclude_initial=exclude_initial, throw=throw, warn=warn,
                               restart_factor=restart_factor, trace_steps=trace_steps,
                               keep_best_g=history == "low_rank", keep_best_z=history == "low_rank")
    run = _broyden_low_rank if history == "low_rank" else _broyden_residuals
    nstep, history_bytes = run(z, F, mon, m)
    out = result(nstep)
    out[1].extra.update(memory=m, history=history, history_bytes=history_bytes, restarts=mon.restarts)
    return out


def _broyden_low_rank(z, F, mon, m):
    """Broyden with u_j, v_j stored as (B, m, D) ring buffers. Returns (nstep, history bytes)."""
    B, D = z.shape
    U = z.new_empty(B, m, D)   # only the first n_used rows are ever read
    Vt = z.new_empty(B, m, D)
    nbytes = 2 * U.numel() * U.element_size()
    fz = F(z)
    g = mon.record(z, fz)
    nstep, n_used, head = 0, 0, 0  # head: slot of the next update
    if mon.should_stop(nstep):
        return nstep, nbytes
    delta = g.clone()  # -B0 g = g
    while True:
        z = z + delta
        fz = F(z)
        g_new = mon.record(z, fz)
        nstep += 1
        if mon.should_stop(nstep):
            return nstep, nbytes
        if mon.restart is not None:  # rare: restart the blown-up samples from their lowest iterate
            bad = mon.restart[:, None]
            z = torch.where(bad, mon.best_z, z)
            g_new = torch.where(bad, mon.best_g, g_new)
            g = torch.where(bad, mon.best_g, g)
            delta = torch.where(bad, -g, delta)  # makes B_k g_k = -delta hold for them below
            keep = (~mon.restart).to(U.dtype)[:, None, None]
            U.mul_(keep)
            Vt.mul_(keep)
            mon.restarts += int(mon.restart.sum())
        # With s = delta = -B_k g_k:  B_k y = B_k g_new + delta, so u = (s - B_k y)/(v^T y) = -Bg / (v^T y).
        Uh, Vh = U[:, :n_used], Vt[:, :n_used]
        Bg = _rmatvec(Uh, Vh, g_new)           # B_k g_new
        vt = _lmatvec(Uh, Vh, delta)           # s^T B_k
        vg = _dot(vt, g_new)
        vy = vg - _dot(vt, g)                  # v^T y with y = g_new - g
        inv = _inverse_or_zero(vy)             # a zero denominator skips the update (u = 0)
        # New direction -B_{k+1} g_new = -(Bg + u (v^T g_new)) = -Bg (1 + inv vg), plus the dropped
        # term if the history wraps; u = Bg inv goes straight into its history slot.
        delta = Bg * (-1.0 - inv * vg)
        if n_used == m:
            delta.addcmul_(U[:, head], _dot(Vt[:, head], g_new))
        torch.mul(Bg, inv, out=U[:, head])
        Vt[:, head] = vt
        head = (head + 1) % m
        n_used = min(n_used + 1, m)
        g = g_new


def _broyden_residuals(z0, F, mon, m):
    """The same iterates as ``_broyden_low_rank``, with the history stored as coefficients over the residuals.

    Per sample, G holds the residuals g_0..g_k as rows and K = G G^T their Gram matrix (float64).
    Every D-vector of the method is z0 + c^T G or c^T G for a coefficient row c (float64): the
    iterates z_k (C[:, k]), u_j = a_j^T G, v_j = b_j^T G, the step d^T G, and the current and
    previous residuals (one-hot rows, or a past row after a restart). Dot products are then small:
    (p^T G)(q^T G) = p^T K q. One iteration reads G twice: the new residual's dot products with every
    row (a row of K) and the step z + d^T G. The lowest iterate is not copied every iteration but
    rebuilt once, at the end, from its coefficients (equal to the evaluated one up to float rounding).
    Returns (nstep, history bytes).
    """
    B, D = z0.shape
    n = mon.max_iter + 1                       # rows: z0 and one per step
    f64 = dict(dtype=torch.float64, device=z0.device)
    G = z0.new_empty(B, n, D)
    K = torch.zeros(B, n, n, **f64)
    C = torch.zeros(B, n, n, **f64)            # z_k = z0 + C[:, k] G
    A = torch.zeros(B, m, n, **f64)            # u_j = A[:, j] G
    V = torch.zeros(B, m, n, **f64)            # v_j = V[:, j] G
    eye = torch.eye(n, **f64)
    rows = torch.arange(B, device=z0.device)
    nbytes = G.numel() * G.element_size() + sum(t.numel() for t in (K, C, A, V)) * K.element_size()

    def evaluate(k, z):
        """f at z_k, its residual as row k of G and the residual's dot products as row k of K."""
        g = mon.record_parts(z, F(z, flat=False), out=G[:, k])
        dots = _coef(G[:, :k + 1], g).squeeze(1).to(torch.float64)  # (B, k + 1)
        K[:, k, :k + 1] = dots
        K[:, :k + 1, k] = dots

    def expand(x, coef, k):
        """x + coef G over the first k rows of G."""
        return torch.baddbmm(x.unsqueeze(1), coef[:, None, :k].to(x.dtype), G[:, :k]).squeeze(1)

    def done(nstep):
        mon.best_z = expand(z0, C[rows, mon.best_step], mon.nfe)  # the lowest iterate, up to float rounding
        return nstep, nbytes

    z, c = z0, C[:, 0]
    evaluate(0, z)
    nstep, head = 0, 0
    if mon.should_stop(nstep):
        return done(nstep)
    g = eye[0].expand(B, n).clone()     # coefficients of the previous residual
    d = g.clone()                       # of the step: -B0 g = g
    while True:
        z = expand(z, d, nstep + 1)
        c = c + d
        nstep += 1
        C[:, nstep] = c
        evaluate(nstep, z)
        if mon.should_stop(nstep):
            return done(nstep)
        g_new = eye[nstep].expand(B, n)
        if mon.restart is not None:  # rare: restart the blown-up samples from their lowest iterate
            bad = mon.restart[:, None]
            best = eye[mon.best_step]                 # the lowest iterate's residual is a row of G
            c = torch.where(bad, C[rows, mon.best_step], c)
            z = torch.where(bad, expand(z0, c, nstep), z)
            g_new = torch.where(bad, best, g_new)
            g = torch.where(bad, best, g)
            d = torch.where(bad, -g, d)
            keep = (~mon.restart).to(A.dtype)[:, None, None]
            A.mul_(keep)
            V.mul_(keep)
            mon.restarts += int(mon.restart.sum())
        r = _bmv(K, g_new)                            # (B, n): g_i . g_new for every row i
        Bg = _bmv(A.transpose(1, 2), _bmv(V, r)) - g_new          # B_k g_new = -g_new + sum_j u_j (v_j . g_new)
        vt = _bmv(V.transpose(1, 2), _bmv(A, _bmv(K, d))) - d      # s^T B_k = -s + sum_j (u_j . s) v_j
        vg = (vt * r).sum(1, keepdim=True)
        vy = vg - (vt * _bmv(K, g)).sum(1, keepdim=True)
        inv = _inverse_or_zero(vy)
        d = Bg * (-1.0 - inv * vg)
        d = d + A[:, head] * (V[:, head] * r).sum(1, keepdim=True)  # the dropped update (zero until the ring wraps)
        A[:, head] = Bg * inv
        V[:, head] = vt
        head = (head + 1) % m
        g = g_new


def _bmv(M, x):
    """Batched matrix-vector product: (B, p, q) x (B, q) -> (B, p)."""
    return torch.bmm(M, x.unsqueeze(2)).squeeze(2)


def _inverse_or_zero(x):
    """-1 / x, and 0 where x is 0 (a zero Broyden denominator skips the update)."""
    ok = x != 0
    return torch.where(ok, -1.0 / torch.where(ok, x, torch.ones_like(x)), torch.zeros_like(x))


# Low-rank products over a (B, n, D) history, built on the reductions of ``mdeq/core/solver_common.py``.

def _rmatvec(U, Vt, x):
    """B x for B = -I + sum_j u_j v_j^T (rows of U, Vt per sample): -x + sum_j u_j (v_j . x)."""
    if U.shape[1] == 0:
        return -x
    return torch.baddbmm(x.unsqueeze(1), _coef(Vt, x), U, beta=-1).squeeze(1)


def _lmatvec(U, Vt, x):
    """x^T B = -x^T + sum_j (x . u_j) v_j^T."""
    if U.shape[1] == 0:
        return -x
    return torch.baddbmm(x.unsqueeze(1), _coef(U, x), Vt, beta=-1).squeeze(1)
