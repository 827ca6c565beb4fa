"""Training engine: ``train_one_epoch``, ``evaluate`` and ``main(cfg, options)``; ``python -m mdeq.train``.

Why this shape: torchvision's ``references/classification/train.py`` (a plain loop, full-state
checkpoints), with what the paper's training needs on top (Appendix A, Table 4,
``docs/paper_vs_released.md``):

- **Optimisers and schedule** from ``cfg.train``: torch Adam (L2-coupled weight decay, not AdamW) for
  CIFAR-10, SGD with momentum 0.9 (+ Nesterov for ImageNet) for ImageNet and Cityscapes, and
  ``CosineAnnealingLR(T_max = iterations per epoch x epochs, eta_min)`` stepped every iteration.
- **Unrolled warm-up**: for the first ``train.pretrain_steps`` optimiser steps f_theta is applied
  ``solver.unroll_steps`` times with ordinary backprop (``model.deq.grad = "unrolled"``); from then on
  the implicit solve with ``solver.grad`` runs. A hard switch, counted in optimiser steps and derived
  from the global step, so a resumed run lands in the right phase. Evaluation always solves for the
  equilibrium, as the released (old) code does, also during the warm-up.
- **Losses and metrics**: cross-entropy; for Cityscapes class-weighted with ignore index 255, the
  logits upsampled bilinearly (align_corners=True) to the label size. Top-1/top-5 accuracy, or mIoU
  from a confusion matrix reduced over processes.
- **No model selection on the evaluation set.** CIFAR-10's evaluation set is its test set (as in the
  released code, whose ``model_best`` is chosen on it). We report the *final* epoch; ``final.json``
  shows the best epoch beside it, labelled as such, for comparison only.
- **ImageNet initialisation for Cityscapes** (``train.pretrained``): every tensor present in both state
  dicts with equal shapes (stem, injection, f_theta) is loaded and the loaded/skipped keys are logged.
- **Stabilisers of the authors' later code**, off by default (docs/training_stability.md): Jacobian
  regularisation (``train.jac_reg_*``, scheduled by ``jacobian_weight``), fixed-point correction
  (``solver.correction_*``, ``training_objective``) and a spectral-radius monitor at evaluation
  (``train.spectral_radius_*``, the ``eval_spectral_radius`` column).

Run-time options (device, mixed precision, workers, logging, output folder, resume, limits for smoke
runs) are not part of the experiment and live in ``RunOptions``, not in the config.

Mixed precision (``--amp``, off by default): f, the stem and the heads run under ``torch.autocast``
(float16 on CUDA with a ``GradScaler``, or bfloat16, which needs no scaler); the solver keeps its state
and residuals in the dtype of z0 and casts f's output to it (``mdeq/core/solvers.py``). On a CPU ``--amp``
means bfloat16 autocast. Code behind ``torch.cuda.is_available()`` never runs on a CPU-only machine.

Multi-GPU and multi-node: launch with ``torchrun`` (``torchrun --nproc_per_node 4 -m mdeq.train ...``);
``mdeq.engine.distributed`` reads the rank and world size from its environment. The model is wrapped in
DistributedDataParallel, each process reads its shard through a ``DistributedSampler`` (reshuffled
every epoch from ``train.seed + epoch``), ``data.batch_size`` is the global batch, and segmentation
models use SyncBatchNorm on GPUs as the released code does (SyncBatchNorm has no CPU kernel). Only rank
0 logs and writes files. The implicit backward (a custom autograd Function that calls
``autograd.grad`` with respect to z* only) leaves DDP's per-parameter gradient hooks firing exactly
once per step in both phases; ``tests/test_distributed.py`` checks the gradients against one process.

Outputs in ``options.out_dir``: ``metrics.csv`` (one row per epoch), ``steps.jsonl`` (every
``log_every`` steps), ``provenance.json``, ``checkpoint.pt`` (atomic; every ``checkpoint_every`` steps
and at each epoch's end) and ``final.json``. ``--resume`` continues from ``checkpoint.pt`` mid-epoch:
the RNG states, the sampler's epoch and the number of batches already consumed are restored, so with
``workers=0`` on a CPU a killed and resumed run ends bit-identical to an uninterrupted one.

A run folder has one writer: ``<out>/.lock`` is held (``flock``, released by the OS when the process
dies) from before anything is read until the end. A start without ``--resume`` in a folder holding a
run's files is refused, and a resume must match the checkpoint in everything that shapes the schedule
and the data (config, limits, processes). A diverging run stops before its checkpoint is overwritten
(``_DivergenceGuard``). ``python -m mdeq.train`` ends every error in one line (exit code 2 for bad
input, 1 for a fault; ``--traceback`` or ``MDEQ_TRACEBACK=1`` shows the stack).

    python -m mdeq.train --config cifar10_tiny_smoke --data-root data/synthetic_cifar10 --synthetic \\
        --out runs/smoke --set train.epochs=2 --limit-train 256
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import random
import shlex
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

from mdeq.engine import allocator, distributed, paths, progress
from mdeq.engine.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, load_pretrained, restore_rng_state,
                             save_checkpoint, unwrap_model)
from mdeq.core.config import ConfigError, ExperimentConfig, TrainConfig, config_from_dict, config_to_dict, load_config
from mdeq.engine.distributed import DistInfo, log
from mdeq.engine.metrics import IGNORE_INDEX, ConfusionMatrix, MetricLogger, PeakMemory, SmoothedValue, topk_correct
from mdeq.core.model import build_model, upsample_logits
from mdeq.engine.runlog import (CHECKPOINT_NAME, LOCK_NAME, RUN_FILES, append_epoch, append_jsonl, chunk_end, chunk_start,
                         final_record, git_commit, plain, provenance, sweep_temp_files, trim_logs, write_json_atomic)

__all__ = ["RunOptions", "TrainState", "main", "cli", "train_one_epoch", "evaluate", "train_step",
           "build_optimizer", "build_scheduler", "build_criterion", "set_phase", "solver_stats", "ResumableSampler",
           "resolve_device", "RunFolderInUse", "DivergenceError", "jacobian_weight", "jacobian_draw",
           "training_objective"]

TRACEBACK_ENV = "MDEQ_TRACEBACK"  # set to 1: python -m mdeq.train prints the stack with an error
_STEP_METERS = ("loss", "acc", "nfe_forward", "nfe_backward", "rel_residual_forward", "abs_residual_forward",
                "converged_forward", "rel_residual_backward", "converged_backward", "step_time_ms")


@dataclass(frozen=True)
class RunOptions:
    """How to run an experiment (not what it is: that is the config).

    out_dir: run folder for logs, checkpoints and results. data_root: data set folder (default
    ``data/<dataset>``, or ``data/synthetic_<dataset>`` with ``synthetic``). device: "auto", "cpu",
    "cuda" (under torchrun: ``cuda:LOCAL_RANK``). amp / amp_dtype: autocast ("auto": float16 on CUDA,
    bfloat16 on CPU). log_every: steps between ``steps.jsonl`` records. checkpoint_every: steps between
    checkpoints (0: only at epoch ends). max_steps: stop after this many optimiser steps in all (smoke
    runs). limit_train / limit_eval: use the first N samples of each split. data_options: extra keyword
    options for the data set builder (e.g. ``{"base_size": 256}`` for a synthetic Cityscapes copy).
    baseline_options: keyword options of the baseline's builder (e.g. ``{"width": 4}``; smoke runs).
    threads: ``torch.set_num_threads`` for the run. progress: a progress bar per epoch (None: on a terminal or in a notebook; ``mdeq.engine.progress``).
    stop_at: a wall-clock time (``time.time()``) by which the run writes a checkpoint and exits, without
    starting a step or an evaluation that would not end in time (chunked training, ``mdeq.campaign``).
    divergence_factor / max_param_abs: the run stops as diverged when a step's loss exceeds this many
    times its reference loss, or a parameter this magnitude (None: no such check; a non-finite loss or
    parameter always stops it); see ``_DivergenceGuard``. channels_last: feed images (and so the solver
    state) channels_last (None: on a CPU; float64 results equal the contiguous ones, float32 ones to
    rounding). compile: ``torch.compile`` f for the no-grad forward solve (``ImplicitLayer``'s
    ``compile_forward``; up to a minute of compiling per batch shape and mode). On the project's 2-core
    CPU neither changed the MDEQ-small step at batch 128 beyond the +-8 % noise
    (``benchmarks/train_step_profile.py``, README "Where a training step's time goes").
    keep_freed_memory: on a CPU run, keep freed memory in the process for reuse (``mdeq.engine.allocator``: no
    page faults on every new tensor; the numbers do not change, the process keeps its peak memory;
    None: on for CPU runs, for the rest of the process).
    """

    out_dir: str | Path
    data_root: str | Path | None = None
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "auto"
    workers: int = 4
    log_every: int = 50
    checkpoint_every: int = 1000
    resume: bool = False
    max_steps: int | None = None
    baseline: str | None = None
    synthetic: bool = False
    limit_train: int | None = None
    limit_eval: int | None = None
    data_options: Mapping[str, Any] = field(default_factory=dict)
    baseline_options: Mapping[str, Any] = field(default_factory=dict)
    deterministic: bool = False
    threads: int | None = None
    progress: bool | None = None
    find_unused_parameters: bool = False
    command: str | None = None
    stop_at: float | None = None
    divergence_factor: float | None = 100.0
    max_param_abs: float | None = 1e6
    channels_last: bool | None = None
    compile: bool = False
    keep_freed_memory: bool | None = None

    def __post_init__(self) -> None:
        if self.amp_dtype not in ("auto", "float16", "bfloat16"):
            raise ValueError(f"amp_dtype must be 'auto', 'float16' or 'bfloat16', got {self.amp_dtype!r}")
        for name in ("workers", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.baseline_options and self.baseline is None:
            raise ValueError(f"baseline_options {dict(self.baseline_options)} need a baseline (--baseline NAME)")
        for name in ("max_steps", "limit_train", "limit_eval", "threads"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be None or >= 1, got {v}")
        for name in ("divergence_factor", "max_param_abs"):
            v = getattr(self, name)
            if v is not None and not (v > 1 and math.isfinite(v)):
                raise ValueError(f"{name} must be None or a finite number > 1, got {v}")


@dataclass
class TrainState:
    """Where training stands: ``epoch`` is the epoch in progress, ``step_in_epoch`` the batches of it done."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best: dict | None = None  # best evaluation-set figure so far (reported beside the final one, never used)
    last_eval: dict | None = None  # the latest evaluation (the final figure once training is over)
    meters: dict = field(default_factory=dict)  # {name: (count, total)} of the epoch in progress
    epoch_seconds: float = 0.0  # wall-clock seconds of training the epoch in progress, over all its chunks
    stopped: str | None = None  # why this process stopped before the run's end ("stop_at", "SIGTERM")
    loss_reference: tuple = (0, 0.0)  # (count, sum) of the run's first losses (_DivergenceGuard)
    checkpoint_step: int | None = None  # the global step of the checkpoint on disk, if any


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder's lock: two writers would interleave or delete each other's records."""


class DivergenceError(FloatingPointError):
    """Training diverged (loss or parameters far beyond a healthy run's); the last checkpoint is kept."""


class _DivergenceGuard:
    """Stops a diverging run before diverged weights overwrite the last good checkpoint.

    Why: a non-finite loss was the only check, so Adam at lr 1e6 trained to the end at a loss of 1e6 with
    weights of 6e29. The bounds are far from any healthy run: a step's loss above ``factor`` times the
    run's reference loss (the mean of its first ``REFERENCE_STEPS`` losses, and at least ln(num_classes),
    the loss of a uniform prediction), or a parameter above ``max_param_abs`` in magnitude or not finite.
    The loss is checked every step, the parameters on logged steps, before an evaluation and before
    every checkpoint.
    """

    REFERENCE_STEPS = 20

    def __init__(self, factor: float | None, max_param_abs: float | None, num_classes: int, ckpt_path: Path):
        self.factor, self.max_param_abs, self.ckpt_path = factor, max_param_abs, ckpt_path
        self.floor = math.log(max(2, num_classes))

    def reference(self, state: TrainState) -> float:
        n, total = state.loss_reference
        return max(total / n if n else 0.0, self.floor)

    def check_loss(self, loss: float, state: TrainState) -> None:
        """Call with each finite training loss, before the step is counted."""
        ref = self.reference(state)
        if self.factor is not None and loss > self.factor * ref:
            raise DivergenceError(
                f"training diverged at step {state.global_step + 1} (epoch {state.epoch}): loss {loss:.4g} is more "
                f"than {self.factor:g}x the run's reference loss {ref:.4g}; {self.kept(state)}; lower train.lr, "
                f"or pass --divergence-factor with a larger bound")
        n, total = state.loss_reference
        if n < self.REFERENCE_STEPS:
            state.loss_reference = (n + 1, total + loss)

    def check_parameters(self, model: nn.Module, state: TrainState) -> None:
        peaks = [p.detach().abs().max().float() for p in model.parameters() if p.numel()]
        if not peaks:
            return
        peak = torch.stack(peaks).max().item()
        if not math.isfinite(peak) or (self.max_param_abs is not None and peak > self.max_param_abs):
            bound = "not finite" if not math.isfinite(peak) else f"above the bound {self.max_param_abs:g}"
            raise DivergenceError(
                f"training diverged by step {state.global_step} (epoch {state.epoch}): a parameter is {peak:.4g} "
                f"({bound}); {self.kept(state)}; lower train.lr, or pass --max-param-abs with a larger bound")

    def kept(self, state: TrainState) -> str:
        if state.checkpoint_step is None:
            return "no checkpoint was written"
        return f"the checkpoint {self.ckpt_path} (step {state.checkpoint_step}) is kept"


class _StopRule:
    """When a chunk must end: before a step or an evaluation that would pass ``stop_at``, or after a signal.

    SIGTERM and SIGINT (single process only) ask for a clean stop at the next step: a checkpoint is
    written and the process exits; a second SIGINT interrupts at once.
    """

    def __init__(self, stop_at: float | None):
        self.stop_at = stop_at
        self.signal: str | None = None
        self.step_s = 0.0        # running estimate of one training step
        self.eval_s: float | None = None  # the last evaluation's duration in this process

    def observe_step(self, seconds: float) -> None:
        self.step_s = seconds if self.step_s == 0.0 else max(seconds, 0.8 * self.step_s + 0.2 * seconds)

    def reason(self, upcoming_s: float) -> str | None:
        if self.signal is not None:
            return self.signal
        if self.stop_at is not None and time.time() + upcoming_s > self.stop_at:
            return "stop_at"
        return None

    @contextlib.contextmanager
    def signals(self, enabled: bool):
        if not enabled or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.signal = name
            log(f"{name}: stopping at the next step with a checkpoint (SIGINT again to interrupt at once)")

        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)


