"""mdeq.paper.report: the paper's numbers, the paper-vs-ours tables (one column spec) and the figures.

The notebooks themselves are run in tests/test_notebooks.py; everything here is fast (no training).
"""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from conftest import skip_unless_ci
from mdeq.paper import notebook, runs
from mdeq.paper.report import beyond, plots, style, tables
from mdeq.engine import paths

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
    return tables.paper_numbers()


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


# ----------------------------------------------------------------------------------------------
# Tables.

def _ctx(tmp_path, name="01_cifar10", profile="logs"):
    return notebook.Context(name, profile, False, tmp_path)


def test_tables_without_logs_say_not_run_yet(tmp_path, monkeypatch):
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path / "nothing")
    numbers = tables.paper_numbers()
    for table in tables.PAPER_TABLES:
        df = tables.paper_table(_ctx(tmp_path), "real", table, numbers)
        assert len(df) and (df["ours"] == style.NOT_RUN).all() and df["delta"].isna().all()
        assert df["paper"].notna().all()
    df = tables.table_fig4b(_ctx(tmp_path), "real", None, numbers)
    assert (df["ours"] == style.NOT_RUN).all()
    df = tables.convergence_table(_ctx(tmp_path), "real", None, numbers)
    assert (df["ours"] == style.NOT_RUN).all()


def _fake_run(folder: Path, name: str, top1: float, *, gpu: bool = True, final: dict | None = None):
    folder = folder / name
    folder.mkdir(parents=True)
    final = final if final is not None else {"metric": "top1", "final": top1, "stopped_early": False,
                                             "final_eval": {"top1": top1, "top5": 99.0}}
    (folder / "final.json").write_text(json.dumps(final))
    hw = {"gpu": "NVIDIA H100", "world_size": 1} if gpu else {"cpu": "X", "torch_threads": 1}
    (folder / "provenance.json").write_text(json.dumps({"hardware": hw, "num_params": 175418,
                                                        "data_source_label": "CIFAR-10 (official)",
                                                        "config": {"train": {"epochs": 2}}}))
    (folder / "metrics.csv").write_text("epoch,eval_top1\n0,50.0\n1," + str(top1) + "\n")


def test_table1_mean_std_delta_and_source_from_logs(tmp_path, monkeypatch):
    for k, acc in enumerate((86.0, 88.0)):
        _fake_run(tmp_path / "runs", f"cifar10_mdeq_small_seed{k}", acc)
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    df = tables.paper_table(_ctx(tmp_path), "real", "table1")
    row = df[df["row"] == "MDEQ-small (ours)"].iloc[0]
    assert row["ours"] == pytest.approx(87.0) and row["ours_std"] == pytest.approx(1.41421, rel=1e-4)
    assert row["delta"] == pytest.approx(87.0 - 87.1) and row["paper"] == 87.1 and row["paper_std"] == 0.4
    assert row["ours_source"] == "full profile; data: CIFAR-10 (official); hardware: 1 x NVIDIA H100"
    assert row["status"] == "2 runs" and row["ours_params"] == 175418
    assert row["setting"] == "without data augmentation"
    other = df[df["row"] == "Neural ODEs [18]"].iloc[0]
    assert other["ours"] == style.NOT_RUN


