"""How hard MDEQ-small's fixed point is to solve at each committed checkpoint of the Table 1 campaign.

Why: the campaign's logged forward residual at the end of the 15-step training solve grows over the
epochs (``rel_residual_forward`` in ``results/runs/cifar10_mdeq_small/metrics.csv``), and issue 10 asks
that such a curve be explained before more hours are spent. This script loads every checkpoint of the
run that git history holds (plus the working tree's), and on the same training images solves each
checkpoint's equilibrium with Broyden (the config's m) for a longer budget, in train mode (the dropout
mask the training solve sees, drawn from the same seed for every checkpoint) and in eval mode. Per
checkpoint it records the batch-mean relative residual ||f(z) - z|| / ||f(z)|| of the lowest iterate
within the training budget (15 steps, as ``rel_residual_forward`` logs it) and within the whole budget,
and the f evaluations until the batch mean first falls below 1e-3 and 1e-4; per sample, where each solve
ended (a batch mean can hide a few samples whose solve stalls); with ``--spectral-radius``, the power-method
estimate of rho(J_f) at the returned iterate. A fixed point that is still reached with more steps, at a
growing cost, is the DEQ behaviour the released code's users report late in training (the maintainer calls
a relative residual below 0.05 "good"); a residual that stalls would be a defect of the model or of the
solver, which ``--memory`` (Broyden's history size m) tells apart.

    python studies/equilibrium_over_training.py        # results/equilibrium_over_training.json
    python studies/equilibrium_over_training.py --keep --every 1500   # add newer checkpoints only, thinned
    python studies/equilibrium_over_training.py --budget 200 --num-batches 1 --every 4000 \
        --spectral-radius 100 --memory 40 --out results/equilibrium_long_solve_m40.json
"""
from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
from pathlib import Path

import torch

from mdeq.engine.cli import parse_kv
from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json
from mdeq.engine.checkpoint import load_pretrained
from mdeq.core.config import load_config
from mdeq.engine.data import build_dataset
from mdeq.paper.measure.solver_traces import trace_overrides
from mdeq.core.model import build_model

RUN = "results/runs/cifar10_mdeq_small"
DEFAULTS = {"memory": 12, "spectral_radius_iters": 0}  # what older measurements, which do not record them, used
DEST = {"spectral_radius_iters": "spectral_radius"}  # JSON key -> argument
THRESHOLDS = (1e-3, 1e-4)


