"""What the benchmark scripts share: the timing loop and provenance of mdeq, JSON output, an MDEQ-like map.

The timing loop (``timeit``, ``sync``) is ``mdeq.paper.measure.timing``'s and the provenance record and result file
``mdeq.engine.runlog``'s (as for the studies of ``studies/``), so a benchmark's numbers are measured and labelled as
the notebooks' are.
"""
from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mdeq.paper.measure.runtime import RUNTIME_MODELS
from mdeq.paper.measure.timing import sync, timeit
from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json

__all__ = ["ROOT", "sync", "timeit", "median", "provenance", "write_json", "MDEQLikeMap", "trained_parser",
           "trained_model", "out_path"]


def median(xs):
    return statistics.median(xs)


def provenance(args, device) -> dict:
    """The provenance of a benchmark result (``mdeq.engine.runlog.script_provenance``; the dirty flag covers ``mdeq/``
    and ``benchmarks/``)."""
    return script_provenance(args, device, folder="benchmarks")


def fig4b_parser(description: str) -> argparse.ArgumentParser:
    """The options both Fig. 4b scripts take: batch, config variant, models (time and memory measure the same)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--variant", default="paper", choices=("paper", "official"))
    p.add_argument("--models", nargs="*", default=[m.key for m in RUNTIME_MODELS])
    return p


STEP3250 = "results/benchmarks/weights/cifar10_mdeq_small_step3250.pt"  # the campaign's MDEQ-small, committed


def trained_parser(description: str, out: str, repeats_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark that times a trained model's parts: config, batch, weights, repeats, rounds,
    threads, and ``--out`` (``results/benchmarks/<out>``, relative to the repository root)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default="cifar10_small_paper")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--weights", default=STEP3250)
    p.add_argument("--repeats", type=int, default=10, help=repeats_help)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results") / "benchmarks" / out,
                   help="relative to the repository root")
    return p


def trained_model(args):
    """(cfg, model): threads and ``mdeq.engine.allocator`` as ``mdeq.train`` sets them on a CPU, the config at
    ``args.batch``, its model in train mode with ``args.weights`` loaded (seed 0 for anything not loaded)."""
    from mdeq.engine.allocator import keep_freed_memory
    from mdeq.engine.checkpoint import load_checkpoint
    from mdeq.core.config import load_config
    from mdeq.core.model import build_model

    torch.set_num_threads(args.threads)
    keep_freed_memory()
    cfg = load_config(args.config, {"data.batch_size": args.batch})
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.load_state_dict(load_checkpoint(ROOT / args.weights)["model"])
    return cfg, model


def out_path(args) -> Path:
    """``args.out`` resolved against the repository root."""
    return args.out if args.out.is_absolute() else ROOT / args.out


class MDEQLikeMap(nn.Module):
    """An MDEQ-shaped f over 4 scales (the 3-scale anchor map of our DEQ-library comparison, widened to 4).

    Per scale: conv3x3 (C -> 5C) -> GN -> ReLU -> conv3x3 (5C -> C) -> + injection -> GN -> + z ->
    ReLU -> GN; then fusion (strided conv chains down, 1x1 conv + GN + upsampling up, summed) and
    post-fusion ReLU -> 1x1 conv -> GN. N(0, 0.01) weights. As in the anchor, N(0, 1) injection goes
    to every scale and the block-output and post-fusion GN gains are ``gain`` (0.7), which makes the
    map converge; injecting only at the top scale leaves the untrained map non-contractive.
    Measured here: the 3-scale anchor (8/16/32, bilinear) converges to rel 1e-3; the 4-scale map
    (8/16/32/64) does not (plain iteration stalls near rel 0.4, Broyden near 1e-2), so on it every
    solver runs to its iteration budget.
    """

    def __init__(self, channels=(8, 16, 32, 64), expansion=5, groups=4, gain=0.7, upsample="nearest"):
        super().__init__()
        self.channels = channels
        n = len(channels)
        gn = lambda c, g=groups: nn.GroupNorm(min(g, c), c)  # noqa: E731
        self.conv1 = nn.ModuleList([nn.Conv2d(c, expansion * c, 3, padding=1, bias=False) for c in channels])
        self.gn1 = nn.ModuleList([gn(expansion * c) for c in channels])
        self.conv2 = nn.ModuleList([nn.Conv2d(expansion * c, c, 3, padding=1, bias=False) for c in channels])
        self.gn2 = nn.ModuleList([gn(c) for c in channels])
        self.gn3 = nn.ModuleList([gn(c) for c in channels])
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, bias=False), gn(channels[i]),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode=upsample)))
                elif j < i:
                    layers = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = channels[i] if last else channels[j]
                        layers += [nn.Conv2d(channels[j], cout, 3, stride=2, padding=1, bias=False), gn(cout)]
                        if not last:
                            layers.append(nn.ReLU())
                    row.append(nn.Sequential(*layers))
                else:
                    row.append(nn.Identity())
            self.fuse.append(row)
        self.post = nn.ModuleList([nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), gn(c, max(1, groups // 2)))
                                   for c in channels])
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.normal_(mod.weight, 0, 0.01)
        with torch.no_grad():
            for g in list(self.gn2) + list(self.gn3) + [p[-1] for p in self.post]:
                g.weight.fill_(gain)

    def state_shapes(self, size=32):
        return [(c, size // 2 ** i, size // 2 ** i) for i, c in enumerate(self.channels)]

    def forward(self, z, x):
        blocks = []
        for i, zi in enumerate(z):
            y = F.relu(self.gn1[i](self.conv1[i](zi)))
            y = self.gn2[i](self.conv2[i](y) + x[i])
            blocks.append(self.gn3[i](F.relu(y + zi)))
        out = []
        for i in range(len(blocks)):
            s = blocks[i]
            for j in range(len(blocks)):
                if j != i:
                    s = s + self.fuse[i][j](blocks[j])
            out.append(self.post[i](s))
        return out