def test_table1_gives_the_best_epoch_beside_the_final_one(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "cifar10_resnet18_170k"
    _fake_run(tmp_path / "runs", "cifar10_resnet18_170k", 68.71)
    (folder / "metrics.csv").write_text("epoch,eval_top1,partial\n0,50.0,False\n1,69.6,False\n2,68.71,False\n"
                                        "3,99.0,True\n")  # a partial epoch is no evaluated epoch
    for k, accs in enumerate(((80.0, 86.0), (88.0, 84.0))):  # two seeds: the mean of each run's best
        _fake_run(tmp_path / "runs", f"cifar10_mdeq_small_seed{k}", accs[1])
        (tmp_path / "runs" / f"cifar10_mdeq_small_seed{k}" / "metrics.csv").write_text(
            f"epoch,eval_top1\n0,{accs[0]}\n1,{accs[1]}\n")
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    df = tables.paper_table(_ctx(tmp_path), "real", "table1")
    df = df[df["setting"] == "without data augmentation"].set_index("row")
    assert df.loc["ResNet-18 [26] [Explicit]", "ours"] == 68.71
    assert df.loc["ResNet-18 [26] [Explicit]", "ours_best"] == 69.6
    assert df.loc["ResNet-18 [26] [Explicit]", "ours_best_epoch"] == "2"
    assert df.loc["MDEQ-small (ours)", "ours"] == 85.0 and df.loc["MDEQ-small (ours)", "ours_best"] == 87.0
    assert df.loc["MDEQ-small (ours)", "ours_best_epoch"] == "2; 1"
    assert pd.isna(df.loc["Neural ODEs [18]", "ours_best"])
    assert "ours_best" not in tables.paper_table(_ctx(tmp_path, "02_imagenet"), "real", "table2").columns


def test_the_per_epoch_table_puts_each_run_beside_the_others(tmp_path, monkeypatch):
    _fake_run(tmp_path / "runs", "cifar10_resnet18_170k", 68.71)  # epochs 1-2, no residual: not a DEQ
    for name, rows in (("cifar10_mdeq_small", "0,48.7,0.3\n1,51.4,0.082\n2,64.1,0.0017\n"),
                       ("cifar10_mdeq_small_simple_injection", "0,52.5,0.14\n"),
                       ("cifar10_mdeq_small_simple_injection_seed1", "0,50.0,0.2\n1,55.0,0.01\n")):
        _fake_run(tmp_path / "runs", name, 0.0)
        (tmp_path / "runs" / name / "metrics.csv").write_text("epoch,eval_top1,rel_residual_forward\n" + rows)
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    df = tables.per_epoch_table(_ctx(tmp_path), "real", runs.runs_for("01_cifar10")).set_index("epoch")
    simple = "MDEQ-small (simplified injection)"
    assert list(df.index) == [1, 2, 3] and "ResNet-18 (170K): forward residual" not in df.columns
    assert df.loc[3, "MDEQ-small: test top-1 (%)"] == 64.1 and df.loc[2, "MDEQ-small: forward residual"] == 0.082
    assert df.loc[1, f"{simple}: test top-1 (%)"] == 52.5 and pd.isna(df.loc[2, f"{simple}: test top-1 (%)"])
    assert df.loc[2, f"{simple} (run 2): forward residual"] == 0.01
    shown = tables.format_per_epoch(df.reset_index(), "real")
    assert shown.loc[3, "MDEQ-small: forward residual"] == "1.7e-03"
    assert shown.loc[3, f"{simple}: test top-1 (%)"] == "-" and shown.loc[1, "MDEQ-small: test top-1 (%)"] == "48.70"
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path / "none")
    empty = tables.per_epoch_table(_ctx(tmp_path), "real", runs.runs_for("01_cifar10"))
    assert empty.empty and style.NOT_RUN in tables.format_per_epoch(empty, "real").iloc[0, 0]


def test_table1_unfinished_run_shows_its_latest_epoch_without_a_delta(tmp_path, monkeypatch):
    folder = tmp_path / "runs" / "cifar10_resnet18_170k"
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text(json.dumps({"config": {"train": {"epochs": 50}},
                                                        "hardware": {"cpu": "X", "torch_threads": 2}}))
    (folder / "metrics.csv").write_text("epoch,eval_top1,partial\n0,50.0,False\n1,60.0,False\n2,65.0,True\n")
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    df = tables.paper_table(_ctx(tmp_path), "real", "table1")
    row = df[df["row"] == "ResNet-18 [26] [Explicit]"].iloc[0]
    assert row["ours"] == 60.0 and pd.isna(row["delta"])
    assert row["status"] == "1 run; unfinished: epoch 2 of 50"
    started = tmp_path / "runs" / "cifar10_single_stream"  # a first chunk inside epoch 1: no metrics.csv yet
    started.mkdir()
    (started / "provenance.json").write_text((folder / "provenance.json").read_text())
    (started / "steps.jsonl").write_text('{"step": 50, "epoch": 0}\n')
    row = tables.paper_table(_ctx(tmp_path), "real", "table1").set_index("row").loc["Single-stream DEQ [5]"]
    assert row["ours"] == "no epoch evaluated yet" and row["status"] == "1 run; unfinished: epoch 0 of 50"


def test_a_run_stopped_early_is_labelled_and_gets_no_delta(tmp_path, monkeypatch):
    _fake_run(tmp_path / "runs", "cifar10_node", 50.0,
              final={"metric": "top1", "final": 50.0, "stopped_early": True, "final_eval": {"top1": 50.0}})
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    row = tables.paper_table(_ctx(tmp_path), "real", "table1").set_index("row").loc["Neural ODEs [18]"]
    assert row["ours"] == 50.0 and pd.isna(row["delta"]) and row["status"] == "1 run; stopped early"


def test_table2_has_a_row_per_column_and_table3_scales_miou_to_percent(tmp_path, monkeypatch):
    _fake_run(tmp_path / "runs", "imagenet_mdeq_small", 70.0)
    _fake_run(tmp_path / "runs", "cityscapes_mdeq_small", 0.0,
              final={"metric": "miou", "final": 0.7512, "stopped_early": False, "final_eval": {"miou": 0.7512}})
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    t2 = tables.paper_table(_ctx(tmp_path, "02_imagenet"), "real", "table2")
    small = t2[t2["row"] == "MDEQ-small (ours) [Implicit]"]
    assert list(small["metric"]) == ["top-1 accuracy (%)", "top-5 accuracy (%)"]
    assert list(small["ours"]) == [70.0, 99.0] and list(small["paper"]) == [75.5, 92.7]
    assert (t2["setting"] == "").all()
    t3 = tables.paper_table(_ctx(tmp_path, "04_cityscapes"), "real", "table3")
    row = t3[t3["row"] == "MDEQ-small (ours) [Implicit]"].iloc[0]
    assert row["ours"] == pytest.approx(75.12) and row["delta"] == pytest.approx(75.12 - 75.1)


