"""Data loaders on synthetic copies in the real layouts, the JPEG-q75 npz loader, and the errors."""
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdeq.engine.data import (
    CITYSCAPES_CLASS_WEIGHTS,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    MANIFEST_NAME,
    DatasetIntegrityError,
    DatasetNotFoundError,
    build_dataset,
    build_datasets,
    cifar10,
    convert_jpeg_npz_to_pickles,
    describe_layout,
    label_ids_to_train_ids,
)
from mdeq.engine.data.synthetic import main as synthetic_main
from mdeq.engine.data.synthetic import make_synthetic
from mdeq.engine.data.transforms import IMAGENET_MEAN, IMAGENET_STD, CityscapesTrainTransform

# The offline CIFAR-10 (docs/data.md) where the campaign reads it (data/), else in a shared/ folder beside the
# checkout, if either holds it.
_PLACES = (Path(__file__).resolve().parents[1] / "data", Path(__file__).resolve().parents[2] / "shared" / "data")
SHARED = next((d for d in _PLACES if (d / "cifar10-jpeg-q75" / cifar10.JPEG_NPZ_NAME).is_file()), _PLACES[1])
BATCHES = (*cifar10.TRAIN_BATCHES, *cifar10.TEST_BATCHES)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name in ("cifar10", "imagenet", "cityscapes"):
        make_synthetic(name, root / name)
    return root


# ----------------------------------------------------------------------------- CIFAR-10


def test_cifar10_synthetic_loads_in_official_layout(synthetic_root):
    folder = synthetic_root / "cifar10" / "cifar-10-batches-py"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*BATCHES, "batches.meta", MANIFEST_NAME])
    with open(folder / "data_batch_1", "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    assert entry["data"].dtype == np.uint8 and entry["data"].shape[1] == 3072

    sets = build_datasets("cifar10", synthetic_root / "cifar10")
    train, val = sets["train"], sets["val"]
    assert (len(train), len(val)) == (500, 200)
    assert "synthetic" in train.source_label and train.num_classes == 10
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) <= 9
    # The validation split is normalised with the released statistics and never augmented.
    raw = val.images[3].float() / 255
    mean = torch.tensor(cifar10.CIFAR10Transform(False).mean).view(3, 1, 1)
    std = torch.tensor(cifar10.CIFAR10Transform(False).std).view(3, 1, 1)
    torch.testing.assert_close(val[3][0], (raw - mean) / std)


def test_cifar10_synthetic_is_learnable(synthetic_root):
    """Nearest class mean on raw pixels beats chance by far, so a smoke run can show learning."""
    sets = build_datasets("cifar10", synthetic_root / "cifar10")
    tr, va = sets["train"], sets["val"]
    means = torch.stack([tr.images[tr.labels == c].float().mean(0).flatten() for c in range(10)])
    pred = torch.cdist(va.images.float().flatten(1), means).argmin(1)
    assert (pred == va.labels).float().mean() > 0.8


