"""Where the time of one implicit training step goes, and the step against a reference commit, in one run.

The step is the engine's (``mdeq.engine.loop.train_step``) on ``cifar10_small_paper`` at the paper's batch of 128,
in the implicit phase, with both solves run to their caps (T_f 15, T_b 18: the forward tolerance is set
out of reach, as it is in practice in training). The split comes from the profiler ranges the layer
opens (``mdeq::forward_solve``, ``mdeq::forward_f``, ``mdeq::f_star``, ``mdeq::backward_solve``,
``mdeq::backward_vjp``) and from this script's own (forward, loss, backward, optimiser):

- forward solve: f evaluations, and the solver's own work (bookkeeping: Broyden's low-rank products,
  residuals, the lowest iterate);
- f(z*) with grad; stem, injection and head forward; the loss;
- backward solve: the VJPs, and the solver's own work;
- the rest of the backward (parameter gradients through f(z*), the head and the stem); the optimiser.

With ``--ref COMMIT`` the same step of that commit (a git worktree under ``runs/bench/``) is timed in
the same run, child processes alternating ref / current so that a load change hits both alike, and
the loss and gradients of both on one fixed batch are compared. ``--compile``, ``--amp``, ``--allocator``
(glibc's default malloc instead of ``mdeq.engine.allocator``'s setting) and ``--check-every N`` add variants of
today's code. Every variant's first step (same weights, batch and dropout masks) is also compared with
the float64 step, the reference for "the same gradients to float32 rounding". ``--weights`` starts from
a checkpoint: at initial weights the solves are far from converged and the float32 gradient of any
variant is off the float64 one by about 100 %, so compare gradients from trained weights.

    python benchmarks/train_step_profile.py --ref 84ce564 --compile --amp --allocator --check-every 4 \
        --weights results/runs/cifar10_mdeq_small/checkpoint.pt   # results/benchmarks/train_step_profile_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANGES = ("mdeq::forward_solve", "mdeq::forward_f", "mdeq::f_star", "mdeq::backward_solve", "mdeq::backward_vjp",
          "step::forward", "step::loss", "step::backward", "step::optimizer")


def child(args) -> dict:
    """Build the model and a fixed batch, time ``--steps`` steps, profile one, return the measurements."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    load_config = _first("mdeq.core.config", "mdeq.config").load_config
    model_mod = _first("mdeq.core.model", "mdeq.model")
    build_model = model_mod.build_model
    build = _first("mdeq.engine.build", "mdeq.train")
    build_criterion, build_optimizer = build.build_criterion, build.build_optimizer
    set_phase = _first("mdeq.engine.step", "mdeq.train").set_phase

    warnings.filterwarnings("ignore", "IFT backward solve did not converge")
    torch.set_num_threads(args.threads)
    if not args.glibc_default:  # as mdeq.train does on a CPU (a ref commit without mdeq.engine.allocator runs without it)
        try:
            _first("mdeq.engine.allocator", "mdeq.allocator").keep_freed_memory()
        except ImportError:
            pass
    draw = model_mod._variational_mask  # dropout masks drawn in float32 in every variant (float64, bf16): same masks
    model_mod._variational_mask = lambda b, c, p, like, gen: draw(b, c, p, like.float(), gen).to(like.dtype)
    overrides = {"data.batch_size": args.batch, "solver.tol": 1e-12}
    cfg = load_config(args.config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    if args.weights:
        load_checkpoint = _first("mdeq.engine.checkpoint", "mdeq.checkpoint").load_checkpoint
        model.load_state_dict(load_checkpoint(args.weights)["model"])
    model.deq.warn = False
    if args.check_every:
        for opts in (model.deq.solver_options, model.deq.backward_options):
            opts["check_every"] = args.check_every
    if args.float64:  # the float64 step: the reference the variants' float32 gradients are measured against
        model = model.double()
    optimizer = build_optimizer(model, cfg.train)
    criterion = build_criterion(cfg)
    inputs = _backward_inputs(optimizer)
    g = torch.Generator().manual_seed(0)
    h, w = cfg.data.image_size
    x = torch.rand(args.batch, 3, h, w, generator=g)
    y = torch.randint(0, cfg.data.num_classes, (args.batch,), generator=g)
    if args.float64:
        x = x.double()
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    set_phase(model, cfg, cfg.train.pretrain_steps)
    model.deq.compile_forward = args.compile
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp)

    def step():
        with record_function("step::forward"), autocast:
            logits = model(x)
        with record_function("step::loss"), autocast:
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        with record_function("step::backward"):
            loss.backward(inputs=inputs)
        grads = None
        if first[0]:  # the loss and gradients of the first step, before any parameter moves
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            first[0] = False
        with record_function("step::optimizer"):
            optimizer.step()
        return loss.item(), grads

    first = [True]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    torch.manual_seed(1)  # the same dropout masks in every variant's first step
    t0 = time.perf_counter()
    loss0, grads0 = step()
    first_ms = 1000 * (time.perf_counter() - t0)  # with --compile: includes compiling f
    info = model.last_info
    solver = {"forward_rel_max": info.forward.rel_lowest.max().item(),
              "forward_rel_mean": info.forward.rel_lowest.mean().item(),
              "backward_rel_max": info.backward.rel_lowest.max().item(),
              "backward_rel_mean": info.backward.rel_lowest.mean().item(),
              "history": info.forward.extra.get("history", "low_rank")}
    if args.float64:
        torch.save({"loss": loss0, "grads": grads0}, args.grads_out)
        return {"loss0": loss0, "solver": solver}
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step()
        times.append(1000 * (time.perf_counter() - t0))
    times = times[args.warmup:]
    out = {"step_ms_median": statistics.median(times), "step_ms": times, "first_step_ms": first_ms, "loss0": loss0,
           "grad_norm0": grads0.norm().item(), "solver": solver, "nfe_forward": info.forward.nfe,
           "nfe_backward": info.backward.nfe if info.backward is not None else None}
    if args.grads_out:
        torch.save({"loss": loss0, "grads": grads0}, args.grads_out)
    model.load_state_dict(state)
    optimizer.load_state_dict(opt_state)
    if args.profile:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile):
                step()
        totals = {e.key: e.cpu_time_total / 1000 / args.profile for e in prof.key_averages() if e.key in RANGES}
        counts = {e.key: e.count // args.profile for e in prof.key_averages() if e.key in RANGES}
        out["ranges_ms"], out["range_calls"] = totals, counts
        out["unprofiled_ms"] = _unprofiled_split(model, criterion, optimizer, x, y, autocast, args.profile)
    return out


def _first(*names: str):
    """The first of the modules ``names`` that imports: a reference commit's package may predate the layout
    in mdeq/core, mdeq/engine and mdeq/paper (commit 41ac009), where these modules sat in mdeq/ itself."""
    import importlib

    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"none of {', '.join(names)} imports")


