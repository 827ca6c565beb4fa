"""What tests and smoke runs read: small synthetic CIFAR-10, ImageNet and Cityscapes in their real layouts.

Why: smoke runs and tests exercise the very loaders used on the real data, without the real data.
Each class has its own colour and pattern, so a model learns them quickly and a smoke run can show
accuracy above chance. Each copy has a ``mdeq_manifest.json`` whose ``source_label`` says it is
synthetic; the loaders print it, and the CIFAR-10 loader checks the md5s listed there.

    python -m mdeq.engine.data.synthetic --dataset cifar10|imagenet|cityscapes --root DIR [--seed 0]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mdeq.engine.data import DATASETS, MANIFEST_NAME, _write_manifest, cifar10

SOURCE_CIFAR10 = "synthetic CIFAR-10 layout (smoke-test data, not CIFAR-10)"
SOURCE_IMAGENET = "synthetic ImageNet layout (smoke-test data, not ImageNet)"
SOURCE_CITYSCAPES = "synthetic Cityscapes layout (smoke-test data, not Cityscapes)"
# Real ImageNet wnids, so the folder names look like the real ones.
_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475", "n01496331",
          "n01498041", "n01514668", "n01514859", "n01518878")


def _refuse_real_data(folder: Path, marker: Path) -> None:
    """Never overwrite a real data set: only an empty place or an earlier synthetic copy."""
    if marker.exists() and not (folder / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{marker} exists and has no {MANIFEST_NAME}: it looks like real data, "
                              "so the synthetic generator will not overwrite it; choose another --root")


def _class_images(rng: np.random.Generator, labels: np.ndarray, num_classes: int, h: int, w: int,
                  noise: float) -> np.ndarray:
    """uint8 (N, H, W, 3): a class colour, plus stripes whose direction and period depend on the class."""
    hues = np.linspace(0.0, 1.0, num_classes, endpoint=False)
    colours = np.stack([0.5 + 0.4 * np.cos(2 * np.pi * (hues + k / 3)) for k in range(3)], axis=1) * 255
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((labels.shape[0], h, w, 3), dtype=np.uint8)
    for i, c in enumerate(labels):
        angle = np.pi * c / num_classes
        period = 4 + 2 * (c % 3)
        phase = rng.uniform(0, 2 * np.pi)
        stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period + phase)
        img = colours[c] + 40.0 * stripes[..., None] + rng.normal(0.0, noise, size=(h, w, 3))
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def make_cifar10(root, *, n_train_per_batch: int = 100, n_val: int = 200, seed: int = 0) -> Path:
    """Write ``<root>/cifar-10-batches-py`` (5 train batches + test_batch + batches.meta) + manifest."""
    folder = Path(root) / cifar10.FOLDER
    _refuse_real_data(folder, folder / "data_batch_1")
    rng = np.random.default_rng(seed)
    batches = {}
    for name, n in [(b, n_train_per_batch) for b in cifar10.TRAIN_BATCHES] + [("test_batch", n_val)]:
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = _class_images(rng, labels, 10, 32, 32, noise=20.0).transpose(0, 3, 1, 2)
        batches[name] = (images, labels)
    return cifar10.write_pickles(folder, batches, source_label=SOURCE_CIFAR10)


def make_imagenet(root, *, num_classes: int = 4, n_train: int = 8, n_val: int = 3, seed: int = 0) -> Path:
    """Write ``<root>/{train,val}/<wnid>/*.JPEG`` with varied image sizes + manifest."""
    from PIL import Image

    if not 1 <= num_classes <= len(_WNIDS):
        raise ValueError(f"num_classes must be in 1..{len(_WNIDS)}, got {num_classes}")
    root = Path(root)
    _refuse_real_data(root, root / "train")
    rng = np.random.default_rng(seed)
    val_index = 0
    for split, n in (("train", n_train), ("val", n_val)):
        for c, wnid in enumerate(_WNIDS[:num_classes]):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                h, w = (int(v) for v in rng.integers(48, 97, size=2))
                pixels = _class_images(rng, np.array([c]), num_classes, h, w, noise=15.0)[0]
                if split == "train":
                    name = f"{wnid}_{k + 1}.JPEG"
                else:
                    val_index += 1
                    name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                Image.fromarray(pixels).save(folder / name, format="JPEG", quality=90)
    _write_manifest(root, SOURCE_IMAGENET)
    return root


def make_cityscapes(root, *, size=(128, 256), n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    """Write ``<root>/leftImg8bit`` and ``<root>/gtFine`` (labelIds and colour PNGs) + manifest.

    Labels are rectangles of random labelIds, void ids included, so the 255 mapping is exercised;
    each pixel's colour is its class colour plus noise. The training transform resizes the long side
    to ``base_size * s`` (2048 * s for the real data), so smoke runs pass e.g. ``base_size=256,
    crop_size=(64, 128)`` to ``build_datasets``.
    """
    from PIL import Image

    from mdeq.engine.data import cityscapes

    table = cityscapes.LABEL_TABLE

    h, w = (int(v) for v in size)
    if h < 8 or w < 8:
        raise ValueError(f"size must be at least 8x8, got {size}")
    root = Path(root)
    _refuse_real_data(root, root / "leftImg8bit")
    rng = np.random.default_rng(seed)
    ids = np.array([lab.id for lab in table if lab.id >= 0])
    colours = np.zeros((256, 3))
    for lab in table:
        if lab.id >= 0:
            colours[lab.id] = lab.color
    evaluated = np.array([lab.id for lab in table if 0 <= lab.trainId < 255])
    cities = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            city = cities[split][k % len(cities[split])]
            stem = f"{city}_{k:06d}_000019"
            label = np.full((h, w), rng.choice(evaluated), dtype=np.uint8)
            for _ in range(12):
                y0, x0 = rng.integers(0, h - 4), rng.integers(0, w - 4)
                y1, x1 = y0 + rng.integers(4, h // 2 + 5), x0 + rng.integers(4, w // 2 + 5)
                label[y0:y1, x0:x1] = rng.choice(evaluated) if rng.random() < 0.8 else rng.choice(ids)
            image = np.clip(colours[label] + rng.normal(0.0, 12.0, size=(h, w, 3)), 0, 255).astype(np.uint8)
            for top, suffix, data in (("leftImg8bit", cityscapes.IMAGE_SUFFIX, image),
                                      ("gtFine", cityscapes.LABEL_SUFFIX, label),
                                      ("gtFine", "_gtFine_color.png", colours[label].astype(np.uint8))):
                folder = root / top / split / city
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(data).save(folder / f"{stem}{suffix}")
    _write_manifest(root, SOURCE_CITYSCAPES)
    return root


_MAKERS = {"cifar10": make_cifar10, "imagenet": make_imagenet, "cityscapes": make_cityscapes}


def make_synthetic(dataset: str, root, *, seed: int = 0, **sizes) -> Path:
    """Write the synthetic copy of ``dataset`` under ``root``; ``sizes`` go to ``make_<dataset>``."""
    if dataset not in _MAKERS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return _MAKERS[dataset](root, seed=seed, **sizes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--root", required=True, help="the folder to pass to build_datasets later")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_synthetic(args.dataset, args.root, seed=args.seed)
    print(f"wrote a synthetic {args.dataset} copy to {path}")


if __name__ == "__main__":
    main()
