"""How processes work together: the process group from torchrun's environment, rank-0 logs, reductions.

Why a module of its own: torchvision's ``utils.py`` mixes this with metrics and replaces the builtin
``print``; here ``log()`` prints on rank 0 and leaves ``print`` alone (STYLE.md 3.10, 3.12).
Launch with ``torchrun --nproc_per_node N -m mdeq.train ...`` (one node) or with
``--nnodes``/``--node_rank``/``--rdzv_endpoint`` across nodes: torchrun sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, which ``init_distributed``
reads. Without them the run is a single process and no process group is created.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "init_distributed", "cleanup", "get_rank", "get_world_size", "is_main_process",
           "log", "all_reduce_sum", "barrier", "broadcast_object"]

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on its node, backend used."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (set by torchrun)") from None


def init_distributed(device_type: str = "cpu", backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment, or stay a single process.

    ``backend`` defaults to NCCL for CUDA and gloo for CPU. With CUDA each process uses the GPU
    ``LOCAL_RANK``; the caller turns that into its ``torch.device`` (package code never picks one).
    If a process group already exists (e.g. a test that made one), it is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        dist.get_backend())
    present = [k for k in _ENV_KEYS if k in os.environ]
    if not present:
        return DistInfo()
    if len(present) != len(_ENV_KEYS):
        missing = [k for k in _ENV_KEYS if k not in os.environ]
        raise RuntimeError(f"incomplete torchrun environment: {present} set but {missing} missing; launch with "
                           "torchrun, or unset them for a single-process run")
    rank, world_size, local_rank = (_env_int(k) for k in _ENV_KEYS)
    if world_size == 1:
        return DistInfo(0, 1, local_rank, None)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, backend)


def cleanup() -> None:
    """Leave the process group, if any (end of ``main``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def log(*args, file=None, **kwargs) -> None:
    """``print`` on rank 0 only, flushed (torchrun interleaves the processes' output)."""
    if is_main_process():
        print(*args, file=file if file is not None else sys.stdout, flush=True, **kwargs)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes in place and return it; a no-op in a single process.

    The reduction runs on the tensor's own device (STYLE.md 3.12), so a CPU tensor needs a backend that
    reduces CPU tensors (gloo); under NCCL pass a CUDA tensor.
    """
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s value of a picklable object on every process (e.g. a resume decision)."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