def test_cifar10_augmentation_is_seeded_by_torch(synthetic_root):
    train = build_dataset("cifar10", synthetic_root / "cifar10", "train", augment=True)
    torch.manual_seed(1)
    a = torch.stack([train[i][0] for i in range(16)])
    torch.manual_seed(1)
    b = torch.stack([train[i][0] for i in range(16)])
    torch.manual_seed(2)
    c = torch.stack([train[i][0] for i in range(16)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    plain = build_dataset("cifar10", synthetic_root / "cifar10", "train", augment=False)
    assert not torch.equal(a, torch.stack([plain[i][0] for i in range(16)]))


def test_cifar10_md5_catches_a_corrupted_file(synthetic_root, tmp_path):
    make_synthetic("cifar10", tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(path, "rb") as f:
        entry = pickle.load(f)
    entry["data"][7, 100] ^= 0xFF  # one changed pixel: still a valid batch, a different md5
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    with pytest.raises(DatasetIntegrityError, match="data_batch_2.*md5"):
        build_dataset("cifar10", tmp_path, "train")
    # The test split does not read the corrupted batch; switching the check off is explicit.
    assert len(build_dataset("cifar10", tmp_path, "val")) == 200
    assert len(build_dataset("cifar10", tmp_path, "train", verify_md5=False)) == 500


def test_cifar10_without_manifest_is_checked_against_the_published_md5s(tmp_path):
    folder = make_synthetic("cifar10", tmp_path)
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetIntegrityError, match="published CIFAR-10 md5"):
        build_dataset("cifar10", tmp_path, "val")
    ds = build_dataset("cifar10", tmp_path, "val", verify_md5=False)
    assert ds.source_label == cifar10.SOURCE_UNVERIFIED


def test_cifar10_missing_and_malformed_give_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("cifar10", tmp_path / "nowhere", "train")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "cifar-10-batches-py/data_batch_1" in message
    assert f"python -m mdeq.engine.data.synthetic --dataset cifar10 --root {tmp_path / 'nowhere'}" in message
    assert "download=True" in message

    (tmp_path / "wrong").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no 'cifar-10-batches-py' folder"):
        build_dataset("cifar10", tmp_path / "wrong", "train")
    folder = make_synthetic("cifar10", tmp_path / "partial")
    (folder / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="missing files .*data_batch_4") as info:
        build_dataset("cifar10", tmp_path / "partial", "train")
    assert "data_batch_1 ... data_batch_5" in str(info.value)


def _tiny_jpeg_npz(path, n=6, seed=0):
    """A JPEG npz with the keys of the offline archive (docs/data.md), and the exact pixels it was made from."""
    rng = np.random.default_rng(seed)
    arrays, exact = {}, {}
    for name in BATCHES:
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        # Smooth images so that JPEG at quality 95 stays close to them.
        base = rng.integers(0, 256, size=(n, 1, 1, 3)).astype(np.float64)
        ramp = np.linspace(-30, 30, 32)[None, :, None, None] + np.linspace(-20, 20, 32)[None, None, :, None]
        pixels = np.clip(base + ramp, 0, 255).astype(np.uint8)  # (n, 32, 32, 3)
        blobs, offsets = [], [0]
        for img in pixels:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=95)
            blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
            offsets.append(offsets[-1] + blobs[-1].size)
        arrays[f"{name}_jpeg_bytes"] = np.concatenate(blobs)
        arrays[f"{name}_jpeg_offsets"] = np.asarray(offsets, dtype=np.int64)
        arrays[f"{name}_labels"] = labels
        exact[name] = (pixels.transpose(0, 3, 1, 2).reshape(n, 3072), labels)
    np.savez(path, **arrays)
    return exact


def test_jpeg_npz_loader_and_exact_overlay(tmp_path):
    npz = tmp_path / cifar10.JPEG_NPZ_NAME
    exact = _tiny_jpeg_npz(npz)
    val = build_dataset("cifar10", tmp_path, "val", source="jpeg_q75")
    assert val.source_label == "CIFAR-10 (JPEG-q75 re-encoded)"
    assert val.images.shape == (6, 3, 32, 32) and val.images.dtype == torch.uint8
    truth = torch.from_numpy(exact["test_batch"][0].reshape(6, 3, 32, 32))
    assert (val.images.float() - truth.float()).abs().mean() < 3
    assert val.labels.tolist() == exact["test_batch"][1].tolist()
    train = build_dataset("cifar10", npz, "train", source="jpeg_q75", augment=True)
    assert len(train) == 30 and train[0][0].shape == (3, 32, 32)

    subset = tmp_path / "exact.npz"
    np.savez(subset, **{f"{b}_data": exact[b][0][:2] for b in BATCHES},
             **{f"{b}_labels": exact[b][1] for b in BATCHES})
    hybrid = build_dataset("cifar10", npz, "val", source="jpeg_q75", exact_subset=subset)
    assert torch.equal(hybrid.images[:2], truth[:2]) and torch.equal(hybrid.images[2:], val.images[2:])
    assert "exact pixels" in hybrid.source_label

    np.savez(subset, **{f"{b}_data": exact[b][0][:2] for b in BATCHES},
             **{f"{b}_labels": (exact[b][1] + 1) % 10 for b in BATCHES})
    with pytest.raises(DatasetIntegrityError, match="labels"):
        build_dataset("cifar10", npz, "val", source="jpeg_q75", exact_subset=subset)
    with pytest.raises(DatasetNotFoundError, match="jpeg_q75"):
        build_dataset("cifar10", tmp_path / "nothing", "val", source="jpeg_q75")


def test_exact_known_rows_with_exact_pixels_or_their_jpeg_twins(tmp_path):
    """The paired data study's two training sets: the same images (the exactly known rows of each batch),
    once with their exact pixels and once as their JPEG twins; the other rows are dropped."""
    npz = tmp_path / cifar10.JPEG_NPZ_NAME
    exact = _tiny_jpeg_npz(npz)
    subset = tmp_path / "exact.npz"
    known = {b: 2 + i % 3 for i, b in enumerate(BATCHES)}  # 2, 3, 4, 2, 3 train rows; 4 test rows
    np.savez(subset, **{f"{b}_data": exact[b][0][:known[b]] for b in BATCHES},
             **{f"{b}_labels": exact[b][1] for b in BATCHES})
    opts = dict(source="jpeg_q75", exact_subset=subset, rows="exact_known")
    for split, names in (("train", BATCHES[:5]), ("val", BATCHES[5:])):
        pixels = build_dataset("cifar10", npz, split, **opts)
        twins = build_dataset("cifar10", npz, split, exact_pixels=False, **opts)
        jpeg = build_dataset("cifar10", npz, split, source="jpeg_q75")
        truth = np.concatenate([exact[b][0][:known[b]] for b in names]).reshape(-1, 3, 32, 32)
        rows = np.concatenate([np.arange(known[b]) + 6 * k for k, b in enumerate(names)])
        assert len(pixels) == len(twins) == sum(known[b] for b in names)
        assert torch.equal(pixels.images, torch.from_numpy(truth))
        assert torch.equal(twins.images, jpeg.images[rows]) and not torch.equal(twins.images, pixels.images)
        assert torch.equal(pixels.labels, twins.labels) and torch.equal(pixels.labels, jpeg.labels[rows])
        assert "exact pixels" in pixels.source_label and "JPEG-q75 twins" in twins.source_label
    with pytest.raises(ValueError, match="rows must be one of"):
        build_dataset("cifar10", npz, "val", source="jpeg_q75", exact_subset=subset, rows="exact")
    with pytest.raises(ValueError, match="need source='jpeg_q75' and exact_subset"):
        build_dataset("cifar10", npz, "val", source="jpeg_q75", rows="exact_known")


def test_jpeg_npz_converts_to_the_official_layout(tmp_path):
    npz = tmp_path / "q75.npz"
    _tiny_jpeg_npz(npz)
    convert_jpeg_npz_to_pickles(npz, tmp_path / "out")
    from_npz = build_dataset("cifar10", npz, "train", source="jpeg_q75")
    from_pickles = build_dataset("cifar10", tmp_path / "out", "train")  # md5s from the manifest
    assert from_pickles.source_label == from_npz.source_label == "CIFAR-10 (JPEG-q75 re-encoded)"
    assert torch.equal(from_pickles.images, from_npz.images)
    assert torch.equal(from_pickles.labels, from_npz.labels)


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg-q75" / cifar10.JPEG_NPZ_NAME).is_file(),
                    reason="the offline CIFAR-10 files (docs/data.md) are not on this machine")
