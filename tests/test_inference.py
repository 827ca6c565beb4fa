"""mdeq.paper.inference: one long solve read off at every budget equals separate solves with max_iter = k (Broyden and
plain iteration), the budget sweep agrees with the engine's evaluation at the config's budget, and the
resolution measurement counts f evaluations as Figs. 5-6's table does."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from conftest import importorskip
from mdeq.paper import inference
from mdeq.core.config import load_config
from mdeq.paper.trained import Trained
from mdeq.core.model import build_model
from mdeq.core.solvers import SOLVERS

TINY = "cifar10_tiny_smoke"


def _trained(cfg_name: str = TINY, seed: int = 0) -> Trained:
    cfg = load_config(cfg_name)
    torch.manual_seed(seed)
    return Trained(name="tiny", cfg=cfg, state_dict=build_model(cfg).state_dict(), source=None, checkpoint=None,
                   sha256="", size_bytes=0)


@pytest.mark.parametrize("solver", ["broyden", "fixed_point"])
def test_reading_off_one_long_solve_equals_separate_solves(solver):
    """The state a solve with max_iter = k returns is the head's input the read-off picks from the solve of the
    largest budget, for every k (float64, so the two Broyden histories differ by rounding only)."""
    trained = _trained()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    top = 14  # > 2 m - 1 for m = 6: the long solve keeps the low-rank history, the short ones the residuals
    long = inference.budget_model(trained, solver, top).double()
    assert long.deq.solver is SOLVERS[solver] and long.deq.eval_max_iter == top and long.deq.eval_tol == 1e-12
    tap = inference._Tap(long)
    with torch.no_grad():
        returned = long(x)
    fwd = long.last_info.forward
    assert fwd.nfe == top + 1 == len(tap.logits)
    logits = torch.stack(tap.logits)
    measure = fwd.abs_trace if trained.cfg.solver.stop_mode == "abs" else fwd.rel_trace
    rows = torch.arange(4)
    for k in (1, 2, 3, 5, 6, 9, top):
        short = inference.budget_model(trained, solver, k).double()
        with torch.no_grad():
            expected = short(x)
        assert short.last_info.forward.nfe == k + 1
        got = logits[inference._read_off(measure, k), rows]
        torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=1e-9, msg=f"max_iter {k}")
    torch.testing.assert_close(logits[inference._read_off(measure, top), rows].double(), returned, rtol=0, atol=1e-12)


def test_the_read_off_keeps_the_first_lowest_residual_as_the_solver_does():
    res = torch.tensor([[1.0, 0.5, 0.5, 0.7], [1.0, float("nan"), 0.9, 0.2]])
    assert inference._read_off(res, 0).tolist() == [0, 0]
    assert inference._read_off(res, 2).tolist() == [1, 2]  # a tie keeps the earlier iterate; NaN counts as inf
    assert inference._read_off(res, 3).tolist() == [1, 3]


def test_the_budget_sweep_agrees_with_the_engine_at_the_config_budget(tmp_path):
    """Broyden at the config's eval budget is what ``mdeq.engine.loop.evaluate`` computes for the same weights and data;
    k = 0 is z = 0, one class for every image; budgets run in full and the config's budget is always measured."""
    from mdeq.engine.data.synthetic import make_synthetic
    from mdeq.paper.trained import eval_dataset, evaluate_trained

    root = tmp_path / "cifar"
    make_synthetic("cifar10", root, n_train_per_batch=2, n_val=24)
    trained = _trained()
    trained.data_root = root
    dataset, _, _ = eval_dataset(trained)
    out = inference.accuracy_against_budget(trained, dataset, budgets=(0, 1, 3), log=lambda s: None)
    t_f = trained.cfg.solver.max_iter
    assert out["budgets"] == sorted({0, 1, 3, t_f}) and out["samples"] == 24
    engine = evaluate_trained(trained)
    for solver in ("broyden", "fixed_point"):
        res = out["solvers"][solver]
        assert res["complete"] and res["nfe_per_solve"] == t_f + 1
        rows = {r["max_iter"]: r for r in res["rows"]}
        assert rows[0]["nfe"] == 0 and rows[1]["nfe"] == 2
        labels = torch.tensor([int(y) for _, y in dataset])
        assert any(abs(rows[0]["top1"] - 100.0 * float((labels == c).double().mean())) < 1e-9 for c in range(10))
        assert all(math.isfinite(r["rel_residual_mean"]) for r in res["rows"])
    assert out["solvers"]["broyden"]["rows"][-1]["agree_with_reference"] == 100.0
    assert {r["max_iter"]: r for r in out["solvers"]["broyden"]["rows"]}[t_f]["top1"] == engine["top1"]
    assert out["solvers"]["fixed_point"]["readoff_max_abs_diff"] == 0.0  # it returns an evaluated iterate
    assert 0.0 <= out["injection_alone"]["top1"] <= 100.0


def test_a_baseline_has_no_budget_to_vary():
    trained = _trained()
    trained.baseline = "resnet18_170k"
    with pytest.raises(ValueError, match="not an implicit model"):
        inference.accuracy_against_budget(trained, TensorDataset(torch.zeros(1, 3, 32, 32), torch.zeros(1)))


def test_convergence_against_resolution_counts_as_the_figure_table_does():
    trained = _trained()
    images = {"a": torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8),
              "b": torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)}
    inputs = inference.resolution_inputs({"random": images}, sizes=(16, 32))
    assert inputs["random"]["names"] == ["a", "b"] and inputs["random"][32].shape == (2, 3, 32, 32)
    saved = []
    out = inference.convergence_against_resolution(trained, inputs, budget=6, solvers=("fixed_point",),
                                                   save=saved.append, log=lambda s: None)
    cell = out["sources"]["random"]["sizes"]["32"]["fixed_point"]
    assert len(saved) == 2 and [im["image"] for im in cell["images"]] == ["a", "b"]
    for im in cell["images"]:
        assert im["nfe"] == 7 and len(im["step_trace"]) == 6 and len(im["rel_trace"]) == 7
        assert im["step_trace"][0] is None  # ||z[0]|| = 0
        for t, n in im["f_evals_to"].items():
            assert n == inference.evals_to(im["step_trace"], float(t))
    # a rerun keeps what is done
    again = inference.convergence_against_resolution(trained, inputs, budget=6, solvers=("fixed_point",), done=out,
                                                     log=lambda s: None)
    assert again["sources"]["random"]["sizes"]["32"]["fixed_point"] is cell


def test_evals_to_and_resized():
    assert inference.evals_to([None, 0.5, 0.02, 0.009, 0.0005], 1e-2) == 4
    assert inference.evals_to([None, 0.5], 1e-2) is None
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    assert torch.equal(inference.resized(x, 4), x[..., :, 1:5])  # the centre square, unchanged at its own size
    assert inference.resized(x, 8).shape == (2, 3, 8, 8) and inference.resized(x, 2).shape == (2, 3, 2, 2)


def test_the_photographs_ship_with_scikit_image():
    importorskip("skimage", "the photographs of the resolution measurement (the bench extra)")
    photos = inference.photographs()
    assert list(photos) == list(inference.PHOTOGRAPHS)
    for name, image in photos.items():
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and min(image.shape[1:]) >= 300, name
