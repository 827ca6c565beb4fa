"""Does the CPU campaign train more steps per hour with one run on all threads or several runs side by side?

Each layout runs the campaign's own ``mdeq.train`` command (``mdeq.campaign.train_command``: the
campaign's data, channels_last, the compiled f; the code of the last commit, as a chunk runs it) for a few optimiser steps, resumed from the run's
committed checkpoint so that every step is a real step of the run at its present stage (implicit
phase, trained weights). ``1x2`` is one process on 2 threads, ``2x1`` two processes at once on 1
thread each; the layouts alternate for ``--rounds`` rounds so that drift in the machine's speed hits
both. The measure is the campaign's total throughput: optimiser steps per hour summed over the
processes, from the median ``step_time_ms`` that each process logs for its steps after the first
``--skip`` (compilation); each process is killed once it has logged its steps (its checkpoint is a
copy in ``runs/benchmarks/``, never the run's own). The campaign itself must be paused (its lock free): a benchmark beside it
measures nothing.

    python benchmarks/campaign_throughput.py      # results/benchmarks/campaign_throughput_cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, provenance, write_json  # noqa: E402

from mdeq.campaign import RESULTS, WORK, code_worktree, load_campaign, train_command  # noqa: E402
from mdeq.engine.rundir import restore_run  # noqa: E402
from mdeq.engine.checkpoint import load_checkpoint  # noqa: E402

LAYOUTS = {"1x2": (1, 2), "2x1": (2, 1)}  # name: (processes, threads each)


def _campaign_idle() -> bool:
    lock = WORK / ".lock"
    if not lock.exists():
        return True
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
    return True


def _logged(out: Path, start: int) -> int:
    path = out / "steps.jsonl"
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written
            n += json.loads(line)["step"] > start
    return n


def _run_layout(args, spec, code: Path, name: str, round_: int) -> dict:
    processes, threads = LAYOUTS[name]
    spec = dataclasses.replace(spec, threads=threads, log_every=1, checkpoint_every=10**6,
                               checkpoint_every_run={})
    procs = []
    for i in range(processes):
        out = ROOT / "runs" / "benchmarks" / "campaign_throughput" / f"{name}_r{round_}_p{i}"
        shutil.rmtree(out, ignore_errors=True)
        if not restore_run(RESULTS / args.run, out):
            raise SystemExit(f"no committed checkpoint in {RESULTS / args.run} to start from")
        start = int(load_checkpoint(out / "checkpoint.pt", map_location="cpu")["global_step"])
        cmd = train_command(spec, args.run, stop_at=None)
        cmd[cmd.index("--out") + 1] = str(out)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(code)}
        log = open(out / "train.log", "a")
        procs.append((out, start, log, subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                                        env=env)))
    t0 = time.time()
    rows = []
    for out, start, log, proc in procs:
        # killed once it has logged its steps: the evaluation that ends a --max-steps run is not timed here
        while _logged(out, start) < args.skip + args.steps:
            if proc.poll() is not None:
                raise SystemExit(f"{name}: mdeq.train exited with {proc.returncode}; see {out / 'train.log'}")
            time.sleep(0.5)
        proc.kill()
        proc.wait()
        log.close()
        steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
        steps = [s for s in steps if s["step"] <= start + args.skip + args.steps]
        ms = [s["step_time_ms"] for s in steps if s["step"] > start + args.skip]
        rows.append({"from_step": start, "timed_steps": len(ms), "phase": steps[-1]["phase"],
                     "median_step_ms": statistics.median(ms), "mean_step_ms": statistics.fmean(ms),
                     "nfe_forward": statistics.fmean(s["nfe_forward"] for s in steps if s["step"] > start + args.skip)})
        shutil.rmtree(out)  # checkpoints of a benchmark are not kept
    wall = time.time() - t0
    per_hour = sum(3600_000.0 / r["median_step_ms"] for r in rows)
    times = ", ".join(f"{r['median_step_ms']:.0f}" for r in rows)
    print(f"round {round_} {name}: {times} ms a step; "
          f"{per_hour:.0f} steps/hour in all", flush=True)
    return {"layout": name, "round": round_, "processes": processes, "threads_each": threads,
            "steps_per_hour_total": per_hour, "wall_s": wall, "per_process": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--campaign", default="table1_cifar10_cpu")
    p.add_argument("--run", default="cifar10_mdeq_small", help="the run whose checkpoint every process resumes")
    p.add_argument("--steps", type=int, default=15, help="timed steps per process")
    p.add_argument("--skip", type=int, default=3, help="first steps not timed (torch.compile, allocator)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results") / "benchmarks" / "campaign_throughput_cpu.json")
    args = p.parse_args()
    if not _campaign_idle():
        raise SystemExit("a campaign is running (runs/campaign/.lock is held): stop it at a checkpoint first")
    spec = load_campaign(args.campaign)
    code, sha = code_worktree()  # the code the campaign's chunks run: the last commit
    results = [_run_layout(args, spec, code, name, r) for r in range(args.rounds) for name in LAYOUTS]
    total = {name: statistics.median(x["steps_per_hour_total"] for x in results if x["layout"] == name)
             for name in LAYOUTS}
    record = {"benchmark": "campaign_throughput", "run": args.run, "campaign": args.campaign, "code_commit": sha,
              "layouts": results, "steps_per_hour_median": total,
              "ratio_2x1_over_1x2": total["2x1"] / total["1x2"],
              "provenance": provenance(args, "cpu")}
    write_json(ROOT / args.out, record)
    print(f"steps per hour: 1x2 {total['1x2']:.0f}, 2x1 {total['2x1']:.0f} "
          f"(ratio {record['ratio_2x1_over_1x2']:.3f}); {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
