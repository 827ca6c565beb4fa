"""Shared presentation code of the notebooks: parameters, figure style, run logs, paper-vs-ours tables.

Why one module: the three profiles of every notebook (``smoke``, ``logs``, ``full``) must draw the
same tables and figures from the same kind of logs, so the drawing code lives here, once, and is
tested (``tests/test_report.py``). The compute side (training launches, timing, solver traces) is in
``mdeq.reproduce``; this module only reads logs and writes ``results/table_*.csv`` and ``figures/``.

Where things go (``Context``):
- real results: logs in ``results/runs/<run>/``, tables ``results/table_*.csv``, figures ``figures/``;
- smoke results: logs in ``results/smoke/runs/<run>/``, tables ``results/smoke/table_*.csv``,
  figures ``figures/smoke/``; every smoke title and caption says "smoke run, not a reproduction";
- quick smoke runs (tests) write under ``runs/notebooks/quick_outputs/`` (never committed), and the notebook parameter
  ``output_root`` sends every output elsewhere (``<output_root>/results``, ``<output_root>/figures``).
A "logs" run writes the real tables with "not run yet" where ``results/runs`` holds no log: the paper's
numbers are never copied into "ours".
"""
from __future__ import annotations

import json
import math
import os
import platform
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mdeq import paths

__all__ = [
    "PROFILES", "NOTEBOOKS", "SMOKE_NOTE", "NOT_RUN", "PARAMETERS", "FIGURE_OWNERS", "TABLE_OWNERS",
    "ParameterError", "check_parameters", "Context", "setup", "paper_numbers", "save_figure",
    "save_table", "RunLog", "read_run", "read_runs", "hardware_label",
]

PROFILES = ("smoke", "logs", "full")
NOTEBOOKS = ("01_cifar10", "02_imagenet", "03_runtime_memory", "04_cityscapes", "05_convergence")
SMOKE_NOTE = "smoke run, not a reproduction"
NOT_RUN = "not run yet"
PAPER_NUMBERS = paths.RESULTS / "paper_numbers.yaml"

# ----------------------------------------------------------------------------------------------
# Parameters. papermill only warns about a parameter the notebook does not declare, and injects
# values without checking their types, so each notebook checks its parameters right after the
# tagged cell. The declared names, types and defaults are listed here once; tests check that each
# notebook's parameters cell declares exactly these.

_COMMON = {
    "profile": (str, "smoke"),  # smoke | logs | full
    "quick": (bool, False),  # smoke only: fewer steps and runs (tests, CI)
    "seed": (int, 0),
    "data_root": (str, ""),  # full only: the real data set's root ("" = data/<dataset>)
    "output_root": (str, ""),  # "" = the repository's results/ and figures/
}
_FULL = {
    "variant": (str, "paper"),  # full only: config variant, paper (Appendix Table 4) or official
    "nproc": (int, 0),  # full only: GPUs per run via torchrun (0 = all visible)
    "dry_run": (bool, False),  # full only: print the launch commands, launch nothing
}
PARAMETERS: dict[str, dict[str, tuple[type, Any]]] = {
    "01_cifar10": {**_COMMON, **_FULL, "seeds": (int, 5)},
    "02_imagenet": {**_COMMON, **_FULL},
    "03_runtime_memory": {**_COMMON, "variant": (str, "paper"), "dry_run": (bool, False),
                          "batch_size": (int, 32), "device": (str, "auto")},
    "04_cityscapes": {**_COMMON, **_FULL},
    "05_convergence": {**_COMMON, "variant": (str, "paper"), "dry_run": (bool, False),
                       "num_batches": (int, 5), "device": (str, "auto")},
}
_CHOICES = {"profile": PROFILES, "variant": ("paper", "official"), "device": ("auto", "cpu", "cuda")}


class ParameterError(ValueError):
    """A notebook parameter that is unknown, of the wrong type or out of range."""


def _injected_names(namespace: Mapping[str, Any]) -> list[str]:
    """Names assigned in papermill's injected cell(s) (their source starts with '# Parameters')."""
    import ast

    names: list[str] = []
    history = namespace.get("In")
    if not isinstance(history, list):
        return names
    for source in history:
        if not isinstance(source, str) or not source.lstrip().startswith("# Parameters"):
            continue
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign) else [])
            names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


