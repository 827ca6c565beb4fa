"""mdeq.paper.runs: the registry of the paper's runs, how smoke shrinks them, what the full profile launches."""
from __future__ import annotations

import json
import shlex

import pytest

from mdeq.engine import paths
from mdeq.paper import runs
from mdeq import train
from mdeq.core.config import load_config
from mdeq.paper.report.tables import paper_numbers


def test_registry_is_the_rows_we_reproduce():
    numbers = paper_numbers()
    rows = [r for t in ("table1", "table2", "table3") for r in numbers[t]["rows"] if "ours" in r]
    ours = [r["ours"] for r in rows] + [k for r in rows for k in r.get("ours_variants", {})]
    assert sorted(ours) == sorted(r.key for r in runs.RUNS)  # each run is one row, each row one run
    assert [r.key for r in runs.runs_for("04_cityscapes")] == [
        "cityscapes_mdeq_small", "cityscapes_mdeq_large", "cityscapes_mdeq_xl"]
    with pytest.raises(KeyError, match="unknown run 'nope'; known"):
        runs.spec("nope")
    with pytest.raises(ValueError, match="variant must be"):
        runs.config_name(runs.spec("cifar10_node"), "papr")
    assert runs.spec("cifar10_resnet18_170k").colour_key == "resnet18_170k"
    assert runs.run_name(runs.spec("cifar10_node"), 2) == "cifar10_node_seed2"


def test_smoke_run_folders_are_under_the_ignored_runs_folder():
    assert runs.smoke_run_dir("cityscapes_mdeq_large", quick=True) == paths.RUNS / "notebooks" / "quick" / \
        "cityscapes_mdeq_large"
    assert runs.smoke_run_dir("cityscapes_mdeq_large").parent.name == "default"
    assert runs.smoke_spec("cifar10_small_paper").smoke_div == 2
    assert runs.smoke_spec("imagenet_large_paper").smoke_div == 8


def _train_args(cmd):
    i = cmd.index("mdeq.train")
    return cmd[i + 1:]


def test_full_command_single_gpu():
    run = runs.spec("cifar10_mdeq_small")
    cmd = runs.full_command(run, variant="paper", data_root="/data", nproc=1, seed=3, python="python")
    assert shlex.join(cmd) == (
        "python -m mdeq.train --config cifar10_small_paper --data-root /data/cifar10 "
        f"--out {runs.FULL_RUNS / 'cifar10_mdeq_small_seed3'} --resume --workers 8 --no-progress "
        "--set train.seed=3")


def test_full_command_multi_gpu_uses_torchrun_and_carries_the_row():
    run = runs.spec("imagenet_mdeq_large_unrolled5")
    cmd = runs.full_command(run, variant="official", nproc=4, python="python")
    assert cmd[:6] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    args = _train_args(cmd)
    assert args[args.index("--config") + 1] == "imagenet_large_official"
    assert args[args.index("--data-root") + 1] == str(paths.DATA / "imagenet")
    assert args[args.index("--set") + 1:] == ["solver.grad=unrolled", "solver.unroll_steps=5", "train.pretrain_steps=0"]


def test_full_commands_parse_and_their_configs_load():
    from mdeq.engine.baselines import BASELINES  # needs torchdiffeq (the baselines extra)

    for run in runs.RUNS:
        for variant in ("paper", "official"):
            cmd = runs.full_command(run, variant=variant, nproc=2, seed=0 if run.table == "table1" else None)
            args = train._parser().parse_args(_train_args(cmd))
            overrides = [o for o in args.overrides if not o.startswith("train.pretrained=")]
            cfg = load_config(args.config, overrides)
            assert cfg.data.dataset == run.dataset
            assert args.resume and args.out == str(runs.FULL_RUNS / runs.run_name(
                run, 0 if run.table == "table1" else None))
            assert args.baseline == run.baseline and (run.baseline is None or run.baseline in BASELINES)
            if run.dataset == "cityscapes":
                assert f"train.pretrained={runs.FULL_RUNS / run.pretrained_from / 'checkpoint.pt'}" in args.overrides
            if "xl" in run.key:
                assert args.config.endswith("_official")  # the XL models have no paper variant


