"""How Cityscapes (gtFine) semantic segmentation is read, in the official folder layout, 19 trainIds.

Why: the released code (HRNet-Seg ``lib/datasets/cityscapes.py``) reads the ``*_gtFine_labelIds.png``
files and maps the 34 label ids to the 19 evaluated classes, everything else to 255.
We build that map, the class names and the colours from ``cityscapesscripts.helpers.labels``, the
benchmark's own table, instead of copying numbers by hand.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mdeq.engine.data import DatasetIntegrityError, DatasetNotFoundError, _read_manifest
from mdeq.engine.data.transforms import IGNORE_INDEX, CityscapesEvalTransform, CityscapesTrainTransform

try:
    from cityscapesscripts.helpers.labels import labels as LABEL_TABLE
except ImportError as exc:  # an optional dependency: mdeq[data]
    raise ImportError("Cityscapes support needs cityscapesscripts: pip install cityscapesscripts "
                      "(or pip install 'mdeq[data]')") from exc


def _evaluated_labels() -> list:
    """The 19 evaluated labels of the benchmark's table, in trainId order."""
    train = [lab for lab in LABEL_TABLE if 0 <= lab.trainId < IGNORE_INDEX]
    train.sort(key=lambda lab: lab.trainId)
    if [lab.trainId for lab in train] != list(range(19)):
        raise RuntimeError("cityscapesscripts' label table does not define trainIds 0..18 once each")
    return train


def _lookup_table() -> np.ndarray:
    """uint8 (256,): labelId -> trainId, 255 for every id that is not evaluated."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in _evaluated_labels():
        table[lab.id] = lab.trainId
    table.setflags(write=False)
    return table


_LUT = _lookup_table()
MAX_LABEL_ID = max(lab.id for lab in LABEL_TABLE)  # 33: a labelIds PNG holds 0..33 only
CITYSCAPES_CLASSES = tuple(lab.name for lab in _evaluated_labels())
CITYSCAPES_PALETTE = tuple(tuple(lab.color) for lab in _evaluated_labels())
# Class weights of the released code's weighted cross-entropy (lib/datasets/cityscapes.py), in trainId order.
CITYSCAPES_CLASS_WEIGHTS = (0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
                            0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)
SOURCE_OFFICIAL = "Cityscapes (gtFine)"
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"

LAYOUT = f"""
<root>/leftImg8bit/{{train,val}}/<city>/<city>_<seq>_<frame>{IMAGE_SUFFIX}
<root>/gtFine/{{train,val}}/<city>/<city>_<seq>_<frame>{LABEL_SUFFIX}
e.g. leftImg8bit/train/aachen/aachen_000000_000019{IMAGE_SUFFIX}
     gtFine/train/aachen/aachen_000000_000019{LABEL_SUFFIX}   (2975 train, 500 val images)
"""
HOW_TO_GET = ("download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
              "https://www.cityscapes-dataset.com (registration needed; csDownload from cityscapesscripts "
              "also works) and unzip both into <root>")


def out_of_table(label_ids) -> list[int]:
    """The distinct values of a labelIds array that the label table does not define (above 33), sorted."""
    values = np.unique(np.asarray(label_ids.cpu() if isinstance(label_ids, torch.Tensor) else label_ids))
    return [int(v) for v in values if v > MAX_LABEL_ID]


def label_ids_to_train_ids(label_ids):
    """Map Cityscapes labelIds (uint8/int array or tensor, any shape) to trainIds, 255 = ignore.

    An id outside the label table (above 33) is an error, not "ignore": it is no Cityscapes label
    (e.g. a trainIds or 16-bit file read as labelIds), and mapping it to 255 would hide classes.
    """
    if isinstance(label_ids, torch.Tensor):
        if label_ids.is_floating_point() or (label_ids.numel() and int(label_ids.min()) < 0):
            raise ValueError(f"label ids must be non-negative integers, got dtype {label_ids.dtype}")
        if label_ids.numel() and int(label_ids.max()) > MAX_LABEL_ID:
            raise ValueError(f"label ids must be in 0..{MAX_LABEL_ID}, got {_shown(out_of_table(label_ids))}")
        lut = torch.from_numpy(_LUT.copy()).to(label_ids.device)
        return lut[label_ids.long()]
    label_ids = np.asarray(label_ids)
    if not np.issubdtype(label_ids.dtype, np.integer) or (label_ids.size and label_ids.min() < 0):
        raise ValueError(f"label ids must be non-negative integers, got dtype {label_ids.dtype}")
    if label_ids.size and label_ids.max() > MAX_LABEL_ID:
        raise ValueError(f"label ids must be in 0..{MAX_LABEL_ID}, got {_shown(out_of_table(label_ids))}")
    return _LUT[label_ids]


def _shown(values: list[int], n: int = 8) -> str:
    return ", ".join(map(str, values[:n])) + (f" and {len(values) - n} more" if len(values) > n else "")


def train_ids_to_color(train_ids) -> np.ndarray:
    """trainId map (H, W) -> uint8 RGB (H, W, 3) with the Cityscapes colours; 255 -> black."""
    train_ids = np.asarray(train_ids.cpu() if isinstance(train_ids, torch.Tensor) else train_ids)
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[:19] = np.asarray(CITYSCAPES_PALETTE, dtype=np.uint8)
    return palette[np.clip(train_ids, 0, 255).astype(np.int64)]


def check_root(root) -> None:
    """``<root>/{leftImg8bit,gtFine}/{train,val}`` exist (their images are not listed)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError("cityscapes", root, "the data directory does not exist", LAYOUT, HOW_TO_GET)
    for folder in (root / top / split for top in ("leftImg8bit", "gtFine") for split in ("train", "val")):
        if not folder.is_dir():
            raise DatasetNotFoundError("cityscapes", root, f"missing folder {folder}", LAYOUT, HOW_TO_GET)


