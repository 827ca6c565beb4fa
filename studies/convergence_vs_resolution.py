"""F evaluations to equilibrium against the input size, for the trained CIFAR-10 MDEQ-small: our extension of Figs. 5-6.

Why: the paper's Figs. 5-6 and Appendix B.2 say that larger images need more Broyden steps (a larger
receptive field must be filled), but its ImageNet and Cityscapes panels can only be redrawn here at
initial weights, where nothing converges. The CIFAR-10 MDEQ-small has no downsampling stem and is
fully convolutional, so its trained weights can be solved at any size. Per size (32 to 512 pixels),
source and solver (Broyden with the config's m, plain iteration of f), each of ``--num-images`` images is
solved alone for ``--budget`` steps (tol 1e-12: the whole budget), and the f evaluations until the paper's
||z[i+1] - z[i]|| / ||z[i]|| falls below 1e-2 and 1e-3 are recorded, with both traces. Sources: the first
CIFAR-10 test images (exact pixels), upsampled bilinearly; natural photographs that scikit-image ships
(``mdeq.paper.inference.PHOTOGRAPHS``), centre-cropped and resized. The weights are the committed checkpoint of
``--run`` (git HEAD's, copied first; ``--from-tree``: the working tree's).

The output is rewritten after each (source, size, solver) and a rerun with the same settings and weights
keeps what is done, so the measurement can run in chunks.

    python studies/convergence_vs_resolution.py --threads 2    # results/convergence_vs_resolution.json
    python studies/convergence_vs_resolution.py --sizes 32 64 --num-images 2 --budget 30 \\
        --out runs/bench/convergence_vs_resolution_check.json     # a quick end-to-end check
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json
from mdeq.paper.trained import committed_weights, eval_dataset
from mdeq.paper.inference import (PHOTOGRAPHS, SIZES, SOLVER_NAMES, THRESHOLDS, convergence_against_resolution,
                            photographs, resolution_inputs)

SETTINGS = ("sizes", "num_images", "budget", "sources")  # a rerun keeps earlier entries only if these are the same


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("results") / "runs" / "cifar10_mdeq_small",
                   help="a run folder, relative to the repository root")
    p.add_argument("--from-tree", action="store_true", help="the working tree's checkpoint instead of git HEAD's")
    p.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    p.add_argument("--num-images", type=int, default=5)
    p.add_argument("--budget", type=int, default=100, help="forward steps per solve (f evaluations: budget + 1)")
    p.add_argument("--solvers", nargs="+", default=list(SOLVER_NAMES), choices=list(SOLVER_NAMES))
    p.add_argument("--sources", nargs="+", default=["cifar10", "photographs"], choices=["cifar10", "photographs"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="discard what --out already holds")
    p.add_argument("--out", type=Path, default=Path("results") / "convergence_vs_resolution.json",
                   help="relative to the repository root")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from mdeq.engine.allocator import keep_freed_memory  # as mdeq.train on a CPU; the numbers do not change

    keep_freed_memory()
    out_path = args.out if args.out.is_absolute() else ROOT / args.out
    with tempfile.TemporaryDirectory(prefix="convergence_vs_resolution_") as scratch:
        run_dir = args.run if args.run.is_absolute() else ROOT / args.run
        trained, weights = committed_weights(run_dir, Path(scratch), from_tree=args.from_tree)
        sources, labels = {}, {}
        if "cifar10" in args.sources:
            dataset, _, _ = eval_dataset(trained)
            sources["cifar10"] = {f"test image {i}": dataset.images[i] for i in range(args.num_images)}
            labels["cifar10"] = (f"the first {args.num_images} CIFAR-10 test images of the run's data "
                                 f"({dataset.source_label}), upsampled bilinearly")
        if "photographs" in args.sources:
            sources["photographs"] = photographs(PHOTOGRAPHS[:args.num_images])
            import skimage

            labels["photographs"] = (f"natural photographs shipped by scikit-image {skimage.__version__} "
                                     f"(skimage.data: {', '.join(PHOTOGRAPHS[:args.num_images])}; native sizes "
                                     + ", ".join(f"{t.shape[1]}x{t.shape[2]}" for t in sources["photographs"].values())
                                     + "), centre-cropped to a square and resized bilinearly (antialiased when "
                                       "shrinking)")
        inputs = resolution_inputs(sources, args.sizes)
        done = None
        if out_path.is_file() and not args.fresh:
            old = json.loads(out_path.read_text())
            same = (all(old.get("settings", {}).get(k) == getattr(args, k) for k in SETTINGS)
                    and old.get("weights", {}).get("sha256") == weights["sha256"])
            done = old.get("result") if same else None
            print(f"{out_path}: {'keeping its finished entries' if same else 'other settings or weights: afresh'}")
        chunks = ((json.loads(out_path.read_text()).get("chunks", []) if done else [])
                  + [script_provenance(args, "cpu", folder="studies")])
        print(f"{weights['run']}: {weights['weights']}, sha256 {weights['sha256'][:16]}", flush=True)

        def save(result: dict) -> None:
            write_json(out_path, {"benchmark": "convergence_vs_resolution", "weights": weights, "sources": labels,
                                  "settings": {k: getattr(args, k) for k in SETTINGS},
                                  "thresholds": list(THRESHOLDS), "result": result, "chunks": chunks})

        result = convergence_against_resolution(trained, inputs, budget=args.budget, solvers=args.solvers,
                                                done=done, save=save)
        save(result)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
