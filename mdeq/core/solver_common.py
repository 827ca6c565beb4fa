"""What does every root solver share: the checked call, the flat state, the residual monitor, the stats?

Why a list: MDEQ keeps one tensor per scale, (B, C_i, H_i, W_i), and the paper plots per-scale
convergence (Fig. 7), so residuals are tracked per scale. Internally the state is one contiguous
(B, D) buffer whose per-scale views are handed to ``f`` (no copy on the way in, one ``cat`` on the
way out), in the memory format of ``z0``: a scale given channels_last is stored (H, W, C)-ordered and
handed to ``f`` channels_last (the engine's CPU default; oneDNN has channels_last kernels). The
iterates do not depend on the order of the coordinates, only their float rounding does.

Residuals, per sample b: abs = ||f(z) - z||, rel = ||f(z) - z|| / ||f(z)|| (norms over all scales),
and per scale i: ||f_i(z) - z_i|| / ||f_i(z)||. If ``f`` returns a lower-precision dtype (autocast),
its output is cast to the state dtype: the solver state and residuals stay in the dtype of ``z0``.
Solves run under ``torch.no_grad()``: gradients come from ``mdeq.core.implicit.ImplicitLayer``.

Why a module of its own: the solvers (``mdeq/core/solvers.py``, ``broyden.py``, ``anderson.py``)
differ only in their update, and ``solvers.py`` registers all of them, so what they share sits
below every one of them.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch

__all__ = ["SolverStats", "SolverError", "STOP_MODES", "STOP_REASONS"]

STOP_MODES = ("abs", "rel")
STOP_REASONS = ("tol", "max_iter", "stagnation", "divergence", "non_finite")
_EPS = 1e-9  # keeps rel = ||f - z|| / (||f|| + eps) finite when f(z) = 0


class SolverError(RuntimeError):
    """Raised by a solve with ``throw=True`` that did not reach ``tol``."""


@dataclass
class SolverStats:
    """What one solve did. Traces are on the CPU, one column per residual evaluation.

    nfe: exact number of calls of ``f``. nstep: number of solver updates taken.
    abs_trace, rel_trace: (B, nfe) per-sample residual of each evaluated iterate.
    scale_rel_trace: (S, B, nfe) per-scale relative residual (Fig. 7).
    step_trace, scale_step_trace: with ``trace_steps=True`` only (else None): (B, nfe - 1) and
      (S, B, nfe - 1) relative change of the iterate, ||z[i+1] - z[i]|| / ||z[i]||, the measure the
      paper plots in Figs. 5-7 (NaN where ||z[i]|| is 0, e.g. after the usual z[0] = 0).
    abs_lowest, rel_lowest: (B,) residuals of the returned (lowest) iterate.
    lowest_step: (B,) index (into the traces) of the returned iterate.
    converged: (B,) whether the returned iterate meets ``tol`` in ``stop_mode``.
    stop_reason: one of STOP_REASONS.
    """

    solver: str
    stop_mode: str
    tol: float
    max_iter: int
    nfe: int
    nstep: int
    abs_trace: torch.Tensor
    rel_trace: torch.Tensor
    scale_rel_trace: torch.Tensor
    abs_lowest: torch.Tensor
    rel_lowest: torch.Tensor
    lowest_step: torch.Tensor
    converged: torch.Tensor
    stop_reason: str
    message: str = ""
    extra: dict = field(default_factory=dict)
    step_trace: torch.Tensor | None = None
    scale_step_trace: torch.Tensor | None = None

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def lowest(self) -> torch.Tensor:
        """Per-sample residual of the returned iterate in the ``stop_mode`` measure."""
        return self.rel_lowest if self.stop_mode == "rel" else self.abs_lowest

    def summary(self) -> str:
        low = self.lowest
        return (f"{self.solver}: nfe={self.nfe} stop={self.stop_reason} "
                f"{self.stop_mode} residual max={low.max().item():.3e} mean={low.mean().item():.3e} "
                f"converged={int(self.converged.sum())}/{self.converged.numel()} (tol {self.tol:g})")


# ----------------------------------------------------------------------------------------------
# Option checking: every solver takes keyword options only, and a misspelt one is an error.

def _checked_options(fn):
    """Wrap a solver so that an unknown option raises TypeError listing the valid ones."""
    sig = inspect.signature(fn)
    valid = [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(fn)
    def wrapper(f, z0, **options):
        unknown = [k for k in options if k not in valid]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(k, valid, n=1)
                hints.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            raise TypeError(f"{fn.__name__}() got unknown option(s) {', '.join(hints)}; "
                            f"valid options are: {', '.join(valid)}")
        # A solve is never differentiated through (ImplicitLayer attaches gradients), and under autocast
        # only f runs in lower precision: the solver's own products (bmm is on autocast's list) stay in z0's dtype.
        first = z0 if isinstance(z0, torch.Tensor) else next(iter(z0), None)
        device = first.device.type if isinstance(first, torch.Tensor) else "cpu"
        if torch.is_autocast_enabled(device):
            f, off = _under_autocast(f, device, torch.get_autocast_dtype(device)), torch.autocast(device, enabled=False)
        else:
            off = contextlib.nullcontext()
        with torch.no_grad(), off:
            return fn(f, z0, **options)

    wrapper.options = tuple(valid)
    return wrapper


def _under_autocast(f, device, dtype):
    def f_autocast(z):
        with torch.autocast(device, dtype=dtype):
            return f(z)
    return f_autocast


# ----------------------------------------------------------------------------------------------
# The list <-> flat (B, D) layout.

class _Layout:
    """Per-scale shapes and offsets of a list state flattened into one (B, D) tensor."""

    def __init__(self, zs: Sequence[torch.Tensor]):
        if len(zs) == 0:
            raise ValueError("z0 must hold at least one tensor")
        first = zs[0]
        for i, z in enumerate(zs):
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"z0[{i}] is {type(z).__name__}, expected a torch.Tensor")
            if not z.is_floating_point():
                raise TypeError(f"z0[{i}] has dtype {z.dtype}; the solvers need a floating dtype")
            if z.dim() < 1 or z.shape[0] != first.shape[0]:
                raise ValueError(f"every scale must share the batch size: z0[0] has shape "
                                 f"{tuple(first.shape)}, z0[{i}] has {tuple(z.shape)}")
            if z.dtype != first.dtype or z.device != first.device:
                raise ValueError(f"every scale must share dtype and device: z0[0] is "
                                 f"{first.dtype} on {first.device}, z0[{i}] is {z.dtype} on {z.device}")
        self.batch = first.shape[0]
        self.shapes = [tuple(z.shape[1:]) for z in zs]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.dtype, self.device = first.dtype, first.device
        self.dim = sum(self.sizes)
        # A scale given in channels_last is stored (H, W, C)-ordered, so f sees channels_last views
        # and its channels_last output is flattened without a copy.
        self.nhwc = [_is_channels_last(z) for z in zs]

    def _flat1(self, z: torch.Tensor, nhwc: bool) -> torch.Tensor:
        return (z.permute(0, 2, 3, 1) if nhwc else z).reshape(self.batch, -1)

    def flat(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(zs) == 1:
            return self._flat1(zs[0], self.nhwc[0]).to(self.dtype)
        return torch.cat([self._flat1(z, c) for z, c in zip(zs, self.nhwc)], dim=1).to(self.dtype)

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Views of a (B, D) tensor as the list of per-scale tensors (no copy), in z0's memory format."""
        out = []
        for p, s, nhwc in zip(x.split(self.sizes, dim=1), self.shapes, self.nhwc):
            out.append(p.view(self.batch, *s[1:], s[0]).permute(0, 3, 1, 2) if nhwc else p.view(self.batch, *s))
        return out

    def check_output(self, out) -> None:
        if not isinstance(out, (list, tuple)) or len(out) != len(self.shapes):
            n = len(out) if isinstance(out, (list, tuple)) else type(out).__name__
            raise ValueError(f"f must return a list of {len(self.shapes)} tensors (one per scale), got {n}")
        for i, (o, s) in enumerate(zip(out, self.shapes)):
            if tuple(o.shape) != (self.batch, *s):
                raise ValueError(f"f changed the shape of scale {i}: expected {(self.batch, *s)}, "
                                 f"got {tuple(o.shape)}")