@dataclass(frozen=True)
class Params:
    """The checked parameters of one notebook run."""

    notebook: str
    values: dict

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def check_parameters(namespace: Mapping[str, Any], notebook: str) -> Params:
    """Check the parameters in a notebook's namespace; raise ParameterError with the valid choices.

    Catches a misspelt parameter injected by papermill (which papermill itself only warns about),
    a wrong type (``-p quick yes``), an unknown profile or variant, and a negative count.
    """
    import difflib

    if notebook not in PARAMETERS:
        raise ParameterError(f"unknown notebook {notebook!r}; expected one of {NOTEBOOKS}")
    spec = PARAMETERS[notebook]
    unknown = [n for n in _injected_names(namespace) if n not in spec]
    if unknown:
        hints = []
        for n in unknown:
            close = difflib.get_close_matches(n, list(spec), n=1)
            hints.append(repr(n) + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ParameterError(f"unknown parameter(s) {', '.join(hints)} for notebook {notebook}; "
                             f"valid parameters: {', '.join(spec)}")
    values = {}
    for name, (tp, default) in spec.items():
        value = namespace.get(name, default)
        ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool))
        if not ok:
            raise ParameterError(f"parameter {name!r} must be of type {tp.__name__}, got {value!r} "
                                 f"({type(value).__name__}); default {default!r}")
        if name in _CHOICES and value not in _CHOICES[name]:
            close = difflib.get_close_matches(str(value), _CHOICES[name], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(f"parameter {name!r} must be one of {list(_CHOICES[name])}, got {value!r}{hint}")
        if tp is int and name != "seed" and value < 0:
            raise ParameterError(f"parameter {name!r} must be >= 0, got {value}")
        values[name] = value
    if values.get("quick") and values["profile"] != "smoke":
        raise ParameterError(f"quick=True only applies to the smoke profile, not {values['profile']!r}")
    for name in ("seeds", "num_batches", "batch_size"):
        if name in values and values[name] < 1:
            raise ParameterError(f"parameter {name!r} must be >= 1, got {values[name]}")
    return Params(notebook, values)


# ----------------------------------------------------------------------------------------------
# Output locations and the run context.

# Every figure and table is written by exactly one notebook (tests/test_report.py checks the
# notebooks' sources and the files in figures/ against these maps).
FIGURE_OWNERS = {
    "fig4a_cifar10_accuracy": "01_cifar10",
    "table1_training_and_solver": "01_cifar10",
    "imagenet_top1_per_epoch": "02_imagenet",
    "fig4b_runtime_memory": "03_runtime_memory",
    "fig8_cityscapes_examples": "04_cityscapes",
    "fig5_convergence_forward": "05_convergence",
    "fig5_convergence_backward": "05_convergence",
    "fig7_per_scale_convergence": "05_convergence",
}
TABLE_OWNERS = {
    "table_1_cifar10": "01_cifar10",
    "table_2_imagenet": "02_imagenet",
    "table_fig4b_runtime_memory": "03_runtime_memory",
    "table_3_cityscapes": "04_cityscapes",
    "table_fig5_convergence": "05_convergence",
}
KINDS = ("real", "smoke")


@dataclass
class Context:
    """Where one notebook run reads logs and writes its outputs."""

    notebook: str
    profile: str
    quick: bool = False
    output_root: Path | None = None
    params: Params | None = None
    written: list = field(default_factory=list)

    def _out_base(self) -> tuple[Path, Path]:
        """``output_root`` if given; a smoke run's own outputs go under the ignored runs/ (the committed
        reference copy in results/smoke/ is written only by ``python -m mdeq.reproduce --update-committed``)."""
        if self.output_root is not None:
            return self.output_root / "results", self.output_root / "figures"
        if self.profile == "smoke":
            base = paths.RUNS / "notebooks" / ("quick_outputs" if self.quick else "smoke_outputs")
            return base / "results", base / "figures"
        return paths.RESULTS, paths.FIGURES

    def results_dir(self, kind: str) -> Path:
        """Where tables and collected logs of ``kind`` ("real" or "smoke") are written."""
        base = self._out_base()[0]
        return base / "smoke" if _kind(kind) == "smoke" else base

    def figures_dir(self, kind: str) -> Path:
        base = self._out_base()[1]
        return base / "smoke" if _kind(kind) == "smoke" else base

    def inputs_dir(self, kind: str) -> Path:
        """Where logs of ``kind`` are read: what this run wrote for the kind it computes (smoke in the smoke
        profile, real in the full one, wherever ``output_root`` puts it), else the committed ones."""
        if (_kind(kind), self.profile) in (("smoke", "smoke"), ("real", "full")):
            return self.results_dir(kind)
        return paths.RESULTS / "smoke" if kind == "smoke" else paths.RESULTS

    def logs_dir(self, kind: str) -> Path:
        """Where training run logs of ``kind`` are read (``<inputs>/runs``)."""
        return self.inputs_dir(kind) / "runs"

    def kinds(self) -> tuple[str, ...]:
        """What this profile draws: smoke draws its own run; full draws real logs; logs draws both."""
        return {"smoke": ("smoke",), "full": ("real",), "logs": ("real", "smoke")}[self.profile]

    def source(self, kind: str, data: str, hardware: str) -> str:
        """The ``ours_source`` text of a table row: profile, data and hardware."""
        prof = "smoke" if kind == "smoke" else ("full" if self.profile in ("full", "logs") else self.profile)
        return f"{prof} profile; data: {data}; hardware: {hardware}"


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def setup(params: Params) -> Context:
    """Apply the figure style, limit CPU threads in the smoke profile, and return the run context."""
    set_style()
    if params.profile == "smoke":
        import torch

        torch.set_num_threads(1)  # the machine is shared; one thread is also the most reproducible
    out = Path(params.output_root).resolve() if params.values.get("output_root") else None
    return Context(params.notebook, params.profile, bool(params.values.get("quick")), out, params)


def rel(path: str | Path) -> str:
    """``path`` relative to the repository root where it lies inside it (for captions and messages)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(paths.ROOT))
    except ValueError:
        return str(path)


def hardware_label(device: str | None = None) -> str:
    """A short description of the machine: GPU name(s) or CPU model and thread count."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and (device in (None, "cuda", "auto") or str(device).startswith("cuda")) \
            and torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    threads = torch.get_num_threads() if torch is not None else os.cpu_count()
    return f"CPU ({cpu}, {threads} thread{'s' if threads != 1 else ''})"


# ----------------------------------------------------------------------------------------------
# The paper's numbers.

def paper_numbers(path: str | Path = PAPER_NUMBERS) -> dict:
    """``results/paper_numbers.yaml`` as a dict (the paper's numbers; never ours)."""
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh)


