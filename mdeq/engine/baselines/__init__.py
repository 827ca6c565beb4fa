"""Which comparison models Table 1 and the runtime/memory figure have, built by name.

Each model maps images (B, 3, 32, 32) to logits (B, 10), the same contract as the MDEQ classifier.
Parameter counts (10 classes): resnet18_170k 176,402; resnet18_10m 10,151,691; resnet101 42,512,970;
node_172k 173,611; anode_172k 172,452; resnet14_170k 175,258 (a recipe
study's, not the paper's).
"""
from __future__ import annotations

import inspect

from torch import nn

from mdeq.engine.baselines.node import ConvODENet, anode_172k, node_172k
from mdeq.engine.baselines.resnet import ResNet, resnet14_170k, resnet18, resnet18_10m, resnet18_170k, resnet101

BASELINES = {
    "resnet18_170k": resnet18_170k,
    "resnet18_10m": resnet18_10m,
    "resnet18": resnet18,
    "resnet101": resnet101,
    "node_172k": node_172k,
    "anode_172k": anode_172k,
    "resnet14_170k": resnet14_170k,
}


def build_baseline(name: str, **kwargs) -> nn.Module:
    """``BASELINES[name](**kwargs)``; e.g. ``build_baseline('anode_172k', rtol=1e-4)``.

    Every baseline takes ``width`` (a ResNet's first-stage channels, an ODE function's filters), whose
    default is the paper's size (``default_width``); the smoke profile divides it.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    try:
        return BASELINES[name](**kwargs)
    except TypeError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(f"baseline {name!r}: {exc} (its options: width, num_classes and those of "
                         f"ResNet / ConvODENet)") from None


def default_width(name: str) -> int:
    """The paper-sized ``width`` of baseline ``name`` (e.g. 8 for resnet18_170k, 125 for node_172k)."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    return inspect.signature(BASELINES[name]).parameters["width"].default


__all__ = ["BASELINES", "build_baseline", "default_width", "ConvODENet", "ResNet", "resnet18", "resnet101",
           "resnet18_170k", "resnet18_10m", "resnet14_170k", "node_172k", "anode_172k"]