def test_real_jpeg_npz_matches_the_exact_subset():
    exact_path = SHARED / "cifar10-partial-exact" / "cifar10_exact_prefix_subset.npz"
    val = build_dataset("cifar10", SHARED, "val", source="jpeg_q75")
    assert val.source_label == "CIFAR-10 (JPEG-q75 re-encoded)" and len(val) == 10000
    assert val.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert torch.bincount(val.labels).tolist() == [1000] * 10
    with np.load(exact_path) as npz:
        exact = torch.from_numpy(npz["test_batch_data"][:200].reshape(-1, 3, 32, 32))
    mse = ((val.images[:200].float() - exact.float()) ** 2).mean(dim=(1, 2, 3))
    assert mse.max() <= 321  # docs/data.md: matched pairs have MSE <= 321
    if (SHARED / "cifar-10-batches-py" / "batches.meta").is_file():
        meta = SHARED / "cifar-10-batches-py" / "batches.meta"
        assert cifar10.md5sum(meta) == cifar10.OFFICIAL_MD5["batches.meta"]


# ----------------------------------------------------------------------------- ImageNet


def test_imagenet_synthetic_imagefolder(synthetic_root):
    with pytest.warns(UserWarning, match="996 of the 1000 ILSVRC-2012 class folders are missing"):
        sets = build_datasets("imagenet", synthetic_root / "imagenet", image_size=48, allow_missing_classes=True)
    train, val = sets["train"], sets["val"]
    assert train.classes == val.classes and train.classes[0] == "n01440764"
    assert train.num_classes == 1000 and train.max_label == 3  # the standard label space, 4 classes present
    assert (len(train), len(val)) == (32, 12) and "synthetic" in val.source_label
    torch.manual_seed(0)
    x, y = train[5]
    torch.manual_seed(0)
    assert torch.equal(x, train[5][0])
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32 and 0 <= y < 4
    assert val[0][0].shape == (3, 48, 48)
    assert torch.equal(val[0][0], val[0][0])  # no randomness in validation


