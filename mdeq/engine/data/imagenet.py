"""How ImageNet (ILSVRC-2012) is read, in the ImageFolder layout, with the released code's transforms.

Why: the released code reads ``ImageFolder(DATASET.ROOT/images/{train,val})`` (``tools/cls_train.py``);
we read ``<root>/{train,val}`` and accept ``<root>/images/{train,val}`` too, so the authors' folder works.
Labels are the standard class index (the 1000 synsets in sorted order, ``imagenet_wnids.txt``), not a
folder's position among the folders present, so a partial copy keeps the labels of the full data set
and of released checkpoints; a partial copy is read only when asked (``allow_missing_classes``).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

from torchvision.datasets import ImageFolder

from mdeq.engine.data import DatasetIntegrityError, DatasetNotFoundError, _read_manifest
from mdeq.engine.data.transforms import imagenet_transform

EXTENSIONS = (".jpeg", ".jpg", ".png")
SOURCE_OFFICIAL = "ImageNet (ILSVRC-2012)"
WNIDS_FILE = Path(__file__).with_name("imagenet_wnids.txt")
_SHOWN = 5  # folders named in an error before "and N more"

LAYOUT = """
<root>/train/<wnid>/*.JPEG    e.g. train/n01440764/n01440764_10026.JPEG (1000 class folders)
<root>/val/<wnid>/*.JPEG      the 50000 validation images sorted into the same class folders
(<root>/images/{train,val}/..., the released code's layout, is accepted too)
"""
HOW_TO_GET = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org "
              "(registration needed), extract train/ per class and sort val/ into class folders "
              "(e.g. with the widely used valprep.sh)")


def standard_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 synsets in sorted order: position i is class i (torchvision, timm, released models)."""
    wnids = tuple(WNIDS_FILE.read_text().split())
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise DatasetIntegrityError(f"{WNIDS_FILE} must list the 1000 ILSVRC-2012 synsets in sorted order")
    return wnids


def _listed(names, shown: int = _SHOWN) -> str:
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


class ImageNetFolder(ImageFolder):
    """``ImageFolder`` with the standard class index, ``num_classes``, ``source_label`` and file-naming errors.

    ``classes`` are the class folders present, ``class_to_idx`` maps each to its standard index, and
    ``num_classes`` is the standard label space, 1000, whatever folders are present: a partial copy keeps the
    full data set's labels, so a head or a message sized from it has the 1000 outputs a released checkpoint has.
    ``max_label`` is the highest standard index present (what a smaller head must still reach).
    """

    num_classes = 1000

    def __init__(self, root, *, transform, source_label: str, class_to_idx: dict[str, int]):
        self._standard = dict(class_to_idx)
        super().__init__(str(root), transform=transform, loader=load_image, is_valid_file=_is_image,
                         allow_empty=True)
        self.max_label = max(self._standard.values())
        self.source_label = source_label

    def find_classes(self, directory):
        return sorted(self._standard), dict(self._standard)


def load_image(path: str):
    """The RGB PIL image at ``path``; a truncated or unreadable file is an error that names it."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")
    except (OSError, SyntaxError) as exc:  # PIL: "image file is truncated", UnidentifiedImageError, broken PNG
        raise DatasetIntegrityError(f"{path}: unreadable image ({exc}); replace or remove the file") from exc


def _is_image(path: str) -> bool:
    return path.lower().endswith(EXTENSIONS)


def _has_image(folder: Path) -> bool:
    """Whether ImageFolder finds at least one image under ``folder`` (it walks subfolders too)."""
    return any(_is_image(name) for _, _, files in os.walk(folder, followlinks=True) for name in files)


def _base(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError("imagenet", root, "the data directory does not exist", LAYOUT, HOW_TO_GET)
    for base in (root, root / "images"):
        if (base / "train").is_dir() or (base / "val").is_dir():
            return base
    raise DatasetNotFoundError("imagenet", root, "no 'train' or 'val' folder in the data directory",
                               LAYOUT, HOW_TO_GET)


def check_root(root) -> None:
    """``<root>/{train,val}`` (or ``<root>/images/{train,val}``) exist (their class folders are not listed)."""
    base = _base(root)
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise DatasetNotFoundError("imagenet", root, f"missing folder {base / split}", LAYOUT, HOW_TO_GET)


def _class_folders(root, folder: Path, allow_missing: bool) -> dict[str, int]:
    """``{wnid: standard index}`` of the class folders in ``folder``; unknown, empty or missing ones are errors."""
    if not folder.is_dir():
        raise DatasetNotFoundError("imagenet", root, f"missing folder {folder}", LAYOUT, HOW_TO_GET)
    present = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not present:
        loose = sum(1 for f in folder.iterdir() if _is_image(f.name))
        hint = (f" ({loose} loose images: the validation images must be sorted into class folders)"
                if loose else "")
        raise DatasetNotFoundError("imagenet", root, f"{folder} has no class folders{hint}",
                                   LAYOUT, HOW_TO_GET)
    index = {wnid: i for i, wnid in enumerate(standard_wnids())}
    unknown = [name for name in present if name not in index]
    if unknown:
        raise DatasetNotFoundError(
            "imagenet", root, f"{folder} holds {len(unknown)} folders that are not ILSVRC-2012 synsets "
            f"({_listed(unknown)}); class folders are named by wnid, e.g. n01440764", LAYOUT, HOW_TO_GET)
    empty = [name for name in present if not _has_image(folder / name)]
    if empty:
        raise DatasetNotFoundError(
            "imagenet", root, f"{len(empty)} of the {len(present)} class folders in {folder} hold no image "
            f"({', '.join(EXTENSIONS)}): {_listed(empty)}", LAYOUT, HOW_TO_GET)
    missing = sorted(set(index) - set(present))
    if missing and not allow_missing:
        raise DatasetNotFoundError(
            "imagenet", root, f"{folder} has {len(present)} of the 1000 ILSVRC-2012 class folders (missing "
            f"{_listed(missing)}); to train on this subset with the standard labels pass "
            f"allow_missing_classes=True (--data-option allow_missing_classes=true)", LAYOUT, HOW_TO_GET)
    if missing:
        warnings.warn(f"{folder}: {len(missing)} of the 1000 ILSVRC-2012 class folders are missing; reading "
                      f"{len(present)} classes with their standard labels (allow_missing_classes)", stacklevel=3)
    return {name: index[name] for name in present}


def build(root, split: str, *, augment: bool = True, image_size: int = 224,
          allow_missing_classes: bool = False) -> ImageNetFolder:
    """The 'train' or 'val' split; training augmentation only when ``split == 'train' and augment``.

    Labels are the standard index whatever folders are present; with fewer than the 1000 class folders
    the split is read only with ``allow_missing_classes`` (a warning says how many are missing).
    """
    base = _base(root)
    class_to_idx = _class_folders(root, base / split, allow_missing_classes)
    manifest = _read_manifest(base)
    label = SOURCE_OFFICIAL if manifest is None else manifest["source_label"]
    transform = imagenet_transform(train=(split == "train" and augment), image_size=image_size)
    return ImageNetFolder(base / split, transform=transform, source_label=label, class_to_idx=class_to_idx)