def checkpoints(run: str) -> list[tuple[str, dict]]:
    """(where, checkpoint) for each distinct global step: every commit of ``<run>/checkpoint.pt``, then the tree's."""
    path = f"{run}/checkpoint.pt"
    commits = subprocess.run(["git", "log", "--format=%H", "--", path], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    found: dict[int, tuple[str, dict]] = {}
    for sha in reversed(commits):
        blob = subprocess.run(["git", "show", f"{sha}:{path}"], cwd=ROOT, capture_output=True)
        if blob.returncode != 0:  # the file was deleted in this commit
            continue
        ckpt = torch.load(io.BytesIO(blob.stdout), map_location="cpu", weights_only=True)
        found.setdefault(int(ckpt["global_step"]), (sha[:10], ckpt))
    tree = ROOT / path
    if tree.is_file():
        ckpt = torch.load(tree, map_location="cpu", weights_only=True)
        found.setdefault(int(ckpt["global_step"]), ("working tree", ckpt))
    return [found[step] for step in sorted(found)]


def kept_rows(path: Path, args) -> list[dict]:
    """The rows of an earlier measurement at ``path``, refused (one line) if it was made with other settings."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    for key in ("config", "run", "batch", "num_batches", "budget", "memory", "spectral_radius_iters"):
        made, now = old.get(key, DEFAULTS.get(key)), getattr(args, DEST.get(key, key))
        if made != now:
            raise SystemExit(f"{path}: made with {key}={made!r}, not {now!r}; "
                             "measure again without --keep or write to another --out")
    return old["rows"]


def thinned(found: list[tuple[str, dict]], rows: list[dict], every: int) -> list[tuple[str, dict]]:
    """The checkpoints after the last measured row, each ``every`` steps or more after the previous one kept;
    the latest checkpoint is always kept."""
    last = max((r["global_step"] for r in rows), default=-1)
    later = [(w, c) for w, c in found if int(c["global_step"]) > last]
    out = []
    for i, (where, ckpt) in enumerate(later):
        step = int(ckpt["global_step"])
        if i == len(later) - 1 or last < 0 or step - last >= every:
            out.append((where, ckpt))
            last = step
    return out


def training_batches(root: Path, options: dict, batch: int, num: int, seed: int) -> list[torch.Tensor]:
    """``num`` batches of training images (no labels needed), the same for every checkpoint."""
    ds = build_dataset("cifar10", root, "train", augment=False, **options)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[:batch * num].tolist()
    images = torch.stack([ds[i][0] for i in idx])
    return list(images.split(batch))


def evals_below(mean: torch.Tensor, threshold: float) -> int | None:
    below = torch.nonzero(mean < threshold).flatten()
    return int(below[0]) + 1 if len(below) else None


def solve_stats(model, batches, *, train: bool, train_budget: int, seed: int) -> dict:
    """Batch-mean lowest-so-far relative residual per f evaluation, averaged over batches; with the layer's
    ``spectral_radius_iters`` set, also the batch-mean power-method estimate of rho(J_f) at the solve's z*."""
    model.train(train)
    curves, radii, at_train, at_end = [], [], [], []
    with torch.no_grad():
        for i, x in enumerate(batches):
            torch.manual_seed(seed + i)  # the same dropout mask for every checkpoint
            model(x)
            rel = model.last_info.forward.rel_trace.double()  # (B, nfe)
            lowest = torch.cummin(rel, dim=1).values
            curves.append(lowest.mean(0))
            at_train.append(lowest[:, min(train_budget, lowest.shape[1]) - 1])
            at_end.append(lowest[:, -1])  # where each sample's solve ended (the whole budget, or a stop)
            if model.last_info.spectral_radius is not None:
                radii.append(model.last_info.spectral_radius.double())
    n = min(len(c) for c in curves)
    mean = torch.stack([c[:n] for c in curves]).mean(0)
    at = min(train_budget, n) - 1
    at_train, at_end = torch.cat(at_train), torch.cat(at_end)
    out = {"lowest_rel_residual_at_training_budget": float(mean[at]), "lowest_rel_residual_at_budget": float(mean[-1]),
           **{f"f_evals_to_{t:g}": evals_below(mean, t) for t in THRESHOLDS}, "nfe": n,
           # per sample: the batch mean above can hide a few samples whose solve stalls
           "per_sample": {"median_at_training_budget": float(at_train.median()),
                          "share_below_1e-2_at_training_budget": float((at_train < 1e-2).double().mean()),
                          "median_at_end": float(at_end.median()), "max_at_end": float(at_end.max()),
                          "share_below_1e-4_at_end": float((at_end < 1e-4).double().mean())}}
    if radii:
        r = torch.cat(radii)
        out.update(spectral_radius_mean=float(r.mean()), spectral_radius_max=float(r.max()),
                   spectral_radius_share_above_1=float((r > 1).double().mean()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10_small_paper")
    p.add_argument("--run", default=RUN, help="a run folder whose checkpoint.pt git history holds")
    p.add_argument("--data-root", default="data/cifar10-jpeg-q75")
    p.add_argument("--data-option", nargs="*", default=["source=jpeg_q75",
                   "exact_subset=data/cifar10-partial-exact/cifar10_exact_prefix_subset.npz"], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--num-batches", type=int, default=3)
    p.add_argument("--budget", type=int, default=50, help="f evaluations of the long solve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/equilibrium_over_training.json")
    p.add_argument("--memory", type=int, default=None, help="Broyden's history size m (default: the config's)")
    p.add_argument("--spectral-radius", type=int, default=0, metavar="ITERS",
                   help="also estimate rho(J_f) at z* per sample with ITERS power-method steps (0: no)")
    p.add_argument("--keep", action="store_true",
                   help="keep the rows already in --out (same settings) and measure only later checkpoints")
    p.add_argument("--every", type=int, default=0, metavar="STEPS",
                   help="measure a checkpoint only STEPS or more after the last measured one (the latest always)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    options = parse_kv(args.data_option)
    overrides = trace_overrides("broyden", args.budget) + ([f"solver.memory={args.memory}"] if args.memory else [])
    cfg = load_config(args.config, overrides)
    args.memory = cfg.solver.memory  # recorded: what the solves used
    train_budget = load_config(args.config).solver.max_iter + 1  # the training solve's f evaluations
    batches = training_batches(ROOT / args.data_root, options, args.batch, args.num_batches, args.seed)
    rows = kept_rows(ROOT / args.out, args) if args.keep else []
    for where, ckpt in thinned(checkpoints(args.run), rows, args.every):
        torch.manual_seed(args.seed)
        model = build_model(cfg)
        load_pretrained(model, ckpt)
        model.deq.warn = False
        model.deq.spectral_radius_iters = args.spectral_radius
        row = {"global_step": int(ckpt["global_step"]), "epoch": int(ckpt["epoch"]),
               "step_in_epoch": int(ckpt["step_in_epoch"]), "from": where,
               "train_mode": solve_stats(model, batches, train=True, train_budget=train_budget,
                                         seed=args.seed),
               "eval_mode": solve_stats(model, batches, train=False, train_budget=train_budget,
                                        seed=args.seed)}
        rows.append(row)
        t, e = row["train_mode"], row["eval_mode"]
        print(f"step {row['global_step']:>5} (epoch {row['epoch'] + row['step_in_epoch'] / 391:5.2f}): train mode "
              f"{t['lowest_rel_residual_at_training_budget']:.2e} at {train_budget}, "
              f"{t['lowest_rel_residual_at_budget']:.2e} at {t['nfe']}, to 1e-3 {t['f_evals_to_0.001']}, "
              f"to 1e-4 {t['f_evals_to_0.0001']} | eval mode {e['lowest_rel_residual_at_training_budget']:.2e}, "
              f"{e['lowest_rel_residual_at_budget']:.2e}, {e['f_evals_to_0.001']}, {e['f_evals_to_0.0001']}"
              + f" | per sample (train mode): share < 1e-4 at the end {t['per_sample']['share_below_1e-4_at_end']:.3f}, "
              f"max {t['per_sample']['max_at_end']:.2e}"
              + (f" | rho(J) train {t['spectral_radius_mean']:.3f}, eval {e['spectral_radius_mean']:.3f} (max "
                 f"{e['spectral_radius_max']:.3f})" if args.spectral_radius else ""), flush=True)
        write_json(ROOT / args.out, {
            "benchmark": "equilibrium_over_training", "config": args.config, "run": args.run,
            "batch": args.batch, "num_batches": args.num_batches, "budget": args.budget,
            "training_budget_f_evals": train_budget, "memory": args.memory,
            "spectral_radius_iters": args.spectral_radius,
            "measure": "batch mean of each sample's lowest-so-far ||f(z) - z|| / ||f(z)||, averaged over batches; "
                       "Broyden with the config's memory, relative stop mode at tol 1e-12 (runs the whole budget)",
            "data": f"{args.num_batches} x {args.batch} CIFAR-10 training images (JPEG-q75 re-encoded), seed {args.seed}",
            "rows": rows, "provenance": script_provenance(args, "cpu", folder="studies")})
    assert all(math.isfinite(r["train_mode"]["lowest_rel_residual_at_budget"]) for r in rows)


if __name__ == "__main__":
    main()
