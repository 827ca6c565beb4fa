"""How a run's full state is saved and restored: atomic checkpoints, RNG states, partial ("pretrained") loads.

Why: torchvision's ``classification/train.py`` saves the unwrapped model, optimizer, scheduler, epoch
and args, and nanoGPT saves its config; neither writes atomically, so a run killed while saving can
leave a truncated file as its only checkpoint. Here a checkpoint is written to a temporary file in the
same folder and moved into place with ``os.replace`` (atomic on POSIX), and it also carries the
GradScaler, the step counters, every RNG state and the git commit (STYLE.md 3.11), so that a killed
run resumes bit for bit. Everything stored is plain data or tensors, so ``torch.load`` runs with
``weights_only=True``.
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "TEMP_PATTERN", "capture_rng_state",
           "restore_rng_state", "unwrap_model", "LoadReport", "load_matching_state", "load_pretrained"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel/DataParallel, torch.compile
TEMP_PATTERN = ".{name}.*.tmp"  # save_checkpoint's temporary files, e.g. .checkpoint.pt.k3j9x1.tmp


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, corrupted, or not written by ``save_checkpoint``)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare module inside DDP/DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


# ----------------------------------------------------------------------------------------------
# RNG states.

def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and (if initialised) every CUDA generator's state, as plain data."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored only when the device count matches."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ----------------------------------------------------------------------------------------------
# Save and load.

def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """``torch.save(state)`` to ``path`` atomically: a temporary file in the same folder, fsync, ``os.replace``.

    A reader (or a resumed run) sees either the previous complete file or the new one, never a partial
    write, even if the process is killed with SIGKILL mid-save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(dict(state), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        io_error = isinstance(exc, OSError) or (isinstance(exc, RuntimeError) and "inline_container" in str(exc))
        error = _write_error(path, exc) if io_error else None  # torch.save on a full disk: "unexpected pos 704 vs 598"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if error is not None:
            raise error from exc
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _write_error(path: Path, exc: BaseException) -> OSError:
    """An OSError that names the checkpoint and says whether its disk is full (torch's own message does not)."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    code = getattr(exc, "errno", None)
    full = code == errno.ENOSPC or (free is not None and free < 16 << 20)
    detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    room = "" if free is None else f"; {free / 2**20:.1f} MiB were free"
    what = "no space left on device" if full else "the write failed"
    return OSError(errno.ENOSPC if full else (code or errno.EIO),
                   f"could not write the checkpoint {path}: {what} ({detail}{room}); the previous checkpoint, "
                   f"if any, is unchanged")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only=True``: plain data and tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except PermissionError:
        raise
    except (RuntimeError, EOFError, pickle.UnpicklingError, ValueError, OSError) as exc:  # a cut file: EINVAL too
        detail = str(exc).splitlines()[0].split(". ")[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} ({path.stat().st_size} bytes) is not a readable checkpoint ({detail}): it "
                              f"is truncated or corrupted; restore a good copy, or move it away to start the run "
                              f"again") from exc


# ----------------------------------------------------------------------------------------------
# Partial loading: ImageNet -> Cityscapes.

@dataclass
class LoadReport:
    """Which keys of the target model a partial load filled, and why the others were not."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the source
    shape_mismatch: list[str] = field(default_factory=list)  # in both, different shapes
    unused: list[str] = field(default_factory=list)  # in the source, not in the model

    def summary(self) -> str:
        def groups(keys):
            tops = sorted({k.split(".")[0] for k in keys})
            return ", ".join(tops) if tops else "none"
        return (f"loaded {len(self.loaded)} tensors ({groups(self.loaded)}); kept {len(self.missing)} absent from "
                f"the source ({groups(self.missing)}) and {len(self.shape_mismatch)} of another shape "
                f"({groups(self.shape_mismatch)}); ignored {len(self.unused)} source tensors ({groups(self.unused)})")


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def load_matching_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy every tensor whose key is in both state dicts with equal shapes; report the rest.

    Why: the released Cityscapes models start from the ImageNet model of the same width: the stem, the
    injection and f_theta carry over, the classification head is dropped and the segmentation head
    starts fresh (paper 4.3; MODEL.PRETRAINED in locuslab/mdeq ``lib/models/mdeq.py``, ``init_weights``).
    DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes are stripped from the source keys.
    """
    model = unwrap_model(model)
    source = _strip_prefixes(state_dict)
    own = model.state_dict()
    report = LoadReport()
    take = {}
    for k, v in own.items():
        if k not in source:
            report.missing.append(k)
        elif tuple(source[k].shape) != tuple(v.shape):
            report.shape_mismatch.append(k)
        else:
            take[k] = source[k]
            report.loaded.append(k)
    report.unused = [k for k in source if k not in own]
    model.load_state_dict(take, strict=False)
    return report


def load_pretrained(model: nn.Module, source: str | Path | Mapping[str, Any]) -> LoadReport:
    """``load_matching_state`` from a checkpoint file or dict (``{"model": state_dict}`` or a bare state dict)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"train.pretrained: no checkpoint at {path}")
        source = torch.load(path, map_location="cpu", weights_only=True)
    if "model" in source and isinstance(source["model"], Mapping):
        source = source["model"]
    if not all(isinstance(v, torch.Tensor) for v in source.values()):
        raise ValueError("train.pretrained must be a state dict of tensors or a checkpoint with a 'model' state dict")
    return load_matching_state(model, source)
