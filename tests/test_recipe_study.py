"""The recipe study (benchmarks/recipe_study.py): each run's command trains what its name says."""
import argparse
import sys

import pytest
import torch

from mdeq.core.config import load_config
from mdeq.engine import paths
from mdeq.engine.baselines import build_baseline
from mdeq.engine.build import build_optimizer

sys.path.insert(0, str(paths.ROOT / "benchmarks"))
import recipe_study  # noqa: E402


def _option(cmd, flag):
    i = cmd.index(flag) + 1
    values = []
    while i < len(cmd) and not cmd[i].startswith("--"):
        values.append(cmd[i])
        i += 1
    return values


@pytest.mark.parametrize("baseline,recipe,kind,lr,wd", [
    ("resnet18_170k", "sgd", torch.optim.SGD, 0.1, 5e-4),
    ("resnet18_170k", "adam_wd", torch.optim.Adam, 1e-3, 5e-4),
    ("resnet14_170k", "sgd", torch.optim.SGD, 0.1, 5e-4),
])
def test_each_run_trains_its_recipe_on_table1s_data(baseline, recipe, kind, lr, wd):
    args = argparse.Namespace(campaign="table1_cifar10_cpu", threads=1)
    out = recipe_study.WORK / f"{baseline}_{recipe}"
    cmd = recipe_study.train_command(baseline, recipe, out, args, stop_at=2e9)
    assert _option(cmd, "--baseline") == [baseline] and _option(cmd, "--config") == ["cifar10_small_paper"]
    assert _option(cmd, "--data-root") == ["data/cifar10-jpeg-q75"]  # the campaign's, as Table 1's row
    assert "source=jpeg_q75" in _option(cmd, "--data-option") and "--resume" in cmd
    cfg = load_config("cifar10_small_paper", _option(cmd, "--set"))
    assert (cfg.train.epochs, cfg.data.batch_size, cfg.data.augment, cfg.train.seed) == (50, 128, False, 0)
    opt = build_optimizer(build_baseline(baseline), cfg.train)
    group = opt.param_groups[0]
    assert type(opt) is kind and group["lr"] == pytest.approx(lr) and group["weight_decay"] == pytest.approx(wd)
    if kind is torch.optim.SGD:
        assert group["momentum"] == pytest.approx(0.9) and not group["nesterov"]