def _pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DatasetNotFoundError("cityscapes", root, f"missing folder {folder}", LAYOUT, HOW_TO_GET)
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise DatasetNotFoundError("cityscapes", root, f"no */*{IMAGE_SUFFIX} files under {image_dir}",
                                   LAYOUT, HOW_TO_GET)
    pairs, missing = [], []
    for image in images:
        label = label_dir / image.parent.name / (image.name[: -len(IMAGE_SUFFIX)] + LABEL_SUFFIX)
        (pairs if label.is_file() else missing).append((image, label))
    if missing:
        raise DatasetNotFoundError(
            "cityscapes", root, f"{len(missing)} of {len(images)} images have no label file, "
            f"e.g. {missing[0][1]}", LAYOUT, HOW_TO_GET)
    return pairs


class CityscapesSegmentation(Dataset):
    """(image, trainId label) pairs of one split.

    Items are ``transform(image uint8 (3, H, W), label int64 (H, W))``, by default float (3, H, W) and
    int64 (H, W) with 255 = ignore. ``num_classes`` = 19, ``ignore_index`` = 255.
    """

    num_classes = len(CITYSCAPES_CLASSES)
    classes = CITYSCAPES_CLASSES
    ignore_index = IGNORE_INDEX
    class_weights = CITYSCAPES_CLASS_WEIGHTS

    def __init__(self, root, split: str, *, transform=None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = Path(root)
        if not root.is_dir():
            raise DatasetNotFoundError("cityscapes", root, "the data directory does not exist",
                                       LAYOUT, HOW_TO_GET)
        self.root, self.split = root, split
        self.pairs = _pairs(root, split)
        self.transform = transform
        manifest = _read_manifest(root)
        self.source_label = SOURCE_OFFICIAL if manifest is None else manifest["source_label"]

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw pair: uint8 RGB (3, H, W) and int64 trainIds (H, W), before any transform."""
        from PIL import Image

        image_path, label_path = self.pairs[index]
        try:
            with Image.open(image_path) as im:
                image = np.asarray(im.convert("RGB"))
        except (OSError, SyntaxError) as exc:  # PIL: "image file is truncated", broken PNG, not an image
            raise DatasetIntegrityError(f"{image_path}: unreadable image ({exc}); replace the file") from exc
        try:
            with Image.open(label_path) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise DatasetIntegrityError(f"{label_path}: expected a single-channel labelIds PNG, "
                                                f"got mode {im.mode}")
                label_ids = np.asarray(im)
        except (OSError, SyntaxError) as exc:
            raise DatasetIntegrityError(f"{label_path}: unreadable label image ({exc}); replace the file") from exc
        if label_ids.shape != image.shape[:2]:
            raise DatasetIntegrityError(f"{label_path} is {label_ids.shape}, but its image is {image.shape[:2]}")
        if label_ids.size and label_ids.max() > MAX_LABEL_ID:
            bad = out_of_table(label_ids)
            raise DatasetIntegrityError(
                f"{label_path}: label ids {_shown(bad)} are not in the Cityscapes label table (0..{MAX_LABEL_ID}); "
                f"expected a *{LABEL_SUFFIX} file (not trainIds or colours)")
        image = torch.from_numpy(image.transpose(2, 0, 1).copy())
        label = torch.from_numpy(label_ids_to_train_ids(label_ids).astype(np.int64))
        return image, label

    def __getitem__(self, index: int):
        image, label = self.load(index)
        if self.transform is not None:
            return self.transform(image, label)
        return image, label

    def __repr__(self) -> str:
        return (f"CityscapesSegmentation(split={self.split!r}, n={len(self)}, "
                f"source_label={self.source_label!r}, transform={self.transform})")


def build(root, split: str, *, augment: bool = True, crop_size=(512, 1024), base_size: int = 2048,
          scale_factor: int = 16) -> CityscapesSegmentation:
    """'train' with the released augmentation (when ``augment``), or 'val' as full images."""
    if split == "train" and augment:
        transform = CityscapesTrainTransform(tuple(crop_size), base_size=base_size, scale_factor=scale_factor)
    else:
        transform = CityscapesEvalTransform()
    return CityscapesSegmentation(root, split, transform=transform)
