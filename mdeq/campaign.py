"""How a campaign trains the registry's runs in resumable chunks within a budget: ``python -m mdeq.campaign``.

    python -m mdeq.campaign --budget 150m     # continue the campaign for 150 minutes
    python -m mdeq.campaign --status          # where each run stands
    python -m mdeq.campaign --dry-run         # the next training command
    python -m mdeq.campaign --budget 30m --run cifar10_single_stream   # one run, out of order

Why: the paper's protocol is days of CPU time (Table 1's MDEQ-small is about 25 CPU-hours), and work
on this machine comes in stretches of a few hours that can end without warning. One command
continues the whole campaign for a wall-clock budget:

- it takes the first run of the campaign (``mdeq/campaigns/<name>.yaml``) that has not finished,
  continues it from its checkpoint with ``python -m mdeq.train --resume``, and goes on to the next
  when one finishes; ``--run <run>`` continues one run alone, out of that order (to start a later run
  while an earlier one is unfinished: each resumes exactly from its own checkpoint);
- the child checkpoints every ``checkpoint_every`` steps and, through ``--stop-at``, stops at a
  checkpoint before a step or an evaluation that would pass the budget's end (never mid-write);
  SIGTERM or Ctrl-C on the campaign asks the child for the same clean stop;
- after every checkpoint the run's small logs (``metrics.csv``, ``steps.jsonl``, ``provenance.json``,
  ``final.json``) and its latest ``checkpoint.pt`` are copied atomically into ``results/runs/<run>/``,
  so committing that folder keeps the campaign, and a fresh clone continues it from there;
- ``side_by_side: 2`` in the campaign file trains the first two unfinished runs at once, each on half
  the threads (on a 2-core CPU two 1-thread runs train more steps per hour in all than one 2-thread
  run: ``benchmarks/campaign_throughput.py``); when one finishes the next takes its place;
- a DEQ run whose training solves end further from the fixed point than ``residual_limit`` (its last
  epoch's mean forward residual) is held: stopped at its next step, no chunk started, ``--status`` says
  why, until the campaign file raises the limit for it (``residual_limit_run``) once the cause is known;
- one campaign process at a time (a lock file in ``runs/campaign/``); a run's protocol is never
  shortened: an unfinished run is reported as "epoch k of 50" (``--status``);
- each call's chunks run the code of the last commit, from a git worktree in ``runs/campaign/code/``
  (``code="head"``, the default), so editing the working tree while the campaign runs never changes
  a run mid-way and every chunk's provenance names a clean commit; ``--code tree`` runs the working
  tree instead.

Work folders are ``runs/campaign/<run>/`` (not committed; ``train.log`` is there).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import fcntl
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import yaml

from mdeq.engine import paths
from mdeq.core.config import load_config
from mdeq.engine.paths import rel
from mdeq.engine.rundir import restore_run, sync_run
from mdeq.engine.runlog import chunk_hours, last_logged_step, now, read_run
from mdeq.paper.runs import config_name, spec as run_spec

__all__ = ["CampaignSpec", "load_campaign", "run_status", "held", "train_command", "run_campaign", "main"]

CAMPAIGNS = Path(__file__).resolve().parent / "campaigns"
WORK = paths.RUNS / "campaign"
RESULTS = paths.RESULTS / "runs"
_POLL_S = 10.0
_GRACE_S = 15 * 60  # how long past the budget a child may run (an evaluation it estimated too short)


@dataclass(frozen=True)
class CampaignSpec:
    """A campaign file: which runs (registry keys), in order, and how their chunks run on this machine."""

    name: str
    runs: tuple[str, ...]
    variant: str = "paper"
    data_root: str = "data/cifar10"
    data_options: dict = field(default_factory=dict)
    threads: int = 2
    workers: int = 0
    checkpoint_every: int = 50
    # Runs whose steps are slow checkpoint more often, so that a kill loses minutes, not an hour.
    checkpoint_every_run: dict = field(default_factory=dict)
    log_every: int = 50
    compile: bool = False  # mdeq.train --compile: the forward solve's f compiled (same numbers to rounding)
    # How many runs train at once, each on threads // side_by_side threads (two 1-thread runs train more
    # steps per hour in all than one 2-thread run on a 2-core CPU: benchmarks/campaign_throughput.py).
    side_by_side: int = 1
    # A DEQ run whose training solves end further from the fixed point than this (the mean forward residual
    # of its last evaluated epoch's implicit steps, metrics.csv ``rel_residual_forward``) is held: the
    # campaign stops it at its next step and starts no chunk of it, so that nobody spends more hours on a
    # curve before finding out why. ``residual_limit_run`` raises the limit for one run once that is done.
    residual_limit: float | None = None
    residual_limit_run: dict = field(default_factory=dict)
    # For tests and smoke campaigns only; a campaign that reproduces the paper sets none of these.
    overrides: tuple[str, ...] = ()
    limit_train: int | None = None
    limit_eval: int | None = None


def load_campaign(name_or_path: str | Path) -> CampaignSpec:
    """A campaign by name (``mdeq/campaigns/<name>.yaml``) or YAML path; unknown keys and runs are errors."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CAMPAIGNS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CAMPAIGNS.glob("*.yaml"))
        raise FileNotFoundError(f"no campaign {str(name_or_path)!r}: expected a YAML path or one of {known}")
    raw = yaml.safe_load(path.read_text()) or {}
    valid = {f.name for f in fields(CampaignSpec)}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ValueError(f"{path.name}: unknown key(s) {unknown}; valid keys: {sorted(valid)}")
    raw["runs"] = tuple(raw.get("runs") or ())
    raw["overrides"] = tuple(raw.get("overrides") or ())
    for key in raw["runs"]:
        run_spec(key)  # KeyError naming the known runs
    for per_run in ("checkpoint_every_run", "residual_limit_run"):
        stray = sorted(set(raw.get(per_run) or {}) - set(raw["runs"]))
        if stray:
            raise ValueError(f"{path.name}: {per_run} names {stray}, which are not among its runs")
    side, threads = raw.get("side_by_side", 1), raw.get("threads", 2)
    if not (isinstance(side, int) and isinstance(threads, int) and 1 <= side <= threads):
        raise ValueError(f"{path.name}: side_by_side must be an integer from 1 to threads ({threads}), got {side!r}: "
                         f"each run side by side needs at least one thread")
    return CampaignSpec(**raw)


