"""How long a training step and an inference pass take, MDEQs against explicit networks: Fig. 4b, time.

Fig. 4b's bar groups (``RUNTIME_MODELS``: MDEQ, MDEQ-small, ResNet-18, ResNet-101, ANODE) are defined here;
``mdeq.paper.measure.memory`` measures the same models. The step that is timed also gives each model's peak
training memory as the device reports it (``measure_runtime``); the live tensor bytes are ``memory``'s. The
device is chosen once, by the engine's rule (``mdeq.engine.build.resolve_device``); ``timeit`` is the one
timing loop (``mdeq.paper.measure.timing``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mdeq.engine import progress
from mdeq.core.config import load_config
from mdeq.engine.metrics import PeakMemory
from mdeq.core.model import build_model
from mdeq.engine.runlog import hardware_label
from mdeq.paper.measure.timing import _UNCONVERGED, _release_memory, timeit
from mdeq.engine.build import resolve_device

__all__ = ["RuntimeModel", "RUNTIME_MODELS", "measure_runtime"]


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
