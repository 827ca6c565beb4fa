"""The chunked campaign: a budget that ends before the first step leaves a checkpoint and no result;
the next call continues it, finishes the run and goes on to the next; logs and checkpoints land in
results/runs/<run>/ and a fresh work folder is restored from there."""
import dataclasses
import functools
import json
import shutil

import pytest
import yaml

import mdeq.campaign as campaign
from mdeq.campaign import load_campaign, parse_budget, run_campaign, run_status, train_command


@pytest.fixture()
def tiny_campaign(tmp_path, monkeypatch):
    from mdeq.engine.data.synthetic import make_synthetic

    root = make_synthetic("cifar10", tmp_path / "data")
    spec_path = tmp_path / "tiny.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "tiny", "runs": ["cifar10_resnet18_170k", "cifar10_mdeq_small"], "data_root": str(root),
        "threads": 1, "checkpoint_every": 2, "log_every": 1,
        "overrides": ["train.epochs=1", "data.batch_size=8", "data.eval_batch_size=8"],
        "limit_train": 24, "limit_eval": 8}))
    monkeypatch.setattr(campaign, "WORK", tmp_path / "work")
    return load_campaign(spec_path), tmp_path / "results"


def test_budget_chunks_resume_and_finish_every_run_side_by_side(tiny_campaign):
    spec, results = tiny_campaign
    spec = dataclasses.replace(spec, threads=2, side_by_side=2)  # as the shipped campaign: two 1-thread runs at once
    # a budget that has ended before the child starts (a minute ago; min_start_s < 0 lets the campaign start it
    # anyway): the child writes a checkpoint at step 0 and exits cleanly, however fast or loaded the machine
    first = run_campaign(spec, -60.0, results=results, min_start_s=-3600, code="tree")
    assert [s["finished"] for s in first] == [False, False]
    res = results / "cifar10_resnet18_170k"
    assert (res / "checkpoint.pt").is_file() and not (res / "final.json").exists()
    # a fresh machine: the work folder is gone and is restored from results/
    shutil.rmtree(campaign.WORK / "cifar10_resnet18_170k")
    after = run_campaign(spec, 600.0, results=results, code="tree")
    assert [s["finished"] for s in after] == [True, True]
    assert [s["epochs_done"] for s in after] == [1, 1]
    # chunk starts and ends are whole seconds: the wall clock of the chunks covers the epochs' training time
    # (a tiny run can start and end within one second, so its chunk hours may be 0)
    assert all(s["hours"] * 3600 <= s["chunk_hours"] * 3600 + 2 < 600 for s in after)
    chunks = json.loads((res / "provenance.json").read_text())["chunks"]
    assert [c["ended"] for c in chunks] == ["stop_at", "finished"] and chunks[1]["from_step"] == 0
    assert chunks[1]["to_step"] == 3 and "hardware" in chunks[1]
    final = json.loads((res / "final.json").read_text())
    assert final["final_epoch"] == 0 and not final["stopped_early"]
    assert "restored" in (campaign.WORK / "tiny.log").read_text()
    # side by side: the two runs' chunks overlapped, each on a share of the 2 threads
    last = {key: json.loads((results / key / "provenance.json").read_text())["chunks"][-1] for key in spec.runs}
    assert all(c["hardware"]["torch_threads"] == 1 and "--threads 1" in c["command"] for c in last.values())
    first_run, second_run = (last[key] for key in spec.runs)
    assert second_run["start"] <= first_run["end"] and first_run["start"] <= second_run["end"]
    assert "2 runs side by side" in (campaign.WORK / "tiny.log").read_text()
    # a third call has nothing left to do
    assert [s["finished"] for s in run_campaign(spec, 600.0, results=results, code="tree")] == [True, True]


