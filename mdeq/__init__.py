"""mdeq: Multiscale Deep Equilibrium Models (Bai, Koltun, Kolter, NeurIPS 2020), reproduced.

The public API is the names in ``__all__``; everything else is private.
"""
from mdeq.solvers import SOLVERS, SolverStats, anderson, broyden, fixed_point
from mdeq.implicit import DEQInfo, ImplicitLayer

__all__ = [
    "SOLVERS",
    "SolverStats",
    "anderson",
    "broyden",
    "fixed_point",
    "DEQInfo",
    "ImplicitLayer",
]