def paper_row(table: str, ours_key: str, numbers: Mapping | None = None) -> dict:
    """The paper's row of ``table`` ('table1', 'table2', 'table3') that our run ``ours_key`` reproduces."""
    numbers = numbers if numbers is not None else paper_numbers()
    rows = [r for r in numbers[table]["rows"] if r.get("ours") == ours_key]
    if len(rows) != 1:
        raise KeyError(f"{table} has {len(rows)} rows with ours: {ours_key!r}")
    return rows[0]


# ----------------------------------------------------------------------------------------------
# Figure style and saving.

COLORS = {  # one colour per model or solver, in every figure
    "mdeq": "#1f77b4", "mdeq_small": "#1f77b4", "mdeq_large": "#08306b", "mdeq_xl": "#6baed6",
    "mdeq_large_unrolled5": "#9467bd", "single_stream": "#ff7f0e", "resnet18": "#2ca02c",
    "resnet18_170k": "#2ca02c", "resnet18_10m": "#98df8a", "resnet101": "#7f7f7f",
    "node": "#d62728", "anode": "#e377c2",
    "broyden": "#1f77b4", "fixed_point": "#e6ab02",
}
DASHED = ("cifar10_mdeq_large", "cifar10_resnet18_10m")  # Table 1's with-augmentation block
SCALE_COLORS = ("#c51b7d", "#4d9221", "#2166ac", "#b35806")


def set_style() -> None:
    """One matplotlib style for every figure of the repository (non-interactive, deterministic SVG)."""
    import matplotlib

    if not os.environ.get("MPLBACKEND"):
        try:
            from IPython import get_ipython

            inline = get_ipython() is not None
        except ImportError:
            inline = False
        if not inline:
            matplotlib.use("Agg")
    matplotlib.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 200, "font.size": 9, "axes.titlesize": 10,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False, "legend.fontsize": 8, "lines.linewidth": 1.6,
        "svg.hashsalt": "mdeq-repro", "svg.fonttype": "path", "image.interpolation": "nearest",
    })


def figure_title(title: str, kind: str) -> str:
    return f"{title}\n({SMOKE_NOTE})" if kind == "smoke" else title


def caption_text(caption: str, notebook: str, kind: str, source: str) -> str:
    text = caption.rstrip(".") + f". Drawn by notebooks/{notebook}.ipynb from {source}."
    if kind == "smoke":
        text = f"Smoke run, not a reproduction: {text}"
    return text


def save_figure(fig, name: str, ctx: Context, kind: str, *, caption: str, source: str) -> dict:
    """Write ``fig`` as PNG and SVG (plus a JSON sidecar with its caption and writer) and return paths.

    The caption is text, not pixels: in a notebook it is shown under the figure as Markdown (and so in
    the book), and it is stored in the sidecar. A smoke figure says "smoke run, not a reproduction" in
    its caption (and its title, via ``figure_title``). ``name`` must belong to ``ctx.notebook``.
    """
    owner = FIGURE_OWNERS.get(name)
    if owner != ctx.notebook:
        raise ValueError(f"figure {name!r} belongs to {owner!r}, not {ctx.notebook!r} (report.FIGURE_OWNERS)")
    text = caption_text(caption, ctx.notebook, kind, source)
    folder = ctx.figures_dir(kind)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for ext, meta in (("png", {"Software": None}), ("svg", {"Date": None, "Creator": None})):
        path = folder / f"{name}.{ext}"
        fig.savefig(path, format=ext, bbox_inches="tight", metadata=meta)
        out[ext] = path
    sidecar = {"figure": name, "notebook": f"notebooks/{ctx.notebook}.ipynb", "kind": kind,
               "caption": text, "source": source}
    out["json"] = folder / f"{name}.json"
    out["json"].write_text(json.dumps(sidecar, indent=1) + "\n")
    ctx.written += list(out.values())
    if _display(fig, f"*Figure ({name}).* {text}"):
        import matplotlib.pyplot as plt

        plt.close(fig)  # shown once, with its caption under it
    return out


def _display(*objects) -> bool:
    """Show figures and Markdown strings in a running notebook; False outside one."""
    try:
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover
        return False
    if get_ipython() is None:
        return False
    for obj in objects:
        display(Markdown(obj) if isinstance(obj, str) else obj)
    return True


def banner(ctx: Context) -> str:
    """The line a page opens with: which profile produced it and what data and hardware are behind it."""
    if ctx.profile == "smoke":
        return (f"> **Smoke profile: toy models on synthetic data, {SMOKE_NOTE}.** Every number and curve on "
                "this page comes from shrunken models trained or measured for seconds on a CPU; the paper's "
                "numbers stand beside them for orientation only.")
    if ctx.profile == "full":
        return f"> **Full profile**: the paper's protocol, on {hardware_label()}."
    runs = sorted(p for p in ctx.logs_dir("real").iterdir() if p.is_dir()) if ctx.logs_dir("real").is_dir() else []
    lines = []
    for path in runs:
        r = read_run(path)
        if r is None:
            continue
        state = "finished" if r.finished else f"epoch {r.epochs_done} of {r.epochs_planned or '?'}"
        lines.append(f"`{r.name}` ({state}; {r.meta('data_source_label', default='unknown data')}; "
                     f"{run_hardware(r.provenance)})")
    real = ("real runs in results/runs/: " + ", ".join(lines)) if lines else "no real training run is committed yet"
    return (f"> **Logs profile**: redrawn from the committed logs, nothing computed; {real}. Rows and figures "
            f"marked smoke are toy models on synthetic data, {SMOKE_NOTE}.")


