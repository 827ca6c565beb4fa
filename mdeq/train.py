"""``python -m mdeq.train``: one training run from a config, in a run folder it can resume.

Every error ends in one line (exit code 2 for bad input, 1 for a fault; ``--traceback`` or
``MDEQ_TRACEBACK=1`` shows the stack). The engine it drives is ``mdeq.engine`` (``mdeq.engine.loop.main``
from Python or a notebook).

    python -m mdeq.train --config cifar10_tiny_smoke --data-root data/synthetic_cifar10 --synthetic \\
        --out runs/smoke --set train.epochs=2 --limit-train 256
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Sequence

from mdeq.core.config import load_config
from mdeq.engine.build import check_baseline
from mdeq.engine.cli import TRACEBACK_ENV, error_line, is_input_error, parse_kv
from mdeq.engine.loop import main
from mdeq.engine.options import RunOptions
from mdeq.engine.runlog import CHECKPOINT_NAME

__all__ = ["cli"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mdeq.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a name in mdeq/configs (e.g. cifar10_small_official) or a YAML path")
    p.add_argument("--data-root", default=None, help="data set folder (default data/<dataset>)")
    p.add_argument("--out", required=True, help="run folder for logs, checkpoints and final.json")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. --set train.epochs=2 solver.max_iter=5")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt if it exists")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast; float16 + GradScaler on CUDA)")
    p.add_argument("--amp-dtype", default="auto", choices=("auto", "float16", "bfloat16"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last images and solver state (default: on a CPU only)")
    p.add_argument("--compile", action="store_true", help="torch.compile f for the forward solve (see RunOptions)")
    p.add_argument("--baseline", default=None, help="train a Table 1 baseline (resnet18_170k, node_172k, ...) instead")
    p.add_argument("--synthetic", action="store_true", help="write a synthetic copy into an empty --data-root first")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints (0: epoch ends)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimiser steps (smoke runs)")
    p.add_argument("--limit-train", type=int, default=None, help="use the first N training samples")
    p.add_argument("--limit-eval", type=int, default=None, help="use the first N evaluation samples")
    p.add_argument("--baseline-option", dest="baseline_options", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="options of the baseline's builder, e.g. --baseline-option width=4")
    p.add_argument("--data-option", dest="data_options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra data set builder options, e.g. --data-option base_size=256")
    p.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms, no cudnn.benchmark")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="keep freed memory for reuse, no page faults per new tensor (default: on a CPU; mdeq/engine/allocator.py)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar even on a terminal")
    p.add_argument("--find-unused-parameters", action="store_true", help="DDP find_unused_parameters")
    p.add_argument("--stop-at", type=float, default=None, metavar="UNIX_TIME",
                   help="checkpoint and exit before a step or evaluation that would end after this time "
                        "(seconds since the epoch, as `date +%%s` prints)")
    p.add_argument("--divergence-factor", type=float, default=100.0, metavar="F",
                   help="stop as diverged when a step's loss exceeds F times the run's first losses (0: no check)")
    p.add_argument("--max-param-abs", type=float, default=1e6, metavar="X",
                   help="stop as diverged when a parameter exceeds X in magnitude (0: only non-finite ones)")
    p.add_argument("--traceback", action="store_true",
                   help=f"print the stack with an error (or set {TRACEBACK_ENV}=1)")
    return p



def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m mdeq.train``: parse, run ``main``; every error is one line, exit code 2 (bad input) or 1 (fault)."""
    args = _parser().parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    show_stack = args.traceback or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    try:  # what the user typed: a bad config key, baseline or option is one line, not a traceback
        cfg = load_config(args.config, args.overrides)
        check_baseline(args.baseline)
        options = RunOptions(
            out_dir=args.out, data_root=args.data_root, device=args.device, amp=args.amp, amp_dtype=args.amp_dtype,
            workers=args.workers, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
            resume=args.resume, max_steps=args.max_steps, baseline=args.baseline, synthetic=args.synthetic,
            limit_train=args.limit_train, limit_eval=args.limit_eval, data_options=parse_kv(args.data_options),
            baseline_options=parse_kv(args.baseline_options, "--baseline-option"),
            deterministic=args.deterministic, threads=args.threads, progress=False if args.no_progress else None,
            find_unused_parameters=args.find_unused_parameters, stop_at=args.stop_at,
            divergence_factor=args.divergence_factor or None, max_param_abs=args.max_param_abs or None,
            channels_last=args.channels_last, compile=args.compile, keep_freed_memory=args.keep_freed_memory,
            command=shlex.join(["python", "-m", "mdeq.train", *argv_list]))
        main(cfg, options)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        if show_stack:
            traceback.print_exc()
        print(f"error: interrupted; {Path(args.out) / CHECKPOINT_NAME}, if there, is the last checkpoint: continue "
              f"with --resume", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 (every error ends in one line; --traceback shows the stack)
        if show_stack:
            traceback.print_exc()
        print(error_line(err), file=sys.stderr, flush=True)
        return 2 if is_input_error(err) else 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
