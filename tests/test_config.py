"""Configs: every shipped YAML loads; unknown keys, wrong types and broken cross-field rules raise."""
import dataclasses

import pytest
import yaml

from mdeq.core.config import (GRAD_MODES, SOLVER_NAMES, ConfigError, ExperimentConfig, ModelConfig,
                         available_configs, config_from_dict, config_to_dict, load_config)

PAPER_MODELS = ["cifar10_small", "cifar10_large", "imagenet_small", "imagenet_large", "imagenet_xl",
                "cityscapes_small", "cityscapes_large", "cityscapes_xl"]


@pytest.mark.parametrize("name", available_configs())
def test_every_shipped_config_loads_and_round_trips(name):
    cfg = load_config(name)
    assert isinstance(cfg, ExperimentConfig) and cfg.name == name
    assert name.endswith("_" + cfg.variant)
    raw = config_to_dict(cfg)
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(raw))) == cfg


def test_one_config_per_paper_model():
    names = set(available_configs())
    for model in PAPER_MODELS:
        assert f"{model}_official" in names
    for model in ["cifar10_small", "cifar10_large", "imagenet_small", "imagenet_large",
                  "cityscapes_small", "cityscapes_large"]:  # the columns of Appendix Table 4
        assert f"{model}_paper" in names
    assert {"cifar10_single_stream_paper", "cifar10_tiny_smoke"} <= names


def test_paper_variants_follow_appendix_table_4():
    small = load_config("cifar10_small_paper")
    assert small.model.num_channels == (8, 16, 32) and small.model.num_groups == 4
    assert (small.solver.max_iter, small.solver.backward_max_iter, small.solver.memory) == (15, 18, 12)
    assert small.model.dropout == 0.2 and not small.data.augment
    large = load_config("imagenet_large_paper")
    assert large.model.num_channels == (80, 160, 320, 640) and large.train.weight_decay == 1e-4
    assert (large.solver.max_iter, large.solver.backward_max_iter, large.solver.memory) == (22, 25, 18)
    city = load_config("cityscapes_small_paper")
    assert (city.solver.max_iter, city.solver.backward_max_iter, city.train.epochs) == (27, 30, 480)
    assert city.data.image_size == (512, 1024) and city.data.eval_image_size == (1024, 2048)
    assert len(city.data.class_weights) == 19


def test_the_first_commit_config_differs_from_table_4_only_where_its_yaml_does():
    """cifar10_small_first_commit_official is the 80.3 % report's configuration (locuslab/mdeq@17c0119
    cls_mdeq_TINY.yaml): cifar10_small_paper's architecture, with the yaml's groups, dropout and solver caps."""
    def flat(cfg):
        return {f"{section}.{k}": v for section, fields in config_to_dict(cfg).items() if isinstance(fields, dict)
                for k, v in fields.items()}

    paper, first = flat(load_config("cifar10_small_paper")), flat(load_config("cifar10_small_first_commit_official"))
    differ = {k: (paper[k], first[k]) for k in paper if paper[k] != first[k]}
    assert differ == {"model.num_groups": (4, 8), "model.dropout": (0.2, 0.15), "solver.max_iter": (15, 30),
                      "solver.backward_max_iter": (18, 30), "solver.memory": (12, 24),
                      "data.eval_batch_size": (128, 64)}

def test_constants_match_the_solvers_and_the_implicit_layer():
    from mdeq.core.implicit import GRAD_MODES as LAYER_GRAD_MODES
    from mdeq.core.solvers import SOLVERS

    assert set(SOLVER_NAMES) == set(SOLVERS)
    assert set(GRAD_MODES) == set(LAYER_GRAD_MODES)


