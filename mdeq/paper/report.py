"""How the results are drawn: paper-vs-ours tables from one column spec, and the figures.

Why one module: the three profiles of every notebook (``smoke``, ``logs``, ``full``) draw the same tables
and figures from the same kind of logs, so the drawing lives here once and is tested
(``tests/test_report.py``). It reads run logs through ``mdeq.engine.runlog`` and measurements as the plain
dicts ``mdeq.paper.measure`` returns; it computes nothing and writes nothing (``mdeq.paper.notebook`` saves).
Paper numbers come from ``results/paper_numbers.yaml`` and stay labelled as the paper's; a row without
our log says "not run yet", never the paper's number.
"""
from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import yaml
from matplotlib.ticker import MaxNLocator
from PIL import Image

from mdeq.engine import paths
from mdeq.engine.runlog import RunLog, describe_hardware, read_json, read_runs

__all__ = ["SMOKE_NOTE", "NOT_RUN", "paper_numbers", "COLORS", "set_style", "figure_title", "no_data", "Column",
           "PaperTable", "PAPER_TABLES", "paper_table", "show_table", "table_fig4b", "convergence_table",
           "plot_training_curves", "plot_training_panels", "plot_runtime_memory", "memory_ratios",
           "plot_training_memory", "plot_segmentation_examples",
           "plot_convergence", "plot_per_scale", "budget_table", "plot_accuracy_vs_budget", "resolution_table",
           "plot_convergence_vs_resolution", "budget_summary"]

SMOKE_NOTE = "smoke run, not a reproduction"
NOT_RUN = "not run yet"
PAPER_NUMBERS = paths.RESULTS / "paper_numbers.yaml"


def paper_numbers(path: str | Path = PAPER_NUMBERS) -> dict:
    """``results/paper_numbers.yaml`` as a dict (the paper's numbers; never ours)."""
    with open(path) as fh:
        return yaml.safe_load(fh)


# ----------------------------------------------------------------------------------------------
# Figure style.

COLORS = {  # one colour per model or solver, in every figure
    "mdeq": "#1f77b4", "mdeq_small": "#1f77b4", "mdeq_small_simple_injection": "#17becf", "mdeq_large": "#08306b", "mdeq_xl": "#6baed6",
    "mdeq_large_unrolled5": "#9467bd", "single_stream": "#ff7f0e", "resnet18": "#2ca02c",
    "resnet18_170k": "#2ca02c", "resnet18_10m": "#98df8a", "resnet101": "#7f7f7f",
    "node": "#d62728", "anode": "#e377c2",
    "broyden": "#1f77b4", "fixed_point": "#e6ab02",
}
DASHED = ("cifar10_mdeq_large", "cifar10_resnet18_10m")  # Table 1's with-augmentation block
SCALE_COLORS = ("#c51b7d", "#4d9221", "#2166ac", "#b35806")


def set_style() -> None:
    """One matplotlib style for every figure of the repository (non-interactive, deterministic SVG)."""
    if not os.environ.get("MPLBACKEND"):
        try:  # IPython is there in a notebook (the notebooks extra), not necessarily elsewhere
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


def no_data(ax, message: str) -> None:
    """An empty panel saying why there is nothing to draw (never a fabricated curve)."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 30)), ha="center", va="center",
            transform=ax.transAxes, fontsize=9, color="#777777")


# ----------------------------------------------------------------------------------------------
# Paper-vs-ours tables.

def _isnan(x) -> bool:
    try:
        return math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and not _isnan(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def fmt_params(n: float | None) -> str:
    if n is None or _isnan(n):
        return "-"
    n = float(n)
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}K"
    return f"{n:.0f}"


def runs_source(ctx, kind: str, runs: Sequence[RunLog]) -> str:
    """``ours_source`` of a row from its runs' provenance (data set label and hardware)."""
    if not runs:
        return ""
    data = sorted({str(r.meta("data_source_label", default="unknown data")) for r in runs})
    # every machine and thread count the runs' chunks trained on (a campaign moves between machines)
    hw = sorted({describe_hardware(h) for r in runs
                 for h in (r.provenance.get("hardware"), *(c.get("hardware") for c in r.provenance.get("chunks", [])))
                 if h})
    return ctx.source(kind, "; ".join(data), "; ".join(hw))


def _status(kind: str, runs: Sequence[RunLog]) -> str:
    if not runs:
        return NOT_RUN
    notes = [f"{len(runs)} run{'s' if len(runs) != 1 else ''}"]
    going_on = [r for r in runs if not r.final]  # no final.json yet: training goes on
    if going_on:
        notes.append("unfinished: " + ", ".join(f"epoch {r.epochs_done} of {r.epochs_planned or '?'}"
                                                for r in going_on))
    elif not all(r.finished for r in runs):
        notes.append("stopped early")
    if kind == "smoke":
        notes.append(SMOKE_NOTE)
    return "; ".join(notes)


def _row(table: str, row: str, metric: str, paper: float | None, runs: Sequence[RunLog], values: Sequence,
         ctx, kind: str, *, paper_std: float | None = None, paper_params: float | None = None,
         setting: str = "") -> dict:
    mean, std = mean_std(values)
    ours_params = runs[0].meta("num_params") if runs else None
    return {
        "table": table, "setting": setting, "row": row, "metric": metric,
        "paper": paper, "paper_std": paper_std,
        "ours": round(mean, 4) if mean is not None else ("no epoch evaluated yet" if runs else NOT_RUN),
        "ours_std": round(std, 4) if std is not None else None,
        # no delta for an unfinished run: its number is an intermediate epoch's, not a result
        "delta": (round(mean - paper, 4) if (mean is not None and paper is not None and kind != "smoke"
                                             and all(r.finished for r in runs)) else None),
        "paper_params": paper_params, "ours_params": ours_params,
        "ours_source": runs_source(ctx, kind, runs) or NOT_RUN, "status": _status(kind, runs),
    }