# ----------------------------------------------------------------------------------------------
# Building blocks.

def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """Table 4: torch Adam (betas 0.9/0.999, L2-coupled weight decay) or SGD (momentum, Nesterov)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, betas=(0.9, 0.999), weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay,
                               nesterov=t.nesterov)
    raise ConfigError(f"train.optimizer must be 'adam' or 'sgd', got {t.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig, iterations_per_epoch: int):
    """Cosine annealing to ``eta_min`` over all iterations, stepped once per optimiser step, no warm-up."""
    if t.schedule != "cosine":
        raise ConfigError(f"train.schedule must be 'cosine', got {t.schedule!r}")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iterations_per_epoch * t.epochs),
                                                      eta_min=t.eta_min)


class SegmentationLoss(nn.Module):
    """Class-weighted cross-entropy, ignore 255, on logits upsampled (bilinear, align_corners=True) to the labels."""

    def __init__(self, weight: torch.Tensor | None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = upsample_logits(logits, target.shape[-2:])
        return F.cross_entropy(logits.float(), target, weight=self.weight, ignore_index=self.ignore_index)


def build_criterion(cfg: ExperimentConfig) -> nn.Module:
    """Cross-entropy; for segmentation weighted by ``data.class_weights``, ignore index 255 (as HRNet-Seg)."""
    if cfg.model.head == "segmentation":
        w = cfg.data.class_weights
        return SegmentationLoss(None if w is None else torch.tensor(w, dtype=torch.float32))
    return nn.CrossEntropyLoss()


def set_phase(model: nn.Module, cfg: ExperimentConfig, global_step: int) -> str:
    """Choose the gradient mode for the step about to run: "unrolled" during the warm-up, else "implicit".

    Returns "none" for models without an implicit layer (the baselines).
    """
    core = unwrap_model(model)
    phase = _phase_at(core, cfg, global_step)
    if phase != "none":
        core.deq.grad = "unrolled" if phase == "unrolled" else cfg.solver.grad
    return phase


def _phase_at(core: nn.Module, cfg: ExperimentConfig, global_step: int) -> str:
    if getattr(core, "deq", None) is None:
        return "none"
    return "unrolled" if global_step < cfg.train.pretrain_steps else "implicit"


def solver_stats(core: nn.Module) -> dict[str, float]:
    """NFE and residuals of the last forward (and backward, once it ran), as plain numbers."""
    out: dict[str, float] = {}
    info = getattr(core, "last_info", None)
    if info is not None:
        out["nfe_forward"] = float(info.nfe_forward)
        fwd = info.forward
        if fwd is not None:
            out["rel_residual_forward"] = float(fwd.rel_lowest.float().mean())
            out["abs_residual_forward"] = float(fwd.abs_lowest.float().mean())
            out["converged_forward"] = float(fwd.converged.float().mean())
        elif info.unrolled_rel_residual is not None:
            out["rel_residual_forward"] = float(info.unrolled_rel_residual.float().mean())
        bwd = info.backward
        if bwd is not None:
            out["nfe_backward"] = float(bwd.nfe)
            out["rel_residual_backward"] = float(bwd.rel_lowest.float().mean())
            out["converged_backward"] = float(bwd.converged.float().mean())
        if info.jacobian_loss is not None:  # the Jacobian penalty was computed in this call
            out["jac_reg_loss"] = float(info.jacobian_loss.detach())
    elif hasattr(core, "nfe_forward"):  # the Neural ODE baselines
        out["nfe_forward"] = float(core.nfe_forward)
        nfe_b = getattr(core, "nfe_backward", None)
        if nfe_b is not None:
            out["nfe_backward"] = float(nfe_b)
    return out


def jacobian_weight(t: TrainConfig, global_step: int, epoch: int) -> float:
    """The Jacobian penalty's weight at optimiser step ``global_step`` of epoch ``epoch`` (0: not applied).

    As locuslab/deq ``MDEQ-Vision/lib/core/cls_function.py``: ``jac_reg_pretrain_weight`` during the unrolled
    warm-up; after it 0 from epoch ``jac_reg_stop_epoch`` on, else ``jac_reg_weight`` plus ``jac_reg_step`` for
    every ``jac_reg_step_every`` steps since the warm-up ended.
    """
    deq_steps = global_step - t.pretrain_steps
    if deq_steps < 0:
        return t.jac_reg_pretrain_weight
    if t.jac_reg_stop_epoch is not None and epoch >= t.jac_reg_stop_epoch:
        return 0.0
    ramps = deq_steps // t.jac_reg_step_every if t.jac_reg_step_every else 0
    return t.jac_reg_weight + t.jac_reg_step * ramps


def jacobian_draw(t: TrainConfig, global_step: int) -> tuple[bool, int]:
    """Whether the Jacobian penalty is drawn for step ``global_step`` (probability ``jac_reg_freq``), and the
    seed of its probes.

    Why a generator of its own, seeded by (``train.seed``, step): the released code draws from the global
    stream, so turning the penalty on would change every later dropout mask and data order; here those stay
    as in a run without it, a resumed run draws the same, and every DDP process draws the same.
    """
    g = torch.Generator().manual_seed((t.seed * 1_000_003 + global_step) % (2 ** 63))
    applied = float(torch.rand((), generator=g)) < t.jac_reg_freq
    return applied, int(torch.randint(0, 2 ** 62, (), generator=g))


def training_objective(core: nn.Module, criterion: nn.Module, loss: torch.Tensor, targets: torch.Tensor, *,
                       jac_weight: float = 0.0, correction_gamma: float = 0.8) -> torch.Tensor:
    """What a step backpropagates: ``loss`` (the task loss at the returned state) plus, when they are on,
    fixed-point correction's losses at earlier solver states and the weighted Jacobian penalty.

    With n supervised states the k-th of the n - 1 earlier ones (earliest first, ``core.last_correction_logits``)
    weighs ``correction_gamma ** (n - 1 - k)`` and z* weighs 1: torchdeq ``loss/correction.py``'s 'exp'
    weighting, as DEQ flow uses it. The Jacobian term is added only when this step's forward computed it
    (``core.last_info.jacobian_loss``). With both off this returns ``loss`` itself.
    """
    objective = loss
    extra = getattr(core, "last_correction_logits", None)
    if extra:
        n = len(extra) + 1
        for k, logits in enumerate(extra):
            objective = objective + correction_gamma ** (n - 1 - k) * criterion(logits, targets)
    info = getattr(core, "last_info", None)
    if jac_weight > 0 and info is not None and info.jacobian_loss is not None:
        objective = objective + jac_weight * info.jacobian_loss
    return objective


def _batch_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy (%) of a batch, or pixel accuracy (%) over non-ignored pixels for segmentation."""
    with torch.no_grad():
        if target.dim() == 1:
            return 100.0 * topk_correct(logits, target, (1,))[0] / max(1, target.numel())
        pred = upsample_logits(logits, target.shape[-2:]).argmax(1)
        valid = target != IGNORE_INDEX
        return 100.0 * float((pred.eq(target) & valid).sum()) / max(1, int(valid.sum()))


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, targets: torch.Tensor, *, scaler: torch.amp.GradScaler | None = None,
               autocast: contextlib.AbstractContextManager | None = None, jac_weight: float = 0.0,
               correction_gamma: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward, backward and optimiser step; returns (detached loss, detached logits).

    The loss returned is the task loss at the returned state; the backward runs on ``training_objective``
    (the same tensor unless fixed-point correction or a Jacobian penalty requested by the caller through
    ``model.deq.jacobian_probes`` is on). The scheduler is stepped by the caller. With DDP the gradient
    all-reduce happens inside backward. The backward computes gradients only for the optimiser's
    parameters (``gradient_inputs``).
    """
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = model(images)
        loss = criterion(logits, targets)
        objective = training_objective(unwrap_model(model), criterion, loss, targets, jac_weight=jac_weight,
                                       correction_gamma=correction_gamma)
    optimizer.zero_grad(set_to_none=True)
    inputs = gradient_inputs(optimizer)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(objective).backward(inputs=inputs)
        scaler.step(optimizer)
        scaler.update()
    else:
        objective.backward(inputs=inputs)
        optimizer.step()
    return loss.detach(), logits.detach()


def gradient_inputs(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors a training step's backward must reach: the optimiser's parameters that require grad.

    Why not every leaf: the IFT layer's f(z*) call takes z* as a leaf that requires grad (its VJPs
    need it), so a plain ``backward()`` also computes dL/dz* through f, one conv input-gradient per
    scale, and throws it away. Naming the inputs prunes that branch (``benchmarks/final_backward.py``);
    the parameter gradients are the same bits.
    """
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Data.