def show_banner(ctx: Context) -> None:
    text = banner(ctx)
    if not _display(text):
        print(text.lstrip("> "))


def save_table(df, name: str, ctx: Context, kind: str) -> Path:
    """Write ``df`` to ``<results>/<name>.csv`` (``name`` must belong to ``ctx.notebook``)."""
    owner = TABLE_OWNERS.get(name)
    if owner != ctx.notebook:
        raise ValueError(f"table {name!r} belongs to {owner!r}, not {ctx.notebook!r} (report.TABLE_OWNERS)")
    for col in ("paper", "ours", "delta", "ours_source"):
        if col not in df.columns:
            raise ValueError(f"table {name!r} lacks the column {col!r}")
    folder = ctx.results_dir(kind)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    df.to_csv(path, index=False, float_format="%.4g")
    ctx.written.append(path)
    return path


def no_data(ax, message: str) -> None:
    """An empty panel saying why there is nothing to draw (never a fabricated curve)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 30)), ha="center", va="center",
            transform=ax.transAxes, fontsize=9, color="#777777")


# ----------------------------------------------------------------------------------------------
# Run logs. A training run (mdeq.train) leaves metrics.csv (one row per evaluation), final.json,
# provenance.json and steps.jsonl in its folder; ``collect_run`` copies the small ones into
# results/ so that the logs profile can redraw everything without the checkpoints.

LOG_FILES = ("metrics.csv", "final.json", "provenance.json", "steps.jsonl")
MAX_STEPS_BYTES = 2_000_000  # steps.jsonl above this is not copied into results/ (kept in runs/)


@dataclass
class RunLog:
    """The logs of one finished (or partial) run."""

    name: str
    path: Path
    metrics: Any  # pandas DataFrame (empty if absent)
    final: dict
    provenance: dict

    @property
    def finished(self) -> bool:
        return bool(self.final)

    @property
    def epochs_done(self) -> int:
        """Epochs trained and evaluated (rows of metrics.csv that are not partial)."""
        if not len(self.metrics) or "epoch" not in self.metrics:
            return 0
        rows = self.metrics
        if "partial" in rows:
            rows = rows[~rows["partial"].astype(str).eq("True")]
        return int(rows["epoch"].nunique())

    @property
    def epochs_planned(self) -> int | None:
        return _lookup(self.provenance, "config.train.epochs")

    def value(self, *keys: str) -> float | None:
        """The first of ``keys`` present in final.json (or in the last metrics row), as a float."""
        for key in keys:
            v = _lookup(self.final, key)
            if v is not None:
                return float(v)
        rows = self.metrics
        if len(rows) and "partial" in rows:
            rows = rows[~rows["partial"].astype(str).eq("True")]
        if len(rows):
            last = rows.iloc[-1]
            for key in keys:
                if key in last.index and not _isnan(last[key]):
                    return float(last[key])
        return None

    def meta(self, *keys: str, default: Any = None) -> Any:
        for source in (self.final, self.provenance):
            for key in keys:
                v = _lookup(source, key)
                if v is not None:
                    return v
        return default


def _lookup(d: Mapping, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _isnan(x: Any) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def read_run(path: str | Path):
    """The logs in a run folder, or None if it holds none of them."""
    import pandas as pd

    path = Path(path)
    if not path.is_dir() or not any((path / f).exists() for f in LOG_FILES[:3]):
        return None
    metrics = pd.read_csv(path / "metrics.csv") if (path / "metrics.csv").is_file() else pd.DataFrame()
    final = json.loads((path / "final.json").read_text()) if (path / "final.json").is_file() else {}
    prov = json.loads((path / "provenance.json").read_text()) if (path / "provenance.json").is_file() else {}
    return RunLog(path.name, path, metrics, final, prov)


def read_runs(folder: str | Path, key: str) -> list[RunLog]:
    """Every run of ``key`` in ``folder``: ``<key>`` itself and its seeds ``<key>_seed<k>``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted(p.name for p in folder.iterdir() if p.name == key or p.name.startswith(key + "_seed"))
    return [r for r in (read_run(folder / n) for n in names) if r is not None]