@dataclass(frozen=True)
class Column:
    """One number a paper table reports per row: where the paper's value and ours are found."""

    metric: str  # the text of the table's "metric" column
    paper: str  # key of the paper's value in a row of results/paper_numbers.yaml
    ours: tuple[str, ...]  # keys of our value in final.json (dotted) or metrics.csv; the first present wins
    scale: float = 1.0  # ours x scale (mIoU is logged as a fraction, the paper prints %)
    paper_std: str | None = None  # key of the paper's std over runs, where it gives one


@dataclass(frozen=True)
class PaperTable:
    title: str
    columns: tuple[Column, ...]
    setting: bool = False  # rows carry the paper's "setting" (Table 1: with or without augmentation)


PAPER_TABLES = {
    # An unfinished run's number is its latest epoch's (metrics.csv), shown without a delta.
    "table1": PaperTable("Table 1", (Column("test accuracy (%)", "accuracy", ("final", "final_eval.top1", "eval_top1"),
                                           paper_std="accuracy_std"),), setting=True),
    "table2": PaperTable("Table 2", (Column("top-1 accuracy (%)", "top1", ("final_eval.top1",)),
                                     Column("top-5 accuracy (%)", "top5", ("final_eval.top5",)))),
    "table3": PaperTable("Table 3", (Column("mIoU (%)", "miou", ("final_eval.miou", "final"), scale=100),)),
}


def paper_table(ctx, kind: str, table: str, numbers: Mapping | None = None) -> pd.DataFrame:
    """Table 1, 2 or 3 of the paper for the rows we train: paper, ours (mean and std over seeds), delta, sources.

    ``ctx`` (``mdeq.paper.notebook.Context``) says where the logs of ``kind`` are (``logs_dir``) and how a row
    names its source (``source``).
    """
    spec = PAPER_TABLES[table]
    numbers = numbers if numbers is not None else paper_numbers()
    rows = []
    for pr in numbers[table]["rows"]:
        if "ours" not in pr:
            continue
        variants = {pr["ours"]: None, **(pr.get("ours_variants") or {})}
        for key, variant in variants.items():
            runs = read_runs(ctx.logs_dir(kind), key)
            name = pr["row"] if variant is None else f"{pr['row']}, {variant}"
            for col in spec.columns:
                values = [None if v is None else v * col.scale for v in (r.value(*col.ours) for r in runs)]
                rows.append(_row(spec.title, name, col.metric, pr[col.paper], runs, values, ctx, kind,
                                 paper_std=pr[col.paper_std] if col.paper_std else None,
                                 paper_params=pr["params"], setting=pr["setting"] if spec.setting else ""))
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
        ours = df.get("ours_params", df["paper_params"])
        shown["params (paper / ours)"] = [f"{fmt_params(a)} / {fmt_params(b)}"
                                          for a, b in zip(df["paper_params"], ours)]
    if "status" in df.columns:
        shown["status"] = df["status"]
    table = pd.DataFrame(shown)
    styler = table.style.hide(axis="index").set_table_styles(
        [{"selector": "th, td", "props": "padding: 2px 10px; text-align: left; vertical-align: top;"},
         {"selector": "caption", "props": "caption-side: top; text-align: left; font-weight: bold;"}])
    title = "Paper vs ours" + (f" ({SMOKE_NOTE}: no comparison with the paper is meant)" if kind == "smoke" else "")
    if csv is not None:
        title += f". Every column, with the data and hardware behind each number: {paths.rel(csv)}"
    return styler.set_caption(title)


def table_fig4b(ctx, kind: str, measure: Mapping | None, numbers: Mapping | None = None,
                memory: Mapping | None = None) -> pd.DataFrame:
    """The numbers Section 4.4 states, next to ours from the runtime/memory measurement.

    With ``memory`` (``mdeq.paper.measure.measure_memory``'s live tensor bytes) the memory row is its ratio of
    MDEQ's peak training memory to ResNet-101's, with its own source; else the runtime measurement's."""
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
    sources = {}
    live = memory_ratios(memory).get("mdeq")
    if live is not None:
        key = "mdeq_train_memory_saving_vs_resnets"
        ours[key] = live
        metric[key] = "peak training memory MDEQ / ResNet-101 (live tensor bytes)"
        sources[key] = ctx.source(kind, f"random CIFAR-10-sized input, batch {memory['batch_size']}; peak live "
                                        f"tensor bytes of a training step", memory.get("hardware", ""))
    rows = []
    for key, label in metric.items():
        v = ours[key]
        paper = st[key]["value"]
        rows.append({"table": "Fig. 4b", "setting": "", "row": label, "key": key, "metric": label, "paper": paper,
                     "ours": round(v, 4) if v is not None else NOT_RUN,
                     "delta": round(v - paper, 4) if v is not None and kind != "smoke" else None,
                     "paper_note": st[key]["text"], "ours_source": sources.get(key, source),
                     "status": (SMOKE_NOTE if kind == "smoke" else "measured") if v is not None else NOT_RUN})
    return pd.DataFrame(rows)


_CURVE_STYLE = {  # curve key -> (label, colour key, line style)
    "broyden_final": ("Broyden (final weights)", "broyden", "-"),
    "broyden_init": ("Broyden (initial weights)", "broyden", ":"),
    "fixed_point_final": ("iterating f (final weights)", "fixed_point", "-"),
    "fixed_point_init": ("iterating f (initial weights)", "fixed_point", ":"),
}
_DATASET_TITLES = {"cifar10": "CIFAR-10", "imagenet": "ImageNet", "cityscapes": "Cityscapes"}


def _last_finite(values) -> float | None:
    """The last finite entry of a trace (its end), or None."""
    if values is None:
        return None
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    return float(finite[-1]) if finite.size else None


