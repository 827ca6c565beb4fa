"""How every notebook is run and the book is built, in one command: ``python -m mdeq.reproduce``.

Why a module: each notebook is run by papermill into ``runs/reproduce/<profile>/`` with this
interpreter's kernel, and the book (``book/``, Jupyter Book 1.x, warnings are errors) is built from
those executed notebooks. What a notebook computes in each profile is in ``mdeq.paper.notebook``; this module
only passes the parameters::

    python -m mdeq.reproduce --profile smoke            # every notebook on CPU, a few minutes each
    python -m mdeq.reproduce --profile smoke --quick    # the CI version (about a minute each)
    python -m mdeq.reproduce --profile logs             # redraw everything from results/ in seconds
    python -m mdeq.reproduce --profile full --data-root /data --dry-run   # print the GPU launches
    python -m mdeq.reproduce --only 04_cityscapes       # one notebook
    python -m mdeq.reproduce --book-only                # the book of the committed notebooks: runs/reproduce/committed/
    python -m mdeq.reproduce --status                   # each committed table and figure: fresh or stale
    python -m mdeq.reproduce --profile logs --stale-only   # redraw only the notebooks with stale outputs
    python -m mdeq.reproduce --readme                   # README.md's results table, results/table_1_standing.md
    python -m mdeq.reproduce --profile logs --update-committed    # notebooks/*.ipynb: the real results
    python -m mdeq.reproduce --profile smoke --update-committed   # results/smoke/, figures/smoke/: the smoke copy
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import nbformat

from mdeq.engine import paths
from mdeq.paper import manifest, trained
from mdeq.paper.parameters import NOTEBOOKS, PARAMETERS, PROFILES
from mdeq.paper.report import readme, standing

__all__ = ["kernel_for_this_python", "strip_execution_metadata", "normalize_ipynb", "execute_notebook", "build_book",
           "main"]

REPRODUCE = paths.RUNS / "reproduce"  # executed notebooks and the book of `python -m mdeq.reproduce`
BOOK = paths.ROOT / "book"


@contextlib.contextmanager
def kernel_for_this_python():
    """Make the ``python3`` kernel spec resolve to ``sys.executable`` (this venv), whatever else is installed.

    Why: a ``python3`` spec in the user's Jupyter folder may point at another interpreter; papermill
    would then run the notebooks without ``mdeq``. A spec folder in ``JUPYTER_PATH`` wins over those.
    """
    with tempfile.TemporaryDirectory(prefix="mdeq-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (mdeq)", "language": "python"}))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp + (os.pathsep + old if old else "")
        try:
            yield "python3"
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def strip_execution_metadata(path: Path) -> None:
    """Drop papermill's timings and per-cell execution metadata, so that a re-run gives a small diff."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def normalize_ipynb(src: Path, dest: Path | None = None, *, drop_injected: bool = False) -> Path:
    """Write ``src`` as JupyterLab would save it: papermill's empty ``tags`` lists dropped, nbformat's layout.

    Why: the committed ``.ipynb`` must not change when a user opens and saves it unchanged.
    ``drop_injected`` removes papermill's injected-parameters cell (the committed notebooks show the
    default parameters).
    """
    nb = nbformat.read(src, as_version=4)
    if drop_injected:
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
    dest = Path(dest) if dest is not None else Path(src)
    nbformat.write(nb, dest)
    return dest


