"""mdeq.paper.measure: the one timing loop, the device rule, solver settings through the config, Fig. 4b and Figs. 5-7."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mdeq.paper.measure import memory, runtime, solver_traces, timing
from mdeq.core.config import ConfigError
from mdeq.engine.runlog import hardware_label
from mdeq.core.solvers import SOLVERS

CPU = torch.device("cpu")


def test_timeit_times_only_the_repeats_and_runs_after_outside_the_timing(monkeypatch):
    """On a clock that only ``fn`` (1 s a call) and ``after`` (100 s) move: deterministic on a loaded machine."""
    clock, calls, after, synced = [0.0], [], [], []

    def fn():
        calls.append(clock[0])
        clock[0] += 1.0

    def later():
        after.append(clock[0])
        clock[0] += 100.0

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(timing, "sync", lambda device: synced.append(clock[0]))
    times = timing.timeit(fn, "cpu", repeats=3, warmup=2, after=later)
    assert times == [1.0, 1.0, 1.0]  # neither the warm-up calls nor `after` are in any timing
    assert calls == [0.0, 1.0, 2.0, 103.0, 204.0] and after == [3.0, 104.0, 205.0]
    assert synced == [2.0, 3.0, 103.0, 104.0, 204.0, 205.0]  # the device synchronised before and after each call


def test_the_full_profile_refuses_to_time_a_cpu_by_accident():
    timing.check_gpu("cpu", "measures")  # asked for: fine
    if torch.cuda.is_available():
        timing.check_gpu("auto", "measures")
    else:
        with pytest.raises(RuntimeError, match="the full profile traces on a GPU and none is visible"):
            timing.check_gpu("auto", "traces")


def test_trace_settings_reach_the_implicit_layer_through_its_options():
    fixed = solver_traces._traced_model("cifar10_tiny_smoke", [], "fixed_point", 7, None, 0, CPU)
    deq = fixed.deq
    assert (deq.max_iter, deq.eval_max_iter, deq.tol, deq.eval_tol, deq.stop_mode) == (7, 7, 1e-12, 1e-12, "rel")
    traced = {"trace_steps": True, "stagnation_patience": 8}  # the whole budget unless a solve diverges
    assert deq.solver is SOLVERS["fixed_point"] and deq.solver_options == traced and deq.grad == "ift"
    # the backward solve uses the same solver as the forward one (Figs. 5/6: Broyden vs iterating)
    assert deq.backward_solver is SOLVERS["fixed_point"] and deq.backward_options == traced
    assert (deq.backward_max_iter, deq.backward_tol, deq.backward_stop_mode) == (7, 1e-12, "rel")
    broyden = solver_traces._traced_model("cifar10_tiny_smoke", [], "broyden", 7, None, 0, CPU)
    assert broyden.deq.solver_options == {"memory": 6, **traced}  # the config's m, not the budget
    assert broyden.deq.backward_options == {"memory": 6, **traced}
    # the same initial weights for every solver, so the curves compare solvers, not draws
    assert all(torch.equal(a, b) for a, b in zip(fixed.state_dict().values(), broyden.state_dict().values()))
    with pytest.raises(ConfigError, match="max_iter must be >= 1"):  # checked as a training run's would be
        solver_traces._traced_model("cifar10_tiny_smoke", [], "broyden", 0, None, 0, CPU)


def test_solve_traces_run_the_whole_budget_forward_backward_and_per_scale():
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))) for _ in range(2)]
    model = solver_traces._traced_model("cifar10_tiny_smoke", [], "broyden", 7, None, 0, CPU)
    t = solver_traces._solve_traces(model, batches, CPU, backward=True)
    assert [len(x) for x in t["forward"]] == [8, 8] and [len(x) for x in t["backward"]] == [8, 8]  # z0 + 7 steps
    assert [len(x) for x in t["forward_step"]] == [7, 7] and [len(x) for x in t["backward_step"]] == [7, 7]
    assert math.isnan(t["forward_step"][0][0]) and all(0 < v < 10 for v in t["forward_step"][0][1:])  # z0 = 0
    assert len(t["scale"][0]) == 3 and len(t["scale"][0][0]) == 8 and len(t["scale_step"][0][0]) == 7
    stats = solver_traces._trace_stats([[1.0, 0.5], [3.0]])
    assert stats["mean"] == [2.0, 0.5] and stats["std"] == [1.0, 0.0] and stats["n_batches"] == 2
    assert stats["count"] == [2, 1]  # the second solve stopped after one entry


def test_measure_runtime_reports_times_memory_and_solver_work():
    out = runtime.measure_runtime(models=["mdeq_small"], batch_size=2, device="cpu", repeats=1, warmup=0)
    assert out["device"] == "cpu" and out["hardware"] == hardware_label("cpu") and out["input"] == [3, 32, 32]
    m = out["models"]["mdeq_small"]
    assert m["label"] == "MDEQ-small" and m["what"] == "config:cifar10_small_paper" and m["params"] == 175418
    assert len(m["train_ms_all"]) == 1 and m["train_ms"] == m["train_ms_all"][0] > 0 and m["inference_ms"] > 0
    assert m["memory_kind"] == "cpu_peak_rss_increase" and math.isfinite(m["peak_train_memory_mb"])
    assert m["nfe_forward"] >= 1 and m["nfe_backward"] is None  # inference ran last: no backward after it


def test_peak_train_memory_is_the_training_peak_above_the_memory_before_the_model(monkeypatch):
    """A meter whose readings are known: 1000 MB before the model is built, a peak of 1234.5 MB during the
    training steps and 9999 MB during inference; the reported figure is the training peak minus the base."""
    phase = {"now": "before"}
    readings = {"before": 1000.0, "train": 1234.5, "inference": 9999.0}

    class Meter:
        kind = "cpu_peak_rss"

        def __init__(self, device):
            pass

        def current_mb(self):
            return readings[phase["now"]]

        def reset(self):
            pass

        def peak_mb(self):
            return readings[phase["now"]]

    real_timeit = runtime.timeit

    def timeit(fn, device, repeats, warmup=1, **kw):
        phase["now"] = "train" if phase["now"] == "before" else "inference"
        return real_timeit(fn, device, repeats, warmup, **kw)

    monkeypatch.setattr(runtime, "PeakMemory", Meter)
    monkeypatch.setattr(runtime, "timeit", timeit)
    m = runtime.measure_runtime(models=["mdeq_small"], batch_size=1, device="cpu", repeats=1, warmup=0)
    assert m["models"]["mdeq_small"]["peak_train_memory_mb"] == 234.5 and phase["now"] == "inference"


def test_train_step_memory_counts_saved_activations_and_adam_state_in_closed_form():
    # k Linear(d, d, bias=False) with ReLU between, loss = sum of the output. Saved for backward: each
    # Linear its input, each ReLU its output, which is the next Linear's input (one storage): k * B * d
    # float32 storages; the weights are parameters, not counted. sum() saves nothing.
    B, d, k = 256, 32, 4
    torch.manual_seed(0)
    layers = []
    for i in range(k):
        layers += [torch.nn.Linear(d, d, bias=False)] + ([torch.nn.ReLU()] if i < k - 1 else [])
    model = torch.nn.Sequential(*layers)
    x, y = torch.randn(B, d), torch.zeros(B)
    m = memory.train_step_memory(model, x, y, loss_fn=lambda out, _: out.sum())
    act, param = B * d * 4, k * d * d * 4
    assert m["saved_tensors"] == k and m["saved_bytes"] == pytest.approx(k * act, rel=0.02)
    # parameters + gradients + Adam's two moments (+ k float32 step counters of 4 bytes)
    assert m["state_bytes"] == pytest.approx(4 * param, rel=0.01) and m["state_parts"]["buffers"] == 0
    # the rest at the peak: the last output and its gradient, labels, a weight gradient before accumulation
    assert act <= m["other_bytes"] <= 3 * act
    assert m["peak_bytes"] == m["state_bytes"] + m["saved_bytes"] + m["other_bytes"]


def test_measure_memory_implicit_saves_less_than_unrolled():
    out = memory.measure_memory(models=["mdeq_small"], batch_size=1, budgets=(), log=lambda _: None)
    imp, unr = out["models"]["mdeq_small"], out["models"]["mdeq_small_unrolled"]
    assert imp["grad"] == "ift" and unr["grad"] == "unrolled" and unr["unroll_steps"] == imp["max_iter"] == 15
    assert (imp["nfe_forward"], imp["nfe_backward"]) == (16, 19)  # the full budgets 15 and 18, + 1 each (f(z*))
    assert imp["state_bytes"] == unr["state_bytes"] and imp["saved_bytes"] * 3 < unr["saved_bytes"]


def test_convergence_traces_resume_a_curve_stopped_between_batches():
    """A measurement killed after a batch goes on from the next one and ends with the uninterrupted curve."""
    kw = dict(profile="smoke", quick=True, num_batches=2, device="cpu", datasets=["cifar10"], per_scale=False)
    whole = solver_traces.convergence_traces(**kw)
    saved = []

    class Killed(Exception):
        pass

    def save_then_die(out):
        saved.append(json.loads(json.dumps(out)))  # what the file would hold
        raise Killed

    with pytest.raises(Killed):
        solver_traces.convergence_traces(**kw, save=save_then_die)
    partial = saved[-1]["datasets"]["cifar10"]
    assert partial["curves"] == {} and len(partial["partial"]["broyden_init"]["traces"]["forward"]) == 1
    resumed = solver_traces.convergence_traces(**kw, done=saved[-1])
    curves = resumed["datasets"]["cifar10"]["curves"]
    assert "partial" not in resumed["datasets"]["cifar10"] and set(curves) == {"broyden_init", "fixed_point_init"}
    for key, curve in whole["datasets"]["cifar10"]["curves"].items():
        for measure_ in ("forward", "forward_step", "backward", "backward_step"):
            np.testing.assert_allclose(curves[key][measure_]["mean"], curve[measure_]["mean"], rtol=1e-6)
            assert curves[key][measure_]["n_batches"] == 2


def test_stand_in_inputs_are_resized_cifar_test_images_and_say_so():
    from mdeq.core.config import load_config
    from mdeq.paper.runs import smoke_data

    root, options = smoke_data("cifar10")
    cfg = load_config("cityscapes_small_paper")
    batches, label = solver_traces._stand_in_batches("cityscapes", cfg, [64, 128], 1, 2, 0, root, options)
    (x, y), _ = batches
    assert x.shape == (1, 3, 64, 128) and y.shape == (1, 64, 128) and int(y.max()) < cfg.data.num_classes
    assert label.startswith("stand-in: CIFAR-10 test images (two side by side, resized to 64x128)")
    assert not torch.equal(x[..., :64], x[..., 64:])  # two different images, one per half
    imagenet, label = solver_traces._stand_in_batches("imagenet", load_config("imagenet_small_paper"), [96, 96],
                                                      2, 1, 0, root, options)
    assert imagenet[0][0].shape == (2, 3, 96, 96) and imagenet[0][1].shape == (2,) and "resized to 96x96" in label