# The committed tables, redrawn by the logs profile from the results/ of the commit that wrote each one.
COMMITTED_TABLES = {  # results/<name>.csv: (notebook, kind)
    "table_1_cifar10": ("01_cifar10", "real"),
    "table_2_imagenet": ("02_imagenet", "real"),
    "table_3_cityscapes": ("04_cityscapes", "real"),
    "table_fig4b_runtime_memory": ("03_runtime_memory", "real"),
    "table_fig5_convergence": ("05_convergence", "real"),
    "smoke/table_1_cifar10": ("01_cifar10", "smoke"),
    "smoke/table_2_imagenet": ("02_imagenet", "smoke"),
    "smoke/table_3_cityscapes": ("04_cityscapes", "smoke"),
    "smoke/table_fig4b_runtime_memory": ("03_runtime_memory", "smoke"),
    "smoke/table_fig5_convergence": ("05_convergence", "smoke"),
}


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=paths.ROOT, capture_output=True, text=True, check=True).stdout


def _committed_results(path: str, dest: Path) -> Path:
    """The logs and measurements (JSON, YAML, metrics.csv) under results/ at the commit that last wrote
    ``results/<path>.csv``, copied into ``dest/results``; returns that commit. Without git history the test
    skips, except under CI (a fresh clone has the history, so a git error there is a failure)."""
    try:
        commit = _git("log", "-1", "--format=%H", "--", f"results/{path}.csv").strip()
    except (OSError, subprocess.CalledProcessError) as err:
        skip_unless_ci(f"no git history for the committed tables ({err})")
    if not commit:
        skip_unless_ci(f"no commit has written results/{path}.csv")
    for rel in _git("ls-tree", "-r", "--name-only", commit, "results").splitlines():
        if rel.endswith((".json", ".yaml")) or rel.endswith("/metrics.csv"):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_git("show", f"{commit}:{rel}"))
    return commit


def _redraw(ctx, kind: str, name: str, numbers):
    if name.startswith("table_fig4b"):
        return tables.table_fig4b(ctx, kind, ctx.read(kind, notebook.RUNTIME_MEMORY), numbers,
                                  memory=ctx.read(kind, notebook.FIG4B_MEMORY))
    if name.startswith("table_fig5"):
        return tables.convergence_table(ctx, kind, ctx.read(kind, notebook.CONVERGENCE_TRACES), numbers)
    return tables.paper_table(ctx, kind, "table" + name.split("_")[1], numbers)


@pytest.mark.parametrize("path", list(COMMITTED_TABLES))
def test_logs_profile_redraws_the_committed_tables(path, tmp_path, monkeypatch):
    """Each committed results/table_*.csv comes out byte for byte from the logs and measurements committed
    beside it, so a change to the reporting code that changes a table cannot pass unnoticed. The results of
    the commit that last wrote the table are used: a campaign commits new logs before its tables are redrawn.
    The smoke tables come from the smoke run logs committed in results/smoke/runs/."""
    commit = _committed_results(path, tmp_path)
    monkeypatch.setattr(paths, "RESULTS", tmp_path / "results")
    name, (nb, kind) = path.split("/")[-1], COMMITTED_TABLES[path]
    ctx = notebook.Context(nb, "logs", False, tmp_path / "out")
    df = _redraw(ctx, kind, name, tables.paper_numbers(tmp_path / "results" / "paper_numbers.yaml"))
    written = notebook.save_table(df, name, ctx, kind)
    assert written.read_text() == _git("show", f"{commit}:results/{path}.csv")


# The same tables read without mdeq.paper.report or mdeq.engine.runlog: each "ours" is what the logs committed beside the
# table say, read here with csv and json alone, so a reporting bug that the byte-for-byte test above would
# carry into a regenerated table (after --update-committed or a new campaign commit) is still caught.

def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _reported_row(folder: Path) -> dict | None:
    """The metrics.csv row a table reports for one run: the last evaluation if the run wrote final.json
    (finished, or cut short by max_steps), else the last fully trained epoch (an unfinished run)."""
    rows = _csv_rows(folder / "metrics.csv") if (folder / "metrics.csv").is_file() else []
    if not (folder / "final.json").is_file():
        rows = [r for r in rows if r.get("partial") != "True"]
    return rows[-1] if rows else None


