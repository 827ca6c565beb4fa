"""What the paper-vs-ours tables say: Tables 1-3 from one column spec, Fig. 4b, Figs. 5-6 (beyond the paper:
``mdeq.paper.report.beyond_tables``).

Paper numbers come from ``results/paper_numbers.yaml`` and stay labelled as the paper's; a row without our log
says "not run yet", never the paper's number. Run logs are read through ``mdeq.engine.runlog``, measurements
as the plain dicts ``mdeq.paper.measure`` and ``benchmarks/`` write; nothing is written here
(``mdeq.paper.notebook`` saves). The numbers a figure shares with a table (``memory_ratios``, the median f
evaluations to a threshold) are defined here once and drawn by ``mdeq.paper.report.plots``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from mdeq.engine import paths
from mdeq.engine.runlog import RunLog, read_runs, run_hardware
from mdeq.paper.report.style import BEST, NOT_RUN, SMOKE_NOTE, PageTable, _CURVE_STYLE, _DATASET_TITLES, _curve_label

__all__ = ["paper_numbers", "best_epoch", "Column", "PaperTable", "PAPER_TABLES", "paper_table", "show_table", "table_fig4b",
           "memory_ratios", "convergence_table", "per_epoch_table",
           "format_per_epoch"]

PAPER_NUMBERS = paths.RESULTS / "paper_numbers.yaml"


def paper_numbers(path: str | Path = PAPER_NUMBERS) -> dict:
    """``results/paper_numbers.yaml`` as a dict (the paper's numbers; never ours)."""
    with open(path) as fh:
        return yaml.safe_load(fh)


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
    hw = sorted(set().union(*(run_hardware(r.provenance) for r in runs)))
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


def best_epoch(run: RunLog, column: str, scale: float = 1.0) -> tuple[int, float] | None:
    """The evaluated epoch (1-based) with the highest ``column`` in ``metrics.csv``, and that value x ``scale``."""
    series = run.series(column)
    if not series:
        return None
    epoch, value = max(series, key=lambda t: t[1])
    return epoch + 1, value * scale


def _row(table: str, row: str, metric: str, paper: float | None, runs: Sequence[RunLog], values: Sequence,
         ctx, kind: str, *, paper_std: float | None = None, paper_params: float | None = None,
         setting: str = "", best: Sequence | None = None) -> dict:
    mean, std = mean_std(values)
    ours_params = runs[0].meta("num_params") if runs else None
    out = {
        "table": table, "setting": setting, "row": row, "metric": metric,
        "paper": paper, "paper_std": paper_std,
        # full precision: the CSV rounds once (notebook.save_table)
        "ours": mean if mean is not None else ("no epoch evaluated yet" if runs else NOT_RUN),
        "ours_std": std,
        # no delta for an unfinished run: its number is an intermediate epoch's, not a result
        "delta": (mean - paper if (mean is not None and paper is not None and kind != "smoke"
                                   and all(r.finished for r in runs)) else None),
    }
    if best is not None:  # beside ours, for reference only: the mean of each run's best epoch, and those epochs
        found = [b for b in best if b is not None]
        out["ours_best"] = mean_std([v for _, v in found])[0] if found else None
        out["ours_best_epoch"] = "; ".join(str(e) for e, _ in found) or None
    return {**out, "paper_params": paper_params, "ours_params": ours_params,
            "ours_source": runs_source(ctx, kind, runs) or NOT_RUN, "status": _status(kind, runs)}


@dataclass(frozen=True)
class Column:
    """One number a paper table reports per row: where the paper's value and ours are found."""

    metric: str  # the text of the table's "metric" column
    paper: str  # key of the paper's value in a row of results/paper_numbers.yaml
    ours: tuple[str, ...]  # keys of our value in final.json (dotted) or metrics.csv; the first present wins
    scale: float = 1.0  # ours x scale (mIoU is logged as a fraction, the paper prints %)
    paper_std: str | None = None  # key of the paper's std over runs, where it gives one
    # a metrics.csv column whose best epoch is shown beside ours, for reference only: the released training
    # script kept the best test epoch (locuslab/mdeq tools/cls_train.py), the paper does not say which it reports
    best: str | None = None


@dataclass(frozen=True)
class PaperTable:
    title: str
    columns: tuple[Column, ...]
    setting: bool = False  # rows carry the paper's "setting" (Table 1: with or without augmentation)


PAPER_TABLES = {
    # An unfinished run's number is its latest epoch's (metrics.csv), shown without a delta.
    "table1": PaperTable("Table 1", (Column("test accuracy (%)", "accuracy", ("final", "final_eval.top1", "eval_top1"),
                                           paper_std="accuracy_std", best="eval_top1"),), setting=True),
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
                best = [best_epoch(r, col.best, col.scale) for r in runs] if col.best else None
                rows.append(_row(spec.title, name, col.metric, pr[col.paper], runs, values, ctx, kind,
                                 paper_std=pr[col.paper_std] if col.paper_std else None,
                                 paper_params=pr["params"], setting=pr["setting"] if spec.setting else "",
                                 best=best))
    return pd.DataFrame(rows)


def per_epoch_table(ctx, kind: str, models: Sequence, *, column: str = "eval_top1",
                    metric: str = "test top-1 (%)", scale: float = 1.0) -> pd.DataFrame:
    """Every evaluated epoch (1-based) of each run of ``models`` (``mdeq.paper.runs.RunSpec``) side by side:
    ``column`` of ``metrics.csv`` and, for a DEQ, the mean forward residual of its training solves.

    One column per run and quantity, named by the model's label (and ``run k`` for its further seeds), so that
    runs compared in the text (the two injections of MDEQ-small) are read from one place, never copied by hand."""
    columns = {}
    for spec in models:
        for i, run in enumerate(read_runs(ctx.logs_dir(kind), spec.key)):
            label = spec.label if i == 0 else f"{spec.label} (run {i + 1})"
            columns[f"{label}: {metric}"] = {e + 1: v * scale for e, v in run.series(column)}
            columns[f"{label}: forward residual"] = {e + 1: v for e, v in run.series("rel_residual_forward")}
    columns = {k: v for k, v in columns.items() if v}
    if not columns:
        return pd.DataFrame({"epoch": []})
    return pd.DataFrame(columns).sort_index().rename_axis("epoch").reset_index()

def format_per_epoch(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """``per_epoch_table`` as the notebook shows it: accuracies to 2 decimals, residuals as 9.4e-03, "-" where a
    run has not reached the epoch; a smoke table says so in its index name."""
    if df.empty:
        return pd.DataFrame({"per epoch": [f"{NOT_RUN}: no evaluated epoch in the logs"]})
    out = df.set_index("epoch")
    for c in out.columns:
        fmt = "{:.1e}" if c.endswith("forward residual") else "{:.2f}"
        out[c] = [("-" if _isnan(v) else fmt.format(v)) for v in out[c]]
    out.index.name = f"epoch ({SMOKE_NOTE})" if kind == "smoke" else "epoch"
    return out

def show_table(df, kind: str, csv: str | Path | None = None) -> PageTable:
    """The table as a page shows it (``PageTable``): few columns (value ± std, sizes as "paper / ours"), rows
    grouped by setting, the metric named once; the full table (sources, notes, keys) is the CSV, named in the
    caption."""
    def pm(v, sd):
        if v is None or (isinstance(v, float) and _isnan(v)):
            return ""
        text = f"{v:.2f}" if isinstance(v, float) else str(v)
        return text + (f" ± {sd:.2f}" if sd is not None and not _isnan(sd) else "")

    shown = {}
    for c in ("setting", "row", "metric"):
        if c in df.columns and df[c].astype(str).str.len().gt(0).any():
            shown[c] = df[c].fillna("")
    if "metric" in shown and "row" in shown and shown["metric"].equals(shown["row"]):
        del shown["metric"]  # Fig. 4b's rows are their metrics
    shown["paper"] = [pm(v, s) for v, s in zip(df["paper"], df.get("paper_std", [None] * len(df)))]
    shown["ours"] = [pm(v, s) for v, s in zip(df["ours"], df.get("ours_std", [None] * len(df)))]
    if kind != "smoke" and "delta" in df.columns and df["delta"].notna().any():
        shown["delta"] = [pm(v, None) for v in df["delta"]]
    if "ours_best" in df.columns and df["ours_best"].notna().any():
        shown[BEST] = [f"{pm(v, None)} (epoch {e})" if pm(v, None) else ""
                       for v, e in zip(df["ours_best"], df["ours_best_epoch"])]
    if "paper_params" in df.columns:
        ours = df.get("ours_params", df["paper_params"])
        shown["params (paper / ours)"] = [f"{fmt_params(a)} / {fmt_params(b)}"
                                          for a, b in zip(df["paper_params"], ours)]
    if "status" in df.columns:
        shown["status"] = df["status"]
    title = "Paper vs ours" + (f" ({SMOKE_NOTE}: no comparison with the paper is meant)" if kind == "smoke" else "")
    if csv is not None:
        title += f". Every column, with the data and hardware behind each number: {paths.rel(csv)}"
    return PageTable(pd.DataFrame(shown).reset_index(drop=True), title)


def table_fig4b(ctx, kind: str, measure: Mapping | None, numbers: Mapping | None = None,
                memory: Mapping | None = None) -> pd.DataFrame:
    """The numbers Section 4.4 states, next to ours from the runtime/memory measurement.

    With ``memory`` (``mdeq.paper.measure.memory.measure_memory``'s live tensor bytes) the memory row is its ratio of
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
                     "ours": v if v is not None else NOT_RUN,  # full precision, as in _row
                     "delta": v - paper if v is not None and kind != "smoke" else None,
                     "paper_note": st[key]["text"], "ours_source": sources.get(key, source),
                     "status": (SMOKE_NOTE if kind == "smoke" else "measured") if v is not None else NOT_RUN})
    return pd.DataFrame(rows)


def memory_ratios(memory: Mapping | None, reference: str = "resnet101") -> dict[str, float]:
    """Each model's peak live training bytes over ``reference``'s, from ``mdeq.paper.measure.memory.measure_memory``'s dict."""
    models = (memory or {}).get("models", {})
    if reference not in models:
        return {}
    ref = models[reference]["peak_bytes"]
    return {k: m["peak_bytes"] / ref for k, m in models.items()}


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
