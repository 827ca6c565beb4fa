"""Test accuracy of the trained MDEQ-small against the forward solver's budget, Broyden and plain iteration of f.

Why: in locuslab/deq issue 28 a user reports that a CIFAR-10 MDEQ evaluated with one fixed-point iteration
is about as accurate as with 15 Broyden steps, and the paper's reviewers asked whether the "infinite
depth" matters. For each MDEQ-small run of Table 1 (``results/runs/cifar10_mdeq_small`` and its
``_seed<k>`` folders) this evaluates the latest committed checkpoint (git HEAD's, copied to a temporary
folder; ``--from-tree``: the working tree's) on the run's own evaluation data (the whole CIFAR-10 test
set by default), with the forward solve stopped after max_iter = k steps for every k of ``--budgets``,
and records per budget the top-1 accuracy, the relative residual ||f(z) - z|| / ||f(z)|| of the returned
iterate, and the agreement with the config's own evaluation (Broyden, T_f = 15). One solve of the largest
budget per batch and solver gives every smaller budget (``mdeq.paper.inference``; tested against separate solves).

    python studies/accuracy_vs_budget.py --threads 2           # results/accuracy_vs_budget.json
    python studies/accuracy_vs_budget.py --limit 256 --out runs/bench/accuracy_vs_budget_check.json

Cost on the project's 2-core CPU: about 51 f evaluations and 51 head evaluations per batch of 128 and
solver; 79 batches x 2 solvers (see docs/cpu_campaign.md for the measured time).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json
from mdeq.paper.trained import committed_weights, eval_dataset, shown_path
from mdeq.paper.inference import BUDGETS, SOLVER_NAMES, accuracy_against_budget
from mdeq.engine.cli import parse_kv

RUN_KEY = "cifar10_mdeq_small"  # Table 1's MDEQ-small; its seeds are <key>_seed<k>


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", type=Path, default=None,
                   help=f"run folders (default: results/runs/{RUN_KEY} and results/runs/{RUN_KEY}_seed*)")
    p.add_argument("--from-tree", action="store_true", help="the working tree's checkpoint instead of git HEAD's")
    p.add_argument("--data-root", default=None, help="default: the data the run read (its provenance.json)")
    p.add_argument("--data-option", dest="data_options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="data set builder options (with --data-root, only these apply)")
    p.add_argument("--limit", type=int, default=None, help="the first N test images only (a check, not a result)")
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    p.add_argument("--solvers", nargs="+", default=list(SOLVER_NAMES), choices=list(SOLVER_NAMES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results") / "accuracy_vs_budget.json",
                   help="relative to the repository root")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from mdeq.engine.allocator import keep_freed_memory  # as mdeq.train on a CPU; the numbers do not change

    keep_freed_memory()
    runs = [r if r.is_absolute() else ROOT / r for r in args.runs] if args.runs else sorted(
        d for d in (ROOT / "results" / "runs").iterdir() if d.name == RUN_KEY or d.name.startswith(RUN_KEY + "_seed"))
    out_path = args.out if args.out.is_absolute() else ROOT / args.out
    payload = {"benchmark": "accuracy_vs_budget", "runs": {},
               "provenance": script_provenance(args, "cpu", folder="studies")}
    with tempfile.TemporaryDirectory(prefix="accuracy_vs_budget_") as scratch:
        for run_dir in runs:
            trained, weights = committed_weights(run_dir, Path(scratch), from_tree=args.from_tree)
            dataset, root, options = eval_dataset(trained, args.data_root, parse_kv(args.data_options), args.limit)
            print(f"{weights['run']}: {weights['weights']}, sha256 {weights['sha256'][:16]}; {len(dataset)} images of "
                  f"{dataset.source_label}", flush=True)
            result = accuracy_against_budget(trained, dataset, budgets=args.budgets, solvers=args.solvers)
            payload["runs"][weights["run"]] = {
                "weights": weights, "result": result,
                "data": {"label": dataset.source_label, "split": "CIFAR-10 test set (the released code's 'val')",
                         "images": len(dataset), "limit": args.limit, "root": shown_path(root),
                         "options": {k: shown_path(v) for k, v in options.items()}}}
            write_json(out_path, payload)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