def convergence_table(ctx, kind: str, traces: Mapping | None, numbers: Mapping | None = None,
                      threshold: float = 1e-2, tight: float = 1e-3) -> pd.DataFrame:
    """F evaluations until the mean forward trace falls below ``threshold``, in the paper's measure
    ||z[i+1] - z[i]|| / ||z[i]|| where it was recorded (else the residual; the ``metric`` column says which),
    the same for the tighter ``tight`` (column ``f_evals_to_<tight>``), and the last values of both measures.
    The paper states ~30 f evaluations on CIFAR-10 and over 100 on Cityscapes, without its threshold."""
    numbers = numbers if numbers is not None else paper_numbers()
    st = {s["key"]: s for s in numbers["convergence"]["statements"]}
    paper = {"cifar10": st["cifar10_broyden_steps"]["value"], "cityscapes": st["cityscapes_broyden_steps"]["value"]}
    rows = []
    for dataset, title in _DATASET_TITLES.items():
        entry = (traces or {}).get("datasets", {}).get(dataset)
        if entry is not None and not entry.get("curves"):
            entry = None  # a measurement in progress (only partial curves): nothing to report yet
        for key in ("broyden_final", "broyden_init", "fixed_point_final", "fixed_point_init"):
            c = (entry or {}).get("curves", {}).get(key)
            if entry is not None and c is None:
                continue
            measure = "forward_step" if c and "forward_step" in c else "forward"
            mean = np.asarray(c[measure]["mean"], dtype=float) if c else None
            ours = _evals_below(mean, threshold)
            p = paper.get(dataset) if key.startswith("broyden") else None
            name = "||z[i+1] - z[i]|| / ||z[i]||" if measure == "forward_step" else "rel. residual"
            rows.append({"table": "Figs. 5-6", "setting": title,
                         "row": _curve_label(key, c) if c else _CURVE_STYLE[key][0], "key": key,
                         "metric": f"f evaluations until the mean {name} < {threshold:g}",
                         "paper": p, "ours": ours,
                         "delta": None,  # the paper's are bounds ("within 30", "over 100") at an unstated threshold
                         f"f_evals_to_{tight:g}": _evals_below(mean, tight),
                         "last_step_change": _last_finite(c["forward_step"]["mean"]) if c and "forward_step" in c
                         else None,
                         "last_rel_residual": _last_finite(c["forward"]["mean"]) if c else None,
                         "ours_source": ctx.source(kind, entry["data"], traces["hardware"]) if entry else NOT_RUN,
                         "status": (SMOKE_NOTE if kind == "smoke" else "measured") if entry else NOT_RUN,
                         "paper_note": "paper: 'within 30 steps' (CIFAR-10), 'over 100 steps' (Cityscapes); "
                                       "its threshold is not stated" if p is not None else ""})
            if entry is None:
                break
    return pd.DataFrame(rows)


def _evals_below(mean, threshold: float):
    """F evaluations until ``mean`` (a trace, one entry per evaluation) first falls below ``threshold``."""
    if mean is None:
        return NOT_RUN
    below = np.nonzero(mean < threshold)[0]
    return int(below[0] + 1) if len(below) else f"> {len(mean)} (not reached)"


# ----------------------------------------------------------------------------------------------
# Figures.

def _curves(runs: Sequence[RunLog], column: str, scale: float = 1.0):
    """Epochs (1-based) and mean/std over runs of ``metrics.csv``'s ``column`` (partial epochs left out)."""
    series = [s for s in (r.series(column) for r in runs) if s]
    if not series:
        return None
    n = min(len(s) for s in series)
    arr = np.stack([np.array([v for _, v in s[:n]], dtype=float) * scale for s in series])
    epochs = np.array([e for e, _ in series[0][:n]]) + 1
    return epochs, arr.mean(0), (arr.std(0, ddof=1) if len(arr) > 1 else None)


def _draw_runs(ax, ctx, kind: str, models, column: str, scale: float = 1.0) -> dict:
    """One curve per model (a ``mdeq.paper.runs.RunSpec``: ``key``, ``label``, ``colour_key``) of ``column`` per
    epoch, the mean ± std over seeds; returns {legend text: line}, the text naming the number of runs and an
    unfinished run's epoch."""
    lines = {}
    for model in models:
        runs = read_runs(ctx.logs_dir(kind), model.key)
        c = _curves(runs, column, scale)
        if c is None:
            continue
        epochs, mean, std = c
        colour = COLORS.get(model.colour_key)
        (line,) = ax.plot(epochs, mean, "--" if model.key in DASHED else "-", color=colour,
                          marker="o" if len(epochs) < 8 else None, ms=3)
        if std is not None:
            ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
        notes = [f"{len(runs)} run{'s' if len(runs) != 1 else ''}"]
        notes += [f"epoch {r.epochs_done} of {r.epochs_planned or '?'}" for r in runs if not r.finished]
        lines[f"{model.label} ({', '.join(notes)})"] = line
    return lines


