"""What a trained MDEQ shows at inference: accuracy against the forward solver's budget, convergence against resolution.

Why a module: two questions the paper leaves to trained weights. (1) How much of the accuracy needs the
equilibrium? In locuslab/deq issue 28 a user reports that on CIFAR-10 one fixed-point iteration is about
as accurate as 15 Broyden steps. ``accuracy_against_budget`` evaluates a trained classifier with the
forward solver stopped after k steps, Broyden and plain iteration of f. (2) Does convergence slow down
with the input size? The paper's Figs. 5-6 and Appendix B.2 say larger images need more Broyden steps.
The CIFAR-10 MDEQ-small has no downsampling stem and is fully convolutional, so its trained weights can
be solved at any size: ``convergence_against_resolution`` counts the f evaluations until the paper's
||z[i+1] - z[i]|| / ||z[i]|| falls below thresholds, at sizes from 32 to 512 pixels.

Budgets. ``max_iter`` = k is what the config calls T_f: a solve evaluates f at z_0 = 0 and after each of
its k updates (k + 1 evaluations) and returns, per sample, the iterate with the lowest residual in the
config's ``stop_mode`` measure (``mdeq.core.solver_common``). Every solve here runs its whole budget (tol 1e-12, no
stop for stagnation). A solver's first k steps do not depend on its budget, so one solve of the largest
budget holds every smaller one: ``_Tap`` applies the head to each evaluated iterate, and the result of
budget k is the head on the lowest-residual iterate among the first k + 1 (the solver's own rule, read
from its residual trace). ``tests/test_inference.py`` checks this against separate solves with
``max_iter = k``. Budget 0 is z_0 = 0 itself, the same prediction for every image.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mdeq.engine import progress
from mdeq.core.config import ExperimentConfig
from mdeq.engine.data import CIFAR10_MEAN, CIFAR10_STD
from mdeq.paper.trained import Trained, build_trained, memory_format
from mdeq.engine.build import resolve_device

__all__ = ["BUDGETS", "SOLVER_NAMES", "SIZES", "THRESHOLDS", "PHOTOGRAPHS", "budget_config", "budget_model",
           "accuracy_against_budget", "photographs", "resized", "resolution_inputs", "evals_to",
           "convergence_against_resolution", "smoke_measurements"]

BUDGETS = (0, 1, 2, 4, 6, 8, 10, 15, 22, 30, 50)  # forward max_iter k; 15 is the paper's T_f for MDEQ-small
SOLVER_NAMES = ("broyden", "fixed_point")
SIZES = (32, 64, 128, 256, 512)
THRESHOLDS = (1e-2, 1e-3)
# Natural photographs that scikit-image ships inside its wheel (skimage/data/*, nothing downloaded).
PHOTOGRAPHS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left")
_NO_STOP = 1e-12  # a tolerance no float32 solve reaches: every solve runs its whole budget


def budget_config(cfg: ExperimentConfig, solver: str, budget: int) -> ExperimentConfig:
    """``cfg`` whose eval-mode forward solve is ``solver`` for exactly ``budget`` steps (``eval_max_iter``), in
    the config's stop mode (whose measure also picks the returned iterate); Broyden keeps the config's m."""
    return dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, solver=solver, eval_max_iter=budget,
                                                               eval_tol=_NO_STOP))


def budget_model(trained: Trained, solver: str, budget: int, device: torch.device | str = "cpu", *,
                 trace_steps: bool = False):
    """The trained MDEQ in eval mode, its forward solve ``solver`` run for the whole ``budget`` (no stop for
    stagnation); ``trace_steps`` records the paper's ||z[i+1] - z[i]|| / ||z[i]||."""
    model = build_trained(dataclasses.replace(trained, cfg=budget_config(trained.cfg, solver, budget)), device)
    model.deq.solver_options.update(stagnation_patience=budget + 1, **({"trace_steps": True} if trace_steps else {}))
    if getattr(model.deq, "spectral_radius_iters", 0):  # its power method would call f after the solve
        model.deq.spectral_radius_iters = 0
    return model


# ----------------------------------------------------------------------------------------------
# (1) Accuracy against the forward budget.

class _Tap:
    """The head's logits (B, classes) at every iterate the forward solve evaluates f at, in order, and at the
    injection alone ((x, 0, ..., 0): the state no f has touched but the input); a forward hook on f."""

    def __init__(self, model):
        self.model, self.logits, self.injection = model, [], None
        self.handle = model.f.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        z, injection = list(args[0]), args[1]
        if not self.logits:
            self.injection = self.model.head([injection, *(torch.zeros_like(t) for t in z[1:])])
        self.logits.append(self.model.head(z))

    def reset(self) -> None:
        self.logits, self.injection = [], None