class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that can start an epoch after its first ``skip`` samples.

    Why: the order of an epoch is a function of (seed, epoch) only, so a resumed run skips exactly the
    batches the killed run consumed. Works in one process too (num_replicas=1, rank=0).
    """

    def __init__(self, dataset: Dataset, *, num_replicas: int, rank: int, seed: int, shuffle: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        if not 0 <= skip <= self.num_samples:
            raise ValueError(f"skip must be in [0, {self.num_samples}], got {skip}")
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class _ShardSampler(Sampler):
    """Indices rank, rank + W, ...: every evaluation sample exactly once over all processes (no padding)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _data_root(cfg: ExperimentConfig, options: RunOptions) -> Path:
    if options.data_root is not None:
        return Path(options.data_root)
    name = f"synthetic_{cfg.data.dataset}" if options.synthetic else cfg.data.dataset
    return paths.DATA / name


def _builder_options(cfg: ExperimentConfig, split: str) -> dict[str, Any]:
    d = cfg.data
    if d.dataset == "cifar10":
        return {"augment": d.augment}
    if d.dataset == "imagenet":
        size = d.image_size if split == "train" else d.eval_image_size
        if size[0] != size[1]:
            raise ConfigError(f"ImageNet crops are square; data.{'image_size' if split == 'train' else 'eval_image_size'} "
                              f"is {list(size)}")
        return {"augment": d.augment, "image_size": size[0]}
    return {"augment": d.augment, "crop_size": tuple(d.image_size)}


