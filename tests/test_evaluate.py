"""mdeq.evaluate: a run folder's checkpoint evaluated as its run evaluated it, the logged accuracy reproduced
exactly where the run's data is here, one-line errors, nothing written into the run folder, released checkpoints
through the converter, and the table of committed checkpoints."""
from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import skip_while_runs_change
from mdeq import evaluate as ev
from mdeq.paper import trained as tr
from mdeq.core.config import config_to_dict, load_config
from mdeq.core.model import build_model
from mdeq.engine.paths import RESULTS, ROOT

TINY = "cifar10_tiny_smoke"


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """A synthetic CIFAR-10 copy in the official layout (16 test images)."""
    from mdeq.engine.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("cifar")
    make_synthetic("cifar10", root, n_train_per_batch=2, n_val=16)
    return root


def _run_folder(path: Path, cfg_name: str = TINY, *, provenance_config=None, data_root=None, step: int = 12,
                step_in_epoch: int = 0, rows=()) -> Path:
    """A run folder as mdeq.train leaves it: checkpoint.pt (a tiny MDEQ at its initial weights), provenance.json
    and metrics.csv with ``rows`` = [(epoch, step, top1)]."""
    cfg = load_config(cfg_name)
    torch.manual_seed(0)
    model = build_model(cfg)
    path.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "baseline": None, "global_step": step,
                "epoch": 1, "step_in_epoch": step_in_epoch, "run": {"iterations_per_epoch": 12, "data_options": {}}},
               path / "checkpoint.pt")
    prov = {"config": provenance_config if provenance_config is not None else config_to_dict(cfg),
            "options": {"data_root": str(data_root) if data_root else None, "data_options": {}},
            "data_source_label": "synthetic"}
    (path / "provenance.json").write_text(json.dumps(prov))
    lines = ["epoch,step,eval_top1,eval_loss,partial"] + [f"{e},{s},{t},1.0,False" for e, s, t in rows]
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")
    return path


def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = ev.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}


# ----------------------------------------------------------------------------------------------
# One-line errors.

def test_a_missing_run_folder_is_one_line(capsys, tmp_path):
    rc, out, err = _cli(capsys, tmp_path / "nope")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: no run folder at {tmp_path / 'nope'}")


def test_a_folder_without_checkpoint_is_one_line(capsys, tmp_path):
    rc, _, err = _cli(capsys, tmp_path)
    assert rc == 2 and err.count("\n") == 1 and "holds no checkpoint.pt" in err


def test_a_wrong_config_is_one_line(capsys, tmp_path, cifar_root):
    bad = config_to_dict(load_config(TINY))
    bad["model"]["num_chanels"] = bad["model"].pop("num_channels")  # a misspelt key
    run = _run_folder(tmp_path / "misspelt", provenance_config=bad, data_root=cifar_root)
    rc, _, err = _cli(capsys, run)
    assert rc == 2 and err.count("\n") == 1
    assert "provenance.json: the run's config is not valid" in err and "num_chanels" in err
    # a valid config that is not the one the weights were trained with
    other = config_to_dict(load_config(TINY, ["model.num_channels=[4, 8, 8]"]))
    run = _run_folder(tmp_path / "other", provenance_config=other, data_root=cifar_root)
    rc, _, err = _cli(capsys, run)
    assert rc == 2 and err.count("\n") == 1
    assert "differs from the one checkpoint.pt was trained with" in err and "model.num_channels" in err


def test_weights_that_do_not_fit_the_config_are_one_line(capsys, tmp_path, cifar_root):
    run = _run_folder(tmp_path / "run", data_root=cifar_root)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith("head.")}
    torch.save(ckpt, run / "checkpoint.pt")
    rc, _, err = _cli(capsys, run)
    assert rc == 2 and err.count("\n") == 1
    assert "do not fit the config 'cifar10_tiny_smoke'" in err and "missing (e.g. head." in err


def test_a_missing_data_root_is_one_line(capsys, tmp_path):
    run = _run_folder(tmp_path / "run", data_root=tmp_path / "gone")
    rc, _, err = _cli(capsys, run)
    assert rc == 2 and err.count("\n") == 1 and "cifar10: the data directory does not exist" in err
    rc, _, err = _cli(capsys, run, "--data-root", tmp_path / "elsewhere")
    assert rc == 2 and err.count("\n") == 1 and str(tmp_path / "elsewhere") in err