# ----------------------------------------------------------------------------------------------
# One run's state, command and files.

def _epochs_planned(spec: CampaignSpec, key: str) -> int:
    run = run_spec(key)
    return load_config(config_name(run, spec.variant), [*run.overrides, *spec.overrides]).train.epochs


def run_status(spec: CampaignSpec, key: str, results: Path = RESULTS) -> dict[str, Any]:
    """What ``results/runs/<key>/`` holds: epochs evaluated, the last evaluation, finished or not."""
    folder = Path(results) / key
    run = read_run(folder)
    rows = run.epoch_rows if run is not None else []
    last = rows[-1] if rows else {}
    return {
        "run": key, "epochs_done": run.epochs_done if run is not None else 0,
        "epochs_planned": _epochs_planned(spec, key),
        "finished": run is not None and run.finished,
        "last_eval_top1": float(last["eval_top1"]) if last.get("eval_top1") else None,
        "last_step": max(int(last["step"]) if last.get("step") else 0, last_logged_step(folder)),
        "hours": sum(float(r["epoch_time_s"]) for r in rows if r.get("epoch_time_s")) / 3600.0,
        "chunk_hours": chunk_hours(folder),
        "has_checkpoint": (folder / "checkpoint.pt").is_file(),
        "forward_residual": (_last_residual(run) or (None, None))[1],
        "residual_limit": spec.residual_limit_run.get(key, spec.residual_limit),
        "held": held(spec, key, results),
    }


def _last_residual(run) -> tuple[int, float] | None:
    """(epoch, 1-based; mean forward residual of its implicit steps) of a run's last implicit epoch, or None."""
    rows = [r for r in (run.epoch_rows if run is not None else [])
            if r.get("phase") == "implicit" and r.get("rel_residual_forward") not in (None, "")]
    return (int(float(rows[-1]["epoch"])) + 1, float(rows[-1]["rel_residual_forward"])) if rows else None


def held(spec: CampaignSpec, key: str, results: Path = RESULTS) -> str | None:
    """Why run ``key`` must not go on (its forward residual past the campaign's limit), or None."""
    limit = spec.residual_limit_run.get(key, spec.residual_limit)
    last = _last_residual(read_run(Path(results) / key)) if limit is not None else None
    if last is None or not last[1] > limit:
        return None
    return (f"held: the forward residual of epoch {last[0]} is {last[1]:.3g}, past the campaign's limit {limit:g}; "
            f"find out why, then raise residual_limit_run for {key} in the campaign file, saying where the check is")