def _build_datasets(cfg: ExperimentConfig, options: RunOptions, dist_info: DistInfo) -> tuple[Dataset, Dataset, str]:
    from mdeq.engine.data import build_dataset  # the data package is imported lazily: it pulls in PIL etc.

    root = _data_root(cfg, options)
    if options.synthetic and (not root.exists() or not any(root.iterdir())):
        if dist_info.is_main:
            from mdeq.engine.data.synthetic import make_synthetic

            log(f"writing a synthetic {cfg.data.dataset} copy to {root}")
            make_synthetic(cfg.data.dataset, root)
        distributed.barrier()
    sets = {}
    for split in ("train", "val"):
        opts = {**_builder_options(cfg, split), **dict(options.data_options)}
        sets[split] = build_dataset(cfg.data.dataset, root, split, **opts)
    train_set, eval_set = sets["train"], sets["val"]
    source_label = getattr(train_set, "source_label", "unknown")
    n_classes = getattr(train_set, "num_classes", None)
    if n_classes is not None and n_classes > cfg.data.num_classes:
        raise ConfigError(f"the data set at {root} has {n_classes} classes but data.num_classes is "
                          f"{cfg.data.num_classes}")
    if options.limit_train is not None:
        train_set = Subset(train_set, range(min(options.limit_train, len(train_set))))
    if options.limit_eval is not None:
        eval_set = Subset(eval_set, range(min(options.limit_eval, len(eval_set))))
    return train_set, eval_set, source_label


def _loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the DataLoader's worker base seed, so creating an epoch's iterator never touches torch's global RNG."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63))


def _per_rank(batch: int, world: int, what: str, exact: bool) -> int:
    if exact and batch % world:
        raise ConfigError(f"{what} = {batch} (the global batch) must be divisible by the number of processes ({world})")
    return max(1, math.ceil(batch / world))


# ----------------------------------------------------------------------------------------------
# One epoch, evaluation.

@dataclass
class _Context:
    """What ``train_one_epoch`` needs besides the model and data (kept together to keep signatures short)."""

    cfg: ExperimentConfig
    options: RunOptions
    out_dir: Path
    device: torch.device
    dist: DistInfo
    autocast: Any
    scaler: torch.amp.GradScaler
    memory: PeakMemory
    iterations_per_epoch: int
    save: Any  # callable(state) -> None, writes the checkpoint (rank 0)
    stop: _StopRule = field(default_factory=lambda: _StopRule(None))
    guard: _DivergenceGuard | None = None
    memory_format: torch.memory_format = torch.contiguous_format


def _memory_format(device: torch.device, options: RunOptions) -> torch.memory_format:
    on = device.type == "cpu" if options.channels_last is None else options.channels_last
    return torch.channels_last if on else torch.contiguous_format


def _autocast(device: torch.device, options: RunOptions):
    dtype = _amp_dtype(device, options)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=options.amp)


def _amp_dtype(device: torch.device, options: RunOptions) -> torch.dtype:
    if options.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return getattr(torch, options.amp_dtype)


