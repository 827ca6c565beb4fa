"""What each figure of the paper draws: training curves, Fig. 4b's runtime and memory, Figs. 5-7's convergence, Fig. 8.

Our measurements beyond the paper are drawn by ``mdeq.paper.report.beyond``. Each figure is drawn from run
logs (read through ``mdeq.engine.runlog``) or from the plain dict a measurement returns, in the style of ``mdeq.paper.report.style``; it computes nothing and writes
nothing (``mdeq.paper.notebook`` saves). A panel with nothing to draw says why, never a fabricated curve; the
numbers a figure shares with a table come from ``mdeq.paper.report.tables``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image

from mdeq.engine import paths
from mdeq.engine.runlog import RunLog, read_json, read_runs
from mdeq.paper.report.style import (COLORS, DASHED, NOT_RUN, SCALE_COLORS, _CURVE_STYLE, _DATASET_TITLES,
                                     _curve_label, figure_title, no_data)
from mdeq.paper.report.tables import memory_ratios, paper_numbers

__all__ = ["plot_training_curves", "plot_training_panels", "plot_runtime_memory", "plot_training_memory",
           "plot_segmentation_examples", "plot_convergence", "plot_per_scale"]

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
