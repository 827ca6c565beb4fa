"""Figs. 5-7's convergence traces at the paper's resolutions, measured on this CPU (``mdeq.paper.measure.solver_traces``).

Forward and backward (IFT) solves of the small MDEQ of each task, Broyden (with the config's history m)
against plain iteration of f, each run to its whole budget (CIFAR-10 50, ImageNet 120, Cityscapes 150 f
evaluations) on ``--num-batches`` batches: CIFAR-10 at 32 x 32 on real test images (batch 32) with the
initial weights and the Table 1 campaign's latest checkpoint (``results/runs/cifar10_mdeq_small``);
ImageNet at 224 x 224 (batch 4) and Cityscapes at 1024 x 2048 (batch 1) at the initial weights, on their
real validation images where ``data/`` has them and otherwise on CIFAR-10 test images resized to that
size (the output says which). Fig. 7: per scale, MDEQ-small against the single-stream DEQ. Both measures
are kept: ||z[i+1] - z[i]|| / ||z[i]|| (the paper's) and the residual ||f(z) - z|| / ||f(z)||.

The output is rewritten after each batch, and a rerun with the same settings goes on where it stopped
(finished curves kept, a curve stopped between batches resumed at its next batch), so the measurement
runs in chunks (``--datasets cityscapes`` alone takes hours on 2 CPU cores).

    python benchmarks/fig5_convergence.py --datasets cifar10 imagenet --cifar-root data/cifar10-jpeg-q75 \\
        --cifar-option source=jpeg_q75          # results/convergence_traces.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, provenance, write_json  # noqa: E402

from mdeq.paper.measure.solver_traces import CONVERGENCE_SETS, PER_SCALE_SETS, convergence_traces  # noqa: E402

SETTINGS = ("variant", "num_batches", "seed")  # a rerun keeps earlier curves only if these are the same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(CONVERGENCE_SETS), choices=list(CONVERGENCE_SETS))
    p.add_argument("--no-per-scale", action="store_true", help="skip Fig. 7's per-scale traces")
    p.add_argument("--variant", default="paper", choices=("paper", "official"))
    p.add_argument("--num-batches", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default="", help="folder holding cifar10/, imagenet/, cityscapes/ (default data/)")
    p.add_argument("--cifar-root", type=Path, default=None,
                   help="CIFAR-10 to use where data/<dataset> is absent (the test set itself for CIFAR-10, "
                        "resized stand-ins for the others)")
    p.add_argument("--cifar-option", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="builder options of --cifar-root, e.g. source=jpeg_q75")
    p.add_argument("--fresh", action="store_true",
                   help="discard the curves already in --out and the snapshot of the trained checkpoints")
    p.add_argument("--out", type=Path, default=Path("results") / "convergence_traces.json",
                   help="relative to the repository root (default results/convergence_traces.json)")
    args = p.parse_args()
    path = args.out if args.out.is_absolute() else ROOT / args.out
    torch.set_num_threads(args.threads)
    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.cifar_option)}
    stand_in = (args.cifar_root, options) if args.cifar_root is not None else None
    done = None
    if args.fresh:
        shutil.rmtree(ROOT / "runs" / "bench" / "fig5_checkpoints", ignore_errors=True)
    if path.is_file() and not args.fresh:
        old = json.loads(path.read_text())
        same = all(old.get(k) == getattr(args, k) for k in SETTINGS) and old.get("profile") == "full"
        done = old if same else None
        print(f"{path}: {'keeping its finished curves' if same else 'other settings, starting afresh'}")
    prov = provenance(args, "cpu")
    hardware = f"CPU, {args.threads} thread{'s' if args.threads != 1 else ''}"
    chunks = (done or {}).get("chunks", []) + [prov]

    def save(out: dict) -> None:
        write_json(path, {**out, "seed": args.seed, "hardware": hardware, "chunks": chunks})

    # Trained weights from a snapshot: the campaign replaces results/runs/*/checkpoint.pt every 50 steps, and
    # every curve of one measurement must trace the same weights.
    snapshot = ROOT / "runs" / "bench" / "fig5_checkpoints"
    for folder in {r for s in CONVERGENCE_SETS.values() for r in s.checkpoint_runs} | \
            {r for _, runs_ in PER_SCALE_SETS.values() for r in runs_}:
        src, dst = ROOT / folder / "checkpoint.pt", snapshot / folder / "checkpoint.pt"
        if src.is_file() and not dst.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        if dst.is_file():
            prov.setdefault("checkpoints", {})[folder] = hashlib.sha256(dst.read_bytes()).hexdigest()
    before = (done or {}).get("chunks", [{}])[-1].get("checkpoints", {})
    if done and before != prov.get("checkpoints", {}):  # other trained weights: their curves are measured again
        print("trained checkpoints differ from the earlier chunk's; measuring their curves again")
        for entry in done.get("datasets", {}).values():
            entry["curves"] = {k: v for k, v in entry.get("curves", {}).items() if v.get("checkpoint") is None}
            entry["partial"] = {k: v for k, v in entry.get("partial", {}).items() if k.endswith("_init")}
        done["per_scale"] = {k: v for k, v in done.get("per_scale", {}).items() if v.get("checkpoint") is None}
    out = convergence_traces(profile="full", variant=args.variant, data_root=args.data_root,
                             num_batches=args.num_batches, device="cpu", seed=args.seed, datasets=args.datasets,
                             per_scale=not args.no_per_scale, stand_in=stand_in, done=done, save=save,
                             checkpoints=snapshot)
    save(out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