def test_run_option_continues_one_run_out_of_order(tiny_campaign):
    spec, results = tiny_campaign
    spec = dataclasses.replace(spec, threads=2, side_by_side=2)
    statuses = run_campaign(spec, -60.0, results=results, min_start_s=-3600, code="tree", only="cifar10_mdeq_small")
    assert [s["has_checkpoint"] for s in statuses] == [False, True]  # the first run was not touched
    assert "side by side" not in (campaign.WORK / "tiny.log").read_text()  # one run, whatever the spec allows
    assert not (campaign.WORK / "cifar10_resnet18_170k").exists()
    with pytest.raises(ValueError, match="'cifar10_sst' is not a run of campaign 'tiny'"):
        run_campaign(spec, 1.0, results=results, only="cifar10_sst")


def test_run_option_repeated_continues_those_runs_only(tiny_campaign, capsys, monkeypatch):
    spec, results = tiny_campaign
    # --dry-run reads where each run stands: from the fixture's empty results, not the repository's (whose runs finish)
    monkeypatch.setattr(campaign, "run_status", functools.partial(run_status, results=results))
    assert campaign._runs(spec, ["cifar10_mdeq_small", "cifar10_resnet18_170k", "cifar10_mdeq_small"]) == (
        "cifar10_mdeq_small", "cifar10_resnet18_170k")  # in the order given, once each
    assert campaign._runs(spec, None) == campaign._runs(spec, []) == spec.runs
    with pytest.raises(ValueError, match="'cifar10_node' is not a run of campaign 'tiny'"):
        campaign._runs(spec, ["cifar10_mdeq_small", "cifar10_node"])
    yaml_path = campaign.WORK.parent / "tiny.yaml"
    assert campaign.main(["--campaign", str(yaml_path), "--dry-run", "--run", "cifar10_mdeq_small",
                          "--run", "cifar10_resnet18_170k"]) == 0
    printed = capsys.readouterr().out  # the first unfinished of the runs named, in their order
    assert "cifar10_mdeq_small" in printed and "resnet18" not in printed


HOLD_LOCK = """
import os, sys
import mdeq.campaign as campaign
from pathlib import Path
campaign.WORK = Path(sys.argv[1])

def restore_run(*args):  # inside the lock, before the run's chunk: wait here until told to end
    print("inside", flush=True)
    sys.stdin.readline()
    os._exit(0)  # the way a killed campaign ends: its lock goes with the process

campaign.restore_run = restore_run
campaign.run_campaign(campaign.load_campaign(sys.argv[2]), 600.0, results=Path(sys.argv[3]), min_start_s=0, code="tree")
"""


def test_only_one_campaign_runs_at_a_time(tiny_campaign, tmp_path):
    """A campaign process about to start a chunk holds runs/campaign/.lock; a second campaign, of any name, is
    refused before it touches a run, and goes ahead once the first process has ended."""
    import os
    import subprocess
    import sys

    from mdeq.engine import paths

    spec, results = tiny_campaign
    other = tmp_path / "other.yaml"  # another campaign (another name) over the same work folder
    other.write_text(yaml.safe_dump({"name": "other", "runs": ["cifar10_mdeq_small"], "data_root": spec.data_root}))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(campaign.WORK), str(other), str(results)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(paths.ROOT)})
    try:
        for line in holder.stdout:  # the campaign's log lines, then the chunk's "inside"
            if line.strip() == "inside":
                break
        else:
            pytest.fail(f"the first campaign ended before its chunk: {holder.stderr.read()[-2000:]}")
        with pytest.raises(RuntimeError, match=r"another campaign holds .*\.lock; wait for it or stop it"):
            run_campaign(spec, 600.0, results=results, min_start_s=0, code="tree")
        assert (campaign.WORK / ".lock").read_text().strip() == str(holder.pid)  # the holder's pid, as it says
        assert not (campaign.WORK / "cifar10_resnet18_170k").exists()
        assert not (results / "cifar10_resnet18_170k").exists()
    finally:
        holder.communicate("go\n", timeout=120)
    assert holder.returncode == 0
    # once the holder has ended, a campaign starts (here with no time left for a chunk: it starts nothing)
    statuses = run_campaign(spec, 0.0, results=results, min_start_s=60, code="tree")
    assert [s["has_checkpoint"] for s in statuses] == [False, False]