def _near(text: str, expected: float) -> bool:
    """``text`` (a CSV cell written with 4 significant digits) is ``expected`` to within half its last digit."""
    try:
        value = float(text)
    except ValueError:  # "", "not run yet", ...
        return False
    if expected == 0:
        return value == 0
    return abs(value - expected) <= 0.5 * 10 ** (math.floor(math.log10(abs(expected))) - 3) * (1 + 1e-9)


PAPER_TABLE_COLUMNS = {  # table: {metric text: (metrics.csv column, scale)}
    "table1": {"test accuracy (%)": ("eval_top1", 1.0)},
    "table2": {"top-1 accuracy (%)": ("eval_top1", 1.0), "top-5 accuracy (%)": ("eval_top5", 1.0)},
    "table3": {"mIoU (%)": ("eval_miou", 100.0)},
}


def _check_paper_table(table_csv: Path, key: str, runs_dir: Path, paper: dict, smoke: bool) -> list[str]:
    """Problems of one paper table (``key``: table1-3) against the run logs in ``runs_dir``."""
    problems = []
    ours_of = {}  # (setting, row) -> the run key whose logs the row reports
    for r in paper[key]["rows"]:
        setting = r.get("setting", "") if key == "table1" else ""
        if "ours" in r:
            ours_of[setting, r["row"]] = r["ours"]
        for run_key, variant in (r.get("ours_variants") or {}).items():  # more runs of the same paper row
            ours_of[setting, f"{r['row']}, {variant}"] = run_key
    for row in _csv_rows(table_csv):
        run_key = ours_of[row["setting"], row["row"]]
        folders = sorted(p for p in runs_dir.iterdir() if p.name == run_key
                         or re.fullmatch(re.escape(run_key) + r"_seed\d+", p.name)) if runs_dir.is_dir() else []
        column, scale = PAPER_TABLE_COLUMNS[key][row["metric"]]
        reported = [_reported_row(f) for f in folders]
        values = [float(r[column]) * scale for r in reported if r is not None and r.get(column)]
        where = f"{table_csv.name}: {row['setting']} {row['row']} / {row['metric']}"
        if not values:
            want = "no epoch evaluated yet" if folders else "not run yet"
            if row["ours"] != want:
                problems.append(f"{where}: ours {row['ours']!r}, the logs have no evaluation ({want!r})")
            continue
        mean = sum(values) / len(values)
        if not _near(row["ours"], mean):
            problems.append(f"{where}: ours {row['ours']}, the logs say {mean:.6g} ({len(values)} run(s))")
        finals = [json.loads((f / "final.json").read_text()) if (f / "final.json").is_file() else {} for f in folders]
        done = all(fj.get("final") is not None and fj.get("stopped_early") is False for fj in finals)
        if done and not smoke:
            if not _near(row["delta"], mean - float(row["paper"])):
                problems.append(f"{where}: delta {row['delta']!r}, expected ours - paper = "
                                f"{mean - float(row['paper']):.6g}")
        elif row["delta"] != "":
            problems.append(f"{where}: delta {row['delta']!r} for an unfinished run or a smoke run")
    return problems


def _fig4b_expected(results: Path) -> dict:
    """Fig. 4b's four numbers from the measurement JSONs: times from runtime_memory.json, the memory ratio from
    the live-tensor-bytes measurement where there is one (else the runtime measurement's peak RSS)."""
    m = json.loads((results / "runtime_memory.json").read_text())["models"]
    out = {"resnet101_ms_per_batch": m["resnet101"]["train_ms"],
           "mdeq_slowdown_vs_resnet101": m["mdeq"]["train_ms"] / m["resnet101"]["train_ms"],
           "mdeq_small_speedup_vs_anode": m["anode"]["train_ms"] / m["mdeq_small"]["train_ms"],
           "mdeq_train_memory_saving_vs_resnets":
               m["mdeq"]["peak_train_memory_mb"] / m["resnet101"]["peak_train_memory_mb"]}
    if (results / "fig4b_memory_cpu.json").is_file():
        live = json.loads((results / "fig4b_memory_cpu.json").read_text())["models"]
        out["mdeq_train_memory_saving_vs_resnets"] = live["mdeq"]["peak_bytes"] / live["resnet101"]["peak_bytes"]
    return out


def _fig5_expected(results: Path, threshold: float = 1e-2) -> dict:
    """(data set title, curve key) -> f evaluations until the curve's mean step first falls below 1e-2."""
    path = results / "convergence_traces.json"
    traces = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    titles = {"cifar10": "CIFAR-10", "imagenet": "ImageNet", "cityscapes": "Cityscapes"}
    out = {}
    for dataset, title in titles.items():
        entry = traces["datasets"].get(dataset) or {}
        if not entry.get("curves"):  # not measured, or only partly: one "not run yet" row
            out[title, "broyden_final"] = style.NOT_RUN
        for key, curve in entry.get("curves", {}).items():
            mean = curve["forward_step" if "forward_step" in curve else "forward"]["mean"]
            below = [i + 1 for i, v in enumerate(mean) if v is not None and v < threshold]
            out[title, key] = str(below[0]) if below else f"> {len(mean)} (not reached)"
    return out


