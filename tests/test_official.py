"""Released checkpoints: parameter counts equal the authors' models; their state dicts convert and
load strictly into ours, with every value in the right tensor; bad keys and shapes are named."""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from mdeq.core.config import available_configs, load_config
from mdeq.core.model import build_model
from mdeq.core.official import RELEASED, convert_state_dict, load_official, main, parameter_counts
from mdeq.engine.paths import ROOT

_DTYPES = {"float32": torch.float32, "int64": torch.int64}
_REAL_VALUES_BELOW = 20_000_000  # bigger models are checked for keys and shapes on the meta device


# Key/shape/dtype lists of the released models' checkpoints (data only, no code), kept in the repository so
# that the round-trip tests run on any clone.
REF = Path(__file__).resolve().parent / "data" / "official_state_dicts"
assert REF.is_dir(), f"{REF} is missing: the released-state-dict key lists are part of the test suite"


def _released_like(name: str, device: str):
    """A state dict shaped exactly like the released one, random values; aliases share tensors as there."""
    spec = json.loads((REF / RELEASED[name][0]).read_text())
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for key, shape, dtype, _kind in spec["state_dict"]:
        if key.startswith("deq.func.") and "fullstage." + key[len("deq.func."):] in sd:
            sd[key] = sd["fullstage." + key[len("deq.func."):]]  # the same module objects
        elif device == "meta":
            sd[key] = torch.empty(shape, dtype=_DTYPES[dtype], device="meta")
        elif dtype == "int64":
            sd[key] = torch.randint(0, 1000, shape, generator=gen)
        elif key.startswith(("fullstage_copy.", "deq.func_copy.")):
            sd[key] = torch.full(shape, -7.0)  # frozen copies: must not reach our model
        else:
            sd[key] = torch.randn(shape, generator=gen)
    return spec, sd


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_parameter_counts_equal_the_released_models(name):
    cfg = load_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == RELEASED[name][1]
    # ... and RELEASED's count is the released model's: its state dict's trainable entries, each tensor
    # counted once (deq.func.* are the same modules as fullstage.*)
    spec = json.loads((REF / RELEASED[name][0]).read_text())
    counted = sum(math.prod(shape) for key, shape, _dtype, kind in spec["state_dict"]
                  if kind == "param_trainable" and not key.startswith("deq.func."))
    assert spec["num_trainable_params"] == counted == RELEASED[name][1]


def test_every_official_config_has_a_released_count():
    official = [n for n in available_configs() if n.endswith("_official")]
    assert len(official) == 9 and set(official) <= set(RELEASED)
    assert RELEASED["cifar10_large_official"][1] == 11_098_398


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_state_dict_converts_and_loads_strictly(name):
    cfg = load_config(name)
    meta = RELEASED[name][1] >= _REAL_VALUES_BELOW
    spec, sd = _released_like(name, "meta" if meta else "cpu")
    assert [k for k, *_ in spec["state_dict"]] == list(sd)
    if meta:
        with torch.device("meta"):
            model = build_model(cfg)
    else:
        torch.manual_seed(0)
        model = build_model(cfg)
    converted = convert_state_dict(sd, cfg)
    model.load_state_dict(converted, strict=True)
    dropped = sum(k.startswith(("fullstage_copy.", "deq.func_copy.", "deq.func.")) for k in sd)
    assert len(converted) == len(sd) - dropped == len(model.state_dict())
    if meta:
        return
    f, head = model.f, model.head
    landed = {
        "downsample.0.weight": model.stem[0].weight,
        "downsample.4.running_var": model.stem[4].running_var,
        "fullstage.branches.0.blocks.0.conv1.weight_g": f.blocks[0].conv1.weight_g,
        "fullstage.branches.1.blocks.0.conv2.weight_v": f.blocks[1].conv2.weight_v,
        "fullstage.branches.1.blocks.0.gn3.bias": f.blocks[1].gn3.bias,
        "fullstage.fuse_layers.0.1.net.conv.weight": f.fusion.paths[0][1].conv.weight,
        "fullstage.fuse_layers.1.0.net.0.gnorm.weight": f.fusion.paths[1][0][0].gn.weight,
        "fullstage.post_fuse_layers.1.conv.weight_v": f.post[1].conv.weight_v,
        "fullstage.post_fuse_layers.0.gnorm.bias": f.post[0].gn.bias,
    }
    if cfg.model.num_scales > 2:
        landed["fullstage.fuse_layers.2.0.net.1.conv.weight"] = f.fusion.paths[2][0][1].conv.weight
    if cfg.model.injection_transform:
        landed["stage0.0.weight"] = model.injection[0].weight
    if cfg.model.head == "classification":
        landed.update({
            "incre_modules.0.0.conv2.weight": head.increase[0].conv2.weight,
            "incre_modules.1.0.bn3.running_mean": head.increase[1].bn3.running_mean,
            "incre_modules.1.0.downsample.1.bias": head.increase[1].shortcut[1].bias,
            "downsamp_modules.0.0.bias": head.downsample[0][0].bias,
            "final_layer.1.weight": head.final[1].weight,
            "classifier.weight": head.classifier.weight,
        })
    else:
        landed.update({"last_layer.0.weight": head.conv.weight, "last_layer.1.running_mean": head.bn.running_mean,
                       "last_layer.3.bias": head.classifier.bias})
    for key, tensor in landed.items():
        assert torch.equal(sd[key], tensor), key
    for p in model.parameters():
        assert not (p == -7.0).all(), "a frozen copy leaked into the model"