def plot_training_curves(ctx, kind: str, models: Sequence, *, column: str, ylabel: str, title: str,
                         scale: float = 1.0, ax=None):
    """Curves of ``column`` per epoch for ``models`` (``mdeq.paper.runs.RunSpec``); mean ± std over seeds."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
    else:
        fig = ax.figure
    lines = _draw_runs(ax, ctx, kind, models, column, scale)
    if lines:
        for name, line in lines.items():
            line.set_label(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        no_data(ax, f"{NOT_RUN}: no training logs in {paths.rel(ctx.logs_dir(kind))}")
    ax.set_title(figure_title(title, kind))
    return fig


def plot_training_panels(ctx, kind: str, models: Sequence, panels: Sequence[tuple[str, str, bool]], *,
                         title: str, ncols: int = 3):
    """One panel per (metrics column, y label, log scale) with a curve per model; one legend for all."""
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols, 2.6 * nrows), squeeze=False)
    handles = {}
    for ax, (column, ylabel, logy) in zip(axes.flat, panels):
        for name, line in _draw_runs(ax, ctx, kind, models, column).items():
            handles.setdefault(name, line)
        if not ax.lines:
            no_data(ax, f"{NOT_RUN}: no {column} in {paths.rel(ctx.logs_dir(kind))}")
        if logy and ax.lines:
            ax.set_yscale("log")
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
    rss = ref.get("memory_kind") == "cpu_peak_rss_increase"  # on a CPU: the process's peak resident-set growth
    for ax, (metric, label) in zip(axes, (("train_ms", "training time / batch"),
                                          ("inference_ms", "inference time / batch"),
                                          ("peak_train_memory_mb", "peak RSS growth in training" if rss
                                           else "peak training memory"))):
        vals = [models[k][metric] / ref[metric] if ref[metric] else float("nan") for k in keys]
        ax.bar(range(len(keys)), vals, color=[COLORS.get(k, "#999999") for k in keys])
        ax.set_xticks(range(len(keys)), [_sized(models[k]) for k in keys], rotation=35, ha="right")
        ax.axhline(1.0, color="#555555", lw=0.8, ls=":")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_title(label)
        ax.set_ylabel("relative to ResNet-101 (lower is better)" if ax is axes[0] else "")
        ax.grid(axis="x", visible=False)
    fig.suptitle(figure_title(f"{title}; batch {measure['batch_size']} on {measure['hardware']}", kind))
    fig.tight_layout()
    return fig


_MEMORY_PARTS = (("state_bytes", "parameters + gradients + Adam state", "#4c72b0"),
                 ("saved_bytes", "activations saved for backward", "#dd8452"),
                 ("other_bytes", "solver history, temporaries, input", "#8c8c8c"))
MIB = 2 ** 20


def memory_ratios(memory: Mapping | None, reference: str = "resnet101") -> dict[str, float]:
    """Each model's peak live training bytes over ``reference``'s, from ``mdeq.paper.measure.measure_memory``'s dict."""
    models = (memory or {}).get("models", {})
    if reference not in models:
        return {}
    ref = models[reference]["peak_bytes"]
    return {k: m["peak_bytes"] / ref for k, m in models.items()}


def plot_training_memory(memory: Mapping | None, kind: str, numbers: Mapping | None = None, *,
                         reference: str = "resnet101"):
    """Fig. 4b's memory: peak live tensor bytes of one training step per model, split by component, with
    each model's ratio to ResNet-101 and the paper's bound beside it; and MDEQ-small's peak against the
    forward iteration budget, implicit backward (flat) against backpropagation through the unrolled solver."""
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10.5, 3.8), gridspec_kw={"width_ratios": [1.6, 1]})
    title = "Peak training memory (live tensor bytes) of one training step, CIFAR-10 input"
    models = (memory or {}).get("models", {})
    if reference not in models:
        for a in (ax, bx):
            no_data(a, f"{NOT_RUN}: no live-tensor-bytes measurement")
        fig.suptitle(figure_title(title, kind))
        return fig
    numbers = numbers if numbers is not None else paper_numbers()
    bound = {s["key"]: s for s in numbers["fig4b"]["statements"]}["mdeq_train_memory_saving_vs_resnets"]["value"]
    ratios = memory_ratios(memory, reference)
    keys = list(models)
    bottom = np.zeros(len(keys))
    for part, label, colour in _MEMORY_PARTS:
        vals = np.array([models[k][part] / MIB for k in keys])
        ax.bar(range(len(keys)), vals, bottom=bottom, color=colour, label=label)
        bottom += vals
    for i, k in enumerate(keys):
        ax.text(i, bottom[i], f"{ratios[k]:.2f}x", ha="center", va="bottom", fontsize=7)
    ref_mib = models[reference]["peak_bytes"] / MIB
    ax.axhline(bound * ref_mib, color="#c44e52", lw=1.0, ls="--",
               label=f"paper: MDEQ < {bound:g} x ResNet-101 (> {1 - bound:.0%} saved)")
    labels = [_sized(models[k]) + (" unrolled" if k.endswith("_unrolled") else "") for k in keys]
    ax.set_xticks(range(len(keys)), labels, rotation=35, ha="right")
    ax.set_ylabel("peak live tensor MiB (ratio to ResNet-101 on top)")
    ax.set_title(f"batch {memory['batch_size']}")
    ax.grid(axis="x", visible=False)
    ax.set_ylim(0, 1.5 * max(bottom))
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    curve = memory.get("curve") or {}
    if not curve.get("implicit"):
        no_data(bx, f"{NOT_RUN}: no budget curve")
    else:
        m = (curve.get("implicit") or [{}])[0].get("broyden_memory")
        implicit = "implicit (IFT) backward" + (f", Broyden memory {m}" if m else "")
        for grad, colour, style, label in (("implicit", COLORS["mdeq_small"], "-o", implicit),
                                           ("unrolled", COLORS["mdeq_large_unrolled5"], "--s",
                                            "backprop through the unrolled solver")):
            rows = curve.get(grad) or []
            budgets = [r["max_iter"] for r in rows]
            bx.plot(budgets, [r["peak_bytes"] / MIB for r in rows], style, color=colour, label=label, ms=4)
        bx.set_xscale("log", base=2)
        bx.set_xticks(curve["budgets"], [str(b) for b in curve["budgets"]])
        bx.set_xlabel("forward iteration budget (f evaluations)")
        bx.set_ylabel("peak live tensor MiB")
        bx.set_title(f"{curve['label']}, batch {memory['batch_size']}")
        bx.legend(fontsize=7)
    fig.suptitle(figure_title(f"{title}; measured on {memory.get('hardware', '?')}", kind))
    fig.tight_layout()
    return fig


def plot_segmentation_examples(folder: str | Path | None, kind: str):
    """Fig. 8: input, prediction and ground truth (Cityscapes palette, void in black) per example."""
    # Imported here: the palette comes from cityscapesscripts, an optional dependency (the data extra).
    from mdeq.engine.data import train_ids_to_color

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


