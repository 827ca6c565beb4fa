"""What our tables beyond the paper say: the trained MDEQ-small's accuracy against the forward budget, its
convergence against the input size (``mdeq.paper.inference``), and how each Table 1 model reads JPEG artifacts.

Measurements arrive as the plain dicts ``studies/`` writes; nothing is written here (``mdeq.paper.notebook``
saves). The numbers a figure shares with a table (the median f evaluations to a threshold) are defined here once
and drawn by ``mdeq.paper.report.beyond``.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from mdeq.engine.runlog import describe_hardware
from mdeq.paper.report.style import NOT_RUN, SMOKE_NOTE, _SOLVER_LABELS
from mdeq.paper.report.tables import _last_finite

__all__ = ["budget_table", "resolution_table", "budget_summary", "jpeg_table", "EXTENSION_NOTE"]

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
