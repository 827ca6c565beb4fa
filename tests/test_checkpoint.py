"""Checkpoints: atomic writes survive a failure mid-save, RNG states round-trip, weights-only loading,
partial ImageNet -> Cityscapes loading, unwrapping of wrapped models."""
import random

import numpy as np
import pytest
import torch
from torch import nn

import mdeq.engine.checkpoint as ckpt_mod
from mdeq.engine.checkpoint import (capture_rng_state, load_checkpoint, load_matching_state, load_pretrained,
                             restore_rng_state, save_checkpoint, unwrap_model)
from mdeq.core.config import load_config
from mdeq.core.model import build_model


def test_save_is_atomic_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(3)})

    def broken_save(obj, fh):
        fh.write(b"partial garbage")
        raise KeyboardInterrupt  # e.g. a signal mid-write

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the previous complete file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_a_failed_write_names_the_checkpoint_and_a_truncated_file_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(1000)})

    def full_disk(obj, fh):  # what torch.save raises when the disk fills
        fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    with pytest.raises(OSError, match=f"could not write the checkpoint {path}: .*unexpected pos 704 vs 598"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"] and load_checkpoint(path)["step"] == 1
    data = path.read_bytes()
    for cut in (data[:len(data) // 2], data[:5000], b""):
        path.write_bytes(cut)
        with pytest.raises(ckpt_mod.CheckpointError, match=f"{path} \\({len(cut)} bytes\\) is not a readable "
                                                           f"checkpoint .*truncated or corrupted"):
            load_checkpoint(path)


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path / "c.pt", {"rng": capture_rng_state()})
    expected = (random.random(), np.random.standard_normal(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])  # weights_only=True load
    got = (random.random(), np.random.standard_normal(3), torch.rand(3))
    assert got[0] == expected[0]
    assert np.array_equal(got[1], expected[1])
    assert torch.equal(got[2], expected[2])


def test_load_checkpoint_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")


def _backbone_pair():
    """A classification and a segmentation MDEQ with the same stem, injection and f_theta."""
    common = {"model.num_channels": [8, 8, 16, 16], "model.expansion": 1, "model.num_groups": 2,
              "data.image_size": [64, 64], "data.eval_image_size": [64, 64]}
    cls_cfg = load_config("imagenet_small_official", {**common, "model.head_channels": [2, 2, 4, 4],
                                                      "model.final_channels": 16, "data.num_classes": 5})
    seg_cfg = load_config("cityscapes_small_official", common)
    return build_model(cls_cfg), build_model(seg_cfg)


def test_pretrained_loads_stem_injection_and_f_theta(tmp_path):
    torch.manual_seed(0)
    imagenet, cityscapes = _backbone_pair()
    save_checkpoint(tmp_path / "imagenet.pt", {"model": imagenet.state_dict(), "epoch": 3})
    report = load_pretrained(cityscapes, tmp_path / "imagenet.pt")
    prefixes = {k.split(".")[0] for k in report.loaded}
    assert prefixes == {"stem", "injection", "deq"}
    assert all(k.startswith("head.") for k in report.missing + report.shape_mismatch + report.unused)
    own = cityscapes.state_dict()
    assert all(torch.equal(own[k], imagenet.state_dict()[k]) for k in report.loaded)
    assert "loaded" in report.summary()


def test_partial_load_skips_other_shapes_and_strips_ddp_prefix():
    a, b = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 4)), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 5))
    source = {f"module.{k}": v for k, v in a.state_dict().items()}
    report = load_matching_state(b, source)
    assert sorted(report.loaded) == ["0.bias", "0.weight"]
    assert sorted(report.shape_mismatch) == ["1.bias", "1.weight"]
    assert torch.equal(b[0].weight, a[0].weight)
    with pytest.raises(ValueError, match="state dict of tensors"):
        load_pretrained(b, {"model": {"w": "not a tensor"}, "epoch": 1})


def test_unwrap_model():
    inner = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(inner)) is inner
    assert unwrap_model(inner) is inner