def _request_jacobian(core: nn.Module, t: TrainConfig, state: TrainState) -> float:
    """Ask the implicit layer for the Jacobian penalty in the coming step if the schedule and the draw say so;
    returns its weight (0: not this step). The layer's request is cleared after the step."""
    if not t.jac_reg or getattr(core, "deq", None) is None:
        return 0.0
    weight = jacobian_weight(t, state.global_step, state.epoch)
    applied, seed = jacobian_draw(t, state.global_step)
    if not (applied and weight > 0):
        return 0.0
    core.deq.jacobian_probes, core.deq.jacobian_seed = t.jac_reg_probes, seed
    return weight


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    loader: DataLoader, state: TrainState, ctx: _Context) -> MetricLogger:
    """Run the rest of epoch ``state.epoch`` (from batch ``state.step_in_epoch``); returns the epoch's meters.

    Each step picks the phase from the global step, steps the scheduler, records NFE and residuals,
    appends to ``steps.jsonl`` every ``log_every`` steps and checkpoints every ``checkpoint_every`` steps.
    Stops early when ``options.max_steps`` is reached.
    """
    cfg, options, device = ctx.cfg, ctx.options, ctx.device
    core = unwrap_model(model)
    model.train()
    if hasattr(core, "deq"):
        core.deq.warn = False  # non-convergence is logged as data (converged_*), not warned every step
    meters = MetricLogger()
    t_start, before = time.perf_counter(), state.epoch_seconds  # before: this epoch's earlier chunks

    def keep_epoch_so_far() -> None:  # what a checkpoint of a part-trained epoch carries over a resume
        state.meters = {n: (m.count, m.total) for n, m in meters.meters.items()}
        state.epoch_seconds = before + time.perf_counter() - t_start

    for name, (count, total) in state.meters.items():  # the part of this epoch done before a resume
        meters.meters[name] = SmoothedValue(meters.window_size)
        meters.meters[name].count, meters.meters[name].total = int(count), float(total)
    bar = progress.bar(total=ctx.iterations_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch}",
                       show=options.progress if ctx.dist.is_main else False, leave=False)
    steps_path = ctx.out_dir / "steps.jsonl"
    batches = iter(loader)
    while True:
        reason = ctx.stop.reason(1.5 * ctx.stop.step_s)
        if reason is not None:  # before the next batch is drawn: the same state as a checkpoint after a step
            keep_epoch_so_far()
            ctx.save(state)
            state.stopped = reason
            break
        try:
            images, targets = next(batches)
        except StopIteration:
            break
        phase = set_phase(model, cfg, state.global_step)
        if phase == "implicit" and state.global_step == cfg.train.pretrain_steps and cfg.train.pretrain_steps > 0:
            log(f"step {state.global_step}: unrolled warm-up done, switching to the implicit solve "
                f"(grad={cfg.solver.grad})")
            if device.type == "cuda":
                torch.cuda.empty_cache()  # as the released code does at the switch
        log_now = (state.global_step + 1) % options.log_every == 0 or state.global_step == 0
        if hasattr(core, "deq"):
            core.deq.measure_unrolled = log_now  # one extra f call, only on logged steps
        jac_weight = _request_jacobian(core, cfg.train, state)
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        images = images.to(device, non_blocking=True, memory_format=ctx.memory_format)
        targets = targets.to(device, non_blocking=True)
        loss, logits = train_step(model, criterion, optimizer, images, targets, scaler=ctx.scaler,
                                  autocast=ctx.autocast, jac_weight=jac_weight,
                                  correction_gamma=cfg.solver.correction_gamma)
        if jac_weight:
            core.deq.jacobian_probes = 0
        scheduler.step()
        loss_value = loss.item()  # synchronises the device, so the step time below is complete
        step_ms = 1000.0 * (time.perf_counter() - t0)
        ctx.stop.observe_step(step_ms / 1000.0)
        if not math.isfinite(loss_value):
            kept = (ctx.guard.kept(state) if ctx.guard is not None
                    else f"last checkpoint: {ctx.out_dir / CHECKPOINT_NAME}")
            raise FloatingPointError(f"non-finite training loss {loss_value} at step {state.global_step} "
                                     f"(epoch {state.epoch}, phase {phase}); {kept}")
        if ctx.guard is not None:
            ctx.guard.check_loss(loss_value, state)
        state.global_step += 1
        state.step_in_epoch += 1
        if log_now and ctx.guard is not None:
            ctx.guard.check_parameters(core, state)
        stats = solver_stats(core)
        if cfg.train.jac_reg:
            stats.update(jac_reg_applied=float(jac_weight > 0), jac_reg_weight=jac_weight)
        acc = _batch_accuracy(logits, targets)
        meters.update(n=images.shape[0], loss=loss_value, acc=acc)
        meters.update(step_time_ms=step_ms, **stats)
        bar.update(1)
        if bar.disable is False:
            bar.set_postfix(loss=f"{loss_value:.3f}", phase=phase, nfe=stats.get("nfe_forward", float("nan")))
        if log_now and ctx.dist.is_main:
            record = {"step": state.global_step, "epoch": state.epoch, "iter": state.step_in_epoch, "phase": phase,
                      "loss": loss_value, "acc": acc, "lr": lr, **stats, "step_time_ms": step_ms,
                      "peak_mem_mb": ctx.memory.peak_mb(), "mem_kind": ctx.memory.kind}
            append_jsonl(steps_path, record)
            if bar.disable:
                log(f"epoch {state.epoch} [{state.step_in_epoch}/{ctx.iterations_per_epoch}] step {state.global_step} "
                    f"{phase} loss {loss_value:.4f} acc {acc:.1f} lr {lr:.3g} nfe {stats.get('nfe_forward', 0):.0f}"
                    f"/{stats.get('nfe_backward', 0):.0f} rel {stats.get('rel_residual_forward', float('nan')):.3g} "
                    f"{step_ms:.0f} ms" + (f" jac {stats['jac_reg_loss']:.3g}" if "jac_reg_loss" in stats else ""))
        done = options.max_steps is not None and state.global_step >= options.max_steps
        end_of_epoch = state.step_in_epoch >= ctx.iterations_per_epoch
        if (options.checkpoint_every and state.global_step % options.checkpoint_every == 0
                and not end_of_epoch and not done):
            keep_epoch_so_far()
            ctx.save(state)
        if done:
            break
    bar.close()
    state.epoch_seconds = before + time.perf_counter() - t_start
    return meters


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *, num_classes: int, device: torch.device,
             criterion: nn.Module | None = None, autocast=None, equilibrium: bool = True,
             memory_format: torch.memory_format = torch.contiguous_format,
             spectral_radius_iters: int = 0) -> dict[str, Any]:
    """Evaluate on this process's shard and reduce over processes.

    Classification: ``top1``, ``top5`` (%), ``loss``; segmentation: ``miou`` (fraction), ``pixel_acc`` (%),
    ``iou`` per class, ``loss``. Also ``nfe_forward`` and ``rel_residual_forward`` (means over batches), and
    with ``spectral_radius_iters`` > 0 ``spectral_radius``: the batch mean of the power-method estimate of
    rho(J_f(z*)) on each process's first batch (averaged over processes).
    With ``equilibrium`` (the default) the implicit layer solves for the equilibrium even if the
    warm-up mode is set (released old code); ``equilibrium=False`` evaluates a model trained only as
    a weight-tied unrolled stack (``solver.grad: unrolled``, Table 2's unrolled row) as that stack.
    """
    core = unwrap_model(model)
    was_training = core.training
    core.eval()
    deq = getattr(core, "deq", None)
    old_grad = deq.grad if deq is not None else None
    if deq is not None and old_grad == "unrolled" and equilibrium:
        deq.grad = "ift"  # under no_grad every implicit mode returns z*
    confusion = None
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss*n, n, top1, top5, batches
    solver = torch.zeros(3, dtype=torch.float64, device=device)  # nfe, rel residual, batches with a solve
    radius = torch.zeros(2, dtype=torch.float64, device=device)  # sum of batch means, batches
    sr_iters = spectral_radius_iters if deq is not None else 0
    pending = bool(sr_iters)  # the power method runs on the first batch only
    try:
        for images, targets in loader:
            if deq is not None:
                deq.spectral_radius_iters = sr_iters if pending else 0
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            targets = targets.to(device, non_blocking=True)
            with autocast if autocast is not None else contextlib.nullcontext():
                logits = core(images)
                loss = criterion(logits, targets) if criterion is not None else None
            n = targets.shape[0]
            if loss is not None:
                sums[0] += float(loss) * n
            sums[1] += n
            sums[4] += 1
            if targets.dim() == 1:
                c1, c5 = topk_correct(logits.float(), targets, (1, 5))
                sums[2] += c1
                sums[3] += c5
            else:
                if confusion is None:
                    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
                pred = upsample_logits(logits.float(), targets.shape[-2:]).argmax(1)
                confusion.update(targets, pred)
            st = solver_stats(core)
            if "nfe_forward" in st:
                solver[0] += st["nfe_forward"]
                solver[1] += st.get("rel_residual_forward", 0.0)
                solver[2] += 1
            info = getattr(core, "last_info", None)
            if pending and info is not None and info.spectral_radius is not None:
                radius[0] += float(info.spectral_radius.mean())
                radius[1] += 1
                pending = False
    finally:
        if deq is not None:
            deq.grad = old_grad
            deq.spectral_radius_iters = 0
        core.train(was_training)
    distributed.all_reduce_sum(sums)
    distributed.all_reduce_sum(solver)
    n = max(sums[1].item(), 1.0)
    result: dict[str, Any] = {"samples": int(sums[1].item()),
                              "loss": sums[0].item() / n if criterion is not None else math.nan}
    if solver[2] > 0:
        result["nfe_forward"] = solver[0].item() / solver[2].item()
        result["rel_residual_forward"] = solver[1].item() / solver[2].item()
    if sr_iters:
        distributed.all_reduce_sum(radius)
        if radius[1] > 0:
            result["spectral_radius"] = radius[0].item() / radius[1].item()
    segmentation = confusion is not None
    if distributed.get_world_size() > 1:  # every process must take part in the same reductions
        flag = torch.tensor([1.0 if confusion is not None else 0.0], device=device)
        segmentation = distributed.all_reduce_sum(flag).item() > 0
    if segmentation:
        if confusion is None:
            confusion = ConfusionMatrix(num_classes, IGNORE_INDEX)
        confusion.ensure(device)
        confusion.reduce_from_all_processes()
        r = confusion.compute()
        result.update(miou=r["miou"], pixel_acc=r["pixel_acc"], iou=r["iou"])
    else:
        result.update(top1=100.0 * sums[2].item() / n, top5=100.0 * sums[3].item() / n)
    return result


# ----------------------------------------------------------------------------------------------
# The run folder.

