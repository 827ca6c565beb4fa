"""What is computed for a figure: Fig. 4b's time and memory, the solver traces of Figs. 5-7, Fig. 8's predictions.

Why one module: the notebooks, the device scripts (``scripts/device/``) and the benchmarks
(``benchmarks/``) measure with the same code, so a number means the same wherever it is drawn. Each
function returns plain data (or writes images) and draws nothing; ``mdeq.paper.report`` draws. The device is
chosen once, by the engine's rule (``mdeq.train.resolve_device``); solver settings reach the implicit
layer through the config it is built from (``trace_overrides``), so the layer checks them as it checks
a training run's. ``timeit`` is the one timing loop (the benchmarks use it too).
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from mdeq.engine import paths, progress
from mdeq.engine.checkpoint import load_checkpoint, load_pretrained
from mdeq.core.config import config_from_dict, load_config
from mdeq.engine.data import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD, build_dataset
from mdeq.engine.metrics import IGNORE_INDEX, PeakMemory
from mdeq.core.model import build_model, upsample_logits
from mdeq.engine.runlog import hardware_label
from mdeq.paper.runs import FULL_RUNS, default_data_root, smoke_data, smoke_overrides, smoke_spec
from mdeq.train import resolve_device, set_phase

__all__ = ["sync", "timeit", "check_gpu", "RuntimeModel", "RUNTIME_MODELS", "measure_runtime", "saved_activations",
           "train_step_memory", "MEMORY_BUDGETS", "measure_memory", "TraceSet",
           "CONVERGENCE_SETS", "CONVERGENCE_BUDGET", "trace_overrides", "convergence_traces", "cityscapes_examples"]

_UNCONVERGED = "IFT backward solve did not converge"  # expected here: untrained weights, budgets run to the end


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], device: torch.device | str, repeats: int, warmup: int = 1, *,
           after: Callable[[], Any] | None = None) -> list[float]:
    """Wall times in seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones, device-synchronised.

    ``after`` runs after each timed call, outside the timing (e.g. reading the solver's statistics).
    """
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return out


def check_gpu(device: str, what: str) -> None:
    """The full profile measures on a GPU: with ``device="auto"`` and none visible, stop and say so."""
    if device == "auto" and not torch.cuda.is_available():
        raise RuntimeError(f"the full profile {what} on a GPU and none is visible; pass device='cpu' to run on this "
                           f"CPU anyway (labelled as such; slow at full resolution), or use profile='smoke'")


# ----------------------------------------------------------------------------------------------
# Fig. 4b: time and peak memory of one training step and one inference pass.

@dataclass(frozen=True)
class RuntimeModel:
    """One bar group of Fig. 4b: an MDEQ config (``config:<name with {variant}>``) or ``baseline:<name>``."""

    key: str
    label: str
    what: str


RUNTIME_MODELS = (
    RuntimeModel("mdeq", "MDEQ", "config:cifar10_large_{variant}"),
    RuntimeModel("mdeq_small", "MDEQ-small", "config:cifar10_small_{variant}"),
    RuntimeModel("resnet18", "ResNet-18", "baseline:resnet18_10m"),
    RuntimeModel("resnet101", "ResNet-101", "baseline:resnet101"),
    RuntimeModel("anode", "ANODE", "baseline:anode_172k"),
)


def _build_runtime_model(what: str, variant: str) -> torch.nn.Module:
    kind, name = what.split(":", 1)
    if kind == "baseline":
        # Imported here: the Neural ODE baselines need torchdiffeq, an optional dependency (the baselines extra).
        from mdeq.engine.baselines import build_baseline

        return build_baseline(name)
    return build_model(load_config(name.format(variant=variant)))


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _median(times_ms: Sequence[float]) -> float:
    return float(sorted(times_ms)[len(times_ms) // 2])


def measure_runtime(*, batch_size: int = 32, device: str = "auto", variant: str = "paper", repeats: int = 3,
                    warmup: int = 1, models: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Time (ms per batch) of a training step (forward + backward) and of inference, and the peak
    training memory, of each model of Fig. 4b on a CIFAR-10-sized batch (3 x 32 x 32).

    MDEQs run in their implicit phase (Broyden forward with T_f, IFT backward with T_b) from their
    initial weights, so every solve uses its full budget. Memory: on a GPU the allocator's peak during
    the step (``max_memory_allocated``, weights included); on a CPU the increase of the process's peak
    resident set over its resident set before the model was built.
    """
    dev = resolve_device(device)
    table = {m.key: m for m in RUNTIME_MODELS}
    keys = list(models) if models is not None else list(table)
    out: dict[str, Any] = {"batch_size": batch_size, "input": [3, 32, 32], "device": str(dev),
                           "hardware": hardware_label(dev), "repeats": repeats, "warmup": warmup,
                           "variant": variant, "torch": torch.__version__, "models": {}}
    with progress.bar(keys, desc="Fig. 4b time", unit="model") as shown:
        for key in shown:
            spec = table[key]
            shown.set_postfix_str(spec.label)
            torch.manual_seed(seed)
            _release_memory(dev)
            m = out["models"][key] = _measure_model(spec, variant, dev, batch_size, repeats, warmup)
            print(f"{spec.label}: train {m['train_ms']:.0f} ms, inference {m['inference_ms']:.0f} ms, "
                  f"peak {m['peak_train_memory_mb']:.0f} MB", flush=True)
    _release_memory(dev)
    return out


def _measure_model(spec: RuntimeModel, variant: str, dev: torch.device, batch_size: int, repeats: int,
                   warmup: int) -> dict[str, Any]:
    meter = PeakMemory(dev)
    base_mb = meter.current_mb()
    model = _build_runtime_model(spec.what, variant)
    model.to(dev).train()
    x = torch.randn(batch_size, 3, 32, 32, device=dev)
    y = torch.randint(0, 10, (batch_size,), device=dev)
    params = sum(p.numel() for p in model.parameters())

    def train_step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()

    def infer():
        with torch.no_grad():
            model(x)

    times = {}
    meter.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNCONVERGED)
        for name, fn, mode in (("train", train_step, True), ("inference", infer, False)):
            model.train(mode)
            times[name] = [1000 * s for s in timeit(fn, dev, repeats, warmup)]
            if name == "train":
                peak_mb = meter.peak_mb() - base_mb
    info = getattr(model, "last_info", None)
    nfe = {}
    if info is not None and info.forward is not None:
        nfe = {"nfe_forward": info.forward.nfe,
               "nfe_backward": info.backward.nfe if info.backward is not None else None}
    return {
        "label": spec.label, "what": spec.what.format(variant=variant), "params": params,
        "train_ms": _median(times["train"]), "train_ms_all": times["train"],
        "inference_ms": _median(times["inference"]), "inference_ms_all": times["inference"],
        "peak_train_memory_mb": float(peak_mb),
        "memory_kind": meter.kind if dev.type == "cuda" else "cpu_peak_rss_increase", **nfe,
    }


