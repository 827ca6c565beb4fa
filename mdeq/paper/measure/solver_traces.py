"""How the solvers converge, forward and backward, Broyden against iterating f, and per scale: Figs. 5-7.

The traces are measured at CIFAR-10, ImageNet and Cityscapes resolution (Figs. 5/6), and per scale for MDEQ
against the single-stream DEQ on CIFAR-10 (Fig. 7), at initial and at trained weights
(``convergence_traces``). Solver settings reach the implicit layer through the config it is built from
(``trace_overrides``), so the layer checks them as it checks a training run's. The device is chosen once, by
the engine's rule (``mdeq.engine.build.resolve_device``).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mdeq.engine import paths, progress
from mdeq.engine.checkpoint import load_checkpoint, load_pretrained
from mdeq.core.config import load_config
from mdeq.engine.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, build_dataset
from mdeq.engine.data import IGNORE_INDEX
from mdeq.core.heads import upsample_logits
from mdeq.core.model import build_model
from mdeq.engine.runlog import hardware_label
from mdeq.paper.measure.timing import _UNCONVERGED
from mdeq.paper.runs import default_data_root, smoke_data, smoke_overrides, smoke_spec
from mdeq.engine.build import resolve_device

__all__ = ["TraceSet", "CONVERGENCE_SETS", "PER_SCALE_SETS", "CONVERGENCE_BUDGET", "TRACE_MEASURES",
           "trace_overrides", "convergence_traces"]


@dataclass(frozen=True)
class TraceSet:
    """The model and input of one panel of Figs. 5/6 in the full profile."""

    config: str  # with {variant}
    checkpoint_runs: tuple[str, ...]  # run folders (relative to the repository) whose checkpoint.pt is traced too
    batch: int
    input_hw: tuple[int, int]


# The paper does not say which MDEQ of each task its Figs. 5/6 show; the small ones are traced here, the
# models a CPU can solve at full resolution (the CIFAR-10 one is Table 1's, trained by the CPU campaign).
CONVERGENCE_SETS = {
    "cifar10": TraceSet("cifar10_small_{variant}", ("runs/full/cifar10_mdeq_small_seed0", "results/runs/cifar10_mdeq_small"),
                        32, (32, 32)),
    "imagenet": TraceSet("imagenet_small_{variant}", ("runs/full/imagenet_mdeq_small",), 4, (224, 224)),
    "cityscapes": TraceSet("cityscapes_small_{variant}", ("runs/full/cityscapes_mdeq_small",), 1, (1024, 2048)),
}
PER_SCALE_SETS = {  # Fig. 7: key -> (config with {variant}, checkpoint runs as in TraceSet)
    "mdeq": ("cifar10_small_{variant}", ("runs/full/cifar10_mdeq_small_seed0", "results/runs/cifar10_mdeq_small")),
    "single_stream": ("cifar10_single_stream_paper", ("runs/full/cifar10_single_stream_seed0",
                                                      "results/runs/cifar10_single_stream")),
}
CONVERGENCE_BUDGET = {"full": {"cifar10": 50, "imagenet": 120, "cityscapes": 150},
                      "smoke": {"cifar10": 40, "imagenet": 40, "cityscapes": 40},
                      "quick": {"cifar10": 15, "imagenet": 15, "cityscapes": 15}}
_SMOKE_TRACE = {  # smoke: (batch, eval image size) per data set
    "cifar10": (8, None), "imagenet": (4, [64, 64]), "cityscapes": (1, [128, 256])}
TRACE_MEASURES = {  # what the traces hold, by key suffix
    "": "per-sample ||f(z) - z|| / ||f(z)|| (the residual), averaged over the batch",
    "_step": "per-sample ||z[i+1] - z[i]|| / ||z[i]|| (the paper's Figs. 5-7), averaged over the batch",
}


def trace_overrides(solver: str, budget: int) -> list[str]:
    """Solver settings under which every solve runs its whole ``budget``: tol 1e-12 (or until it stagnates),
    relative residuals, and an IFT backward with the same solver and budget. Broyden keeps the config's
    history size m (the paper's limited-memory Broyden)."""
    return [f"solver.solver={solver}", f"solver.max_iter={budget}", f"solver.eval_max_iter={budget}",
            "solver.tol=1e-12", "solver.eval_tol=1e-12", "solver.stop_mode=rel", "solver.grad=ift",
            f"solver.backward_solver={solver}", f"solver.backward_max_iter={budget}",
            "solver.backward_tol=1e-12", "solver.backward_stop_mode=rel"]


def _trace_stats(traces: list) -> dict:
    """Mean and std over batches of the batch-mean trace, and how many batches reach each step (``count``: a
    solve that diverged stops early); shorter traces are padded with NaN."""
    n = max(len(t) for t in traces)
    arr = np.full((len(traces), n), np.nan)
    for i, t in enumerate(traces):
        arr[i, :len(t)] = t
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(arr, axis=0)
        std = np.nanstd(arr, axis=0)
    count = [sum(len(t) > i for t in traces) for i in range(n)]
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "n_batches": len(traces),
            "count": count}


