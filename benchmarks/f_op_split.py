"""Where one evaluation of f_theta spends its time, per operator kind and memory format, without the profiler.

The training step is about 16 f evaluations and 18 VJPs of f (``benchmarks/train_step_profile.py``), so an f
evaluation bounds how fast the step can get. ``torch.profiler`` is no help for the split on this CPU: it
inflated the VJPs about 2x and attributed 4.6 ms to a ReLU that takes 1.4 ms. This script wraps
``F.conv2d``, ``F.group_norm`` and ``F.relu`` (the ops f is made of, ``mdeq/core/model.py``) in wall clocks and
evaluates f (no grad, trained MDEQ-small weights, batch 128) in channels_last (``mdeq.train``'s CPU default)
and in NCHW, alternating the two; it also times one VJP of f with respect to z in each format (no split:
autograd's backward kernels cannot be wrapped from Python).

    python benchmarks/f_op_split.py   # results/benchmarks/f_op_split_cpu.json
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import median, out_path, provenance, timeit, trained_model, trained_parser, write_json  # noqa: E402

FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


class _Clocks:
    """Wall time per (op, input shape) of the wrapped functional ops, while ``on``."""

    def __init__(self):
        self.on, self.times = False, defaultdict(float)

    def wrap(self, name, fn):
        def timed(x, *a, **k):
            if not self.on:
                return fn(x, *a, **k)
            t0 = time.perf_counter()
            out = fn(x, *a, **k)
            self.times[(name, tuple(x.shape))] += time.perf_counter() - t0
            return out
        return timed


def main(argv=None) -> None:
    args = trained_parser(__doc__.split("\n\n")[0], "f_op_split_cpu.json",
                          "timed evaluations per format and round").parse_args(argv)
    clocks = _Clocks()
    for name in ("conv2d", "group_norm", "relu"):  # model.py calls these through F (nn.GroupNorm does too)
        setattr(F, name, clocks.wrap(name, getattr(F, name)))
    cfg, model = trained_model(args)
    f = model.f
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, *cfg.data.image_size, generator=g)

    setups = {}
    for fmt_name, fmt in FORMATS.items():
        with torch.no_grad():
            x = images.contiguous(memory_format=fmt)
            injection = model.injection(model.stem(x))
            prepared = f.prepare(args.batch, injection, generator=torch.Generator().manual_seed(1))
            z, _ = model.equilibrium(x)
        zg = [t.detach().requires_grad_() for t in z]
        with torch.no_grad():
            prepared_const = type(prepared)(*[tuple(_detach(t) for t in part) for part in prepared])
        out = f(zg, injection.detach(), prepared_const)
        u = [torch.randn(o.shape, generator=g).contiguous(memory_format=fmt) for o in out]
        setups[fmt_name] = (z, injection, prepared, zg, out, u)

    per_f, f_ms, vjp_ms = {k: [] for k in FORMATS}, {k: [] for k in FORMATS}, {k: [] for k in FORMATS}
    by_shape = {k: defaultdict(list) for k in FORMATS}
    for _ in range(args.rounds):
        for fmt_name, (z, injection, prepared, zg, out, u) in setups.items():
            with torch.no_grad():
                f(z, injection, prepared)  # warm-up
                for _ in range(args.repeats):
                    clocks.times.clear()
                    clocks.on = True
                    t0 = time.perf_counter()
                    f(z, injection, prepared)
                    f_ms[fmt_name].append(1000 * (time.perf_counter() - t0))
                    clocks.on = False
                    kinds = defaultdict(float)
                    for (op, shape), t in clocks.times.items():
                        kinds[op] += 1000 * t
                        by_shape[fmt_name][f"{op} {list(shape)}"].append(1000 * t)
                    per_f[fmt_name].append(dict(kinds))
            vjp = lambda: torch.autograd.grad(out, zg, u, retain_graph=True)  # noqa: E731
            vjp_ms[fmt_name] += [1000 * t for t in timeit(vjp, "cpu", args.repeats)]

    result = {"benchmark": "f_op_split", "config": args.config, "batch": args.batch, "weights": args.weights,
              "threads": args.threads, "formats": {}}
    for fmt_name in FORMATS:
        split = {op: median([d.get(op, 0.0) for d in per_f[fmt_name]]) for op in ("conv2d", "group_norm", "relu")}
        total = median(f_ms[fmt_name])
        result["formats"][fmt_name] = {
            "f_ms_median": total, "op_ms_median": split, "other_ms": total - sum(split.values()),
            "vjp_ms_median": median(vjp_ms[fmt_name]),
            "op_shape_ms_median": {k: median(v) for k, v in sorted(by_shape[fmt_name].items())},
            "f_ms": f_ms[fmt_name], "vjp_ms": vjp_ms[fmt_name]}
        print(f"{fmt_name:13s} f {total:6.1f} ms = " + ", ".join(f"{k} {v:.1f}" for k, v in split.items())
              + f", other {total - sum(split.values()):.1f}; VJP {median(vjp_ms[fmt_name]):.1f} ms")
    result["provenance"] = provenance(args, "cpu")
    write_json(out_path(args), result)


def _detach(t):
    """A tensor detached, a tuple of tensors detached; None (no dropout mask) as it is."""
    if isinstance(t, tuple):
        return tuple(_detach(a) for a in t)
    return t.detach() if isinstance(t, torch.Tensor) else t


if __name__ == "__main__":
    main()
