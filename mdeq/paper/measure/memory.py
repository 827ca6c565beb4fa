"""How many bytes of tensors one training step keeps alive, implicit against unrolled and explicit: Fig. 4b, memory.

Live tensor bytes, by component (parameters, gradients, optimiser state, tensors saved for backward, the rest
at the peak), counted on CPU (``train_step_memory``): the bytes depend on shapes, not on the device or its
allocator. The models are Fig. 4b's (``mdeq.paper.measure.runtime.RUNTIME_MODELS``); each MDEQ is measured in
its implicit phase and trained through its unrolled iterations, and at each forward budget for the O(1)-memory
curve (``measure_memory``).
"""
from __future__ import annotations

import contextlib
import gc
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from mdeq.engine import progress
from mdeq.core.config import load_config
from mdeq.core.model import build_model
from mdeq.paper.measure.runtime import RUNTIME_MODELS, RuntimeModel, _build_runtime_model
from mdeq.paper.measure.timing import _UNCONVERGED, _release_memory
from mdeq.engine.step import set_phase

__all__ = ["saved_activations", "train_step_memory", "MEMORY_BUDGETS", "measure_memory"]

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
