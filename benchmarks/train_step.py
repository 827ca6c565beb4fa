"""Time per training step and peak memory of the real engine (``mdeq.engine.loop.train_step``), per phase.

Measures CIFAR-10 MDEQ-small (``cifar10_small_official``) at batch 32 by default in the unrolled warm-up
phase (``solver.unroll_steps`` applications of f with ordinary backprop) and in the implicit phase
(Broyden forward solve, one f(z*) with grad, Broyden IFT backward solve). Each phase runs in a fresh
child process so that its peak memory is its own. Memory: on CUDA ``max_memory_allocated``; on a CPU the
process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``; ``mdeq.engine.metrics.PeakMemory``)
and its increase over the resident set after set-up (model, optimiser, one batch), since the torch
runtime alone is several hundred MB. Step times are medians over ``--steps`` after ``--warmup`` steps.

    python benchmarks/train_step.py                  # CPU, 1 thread: results/benchmarks/train_step_cpu.json
    python benchmarks/train_step.py --device cuda    # results/benchmarks/train_step_cuda.json
    python benchmarks/train_step.py --config cifar10_small_paper --baseline anode_172k --batch 128
                                                     # a Table 1 baseline (one phase, "none")
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, provenance, timeit, write_json  # noqa: E402

PHASES = ("unrolled", "implicit")
BASELINE_PHASES = ("none",)


def run_phase(args) -> dict:
    """In the child: build the model, run warm-up + timed steps of one phase, return the measurements."""
    from mdeq.core.config import load_config
    from mdeq.engine.metrics import PeakMemory
    from mdeq.core.model import build_model
    from mdeq.engine.build import build_criterion, build_optimizer
    from mdeq.engine.loop import train_step
    from mdeq.engine.step import set_phase, solver_stats

    warnings.filterwarnings("ignore", "IFT backward solve did not converge")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config, {"data.batch_size": args.batch})
    torch.manual_seed(0)
    if args.baseline:
        from mdeq.engine.baselines import build_baseline

        model = build_baseline(args.baseline, num_classes=cfg.data.num_classes).to(device).train()
    else:
        model = build_model(cfg).to(device).train()
        model.deq.warn = False
    optimizer = build_optimizer(model, cfg.train)
    criterion = build_criterion(cfg).to(device)
    h, w = cfg.data.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, h, w, generator=g).to(device)
    y = torch.randint(0, cfg.data.num_classes, (args.batch,), generator=g).to(device)
    phase = set_phase(model, cfg, 0 if args.child in ("unrolled", "none") else cfg.train.pretrain_steps)
    assert phase == args.child, (phase, args.child)
    memory = PeakMemory(device)
    setup_mb = memory.current_mb()
    memory.reset()
    stats = []

    def step():
        loss, _ = train_step(model, criterion, optimizer, x, y)
        loss.item()

    times = [1000 * s for s in timeit(step, device, args.steps, args.warmup,
                                      after=lambda: stats.append(solver_stats(model)))]
    peak = memory.peak_mb()

    def mean(key):
        vals = [s[key] for s in stats if key in s]
        return statistics.fmean(vals) if vals else None

    return {
        "phase": phase,
        "step_time_ms_median": statistics.median(times),
        "step_time_ms": times,
        "peak_mem_mb": peak,
        "setup_mem_mb": setup_mb,
        "peak_minus_setup_mb": peak - setup_mb,
        "mem_kind": memory.kind,
        "nfe_forward": mean("nfe_forward"),
        "nfe_backward": mean("nfe_backward"),
        "rel_residual_forward": mean("rel_residual_forward"),
        "rel_residual_backward": mean("rel_residual_backward"),
        "num_params": sum(p.numel() for p in model.parameters()),
        "unroll_steps": cfg.solver.unroll_steps,
        "max_iter": cfg.solver.max_iter,
        "backward_max_iter": cfg.solver.backward_max_iter,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10_small_official")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="default results/benchmarks/train_step_<device>.json")
    p.add_argument("--baseline", default=None, help="time a Table 1 baseline (e.g. anode_172k) with the config's data")
    p.add_argument("--child", choices=PHASES + BASELINE_PHASES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(run_phase(args)))
        return
    results = {}
    for phase in (BASELINE_PHASES if args.baseline else PHASES):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--config", args.config,
               "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--device", args.device]
        if args.baseline:
            cmd += ["--baseline", args.baseline]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"{phase} child failed:\n{out.stderr[-3000:]}")
        results[phase] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[phase]
        print(f"{phase:9s} {r['step_time_ms_median']:8.0f} ms/step  peak {r['peak_mem_mb']:7.0f} MB "
              f"(+{r['peak_minus_setup_mb']:.0f} MB over set-up, {r['mem_kind']})  nfe {r['nfe_forward']}"
              f"/{r['nfe_backward']}", flush=True)
    torch.set_num_threads(args.threads)  # so the provenance records the children's thread count
    device_name = torch.device(args.device).type
    path = Path(args.out) if args.out else ROOT / "results" / "benchmarks" / f"train_step_{device_name}.json"
    write_json(path, {"benchmark": "train_step", "config": args.config, "baseline": args.baseline,
                      "batch": args.batch, "results": results,
                      "provenance": provenance(args, args.device)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
