"""What each figure draws: training curves, Fig. 4b's runtime and memory, Figs. 5-7's convergence, Fig. 8's examples.

The same for ours beyond the paper: accuracy against the forward budget, convergence against the input
size, JPEG sensitivity. Each figure is drawn from run logs (read through ``mdeq.engine.runlog``) or from the
plain dict a measurement returns, in the style of ``mdeq.paper.report.style``; it computes nothing and writes
nothing (``mdeq.paper.notebook`` saves). A panel with nothing to draw says why, never a fabricated curve; the
numbers a figure shares with a table come from ``mdeq.paper.report.tables``.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image

from mdeq.engine import paths
from mdeq.engine.runlog import RunLog, read_json, read_runs
from mdeq.paper.report.style import (COLORS, DASHED, NOT_RUN, SCALE_COLORS, _CURVE_STYLE, _DATASET_TITLES,
                                     _SOLVER_LABELS, _curve_label, figure_title, no_data)
from mdeq.paper.report.tables import THRESHOLDS_DEFAULT, _median_evals, memory_ratios, paper_numbers

__all__ = ["plot_training_curves", "plot_training_panels", "plot_runtime_memory", "plot_training_memory",
           "plot_segmentation_examples", "plot_convergence", "plot_per_scale", "plot_accuracy_vs_budget",
           "plot_convergence_vs_resolution", "plot_jpeg_sensitivity"]

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


# ----------------------------------------------------------------------------------------------
# Beyond the paper, with trained weights (mdeq.paper.inference): accuracy against the forward budget, and
# convergence against the input size.

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


# ----------------------------------------------------------------------------------------------
# Table 1's data question: how each trained model reads JPEG artifacts (benchmarks/jpeg_sensitivity.py).

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
