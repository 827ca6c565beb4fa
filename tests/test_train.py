"""The training engine on CPU: an end-to-end smoke run through the warm-up into the implicit phase, a run
killed with SIGKILL mid-epoch and resumed that ends bit-identical to an uninterrupted one, segmentation and
baseline runs, the optimisers and schedule of Table 4, and clear errors."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdeq.engine import paths
from mdeq.engine.checkpoint import load_checkpoint
from mdeq.core.config import ConfigError, load_config
from mdeq.engine.build import build_criterion, build_optimizer, build_scheduler, SegmentationLoss
from mdeq.engine.loaders import ResumableSampler
from mdeq.engine.loop import main, train_step
from mdeq.engine.options import RunOptions
from mdeq.engine.step import set_phase
from mdeq.train import cli

pytestmark = pytest.mark.filterwarnings("ignore:IFT backward solve did not converge:RuntimeWarning")

# 80 samples / batch 8 = 10 steps per epoch, 2 epochs; the warm-up ends at step 8, inside epoch 0.
SMOKE_SET = ["train.epochs=2", "train.pretrain_steps=8", "train.lr=3e-3"]
SMOKE_OPTIONS = dict(limit_train=80, limit_eval=16, workers=0, log_every=1, checkpoint_every=3, threads=1,
                     device="cpu", progress=False, deterministic=True)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    from mdeq.engine.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("synthetic_cifar10")
    make_synthetic("cifar10", root)
    return root


@pytest.fixture(scope="module")
def uninterrupted(cifar_root, tmp_path_factory):
    """One uninterrupted smoke run, shared by the end-to-end checks and the resume test."""
    out = tmp_path_factory.mktemp("run_full")
    final = main(load_config("cifar10_tiny_smoke", SMOKE_SET),
                 RunOptions(out_dir=out, data_root=cifar_root, **SMOKE_OPTIONS))
    return out, final


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_run_goes_through_the_warm_up_and_learns(uninterrupted):
    out, final = uninterrupted
    rows = _rows(out / "metrics.csv")
    assert [r["phase"] for r in rows] == ["unrolled->implicit", "implicit"]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # loss decreases
    for r in rows:  # NFE and residuals are logged as data
        assert float(r["nfe_forward"]) > 0 and float(r["nfe_backward"]) > 0
        assert 0 < float(r["rel_residual_forward"]) < 10 and float(r["rel_residual_backward"]) >= 0
        assert float(r["peak_mem_mb"]) > 0 and r["mem_kind"].startswith("cpu")
    steps = _steps(out / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, 21))
    assert {s["phase"] for s in steps[:8]} == {"unrolled"} and {s["phase"] for s in steps[8:]} == {"implicit"}
    assert all("nfe_backward" not in s for s in steps[:8]) and all(s["nfe_backward"] >= 1 for s in steps[8:])
    assert all(s["nfe_forward"] == 2 for s in steps[:8])  # unroll_steps of the smoke config
    assert all(s["rel_residual_forward"] is not None for s in steps)
    # the schedule reaches eta_min at the last iteration (cosine over iterations_per_epoch x epochs)
    assert steps[0]["lr"] == pytest.approx(3e-3) and float(rows[-1]["lr"]) == pytest.approx(1e-6)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["config"]["name"] == "cifar10_tiny_smoke" and prov["config"]["train"]["lr"] == 3e-3
    assert "synthetic" in prov["data_source_label"] and prov["torch"] == torch.__version__
    assert {"git_commit", "hardware", "date", "command"} <= set(prov)
    assert final["metric"] == "top1" and final["final_epoch"] == 1 and final["final"] == float(rows[-1]["eval_top1"])
    assert "never used to select" in final["best_epoch_for_reference_only"]["note"]
    assert json.loads((out / "final.json").read_text())["final"] == final["final"]


def _command(cifar_root, out):
    o = SMOKE_OPTIONS
    return [sys.executable, "-m", "mdeq.train", "--config", "cifar10_tiny_smoke", "--set", *SMOKE_SET,
            "--data-root", str(cifar_root), "--out", str(out), "--limit-train", str(o["limit_train"]),
            "--limit-eval", str(o["limit_eval"]), "--workers", "0", "--log-every", "1", "--checkpoint-every",
            str(o["checkpoint_every"]), "--threads", "1", "--device", "cpu", "--no-progress", "--deterministic"]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(uninterrupted, cifar_root, tmp_path):
    full_out, _ = uninterrupted
    out = tmp_path / "run_killed"
    env = {**os.environ, "PYTHONPATH": str(paths.ROOT)}
    env.pop("RANK", None)
    proc = subprocess.Popen(_command(cifar_root, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    ckpt = out / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before writing a checkpoint: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint within 120 s")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "final.json").exists()
    killed = load_checkpoint(ckpt)
    assert 0 < killed["step_in_epoch"] < 10 and killed["global_step"] < 20  # killed mid-epoch

    final = main(load_config("cifar10_tiny_smoke", SMOKE_SET),
                 RunOptions(out_dir=out, data_root=cifar_root, resume=True, **SMOKE_OPTIONS))
    assert final["global_step"] == 20
    a, b = load_checkpoint(full_out / "checkpoint.pt"), load_checkpoint(ckpt)
    assert a["global_step"] == b["global_step"] == 20
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, st in a["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert a["scheduler"] == b["scheduler"]
    # the logs agree too (the killed run's records after its checkpoint were dropped and rewritten)
    keys = ("epoch", "step", "phase", "train_loss", "train_acc", "eval_top1", "eval_loss", "nfe_forward",
            "nfe_backward", "rel_residual_forward")
    assert [[r[k] for k in keys] for r in _rows(full_out / "metrics.csv")] == \
           [[r[k] for k in keys] for r in _rows(out / "metrics.csv")]
    assert [(s["step"], s["loss"]) for s in _steps(full_out / "steps.jsonl")] == \
           [(s["step"], s["loss"]) for s in _steps(out / "steps.jsonl")]
    chunks = json.loads((out / "provenance.json").read_text())["chunks"]
    assert len(chunks) == 2 and "end" not in chunks[0] and chunks[1]["ended"] == "finished"
    assert chunks[1]["from_step"] == killed["global_step"] and chunks[1]["to_step"] == 20
    assert {"host", "hardware", "git_commit", "command", "start", "end"} <= set(chunks[1])


def _assert_same_run(a_dir: Path, b_dir: Path) -> None:
    a, b = load_checkpoint(a_dir / "checkpoint.pt"), load_checkpoint(b_dir / "checkpoint.pt")
    assert a["global_step"] == b["global_step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    keys = ("epoch", "step", "phase", "train_loss", "train_acc", "eval_top1", "nfe_forward", "nfe_backward")
    assert [[r[k] for k in keys] for r in _rows(a_dir / "metrics.csv")] == \
           [[r[k] for k in keys] for r in _rows(b_dir / "metrics.csv")]


def test_chunks_stopped_before_a_step_and_before_an_evaluation_resume_bit_identical(
        uninterrupted, cifar_root, tmp_path, monkeypatch):
    """stop_at ends a chunk at a checkpoint without evaluating: here the stop rule fires at its 4th check
    (before step 4 of epoch 0), then at its 8th (epoch 0 trained, its evaluation not started)."""
    from mdeq.engine.guards import StopRule

    full_out, full_final = uninterrupted
    out = tmp_path / "chunked"
    real = StopRule.reason
    for stop_at_call in (4, 8, None):
        calls = [0]

        def reason(self, upcoming_s, _n=stop_at_call, _calls=calls):
            _calls[0] += 1
            return "stop_at" if _calls[0] == _n else real(self, upcoming_s)

        monkeypatch.setattr(StopRule, "reason", reason)
        final = main(load_config("cifar10_tiny_smoke", SMOKE_SET),
                     RunOptions(out_dir=out, data_root=cifar_root, resume=True, **SMOKE_OPTIONS))
        if stop_at_call is not None:
            assert final["stopped"] == "stop_at" and not (out / "final.json").exists()
    ckpts = json.loads((out / "provenance.json").read_text())["chunks"]
    assert [(c["from_step"], c["to_step"], c["ended"]) for c in ckpts] == \
           [(0, 3, "stop_at"), (3, 10, "stop_at"), (10, 20, "finished")]
    assert ckpts[1]["to_step_in_epoch"] == 10  # the epoch was trained, its evaluation ran in the next chunk
    _assert_same_run(full_out, out)
    for row in _rows(out / "metrics.csv"):  # an epoch's time counts its steps in every chunk
        assert float(row["epoch_time_s"]) >= int(row["steps"]) * float(row["step_time_ms"]) / 1000
    assert json.loads((out / "final.json").read_text())["final"] == full_final["final"]


def test_a_chunk_stops_before_a_step_or_an_evaluation_that_would_pass_stop_at(cifar_root, tmp_path, monkeypatch):
    """The look-ahead of ``--stop-at`` (``StopRule``), on a clock that only steps (10 s each) and evaluations
    (50 s each) move, so that what it decides does not depend on the machine's load. A step starts only with
    1.5 step times left; an evaluation only with 1.2 times its estimate left: the last evaluation's time in
    this process, else half a step per evaluation batch (5 batches: 25 s). Nothing ends after ``stop_at``,
    and no chunk stops earlier than those margins. 5 steps an epoch, 2 epochs, 4 chunks."""
    import types

    import mdeq.engine.guards as guards
    import mdeq.engine.loop as loop

    T0, STEP, EVAL = 1.0e9, 10.0, 50.0
    clock, ends = [T0], []
    real_step, real_evaluate = loop.train_step, loop.evaluate

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        clock[0] += STEP
        ends.append(clock[0] - T0)
        return out

    def evaluate(*args, **kwargs):
        out = real_evaluate(*args, **kwargs)
        clock[0] += EVAL
        ends.append(clock[0] - T0)
        return out

    fake_time = types.SimpleNamespace(time=lambda: clock[0], perf_counter=lambda: clock[0])
    monkeypatch.setattr(guards, "time", fake_time)  # StopRule.reason reads time.time()
    monkeypatch.setattr(loop, "time", fake_time)  # the loop times steps and evaluations
    monkeypatch.setattr(loop, "train_step", step)
    monkeypatch.setattr(loop, "evaluate", evaluate)
    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=2", "train.pretrain_steps=100"])
    out = tmp_path / "chunks"
    chunks = [  # (stop_at - T0, what the chunk ran: ends of its steps and evaluations, seconds after T0)
        (44, [10, 20, 30]),  # at 30: 30 + 1.5 x 10 > 44, although a 4th step (to 40) would have fitted
        (70, [40, 50]),      # epoch 0 trained at 50; its evaluation, estimated 25 s: 50 + 1.2 x 25 > 70
        (190, [100, 110, 120, 130, 140, 150]),  # epoch 0 evaluated (50 s); epoch 1 trained at 150; its
                                                # evaluation, estimated 50 s (the last one): 150 + 60 > 190
        (None, [200]),
    ]
    for stop_at, expected in chunks:
        ends.clear()
        options = {**SMOKE_OPTIONS, "limit_train": 40, "limit_eval": 40}
        final = main(cfg, RunOptions(out_dir=out, data_root=cifar_root, resume=True,
                                     stop_at=None if stop_at is None else T0 + stop_at, **options))
        assert ends == expected, (stop_at, ends)
        if stop_at is not None:  # nothing ran past stop_at, and the chunk used its time up to the margins
            assert final["stopped"] == "stop_at" and not (out / "final.json").exists()
            assert max(ends) <= stop_at and stop_at - max(ends) < 1.5 * STEP + 1.2 * EVAL
    assert "stopped" not in final and final["final_epoch"] == 1
    assert [(r["epoch"], r["step"]) for r in _rows(out / "metrics.csv")] == [("0", "5"), ("1", "10")]
    prov = json.loads((out / "provenance.json").read_text())["chunks"]
    assert [(c["from_step"], c["to_step"], c["ended"]) for c in prov] == \
           [(0, 3, "stop_at"), (3, 5, "stop_at"), (5, 10, "stop_at"), (10, 10, "finished")]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(paths.ROOT)}
    env.pop("RANK", None)
    return env


def _start_and_wait_for_steps(cmd, out: Path, n: int) -> subprocess.Popen:
    """Start ``cmd`` and return once it has logged ``n`` steps (it holds the run folder's lock by then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    deadline = time.monotonic() + 120
    while not (out / "steps.jsonl").exists() or len(_steps(out / "steps.jsonl")) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no steps logged: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.005)
    return proc


