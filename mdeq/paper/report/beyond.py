"""What the figures of our measurements beyond the paper draw, from the JSON each benchmark script writes.

Accuracy against the forward solver's budget and convergence against the input size (``05_convergence``;
``studies/accuracy_vs_budget.py``, ``studies/convergence_vs_resolution.py``), and for Table 1's gaps
(``01_cifar10``) how each trained model reads JPEG artifacts (``studies/jpeg_sensitivity.py``) and how hard
MDEQ-small's equilibrium is to reach over its training (``studies/equilibrium_over_training.py``). The
paper's own figures are ``mdeq.paper.report.plots``; the same rules hold: nothing computed or written here, and a
panel with nothing to draw says why.
"""
from __future__ import annotations

import math
import textwrap
from typing import Mapping

import matplotlib.pyplot as plt

from mdeq.paper.report.plots import _shared_legend
from mdeq.paper.report.style import COLORS, NOT_RUN, _SOLVER_LABELS, figure_title, no_data
from mdeq.paper.report.beyond_tables import THRESHOLDS_DEFAULT, _median_evals

__all__ = ["plot_accuracy_vs_budget", "plot_convergence_vs_resolution", "plot_jpeg_sensitivity",
           "plot_equilibrium_over_training"]


# ----------------------------------------------------------------------------------------------
# With trained weights (mdeq.paper.inference): accuracy against the forward budget, and
# convergence against the input size.

def plot_accuracy_vs_budget(measured: Mapping | None, kind: str):
    """Test top-1 (left) and the mean relative residual ||f(z) - z|| / ||f(z)|| of the returned iterate (right)
    against the forward budget max_iter k, Broyden and iterating f, the training budget T_f marked."""
    runs = (measured or {}).get("runs") or {}
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.8))
    if not runs:
        for ax in axes:
            no_data(ax, f"{NOT_RUN}: studies/accuracy_vs_budget.py has not been run")
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
        no_data(axes[0], f"{NOT_RUN}: studies/convergence_vs_resolution.py has not been run")
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
# Table 1's data question: how each trained model reads JPEG artifacts (studies/jpeg_sensitivity.py).

def plot_jpeg_sensitivity(measured: Mapping | None, labels: Mapping[str, str]):
    """Accuracy against PSNR (dB, against the exact pixels) per model; the exact pixels at the right end,
    the data set's own JPEG-q75 twins as an open marker (they are what every model was trained on)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    runs_ = ((measured or {}).get("runs") or {})
    if not runs_:
        no_data(ax, "no measurement: python studies/jpeg_sensitivity.py")
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



# ----------------------------------------------------------------------------------------------
# Table 1's equilibrium question: is MDEQ-small's fixed point still found as training goes on?

def _epochs(rows) -> list[float]:
    """Each checkpoint's place in training, in epochs (its epoch plus the share of the next one done)."""
    per_epoch = next(((r["global_step"] - r["step_in_epoch"]) / r["epoch"] for r in rows if r["epoch"]), None)
    return [r["global_step"] / per_epoch if per_epoch else r["epoch"] for r in rows]


def plot_equilibrium_over_training(over: Mapping | None, long_solves: Mapping[str, Mapping | None],
                                   limit: float | None = None):
    """Left: the batch-mean relative residual of the training solve (16 f evaluations) and of longer solves per
    checkpoint, the campaign's limit dashed; middle: rho(J_f) at the returned iterate (mean and max over the
    samples); right: the share of samples whose long solve ends below 1e-4, per Broyden memory m.
    ``long_solves``: {label: the JSON of a ``--budget 200 --spectral-radius`` run}."""
    fig, axes = plt.subplots(1, 3, figsize=(11.0, 4.2))
    longs = {k: v for k, v in long_solves.items() if v and v.get("rows")}
    if not (over and over.get("rows")) and not longs:
        for ax in axes:
            no_data(ax, f"{NOT_RUN}: studies/equilibrium_over_training.py has not been run")
        return fig
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    if over and over.get("rows"):
        rows = [r for r in over["rows"] if r["epoch"] or r["step_in_epoch"]]
        xs = _epochs(rows)
        train_mode = [r["train_mode"] for r in rows]
        axes[0].plot(xs, [t["lowest_rel_residual_at_training_budget"] for t in train_mode], "-o", ms=3,
                     color="#333333", label=f"at {over['training_budget_f_evals']} f evaluations (the training solve)")
        axes[0].plot(xs, [t["lowest_rel_residual_at_budget"] for t in train_mode], "--o", ms=3, color="#888888",
                     label=f"after {over['budget']} (m = {over.get('memory', 12)})")
    radius_drawn = False
    for (label, data), colour in zip(longs.items(), colours):
        rows = data["rows"]
        xs = _epochs(rows)
        t = [r["train_mode"] for r in rows]
        axes[0].plot(xs, [r["lowest_rel_residual_at_budget"] for r in t], "s", ms=5, mfc="none", color=colour,
                     label=f"after up to {data['budget']}, {label}")
        if "spectral_radius_mean" in t[0] and not radius_drawn:  # the same z* to solver precision for every m
            axes[1].plot(xs, [r["spectral_radius_mean"] for r in t], "-o", ms=3, color="#333333",
                         label=f"mean over {data['batch'] * data['num_batches']} samples")
            axes[1].plot(xs, [r["spectral_radius_max"] for r in t], "--o", ms=3, color="#888888", lw=0.9, label="max")
            radius_drawn = True
        if "per_sample" in t[0]:
            axes[2].plot(xs, [100 * r["per_sample"]["share_below_1e-4_at_end"] for r in t], "-o", ms=3, color=colour,
                         label=label)
    if limit is not None:
        axes[0].axhline(limit, color="#555555", lw=0.9, ls="--", label=f"the campaign's limit ({limit:g})")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("batch mean of the lowest ||f(z) - z|| / ||f(z)||", fontsize=8)
    axes[1].axhline(1.0, color="#777777", lw=0.8, ls=":")
    axes[1].set_ylabel("rho(J_f) at z* (power method)", fontsize=8)
    axes[2].set_ylabel("samples below 1e-4 where the solve ended (%)", fontsize=8)
    axes[2].set_ylim(0, 105)
    for ax, title in zip(axes, ("the residual", "the Jacobian's spectral radius", "every sample's fixed point")):
        ax.set_xlabel("epochs of training")
        ax.set_title(title, fontsize=9)
        if ax.lines:
            ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        else:
            no_data(ax, f"{NOT_RUN}: run studies/equilibrium_over_training.py --spectral-radius 100")
    fig.suptitle("MDEQ-small's equilibrium over its training: Broyden on the same training images, train mode "
                 "(ours, beyond the paper)", fontsize=9.5)
    fig.tight_layout()
    return fig
