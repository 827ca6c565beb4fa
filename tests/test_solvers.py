"""The root solvers: convergence, exact NFE, bounded Broyden memory, stop reasons, option checks."""
import math
import warnings

import pytest
import torch

from mdeq.core.broyden import broyden
from mdeq.core.solver_common import SolverError
from mdeq.core.solvers import SOLVERS, fixed_point
from problems import Counted, MultiscaleMap, inputs, zeros_like_state

NAMES = sorted(SOLVERS)


def _residual(f, z):
    fz = f(z)
    return sum((a - b).flatten(1).square().sum(1) for a, b in zip(fz, z)).sqrt()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_reaches_tol_on_contractive_multiscale_map_and_counts_nfe(name, dtype, tol):
    fm = MultiscaleMap(gain=0.5, dtype=dtype)
    xs = inputs(batch=4, dtype=dtype)
    f = Counted(lambda z: fm(z, xs))
    with torch.no_grad():
        z, st = SOLVERS[name](f, zeros_like_state(xs), max_iter=200, tol=tol)
    assert st.stop_reason == "tol" and st.all_converged
    assert st.nfe == f.calls
    assert st.rel_trace.shape == (4, st.nfe) and st.scale_rel_trace.shape == (3, 4, st.nfe)
    assert [t.dtype for t in z] == [dtype] * 3
    with torch.no_grad():
        fz = fm(z, xs)
        rel = _residual(lambda q: fm(q, xs), z) / sum(a.flatten(1).square().sum(1) for a in fz).sqrt()
    assert rel.max() < tol * 1.01
    # the stats describe the iterate that was returned
    torch.testing.assert_close(rel.float(), st.rel_lowest, rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_linear_map_known_fixed_point(name):
    """f(z) = A z + b has z* = (I - A)^-1 b; A has spectral norm 0.6."""
    torch.manual_seed(1)
    n, B = 12, 3
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(-0.6, 0.6, n, dtype=torch.float64)) @ Q.T
    b = torch.randn(B, n, dtype=torch.float64)
    z, st = SOLVERS[name](lambda z: [z[0] @ A.T + b], [torch.zeros(B, n, dtype=torch.float64)],
                          max_iter=300, tol=1e-12)
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, b.T).T
    torch.testing.assert_close(z[0], exact, rtol=1e-9, atol=1e-9)


def test_single_tensor_in_single_tensor_out():
    b = torch.randn(2, 5)
    z, st = broyden(lambda z: 0.5 * z + b, torch.zeros(2, 5), max_iter=50, tol=1e-6)
    assert isinstance(z, torch.Tensor)
    torch.testing.assert_close(z, 2 * b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.scale_rel_trace[0], st.rel_trace)


def test_broyden_history_wraps_and_memory_is_bounded():
    fm = MultiscaleMap(gain=0.9)
    xs = inputs(batch=2)
    B, D = 2, sum(math.prod(s) for s in fm.shapes)
    results = {}
    for max_iter in (60, 600):
        with torch.no_grad():
            z, st = broyden(lambda z: fm(z, xs), zeros_like_state(xs), max_iter=max_iter, tol=1e-10, memory=4)
        results[max_iter] = st
        assert st.extra["memory"] == 4
        assert st.extra["history_bytes"] == 2 * B * 4 * D * 8  # U and V, float64, never sized by max_iter
    st = results[600]
    assert st.nstep > 4 * 4, "the history must have wrapped several times"
    assert st.stop_reason == "tol" and st.all_converged


def test_broyden_first_step_is_a_fixed_point_step():
    """z1 = z0 + g(z0) = f(z0) (Appendix B.1 with B0 = -I; the sign the released code fixed)."""
    seen = []
    b = torch.randn(2, 3)

    def f(z):
        seen.append(z[0].clone())
        return [0.3 * z[0] + b]

    broyden(f, [torch.zeros(2, 3)], max_iter=2, tol=1e-12)
    torch.testing.assert_close(seen[1], b)  # f(0) = b


def test_lowest_iterate_is_returned_per_sample():
    """Sample 0 converges then gets kicked away; the solver must return its best iterate."""
    calls = [0]

    def f(z):
        calls[0] += 1
        out = 0.5 * z[0] + 1.0
        if calls[0] > 8:
            out = out + torch.tensor([[100.0], [0.0]]) * calls[0]
        return [out]

    z, st = fixed_point(f, [torch.zeros(2, 1, dtype=torch.float64)], max_iter=12, tol=1e-12)
    assert st.lowest_step[0] < 8 <= st.lowest_step[1]
    assert abs(z[0][0, 0].item() - 2.0) < 0.02


