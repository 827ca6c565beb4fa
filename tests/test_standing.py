"""Where the Table 1 runs stand (``results/table_1_standing.md``): read from the logs, never typed, and the committed
file is what the committed logs give.

``mdeq.paper.report.standing`` reads ``results/runs/<run>/metrics.csv`` and ``provenance.json``; the tests below
give it two small hand-written runs in a temporary folder, then check the committed file against the committed logs.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import skip_while_runs_change
from mdeq.engine import paths
from mdeq.engine.runlog import read_run
from mdeq.paper.report import standing

FIELDS = ["epoch", "step", "phase", "train_acc", "eval_top1", "eval_loss", "rel_residual_forward", "partial"]


def _run(folder: Path, top1: list[float], *, partial_after: bool = False, finished: bool = False,
         train_offset: float = 0.0) -> Path:
    folder.mkdir(parents=True)
    rows = [{"epoch": e, "step": 10 * (e + 1), "phase": "implicit", "train_acc": 80 + e + train_offset, "eval_top1": v,
             "eval_loss": 0.5 + e / 10, "rel_residual_forward": 1e-3 * (e + 1), "partial": False}
            for e, v in enumerate(top1)]
    if partial_after:  # a chunk stopped mid-epoch: its row is not an evaluated epoch
        rows.append({"epoch": len(top1), "step": 999, "phase": "implicit", "eval_top1": 99.0, "partial": True})
    with open(folder / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    chunks = [{"start": "2026-12-06T10:00:00+00:00", "end": "2026-12-06T11:30:00+00:00"},
              {"start": "2026-12-06T12:00:00+00:00"}]  # the chunk in progress has no end: not counted
    (folder / "provenance.json").write_text(json.dumps({"config": {"train": {"epochs": 50}}, "chunks": chunks,
                                                        "data_source_label": "CIFAR-10 (test)"}))
    if finished:
        (folder / "final.json").write_text(json.dumps({"final": {"eval_top1": top1[-1]}, "stopped_early": False}))
    return folder


def test_rows_and_comparison_are_read_from_the_logs(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "cifar10_mdeq_small", [50.0, 60.0, 70.0, 65.0], partial_after=True)
    _run(runs / "cifar10_mdeq_small_simple_injection", [55.0, 60.0, 68.0], train_offset=1.5)
    text = standing.render(runs)
    assert "| MDEQ-small | 4 of 50 | 65.00 (epoch 4) | 70.00 (epoch 3) | 83.0 | 0.80 | 4.0e-03 | 1.50 |" in text
    assert "| MDEQ-small (simplified injection) | 3 of 50 | 68.00 (epoch 3) | 68.00 (epoch 3) |" in text
    assert "99.00" not in text  # the partial epoch is not an evaluation
    assert "data: CIFAR-10 (test)" in text and "No logs yet: " in text and "ResNet-18 (170K)" in text
    # epochs 1-3 only (the simplified run has not evaluated epoch 4): ahead at 1, tied at 2, behind at 3
    assert ("Over epochs 1-3, which both have evaluated, MDEQ-small (simplified injection) is ahead of MDEQ-small at "
            "1 epoch (1) and behind at 1 (3); mean 61.00 % against 60.00 % (+1.00 points); at epoch 3 68.00 % "
            "against 70.00 %. Training accuracy over the same epochs: mean 82.50 % against 81.00 % (+1.50 points; "
            "at most 1.50 points apart at any epoch).") in text


def test_a_finished_run_says_so_and_write_reports_a_change(tmp_path):
    runs = tmp_path / "runs"
    _run(runs / "cifar10_resnet18_170k", [40.0, 45.0], finished=True)
    out = tmp_path / "standing.md"
    assert standing.write(out, runs) and not standing.write(out, runs)
    assert "| ResNet-18 (170K) | 2 of 50 (finished) | 45.00 (epoch 2) |" in out.read_text()
    assert "Over epochs" not in out.read_text()  # only one run of the compared pair has logs


def test_committed_standing_is_what_the_committed_logs_give():
    skip_while_runs_change()
    committed = standing.STANDING.read_text() if standing.STANDING.is_file() else ""
    assert committed == standing.render(paths.RESULTS / "runs"), (
        f"{paths.rel(standing.STANDING)} differs from what results/runs/ gives: run `{standing.COMMAND}` and commit it")


def test_a_run_without_an_evaluated_epoch_says_how_far_its_first_epoch_went(tmp_path):
    folder = _run(tmp_path / "runs" / "cifar10_single_stream", [])
    (folder / "steps.jsonl").write_text('{"step": 50, "epoch": 0}\n{"step": 100, "epoch": 0}\n')
    row = standing.run_row("Single-stream DEQ", read_run(folder))
    assert row["epochs"] == "0 of 50 (first epoch begun: step 100 logged)" and row["last test top-1 (%)"] == "-"
    assert row["chunk hours"] == "1.50"
