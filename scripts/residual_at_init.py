"""Broyden's relative-residual reduction on untrained MDEQs (CPU, float32): CIFAR, ImageNet, Cityscapes.

Why: paper Section 4.5 / Fig. 5 say convergence gets harder as the resolution grows; at init the
released code's solver reduces ||f(z) - z|| / ||f(z)|| of CIFAR LARGE only from 1.07 to 0.29 in 18
steps (docs/paper_vs_released.md#the-solver-at-initialisation). This measures the same quantity on our
models, one forward solve
each, in training mode (dropout mask drawn, BN batch statistics) without a graph, as a training
step's forward solve runs. Writes results/residual_at_init.json with provenance.

    python scripts/residual_at_init.py            # about a minute on one CPU core
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mdeq.core.config import load_config
from mdeq.core.model import build_model
from mdeq.engine.paths import RESULTS
from mdeq.engine.runlog import provenance

# (config, batch, input (H, W)): the three resolutions of Fig. 5, plus the released CIFAR LARGE
# that docs/paper_vs_released.md#the-solver-at-initialisation reports for the released code.
CASES = [
    ("cifar10_small_official", 8, (32, 32)),
    ("cifar10_large_official", 4, (32, 32)),
    ("imagenet_small_official", 2, (224, 224)),
    ("cityscapes_small_official", 1, (512, 1024)),
]


def measure(name: str, batch: int, size: tuple[int, int], seed: int, solver: str = "broyden") -> dict:
    cfg = load_config(name, {"solver.solver": solver})
    torch.manual_seed(seed)  # same weights, input and dropout mask for every solver
    model = build_model(cfg).train()
    x = torch.randn(batch, 3, *size)
    start = time.perf_counter()
    with torch.no_grad():
        model(x)
    seconds = time.perf_counter() - start
    st = model.last_info.forward
    rows = torch.arange(batch)
    lowest = st.lowest_step
    d = cfg.model.downsample_times
    return {
        "config": name, "batch": batch, "input_hw": list(size),
        "state_dim_per_sample": sum(c * (size[0] >> (d + i)) * (size[1] >> (d + i))
                                    for i, c in enumerate(cfg.model.num_channels)),
        "solver": st.solver, "max_iter": st.max_iter, "memory": cfg.solver.memory, "stop_mode": st.stop_mode,
        "nfe": st.nfe, "stop_reason": st.stop_reason,
        "rel_at_z0": st.rel_trace[:, 0].mean().item(),
        "rel_after_first_step": st.rel_trace[:, 1].mean().item(),
        "rel_lowest": st.rel_trace[rows, lowest].mean().item(),
        "rel_lowest_max": st.rel_trace[rows, lowest].max().item(),
        "rel_final": st.rel_trace[:, -1].mean().item(),
        "lowest_step_mean": lowest.float().mean().item(),
        "reduction_vs_first_step": (st.rel_trace[:, 1] / st.rel_trace[rows, lowest]).mean().item(),
        "per_scale_rel_at_lowest": st.scale_rel_trace[:, rows, lowest].mean(1).tolist(),
        "abs_at_z0": st.abs_trace[:, 0].mean().item(),
        "abs_lowest": st.abs_trace[rows, lowest].mean().item(),
        "rel_trace_mean": st.rel_trace.mean(0).tolist(),
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run only these configs")
    parser.add_argument("--out", default=str(RESULTS / "residual_at_init.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = []
    print(f"{'config':28s} {'batch':>5s} {'input':>9s} {'nfe':>4s} {'rel@1':>7s} {'rel low':>8s} "
          f"{'step':>5s} {'x less':>7s} {'per-scale rel at lowest':>32s} {'s':>6s} {'fixed-pt low':>12s}")
    for name, batch, size in CASES:
        if args.only and name not in args.only:
            continue
        r = measure(name, batch, size, args.seed)
        fp = measure(name, batch, size, args.seed, solver="fixed_point")  # the baseline of Fig. 5
        r["fixed_point_same_budget"] = {k: fp[k] for k in ("nfe", "rel_lowest", "rel_final", "seconds")}
        results.append(r)
        scales = " ".join(f"{v:.3f}" for v in r["per_scale_rel_at_lowest"])
        print(f"{name:28s} {batch:5d} {size[0]:4d}x{size[1]:<4d} {r['nfe']:4d} {r['rel_after_first_step']:7.3f} "
              f"{r['rel_lowest']:8.3f} {r['lowest_step_mean']:5.1f} {r['reduction_vs_first_step']:7.2f} "
              f"{scales:>32s} {r['seconds']:6.1f} {fp['rel_lowest']:12.3f}", flush=True)
    out = {
        "what": "Broyden relative residual ||f(z)-z||/||f(z)|| of one forward solve on untrained models "
                "(train mode, no grad, float32, random N(0,1) input); rel@z0 is 1 by construction (z0 = 0). "
                "fixed_point_same_budget: plain iteration z <- f(z) with the same max_iter, weights, input "
                "and dropout mask",
        "provenance": provenance(" ".join([sys.executable.rsplit("/", 1)[-1]] + sys.argv), "cpu", seed=args.seed,
                                 dirty_folders=("mdeq", "scripts")),
        "results": results,
    }
    path = args.out
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
