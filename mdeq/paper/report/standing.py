"""Where do the Table 1 runs stand? ``results/table_1_standing.md``, written from the runs' logs for the pages.

Why generated: the pages about the CPU campaign (``docs/cpu_campaign.md``, ``docs/results.md``,
``docs/table1_gaps.md``) quoted each run's latest epoch, its best epoch, its training accuracy, evaluation loss and
forward residual, and how the two injections of MDEQ-small compare, by hand; every epoch of the campaign made a
quote stale. Those pages now include this file (MyST ``{include}``), which ``python -m mdeq.reproduce --readme``
and ``--profile logs`` rewrite with the README's table, and ``tests/test_standing.py`` fails, naming that command,
when the committed file differs from what the committed logs give. Nothing here is typed: every number is read
from ``results/runs/<run>/metrics.csv`` (the fully evaluated epochs) and ``provenance.json`` (chunk hours).
"""
from __future__ import annotations

import math
from pathlib import Path

from mdeq.engine import paths
from mdeq.engine.runlog import RunLog, chunk_hours, last_logged_step, read_run
from mdeq.paper.runs import runs_for

__all__ = ["STANDING", "COMMAND", "COMPARED", "run_row", "comparison", "render", "write"]

STANDING = paths.RESULTS / "table_1_standing.md"
COMMAND = "python -m mdeq.reproduce --readme"
# (run, against): pairs of Table 1 runs the pages compare epoch by epoch (docs/table1_gaps.md, the injection row).
COMPARED = (("cifar10_mdeq_small_simple_injection", "cifar10_mdeq_small"),)
_COLUMNS = ("run", "epochs", "last test top-1 (%)", "best test top-1 (%)", "train accuracy (%)", "evaluation loss",
            "forward residual", "chunk hours")


def _number(text) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _by_epoch(run: RunLog, column: str = "eval_top1") -> dict[int, float]:
    """``column`` (default test top-1) by 1-based epoch."""
    return {epoch + 1: value for epoch, value in run.series(column)}


def run_row(label: str, run: RunLog | None) -> dict[str, str]:
    """One run's line: epochs done of planned, the last and best evaluated epochs, the last epoch's training
    accuracy, evaluation loss and (a DEQ's) mean forward residual of its training solves, and chunk hours."""
    row = dict.fromkeys(_COLUMNS, "-")
    row["run"] = label
    if run is None:
        row["epochs"] = "not started"
        return row
    top1 = _by_epoch(run)
    row["epochs"] = f"{run.epochs_done} of {run.epochs_planned or '?'}" + (" (finished)" if run.finished else "")
    if not run.epochs_done and last_logged_step(run.path):  # started, no epoch evaluated yet
        row["epochs"] += f" (first epoch begun: step {last_logged_step(run.path)} logged)"
    row["chunk hours"] = f"{chunk_hours(run.path):.2f}"
    if not top1:
        return row
    last = max(top1)
    best = max(top1, key=lambda e: (top1[e], -e))  # the first epoch with the best value
    row["last test top-1 (%)"] = f"{top1[last]:.2f} (epoch {last})"
    row["best test top-1 (%)"] = f"{top1[best]:.2f} (epoch {best})"
    final = run.epoch_rows[-1]
    for column, key, fmt in (("train accuracy (%)", "train_acc", "{:.1f}"), ("evaluation loss", "eval_loss", "{:.2f}"),
                             ("forward residual", "rel_residual_forward", "{:.1e}")):
        value = _number(final.get(key))
        if value is not None:
            row[column] = fmt.format(value)
    return row


def _listed(epochs: list[int]) -> str:
    return f" ({', '.join(map(str, epochs))})" if epochs else ""