def _read_off(residual: torch.Tensor, budget: int) -> torch.Tensor:
    """(B,) index of the iterate a solve with ``max_iter = budget`` returns: per sample the first lowest
    residual among evaluations 0..budget (the solver keeps an iterate only if strictly lower; NaN counts as inf)."""
    res = torch.nan_to_num(residual[:, :budget + 1].double(), nan=math.inf)
    return res.argmin(1)


@torch.no_grad()
def accuracy_against_budget(trained: Trained, dataset, *, budgets: Sequence[int] = BUDGETS,
                            solvers: Sequence[str] = SOLVER_NAMES, device: str = "cpu", batch_size: int | None = None,
                            channels_last: bool | None = None, log: Callable[[str], Any] = print) -> dict:
    """Top-1 accuracy and the residual reached on ``dataset`` when the forward solve stops after each budget k.

    Per solver and budget: ``top1`` (the iterate the solver returns), ``top1_last_iterate`` (z_k whatever its
    residual), the mean and median relative residual ||f(z) - z|| / ||f(z)|| and the mean absolute one of
    the returned iterate, and ``agree_with_reference``: the share of images predicted as by Broyden at the
    config's eval budget (the accuracy the run logs; always among the budgets). Also the head on the
    injection alone.
    ``readoff_max_abs_diff`` is the largest difference between the logits read off at the largest budget
    and those the model itself returned (0 where the solver returns the evaluated iterate).
    """
    dev = resolve_device(device)
    cfg = trained.cfg
    if trained.baseline is not None:
        raise ValueError(f"{trained.name} is a {trained.baseline}, not an implicit model: no solver budget to vary")
    reference = cfg.solver.eval_max_iter or cfg.solver.max_iter
    budgets = sorted({int(b) for b in budgets} | {reference})
    if budgets[0] < 0:
        raise ValueError(f"budgets must be >= 0, got {budgets}")
    top = max(budgets)
    fmt = memory_format(trained, dev, channels_last)
    loader = DataLoader(dataset, batch_size=batch_size or cfg.data.eval_batch_size, shuffle=False, num_workers=0)
    out: dict[str, Any] = {"budgets": budgets, "training_budget": cfg.solver.max_iter, "eval_budget": reference,
                           "stop_mode": cfg.solver.stop_mode, "broyden_memory": cfg.solver.memory,
                           "samples": len(dataset), "batch_size": loader.batch_size, "solvers": {}}
    predictions: dict[str, dict[int, list[torch.Tensor]]] = {}
    injection_correct = 0
    for solver in solvers:
        model = budget_model(trained, solver, top, dev)
        tap = _Tap(model)
        sums = {b: {"correct": 0, "correct_last": 0, "rel": [], "abs": []} for b in budgets}
        preds = predictions[solver] = {b: [] for b in budgets}
        readoff, nfe_min, t0 = 0.0, math.inf, time.perf_counter()
        with progress.bar(loader, desc=f"budgets, {solver}", unit="batch") as shown:
            for images, targets in shown:
                images = images.to(dev, memory_format=fmt)
                tap.reset()
                returned = model(images).float().cpu()
                fwd = model.last_info.forward
                if len(tap.logits) != fwd.nfe:
                    raise RuntimeError(f"f ran {len(tap.logits)} times in a solve of {fwd.nfe} evaluations: the "
                                       f"read-off needs the solve's evaluations only")
                logits = torch.stack(tap.logits).float().cpu()  # (nfe, B, classes)
                nfe_min = min(nfe_min, fwd.nfe)
                rows = torch.arange(targets.shape[0])
                measure = fwd.abs_trace if cfg.solver.stop_mode == "abs" else fwd.rel_trace
                full = _read_off(measure, fwd.nfe - 1)
                readoff = max(readoff, float((logits[full, rows] - returned).abs().max()))
                for b in budgets:
                    idx = _read_off(measure, min(b, fwd.nfe - 1))
                    pred = logits[idx, rows].argmax(1)
                    s = sums[b]
                    s["correct"] += int((pred == targets).sum())
                    s["correct_last"] += int((logits[min(b, fwd.nfe - 1)].argmax(1) == targets).sum())
                    s["rel"].append(fwd.rel_trace[rows, idx])
                    s["abs"].append(fwd.abs_trace[rows, idx])
                    preds[b].append(pred)
                if solver == solvers[0]:
                    injection_correct += int((tap.injection.cpu().argmax(1) == targets).sum())
        tap.handle.remove()
        n = len(dataset)
        rows_out = []
        for b in budgets:
            s = sums[b]
            rel, ab = torch.cat(s["rel"]).double(), torch.cat(s["abs"]).double()
            rows_out.append({"max_iter": b, "nfe": b + 1 if b else 0, "top1": 100.0 * s["correct"] / n,
                             "top1_last_iterate": 100.0 * s["correct_last"] / n,
                             "rel_residual_mean": float(rel.mean()), "rel_residual_median": float(rel.median()),
                             "abs_residual_mean": float(ab.mean())})
        out["solvers"][solver] = {"rows": rows_out, "seconds": time.perf_counter() - t0,
                                  "nfe_per_solve": None if math.isinf(nfe_min) else int(nfe_min),
                                  "complete": nfe_min >= top + 1, "readoff_max_abs_diff": readoff}
        log(f"{solver}: " + ", ".join(f"k={r['max_iter']} {r['top1']:.2f}%" for r in rows_out)
            + f" ({time.perf_counter() - t0:.0f} s)")
    if "broyden" in predictions and reference in predictions["broyden"]:
        ref = torch.cat(predictions["broyden"][reference])
        for solver, by_budget in predictions.items():
            for row in out["solvers"][solver]["rows"]:
                row["agree_with_reference"] = 100.0 * float((torch.cat(by_budget[row["max_iter"]]) == ref)
                                                            .double().mean())
        out["reference"] = f"broyden, max_iter {reference} (the config's eval-mode solve)"
    out["injection_alone"] = {"top1": 100.0 * injection_correct / len(dataset),
                              "what": "the head on (x, 0, ..., 0): the injected input at the highest resolution, "
                                      "zeros elsewhere, no f evaluation"}
    return out