def _campaign_command(cifar_root, out: Path, threads: int) -> list[str]:
    """``_command`` with the Table 1 campaign's engine settings (``mdeq.campaign.train_command``): ``threads``
    threads, 0 workers, f compiled for the forward solve, no --deterministic; checkpoints every 3 steps. As
    in the campaign (50,000 / 128 and 10,000 / 128), each epoch and each evaluation ends with a smaller batch
    (84 / 8, 20 / 8: 11 steps an epoch, 22 in all), another shape for the compiled f."""
    cmd = _command(cifar_root, out)
    cmd.remove("--deterministic")
    cmd[cmd.index("--threads") + 1] = str(threads)
    cmd[cmd.index("--limit-train") + 1] = "84"
    cmd[cmd.index("--limit-eval") + 1] = "20"
    return [*cmd, "--compile"]


@pytest.mark.slow  # 4 processes, 3 of which compile f: about 80 s per thread count beside a campaign
@pytest.mark.parametrize("threads", [1, 2])  # the campaign's runs: 2 threads alone, 1 each side by side
def test_resume_in_the_campaigns_settings_is_bit_identical(cifar_root, tmp_path, threads):
    """The campaign's chunks run with 1 or 2 threads, a compiled f and without --deterministic. A run stopped
    by SIGTERM (the stop --stop-at takes) in the warm-up, resumed, killed with SIGKILL in the implicit phase
    (compiled f) and resumed again ends bit-identical to an uninterrupted run with the same settings: on a
    CPU with a fixed thread count every kernel, eager or compiled (``dynamic=False``: one kernel per shape),
    reduces in a fixed order, so a process that starts mid-run computes the same bits. (Another thread count
    does not: docs/cpu_campaign.md, "What a resume keeps".)"""
    env = {**_env(), "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    full, out = tmp_path / "full", tmp_path / "chunked"
    done = subprocess.run(_campaign_command(cifar_root, full, threads), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any((tmp_path / "inductor").rglob("*.so")) and "torch.compile of f failed" not in done.stderr + done.stdout

    def start_then(sig, n_steps, resume):
        cmd = _campaign_command(cifar_root, out, threads) + (["--resume"] if resume else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 600
        while not (out / "steps.jsonl").exists() or len(_steps(out / "steps.jsonl")) < n_steps:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"fewer than {n_steps} steps: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=300)
        return load_checkpoint(out / "checkpoint.pt")["global_step"]

    assert 0 < start_then(signal.SIGTERM, 3, resume=False) < 8  # stopped at a checkpoint in the warm-up
    assert 8 < start_then(signal.SIGKILL, 14, resume=True) < 22  # killed after checkpoints in the implicit phase
    done = subprocess.run([*_campaign_command(cifar_root, out, threads), "--resume"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    assert a["global_step"] == b["global_step"] == 22
    differ = {k: float((v.double() - b["model"][k].double()).abs().max()) for k, v in a["model"].items()
              if not torch.equal(v, b["model"][k])}
    assert not differ, differ
    for pid, st in a["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    _assert_same_run(full, out)
    assert [(s["step"], s["loss"]) for s in _steps(full / "steps.jsonl")] == \
           [(s["step"], s["loss"]) for s in _steps(out / "steps.jsonl")]


def _signal_stops_at_a_checkpoint(sig, uninterrupted, cifar_root, out: Path) -> None:
    full_out, _ = uninterrupted
    cmd = _command(cifar_root, out)
    cmd[cmd.index("--checkpoint-every") + 1] = "1000"  # so the only checkpoint is the one the signal writes
    proc = _start_and_wait_for_steps(cmd, out, 3)
    proc.send_signal(sig)
    err, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    stopped = load_checkpoint(out / "checkpoint.pt")
    assert stopped["global_step"] < 20 and not (out / "final.json").exists()
    text = err.decode()
    assert f"{sig.name}: stopping at the next step" in text
    assert f"stopped ({sig.name}) at step {stopped['global_step']}" in text
    assert f"to continue: {' '.join(['python', '-m', 'mdeq.train', *cmd[3:], '--resume'])}" in text  # how to resume
    main(load_config("cifar10_tiny_smoke", SMOKE_SET),
         RunOptions(out_dir=out, data_root=cifar_root, resume=True, **SMOKE_OPTIONS))
    _assert_same_run(full_out, out)


def test_sigterm_stops_at_a_checkpoint_with_exit_code_0(uninterrupted, cifar_root, tmp_path):
    _signal_stops_at_a_checkpoint(signal.SIGTERM, uninterrupted, cifar_root, tmp_path / "run_term")


@pytest.mark.slow  # the SIGTERM test above takes the same path; CI runs both
def test_sigint_stops_at_a_checkpoint_with_exit_code_0(uninterrupted, cifar_root, tmp_path):
    _signal_stops_at_a_checkpoint(signal.SIGINT, uninterrupted, cifar_root, tmp_path / "run_int")


def test_max_steps_stops_mid_epoch_and_resume_continues(cifar_root, tmp_path):
    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=1", "train.pretrain_steps=1"])
    opts = dict(out_dir=tmp_path, data_root=cifar_root, limit_train=32, limit_eval=8, workers=0, threads=1,
                device="cpu", progress=False, checkpoint_every=0)
    final = main(cfg, RunOptions(max_steps=2, **opts))
    assert final["global_step"] == 2 and final["stopped_early"]
    assert _rows(tmp_path / "metrics.csv")[0]["partial"] == "True"
    with pytest.raises(FileExistsError, match="--resume"):
        main(cfg, RunOptions(**opts))
    with pytest.raises(ConfigError, match="train.lr"):
        main(load_config("cifar10_tiny_smoke", ["train.epochs=1", "train.pretrain_steps=1", "train.lr=0.1"]),
             RunOptions(resume=True, **opts))
    final = main(cfg, RunOptions(resume=True, **opts))
    assert final["global_step"] == 4 and not final["stopped_early"]
    rows = _rows(tmp_path / "metrics.csv")
    assert len(rows) == 1 and rows[0]["partial"] == "False" and rows[0]["steps"] == "4"
    again = main(cfg, RunOptions(resume=True, **opts))  # resuming a finished run changes nothing
    assert again["final"] == final["final"] and again["global_step"] == 4 and again["final_epoch"] == 0
    assert len(_rows(tmp_path / "metrics.csv")) == 1


def test_segmentation_run_from_imagenet_weights_reports_miou(tmp_path, capsys):
    from mdeq.engine.checkpoint import save_checkpoint
    from mdeq.engine.data.synthetic import make_synthetic
    from mdeq.core.model import build_model

    root = tmp_path / "cityscapes"
    make_synthetic("cityscapes", root, n_train=2, n_val=1)
    backbone = {"model.num_channels": [8, 8, 16, 16], "model.expansion": 1, "model.num_groups": 2}
    imagenet = build_model(load_config("imagenet_small_official", {
        **backbone, "model.head_channels": [2, 2, 4, 4], "model.final_channels": 16, "data.num_classes": 4,
        "data.image_size": [64, 64], "data.eval_image_size": [64, 64]}))
    save_checkpoint(tmp_path / "imagenet.pt", {"model": imagenet.state_dict()})
    cfg = load_config("cityscapes_small_official", {
        **backbone, "data.image_size": [64, 128], "data.eval_image_size": [128, 256], "data.batch_size": 2,
        "data.eval_batch_size": 1, "solver.max_iter": 3, "solver.memory": 3, "solver.backward_max_iter": 3,
        "solver.unroll_steps": 2, "train.pretrain_steps": 1, "train.epochs": 2,
        "train.pretrained": str(tmp_path / "imagenet.pt")})
    final = main(cfg, RunOptions(out_dir=tmp_path / "run", data_root=root, workers=0, threads=1, device="cpu",
                                 progress=False, data_options={"base_size": 256}))
    out = capsys.readouterr().out
    assert "train.pretrained" in out and "(deq, injection, stem)" in out  # what was loaded, by top-level module
    assert final["metric"] == "miou" and 0.0 <= final["final"] <= 1.0
    assert len(final["final_eval"]["iou"]) == 19
    rows = _rows(tmp_path / "run" / "metrics.csv")
    assert [r["phase"] for r in rows] == ["unrolled", "implicit"] and rows[-1]["eval_miou"] != ""


def test_baseline_options_reach_the_builder_and_a_resume_must_repeat_them(cifar_root, tmp_path, capsys):
    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=1"])
    options = dict(data_root=cifar_root, baseline="resnet18_170k", limit_train=16, limit_eval=8, workers=0,
                   threads=1, device="cpu", progress=False)
    main(cfg, RunOptions(out_dir=tmp_path / "a", baseline_options={"width": 2}, max_steps=1, **options))
    assert "(resnet18_170k, 11,420 parameters)" in capsys.readouterr().out  # width 2, not the paper's 8
    with pytest.raises(ConfigError, match=r"--baseline-option: checkpoint \{'width': 2\} vs now \{'width': 4\}"):
        main(cfg, RunOptions(out_dir=tmp_path / "a", baseline_options={"width": 4}, resume=True, **options))
    with pytest.raises(ValueError, match="need a baseline"):
        RunOptions(out_dir=tmp_path / "b", baseline_options={"width": 2})
    base = ["--config", "cifar10_tiny_smoke", "--data-root", str(cifar_root), "--workers", "0", "--device", "cpu"]
    for extra, expected in [(["--baseline-option", "width=2"], "baseline_options {'width': 2} need a baseline"),
                            (["--baseline", "node_172k", "--baseline-option", "widht=2"],
                             "got an unexpected keyword argument 'widht'"),
                            (["--baseline", "node_172k", "--baseline-option", "width"],
                             "--baseline-option must look like KEY=VALUE, got 'width'")]:
        assert cli([*base, "--out", str(tmp_path / "c"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, (extra, err)


def test_baseline_trains_through_the_same_engine(cifar_root, tmp_path):
    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=1"])
    final = main(cfg, RunOptions(out_dir=tmp_path, data_root=cifar_root, baseline="resnet18_170k", limit_train=16,
                                 limit_eval=8, workers=0, threads=1, device="cpu", progress=False))
    assert final["baseline"] == "resnet18_170k" and final["final"] is not None
    assert _rows(tmp_path / "metrics.csv")[0]["phase"] == "none"


def test_clear_errors(tmp_path, capsys):
    cfg = load_config("cifar10_tiny_smoke")
    from mdeq.engine.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="synthetic"):
        main(cfg, RunOptions(out_dir=tmp_path / "a", data_root=tmp_path / "missing", device="cpu"))
    with pytest.raises(ValueError, match="unknown baseline 'resnet7'"):
        main(cfg, RunOptions(out_dir=tmp_path / "b", baseline="resnet7", device="cpu"))
    assert cli(["--config", "cifar10_tiny_smoke", "--out", str(tmp_path / "c"), "--set", "train.epochz=2"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'epochz'" in err and "'epochs'" in err
    assert cli(["--config", "cifar10_tiny_smoke", "--out", str(tmp_path / "d"), "--baseline", "resnet7"]) == 2
    assert "unknown baseline" in capsys.readouterr().err
    assert cli(["--config", "cifar10_tiny_smoke", "--out", str(tmp_path / "e"),
                "--data-root", str(tmp_path / "missing"), "--device", "cpu"]) == 2
    assert "python -m mdeq.engine.data.synthetic" in capsys.readouterr().err


def test_optimizers_and_schedule_of_table_4():
    model = torch.nn.Linear(2, 2)
    adam = build_optimizer(model, load_config("cifar10_small_official").train)
    assert type(adam) is torch.optim.Adam and adam.defaults["weight_decay"] == 2.5e-6  # L2-coupled, not AdamW
    sgd = build_optimizer(model, load_config("imagenet_small_official").train)
    assert type(sgd) is torch.optim.SGD and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    seg = build_optimizer(model, load_config("cityscapes_small_official").train)
    assert type(seg) is torch.optim.SGD and not seg.defaults["nesterov"] and seg.defaults["lr"] == 0.01
    t = load_config("cifar10_tiny_smoke", ["train.epochs=3"]).train
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t, iterations_per_epoch=5)
    lrs = []
    for _ in range(15):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert sched.T_max == 15 and lrs[0] == t.lr
    assert opt.param_groups[0]["lr"] == pytest.approx(t.eta_min)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # stepped every iteration


def test_set_phase_switches_at_pretrain_steps():
    from mdeq.core.model import build_model

    cfg = load_config("cifar10_tiny_smoke", ["train.pretrain_steps=3", "solver.grad=jfb"])
    model = build_model(cfg)
    assert set_phase(model, cfg, 2) == "unrolled" and model.deq.grad == "unrolled"
    assert set_phase(model, cfg, 3) == "implicit" and model.deq.grad == "jfb"
    assert set_phase(torch.nn.Linear(1, 1), cfg, 0) == "none"


def test_segmentation_loss_is_weighted_ignores_255_and_upsamples():
    cfg = load_config("cityscapes_small_official")
    crit = build_criterion(cfg)
    assert isinstance(crit, SegmentationLoss)
    logits = torch.randn(2, 19, 4, 8)
    target = torch.randint(0, 19, (2, 16, 32))
    target[:, :3] = 255
    w = torch.tensor(cfg.data.class_weights)
    up = F.interpolate(logits, size=(16, 32), mode="bilinear", align_corners=True)
    assert torch.allclose(crit(logits, target), F.cross_entropy(up, target, weight=w, ignore_index=255))


def test_resumable_sampler_skips_the_consumed_part_of_the_same_order():
    data = list(range(23))
    s = ResumableSampler(data, num_replicas=1, rank=0, seed=5)
    s.set_epoch(2)
    order = list(s)
    s.set_epoch(2, skip=8)
    assert list(s) == order[8:] and len(s) == 15
    s.set_epoch(3)
    assert list(s) != order
    shards = [ResumableSampler(data, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    for sh in shards:
        sh.set_epoch(2)
    assert set(shards[0]) | set(shards[1]) == set(data)


def test_amp_bfloat16_step_on_cpu():
    from mdeq.core.model import build_model

    cfg = load_config("cifar10_tiny_smoke")
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg.train)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, logits = train_step(model, torch.nn.CrossEntropyLoss(), opt, x, y,
                              autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert torch.isfinite(loss) and model.last_info.backward is not None
    assert model.last_info.forward.rel_lowest.dtype == torch.float32


def test_solver_state_stays_float32_under_autocast(monkeypatch):
    import mdeq.core.solver_common as solver_common
    from mdeq.core.model import build_model

    seen = []
    original = solver_common._Layout.__init__

    def spy(self, zs):
        original(self, zs)
        seen.append(self.dtype)

    monkeypatch.setattr(solver_common._Layout, "__init__", spy)
    model = build_model(load_config("cifar10_tiny_smoke"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen and all(d == torch.float32 for d in seen)


def test_evaluate_keeps_an_unrolled_model_unrolled():
    """Table 2's unrolled row is scored as the k-layer stack it was trained as, not as a DEQ."""
    from torch.utils.data import DataLoader, TensorDataset

    from mdeq.core.model import build_model
    from mdeq.engine.loop import evaluate

    torch.manual_seed(0)
    model = build_model(load_config("cifar10_tiny_smoke"))
    data = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.arange(4)), batch_size=4)
    calls = []
    model.f.register_forward_hook(lambda *a: calls.append(1))
    model.deq.grad = "unrolled"
    evaluate(model, data, num_classes=10, device=torch.device("cpu"), equilibrium=False)
    assert len(calls) == model.deq.unroll_steps and model.last_info.mode == "unrolled"
    calls.clear()
    evaluate(model, data, num_classes=10, device=torch.device("cpu"))
    assert model.last_info.mode != "unrolled" and len(calls) == model.last_info.forward.nfe
    assert model.deq.grad == "unrolled"  # restored afterwards


def _bilinear_align_corners(x, size):
    """(C, h, w) numpy -> (C, H, W): bilinear with align_corners=True, written out (the released evaluation's)."""
    import numpy as np

    c, h, w = x.shape
    out = np.zeros((c, *size))
    for i in range(size[0]):
        sy = i * (h - 1) / (size[0] - 1)
        y0 = min(int(sy), h - 1)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(size[1]):
            sx = j * (w - 1) / (size[1] - 1)
            x0 = min(int(sx), w - 1)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                            + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
    return out


def test_evaluate_segmentation_upsamples_takes_the_argmax_and_scores_like_a_written_out_reference():
    """Table 3's path inside ``evaluate``: logits of a (6, 10) output map, labels of (23, 39); the reference
    upsamples with bilinear align_corners=True written out in numpy, takes the argmax per pixel, counts a
    confusion matrix pixel by pixel without the void label 255 and scores IoU per class (a class neither in
    the labels nor predicted is left out of the mean), mIoU and pixel accuracy."""
    import numpy as np
    from torch.utils.data import DataLoader, TensorDataset

    from mdeq.engine.loop import evaluate

    g = torch.Generator().manual_seed(3)
    n, c, size = 4, 19, (23, 39)
    logits = torch.randn(n, c, 6, 10, generator=g, dtype=torch.float64)
    logits[:, 18] -= 100.0  # class 18 is never predicted (nor labelled, below): left out of the mean
    ups = np.stack([_bilinear_align_corners(x, size) for x in logits.numpy()])
    pred = ups.argmax(1)
    labels = pred.copy()
    noise = torch.rand(n, *size, generator=g).numpy()
    labels[noise < 0.2] = torch.randint(0, 18, (n, *size), generator=g).numpy()[noise < 0.2]
    labels[:, :3] = 255  # a void band
    labels[0, 5:9, 7:20] = 255

    class FixedLogits(torch.nn.Module):
        """The segmentation model's contract: images in, (B, C, h, w) logits out; here the logits given."""

        def __init__(self):
            super().__init__()
            self.batches = iter(logits.float().split(2))

        def forward(self, images):
            return next(self.batches)

    data = DataLoader(TensorDataset(torch.zeros(n, 3, 8, 8), torch.from_numpy(labels)), batch_size=2)
    r = evaluate(FixedLogits(), data, num_classes=c, device=torch.device("cpu"))
    cm = np.zeros((c, c), dtype=np.int64)
    for t_, p_ in zip(labels.ravel(), pred.ravel()):
        if t_ != 255:
            cm[t_, p_] += 1
    with np.errstate(invalid="ignore"):
        iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert r["samples"] == n and math.isnan(r["iou"][18]) and np.isnan(iou[18])
    np.testing.assert_allclose(r["iou"], iou, rtol=0, atol=1e-12)
    assert r["miou"] == pytest.approx(np.nanmean(iou), abs=1e-12) and 0.5 < r["miou"] < 0.9
    assert r["pixel_acc"] == pytest.approx(100 * np.trace(cm) / cm.sum(), abs=1e-10)
    assert "top1" not in r


# ----------------------------------------------------------------------------------------------
# One writer per run folder, nothing replaced or mixed silently, every error one line.

def test_a_second_process_on_a_run_folder_is_refused_with_the_holders_pid(cifar_root, tmp_path, capsys):
    """While one process trains, a second ``python -m mdeq.train`` (with or without --resume) fails at once
    with exit code 2 (run here in this process through ``cli``: the lock is the other process's)."""
    out = tmp_path / "run"
    cmd = _command(cifar_root, out)
    cmd[cmd.index("--checkpoint-every") + 1] = "1000"  # the second one starts before any checkpoint exists
    cmd[cmd.index("train.epochs=2")] = "train.epochs=50"  # long enough to still run when the others are done
    first = _start_and_wait_for_steps(cmd, out, 1)
    try:
        results = []
        for argv in (cmd[3:], [*cmd[3:], "--resume"]):
            rc = cli(argv)
            results.append((rc, capsys.readouterr().err))
        assert first.poll() is None  # the first one held the lock all along
        for rc, err in results:
            assert rc == 2, err
            assert err.strip().count("\n") == 0 and err.startswith("error: ")
            assert f"is in use: process {first.pid} on" in err and str(out / ".lock") in err
    finally:
        first.send_signal(signal.SIGTERM)
        text, _ = first.communicate(timeout=120)
    assert first.returncode == 0, text.decode()[-2000:]
    steps = [s["step"] for s in _steps(out / "steps.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no duplicated or interleaved records
    assert load_checkpoint(out / "checkpoint.pt")["global_step"] == steps[-1]


def test_a_start_without_resume_refuses_a_folder_with_run_files_and_sweeps_stale_temp_files(cifar_root, tmp_path,
                                                                                             capsys):
    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=1"])
    opts = dict(data_root=cifar_root, limit_train=16, limit_eval=8, workers=0, threads=1, device="cpu",
                progress=False, max_steps=1)
    logs_only = tmp_path / "logs_only"  # a run killed before its first checkpoint
    logs_only.mkdir()
    (logs_only / "steps.jsonl").write_text('{"step": 1, "loss": 2.3}\n')
    (logs_only / "train.log").write_text("earlier output\n")
    with pytest.raises(FileExistsError, match=r"logs_only already holds a run \(steps.jsonl\): pass --resume"):
        main(cfg, RunOptions(out_dir=logs_only, **opts))
    assert (logs_only / "steps.jsonl").read_text() == '{"step": 1, "loss": 2.3}\n'  # not replaced

    fresh = tmp_path / "fresh"  # what mdeq.campaign leaves before a run's first chunk, and stale temp files
    fresh.mkdir()
    (fresh / "train.log").write_text("campaign output\n")
    (fresh / ".lock").write_text("12345 on elsewhere\n")
    stale = [".checkpoint.pt.k3j9x1.tmp", ".steps.jsonl.tmp", ".provenance.json.tmp", "metrics.csv.tmp"]
    for name in stale:
        (fresh / name).write_bytes(b"partial")
    capsys.readouterr()
    main(cfg, RunOptions(out_dir=fresh, **opts))
    assert f"removed temporary files an earlier writer left in {fresh}: {', '.join(sorted(stale))}" in \
        capsys.readouterr().out
    assert not any((fresh / name).exists() for name in stale)
    assert {"checkpoint.pt", "steps.jsonl", "metrics.csv", "final.json", "train.log"} <= \
        {p.name for p in fresh.iterdir()}


def test_resume_refuses_another_limit_or_schedule_length(cifar_root, tmp_path):
    from mdeq.engine.checkpoint import save_checkpoint

    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=1", "train.pretrain_steps=1"])
    opts = dict(out_dir=tmp_path, data_root=cifar_root, limit_eval=8, workers=0, threads=1, device="cpu",
                progress=False, checkpoint_every=0)
    main(cfg, RunOptions(max_steps=2, limit_train=32, **opts))
    with pytest.raises(ConfigError, match=r"--limit-train: checkpoint 32 vs now 40.*iterations per epoch: "
                                          r"checkpoint 4 vs now 5"):
        main(cfg, RunOptions(resume=True, limit_train=40, **opts))
    with pytest.raises(ConfigError, match="--limit-eval: checkpoint 8 vs now 4"):
        main(cfg, RunOptions(resume=True, limit_train=32, **{**opts, "limit_eval": 4}))
    # a checkpoint written before these checks (no "run" entry) is still checked by its schedule length
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    del ckpt["run"], ckpt["loss_reference"]
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    with pytest.raises(ConfigError, match="cosine schedule length .*: checkpoint 4 vs now 5"):
        main(cfg, RunOptions(resume=True, limit_train=40, **opts))
    final = main(cfg, RunOptions(resume=True, limit_train=32, **opts))  # and resumes with the same settings
    assert final["global_step"] == 4 and load_checkpoint(tmp_path / "checkpoint.pt")["run"]["limit_train"] == 32


def test_divergence_stops_before_the_good_checkpoint_is_overwritten(cifar_root, tmp_path, monkeypatch, capsys):
    import mdeq.engine.loop as loop
    from mdeq.engine.guards import DivergenceError

    real_step, calls = loop.train_step, [0]

    def blow_up_at_step_5(model, *args, **kwargs):  # a fault injected after 4 healthy steps
        out = real_step(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 5:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1e7)
        return out

    monkeypatch.setattr(loop, "train_step", blow_up_at_step_5)
    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=1"])
    with pytest.raises(DivergenceError, match=r"diverged by step 5 .*a parameter is .*above the bound "
                                                        r"1e\+06.*checkpoint .*checkpoint.pt \(step 3\) is kept"):
        main(cfg, RunOptions(out_dir=tmp_path / "a", data_root=cifar_root, limit_train=64, limit_eval=8, workers=0,
                             threads=1, device="cpu", progress=False, checkpoint_every=3, log_every=1))
    kept = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert kept["global_step"] == 3 and max(v.abs().max() for v in kept["model"].values()) < 100
    monkeypatch.undo()

    # --set train.lr=1e6 (Adam): a parameter of 1e6 after one step; without that bound, the loss check
    base = ["--config", "cifar10_tiny_smoke", "--data-root", str(cifar_root), "--set", "train.epochs=1",
            "train.lr=1e6", "--limit-train", "64", "--limit-eval", "8", "--workers", "0", "--threads", "1",
            "--device", "cpu", "--no-progress", "--log-every", "1"]
    assert cli([*base, "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: training diverged by step 1") and "lower train.lr" in err
    assert cli([*base, "--out", str(tmp_path / "c"), "--max-param-abs", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: training diverged at step 2 (epoch 0): loss" in err
    assert "more than 100x the run's reference loss" in err


def test_every_user_error_is_one_line_with_exit_code_2(cifar_root, tmp_path, capsys):
    import shutil

    from mdeq.engine import data as data_mod

    base = ["--config", "cifar10_tiny_smoke", "--set", "train.epochs=1", "--data-root", str(cifar_root),
            "--limit-train", "16", "--limit-eval", "8", "--workers", "0", "--threads", "1", "--device", "cpu",
            "--no-progress"]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: x\nmodel:\n  num_channels: [8, 8\n  num_groups: 2\n")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(cifar_root, corrupt)
    batch = corrupt / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:-100])  # a truncated pickle: its md5 no longer matches
    assert cli([*base, "--out", str(tmp_path / "ok"), "--max-steps", "1"]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ok", broken)
    (broken / "checkpoint.pt").write_bytes((broken / "checkpoint.pt").read_bytes()[:5000])
    capsys.readouterr()
    cases = [
        (["--set", "train.lr=[1"], "override 'train.lr=[1': the value is not valid YAML (expected ',' or ']'"),
        (["--config", str(bad_yaml)], f"{bad_yaml}: not valid YAML (expected ',' or ']', but got ':' at line 4"),
        (["--data-option", "agument=true"], "unknown option(s) agument for cifar10; valid: augment"),
        (["--data-root", str(corrupt)], f"{batch}: md5"),
        (["--out", str(broken), "--resume"], f"{broken / 'checkpoint.pt'} (5000 bytes) is not a readable checkpoint"),
        (["--out", str(tmp_path / "ok")], "ok already holds a run (checkpoint.pt, steps.jsonl, metrics.csv"),
        (["--data-root", str(tmp_path / "missing")], "cifar10: the data directory does not exist (looked in"),
    ]
    for extra, expected in cases:
        argv = [*base, "--out", str(tmp_path / "out"), *extra]
        assert cli(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, (extra, err)
    assert cli([*base, "--out", str(tmp_path / "out"), "--data-option", "agument=true", "--traceback"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and isinstance(data_mod.DataOptionError("x"), TypeError)
    assert err.strip().splitlines()[-1].startswith("error: unknown option(s) agument")


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_checkpoint(uninterrupted, cifar_root, tmp_path,
                                                                          capsys):
    """A tmpfs a little larger than one checkpoint: the second checkpoint's write fails with ENOSPC."""
    import shutil

    full_out, _ = uninterrupted
    size = (full_out / "checkpoint.pt").stat().st_size
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if shutil.which("mount") is None or (os.name == "posix" and os.geteuid() != 0):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(1.6 * size) // 1024}k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        out = mnt / "run"
        argv = ["--config", "cifar10_tiny_smoke", "--set", *SMOKE_SET, "--data-root", str(cifar_root), "--out",
                str(out), "--limit-train", "80", "--limit-eval", "16", "--workers", "0", "--log-every", "1",
                "--checkpoint-every", "1", "--threads", "1", "--device", "cpu", "--no-progress"]
        assert cli(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(f"error: [Errno 28] could not write the checkpoint {out / 'checkpoint.pt'}: no space "
                              f"left on device")
        assert load_checkpoint(out / "checkpoint.pt")["global_step"] == 1  # the previous checkpoint is intact
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
        chunks = json.loads((out / "provenance.json").read_text())["chunks"]
        assert chunks[-1]["ended"].startswith("error: OSError: [Errno 28]")
        with open(mnt / "filler", "wb", buffering=0) as fh:  # now fill the disk: the resume's log rewrite fails
            with pytest.raises(OSError):
                while True:
                    fh.write(b"\0" * 4096)
        assert cli([*argv, "--resume"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "[Errno 28] could not write" in err and str(out) in err, err
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no .steps.jsonl.tmp either
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_train_step_computes_no_gradient_for_the_ift_leaf_z_star(monkeypatch):
    """A plain backward also fills dL/dz* (the f(z*) call's leaf) and throws it away; ``train_step`` names
    the optimiser's parameters as the backward's inputs, so z* gets no gradient and the parameters get the
    same bits as with a plain backward."""
    import mdeq.core.implicit as implicit
    from mdeq.core.model import build_model

    leaves = []
    original = implicit._IFTBackward.__init__

    def spy(self, layer, z_star, z_new, info):
        original(self, layer, z_star, z_new, info)
        leaves.append(z_star)

    monkeypatch.setattr(implicit._IFTBackward, "__init__", spy)
    cfg = load_config("cifar10_tiny_smoke")
    torch.manual_seed(0)
    model = build_model(cfg)
    set_phase(model, cfg, cfg.train.pretrain_steps)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    torch.manual_seed(1)  # the same dropout masks in both steps
    F.cross_entropy(model(x), y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in leaves[-1])  # the wasted gradient

    torch.manual_seed(1)
    train_step(model, torch.nn.CrossEntropyLoss(), opt, x, y)
    assert len(leaves) == 2 and all(z.grad is None for z in leaves[-1])
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, plain[n]), n
