"""How a run's parts are built from its config and options, and put together: optimiser, schedule, loss,
device, network, precision, and the checkpoint writer.

Why in one place: the order matters (the initial weights are drawn from ``train.seed`` before the training
stream is seeded per process; a resumed run is checked against its checkpoint before anything loads), and
the notebooks, benchmarks and ``mdeq.evaluate`` build the same parts the same way.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mdeq.core.config import ConfigError, ExperimentConfig, TrainConfig, config_to_dict
from mdeq.core.heads import upsample_logits
from mdeq.core.model import build_model
from mdeq.engine import distributed
from mdeq.engine.checkpoint import capture_rng_state, load_pretrained, save_checkpoint
from mdeq.engine.distributed import DistInfo, log
from mdeq.engine.guards import DivergenceGuard, StopRule
from mdeq.engine.loaders import ResumableSampler, ShardSampler, build_datasets, loader_generator, per_rank
from mdeq.engine.data import IGNORE_INDEX
from mdeq.engine.metrics import PeakMemory
from mdeq.engine.options import RunOptions, TrainState
from mdeq.engine.rundir import resume_from, run_shape, start_logs, will_resume
from mdeq.engine.runlog import CHECKPOINT_NAME, git_commit, plain

__all__ = ["build_optimizer", "build_scheduler", "SegmentationLoss", "build_criterion", "resolve_device",
           "build_network", "check_baseline", "input_memory_format", "autocast_context", "amp_dtype", "Context",
           "Run", "assemble"]


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



def build_network(cfg: ExperimentConfig, options: RunOptions) -> nn.Module:
    if options.baseline is not None:
        from mdeq.engine.baselines import build_baseline

        if cfg.model.head != "classification":
            raise ConfigError(f"baseline {options.baseline!r} is a classifier; config {cfg.name!r} is "
                              f"{cfg.model.head}")
        return build_baseline(options.baseline, num_classes=cfg.data.num_classes, **options.baseline_options)
    return build_model(cfg)



def check_baseline(name: str | None) -> None:
    if name is None:
        return
    from mdeq.engine.baselines import BASELINES

    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")



def input_memory_format(device: torch.device, options: RunOptions) -> torch.memory_format:
    on = device.type == "cpu" if options.channels_last is None else options.channels_last
    return torch.channels_last if on else torch.contiguous_format



def autocast_context(device: torch.device, options: RunOptions):
    dtype = amp_dtype(device, options)
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=options.amp)



def amp_dtype(device: torch.device, options: RunOptions) -> torch.dtype:
    if options.amp_dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return getattr(torch, options.amp_dtype)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Context:
    """What ``mdeq.engine.loop.train_one_epoch`` needs besides the model and data (kept together to keep signatures short)."""

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
    stop: StopRule = field(default_factory=lambda: StopRule(None))
    guard: DivergenceGuard | None = None
    memory_format: torch.memory_format = torch.contiguous_format


@dataclass
class Run:
    """A run's parts as ``assemble`` puts them together, for ``mdeq.engine.loop`` to train."""

    model: nn.Module  # what is called: the network, or its DistributedDataParallel wrapper
    core: nn.Module  # the network itself
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: ResumableSampler
    train_set: Dataset
    eval_loader: DataLoader
    state: TrainState
    ctx: Context
    batch: int  # per process
    metric: str  # "top1" or "miou"
    eval_name: str
    source_label: str


def assemble(cfg: ExperimentConfig, options: RunOptions, dist_info: DistInfo, device: torch.device,
             out_dir: Path) -> Run:
    """The run's parts from its config and options: data, model (the same initial weights on every process),
    optimiser, schedule, loss, the checkpoint writer, and the state of a resumed run with its logs."""
    ckpt_path = out_dir / CHECKPOINT_NAME
    resuming = will_resume(out_dir, options)
    world, rank = dist_info.world_size, dist_info.rank
    batch = per_rank(cfg.data.batch_size, world, "data.batch_size", exact=True)
    eval_batch = per_rank(cfg.data.eval_batch_size, world, "data.eval_batch_size", exact=False)
    train_set, eval_set, source_label = build_datasets(cfg, options, dist_info)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()

    # Model: the same initial weights on every process (DDP also broadcasts rank 0's).
    _seed_all(cfg.train.seed)
    model = build_network(cfg, options)
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
    autocast = autocast_context(device, options)
    scaler = torch.amp.GradScaler(device.type, enabled=options.amp and amp_dtype(device, options) == torch.float16)
    state = TrainState()
    eval_name = ("CIFAR-10 test set (the released code's 'val')" if cfg.data.dataset == "cifar10"
                 else f"{cfg.data.dataset} val")

    guard = DivergenceGuard(options.divergence_factor, options.max_param_abs, cfg.data.num_classes, ckpt_path)
    shape = run_shape(options, world, train_set, eval_set, iterations_per_epoch, source_label)

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
        state = resume_from(ckpt_path, cfg, options, shape, core, optimizer, scheduler, scaler, rank)
    if dist_info.is_main:
        start_logs(out_dir, cfg, options, state, resuming, device, world, data_source_label=source_label,
                    eval_set=eval_name, num_params=num_params)
    if resuming:
        log(f"resumed {ckpt_path}: epoch {state.epoch}, batch {state.step_in_epoch}/{iterations_per_epoch}, "
            f"step {state.global_step}")

    log(f"{cfg.name} ({options.baseline or 'MDEQ'}, {num_params:,} parameters) on {device} x {world}; "
        f"data: {source_label}; {len(train_set)} train / {len(eval_set)} eval samples, "
        f"{iterations_per_epoch} iterations per epoch, warm-up {cfg.train.pretrain_steps} steps; out: {out_dir}")

    eval_loader = DataLoader(eval_set, batch_size=eval_batch, sampler=ShardSampler(len(eval_set), rank, world),
                             num_workers=options.workers, pin_memory=device.type == "cuda",
                             generator=loader_generator(cfg.train.seed, -1, rank))
    memory = PeakMemory(device)
    stop = StopRule(options.stop_at)
    ctx = Context(cfg, options, out_dir, device, dist_info, autocast, scaler, memory, iterations_per_epoch, save,
                   stop, guard, memory_format=input_memory_format(device, options))
    metric = "miou" if cfg.model.head == "segmentation" else "top1"
    return Run(model, core, criterion, optimizer, scheduler, sampler, train_set, eval_loader, state, ctx, batch,
               metric, eval_name, source_label)
