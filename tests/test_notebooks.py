"""The notebooks (the tutorial 00 and the five paper notebooks): paired sources in sync, each runs under
papermill (smoke quick, logs, full dry run) with this interpreter's kernel, and bad parameters fail loudly.
The book is built and read in tests/test_book.py.

Outputs of these runs go to a temporary ``output_root`` (quick smoke checkpoints and synthetic data
to the ignored ``runs/``), so the tests never touch the committed results/ and figures/.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import importorskip
from mdeq.paper import notebook, parameters
from mdeq.paper.report import style
from mdeq.engine import paths
from mdeq import reproduce

papermill = importorskip("papermill")
jupytext = importorskip("jupytext")

NOTEBOOKS = list(parameters.NOTEBOOKS)
PAPER_NOTEBOOKS = [n for n in NOTEBOOKS if n != parameters.TUTORIAL]  # 00 has a test of its own below
SKIP_TAGS = {"injected-parameters", "papermill-error-cell-tag"}


def _inputs(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells if not SKIP_TAGS & set(c.metadata.get("tags", []))]


def _run(name, tmp_path, **parameters):
    out = tmp_path / f"{name}.ipynb"
    parameters.setdefault("output_root", str(tmp_path / "out"))
    seconds = reproduce.execute_notebook(name, out, parameters, timeout=600)
    return out, seconds


def _stream_text(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_py_and_ipynb_in_sync(name):
    py, ipynb = paths.NOTEBOOKS / f"{name}.py", paths.NOTEBOOKS / f"{name}.ipynb"
    assert py.is_file() and ipynb.is_file()
    assert _inputs(jupytext.read(py)) == _inputs(jupytext.read(ipynb)), (
        f"{ipynb.name} differs from {py.name}: run `jupytext --to ipynb --update notebooks/{py.name}`")
    tags = [c.metadata.get("tags", []) for c in jupytext.read(ipynb).cells]
    assert ["parameters"] in tags and not any(SKIP_TAGS & set(t) for t in tags), "stray papermill cells"


# One notebook's smoke run in the default test run (the quickest, 04); the other four are marked slow
# (`python -m pytest -m slow`, which CI runs too) to keep the default run under 3 minutes.
@pytest.mark.parametrize("name", [n if n == "04_cityscapes" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PAPER_NOTEBOOKS])
def test_smoke_quick(name, tmp_path):
    """The notebook's tables and figures are written, and each table's "ours" is what this run's own logs
    and measurements say (read without mdeq.paper.report: tests/test_report.py's ``table_problems``)."""
    import numpy as np
    import yaml
    from PIL import Image

    from test_report import table_problems

    out, seconds = _run(name, tmp_path, profile="smoke", quick=True)
    figures = tmp_path / "out" / "figures" / "smoke"
    owned = sorted(n for n, nb in notebook.FIGURE_OWNERS.items() if nb == name)
    assert sorted({p.stem for p in figures.glob("*.png")}) == owned
    for png in figures.glob("*.png"):  # a drawn figure, not an empty canvas
        with Image.open(png) as im:
            assert min(im.size) > 100 and len(np.unique(np.asarray(im.convert("L")))) > 10, png.name
    results = tmp_path / "out" / "results" / "smoke"
    tables = sorted(results.glob("table_*.csv"))
    assert [p.stem for p in tables] == sorted(n for n, nb in notebook.TABLE_OWNERS.items() if nb == name)
    paper = yaml.safe_load((paths.RESULTS / "paper_numbers.yaml").read_text())
    problems = [p for table in tables for p in table_problems(table, results, paper, smoke=True)]
    assert not problems, "\n".join(problems)
    numbers = [row for table in tables for row in _csv(table) if row["ours"] not in ("", style.NOT_RUN)]
    assert numbers, "the smoke run put no number of its own into its tables"
    assert not list((tmp_path / "out" / "figures").glob("*.png")), "a smoke run wrote a real figure"
    print(f"{name} smoke quick: {seconds:.1f} s")


def _csv(path):
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# The logs profile of 01 (Table 1 and Fig. 4a from the committed campaign runs) in the default run; the
# other four redraw from committed results too but cost a kernel start each (~9 s), so they are slow.
@pytest.mark.parametrize("name", [n if n == "01_cifar10" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in PAPER_NOTEBOOKS])
def test_logs_profile(name, tmp_path):
    t0 = time.perf_counter()
    out, seconds = _run(name, tmp_path, profile="logs")
    real = tmp_path / "out" / "results"
    assert sorted(p.stem for p in real.glob("table_*.csv")) == sorted(
        n for n, nb in notebook.TABLE_OWNERS.items() if nb == name)
    assert sorted({p.stem for p in (tmp_path / "out" / "figures").glob("*.png")}) == sorted(
        n for n, nb in notebook.FIGURE_OWNERS.items() if nb == name)
    assert seconds < 60, f"the logs profile of {name} took {seconds:.0f} s"
    print(f"{name} logs: {seconds:.1f} s ({time.perf_counter() - t0:.1f} s with the kernel)")


# The tutorial (00) trains nothing and computes the same in every profile, and its own asserts check every
# number its text claims (the gradient errors, the saved bytes, Broyden against iterating f), so a finished
# run is the check. Smoke (the committed profile) in the default run, 9-14 s with the kernel start on 2 cores;
# logs and full compute the same and write the figures into figures/ instead of figures/smoke/, so they are slow.
@pytest.mark.parametrize("profile", ["smoke", pytest.param("logs", marks=pytest.mark.slow),
                                     pytest.param("full", marks=pytest.mark.slow)])
def test_tutorial_runs_and_passes_its_own_checks(profile, tmp_path):
    name = parameters.TUTORIAL
    out, seconds = _run(name, tmp_path, profile=profile)
    figures = tmp_path / "out" / "figures"
    written = sorted(p.relative_to(figures).with_suffix("").as_posix() for p in figures.rglob("*.png"))
    folder = "smoke/" if profile == "smoke" else ""
    assert written == sorted(folder + n for n, nb in notebook.FIGURE_OWNERS.items() if nb == name)
    assert not list((tmp_path / "out").rglob("*.csv")), "the tutorial writes no table"
    text = _stream_text(out)
    assert "IFT: relative error" in text and "this page computed in" in text
    print(f"{name} {profile}: {seconds:.1f} s")


# The default run executes each notebook once per profile; the second dry run and two of the three bad-parameter
# runs repeat a kernel start for checks that tests/test_notebook.py also makes without one, so they are slow.
@pytest.mark.parametrize("name", [pytest.param("01_cifar10", marks=pytest.mark.slow), "04_cityscapes"])
def test_full_profile_dry_run_prints_the_launches(name, tmp_path):
    out, _ = _run(name, tmp_path, profile="full", dry_run=True, nproc=4, data_root="/datasets")
    text = _stream_text(out)
    assert "dry-run" in text and "torch.distributed.run --standalone --nproc_per_node 4 -m mdeq.train" in text
    assert "--data-root /datasets/" in text


@pytest.mark.parametrize("parameters, message", [
    pytest.param({"profile": "ful"}, "must be one of ['smoke', 'logs', 'full']", marks=pytest.mark.slow),
    ({"profil": "logs"}, "unknown parameter(s) 'profil'"),
    pytest.param({"quick": "yes"}, "must be of type bool", marks=pytest.mark.slow),
])
def test_bad_parameters_fail_loudly(parameters, message, tmp_path):
    import nbformat

    out = tmp_path / "bad.ipynb"
    with reproduce.kernel_for_this_python() as kernel:
        with pytest.raises(papermill.PapermillExecutionError) as exc:
            papermill.execute_notebook(str(paths.NOTEBOOKS / "04_cityscapes.ipynb"), str(out), parameters=parameters,
                                       kernel_name=kernel, cwd=str(paths.ROOT), progress_bar=False)
    assert exc.value.ename == "ParameterError" and message in exc.value.evalue
    nb = nbformat.read(out, as_version=4)
    assert not any(o.get("output_type") == "display_data" for c in nb.cells for o in c.get("outputs", []))


def test_reproduce_cli_rejects_bad_combinations():
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "logs", "--quick"])
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "smoke", "--quick", "--update-committed"])
    with pytest.raises(SystemExit):
        reproduce.main(["--profile", "nope"])
    with pytest.raises(ValueError, match="unknown parameter"):
        reproduce.execute_notebook("01_cifar10", Path("/nonexistent/x.ipynb"), {"profil": "logs"})


