"""What a run is asked to do besides its config (``RunOptions``), and where its training stands (``TrainState``).

Why apart from the config: the config is the experiment (what the paper specifies); device, precision,
workers, logging, the output folder, resume and the limits of smoke runs are how it is run, and they
may change between the chunks of one run without changing what it computes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = ["RunOptions", "TrainState"]


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
    parameter always stops it); see ``DivergenceGuard``. channels_last: feed images (and so the solver
    state) channels_last (None: on a CPU; float64 results equal the contiguous ones, float32 ones to
    rounding). compile: ``torch.compile`` f for the no-grad forward solve (``ImplicitLayer``'s
    ``compile_forward``; up to a minute of compiling per batch shape and mode). On the project's 2-core
    CPU neither changed the MDEQ-small step at batch 128 beyond the +-8 % noise
    (``benchmarks/train_step_profile.py``, ``docs/step_time.md``).
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
    loss_reference: tuple = (0, 0.0)  # (count, sum) of the run's first losses (DivergenceGuard)
    checkpoint_step: int | None = None  # the global step of the checkpoint on disk, if any
