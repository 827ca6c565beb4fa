"""``python -m mdeq.evaluate RUN_FOLDER``: a trained checkpoint evaluated in one command, as its run did.

Why a command: a committed run folder (``results/runs/<run>/``) holds weights anyone should be able to
check without knowing how the run was launched. This reads the run's config, data set and data options
from the folder (``provenance.json``, ``checkpoint.pt``), evaluates the weights with the engine's own
``mdeq.engine.loop.evaluate`` (the same data pipeline, memory format and eval-mode solver settings as the
evaluation that ``metrics.csv`` logged), prints accuracy, forward NFE and relative residual, and says
whether the logged accuracy of these weights is reproduced. It reads the run folder and never writes
into it. The authors' released checkpoints go through the converter of ``mdeq.core.official``.

    python -m mdeq.evaluate results/runs/cifar10_mdeq_small              # the run's own data and options
    python -m mdeq.evaluate results/runs/cifar10_mdeq_small --data-root data/cifar10   # official pickles
    python -m mdeq.evaluate results/runs/cifar10_mdeq_small --checkpoint old.pt        # other weights, same run
    python -m mdeq.evaluate --official cls_mdeq_TINY.pth --config cifar10_small_official --data-root data/cifar10
    python -m mdeq.evaluate --table                                      # every committed checkpoint (Markdown)

With ``--data-root`` the run's recorded data options are dropped and only ``--data-option`` applies (the
recorded ones describe the run's own copy, e.g. ``source=jpeg_q75``). Errors are one line (exit code 2).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mdeq.core.config import ExperimentConfig
from mdeq.engine import paths
from mdeq.engine.cli import error_line, is_input_error, parse_kv
from mdeq.engine.runlog import CHECKPOINT_NAME, plain
from mdeq.paper.trained import (RUNS, Trained, checkpoint_at, checkpoint_table, evaluate_trained,
                                format_checkpoint_table, load_released, load_run, logged_evaluation)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mdeq.evaluate", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help="a run folder (results/runs/<run>) holding checkpoint.pt")
    p.add_argument("--checkpoint", help="evaluate this checkpoint file of the run instead of <run>/checkpoint.pt")
    p.add_argument("--revision", help="evaluate <run>/checkpoint.pt as git holds it at this revision (e.g. HEAD: the "
                                      "committed one, while a training run rewrites the working tree's)")
    p.add_argument("--official", metavar="FILE", help="a checkpoint of the authors' released code (with --config)")
    p.add_argument("--config", help="with --official: the config of its architecture, e.g. cifar10_small_official")
    p.add_argument("--table", nargs="?", const=str(RUNS), metavar="FOLDER",
                   help="print the Markdown table of every checkpoint under FOLDER (default results/runs)")
    p.add_argument("--data-root", help="data set folder (default: the one the run read; released: data/<dataset>)")
    p.add_argument("--data-option", dest="data_options", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="data set builder options, e.g. source=jpeg_q75 (with --data-root, only these apply)")
    p.add_argument("--limit", type=int, default=None, help="only the first N evaluation images (not comparable "
                                                           "with the logged accuracy)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's data.eval_batch_size")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--compile", action="store_true", help="torch.compile f for the forward solve (as runs "
                                                          "launched with --compile)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last images and solver state (default: the run's choice, on a CPU)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON here (not into the run "
                                                           "folder)")
    p.add_argument("--traceback", action="store_true", help="print the stack with an error")
    return p


def _solver_text(cfg: ExperimentConfig) -> str:
    s = cfg.solver
    tol = s.tol if s.eval_tol is None else s.eval_tol
    max_iter = s.max_iter if s.eval_max_iter is None else s.eval_max_iter
    return (f"{s.solver}, max_iter {max_iter} ({max_iter + 1} f evaluations at most), tol {tol:g} ({s.stop_mode})"
            + (f", m {s.memory}" if s.solver != "fixed_point" else ""))


def _report(trained: Trained, result: Mapping[str, Any]) -> list[str]:
    lines = [f"{'released checkpoint' if trained.released else 'run'} {paths.rel(trained.source)}: config "
             f"{trained.cfg.name} ({trained.model_label}), {result['params']:,} parameters",
             f"weights: {trained.weights_label()}; {trained.origin or paths.rel(trained.checkpoint)}, sha256 "
             f"{trained.sha256}",
             f"data: {result['data_label']}, {result['samples']} evaluation images from {result['data_root']}"
             + (f" (options {result['data_options']})" if result["data_options"] else "")]
    if trained.baseline is None:
        lines.append(f"solver (eval mode): {_solver_text(trained.cfg)}")
    shown = f"top-1 {result['top1']:.2f} %  top-5 {result['top5']:.2f} %  loss {result['loss']:.4f}"
    if "nfe_forward" in result:
        shown += (f"  forward NFE {result['nfe_forward']:.1f}  relative residual "
                  f"{result['rel_residual_forward']:.3g}")
    lines.append(shown + f"  ({result['seconds']:.0f} s)")
    if trained.released:
        return lines
    match, last = logged_evaluation(trained.source, trained.global_step)
    if match is None:
        previous = (f"; the last evaluation logged is epoch {int(float(last['epoch'])) + 1} at step {last['step']}: "
                    f"{float(last['eval_top1']):.2f} %" if last else "")
        lines.append(f"logged: metrics.csv has no evaluation of these weights ({trained.weights_label()}){previous}")
        return lines
    logged = float(match["eval_top1"])
    same_data = result["data_label"] == trained.data_label and result["limit"] is None
    verdict = ("reproduced exactly" if logged == result["top1"] else f"differs by {result['top1'] - logged:+.2f}")
    if not same_data:
        verdict = "not comparable: " + ("a subset" if result["limit"] is not None else
                                         f"other data than the run's ({trained.data_label})")
    lines.append(f"logged: epoch {int(float(match['epoch'])) + 1} at step {match['step']} (metrics.csv): top-1 "
                 f"{logged:.2f} %, loss {float(match['eval_loss']):.4f} -> {verdict}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mdeq.evaluate``: every error is one line, exit code 2 (bad input) or 1 (a fault)."""
    args = _parser().parse_args(argv)
    try:
        if args.table is not None:
            if args.run or args.official:
                raise ValueError("--table takes a folder, not a run or --official")
            print(format_checkpoint_table(checkpoint_table(args.table)))
            return 0
        if (args.run is None) == (args.official is None):
            raise ValueError("give a run folder (python -m mdeq.evaluate results/runs/<run>) or --official FILE "
                             "--config NAME")
        if args.official is not None and not args.config:
            raise ValueError("--official needs --config (the released architecture's config, e.g. "
                             "cifar10_small_official)")
        if args.config and args.official is None:
            raise ValueError("--config is for --official; a run folder's config is read from the folder")
        for name in ("limit", "batch_size", "threads"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if args.revision is not None and (args.checkpoint or args.official):
            raise ValueError("--revision reads <run>/checkpoint.pt from git: not with --checkpoint or --official")
        scratch = tempfile.TemporaryDirectory(prefix="mdeq_evaluate_")
        checkpoint = args.checkpoint
        if args.revision is not None and args.run is not None:
            checkpoint = checkpoint_at(args.run, args.revision, Path(scratch.name) / CHECKPOINT_NAME)
        trained = (load_released(args.official, args.config) if args.official is not None
                   else load_run(args.run, checkpoint))
        if args.revision is not None:
            trained.origin = f"{paths.rel(Path(args.run) / CHECKPOINT_NAME)} at git {args.revision}"
        if args.json is not None and not trained.released and \
                args.json.resolve().is_relative_to(Path(trained.source).resolve()):
            raise ValueError(f"--json {args.json} is inside the run folder, which this command never writes into")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        result = evaluate_trained(trained, data_root=args.data_root, data_options=parse_kv(args.data_options),
                                  limit=args.limit, device=args.device, compile=args.compile,
                                  channels_last=args.channels_last, batch_size=args.batch_size)
        print("\n".join(_report(trained, result)), flush=True)
        if args.json is not None:
            match = None if trained.released else logged_evaluation(trained.source, trained.global_step)[0]
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(plain({
                "source": paths.rel(trained.source), "checkpoint": trained.origin or paths.rel(trained.checkpoint),
                "config": trained.cfg.name, "baseline": trained.baseline, "weights": trained.weights_label(),
                "global_step": trained.global_step, "result": result, "logged": match,
                "command": shlex.join(["python", "-m", "mdeq.evaluate", *(sys.argv[1:] if argv is None else argv)])}),
                indent=1) + "\n")
    except Exception as err:  # noqa: BLE001 - every error ends in one line
        if args.traceback:
            import traceback

            traceback.print_exc()
        print(error_line(err), file=sys.stderr, flush=True)
        return 2 if is_input_error(err) else 1
    return 0


if __name__ == "__main__":
    from mdeq.engine import allocator

    allocator.keep_freed_memory()  # as mdeq.train on a CPU: no page faults per new tensor; the numbers do not change
    sys.exit(main())