def _backward_inputs(optimizer):
    """What the backward reaches, as the engine of the commit on the path names it: ``gradient_inputs`` where
    the engine has it, else None (every leaf: older engines computed dL/dz* too)."""
    gradient_inputs = getattr(_first("mdeq.engine.step", "mdeq.train"), "gradient_inputs", None)
    return gradient_inputs(optimizer) if gradient_inputs is not None else None


def _unprofiled_split(model, criterion, optimizer, x, y, autocast, steps) -> dict:
    """The step's forward, backward and backward VJPs timed with clocks, without the profiler.

    Why: the profiler's per-op records cost most in the backward's many small autograd ops, so its
    split overstates the VJPs (about 2x here); these clocks say what they cost when nothing watches.
    """
    import torch

    inputs = _backward_inputs(optimizer)
    real_grad, vjp = torch.autograd.grad, []

    def timed_grad(*a, **k):  # the backward solve's VJPs are torch.autograd.grad calls (mdeq.core.implicit)
        t0 = time.perf_counter()
        out = real_grad(*a, **k)
        vjp.append(time.perf_counter() - t0)
        return out

    parts = {"forward": [], "backward": [], "backward_vjps": [], "optimiser": []}
    for _ in range(steps):
        vjp.clear()
        t0 = time.perf_counter()
        with autocast:
            loss = criterion(model(x), y)
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.grad = timed_grad
        try:
            loss.backward(inputs=inputs)
        finally:
            torch.autograd.grad = real_grad
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        for k, v in zip(parts, (t1 - t0, t2 - t1, sum(vjp), t3 - t2)):
            parts[k].append(1000 * v)
    return {k: statistics.median(v) for k, v in parts.items()}


