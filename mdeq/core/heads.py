"""How are the equilibrium states turned into logits: the classification and segmentation heads?

Both heads read every scale of z* and follow the released code (``MDEQClsNet``, ``MDEQSegNet``);
``upsample_logits`` brings segmentation logits to the label size as the released loss does.

Why a module of its own: a head only reads the equilibrium; nothing of f_theta or the solve
(``model.py``) depends on it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassificationHead", "SegmentationHead", "upsample_logits"]


class _Bottleneck(nn.Module):
    """HRNet's Bottleneck (expansion 4) with affine-free BNs in its main path, as the released head."""

    expansion = 4

    def __init__(self, c_in: int, width: int, bn_momentum: float):
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, momentum=bn_momentum, affine=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, momentum=bn_momentum, affine=False)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=bn_momentum, affine=False)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, out, 1, bias=False), nn.BatchNorm2d(out, momentum=bn_momentum))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class ClassificationHead(nn.Module):
    """HRNet-v2-style head over all scales (released ``MDEQClsNet``; paper 4.1: "all resolutions are used").

    y = inc_0(z_0); y = inc_i(z_i) + down_{i-1}(y) for i >= 1; final 1x1 conv + BN + ReLU;
    global average pool; linear. Returns (B, num_classes).
    """

    def __init__(self, num_channels: Sequence[int], head_channels: Sequence[int], final_channels: int,
                 num_classes: int, bn_momentum: float):
        super().__init__()
        widths = [4 * h for h in head_channels]
        self.increase = nn.ModuleList(_Bottleneck(c, h, bn_momentum) for c, h in zip(num_channels, head_channels))
        self.downsample = nn.ModuleList(
            nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1),
                          nn.BatchNorm2d(widths[i + 1], momentum=bn_momentum), nn.ReLU(inplace=True))
            for i in range(len(widths) - 1))
        self.final = nn.Sequential(nn.Conv2d(widths[-1], final_channels, 1),
                                   nn.BatchNorm2d(final_channels, momentum=bn_momentum), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        y = self.increase[0](z[0])
        for i in range(1, len(z)):
            y = self.increase[i](z[i]) + self.downsample[i - 1](y)
        y = self.final(y)
        return self.classifier(y.mean(dim=(2, 3)))


class SegmentationHead(nn.Module):
    """Concatenate all scales at z_0's size, 1x1 conv + BN + ReLU, 1x1 conv to classes (``MDEQSegNet``).

    The lower scales are upsampled bilinearly with align_corners=True. Returns logits at the
    resolution of z_0, (B, classes, H/4, W/4) for two stem downsamplings; the loss and the
    metrics bring them to the label size with ``upsample_logits``.
    """

    def __init__(self, num_channels: Sequence[int], num_classes: int, bn_momentum: float):
        super().__init__()
        total = sum(num_channels)
        self.conv = nn.Conv2d(total, total, 1)
        self.bn = nn.BatchNorm2d(total, momentum=bn_momentum)
        self.classifier = nn.Conv2d(total, num_classes, 1)

    def forward(self, z: Sequence[Tensor]) -> Tensor:
        size = z[0].shape[-2:]
        ups = [z[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=True) for t in z[1:]]
        y = F.relu(self.bn(self.conv(torch.cat(ups, dim=1))))
        return self.classifier(y)


def upsample_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear, align_corners=True, to the label size (H, W), as the released loss does."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=True)