def _val_batches(dataset: str, cfg, root: Path, data_options: dict, batch: int, num: int, seed: int):
    opts = {"augment": False, **data_options}
    if dataset == "imagenet":
        opts["image_size"] = cfg.data.eval_image_size[0]
    ds = build_dataset(dataset, root, "val", **opts)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=g, num_workers=0)
    out = []
    for images, targets in loader:
        out.append((images, targets))
        if len(out) == num:
            break
    return out, getattr(ds, "source_label", "unknown")


def _stand_in_batches(dataset: str, cfg, hw: Sequence[int], batch: int, num: int, seed: int, cifar_root: Path,
                      cifar_options: dict):
    """Inputs of ``dataset``'s size made of CIFAR-10 test images where its real data is absent: each image
    tiles ``cols`` CIFAR images side by side (2 for Cityscapes' 1:2 frames), resized bilinearly to ``hw``
    and normalised as the real pipeline normalises; random labels (the backward solve needs a loss)."""
    cols = 2 if hw[1] > hw[0] else 1
    cifar, _ = _val_batches("cifar10", cfg, cifar_root, cifar_options, batch * cols, num, seed)
    g = torch.Generator().manual_seed(seed)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    c_mean, c_std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    out = []
    for images, _ in cifar:
        pixels = images * c_std + c_mean  # undo CIFAR-10's normalisation, then ImageNet's as the real data
        if cols == 2:
            pixels = torch.cat(pixels.chunk(2, 0), dim=3)  # two images side by side
        x = (F.interpolate(pixels, size=tuple(hw), mode="bilinear", align_corners=False) - mean) / std
        if dataset == "cityscapes":
            y = torch.randint(0, cfg.data.num_classes, (x.shape[0], *hw), generator=g)
        else:
            y = torch.randint(0, cfg.data.num_classes, (x.shape[0],), generator=g)
        out.append((x, y))
    label = (f"stand-in: CIFAR-10 test images ({'two side by side, ' if cols == 2 else ''}resized to "
             f"{hw[0]}x{hw[1]}), random labels; no {dataset} data here")
    return out, label


def _traced_model(cfg_name: str, overrides: list[str], solver: str, budget: int, weights: Path | None, seed: int,
                  device: torch.device):
    """The model of ``cfg_name`` whose implicit layer runs ``solver`` for the whole ``budget``, in eval mode,
    at its initial weights (drawn from ``seed``, the same for every solver) or at ``weights``; its solves
    record the paper's ||z[i+1] - z[i]|| / ||z[i]|| too (``trace_steps``) and stop early only if they diverge."""
    cfg = load_config(cfg_name, [*overrides, *trace_overrides(solver, budget)])
    torch.manual_seed(seed)
    model = build_model(cfg).to(device).eval()
    if weights is not None:
        load_pretrained(model, weights)
    for options in (model.deq.solver_options, model.deq.backward_options):
        # the whole budget unless the solve diverges (the solvers' divergence_factor, 1e6): no stop for stagnation
        options.update(trace_steps=True, stagnation_patience=budget + 1)
    return model