def _sized(entry: Mapping) -> str:
    """A measured model's label with its size: "MDEQ (9.0M)", "ANODE (172K)" (from its parameter count)."""
    n = entry.get("params")
    if not n:
        return entry["label"]
    return f"{entry['label']} ({n / 1e6:.1f}M)" if n >= 1e6 else f"{entry['label']} ({n / 1e3:.0f}K)"


def _band(ax, stats: Mapping, label: str, colour: str, style: str) -> None:
    """Mean ± std over batches, drawn only as far as every batch's solve went, with an x where one diverged
    and stopped (a mean over the survivors would be a different curve)."""
    mean = np.asarray(stats["mean"], dtype=float)
    std = np.asarray(stats["std"], dtype=float)
    diverged = False
    if "count" in stats:
        full = np.asarray(stats["count"]) == stats["n_batches"]
        end = len(full) if full.all() else int(np.argmin(full))
        mean, std = mean[:end], std[:end]
        diverged = end < len(full)
    x = np.arange(1, len(mean) + 1)
    ax.plot(x, mean, style, color=colour, label=label)
    if diverged and len(mean):  # an x where the first batch's solve diverged (unlabelled: the caption says so)
        ax.plot(x[-1:], mean[-1:], "x", color=colour, ms=7, mew=1.5)
    lo = np.clip(mean - std, mean * 1e-2, None)
    ax.fill_between(x, lo, mean + std, color=colour, alpha=0.15, lw=0)


_MEASURES = {  # trace key suffix -> y label
    "_step": "||z[i+1] - z[i]|| / ||z[i]||",
    "": "||f(z) - z|| / ||f(z)||",
}


def _curve_label(key: str, curve: Mapping) -> str:
    """"Broyden, initial weights" / "iterating f, trained, epoch 4 of 50, step 1800" (older traces: by key)."""
    solver = "Broyden" if key.startswith("broyden") else "iterating f"
    weights = curve.get("weights")
    if not isinstance(weights, str) or "/" in weights or weights.startswith("initial ("):
        return _CURVE_STYLE.get(key, (key,))[0]
    return f"{solver}, {weights}"


def _shared_legend(fig, axes) -> None:
    """One legend for the figure, below the panels, from the labels of every panel."""
    seen: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    if seen:
        fig.legend(seen.values(), seen.keys(), loc="lower center", ncol=min(len(seen), 2), fontsize=8, frameon=False)


def plot_convergence(traces: Mapping | None, kind: str, *, direction: str = "forward"):
    """Figs. 5/6: the paper's ||z[i+1] - z[i]|| / ||z[i]|| (top row) and the residual ||f(z) - z|| / ||f(z)||
    (bottom row) against f evaluations at the three resolutions, mean ± std over batches. Traces measured
    before the paper's measure was recorded have the residual row only."""
    datasets = (traces or {}).get("datasets", {})
    rows = [m for m in _MEASURES if any(direction + m in c for e in datasets.values()
                                           for c in e.get("curves", {}).values())] or ["_step"]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9.0, 2.3 * len(rows) + 1.1), squeeze=False)
    what = "forward" if direction == "forward" else "backward (IFT)"
    for r, measure in enumerate(rows):
        for ax, dataset in zip(axes[r], _DATASET_TITLES):
            entry = datasets.get(dataset)
            curves = {k: v for k, v in (entry or {}).get("curves", {}).items() if direction + measure in v}
            if not curves:
                no_data(ax, f"{NOT_RUN}: no {what} traces\nfor {_DATASET_TITLES[dataset]}")
                ax.set_title(_DATASET_TITLES[dataset], fontsize=8.5)
                continue
            for key, c in sorted(curves.items()):
                _, colour, style = _CURVE_STYLE.get(key, (key, "mdeq", "-"))
                _band(ax, c[direction + measure], _curve_label(key, c), COLORS[colour], style)
            ax.set_yscale("log")
            ax.set_xlabel("number of f evaluations" if direction == "forward" else "number of VJP evaluations")
            h, w = entry["input_hw"]
            ax.set_title(f"{_DATASET_TITLES[dataset]} {h}x{w}\n{entry['config']}, batch {entry['batch']}",
                         fontsize=8)
            if ax is axes[r][0]:
                ax.set_ylabel(_MEASURES[measure], fontsize=8)
    _shared_legend(fig, axes)
    fig.suptitle(figure_title(f"Convergence to equilibrium, {what} pass", kind))
    fig.tight_layout(rect=(0, 0.09 if len(rows) > 1 else 0.14, 1, 1))
    return fig


