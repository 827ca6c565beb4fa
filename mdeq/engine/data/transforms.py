"""How images and labels are augmented and normalised: the released MDEQ code's transforms, on tensors.

Why: every random draw goes through torch's global RNG (``torch.rand``/``torch.randint``), so
``torch.manual_seed`` in the main process and the DataLoader's per-worker seeding make augmentation
reproducible, which checkpoint resume depends on. The official code mixes ``random``, ``np.random`` and
OpenCV; we keep its operations and order (docs/paper_vs_released.md#data-pipelines) but not its RNGs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255  # the Cityscapes void label: in no class, in no count (the data sets write it, the loss skips it)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _normalize(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, H, W) raw values in [0, 255] -> (x / 255 - mean) / std, float32."""
    image = image.to(torch.float32).div_(255.0)
    m = torch.tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    s = torch.tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub_(m).div_(s)


def _check_chw_uint8(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.dtype != torch.uint8:
        got = f"{type(image).__name__} {getattr(image, 'dtype', '')} {tuple(getattr(image, 'shape', ()))}"
        raise TypeError(f"expected a uint8 image tensor of shape (C, H, W), got {got}")


class CIFAR10Transform:
    """uint8 (3, 32, 32) -> normalised float (3, 32, 32), optionally augmented.

    Why: ``tools/cls_train.py`` uses RandomCrop(32, padding=4, zero fill) + RandomHorizontalFlip when
    DATASET.AUGMENT is on, and only ToTensor + Normalize otherwise (Table 1 'without augmentation').
    """

    def __init__(self, augment: bool, *, padding: int = 4,
                 mean: Sequence[float] = CIFAR10_MEAN, std: Sequence[float] = CIFAR10_STD):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.augment = bool(augment)
        self.padding = int(padding)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        _check_chw_uint8(image)
        if self.augment:
            h, w = image.shape[-2:]
            p = self.padding
            padded = F.pad(image, (p, p, p, p), value=0)
            top = int(torch.randint(0, 2 * p + 1, ()))
            left = int(torch.randint(0, 2 * p + 1, ()))
            image = padded[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return _normalize(image, self.mean, self.std)

    def __repr__(self) -> str:
        return f"CIFAR10Transform(augment={self.augment}, padding={self.padding})"


def imagenet_transform(train: bool, image_size: int = 224):
    """PIL image -> normalised float (3, image_size, image_size).

    Why: the released ImageNet pipeline (``tools/cls_train.py``): RandomResizedCrop(224) + flip for training,
    Resize(256) + CenterCrop(224) for validation (256 = 224 / 0.875). torchvision's random transforms
    draw from torch's RNG. ``image_size`` exists for small smoke runs; 224 is the paper's.
    """
    from torchvision import transforms as T  # here, not at the top: CIFAR-10 and Cityscapes do without it

    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    tail = [T.PILToTensor(), T.ConvertImageDtype(torch.float32), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        head = [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    else:
        head = [T.Resize(int(round(image_size / 0.875))), T.CenterCrop(image_size)]
    return T.Compose(head + tail)


def _check_pair(image: torch.Tensor, label: torch.Tensor) -> None:
    _check_chw_uint8(image)
    if not isinstance(label, torch.Tensor) or label.ndim != 2:
        raise TypeError(f"expected a label tensor of shape (H, W), got {tuple(getattr(label, 'shape', ()))}")
    if tuple(label.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"image {tuple(image.shape)} and label {tuple(label.shape)} sizes differ")


class CityscapesTrainTransform:
    """Joint (image, trainId label) augmentation of the released Cityscapes training.

    Why: HRNet-Seg ``lib/datasets/base_dataset.py``, ``gen_sample``, as locuslab/mdeq ships it, in its order:
    scale s = 0.5 + randint(0, scale_factor) / 10; resize so the long side is int(base_size * s + 0.5)
    (image bilinear, label nearest); pad bottom/right to the crop with raw 0 / 255; random crop; then
    normalise with ImageNet statistics; then flip both with p = 0.5. Takes uint8 (3, H, W) and an
    integer (H, W) label already in trainIds; returns float (3, h, w) and int64 (h, w), (h, w) = crop.
    """

    def __init__(self, crop_size: tuple[int, int] = (512, 1024), *, base_size: int = 2048,
                 scale_factor: int = 16, flip: bool = True, ignore_index: int = IGNORE_INDEX,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        crop_size = tuple(int(c) for c in crop_size)
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (height, width) > 0, got {crop_size}")
        if base_size < 1 or scale_factor < 0:
            raise ValueError(f"need base_size >= 1 and scale_factor >= 0, got {base_size}, {scale_factor}")
        self.crop_size = crop_size
        self.base_size = int(base_size)
        self.scale_factor = int(scale_factor)
        self.flip = bool(flip)
        self.ignore_index = int(ignore_index)
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        scale = 0.5 + int(torch.randint(0, self.scale_factor + 1, ())) / 10.0
        h, w = image.shape[-2:]
        long_side = int(self.base_size * scale + 0.5)
        if h > w:
            size = (long_side, int(w * long_side / h + 0.5))
        else:
            size = (int(h * long_side / w + 0.5), long_side)
        img = F.interpolate(image[None].to(torch.float32), size=size, mode="bilinear",
                            align_corners=False)[0]
        # Nearest matches OpenCV INTER_NEAREST (floor of dst * in / out).
        lab = F.interpolate(label[None, None].to(torch.float32), size=size, mode="nearest")[0, 0]
        lab = lab.to(torch.int64)

        ch, cw = self.crop_size
        pad_h, pad_w = max(ch - size[0], 0), max(cw - size[1], 0)
        if pad_h or pad_w:
            img = F.pad(img, (0, pad_w, 0, pad_h), value=0.0)
            lab = F.pad(lab, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = int(torch.randint(0, img.shape[-2] - ch + 1, ()))
        left = int(torch.randint(0, img.shape[-1] - cw + 1, ()))
        img = img[:, top:top + ch, left:left + cw]
        lab = lab[top:top + ch, left:left + cw]

        img = _normalize(img.clamp_(0.0, 255.0), self.mean, self.std)
        if self.flip and torch.rand(()) < 0.5:
            img, lab = img.flip(-1), lab.flip(-1)
        return img.contiguous(), lab.contiguous()

    def __repr__(self) -> str:
        return (f"CityscapesTrainTransform(crop_size={self.crop_size}, base_size={self.base_size}, "
                f"scale_factor={self.scale_factor}, flip={self.flip})")


class CityscapesEvalTransform:
    """Full image, single scale, no flip: only normalisation.

    Why: the paper's and the released code's Cityscapes protocol (``tools/seg_test.py``: test on the
    full 1024x2048 image). Returns float (3, H, W) and int64 (H, W).
    """

    def __init__(self, *, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_pair(image, label)
        return _normalize(image, self.mean, self.std), label.to(torch.int64)

    def __repr__(self) -> str:
        return "CityscapesEvalTransform()"
