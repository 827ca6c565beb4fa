"""How a run reads its data: the data sets it trains and evaluates on, and samplers that resume mid-epoch.

Why samplers of our own: an epoch's order is a function of (seed, epoch) only, so a resumed run skips
exactly the batches a killed one consumed, and an evaluation sees every sample once over all processes.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset

from mdeq.core.config import ConfigError, ExperimentConfig
from mdeq.engine import distributed, paths
from mdeq.engine.distributed import DistInfo, log
from mdeq.engine.options import RunOptions

__all__ = ["ResumableSampler", "ShardSampler", "builder_options", "build_datasets", "loader_generator", "per_rank"]


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



class ShardSampler(Sampler):
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



def builder_options(cfg: ExperimentConfig, split: str) -> dict[str, Any]:
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



def build_datasets(cfg: ExperimentConfig, options: RunOptions, dist_info: DistInfo) -> tuple[Dataset, Dataset, str]:
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
        opts = {**builder_options(cfg, split), **dict(options.data_options)}
        sets[split] = build_dataset(cfg.data.dataset, root, split, **opts)
    train_set, eval_set = sets["train"], sets["val"]
    source_label = getattr(train_set, "source_label", "unknown")
    for split, ds in sets.items():
        # the head must reach every label present: a partial ImageNet copy keeps its 1000-class label space
        # (num_classes) but needs only up to its highest present index (max_label), e.g. a smoke run's 10 classes
        n_classes = getattr(ds, "num_classes", None)
        top = getattr(ds, "max_label", None if n_classes is None else n_classes - 1)
        if top is not None and top >= cfg.data.num_classes:
            partial = f"labels up to {top} of its {n_classes}" if top != n_classes - 1 else f"{n_classes}"
            raise ConfigError(f"the {split} set at {root} has {partial} classes but data.num_classes is "
                              f"{cfg.data.num_classes}")
    if options.limit_train is not None:
        train_set = Subset(train_set, range(min(options.limit_train, len(train_set))))
    if options.limit_eval is not None:
        eval_set = Subset(eval_set, range(min(options.limit_eval, len(eval_set))))
    return train_set, eval_set, source_label



def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """Seeds the DataLoader's worker base seed, so creating an epoch's iterator never touches torch's global RNG."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**63))



def per_rank(batch: int, world: int, what: str, exact: bool) -> int:
    if exact and batch % world:
        raise ConfigError(f"{what} = {batch} (the global batch) must be divisible by the number of processes ({world})")
    return max(1, math.ceil(batch / world))
