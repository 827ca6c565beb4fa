"""The recipe study (studies/recipe_study.py): each run's command trains what its name says."""
import argparse
import sys

import pytest
import torch

from mdeq.core.config import load_config
from mdeq.engine import paths
from mdeq.engine.baselines import build_baseline
from mdeq.engine.build import build_optimizer

sys.path.insert(0, str(paths.ROOT / "studies"))
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


def test_the_third_run_takes_the_better_recipe_once_both_have_finished(monkeypatch):
    state = {"sgd": dict(finished=True, test_top1_last=74.0), "adam_wd": dict(finished=False, test_top1_last=71.0)}
    monkeypatch.setattr(recipe_study, "row", lambda name: state[name.split("_170k_")[1]])
    assert recipe_study.names() == ["resnet18_170k_sgd", "resnet18_170k_adam_wd"]
    state["adam_wd"].update(finished=True, test_top1_last=75.5)
    assert recipe_study.names()[2] == "resnet14_170k_adam_wd"


def test_render_says_where_each_run_stands():
    assert recipe_study.render(None).startswith("**Not run yet.**")
    record = {"paper_top1": 81.6, "provenance": {"date": "d", "git_commit": "0123456789abc"},
              "table1_row": {"recipe": "Adam 1e-3, no weight decay", "test_top1_final": 68.71,
                             "test_top1_best_for_reference_only": 69.6, "best_epoch": 11},
              "runs": [dict(baseline="resnet18_170k", recipe="sgd", finished=False, epochs_done=7, epochs_planned=50,
                            test_top1_last=70.25, test_top1_best_for_reference_only=71.5, best_epoch=6,
                            train_acc_last=80.0),
                       dict(baseline="resnet18_170k", recipe="adam_wd", finished=False, epochs_done=0,
                            epochs_planned=50)]}
    md = recipe_study.render(record)
    assert "| ResNet-18 (170K), Table 1's row | Adam 1e-3, no weight decay | 50 of 50 | 68.71 | 69.60 (epoch 11)" in md
    assert "| SGD, momentum 0.9, lr 0.1, weight decay 5e-4, cosine | 7 of 50, unfinished | 70.25 | 71.50 (epoch 6) |" in md
    assert "| Adam 1e-3, weight decay 5e-4 (L2), cosine | 0 of 50, unfinished | - |" in md
    assert "the better of the two, once both have finished" in md and "`0123456789`" in md
