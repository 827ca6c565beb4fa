"""Solver overhead: our solvers against torchdeq 0.1.0 on the same MDEQ-like f, in one run.

Ratio = solve time / (NFE x time of one f): 1.0 means the solver adds nothing to the cost of f.
Backward ratio = (backward time - one VJP into parameters and z) / (VJPs x time of one VJP w.r.t. z):
1.0 means the IFT backward costs only its vector-Jacobian products.

    python benchmarks/solver_speed.py                 # CPU, writes results/benchmarks/solver_speed_cpu.json
    python benchmarks/solver_speed.py --device cuda   # on a GPU machine
    python benchmarks/solver_speed.py --case model    # only the full MDEQ f (CIFAR MDEQ-small, official config)

torchdeq is a benchmark-only dependency (``pip install torchdeq==0.1.0``); the package never imports it.
Times are medians over ``--repeats`` after a warm-up; f and VJP times are medians of 30 calls.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, MDEQLikeMap, median, provenance, sync, timeit, write_json  # noqa: E402

from mdeq.engine.allocator import keep_freed_memory  # noqa: E402
from mdeq.core.implicit import ImplicitLayer  # noqa: E402
from mdeq.core.solvers import SOLVERS  # noqa: E402


class Counter:
    def __init__(self, f):
        self.f, self.n = f, 0

    def __call__(self, *a, **k):
        self.n += 1
        return self.f(*a, **k)


def _rel_max(f, z):
    with torch.no_grad():
        fz = f(z)
        num = sum((a - b).flatten(1).square().sum(1) for a, b in zip(fz, z)).sqrt()
        den = sum(a.flatten(1).square().sum(1) for a in fz).sqrt()
        return (num / den).max().item()


def _torchdeq_layer(solver, max_iter, tol, b_max_iter=None, ift=False):
    from torchdeq import get_deq
    return get_deq(core="sliced", ift=ift, f_solver=solver, b_solver=solver, f_max_iter=max_iter,
                   eval_f_max_iter=max_iter, f_tol=tol, f_stop_mode="rel", b_max_iter=b_max_iter or max_iter,
                   b_tol=tol, b_stop_mode="rel")


CASES = ("mdeq_like", "anchor3", "model")


def build_case(name, device, batch):
    """Return (make_f, z0, params, description) for a benchmark case.

    ``make_f()`` gives f(z_list) -> z_list; the model case rebuilds it per training step because
    the per-forward weight-norm weights and dropout masks (FTheta.prepare) carry a graph.
    """
    if name in ("mdeq_like", "anchor3"):
        torch.manual_seed(0)
        fm = (MDEQLikeMap() if name == "mdeq_like" else
              MDEQLikeMap(channels=(8, 16, 32), upsample="bilinear")).to(device)
        shapes = fm.state_shapes(32)
        x = [torch.randn(batch, *s, device=device) for s in shapes]
        z0 = [torch.zeros(batch, *s, device=device) for s in shapes]
        f = lambda z: fm(z, x)  # noqa: E731
        return (lambda: f), z0, list(fm.parameters()), {"map": f"MDEQLikeMap (benchmarks/_common.py), {name}",
                                                        "shapes": shapes}
    if name == "model":
        import mdeq
        torch.manual_seed(0)
        cfg = mdeq.load_config("cifar10_small_official")
        model = mdeq.build_model(cfg).to(device).train()
        with torch.no_grad():
            x = model.stem(torch.randn(batch, 3, 32, 32, device=device))
            inj = model.injection(x) if model.injection is not None else x
        func = model.f
        z0 = [inj.new_zeros(batch, c, 32 >> i, 32 >> i) for i, c in enumerate(func.num_channels)]

        def make_f():
            prepared = func.prepare(batch, inj)
            return lambda z: func(z, inj, prepared)

        return make_f, z0, list(func.parameters()), {"config": "cifar10_small_official (train mode, dropout on)",
                                                     "shapes": [tuple(t.shape[1:]) for t in z0]}
    raise ValueError(f"unknown case {name!r}; choose one of {CASES}")


def bench_forward(make_f, z0, device, repeats, max_iters, tol, memory, with_torchdeq, histories=("auto",)):
    rows = []
    with torch.no_grad():
        f = make_f()
    t_f = median(timeit(lambda: f(z0) and None, device, 30, warmup=3))
    # f is timed at z* too (GN makes it data-independent, but be safe)
    with torch.no_grad():
        z_star, _ = SOLVERS["broyden"](f, z0, max_iter=60, tol=tol)
        t_f = median(timeit(lambda: f(z_star), device, 30, warmup=3))
    solvers = [("ours", "broyden", {"memory": memory, "history": h}) for h in histories]
    solvers += [("ours", "anderson", {}), ("ours", "fixed_point", {})]
    if with_torchdeq:
        solvers += [("torchdeq", "broyden", {}), ("torchdeq", "anderson", {}), ("torchdeq", "fixed_point_iter", {})]
    for max_iter in max_iters:
        for impl, solver, opts in solvers:
            counter = Counter(f)
            out = {}
            if impl == "ours":
                def run():
                    counter.n = 0
                    with torch.no_grad():
                        out["z"], out["stats"] = SOLVERS[solver](counter, z0, max_iter=max_iter, tol=tol, **opts)
            else:
                layer = _torchdeq_layer(solver, max_iter, tol).eval()

                def run():
                    counter.n = 0
                    with torch.no_grad():
                        zs, _ = layer(lambda *z: tuple(counter(list(z))), tuple(z0))
                    out["z"] = list(zs[-1])
            times = timeit(run, device, repeats)
            nfe = counter.n
            rel = _rel_max(f, out["z"])
            st = out.get("stats")
            if st is not None and "history" in st.extra:
                opts = {**opts, "history": st.extra["history"]}  # what "auto" chose
            rows.append({"impl": impl, "solver": solver, "options": opts, "max_iter": max_iter, "tol": tol,
                         "stop_reason": st.stop_reason if st else None,
                         "restarts": st.extra.get("restarts") if st else None, "nfe": nfe, "time_s": median(times), "times_s": times, "f_time_ms": 1e3 * t_f,
                         "ratio": median(times) / (nfe * t_f), "rel_residual_max": rel,
                         "converged": rel < tol * 1.0001})
            label = f"{solver}/{opts['history']}" if "history" in opts else solver
            print(f"  fwd  {impl:8s} {label:20s} max_iter={max_iter:3d}  nfe={nfe:3d}  "
                  f"time={median(times):.3f}s  ratio={rows[-1]['ratio']:.2f}  rel={rel:.2e}", flush=True)
    return rows, t_f


def bench_backward(make_f, z0, params, device, repeats, max_iter, tol, memory, with_torchdeq, histories=("auto",)):
    """One training step (forward + IFT backward), Broyden both ways; times the backward only."""
    rows = []
    f = make_f()
    cur = {"f": f}
    with torch.no_grad():
        z_star, _ = SOLVERS["broyden"](f, z0, max_iter=60, tol=tol)
    zs = [t.detach().requires_grad_() for t in z_star]
    fz = f(zs)
    v = [torch.randn_like(t) for t in fz]
    t_vjp_z = median(timeit(lambda: torch.autograd.grad(fz, zs, v, retain_graph=True), device, 30, warmup=3))
    t_vjp_all = median(timeit(lambda: torch.autograd.grad(fz, zs + params, v, retain_graph=True), device, 30, warmup=3))
    w = [torch.randn_like(t) for t in fz]
    loss_of = lambda z: sum((a * b).sum() for a, b in zip(z, w))  # noqa: E731
    impls = [("ours", h) for h in histories] + ([("torchdeq", None)] if with_torchdeq else [])
    for impl, history in impls:
        rec = {}
        if impl == "ours":
            opts = {"memory": memory, "history": history}
            layer = ImplicitLayer(lambda z: cur["f"](z), max_iter=max_iter, tol=tol, solver_options=opts,
                                  backward_max_iter=max_iter, backward_tol=tol, backward_options=opts, warn=False)

            def step():
                cur["f"] = make_f()
                z, info = layer(z0)
                loss = loss_of(z)
                sync(device)
                t0 = _now()
                loss.backward()
                sync(device)
                rec["bwd"] = _now() - t0
                rec["vjps"] = info.backward.nfe
                rec["brel"] = info.backward.rel_lowest.max().item()
                rec["stop"] = info.backward.stop_reason
                rec["history"] = info.backward.extra.get("history")
        else:
            import torchdeq.grad as tg
            layer = _torchdeq_layer("broyden", max_iter, tol, b_max_iter=max_iter, ift=True).train()
            real_autograd = tg.autograd

            class _CountingAutograd:
                n = 0

                def __getattr__(self, name):
                    return getattr(real_autograd, name)

                def grad(self, *a, **k):
                    _CountingAutograd.n += 1
                    return real_autograd.grad(*a, **k)

            counting = _CountingAutograd()
            writer_info = {}

            def step():
                tg.autograd = counting
                try:
                    fstep = make_f()
                    zs_out, _ = layer(lambda *z: tuple(fstep(list(z))), tuple(z0),
                                      backward_writer=lambda info: writer_info.update(info))
                    loss = loss_of(list(zs_out[-1]))
                    _CountingAutograd.n = 0
                    sync(device)
                    t0 = _now()
                    loss.backward()
                    sync(device)
                    rec["bwd"] = _now() - t0
                    rec["vjps"] = _CountingAutograd.n
                    rel = writer_info.get("rel_lowest")
                    rec["brel"] = float(rel.max()) if rel is not None else float("nan")
                finally:
                    tg.autograd = real_autograd
        for p in params:
            p.grad = None
        step()  # warm-up
        bwd, vjps, brel = [], [], []
        for _ in range(repeats):
            for p in params:
                p.grad = None
            step()
            bwd.append(rec["bwd"]), vjps.append(rec["vjps"]), brel.append(rec["brel"])
        t = median(bwd)
        n = int(median(vjps))
        ratio = (t - t_vjp_all) / (n * t_vjp_z)
        rows.append({"impl": impl, "solver": "broyden", "history": rec.get("history"), "max_iter": max_iter,
                     "tol": tol, "vjps": n,
                     "stop_reason": rec.get("stop"),
                     "backward_time_s": t, "backward_times_s": bwd, "vjp_z_ms": 1e3 * t_vjp_z,
                     "vjp_all_ms": 1e3 * t_vjp_all, "backward_ratio": ratio, "backward_rel_max": median(brel)})
        label = f"broyden/{rec['history']}" if rec.get("history") else "broyden"
        print(f"  bwd  {impl:8s} {label:20s} max_iter={max_iter:3d}  vjps={n:3d}  time={t:.3f}s  "
              f"ratio={ratio:.2f}  rel={median(brel):.2e}", flush=True)
    return rows


def _now():
    import time
    return time.perf_counter()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--case", nargs="+", default=list(CASES), choices=CASES,
                   help="mdeq_like: 4-scale MDEQ-like map (runs to the budget); anchor3: the 3-scale anchor of "
                        "deq_libraries.md (converges, so NFE to tol compare); model: CIFAR MDEQ-small's f")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--memory", type=int, default=18, help="our L-Broyden history m")
    p.add_argument("--max-iters", type=int, nargs="+", default=[30, 100])
    p.add_argument("--histories", nargs="+", default=["auto"], choices=("auto", "low_rank", "residuals"),
                   help="our Broyden's history store(s) to time (low_rank is the store before the residual one)")
    p.add_argument("--no-torchdeq", action="store_true")
    p.add_argument("--glibc-default", action="store_true", help="glibc's default malloc, without mdeq.engine.allocator's setting")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if not args.glibc_default:
            keep_freed_memory()  # as mdeq.train does on a CPU: no page faults on each new state-sized tensor
    with_torchdeq = not args.no_torchdeq
    if with_torchdeq:
        try:
            import torchdeq  # noqa: F401
        except ImportError:
            sys.exit("torchdeq is not installed: pip install torchdeq==0.1.0 (or pass --no-torchdeq)")
    cases = args.case
    payload = {"provenance": provenance(args, device), "cases": {}}
    for case in cases:
        print(f"case {case} on {device} (batch {args.batch}, tol {args.tol} rel)", flush=True)
        make_f, z0, params, desc = build_case(case, device, args.batch)
        fwd, t_f = bench_forward(make_f, z0, device, args.repeats, args.max_iters, args.tol, args.memory, with_torchdeq,
                                 args.histories)
        bwd = bench_backward(make_f, z0, params, device, args.repeats, max(args.max_iters), args.tol, args.memory,
                             with_torchdeq, args.histories)
        payload["cases"][case] = {"description": desc, "f_time_ms": 1e3 * t_f, "forward": fwd, "backward": bwd}
    out = args.out or ROOT / "results" / "benchmarks" / f"solver_speed_{device.type}.json"
    write_json(out, payload)
    _print_table(payload)
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


def _print_table(payload):
    for case, res in payload["cases"].items():
        print(f"\n{case}: f = {res['f_time_ms']:.1f} ms")
        print(f"{'solver':22s} {'max_iter':>8s} | {'ours NFE':>8s} {'ratio':>6s} | {'torchdeq NFE':>12s} {'ratio':>6s}")
        by = {(r["impl"], r["solver"].replace("_iter", ""), r["options"].get("history", ""), r["max_iter"]): r
              for r in res["forward"]}
        for (impl, solver, history, mi), r in sorted(by.items(), key=lambda kv: (kv[0][3], kv[0][1], kv[0][2])):
            if impl != "ours":
                continue
            t = by.get(("torchdeq", solver, "", mi))
            tcol = f"{t['nfe']:12d} {t['ratio']:6.2f}" if t else f"{'-':>12s} {'-':>6s}"
            label = f"{solver}/{history}" if history else solver
            print(f"{label:22s} {mi:8d} | {r['nfe']:8d} {r['ratio']:6.2f} | {tcol}")
        for r in res["backward"]:
            print(f"IFT backward ({r['impl']}{'/' + r['history'] if r.get('history') else ''}): {r['vjps']} VJPs, {r['backward_time_s']:.3f} s, "
                  f"ratio {r['backward_ratio']:.2f}, rel {r['backward_rel_max']:.1e}")


if __name__ == "__main__":
    main()
