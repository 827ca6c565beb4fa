"""Rebuilding the offline CIFAR-10 (mdeq.engine.data.cifar10_offline): the cut-short pickles and the batch order.

The rebuild from the two public snapshots gave both published files byte for byte (docs/data.md); these tests
check its two steps on made-up data."""
import pickle
import struct

import numpy as np
import pytest

from mdeq.engine.data import DatasetIntegrityError
from mdeq.engine.data.cifar10 import CIFAR10_CLASSES
from mdeq.engine.data import cifar10_offline
from mdeq.engine.data.cifar10_offline import ROW_BYTES, batch_order, read_cut_pickle

PER_BATCH = 2000  # a batch of 2,000 images here (10,000 in the official files): the reader takes the count as given


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch):
    monkeypatch.setattr(cifar10_offline, "PER_BATCH", PER_BATCH)


def _batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 10, PER_BATCH).astype(np.uint8),
            rng.integers(0, 256, (PER_BATCH, ROW_BYTES)).astype(np.uint8))


def _python2_pickle(labels: np.ndarray, data: np.ndarray) -> bytes:
    """An official batch as Python 2 wrote it: str keys (SHORT_BINSTRING), the labels list, then the pixels as one
    BINSTRING (the numpy reconstruction around it is left out: the reader does not need it)."""
    def short(s: bytes) -> bytes:
        return b"U" + bytes([len(s)]) + s

    body = (b"\x80\x02}(" + short(b"batch_label") + short(b"training batch 1 of 5") + short(b"labels") + b"]("
            + b"".join(b"K" + bytes([int(v)]) for v in labels) + b"e" + short(b"data")
            + b"T" + struct.pack("<I", data.size) + data.tobytes())
    return body + b"u."


@pytest.mark.parametrize("writer", ["python2", "python3"])
@pytest.mark.parametrize("cut_rows", [0.5, 1017.3])
def test_a_cut_pickle_gives_every_label_and_the_whole_rows_before_the_cut(writer, cut_rows):
    labels, data = _batch(int(cut_rows * 10))
    if writer == "python2":
        whole = _python2_pickle(labels, data)
    else:  # protocol 4: str keys as SHORT_BINUNICODE, the pixels as BINBYTES
        whole = pickle.dumps({"batch_label": "b", "labels": [int(v) for v in labels], "data": data}, protocol=4)
    start = whole.find(struct.pack("<I", data.size)) + 4
    got_labels, rows = read_cut_pickle(whole[:start + int(cut_rows * ROW_BYTES)])
    assert np.array_equal(got_labels, labels)
    assert rows.shape == (int(cut_rows), ROW_BYTES) and np.array_equal(rows, data[:int(cut_rows)])


def test_a_pickle_cut_before_its_labels_end_is_refused():
    labels, data = _batch(0)
    whole = _python2_pickle(labels, data)
    with pytest.raises(DatasetIntegrityError, match="expected 2000 labels before the pixel data, found 800"):
        read_cut_pickle(whole[:whole.find(b"K") + 2 * 800], "cut")


def test_the_kth_image_of_a_class_is_the_kth_occurrence_of_its_label(tmp_path):
    labels = np.array([3, 0, 3, 9, 0, 3] + list(range(1, 3)) + list(range(4, 9)), dtype=np.uint8)
    for c, name in enumerate(CIFAR10_CLASSES):
        (tmp_path / "train" / name).mkdir(parents=True)
        for k in range(int((labels == c).sum())):
            (tmp_path / "train" / name / f"{k:04d}.jpg").write_bytes(f"{c}-{k}".encode())
    files = batch_order(tmp_path, "train", labels)
    assert [f.read_text() for f in files][:6] == ["3-0", "0-0", "3-1", "9-0", "0-1", "3-2"]
    (tmp_path / "train" / "cat" / "0003.jpg").write_bytes(b"extra")
    with pytest.raises(DatasetIntegrityError, match="expected 3 JPEG files .* class 'cat' in train\\), found 4"):
        batch_order(tmp_path, "train", labels)
