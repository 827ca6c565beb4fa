"""mdeq.paper.notebook: parameters, where a run reads and writes, saving outputs, and the profile steps.

The notebooks themselves run in tests/test_notebooks.py; everything here is fast (no training).
"""
from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import pytest
import torch

from conftest import importorskip
from mdeq.paper import notebook, parameters
from mdeq.paper.report import style
from mdeq.engine import paths

# ----------------------------------------------------------------------------------------------
# Parameters.

def _ns(name, injected=None, **values):
    ns = {param: default for param, (_, default) in parameters.PARAMETERS[name].items()}
    ns.update(values)
    if injected is not None:
        ns["In"] = ["", "profile: str = 'smoke'", "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in injected.items())]
        ns.update(injected)
    return ns


def test_check_parameters_accepts_the_defaults():
    for nb in parameters.NOTEBOOKS:
        params = parameters.check_parameters(_ns(nb), nb)
        assert params.profile == "logs" and params.quick is False  # the committed notebooks show the real results


@pytest.mark.parametrize("bad, message", [
    ({"profile": "Full"}, "must be one of"),
    ({"profile": "logs", "quick": True}, "quick=True only applies"),
    ({"quick": "yes"}, "must be of type bool"),
    ({"seed": 1.5}, "must be of type int"),
    ({"seeds": 0}, "must be >= 1"),
    ({"variant": "papr"}, "did you mean 'paper'"),
])
def test_check_parameters_rejects_bad_values(bad, message):
    with pytest.raises(parameters.ParameterError, match=re.escape(message)):
        parameters.check_parameters(_ns("01_cifar10", **bad), "01_cifar10")


def test_check_parameters_rejects_an_unknown_injected_parameter():
    ns = _ns("04_cityscapes", injected={"profil": "logs"})
    with pytest.raises(parameters.ParameterError, match="unknown parameter.*'profil'.*did you mean 'profile'"):
        parameters.check_parameters(ns, "04_cityscapes")


def test_notebook_parameter_cells_declare_exactly_the_listed_parameters():
    pm = importorskip("papermill")
    for nb in parameters.NOTEBOOKS:
        declared = pm.inspect_notebook(str(paths.NOTEBOOKS / f"{nb}.ipynb"))
        spec = parameters.PARAMETERS[nb]
        assert list(declared) == list(spec), nb
        for name, (tp, default) in spec.items():
            assert declared[name]["inferred_type_name"] == tp.__name__, (nb, name)
            assert eval(declared[name]["default"]) == default, (nb, name)  # noqa: S307 (literals)


# ----------------------------------------------------------------------------------------------
# Outputs: who writes what, and where.

def _notebook_sources():
    return {nb: (paths.NOTEBOOKS / f"{nb}.py").read_text() for nb in parameters.NOTEBOOKS}


def test_each_figure_and_table_is_written_by_exactly_one_notebook():
    sources = _notebook_sources()
    for owners in (notebook.FIGURE_OWNERS, notebook.TABLE_OWNERS):
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
            assert name in notebook.FIGURE_OWNERS, f"{f} is written by no notebook (notebook.FIGURE_OWNERS)"
            assert f.suffix in (".png", ".svg", ".json"), f
            assert f.stat().st_size < 450_000, f"{f} is {f.stat().st_size} bytes"  # 6 panels at 200 dpi: ~350 KB
            if f.suffix == ".json":
                meta = json.loads(f.read_text())
                assert meta["notebook"] == f"notebooks/{notebook.FIGURE_OWNERS[name]}.ipynb"
                assert (folder.name == "smoke") == (meta["kind"] == "smoke")
                if meta["kind"] == "smoke":
                    assert style.SMOKE_NOTE in meta["caption"].lower()
    for folder in (paths.RESULTS, paths.RESULTS / "smoke"):
        for f in folder.glob("table_*.csv"):
            assert f.stem in notebook.TABLE_OWNERS, f"{f} is written by no notebook (notebook.TABLE_OWNERS)"


def test_save_figure_checks_the_owner_and_labels_smoke(tmp_path):
    style.set_style()
    ctx = notebook.Context("05_convergence", "smoke", False, tmp_path)
    fig, ax = plt.subplots()
    ax.plot([1, 2])
    with pytest.raises(ValueError, match="belongs to '01_cifar10'"):
        notebook.save_figure(fig, "fig4a_cifar10_accuracy", ctx, "smoke", caption="x", source="y")
    out = notebook.save_figure(fig, "fig7_per_scale_convergence", ctx, "smoke", caption="A caption", source="here")
    plt.close(fig)
    assert out["png"] == tmp_path / "figures" / "smoke" / "fig7_per_scale_convergence.png"
    assert out["svg"].is_file() and out["png"].stat().st_size < 300_000
    meta = json.loads(out["json"].read_text())
    assert meta["caption"].startswith("Smoke run, not a reproduction") and "notebooks/05_convergence.ipynb" in meta["caption"]
    assert b"Date" not in out["svg"].read_bytes()[:2000]  # deterministic SVG


def test_context_keeps_smoke_and_quick_away_from_real_results(tmp_path):
    real = notebook.Context("01_cifar10", "logs")
    assert real.results_dir("real") == paths.RESULTS and real.figures_dir("real") == paths.FIGURES
    assert real.results_dir("smoke") == paths.RESULTS / "smoke" and real.kinds() == ("real",)  # no toy number on a page of results
    smoke = notebook.Context("01_cifar10", "smoke")
    assert smoke.kinds() == ("smoke",) and paths.RUNS in smoke.results_dir("smoke").parents  # never committed files
    assert paths.RUNS in smoke.figures_dir("smoke").parents and smoke.inputs_dir("smoke") == smoke.results_dir("smoke")
    committed = notebook.Context("01_cifar10", "smoke", False, paths.ROOT)  # --update-committed
    assert committed.results_dir("smoke") == paths.RESULTS / "smoke"
    full = notebook.Context("01_cifar10", "full", False, tmp_path)  # output_root: read where it writes
    assert full.inputs_dir("real") == full.results_dir("real") == tmp_path / "results"
    assert notebook.Context("01_cifar10", "logs", False, tmp_path).inputs_dir("real") == paths.RESULTS
    quick = notebook.Context("01_cifar10", "smoke", True)
    assert paths.RUNS in quick.results_dir("smoke").parents and paths.RUNS in quick.figures_dir("smoke").parents
    assert notebook.Context("01_cifar10", "full").kinds() == ("real",)


# ----------------------------------------------------------------------------------------------
# Process-wide state and the profile steps.

def test_setup_leaves_the_thread_count_and_smoke_steps_restore_it(tmp_path, monkeypatch):
    """report.setup used to set one thread for the rest of the kernel; now only the smoke computation runs so."""
    outer = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        params = parameters.check_parameters({"profile": "smoke", "output_root": str(tmp_path)}, "05_convergence")
        ctx = notebook.setup(params)
        assert torch.get_num_threads() == 2
        seen = []
        monkeypatch.setattr(notebook.solver_traces, "convergence_traces",
                            lambda **kw: seen.append(torch.get_num_threads()) or {"kw": kw})
        notebook.convergence(ctx)
        assert seen == [1] and torch.get_num_threads() == 2
        written = json.loads((tmp_path / "results" / "smoke" / notebook.CONVERGENCE_TRACES).read_text())
        assert written["kw"]["profile"] == "smoke" and written["kw"]["device"] == "cpu"
    finally:
        torch.set_num_threads(outer)


def test_logs_profile_steps_compute_nothing(monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("the logs profile computed something")

    for module, name in ((notebook.runs, "train_smoke"), (notebook.runs, "run_full"),
                         (notebook.runtime, "measure_runtime"), (notebook.solver_traces, "convergence_traces"),
                         (notebook.examples, "cityscapes_examples")):
        monkeypatch.setattr(module, name, forbidden)
    for nb, steps in (("01_cifar10", [notebook.train]), ("03_runtime_memory", [notebook.runtime_memory]),
                      ("04_cityscapes", [notebook.train, notebook.segmentation_examples]),
                      ("05_convergence", [notebook.convergence])):
        ctx = notebook.setup(parameters.check_parameters({"profile": "logs"}, nb))
        for step in steps:
            step(ctx)
    assert capsys.readouterr().out.count("logs profile: nothing is") == 4


def test_full_profile_dry_runs_say_what_they_would_do(capsys):
    for nb, step in (("03_runtime_memory", notebook.runtime_memory), ("05_convergence", notebook.convergence)):
        ctx = notebook.setup(parameters.check_parameters({"profile": "full", "dry_run": True}, nb))
        step(ctx)
    out = capsys.readouterr().out
    assert "would measure MDEQ, MDEQ-small, ResNet-18, ResNet-101, ANODE at batch 32" in out
    assert "would trace cityscapes_small_paper on 5 batches of 1 x (1024, 2048)" in out
    ctx = notebook.setup(parameters.check_parameters(
        {"profile": "full", "dry_run": True, "nproc": 4, "seeds": 2, "data_root": "/datasets"}, "01_cifar10"))
    notebook.train(ctx)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("data missing: the commands below would stop at once. cifar10 is not at /datasets")
    lines = [line for line in lines if line.startswith("dry-run")]
    assert len(lines) == 8 * 2 and all(line.startswith("dry-run  cifar10_") for line in lines)
    assert "--nproc_per_node 4 -m mdeq.train" in lines[0] and "--data-root /datasets/cifar10" in lines[0]


def test_full_profile_banner_names_missing_data_before_the_gpus_and_never_a_cpu(monkeypatch, tmp_path):
    from mdeq.paper import runs

    monkeypatch.setattr(runs, "visible_gpus", lambda: 0)
    ctx = notebook.setup(parameters.check_parameters(
        {"profile": "full", "dry_run": True, "data_root": str(tmp_path)}, "01_cifar10"))
    text = notebook.banner(ctx)
    assert "CPU" not in text and "on this machine, so this dry run only prints the commands" in text
    assert text.index(f"Data: cifar10 is not at {tmp_path / 'cifar10'} (the data directory does not exist)") \
        < text.index("GPUs: none is visible")
    text = notebook.banner(notebook.setup(parameters.check_parameters({"profile": "full"}, "03_runtime_memory")))
    assert "CPU" not in text and "Data:" not in text and "nothing can be trained or measured here" in text


def test_notebooks_call_one_step_per_profile_and_build_no_internal_paths():
    """The profile branching and the run folders live in the package, not in the notebooks."""
    for nb, src in _notebook_sources().items():
        body = src.split('# %% tags=["parameters"]', 1)[1]
        assert "if profile" not in body and "reproduce." not in body, nb
        assert "runs/notebooks" not in body and "SMOKE_RUNS" not in body and "FULL_RUNS" not in body, nb
        assert "parameters.check_parameters(globals()" in body and "notebook.setup(params)" in body, nb


def test_a_measurement_json_is_written_whole_and_keeps_nan(tmp_path):
    """``notebook.write_json``: the folder made, no temporary file left, a diverged trace's NaN kept as NaN."""
    out = notebook.write_json(tmp_path / "new" / "traces.json", {"rel": [0.5, float("nan")], "dtype": torch.float32})
    back = json.loads(out.read_text())
    assert back["dtype"] == "torch.float32" and back["rel"][0] == 0.5 and back["rel"][1] != back["rel"][1]
    assert [f.name for f in out.parent.iterdir()] == ["traces.json"]