def test_imagenet_partial_read_keeps_the_1000_labels_and_each_class_index(tmp_path):
    """A subset with missing classes (here 0 and 3 of the generator's first 6) reports the standard label space,
    1000 (not its highest index + 1), keeps each class's standard index, and a head must reach its highest one."""
    import shutil

    from mdeq.core.config import ConfigError, load_config
    from mdeq.engine import loaders
    from mdeq.engine.data.imagenet import standard_wnids
    from mdeq.engine.distributed import DistInfo
    from mdeq.engine.options import RunOptions

    root = make_synthetic("imagenet", tmp_path / "inet", num_classes=6, n_train=1, n_val=1)
    wnids = standard_wnids()
    for split in ("train", "val"):
        for gone in (0, 3):
            shutil.rmtree(root / split / wnids[gone])
    with pytest.warns(UserWarning, match="996 of the 1000 ILSVRC-2012 class folders are missing; reading 4"):
        sets = build_datasets("imagenet", root, image_size=8, allow_missing_classes=True)
    for ds in sets.values():
        assert ds.num_classes == 1000 and ds.max_label == 5
        assert ds.class_to_idx == {wnids[i]: i for i in (1, 2, 4, 5)}
        assert sorted(set(ds.targets)) == [1, 2, 4, 5]
    options = RunOptions(out_dir=tmp_path / "run", data_root=root, data_options={"allow_missing_classes": True})
    with pytest.warns(UserWarning, match="class folders are missing"):  # a 6-output head reaches label 5
        loaders.build_datasets(load_config("imagenet_small_paper", ["data.num_classes=6"]), options, DistInfo())
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="has labels up to 5 of its 1000 classes but "
                                                                     "data.num_classes is 5"):
        loaders.build_datasets(load_config("imagenet_small_paper", ["data.num_classes=5"]), options, DistInfo())