def train_command(spec: CampaignSpec, key: str, *, stop_at: float | None, data_root: str | None = None,
                  python: str | None = None) -> list[str]:
    """The ``python -P -m mdeq.train`` line that continues run ``key`` in ``runs/campaign/<key>/``.

    Paths are relative to the repository (the child runs there), so logs name no machine's folders.
    ``-P`` keeps the working directory off ``sys.path``: the child imports the ``mdeq`` that
    ``PYTHONPATH`` names (the code worktree), not the working tree's.
    """
    run = run_spec(key)
    argv = [python or sys.executable, "-P", "-m", "mdeq.train", "--config", config_name(run, spec.variant),
            "--data-root", str(data_root or spec.data_root), "--out", rel(WORK / key), "--resume",
            "--threads", str(spec.threads), "--workers", str(spec.workers),
            "--checkpoint-every", str(spec.checkpoint_every_run.get(key, spec.checkpoint_every)),
            "--log-every", str(spec.log_every), "--no-progress"]
    if spec.data_options:
        argv += ["--data-option", *(f"{k}={v}" for k, v in spec.data_options.items())]
    if run.overrides or spec.overrides:
        argv += ["--set", *run.overrides, *spec.overrides]
    for name in ("limit_train", "limit_eval"):
        if getattr(spec, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(spec, name))]
    if run.baseline:
        argv += ["--baseline", run.baseline]
    if spec.compile and not run.baseline:
        argv += ["--compile"]
    if stop_at is not None:
        argv += ["--stop-at", f"{stop_at:.0f}"]
    return argv


def _is_path(value) -> bool:
    return isinstance(value, str) and ("/" in value or value.endswith(".npz"))


def code_worktree(commit: str | None = None) -> tuple[Path, str]:
    """A git worktree of ``commit`` (default HEAD) in ``runs/campaign/code/``: the code a chunk runs."""
    def git(*args, cwd=paths.ROOT):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()

    sha = git("rev-parse", commit or "HEAD")
    tree = WORK / "code"
    if not (tree / ".git").exists():
        git("worktree", "prune")
        git("worktree", "add", "--detach", str(tree), sha)
    elif git("rev-parse", "HEAD", cwd=tree) != sha:
        git("checkout", "--quiet", "--detach", sha, cwd=tree)
    return tree, sha


def _runs(spec: CampaignSpec, only: str | Sequence[str] | None) -> tuple[str, ...]:
    """The runs to continue, in order: all of the campaign's, or those of ``only`` (each one of them), in its order."""
    if not only:
        return spec.runs
    only = (only,) if isinstance(only, str) else tuple(only)
    for key in only:
        if key not in spec.runs:
            raise ValueError(f"--run {key!r} is not a run of campaign {spec.name!r}; its runs: {list(spec.runs)}")
    return tuple(dict.fromkeys(only))


def _check_data(spec: CampaignSpec, data_root: str | None) -> None:
    root = paths.ROOT / (data_root or spec.data_root)
    if not root.exists():
        raise FileNotFoundError(f"the campaign's data root {rel(root)} does not exist: put the data set there "
                                f"(for CIFAR-10 JPEG-q75, the file cifar10_jpeg_q75_batch_order.npz) or pass --data-root")
    for key, value in spec.data_options.items():
        if _is_path(value) and not (paths.ROOT / value).exists():
            raise FileNotFoundError(f"data_options.{key} names {value}, which does not exist: every chunk of a run "
                                    f"must read the same data")


# ----------------------------------------------------------------------------------------------
# The campaign loop.

