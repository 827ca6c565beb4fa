"""mdeq: Multiscale Deep Equilibrium Models (Bai, Koltun, Kolter, NeurIPS 2020), reproduced.

The public API is the names in ``__all__``; everything else is private.
"""
from mdeq.core.solver_common import SolverError, SolverStats
from mdeq.core.broyden import broyden
from mdeq.core.anderson import anderson
from mdeq.core.solvers import SOLVERS, fixed_point
from mdeq.core.implicit import DEQInfo, ImplicitLayer
from mdeq.core.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict, load_config
from mdeq.core.model import MDEQ, build_model
from mdeq.core.heads import upsample_logits

__all__ = [
    "SOLVERS",
    "SolverError",
    "SolverStats",
    "anderson",
    "broyden",
    "fixed_point",
    "DEQInfo",
    "ImplicitLayer",
    "ConfigError",
    "ExperimentConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "MDEQ",
    "build_model",
    "upsample_logits",
]