def _batch_mean(trace: torch.Tensor | None, dim: int = 0) -> list:
    """The batch mean of a (B, n) trace (NaN entries left out), or [] without one."""
    return [] if trace is None else trace.float().nanmean(dim).tolist()


def _solve_traces(model, batches, device, backward: bool) -> dict[str, list]:
    """Per batch: forward (and backward) traces of both measures, and the per-scale forward ones (S, n)."""
    out: dict[str, list] = {k: [] for k in ("forward", "forward_step", "backward", "backward_step", "scale",
                                            "scale_step")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNCONVERGED)
        for images, targets in batches:
            images, targets = images.to(device), targets.to(device)
            model.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(backward):
                logits = model(images)
                info = model.last_info
                fwd = info.forward
                out["forward"].append(_batch_mean(fwd.rel_trace))
                out["forward_step"].append(_batch_mean(fwd.step_trace))
                out["scale"].append(fwd.scale_rel_trace.float().mean(1).tolist())  # (S, nfe)
                out["scale_step"].append(fwd.scale_step_trace.float().nanmean(1).tolist())
                if backward:
                    if targets.dim() == 1:
                        loss = F.cross_entropy(logits, targets)
                    else:
                        loss = F.cross_entropy(upsample_logits(logits, targets.shape[-2:]), targets,
                                               ignore_index=IGNORE_INDEX)
                    loss.backward()
                    out["backward"].append(_batch_mean(info.backward.rel_trace))
                    out["backward_step"].append(_batch_mean(info.backward.step_trace))
    return out


def _find_checkpoint(runs_: Sequence[str], root: Path | None) -> Path | None:
    """The first ``<run>/checkpoint.pt`` that exists, under ``root`` (default: the repository)."""
    base = Path(root) if root is not None else paths.ROOT
    for run in runs_:
        path = base / run / "checkpoint.pt"
        if path.is_file():
            return path
    return None


def _weights_label(path: Path | None) -> str:
    """"initial weights", or "trained, epoch k of E, step s" from what the checkpoint says."""
    if path is None:
        return "initial weights"
    ckpt = load_checkpoint(path, map_location="cpu")
    epochs = (ckpt.get("config") or {}).get("train", {}).get("epochs")
    done = ckpt.get("epoch", 0)  # epochs completed before the one in progress
    return f"trained, epoch {done}{f' of {epochs}' if epochs else ''}, step {ckpt.get('global_step')}"