def test_check_root_passes_each_layout_and_names_what_is_missing(synthetic_root, tmp_path):
    from mdeq.engine.data import check_root

    for name in ("cifar10", "imagenet", "cityscapes"):
        assert check_root(name, synthetic_root / name) == synthetic_root / name
        with pytest.raises(DatasetNotFoundError, match="the data directory does not exist") as info:
            check_root(name, tmp_path / name)
        assert info.value.layout == describe_layout(name) and info.value.how_to_get
    (tmp_path / "cityscapes" / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="missing folder .*leftImg8bit/val"):
        check_root("cityscapes", tmp_path / "cityscapes")
    (tmp_path / "cifar10" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="missing files in .*: data_batch_1, data_batch_2"):
        check_root("cifar10", tmp_path / "cifar10")


def test_imagenet_wrong_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train/<wnid>/"):
        build_dataset("imagenet", tmp_path / "missing", "train")
    (tmp_path / "train" / "n01440764").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "n01440764" / "a.JPEG")
    (tmp_path / "val").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetNotFoundError, match="loose images.*sorted into class folders") as info:
        build_dataset("imagenet", tmp_path, "val")
    assert "val/<wnid>/*.JPEG" in str(info.value)


def _imagenet_folder(root: Path, wnids, n: int = 2, size=(8, 8)) -> None:
    for split in ("train", "val"):
        for wnid in wnids:
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.new("RGB", size, (40 * k, 80, 120)).save(root / split / wnid / f"{wnid}_{k}.JPEG")


def test_imagenet_labels_are_the_standard_index_whatever_folders_are_present(tmp_path):
    from mdeq.engine.data.imagenet import standard_wnids

    wnids = standard_wnids()
    assert len(wnids) == 1000 and wnids[0] == "n01440764" and list(wnids) == sorted(wnids)
    present = [wnids[1], wnids[9], wnids[999]]
    _imagenet_folder(tmp_path, present)
    with pytest.raises(DatasetNotFoundError, match=r"has 3 of the 1000 ILSVRC-2012 class folders \(missing "
                                                   r"n01440764, n01484850, .* and 992 more\).*allow_missing_classes"):
        build_dataset("imagenet", tmp_path, "train")
    with pytest.warns(UserWarning, match="997 of the 1000 ILSVRC-2012 class folders are missing; reading 3 classes"):
        train = build_dataset("imagenet", tmp_path, "train", allow_missing_classes=True, image_size=8)
    assert train.class_to_idx == {wnids[1]: 1, wnids[9]: 9, wnids[999]: 999} and train.num_classes == 1000
    assert sorted(set(train.targets)) == [1, 9, 999] and train[len(train) - 1][1] == 999  # not 0..2

    (tmp_path / "train" / "cats").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"1 folders that are not ILSVRC-2012 synsets \(cats\)"):
        build_dataset("imagenet", tmp_path, "train", allow_missing_classes=True)
    (tmp_path / "train" / "cats").rmdir()
    for wnid in wnids[100:130]:
        (tmp_path / "train" / wnid).mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset("imagenet", tmp_path, "train", allow_missing_classes=True)
    problem = info.value.problem
    assert problem.startswith("30 of the 33 class folders in") and "hold no image (.jpeg, .jpg, .png)" in problem
    assert f"{', '.join(wnids[100:105])} and 25 more" in problem and len(problem) < 300


