"""What makes a run folder safe to write and to resume: one writer, a matching checkpoint, logs trimmed to it,
and a committed copy under ``results/`` that a fresh clone resumes from (``sync_run``, ``restore_run``).

Why: a run folder outlives the process that writes it. ``<out>/.lock`` is held (``flock``, released by
the OS when the process dies) from before anything is read until the end; a start without ``--resume``
in a folder holding a run's files is refused; a resume must match the checkpoint in everything that
shapes the schedule and the data (config, limits, processes), and its logs are trimmed to the
checkpoint's step, with a new chunk in ``provenance.json``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import socket
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mdeq.core.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict
from mdeq.engine import paths
from mdeq.engine.checkpoint import load_checkpoint, restore_rng_state
from mdeq.engine.distributed import log
from mdeq.engine.options import RunOptions, TrainState
from mdeq.engine.runlog import (CHECKPOINT_NAME, LOCK_NAME, RUN_FILES, chunk_end, chunk_start, plain, provenance,
                                trim_logs, write_json_atomic)

__all__ = ["RunFolderInUse", "run_folder_lock", "resume_hint", "with_defaults", "config_diff", "run_shape",
           "shape_diff", "will_resume", "resume_from", "start_logs", "end_chunk", "SYNCED", "sync_run", "restore_run"]


class RunFolderInUse(RuntimeError):
    """Another process holds the run folder's lock: two writers would interleave or delete each other's records."""



@contextlib.contextmanager
def run_folder_lock(out_dir: Path):
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



def resume_hint(options: RunOptions) -> str:
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



def with_defaults(saved: Mapping) -> Mapping:
    """A checkpoint's config with the fields added since it was written at their defaults (their defaults are
    the behaviour it was trained with, e.g. the stability options, off); as written if it no longer loads."""
    try:
        return config_to_dict(config_from_dict(saved))
    except (ConfigError, TypeError):
        return saved



def config_diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        va, vb = a.get(k), b.get(k)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: checkpoint {va!r} vs now {vb!r}")
    return out



def run_shape(options: RunOptions, world: int, train_set, eval_set, iterations_per_epoch: int,
               source_label: str) -> dict[str, Any]:
    """What shapes the schedule and the data besides the config; a resumed run must match it."""
    return {"limit_train": options.limit_train, "limit_eval": options.limit_eval, "world_size": world,
            "train_samples": len(train_set), "eval_samples": len(eval_set),
            "iterations_per_epoch": iterations_per_epoch, "data_source_label": source_label,
            "data_options": plain(dict(options.data_options)),
            "baseline_options": plain(dict(options.baseline_options))}



def shape_diff(ckpt: Mapping[str, Any], shape: Mapping[str, Any], scheduler) -> list[str]:
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



def will_resume(out_dir: Path, options: RunOptions) -> bool:
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



def resume_from(ckpt_path: Path, cfg: ExperimentConfig, options: RunOptions, shape: Mapping[str, Any], core: nn.Module,
            optimizer, scheduler, scaler, rank: int) -> TrainState:
    """Load the checkpoint into model, optimiser, scheduler and scaler, and this process's RNG states.

    Why a check first: a checkpoint written for another config, baseline, schedule or data would
    continue a different run silently (``config_diff``, ``shape_diff``).
    """
    ckpt = load_checkpoint(ckpt_path, map_location="cpu")
    saved, now = with_defaults(ckpt["config"]), config_to_dict(cfg)
    if options.baseline is not None:  # a baseline reads only the data and train sections
        saved, now = ({k: v for k, v in c.items() if k not in ("model", "solver")} for c in (saved, now))
    diff = config_diff(saved, now)
    if ckpt.get("baseline") != options.baseline:
        diff.append(f"baseline: checkpoint {ckpt.get('baseline')!r} vs now {options.baseline!r}")
    diff += shape_diff(ckpt, shape, scheduler)
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
    restore_rng_state(ckpt["rng"][rank])  # shape_diff: written by as many processes
    return state



def start_logs(out_dir: Path, cfg: ExperimentConfig, options: RunOptions, state: TrainState, resuming: bool,
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



def end_chunk(out_dir: Path, state: TrainState, how: str) -> None:
    chunk_end(out_dir, step=state.global_step, epoch=state.epoch, step_in_epoch=state.step_in_epoch, how=how)


# ----------------------------------------------------------------------------------------------
# A run folder's committed copy: its small logs and latest checkpoint under results/, so that a commit keeps
# a run and a fresh clone resumes it (the campaign, the studies in benchmarks/).

SYNCED = ("metrics.csv", "steps.jsonl", "provenance.json", "final.json", "checkpoint.pt")


def _copy_atomic(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def sync_run(work: Path, dest: Path) -> list[str]:
    """Copy the run's small logs and latest checkpoint from ``work`` into ``dest`` (each file atomically)."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in SYNCED:
        if (work / name).is_file():
            _copy_atomic(work / name, dest / name)
            copied.append(name)
    if not (work / "final.json").is_file():
        (dest / "final.json").unlink(missing_ok=True)  # a run resumed after an earlier end goes on
    return copied


def _global_step(path: Path) -> int:
    return int(load_checkpoint(path, map_location="cpu")["global_step"]) if path.is_file() else -1


def restore_run(results_dir: Path, work: Path) -> bool:
    """On a fresh machine, seed ``work`` from the committed ``results_dir`` if that is further along."""
    ckpt = results_dir / "checkpoint.pt"
    if not ckpt.is_file() or _global_step(ckpt) <= _global_step(work / "checkpoint.pt"):
        return False
    work.mkdir(parents=True, exist_ok=True)
    for name in SYNCED:
        if (results_dir / name).is_file():
            _copy_atomic(results_dir / name, work / name)
    return True