def test_conversion_errors_name_the_key():
    cfg = load_config("cifar10_tiny_smoke")
    ours = build_model(cfg).state_dict()
    # our layout -> the released one, by hand for the few keys used here
    released = {k.replace("stem.", "downsample.", 1).replace("injection.", "stage0.", 1)
                 .replace("deq.func.blocks.", "fullstage.branches.", 1): v for k, v in ours.items()}
    with pytest.raises(KeyError, match=r"no rule maps the released key 'fullstage\.branches\.0\.conv1"):
        convert_state_dict(released, cfg)  # blocks.0 missing in the hand mapping: no rule fits
    good = {"downsample.0.weight": ours["stem.0.weight"]}
    with pytest.raises(KeyError, match="has nothing for"):
        convert_state_dict(good, cfg)
    bad = {"downsample.0.weight": torch.zeros(5, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"released 'downsample\.0\.weight' has \(5, 3, 3, 3\), our "
                                         r"'stem\.0\.weight' expects \(4, 3, 3, 3\)"):
        convert_state_dict(bad, cfg)
    with pytest.raises(KeyError, match="'final_layer.0.bias' maps to 'head.final.0.bias', which this model"):
        convert_state_dict({"final_layer.0.bias": torch.zeros(3)}, load_config("cityscapes_small_official"))
    with pytest.raises(KeyError, match="no rule maps the released key 'totally.unknown'"):
        convert_state_dict({"totally.unknown": torch.zeros(1)}, cfg)


def test_module_prefix_alias_only_and_file_loading(tmp_path):
    name = "cifar10_small_official"
    cfg = load_config(name)
    _, sd = _released_like(name, "cpu")
    wrapped = {"module." + k: v for k, v in sd.items() if not k.startswith("fullstage.")}  # DataParallel, alias only
    converted = convert_state_dict(wrapped, cfg)
    assert torch.equal(converted["deq.func.blocks.0.conv1.weight_v"],
                       sd["fullstage.branches.0.blocks.0.conv1.weight_v"])
    path = tmp_path / "released.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    model = build_model(cfg)
    model.load_state_dict(load_official(path, model), strict=True)


def test_counts_table(capsys):
    rows = {r["config"]: r for r in parameter_counts()}
    assert rows["imagenet_large_paper"]["paper"] == "63M" and abs(rows["imagenet_large_paper"]["ours_vs_paper_pct"]) < 1
    assert rows["cifar10_tiny_smoke"]["paper"] is None
    main(["--counts"])
    out = capsys.readouterr().out
    assert "| cifar10_large_official | 11,098,398 | 11,098,398 (cifar_LARGE.json) | 10M | +11.0% |" in out
