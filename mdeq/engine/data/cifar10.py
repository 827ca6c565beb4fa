"""How CIFAR-10 is read: from the official ``cifar-10-batches-py`` pickles or from the offline JPEG-q75 npz.

Why: the released code reads torchvision's CIFAR10 (``tools/cls_train.py``); we read the same pickles
ourselves so that the md5 check, the synthetic copy and the offline JPEG-q75 re-encoding (what it
is and where it came from: docs/data.md) all yield one dataset type, ``CIFAR10Arrays``, that says where its pixels
came from in ``source_label``.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mdeq.engine.data import (
    MANIFEST_NAME,
    DatasetIntegrityError,
    DatasetNotFoundError,
    _read_manifest,
    _write_manifest,
)
from mdeq.engine.data.transforms import CIFAR10Transform

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCHES = ("test_batch",)
META = "batches.meta"
# The published checksums, as listed by torchvision.datasets.CIFAR10 (train_list, test_list, meta).
OFFICIAL_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
JPEG_NPZ_NAME = "cifar10_jpeg_q75_batch_order.npz"
SOURCE_OFFICIAL = "CIFAR-10 (official)"
SOURCE_UNVERIFIED = "CIFAR-10 (official layout, md5 not checked)"
SOURCE_JPEG = "CIFAR-10 (JPEG-q75 re-encoded)"
SOURCE_JPEG_HYBRID = "CIFAR-10 (JPEG-q75 re-encoded, exact pixels for the first rows of each batch)"
SOURCE_EXACT_ROWS = "CIFAR-10 (only the images whose exact pixels are known, exact pixels)"
SOURCE_JPEG_TWINS = "CIFAR-10 (only the images whose exact pixels are known, as their JPEG-q75 twins)"
ROWS = ("all", "exact_known")

LAYOUT = f"""
<root>/{FOLDER}/data_batch_1 ... data_batch_5   official python pickles, 10000 images each
<root>/{FOLDER}/test_batch                      10000 images ('val' split, as in the released code)
<root>/{FOLDER}/batches.meta
(with source='jpeg_q75': <root> is the {JPEG_NPZ_NAME} file or a folder holding it)
"""
HOW_TO_GET = ("build_datasets('cifar10', root, download=True) fetches it through torchvision "
              "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, 163 MB)")
SOURCES = ("pickles", "jpeg_q75")


class CIFAR10Arrays(Dataset):
    """CIFAR-10 held in memory: uint8 images (N, 3, 32, 32), int64 labels (N,).

    Items are ``(transform(image), label)``; ``source_label`` says where the pixels came from.
    """

    num_classes = 10
    classes = CIFAR10_CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, transform=None,
                 source_label: str = SOURCE_OFFICIAL):
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (3, 32, 32):
            raise ValueError(f"images must be uint8 (N, 3, 32, 32), got {images.dtype} {tuple(images.shape)}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must be (N,) with N = {images.shape[0]}, got {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > 9):
            raise ValueError(f"labels must lie in 0..9, got {int(labels.min())}..{int(labels.max())}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform
        self.source_label = source_label

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def __repr__(self) -> str:
        return f"CIFAR10Arrays(n={len(self)}, source_label={self.source_label!r}, transform={self.transform})"


def build(root, split: str, *, augment: bool = False, source: str = "pickles", verify_md5: bool = True,
          download: bool = False, exact_subset=None, rows: str = "all", exact_pixels: bool = True) -> CIFAR10Arrays:
    """The 'train' (50K) or 'val' (the 10K test_batch) split; see ``mdeq.engine.data.build_dataset``.

    ``rows="exact_known"`` (source 'jpeg_q75' with ``exact_subset``) keeps only the images whose exact
    pixels are known (5,170 train, 1,017 test), with those exact pixels, or with their JPEG-q75 twins
    when ``exact_pixels`` is false: the two sides of a paired study of what training on JPEG costs.
    """
    train = split == "train"
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    if (rows != "all" or not exact_pixels) and (source != "jpeg_q75" or exact_subset is None):
        raise ValueError("rows='exact_known' and exact_pixels=False need source='jpeg_q75' and exact_subset "
                         "(the exact-prefix npz says which rows are known exactly)")
    if source == "pickles":
        if exact_subset is not None:
            raise ValueError("exact_subset only applies to source='jpeg_q75'")
        if download:
            _download(root)
        images, labels, label = load_pickles(root, train=train, verify_md5=verify_md5)
    elif source == "jpeg_q75":
        if download:
            raise ValueError("download=True fetches the official pickles; use source='pickles'")
        images, labels, label = load_jpeg_npz(_find_npz(root), train=train, exact_subset=exact_subset, rows=rows,
                                              exact_pixels=exact_pixels)
    else:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    transform = CIFAR10Transform(augment=augment and train)
    return CIFAR10Arrays(torch.from_numpy(images), torch.from_numpy(labels), transform=transform,
                         source_label=label)


def _download(root) -> None:
    """Fetch and extract the official archive with torchvision (which checks the archive's md5)."""
    from torchvision.datasets import CIFAR10

    CIFAR10(str(root), train=True, download=True)


def _folder(root) -> Path:
    """``<root>/cifar-10-batches-py``; a path that already is that folder is accepted too."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError("cifar10", root, "the data directory does not exist", LAYOUT, HOW_TO_GET)
    if (root / FOLDER).is_dir():
        return root / FOLDER
    if root.name == FOLDER or (root / META).is_file():
        return root
    raise DatasetNotFoundError("cifar10", root, f"no '{FOLDER}' folder in the data directory",
                               LAYOUT, HOW_TO_GET)


def check_root(root) -> None:
    """The official pickles are under ``root`` (their names only; ``load_pickles`` checks their md5)."""
    folder = _folder(root)
    missing = [n for n in (*TRAIN_BATCHES, *TEST_BATCHES, META) if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError("cifar10", root, f"missing files in {folder}: {', '.join(missing)}",
                                   LAYOUT, HOW_TO_GET)


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in 1 MiB chunks (the batches are about 31 MB each)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def check_md5(folder: str | Path, names=(*TRAIN_BATCHES, *TEST_BATCHES, META)) -> str:
    """Check each file's md5; return the data's source label.

    Official files are checked against the published md5s. A folder written by our own tools holds a
    manifest (``mdeq_manifest.json``) whose md5s are checked instead, and whose ``source_label`` is
    returned, so a synthetic or converted copy is never mistaken for the official data.
    """
    folder = Path(folder)
    manifest = _read_manifest(folder)
    expected = OFFICIAL_MD5 if manifest is None else manifest.get("md5", {})
    for name in names:
        if name not in expected:
            raise DatasetIntegrityError(f"{folder / 'mdeq_manifest.json'} lists no md5 for {name}")
        got = md5sum(folder / name)
        if got != expected[name]:
            what = "the published CIFAR-10 md5" if manifest is None else "the md5 in its mdeq_manifest.json"
            raise DatasetIntegrityError(
                f"{folder / name}: md5 {got} does not match {what} {expected[name]}; the file is corrupted "
                f"or not the official one. Delete the folder and download again, or pass verify_md5=False "
                f"to use it anyway (it is then labelled {SOURCE_UNVERIFIED!r}).")
    return SOURCE_OFFICIAL if manifest is None else manifest["source_label"]


def _load_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise DatasetIntegrityError(f"{path} is not a readable CIFAR-10 pickle: {exc}") from exc
    if not isinstance(entry, dict) or "data" not in entry or not ({"labels", "fine_labels"} & entry.keys()):
        raise DatasetIntegrityError(f"{path} lacks the 'data' and 'labels' entries of a CIFAR-10 batch")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DatasetIntegrityError(f"{path}: expected data (N, 3072) and N labels, "
                                    f"got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_pickles(root, *, train: bool, verify_md5: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """uint8 images (N, 3, 32, 32), int64 labels (N,) and the source label, from the pickles."""
    folder = _folder(root)
    names = TRAIN_BATCHES if train else TEST_BATCHES
    missing = [n for n in (*names, META) if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError("cifar10", root, f"missing files in {folder}: {', '.join(missing)}",
                                   LAYOUT, HOW_TO_GET)
    if verify_md5:
        label = check_md5(folder, (*names, META))
    else:
        manifest = _read_manifest(folder)
        label = SOURCE_UNVERIFIED if manifest is None else manifest["source_label"]
    parts = [_load_batch(folder / n) for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), label


def _find_npz(root) -> Path:
    root = Path(root)
    candidates = [root, root / JPEG_NPZ_NAME, root / "cifar10-jpeg-q75" / JPEG_NPZ_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise DatasetNotFoundError(
        "cifar10", root, f"no {JPEG_NPZ_NAME} found (source='jpeg_q75')",
        f"<root> = the npz itself, or <root>/{JPEG_NPZ_NAME}, or <root>/cifar10-jpeg-q75/{JPEG_NPZ_NAME};\n"
        "keys <batch>_jpeg_bytes, <batch>_jpeg_offsets, <batch>_labels for data_batch_1..5 and test_batch",
        "the offline archive is described in docs/data.md; or use the official pickles "
        "(source='pickles', download=True)")


def _npz_get(npz, key: str, path: Path) -> np.ndarray:
    if key not in npz.files:
        raise DatasetIntegrityError(f"{path} has no key {key!r}; expected <batch>_jpeg_bytes, "
                                    f"<batch>_jpeg_offsets and <batch>_labels for each batch")
    return npz[key]


def _decode_jpegs(data: np.ndarray, offsets: np.ndarray, path: Path, batch: str) -> np.ndarray:
    from PIL import Image

    n = offsets.shape[0] - 1
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        with Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes())) as im:
            pixels = np.asarray(im.convert("RGB"))
        if pixels.shape != (32, 32, 3):
            raise DatasetIntegrityError(f"{path}: image {i} of {batch} decodes to {pixels.shape}, "
                                        "not 32x32x3")
        out[i] = pixels
    return out.transpose(0, 3, 1, 2)


def load_jpeg_npz(path, *, train: bool, exact_subset=None, rows: str = "all",
                  exact_pixels: bool = True) -> tuple[np.ndarray, np.ndarray, str]:
    """Decode the JPEG-q75 re-encoding of CIFAR-10 (official batch order) with PIL.

    Why: the only complete offline copy (docs/data.md); its pixels are lossy (PSNR about 30 dB), so
    the result is labelled ``"CIFAR-10 (JPEG-q75 re-encoded)"``. With ``exact_subset`` (the
    exact-prefix npz) the first N rows of each batch are overwritten with the exact pixels.
    Returns uint8 images (N, 3, 32, 32), int64 labels (N,) and the source label.
    """
    names = TRAIN_BATCHES if train else TEST_BATCHES
    batches, label = _load_jpeg_batches(Path(path), names, exact_subset, exact_pixels)
    if rows == "exact_known":
        known = _exact_rows(Path(exact_subset), names)
        batches = {name: (im[:known[name]], lab[:known[name]]) for name, (im, lab) in batches.items()}
        label = SOURCE_EXACT_ROWS if exact_pixels else SOURCE_JPEG_TWINS
    return (np.concatenate([b[0] for b in batches.values()]),
            np.concatenate([b[1] for b in batches.values()]), label)


def _exact_rows(path: Path, names) -> dict[str, int]:
    """How many leading rows of each batch the exact-prefix npz holds."""
    with np.load(path) as npz:
        return {name: int(_npz_get(npz, f"{name}_data", path).shape[0]) for name in names}


def _load_jpeg_batches(path: Path, names, exact_subset, exact_pixels: bool = True) -> tuple[dict, str]:
    images, labels = [], []
    with np.load(path) as npz:
        for name in names:
            data = _npz_get(npz, f"{name}_jpeg_bytes", path)
            offsets = _npz_get(npz, f"{name}_jpeg_offsets", path).astype(np.int64)
            lab = _npz_get(npz, f"{name}_labels", path).astype(np.int64)
            if offsets.shape[0] != lab.shape[0] + 1 or offsets[-1] != data.shape[0]:
                raise DatasetIntegrityError(f"{path}: {name} offsets ({offsets.shape[0]}) do not fit "
                                            f"{lab.shape[0]} labels and {data.shape[0]} bytes")
            images.append(_decode_jpegs(data, offsets, path, name))
            labels.append(lab)
    label = SOURCE_JPEG
    if exact_subset is not None and exact_pixels:
        _overlay_exact(Path(exact_subset), names, images, labels)
        label = SOURCE_JPEG_HYBRID
    return dict(zip(names, zip(images, labels))), label


def _overlay_exact(path: Path, names, images: list, labels: list) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"exact_subset file {path} does not exist")
    with np.load(path) as npz:
        for k, name in enumerate(names):
            exact = _npz_get(npz, f"{name}_data", path)
            exact_labels = _npz_get(npz, f"{name}_labels", path).astype(np.int64)
            if not np.array_equal(exact_labels, labels[k]):
                raise DatasetIntegrityError(f"{path}: the labels of {name} differ from the JPEG npz's; "
                                            "the two files are not in the same order")
            n = exact.shape[0]
            if exact.ndim != 2 or exact.shape[1] != 3072 or n > images[k].shape[0]:
                raise DatasetIntegrityError(f"{path}: {name}_data must be (N <= {images[k].shape[0]}, 3072)")
            images[k][:n] = exact.reshape(n, 3, 32, 32)


def convert_jpeg_npz_to_pickles(npz_path, out_root, *, exact_subset=None) -> Path:
    """Write the decoded JPEG-q75 npz as ``<out_root>/cifar-10-batches-py`` pickles, with a manifest.

    Why: code that insists on the official layout (torchvision's CIFAR10 with its md5 check off) can
    then read the offline copy; the manifest keeps its source label and md5s for ``check_md5``.
    """
    npz_path = _find_npz(npz_path)
    batches, label = _load_jpeg_batches(npz_path, (*TRAIN_BATCHES, *TEST_BATCHES), exact_subset)
    return write_pickles(Path(out_root) / FOLDER, batches, source_label=label)


def write_pickles(folder: str | Path, batches: dict, *, source_label: str) -> Path:
    """Write ``{name: (uint8 (N, 3, 32, 32), labels (N,))}`` as official-format pickles + manifest.

    The batch dicts have the official keys (``batch_label``, ``labels``, ``data``, ``filenames``);
    ``batches.meta`` has ``label_names``. The manifest records ``source_label`` and each file's md5.
    A folder that holds pickles but no manifest is real data and is never overwritten.
    """
    folder = Path(folder)
    if any((folder / n).exists() for n in OFFICIAL_MD5) and not (folder / MANIFEST_NAME).is_file():
        raise FileExistsError(f"{folder} already holds CIFAR-10 files without an {MANIFEST_NAME}: it looks "
                              "like real data, so it is not overwritten; choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    for name, (images, labels) in batches.items():
        images = np.ascontiguousarray(images, dtype=np.uint8)
        entry = {
            "batch_label": f"{name} ({source_label})",
            "labels": [int(v) for v in labels],
            "data": images.reshape(images.shape[0], 3072),
            "filenames": [f"{name}_{i:05d}.png" for i in range(images.shape[0])],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=4)  # the official files are Python 2 pickles; readers accept both
    per_batch = max(len(v[1]) for v in batches.values())
    with open(folder / META, "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": per_batch,
                     "num_vis": 3072}, f, protocol=4)
    md5 = {name: md5sum(folder / name) for name in (*batches, META)}
    _write_manifest(folder, source_label, md5=md5)
    return folder
