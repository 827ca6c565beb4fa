"""Which parameters a notebook takes: their names, types, defaults and choices, checked in one call.

Why: papermill only warns about a parameter the notebook does not declare, and injects values without
checking their types, so each notebook checks its parameters right after the tagged cell
(``check_parameters(globals(), name)``). The declared names, types and defaults are listed here once;
tests check that each notebook's parameters cell declares exactly these.
"""
from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = ["PROFILES", "TUTORIAL", "NOTEBOOKS", "PARAMETERS", "ParameterError", "Params", "check_parameters"]

PROFILES = ("smoke", "logs", "full")
# 00 is the tutorial (the implicit layer on a toy f; it trains nothing and computes the same in every profile),
# then one notebook per paper item, in the paper's order.
TUTORIAL = "00_implicit_layers"
NOTEBOOKS = (TUTORIAL, "01_cifar10", "02_imagenet", "03_runtime_memory", "04_cityscapes", "05_convergence")


_COMMON = {
    "profile": (str, "logs"),  # logs (redraw the committed results) | smoke | full
    "quick": (bool, False),  # smoke only: fewer steps and runs (tests, CI)
    "seed": (int, 0),
    "data_root": (str, ""),  # full only: the real data set's root ("" = data/<dataset>)
    "output_root": (str, ""),  # "" = the repository's results/ and figures/
}
_FULL = {
    "variant": (str, "paper"),  # full only: config variant, paper (Appendix Table 4) or official
    "nproc": (int, 0),  # full only: GPUs per run via torchrun (0 = all visible)
    "dry_run": (bool, False),  # full only: print the launch commands, launch nothing
}
PARAMETERS: dict[str, dict[str, tuple[type, Any]]] = {
    # quick is accepted as by every notebook (mdeq.reproduce --quick passes it to all); the tutorial is quick already
    TUTORIAL: {"profile": _COMMON["profile"], "quick": _COMMON["quick"], "seed": _COMMON["seed"],
               "output_root": _COMMON["output_root"]},
    "01_cifar10": {**_COMMON, **_FULL, "seeds": (int, 5)},
    "02_imagenet": {**_COMMON, **_FULL},
    "03_runtime_memory": {**_COMMON, "variant": (str, "paper"), "dry_run": (bool, False),
                          "batch_size": (int, 32), "device": (str, "auto")},
    "04_cityscapes": {**_COMMON, **_FULL},
    "05_convergence": {**_COMMON, "variant": (str, "paper"), "dry_run": (bool, False),
                       "num_batches": (int, 5), "device": (str, "auto")},
}
_CHOICES = {"profile": PROFILES, "variant": ("paper", "official"), "device": ("auto", "cpu", "cuda")}


class ParameterError(ValueError):
    """A notebook parameter that is unknown, of the wrong type or out of range."""


def _injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned in papermill's injected cell(s) (their source starts with '# Parameters')."""
    names: list[str] = []
    history = namespace.get("In")
    if not isinstance(history, list):
        return names
    for source in history:
        if not isinstance(source, str) or not source.lstrip().startswith("# Parameters"):
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


@dataclass(frozen=True)
class Params:
    """The checked parameters of one notebook run."""

    notebook: str
    values: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def check_parameters(namespace: Mapping[str, Any], notebook: str) -> Params:
    """Check the parameters in a notebook's namespace; raise ParameterError with the valid choices.

    Catches a misspelt parameter injected by papermill (which papermill itself only warns about),
    a wrong type (``-p quick yes``), an unknown profile or variant, and a negative count.
    """
    if notebook not in PARAMETERS:
        raise ParameterError(f"unknown notebook {notebook!r}; expected one of {NOTEBOOKS}")
    spec = PARAMETERS[notebook]
    unknown = [n for n in _injected_names(namespace) if n not in spec]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, list(spec), n=1)
            hints.append(repr(n) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(f"unknown parameter(s) {', '.join(hints)} for notebook {notebook}; "
                             f"valid parameters: {', '.join(spec)}")
    values = {}
    for name, (tp, default) in spec.items():
        value = namespace.get(name, default)
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if not ok:
            raise ParameterError(f"parameter {name!r} must be of type {tp.__name__}, got {value!r} "
                                 f"({type(value).__name__}); default {default!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            close = difflib.get_close_matches(str(value), _CHOICES[name], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(f"parameter {name!r} must be one of {list(_CHOICES[name])}, got {value!r}{hint}")
        if tp is int and name != "seed" and value < 0:
            raise ParameterError(f"parameter {name!r} must be >= 0, got {value}")
        values[name] = value
    if values.get("quick") and values["profile"] != "smoke":
        raise ParameterError(f"quick=True only applies to the smoke profile, not {values['profile']!r}")
    for name in ("seeds", "num_batches", "batch_size"):
        if name in values and values[name] < 1:
            raise ParameterError(f"parameter {name!r} must be >= 1, got {values[name]}")
    return Params(notebook, values)