def test_status_command_and_bad_input(tiny_campaign, capsys):
    spec, results = tiny_campaign
    s = run_status(spec, "cifar10_node", results)
    assert s["epochs_done"] == 0 and s["epochs_planned"] == 1 and not s["finished"]
    # inside the first epoch (no metrics.csv row yet) the step comes from steps.jsonl
    folder = results / "cifar10_node"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "steps.jsonl").write_text('{"step": 1, "epoch": 0}\n{"step": 350, "epoch": 0}\n')
    assert run_status(spec, "cifar10_node", results)["last_step"] == 350
    cmd = train_command(spec, "cifar10_node", stop_at=123.0)
    assert cmd[cmd.index("--baseline") + 1] == "node_172k" and cmd[cmd.index("--stop-at") + 1] == "123"
    assert cmd[cmd.index("--checkpoint-every") + 1] == "2"
    slow = dataclasses.replace(spec, checkpoint_every_run={"cifar10_node": 1})
    assert train_command(slow, "cifar10_node", stop_at=None)[cmd.index("--checkpoint-every") + 1] == "1"
    assert train_command(slow, "cifar10_resnet18_170k", stop_at=None)[cmd.index("--checkpoint-every") + 1] == "2"
    assert parse_budget("150m") == 9000 and parse_budget("2.5h") == 9000 and parse_budget("90s") == 90
    with pytest.raises(ValueError, match="--budget must look like"):
        parse_budget("soon")
    assert campaign.main(["--campaign", "nope"]) == 2
    assert "no campaign 'nope'" in capsys.readouterr().err
    bad = results.parent / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "runs": ["cifar10_node"], "checkpoint_every_run": {"cifar10_anode": 3}}))
    with pytest.raises(ValueError, match=r"checkpoint_every_run names \['cifar10_anode'\]"):
        load_campaign(bad)


def test_shipped_campaign_is_table1_with_the_paper_protocol():
    spec = load_campaign("table1_cifar10_cpu")
    assert spec.runs[:2] == ("cifar10_resnet18_170k", "cifar10_mdeq_small")
    assert spec.variant == "paper" and not spec.overrides and spec.limit_train is None
    assert spec.data_options["source"] == "jpeg_q75" and spec.workers == 0
    assert spec.checkpoint_every_run["cifar10_node"] < spec.checkpoint_every  # NODE's step is about 52 s
    assert spec.compile  # the DEQ runs' forward solve is compiled ...
    assert "--compile" in train_command(spec, "cifar10_mdeq_small", stop_at=None)
    assert "--compile" not in train_command(spec, "cifar10_resnet18_170k", stop_at=None)  # ... not a baseline


def test_chunks_run_the_last_commit_from_a_worktree(tiny_campaign):
    """code="head": the child imports the committed code, so edits to the working tree cannot reach a run."""
    import subprocess
    import sys

    from mdeq.engine import paths

    tree, sha = campaign.code_worktree()
    try:
        assert sha == subprocess.run(["git", "rev-parse", "HEAD"], cwd=paths.ROOT, capture_output=True,
                                     text=True, check=True).stdout.strip()
        # the child's interpreter flags and environment, run from the repository root
        out = subprocess.run([sys.executable, "-P", "-c", "import mdeq; print(mdeq.__file__)"], cwd=paths.ROOT,
                             capture_output=True, text=True, check=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tree)})
        assert out.stdout.strip().startswith(str(tree))
        cmd = train_command(tiny_campaign[0], "cifar10_node", stop_at=None)
        assert cmd[1] == "-P" and not any(str(paths.ROOT) in a for a in cmd[2:])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=paths.ROOT, check=False)


