"""Which data sets the paper uses, read in their real on-disk layouts: CIFAR-10, ImageNet, Cityscapes.

``build_datasets(name, root, ...)`` is the one entry point the training code calls; it returns torch
Datasets whose items are ``(image float (3, H, W), target)``, where target is an int class index or an
int64 (H, W) trainId map with 255 = ignore. Every dataset carries ``num_classes`` and
``source_label`` (a string that logs and tables print, e.g. "CIFAR-10 (JPEG-q75 re-encoded)").
``python -m mdeq.engine.data.synthetic --dataset NAME --root DIR`` writes a small synthetic copy in the same
layout for smoke runs and tests.

Augmentation draws only from torch's RNG, so ``torch.manual_seed`` (main process) and the
DataLoader's per-worker seeds (base seed + worker id, drawn from torch's RNG or the loader's
``generator``) make a run's augmentation reproducible.

The error types and the manifest helpers are defined here, before the submodules are imported,
because every loader raises the same errors and reads the same manifest.
"""
from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

MANIFEST_NAME = "mdeq_manifest.json"
DATASETS = ("cifar10", "imagenet", "cityscapes")


class DatasetNotFoundError(FileNotFoundError):
    """A data set is missing or not in the layout we read.

    The message names the folder looked at, what was wrong, the expected layout, how to get the real
    data and the command that writes a synthetic copy.
    """

    def __init__(self, dataset: str, root: str | Path, problem: str, layout: str, how_to_get: str):
        self.dataset, self.root, self.problem = dataset, Path(root), problem
        self.layout, self.how_to_get = layout.strip("\n"), how_to_get
        # what a command line prints: one line (the layout and how to get the data are in the full message)
        self.summary = (f"{dataset}: {problem} (looked in {Path(root).resolve()}); a synthetic copy for smoke "
                        f"runs: python -m mdeq.engine.data.synthetic --dataset {dataset} --root {root}")
        message = (
            f"{dataset}: {problem}\n"
            f"  looked in: {Path(root).resolve()}\n"
            f"  expected layout:\n{_indent(layout, 4)}\n"
            f"  to get the real data: {how_to_get}\n"
            f"  for a small synthetic copy (smoke runs, tests):\n"
            f"    python -m mdeq.engine.data.synthetic --dataset {dataset} --root {root}"
        )
        super().__init__(message)


class DatasetIntegrityError(RuntimeError):
    """A data file exists but its checksum or contents are not what they should be (the message names it)."""


class DataOptionError(TypeError, ValueError):
    """An unknown data set builder option: a TypeError, as for any wrong keyword, and a ValueError (bad input)."""


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.strip("\n").splitlines())


def _read_manifest(folder: str | Path) -> dict | None:
    """The manifest our own tools write next to data they made (synthetic copies, conversions).

    Why: those files cannot carry the official md5s, so the manifest says what they are
    (``source_label``) and, for CIFAR-10, the md5s to verify instead. Real downloads have none.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetIntegrityError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("source_label"), str):
        raise DatasetIntegrityError(f"{path} must be a JSON object with a string 'source_label'")
    return manifest


def _write_manifest(folder: str | Path, source_label: str, **fields) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps({"source_label": source_label, **fields}, indent=2, sort_keys=True) + "\n")
    return path


from mdeq.engine.data import cifar10  # noqa: E402  (it imports the names above)
from mdeq.engine.data.cifar10 import CIFAR10_CLASSES, CIFAR10Arrays, convert_jpeg_npz_to_pickles  # noqa: E402
from mdeq.engine.data.transforms import (  # noqa: E402
    CIFAR10_MEAN,
    CIFAR10_STD,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

SPLITS = ("train", "val")
# Cityscapes needs cityscapesscripts (an optional dependency); its names load on first use, so
# CIFAR-10 and ImageNet work without it.
_CITYSCAPES_NAMES = ("CITYSCAPES_CLASSES", "CITYSCAPES_PALETTE", "CITYSCAPES_CLASS_WEIGHTS",
                     "CityscapesSegmentation", "label_ids_to_train_ids", "train_ids_to_color")


def __getattr__(name: str):
    if name == "imagenet":  # it imports torchvision, 1.5 s a process that trains on CIFAR-10 need not spend
        return importlib.import_module("mdeq.engine.data.imagenet")
    if name in _CITYSCAPES_NAMES or name == "cityscapes":
        module = importlib.import_module("mdeq.engine.data.cityscapes")
        return module if name == "cityscapes" else getattr(module, name)
    raise AttributeError(f"module 'mdeq.engine.data' has no attribute {name!r}")


def _module(dataset: str):
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return importlib.import_module(f"mdeq.engine.data.{dataset}")


def describe_layout(dataset: str) -> str:
    """The directory layout that ``build_datasets(dataset, root)`` expects under ``root``."""
    return _module(dataset).LAYOUT.strip("\n")


def check_root(dataset: str, root: str | Path) -> Path:
    """``root`` if it holds ``dataset``'s files or folders (both splits), else ``DatasetNotFoundError`` naming the
    expected layout and the download. Cheap: no image is listed and no checksum computed (the builders do that),
    so a launcher (the full profile) checks its data this way before it asks for GPUs."""
    _module(dataset).check_root(root)
    return Path(root)


def build_dataset(dataset: str, root: str | Path, split: str, **options):
    """One split ('train' or 'val') of a data set; ``options`` go to the data set's builder.

    Options per data set (unknown ones raise ``DataOptionError``, a ``TypeError``):
      cifar10:    augment=False, source='pickles' | 'jpeg_q75', verify_md5=True, download=False,
                  exact_subset=None (path of the exact-prefix npz, with source='jpeg_q75'),
                  rows='all' | 'exact_known' (only the exactly known images; needs exact_subset),
                  exact_pixels=True (False: their JPEG-q75 twins, not the exact pixels)
      imagenet:   augment=True (train only), image_size=224, allow_missing_classes=False
      cityscapes: augment=True (train only), crop_size=(512, 1024), base_size=2048, scale_factor=16
    For CIFAR-10, 'val' is the official test_batch, as in the released code.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    build = _module(dataset).build
    valid = [p.name for p in inspect.signature(build).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataOptionError(f"unknown option(s) {', '.join(unknown)} for {dataset}; valid: {', '.join(valid)}")
    return build(root, split, **options)


def build_datasets(dataset: str, root: str | Path, *, splits=SPLITS, **options) -> dict:
    """``{split: Dataset}`` for each of ``splits``; see ``build_dataset`` for the options."""
    if isinstance(splits, str):
        splits = (splits,)
    return {split: build_dataset(dataset, root, split, **options) for split in splits}


__all__ = [
    "DATASETS",
    "SPLITS",
    "MANIFEST_NAME",
    "DatasetNotFoundError",
    "DatasetIntegrityError",
    "DataOptionError",
    "build_dataset",
    "build_datasets",
    "check_root",
    "describe_layout",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10Arrays",
    "convert_jpeg_npz_to_pickles",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IGNORE_INDEX",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_CLASS_WEIGHTS",
    "CityscapesSegmentation",
    "label_ids_to_train_ids",
    "train_ids_to_color",
]
