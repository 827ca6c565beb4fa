"""What a trained run gives back: its weights and config, rebuilt and evaluated as its run evaluated them.

Why a module: a committed run folder (``results/runs/<run>/``) holds weights anyone should be able to
check without knowing how the run was launched. ``load_run`` reads the run's config, data set and data
options from the folder (``provenance.json``, ``checkpoint.pt``); ``evaluate_trained`` evaluates the
weights with the engine's own ``mdeq.engine.loop.evaluate`` (the same data pipeline, memory format and
eval-mode solver settings as the evaluation that ``metrics.csv`` logged); ``checkpoint_table`` lists every
committed checkpoint. Nothing here writes into a run folder. The authors' released checkpoints go through
the converter of ``mdeq.core.official`` (``load_released``). ``python -m mdeq.evaluate`` is its command line.
"""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from mdeq.engine import paths
from mdeq.engine.checkpoint import CheckpointError
from mdeq.core.config import ConfigError, ExperimentConfig, config_from_dict, config_to_dict, load_config
from mdeq.engine.runlog import CHECKPOINT_NAME, git_commit, read_run
# The engine's own pieces, so that an evaluation here is the one training logged (same data options,
# same network).
from mdeq.engine.build import build_criterion, build_network, resolve_device
from mdeq.engine.loaders import builder_options
from mdeq.engine.loop import evaluate
from mdeq.engine.options import RunOptions
from mdeq.engine.rundir import config_diff, with_defaults

__all__ = ["Trained", "load_run", "checkpoint_at", "load_released", "build_trained", "memory_format", "eval_dataset",
           "evaluate_trained", "shown_path", "logged_evaluation", "committed_weights", "checkpoint_table",
           "format_checkpoint_table", "CHECKPOINT_TABLE", "write_checkpoint_table"]

RUNS = paths.RESULTS / "runs"
# The committed checkpoints as docs/trained_models.md includes them; rewritten by `python -m mdeq.reproduce --readme`.
CHECKPOINT_TABLE = paths.RESULTS / "trained_models.md"


@dataclass
class Trained:
    """Weights with everything needed to evaluate them as their run did.

    ``data_root`` / ``data_options``: what the run read (absolute paths), or the data set's defaults for a
    released checkpoint. ``global_step`` etc. are None for a released checkpoint.
    """

    name: str
    cfg: ExperimentConfig
    state_dict: dict
    source: Path  # the run folder, or the released file
    checkpoint: Path
    sha256: str
    size_bytes: int
    baseline: str | None = None
    baseline_options: dict = field(default_factory=dict)
    data_root: Path | None = None
    data_options: dict = field(default_factory=dict)
    data_label: str | None = None  # the run's data_source_label
    channels_last: bool | None = None  # the run's option (None: on a CPU)
    global_step: int | None = None
    epoch: int | None = None  # epochs completed
    step_in_epoch: int | None = None
    iterations_per_epoch: int | None = None
    released: bool = False
    origin: str = ""  # where the checkpoint file came from, if not the run folder (e.g. "git HEAD")

    @property
    def model_label(self) -> str:
        return self.baseline or ("MDEQ" if self.cfg.model.num_scales > 1 else "single-stream DEQ")

    @property
    def epochs_trained(self) -> float | None:
        if self.epoch is None or not self.iterations_per_epoch:
            return None
        return self.epoch + (self.step_in_epoch or 0) / self.iterations_per_epoch

    def weights_label(self) -> str:
        """"step 8217: 21 of 50 epochs done, 6 of 391 steps into the next" or "step 19550: end of epoch 50 of 50"."""
        if self.released:
            return f"released checkpoint {self.checkpoint.name}"
        planned = self.cfg.train.epochs
        if not self.step_in_epoch:
            return f"step {self.global_step}: end of epoch {self.epoch} of {planned}"
        return (f"step {self.global_step}: {self.epoch} of {planned} epochs done, {self.step_in_epoch} of "
                f"{self.iterations_per_epoch or '?'} steps into the next")