def plot_per_scale(traces: Mapping | None, kind: str):
    """Fig. 7: per-scale ||z_i[k+1] - z_i[k]|| / ||z_i[k]|| (left; the paper's) and residual (right) of the
    CIFAR-10 MDEQ and the single-stream DEQ, Broyden forward solve, mean ± std over batches."""
    ps = (traces or {}).get("per_scale", {})
    measures = [m for m in _MEASURES if any(f"scales{m}" in v for v in ps.values())] or ["_step"]
    fig, axes = plt.subplots(1, len(measures), figsize=(4.8 * len(measures), 3.9), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        if not ps:
            no_data(ax, f"{NOT_RUN}: no per-scale traces")
            continue
        if "mdeq" in ps and f"scales{measure}" in ps["mdeq"]:
            m = ps["mdeq"]
            for i, st in enumerate(m[f"scales{measure}"]):
                _band(ax, st, f"MDEQ-small scale {i + 1} ({m['channels'][i]} ch.), {m['weights']}",
                      SCALE_COLORS[i % len(SCALE_COLORS)], "-")
        if "single_stream" in ps and f"scales{measure}" in ps["single_stream"]:
            single = ps["single_stream"]
            _band(ax, single[f"scales{measure}"][0], f"single-stream DEQ, {single['weights']}",
                  COLORS["single_stream"], "--")
        ax.set_yscale("log")
        ax.set_xlabel("number of f evaluations")
        ax.set_ylabel(f"per scale: {_MEASURES[measure]}", fontsize=8)
    _shared_legend(fig, axes)
    fig.suptitle(figure_title("Per-scale convergence on CIFAR-10 (Broyden, forward)", kind))
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    return fig


# ----------------------------------------------------------------------------------------------
# Beyond the paper, with trained weights (mdeq.paper.inference): accuracy against the forward budget, and
# convergence against the input size.

_SOLVER_LABELS = {"broyden": "Broyden", "fixed_point": "iterating f"}
EXTENSION_NOTE = "ours, beyond the paper"
THRESHOLDS_DEFAULT = (1e-2, 1e-3)  # mdeq.paper.inference.THRESHOLDS (report imports no measuring module)


def _measured_source(ctx, kind: str, data: str, prov: Mapping | None) -> str:
    return ctx.source(kind, data, describe_hardware((prov or {}).get("hardware")))


def _leading(rows: list[dict], first=("table", "setting", "row", "key", "metric", "paper", "ours", "delta")):
    """``rows`` as a DataFrame whose first columns are those a reader scans (the rest follow as found)."""
    df = pd.DataFrame(rows)
    return df[[c for c in first if c in df.columns] + [c for c in df.columns if c not in first]]


def budget_table(ctx, kind: str, measured: Mapping | None) -> pd.DataFrame:
    """One row per run, solver and forward budget k (``benchmarks/accuracy_vs_budget.py``): test top-1 (%) when
    the forward solve stops after k steps, the residual of the returned iterate, the top-1 of the last iterate,
    and the share of images predicted as the config's own evaluation predicts them; and the injection alone.
    The paper reports no such curve (``paper`` is empty)."""
    rows = []
    status = SMOKE_NOTE if kind == "smoke" else "measured"
    for run, entry in ((measured or {}).get("runs") or {}).items():
        res, data = entry["result"], entry["data"]
        setting = f"{run}, {entry['weights']['weights']}"
        source = _measured_source(ctx, kind, f"{data['label']}, {data['images']} images", measured.get("provenance"))
        common = {"table": "accuracy against the forward budget", "setting": setting, "metric": "test top-1 (%)",
                  "paper": None, "delta": None, "training_budget": res["training_budget"], "ours_source": source,
                  "status": status, "note": EXTENSION_NOTE}
        for solver, sr in res["solvers"].items():
            for r in sr["rows"]:
                rows.append({**common, "row": f"{_SOLVER_LABELS.get(solver, solver)}, max_iter {r['max_iter']}",
                             "key": f"{solver}_{r['max_iter']}", "solver": solver, "max_iter": r["max_iter"],
                             "nfe": r["nfe"], "ours": round(r["top1"], 2),
                             "top1_last_iterate": round(r["top1_last_iterate"], 2),
                             "agree_with_reference": round(r["agree_with_reference"], 2)
                             if "agree_with_reference" in r else None,
                             "rel_residual_mean": r["rel_residual_mean"],
                             "rel_residual_median": r["rel_residual_median"],
                             "abs_residual_mean": r["abs_residual_mean"]})
        rows.append({**common, "row": "injection alone (the head on (x, 0, ..., 0), no f)", "key": "injection",
                     "solver": None, "max_iter": None, "nfe": 0, "ours": round(res["injection_alone"]["top1"], 2)})
    if not rows:
        rows.append({"table": "accuracy against the forward budget", "setting": "", "row": "MDEQ-small",
                     "metric": "test top-1 (%)", "paper": None, "ours": NOT_RUN, "delta": None, "ours_source": NOT_RUN,
                     "status": NOT_RUN, "note": EXTENSION_NOTE})
    return _leading(rows)


def plot_accuracy_vs_budget(measured: Mapping | None, kind: str):
    """Test top-1 (left) and the mean relative residual ||f(z) - z|| / ||f(z)|| of the returned iterate (right)
    against the forward budget max_iter k, Broyden and iterating f, the training budget T_f marked."""
    runs = (measured or {}).get("runs") or {}
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8))
    if not runs:
        for ax in axes:
            no_data(ax, f"{NOT_RUN}: benchmarks/accuracy_vs_budget.py has not been run")
    styles = ["-", "--", ":", "-."]
    for i, (run, entry) in enumerate(sorted(runs.items())):
        res = entry["result"]
        for solver, sr in res["solvers"].items():
            ks = [r["max_iter"] for r in sr["rows"]]
            label = f"{_SOLVER_LABELS.get(solver, solver)}" + (f", {run}" if len(runs) > 1 else "")
            colour = COLORS.get(solver, "#333333")
            axes[0].plot(ks, [r["top1"] for r in sr["rows"]], styles[i % 4], marker="o", ms=3.5, color=colour,
                         label=label)
            pos = [(k, r["rel_residual_mean"]) for k, r in zip(ks, sr["rows"]) if k > 0]
            axes[1].plot(*zip(*pos), styles[i % 4], marker="o", ms=3.5, color=colour, label=label)
        inj = res["injection_alone"]["top1"]
        axes[0].axhline(inj, color="#777777", lw=0.9, ls=":", label="injection alone (no f)" if i == 0 else None)
        for ax in axes:
            ax.axvline(res["training_budget"], color="#555555", lw=0.9, ls="--",
                       label=f"T_f = {res['training_budget']} (training and eval budget)" if i == 0 else None)
    if runs:
        axes[0].set_ylabel("test top-1 (%)")
        axes[1].set_ylabel("mean ||f(z) - z|| / ||f(z)|| of the returned z", fontsize=8)
        axes[1].set_yscale("log")
        for ax in axes:
            ax.set_xlabel("forward budget: max_iter k (k + 1 f evaluations; k = 0: z = 0)")
        first = next(iter(runs.values()))
        text = f"{first['weights']['weights']}; {first['data']['images']} test images of {first['data']['label']}"
        axes[0].set_title("\n".join(textwrap.wrap(text, 62)), fontsize=7.5)
        axes[1].set_title("\n".join(textwrap.wrap(
            f"the residual reached (the solver returns each image's lowest iterate in its stop mode, "
            f"{first['result']['stop_mode']})", 62)), fontsize=7.5)
    _shared_legend(fig, axes)
    fig.suptitle(figure_title("MDEQ-small on CIFAR-10: accuracy against the forward solver's budget (ours, beyond "
                              "the paper)", kind))
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def _median_evals(counts: Sequence[int | None]) -> float:
    """Median f evaluations over images, a never-reached threshold counting as infinitely many."""
    return float(np.median([math.inf if c is None else c for c in counts])) if counts else math.nan