@contextlib.contextmanager
def _run_folder_lock(out_dir: Path):
    """One writer per run folder: an exclusive ``flock`` on ``<out>/.lock`` that names its holder.

    The OS releases the lock when the process ends, however it ends, so a killed run never blocks its
    own resume; the file itself stays (removing it would let two processes lock two different files).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown (it has not written its pid yet)"
        fh.close()
        raise RunFolderInUse(f"{out_dir} is in use: process {holder} holds {path}; wait for that run to end "
                             f"(or stop it), or choose another output folder") from None
    try:
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        yield
    finally:
        fh.close()  # releases the lock


def _resume_hint(options: RunOptions) -> str:
    """The command that continues this run: the same one, with ``--resume`` and without ``--stop-at``."""
    if options.command is None or not options.command.startswith("python -m mdeq.train "):
        return "the same command with --resume (RunOptions.resume=True)"
    argv = shlex.split(options.command)
    out = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--stop-at":
            skip = True
        elif not arg.startswith("--stop-at="):
            out.append(arg)
    return shlex.join(out if "--resume" in out else [*out, "--resume"])


# ----------------------------------------------------------------------------------------------
# main.

def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The one device rule: "auto" is CUDA where there is one, else the CPU; bare "cuda" is ``cuda:local_rank``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was requested but torch.cuda.is_available() is False")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}")
    return device


def _build_network(cfg: ExperimentConfig, options: RunOptions) -> nn.Module:
    if options.baseline is not None:
        from mdeq.engine.baselines import build_baseline

        if cfg.model.head != "classification":
            raise ConfigError(f"baseline {options.baseline!r} is a classifier; config {cfg.name!r} is "
                              f"{cfg.model.head}")
        return build_baseline(options.baseline, num_classes=cfg.data.num_classes, **options.baseline_options)
    return build_model(cfg)


def _check_baseline(name: str | None) -> None:
    if name is None:
        return
    from mdeq.engine.baselines import BASELINES

    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")


def _with_defaults(saved: Mapping) -> Mapping:
    """A checkpoint's config with the fields added since it was written at their defaults (their defaults are
    the behaviour it was trained with, e.g. the stability options, off); as written if it no longer loads."""
    try:
        return config_to_dict(config_from_dict(saved))
    except (ConfigError, TypeError):
        return saved


def _config_diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r} vs now {vb!r}")
    return out


def _run_shape(options: RunOptions, world: int, train_set, eval_set, iterations_per_epoch: int,
               source_label: str) -> dict[str, Any]:
    """What shapes the schedule and the data besides the config; a resumed run must match it."""
    return {"limit_train": options.limit_train, "limit_eval": options.limit_eval, "world_size": world,
            "train_samples": len(train_set), "eval_samples": len(eval_set),
            "iterations_per_epoch": iterations_per_epoch, "data_source_label": source_label,
            "data_options": plain(dict(options.data_options)),
            "baseline_options": plain(dict(options.baseline_options))}


def _shape_diff(ckpt: Mapping[str, Any], shape: Mapping[str, Any], scheduler) -> list[str]:
    """How this run's schedule and data differ from the checkpoint's (checkpoints without "run": what they hold)."""
    names = {"limit_train": "--limit-train", "limit_eval": "--limit-eval", "world_size": "processes",
             "train_samples": "training samples", "eval_samples": "evaluation samples",
             "iterations_per_epoch": "iterations per epoch", "data_source_label": "data",
             "data_options": "--data-option", "baseline_options": "--baseline-option"}
    saved = dict(ckpt.get("run") or {})
    saved.setdefault("world_size", ckpt.get("world_size", len(ckpt.get("rng") or [None])))
    out = [f"{names.get(k, k)}: checkpoint {saved[k]!r} vs now {shape[k]!r}"
           for k in shape if k in saved and saved[k] != shape[k]]
    t_max = (ckpt.get("scheduler") or {}).get("T_max")
    if t_max is not None and t_max != scheduler.T_max:
        out.append(f"cosine schedule length (iterations per epoch x train.epochs): checkpoint {t_max} vs now "
                   f"{scheduler.T_max}")
    return out


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def main(cfg: ExperimentConfig, options: RunOptions) -> dict[str, Any]:
    """Train ``cfg`` with ``options``; returns what ``final.json`` holds (on every process).

    Callable from a notebook: ``main(load_config("cifar10_tiny_smoke"), RunOptions(out_dir=...))``.
    """
    _check_baseline(options.baseline)
    if options.baseline is not None and (cfg.train.jac_reg or cfg.train.spectral_radius_every):
        raise ConfigError(f"train.jac_reg_* and train.spectral_radius_every need an implicit layer; the baseline "
                          f"{options.baseline!r} has none")
    dist_info = distributed.init_distributed("cuda" if options.device.startswith("cuda") or
                                             (options.device == "auto" and torch.cuda.is_available()) else "cpu")
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_bench = torch.backends.cudnn.benchmark
    try:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        device = resolve_device(options.device, dist_info.local_rank)
        if options.keep_freed_memory or (options.keep_freed_memory is None and device.type == "cpu"):
            allocator.keep_freed_memory()
        if options.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as the released configs (CUDNN.BENCHMARK true)
        return _main(cfg, options, dist_info, device)
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)
        torch.backends.cudnn.benchmark = old_bench
        distributed.cleanup()


def _main(cfg: ExperimentConfig, options: RunOptions, dist_info: DistInfo, device: torch.device) -> dict:
    """``_run`` holding the run folder's lock (rank 0 writes every file, so rank 0 holds it)."""
    out_dir = Path(options.out_dir)
    if not dist_info.is_main:
        return _run(cfg, options, dist_info, device, out_dir)
    with _run_folder_lock(out_dir):
        swept = sweep_temp_files(out_dir)
        if swept:
            log(f"removed temporary files an earlier writer left in {out_dir}: {', '.join(swept)}")
        return _run(cfg, options, dist_info, device, out_dir)


def _run(cfg: ExperimentConfig, options: RunOptions, dist_info: DistInfo, device: torch.device,
         out_dir: Path) -> dict:
    ckpt_path = out_dir / CHECKPOINT_NAME
    resuming = _resuming(out_dir, options)
    world, rank = dist_info.world_size, dist_info.rank
    batch = _per_rank(cfg.data.batch_size, world, "data.batch_size", exact=True)
    eval_batch = _per_rank(cfg.data.eval_batch_size, world, "data.eval_batch_size", exact=False)
    train_set, eval_set, source_label = _build_datasets(cfg, options, dist_info)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()

    # Model: the same initial weights on every process (DDP also broadcasts rank 0's).
    _seed_all(cfg.train.seed)
    model = _build_network(cfg, options)
    if cfg.train.pretrained and not resuming and options.baseline is None:
        report = load_pretrained(model, cfg.train.pretrained)
        log(f"train.pretrained {cfg.train.pretrained}: {report.summary()}")
    model.to(device)
    if options.compile and hasattr(model, "deq"):
        model.deq.compile_forward = True
    if world > 1 and cfg.model.head == "segmentation":
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log("SyncBatchNorm needs GPUs; on CPU each process normalises with its own batch statistics")
    num_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    core = model
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=options.find_unused_parameters)
    # The training stream (dropout masks, augmentation): a different seed per process.
    _seed_all(cfg.train.seed + 1 + rank)

    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, seed=cfg.train.seed, shuffle=True)
    iterations_per_epoch = math.ceil(sampler.num_samples / batch)
    optimizer = build_optimizer(core, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, iterations_per_epoch)
    criterion = build_criterion(cfg).to(device)
    autocast = _autocast(device, options)
    scaler = torch.amp.GradScaler(device.type, enabled=options.amp and _amp_dtype(device, options) == torch.float16)
    state = TrainState()
    eval_name = ("CIFAR-10 test set (the released code's 'val')" if cfg.data.dataset == "cifar10"
                 else f"{cfg.data.dataset} val")

    guard = _DivergenceGuard(options.divergence_factor, options.max_param_abs, cfg.data.num_classes, ckpt_path)
    shape = _run_shape(options, world, train_set, eval_set, iterations_per_epoch, source_label)

    def save(st: TrainState) -> None:
        guard.check_parameters(core, st)  # never overwrite the last good checkpoint with diverged weights
        rng = capture_rng_state()
        all_rng = [rng]
        if world > 1:
            all_rng = [None] * world
            torch.distributed.all_gather_object(all_rng, rng)
        if dist_info.is_main:
            save_checkpoint(ckpt_path, {
                "model": core.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": st.epoch, "step_in_epoch": st.step_in_epoch, "global_step": st.global_step,
                "best": st.best, "last_eval": plain(st.last_eval), "meters": st.meters,
                "epoch_seconds": st.epoch_seconds, "rng": all_rng,
                "sampler": {"seed": sampler.seed, "epoch": st.epoch, "skip": st.step_in_epoch * batch},
                "config": config_to_dict(cfg), "baseline": options.baseline, "world_size": world,
                "git_commit": git_commit(), "torch": str(torch.__version__),
                "loss_reference": list(st.loss_reference), "run": shape,
            })
        st.checkpoint_step = st.global_step
        distributed.barrier()

    if resuming:
        state = _resume(ckpt_path, cfg, options, shape, core, optimizer, scheduler, scaler, rank)
    if dist_info.is_main:
        _start_logs(out_dir, cfg, options, state, resuming, device, world, data_source_label=source_label,
                    eval_set=eval_name, num_params=num_params)
    if resuming:
        log(f"resumed {ckpt_path}: epoch {state.epoch}, batch {state.step_in_epoch}/{iterations_per_epoch}, "
            f"step {state.global_step}")

    log(f"{cfg.name} ({options.baseline or 'MDEQ'}, {num_params:,} parameters) on {device} x {world}; "
        f"data: {source_label}; {len(train_set)} train / {len(eval_set)} eval samples, "
        f"{iterations_per_epoch} iterations per epoch, warm-up {cfg.train.pretrain_steps} steps; out: {out_dir}")

    eval_loader = DataLoader(eval_set, batch_size=eval_batch, sampler=_ShardSampler(len(eval_set), rank, world),
                             num_workers=options.workers, pin_memory=device.type == "cuda",
                             generator=_loader_generator(cfg.train.seed, -1, rank))
    memory = PeakMemory(device)
    stop = _StopRule(options.stop_at)
    ctx = _Context(cfg, options, out_dir, device, dist_info, autocast, scaler, memory, iterations_per_epoch, save,
                   stop, guard, memory_format=_memory_format(device, options))
    metric = "miou" if cfg.model.head == "segmentation" else "top1"
    try:
        with stop.signals(enabled=world == 1):
            final = _train_epochs(model, core, criterion, optimizer, scheduler, sampler, train_set, eval_loader,
                                  state, ctx, batch, metric, eval_name, source_label)
    except BaseException as err:
        if dist_info.is_main:
            with contextlib.suppress(OSError, ValueError):  # a full disk: the error itself matters more
                _end_chunk(out_dir, state, f"error: {type(err).__name__}: {err}"[:300])
        raise
    if dist_info.is_main:
        _end_chunk(out_dir, state, state.stopped or ("finished" if state.epoch >= cfg.train.epochs else "max_steps"))
    return final


