"""What each committed output was made from (``mdeq.paper.manifest``): the committed tables and figures are fresh,
a changed log makes exactly the outputs drawn from it stale, and ``--stale-only`` redraws just their notebook.

The redraw test runs notebook 01's logs profile in this process (its cells in order, the parameters after the
tagged cell, a drawing step per cell, as papermill and the kernel would), with ``mdeq.engine.paths`` pointed at a
copy of results/: no test touches the committed files, and none pays a kernel start.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import importorskip
from mdeq import reproduce
from mdeq.engine import paths
from mdeq.paper import manifest, notebook


def test_committed_tables_and_figures_are_fresh():
    """A commit of new logs (or of drawing code) without a redraw fails here, naming the command that redraws."""
    found = manifest.status()
    assert {f.output.split(".")[0] for f in found} >= {f"figures/{p.stem}" for p in paths.FIGURES.glob("*.png")}
    stale = [f for f in found if not f.fresh]
    assert not stale, (f"{len(stale)} committed tables and figures no longer match what they were drawn from; run "
                       f"`{manifest.REDRAW}` and commit what it changes:\n"
                       + "\n".join(f"{f.output} ({f.notebook}): {'; '.join(f.reasons)}" for f in stale))


def test_committed_manifest_holds_no_machine_paths():
    """Keys are repository paths (an absolute path would make the manifest differ from machine to machine)."""
    data = json.loads((paths.RESULTS / manifest.MANIFEST).read_text())
    for key, entry in data["outputs"].items():
        assert not os.path.isabs(key) and "output_root" not in entry["parameters"], key
        absolute = [name for name in entry["inputs"] if os.path.isabs(name)]
        assert not absolute and entry["source"] in data["sources"], (key, absolute)


def test_inputs_are_the_reads_of_the_drawing_step(tmp_path):
    """Reads since the step began; a second output of the same kind shares them, another kind starts afresh."""
    results = tmp_path / "results"
    (results / "runs" / "a").mkdir(parents=True)
    a, b, c = (results / "runs" / "a" / "metrics.csv", results / "b.json", results / "c.json")
    for f in (a, b, c, tmp_path / "elsewhere.txt"):
        f.write_text(f.name)
    rec = manifest.Recorder(tmp_path, (results,))
    a.read_text()
    (tmp_path / "elsewhere.txt").read_text()  # not under a watched folder
    (results / "written.csv").write_text("x")  # a write is not a read
    assert rec.take("real") == [(str(a), False)]
    assert rec.take("real") == [(str(a), False)]  # the next figure of the same loop: the same inputs
    b.read_bytes()
    assert rec.take("real") == [(str(a), False), (str(b), False)]  # a table after them: what all of them read
    c.read_text()
    assert rec.take("smoke") == [(str(c), False)]  # the other kind, later in the same loop
    assert rec.take("real") == []  # back to real with nothing read since
    manifest.new_step()  # a new cell
    sorted(os.listdir(results / "runs"))
    a.read_text()
    assert rec.take("real") == [(str(results / "runs"), True), (str(a), False)]


def _record_table(rec: manifest.Recorder, root, name="table_1_cifar10") -> dict:
    out = root / "results" / f"{name}.csv"
    out.write_text("paper,ours,delta,ours_source\n")
    return manifest.record(rec, f"results/{name}", [out], "real", notebook="01_cifar10",
                           parameters={"profile": "logs"})


def test_status_names_what_changed(tmp_path):
    root = tmp_path
    log = root / "results" / "runs" / "cifar10_x" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,eval_top1\n0,10\n")
    rec = manifest.Recorder(root, (root / "results",))
    os.listdir(root / "results" / "runs")
    log.read_text()
    rec.note(root / "results" / "later.json")  # looked for, absent (what Context.read notes)
    entry = _record_table(rec, root)
    assert entry["inputs"] == {"results/later.json": None, "results/runs/": ["cifar10_x"],
                               "results/runs/cifar10_x/metrics.csv": manifest._sha(log)}
    made = manifest.made_from(entry, "results/manifest.json", "commit abc")
    assert "`results/runs/cifar10_x/metrics.csv`" in made and "`results/later.json` (absent)" in made
    linked = manifest.made_from(entry, "results/manifest.json", "commit abc", link="../")
    assert "[`results/runs/cifar10_x/metrics.csv`](../results/runs/cifar10_x/metrics.csv)" in linked
    assert "`results/later.json` (absent)" in linked and "[`results/later.json`]" not in linked  # nothing to open
    assert linked.endswith("(sha256 of each input: [`results/manifest.json`](../results/manifest.json)).")
    (root / "figures").mkdir()
    (root / "figures" / "fig4a_cifar10_accuracy.png").write_bytes(b"png")  # drawn before manifests existed

    def reasons():
        return {f.output: f.reasons for f in manifest.status(root)}

    assert reasons() == {"results/table_1_cifar10.csv": (), "figures/fig4a_cifar10_accuracy.{png,svg,json}":
                         ("no manifest",)}
    log.write_text("epoch,eval_top1\n0,11\n")
    (root / "results" / "runs" / "cifar10_y").mkdir()
    (root / "results" / "later.json").write_text("{}")
    assert reasons()["results/table_1_cifar10.csv"] == (
        "input appeared: results/later.json", "input folder changed: results/runs/ (cifar10_y added)",
        "input changed: results/runs/cifar10_x/metrics.csv")
    entry = _record_table(rec, root)  # redrawn in the same step: the same reads, hashed anew
    assert entry["inputs"]["results/runs/"] == ["cifar10_x", "cifar10_y"]
    assert reasons()["results/table_1_cifar10.csv"] == ()
    (root / "results" / "table_1_cifar10.csv").write_text("edited by hand\n")
    data = json.loads((root / "results" / manifest.MANIFEST).read_text())
    modules = data["sources"][data["outputs"]["results/table_1_cifar10"]["source"]]
    assert "mdeq/paper/manifest.py" in modules and "notebooks/01_cifar10.py" in modules
    modules["mdeq/paper/manifest.py"] = "0" * 64  # as if the module had been edited since
    (root / "results" / manifest.MANIFEST).write_text(json.dumps(data))
    assert reasons()["results/table_1_cifar10.csv"] == (
        "results/table_1_cifar10.csv differs from what was drawn (edited, or redrawn without a manifest)",
        "package source changed: mdeq/paper/manifest.py")
    assert manifest.stale_notebooks(manifest.status(root)) == ["01_cifar10"]


def _run_in_this_process(ran: list):
    """``reproduce.execute_notebook``'s stand-in: the notebook's .py cells run here, in order."""
    jupytext = importorskip("jupytext")
    import matplotlib.pyplot as plt

    def execute(name, out, parameters=None, **_):
        ran.append(name)
        nb = jupytext.read(paths.NOTEBOOKS / f"{name}.py")
        namespace = {"__name__": "__main__"}
        for cell in nb.cells:
            if cell.cell_type == "code":
                manifest.new_step()  # what the kernel's pre_run_cell callback does
                exec(compile(cell.source, f"notebooks/{name}.py", "exec"), namespace)
                if "parameters" in cell.metadata.get("tags", []):
                    namespace.update(parameters or {})
        plt.close("all")
        out.parent.mkdir(parents=True, exist_ok=True)
        jupytext.write(nb, out, fmt="ipynb")
        return 0.0

    return execute


def test_status_and_stale_only_redraw_exactly_what_a_changed_log_feeds(tmp_path, monkeypatch, capsys):
    root = tmp_path / "repo"
    shutil.copytree(paths.RESULTS, root / "results",  # the logs; no table or manifest: 01 draws its own below
                    ignore=shutil.ignore_patterns("checkpoint.pt", "steps.jsonl", "table_*.csv", manifest.MANIFEST))
    for name, value in (("ROOT", root), ("RESULTS", root / "results"), ("FIGURES", root / "figures")):
        monkeypatch.setattr(paths, name, value)
    ran = []
    monkeypatch.setattr(reproduce, "execute_notebook", _run_in_this_process(ran))
    # the logs profile ends by rewriting README.md's table and the files the pages include: not in a test
    monkeypatch.setattr(reproduce, "_write_quoted", lambda: None)
    logs = ["--profile", "logs", "--no-book", "--out", str(tmp_path / "executed")]

    assert reproduce.main([*logs, "--only", "01_cifar10"]) == 0 and ran == ["01_cifar10"]
    found = manifest.status()
    owned = {f"results/{n}" for n, nb in notebook.TABLE_OWNERS.items() if nb == "01_cifar10"} | {
        f"figures/{n}" for n, nb in notebook.FIGURE_OWNERS.items() if nb == "01_cifar10"}
    assert {f.output.split(".")[0] for f in found if f.checked} == owned  # the logs profile draws no smoke copy
    assert all(f.fresh for f in found), [f for f in found if not f.fresh]
    before = {p: p.read_bytes() for p in [*root.glob("figures/**/*.*"), *root.glob("results/**/table_*.csv")]}

    log = root / "results" / "runs" / "cifar10_resnet18_170k" / "final.json"
    final = json.loads(log.read_text())
    final["final"] = final["final_eval"]["top1"] = 50.0
    log.write_text(json.dumps(final, indent=2) + "\n")
    capsys.readouterr()
    assert reproduce.main(["--status"]) == 1
    printed = capsys.readouterr().out
    stale = {f.output: f.reasons for f in manifest.status() if not f.fresh}
    assert stale == dict.fromkeys(["figures/fig4a_cifar10_accuracy.{png,svg,json}", "results/table_1_cifar10.csv",
                                   "figures/table1_training_and_solver.{png,svg,json}"],
                                  ("input changed: results/runs/cifar10_resnet18_170k/final.json",))
    assert printed.count("STALE") == 3 and manifest.REDRAW in printed

    ran.clear()
    assert reproduce.main([*logs, "--stale-only"]) == 0 and ran == ["01_cifar10"]
    assert all(f.fresh for f in manifest.status())
    changed = {p.relative_to(root).as_posix() for p, data in before.items() if p.read_bytes() != data}
    assert "results/table_1_cifar10.csv" in changed  # 50.00 now
    assert {c.split(".")[0] for c in changed} <= {s.split(".")[0] for s in stale}, changed
    ran.clear()
    assert reproduce.main([*logs, "--stale-only"]) == 0 and ran == []
    assert "no notebook (all fresh)" in capsys.readouterr().out


def test_stale_only_is_for_the_logs_profile():
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "smoke", "--stale-only"])