def test_side_by_side_needs_a_thread_per_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "runs": ["cifar10_node"], "threads": 2, "side_by_side": 3}))
    with pytest.raises(ValueError, match="side_by_side must be an integer from 1 to threads"):
        load_campaign(bad)


def _metrics(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,phase,eval_top1,rel_residual_forward"]
    lines += [f"{e},{(e + 1) * 3},{phase},50.0,{res}" for e, (phase, res) in enumerate(rows)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_a_run_past_the_residual_limit_is_held(tiny_campaign):
    spec, results = tiny_campaign
    spec = dataclasses.replace(spec, residual_limit=1e-2)
    folder = results / "cifar10_mdeq_small"
    _metrics(folder, [("unrolled", 0.3)])  # the unrolled warm-up's residual is no solve's: never held for it
    assert campaign.held(spec, "cifar10_mdeq_small", results) is None
    _metrics(folder, [("unrolled", 0.3), ("implicit", 0.004)])  # under the limit: --status says how close
    status = run_status(spec, "cifar10_mdeq_small", results)
    assert (status["forward_residual"], status["residual_limit"], status["held"]) == (0.004, 1e-2, None)
    assert campaign._residual_note(status) == "; forward residual 4.00e-03 (limit 1e-02)"
    _metrics(folder, [("unrolled", 0.3), ("implicit", 0.004), ("implicit", 0.012)])
    reason = campaign.held(spec, "cifar10_mdeq_small", results)
    assert reason.startswith("held: the forward residual of epoch 3 is 0.012, past the campaign's limit 0.01")
    assert campaign.held(spec, "cifar10_resnet18_170k", results) is None  # no solve, no residual
    raised = dataclasses.replace(spec, residual_limit_run={"cifar10_mdeq_small": 2e-2})
    assert campaign.held(raised, "cifar10_mdeq_small", results) is None
    assert campaign.held(dataclasses.replace(spec, residual_limit=None), "cifar10_mdeq_small", results) is None
    # a held run gets no chunk; --status says why
    statuses = run_campaign(spec, 600.0, results=results, code="tree", only="cifar10_mdeq_small")
    assert statuses[1]["held"] == reason and not (campaign.WORK / "cifar10_mdeq_small").exists()
    assert reason in (campaign.WORK / "tiny.log").read_text()


def test_a_chunk_past_the_limit_stops_at_a_checkpoint_and_the_next_run_takes_its_place(tiny_campaign, monkeypatch):
    spec, results = tiny_campaign
    spec = dataclasses.replace(spec, residual_limit=1e-2, runs=("cifar10_mdeq_small", "cifar10_resnet18_170k"),
                               overrides=(*spec.overrides, "train.epochs=4"))
    # the first checkpoint synced into results/ stands for an epoch whose residual passed the limit
    monkeypatch.setattr(campaign, "held", lambda spec, key, results: "held: past the limit" if (
        key == "cifar10_mdeq_small" and (results / key / "checkpoint.pt").is_file()) else None)
    monkeypatch.setattr(campaign, "_POLL_S", 0.2)
    mdeq_small, resnet = run_campaign(spec, 600.0, results=results, code="tree")
    assert not mdeq_small["finished"] and mdeq_small["held"] == "held: past the limit"
    log = (campaign.WORK / "tiny.log").read_text()
    assert "cifar10_mdeq_small: held: past the limit" in log and "asked the run to stop at its next step" in log
    chunks = json.loads((results / "cifar10_mdeq_small" / "provenance.json").read_text())["chunks"]
    assert chunks[-1]["ended"] == "SIGTERM"
    assert resnet["finished"]  # trained in the same call, on the place the held run left


def test_residual_limit_run_must_name_a_run_of_the_campaign(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "runs": ["cifar10_node"], "residual_limit": 0.01,
                                   "residual_limit_run": {"cifar10_mdeq_small": 0.02}}))
    with pytest.raises(ValueError, match=r"residual_limit_run names \['cifar10_mdeq_small'\]"):
        load_campaign(bad)