def comparison(run: RunLog, label: str, against: RunLog, against_label: str) -> str:
    """How ``run`` compares with ``against`` over the epochs both have evaluated: at how many it is ahead and
    behind (which), the means over those epochs and the last shared epoch; then the same epochs' mean training
    accuracy, which says whether one of them fits the training set faster (the maintainer's reason for the
    simplified injection: the full one "was prone to overfitting", locuslab/mdeq issue 1)."""
    mine, theirs = _by_epoch(run), _by_epoch(against)
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        return f"{label} and {against_label}: no epoch evaluated by both yet."
    ahead = [e for e in shared if mine[e] > theirs[e]]
    behind = [e for e in shared if mine[e] < theirs[e]]
    mean_mine = sum(mine[e] for e in shared) / len(shared)
    mean_theirs = sum(theirs[e] for e in shared) / len(shared)
    span = "epoch 1" if shared == [1] else f"epochs {shared[0]}-{shared[-1]}"
    return (f"Over {span}, which both have evaluated, {label} is ahead of {against_label} at {len(ahead)} "
            f"{'epoch' if len(ahead) == 1 else 'epochs'}{_listed(ahead)} and behind at {len(behind)}{_listed(behind)}; "
            f"mean {mean_mine:.2f} % against {mean_theirs:.2f} % ({mean_mine - mean_theirs:+.2f} points); at epoch "
            f"{shared[-1]} {mine[shared[-1]]:.2f} % against {theirs[shared[-1]]:.2f} %."
            + _train_means(run, against, shared))


def _train_means(run: RunLog, against: RunLog, epochs: list[int]) -> str:
    mine, theirs = _by_epoch(run, "train_acc"), _by_epoch(against, "train_acc")
    if not all(e in mine and e in theirs for e in epochs):
        return ""
    mean_mine, mean_theirs = (sum(d[e] for e in epochs) / len(epochs) for d in (mine, theirs))
    largest = max(abs(mine[e] - theirs[e]) for e in epochs)
    return (f" Training accuracy over the same epochs: mean {mean_mine:.2f} % against {mean_theirs:.2f} % "
            f"({mean_mine - mean_theirs:+.2f} points; at most {largest:.2f} points apart at any epoch).")


def render(runs_dir: Path | None = None) -> str:
    """The Markdown of ``STANDING`` from the run folders in ``runs_dir`` (default ``results/runs``)."""
    runs_dir = Path(runs_dir or paths.RESULTS / "runs")
    specs = runs_for("01_cifar10")
    logs = {s.key: read_run(runs_dir / s.key) for s in specs}
    labels = {s.key: s.label for s in specs}
    shown = [s for s in specs if logs[s.key] is not None]
    lines = [f"<!-- written by `{COMMAND}` from results/runs/*/metrics.csv and provenance.json; do not edit -->", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(run_row(s.label, logs[s.key]).values()) + " |" for s in shown]
    not_started = [s.label for s in specs if logs[s.key] is None]
    data = sorted({logs[s.key].provenance.get("data_source_label") or "not recorded" for s in shown})
    lines += ["", f"Each run: `results/runs/<run>/`, one seed; data: {'; '.join(data) or '-'}. The last "
              "and best test top-1 are of fully evaluated epochs; training accuracy, evaluation loss and the forward "
              "residual (the mean relative residual of the epoch's training solves at the 15-step budget, DEQs "
              "only) are the last epoch's; chunk hours are the wall-clock hours of the run's recorded chunks."
              + (f" No logs yet: {', '.join(not_started)}." if not_started else "")]
    for key, against in COMPARED:
        if logs.get(key) is not None and logs.get(against) is not None:
            lines += ["", comparison(logs[key], labels[key], logs[against], labels[against])]
    return "\n".join(lines) + "\n"


def write(path: Path | None = None, runs_dir: Path | None = None) -> bool:
    """Rewrite ``path`` (default ``STANDING``) from the logs; True when the file changed."""
    path = Path(path or STANDING)
    new = render(runs_dir)
    if path.is_file() and path.read_text() == new:
        return False
    path.write_text(new)
    return True