def _exploding(scale_nan=None):
    calls = [0]

    def f(z):
        calls[0] += 1
        out = [t + 10.0 ** calls[0] for t in z]
        if scale_nan is not None and calls[0] >= 3:
            out[scale_nan] = out[scale_nan] * float("nan")
        return out

    return f


@pytest.mark.parametrize("name", NAMES)
def test_stop_reason_max_iter(name):
    fm, xs = MultiscaleMap(gain=0.9), inputs()
    with torch.no_grad():
        _, st = SOLVERS[name](lambda z: fm(z, xs), zeros_like_state(xs), max_iter=3, tol=1e-14)
    assert st.stop_reason == "max_iter" and st.nstep == 3 and not st.converged.any()


@pytest.mark.parametrize("name", NAMES)
def test_stop_reason_divergence(name):
    _, st = SOLVERS[name](_exploding(), zeros_like_state(inputs()), max_iter=100, tol=1e-6,
                          stop_mode="abs", divergence_factor=1e4)
    assert st.stop_reason == "divergence" and st.nfe < 10, st.summary()


@pytest.mark.parametrize("name", NAMES)
def test_stop_reason_non_finite_warns_and_returns_finite(name):
    with pytest.warns(RuntimeWarning, match=r"not finite at scale\(s\) \[1\]"):
        z, st = SOLVERS[name](_exploding(scale_nan=1), zeros_like_state(inputs()), max_iter=100, tol=1e-6)
    assert st.stop_reason == "non_finite" and st.nfe == 3
    assert all(torch.isfinite(t).all() for t in z)


@pytest.mark.parametrize("name", NAMES)
def test_stop_reason_stagnation(name):
    """g(z) = 1 everywhere has no root: the abs residual never improves."""
    _, st = SOLVERS[name](lambda z: [t + 1 for t in z], [torch.zeros(2, 4)], max_iter=500, tol=1e-6,
                          stop_mode="abs", stagnation_patience=5)
    assert st.stop_reason == "stagnation" and st.nfe < 20