def test_run_full_dry_run_and_skip_finished(tmp_path):
    (tmp_path / "cifar10_node_seed1").mkdir()
    (tmp_path / "cifar10_node_seed1" / "final.json").write_text(json.dumps({"final": 55.0, "stopped_early": False}))
    launches = runs.run_full("01_cifar10", data_root="/data", nproc=2, seeds=2, dry_run=True, results=tmp_path)
    assert len(launches) == len(runs.runs_for("01_cifar10")) * 2 == 8 * 2  # 8 runs of Table 1, 2 seeds each
    status = {lc.run: lc.status for lc in launches}
    assert status.pop("cifar10_node_seed1") == "done"
    assert set(status.values()) == {"dry-run"}
    assert all("torch.distributed.run" in lc.command for lc in launches)


def test_processes_split_the_global_batch_evenly():
    assert runs.processes_for(runs.spec("cityscapes_mdeq_small"), "paper", 8) == 6  # batch 12
    assert runs.processes_for(runs.spec("cityscapes_mdeq_xl"), "paper", 8) == 8  # batch 16
    assert runs.processes_for(runs.spec("cifar10_mdeq_small"), "paper", 3) == 2  # batch 128
    assert runs.processes_for(runs.spec("imagenet_mdeq_small"), "paper", 0) == 1


def test_run_full_without_gpus_refuses_to_launch(monkeypatch, tmp_path):
    monkeypatch.setattr(runs, "visible_gpus", lambda: 0)
    for split in ("train", "val"):  # the data is in place: the GPUs are what is missing
        (tmp_path / "data" / "imagenet" / split).mkdir(parents=True)
    with pytest.raises(RuntimeError, match="none is visible"):
        runs.run_full("02_imagenet", data_root=str(tmp_path / "data"), results=tmp_path)


def test_full_profile_names_missing_data_and_its_layout_before_the_gpus(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runs, "visible_gpus", lambda: 0)
    with pytest.raises(runs.MissingDataError) as info:
        runs.run_full("02_imagenet", data_root=str(tmp_path), results=tmp_path / "results")
    first, *rest = str(info.value).splitlines()
    assert first.startswith(f"imagenet is not at {tmp_path / 'imagenet'} (the data directory does not exist): "
                            f"put it there") and "https://image-net.org" in first
    assert "  <root>/train/<wnid>/*.JPEG    e.g. train/n01440764/n01440764_10026.JPEG (1000 class folders)" in rest
    assert "GPU" not in str(info.value)
    (tmp_path / "imagenet" / "train").mkdir(parents=True)  # half the layout: the other half is named
    with pytest.raises(runs.MissingDataError, match=f"missing folder {tmp_path / 'imagenet' / 'val'}"):
        runs.run_full("02_imagenet", data_root=str(tmp_path), results=tmp_path / "results")
    launches = runs.run_full("04_cityscapes", data_root=str(tmp_path), dry_run=True, results=tmp_path / "results")
    out = capsys.readouterr().out
    assert out.startswith("data missing: the commands below would stop at once. cityscapes is not at")
    assert "<root>/gtFine/{train,val}/<city>/" in out and "https://www.cityscapes-dataset.com" in out
    assert {lc.status for lc in launches} == {"dry-run"}


def test_smoke_overrides_give_valid_small_configs():
    for run in runs.RUNS:
        for quick in (False, True):
            cfg = load_config(runs.config_name(run, "paper"),
                              [*run.overrides, *runs.smoke_overrides(run, "paper", quick=quick)])
            assert max(cfg.model.num_channels) <= 100 and cfg.solver.max_iter <= 6
            assert cfg.train.pretrained is None
        if run.key.endswith("unrolled5"):
            assert cfg.solver.grad == "unrolled" and cfg.solver.unroll_steps == 5
