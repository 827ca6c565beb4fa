"""What the neural ODE and augmented neural ODE classifiers of Dupont et al. (2019) are, at 172K parameters.

Why: Table 1 takes its NODE / ANODE rows from Dupont et al.; their CIFAR-10 models are a conv ODE
function (1x1 conv -> ReLU -> 3x3 conv -> ReLU -> 1x1 conv, time appended as a channel to each conv)
integrated over t in [0, 1] with dopri5 at rtol = atol = 1e-3, then a linear layer on the flattened
state. NODE uses 125 filters (173,611 parameters); ANODE 64 filters and 10 zero-initialised extra
channels (172,452). Integration is ``torchdiffeq.odeint`` (or ``odeint_adjoint``); the ODE function
counts its evaluations so each forward reports its NFE.
"""
from __future__ import annotations

import torch
from torch import nn
from torchdiffeq import odeint, odeint_adjoint

ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")


class _ConvTime(nn.Conv2d):
    """Conv2d whose input gets the time t as one extra constant channel (Dupont's Conv2dTime)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels + 1, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t_channel = x.new_ones(x.shape[0], 1, *x.shape[2:]) * t.to(x.dtype)
        return super().forward(torch.cat([t_channel, x], dim=1))


class ConvODEFunc(nn.Module):
    """dz/dt = f(t, z) for z (B, C, H, W); ``nfe`` counts calls (forward and, with adjoint, backward)."""

    def __init__(self, channels: int, num_filters: int, *, time_dependent: bool = True):
        super().__init__()
        self.time_dependent = time_dependent
        if time_dependent:
            self.conv1 = _ConvTime(channels, num_filters, 1)
            self.conv2 = _ConvTime(num_filters, num_filters, 3)
            self.conv3 = _ConvTime(num_filters, channels, 1)
        else:
            self.conv1 = nn.Conv2d(channels, num_filters, 1)
            self.conv2 = nn.Conv2d(num_filters, num_filters, 3, padding=1)
            self.conv3 = nn.Conv2d(num_filters, channels, 1)
        self.nfe = 0

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        if self.time_dependent:
            out = torch.relu(self.conv1(t, z))
            out = torch.relu(self.conv2(t, out))
            return self.conv3(t, out)
        out = torch.relu(self.conv1(z))
        out = torch.relu(self.conv2(out))
        return self.conv3(out)


class ConvODENet(nn.Module):
    """x (B, C, H, W) -> logits (B, num_classes) through one ODE block over t in [0, 1].

    ``augment_dim`` > 0 makes it an ANODE (zeros appended as extra channels). ``method``, ``rtol``,
    ``atol`` and ``options`` go to torchdiffeq (which rejects an unknown method, listing the valid
    ones); adaptive methods default to ``options={'max_num_steps': 1000}`` as in Dupont's code.
    After a forward, ``nfe_forward`` holds its number of function evaluations; with ``adjoint=True``,
    ``nfe_backward`` holds those of the following backward pass.
    """

    def __init__(self, num_filters: int, *, augment_dim: int = 0, in_channels: int = 3,
                 image_size: int = 32, num_classes: int = 10, time_dependent: bool = True,
                 method: str = "dopri5", rtol: float = 1e-3, atol: float = 1e-3,
                 options: dict | None = None, adjoint: bool = False):
        super().__init__()
        if min(num_filters, in_channels, image_size, num_classes) < 1 or augment_dim < 0:
            raise ValueError("num_filters, in_channels, image_size, num_classes must be positive and "
                             f"augment_dim >= 0, got {num_filters}, {in_channels}, {image_size}, "
                             f"{num_classes}, {augment_dim}")
        if rtol <= 0 or atol <= 0:
            raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
        self.in_channels, self.image_size, self.augment_dim = in_channels, image_size, augment_dim
        self.method, self.rtol, self.atol, self.adjoint = method, rtol, atol, adjoint
        if options is None:
            options = {"max_num_steps": 1000} if method in ADAPTIVE_METHODS else {}
        self.options = dict(options)
        channels = in_channels + augment_dim
        self.odefunc = ConvODEFunc(channels, num_filters, time_dependent=time_dependent)
        self.linear = nn.Linear(channels * image_size * image_size, num_classes)
        self.nfe_forward = 0
        self._nfe_after_forward = 0

    @property
    def nfe_backward(self) -> int:
        """Function evaluations since the last forward ended: the adjoint backward's, after backward()."""
        return self.odefunc.nfe - self._nfe_after_forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected images (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if self.augment_dim:
            x = torch.cat([x, x.new_zeros(x.shape[0], self.augment_dim, *x.shape[2:])], dim=1)
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        solve = odeint_adjoint if self.adjoint else odeint
        start = self.odefunc.nfe
        z = solve(self.odefunc, x, t, rtol=self.rtol, atol=self.atol, method=self.method,
                  options=self.options)[-1]
        self._nfe_after_forward = self.odefunc.nfe
        self.nfe_forward = self._nfe_after_forward - start
        return self.linear(torch.flatten(z, 1))


def node_172k(width: int = 125, **kwargs) -> ConvODENet:
    """Table 1 'Neural ODEs 172K' (Dupont et al. 2019, CIFAR-10): 125 filters (``width``), no augmentation."""
    return ConvODENet(width, augment_dim=0, **kwargs)


def anode_172k(width: int = 64, **kwargs) -> ConvODENet:
    """Table 1 'Aug. Neural ODEs 172K' (Dupont et al. 2019, CIFAR-10): 64 filters (``width``), 10 extra channels."""
    return ConvODENet(width, augment_dim=10, **kwargs)
