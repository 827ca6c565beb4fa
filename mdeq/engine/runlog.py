"""What a run leaves on disk: the files, their columns, how they are written and read back, and "finished".

Why one module: the training engine (``mdeq.train``) writes a run folder; the reports, the campaign, the
full-profile launcher, the benchmarks, the studies and the scripts read it back or write the same provenance. With
the format defined once, a column, the hardware string or the git commit cannot mean two things.

A run folder holds (``RUN_FILES``):

- ``metrics.csv``: one row per evaluated epoch (``EPOCH_COLUMNS``); ``partial`` marks an epoch cut
  short by ``max_steps``;
- ``steps.jsonl``: one record every ``log_every`` optimiser steps;
- ``provenance.json``: command, resolved config, code (git commit, dirty flag), machine, data, and one
  ``chunks`` entry per process that trained part of the run (``chunk_start`` / ``chunk_end``);
- ``final.json``: written once, when training ends (``final_record``); a chunk stopped by ``--stop-at``
  or a signal writes none;
- ``checkpoint.pt`` (``mdeq.engine.checkpoint``), and the ``.lock`` of the process that writes the folder.

A run is ``finished`` when its ``final.json`` holds an evaluation and says it trained every planned
epoch. Writes go to a temporary file first and are renamed, so a killed writer leaves the last
complete file (``write_text_atomic``).
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mdeq.engine import paths
from mdeq.engine.checkpoint import TEMP_PATTERN

__all__ = ["CHECKPOINT_NAME", "LOCK_NAME", "RUN_FILES", "LOG_FILES", "EPOCH_COLUMNS", "append_jsonl", "append_epoch",
           "write_text_atomic", "write_json_atomic", "trim_logs", "sweep_temp_files", "final_record", "now",
           "git_commit", "git_dirty", "hardware", "describe_hardware", "run_hardware",
           "describe_run_hardware", "hardware_label", "provenance", "chunk_start",
           "chunk_end", "finished", "RunLog", "read_run", "read_runs", "collect_run", "read_json", "plain",
           "chunk_hours", "last_logged_step"]

CHECKPOINT_NAME = "checkpoint.pt"
LOCK_NAME = ".lock"  # held by the one process writing the folder; not a run file (nor is train.log)
RUN_FILES = (CHECKPOINT_NAME, "steps.jsonl", "metrics.csv", "final.json", "provenance.json")
LOG_FILES = ("metrics.csv", "final.json", "provenance.json", "steps.jsonl")  # the small ones: results/ keeps them
MAX_STEPS_BYTES = 2_000_000  # a larger steps.jsonl stays with the checkpoints (runs/), not in results/
EPOCH_COLUMNS = (
    "epoch", "step", "phase", "train_loss", "train_acc", "eval_top1", "eval_top5", "eval_miou",
    "eval_pixel_acc", "eval_loss", "lr", "nfe_forward", "nfe_backward", "rel_residual_forward",
    "abs_residual_forward", "converged_forward", "rel_residual_backward", "converged_backward",
    "eval_nfe_forward", "eval_rel_residual_forward", "eval_spectral_radius", "step_time_ms", "peak_mem_mb",
    "mem_kind", "epoch_time_s", "steps", "partial",
)


# ----------------------------------------------------------------------------------------------
# Writing.

@contextlib.contextmanager
def _writing(path: Path):
    """Name the file in an OSError: a full disk says only "No space left on device"."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, f"could not write {path}: {exc.strerror or exc}") from exc
        raise


def plain(x):
    """``x`` as JSON can hold it: non-finite floats become null, paths strings, tuples lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    with _writing(path), open(path, "a") as fh:
        fh.write(json.dumps(plain(record)) + "\n")


def append_epoch(path: Path, record: Mapping[str, Any]) -> None:
    """Append one ``metrics.csv`` row (``EPOCH_COLUMNS``; a header first in a new file; None/NaN empty)."""
    new = not path.exists() or path.stat().st_size == 0
    with _writing(path), open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(EPOCH_COLUMNS), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                         for k, v in record.items()})


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to ``.<name>.tmp`` and rename; a failed write (a full disk) leaves neither a partial file nor the temp."""
    tmp = _temp_name(path)
    try:
        with _writing(path):
            tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(plain(payload), indent=2) + "\n")


