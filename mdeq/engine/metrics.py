"""How training and evaluation are scored: running averages, top-k accuracy, a confusion matrix giving mIoU.

Why: these follow torchvision's ``references/segmentation/utils.py`` (``SmoothedValue``,
``MetricLogger``, ``ConfusionMatrix``), with two departures (STYLE.md 3.12): reductions use the
metric's own device instead of a hard-coded ``'cuda'``, and nothing here prints; ``train.py``
decides what to log. mIoU follows the Cityscapes benchmark (``cityscapesscripts``'
``evalPixelLevelSemanticLabeling``): IoU_c = TP / (TP + FP + FN) over pixels whose label is not
ignored, averaged over the classes with a non-zero denominator. The released MDEQ/HRNet code instead
divides by max(1, TP + FP + FN) and averages over all 19 classes; the two agree whenever every class
occurs in the labels or the predictions, as on the Cityscapes val set.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Iterable, Sequence

import torch

from mdeq.engine.data import IGNORE_INDEX
from mdeq.engine.distributed import all_reduce_sum

__all__ = ["SmoothedValue", "MetricLogger", "topk_correct", "accuracy", "ConfusionMatrix", "PeakMemory"]



class SmoothedValue:
    """A series of numbers: the last value, a windowed median/mean and the global (weighted) mean."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        """Add ``value`` as the mean of ``n`` observations (e.g. a batch-mean loss with n = batch size)."""
        value = float(value)
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self, device: torch.device | str = "cpu") -> None:
        """Sum count and total over processes (the window stays local), on ``device``."""
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=device)
        all_reduce_sum(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        if not self.deque:
            return math.nan
        return float(torch.tensor(list(self.deque)).median().item())

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else math.nan

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else math.nan

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """A named set of ``SmoothedValue``s; ``update(loss=..., acc=...)`` creates them on first use."""

    def __init__(self, delimiter: str = "  ", window_size: int = 20):
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter
        self.window_size = window_size

    def update(self, n: int = 1, **values: float | torch.Tensor | None) -> None:
        """Record each value (None and NaN are skipped: a phase without a backward solve has none)."""
        for name, v in values.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            if isinstance(v, float) and math.isnan(v):
                continue
            if name not in self.meters:
                self.meters[name] = SmoothedValue(self.window_size)
            self.meters[name].update(v, n)

    def __getitem__(self, name: str) -> SmoothedValue:
        return self.meters[name]

    def __contains__(self, name: str) -> bool:
        return name in self.meters

    def global_avgs(self) -> dict[str, float]:
        return {name: m.global_avg for name, m in self.meters.items()}

    def synchronize_between_processes(self, device: torch.device | str = "cpu",
                                      names: Sequence[str] | None = None) -> None:
        """Reduce the named meters (all by default; every process must pass the same names)."""
        for name in sorted(self.meters if names is None else names):
            if name not in self.meters:
                self.meters[name] = SmoothedValue(self.window_size)
            self.meters[name].synchronize_between_processes(device)

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())


def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: Iterable[int] = (1, 5)) -> list[int]:
    """Number of samples whose target is among the k largest logits, for each k (k capped at C)."""
    if logits.dim() != 2 or target.dim() != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"expected logits (B, C) and targets (B,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    topk = tuple(topk)
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(target[:, None])
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum().item()) for k in topk]


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Iterable[int] = (1,)) -> list[float]:
    """Top-k accuracy in percent of the batch, for each k."""
    n = max(target.shape[0], 1)
    return [100.0 * c / n for c in topk_correct(logits, target, topk)]


class ConfusionMatrix:
    """Pixel (or sample) confusion matrix: ``mat[target, prediction]``, int64, labels ``ignore_index`` skipped.

    ``update`` accumulates with one ``bincount``; ``reduce_from_all_processes`` sums over processes on the
    matrix's device; ``compute`` gives pixel accuracy, per-class accuracy and IoU.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat: torch.Tensor | None = None

    def update(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        """Add pairs of equal-shape integer tensors (any shape); pixels whose target is ignored are skipped."""
        if target.shape != prediction.shape:
            raise ValueError(f"target {tuple(target.shape)} and prediction {tuple(prediction.shape)} differ in shape")
        n = self.num_classes
        if self.mat is None:
            self.mat = torch.zeros((n, n), dtype=torch.int64, device=target.device)
        t = target.reshape(-1).to(torch.int64)
        p = prediction.reshape(-1).to(torch.int64)
        keep = (t >= 0) & (t < n)
        if self.ignore_index is not None:
            keep &= t != self.ignore_index
        bad = keep & ((p < 0) | (p >= n))
        if bool(bad.any()):
            raise ValueError(f"predictions must lie in [0, {n}), found {p[bad][0].item()}")
        idx = n * t[keep] + p[keep]
        self.mat += torch.bincount(idx, minlength=n * n).reshape(n, n).to(self.mat.device)

    def reset(self) -> None:
        if self.mat is not None:
            self.mat.zero_()

    def reduce_from_all_processes(self) -> None:
        """Sum the matrix over processes (every process must have called ``update`` or ``ensure``)."""
        if self.mat is None:
            raise RuntimeError("ConfusionMatrix.reduce_from_all_processes before any update; call ensure(device)")
        all_reduce_sum(self.mat)

    def ensure(self, device: torch.device | str) -> None:
        """Allocate an all-zero matrix on ``device`` if none exists (a process that saw no samples)."""
        if self.mat is None:
            self.mat = torch.zeros((self.num_classes,) * 2, dtype=torch.int64, device=device)

    def compute(self) -> dict[str, object]:
        """``pixel_acc`` (%), ``class_acc`` (%, per class), ``iou`` (per class, NaN where TP+FP+FN = 0), ``miou``.

        ``miou`` (a fraction in [0, 1]) averages the IoUs that are not NaN, as the Cityscapes benchmark does.
        """
        if self.mat is None:
            raise RuntimeError("ConfusionMatrix.compute before any update")
        h = self.mat.double().cpu()
        tp = h.diag()
        gt = h.sum(1)  # TP + FN
        pred = h.sum(0)  # TP + FP
        denom = gt + pred - tp
        iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, math.nan))
        class_acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, math.nan))
        valid = ~torch.isnan(iou)
        total = h.sum()
        return {
            "pixel_acc": float(100.0 * tp.sum() / total) if total > 0 else math.nan,
            "class_acc": (100.0 * class_acc).tolist(),
            "iou": iou.tolist(),
            "miou": float(iou[valid].mean()) if bool(valid.any()) else math.nan,
        }

    def __str__(self) -> str:
        r = self.compute()
        return f"pixel acc {r['pixel_acc']:.2f}%  mIoU {100 * r['miou']:.2f}"


