"""ImageNet (ILSVRC-2012) in the ImageFolder layout, with the released code's transforms.

Why: the released code reads ``ImageFolder(DATASET.ROOT/images/{train,val})`` (facts section 5.2);
we read ``<root>/{train,val}`` and accept ``<root>/images/{train,val}`` too, so the authors' folder works.
"""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from mdeq.data import DatasetNotFoundError, _read_manifest
from mdeq.data.transforms import imagenet_transform

EXTENSIONS = (".jpeg", ".jpg", ".png")
SOURCE_OFFICIAL = "ImageNet (ILSVRC-2012)"

LAYOUT = """
<root>/train/<wnid>/*.JPEG    e.g. train/n01440764/n01440764_10026.JPEG (1000 class folders)
<root>/val/<wnid>/*.JPEG      the 50000 validation images sorted into the same class folders
(<root>/images/{train,val}/..., the released code's layout, is accepted too)
"""
HOW_TO_GET = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org "
              "(registration needed), extract train/ per class and sort val/ into class folders "
              "(e.g. with the widely used valprep.sh)")


class ImageNetFolder(ImageFolder):
    """``ImageFolder`` that also carries ``num_classes`` and ``source_label``."""

    def __init__(self, root, *, transform, source_label: str):
        super().__init__(str(root), transform=transform, is_valid_file=_is_image)
        self.num_classes = len(self.classes)
        self.source_label = source_label


def _is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def _base(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError("imagenet", root, "the data directory does not exist", LAYOUT, HOW_TO_GET)
    for base in (root, root / "images"):
        if (base / "train").is_dir() or (base / "val").is_dir():
            return base
    raise DatasetNotFoundError("imagenet", root, "no 'train' or 'val' folder in the data directory",
                               LAYOUT, HOW_TO_GET)


def _class_folders(root, folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetNotFoundError("imagenet", root, f"missing folder {folder}", LAYOUT, HOW_TO_GET)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        loose = sum(1 for f in folder.iterdir() if _is_image(f.name))
        hint = (f" ({loose} loose images: the validation images must be sorted into class folders)"
                if loose else "")
        raise DatasetNotFoundError("imagenet", root, f"{folder} has no class folders{hint}",
                                   LAYOUT, HOW_TO_GET)
    return classes


def build(root, split: str, *, augment: bool = True, image_size: int = 224) -> ImageNetFolder:
    """The 'train' or 'val' split; training augmentation only when ``split == 'train' and augment``."""
    base = _base(root)
    classes = _class_folders(root, base / split)
    other = "val" if split == "train" else "train"
    if (base / other).is_dir():
        other_classes = _class_folders(root, base / other)
        if other_classes != classes:
            raise DatasetNotFoundError(
                "imagenet", root, f"{base / 'train'} and {base / 'val'} hold different class folders "
                f"({len(classes)} vs {len(other_classes)}), so their class indices would not agree",
                LAYOUT, HOW_TO_GET)
    manifest = _read_manifest(base)
    label = SOURCE_OFFICIAL if manifest is None else manifest["source_label"]
    transform = imagenet_transform(train=(split == "train" and augment), image_size=image_size)
    try:
        return ImageNetFolder(base / split, transform=transform, source_label=label)
    except FileNotFoundError as exc:  # ImageFolder: a class folder without any image
        raise DatasetNotFoundError("imagenet", root, str(exc), LAYOUT, HOW_TO_GET) from exc