def _resuming(out_dir: Path, options: RunOptions) -> bool:
    """Whether this process continues a run from its checkpoint; a folder holding another run is refused."""
    ckpt_path = out_dir / CHECKPOINT_NAME
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found and not options.resume:
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(found)}): pass --resume "
                              f"(RunOptions.resume=True) to continue it, or choose another output folder")
    resuming = options.resume and ckpt_path.is_file()
    if options.resume and not resuming:
        log(f"--resume: no checkpoint at {ckpt_path}, starting a new run"
            + (f" (its {', '.join(found)} are replaced)" if found else ""))
    return resuming


def _resume(ckpt_path: Path, cfg: ExperimentConfig, options: RunOptions, shape: Mapping[str, Any], core: nn.Module,
            optimizer, scheduler, scaler, rank: int) -> TrainState:
    """Load the checkpoint into model, optimiser, scheduler and scaler, and this process's RNG states.

    Why a check first: a checkpoint written for another config, baseline, schedule or data would
    continue a different run silently (``_config_diff``, ``_shape_diff``).
    """
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    saved, now = _with_defaults(ckpt["config"]), config_to_dict(cfg)
    if options.baseline is not None:  # a baseline reads only the data and train sections
        saved, now = ({k: v for k, v in c.items() if k not in ("model", "solver")} for c in (saved, now))
    diff = _config_diff(saved, now)
    if ckpt.get("baseline") != options.baseline:
        diff.append(f"baseline: checkpoint {ckpt.get('baseline')!r} vs now {options.baseline!r}")
    diff += _shape_diff(ckpt, shape, scheduler)
    if diff:
        raise ConfigError(f"{ckpt_path} was written for another run ({'; '.join(diff)}); resume with the "
                          f"same config and options, or start a new run in another folder")
    core.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(epoch=ckpt["epoch"], step_in_epoch=ckpt["step_in_epoch"], global_step=ckpt["global_step"],
                       best=ckpt.get("best"), last_eval=ckpt.get("last_eval"),
                       meters=dict(ckpt.get("meters") or {}),
                       epoch_seconds=float(ckpt.get("epoch_seconds") or 0.0),
                       loss_reference=tuple(ckpt.get("loss_reference") or (0, 0.0)),
                       checkpoint_step=ckpt["global_step"])
    restore_rng_state(ckpt["rng"][rank])  # _shape_diff: written by as many processes
    return state


def _start_logs(out_dir: Path, cfg: ExperimentConfig, options: RunOptions, state: TrainState, resuming: bool,
                device: torch.device, world: int, **fields: Any) -> None:
    """The run's log files as this process starts (rank 0): a new run's fresh ones, or a resumed run's
    trimmed to its checkpoint, in both cases with a new ``chunks`` entry in provenance.json."""
    chunk = chunk_start(options.command, device, world, step=state.global_step, epoch=state.epoch,
                        step_in_epoch=state.step_in_epoch)
    prov_path = out_dir / "provenance.json"
    if resuming:
        trim_logs(out_dir, state.epoch, state.global_step)
        prov = json.loads(prov_path.read_text()) if prov_path.exists() else {}
        prov.setdefault("chunks", []).append(chunk)
        write_json_atomic(prov_path, prov)
        (out_dir / "final.json").unlink(missing_ok=True)  # the run goes on: an earlier end is stale
        return
    for name in ("steps.jsonl", "metrics.csv", "final.json"):
        (out_dir / name).unlink(missing_ok=True)
    recorded = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dataclasses.asdict(options).items()}
    for key in ("out_dir", "data_root"):  # inside the repository: relative, so a committed log names no machine
        if recorded[key] is not None:
            recorded[key] = paths.rel(recorded[key])
    prov = provenance(options.command or "mdeq.train.main(cfg, options) from Python", device, world_size=world,
                      config=config_to_dict(cfg), baseline=options.baseline, options=plain(recorded), **fields,
                      model_selection="none: the final epoch is reported; the best epoch is shown beside it for "
                                      "reference")
    prov["chunks"] = [chunk]
    write_json_atomic(prov_path, prov)


def _end_chunk(out_dir: Path, state: TrainState, how: str) -> None:
    chunk_end(out_dir, step=state.global_step, epoch=state.epoch, step_in_epoch=state.step_in_epoch, how=how)


def _train_epochs(model, core, criterion, optimizer, scheduler, sampler, train_set, eval_loader, state, ctx,
                  batch, metric, eval_name, source_label) -> dict:
    """Epochs until the last one, ``max_steps`` or a stop (``_StopRule``); returns the final record."""
    cfg, options, device, memory = ctx.cfg, ctx.options, ctx.device, ctx.memory
    iterations_per_epoch, dist_info, out_dir = ctx.iterations_per_epoch, ctx.dist, ctx.out_dir
    autocast, rank = ctx.autocast, dist_info.rank
    partial = state.step_in_epoch > 0
    while state.epoch < cfg.train.epochs:
        if options.max_steps is not None and state.global_step >= options.max_steps:
            break
        epoch = state.epoch
        sampler.set_epoch(epoch, skip=min(state.step_in_epoch * batch, sampler.num_samples))
        loader = DataLoader(train_set, batch_size=batch, sampler=sampler, num_workers=options.workers,
                            pin_memory=device.type == "cuda", drop_last=False,
                            generator=_loader_generator(cfg.train.seed, epoch, rank))
        set_phase(model, cfg, state.global_step)
        phase_start = _phase_at(core, cfg, state.global_step - state.step_in_epoch)  # also after a mid-epoch resume
        memory.reset()
        meters = train_one_epoch(model, criterion, optimizer, scheduler, loader, state, ctx)
        epoch_time = state.epoch_seconds  # also the part trained before a resume
        if state.stopped is None and state.step_in_epoch >= iterations_per_epoch:
            eval_estimate = ctx.stop.eval_s if ctx.stop.eval_s is not None else 0.5 * len(eval_loader) * ctx.stop.step_s
            state.stopped = ctx.stop.reason(1.2 * eval_estimate)
            if state.stopped is not None:  # the epoch is trained; its evaluation runs after the resume
                state.meters = {n: (m.count, m.total) for n, m in meters.meters.items()}
                ctx.save(state)
        if state.stopped is not None:
            log(f"stopped ({state.stopped}) at step {state.global_step}, epoch {state.epoch} batch "
                f"{state.step_in_epoch}/{iterations_per_epoch}; checkpoint {out_dir / CHECKPOINT_NAME} written; "
                f"to continue: {_resume_hint(options)}")
            break
        peak = memory.peak_mb()
        partial = state.step_in_epoch < iterations_per_epoch
        phase_end = _phase_at(core, cfg, max(state.global_step - 1, 0))
        phase = phase_start if phase_start == phase_end else f"{phase_start}->{phase_end}"
        meters.synchronize_between_processes(device, names=_STEP_METERS)
        if ctx.guard is not None:
            ctx.guard.check_parameters(core, state)  # diverged weights are not worth an evaluation
        t_eval = time.perf_counter()
        every = cfg.train.spectral_radius_every
        last_eval = evaluate(model, eval_loader, num_classes=cfg.data.num_classes, device=device,
                             criterion=criterion, autocast=autocast, equilibrium=cfg.solver.grad != "unrolled",
                             memory_format=ctx.memory_format,
                             spectral_radius_iters=cfg.train.spectral_radius_iters if every and epoch % every == 0
                             else 0)
        ctx.stop.eval_s = time.perf_counter() - t_eval
        state.last_eval = last_eval
        avg = meters.global_avgs()
        record = {
            "epoch": epoch, "step": state.global_step, "phase": phase,
            "train_loss": avg.get("loss"), "train_acc": avg.get("acc"),
            "eval_top1": last_eval.get("top1"), "eval_top5": last_eval.get("top5"),
            "eval_miou": last_eval.get("miou"), "eval_pixel_acc": last_eval.get("pixel_acc"),
            "eval_loss": last_eval.get("loss"), "lr": optimizer.param_groups[0]["lr"],
            **{k: avg.get(k) for k in ("nfe_forward", "nfe_backward", "rel_residual_forward", "abs_residual_forward",
                                       "converged_forward", "rel_residual_backward", "converged_backward")},
            "eval_nfe_forward": last_eval.get("nfe_forward"),
            "eval_rel_residual_forward": last_eval.get("rel_residual_forward"),
            "eval_spectral_radius": last_eval.get("spectral_radius"),
            "step_time_ms": avg.get("step_time_ms"), "peak_mem_mb": peak, "mem_kind": memory.kind,
            "epoch_time_s": epoch_time, "steps": state.step_in_epoch, "partial": partial,
        }
        value = last_eval.get(metric)
        if value is not None and math.isfinite(value) and (state.best is None or value > state.best["value"]):
            state.best = {"epoch": epoch, "step": state.global_step, "value": value}
        if dist_info.is_main:
            append_epoch(out_dir / "metrics.csv", record)
        shown = f"mIoU {100 * value:.2f}" if metric == "miou" else f"top-1 {value:.2f}%"
        log(f"epoch {epoch} done ({phase}, step {state.global_step}): train loss {avg.get('loss', math.nan):.4f} "
            f"acc {avg.get('acc', math.nan):.2f}; eval {shown}; nfe fwd {avg.get('nfe_forward', math.nan):.1f} "
            f"bwd {avg.get('nfe_backward', math.nan):.1f}; {avg.get('step_time_ms', math.nan):.0f} ms/step; "
            f"peak {peak:.0f} MB ({memory.kind})"
            + (f"; spectral radius {last_eval['spectral_radius']:.3f}" if "spectral_radius" in last_eval else ""))
        if not partial:
            state.epoch += 1
            state.step_in_epoch = 0
        state.meters, state.epoch_seconds = {}, 0.0
        ctx.save(state)
        if partial:
            break

    final = final_record(config=cfg.name, baseline=options.baseline, metric=metric, last_eval=state.last_eval,
                         final_epoch=state.epoch - 1 if not partial else state.epoch, partial=partial,
                         global_step=state.global_step, epochs_planned=cfg.train.epochs, best=state.best,
                         eval_set=eval_name, data_source_label=source_label)
    if state.stopped is not None:  # a chunk of the run, not its end: no final.json
        return {**final, "stopped": state.stopped}
    if dist_info.is_main:
        write_json_atomic(out_dir / "final.json", final)
    log(f"final: {json.dumps(plain({k: final[k] for k in ('metric', 'final_epoch', 'final')}))}; "
        f"wrote {out_dir / 'final.json'}")
    return final


