"""``python -m mdeq.smoke``: a one-minute CPU smoke run of the whole pipeline.

Why: a fresh clone should show, quickly and without any data set, that the pieces fit: it writes a
synthetic CIFAR-10 copy in the official on-disk layout, trains the tiny ``cifar10_tiny_smoke`` MDEQ
through the unrolled weight-tied warm-up and into the implicit phase (Broyden forward, IFT backward)
with the real engine (``mdeq.engine.loop.main``), and prints the solver statistics it logged. The numbers
are a smoke test on synthetic data, not a result of the paper.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from mdeq.core.config import load_config
from mdeq.engine.paths import RUNS
from mdeq.engine.runlog import read_run
from mdeq.engine.loop import main
from mdeq.engine.options import RunOptions


def run(out_dir: Path, *, epochs: int = 2, limit_train: int = 512, threads: int | None = None) -> dict:
    cfg = load_config("cifar10_tiny_smoke", [f"train.epochs={epochs}", "data.batch_size=32",
                                             "data.eval_batch_size=64", "train.pretrain_steps=8"])
    options = RunOptions(out_dir=out_dir, data_root=out_dir / "data" / "cifar10", synthetic=True, device="cpu",
                         workers=0, log_every=4, checkpoint_every=0, limit_train=limit_train, limit_eval=256,
                         threads=threads, resume=(out_dir / "checkpoint.pt").exists(),
                         command="python -m mdeq.smoke")
    return main(cfg, options)


def _report(out_dir: Path) -> None:
    rows = read_run(out_dir).rows
    cols = ["epoch", "phase", "train_loss", "eval_top1", "nfe_forward", "rel_residual_forward", "nfe_backward",
            "rel_residual_backward", "step_time_ms"]
    cols = [c for c in cols if rows and c in rows[0]]
    print("\nsmoke run (synthetic CIFAR-10 layout, tiny model; not a reproduction):")
    width = max(len(c) for c in cols)
    print("  " + " ".join(f"{c.replace('_residual', ''):>{width - 9}s}" for c in cols))
    for r in rows:
        print("  " + " ".join(f"{_fmt(r[c]):>{width - 9}s}" for c in cols))
    steps = [json.loads(line) for line in open(out_dir / "steps.jsonl")]
    implicit = [s for s in steps if s.get("phase") == "implicit"]
    if implicit:
        last = implicit[-1]
        shown = {k: last[k] for k in sorted(last) if k.startswith(("nfe", "rel", "converged", "stop"))}
        print(f"  last implicit step {last.get('step')}: {shown}")
    print(f"  logs: {out_dir}")


def _fmt(value: str) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{x:.4g}"


def cli(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=RUNS / "smoke", help="run folder (resumed if it has a checkpoint)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit-train", type=int, default=512, help="training images per epoch")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    run(args.out, epochs=args.epochs, limit_train=args.limit_train, threads=args.threads)
    _report(args.out)


if __name__ == "__main__":
    cli()