def resolution_table(ctx, kind: str, measured: Mapping | None) -> pd.DataFrame:
    """One row per source, size and solver (``benchmarks/convergence_vs_resolution.py``): the median over images
    of the f evaluations until the paper's ||z[i+1] - z[i]|| / ||z[i]|| falls below 1e-2 (``ours``) and 1e-3,
    each image's count, and the median final values of both measures. The paper gives no such table: its
    statements are about different models at different sizes ('within 30 steps' on CIFAR-10, 'over 100' on
    Cityscapes), so ``paper`` is empty."""
    rows = []
    status = SMOKE_NOTE if kind == "smoke" else "measured"
    result = (measured or {}).get("result") or {}
    budget = result.get("budget")
    prov = ((measured or {}).get("chunks") or [None])[-1]
    for source, entry in result.get("sources", {}).items():
        label = (measured.get("sources") or {}).get(source, source)
        for size in sorted(entry["sizes"], key=int):
            for solver, cell in sorted(entry["sizes"][size].items()):
                images = cell["images"]
                row = {"table": "f evaluations to equilibrium against input size", "setting": label,
                       "row": f"{size}x{size}, {_SOLVER_LABELS.get(solver, solver)}",
                       "key": f"{source}_{size}_{solver}", "source": source,
                       "size": int(size), "solver": solver, "budget": budget,
                       "metric": "f evaluations until the median image's ||z[i+1] - z[i]|| / ||z[i]|| < 0.01",
                       "paper": None, "delta": None, "weights": measured["weights"]["weights"],
                       "ours_source": _measured_source(ctx, kind, f"{label}; {len(images)} images", prov),
                       "status": status, "note": "ours: an extension of Figs. 5-6, not in the paper"}
                for t in measured.get("thresholds", THRESHOLDS_DEFAULT):
                    counts = [im["f_evals_to"].get(f"{t:g}") for im in images]
                    med = _median_evals(counts)
                    value = int(med) if math.isfinite(med) else f"> {budget + 1} (not reached)"
                    if t == measured.get("thresholds", THRESHOLDS_DEFAULT)[0]:
                        row["ours"] = value
                    row[f"f_evals_to_{t:g}"] = value
                    row[f"f_evals_to_{t:g}_per_image"] = " ".join("-" if c is None else str(c) for c in counts)
                row["last_step_change_median"] = float(np.median([_last_finite(im["step_trace"]) for im in images]))
                row["last_rel_residual_median"] = float(np.median([_last_finite(im["rel_trace"]) for im in images]))
                rows.append(row)
    if not rows:
        rows.append({"table": "f evaluations to equilibrium against input size", "setting": "", "row": "MDEQ-small",
                     "metric": "f evaluations until ||z[i+1] - z[i]|| / ||z[i]|| < 0.01", "paper": None,
                     "ours": NOT_RUN, "delta": None, "ours_source": NOT_RUN, "status": NOT_RUN})
    return _leading(rows)