# ----------------------------------------------------------------------------------------------
# Command line.

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mdeq.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a name in mdeq/configs (e.g. cifar10_small_official) or a YAML path")
    p.add_argument("--data-root", default=None, help="data set folder (default data/<dataset>)")
    p.add_argument("--out", required=True, help="run folder for logs, checkpoints and final.json")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. --set train.epochs=2 solver.max_iter=5")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast; float16 + GradScaler on CUDA)")
    p.add_argument("--amp-dtype", default="auto", choices=("auto", "float16", "bfloat16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last images and solver state (default: on a CPU only)")
    p.add_argument("--compile", action="store_true", help="torch.compile f for the forward solve (see RunOptions)")
    p.add_argument("--baseline", default=None, help="train a Table 1 baseline (resnet18_170k, node_172k, ...) instead")
    p.add_argument("--synthetic", action="store_true", help="write a synthetic copy into an empty --data-root first")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: epoch ends)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--limit-train", type=int, default=None, help="use the first N training samples")
    p.add_argument("--limit-eval", type=int, default=None, help="use the first N evaluation samples")
    p.add_argument("--baseline-option", dest="baseline_options", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="options of the baseline's builder, e.g. --baseline-option width=4")
    p.add_argument("--data-option", dest="data_options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra data set builder options, e.g. --data-option base_size=256")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms, no cudnn.benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="keep freed memory for reuse, no page faults per new tensor (default: on a CPU; mdeq/engine/allocator.py)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar even on a terminal")
    p.add_argument("--find-unused-parameters", action="store_true", help="DDP find_unused_parameters")
    p.add_argument("--stop-at", type=float, default=None, metavar="UNIX_TIME",
                   help="checkpoint and exit before a step or evaluation that would end after this time "
                        "(seconds since the epoch, as `date +%%s` prints)")
    p.add_argument("--divergence-factor", type=float, default=100.0, metavar="F",
                   help="stop as diverged when a step's loss exceeds F times the run's first losses (0: no check)")
    p.add_argument("--max-param-abs", type=float, default=1e6, metavar="X",
                   help="stop as diverged when a parameter exceeds X in magnitude (0: only non-finite ones)")
    p.add_argument("--traceback", action="store_true",
                   help=f"print the stack with an error (or set {TRACEBACK_ENV}=1)")
    return p


def _parse_kv(items: Sequence[str], flag: str = "--data-option") -> dict[str, Any]:
    out = {}
    for text in items:
        if "=" not in text:
            raise ValueError(f"{flag} must look like KEY=VALUE, got {text!r}")
        k, v = text.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as exc:
            raise ValueError(f"{flag} {text!r}: the value is not valid YAML "
                             f"({getattr(exc, 'problem', None) or exc})") from None
    return out


def _is_input_error(err: BaseException) -> bool:
    """Bad input (exit code 2): the config, the options, the data, the run folder; anything else is a fault (1)."""
    from mdeq.engine.data import DatasetIntegrityError

    return isinstance(err, (ValueError, FileExistsError, FileNotFoundError, DatasetIntegrityError, CheckpointError,
                            RunFolderInUse))


def _one_line(err: BaseException) -> str:
    """The error as one line: its own summary, a DataLoader worker's original error, or the first line."""
    text = (getattr(err, "summary", None) or str(err)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(err).__name__
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: its error is the last line
        name, sep, rest = lines[-1].partition(": ")
        return rest if sep and " " not in name else lines[-1]
    return lines[0] + (" [...]" if len(lines) > 1 else "")


def _error_line(err: BaseException) -> str:
    line = _one_line(err)
    if _is_input_error(err) or isinstance(err, (FloatingPointError, OSError)):
        return f"error: {line}"
    return f"error: {type(err).__name__}: {line} (--traceback or {TRACEBACK_ENV}=1 shows where)"


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m mdeq.train``: parse, run ``main``; every error is one line, exit code 2 (bad input) or 1 (fault)."""
    args = _parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    show_stack = args.traceback or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:  # what the user typed: a bad config key, baseline or option is one line, not a traceback
        cfg = load_config(args.config, args.overrides)
        _check_baseline(args.baseline)
        options = RunOptions(
            out_dir=args.out, data_root=args.data_root, device=args.device, amp=args.amp, amp_dtype=args.amp_dtype,
            workers=args.workers, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
            resume=args.resume, max_steps=args.max_steps, baseline=args.baseline, synthetic=args.synthetic,
            limit_train=args.limit_train, limit_eval=args.limit_eval, data_options=_parse_kv(args.data_options),
            baseline_options=_parse_kv(args.baseline_options, "--baseline-option"),
            deterministic=args.deterministic, threads=args.threads, progress=False if args.no_progress else None,
            find_unused_parameters=args.find_unused_parameters, stop_at=args.stop_at,
            divergence_factor=args.divergence_factor or None, max_param_abs=args.max_param_abs or None,
            channels_last=args.channels_last, compile=args.compile, keep_freed_memory=args.keep_freed_memory,
            command=shlex.join(["python", "-m", "mdeq.train", *argv_list]))
        main(cfg, options)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        if show_stack:
            traceback.print_exc()
        print(f"error: interrupted; {Path(args.out) / CHECKPOINT_NAME}, if there, is the last checkpoint: continue "
              f"with --resume", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 (every error ends in one line; --traceback shows the stack)
        if show_stack:
            traceback.print_exc()
        print(_error_line(err), file=sys.stderr, flush=True)
        return 2 if _is_input_error(err) else 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