class PeakMemory:
    """Peak memory since the last ``reset``, in MiB: CUDA ``max_memory_allocated`` or the process's peak RSS.

    Why two measures: on a GPU the allocator's peak is what the paper's memory figure means; on a CPU
    torch allocates through malloc, which ``tracemalloc`` does not see, so the process's resident set is
    used. Linux lets a process reset its RSS high-water mark (``/proc/self/clear_refs``, value 5) and read
    it back (``VmHWM`` in ``/proc/self/status``); elsewhere ``resource.getrusage`` gives the lifetime peak.
    ``kind`` names the measure in logs: ``cuda_max_allocated``, ``cpu_peak_rss`` or ``cpu_max_rss_lifetime``.
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.kind = "cuda_max_allocated"
        else:
            self.kind = "cpu_peak_rss" if self._can_reset_rss() else "cpu_max_rss_lifetime"

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            return PeakMemory._vm_hwm_kb() is not None
        except OSError:
            return False

    @staticmethod
    def _vm_hwm_kb() -> int | None:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def current_mb(self) -> float:
        """Memory in use now, in the same terms: CUDA ``memory_allocated`` or the resident set (``VmRSS``).

        Why: a peak means little without the level it rose from (weights, the torch runtime), so a
        measurement subtracts this, read before the work, from ``peak_mb``.
        """
        if self.kind == "cuda_max_allocated":
            return torch.cuda.memory_allocated(self.device) / 2**20
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def reset(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss":
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")

    def peak_mb(self) -> float:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss":
            kb = self._vm_hwm_kb()
            if kb is not None:
                return kb / 1024
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
