"""The training engine on CPU: an end-to-end smoke run through the warm-up into the implicit phase, a run
killed with SIGKILL mid-epoch and resumed that ends bit-identical to an uninterrupted one, segmentation and
baseline runs, the optimisers and schedule of Table 4, and clear errors."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdeq import paths
from mdeq.checkpoint import load_checkpoint
from mdeq.config import ConfigError, load_config
from mdeq.train import (ResumableSampler, RunOptions, SegmentationLoss, build_criterion, build_optimizer,
                        build_scheduler, cli, main, set_phase, train_step)

pytestmark = pytest.mark.filterwarnings("ignore:IFT backward solve did not converge:RuntimeWarning")

# 80 samples / batch 8 = 10 steps per epoch, 2 epochs; the warm-up ends at step 8, inside epoch 0.
SMOKE_SET = ["train.epochs=2", "train.pretrain_steps=8", "train.lr=3e-3"]
SMOKE_OPTIONS = dict(limit_train=80, limit_eval=16, workers=0, log_every=1, checkpoint_every=3, threads=1,
                     device="cpu", progress=False, deterministic=True)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    from mdeq.data.synthetic import make_synthetic

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
    import mdeq.train as train_mod

    full_out, full_final = uninterrupted
    out = tmp_path / "chunked"
    real = train_mod._StopRule.reason
    for stop_at_call in (4, 8, None):
        calls = [0]

        def reason(self, upcoming_s, _n=stop_at_call, _calls=calls):
            _calls[0] += 1
            return "stop_at" if _calls[0] == _n else real(self, upcoming_s)

        monkeypatch.setattr(train_mod._StopRule, "reason", reason)
        final = main(load_config("cifar10_tiny_smoke", SMOKE_SET),
                     RunOptions(out_dir=out, data_root=cifar_root, resume=True, **SMOKE_OPTIONS))
        if stop_at_call is not None:
            assert final["stopped"] == "stop_at" and not (out / "final.json").exists()
    ckpts = json.loads((out / "provenance.json").read_text())["chunks"]
    assert [(c["from_step"], c["to_step"], c["ended"]) for c in ckpts] == \
           [(0, 3, "stop_at"), (3, 10, "stop_at"), (10, 20, "finished")]
    assert ckpts[1]["to_step_in_epoch"] == 10  # the epoch was trained, its evaluation ran in the next chunk
    _assert_same_run(full_out, out)
    assert json.loads((out / "final.json").read_text())["final"] == full_final["final"]


def test_sigterm_stops_at_a_checkpoint_with_exit_code_0(uninterrupted, cifar_root, tmp_path):
    full_out, _ = uninterrupted
    out = tmp_path / "run_term"
    env = {**os.environ, "PYTHONPATH": str(paths.ROOT)}
    env.pop("RANK", None)
    cmd = _command(cifar_root, out)
    cmd[cmd.index("--checkpoint-every") + 1] = "1000"  # so the only checkpoint is the one SIGTERM writes
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while not (out / "steps.jsonl").exists() or len(_steps(out / "steps.jsonl")) < 3:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no steps logged: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    err, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    stopped = load_checkpoint(out / "checkpoint.pt")
    assert stopped["global_step"] < 20 and not (out / "final.json").exists()
    assert "SIGTERM: stopping at the next step" in err.decode()
    main(load_config("cifar10_tiny_smoke", SMOKE_SET),
         RunOptions(out_dir=out, data_root=cifar_root, resume=True, **SMOKE_OPTIONS))
    _assert_same_run(full_out, out)


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
    from mdeq.checkpoint import save_checkpoint
    from mdeq.data.synthetic import make_synthetic
    from mdeq.model import build_model

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


def test_baseline_trains_through_the_same_engine(cifar_root, tmp_path):
    cfg = load_config("cifar10_tiny_smoke", ["train.epochs=1"])
    final = main(cfg, RunOptions(out_dir=tmp_path, data_root=cifar_root, baseline="resnet18_170k", limit_train=16,
                                 limit_eval=8, workers=0, threads=1, device="cpu", progress=False))
    assert final["baseline"] == "resnet18_170k" and final["final"] is not None
    assert _rows(tmp_path / "metrics.csv")[0]["phase"] == "none"


def test_clear_errors(tmp_path, capsys):
    cfg = load_config("cifar10_tiny_smoke")
    from mdeq.data import DatasetNotFoundError

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
    assert "python -m mdeq.data.synthetic" in capsys.readouterr().err


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
    from mdeq.model import build_model

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
    from mdeq.model import build_model

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
    import mdeq.solvers as solvers
    from mdeq.model import build_model

    seen = []
    original = solvers._Layout.__init__

    def spy(self, zs):
        original(self, zs)
        seen.append(self.dtype)

    monkeypatch.setattr(solvers._Layout, "__init__", spy)
    model = build_model(load_config("cifar10_tiny_smoke"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert seen and all(d == torch.float32 for d in seen)


def test_evaluate_keeps_an_unrolled_model_unrolled():
    """Table 2's unrolled row is scored as the k-layer stack it was trained as, not as a DEQ."""
    from torch.utils.data import DataLoader, TensorDataset

    from mdeq.model import build_model
    from mdeq.train import evaluate

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