def trim_logs(out_dir: Path, epoch: int, global_step: int) -> None:
    """Drop log records a killed run wrote after its last checkpoint, so the resumed run rewrites them."""
    steps = out_dir / "steps.jsonl"
    if steps.exists():
        lines = [ln for ln in steps.read_text().splitlines() if ln.strip()]
        keep = []
        for ln in lines:
            try:
                if json.loads(ln)["step"] <= global_step:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError):
                pass  # a line cut by the kill
        write_text_atomic(steps, "".join(ln + "\n" for ln in keep))
    metrics = out_dir / "metrics.csv"
    if metrics.exists():
        with open(metrics, newline="") as fh:
            rows = list(csv.DictReader(fh))
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(EPOCH_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(r for r in rows if r.get("epoch") not in (None, "") and int(r["epoch"]) < epoch)
        write_text_atomic(metrics, text.getvalue())


def sweep_temp_files(out_dir: Path) -> list[str]:
    """Remove the temporary files a killed or failed writer left (call it holding the folder's lock)."""
    stale = [_temp_name(out_dir / name) for name in RUN_FILES]
    stale += [p for name in RUN_FILES for p in out_dir.glob(TEMP_PATTERN.format(name=name))]
    stale.append(out_dir / "metrics.csv.tmp")  # the name trim_logs used before
    removed = []
    for path in stale:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return sorted(removed)


def final_record(*, config: str, baseline: str | None, metric: str, last_eval: Mapping | None, final_epoch: int,
                 partial: bool, global_step: int, epochs_planned: int, best: Mapping | None, eval_set: str,
                 data_source_label: str) -> dict[str, Any]:
    """What ``final.json`` holds: the final epoch's evaluation (never the best one, which is shown beside it)."""
    return {
        "config": config,
        "baseline": baseline,
        "metric": metric,
        "final_epoch": final_epoch if last_eval is not None else None,
        "final": last_eval.get(metric) if last_eval is not None else None,
        "final_eval": last_eval,
        "global_step": global_step,
        "epochs_planned": epochs_planned,
        "stopped_early": bool(partial or (last_eval is not None and final_epoch < epochs_planned - 1)),
        "best_epoch_for_reference_only": None if best is None else {
            **best, "note": "the best evaluation-set figure over epochs; shown beside the final figure, "
                            "never used to select the reported model"},
        "eval_set": eval_set,
        "data_source_label": data_source_label,
    }


# ----------------------------------------------------------------------------------------------
# Provenance: when, which code, which machine.

def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit(root: str | Path = paths.ROOT) -> str:
    """HEAD's hash of the repository at ``root``, or ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def git_dirty(root: str | Path = paths.ROOT, folders: Sequence[str] = ("mdeq",)) -> bool | None:
    """Whether tracked or untracked files under ``folders`` differ from HEAD (None if git is unavailable)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *folders], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def hardware(device: torch.device | str = "cpu", world_size: int = 1) -> dict[str, Any]:
    """The machine a result came from: host, CPU model, cores, torch threads, device, processes, GPU."""
    device = torch.device(device)
    hw: dict[str, Any] = {"host": socket.gethostname(), "cpu": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "device": str(device), "world_size": world_size}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    hw["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        hw["gpu"] = torch.cuda.get_device_name(device)
        hw["cuda"] = torch.version.cuda
    return hw


def describe_hardware(hw: Mapping[str, Any] | None) -> str:
    """A ``hardware`` record in a few words: "2 x NVIDIA H100" or "CPU (model, 1 thread)"."""
    if not hw:
        return "unknown hardware"
    if hw.get("gpu"):
        return f"{hw.get('world_size', 1)} x {hw['gpu']}"
    threads = hw.get("torch_threads")
    return f"CPU ({hw.get('cpu', '?')}, {threads} thread{'s' if threads != 1 else ''})"


def run_hardware(prov: Mapping[str, Any] | None) -> set[str]:
    """Every machine and thread count a run trained on, each in a few words, from its provenance and its chunks
    (a campaign moves between machines and thread counts)."""
    prov = prov or {}
    records = (prov.get("hardware"), *(c.get("hardware") for c in prov.get("chunks", [])))
    return {describe_hardware(h) for h in records if h}


def describe_run_hardware(prov: Mapping[str, Any] | None) -> str:
    """``run_hardware`` in one line: "CPU (AMD EPYC, 2 threads); CPU (Intel Xeon, 1 thread)"."""
    return "; ".join(sorted(run_hardware(prov))) or "unknown hardware"


def hardware_label(device: torch.device | str | None = None, world_size: int = 1) -> str:
    """This machine in a few words, for ``device`` (None or "auto": CUDA where there is one)."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return describe_hardware(hardware(device, world_size))


def provenance(command: str, device: torch.device | str = "cpu", *, world_size: int = 1,
               dirty_folders: Sequence[str] = ("mdeq",), **fields: Any) -> dict[str, Any]:
    """The provenance record of a result file: date, command, ``fields``, code and machine."""
    return {"date": now(), "command": command, **fields, "git_commit": git_commit(),
            "git_dirty": git_dirty(folders=dirty_folders), "torch": torch.__version__,
            "python": platform.python_version(), "hardware": hardware(device, world_size)}


def script_provenance(args: Any, device: torch.device | str, *, folder: str) -> dict[str, Any]:
    """The provenance of a result that a script of ``benchmarks/`` or ``studies/`` writes: ``provenance`` with the
    script's arguments (an ``argparse.Namespace``) and the device; the dirty flag covers ``mdeq/`` and ``folder``."""
    record = provenance(" ".join([Path(sys.executable).name] + sys.argv), device, args=vars(args),
                        dirty_folders=("mdeq", folder))
    return {**record, "device": str(torch.device(device))}


def write_result_json(path: Path, payload: Mapping[str, Any]) -> None:
    """A script's result file, its folder made first, written atomically; a value JSON cannot hold (a dtype, a
    numpy integer) is written as its string."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def chunk_start(command: str | None, device: torch.device | str, world_size: int, *, step: int, epoch: int,
                step_in_epoch: int) -> dict[str, Any]:
    """One process's stretch of a run, as provenance.json's ``chunks`` records it (machine, code, steps)."""
    return {"start": now(), "host": socket.gethostname(), "hardware": hardware(device, world_size),
            "torch": torch.__version__, "git_commit": git_commit(), "git_dirty": git_dirty(),
            "command": command, "from_step": step, "from_epoch": epoch, "from_step_in_epoch": step_in_epoch}


def chunk_end(out_dir: Path, *, step: int, epoch: int, step_in_epoch: int, how: str) -> None:
    """Close the last ``chunks`` entry of ``<out_dir>/provenance.json``: where and how this process stopped."""
    path = out_dir / "provenance.json"
    if not path.is_file():
        return
    prov = json.loads(path.read_text())
    if prov.get("chunks"):
        prov["chunks"][-1].update(end=now(), to_step=step, to_epoch=epoch, to_step_in_epoch=step_in_epoch, ended=how)
        write_json_atomic(path, prov)


# ----------------------------------------------------------------------------------------------
# Reading.

def finished(final: Mapping[str, Any] | None) -> bool:
    """Whether a run whose ``final.json`` holds ``final`` trained every planned epoch and was evaluated.

    A stopped chunk writes no final.json; a run cut by ``max_steps`` writes one with ``stopped_early``.
    """
    return bool(final) and final.get("final") is not None and not final.get("stopped_early", True)


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _lookup(d: Mapping, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


@dataclass
class RunLog:
    """The logs of one run folder, finished or not. ``rows`` are metrics.csv's rows (strings)."""

    name: str
    path: Path
    rows: list[dict[str, str]]
    final: dict
    provenance: dict

    @property
    def finished(self) -> bool:
        return finished(self.final)

    @property
    def epoch_rows(self) -> list[dict[str, str]]:
        """Rows of fully trained and evaluated epochs (a ``partial`` epoch left out)."""
        return [r for r in self.rows if str(r.get("partial")) != "True"]

    @property
    def epochs_done(self) -> int:
        return len({r["epoch"] for r in self.epoch_rows if r.get("epoch") not in (None, "")})

    @property
    def epochs_planned(self) -> int | None:
        return _lookup(self.provenance, "config.train.epochs")

    def series(self, column: str) -> list[tuple[int, float]]:
        """(epoch, value) of ``column`` over the evaluated epochs that have a value."""
        out = []
        for r in self.epoch_rows:
            value = _number(r.get(column))
            if value is not None and r.get("epoch") not in (None, ""):
                out.append((int(float(r["epoch"])), value))
        return out

    def value(self, *keys: str) -> float | None:
        """The first of ``keys`` present in final.json, else in the last evaluated epoch's row, as a float."""
        for key in keys:
            v = _lookup(self.final, key)
            if v is not None:
                return float(v)
        rows = self.epoch_rows
        if rows:
            for key in keys:
                v = _number(rows[-1].get(key))
                if v is not None:
                    return v
        return None

    def meta(self, *keys: str, default: Any = None) -> Any:
        """The first of ``keys`` (dotted) found in final.json, then in provenance.json."""
        for source in (self.final, self.provenance):
            for key in keys:
                v = _lookup(source, key)
                if v is not None:
                    return v
        return default


def read_run(path: str | Path) -> RunLog | None:
    """The logs in a run folder, or None if it holds none of metrics.csv, final.json, provenance.json."""
    path = Path(path)
    if not path.is_dir() or not any((path / f).exists() for f in LOG_FILES[:3]):
        return None
    rows = []
    if (path / "metrics.csv").is_file():
        with open(path / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    return RunLog(path.name, path, rows, read_json(path / "final.json") or {},
                  read_json(path / "provenance.json") or {})


def read_runs(folder: str | Path, key: str) -> list[RunLog]:
    """Every run of ``key`` in ``folder``: ``<key>`` itself and its seeds ``<key>_seed<k>``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.name == key or p.name.startswith(key + "_seed"))
    return [r for r in (read_run(folder / n) for n in names) if r is not None]


def collect_run(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy a run's small log files into ``dest`` (results/...): logs are data, checkpoints are not."""
    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in LOG_FILES:
        src = run_dir / name
        if not src.is_file():
            continue
        if name == "steps.jsonl" and src.stat().st_size > MAX_STEPS_BYTES:
            continue
        shutil.copyfile(src, dest / name)
    return dest


def chunk_hours(folder: Path) -> float:
    """Wall-clock hours of the run's recorded, ended chunks (``provenance.json``), evaluations and pauses included.

    Why beside the sum of the epochs' ``epoch_time_s``: until 2026-12-03 an epoch that spanned two chunks logged only its last chunk's
    part in ``epoch_time_s``, so the sum of epoch times undercounts older runs (whose first chunks may
    also predate chunk records).
    """
    path = folder / "provenance.json"
    if not path.is_file():
        return 0.0
    seconds = 0.0
    for chunk in json.loads(path.read_text()).get("chunks", []):
        if chunk.get("start") and chunk.get("end"):
            end, start = (_dt.datetime.fromisoformat(chunk[k]) for k in ("end", "start"))
            seconds += (end - start).total_seconds()
    return seconds / 3600.0


def last_logged_step(folder: Path) -> int:
    """The step of the last ``steps.jsonl`` record: an unfinished first epoch has no metrics.csv row yet."""
    path = folder / "steps.jsonl"
    if not path.is_file():
        return 0
    lines = path.read_text().strip().splitlines()
    try:
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (ValueError, KeyError):
        return 0