def test_truncated_images_are_errors_that_name_the_file(tmp_path, synthetic_root):
    import shutil

    from mdeq.engine.cli import one_line

    _imagenet_folder(tmp_path / "inet", ["n01440764"], n=1, size=(64, 64))
    jpeg = tmp_path / "inet" / "train" / "n01440764" / "n01440764_0.JPEG"
    noise = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(jpeg, format="JPEG")
    jpeg.write_bytes(jpeg.read_bytes()[:-300])  # cut short, as by an interrupted copy
    with pytest.warns(UserWarning, match="999 of the 1000"):
        train = build_dataset("imagenet", tmp_path / "inet", "train", allow_missing_classes=True, image_size=8)
    with pytest.raises(DatasetIntegrityError, match=f"{jpeg}: unreadable image \\(image file is truncated"):
        train[0]
    with pytest.raises(DatasetIntegrityError) as info:  # from a loader worker: the file is named too
        next(iter(torch.utils.data.DataLoader(train, num_workers=1)))
    assert one_line(info.value).startswith(f"{jpeg}: unreadable image (image file is truncated")

    shutil.copytree(synthetic_root / "cityscapes", tmp_path / "cs")
    png = sorted((tmp_path / "cs" / "leftImg8bit" / "val").glob("*/*.png"))[0]
    png.write_bytes(png.read_bytes()[: len(png.read_bytes()) // 2])
    with pytest.raises(DatasetIntegrityError, match=f"{png}: unreadable image"):
        build_dataset("cityscapes", tmp_path / "cs", "val").load(0)


# ----------------------------------------------------------------------------- Cityscapes


def test_cityscapes_label_table_from_cityscapesscripts():
    ids = np.arange(34)
    expected = np.full(34, 255)
    for label_id, train_id in {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                               24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}.items():
        expected[label_id] = train_id
    assert label_ids_to_train_ids(ids).tolist() == expected.tolist()
    assert label_ids_to_train_ids(torch.arange(34)).tolist() == expected.tolist()
    assert len(CITYSCAPES_CLASSES) == len(CITYSCAPES_PALETTE) == len(CITYSCAPES_CLASS_WEIGHTS) == 19
    assert CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_PALETTE[0] == (128, 64, 128)
    assert CITYSCAPES_CLASS_WEIGHTS[0] == 0.8373 and CITYSCAPES_CLASS_WEIGHTS[-1] == 1.0507


def test_cityscapes_synthetic_official_layout(synthetic_root):
    root = synthetic_root / "cityscapes"
    sets = build_datasets("cityscapes", root, crop_size=(64, 96), base_size=256)
    train, val = sets["train"], sets["val"]
    assert (len(train), len(val)) == (4, 2) and train.num_classes == 19 and train.ignore_index == 255
    image_path, label_path = val.pairs[0]
    assert image_path.name == "frankfurt_000000_000019_leftImg8bit.png"
    assert label_path == root / "gtFine" / "val" / "frankfurt" / "frankfurt_000000_000019_gtFine_labelIds.png"
    # Validation: the full image, the labelIds PNG mapped through the table.
    x, y = val[0]
    assert x.shape == (3, 128, 256) and x.dtype == torch.float32 and y.dtype == torch.int64
    raw_ids = np.asarray(Image.open(label_path))
    assert y.tolist() == label_ids_to_train_ids(raw_ids).astype(np.int64).tolist()
    assert (y == 255).any() and set(y.unique().tolist()) <= set(range(19)) | {255}
    # Training: the crop, trainIds or 255.
    x, y = train[1]
    assert x.shape == (3, 64, 96) and y.shape == (64, 96)
    assert set(y.unique().tolist()) <= set(range(19)) | {255}


def _denormalise(x):
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def test_cityscapes_joint_transform_keeps_image_and_label_aligned():
    """Paint each pixel with its class colour; after scale/pad/crop/flip the colours must still agree."""
    palette = torch.tensor(CITYSCAPES_PALETTE, dtype=torch.float32)
    label = torch.zeros(48, 96, dtype=torch.int64)
    label[:, 48:] = 13
    label[10:30, 5:40] = 2
    label[30:, 60:80] = 255
    label[:8, 70:90] = 10
    colours = torch.cat([palette, torch.zeros(237, 3)])[label]  # 255 -> black
    image = colours.permute(2, 0, 1).round().to(torch.uint8)
    transform = CityscapesTrainTransform((40, 64), base_size=96)
    flips = set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = transform(image, label)
        assert x.shape == (3, 40, 64) and y.shape == (40, 64) and y.dtype == torch.int64
        rgb = _denormalise(x).permute(1, 2, 0)
        # Only pixels near a class boundary may blend (the image is bilinear, the label nearest). Away from
        # one, every pixel has its class's colour: the pixels whose 5x5 label neighbourhood has one class
        # (the bilinear sample lies within it at every scale 0.5-2.1 here), 2 pixels in from the crop's edge.
        windows = torch.nn.functional.unfold(y[None, None].float(), 5)[0].view(25, 36, 60)
        inner = (windows == windows[12]).all(0) & (y[2:-2, 2:-2] != 255)
        err = (rgb[2:-2, 2:-2][inner] - palette[y[2:-2, 2:-2][inner]]).abs().amax(-1)
        assert inner.float().mean() > 0.3 and (err < 1e-3).all(), (seed, err.max())  # exact, up to float32
        flips.add(bool((y[:, 0] == 13).all()))
    assert flips == {True, False}  # both flipped and unflipped crops were checked


def test_cityscapes_crop_keeps_each_label_on_the_pixel_its_image_value_came_from():
    """Where each output pixel comes from, read twice: the label holds its source pixel's index (resized
    nearest, OpenCV's floor(j r) with r = source / resized size), the image its source coordinates as
    colours (R = 2x, G = 4y: a linear ramp, which bilinear resizing samples exactly at x' = (j + 1/2) r - 1/2).
    So on every pixel away from the image's border, x' - x_label + (1 - r) / 2 = frac(j r) lies in [0, 1):
    scale, crop and flip moved image and label together. A label crop off by one output pixel moves that
    by r; flipping one without the other moves it by up to the crop width."""
    H, W = 48, 96
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    image = torch.stack([2 * xs, 4 * ys, torch.zeros_like(xs)]).to(torch.uint8)
    label = 1000 + ys * W + xs  # not 255 (the padding) anywhere
    transform = CityscapesTrainTransform((40, 64), base_size=96)
    flips, scales = set(), set()
    for seed in range(12):
        torch.manual_seed(seed)
        x, y = transform(image, label)
        rgb = _denormalise(x)
        fx, fy = rgb[0] / 2, rgb[1] / 4  # the image's source coordinates
        sx, sy = (y - 1000) % W, (y - 1000) // W  # the label's source pixel
        r_x = (fx[:, 1:] - fx[:, :-1]).abs().median()  # source pixels per output pixel
        r_y = (fy[1:] - fy[:-1]).abs().median()
        keep = (y >= 1000) & (fx > 0.5) & (fx < W - 1.5) & (fy > 0.5) & (fy < H - 1.5)  # no padding or clamping
        assert keep.float().mean() > 0.5, seed
        for f, s, r in ((fx, sx, r_x), (fy, sy, r_y)):
            frac = (f - s + (1 - r) / 2)[keep]
            assert frac.min() > -1e-3 and frac.max() < 1 + 1e-3, (seed, r, frac.min(), frac.max())
        flips.add(bool(fx[0, 0] > fx[0, -1]))
        scales.add(round(float(r_x), 2))
    assert flips == {True, False} and len(scales) >= 5  # flipped and unflipped crops, up- and downscaled


def test_cityscapes_padding_uses_zero_image_and_ignore_label():
    image = torch.full((3, 20, 40), 200, dtype=torch.uint8)
    label = torch.full((20, 40), 7, dtype=torch.int64)
    transform = CityscapesTrainTransform((64, 64), base_size=40, scale_factor=0, flip=False)
    torch.manual_seed(0)
    x, y = transform(image, label)  # long side 20, so 10x20 of content in a 64x64 crop
    assert (y[:10, :20] == 7).all() and (y[10:] == 255).all() and (y[:, 20:] == 255).all()
    torch.testing.assert_close(_denormalise(x)[:, 10:, :], torch.zeros(3, 54, 64), atol=1e-3, rtol=0)
    torch.testing.assert_close(_denormalise(x)[:, :10, :20], torch.full((3, 10, 20), 200.0),
                               atol=1e-3, rtol=0)


def test_cityscapes_train_augmentation_is_seeded_by_torch(synthetic_root):
    train = build_dataset("cityscapes", synthetic_root / "cityscapes", "train", crop_size=(64, 96),
                          base_size=256)
    torch.manual_seed(3)
    a = train[0]
    torch.manual_seed(3)
    b = train[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cityscapes_missing_labels_and_layout(tmp_path, synthetic_root):
    with pytest.raises(DatasetNotFoundError, match="gtFine/{train,val}/<city>/") as info:
        build_dataset("cityscapes", tmp_path / "none", "val")
    assert "--dataset cityscapes" in str(info.value)
    make_synthetic("cityscapes", tmp_path / "cs")
    next((tmp_path / "cs" / "gtFine" / "val").glob("*/*_labelIds.png")).unlink()
    with pytest.raises(DatasetNotFoundError, match="1 of 2 images have no label file"):
        build_dataset("cityscapes", tmp_path / "cs", "val")


# ----------------------------------------------------------------------------- entry point


def test_entry_point_validates_names_and_options(synthetic_root):
    for name in ("cifar10", "imagenet", "cityscapes"):
        assert "<root>" in describe_layout(name)
    with pytest.raises(ValueError, match="cifar10, imagenet, cityscapes"):
        build_datasets("mnist", synthetic_root)
    with pytest.raises(ValueError, match="split"):
        build_dataset("cifar10", synthetic_root / "cifar10", "test")
    with pytest.raises(TypeError):
        build_dataset("cifar10", synthetic_root / "cifar10", "train", crop_size=(1, 1))
    with pytest.raises(ValueError, match="source"):
        build_dataset("cifar10", synthetic_root / "cifar10", "train", source="png")


def test_synthetic_cli_and_refusal_to_overwrite_real_data(tmp_path, capsys):
    synthetic_main(["--dataset", "imagenet", "--root", str(tmp_path / "inet")])
    assert "wrote a synthetic imagenet copy" in capsys.readouterr().out
    synthetic_main(["--dataset", "imagenet", "--root", str(tmp_path / "inet")])  # over its own copy: fine
    (tmp_path / "real" / "leftImg8bit").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="real data"):
        make_synthetic("cityscapes", tmp_path / "real")


def test_cityscapes_label_ids_outside_the_table_are_an_error_naming_the_file(tmp_path, synthetic_root):
    import shutil

    shutil.copytree(synthetic_root / "cityscapes", tmp_path / "cs")
    val = build_dataset("cityscapes", tmp_path / "cs", "val")
    label_path = val.pairs[0][1]
    ids = np.asarray(Image.open(label_path)).astype(np.uint16)
    ids[:4, :4], ids[-1, -1] = 40, 1000  # a 16-bit labelIds PNG with values the table does not define
    Image.fromarray(ids).save(label_path)
    with pytest.raises(DatasetIntegrityError, match=f"{label_path}: label ids 40, 1000 are not in the Cityscapes "
                                                    f"label table \\(0..33\\)"):
        val.load(0)
    with pytest.raises(ValueError, match="label ids must be in 0..33, got 34, 255"):
        label_ids_to_train_ids(np.array([7, 34, 255]))
    with pytest.raises(ValueError, match="label ids must be in 0..33"):
        label_ids_to_train_ids(torch.tensor([7, 40]))


def test_dataloader_batches(synthetic_root):
    loader = torch.utils.data.DataLoader(
        build_dataset("cityscapes", synthetic_root / "cityscapes", "val"), batch_size=2)
    x, y = next(iter(loader))
    assert x.shape == (2, 3, 128, 256) and y.shape == (2, 128, 256)


def test_dataloader_workers_reproduce_augmentation(synthetic_root):
    """Per-worker seeds come from the loader's generator, so the same seed gives the same batches."""
    train = build_dataset("cifar10", synthetic_root / "cifar10", "train", augment=True)

    def first_batches(seed):
        loader = torch.utils.data.DataLoader(train, batch_size=50, shuffle=True, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return [x for x, _ in list(loader)[:2]]

    a, b, c = first_batches(0), first_batches(0), first_batches(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], c[0])