def test_bad_combinations_are_one_line(capsys, tmp_path):
    for argv, message in [((), "give a run folder"), (("--official", "x.pth"), "--official needs --config"),
                          ((tmp_path, "--config", TINY), "--config is for --official"),
                          ((tmp_path, "--limit", "0"), "--limit must be >= 1")]:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and message in err, (argv, err)


# ----------------------------------------------------------------------------------------------
# Evaluating.

def test_evaluates_with_the_engine_and_never_writes_into_the_run_folder(capsys, tmp_path, cifar_root):
    run = _run_folder(tmp_path / "run", data_root=cifar_root, rows=[(0, 12, 10.0)])
    before = _snapshot(run)
    rc, out, err = _cli(capsys, run, "--json", tmp_path / "out.json")
    assert rc == 0, err
    assert _snapshot(run) == before  # no lock, no log, nothing
    assert "top-1" in out and "forward NFE" in out and "relative residual" in out
    assert "logged: epoch 1 at step 12" in out
    result = json.loads((tmp_path / "out.json").read_text())
    trained = tr.load_run(run)
    assert result["result"]["sha256"] == hashlib.sha256((run / "checkpoint.pt").read_bytes()).hexdigest()
    # the same number as the engine's evaluate on the same weights and data (the path the run logged)
    from torch.utils.data import DataLoader

    from mdeq.engine.data import build_dataset
    from mdeq.engine.build import build_criterion
    from mdeq.engine.loop import evaluate

    model = build_model(trained.cfg)
    model.load_state_dict(trained.state_dict)
    loader = DataLoader(build_dataset("cifar10", cifar_root, "val"), batch_size=trained.cfg.data.eval_batch_size)
    engine = evaluate(model, loader, num_classes=10, device=torch.device("cpu"), criterion=build_criterion(trained.cfg),
                      memory_format=torch.channels_last)
    assert result["result"]["top1"] == engine["top1"] and result["result"]["loss"] == engine["loss"]
    # --json into the run folder is refused
    rc, _, err = _cli(capsys, run, "--json", run / "x.json")
    assert rc == 2 and "never writes into" in err and _snapshot(run) == before


def test_a_mid_epoch_checkpoint_says_its_weights_were_not_evaluated(capsys, tmp_path, cifar_root):
    run = _run_folder(tmp_path / "run", data_root=cifar_root, step=15, step_in_epoch=3, rows=[(0, 12, 10.0)])
    rc, out, _ = _cli(capsys, run, "--limit", "4")
    assert rc == 0
    assert "metrics.csv has no evaluation of these weights (step 15: 1 of 1 epochs done, 3 of 12 steps" in out
    assert "the last evaluation logged is epoch 1 at step 12: 10.00 %" in out


@pytest.mark.filterwarnings("ignore:broyden. f.z. is not finite")  # random released-like weights
def test_released_checkpoints_go_through_the_converter(capsys, tmp_path, cifar_root):
    from test_official import _released_like

    from mdeq.core.official import convert_state_dict

    _, released = _released_like("cifar10_small_official", "cpu")
    path = tmp_path / "cls_mdeq_TINY.pth"
    torch.save({"state_dict": released}, path)
    rc, out, err = _cli(capsys, "--official", path, "--config", "cifar10_small_official", "--data-root", cifar_root,
                        "--limit", "4", "--json", tmp_path / "released.json")
    assert rc == 0, err
    assert "released checkpoint" in out and "top-1" in out
    got = json.loads((tmp_path / "released.json").read_text())["result"]
    cfg = load_config("cifar10_small_official")
    model = build_model(cfg)
    model.load_state_dict(convert_state_dict(released, cfg), strict=True)
    trained = tr.load_released(path, "cifar10_small_official")
    assert all(torch.equal(trained.state_dict[k], v) for k, v in model.state_dict().items())
    assert got["samples"] == 4 and got["params"] == 158_986


def test_the_checkpoint_table(tmp_path, cifar_root):
    _run_folder(tmp_path / "runs" / "a_run", data_root=cifar_root, rows=[(0, 12, 12.5)])
    (tmp_path / "runs" / "no_checkpoint").mkdir()
    rows = tr.checkpoint_table(tmp_path / "runs")
    assert [r["run"] for r in rows] == ["a_run"]
    r = rows[0]
    assert r["logged_top1"] == 12.5 and r["params"] == 24_298 and r["epochs_trained"] == 1.0
    assert r["sha256"] == hashlib.sha256((tmp_path / "runs" / "a_run" / "checkpoint.pt").read_bytes()).hexdigest()
    text = tr.format_checkpoint_table(rows)
    assert text.splitlines()[0].startswith("| run |") and "| 12.50 |" in text and "`python -m mdeq.evaluate " in text


