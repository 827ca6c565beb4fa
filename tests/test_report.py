"""mdeq.report and mdeq.reproduce: paper numbers, parameter checks, output ownership, tables, launches.

The notebooks themselves are run in tests/test_notebooks.py; everything here is fast (no training).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from mdeq import paths, report, reproduce

# Lines of the paper's Tables 1-3 and Section 4.4, copied verbatim from shared/paper/paper.md, so
# that this spot-check needs no file outside the repository.
PAPER_LINES = {
    ("table1", "Neural ODEs [18]"): "Neural ODEs [18]\t172K\t53.7% $\\pm$ 0.2%",
    ("table1", "Aug. Neural ODEs [18]"): "Aug. Neural ODEs [18]\t172K\t60.6% $\\pm$ 0.4%",
    ("table1", "Single-stream DEQ [5]"): "Single-stream DEQ [5]\t170K\t82.2% $\\pm$ 0.3%",
    ("table1", "MDEQ-small (ours)"): "<b>MDEQ-small (ours)</b>\t<b>170K</b>\t<b>87.1% <math>\\pm</math> 0.4%</b>",
    ("table1", "MDEQ (ours)"): "<b>MDEQ (ours)</b>\t<b>10M</b>\t<b>93.8% <math>\\pm</math> 0.3%</b>",
    ("table2", "MDEQ-small (ours) [Implicit]"): "<b>MDEQ-small (ours) [Implicit]</b>\t18M\t75.5%\t92.7%",
    ("table2", "Unrolled 5-layer MDEQ-large"): "Unrolled 5-layer MDEQ-large\t63M\t75.9%\t93.0%",
    ("table2", "MDEQ-XL (ours) [Implicit]"): "<b>MDEQ-XL (ours) [Implicit]</b>\t81M\t79.2%\t94.5%",
    ("table2", "ResNet-101 [26]"): "ResNet-101 [26]\t52M\t77.1%\t93.5%",
    ("table3", "MDEQ-small (ours) [Implicit]"): "<b>MDEQ-small (ours) [Implicit]</b>\tMDEQ\t7.8M\t75.1",
    ("table3", "MDEQ-large (ours) [Implicit]"): "<b>MDEQ-large (ours) [Implicit]</b>\tMDEQ\t53.0M\t77.8",
    ("table3", "MDEQ-XL (ours) [Implicit]"): "<b>MDEQ-XL (ours) [Implicit]</b>\tMDEQ\t70.9M\t80.3",
    ("table3", "PSPNet [64]"): "PSPNet [64]\tD-ResNet-101\t65.9M\t78.4",
}
PAPER_MD = Path(__file__).resolve().parents[2] / "shared" / "paper" / "paper.md"  # beside a checkout, if any


def _numbers(line: str) -> list[float]:
    text = re.sub(r"<[^>]+>", "", line).split("\t", 1)[1]
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", text)]


@pytest.fixture(scope="module")
def numbers():
    return report.paper_numbers()


@pytest.mark.parametrize("key", list(PAPER_LINES), ids=lambda k: f"{k[0]}:{k[1]}")
def test_paper_numbers_match_the_paper(numbers, key):
    table, row = key
    (entry,) = [r for r in numbers[table]["rows"] if r["row"] == row]
    got = _numbers(PAPER_LINES[key])
    if table == "table1":
        assert [float(entry["params_text"].rstrip("KM")), entry["accuracy"], entry["accuracy_std"]] == got
    elif table == "table2":
        assert [float(entry["params_text"].rstrip("M")), entry["top1"], entry["top5"]] == got
    else:  # the backbone name's digits come first (e.g. D-ResNet-101)
        assert [float(entry["params_text"].rstrip("M")), entry["miou"]] == got[-2:]
    scale = 1e3 if entry["params_text"].endswith("K") else 1e6
    assert entry["params"] == pytest.approx(float(entry["params_text"][:-1]) * scale)


def test_paper_lines_are_verbatim_when_the_paper_is_at_hand():
    if not PAPER_MD.is_file():
        pytest.skip("shared/paper/paper.md is not on this machine")
    text = PAPER_MD.read_text()
    for line in PAPER_LINES.values():
        assert line in text, line


def test_paper_numbers_table1_resnets_and_fig4b(numbers):
    resnets = [r for r in numbers["table1"]["rows"] if r["row"].startswith("ResNet-18")]
    assert [(r["params_text"], r["accuracy"], r["accuracy_std"], r["setting"]) for r in resnets] == [
        ("170K", 81.6, 0.3, "without data augmentation"), ("10M", 92.9, 0.2, "with data augmentation")]
    st = {s["key"]: s for s in numbers["fig4b"]["statements"]}
    assert st["mdeq_slowdown_vs_resnet101"]["value"] == 2.7
    assert st["resnet101_ms_per_batch"]["value"] == 150
    assert st["mdeq_small_speedup_vs_anode"]["value"] == 3.0
    # every row we reproduce is a known run, and every run is a row of its table
    ours = {r["ours"] for t in ("table1", "table2", "table3") for r in numbers[t]["rows"] if "ours" in r}
    assert ours == {r.key for r in reproduce.RUNS}


# ----------------------------------------------------------------------------------------------
# Parameters.

def _ns(notebook, injected=None, **values):
    ns = {name: default for name, (_, default) in report.PARAMETERS[notebook].items()}
    ns.update(values)
    if injected is not None:
        ns["In"] = ["", "profile: str = 'smoke'", "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in injected.items())]
        ns.update(injected)
    return ns


def test_check_parameters_accepts_the_defaults():
    for nb in report.NOTEBOOKS:
        params = report.check_parameters(_ns(nb), nb)
        assert params.profile == "smoke" and params.quick is False


@pytest.mark.parametrize("bad, message", [
    ({"profile": "Full"}, "must be one of"),
    ({"profile": "logs", "quick": True}, "quick=True only applies"),
    ({"quick": "yes"}, "must be of type bool"),
    ({"seed": 1.5}, "must be of type int"),
    ({"seeds": 0}, "must be >= 1"),
    ({"variant": "papr"}, "did you mean 'paper'"),
])
def test_check_parameters_rejects_bad_values(bad, message):
    with pytest.raises(report.ParameterError, match=re.escape(message)):
        report.check_parameters(_ns("01_cifar10", **bad), "01_cifar10")


def test_check_parameters_rejects_an_unknown_injected_parameter():
    ns = _ns("04_cityscapes", injected={"profil": "logs"})
    with pytest.raises(report.ParameterError, match="unknown parameter.*'profil'.*did you mean 'profile'"):
        report.check_parameters(ns, "04_cityscapes")


def test_notebook_parameter_cells_declare_exactly_the_listed_parameters():
    import papermill as pm

    for nb in report.NOTEBOOKS:
        declared = pm.inspect_notebook(str(paths.NOTEBOOKS / f"{nb}.ipynb"))
        spec = report.PARAMETERS[nb]
        assert list(declared) == list(spec), nb
        for name, (tp, default) in spec.items():
            assert declared[name]["inferred_type_name"] == tp.__name__, (nb, name)
            assert eval(declared[name]["default"]) == default, (nb, name)  # noqa: S307 (literals)


# ----------------------------------------------------------------------------------------------
# Outputs: who writes what, and where.

def _notebook_sources():
    return {nb: (paths.NOTEBOOKS / f"{nb}.py").read_text() for nb in report.NOTEBOOKS}


def test_each_figure_and_table_is_written_by_exactly_one_notebook():
    sources = _notebook_sources()
    for owners in (report.FIGURE_OWNERS, report.TABLE_OWNERS):
        for name, owner in owners.items():
            writers = [nb for nb, src in sources.items() if f'"{name}"' in src]
            assert writers == [owner], (name, writers)


def test_files_in_figures_and_results_tables_have_their_owner():
    for folder in (paths.FIGURES, paths.FIGURES / "smoke"):
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if f.is_dir():
                continue
            name = f.name.split(".")[0]
            assert name in report.FIGURE_OWNERS, f"{f} is written by no notebook (report.FIGURE_OWNERS)"
            assert f.suffix in (".png", ".svg", ".json"), f
            assert f.stat().st_size < 300_000, f"{f} is {f.stat().st_size} bytes"
            if f.suffix == ".json":
                meta = json.loads(f.read_text())
                assert meta["notebook"] == f"notebooks/{report.FIGURE_OWNERS[name]}.ipynb"
                assert (folder.name == "smoke") == (meta["kind"] == "smoke")
                if meta["kind"] == "smoke":
                    assert report.SMOKE_NOTE in meta["caption"].lower()
    for folder in (paths.RESULTS, paths.RESULTS / "smoke"):
        for f in folder.glob("table_*.csv"):
            assert f.stem in report.TABLE_OWNERS, f"{f} is written by no notebook (report.TABLE_OWNERS)"


def test_committed_tables_never_copy_paper_numbers_into_ours():
    import pandas as pd

    for folder in (paths.RESULTS, paths.RESULTS / "smoke"):
        for f in folder.glob("table_*.csv"):
            df = pd.read_csv(f)
            assert {"paper", "ours", "delta", "ours_source"} <= set(df.columns), f
            for _, row in df.iterrows():
                if str(row["ours"]) == report.NOT_RUN:
                    assert pd.isna(row["delta"]), (f, row["row"])
                    continue
                assert str(row["ours_source"]) != report.NOT_RUN, (f, row["row"])
                if folder.name == "smoke":
                    assert "smoke" in row["ours_source"] and report.SMOKE_NOTE in row["status"], (f, row["row"])


def _ctx(tmp_path, notebook="01_cifar10", profile="logs"):
    return report.Context(notebook, profile, False, tmp_path)


def test_tables_without_logs_say_not_run_yet(tmp_path, monkeypatch):
    monkeypatch.setattr(report.Context, "inputs_dir", lambda self, kind: tmp_path / "nothing")
    numbers = report.paper_numbers()
    for build in (report.table1, report.table2, report.table3):
        df = build(_ctx(tmp_path), "real", numbers)
        assert (df["ours"] == report.NOT_RUN).all() and df["delta"].isna().all()
        assert df["paper"].notna().all()
    df = report.table_fig4b(_ctx(tmp_path), "real", None, numbers)
    assert (df["ours"] == report.NOT_RUN).all()
    df = report.convergence_table(_ctx(tmp_path), "real", None, numbers)
    assert (df["ours"] == report.NOT_RUN).all()


def _fake_run(folder: Path, name: str, top1: float, *, gpu: bool = True):
    folder = folder / name
    folder.mkdir(parents=True)
    (folder / "final.json").write_text(json.dumps({"metric": "top1", "final": top1, "stopped_early": False,
                                                   "final_eval": {"top1": top1, "top5": 99.0}}))
    hw = {"gpu": "NVIDIA H100", "world_size": 1} if gpu else {"cpu": "X", "torch_threads": 1}
    (folder / "provenance.json").write_text(json.dumps({"hardware": hw, "num_params": 175418,
                                                        "data_source_label": "CIFAR-10 (official)"}))
    (folder / "metrics.csv").write_text("epoch,eval_top1\n0,50.0\n1," + str(top1) + "\n")


def test_table1_mean_std_delta_and_source_from_logs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for k, acc in enumerate((86.0, 88.0)):
        _fake_run(runs, f"cifar10_mdeq_small_seed{k}", acc)
    monkeypatch.setattr(report.Context, "inputs_dir", lambda self, kind: tmp_path)
    df = report.table1(_ctx(tmp_path), "real")
    row = df[df["row"] == "MDEQ-small (ours)"].iloc[0]
    assert row["ours"] == pytest.approx(87.0) and row["ours_std"] == pytest.approx(1.41421, rel=1e-4)
    assert row["delta"] == pytest.approx(87.0 - 87.1) and row["paper"] == 87.1
    assert row["ours_source"] == "full profile; data: CIFAR-10 (official); hardware: 1 x NVIDIA H100"
    assert row["status"] == "2 runs" and row["ours_params"] == 175418
    other = df[df["row"] == "Neural ODEs [18]"].iloc[0]
    assert other["ours"] == report.NOT_RUN


def test_table1_unfinished_run_shows_its_latest_epoch_without_a_delta(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "cifar10_resnet18_170k"
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text(json.dumps({"config": {"train": {"epochs": 50}},
                                                        "hardware": {"cpu": "X", "torch_threads": 2}}))
    (folder / "metrics.csv").write_text("epoch,eval_top1,partial\n0,50.0,False\n1,60.0,False\n2,65.0,True\n")
    monkeypatch.setattr(report.Context, "inputs_dir", lambda self, kind: tmp_path)
    df = report.table1(_ctx(tmp_path), "real")
    row = df[df["row"] == "ResNet-18 [26] [Explicit]"].iloc[0]
    assert row["ours"] == 60.0 and pd_isna(row["delta"])
    assert row["status"] == "1 run; unfinished: epoch 2 of 50"


def pd_isna(x):
    import pandas as pd

    return pd.isna(x)


def test_save_figure_checks_the_owner_and_labels_smoke(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report.set_style()
    ctx = report.Context("05_convergence", "smoke", False, tmp_path)
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    with pytest.raises(ValueError, match="belongs to '01_cifar10'"):
        report.save_figure(fig, "fig4a_cifar10_accuracy", ctx, "smoke", caption="x", source="y")
    out = report.save_figure(fig, "fig7_per_scale_convergence", ctx, "smoke", caption="A caption", source="here")
    plt.close(fig)
    assert out["png"] == tmp_path / "figures" / "smoke" / "fig7_per_scale_convergence.png"
    assert out["svg"].is_file() and out["png"].stat().st_size < 300_000
    meta = json.loads(out["json"].read_text())
    assert meta["caption"].startswith("Smoke run, not a reproduction") and "notebooks/05_convergence.ipynb" in meta["caption"]
    assert b"Date" not in out["svg"].read_bytes()[:2000]  # deterministic SVG


def test_context_keeps_smoke_and_quick_away_from_real_results(tmp_path):
    real = report.Context("01_cifar10", "logs")
    assert real.results_dir("real") == paths.RESULTS and real.figures_dir("real") == paths.FIGURES
    assert real.results_dir("smoke") == paths.RESULTS / "smoke" and real.kinds() == ("real", "smoke")
    smoke = report.Context("01_cifar10", "smoke")
    assert smoke.kinds() == ("smoke",) and paths.RUNS in smoke.results_dir("smoke").parents  # never committed files
    assert paths.RUNS in smoke.figures_dir("smoke").parents and smoke.inputs_dir("smoke") == smoke.results_dir("smoke")
    committed = report.Context("01_cifar10", "smoke", False, paths.ROOT)  # --update-committed
    assert committed.results_dir("smoke") == paths.RESULTS / "smoke"
    full = report.Context("01_cifar10", "full", False, tmp_path)  # output_root: read where it writes
    assert full.inputs_dir("real") == full.results_dir("real") == tmp_path / "results"
    assert report.Context("01_cifar10", "logs", False, tmp_path).inputs_dir("real") == paths.RESULTS
    quick = report.Context("01_cifar10", "smoke", True)
    assert paths.RUNS in quick.results_dir("smoke").parents and paths.RUNS in quick.figures_dir("smoke").parents
    assert report.Context("01_cifar10", "full").kinds() == ("real",)


# ----------------------------------------------------------------------------------------------
# What the full profile would launch.

def _train_args(cmd):
    i = cmd.index("mdeq.train")
    return cmd[i + 1:]


def test_full_command_single_gpu():
    run = reproduce.spec("cifar10_mdeq_small")
    cmd = reproduce.full_command(run, variant="paper", data_root="/data", nproc=1, seed=3, python="python")
    assert shlex.join(cmd) == (
        "python -m mdeq.train --config cifar10_small_paper --data-root /data/cifar10 "
        f"--out {reproduce.FULL_RUNS / 'cifar10_mdeq_small_seed3'} --resume --workers 8 --no-progress "
        "--set train.seed=3")


def test_full_command_multi_gpu_uses_torchrun_and_carries_the_row():
    run = reproduce.spec("imagenet_mdeq_large_unrolled5")
    cmd = reproduce.full_command(run, variant="official", nproc=4, python="python")
    assert cmd[:6] == ["python", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]
    args = _train_args(cmd)
    assert args[args.index("--config") + 1] == "imagenet_large_official"
    assert args[args.index("--data-root") + 1] == str(paths.DATA / "imagenet")
    assert args[args.index("--set") + 1:] == ["solver.grad=unrolled", "solver.unroll_steps=5", "train.pretrain_steps=0"]


def test_full_commands_parse_and_their_configs_load():
    import mdeq.train
    from mdeq.baselines import BASELINES
    from mdeq.config import load_config

    for run in reproduce.RUNS:
        for variant in ("paper", "official"):
            cmd = reproduce.full_command(run, variant=variant, nproc=2, seed=0 if run.table == "table1" else None)
            args = mdeq.train._parser().parse_args(_train_args(cmd))
            overrides = [o for o in args.overrides if not o.startswith("train.pretrained=")]
            cfg = load_config(args.config, overrides)
            assert cfg.data.dataset == run.dataset
            assert args.resume and args.out == str(reproduce.FULL_RUNS / reproduce.run_name(
                run, 0 if run.table == "table1" else None))
            assert args.baseline == run.baseline and (run.baseline is None or run.baseline in BASELINES)
            if run.dataset == "cityscapes":
                assert f"train.pretrained={reproduce.FULL_RUNS / run.pretrained_from / 'checkpoint.pt'}" in args.overrides
            if "xl" in run.key:
                assert args.config.endswith("_official")  # the XL models have no paper variant


def test_run_full_dry_run_and_skip_finished(tmp_path):
    (tmp_path / "cifar10_node_seed1").mkdir()
    (tmp_path / "cifar10_node_seed1" / "final.json").write_text(json.dumps({"final": 55.0, "stopped_early": False}))
    launches = reproduce.run_full("01_cifar10", data_root="/data", nproc=2, seeds=2, dry_run=True, results=tmp_path)
    assert len(launches) == 7 * 2
    status = {lc.run: lc.status for lc in launches}
    assert status.pop("cifar10_node_seed1") == "done"
    assert set(status.values()) == {"dry-run"}
    assert all("torch.distributed.run" in lc.command for lc in launches)


def test_processes_split_the_global_batch_evenly():
    assert reproduce.processes_for(reproduce.spec("cityscapes_mdeq_small"), "paper", 8) == 6  # batch 12
    assert reproduce.processes_for(reproduce.spec("cityscapes_mdeq_xl"), "paper", 8) == 8  # batch 16
    assert reproduce.processes_for(reproduce.spec("cifar10_mdeq_small"), "paper", 3) == 2  # batch 128
    assert reproduce.processes_for(reproduce.spec("imagenet_mdeq_small"), "paper", 0) == 1


def test_run_full_without_gpus_refuses_to_launch(monkeypatch, tmp_path):
    monkeypatch.setattr(reproduce, "visible_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="none is visible"):
        reproduce.run_full("02_imagenet", results=tmp_path)


def test_smoke_overrides_give_valid_small_configs():
    from mdeq.config import load_config

    for run in reproduce.RUNS:
        for quick in (False, True):
            cfg = load_config(reproduce.config_name(run, "paper"),
                              [*run.overrides, *reproduce.smoke_overrides(run, "paper", quick=quick)])
            assert max(cfg.model.num_channels) <= 100 and cfg.solver.max_iter <= 6
            assert cfg.train.pretrained is None
        if run.key.endswith("unrolled5"):
            assert cfg.solver.grad == "unrolled" and cfg.solver.unroll_steps == 5


def test_reproduce_cli_rejects_bad_combinations(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "logs", "--quick"])
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "smoke", "--quick", "--update-committed"])
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "nope"])
    with pytest.raises(ValueError, match="unknown parameter"):
        reproduce.execute_notebook("01_cifar10", Path("/nonexistent/x.ipynb"), {"profil": "logs"})