def convergence_traces(*, profile: str = "smoke", quick: bool = False, variant: str = "paper", data_root: str = "",
                       num_batches: int = 5, device: str = "auto", seed: int = 0, checkpoints: Path | None = None,
                       datasets: Sequence[str] | None = None, per_scale: bool = True,
                       stand_in: tuple[Path, dict] | None = None, done: Mapping | None = None,
                       save: Callable[[dict], Any] | None = None) -> dict:
    """Convergence traces of Figs. 5-7, mean and std over ``num_batches`` validation batches: both measures
    (``TRACE_MEASURES``), forward and backward (IFT), Broyden and plain iteration of f, at CIFAR-10, ImageNet
    and Cityscapes resolution (Figs. 5/6); per scale for MDEQ vs the single-stream DEQ on CIFAR-10 (Fig. 7).

    Weights: the initial ones always, and a trained checkpoint (``TraceSet.checkpoint_runs``, looked up
    under ``checkpoints`` or the repository) where one exists ("final"). ``stand_in`` = (CIFAR-10 root,
    builder options): the inputs of a data set whose real data is absent are CIFAR-10 test images resized
    to its size (labelled so). ``done``: an earlier output whose finished curves are kept (a resumed
    measurement, also of a curve stopped between two batches); ``save`` is called with the output after
    each batch. The smoke profile uses shrunken
    models at initialisation on synthetic data.
    """
    dev = resolve_device(device)
    budgets = CONVERGENCE_BUDGET["quick" if quick else profile if profile == "smoke" else "full"]
    out: dict[str, Any] = {"profile": profile, "quick": quick, "variant": variant, "device": str(dev),
                           "hardware": hardware_label(dev), "num_batches": num_batches,
                           "measures": TRACE_MEASURES, "datasets": {}, "per_scale": {}}
    if done:
        out["datasets"] = {k: dict(v, curves=dict(v.get("curves", {}))) for k, v in done.get("datasets", {}).items()}
        for entry in out["datasets"].values():  # a curve stopped between batches goes on from its next batch
            if "partial" in entry:
                entry["partial"] = {k: {"seconds": v["seconds"], "traces": {n: list(t) for n, t in v["traces"].items()}}
                                    for k, v in entry["partial"].items()}
        out["per_scale"] = dict(done.get("per_scale", {}))
    wanted = list(datasets) if datasets is not None else list(CONVERGENCE_SETS)
    jobs = []
    for dataset in wanted:
        trace_set = CONVERGENCE_SETS[dataset]
        ckpt = None if profile == "smoke" else _find_checkpoint(trace_set.checkpoint_runs, checkpoints)
        for tag, path in [("init", None)] + ([("final", ckpt)] if ckpt is not None else []):
            for solver in ("broyden", "fixed_point"):
                if f"{solver}_{tag}" not in out["datasets"].get(dataset, {}).get("curves", {}):
                    jobs.append(("curve", dataset, tag, path, solver))
    if per_scale and (datasets is None or "cifar10" in wanted):
        jobs += [("scale", key, None, None, "broyden") for key in PER_SCALE_SETS if key not in out["per_scale"]]
    with progress.bar(jobs, desc="convergence traces", unit="curve") as shown:
        for kind, key, tag, path, solver in shown:
            shown.set_postfix_str(f"{key} {solver} {tag or ''}".strip())
            if kind == "curve":
                _trace_curve(out, key, tag, path, solver, profile=profile, quick=quick, variant=variant,
                             data_root=data_root, num_batches=num_batches, dev=dev, seed=seed, budgets=budgets,
                             stand_in=stand_in, save=save)
            else:
                _trace_per_scale(out, key, profile=profile, quick=quick, variant=variant, data_root=data_root,
                                 num_batches=num_batches, dev=dev, seed=seed, budgets=budgets,
                                 checkpoints=checkpoints, stand_in=stand_in)
            if save is not None:
                save(out)
    return out