def _inference_expected(table_csv: Path, results: Path) -> dict:
    """key -> "ours" of notebook 05's tables beyond the paper, from their JSONs (read without mdeq.paper.report): the
    top-1 (%) at each forward budget (accuracy_vs_budget.json), and the median image's f evaluations until
    ||z[i+1] - z[i]|| / ||z[i]|| < 1e-2 (convergence_vs_resolution.json; never reached counts as infinitely many)."""
    name = table_csv.stem[len("table_"):]
    path = results / f"{name}.json"
    if not path.is_file():
        return {"": style.NOT_RUN}
    measured = json.loads(path.read_text())
    out = {}
    if name == "accuracy_vs_budget":
        for run in measured["runs"].values():
            for solver, sr in run["result"]["solvers"].items():
                out.update({f"{solver}_{r['max_iter']}": r["top1"] for r in sr["rows"]})
            out["injection"] = run["result"]["injection_alone"]["top1"]
        return out
    budget = measured["result"]["budget"]
    for source, entry in measured["result"]["sources"].items():
        for size, cells in entry["sizes"].items():
            for solver, cell in cells.items():
                counts = sorted(math.inf if im["f_evals_to"]["0.01"] is None else im["f_evals_to"]["0.01"]
                                for im in cell["images"])
                n = len(counts)
                median = counts[n // 2] if n % 2 else (counts[n // 2 - 1] + counts[n // 2]) / 2
                out[f"{source}_{size}_{solver}"] = (str(int(median)) if math.isfinite(median)
                                                    else f"> {budget + 1} (not reached)")
    return out


def table_problems(table_csv: Path, results: Path, paper: dict, smoke: bool) -> list[str]:
    """Problems of the table ``table_csv`` (a results/table_*.csv) against the logs and measurements in
    ``results`` (its runs/ and JSONs); ``paper``: results/paper_numbers.yaml. Used by test_notebooks too."""
    name = table_csv.stem
    if name.startswith("table_fig4b"):
        rows = {r["key"]: r["ours"] for r in _csv_rows(table_csv)}
        if not (results / "runtime_memory.json").is_file():
            return [] if set(rows.values()) == {style.NOT_RUN} else [f"{name}: numbers without a measurement: {rows}"]
        expected = _fig4b_expected(results)
        return [f"{name}: {k}: ours {rows.get(k)!r}, the measurement says {v:.6g}" for k, v in expected.items()
                if k not in rows or not _near(rows[k], v)]
    if name.startswith("table_fig5"):
        rows = {(r["setting"], r["key"]): r["ours"] for r in _csv_rows(table_csv)}
        expected = _fig5_expected(results)
        return [] if rows == expected else [f"{name}: ours {rows}, the traces say {expected}"]
    if name in ("table_accuracy_vs_budget", "table_convergence_vs_resolution"):
        rows = {r.get("key") or "": r["ours"] for r in _csv_rows(table_csv)}
        expected = _inference_expected(table_csv, results)
        return [f"{name}: {k}: ours {rows.get(k)!r}, the JSON says {v!r}" for k, v in expected.items()
                if not (_near(rows.get(k, ""), v) if isinstance(v, float) else rows.get(k) == v)]
    return _check_paper_table(table_csv, "table" + name.split("_")[1], results / "runs", paper, smoke)


@pytest.mark.parametrize("path", list(COMMITTED_TABLES))
def test_committed_tables_say_what_their_logs_say(path, tmp_path):
    """Independent of the code that drew them: Tables 1-3's "ours" is the final (or, unfinished, the latest
    fully trained) epoch's evaluation in each run's metrics.csv, averaged over seeds, with a delta only for
    finished real runs; Fig. 4b's are the ratios of the measurement JSONs; Figs. 5-6's the first f evaluation
    whose mean step is below 1e-2. The logs are those of the commit that wrote the table, as above."""
    import yaml

    commit = _committed_results(path, tmp_path)
    smoke = path.startswith("smoke/")
    table_csv = tmp_path / "tables" / f"{path.split('/')[-1]}.csv"
    table_csv.parent.mkdir()
    table_csv.write_text(_git("show", f"{commit}:results/{path}.csv"))
    paper = yaml.safe_load((tmp_path / "results" / "paper_numbers.yaml").read_text())
    problems = table_problems(table_csv, tmp_path / "results" / ("smoke" if smoke else ""), paper, smoke)
    assert not problems, "\n".join(problems)


def test_show_table_keeps_few_columns_and_names_the_csv(tmp_path, monkeypatch):
    _fake_run(tmp_path / "runs", "cifar10_mdeq_small", 87.5)
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    df = tables.paper_table(_ctx(tmp_path), "real", "table1")
    shown = tables.show_table(df, "real", paths.RESULTS / "table_1_cifar10.csv")
    assert list(shown.data.columns) == ["setting", "row", "metric", "paper", "ours", "delta", style.BEST,
                                        "params (paper / ours)", "status"]
    assert shown.caption.endswith("results/table_1_cifar10.csv")
    row = shown.data.set_index("row").loc["MDEQ-small (ours)"]
    assert row["paper"] == "87.10 ± 0.40" and row["params (paper / ours)"] == "170K / 175K"
    assert row[style.BEST] == "87.50 (epoch 2)" and shown.data.set_index("row").loc["Neural ODEs [18]", style.BEST] == ""
    # the page names each setting once (a header row over its rows) and the metric once (above paper/ours/delta/best)
    page = shown._repr_html_()
    assert page.count("without data augmentation") == 1 and page.count("test accuracy (%)") == 1
    assert '<th colspan="7" class="setting" style="text-align: left">with data augmentation</th>' in page
    assert '<th colspan="4" class="metric">test accuracy (%)</th>' in page


def test_show_table_writes_a_row_name_once_over_its_metrics():
    df = pd.DataFrame({"table": "Table 2", "setting": "", "row": ["MDEQ-small", "MDEQ-small"],
                       "metric": ["top-1 (%)", "top-5 (%)"], "paper": [75.5, 92.7], "ours": [70.0, 90.0],
                       "delta": [-5.5, -2.7], "paper_params": 18e6, "ours_params": 18e6, "status": "1 run"})
    shown = tables.show_table(df, "real")
    assert list(shown.data.columns) == ["row", "metric", "paper", "ours", "delta", "params (paper / ours)", "status"]
    page = shown._repr_html_()
    assert page.count("MDEQ-small") == 1
    assert '<td class="rowname" style="text-align: left" rowspan="2">MDEQ-small</td>' in page
    assert 'class="row"' not in page  # Bootstrap's grid class: negative margins cut the names off in the book
    assert "top-1 (%)" in page and "top-5 (%)" in page and 'class="setting"' not in page


# ----------------------------------------------------------------------------------------------
# Figures.

def test_training_curves_average_seeds_and_name_unfinished_runs(tmp_path, monkeypatch):
    style.set_style()
    for k, acc in enumerate((86.0, 88.0)):
        _fake_run(tmp_path / "runs", f"cifar10_mdeq_small_seed{k}", acc)
    monkeypatch.setattr(notebook.Context, "inputs_dir", lambda self, kind: tmp_path)
    fig = plots.plot_training_curves(_ctx(tmp_path), "real", runs.runs_for("01_cifar10"), column="eval_top1",
                                      ylabel="acc", title="t")
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [50.0, 87.0]
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["MDEQ-small (2 runs)"]
    plt.close(fig)
    fig = plots.plot_training_curves(_ctx(tmp_path / "none"), "real", runs.runs_for("02_imagenet"),
                                      column="eval_top1", ylabel="acc", title="t")
    assert not fig.axes[0].get_lines() and style.NOT_RUN in fig.axes[0].texts[0].get_text()
    plt.close(fig)


def _fake_memory(ratio_mdeq: float) -> dict:
    mib = plots.MIB

    def entry(label, peak):
        return {"label": label, "peak_bytes": peak * mib, "state_bytes": 0.2 * peak * mib,
                "saved_bytes": 0.5 * peak * mib, "other_bytes": 0.3 * peak * mib}

    rows = {g: [{"max_iter": n, "peak_bytes": (100 if g == "implicit" else 50 * n) * mib} for n in (5, 10)]
            for g in ("implicit", "unrolled")}
    return {"batch_size": 32, "hardware": "CPU, 1 thread",
            "models": {"mdeq": entry("MDEQ", 1000 * ratio_mdeq), "mdeq_unrolled": entry("MDEQ", 3000),
                       "resnet101": entry("ResNet-101", 1000)},
            "curve": {"label": "MDEQ-small", "budgets": [5, 10], **rows}}


def test_training_memory_ratio_reaches_the_table_and_the_figure(tmp_path, numbers):
    style.set_style()
    memory = _fake_memory(0.3)
    assert tables.memory_ratios(memory) == pytest.approx({"mdeq": 0.3, "mdeq_unrolled": 3.0, "resnet101": 1.0})
    df = tables.table_fig4b(_ctx(tmp_path, "03_runtime_memory"), "real", None, numbers, memory=memory)
    row = df.set_index("key").loc["mdeq_train_memory_saving_vs_resnets"]
    assert row["ours"] == pytest.approx(0.3) and row["paper"] == 0.4 and "live tensor bytes" in row["ours_source"]
    assert (df.drop(index=df.index[df["key"] == row.name])["ours"] == style.NOT_RUN).all()  # no time measured
    fig = plots.plot_training_memory(memory, "real", numbers)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["0.30x", "3.00x", "1.00x"]
    assert [len(line.get_xdata()) for line in fig.axes[1].get_lines()] == [2, 2]
    plt.close(fig)
    empty = plots.plot_training_memory(None, "smoke", numbers)
    assert all(style.NOT_RUN in " ".join(t.get_text() for t in ax.texts) for ax in empty.axes)
    plt.close(empty)


def test_a_table_number_is_rounded_once_in_its_csv(tmp_path, numbers):
    """CI once read '1.113' for a measured ANODE / MDEQ-small of 1.11351: the table rounded to 4 decimals
    (1.1135, stored as 1.11349...) and the CSV to 4 significant digits again. The CSV must round once."""
    ctx = _ctx(tmp_path, "03_runtime_memory", profile="smoke")
    measure = {"batch_size": 2, "hardware": "CPU", "models": {
        "anode": {"train_ms": 111.351, "peak_train_memory_mb": 1.0},
        "mdeq_small": {"train_ms": 100.0, "peak_train_memory_mb": 1.0}}}
    df = tables.table_fig4b(ctx, "smoke", measure, numbers)
    path = notebook.save_table(df, "table_fig4b_runtime_memory", ctx, "smoke")
    with open(path, newline="") as fh:
        rows = {r["key"]: r["ours"] for r in csv.DictReader(fh)}
    assert rows["mdeq_small_speedup_vs_anode"] == "1.114"


def _trace(values):
    return {"mean": list(values), "std": [0.0] * len(values), "n_batches": 5}


def test_convergence_figures_plot_the_papers_measure_and_the_residual_with_one_legend(tmp_path):
    curve = lambda w: {"weights": w, "forward": _trace([1, 0.1, 0.01]), "forward_step": _trace([float("nan"), 0.2, 0.005])}  # noqa: E731
    traces = {"hardware": "CPU", "datasets": {"cifar10": {
        "config": "cifar10_small_paper", "input_hw": [32, 32], "batch": 32, "data": "CIFAR-10",
        "curves": {"broyden_init": curve("initial weights"),
                   "broyden_final": curve("trained, epoch 4 of 50, step 1800")}}},
        "per_scale": {"mdeq": {"weights": "initial weights", "channels": [8, 16],
                               "scales": [_trace([1, 0.1])] * 2, "scales_step": [_trace([0.5, 0.1])] * 2}}}
    fig = plots.plot_convergence(traces, "real", direction="forward")
    axes = fig.axes
    assert len(axes) == 6 and axes[0].get_ylabel() == "||z[i+1] - z[i]|| / ||z[i]||"
    assert axes[3].get_ylabel() == "||f(z) - z|| / ||f(z)||"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(labels) == ["Broyden, initial weights", "Broyden, trained, epoch 4 of 50, step 1800"]
    assert all(ax.get_legend() is None for ax in axes)  # one shared legend, none per panel
    assert "not run yet" in " ".join(t.get_text() for t in axes[1].texts)  # ImageNet: nothing measured
    residual_only = {**traces, "datasets": {"cifar10": {**traces["datasets"]["cifar10"], "curves": {
        "broyden_init": {"forward": _trace([1, 0.1])}}}}}
    assert len(plots.plot_convergence(residual_only, "real").axes) == 3  # older traces: the residual row only
    fig7 = plots.plot_per_scale(traces, "real")
    assert len(fig7.axes) == 2 and "MDEQ-small scale 1 (8 ch.), initial weights" in [
        t.get_text() for t in fig7.legends[0].get_texts()]
    df = tables.convergence_table(_ctx(tmp_path, "05_convergence"), "real", traces)
    row = df[df.key == "broyden_final"].iloc[0]
    assert row["ours"] == 3 and "||z[i+1] - z[i]||" in row["metric"] and row["last_step_change"] == 0.005
    assert row["f_evals_to_0.001"] == "> 3 (not reached)"
    assert row["row"] == "Broyden, trained, epoch 4 of 50, step 1800"


def test_a_band_stops_where_a_batch_solve_diverged():
    fig, ax = plt.subplots()
    stats = {"mean": [1.0, 0.5, 9.0], "std": [0.0] * 3, "n_batches": 5, "count": [5, 5, 2]}
    plots._band(ax, stats, "iterating f", "#000000", "-")
    line, cross = ax.get_lines()
    assert list(line.get_xdata()) == [1, 2] and line.get_label() == "iterating f"
    assert list(cross.get_xdata()) == [2] and cross.get_marker() == "x" and cross.get_label().startswith("_")


def test_the_equilibrium_figure_draws_each_measurement_and_says_when_there_is_none():
    def mode(res, end, radius=None, share=None):
        out = {"lowest_rel_residual_at_training_budget": res, "lowest_rel_residual_at_budget": end}
        if radius is not None:
            out.update(spectral_radius_mean=radius, spectral_radius_max=radius + 0.5,
                       per_sample={"share_below_1e-4_at_end": share})
        return out

    steps = [(0, 174), (12, 4725), (34, 13649)]  # (epoch, global step): 391 steps an epoch
    row = lambda e, g, **m: {"global_step": g, "epoch": e, "step_in_epoch": g - 391 * e,  # noqa: E731
                             "train_mode": mode(**m)}
    over = {"training_budget_f_evals": 16, "budget": 50, "memory": 12,
            "rows": [row(e, g, res=1e-3 * (i + 1), end=1e-5) for i, (e, g) in enumerate(steps)]}
    longs = {label: {"budget": 200, "batch": 128, "num_batches": 1,
                     "rows": [row(e, g, res=1e-3, end=end, radius=1.1 + i, share=share)
                              for i, (e, g) in enumerate(steps)]}
             for label, end, share in (("m = 12", 4e-4, 0.75), ("m = 40", 2e-7, 1.0))}
    fig = beyond.plot_equilibrium_over_training(over, longs, limit=0.01)
    left, middle, right = fig.axes
    assert [line.get_label() for line in left.lines] == [
        "at 16 f evaluations (the training solve)", "after 50 (m = 12)", "after up to 200, m = 12",
        "after up to 200, m = 40", "the campaign's limit (0.01)"]
    assert list(left.lines[0].get_xdata()) == pytest.approx([174 / 391, 4725 / 391, 13649 / 391])
    assert list(left.lines[3].get_ydata()) == [2e-7] * 3
    assert list(middle.lines[0].get_ydata()) == [1.1, 2.1, 3.1]  # the mean, drawn once (the same z* for every m)
    assert list(middle.lines[1].get_ydata()) == [1.6, 2.6, 3.6]
    assert [list(line.get_ydata()) for line in right.lines] == [[75.0] * 3, [100.0] * 3]
    plt.close(fig)
    empty = beyond.plot_equilibrium_over_training(None, {"m = 12": None})
    assert all("not run yet" in " ".join(t.get_text() for t in ax.texts) for ax in empty.axes)
    plt.close(empty)


def _line_figure(shift: float):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.semilogy([1, 2, 3, 4], [1.0, 1e-3 * (1 + shift), 1e-7, 1e-11], label="residual")
    ax.legend()
    return fig


def test_a_figure_is_rewritten_only_when_its_drawing_changes(tmp_path):
    """The tutorial's live float64 traces differ in their last bits from one CPU to another: such a figure keeps
    its committed bytes (git status stays clean), while a visible change rewrites both files."""
    from mdeq.paper.report import figure_files

    first = figure_files.write_figure(_line_figure(0.0), tmp_path, "f")
    committed = {ext: p.read_bytes() for ext, p in first.items()}

    def svg_of(fig):
        with plt.rc_context({"svg.hashsalt": "probe"}):
            fig.savefig(tmp_path / "probe.svg", format="svg", metadata={"Date": None})
        return (tmp_path / "probe.svg").read_text()

    tiny, visible = _line_figure(1e-5), _line_figure(0.05)  # 4e-5 points on this axis; 0.2 points
    assert svg_of(tiny) != svg_of(_line_figure(0.0))  # the last digits do reach the SVG text ...
    figure_files.write_figure(tiny, tmp_path, "f")
    assert {ext: p.read_bytes() for ext, p in first.items()} == committed  # ... and the files stay as they were
    figure_files.write_figure(visible, tmp_path, "f")
    now = {ext: p.read_bytes() for ext, p in first.items()}
    assert now["svg"] != committed["svg"] and now["png"] != committed["png"]
    (tmp_path / "f.png").unlink()  # a missing PNG is drawn again even when the SVG is the same drawing
    figure_files.write_figure(visible, tmp_path, "f")
    assert (tmp_path / "f.png").read_bytes() == now["png"]


def test_same_drawing_compares_text_exactly_and_numbers_within_the_tolerance():
    from mdeq.paper.report.figure_files import TOLERANCE, same_drawing

    old = '<path d="M 52.350078 202.315291 L 364.830078 46" id="m952ad3820a"/><text>1e-05</text>'
    assert same_drawing(old, old.replace("202.315291", "202.315294"))
    assert same_drawing(old, old.replace("46", f"{46 + TOLERANCE / 2}"))
    assert not same_drawing(old, old.replace("46", f"{46 + 2 * TOLERANCE}"))
    assert not same_drawing(old, old.replace("1e-05", "1e-06"))  # a tick label is text, compared exactly
    assert not same_drawing(old, old.replace("m952ad3820a", "m952ad3821a"))
    assert not same_drawing(old, old.replace("<text>", "<text x='1'>"))
    assert not same_drawing(old, old + "<path/>")