def test_overrides_from_strings_and_dicts():
    cfg = load_config("cifar10_tiny_smoke", ["solver.max_iter=9", "solver.tol=1e-4", "model.dropout=0",
                                             "data.augment=true", "name=renamed", "train.pretrained=null"])
    assert cfg.solver.max_iter == 9 and cfg.solver.tol == 1e-4 and cfg.model.dropout == 0.0
    assert isinstance(cfg.model.dropout, float) and cfg.data.augment and cfg.name == "renamed"
    cfg = load_config("cifar10_tiny_smoke", {"solver": {"grad": "jfb"}, "model.num_channels": [4, 8],
                                             "model.head_channels": [2, 4]})
    assert cfg.solver.grad == "jfb" and cfg.model.num_channels == (4, 8) and cfg.model.num_scales == 2


def test_load_from_a_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(load_config("cifar10_tiny_smoke"))))
    assert load_config(path) == load_config("cifar10_tiny_smoke")
    assert load_config(str(path), ["solver.max_iter=3"]).solver.max_iter == 3


def test_misspelt_yaml_key_names_the_key_the_valid_keys_and_the_closest(tmp_path):
    raw = config_to_dict(load_config("cifar10_tiny_smoke"))
    raw["model"]["expanion"] = raw["model"].pop("expansion")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "'expanion'" in message and "closest match: 'expansion'" in message
    assert "valid keys:" in message and "'num_groups'" in message
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("override, closest", [
    ("solver.max_iters=5", "max_iter"),
    ("slover.max_iter=5", "solver"),
    ("train.learning_rate=0.1", None),
    ("data.batchsize=4", "batch_size"),
])
def test_unknown_override_keys(override, closest):
    with pytest.raises(ConfigError, match="unknown key") as err:
        load_config("cifar10_tiny_smoke", [override])
    if closest:
        assert f"closest match: '{closest}'" in str(err.value)


def test_unknown_config_name_suggests_the_closest():
    with pytest.raises(ConfigError, match="closest match: 'cifar10_small_paper'"):
        load_config("cifar10_smal_paper")


@pytest.mark.parametrize("override, fragment", [
    ("solver.max_iter=abc", "must be an integer"),
    ("solver.max_iter=5.5", "must be an integer"),
    ("solver.max_iter=true", "must be an integer"),
    ("data.augment=1", "must be true or false"),
    ("model.num_channels=8", "must be a list"),
    ("data.image_size=[32, 32, 3]", "list of 2 values"),
    ("solver.grad=implicit", "solver.grad must be one of"),
    ("solver.solver=brodyen", "did you mean 'broyden'"),
    ("model.head=detection", "model.head must be one of"),
    ("bogus", "section.key=value"),
])
def test_wrong_values_raise(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        load_config("cifar10_tiny_smoke", [override])


@pytest.mark.parametrize("overrides, fragment", [
    (["model.num_channels=[4, 8]"], "head_channels needs one width per scale"),
    (["model.num_groups=3"], "must divide every scale's channels"),
    (["model.num_channels=[2, 4, 8]", "model.num_groups=4"], "must divide every scale's channels"),
    (["data.image_size=[30, 32]"], "must be divisible by 2^(downsample_times + num_scales - 1) = 4"),
    (["data.dataset=cityscapes"], "needs model.head 'segmentation'"),
    (["train.nesterov=true"], "nesterov needs optimizer 'sgd'"),
    (["data.class_weights=[1.0, 2.0]"], "one weight per class"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
    (["solver.memory=0"], "solver.memory must be >= 1"),
])
def test_cross_field_rules(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config("cifar10_tiny_smoke", overrides)
    assert fragment in str(err.value)


def test_configs_are_frozen_and_hashable():
    cfg = load_config("cifar10_tiny_smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.solver.max_iter = 3
    assert hash(cfg) == hash(load_config("cifar10_tiny_smoke"))
    assert ModelConfig(num_channels=[8, 16], head_channels=[4, 8], num_groups=4).num_channels == (8, 16)


def test_missing_required_key(tmp_path):
    path = tmp_path / "noname.yaml"
    path.write_text("variant: custom\n")
    with pytest.raises(ConfigError, match=r"missing required keys \['name'\]"):
        load_config(path)