def test_throw_raises_on_failure():
    fm, xs = MultiscaleMap(gain=0.9), inputs()
    with pytest.raises(SolverError, match="converged=0/3"):
        broyden(lambda z: fm(z, xs), zeros_like_state(xs), max_iter=2, tol=1e-14, throw=True)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_raises_with_valid_list(name):
    with pytest.raises(TypeError, match=r"'max_iters' \(did you mean 'max_iter'\?\).*valid options are: .*tol"):
        SOLVERS[name](lambda z: z, [torch.zeros(1, 2)], max_iters=3)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="share the batch size"):
        broyden(lambda z: z, [torch.zeros(2, 3), torch.zeros(3, 3)])
    with pytest.raises(TypeError, match="floating dtype"):
        broyden(lambda z: z, [torch.zeros(2, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="stop_mode"):
        broyden(lambda z: z, [torch.zeros(2, 3)], stop_mode="relative")
    with pytest.raises(ValueError, match="changed the shape of scale 0"):
        broyden(lambda z: [z[0][:, :2]], [torch.zeros(2, 3)])


def test_check_every_reduces_checks_but_still_converges():
    fm, xs = MultiscaleMap(gain=0.5), inputs()
    with torch.no_grad():
        _, st1 = broyden(lambda z: fm(z, xs), zeros_like_state(xs), max_iter=100, tol=1e-8)
        _, st4 = broyden(lambda z: fm(z, xs), zeros_like_state(xs), max_iter=100, tol=1e-8, check_every=4)
    assert st4.all_converged and st4.nstep % 4 == 0 and st1.nstep <= st4.nstep < st1.nstep + 4


def test_lower_precision_f_keeps_state_dtype():
    """Under autocast f may return bf16; the solver state and residuals stay in z0's dtype."""
    b = torch.randn(2, 6)
    z, st = broyden(lambda z: [(0.5 * z[0] + b).to(torch.bfloat16)], [torch.zeros(2, 6)], max_iter=20, tol=1e-2)
    assert z[0].dtype == torch.float32 and st.all_converged


def test_broyden_restarts_a_blown_up_sample_and_the_batch_goes_on():
    """A transient kick sends sample 0 far away; it restarts from its lowest iterate, all converge."""
    calls = [0]
    b = torch.randn(3, 5, dtype=torch.float64)

    def f(z):
        calls[0] += 1
        out = 0.5 * torch.tanh(z[0]) + b
        if calls[0] == 5:
            out = out + torch.tensor([[1e4], [0.0], [0.0]], dtype=torch.float64)
        return [out]

    z, st = broyden(f, [torch.zeros(3, 5, dtype=torch.float64)], max_iter=60, tol=1e-10)
    assert st.extra["restarts"] >= 1 and st.stop_reason == "tol" and st.all_converged
    torch.testing.assert_close(z[0], 0.5 * torch.tanh(z[0]) + b, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="restart_factor"):
        broyden(f, [torch.zeros(3, 5)], restart_factor=0.5)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_state_gives_the_same_iterates(name):
    """z0 channels_last: f sees channels_last views, z* comes back channels_last, the traces are the
    contiguous solve's (float64: only the order of the coordinates differs, not the algebra)."""
    fm = MultiscaleMap(gain=0.9)
    xs = inputs(batch=5)
    seen = []

    def f(z):
        seen.append(all(t.stride(1) == 1 and t.stride(3) == t.shape[1] for t in z))  # channels innermost
        return fm(z, xs)

    cl = [t.contiguous(memory_format=torch.channels_last) for t in zeros_like_state(xs)]
    z_ref, st_ref = SOLVERS[name](lambda z: fm(z, xs), zeros_like_state(xs), max_iter=12, tol=1e-12)
    z_cl, st_cl = SOLVERS[name](f, cl, max_iter=12, tol=1e-12)
    assert all(seen) and len(seen) == st_cl.nfe == st_ref.nfe
    assert all(t.stride(1) == 1 and t.stride(3) == t.shape[1] for t in z_cl)
    torch.testing.assert_close(st_cl.abs_trace, st_ref.abs_trace, rtol=1e-5, atol=0)
    torch.testing.assert_close(st_cl.scale_rel_trace, st_ref.scale_rel_trace, rtol=1e-5, atol=0)
    for a, b in zip(z_cl, z_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["fixed_point", "broyden", "anderson"])
def test_step_trace_is_the_papers_relative_change_of_the_iterate(solver):
    """Figs. 5-7 plot ||z[i+1] - z[i]|| / ||z[i]||: recorded per scale and for the whole state on request."""
    torch.manual_seed(0)
    shapes = [torch.Size((4, 3, 4, 4)), torch.Size((4, 5, 2, 2))]
    A = [0.3 * torch.randn(s[1:].numel(), s[1:].numel(), dtype=torch.float64) / s[1:].numel() ** 0.5
         for s in shapes]
    b = [torch.randn(s, dtype=torch.float64) for s in shapes]
    seen = []

    def f(zs):
        seen.append([z.clone() for z in zs])
        return [(z.flatten(1) @ a.T).view_as(z) + c + 0.1 * torch.tanh(zs[1 - i].mean()) for i, (z, a, c)
                in enumerate(zip(zs, A, b))]

    z0 = [torch.full(s, 0.5, dtype=torch.float64) for s in shapes]
    _, plain = SOLVERS[solver](f, z0, max_iter=8, tol=1e-30)
    assert plain.step_trace is None and plain.scale_step_trace is None  # off by default: no extra work
    seen.clear()
    _, stats = SOLVERS[solver](f, z0, max_iter=8, tol=1e-30, trace_steps=True)
    assert stats.step_trace.shape == (4, stats.nfe - 1) and stats.scale_step_trace.shape == (2, 4, stats.nfe - 1)
    for i in range(stats.nfe - 1):
        d = [(seen[i + 1][s] - seen[i][s]).flatten(1).norm(dim=1) for s in range(2)]
        n = [seen[i][s].flatten(1).norm(dim=1) for s in range(2)]
        for s in range(2):
            torch.testing.assert_close(stats.scale_step_trace[s, :, i], (d[s] / n[s]).float())
        whole = (d[0] ** 2 + d[1] ** 2).sqrt() / (n[0] ** 2 + n[1] ** 2).sqrt()
        torch.testing.assert_close(stats.step_trace[:, i], whole.float())
    torch.testing.assert_close(stats.rel_trace, plain.rel_trace)  # tracing changes no iterate
    _, from_zero = SOLVERS[solver](f, [torch.zeros(s, dtype=torch.float64) for s in shapes], max_iter=3,
                                   tol=1e-30, trace_steps=True)
    assert torch.isnan(from_zero.step_trace[:, 0]).all() and torch.isfinite(from_zero.step_trace[:, 1:]).all()


@pytest.mark.parametrize("history", ["low_rank", "residuals"])
def test_broyden_does_not_restart_twice_from_the_same_lowest_iterate(history):
    """g(z) = (A - I) z + b with one strongly expanding direction: the first step, z1 = f(0) = b, has a residual
    |A b| > 10 |b|, a restart sends the sample back to z0 = 0 whose first step is b again, and so on: a restart
    loop whose iterates never move (measured on Cityscapes at initial weights: exact-zero steps for 60 of 150
    iterations). Restarting once from z0 and then going on with the secant update solves the linear system."""
    A = torch.diag(torch.tensor([-20.0, 0.5, 0.5, 0.5], dtype=torch.float64))
    b = torch.ones(2, 4, dtype=torch.float64)

    def f(z):
        return [z[0] @ A + b]

    z, st = broyden(f, [torch.zeros(2, 4, dtype=torch.float64)], max_iter=30, tol=1e-10, stop_mode="abs",
                    history=history, trace_steps=True)
    assert st.extra["restarts"] == 2  # each of the two samples once, from z0
    assert int((st.step_trace == 0).sum()) == 2  # the restart's repeat of the step to b, once per sample
    assert st.all_converged and st.stop_reason == "tol"
    torch.testing.assert_close(z[0], f(z)[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("gain,memory,max_iter", [(0.5, 18, 30), (0.9, 4, 25), (0.9, 12, 15), (0.9, 12, 18),
                                                  (1.5, 6, 40)])
def test_broyden_histories_give_the_same_iterates(gain, memory, max_iter):
    """The residual store is the same algorithm as the low-rank store: float64 traces and z* agree, through
    the ring buffer's wrap (memory < max_iter) and restarts (gain 1.5 restarts samples)."""
    fm = MultiscaleMap(gain=gain)
    xs = inputs(batch=5)
    runs = {h: broyden(lambda z: fm(z, xs), zeros_like_state(xs), max_iter=max_iter, tol=1e-14, memory=memory,
                       history=h) for h in ("low_rank", "residuals")}
    (z_lr, lr), (z_res, res) = runs["low_rank"], runs["residuals"]
    assert res.extra["history"] == "residuals" and lr.extra["history"] == "low_rank"
    assert res.nfe == lr.nfe == max_iter + 1 and res.extra["restarts"] == lr.extra["restarts"]
    floor = 1e-9 * lr.abs_trace[:, :1]  # float64 rounding once converged to ~1e-12
    assert (res.abs_trace - lr.abs_trace).abs().le(1e-5 * lr.abs_trace + floor).all()
    for a, b in zip(z_res, z_lr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if gain == 1.5:
        assert lr.extra["restarts"] > 0


@pytest.mark.parametrize("memory,max_iter", [(12, 15), (12, 18), (4, 25)])
def test_broyden_residual_store_is_as_accurate_in_float32(memory, max_iter):
    """In float32 the two stores round differently; the residual store's trace is as close to the float64
    solve as the low-rank store's: each store's worst error against float64, in units of the first residual
    (about float32's eps, 6e-8, for both), within 3x."""
    fm64, xs64 = MultiscaleMap(gain=0.9), inputs(batch=5)
    fm32, xs32 = MultiscaleMap(gain=0.9).float(), [x.float() for x in xs64]

    def trace(fm, xs, dtype_history):
        return broyden(lambda z: fm(z, xs), zeros_like_state(xs), max_iter=max_iter, tol=1e-14, memory=memory,
                       history=dtype_history)[1].abs_trace

    truth = trace(fm64, xs64, "low_rank")
    err = {h: ((trace(fm32, xs32, h) - truth).abs() / truth[:, :1]).max().item() for h in ("low_rank", "residuals")}
    assert err["residuals"] <= 3 * err["low_rank"] + 1e-7, err


def test_broyden_auto_history_picks_the_residual_store_when_it_fits():
    fm, xs = MultiscaleMap(gain=0.5), inputs(batch=2)
    f = lambda z: fm(z, xs)  # noqa: E731
    _, short = broyden(f, zeros_like_state(xs), max_iter=15, tol=1e-14, memory=12)
    _, long = broyden(f, zeros_like_state(xs), max_iter=30, tol=1e-14, memory=12)
    _, forced = broyden(f, zeros_like_state(xs), max_iter=15, tol=1e-14, memory=12, history="low_rank")
    assert short.extra["history"] == "residuals" and long.extra["history"] == "low_rank"
    assert short.extra["history_bytes"] < forced.extra["history_bytes"]
    with pytest.raises(ValueError, match="history must be one of"):
        broyden(f, zeros_like_state(xs), history="dense")


@pytest.mark.parametrize("history", ["low_rank", "residuals"])
def test_broyden_products_stay_in_the_state_dtype_under_autocast(history):
    """Under autocast only f may run in lower precision: Broyden's bmm products (on autocast's list) do not.
    An f without autocast-listed ops then gives the same solve with autocast on and off."""
    torch.manual_seed(0)
    b = torch.randn(4, 3, 5, 5)
    f = lambda z: [0.5 * torch.tanh(z[0]) + b]  # noqa: E731
    _, plain = broyden(f, [torch.zeros(4, 3, 5, 5)], max_iter=15, tol=1e-12, memory=12, history=history)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, auto = broyden(f, [torch.zeros(4, 3, 5, 5)], max_iter=15, tol=1e-12, memory=12, history=history)
    torch.testing.assert_close(auto.abs_trace, plain.abs_trace, rtol=0, atol=0)