def _is_channels_last(z: torch.Tensor) -> bool:
    """True for a 4-d tensor laid out channels_last and not also plain contiguous (C = 1 or H W = 1)."""
    return z.dim() == 4 and z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()


class _Monitor:
    """Residual bookkeeping shared by the solvers: traces, per-sample lowest iterate, stopping.

    Everything stays on the state's device; one small host transfer per check decides whether to
    stop (``check_every`` > 1 trades a few extra iterations for fewer host syncs on GPU).
    """

    def __init__(self, name, layout, max_iter, tol, stop_mode, stagnation_patience,
                 divergence_factor, check_every, throw, warn, exclude_initial=False, restart_factor=None,
                 trace_steps=False, keep_best_g=True, keep_best_z=True):
        self.name, self.layout = name, layout
        self.trace_steps = trace_steps  # keep the previous iterate for ||z[i+1] - z[i]|| / ||z[i]|| (figures)
        self.prev_z, self.steps = None, []
        self.exclude_initial = exclude_initial  # z0 is traced but never returned (the IFT backward)
        self.restart_factor = restart_factor  # Broyden: restart samples whose residual blew up
        self.best_g = None     # (B, D) f(z) - z at the lowest iterate (kept only for restarts)
        self.keep_best_g = keep_best_g and restart_factor is not None
        self.keep_best_z = keep_best_z  # False: the solver rebuilds the lowest iterate itself (from best_step)
        self.restart = None    # (B,) bool, samples to restart after the last check, or None
        self.restarts = 0
        self.restarted_from = None  # (B,) long: the best_step each sample was last restarted from (-1: never)
        self.max_iter, self.tol, self.stop_mode = max_iter, tol, stop_mode
        self.patience, self.div_factor = stagnation_patience, divergence_factor
        self.check_every, self.throw, self.warn = check_every, throw, warn
        self.abs, self.rel, self.scale_rel = [], [], []
        self.best = None       # (B,) lowest residual in stop_mode
        self.best_z = None     # (B, D) lowest iterate
        self.best_step = None  # (B,) long
        self.first_abs = None
        self.nfe = 0
        self.stop_reason = None
        self.message = ""
        self._best_max_host = math.inf
        self._since_improved = 0

    def _scale_norms(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S) norms of each scale's part of x (B, D)."""
        return torch.stack([torch.linalg.vector_norm(p, dim=1) for p in x.split(self.layout.sizes, 1)], 1)

    def record(self, z: torch.Tensor, fz: torch.Tensor) -> torch.Tensor:
        """Record the residual of iterate z (with f(z) = fz); return g = fz - z."""
        g = fz - z
        single = len(self.layout.sizes) == 1
        return self._record(z, g, torch.linalg.vector_norm(fz, dim=1, keepdim=True) if single else self._scale_norms(fz))

    def record_parts(self, z: torch.Tensor, fz: list[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """``record`` for f(z) given as f's per-scale outputs: g goes straight into ``out`` (no flat copy of f(z))."""
        for o, zi, gi in zip(fz, self.layout.split(z), self.layout.split(out)):
            torch.sub(o, zi, out=gi)
        norms = [torch.linalg.vector_norm(o, dim=tuple(range(1, o.dim())), dtype=z.dtype) for o in fz]
        return self._record(z, out, torch.stack(norms, 1))

    def _record(self, z: torch.Tensor, g: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        """The bookkeeping of ``record``, given g = f(z) - z and the (B, S) norms of f(z) per scale."""
        step = len(self.abs)
        if self.trace_steps:
            if self.prev_z is not None:  # (B, S) norms of the change and of the previous iterate
                self.steps.append((self._scale_norms(z - self.prev_z), self._scale_norms(self.prev_z)))
            self.prev_z = z
        if len(self.layout.sizes) == 1:
            dn = torch.linalg.vector_norm(g, dim=1, keepdim=True)
            abs_res, f_norm = dn[:, 0], fn[:, 0]
        else:  # per-scale norms, (B, S)
            dn = self._scale_norms(g)
            abs_res, f_norm = dn.square().sum(1).sqrt(), fn.square().sum(1).sqrt()
        rel_res = abs_res / (f_norm + _EPS)
        self.last_scale_norms = fn  # a non-finite f(z) shows up as a non-finite norm: no extra pass
        self.abs.append(abs_res)
        self.rel.append(rel_res)
        self.scale_rel.append(dn / (fn + _EPS))
        res = rel_res if self.stop_mode == "rel" else abs_res
        res = torch.nan_to_num(res, nan=math.inf)
        if step == 0 and self.exclude_initial:
            res = torch.full_like(res, math.inf)  # any later iterate replaces z0, and tol cannot stop at 0
        self.abs_res = abs_res
        if self.best is None:
            self.best = res.clone()
            self.best_z = z.clone() if self.keep_best_z else None
            self.best_step = torch.zeros_like(res, dtype=torch.long)
            self.first_abs = abs_res
            if self.restart_factor is not None:
                self.best_g = g.clone() if self.keep_best_g else None
                self.best_abs = abs_res
        else:
            better = res < self.best
            self.best = torch.where(better, res, self.best)
            if self.keep_best_z:
                self.best_z = torch.where(better[:, None], z, self.best_z)
            self.best_step = torch.where(better, step, self.best_step)
            if self.restart_factor is not None:
                if self.keep_best_g:
                    self.best_g = torch.where(better[:, None], g, self.best_g)
                self.best_abs = torch.minimum(self.best_abs, abs_res)
        return g

    def should_stop(self, nstep: int) -> bool:
        """Decide after ``nstep`` updates; syncs with the host only every ``check_every`` steps."""
        if nstep >= self.max_iter:
            self.stop_reason = "max_iter"
            if not bool(torch.isfinite(self.last_scale_norms).all()):
                self._non_finite(nstep)
            return True
        if nstep % self.check_every:
            return False
        growth = (self.abs[-1] / (self.first_abs + _EPS)).max()
        flags = [self.best.max(), growth.to(self.best.dtype),
                 (~torch.isfinite(self.last_scale_norms)).any().to(self.best.dtype)]
        if self.restart_factor is not None:
            # on the abs residual: in rel mode a run-away iterate can keep a rel residual near 1. Not twice from
            # the same lowest iterate: with the history emptied, the first step from it is the same plain step
            # f(z_best) - z_best, which blew up before, so the sample would cycle there for the rest of the solve.
            if self.restarted_from is None:
                self.restarted_from = torch.full_like(self.best_step, -1)
            blown = (self.abs_res > self.restart_factor * self.best_abs) & (self.best_step != self.restarted_from)
            flags.append(blown.any().to(self.best.dtype))
        flags = torch.stack(flags).tolist()
        best_max, growth, non_finite = flags[:3]
        self.restart = blown if self.restart_factor is not None and flags[3] else None
        if self.restart is not None:
            self.restarted_from = torch.where(blown, self.best_step, self.restarted_from)
        if non_finite:
            self._non_finite(nstep)
            return True
        if best_max < self.tol:
            self.stop_reason = "tol"
            return True
        if growth > self.div_factor:
            self.stop_reason = "divergence"
            self.message = (f"{self.name}: abs residual grew {growth:.3g}x over its first value "
                            f"(divergence_factor {self.div_factor:g}) at step {nstep}")
            return True
        if best_max < self._best_max_host * (1 - 1e-3):
            self._best_max_host, self._since_improved = best_max, 0
        else:
            self._since_improved += self.check_every
            if self._since_improved >= self.patience:
                self.stop_reason = "stagnation"
                self.message = (f"{self.name}: lowest residual did not improve for "
                                f"{self._since_improved} steps (stagnation_patience {self.patience})")
                return True
        return False

    def _non_finite(self, nstep):
        norms = self.last_scale_norms.reshape(self.layout.batch, -1)
        bad = torch.nonzero(~torch.isfinite(norms).all(0)).flatten().tolist()
        self.stop_reason = "non_finite"
        self.message = (f"{self.name}: f(z) is not finite at scale(s) {bad} after {nstep} step(s); "
                        f"returning the lowest-residual finite iterate")

    def finish(self, nstep: int):
        if self.first_abs is None:
            raise RuntimeError("solver finished without evaluating f")
        cpu = lambda xs: torch.stack(xs, 1).detach().float().cpu()  # noqa: E731
        abs_tr, rel_tr = cpu(self.abs), cpu(self.rel)
        scale_tr = torch.stack(self.scale_rel, 2).detach().float().cpu().permute(1, 0, 2)
        idx = self.best_step.cpu()
        rows = torch.arange(abs_tr.shape[0])
        abs_low, rel_low = abs_tr[rows, idx], rel_tr[rows, idx]
        converged = (rel_low if self.stop_mode == "rel" else abs_low) < self.tol
        steps = {}
        if self.trace_steps:
            n_scales = len(self.layout.sizes)
            dz, zn = (torch.stack([t[k] for t in self.steps], 2).detach().double().cpu() if self.steps
                      else torch.zeros(abs_tr.shape[0], n_scales, 0, dtype=torch.float64) for k in (0, 1))
            ratio = lambda a, b: torch.where(b > 0, a / b, torch.nan).float()  # noqa: E731
            steps = {"scale_step_trace": ratio(dz, zn).permute(1, 0, 2).contiguous(),  # (S, B, nfe - 1)
                     "step_trace": ratio(dz.square().sum(1).sqrt(), zn.square().sum(1).sqrt())}
            self.prev_z, self.steps = None, []
        stats = SolverStats(
            solver=self.name, stop_mode=self.stop_mode, tol=self.tol, max_iter=self.max_iter,
            nfe=self.nfe, nstep=nstep, abs_trace=abs_tr, rel_trace=rel_tr, scale_rel_trace=scale_tr,
            abs_lowest=abs_low, rel_lowest=rel_low, lowest_step=idx, converged=converged,
            stop_reason=self.stop_reason, message=self.message, **steps)
        if self.stop_reason == "non_finite" and self.warn:
            warnings.warn(self.message, RuntimeWarning, stacklevel=3)
        if self.throw and not stats.all_converged:
            raise SolverError(stats.summary() + (f"; {self.message}" if self.message else ""))
        return stats


def _setup(name, f, z0, max_iter, tol, stop_mode, **monitor_kw):
    single = isinstance(z0, torch.Tensor)
    zs = [z0] if single else list(z0)
    layout = _Layout(zs)
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    if monitor_kw["check_every"] < 1:
        raise ValueError(f"check_every must be >= 1, got {monitor_kw['check_every']!r}")
    mon = _Monitor(name, layout, max_iter, tol, stop_mode, **monitor_kw)
    checked = [False]

    def F(x: torch.Tensor, flat: bool = True):
        """f on the flat state: (B, D) -> (B, D), counting evaluations (``flat=False``: f's list of outputs)."""
        zs = layout.split(x)
        out = f(zs[0]) if single else f(zs)
        if single and isinstance(out, torch.Tensor):
            out = [out]
        if not checked[0]:
            layout.check_output(out)
            checked[0] = True
        mon.nfe += 1
        return layout.flat(out) if flat else out

    def result(nstep):
        stats = mon.finish(nstep)
        z = layout.split(mon.best_z)
        return (z[0] if single else z), stats

    return layout.flat(zs), F, mon, result


# ----------------------------------------------------------------------------------------------
# Products over a (B, n, D) history (Broyden's and Anderson's). Reductions are written as (B, 1, D) x (B, D, n)
# with a transposed view, which BLAS runs about 5x faster on CPU than the equivalent (B, n, D) x (B, D, 1).

def _dot(a, b):
    """Per-sample dot product of two (B, D) tensors, as (B, 1)."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).squeeze(2)


def _coef(H, x):
    """(B, n) coefficients h_j . x for the rows h_j of H (B, n, D)."""
    return torch.bmm(x.unsqueeze(1), H.transpose(1, 2))
