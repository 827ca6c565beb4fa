"""bf16 autocast on a CPU against float32: a short stretch of real training from one checkpoint, both ways.

The engine itself (``python -m mdeq.train --resume``) runs ``--steps`` optimiser steps twice from copies of
the same checkpoint, once in float32 and once with ``--amp`` (bfloat16 autocast on a CPU: f, the stem and
the head in bf16; the solver state, its products and the backward solve in float32). Both copies draw the
same batches (the checkpoint holds the sampler's position and the RNG states) and the same dropout masks
where bf16 does not change them, so the difference is the arithmetic. Every step is logged
(``--log-every 1``); this script compares the training loss, the solvers' residuals reached at equal NFE
(T_f, T_b) and the step time, and writes ``results/benchmarks/amp_training_cpu.json``. The engine ends a
``--max-steps`` run with an evaluation on the test set (about 2 minutes here), so the test accuracy of both
is compared too; each run's logs (``final.json``, ``steps.jsonl``, ``provenance.json``) are copied to
``results/benchmarks/amp_training_cpu_runs/<variant>/``.

    python benchmarks/amp_training.py --data-root data/cifar10-jpeg-q75 \\
        --data-option source=jpeg_q75 exact_subset=data/cifar10-partial-exact/cifar10_exact_prefix_subset.npz

The checkpoint (default: the Table 1 campaign's MDEQ-small at step 3250) should be past the unrolled warm-up,
so that the steps are implicit ones. The stretch should not cross an epoch's end (its evaluation would be
timed as a step); the script says how many steps are left in the checkpoint's epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, provenance, write_json  # noqa: E402

VARIANTS = {"float32": [], "bf16": ["--amp", "--amp-dtype", "bfloat16"]}
COLUMNS = ("loss", "acc", "rel_residual_forward", "rel_residual_backward", "step_time_ms")


def run_variant(args, name: str, start: int) -> list[dict]:
    out = args.workdir / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copy2(args.checkpoint, out / "checkpoint.pt")
    cmd = [sys.executable, "-m", "mdeq.train", "--config", args.config, "--out", str(out), "--resume",
           "--max-steps", str(start + args.steps), "--log-every", "1", "--checkpoint-every", "0",
           "--threads", str(args.threads), "--workers", "0", "--no-progress", *VARIANTS[name]]
    if args.data_root:
        cmd += ["--data-root", args.data_root]
    if args.data_option:
        cmd += ["--data-option", *args.data_option]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    keep = args.out.parent / f"{args.out.stem}_runs" / name
    keep.mkdir(parents=True, exist_ok=True)
    for log in ("final.json", "steps.jsonl", "provenance.json"):
        if (out / log).exists():
            shutil.copy2(out / log, keep / log)
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    return [s for s in steps if s["step"] > start]


def final_eval(args, name: str) -> dict | None:
    path = args.workdir / name / "final.json"
    return json.loads(path.read_text()).get("final_eval") if path.exists() else None


def _from_root(path: Path | None, default: str) -> Path:
    """``path`` (or ``default``) relative to the repository root when it lies inside it."""
    p = (Path(path) if path is not None else ROOT / default).resolve()
    return p.relative_to(ROOT) if p.is_relative_to(ROOT) else p


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: results/benchmarks/weights/cifar10_mdeq_small_step3250.pt (the campaign's step 3250)")
    p.add_argument("--config", default="cifar10_small_paper")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-root", default=None)
    p.add_argument("--data-option", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--workdir", type=Path, default=None, help="default: runs/bench/amp_training")
    p.add_argument("--out", type=Path, default=None, help="default: results/benchmarks/amp_training_cpu.json")
    args = p.parse_args(argv)
    # Paths are kept relative to the repository root, where everything runs: the JSON and the runs'
    # provenance then name no machine's folders.
    args.checkpoint = _from_root(args.checkpoint, "results/benchmarks/weights/cifar10_mdeq_small_step3250.pt")
    args.workdir = _from_root(args.workdir, "runs/bench/amp_training")
    args.out = _from_root(args.out, "results/benchmarks/amp_training_cpu.json")
    os.chdir(ROOT)

    import torch

    from mdeq.engine.checkpoint import load_checkpoint
    ckpt = load_checkpoint(args.checkpoint)
    start, in_epoch = ckpt["global_step"], ckpt["step_in_epoch"]
    print(f"checkpoint {args.checkpoint}: step {start}, epoch {ckpt['epoch']}, batch {in_epoch}", flush=True)
    del ckpt
    runs = {name: run_variant(args, name, start) for name in VARIANTS}
    steps = [s["step"] for s in runs["float32"]]
    if [s["step"] for s in runs["bf16"]] != steps:
        raise SystemExit(f"the two runs logged different steps: {steps} vs {[s['step'] for s in runs['bf16']]}")
    per_step = {name: {c: [s.get(c) for s in rs] for c in COLUMNS} for name, rs in runs.items()}
    last = max(1, len(steps) // 5)  # the mean over the last fifth of the stretch
    summary = {}
    for name, cols in per_step.items():
        summary[name] = {f"{c}_mean_last": statistics.fmean(cols[c][-last:]) for c in COLUMNS}
        summary[name]["step_time_ms_median"] = statistics.median(cols["step_time_ms"][1:])
    f32, b16 = per_step["float32"]["loss"], per_step["bf16"]["loss"]
    for name in VARIANTS:
        summary[name]["final_eval"] = final_eval(args, name)
    summary["bf16_vs_float32"] = {
        "loss_abs_diff_first_step": abs(b16[0] - f32[0]),
        "loss_abs_diff_max": max(abs(a - b) for a, b in zip(b16, f32)),
        "loss_mean_last_diff": summary["bf16"]["loss_mean_last"] - summary["float32"]["loss_mean_last"],
        "speedup": summary["float32"]["step_time_ms_median"] / summary["bf16"]["step_time_ms_median"],
        "forward_residual_ratio": (summary["bf16"]["rel_residual_forward_mean_last"]
                                   / summary["float32"]["rel_residual_forward_mean_last"]),
    }
    torch.set_num_threads(args.threads)
    import hashlib
    sha = hashlib.sha256(args.checkpoint.read_bytes()).hexdigest()
    write_json(args.out, {"benchmark": "amp_training", "config": args.config, "checkpoint_step": start,
                          "checkpoint_sha256": sha,
                          "steps": steps, "per_step": per_step, "summary": summary,
                          "provenance": provenance(args, "cpu")})
    for name in VARIANTS:
        s = summary[name]
        print(f"{name:8s} loss (last {last} steps) {s['loss_mean_last']:.4f}  rel residual fwd "
              f"{s['rel_residual_forward_mean_last']:.2e} bwd {s['rel_residual_backward_mean_last']:.2e}  "
              f"step {s['step_time_ms_median']:.0f} ms")
    print(f"bf16 vs float32: {summary['bf16_vs_float32']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
