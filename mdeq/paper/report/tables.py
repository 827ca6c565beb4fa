"""What the paper-vs-ours tables say: Tables 1-3 from one column spec, Fig. 4b, Figs. 5-6, and ours beyond the paper.

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
from mdeq.engine.runlog import RunLog, describe_hardware, read_runs, run_hardware
from mdeq.paper.report.style import (BEST, NOT_RUN, SMOKE_NOTE, PageTable, _CURVE_STYLE, _DATASET_TITLES,
                                     _SOLVER_LABELS, _curve_label)

__all__ = ["paper_numbers", "best_epoch", "Column", "PaperTable", "PAPER_TABLES", "paper_table", "show_table", "table_fig4b",
           "memory_ratios", "convergence_table", "budget_table", "resolution_table", "budget_summary", "jpeg_table"]

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
        "ours": round(mean, 4) if mean is not None else ("no epoch evaluated yet" if runs else NOT_RUN),
        "ours_std": round(std, 4) if std is not None else None,
        # no delta for an unfinished run: its number is an intermediate epoch's, not a result
        "delta": (round(mean - paper, 4) if (mean is not None and paper is not None and kind != "smoke"
                                             and all(r.finished for r in runs)) else None),
    }
    if best is not None:  # beside ours, for reference only: the mean of each run's best epoch, and those epochs
        found = [b for b in best if b is not None]
        out["ours_best"] = round(mean_std([v for _, v in found])[0], 4) if found else None
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
                     "ours": round(v, 4) if v is not None else NOT_RUN,
                     "delta": round(v - paper, 4) if v is not None and kind != "smoke" else None,
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


# ----------------------------------------------------------------------------------------------
# Beyond the paper, with trained weights (mdeq.paper.inference): accuracy against the forward budget, and
# convergence against the input size.

EXTENSION_NOTE = "ours, beyond the paper"
THRESHOLDS_DEFAULT = (1e-2, 1e-3)  # mdeq.paper.inference.THRESHOLDS (report imports no measuring module)


def _measured_source(ctx, kind: str, data: str, prov: Mapping | None) -> str:
    return ctx.source(kind, data, describe_hardware((prov or {}).get("hardware")))


def _leading(rows: list[dict], first=("table", "setting", "row", "key", "metric", "paper", "ours", "delta")):
    """``rows`` as a DataFrame whose first columns are those a reader scans (the rest follow as found)."""
    df = pd.DataFrame(rows)
    return df[[c for c in first if c in df.columns] + [c for c in df.columns if c not in first]]


def budget_table(ctx, kind: str, measured: Mapping | None) -> pd.DataFrame:
    """One row per run, solver and forward budget k (``studies/accuracy_vs_budget.py``): test top-1 (%) when
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


def _median_evals(counts: Sequence[int | None]) -> float:
    """Median f evaluations over images, a never-reached threshold counting as infinitely many."""
    return float(np.median([math.inf if c is None else c for c in counts])) if counts else math.nan


def resolution_table(ctx, kind: str, measured: Mapping | None) -> pd.DataFrame:
    """One row per source, size and solver (``studies/convergence_vs_resolution.py``): the median over images
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
# Table 1's data question: how each trained model reads JPEG artifacts (studies/jpeg_sensitivity.py).

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