def _trace_inputs(dataset: str, cfg_name: str, overrides: list[str], *, profile: str, quick: bool, data_root: str,
                  num_batches: int, seed: int, stand_in):
    """(config, batches, data label, batch size) of one panel: smoke data, real data, or the CIFAR stand-in."""
    trace_set = CONVERGENCE_SETS[dataset]
    batch = trace_set.batch
    if profile == "smoke":
        batch, eval_hw = _SMOKE_TRACE[dataset]
        if quick:
            batch = max(1, batch // 2)
            if dataset == "cityscapes":
                eval_hw = [64, 128]
        if eval_hw is not None:
            overrides = [*overrides, f"data.eval_image_size={eval_hw}"]
        root, data_options = smoke_data(dataset)
    else:
        root, data_options = default_data_root(dataset, data_root), {}
    cfg = load_config(cfg_name, overrides)
    if profile != "smoke" and not root.exists() and stand_in is not None:
        if dataset == "cifar10":  # the real test set, in the layout stand_in names
            batches, source = _val_batches("cifar10", cfg, stand_in[0], stand_in[1], batch, num_batches, seed)
        else:
            batches, source = _stand_in_batches(dataset, cfg, cfg.data.eval_image_size, batch, num_batches, seed,
                                                *stand_in)
        return cfg, overrides, batches, source, batch
    with warnings.catch_warnings():  # the smoke ImageNet copy has 10 of the 1000 classes, as intended
        warnings.filterwarnings("ignore", message=".*ILSVRC-2012 class folders are missing")
        batches, source = _val_batches(dataset, cfg, root, data_options, batch, num_batches, seed)
    if dataset == "cityscapes" and profile == "smoke" and tuple(cfg.data.eval_image_size) != (128, 256):
        h, w = cfg.data.eval_image_size
        batches = [(x[..., :h, :w], t[..., :h, :w]) for x, t in batches]
    return cfg, overrides, batches, source, batch


def _trace_curve(out: dict, dataset: str, tag: str, path: Path | None, solver: str, *, profile, quick, variant,
                 data_root, num_batches, dev, seed, budgets, stand_in, save=None) -> None:
    cfg_name = CONVERGENCE_SETS[dataset].config.format(variant=variant)
    overrides = smoke_overrides(smoke_spec(cfg_name), variant, quick=quick) if profile == "smoke" else []
    cfg, overrides, batches, source, batch = _trace_inputs(dataset, cfg_name, overrides, profile=profile,
                                                           quick=quick, data_root=data_root,
                                                           num_batches=num_batches, seed=seed, stand_in=stand_in)
    entry = out["datasets"].setdefault(dataset, {"curves": {}})
    entry.update({"config": cfg_name, "batch": batch, "input_hw": list(batches[0][0].shape[-2:]), "data": source,
                  "budget": budgets[dataset], "broyden_memory": cfg.solver.memory})
    model = _traced_model(cfg_name, overrides, solver, budgets[dataset], path, seed, dev)
    entry["params"] = sum(p.numel() for p in model.parameters())
    key = f"{solver}_{tag}"
    # Batch by batch, each kept in "partial" and saved: a stopped measurement resumes at its next batch.
    part = entry.setdefault("partial", {}).setdefault(key, {"seconds": 0.0, "traces": {}})
    for i, b in enumerate(batches):
        if i < len(part["traces"].get("forward", [])):
            continue
        t0 = time.perf_counter()
        for name, values in _solve_traces(model, [b], dev, backward=True).items():
            part["traces"].setdefault(name, []).extend(values)
        part["seconds"] += time.perf_counter() - t0
        if save is not None and i + 1 < len(batches):
            save(out)
    curve = {"weights": _weights_label(path), "checkpoint": paths.rel(path) if path else None,
             "seconds": round(part["seconds"], 1)}
    for direction in ("forward", "forward_step", "backward", "backward_step"):
        if part["traces"].get(direction):
            curve[direction] = _trace_stats(part["traces"][direction])
    entry["curves"][key] = curve
    del entry["partial"][key]
    if not entry["partial"]:
        del entry["partial"]
    print(f"convergence traces: {dataset} {solver} ({curve['weights']}) done in {curve['seconds']} s", flush=True)


def _trace_per_scale(out: dict, key: str, *, profile, quick, variant, data_root, num_batches, dev, seed, budgets,
                     checkpoints, stand_in) -> None:
    cfg_tmpl, runs_ = PER_SCALE_SETS[key]
    cfg_name = cfg_tmpl.format(variant=variant)
    overrides = smoke_overrides(smoke_spec(cfg_name), variant, quick=quick) if profile == "smoke" else []
    cfg = load_config(cfg_name, overrides)
    if profile == "smoke":
        root, data_options = smoke_data("cifar10")
        batch = 4 if quick else 8
    else:
        root, data_options, batch = default_data_root("cifar10", data_root), {}, 32
        if not root.exists() and stand_in is not None:
            root, data_options = stand_in
    batches, source = _val_batches("cifar10", cfg, root, data_options, batch, num_batches, seed)
    ckpt = None if profile == "smoke" else _find_checkpoint(runs_, checkpoints)
    model = _traced_model(cfg_name, overrides, "broyden", budgets["cifar10"], ckpt, seed, dev)
    traces = _solve_traces(model, batches, dev, backward=False)
    n_scales = len(traces["scale"][0])
    out["per_scale"][key] = {
        "config": cfg_name, "weights": _weights_label(ckpt), "checkpoint": paths.rel(ckpt) if ckpt else None,
        "data": source, "channels": list(cfg.model.num_channels),
        "scales": [_trace_stats([s[i] for s in traces["scale"]]) for i in range(n_scales)],
        "scales_step": [_trace_stats([s[i] for s in traces["scale_step"]]) for i in range(n_scales)]}
