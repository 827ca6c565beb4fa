"""Which root solvers for z = f(z) are there, and how is each one called?

The state z is a list of tensors (one per resolution). Three solvers: ``broyden``
(``mdeq/core/broyden.py``), ``anderson`` (``mdeq/core/anderson.py``) and plain iteration, ``fixed_point``,
here; ``SOLVERS`` names them for the configs. What they share (the state as one flat buffer, the residual
measures, the stopping rules, ``SolverStats``) is ``mdeq/core/solver_common.py``.

Every solver has the same call shape::

    z, stats = solver(f, z0, *, max_iter, tol, stop_mode="rel", **options)

``f`` maps a list of tensors to a list of tensors of the same shapes. ``z0`` is a list (or tuple)
of tensors sharing the batch size, dtype and device; a single tensor is accepted, in which case ``f``
gets and returns a single tensor and a single tensor is returned. The returned ``z`` is, **per sample**, the iterate with the lowest residual seen (in
the ``stop_mode`` measure), so different samples of a batch may come from different iterations:
this guards against late divergence (as in torchdeq) and makes ``stats.converged`` true exactly for
the samples whose returned iterate meets ``tol``. With ``exclude_initial=True`` z0 is traced but
never returned and cannot stop the solve: the IFT backward starts from u0 = 0, and returning it
would mean no gradient at all (the released code's failure at initialisation).
"""
from __future__ import annotations

from typing import Callable

from mdeq.core.anderson import anderson
from mdeq.core.broyden import broyden
from mdeq.core.solver_common import _checked_options, _setup

__all__ = ["fixed_point", "SOLVERS"]


@_checked_options
def fixed_point(f: Callable, z0, *, max_iter: int = 50, tol: float = 1e-3, stop_mode: str = "rel",
                damping: float = 1.0, stagnation_patience: int = 50, divergence_factor: float = 1e6,
                check_every: int = 1, exclude_initial: bool = False, throw: bool = False, warn: bool = True,
                trace_steps: bool = False):
    """Plain (optionally damped) iteration z <- (1 - damping) z + damping f(z).

    The baseline of the paper's Figs. 5-6. Each step costs exactly one f evaluation.
    """
    if not 0 < damping <= 1:
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    z, F, mon, result = _setup("fixed_point", f, z0, max_iter, tol, stop_mode,
                               stagnation_patience=stagnation_patience, divergence_factor=divergence_factor,
                               check_every=check_every, exclude_initial=exclude_initial, throw=throw, warn=warn,
                               trace_steps=trace_steps)
    nstep = 0
    while True:
        fz = F(z)
        g = mon.record(z, fz)
        if mon.should_stop(nstep):
            break
        z = fz if damping == 1.0 else z.add(g, alpha=damping)
        nstep += 1
    return result(nstep)


SOLVERS = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}