def collect_run(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy a run's small log files into ``dest`` (results/...): logs are data, checkpoints are not."""
    import shutil

    run_dir, dest = Path(run_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in LOG_FILES:
        src = run_dir / name
        if not src.is_file():
            continue
        if name == "steps.jsonl" and src.stat().st_size > MAX_STEPS_BYTES:
            continue
        shutil.copyfile(src, dest / name)
    return dest


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and not _isnan(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def fmt_pm(mean: float | None, std: float | None, digits: int = 1) -> str:
    if mean is None:
        return NOT_RUN
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def fmt_params(n: float | None) -> str:
    if n is None or _isnan(n):
        return "-"
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return f"{n:.0f}"


def run_hardware(prov: Mapping) -> str:
    """The hardware a run's provenance.json records, in a few words."""
    hw = prov.get("hardware") or {}
    if not hw:
        return "unknown hardware"
    if hw.get("gpu"):
        return f"{hw.get('world_size', 1)} x {hw['gpu']}"
    threads = hw.get("torch_threads")
    return f"CPU ({hw.get('cpu', '?')}, {threads} thread{'s' if threads != 1 else ''})"


def runs_source(ctx: Context, kind: str, runs: Sequence[RunLog]) -> str:
    """``ours_source`` of a row from its runs' provenance (data set label and hardware)."""
    if not runs:
        return ""
    data = sorted({str(r.meta("data_source_label", default="unknown data")) for r in runs})
    hw = sorted({run_hardware(r.provenance) for r in runs})
    return ctx.source(kind, "; ".join(data), "; ".join(hw))


def _status(kind: str, runs: Sequence[RunLog]) -> str:
    if not runs:
        return NOT_RUN
    notes = [f"{len(runs)} run{'s' if len(runs) != 1 else ''}"]
    if any(not r.finished for r in runs):
        notes.append("unfinished: " + ", ".join(f"epoch {r.epochs_done} of {r.epochs_planned or '?'}"
                                                for r in runs if not r.finished))
    elif any(r.final.get("stopped_early") for r in runs):
        notes.append("stopped early")
    if kind == "smoke":
        notes.append(SMOKE_NOTE)
    return "; ".join(notes)


def _row(table: str, row: str, metric: str, paper: float | None, runs: Sequence[RunLog], values: Sequence,
         ctx: Context, kind: str, *, paper_std: float | None = None, paper_params: float | None = None,
         setting: str = "", digits: int = 1) -> dict:
    mean, std = mean_std(values)
    ours_params = runs[0].meta("num_params") if runs else None
    return {
        "table": table, "setting": setting, "row": row, "metric": metric,
        "paper": paper, "paper_std": paper_std,
        "ours": round(mean, 4) if mean is not None else NOT_RUN,
        "ours_std": round(std, 4) if std is not None else None,
        # no delta for an unfinished run: its number is an intermediate epoch's, not a result
        "delta": (round(mean - paper, 4) if (mean is not None and paper is not None and kind != "smoke"
                                             and all(r.finished for r in runs)) else None),
        "paper_params": paper_params, "ours_params": ours_params,
        "ours_source": runs_source(ctx, kind, runs) or NOT_RUN, "status": _status(kind, runs),
    }


def table1(ctx: Context, kind: str, numbers: Mapping | None = None):
    """Table 1 (CIFAR-10 accuracy, %) with paper, ours (mean over seeds), delta and provenance."""
    import pandas as pd

    numbers = numbers if numbers is not None else paper_numbers()
    rows = []
    for pr in numbers["table1"]["rows"]:
        runs = read_runs(ctx.logs_dir(kind), pr["ours"])
        vals = [r.value("final", "final_eval.top1", "eval_top1") for r in runs]  # unfinished: the latest epoch
        rows.append(_row("Table 1", pr["row"], "test accuracy (%)", pr["accuracy"], runs, vals, ctx, kind,
                         paper_std=pr["accuracy_std"], paper_params=pr["params"], setting=pr["setting"]))
    return pd.DataFrame(rows)


def table2(ctx: Context, kind: str, numbers: Mapping | None = None):
    """Table 2 (ImageNet top-1 and top-5, %) for the rows we train."""
    import pandas as pd

    numbers = numbers if numbers is not None else paper_numbers()
    rows = []
    for pr in numbers["table2"]["rows"]:
        if "ours" not in pr:
            continue
        runs = read_runs(ctx.logs_dir(kind), pr["ours"])
        for metric, col in (("top1", "top-1 accuracy (%)"), ("top5", "top-5 accuracy (%)")):
            vals = [r.value(f"final_eval.{metric}") for r in runs]
            rows.append(_row("Table 2", pr["row"], col, pr[metric], runs, vals, ctx, kind,
                             paper_params=pr["params"]))
    return pd.DataFrame(rows)


def table3(ctx: Context, kind: str, numbers: Mapping | None = None):
    """Table 3 (Cityscapes val mIoU, %) for the rows we train."""
    import pandas as pd

    numbers = numbers if numbers is not None else paper_numbers()
    rows = []
    for pr in numbers["table3"]["rows"]:
        if "ours" not in pr:
            continue
        runs = read_runs(ctx.logs_dir(kind), pr["ours"])
        vals = [None if r.value("final_eval.miou", "final") is None else 100 * r.value("final_eval.miou", "final")
                for r in runs]
        rows.append(_row("Table 3", pr["row"], "mIoU (%)", pr["miou"], runs, vals, ctx, kind,
                         paper_params=pr["params"]))
    return pd.DataFrame(rows)


def show_table(df, kind: str, csv: str | Path | None = None):
    """The table as a page shows it: few columns (value ± std, sizes as "paper / ours"), padded cells,
    human row names; the full table (sources, notes, keys) is the CSV, named in the caption."""
    def pm(v, sd):
        if v is None or (isinstance(v, float) and _isnan(v)):
            return ""
        text = f"{v:.2f}" if isinstance(v, float) else str(v)
        return text + (f" ± {sd:.2f}" if sd is not None and not _isnan(sd) else "")

    shown = {}
    for c in ("setting", "row", "metric"):
        if c in df.columns and df[c].astype(str).str.len().gt(0).any():
            shown[c] = df[c].fillna("")
    shown["paper"] = [pm(v, s) for v, s in zip(df["paper"], df.get("paper_std", [None] * len(df)))]
    shown["ours"] = [pm(v, s) for v, s in zip(df["ours"], df.get("ours_std", [None] * len(df)))]
    if kind != "smoke" and "delta" in df.columns and df["delta"].notna().any():
        shown["delta"] = [pm(v, None) for v in df["delta"]]
    if "paper_params" in df.columns:
        shown["params (paper / ours)"] = [
            f"{fmt_params(a)} / {fmt_params(b)}" for a, b in zip(df["paper_params"], df.get("ours_params", df["paper_params"]))]
    if "status" in df.columns:
        shown["status"] = df["status"]
    import pandas as pd

    table = pd.DataFrame(shown)
    styler = table.style.hide(axis="index").set_table_styles(
        [{"selector": "th, td", "props": "padding: 2px 10px; text-align: left; vertical-align: top;"},
         {"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: bold;"}])
    title = "Paper vs ours" + (f" ({SMOKE_NOTE}: no comparison with the paper is meant)" if kind == "smoke" else "")
    if csv is not None:
        title += f". Every column, with the data and hardware behind each number: {rel(csv)}"
    return styler.set_caption(title)


# ----------------------------------------------------------------------------------------------
# Figures.

def _curves(runs: Sequence[RunLog], column: str, scale: float = 1.0):
    """Epochs (1-based) and mean/std over runs of ``metrics.csv``'s ``column`` (partial epochs left out)."""
    def full_rows(m):
        return m[~m["partial"].astype(str).eq("True")] if "partial" in m else m

    series = [full_rows(r.metrics)[["epoch", column]].dropna() for r in runs
              if len(r.metrics) and column in r.metrics]
    series = [s for s in series if len(s)]
    if not series:
        return None
    n = min(len(s) for s in series)
    arr = np.stack([s[column].to_numpy(dtype=float)[:n] * scale for s in series])
    epochs = series[0]["epoch"].to_numpy()[:n] + 1
    return epochs, arr.mean(0), (arr.std(0, ddof=1) if len(arr) > 1 else None)


def _draw_runs(ax, ctx: Context, kind: str, entries, column: str, scale: float = 1.0) -> dict:
    """One curve per (run key, label, colour key) of ``column`` per epoch, the mean ± std over seeds;
    returns {legend text: line}, the text naming the number of runs and an unfinished run's epoch."""
    lines = {}
    for key, label, colour in entries:
        runs = read_runs(ctx.logs_dir(kind), key)
        c = _curves(runs, column, scale)
        if c is None:
            continue
        epochs, mean, std = c
        (line,) = ax.plot(epochs, mean, "--" if key in DASHED else "-", color=COLORS.get(colour),
                          marker="o" if len(epochs) < 8 else None, ms=3)
        if std is not None:
            ax.fill_between(epochs, mean - std, mean + std, color=COLORS.get(colour), alpha=0.2, lw=0)
        notes = [f"{len(runs)} run{'s' if len(runs) != 1 else ''}"]
        notes += [f"epoch {r.epochs_done} of {r.epochs_planned or '?'}" for r in runs if not r.finished]
        lines[f"{label} ({', '.join(notes)})"] = line
    return lines


def plot_training_curves(ctx: Context, kind: str, entries: Sequence[tuple[str, str, str]], *, column: str,
                         ylabel: str, title: str, scale: float = 1.0, ax=None):
    """Curves of ``column`` per epoch for ``entries`` = (run key, label, colour key); mean ± std over seeds."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
    else:
        fig = ax.figure
    lines = _draw_runs(ax, ctx, kind, entries, column, scale)
    if lines:
        for name, line in lines.items():
            line.set_label(name)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        no_data(ax, f"{NOT_RUN}: no training logs in {rel(ctx.logs_dir(kind))}")
    ax.set_title(figure_title(title, kind))
    return fig


def plot_training_panels(ctx: Context, kind: str, entries: Sequence[tuple[str, str, str]],
                         panels: Sequence[tuple[str, str, bool]], *, title: str, ncols: int = 3):
    """One panel per (metrics column, y label, log scale) with a curve per run entry; one legend for all."""
    import matplotlib.pyplot as plt

    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False)
    handles = {}
    for ax, (column, ylabel, logy) in zip(axes.flat, panels):
        for name, line in _draw_runs(ax, ctx, kind, entries, column).items():
            handles.setdefault(name, line)
        if not ax.lines:
            no_data(ax, f"{NOT_RUN}: no {column} in {rel(ctx.logs_dir(kind))}")
        if logy and ax.lines:
            ax.set_yscale("log")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 3),
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.suptitle(figure_title(title, kind), y=1.08 + 0.04 * math.ceil(len(handles) / 3))
    fig.tight_layout()
    return fig


def plot_runtime_memory(measure: Mapping | None, kind: str, *, reference: str = "resnet101"):
    """Fig. 4b: training time, inference time and peak training memory relative to ResNet-101."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(9.5, 3.2), sharey=False)
    title = "Runtime and memory relative to ResNet-101 (CIFAR-10 input)"
    if not measure or reference not in measure.get("models", {}):
        for ax in axes:
            no_data(ax, f"{NOT_RUN}: no measurement")
        fig.suptitle(figure_title(title, kind))
        return fig
    models = measure["models"]
    ref = models[reference]
    keys = list(models)
    for ax, (metric, label) in zip(axes, (("train_ms", "training time / batch"),
                                          ("inference_ms", "inference time / batch"),
                                          ("peak_train_memory_mb", "peak training memory"))):
        vals = [models[k][metric] / ref[metric] if ref[metric] else float("nan") for k in keys]
        ax.bar(range(len(keys)), vals, color=[COLORS.get(k, "#999999") for k in keys])
        ax.set_xticks(range(len(keys)), [models[k]["label"] for k in keys], rotation=35, ha="right")
        ax.axhline(1.0, color="#555555", lw=0.8, ls=":")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(label)
        ax.set_ylabel("relative to ResNet-101 (lower is better)" if ax is axes[0] else "")
        ax.grid(axis="x", visible=False)
    fig.suptitle(figure_title(f"{title}; batch {measure['batch_size']} on {measure['hardware']}", kind))
    fig.tight_layout()
    return fig


def table_fig4b(ctx: Context, kind: str, measure: Mapping | None, numbers: Mapping | None = None):
    """The numbers Section 4.4 states, next to ours from the runtime/memory measurement."""
    import pandas as pd

    numbers = numbers if numbers is not None else paper_numbers()
    st = {s["key"]: s for s in numbers["fig4b"]["statements"]}
    m = (measure or {}).get("models", {})

    def ratio(a, b, metric):
        return m[a][metric] / m[b][metric] if a in m and b in m and m[b][metric] else None

    ours = {
        "resnet101_ms_per_batch": m["resnet101"]["train_ms"] if "resnet101" in m else None,
        "mdeq_slowdown_vs_resnet101": ratio("mdeq", "resnet101", "train_ms"),
        "mdeq_train_memory_saving_vs_resnets": ratio("mdeq", "resnet101", "peak_train_memory_mb"),
        "mdeq_small_speedup_vs_anode": ratio("anode", "mdeq_small", "train_ms"),
    }
    metric = {
        "resnet101_ms_per_batch": "ResNet-101 training time per batch (ms)",
        "mdeq_slowdown_vs_resnet101": "training time MDEQ / ResNet-101",
        "mdeq_train_memory_saving_vs_resnets": "peak training memory MDEQ / ResNet-101",
        "mdeq_small_speedup_vs_anode": "training time ANODE / MDEQ-small",
    }
    hw = (measure or {}).get("hardware", "")
    source = ctx.source(kind, f"random CIFAR-10-sized input, batch {(measure or {}).get('batch_size', '?')}", hw) \
        if measure else NOT_RUN
    rows = []
    for key, label in metric.items():
        v = ours[key]
        paper = st[key]["value"]
        rows.append({"table": "Fig. 4b", "setting": "", "row": label, "key": key, "metric": label, "paper": paper,
                     "ours": round(v, 4) if v is not None else NOT_RUN,
                     "delta": round(v - paper, 4) if v is not None and kind != "smoke" else None,
                     "paper_note": st[key]["text"], "ours_source": source,
                     "status": (SMOKE_NOTE if kind == "smoke" else "measured") if v is not None else NOT_RUN})
    return pd.DataFrame(rows)


def read_json(path: str | Path) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: str | Path, payload: Mapping) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def plot_segmentation_examples(folder: str | Path | None, kind: str):
    """Fig. 8: input, prediction and ground truth (Cityscapes palette, void in black) per example."""
    import matplotlib.pyplot as plt
    from PIL import Image

    from mdeq.data import train_ids_to_color

    meta = read_json(Path(folder) / "examples.json") if folder else None
    title = "Cityscapes val: input, MDEQ prediction, ground truth"
    if not meta or not meta.get("examples"):
        fig, ax = plt.subplots(figsize=(7, 2.2))
        no_data(ax, f"{NOT_RUN}: no segmentation examples")
        ax.set_title(figure_title(title, kind))
        return fig
    ex = meta["examples"]
    fig, axes = plt.subplots(len(ex), 3, figsize=(9.5, 1.9 * len(ex) + 0.6), squeeze=False)
    for i, e in enumerate(ex):
        imgs = [np.asarray(Image.open(Path(folder) / e["input"]))]
        for name in ("prediction", "ground_truth"):
            imgs.append(train_ids_to_color(np.asarray(Image.open(Path(folder) / e[name]))))
        for j, (img, label) in enumerate(zip(imgs, ("input", f"prediction ({meta['config']})", "ground truth"))):
            axes[i, j].imshow(img)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            axes[i, j].grid(False)
            if i == 0:
                axes[i, j].set_title(label, fontsize=8)
    fig.suptitle(figure_title(title, kind))
    fig.tight_layout()
    return fig


_CURVE_STYLE = {  # curve key -> (label, colour key, line style)
    "broyden_final": ("Broyden (final weights)", "broyden", "-"),
    "broyden_init": ("Broyden (initial weights)", "broyden", ":"),
    "fixed_point_final": ("iterating f (final weights)", "fixed_point", "-"),
    "fixed_point_init": ("iterating f (initial weights)", "fixed_point", ":"),
}
_DATASET_TITLES = {"cifar10": "CIFAR-10", "imagenet": "ImageNet", "cityscapes": "Cityscapes"}


def _band(ax, stats: Mapping, label: str, colour: str, style: str) -> None:
    mean = np.asarray(stats["mean"], dtype=float)
    std = np.asarray(stats["std"], dtype=float)
    x = np.arange(1, len(mean) + 1)
    ax.plot(x, mean, style, color=colour, label=label)
    lo = np.clip(mean - std, mean * 1e-2, None)
    ax.fill_between(x, lo, mean + std, color=colour, alpha=0.15, lw=0)


def plot_convergence(traces: Mapping | None, kind: str, *, direction: str = "forward"):
    """Figs. 5/6: relative residual vs f evaluations at the three resolutions (mean ± std over batches)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    what = "forward" if direction == "forward" else "backward (IFT)"
    for ax, dataset in zip(axes, _DATASET_TITLES):
        entry = (traces or {}).get("datasets", {}).get(dataset)
        curves = {k: v for k, v in (entry or {}).get("curves", {}).items() if direction in v}
        if not curves:
            no_data(ax, f"{NOT_RUN}: no {what} traces for {_DATASET_TITLES[dataset]}")
            ax.set_title(_DATASET_TITLES[dataset])
            continue
        for key, c in curves.items():
            label, colour, style = _CURVE_STYLE.get(key, (key, "mdeq", "-"))
            _band(ax, c[direction], label, COLORS[colour], style)
        ax.set_yscale("log")
        ax.set_xlabel("number of f evaluations")
        h, w = entry["input_hw"]
        ax.set_title(f"{_DATASET_TITLES[dataset]} ({h}x{w}, {entry['config']})", fontsize=8.5)
        if ax is axes[0]:
            ax.set_ylabel("||f(z) - z|| / ||f(z)||")
            ax.legend(loc="lower left", fontsize=7)
    fig.suptitle(figure_title(f"Convergence to equilibrium, {what} pass", kind))
    fig.tight_layout()
    return fig


def plot_per_scale(traces: Mapping | None, kind: str):
    """Fig. 7: per-scale relative residual of the CIFAR-10 MDEQ vs the single-stream DEQ (Broyden)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ps = (traces or {}).get("per_scale", {})
    if not ps:
        no_data(ax, f"{NOT_RUN}: no per-scale traces")
    else:
        if "mdeq" in ps:
            for i, st in enumerate(ps["mdeq"]["scales"]):
                _band(ax, st, f"MDEQ scale {i + 1} ({ps['mdeq']['channels'][i]} ch.)",
                      SCALE_COLORS[i % len(SCALE_COLORS)], "-")
        if "single_stream" in ps:
            _band(ax, ps["single_stream"]["scales"][0], "single-stream DEQ (scale 1)", COLORS["single_stream"], "--")
        ax.set_yscale("log")
        ax.set_xlabel("number of f evaluations")
        ax.set_ylabel("per-scale ||f_i(z) - z_i|| / ||f_i(z)||")
        ax.legend(loc="lower left", fontsize=7)
    ax.set_title(figure_title("Per-scale convergence on CIFAR-10 (Broyden)", kind))
    return fig


def _last_finite(values) -> float | None:
    """The last finite entry of a trace (its end), or None."""
    if values is None:
        return None
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(finite[-1]) if finite.size else None


def convergence_table(ctx: Context, kind: str, traces: Mapping | None, numbers: Mapping | None = None,
                      threshold: float = 1e-2):
    """F evaluations until the mean Broyden trace falls below ``threshold`` (the paper states ~30 on
    CIFAR-10 and over 100 on Cityscapes, without saying its threshold), and the last residuals."""
    import pandas as pd

    numbers = numbers if numbers is not None else paper_numbers()
    st = {s["key"]: s for s in numbers["convergence"]["statements"]}
    paper = {"cifar10": st["cifar10_broyden_steps"]["value"], "cityscapes": st["cityscapes_broyden_steps"]["value"]}
    rows = []
    for dataset, title in _DATASET_TITLES.items():
        entry = (traces or {}).get("datasets", {}).get(dataset)
        for key in ("broyden_final", "broyden_init", "fixed_point_final", "fixed_point_init"):
            c = (entry or {}).get("curves", {}).get(key)
            if entry is not None and c is None:
                continue
            mean = np.asarray(c["forward"]["mean"], dtype=float) if c else None
            below = np.nonzero(mean < threshold)[0] if mean is not None else []
            n = int(below[0] + 1) if len(below) else None
            ours = n if n is not None else (f"> {len(mean)} (not reached)" if mean is not None else NOT_RUN)
            p = paper.get(dataset) if key.startswith("broyden") else None
            rows.append({"table": "Figs. 5-6", "setting": title, "row": _CURVE_STYLE[key][0], "key": key,
                         "metric": f"f evaluations until the mean rel. residual < {threshold:g}",
                         "paper": p, "ours": ours,
                         "delta": (n - p) if (n is not None and p is not None and kind != "smoke") else None,
                         "last_rel_residual": _last_finite(mean),
                         "ours_source": ctx.source(kind, entry["data"], traces["hardware"]) if entry else NOT_RUN,
                         "status": (SMOKE_NOTE if kind == "smoke" else "measured") if entry else NOT_RUN,
                         "paper_note": "paper: 'within 30 steps' (CIFAR-10), 'over 100 steps' (Cityscapes); "
                                       "its threshold is not stated" if p is not None else ""})
            if entry is None:
                break
    return pd.DataFrame(rows)
