"""mdeq.engine.runlog: the one definition of a run folder's files, "finished", provenance and the hardware string."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mdeq.engine import paths, runlog
from mdeq.engine.runlog import EPOCH_COLUMNS, RunLog, append_epoch, finished, read_run, read_runs


def _final(**kw):
    return {"metric": "top1", "final": 70.0, "stopped_early": False, **kw}


@pytest.mark.parametrize("final, expected", [
    (_final(), True),
    (None, False),  # no final.json: a run in progress, or a chunk stopped by --stop-at
    ({}, False),
    (_final(stopped_early=True), False),  # cut by max_steps
    (_final(final=None), False),  # ended before any evaluation
    ({"metric": "top1", "final": 70.0}, False),  # a final.json that does not say it ran every epoch
])
def test_finished_is_one_rule(final, expected):
    assert finished(final) is expected


def test_append_epoch_writes_the_columns_once_and_blanks_missing_values(tmp_path):
    path = tmp_path / "metrics.csv"
    append_epoch(path, {"epoch": 0, "eval_top1": 50.0, "train_loss": float("nan"), "lr": None, "extra": 1})
    append_epoch(path, {"epoch": 1, "eval_top1": 60.5, "partial": True})
    lines = path.read_text().splitlines()
    assert lines[0].split(",") == list(EPOCH_COLUMNS) and len(lines) == 3
    run = read_run(tmp_path)
    assert run.rows[0]["train_loss"] == "" and run.rows[0]["lr"] == "" and "extra" not in run.rows[0]
    assert run.rows[1]["partial"] == "True"


def test_run_log_counts_whole_epochs_and_reads_values_from_final_then_metrics(tmp_path):
    folder = tmp_path / "cifar10_x"
    folder.mkdir()
    for epoch, top1, partial in ((0, 40.0, False), (1, 55.0, False), (2, 57.0, True)):
        append_epoch(folder / "metrics.csv", {"epoch": epoch, "eval_top1": top1, "partial": partial})
    (folder / "provenance.json").write_text(json.dumps({"config": {"train": {"epochs": 50}},
                                                        "data_source_label": "synthetic"}))
    run = read_run(folder)
    assert run.epochs_done == 2 and run.epochs_planned == 50 and not run.finished
    assert run.series("eval_top1") == [(0, 40.0), (1, 55.0)]  # the partial epoch is left out
    assert run.value("final", "eval_top1") == 55.0  # no final.json: the last whole epoch
    assert run.meta("data_source_label") == "synthetic" and run.meta("nope", default="-") == "-"
    (folder / "final.json").write_text(json.dumps(_final(final_eval={"top1": 58.0})))
    run = read_run(folder)
    assert run.finished and run.value("final_eval.top1", "eval_top1") == 58.0


def test_read_runs_finds_a_key_and_its_seeds_only(tmp_path):
    for name in ("cifar10_node", "cifar10_node_seed0", "cifar10_node_seed1", "cifar10_anode", "cifar10_node_x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final.json").write_text(json.dumps(_final()))
    assert [r.name for r in read_runs(tmp_path, "cifar10_node")] == [
        "cifar10_node", "cifar10_node_seed0", "cifar10_node_seed1"]
    assert read_runs(tmp_path / "missing", "cifar10_node") == []
    (tmp_path / "empty").mkdir()
    assert read_run(tmp_path / "empty") is None


def test_trim_logs_drops_records_after_the_checkpoint(tmp_path):
    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 5, 9)) + '{"step": 1')  # a cut line
    for epoch in (0, 1, 2):
        append_epoch(tmp_path / "metrics.csv", {"epoch": epoch})
    runlog.trim_logs(tmp_path, epoch=2, global_step=5)
    assert [json.loads(ln)["step"] for ln in steps.read_text().splitlines()] == [1, 5]
    assert [r["epoch"] for r in read_run(tmp_path).rows] == ["0", "1"]


def test_write_json_atomic_leaves_no_temp_file_and_writes_plain_json(tmp_path):
    path = tmp_path / "final.json"
    runlog.write_json_atomic(path, {"a": float("inf"), "p": tmp_path, "t": (1, 2)})
    assert json.loads(path.read_text()) == {"a": None, "p": str(tmp_path), "t": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final.json"]
    (tmp_path / ".metrics.csv.tmp").write_text("x")
    assert runlog.sweep_temp_files(tmp_path) == [".metrics.csv.tmp"]


def test_final_record_marks_a_run_that_stopped_before_its_last_epoch():
    kw = dict(config="c", baseline=None, metric="top1", last_eval={"top1": 61.0}, global_step=20, best=None,
              eval_set="val", data_source_label="synthetic")
    done = runlog.final_record(final_epoch=4, partial=False, epochs_planned=5, **kw)
    assert done["final"] == 61.0 and finished(done)
    early = runlog.final_record(final_epoch=2, partial=False, epochs_planned=5, **kw)
    assert early["stopped_early"] and not finished(early)


def test_hardware_is_recorded_once_and_described_once():
    hw = runlog.hardware("cpu", world_size=1)
    assert {"host", "cpu", "cpu_count", "torch_threads", "device", "world_size"} <= set(hw)
    threads = torch.get_num_threads()
    assert runlog.describe_hardware(hw) == f"CPU ({hw['cpu']}, {threads} thread{'s' if threads != 1 else ''})"
    assert runlog.hardware_label("cpu") == runlog.describe_hardware(hw)
    assert runlog.describe_hardware({"gpu": "NVIDIA H100", "world_size": 4}) == "4 x NVIDIA H100"
    assert runlog.describe_hardware({}) == "unknown hardware"
    assert runlog.describe_hardware({"cpu": "X", "torch_threads": 1}) == "CPU (X, 1 thread)"
    # a campaign's run moved between machines and thread counts: every one is named, not only the first
    prov = {"hardware": {"cpu": "AMD EPYC", "torch_threads": 2},
            "chunks": [{"hardware": {"cpu": "AMD EPYC", "torch_threads": 2}}, {"hardware": {"cpu": "Xeon", "torch_threads": 2}},
                       {"hardware": {"cpu": "Xeon", "torch_threads": 1}}, {}]}
    assert runlog.describe_run_hardware(prov) == "CPU (AMD EPYC, 2 threads); CPU (Xeon, 1 thread); CPU (Xeon, 2 threads)"
    assert runlog.describe_run_hardware({}) == "unknown hardware"


def test_provenance_names_the_code_and_the_machine():
    prov = runlog.provenance("python -m x", "cpu", seed=3)
    assert prov["command"] == "python -m x" and prov["seed"] == 3
    assert prov["hardware"] == runlog.hardware("cpu") | {"host": prov["hardware"]["host"]}
    commit = runlog.git_commit()
    assert prov["git_commit"] == commit and (commit == "unknown" or len(commit) == 40)
    import subprocess

    status = subprocess.run(["git", "status", "--porcelain", "--", "mdeq"], cwd=paths.ROOT, capture_output=True,
                            text=True)
    assert prov["git_dirty"] == (bool(status.stdout.strip()) if status.returncode == 0 else None)


def test_git_dirty_sees_edits_and_new_files_in_the_named_folders_only(tmp_path):
    import subprocess

    repo = tmp_path / "repo"

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                       capture_output=True)

    (repo / "mdeq").mkdir(parents=True)
    (repo / "mdeq" / "a.py").write_text("x = 1\n")
    (repo / "notes.txt").write_text("n\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    assert runlog.git_dirty(repo) is False and len(runlog.git_commit(repo)) == 40
    (repo / "notes.txt").write_text("edited\n")  # outside mdeq/: not the code's state
    assert runlog.git_dirty(repo) is False and runlog.git_dirty(repo, folders=(".",)) is True
    (repo / "mdeq" / "a.py").write_text("x = 2\n")
    assert runlog.git_dirty(repo) is True
    git("checkout", "--", "mdeq/a.py")
    assert runlog.git_dirty(repo) is False
    (repo / "mdeq" / "new.py").write_text("")  # an untracked module changes the code too
    assert runlog.git_dirty(repo) is True
    (tmp_path / "plain").mkdir()  # no repository: unknown, not clean
    assert runlog.git_dirty(tmp_path / "plain") is None and runlog.git_commit(tmp_path / "plain") == "unknown"
    assert runlog.git_dirty(tmp_path / "missing") is None


def test_chunks_open_and_close_in_provenance(tmp_path):
    chunk = runlog.chunk_start("python -m mdeq.train", "cpu", 1, step=0, epoch=0, step_in_epoch=0)
    runlog.write_json_atomic(tmp_path / "provenance.json", {"chunks": [chunk]})
    runlog.chunk_end(tmp_path, step=7, epoch=1, step_in_epoch=2, how="stop_at")
    (saved,) = json.loads((tmp_path / "provenance.json").read_text())["chunks"]
    assert saved["from_step"] == 0 and saved["to_step"] == 7 and saved["ended"] == "stop_at" and "end" in saved


def test_collect_run_copies_the_small_logs_only(tmp_path, monkeypatch):
    src, dest = tmp_path / "run", tmp_path / "results"
    src.mkdir()
    for name in ("metrics.csv", "final.json", "provenance.json", "checkpoint.pt"):
        (src / name).write_text("{}")
    (src / "steps.jsonl").write_text("x" * 20)
    monkeypatch.setattr(runlog, "MAX_STEPS_BYTES", 10)
    runlog.collect_run(src, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["final.json", "metrics.csv", "provenance.json"]


def test_run_log_value_skips_non_numbers(tmp_path):
    run = RunLog("r", tmp_path, [{"epoch": "0", "eval_top1": ""}, {"epoch": "1", "eval_top1": "nan"}], {}, {})
    assert run.value("eval_top1") is None and run.series("eval_top1") == []
    assert math.isclose(RunLog("r", tmp_path, [{"epoch": "0", "eval_top1": "1.5"}], {}, {}).value("eval_top1"), 1.5)


def test_scripts_record_the_same_provenance(tmp_path):
    """A benchmark's or a study's provenance (``script_provenance``; ``benchmarks/_common.provenance`` wraps it) is
    runlog's record plus the arguments and the device (it once raised a TypeError for passing the device twice)."""
    import argparse
    import sys

    sys.path.insert(0, str(paths.ROOT / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(paths.ROOT / "benchmarks"))
    prov = _common.provenance(argparse.Namespace(batch=4), "cpu")
    assert prov["args"] == {"batch": 4} and prov["device"] == "cpu"
    assert {"date", "command", "git_commit", "git_dirty", "torch", "python", "hardware"} <= set(prov)
    assert prov["hardware"]["device"] == "cpu"
    study = runlog.script_provenance(argparse.Namespace(seed=1), "cpu", folder="studies")
    assert study["args"] == {"seed": 1} and set(prov) == set(study)


def test_a_script_result_is_written_whole_into_a_new_folder(tmp_path):
    """``write_result_json`` makes the folder, leaves no temporary file, and writes what JSON cannot hold as text."""
    out = tmp_path / "new" / "result.json"
    runlog.write_result_json(out, {"dtype": torch.float64, "rows": (1, 2.5)})
    assert json.loads(out.read_text()) == {"dtype": "torch.float64", "rows": [1, 2.5]}
    assert [f.name for f in out.parent.iterdir()] == ["result.json"]
