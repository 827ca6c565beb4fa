"""What Table 1's explicit baselines are: CIFAR-style ResNets (3x3 stem, no max-pool) with a width knob.

Why: Table 1 compares MDEQ with a ResNet-18 of 170K parameters (no augmentation) and of 10M
(augmentation); the paper gives only the sizes, so we keep He et al.'s ResNet-18 layout and scale the
base width (stage widths w, 2w, 4w, 8w): w = 8 gives 176K, w = 61 gives 10.15M (w = 64, the usual
CIFAR ResNet-18, is 11.17M). ResNet-101 (bottleneck, w = 64, 42.5M) is the explicit model of the
runtime/memory comparison (section 4.3). ResNet-14 (He et al.'s CIFAR ResNet, 6n + 2 layers with n = 2:
three stages of 16/32/64 channels, 175,258 parameters) is the recipe study's second ~170K shape
(docs/table1_gaps.md); like every model here it uses 1x1 projection shortcuts (He et al.'s option B), not
the zero-padded identity (option A) of their CIFAR networks.
"""
from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN and an identity (or 1x1 projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as in torchvision's v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """x (B, C, H, W) -> logits (B, num_classes); one stage per entry of ``layers``, at strides 1, 2, 2, ...

    ``width`` is the first stage's channel count; stage i has ``width * 2**i`` (times the block's
    expansion). The stem is a single 3x3 conv without max-pool, as usual for 32x32 inputs.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...], *,
                 width: int = 64, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if width < 1 or num_classes < 1 or in_channels < 1:
            raise ValueError(f"width, num_classes and in_channels must be positive, "
                             f"got {width}, {num_classes}, {in_channels}")
        if len(layers) < 1 or min(layers) < 1:
            raise ValueError(f"layers must be one or more positive block counts (one per stage), got {layers}")
        self.width = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        stages, in_planes = [], width
        for i, n in enumerate(layers):
            planes, stride = width * 2 ** i, 1 if i == 0 else 2
            blocks = []
            for k in range(n):
                blocks.append(block(in_planes, planes, stride if k == 0 else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
        out = self.stages(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def resnet18(width: int = 64, *, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width=width, num_classes=num_classes, in_channels=in_channels)


def resnet101(width: int = 64, *, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 23, 3), width=width, num_classes=num_classes, in_channels=in_channels)


def resnet14(width: int = 16, *, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2), width=width, num_classes=num_classes, in_channels=in_channels)


def resnet18_170k(width: int = 8, **kwargs) -> ResNet:
    """Table 1, without augmentation: 'ResNet-18 170K' (width 8)."""
    return resnet18(width=width, **kwargs)


def resnet18_10m(width: int = 61, **kwargs) -> ResNet:
    """Table 1, with augmentation: 'ResNet-18 10M' (width 61)."""
    return resnet18(width=width, **kwargs)


def resnet14_170k(width: int = 16, **kwargs) -> ResNet:
    """The recipe study's other ~170K ResNet: three stages of 16/32/64 channels, two blocks each (175,258)."""
    return resnet14(width=width, **kwargs)
