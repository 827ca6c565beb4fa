"""What is an MDEQ: stem, input injection, f_theta (one residual block per scale + multiscale fusion), head?

Why one file: like nanoGPT's ``model.py``, every module from the weight-normalised conv to the
full network is here, in data-flow order: image -> stem -> injection -> solve(f_theta) -> head;
only the heads, which read the equilibrium and nothing else, are in ``heads.py``.
The paper (Section 3.2, Appendix A) fixes the design; where it is silent, or where the released
code differs, we follow the released code (``docs/paper_vs_released.md``):

- fusion upsampling is 1x1 conv + GroupNorm + *nearest* upsampling (the paper says bilinear);
- the post-fusion GroupNorm has ``num_groups // 2`` groups;
- weight norm covers only the two block convs and the post-fusion conv, and the released init
  leaves those at PyTorch's kaiming-uniform default (``ModelConfig.init = "official"``);
- only the highest-resolution stream gets the injection; every other stream starts from zeros.

``f_theta`` is cheap to evaluate on purpose: weight norm and the variational-dropout masks are
computed once per forward call by ``FTheta.prepare`` and passed to every evaluation (solver
iterations, the f(z*) call with grad and the IFT backward solve), as the released ``_reset`` does.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdeq.core.config import ExperimentConfig, ModelConfig, SolverConfig
from mdeq.core.heads import ClassificationHead, SegmentationHead
from mdeq.core.implicit import DEQInfo, ImplicitLayer
from mdeq.core.solvers import SOLVERS

__all__ = ["MDEQ", "FTheta", "build_model"]


# ----------------------------------------------------------------------------------------------
# Weight normalisation and variational dropout, computed once per forward.

def _weight_norm(g: Tensor, v: Tensor) -> Tensor:
    """w = g v / ||v||, the norm over every dim but the output channel (Salimans & Kingma 2016)."""
    return v * (g / v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1))))


def _variational_mask(batch: int, channels: int, p: float, like: Tensor,
                      generator: torch.Generator | None) -> Tensor:
    """Bernoulli(1 - p) / (1 - p) of shape (B, C, 1, 1): whole channels dropped per sample.

    As locuslab/mdeq ``lib/modules/optimizations.py``, ``VariationalHidDropout2d``. Under autocast (a
    half-precision ``like``) the draw is made in float32 and cast, so the masks do not depend on ``--amp``.
    """
    half = like.dtype in (torch.float16, torch.bfloat16)
    keep = torch.full((batch, channels, 1, 1), 1.0 - p, dtype=torch.float32 if half else like.dtype, device=like.device)
    return torch.bernoulli(keep, generator=generator).div_(1.0 - p).to(like.dtype)


class WeightNormConv2d(nn.Module):
    """A bias-free conv stored as (weight_g, weight_v); the weight itself is made by ``weight()``.

    Why not ``torch.nn.utils.parametrizations.weight_norm``: that recomputes w at every access, i.e.
    at every solver iteration. Here the owner calls ``weight()`` once per forward call. The names
    and shapes (g: (C_out, 1, 1, 1)) match the released checkpoints.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.padding = kernel_size // 2
        self.weight_g = nn.Parameter(torch.empty(out_channels, 1, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.reset_parameters()

    def reset_parameters(self, std: float | None = None) -> None:
        """v: PyTorch's Conv2d default (kaiming-uniform, a=sqrt(5)) or N(0, std); g = ||v|| so w = v."""
        with torch.no_grad():
            if std is None:
                nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
            else:
                nn.init.normal_(self.weight_v, std=std)
            self.weight_g.copy_(self.weight_v.flatten(1).norm(dim=1).view_as(self.weight_g))

    def weight(self) -> Tensor:
        return _weight_norm(self.weight_g, self.weight_v)

    def extra_repr(self) -> str:
        c_out, c_in, k, _ = self.weight_v.shape
        return f"{c_in}, {c_out}, kernel_size={k}"


class Prepared(NamedTuple):
    """The per-forward tensors f_theta shares across all its evaluations in one forward call.

    block_weights: per scale, (conv1, conv2) weight-normalised weights.
    post_weights: per scale, the post-fusion 1x1 weight (empty for a single stream).
    masks: per scale, the (B, C_i, 1, 1) dropout mask, or None (eval mode or p = 0).
    """

    block_weights: tuple[tuple[Tensor, Tensor], ...]
    post_weights: tuple[Tensor, ...]
    masks: tuple[Tensor | None, ...]


# ----------------------------------------------------------------------------------------------
# f_theta.

class ResidualBlock(nn.Module):
    """Paper Eq. (5) / Fig. 2, as the released ``BasicBlock``: the one block of each scale.

    conv3x3 (C -> E*C, WN) -> GN -> ReLU -> conv3x3 (E*C -> C, WN) -> dropout -> + injection
    -> GN -> + z -> ReLU -> GN. Shapes: z and the output are (B, C, H_i, W_i).
    """

    def __init__(self, channels: int, expansion: int, num_groups: int):
        super().__init__()
        wide = expansion * channels
        self.conv1 = WeightNormConv2d(channels, wide, 3)
        self.gn1 = nn.GroupNorm(num_groups, wide)
        self.conv2 = WeightNormConv2d(wide, channels, 3)
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)

    def forward(self, z: Tensor, w1: Tensor, w2: Tensor, mask: Tensor | None,
                injection: Tensor | None) -> Tensor:
        y = F.relu(self.gn1(F.conv2d(z, w1, padding=1)))
        y = F.conv2d(y, w2, padding=1)
        if mask is not None:
            y = y * mask
        if injection is not None:
            y = y + injection
        y = self.gn2(y) + z
        return self.gn3(F.relu(y))


class _ConvGN(nn.Module):
    """conv (no bias) -> GroupNorm, the unit of the fusion paths (keys ``conv``, ``gn``)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.gn = nn.GroupNorm(num_groups, c_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv(x))


class _Upsample(_ConvGN):
    """Scale j -> i < j: 1x1 conv (C_j -> C_i) -> GN -> nearest upsampling by 2^(j - i)."""

    def __init__(self, c_in: int, c_out: int, factor: int, num_groups: int):
        super().__init__(c_in, c_out, 1, 1, num_groups)
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(super().forward(x), scale_factor=self.factor, mode="nearest")


class _Downsample(nn.Sequential):
    """Scale j -> i > j: (i - j) stride-2 3x3 convs, each + GN; ReLU after all but the last.

    The intermediate convs keep C_j channels; the last one maps to C_i (locuslab/mdeq
    ``lib/models/mdeq_core.py``, ``MDEQModule._make_fuse_layers``).
    """

    def __init__(self, c_in: int, c_out: int, steps: int, num_groups: int):
        layers = [_ConvGN(c_in, c_in if k < steps - 1 else c_out, 3, 2, num_groups) for k in range(steps)]
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:
        last = len(self) - 1
        for k, layer in enumerate(self):
            x = layer(x)
            if k < last:
                x = F.relu(x)
        return x


class MultiscaleFusion(nn.Module):
    """Output i = sum_j T_ij(z_j^+), T_ii = identity (Fig. 1, "FUSE_METHOD SUM").

    ``self[i][j]`` is T_ij (an ``nn.Identity`` placeholder for i == j, never called).
    """

    def __init__(self, num_channels: Sequence[int], num_groups: int):
        super().__init__()
        n = len(num_channels)
        self.paths = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(_Upsample(num_channels[j], num_channels[i], 2 ** (j - i), num_groups))
                elif j < i:
                    row.append(_Downsample(num_channels[j], num_channels[i], i - j, num_groups))
                else:
                    row.append(nn.Identity())
            self.paths.append(row)
        # indices only (no module references: DataParallel replicas copy __dict__ shallowly)
        self._routes = tuple((i, tuple(j for j in range(n) if j != i)) for i in range(n))

    def forward(self, zs: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for i, others in self._routes:
            row = self.paths[i]
            y = zs[i]
            for j in others:
                y = y + row[j](zs[j])
            out.append(y)
        return out


class _PostFusion(nn.Module):
    """ReLU -> 1x1 conv (WN) -> GroupNorm(num_groups // 2) after the fusion sum (released ``MDEQModule``)."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.conv = WeightNormConv2d(channels, channels, 1)
        self.gn = nn.GroupNorm(num_groups, channels)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.gn(F.conv2d(F.relu(x), w))


class FTheta(nn.Module):
    """The transformation f_theta driven to equilibrium: ``f(z_list, injection, prepared)``.

    z_list[i] is (B, C_i, H / 2^i, W / 2^i) in stem-output units; the injection (B, C_0, H, W)
    enters the highest-resolution block only. With one scale there is no fusion and no post layer
    (the single-stream DEQ of Table 1). Call ``prepare`` once per forward and pass its result to
    every evaluation.
    """

    def __init__(self, num_channels: Sequence[int], expansion: int, num_groups: int, dropout: float):
        super().__init__()
        self.num_channels = tuple(num_channels)
        self.dropout = float(dropout)
        self.blocks = nn.ModuleList(ResidualBlock(c, expansion, num_groups) for c in num_channels)
        if len(num_channels) > 1:
            self.fusion = MultiscaleFusion(num_channels, num_groups)
            self.post = nn.ModuleList(_PostFusion(c, num_groups // 2) for c in num_channels)
        else:
            self.fusion = None
            self.post = None

    def prepare(self, batch_size: int, like: Tensor, generator: torch.Generator | None = None) -> Prepared:
        """Weight-normalised weights and dropout masks for one forward call (released ``_reset``).

        The weights carry the graph back to (g, v), so gradients reach them through every f(z*)
        evaluation that uses them. Masks take dtype and device from ``like``; they are None in eval
        mode or when the dropout rate is 0.
        """
        block_weights = tuple((b.conv1.weight(), b.conv2.weight()) for b in self.blocks)
        post_weights = tuple(p.conv.weight() for p in self.post) if self.post is not None else ()
        if self.training and self.dropout > 0:
            masks = tuple(_variational_mask(batch_size, c, self.dropout, like, generator) for c in self.num_channels)
        else:
            masks = (None,) * len(self.num_channels)
        return Prepared(block_weights, post_weights, masks)

    def forward(self, z: Sequence[Tensor], injection: Tensor, prepared: Prepared) -> list[Tensor]:
        out = []
        for i, block in enumerate(self.blocks):
            w1, w2 = prepared.block_weights[i]
            out.append(block(z[i], w1, w2, prepared.masks[i], injection if i == 0 else None))
        if self.fusion is None:
            return out
        fused = self.fusion(out)
        return [post(y, w) for post, y, w in zip(self.post, fused, prepared.post_weights)]


# ----------------------------------------------------------------------------------------------
# The network.

def _solver_options(name: str, memory: int) -> dict:
    """Broyden and Anderson take the history size m; fixed-point iteration takes none."""
    return {"memory": memory} if "memory" in getattr(SOLVERS[name], "options", ()) else {}


def _implicit_layer(func: nn.Module, s: SolverConfig) -> ImplicitLayer:
    return ImplicitLayer(
        func, solver=s.solver, max_iter=s.max_iter, tol=s.tol, stop_mode=s.stop_mode,
        solver_options=_solver_options(s.solver, s.memory), eval_max_iter=s.eval_max_iter,
        eval_tol=s.eval_tol, grad=s.grad, backward_solver=s.backward_solver,
        backward_max_iter=s.backward_max_iter, backward_tol=s.backward_tol,
        backward_stop_mode=s.backward_stop_mode,
        backward_options=_solver_options(s.backward_solver, s.memory), phantom_steps=s.phantom_steps,
        phantom_damping=s.phantom_damping, unroll_steps=s.unroll_steps, correction_states=s.correction_states,
        correction_steps=s.correction_steps, correction_damping=s.correction_damping)


class MDEQ(nn.Module):
    """A multiscale deep equilibrium model with a classification or segmentation head.

    ``model(x)`` takes (B, in_channels, H, W) and returns logits: (B, classes) for classification,
    (B, classes, H / 2^d, W / 2^d) for segmentation (d = ``downsample_times``; use
    ``upsample_logits`` to reach the label size). Each call stores its ``DEQInfo`` (solver
    statistics, per-scale traces) in ``model.last_info``. ``model.deq`` is the ImplicitLayer:
    set ``model.deq.grad = "unrolled"`` for the weight-tied warm-up, back to ``"ift"`` after it.
    With fixed-point correction on (``solver.correction_states`` > 1) a call with grad also leaves the
    head's logits of the earlier solver states in ``model.last_correction_logits`` (earliest first; else
    None), for the engine's weighted loss.
    """

    def __init__(self, cfg: ModelConfig, solver: SolverConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.num_channels[0]
        m = cfg.bn_momentum
        s1, s2 = (2 if cfg.downsample_times >= 1 else 1), (2 if cfg.downsample_times >= 2 else 1)
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c0, 3, stride=s1, padding=1, bias=False), nn.BatchNorm2d(c0, momentum=m),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, c0, 3, stride=s2, padding=1, bias=False), nn.BatchNorm2d(c0, momentum=m),
            nn.ReLU(inplace=True))
        if cfg.injection_transform:
            self.injection = nn.Sequential(nn.Conv2d(c0, c0, 1, bias=False), nn.BatchNorm2d(c0, momentum=m),
                                           nn.ReLU(inplace=True))
        else:
            self.injection = None
        self.deq = _implicit_layer(FTheta(cfg.num_channels, cfg.expansion, cfg.num_groups, cfg.dropout), solver)
        if cfg.head == "classification":
            self.head = ClassificationHead(cfg.num_channels, cfg.head_channels, cfg.final_channels, num_classes, m)
        else:
            self.head = SegmentationHead(cfg.num_channels, num_classes, m)
        self.last_info: DEQInfo | None = None
        self.last_correction_logits: list[Tensor] | None = None
        self.reset_parameters()

    @property
    def f(self) -> FTheta:
        return self.deq.func

    def reset_parameters(self) -> None:
        """Initialise as ``cfg.init`` says.

        "official" reproduces what the released ``init_weights`` (locuslab/mdeq ``lib/models/mdeq.py``)
        really does (docs/paper_vs_released.md#initialisation): every plain
        Conv2d weight and bias ~ N(0, 0.01), BN (1, 0), GroupNorm and Linear at PyTorch defaults,
        while the weight-normalised convs keep the kaiming-uniform default (the re-init misses
        them), with g = ||v||. "paper" draws those from N(0, 0.01) too (Appendix A's statement).
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.normal_(module.bias, std=0.01)
            elif isinstance(module, nn.BatchNorm2d) and module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, WeightNormConv2d):
                module.reset_parameters(std=None if self.cfg.init == "official" else 0.01)

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless x is (B, in_channels, H, W) with H and W multiples of the divisor."""
        cfg = self.cfg
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"expected an image batch of shape (B, {cfg.in_channels}, H, W), got {shape}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected {cfg.in_channels} input channels (model.in_channels), got {x.shape[1]} "
                             f"in an input of shape {tuple(x.shape)}")
        d = cfg.size_divisor
        for side, what in zip(x.shape[-2:], ("height", "width")):
            if side % d:
                lower, upper = side // d * d, (side // d + 1) * d
                nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
                raise ValueError(
                    f"image {what} {side} is not divisible by 2^(downsample_times + num_scales - 1) = "
                    f"2^({cfg.downsample_times} + {cfg.num_scales} - 1) = {d}; nearest valid {what}: {nearest}")

    def equilibrium(self, x: Tensor) -> tuple[list[Tensor], DEQInfo]:
        """Stem, injection and the solve: the list of (B, C_i, H_i, W_i) equilibrium states and the info."""
        self.check_input(x)
        x = self.stem(x)
        injection = self.injection(x) if self.injection is not None else x
        b, _, h, w = injection.shape
        f = self.f
        prepared = f.prepare(b, injection)
        # The solver state stays at least float32 even when the stem ran under autocast.
        dtype = torch.promote_types(injection.dtype, torch.float32)
        # z0 follows the input's memory format (channels_last on a CPU by default, mdeq.train), and with
        # it the solver's state, every f evaluation and the backward's VJPs.
        nhwc = injection.is_contiguous(memory_format=torch.channels_last) and not injection.is_contiguous()
        fmt = torch.channels_last if nhwc else torch.contiguous_format
        z0 = [torch.empty(b, c, h >> i, w >> i, dtype=dtype, device=injection.device, memory_format=fmt).zero_()
              for i, c in enumerate(f.num_channels)]
        return self.deq(z0, injection, prepared)

    def load_backbone(self, state_dict: dict[str, Tensor]) -> None:
        """Load the stem, injection and f_theta from another MDEQ's state dict; keep this head.

        Why: Cityscapes models start from the ImageNet model of the same size, whose classification
        head is dropped (paper 4.3; MODEL.PRETRAINED in the released ``init_weights``). Every non-head key
        of this model must be present.
        """
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise KeyError(f"the state dict lacks {len(missing)} backbone keys, e.g. {missing[:5]}")
        for k, v in own.items():
            if state_dict[k].shape != v.shape:
                raise ValueError(f"backbone key {k!r} has shape {tuple(state_dict[k].shape)}, this model "
                                 f"expects {tuple(v.shape)}")
        self.load_state_dict({k: state_dict[k] for k in own}, strict=False)

    def forward(self, x: Tensor) -> Tensor:
        z, info = self.equilibrium(x)
        self.last_info = info
        logits = self.head(z)
        self.last_correction_logits = None if info.correction is None else \
            [self._head_keeping_running_stats(s) for s in info.correction]
        return logits

    def _head_keeping_running_stats(self, z: Sequence[Tensor]) -> Tensor:
        """The head on a correction state, normalising by its batch statistics without moving the BatchNorm
        running statistics: those stay the ones of the returned state's call, as without correction."""
        norms = [m for m in self.head.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
        saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
        try:
            for m in norms:
                m.momentum = 0.0  # running <- (1 - 0) running + 0 batch
            return self.head(z)
        finally:
            for m, (momentum, count) in zip(norms, saved):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)


def build_model(cfg: ExperimentConfig) -> MDEQ:
    """The classifier or segmenter an experiment config describes (parameters on the default device)."""
    return MDEQ(cfg.model, cfg.solver, cfg.data.num_classes)
