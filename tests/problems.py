"""Test problems for the solvers: small multiscale maps with a known or checkable fixed point."""
import torch
import torch.nn.functional as F
from torch import nn

SHAPES = [(2, 8, 8), (4, 4, 4), (8, 2, 2)]


class MultiscaleMap(nn.Module):
    """A contractive 3-scale map in the shape of an MDEQ f: per-scale conv, fusion up and down, tanh.

    Contraction comes from the small weight scale ``gain`` (tanh is 1-Lipschitz).
    """

    def __init__(self, shapes=SHAPES, gain=0.3, seed=0, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shapes = shapes
        chans = [s[0] for s in shapes]
        self.convs = nn.ParameterList(
            [nn.Parameter(gain * torch.randn(c, c, 3, 3, generator=g, dtype=dtype) / (3 * c ** 0.5)) for c in chans])
        self.down = nn.ParameterList(
            [nn.Parameter(gain * torch.randn(chans[i + 1], chans[i], 1, 1, generator=g, dtype=dtype) / chans[i] ** 0.5)
             for i in range(len(chans) - 1)])
        self.up = nn.ParameterList(
            [nn.Parameter(gain * torch.randn(chans[i], chans[i + 1], 1, 1, generator=g, dtype=dtype) / chans[i + 1] ** 0.5)
             for i in range(len(chans) - 1)])

    def forward(self, zs, xs):
        out = []
        for i, z in enumerate(zs):
            y = F.conv2d(z, self.convs[i], padding=1) + xs[i]
            if i > 0:
                y = y + F.conv2d(F.avg_pool2d(zs[i - 1], 2), self.down[i - 1])
            if i + 1 < len(zs):
                y = y + F.interpolate(F.conv2d(zs[i + 1], self.up[i]), scale_factor=2, mode="nearest")
            out.append(torch.tanh(y))
        return out


def inputs(batch=3, shapes=SHAPES, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=g, dtype=dtype) for s in shapes]


def zeros_like_state(xs):
    return [torch.zeros_like(x) for x in xs]


class Counted:
    """Wraps f and counts its calls."""

    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)