# ----------------------------------------------------------------------------------------------
# Fig. 4b's memory as live tensor bytes: what one training step keeps alive, by component.

_ALLOCATION = torch._C._profiler._EventType.Allocation


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of ``t``'s storage, or None for an empty one: the unit of deduplication."""
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else None


def _unique_bytes(tensors) -> int:
    seen = {k for k in map(_storage_key, tensors) if k is not None}
    return sum(n for _, n in seen)


@contextlib.contextmanager
def saved_activations(exclude: Sequence[torch.Tensor] = ()):
    """Count the bytes of tensors autograd saves for backward while the context is open.

    A ``torch.autograd.graph.saved_tensors_hooks`` pack hook sees every tensor an op saves; each storage
    counts once (by ``untyped_storage().data_ptr()``), so an output saved by ReLU and again as the next
    layer's input is one tensor, and tensors whose storage is one of ``exclude`` (the parameters) are not
    counted. The hook returns the tensor itself, so nothing is copied or kept longer. Yields a dict whose
    ``"bytes"`` and ``"tensors"`` fill in as the ops run.
    """
    skip = {k for k in map(_storage_key, exclude) if k is not None}
    seen: set[tuple[int, int]] = set()
    out = {"bytes": 0, "tensors": 0}

    def pack(t):
        key = _storage_key(t)
        if key is not None and key not in skip and key not in seen:
            seen.add(key)
            out["bytes"] += key[1]
            out["tensors"] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def _allocation_peak(prof) -> tuple[int, int]:
    """(peak, end) of the running sum of the CPU allocator's allocations and frees recorded by ``prof``.

    The events are the profiler's own ``Allocation`` records (``profile_memory=True``): one per allocation
    (+bytes) and per free (-bytes) of a tensor storage, on every thread, in time order. The sum starts at
    0 when the profiler starts, so the peak is the most bytes allocated above what was live then.
    """
    events: list = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _ALLOCATION and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    total = peak = 0
    for _, size in events:
        total += size
        peak = max(peak, total)
    return peak, total


