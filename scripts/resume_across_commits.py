"""Does commit B continue a committed run exactly as commit A does? Both resume it for a few steps; compare.

Why: a refactor of the engine must leave a running campaign's resume bit-identical (same losses, same
weights, same optimiser state). This copies a committed run folder (as git HEAD holds it) twice, resumes
each copy with ``python -m mdeq.train`` as the campaign launches it (``mdeq.campaign.train_command``, on the
campaign's per-run thread count) from a git worktree of each commit, for ``--steps`` optimiser steps
(``--max-steps``: the run then evaluates its partial epoch, so the evaluation is compared too), and compares
the two checkpoints tensor by tensor and the two logs record by record.

    python scripts/resume_across_commits.py 1427301 HEAD --run cifar10_mdeq_small --steps 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "resume_across_commits"
FILES = ("checkpoint.pt", "metrics.csv", "steps.jsonl", "provenance.json")


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def worktree(commit: str) -> tuple[Path, str]:
    sha = git("rev-parse", commit)
    tree = WORK / f"code_{sha[:10]}"
    if not (tree / ".git").exists():
        git("worktree", "add", "--detach", str(tree), sha)
    return tree, sha


def resume(commit: str, run: str, steps: int, campaign: str) -> tuple[Path, str]:
    sys.path.insert(0, str(ROOT))
    from mdeq.campaign import _per_run, load_campaign, train_command

    code, sha = worktree(commit)
    out = WORK / f"run_{sha[:10]}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in FILES:  # the run as the last commit holds it (the campaign rewrites the working tree's copy)
        (out / name).write_bytes(subprocess.run(["git", "show", f"HEAD:results/runs/{run}/{name}"], cwd=ROOT,
                                                check=True, capture_output=True).stdout)
    start = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["global_step"]
    spec = _per_run(load_campaign(campaign))
    cmd = train_command(spec, run, stop_at=None)
    cmd[cmd.index("--out") + 1] = str(out.relative_to(ROOT))
    cmd += ["--max-steps", str(start + steps)]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(spec.threads)}
    print(f"{sha[:10]}: resume {run} at step {start} for {steps} steps ({spec.threads} thread(s))", flush=True)
    with open(out / "train.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=log, stderr=subprocess.STDOUT)
    return out, sha


def differences(a, b, where: str = "") -> list[str]:
    """Every place where two nested checkpoint values differ (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="reference commit")
    p.add_argument("b", help="commit to compare")
    p.add_argument("--run", default="cifar10_mdeq_small", help="a run of the campaign, committed in results/runs/")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--campaign", default="table1_cifar10_cpu")
    args = p.parse_args(argv)
    (a_dir, a_sha), (b_dir, b_sha) = (resume(c, args.run, args.steps, args.campaign) for c in (args.a, args.b))
    ca, cb = (torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True) for d in (a_dir, b_dir))
    ignored = {".git_commit"}  # each checkpoint names the commit that wrote it
    diff = [d for d in differences(ca, cb) if d not in ignored]
    la, lb = ([json.loads(x) for x in (d / "steps.jsonl").read_text().splitlines()] for d in (a_dir, b_dir))
    timing = ("step_time_ms", "peak_mem_mb")
    log_diff = [i for i, (x, y) in enumerate(zip(la, lb))
                if {k: v for k, v in x.items() if k not in timing} != {k: v for k, v in y.items() if k not in timing}]
    ra, rb = ((d / "metrics.csv").read_text().splitlines()[-1].split(",") for d in (a_dir, b_dir))
    header = (a_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    keep = [i for i, h in enumerate(header) if h in ("epoch", "step", "train_loss", "train_acc", "eval_top1",
                                                      "eval_top5", "eval_loss", "eval_nfe_forward",
                                                      "eval_rel_residual_forward")]
    eval_same = [ra[i] for i in keep] == [rb[i] for i in keep]
    print(f"checkpoints at step {ca['global_step']} / {cb['global_step']}: "
          + ("identical tensor by tensor (model, optimiser, scheduler, RNG states)" if not diff
             else f"differ at {diff[:10]}"))
    print(f"steps.jsonl: {len(la)} / {len(lb)} records, " + ("identical apart from timings" if not log_diff
                                                              and len(la) == len(lb) else f"differ at {log_diff}"))
    print("last metrics.csv row (the partial epoch's evaluation): "
          + ("identical" if eval_same else f"{[ra[i] for i in keep]} vs {[rb[i] for i in keep]}")
          + f"; eval top-1 {ra[header.index('eval_top1')]}")
    return 0 if not diff and not log_diff and len(la) == len(lb) and eval_same else 1


if __name__ == "__main__":
    sys.exit(main())