def test_a_stopped_notebook_ends_with_one_line_that_says_what_to_do(tmp_path, capfd):
    """The full profile without its data: mdeq.reproduce prints the cell's error in one line (papermill's report
    is a long traceback), and the kernel, on IPC sockets, prints no "running over TCP without encryption"."""
    rc = reproduce.main(["--profile", "full", "--only", "02_imagenet", "--data-root", str(tmp_path / "none"),
                         "--no-book", "--out", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert rc == 1 and out.splitlines() == ["== 02_imagenet (full) {'profile': 'full', 'data_root': '%s'}"
                                            % (tmp_path / "none")]
    assert err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: notebooks/02_imagenet.ipynb stopped: MissingDataError: imagenet is not at "
                          f"{tmp_path / 'none' / 'imagenet'} (the data directory does not exist): put it there")
    assert err.rstrip().endswith(f"(the whole error: {tmp_path / 'out' / '02_imagenet.ipynb'})")
    assert "without encryption" not in out + err


def test_failure_line_is_the_cells_error_in_one_line():
    from papermill.exceptions import PapermillExecutionError

    err = PapermillExecutionError(3, 3, "params = ...", "ParameterError",
                                  "parameter 'profile' must be one of ['smoke', 'logs', 'full'], got 'smok'; "
                                  "did you mean 'smoke'?", ["long", "traceback"])
    line = reproduce._failure_line("01_cifar10", err, paths.RUNS / "reproduce" / "full" / "01_cifar10.ipynb")
    assert line == ("error: notebooks/01_cifar10.ipynb stopped: ParameterError: parameter 'profile' must be one of "
                    "['smoke', 'logs', 'full'], got 'smok'; did you mean 'smoke'? "
                    "(the whole error: runs/reproduce/full/01_cifar10.ipynb)")


@pytest.mark.slow
def test_readme_main_command_leaves_git_status_clean(tmp_path):
    """`python -m mdeq.reproduce --profile smoke` (here one notebook and the book) on a fresh copy of the
    repository writes only ignored files: the committed results/smoke/ and figures/smoke/ stay as they are."""
    import shutil
    import subprocess
    import sys

    def git(*args, cwd):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout

    repo = tmp_path / "clone"
    for rel in git("ls-files", "-co", "--exclude-standard", cwd=paths.ROOT).splitlines():
        src = paths.ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy", cwd=repo)
    proc = subprocess.run([sys.executable, "-m", "mdeq.reproduce", "--profile", "smoke", "--only", "04_cityscapes"],
                          cwd=repo, capture_output=True, text=True, env={**__import__("os").environ,
                                                                         "PYTHONPATH": str(repo)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (repo / "runs" / "notebooks" / "smoke_outputs" / "results" / "smoke" / "table_3_cityscapes.csv").is_file()
    assert git("status", "--porcelain", cwd=repo) == ""


@pytest.mark.slow
def test_logs_profile_and_full_dry_run_leave_git_status_clean(tmp_path):
    """On a fresh copy of the repository, redrawing everything from the committed logs and a dry run of the full
    profile rewrite only what they find unchanged: tables, figures, the manifest and the README stay as
    committed (issue 26)."""
    import shutil
    import subprocess
    import sys

    def git(*args, cwd):
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout

    repo = tmp_path / "clone"
    for rel in git("ls-files", "-c", cwd=paths.ROOT).splitlines():  # the committed files only
        src = paths.ROOT / rel
        if src.is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    for rel in git("diff", "--name-only", "HEAD", cwd=paths.ROOT).splitlines():  # as HEAD holds them
        blob = subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=paths.ROOT, capture_output=True, check=False)
        if blob.returncode == 0 and (repo / rel).exists():
            (repo / rel).write_bytes(blob.stdout)
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy", cwd=repo)
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}
    for argv in (["--profile", "logs", "--no-book"],
                 ["--profile", "full", "--dry-run", "--no-book", "--data-root", str(tmp_path / "no_data")]):
        proc = subprocess.run([sys.executable, "-m", "mdeq.reproduce", *argv], cwd=repo, capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert git("status", "--porcelain", cwd=repo) == "", f"{argv}: {git('status', '--porcelain', cwd=repo)}"