# ----------------------------------------------------------------------------------------------
# The committed checkpoints: the logged accuracy, reproduced exactly on the run's own data.

def _needs_run_data(run: Path) -> tr.Trained:
    trained = tr.load_run(run)
    needed = [trained.data_root, *(Path(v) for k, v in trained.data_options.items() if k == "exact_subset")]
    missing = [p for p in needed if p is None or not Path(p).exists()]
    if missing:
        pytest.skip(f"the data {run.name} was trained on is not on this machine ({', '.join(map(str, missing))}; "
                    f"its provenance.json names it)")
    return trained


@pytest.mark.slow
def test_the_committed_resnet_reproduces_its_logged_accuracy_exactly():
    """ResNet-18 (170K) finished: its checkpoint holds the last epoch's weights (about 15-30 s on one thread)."""
    run = RESULTS / "runs" / "cifar10_resnet18_170k"
    trained = _needs_run_data(run)
    logged, _ = tr.logged_evaluation(run, trained.global_step)
    assert logged is not None, "the finished ResNet-18's checkpoint is its last epoch's, which metrics.csv logs"
    got = tr.evaluate_trained(trained)  # one thread (conftest); the run evaluated with two
    assert got["samples"] == 10000 and got["data_label"] == trained.data_label
    assert got["top1"] == float(logged["eval_top1"]) == 68.71


def _end_of_epoch_checkpoint(run: Path, dest: Path) -> tuple[str, int]:
    """The latest commit whose ``<run>/checkpoint.pt`` holds the weights of an evaluated epoch's end."""
    rel = run.relative_to(ROOT).as_posix()
    try:
        log = subprocess.run(["git", "log", "--format=%H", "--", f"{rel}/checkpoint.pt"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    except OSError:
        log = None
    if log is None or log.returncode != 0 or not log.stdout.split():
        pytest.skip("no git history of the committed checkpoint (not a git clone, or a shallow one)")
    for sha in log.stdout.split():
        path = tr.checkpoint_at(run, sha, dest)
        step = torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        if tr.logged_evaluation(run, step)[0] is not None:
            return sha, step
    pytest.skip(f"no commit holds a checkpoint of {rel} whose weights metrics.csv evaluated")


@pytest.mark.slow
def test_a_committed_mdeq_small_checkpoint_reproduces_its_logged_accuracy_exactly(tmp_path):
    """MDEQ-small's committed checkpoint is often mid-epoch (the campaign stops on a time budget); the latest one
    at an epoch's end is read from git history and evaluated as its run did (minutes on one CPU thread)."""
    run = RESULTS / "runs" / "cifar10_mdeq_small"
    _needs_run_data(run)
    sha, step = _end_of_epoch_checkpoint(run, tmp_path / "checkpoint.pt")
    trained = tr.load_run(run, tmp_path / "checkpoint.pt")
    logged, _ = tr.logged_evaluation(run, step)
    got = tr.evaluate_trained(trained)
    assert got["samples"] == 10000
    assert got["top1"] == float(logged["eval_top1"]), f"commit {sha[:10]}, step {step}"
    assert got["nfe_forward"] == float(logged["eval_nfe_forward"])


def test_the_trained_models_table_is_what_the_committed_checkpoints_give():
    """The table docs/trained_models.md includes (the book's "Trained models" page, which the README links) is
    `python -m mdeq.evaluate --table`'s output for the committed checkpoints, written by `mdeq.reproduce --readme`."""
    skip_while_runs_change()
    assert "{include} ../results/trained_models.md" in (ROOT / "docs" / "trained_models.md").read_text()
    committed = tr.CHECKPOINT_TABLE.read_text()
    rows = tr.checkpoint_table(RESULTS / "runs")
    assert rows and all(f"| `{row['run']}` |" in committed for row in rows)
    assert committed.endswith(tr.format_checkpoint_table(rows) + "\n"), (
        "results/trained_models.md differs from the committed checkpoints: run `python -m mdeq.reproduce --readme`")