def _read_bytes(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256: one read, so the hash names exactly the weights loaded (the campaign
    replaces a run's checkpoint.pt atomically while it trains)."""
    data = path.read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def _torch_load(data: bytes, path: Path) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a cut or foreign file: one line naming it
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path} ({len(data)} bytes) is not a readable checkpoint ({detail})") from None


def shown_path(value: Any) -> Any:
    """A path under the repository as a relative one (not resolved: data/ holds links to the machine's copies),
    for output and JSON that name no machine; anything else unchanged."""
    if isinstance(value, (str, Path)) and str(value) and Path(value).is_absolute() \
            and Path(value).is_relative_to(paths.ROOT):
        return str(Path(value).relative_to(paths.ROOT))
    return str(value) if isinstance(value, Path) else value


def _resolve(value: Any) -> Any:
    """A relative path the run recorded (relative to the repository root, where it ran), made absolute."""
    if isinstance(value, str) and value and not Path(value).is_absolute() and (paths.ROOT / value).exists():
        return str(paths.ROOT / value)
    return value


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> Trained:
    """The weights of a run folder (or ``checkpoint``, written by the same run) with the run's config and data.

    The config is provenance.json's (the run's record), checked against the one the checkpoint stores;
    without a provenance.json the checkpoint's is used. Raises FileNotFoundError (no folder, no
    checkpoint), ConfigError (a config that does not parse, or two that differ) and CheckpointError.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        known = sorted(p.name for p in RUNS.iterdir() if (p / CHECKPOINT_NAME).is_file()) if RUNS.is_dir() else []
        raise FileNotFoundError(f"no run folder at {run_dir}"
                                + (f"; the committed ones in {paths.rel(RUNS)}: {', '.join(known)}" if known else ""))
    path = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}" + ("" if checkpoint is not None else
                                f": {run_dir} holds no {CHECKPOINT_NAME}"))
    data, sha = _read_bytes(path)
    ckpt = _torch_load(data, path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping) or "config" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of mdeq.train (no 'model' and 'config'); for a released "
                              f"checkpoint use --official FILE --config NAME")
    log = read_run(run_dir)
    prov = log.provenance if log is not None else {}
    raw = prov.get("config") or ckpt["config"]
    where = run_dir / ("provenance.json" if prov.get("config") else CHECKPOINT_NAME)
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: the run's config is not valid: {err}") from None
    # Both at today's defaults for fields added since they were written; a baseline reads only the data and
    # train sections (as mdeq.train's resume compares them).
    trained_with, recorded = with_defaults(ckpt["config"]), config_to_dict(cfg)
    if ckpt.get("baseline") is not None:
        trained_with, recorded = ({k: v for k, v in c.items() if k not in ("model", "solver")}
                                  for c in (trained_with, recorded))
    if prov.get("config") and trained_with != recorded:
        diff = config_diff(trained_with, recorded)
        raise ConfigError(f"{run_dir}: provenance.json's config differs from the one {path.name} was trained with "
                          f"({'; '.join(d.replace(' vs now ', ' vs provenance.json ') for d in diff[:4])}"
                          f"{'; ...' if len(diff) > 4 else ''})")
    options = prov.get("options") or {}
    run = ckpt.get("run") or {}
    baseline = ckpt.get("baseline")
    t_max = (ckpt.get("scheduler") or {}).get("T_max")
    per_epoch = run.get("iterations_per_epoch") or (t_max // cfg.train.epochs if t_max else None)
    data_root = options.get("data_root")
    return Trained(
        name=run_dir.resolve().name, cfg=cfg, state_dict=dict(ckpt["model"]), source=run_dir, checkpoint=path,
        sha256=sha, size_bytes=len(data), baseline=baseline,
        baseline_options=dict(run.get("baseline_options") or options.get("baseline_options") or {}),
        data_root=Path(_resolve(data_root)) if data_root else None,
        data_options={k: _resolve(v) for k, v in (run.get("data_options") or options.get("data_options") or {}).items()
                      },
        data_label=prov.get("data_source_label") or run.get("data_source_label"),
        channels_last=options.get("channels_last"), global_step=ckpt.get("global_step"), epoch=ckpt.get("epoch"),
        step_in_epoch=ckpt.get("step_in_epoch"), iterations_per_epoch=per_epoch)


def checkpoint_at(run_dir: str | Path, revision: str, dest: str | Path) -> Path:
    """``<run_dir>/checkpoint.pt`` as git holds it at ``revision`` (e.g. ``HEAD``), written to the file ``dest``.

    Why: the campaign replaces a run's checkpoint in the working tree every few steps, so a measurement reads
    the committed one (and a test can read an older, end-of-epoch one). Raises FileNotFoundError if git does
    not hold it there (no repository, a shallow clone, an unknown revision).
    """
    try:
        rel = Path(run_dir).resolve().relative_to(paths.ROOT)
    except ValueError:
        raise FileNotFoundError(f"{run_dir} is not inside the repository {paths.ROOT}: git holds no revision of it")
    spec = f"{revision}:{rel.as_posix()}/{CHECKPOINT_NAME}"
    try:
        proc = subprocess.run(["git", "show", spec], cwd=paths.ROOT, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FileNotFoundError(f"git show {spec} failed ({exc})") from None
    if proc.returncode != 0:
        detail = proc.stderr.decode(errors="replace").strip().splitlines()
        raise FileNotFoundError(f"git holds no {spec} ({detail[0] if detail else 'git show failed'})")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(proc.stdout)
    return dest


def load_released(path: str | Path, config: str | Path) -> Trained:
    """A checkpoint of the authors' released code, converted by ``mdeq.core.official`` for ``config`` (an ``*_official``
    config: the released architecture); evaluated on the data set's default copy unless told otherwise."""
    from mdeq.core.official import convert_state_dict

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no released checkpoint at {path}")
    cfg = load_config(config)
    data, sha = _read_bytes(path)
    obj = _torch_load(data, path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    state = convert_state_dict(obj, cfg)
    return Trained(name=path.stem, cfg=cfg, state_dict=state, source=path, checkpoint=path, sha256=sha,
                   size_bytes=len(data), data_root=paths.DATA / cfg.data.dataset, released=True)


# ----------------------------------------------------------------------------------------------
# Evaluation: the engine's.

def build_trained(trained: Trained, device: torch.device | str = "cpu") -> nn.Module:
    """The run's network (MDEQ or baseline) with its weights loaded strictly, in eval mode on ``device``.

    A state dict that does not fit the config is a ValueError that names the keys (a wrong config).
    """
    options = RunOptions(out_dir=".", baseline=trained.baseline, baseline_options=trained.baseline_options)
    model = build_network(trained.cfg, options)
    result = model.load_state_dict(trained.state_dict, strict=False)
    own = model.state_dict()
    shapes = [k for k, v in trained.state_dict.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if result.missing_keys or result.unexpected_keys or shapes:
        found = ((result.missing_keys, "missing"), (result.unexpected_keys, "unexpected"), (shapes, "of another shape"))
        parts = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in found if keys]
        raise ValueError(f"the weights of {trained.checkpoint} do not fit the config {trained.cfg.name!r}"
                         f"{f' (baseline {trained.baseline})' if trained.baseline else ''}: {', '.join(parts)} keys")
    return model.to(device).eval()


def memory_format(trained: Trained, device: torch.device, channels_last: bool | None = None) -> torch.memory_format:
    """The run's image and solver-state layout (``mdeq.train``'s rule): channels_last where asked, or by default on
    a CPU; ``channels_last`` overrides the run's choice."""
    on = trained.channels_last if channels_last is None else channels_last
    return torch.channels_last if (device.type == "cpu" if on is None else on) else torch.contiguous_format


def eval_dataset(trained: Trained, data_root: str | Path | None = None, data_options: Mapping | None = None,
                 limit: int | None = None):
    """(the evaluation split as the run built it, its root, its options): the run's recorded data unless
    ``data_root`` is given (then only ``data_options`` apply)."""
    from mdeq.engine.data import build_dataset  # lazily, as mdeq.train does: it pulls in PIL

    cfg = trained.cfg
    if data_root is None:
        if trained.data_root is None:
            raise FileNotFoundError(f"{trained.source} records no data root: pass --data-root")
        root, options = trained.data_root, dict(trained.data_options, **(data_options or {}))
    else:
        root, options = Path(data_root), dict(data_options or {})
    dataset = build_dataset(cfg.data.dataset, root, "val", **{**builder_options(cfg, "val"), **options})
    if limit is not None:
        dataset_label = getattr(dataset, "source_label", None)
        dataset = Subset(dataset, range(min(limit, len(dataset))))
        dataset.source_label = dataset_label
    return dataset, root, options


def evaluate_trained(trained: Trained, *, data_root: str | Path | None = None, data_options: Mapping | None = None,
                     limit: int | None = None, device: str = "cpu", compile: bool = False,
                     channels_last: bool | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """``mdeq.engine.loop.evaluate`` of the weights on the evaluation split, as training ran it.

    Returns evaluate's dict (top1, top5, loss, samples, nfe_forward, rel_residual_forward) with the data
    label and root, the weights' sha256 and the seconds taken. ``compile``: torch.compile f for the forward
    solve, as runs launched with ``--compile`` did (float rounding only); ``channels_last`` None: the run's
    choice (on a CPU by default). ``batch_size`` None: the config's ``data.eval_batch_size``.
    """
    dev = resolve_device(device)
    dataset, root, options = eval_dataset(trained, data_root, data_options, limit)
    model = build_trained(trained, dev)
    if compile and hasattr(model, "deq"):
        model.deq.compile_forward = True
    fmt = memory_format(trained, dev, channels_last)
    loader = DataLoader(dataset, batch_size=batch_size or trained.cfg.data.eval_batch_size, shuffle=False,
                        num_workers=0)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    result = evaluate(model, loader, num_classes=trained.cfg.data.num_classes, device=dev,
                      criterion=build_criterion(trained.cfg).to(dev), equilibrium=trained.cfg.solver.grad != "unrolled",
                      memory_format=fmt)
    return {**result, "seconds": time.perf_counter() - t0, "data_label": getattr(dataset, "source_label", "unknown"),
            "data_root": shown_path(root), "data_options": {k: shown_path(v) for k, v in options.items()},
            "sha256": trained.sha256, "params": params, "limit": limit, "memory_format": str(fmt).replace("torch.", ""),
            "compile": compile}


def logged_evaluation(run_dir: str | Path, global_step: int | None) -> tuple[dict | None, dict | None]:
    """(the metrics.csv row that evaluated the weights at ``global_step``, or None; the last evaluated row)."""
    log = read_run(run_dir)
    rows = log.epoch_rows if log is not None else []
    rows = [r for r in rows if r.get("step") not in (None, "") and r.get("eval_top1") not in (None, "")]
    match = next((r for r in rows if global_step is not None and int(float(r["step"])) == global_step), None)
    return match, (rows[-1] if rows else None)


def committed_weights(run_dir: str | Path, scratch: str | Path, *, from_tree: bool = False) -> tuple[Trained, dict]:
    """(the ``Trained`` of ``run_dir``'s checkpoint as git HEAD holds it (``from_tree``: the working tree's), a record
    of those weights), copied into ``scratch`` first: a training campaign replaces the working tree's checkpoint
    every few steps, and one measurement must read one set of weights (named by its sha256)."""
    dest = Path(scratch) / Path(run_dir).name / CHECKPOINT_NAME
    if from_tree:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(run_dir) / CHECKPOINT_NAME, dest)
        origin = f"{paths.rel(run_dir)}/{CHECKPOINT_NAME} (working tree)"
    else:
        checkpoint_at(run_dir, "HEAD", dest)
        origin = f"{paths.rel(run_dir)}/{CHECKPOINT_NAME} at git HEAD ({git_commit()[:10]})"
    trained = load_run(run_dir, dest)
    trained.origin = origin
    logged, last = logged_evaluation(run_dir, trained.global_step)
    record = {"run": trained.name, "checkpoint": origin, "sha256": trained.sha256, "size_bytes": trained.size_bytes,
              "config": trained.cfg.name, "global_step": trained.global_step, "epochs_trained": trained.epochs_trained,
              "weights": trained.weights_label(), "logged_top1_of_these_weights": None if logged is None else
              float(logged["eval_top1"]), "last_logged": None if last is None else
              {"epoch": int(float(last["epoch"])) + 1, "step": int(float(last["step"])),
               "top1": float(last["eval_top1"])}}
    return trained, record


# ----------------------------------------------------------------------------------------------
# The table of every committed checkpoint.

def _param_count(trained: Trained) -> int:
    options = RunOptions(out_dir=".", baseline=trained.baseline, baseline_options=trained.baseline_options)
    with torch.device("meta"):
        model = build_network(trained.cfg, options)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def checkpoint_table(folder: str | Path = RUNS) -> list[dict[str, Any]]:
    """One row per run folder under ``folder`` that holds a checkpoint: run, config, model, epochs trained, the
    logged test accuracy of these weights (None for a mid-epoch checkpoint, with the last logged one beside
    it) and its data, parameters, file size, sha256, and the command that evaluates it."""
    rows = []
    folder = Path(folder)
    for run_dir in sorted(p for p in folder.iterdir() if (p / CHECKPOINT_NAME).is_file()) if folder.is_dir() else []:
        trained = load_run(run_dir)
        match, last = logged_evaluation(run_dir, trained.global_step)
        rows.append({
            "run": trained.name, "config": trained.cfg.name, "model": trained.model_label,
            "global_step": trained.global_step, "epochs_planned": trained.cfg.train.epochs,
            "epochs_trained": None if trained.epochs_trained is None else round(trained.epochs_trained, 3),
            "weights": trained.weights_label(),
            "logged_top1": float(match["eval_top1"]) if match else None,
            "last_logged_top1": float(last["eval_top1"]) if last else None,
            "last_logged_epoch": int(float(last["epoch"])) + 1 if last else None,
            "last_logged_step": int(float(last["step"])) if last else None,
            "data": trained.data_label, "params": _param_count(trained), "size_bytes": trained.size_bytes,
            "sha256": trained.sha256,
            "command": f"python -m mdeq.evaluate {paths.rel(run_dir)}"})
    return rows


def _accuracy_cell(row: Mapping[str, Any]) -> str:
    if row["logged_top1"] is not None:
        return f"{row['logged_top1']:.2f}"
    if row["last_logged_top1"] is None:
        return "none logged yet (no epoch evaluated)"
    return (f"not logged for these weights (mid-epoch); last logged: {row['last_logged_top1']:.2f} after epoch "
            f"{row['last_logged_epoch']} (step {row['last_logged_step']})")


def format_checkpoint_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``checkpoint_table`` as the Markdown table ``docs/trained_models.md`` shows."""
    lines = ["| run | config (model) | weights | test top-1 (%) of these weights, logged | data | parameters | "
             "file | sha256 | evaluate |", "|---|---|---|---|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| `{r['run']}` | `{r['config']}` ({r['model']}) | {r['weights']} | {_accuracy_cell(r)} | "
                     f"{r['data'] or 'unknown'} | {r['params']:,} | {r['size_bytes'] / 1e6:.1f} MB | "
                     f"`{r['sha256']}` | `{r['command']}` |")
    return "\n".join(lines)


def write_checkpoint_table(path: str | Path | None = None, folder: str | Path = RUNS) -> bool:
    """Rewrite ``path`` (default ``CHECKPOINT_TABLE``) with the table of the checkpoints under ``folder``; True when
    the file changed. Why a file: every chunk of the campaign moves a checkpoint's step and sha256, and the page
    that copied ``--table``'s output by hand went stale with it."""
    path = Path(path or CHECKPOINT_TABLE)
    new = ("<!-- written by `python -m mdeq.reproduce --readme` (`python -m mdeq.evaluate --table`); do not edit -->\n\n"
           + format_checkpoint_table(checkpoint_table(folder)) + "\n")
    if path.is_file() and path.read_text() == new:
        return False
    path.write_text(new)
    return True