def plot_convergence_vs_resolution(measured: Mapping | None, kind: str):
    """Per source, the f evaluations until the paper's ||z[i+1] - z[i]|| / ||z[i]|| falls below 1e-2 (solid, circles)
    and 1e-3 (dashed, squares) against the input side, Broyden and iterating f: median over images, bars from the
    fewest to the most; a hollow marker on the budget line where the median image never got there."""
    result = (measured or {}).get("result") or {}
    sources = result.get("sources", {})
    fig, axes = plt.subplots(1, max(len(sources), 1), figsize=(4.6 * max(len(sources), 1), 3.9), squeeze=False)
    axes = axes[0]
    if not sources:
        no_data(axes[0], f"{NOT_RUN}: benchmarks/convergence_vs_resolution.py has not been run")
    budget = result.get("budget")
    thresholds = measured.get("thresholds", THRESHOLDS_DEFAULT) if measured else THRESHOLDS_DEFAULT
    for ax, (source, entry) in zip(axes, sources.items()):
        sizes = sorted(entry["sizes"], key=int)
        for solver in ("broyden", "fixed_point"):
            for t, style, marker in zip(thresholds, ("-", "--"), ("o", "s")):
                xs, med, lo, hi, missed = [], [], [], [], []
                for size in sizes:
                    cell = entry["sizes"][size].get(solver)
                    if cell is None:
                        continue
                    counts = [im["f_evals_to"].get(f"{t:g}") for im in cell["images"]]
                    m = _median_evals(counts)
                    reached = [c for c in counts if c is not None]
                    if math.isfinite(m):
                        xs.append(int(size))
                        med.append(m)
                        lo.append(m - min(reached))
                        hi.append((max(reached) if len(reached) == len(counts) else budget + 1) - m)
                    else:
                        missed.append(int(size))
                colour = COLORS.get(solver, "#333333")
                label = f"{_SOLVER_LABELS.get(solver, solver)}, to {t:g}"
                if xs:
                    ax.errorbar(xs, med, yerr=[lo, hi], fmt=style, marker=marker, ms=4, color=colour, capsize=2.5,
                                label=label)
                if missed:
                    ax.plot(missed, [budget + 1] * len(missed), marker, mfc="none", color=colour, ms=6,
                            label=None if xs else label)
        if budget is not None:
            ax.axhline(budget + 1, color="#777777", lw=0.8, ls=":")
            ax.text(int(sizes[0]), budget + 1, f" budget: {budget + 1} f evaluations", fontsize=7, va="bottom",
                    color="#555555")
        ax.set_xscale("log", base=2)
        ax.set_xticks([int(s) for s in sizes], [f"{s}" for s in sizes])
        ax.set_xlabel("input side (pixels; square images)")
        ax.set_ylabel("f evaluations until ||z[i+1] - z[i]|| / ||z[i]|| < threshold", fontsize=7.5)
        ax.set_title("\n".join(textwrap.wrap((measured.get("sources") or {}).get(source, source), 60)[:3]), fontsize=7)
    _shared_legend(fig, axes)
    weights = (measured or {}).get("weights", {}).get("weights", "")
    fig.suptitle(figure_title("Our extension of Figs. 5-6 (not in the paper): convergence against input size, "
                              f"CIFAR-10 MDEQ-small\n{weights}", kind), fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def budget_summary(measured: Mapping | None) -> str:
    """A few sentences with the numbers of ``accuracy_vs_budget.json``: the accuracy at k = 1, 2, T_f and the
    largest budget per solver, the residual at T_f, and the injection alone (nothing typed by hand)."""
    runs = (measured or {}).get("runs") or {}
    if not runs:
        return f"accuracy against the forward budget: {NOT_RUN}"
    lines = []
    for run, entry in sorted(runs.items()):
        res = entry["result"]
        t_f = res["training_budget"]
        lines.append(f"{run} ({entry['weights']['weights']}; {entry['data']['images']} test images of "
                     f"{entry['data']['label']}):")
        for solver, sr in res["solvers"].items():
            by_k = {r["max_iter"]: r for r in sr["rows"]}
            shown = [k for k in (1, 2, t_f, max(by_k)) if k in by_k]
            line = f"  {_SOLVER_LABELS.get(solver, solver)}: " + ", ".join(
                f"k={k}: {by_k[k]['top1']:.2f}%" for k in dict.fromkeys(shown))
            if t_f in by_k:
                line += f"; mean relative residual at T_f = {t_f}: {by_k[t_f]['rel_residual_mean']:.2e}"
            if 1 in by_k and by_k[1].get("agree_with_reference") is not None:
                line += (f"; at k=1, {by_k[1]['agree_with_reference']:.1f}% of the images get the class Broyden "
                         f"gives at T_f")
            lines.append(line)
        lines.append(f"  injection alone (no f): {res['injection_alone']['top1']:.2f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Table 1's data question: how each trained model reads JPEG artifacts (benchmarks/jpeg_sensitivity.py).

def _version_label(name: str) -> str:
    return {"exact": "exact pixels", "dataset_q75": "data set's JPEG-q75 twin"}.get(
        name, name.replace("pil_q", "PIL JPEG q"))


def jpeg_table(measured: Mapping | None) -> pd.DataFrame:
    """One row per (run, version of the exact test images): PSNR, accuracy, change against the exact
    pixels and McNemar's test of that change; empty where nothing was measured."""
    rows = []
    for run, r in ((measured or {}).get("runs") or {}).items():
        for name, acc in r["accuracy"].items():
            test = r["mcnemar_vs_exact"].get(name, {})
            rows.append({"run": run, "step": r["global_step"], "epochs_done": f"{r['epoch']} of {r['epochs_planned']}",
                         "version": _version_label(name), "psnr_db": (None if name == "exact" else
                                                                     round(measured["psnr_db"][name], 2)),
                         "accuracy": round(acc, 2), "change_vs_exact": round(acc - r["accuracy"]["exact"], 2),
                         "right_on_exact_only": test.get("b_right_on_exact_only"),
                         "right_on_version_only": test.get("c_right_on_version_only"),
                         "mcnemar_chi2": None if not test else round(test["chi2"], 2),
                         "mcnemar_p": None if not test else float(f"{test['p_exact']:.3g}")})
    return pd.DataFrame(rows)


def plot_jpeg_sensitivity(measured: Mapping | None, labels: Mapping[str, str]):
    """Accuracy against PSNR (dB, against the exact pixels) per model; the exact pixels at the right end,
    the data set's own JPEG-q75 twins as an open marker (they are what every model was trained on)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    runs_ = ((measured or {}).get("runs") or {})
    if not runs_:
        no_data(ax, "no measurement: python benchmarks/jpeg_sensitivity.py")
        return fig
    psnr = measured["psnr_db"]
    pil = sorted((k for k in psnr if k.startswith("pil_q")), key=lambda k: psnr[k])
    exact_x = max(psnr.values()) + 4.0
    for run, r in runs_.items():
        colour = COLORS.get(run.split("_", 1)[1])
        xs = [psnr[k] for k in pil] + [exact_x]
        ys = [r["accuracy"][k] for k in pil] + [r["accuracy"]["exact"]]
        ax.plot(xs, ys, "-o", color=colour, ms=4, label=f"{labels.get(run, run)} ({r['epoch']} of {r['epochs_planned']} epochs, step {r['global_step']})")
        ax.plot([psnr["dataset_q75"]], [r["accuracy"]["dataset_q75"]], "s", mfc="none", color=colour, ms=8)
    ax.set_xticks([psnr[k] for k in pil] + [exact_x])
    ax.set_xticklabels([f"{psnr[k]:.1f}\n{k.replace('pil_', '')}" for k in pil] + ["exact"], fontsize=8)
    ax.set_xlabel("PSNR against the exact pixels (dB)")
    ax.set_ylabel(f"test accuracy (%), {measured['images']:,} exact test images")
    ax.set_title("Accuracy as the JPEG artifacts grow (squares: the data set's own JPEG-q75)")
    ax.legend(fontsize=8)
    return fig