# ----------------------------------------------------------------------------------------------
# (2) Convergence against resolution.

def photographs(names: Sequence[str] = PHOTOGRAPHS) -> dict[str, torch.Tensor]:
    """``{name: uint8 (3, H, W)}`` of natural photographs at their native size, from scikit-image's data module
    (files inside its wheel; ``motorcycle_left`` is the left view of ``stereo_motorcycle``)."""
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError("the photographs come from scikit-image (pip install scikit-image, or the 'bench' "
                          "extra: pip install -e '.[bench]')") from exc
    out = {}
    for name in names:
        image = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
        out[name] = torch.from_numpy(image[..., :3].copy()).permute(2, 0, 1).contiguous()
    return out


def resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) float images, centre-cropped to a square and resized bilinearly to ``size`` x ``size``
    (antialiased when shrinking)."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = images[..., top:top + side, left:left + side]
    if side == size:
        return square.clone()
    return F.interpolate(square, size=(size, size), mode="bilinear", align_corners=False, antialias=size < side)


def resolution_inputs(sources: Mapping[str, Mapping[str, torch.Tensor]], sizes: Sequence[int] = SIZES,
                      mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD) -> dict:
    """``{source: {"names": [...], size: float (N, 3, size, size)}}`` normalised as the model's training data.

    ``sources`` maps a source name to ``{image name: uint8 (3, H, W)}`` (any sizes: each is resized alone).
    """
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    out = {}
    for source, images in sources.items():
        entry: dict[Any, Any] = {"names": list(images)}
        for size in sizes:
            entry[size] = torch.cat([(resized(img.float()[None] / 255, size) - m) / s for img in images.values()])
        out[source] = entry
    return out


def evals_to(trace: Sequence[float], threshold: float) -> int | None:
    """F evaluations until ``trace`` (one entry per step, entry i = ||z[i+1] - z[i]|| / ||z[i]||) first falls
    below ``threshold``: i + 1 (z[i+1] is made from i + 1 evaluations); None if it never does. The same
    count as Figs. 5-6's table (``mdeq.paper.report.tables.convergence_table``)."""
    for i, v in enumerate(trace):
        if v is not None and v < threshold:  # NaN (z[0] = 0) compares False
            return i + 1
    return None