def execute_notebook(name: str, out: Path, parameters: dict | None = None, *, timeout: int = 3600,
                     log_output: bool = False) -> float:
    """Run ``notebooks/<name>.ipynb`` with papermill into ``out``; returns the wall time in seconds."""
    # Imported here: papermill (the notebooks extra) is needed only to execute, not to build the book or test.
    import papermill as pm

    parameters = dict(parameters or {})
    unknown = sorted(set(parameters) - set(PARAMETERS[name]))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {name}; valid: {list(PARAMETERS[name])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with kernel_for_this_python() as kernel, tempfile.TemporaryDirectory(prefix="mdeq-ipc-") as sockets:
        pm.execute_notebook(str(paths.NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters,
                            kernel_name=kernel, cwd=str(paths.ROOT), progress_bar=False, log_output=log_output,
                            execution_timeout=timeout, **_kernel_transport(Path(sockets)))
    return time.perf_counter() - t0


def _kernel_transport(folder: Path) -> dict:
    """papermill's kernel manager settings: the kernel's sockets as Unix-domain files in the private ``folder``.

    Why: over TCP, jupyter_client's default, ipykernel warns at every start that the "Kernel is running over TCP
    without encryption" (any local user could connect to its ports); sockets in a folder only we can read need no
    encryption, and the kernel prints nothing. Where zmq has no IPC transport (older Windows), TCP stays.
    """
    import zmq
    from traitlets.config import Config

    if not zmq.has("ipc"):
        return {}
    return {"config": Config({"KernelManager": {"transport": "ipc", "ip": str(folder / "kernel")}})}


def _failure_line(name: str, err: BaseException, executed: Path) -> str:
    """A notebook that stopped, in one line: the cell's error (its type and its message's first line, which says
    what to do) and where the whole traceback is; papermill's own report is a long traceback."""
    ename, evalue = getattr(err, "ename", type(err).__name__), str(getattr(err, "evalue", err))
    first = next((ln.strip() for ln in evalue.splitlines() if ln.strip()), "")
    return f"error: notebooks/{name}.ipynb stopped: {ename}: {first} (the whole error: {paths.rel(executed)})"


def build_book(notebooks_dir: Path, out: Path, *, strict: bool = True, roots: Sequence[Path] = ()) -> Path:
    """Stage ``book/`` with the executed notebooks of ``notebooks_dir`` under ``out`` and build it with
    Jupyter Book 1.x (no execution, warnings are errors). Returns the HTML folder.

    The files that the notebooks' captions link to (``../results/...``, ``../figures/...``) are looked up
    under ``roots`` (the run's output root), then the repository, and shipped beside the pages."""
    stage = Path(out) / "book_src"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "book" / "notebooks").mkdir(parents=True)
    for src in [BOOK / "_config.yml", BOOK / "_toc.yml", *sorted(BOOK.glob("*.md"))]:
        shutil.copyfile(src, stage / "book" / src.name)
    shutil.copytree(BOOK / "_static", stage / "book" / "_static")  # outputs.css: long output lines wrap
    # intro.md includes ../README.md; the README's docs/NAME.md links are the book's NAME.md pages
    (stage / "README.md").write_text(readme.for_book((paths.ROOT / "README.md").read_text()))
    (stage / "docs").mkdir()
    for src in sorted((paths.ROOT / "docs").glob("*.md")):  # the book's pages include these
        shutil.copyfile(src, stage / "docs" / src.name)
    (stage / "results").mkdir()  # the parts of pages that scripts and --readme write (docs/*.md include them)
    for src in sorted(paths.RESULTS.glob("*.md")):
        shutil.copyfile(src, stage / "results" / src.name)
    missing = [n for n in NOTEBOOKS if not (Path(notebooks_dir) / f"{n}.ipynb").is_file()]
    if missing:
        raise FileNotFoundError(f"{notebooks_dir} lacks the executed notebooks {missing}")
    for n in NOTEBOOKS:
        shutil.copyfile(Path(notebooks_dir) / f"{n}.ipynb", stage / "book" / "notebooks" / f"{n}.ipynb")
    _stage_linked_files(stage / "book", [*roots, paths.ROOT])
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(stage / "book"), "--path-output", str(out)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the book build failed ({shlex.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return Path(out) / "_build" / "html"


_LINK = re.compile(r"\]\(\.\./((?:results|figures)/[^)\s#]+)\)")


def _stage_linked_files(book: Path, roots: Sequence[Path]) -> None:
    """Copy each file a notebook's Markdown output links to into ``book/_extra/`` (Sphinx's
    ``html_extra_path``), so ``notebooks/X.html`` finds ``../results/...`` in the HTML folder as the committed
    notebook finds it in the repository. A link to no file is an error that names it."""
    extra = book / "_extra"
    extra.mkdir(exist_ok=True)
    missing = []
    for nb in sorted((book / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        texts = ["".join(out.get("data", {}).get("text/markdown", "")) for c in cells for out in c.get("outputs", [])]
        for target in sorted({m for text in texts for m in _LINK.findall(text)}):
            found = next((Path(r) / target for r in roots if (Path(r) / target).is_file()), None)
            if found is None:
                missing.append(f"notebooks/{nb.name} links to {target}")
                continue
            (extra / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(found, extra / target)
    if missing:
        raise FileNotFoundError("a caption links to a file under none of " + ", ".join(map(paths.rel, roots))
                                + ": " + "; ".join(missing))


def _write_quoted() -> None:
    """The files the README and the pages quote from the committed results: the README's results table, where the
    Table 1 runs stand (``mdeq.paper.report.standing``) and the committed checkpoints (``mdeq.paper.trained``)."""
    print(f"README.md: results table {'rewritten' if readme.write() else 'already up to date'}")
    print(f"{paths.rel(standing.STANDING)}: {'rewritten' if standing.write() else 'already up to date'}")
    changed = trained.write_checkpoint_table()
    print(f"{paths.rel(trained.CHECKPOINT_TABLE)}: {'rewritten' if changed else 'already up to date'}")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdeq.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="smoke", choices=PROFILES)
    p.add_argument("--quick", action="store_true", help="smoke only: the short version the tests run")
    p.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=None, metavar="NOTEBOOK",
                   help=f"run only these notebooks ({', '.join(NOTEBOOKS)})")
    p.add_argument("--data-root", default="", help="full: folder holding cifar10/, imagenet/ and cityscapes/ "
                   "(default data/)")
    p.add_argument("--variant", default="paper", choices=("paper", "official"))
    p.add_argument("--nproc", type=int, default=0, help="full: GPUs per run (0: all visible)")
    p.add_argument("--dry-run", action="store_true", help="full: print the training commands, launch nothing")
    p.add_argument("--out", default=None, help="folder for the executed notebooks and the book "
                   "(default runs/reproduce/<profile>[-quick])")
    p.add_argument("--no-book", action="store_true", help="do not build the book")
    p.add_argument("--book-only", action="store_true", help="only build the book from the committed notebooks")
    p.add_argument("--status", action="store_true", help="list every committed table and figure as fresh or stale "
                   "(from results/manifest.json's hashes; runs nothing); exit 1 if any is stale")
    p.add_argument("--stale-only", action="store_true", help="logs: run only the notebooks that own a stale "
                   "table or figure (see --status)")
    p.add_argument("--readme", action="store_true", help="only rewrite README.md's results table from "
                   "results/table_*.csv and results/table_1_standing.md from results/runs/ (the logs profile does "
                   "both at its end)")
    p.add_argument("--update-committed", "--update-notebooks", dest="update_committed", action="store_true",
                   help="logs: write the executed notebooks into notebooks/ (what JupyterLab and the book open); "
                        "smoke (default parameters): write the committed smoke copy (results/smoke/, figures/smoke/)")
    args = p.parse_args(argv)
    if args.quick and args.profile != "smoke":
        p.error("--quick applies to the smoke profile only")
    if args.update_committed and (args.profile == "full" or args.quick or (args.only and args.profile == "smoke")):
        p.error("--update-committed writes the committed notebooks (--profile logs) or the committed smoke copy "
                "(--profile smoke, every notebook, without --quick)")
    if args.stale_only and args.profile != "logs":
        p.error("--stale-only redraws the committed outputs from results/: only with --profile logs")
    if args.status:
        found = manifest.status()
        print(manifest.format_status(found))
        return 1 if any(not f.fresh for f in found) else 0
    label = args.profile + ("-quick" if args.quick else "")
    if args.book_only:  # the committed notebooks, whatever --profile says
        label = "committed"
    out = Path(args.out) if args.out else REPRODUCE / label
    if args.readme:
        _write_quoted()
        return 0
    if args.book_only:
        html = build_book(paths.NOTEBOOKS, out)
        print(f"book: {html / 'index.html'}")
        return 0
    names = args.only or list(NOTEBOOKS)
    if args.stale_only:
        names = [n for n in manifest.stale_notebooks(manifest.status()) if n in names]
        print(f"stale tables or figures are drawn by: {', '.join(names) or 'no notebook (all fresh)'}", flush=True)
        if not names:
            _write_quoted()
            return 0
    times = {}
    for name in names:
        spec = PARAMETERS[name]
        params: dict[str, Any] = {"profile": args.profile}
        if args.quick:
            params["quick"] = True
        if args.profile == "full":
            for key, value in (("data_root", args.data_root), ("variant", args.variant), ("nproc", args.nproc),
                               ("dry_run", args.dry_run)):
                if key in spec:
                    params[key] = value
        params = {k: v for k, v in params.items() if v != spec[k][1]}  # defaults: no injected cell
        if args.update_committed and args.profile == "smoke":
            params["output_root"] = str(paths.ROOT)  # results/smoke/ and figures/smoke/ of the repository
        print(f"== {name} ({label})" + (f" {params}" if params else ""), flush=True)
        try:
            times[name] = execute_notebook(name, out / f"{name}.ipynb", params)
        except Exception as exc:  # a cell raised (bad parameters, missing data): one line, not papermill's traceback
            stopped = sys.modules.get("papermill.exceptions")
            if stopped is None or not isinstance(exc, stopped.PapermillExecutionError):
                raise
            print(_failure_line(name, exc, out / f"{name}.ipynb"), file=sys.stderr, flush=True)
            return 1
        strip_execution_metadata(out / f"{name}.ipynb")
        print(f"   {times[name]:.1f} s -> {out / f'{name}.ipynb'}", flush=True)
    (out / "timings.json").write_text(json.dumps({"profile": label, "seconds": times}, indent=1) + "\n")
    if args.update_committed and args.profile == "logs":  # the default profile: no injected cell to drop
        for name in names:
            normalize_ipynb(out / f"{name}.ipynb", paths.NOTEBOOKS / f"{name}.ipynb", drop_injected=True)
        print(f"updated notebooks/{{{','.join(names)}}}.ipynb with the executed logs profile")
    elif args.update_committed:
        print("updated results/smoke/ and figures/smoke/ with the executed smoke run")
    if args.profile == "logs":  # the README's table from the tables this run redrew, before the book shows it
        _write_quoted()
    if not args.no_book:
        if set(names) != set(NOTEBOOKS):
            for n in NOTEBOOKS:  # the book needs every notebook: take the committed ones for the others
                if not (out / f"{n}.ipynb").is_file():
                    shutil.copyfile(paths.NOTEBOOKS / f"{n}.ipynb", out / f"{n}.ipynb")
        from mdeq.paper.notebook import Context  # where this run's captions' linked outputs are

        smoke_committed = args.update_committed and args.profile == "smoke"
        run_root = Context(names[0], args.profile, quick=args.quick,
                           output_root=paths.ROOT if smoke_committed else None).root()
        html = build_book(out, out, roots=[run_root])
        print(f"book: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