def train_step_memory(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                      optimizer: torch.optim.Optimizer | None = None,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy) -> dict:
    """Peak live tensor bytes of one full CPU training step (forward, loss, backward, optimiser step), split.

    One warm-up step runs first (so Adam's state exists, as in every step of a training run but the
    first), then the measured step, under ``torch.profiler.profile(profile_memory=True)``. Gradients are
    zeroed in place (``zero_grad(set_to_none=False)``), so they are live through the whole step as in a
    run that keeps its gradient buffers. What is counted, in bytes of tensor storages:

    - ``state_bytes``: parameters + gradients + optimiser state (Adam's two moments and step counters) +
      buffers (BatchNorm running statistics), read off the tensors after the step; live throughout.
    - ``saved_bytes``: tensors saved for backward during forward + loss (``saved_activations``: each
      storage once, parameters excluded), all live when backward starts.
    - ``peak_bytes``: live bytes at the step's start (``state_bytes`` + the input batch and labels) plus
      the highest point of the running sum of the CPU allocator's allocations minus frees recorded by the
      profiler during the step (``_allocation_peak``).
    - ``other_bytes`` = peak - state - saved: the input, the solver's history and iterates (Broyden's
      low-rank buffers, z), the gradient flowing in backward, temporaries live at the peak.

    The profiler does not see the free of a block allocated before it started (it warns so), so a tensor
    of the warm-up step that the measured step frees (e.g. the previous solver statistics) stays counted
    after its free: the peak is high by at most such leftovers, which are small. Process memory (RSS, allocator
    caches, library workspaces) is not: these are the bytes the step's tensors need, on any device.
    """
    params = [p for p in model.parameters()]
    optimizer = optimizer if optimizer is not None else torch.optim.Adam(params, lr=1e-4)

    def step(counter=None):
        optimizer.zero_grad(set_to_none=False)
        ctx = saved_activations(exclude=params) if counter is None else contextlib.nullcontext(counter)
        with ctx as saved:
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return saved

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_UNCONVERGED)
        step()  # warm-up: gradients and Adam's state now exist
        gc.collect()
        before = _unique_bytes([*params, *(p.grad for p in params if p.grad is not None), *model.buffers(),
                                *_optimizer_tensors(optimizer), x, y])
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                    record_shapes=False) as prof:
            saved = step()
    rise, net = _allocation_peak(prof)
    parts = {"params": _unique_bytes(params),
             "grads": _unique_bytes([p.grad for p in params if p.grad is not None]),
             "optimizer": _unique_bytes(_optimizer_tensors(optimizer)),
             "buffers": _unique_bytes(list(model.buffers()))}
    state = sum(parts.values())
    peak = before + rise
    return {"peak_bytes": peak, "state_bytes": state, "saved_bytes": saved["bytes"],
            "other_bytes": peak - state - saved["bytes"], "state_parts": parts, "saved_tensors": saved["tensors"],
            "live_before_bytes": before, "step_net_bytes": net, "params": sum(p.numel() for p in params)}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]


MEMORY_BUDGETS = (5, 10, 20, 40, 80)  # the O(1)-memory curve's forward iteration budgets
_FULL_BUDGET = ["solver.tol=1e-12", "solver.stop_mode=rel", "solver.backward_tol=1e-12",
                "solver.backward_stop_mode=rel"]  # every solve runs its whole budget


def _memory_model(spec: RuntimeModel, variant: str, grad: str, budget: int | None, seed: int):
    """The model of ``spec``: a baseline, or an MDEQ in its implicit phase (``grad="implicit"``) or trained
    through ``solver.max_iter`` unrolled applications of f (``grad="unrolled"``), with its budgets run in full
    (``budget`` replaces both the forward and the backward budget)."""
    torch.manual_seed(seed)
    kind, name = spec.what.split(":", 1)
    if kind == "baseline":
        return _build_runtime_model(spec.what, variant), {}
    over = [*_FULL_BUDGET] + ([f"solver.max_iter={budget}", f"solver.backward_max_iter={budget}"] if budget else [])
    cfg = load_config(name.format(variant=variant), over)
    model = build_model(cfg)
    set_phase(model, cfg, cfg.train.pretrain_steps)  # the implicit phase
    if grad == "unrolled":
        model.deq.grad = "unrolled"
        model.deq.unroll_steps = cfg.solver.max_iter
    return model, {"grad": model.deq.grad, "max_iter": cfg.solver.max_iter,
                   "backward_max_iter": cfg.solver.backward_max_iter, "broyden_memory": cfg.solver.memory,
                   "unroll_steps": model.deq.unroll_steps if grad == "unrolled" else None}


def _one_memory(spec: RuntimeModel, variant: str, grad: str, budget: int | None, batch_size: int, seed: int) -> dict:
    model, info = _memory_model(spec, variant, grad, budget, seed)
    model.train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch_size,), generator=g)
    m = train_step_memory(model, x, y)
    last = getattr(model, "last_info", None)
    if last is not None:
        info["nfe_forward"] = last.nfe_forward
        info["nfe_backward"] = last.backward.nfe if last.backward is not None else None
    del model
    _release_memory(torch.device("cpu"))
    return {"label": spec.label, "what": spec.what.format(variant=variant), **info, **m}


