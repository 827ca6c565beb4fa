"""What each committed output was made from, and is it still fresh?

Why: a committed table or figure is drawn by a notebook from the logs beside it (``results/``) with the package's
code; when a log or the code moves on and nobody redraws, the figure goes on telling an older story than the
files next to it. So every table and figure a notebook saves (``mdeq.paper.notebook.save_figure``,
``save_table``) is recorded in one file beside the outputs, ``<root>/results/manifest.json``
(``results/manifest.json`` for the committed ones; keyed by output path, sorted, no dates, so that a redraw
that changes nothing leaves it as it was). Each output's entry holds:

- ``notebook`` and ``parameters`` (the profile and whatever differs from the notebook's defaults; not
  ``output_root``, which only says where the outputs went), and the ``kind`` drawn (real or smoke);
- ``files``: the sha256 of each file of the output (a figure's PNG, SVG and caption JSON; a table's CSV);
- ``inputs``: each file the drawing read, relative to the root, with its sha256 (null: looked for, absent), and
  each folder it listed (``results/runs/``: the names in it, so that a new run folder is noticed);
- ``source``: the sha256 of the source the drawing ran: the ``mdeq`` modules imported when the output was saved
  and the notebook's ``.py``; each such hash's per-file hashes are listed once, under ``sources``.

How inputs are known: an audit hook (PEP 578) sees every file the process opens for reading and every folder it
lists, whoever reads it (``runlog``, pandas, PIL, yaml), and hands those under the watched results folders to
each live ``Recorder`` (one per ``notebook.Context``). An output's inputs are what was read since its drawing
step began: a step begins with each notebook cell (``new_step``, an IPython ``pre_run_cell`` callback) and
whenever the kind of the saved output changes, so that a smoke figure drawn after the real one in the same
loop does not list the real logs, while a table saved after two figures of the same loop lists what all
three read. A file looked for but absent (``Context.read``) is noted by the caller, since nothing opens it.

``status`` reads hashes only, never a notebook: an output is fresh when its files, its inputs and its source
are as recorded, and otherwise it says what changed. ``python -m mdeq.reproduce --status`` prints it, and
``--profile logs --stale-only`` re-executes just the notebooks that own stale outputs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import weakref
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Mapping, Sequence

from mdeq.engine import paths
from mdeq.engine.runlog import git_commit, git_dirty, write_text_atomic

__all__ = ["MANIFEST", "REDRAW", "Recorder", "new_step", "watch_cells", "record", "made_from", "commit_label",
           "Freshness", "status", "stale_notebooks", "format_status"]

MANIFEST = "manifest.json"  # in <root>/results/
REDRAW = "python -m mdeq.reproduce --profile logs --stale-only"  # what makes stale committed outputs fresh
_CODE = Path(__file__).resolve().parents[2]  # the checkout holding mdeq/ and notebooks/: source keys are under it
_ABOUT = ("What each table and figure was drawn from (mdeq/paper/manifest.py): check with "
          "`python -m mdeq.reproduce --status`, redraw the stale ones with `" + REDRAW + "`.")
_WRITES = os.O_WRONLY | os.O_RDWR

# The recorders that are listening. The audit hook is process-wide and cannot be removed (PEP 578), so it is
# installed once, at import, and does nothing unless a Context (which owns its Recorder) is alive.
_LISTENING: weakref.WeakSet = weakref.WeakSet()


@dataclass(eq=False)
class Recorder:
    """The files and folders one notebook run read under ``watched``, in order, and where each drawing step began.

    ``root`` is the run's output root (the folder holding its results/ and figures/): recorded paths are
    relative to it where they lie inside it, absolute elsewhere.
    """

    root: Path
    watched: tuple[str, ...]
    reads: list = field(default_factory=list)  # (absolute path, listed folder?)
    _start: int = 0  # where the current output's step began in ``reads``
    _mark: int = 0  # ``len(reads)`` at the last save
    _kind: str | None = None  # the kind of the last save in this step
    _quiet: int = 0

    def __post_init__(self):
        self.root = Path(self.root).resolve()
        self.watched = tuple(sorted({os.path.abspath(str(w)) for w in self.watched}))
        _LISTENING.add(self)

    def note(self, path: str | Path, folder: bool = False) -> None:
        """Count ``path`` as read (``folder``: listed) if it lies under a watched folder."""
        p = os.path.abspath(os.fspath(path))
        if self._quiet or os.path.basename(p) == MANIFEST:
            return
        if any(p == w or p.startswith(w + os.sep) for w in self.watched):
            self.reads.append((p, folder))

    def new_step(self) -> None:
        self.reads.clear()
        self._start = self._mark = 0
        self._kind = None

    def take(self, kind: str) -> list[tuple[str, bool]]:
        """The reads behind an output of ``kind`` saved now: those since its step began (see the module's doc)."""
        if kind != self._kind:
            self._start, self._kind = self._mark, kind
        self._mark = len(self.reads)
        return list(dict.fromkeys(self.reads[self._start:]))


def new_step(*_info) -> None:
    """A drawing step begins (a notebook cell): what was read before is nobody's input any more."""
    for rec in list(_LISTENING):
        rec.new_step()


def watch_cells() -> None:
    """In a notebook kernel, begin a drawing step with each cell (once per kernel); elsewhere do nothing."""
    try:  # IPython is there in a notebook (the notebooks extra), not necessarily elsewhere
        from IPython import get_ipython
    except ImportError:  # pragma: no cover
        return
    ip = get_ipython()
    if ip is not None and new_step not in ip.events.callbacks["pre_run_cell"]:
        ip.events.register("pre_run_cell", new_step)


def _audit(event: str, args: tuple) -> None:
    if not _LISTENING or event not in ("open", "os.listdir", "os.scandir"):
        return
    try:
        if event == "open":
            path, _, flags = args
            if isinstance(path, int) or (flags is not None and flags & _WRITES):
                return
        else:
            path = args[0]
            if path is None or isinstance(path, int):
                return
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        for rec in list(_LISTENING):
            rec.note(path, folder=event != "open")
    except Exception:  # noqa: BLE001 - a hook must never break the open it watches
        pass


sys.addaudithook(_audit)


@contextlib.contextmanager
def _quiet():
    """Our own reads (the manifest, the hashes) are nobody's inputs."""
    recs = list(_LISTENING)
    for rec in recs:
        rec._quiet += 1
    try:
        yield
    finally:
        for rec in recs:
            rec._quiet -= 1


# ----------------------------------------------------------------------------------------------
# Hashes and keys.

def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state(path: Path, folder: bool = False):
    """What a recorded input is now: a folder's sorted names, a file's sha256, "a folder" or None (absent)."""
    if folder:
        return sorted(os.listdir(path)) if path.is_dir() else None
    if path.is_file():
        return _sha(path)
    return "a folder" if path.exists() else None


def _key(path: str | Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _source(notebook: str) -> dict[str, str]:
    """sha256 of each ``mdeq`` module imported now and of the notebook's paired ``.py``, by path under the checkout."""
    files = {_CODE / "notebooks" / f"{notebook}.py"}
    for name, module in list(sys.modules.items()):
        if name == "mdeq" or name.startswith("mdeq."):
            file = getattr(module, "__file__", None)
            if file and file.endswith(".py"):
                files.add(Path(file).resolve())
    out = {}
    for f in sorted(files):
        key = _key(f, _CODE)
        if f.is_file() and not Path(key).is_absolute():
            out[key] = _sha(f)
    return out


def _combined(modules: Mapping[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(modules.items())).encode()).hexdigest()


def _load(path: Path) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    return {"about": _ABOUT, "outputs": data.get("outputs", {}), "sources": data.get("sources", {})}


# ----------------------------------------------------------------------------------------------
# Recording an output.

def record(rec: Recorder, key: str, files: Sequence[Path], kind: str, *, notebook: str,
           parameters: Mapping, write: bool = True) -> dict:
    """Write the manifest entry of the output ``key`` (its path without suffix, relative to ``rec.root``) that was
    just saved as ``files``, and return it. Its inputs are the reads of its drawing step (``Recorder.take``).
    ``write=False`` (a dry run, which only shows what it would launch) returns the entry and writes nothing."""
    reads = rec.take(kind)
    with _quiet():
        inputs = {}
        for path, folder in reads:
            inputs[_key(path, rec.root) + ("/" if folder else "")] = _state(Path(path), folder)
        source = _source(notebook)
        entry = {"notebook": f"notebooks/{notebook}.ipynb", "parameters": dict(parameters), "kind": kind,
                 "files": {Path(f).suffix.lstrip("."): _sha(Path(f)) for f in files},
                 "inputs": dict(sorted(inputs.items())), "source": _combined(source)}
        path = rec.root / "results" / MANIFEST
        data = _load(path)
        old = data["outputs"].get(key)
        if old is not None and {k: v for k, v in old.items() if k != "parameters"} == \
                {k: v for k, v in entry.items() if k != "parameters"}:
            entry = old  # the same bytes from the same inputs and code: only the redraw's parameters differ
        if not write:
            return entry
        data["outputs"][key] = entry
        data["outputs"] = {k: e for k, e in data["outputs"].items()  # an output no notebook writes any more: gone
                           if any((rec.root / f"{k}.{ext}").exists() for ext in e["files"])}
        data["sources"][entry["source"]] = source
        used = {e["source"] for e in data["outputs"].values()}
        data["sources"] = {k: v for k, v in data["sources"].items() if k in used}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")
    return entry


def link_to(path: str, link: str | None, text: str | None = None) -> str:
    """A repository path as a caption names it: a Markdown link ``link + path`` (``link`` is the way from the page
    to the repository root, e.g. ``"../"`` from notebooks/), or just the name where there is no way (``link``
    None, or an absolute path outside the run's root)."""
    if link is None or PurePosixPath(path).is_absolute():
        return f"`{path}`" if text is None else text
    return f"[{text or f'`{path}`'}]({link}{path})"


def made_from(entry: Mapping, manifest: str, commit: str, *, link: str | None = None) -> str:
    """The caption's last sentence: the entry's inputs as repository paths and the commit. Files are grouped by
    folder, and folders that hold the same files by their parent (the run folders of a table).

    With ``link`` (the way from where the caption is shown to the repository root, e.g. ``"../"`` for a
    notebook in notebooks/), each file inside the run's root is a Markdown link: JupyterLab opens it, and the book
    (``mdeq.reproduce.build_book``) ships the linked files beside its pages."""
    def ref(path: str, text: str | None = None) -> str:
        return link_to(path, link, text)

    folders: dict[str, list[str]] = {}
    parts = []  # (path, text), in path order
    for key, value in entry["inputs"].items():
        if key.endswith("/"):
            parts.append((key, f"the list of `{key}`"))
        elif value is None:
            parts.append((key, f"`{key}` (absent)"))
        else:
            head, _, name = key.rpartition("/")
            folders.setdefault(head, []).append(name)
    same: dict[tuple, list[str]] = {}  # (parent, files) -> folders holding exactly those files
    for head, names in folders.items():
        parent, _, name = head.rpartition("/")
        same.setdefault((parent, tuple(names)), []).append(name)
    for (parent, names), heads in same.items():
        if len(heads) > 1:
            if link is None:
                listed = ", ".join(heads) + f" (each: {', '.join(names)})"
            else:
                listed = ", ".join(f"{h} ({', '.join(ref(f'{parent}/{h}/{n}', n) for n in names)})" for h in heads)
            parts.append((parent + "/", f"`{parent}/` {listed}"))
            continue
        head = f"{parent}/{heads[0]}" if parent else heads[0]
        if len(names) == 1:
            text = ref(f"{head}/{names[0]}")
        else:
            files = ", ".join(names) if link is None else ", ".join(ref(f"{head}/{n}", n) for n in names)
            text = f"`{head}/` ({files})"
        parts.append((head + "/", text))
    inputs = "; ".join(text for _, text in sorted(parts)) or "no file under results/"
    return f"Made from {inputs}; at {commit} (sha256 of each input: {ref(manifest)})."


def commit_label(root: Path = _CODE) -> str:
    """"commit 401778e2f0" and whether mdeq/ or notebooks/ differ from it, for a caption."""
    commit = git_commit(root)
    if commit == "unknown":
        return "an unknown commit (no git checkout)"
    dirty = git_dirty(root, ("mdeq", "notebooks"))
    return f"commit {commit[:10]}" + (" with uncommitted changes in mdeq/ or notebooks/" if dirty else "")


# ----------------------------------------------------------------------------------------------
# Is it still fresh?

@dataclass(frozen=True)
class Freshness:
    """One committed output: ``reasons`` says what changed since it was drawn (empty: fresh).

    ``checked`` is False for the smoke profile's committed copy (results/smoke/, figures/smoke/), which only
    ``--profile smoke --update-committed`` redraws (the logs profile shows real results only): listed, never stale.
    """

    output: str  # results/table_1_cifar10.csv, figures/fig4a_cifar10_accuracy.{png,svg,json}
    notebook: str  # the notebook that owns it, e.g. 01_cifar10
    reasons: tuple[str, ...]
    checked: bool = True

    @property
    def fresh(self) -> bool:
        return not self.reasons


def _changes(key: str, entry: Mapping, root: Path, sources: Mapping, now: dict) -> list[str]:
    reasons = []
    for ext, sha in entry["files"].items():
        state = _state(root / f"{key}.{ext}")
        if state != sha:
            reasons.append(f"{key}.{ext} " + ("is gone" if state is None else "differs from what was drawn (edited, "
                                                                               "or redrawn without a manifest)"))
    for name, was in entry["inputs"].items():
        folder = name.endswith("/")
        path = Path(name) if Path(name).is_absolute() else root / name
        state = _state(path, folder)
        if state == was:
            continue
        if folder and was is not None and state is not None:
            added, gone = sorted(set(state) - set(was)), sorted(set(was) - set(state))
            what = ", ".join([f"{n} added" for n in added] + [f"{n} removed" for n in gone])
            reasons.append(f"input folder changed: {name} ({what})")
        else:
            verb = "appeared" if was is None else "is gone" if state is None else "changed"
            reasons.append(f"input {verb}: {name}")
    modules = sources.get(entry["source"])
    if modules is None:
        return reasons + ["package source unknown (the manifest lists no files for its hash)"]
    for module in modules:
        if module not in now:
            now[module] = _state(_CODE / module)
    changed = [m for m, sha in modules.items() if now[m] != sha]
    if changed:
        shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
        reasons.append(f"package source changed: {shown}")
    return reasons


def status(root: str | Path | None = None) -> list[Freshness]:
    """Every table and figure under ``root`` (default: the repository) and in its manifest, fresh or not."""
    from mdeq.paper.notebook import FIGURE_OWNERS, TABLE_OWNERS  # imported here: notebook imports this module

    root = Path(root).resolve() if root is not None else paths.ROOT
    with _quiet():  # a status check inside a notebook reads no one's inputs
        return _status(root, FIGURE_OWNERS, TABLE_OWNERS)


def _status(root: Path, figure_owners: Mapping[str, str], table_owners: Mapping[str, str]) -> list[Freshness]:
    data = _load(root / "results" / MANIFEST)
    found = {}  # key -> (label, notebook)
    for folder, owners, ext in (("figures", figure_owners, "png"), ("results", table_owners, "csv")):
        for sub in ("", "smoke/"):
            for name, owner in owners.items():
                key = f"{folder}/{sub}{name}"
                if (root / f"{key}.{ext}").is_file() or key in data["outputs"]:
                    found[key] = owner
    for key, entry in data["outputs"].items():
        found.setdefault(key, Path(entry["notebook"]).stem)
    out, now = [], {}
    for key in sorted(found):
        if key.split("/")[1] == "smoke":
            ext = "{png,svg,json}" if key.startswith("figures/") else "csv"
            out.append(Freshness(f"{key}.{ext}", found[key], (), checked=False))
            continue
        entry = data["outputs"].get(key)
        exts = (sorted(entry["files"], key=("png", "svg", "json", "csv").index) if entry
                else ["png", "svg", "json"] if key.startswith("figures/") else ["csv"])
        label = f"{key}.{exts[0]}" if len(exts) == 1 else f"{key}.{{{','.join(exts)}}}"
        reasons = ["no manifest"] if entry is None else _changes(key, entry, root, data["sources"], now)
        out.append(Freshness(label, found[key], tuple(reasons)))
    return out


def stale_notebooks(found: Sequence[Freshness]) -> list[str]:
    """The notebooks that own a stale output, in the order ``mdeq.reproduce`` runs them."""
    from mdeq.paper.parameters import NOTEBOOKS

    stale = {f.notebook for f in found if not f.fresh}
    return [n for n in NOTEBOOKS if n in stale] + sorted(stale - set(NOTEBOOKS))


def format_status(found: Sequence[Freshness]) -> str:
    """One line per output ("fresh" or "STALE" and why), then the count and, if any is stale, the command."""
    lines = []
    for f in found:
        if not f.checked:
            lines.append(f"-      {f.output}  ({f.notebook}): not checked, the smoke profile's own copy "
                         "(python -m mdeq.reproduce --profile smoke --update-committed redraws it)")
            continue
        lines.append(f"{'fresh' if f.fresh else 'STALE':5s}  {f.output}  ({f.notebook})"
                     + ("" if f.fresh else ": " + "; ".join(f.reasons)))
    found = [f for f in found if f.checked]
    stale = [f for f in found if not f.fresh]
    if stale:
        lines.append(f"{len(stale)} of {len(found)} tables and figures are stale; redraw them with: {REDRAW}")
    else:
        lines.append(f"all {len(found)} tables and figures are fresh")
    return "\n".join(lines)