@torch.no_grad()
def convergence_against_resolution(trained: Trained, inputs: Mapping[str, Mapping], *, budget: int = 100,
                                   solvers: Sequence[str] = SOLVER_NAMES, thresholds: Sequence[float] = THRESHOLDS,
                                   device: str = "cpu", channels_last: bool | None = None,
                                   done: Mapping | None = None, save: Callable[[dict], Any] | None = None,
                                   log: Callable[[str], Any] = print) -> dict:
    """Per source, size, solver and image: the forward solve's traces (the paper's ||z[i+1] - z[i]|| / ||z[i]||
    and the residual ||f(z) - z|| / ||f(z)||) over ``budget`` steps, and the f evaluations until the paper's
    measure falls below each threshold. One image per solve (batch 1): each solve is the image's own.

    ``done``: an earlier output whose finished (source, size, solver) entries are kept; ``save`` is called
    after each entry.
    """
    dev = resolve_device(device)
    fmt = memory_format(trained, dev, channels_last)
    out: dict[str, Any] = {"budget": budget, "thresholds": list(thresholds), "batch": 1, "sources": {},
                           "broyden_memory": trained.cfg.solver.memory, "stop_mode": trained.cfg.solver.stop_mode}
    if done:
        out["sources"] = {k: {"names": v["names"], "sizes": dict(v["sizes"])}
                          for k, v in done.get("sources", {}).items()}
    for solver in solvers:
        model = budget_model(trained, solver, budget, dev, trace_steps=True)
        for source, entry in inputs.items():
            sizes = sorted(k for k in entry if isinstance(k, int))
            for size in sizes:
                src = out["sources"].setdefault(source, {"names": entry["names"], "sizes": {}})
                cell = src["sizes"].setdefault(str(size), {})
                if solver in cell:
                    continue
                images, t0, per_image = entry[size], time.perf_counter(), []
                for name, x in zip(entry["names"], images):
                    t1 = time.perf_counter()
                    model(x[None].to(dev, memory_format=fmt))
                    fwd = model.last_info.forward
                    step = [None if math.isnan(v) else float(f"{v:.4g}") for v in fwd.step_trace[0].tolist()]
                    rel = [float(f"{v:.4g}") for v in fwd.rel_trace[0].tolist()]
                    per_image.append({"image": name, "nfe": fwd.nfe, "stop_reason": fwd.stop_reason,
                                      "seconds": round(time.perf_counter() - t1, 2),
                                      "f_evals_to": {f"{t:g}": evals_to(step, t) for t in thresholds},
                                      "step_trace": step, "rel_trace": rel})
                cell[solver] = {"images": per_image, "seconds": round(time.perf_counter() - t0, 1)}
                counts = [p["f_evals_to"][f"{thresholds[0]:g}"] for p in per_image]
                log(f"{source} {size}x{size} {solver}: f evaluations to {thresholds[0]:g}: {counts} "
                    f"({cell[solver]['seconds']:.0f} s)")
                if save is not None:
                    save(out)
    return out


# ----------------------------------------------------------------------------------------------
# The smoke profile: the same measurements on a shrunken MDEQ at its initial weights.

def smoke_measurements(*, quick: bool = False, seed: int = 0) -> tuple[dict, dict]:
    """(accuracy against budget, convergence against resolution) of ``cifar10_small_paper`` shrunk as the smoke
    profile shrinks it (``mdeq.paper.runs.smoke_overrides``), at its initial weights, on the synthetic CIFAR-10 copy:
    the pipeline end to end in seconds, in the output format of the benchmark scripts. Not a result."""
    from mdeq.core.config import load_config
    from mdeq.paper.trained import eval_dataset
    from mdeq.core.model import build_model
    from mdeq.engine.runlog import provenance
    from mdeq.paper.runs import smoke_data, smoke_overrides, smoke_spec

    name = "cifar10_small_paper"
    cfg = load_config(name, smoke_overrides(smoke_spec(name), "paper", quick=quick))
    torch.manual_seed(seed)
    model = build_model(cfg)
    root, options = smoke_data("cifar10")
    trained = Trained(name="cifar10_mdeq_small (smoke)", cfg=cfg, state_dict=model.state_dict(), source=root,
                      checkpoint=root, sha256="", size_bytes=0, data_root=root, data_options=options,
                      origin=f"initial weights (seed {seed}), shrunken config")
    dataset, _, _ = eval_dataset(trained, limit=16 if quick else 64)
    weights = {"run": trained.name, "checkpoint": trained.origin, "sha256": None, "config": name,
               "weights": f"initial weights (seed {seed}) of the smoke-shrunken {name}"}
    prov = provenance("mdeq.paper.inference.smoke_measurements(quick=%s, seed=%d)" % (quick, seed), "cpu")
    silent = lambda text: None  # noqa: E731 (the notebook shows the tables)
    budgets = accuracy_against_budget(trained, dataset, budgets=(0, 1, 2, 4) if quick else (0, 1, 2, 4, 8, 15),
                                      batch_size=8, log=silent)
    data = {"label": dataset.source_label, "split": "synthetic 'val'", "images": len(dataset)}
    accuracy = {"benchmark": "accuracy_vs_budget", "profile": "smoke",
                "runs": {trained.name: {"weights": weights, "result": budgets, "data": data}}, "provenance": prov}
    images = {f"synthetic image {i}": dataset.dataset.images[i] for i in range(2)}
    sizes = (32, 64) if quick else (32, 64, 128)
    resolution = convergence_against_resolution(trained, resolution_inputs({"cifar10": images}, sizes),
                                                budget=10 if quick else 20, log=silent)
    settings = {"sizes": list(sizes), "num_images": 2, "budget": resolution["budget"], "sources": ["cifar10"]}
    return accuracy, {"benchmark": "convergence_vs_resolution", "profile": "smoke", "weights": weights,
                      "sources": {"cifar10": f"2 images of {dataset.source_label}, upsampled bilinearly"},
                      "settings": settings, "thresholds": list(THRESHOLDS), "result": resolution, "chunks": [prov]}