def split(ranges: dict) -> dict:
    """The step's parts (ms) from the inclusive range totals."""
    r = lambda k: ranges.get(k, 0.0)  # noqa: E731
    return {
        "forward solve: f evaluations": r("mdeq::forward_f"),
        "forward solve: solver bookkeeping": r("mdeq::forward_solve") - r("mdeq::forward_f"),
        "f(z*) with grad": r("mdeq::f_star"),
        "stem, injection, head (forward)": r("step::forward") - r("mdeq::forward_solve") - r("mdeq::f_star"),
        "loss": r("step::loss"),
        "backward solve: VJPs": r("mdeq::backward_vjp"),
        "backward solve: solver bookkeeping": r("mdeq::backward_solve") - r("mdeq::backward_vjp"),
        "backward: parameter gradients through f(z*), head, stem": r("step::backward") - r("mdeq::backward_solve"),
        "optimiser": r("step::optimizer"),
    }


def _run_child(args, pythonpath: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), "--child", "--config", args.config,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), *(["--weights", str(Path(args.weights).resolve())] if args.weights else []),
           *extra]
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=pythonpath, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({pythonpath}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _worktree(ref: str) -> Path:
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    path = ROOT / "runs" / "bench" / f"ref_{commit[:12]}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), commit], cwd=ROOT, check=True,
                       capture_output=True)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10_small_paper")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per child")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating ref / current children")
    p.add_argument("--ref", default=None, help="a commit to time against (e.g. the one before a speed change)")
    p.add_argument("--amp", action="store_true", help="also time the current code under bf16 autocast")
    p.add_argument("--compile", action="store_true", help="also time the current code with f compiled (forward solve)")
    p.add_argument("--weights", default=None,
                   help="a checkpoint to start from (e.g. results/runs/cifar10_mdeq_small/checkpoint.pt: trained "
                        "weights, where both solves converge); default: initial weights")
    p.add_argument("--allocator", action="store_true",
                   help="also time the current code with glibc's default malloc (without mdeq.engine.allocator)")
    p.add_argument("--check-every", type=int, default=0,
                   help="also time the current code with both solvers checking their stopping rule every N steps")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--glibc-default", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--profile", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--grads-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from _common import provenance, write_json

    tmp = ROOT / "runs" / "bench"
    tmp.mkdir(parents=True, exist_ok=True)
    variants = {"current": (ROOT, ["--channels-last"])}
    if args.ref:
        variants = {"ref": (_worktree(args.ref), ["--channels-last"]), **variants}  # the same step, older code
    if args.compile:
        variants["current_compile"] = (ROOT, ["--channels-last", "--compile"])
    if args.amp:
        variants["current_bf16"] = (ROOT, ["--channels-last", "--amp"])
    if args.allocator:
        variants["current_glibc_default"] = (ROOT, ["--channels-last", "--glibc-default"])
    if args.check_every:
        variants[f"current_check{args.check_every}"] = (ROOT, ["--channels-last", "--check-every", str(args.check_every)])
    reference = _run_child(args, ROOT, ["--channels-last", "--float64", "--grads-out", str(tmp / "grads_float64.pt")])
    print(f"float64 step: loss {reference['loss0']:.6f}, solver {reference['solver']}", flush=True)
    runs = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, (path, extra) in variants.items():
            extra = list(extra)
            if r == 0:
                extra += ["--grads-out", str(tmp / f"grads_{name}.pt")]
                if name == "current":
                    extra += ["--profile", "2"]
            res = _run_child(args, path, extra)
            runs[name].append(res)
            print(f"round {r} {name:12s} {res['step_ms_median']:8.0f} ms/step  nfe {res['nfe_forward']}/"
                  f"{res['nfe_backward']}  loss {res['loss0']:.6f}", flush=True)
    result = {}
    for name, rs in runs.items():
        result[name] = {"step_ms_median": statistics.median(t for r in rs for t in r["step_ms"]),
                        "step_ms": [t for r in rs for t in r["step_ms"]], "nfe_forward": rs[0]["nfe_forward"],
                        "nfe_backward": rs[0]["nfe_backward"], "loss0": rs[0]["loss0"],
                        "solver": rs[0]["solver"], "first_step_ms": [r["first_step_ms"] for r in rs]}
    prof = runs["current"][0]
    parts = split(prof["ranges_ms"])
    total = sum(parts.values())
    result["current"]["profile_ms"] = parts
    result["current"]["profile_fraction"] = {k: v / total for k, v in parts.items()}
    result["current"]["ranges_ms"], result["current"]["range_calls"] = prof["ranges_ms"], prof["range_calls"]
    result["current"]["unprofiled_ms"] = prof["unprofiled_ms"]
    rg = prof["ranges_ms"]
    result["current"]["forward_solver_ratio"] = rg["mdeq::forward_solve"] / rg["mdeq::forward_f"]
    result["current"]["backward_solver_ratio"] = rg["mdeq::backward_solve"] / rg["mdeq::backward_vjp"]
    g_cur = torch.load(tmp / "grads_current.pt")
    g64 = torch.load(tmp / "grads_float64.pt")
    result["float64"] = {"loss0": reference["loss0"], "solver": reference["solver"]}
    for name in variants:  # each variant's float32 first step against the float64 one
        g = torch.load(tmp / f"grads_{name}.pt")
        result[name]["loss_rel_err_vs_float64"] = abs(g["loss"] - g64["loss"]) / abs(g64["loss"])
        result[name]["grad_rel_err_vs_float64"] = ((g["grads"] - g64["grads"]).norm() / g64["grads"].norm()).item()
    for name in variants:
        if name == "current":
            continue
        g = torch.load(tmp / f"grads_{name}.pt")
        result[name]["speedup_of_current"] = result[name]["step_ms_median"] / result["current"]["step_ms_median"]
        result[name]["loss_rel_diff_vs_current"] = abs(g["loss"] - g_cur["loss"]) / abs(g["loss"])
        result[name]["grad_rel_diff_vs_current"] = ((g["grads"] - g_cur["grads"]).norm()
                                                    / g["grads"].norm()).item()
    torch.set_num_threads(args.threads)
    path = args.out or ROOT / "results" / "benchmarks" / "train_step_profile_cpu.json"
    weights = None
    if args.weights:  # which weights: a checkpoint that later chunks of a campaign overwrite is named by its step
        import hashlib
        ckpt = torch.load(args.weights, map_location="cpu", weights_only=False)
        weights = {"path": str(args.weights), "global_step": ckpt.get("global_step"), "epoch": ckpt.get("epoch"),
                   "sha256": hashlib.sha256(Path(args.weights).read_bytes()).hexdigest()}
    write_json(path, {"benchmark": "train_step_profile", "config": args.config, "batch": args.batch,
                      "ref": args.ref, "weights": weights, "results": result,
                      "provenance": provenance(args, "cpu")})
    print(f"\nprofile of the current step ({prof['range_calls']}), ms per step (profiler on):")
    for k, v in parts.items():
        print(f"  {k:58s} {v:8.0f}  {100 * v / total:5.1f} %")
    print(f"  without the profiler (clocks, ms): {prof['unprofiled_ms']}")
    print(f"  forward solver ratio {result['current']['forward_solver_ratio']:.3f}, "
          f"backward solver ratio {result['current']['backward_solver_ratio']:.3f}")
    for name in variants:
        if name != "current":
            r = result[name]
            print(f"{name}: {r['step_ms_median']:.0f} ms/step, current is {r['speedup_of_current']:.2f}x faster; "
                  f"loss rel diff {r['loss_rel_diff_vs_current']:.1e}, grad rel diff {r['grad_rel_diff_vs_current']:.1e}")
    for name in variants:
        r = result[name]
        print(f"{name}: against the float64 step: loss {r['loss_rel_err_vs_float64']:.1e}, "
              f"gradients {r['grad_rel_err_vs_float64']:.1e}; solver {r['solver']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