def measure_memory(*, batch_size: int = 32, variant: str = "paper", models: Sequence[str] | None = None,
                   budgets: Sequence[int] = MEMORY_BUDGETS, curve_model: str = "mdeq_small", seed: int = 0,
                   log: Callable[[str], Any] = print) -> dict:
    """Fig. 4b's memory in live tensor bytes (``train_step_memory``) on CPU, batch ``batch_size`` of 3 x 32 x 32.

    ``models``: the five of Fig. 4b (MDEQs in their implicit phase, every solve run to its budget), then
    ``<mdeq>_unrolled``: the same MDEQ trained by backpropagation through ``solver.max_iter`` unrolled
    applications of f. ``curve``: ``curve_model`` at each forward budget in ``budgets`` (the backward solve
    gets the same budget; Broyden's memory stays the config's), implicit and unrolled. Random input and
    initial weights (``seed``): the bytes depend on shapes, not values.
    """
    table = {m.key: m for m in RUNTIME_MODELS}
    keys = list(models) if models is not None else list(table)
    out: dict[str, Any] = {"batch_size": batch_size, "input": [3, 32, 32], "variant": variant,
                           "unit": "bytes of live tensor storage", "models": {}, "curve": {}}
    jobs = [(key, grad, None) for key in keys
            for grad in (("implicit", "unrolled") if table[key].what.startswith("config:") else ("none",))]
    if budgets:
        out["curve"] = {"model": curve_model, "label": table[curve_model].label, "budgets": list(budgets),
                        "implicit": [], "unrolled": []}
        jobs += [(curve_model, grad, n) for grad in ("implicit", "unrolled") for n in budgets]
    with progress.bar(jobs, desc="Fig. 4b memory", unit="step") as shown:
        for key, grad, n in shown:
            name = key if grad != "unrolled" else f"{key}_unrolled"
            shown.set_postfix_str(name if n is None else f"{name} budget {n}")
            r = _one_memory(table[key], variant, grad, n, batch_size, seed)
            if n is None:
                out["models"][name] = r
                log(f"{name}: peak {r['peak_bytes'] / 2**20:.1f} MiB (state {r['state_bytes'] / 2**20:.1f}, "
                    f"saved {r['saved_bytes'] / 2**20:.1f}, other {r['other_bytes'] / 2**20:.1f})")
            else:
                out["curve"][grad].append(r)
                log(f"{key} {grad} budget {n}: peak {r['peak_bytes'] / 2**20:.1f} MiB")
    return out


# ----------------------------------------------------------------------------------------------
# Figs. 5-7: solver traces.

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


# ----------------------------------------------------------------------------------------------
# Fig. 8: segmentation examples.

def cityscapes_examples(run_dir: Path, out_dir: Path, *, data_root: Path, data_options: dict | None = None,
                        num: int = 2, max_width: int = 1024, device: str = "auto") -> list[dict]:
    """Predict ``num`` validation images with the checkpoint of ``run_dir`` and store input, prediction
    and ground truth (trainIds as PNG, input as JPEG) under ``out_dir``, at most ``max_width`` wide."""
    dev = resolve_device(device)
    ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt", map_location="cpu")
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    ds = build_dataset("cityscapes", data_root, "val", augment=False, **(data_options or {}))
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    mean = np.array(IMAGENET_MEAN)[:, None, None]
    std = np.array(IMAGENET_STD)[:, None, None]
    records = []
    for k in range(min(num, len(ds))):
        image, label = ds[k]
        with torch.no_grad():
            logits = model(image[None].to(dev))
            pred = upsample_logits(logits.float(), label.shape[-2:]).argmax(1)[0].cpu().numpy().astype(np.uint8)
        rgb = np.clip((image.numpy() * std + mean) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        gt = label.numpy().astype(np.uint8)
        step = max(1, int(np.ceil(gt.shape[1] / max_width)))
        files = {}
        for name, arr, ext in (("input", rgb[::step, ::step], "jpg"), ("prediction", pred[::step, ::step], "png"),
                               ("ground_truth", gt[::step, ::step], "png")):
            path = out_dir / f"example{k}_{name}.{ext}"
            Image.fromarray(arr).save(path, **({"quality": 85} if ext == "jpg" else {}))
            files[name] = path.name
        records.append({"index": k, **files})
    (out_dir / "examples.json").write_text(json.dumps({"run": Path(run_dir).name, "config": cfg.name,
                                                       "examples": records}, indent=1) + "\n")
    return records