def parse_budget(text: str) -> float:
    """``"150m"``, ``"2.5h"``, ``"90s"`` or plain minutes, in seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise ValueError(f"--budget must look like 150m, 2.5h or 90s, got {text!r}")
    value, unit = float(m.group(1)), m.group(2) or "m"
    return value * {"s": 1, "m": 60, "h": 3600}[unit]


def _log(line: str, logfile: Path) -> None:
    stamp = now()
    print(f"[campaign {stamp}] {line}", flush=True)
    with open(logfile, "a") as fh:
        fh.write(f"{stamp} {line}\n")


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise RuntimeError(f"another campaign holds {path}; wait for it or stop it (its pid is in that file)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    try:
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def run_campaign(spec: CampaignSpec, budget_s: float, *, data_root: str | None = None,
                 results: Path = RESULTS, min_start_s: float = 60.0, code: str = "head",
                 only: str | Sequence[str] | None = None) -> list[dict]:
    """Continue ``spec`` for ``budget_s`` seconds of wall-clock time; returns each run's status after.

    Up to ``spec.side_by_side`` runs train at once (the first unfinished ones, in order), each on
    ``spec.threads // spec.side_by_side`` threads; when one finishes, the next unfinished run takes its
    place. No run is started or continued with less than ``min_start_s`` of the budget left, and none
    after a run has stopped unfinished (the budget's end or a stop request). ``code``: "head" runs every
    chunk of this call from one worktree of the last commit, "tree" from the working tree. ``only`` (runs
    of the campaign) continues those runs alone, in its order, out of the campaign's: a later run can start
    while an earlier one is unfinished, no other run takes the place of one that finishes (that core is free
    for other work), and each resumes exactly from its own checkpoint.
    """
    if code not in ("head", "tree"):
        raise ValueError(f"code must be 'head' or 'tree', got {code!r}")
    pending = list(_runs(spec, only))
    results = Path(results)
    end = time.time() + budget_s
    logfile = WORK / f"{spec.name}.log"
    stop = {"asked": False}

    def ask_stop(signum, frame):
        stop["asked"] = True

    _check_data(spec, data_root)
    old = {s: signal.signal(s, ask_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    active: list[_Chunk] = []
    try:
        with _lock(WORK / ".lock"):
            _log(f"{spec.name}: budget {budget_s / 60:.0f} min, until "
                 f"{_dt.datetime.fromtimestamp(end, _dt.timezone.utc).isoformat(timespec='seconds')}"
                 + (f"; {n} runs side by side" if (n := min(spec.side_by_side, len(pending))) > 1 else ""), logfile)
            code_dir, halted, failed = None, False, None
            while True:
                while (len(active) < spec.side_by_side and pending and not (halted or failed or stop["asked"])
                       and time.time() <= end - min_start_s):
                    key = pending.pop(0)
                    status = run_status(spec, key, results)
                    if status["finished"]:
                        continue
                    if status["held"]:
                        _log(f"{key}: {status['held']}", logfile)
                        continue
                    if code_dir is None:
                        code_dir = paths.ROOT
                        if code == "head":  # once per call: a running chunk's code never changes under it
                            code_dir, sha = code_worktree()
                    if code == "head":
                        _log(f"{key}: code of commit {sha} (worktree {rel(code_dir)})", logfile)
                    work = WORK / key
                    if restore_run(results / key, work):
                        _log(f"{key}: restored from {results / key}", logfile)
                    active.append(_start_chunk(spec, key, end, work, results / key, data_root, logfile, code_dir))
                if not active:
                    break
                _wait_any(active, _POLL_S)
                for chunk in list(active):
                    reason = None if chunk.signalled else held(spec, chunk.key, results)
                    if reason:
                        _log(f"{chunk.key}: {reason}", logfile)
                    rc = chunk.watch(stop["asked"] or failed is not None or reason is not None, end, logfile)
                    if rc is None:
                        continue
                    active.remove(chunk)
                    status = run_status(spec, chunk.key, results)
                    _log(f"{chunk.key}: exit code {rc}; epoch {status['epochs_done']} of {status['epochs_planned']}"
                         + (f", last top-1 {status['last_eval_top1']:.2f}%" if status["last_eval_top1"] is not None
                            else ""), logfile)
                    if rc != 0 and failed is None:
                        failed = f"{chunk.key}: mdeq.train exited with code {rc}; see {chunk.work / 'train.log'}"
                    elif not status["finished"] and not status["held"]:
                        halted = True  # stopped at the budget's end (or asked to): the next stretch continues here
                    # a held run's place goes to the next unfinished run, as at the start of a call
            if failed:
                raise RuntimeError(failed)
    finally:
        for chunk in active:  # only after an exception in this process: the children stop at a checkpoint
            chunk.proc.send_signal(signal.SIGTERM)
            chunk.proc.wait()
            chunk.close()
        for s, h in old.items():
            signal.signal(s, h)
    return [run_status(spec, key, results) for key in spec.runs]


@dataclass
class _Chunk:
    """One ``mdeq.train`` child of the campaign: it syncs the run's files after each checkpoint it writes."""

    key: str
    work: Path
    dest: Path
    proc: subprocess.Popen
    out: Any
    seen: float | None = None
    signalled: bool = False

    def watch(self, stopping: bool, end: float, logfile: Path) -> int | None:
        """Sync a new checkpoint; ask the child to stop when told or far past the budget; its exit code once it has exited."""
        rc = self.proc.poll()
        ckpt = self.work / "checkpoint.pt"
        mtime = ckpt.stat().st_mtime if ckpt.is_file() else None
        if rc is None and mtime is not None and mtime != self.seen:  # train writes its logs before each checkpoint
            sync_run(self.work, self.dest)
            self.seen = mtime
        if rc is None and (stopping or time.time() > end + _GRACE_S) and not self.signalled:
            self.proc.send_signal(signal.SIGTERM)  # the child stops at its next step, with a checkpoint
            self.signalled = True
            _log(f"{self.key}: asked the run to stop at its next step", logfile)
        if rc is not None:
            sync_run(self.work, self.dest)
            self.close()
        return rc

    def close(self) -> None:
        self.out.close()


def _per_run(spec: CampaignSpec) -> CampaignSpec:
    """The campaign as one of its chunks runs: on ``threads // side_by_side`` threads."""
    return dataclasses.replace(spec, threads=max(1, spec.threads // spec.side_by_side))


def _start_chunk(spec, key, end, work, dest, data_root, logfile, code_dir) -> _Chunk:
    child = _per_run(spec)
    threads = child.threads
    cmd = train_command(child, key, stop_at=end, data_root=data_root)
    work.mkdir(parents=True, exist_ok=True)
    _log(f"{key}: $ {shlex.join(cmd)}", logfile)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code_dir)}
    out = open(work / "train.log", "a")
    proc = subprocess.Popen(cmd, cwd=paths.ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    return _Chunk(key, work, dest, proc, out)


def _wait_any(chunks: Sequence[_Chunk], timeout: float) -> None:
    """Until one child exits or ``timeout`` seconds pass."""
    if len(chunks) == 1:
        with contextlib.suppress(subprocess.TimeoutExpired):
            chunks[0].proc.wait(timeout=timeout)
        return
    deadline = time.time() + timeout
    while time.time() < deadline and all(c.proc.poll() is None for c in chunks):
        time.sleep(0.2)


# ----------------------------------------------------------------------------------------------
# Command line.

def _print_status(statuses: Sequence[dict]) -> None:
    width = max((len(s["run"]) for s in statuses), default=0)
    for s in statuses:
        top1 = f"{s['last_eval_top1']:.2f}%" if s["last_eval_top1"] is not None else "-"
        state = "finished" if s["finished"] else ("not started" if not s["epochs_done"] and not s["has_checkpoint"]
                                                  else "unfinished")
        print(f"{s['run']:{width}s} epoch {s['epochs_done']:>2d} of {s['epochs_planned']} ({state}); "
              f"last test top-1 {top1}; step {s['last_step']}; {s['hours']:.2f} h of training epochs, "
              f"{s['chunk_hours']:.2f} h of chunks" + (f"; {s['held']}" if s.get("held") else _residual_note(s)))


def _residual_note(s: dict) -> str:
    """How close an unfinished DEQ run is to the campaign's residual limit (its last epoch's forward residual)."""
    if s.get("forward_residual") is None or s["finished"]:
        return ""
    limit = f" (limit {s['residual_limit']:.0e})" if s.get("residual_limit") is not None else ""
    return f"; forward residual {s['forward_residual']:.2e}{limit}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdeq.campaign", description=__doc__.split("\n\n")[0])
    p.add_argument("--campaign", default="table1_cifar10_cpu", help="a name in mdeq/campaigns or a YAML path")
    p.add_argument("--budget", default=None, help="wall-clock budget, e.g. 150m or 2.5h")
    p.add_argument("--data-root", default=None, help="override the campaign's data_root")
    p.add_argument("--code", choices=("head", "tree"), default="head",
                   help="run each chunk from a worktree of the last commit (default) or from the working tree")
    p.add_argument("--run", action="append", default=None, metavar="RUN",
                   help="continue only this run of the campaign, out of its order (e.g. start the next run early); "
                        "repeat it for several runs, side by side as the campaign allows")
    p.add_argument("--status", action="store_true", help="print where each run stands and exit")
    p.add_argument("--dry-run", action="store_true", help="print the next command and exit")
    args = p.parse_args(argv)
    try:
        spec = load_campaign(args.campaign)
        runs = _runs(spec, args.run)
        if args.status:
            _print_status([run_status(spec, key) for key in spec.runs])
            return 0
        if args.dry_run:
            todo = [k for k in runs if not run_status(spec, k)["finished"]]
            print(shlex.join(train_command(_per_run(spec), todo[0], stop_at=None, data_root=args.data_root)) if todo
                  else f"{' and '.join(args.run or ['every run of the campaign'])} has finished")
            return 0
        if args.budget is None:
            raise ValueError("--budget is required (e.g. --budget 150m), or pass --status / --dry-run")
        statuses = run_campaign(spec, parse_budget(args.budget), data_root=args.data_root, code=args.code,
                                only=args.run)
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    _print_status(statuses)
    return 0


if __name__ == "__main__":
    sys.exit(main())
