"""The stabilisers (issue 28): Jacobian regularisation, the spectral-radius monitor, fixed-point correction.

Each estimate is checked against an independent reference: the full Jacobian by autograd, torchdeq's
``jac_reg``, ``gradcheck``, ``torch.linalg.eigvals``, unrolled float64 autograd, the released schedule
re-stated from locuslab/deq ``MDEQ-Vision/lib/core/cls_function.py``, and the code of the commit before the
options existed (a run with every option off must be bit-identical to it).
"""
from __future__ import annotations

import csv
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import importorskip
from mdeq.engine import paths
from mdeq.engine.checkpoint import load_checkpoint
from mdeq.core.config import ConfigError, TrainConfig, available_configs, config_to_dict, load_config
from mdeq.core.implicit import ImplicitLayer, correction_indices
from mdeq.core.model import build_model
from mdeq.core.solvers import fixed_point
from mdeq.core.stability import gaussian_probe, jacobian_frobenius, power_method
from mdeq.engine.loop import train_step
from mdeq.engine.rundir import config_diff, with_defaults
from mdeq.engine.step import jacobian_draw, jacobian_weight, set_phase, solver_stats, training_objective
from problems import MultiscaleMap, inputs, zeros_like_state

F64 = torch.float64


def _leaves(zs):
    return [z.detach().clone().requires_grad_() for z in zs]


def _flat(zs):
    return torch.cat([z.flatten(1) for z in zs], dim=1)


def _unflat(x, like):
    sizes = [z[0].numel() for z in like]
    return [p.reshape(z.shape) for p, z in zip(x.split(sizes, dim=1), like)]


def _fixed_point_of(fm, xs, steps=400):
    with torch.no_grad():
        z = zeros_like_state(xs)
        for _ in range(steps):
            z = fm(z, xs)
    return z


def _full_jacobian(fm, xs, z):
    """The (B*D, B*D) Jacobian of the flattened map at z, column by column through autograd."""
    def flat_f(x):
        return _flat(fm(_unflat(x.view(z[0].shape[0], -1), z), xs)).flatten()
    return torch.autograd.functional.jacobian(flat_f, _flat(z).flatten())


# ----------------------------------------------------------------------------------------------
# Jacobian regularisation: the Hutchinson estimate.

def test_hutchinson_matches_the_exact_frobenius_norm_within_its_sampling_error():
    fm = MultiscaleMap(gain=0.5)
    xs = inputs(batch=2)
    z = _leaves(_fixed_point_of(fm, xs))
    J = _full_jacobian(fm, xs, z)
    numel = J.shape[0]
    exact = J.square().sum() / numel
    n = 2000
    est = jacobian_frobenius(fm(z, xs), z, probes=n, generator=torch.Generator().manual_seed(0),
                             create_graph=False)
    # ||v^T J||^2 for v ~ N(0, I) has mean ||J||_F^2 and variance 2 ||J J^T||_F^2
    stderr = (2 * (J @ J.T).square().sum() / n).sqrt() / numel
    assert stderr < 0.05 * exact  # the check below is sharp enough to see a factor like B = 2
    assert abs(est - exact) < 4 * stderr, (est.item(), exact.item(), stderr.item())


def test_hutchinson_equals_torchdeq_jac_reg_with_the_same_probes():
    """torchdeq's jac_reg draws torch.randn(B, D) per probe from the global stream; ours draws the same
    (B, D) tensor, split per scale, so with the same seed the probes, values and gradients agree."""
    jac_reg = importorskip("torchdeq.loss", reason="torchdeq (the 'bench' extra, which CI installs)").jac_reg
    fm = MultiscaleMap(gain=0.5, dtype=torch.float32)
    xs = inputs(batch=3, dtype=torch.float32)
    z = _leaves(_fixed_point_of(fm, xs, steps=100))
    z_flat = _flat(z).detach().requires_grad_()
    params = list(fm.parameters())

    torch.manual_seed(7)
    ref = jac_reg(_flat(fm(_unflat(z_flat, z), xs)), z_flat, vecs=3)
    ref_grads = torch.autograd.grad(ref, params)
    torch.manual_seed(7)
    ours = jacobian_frobenius(fm(z, xs), z, probes=3)
    our_grads = torch.autograd.grad(ours, params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_hutchinson_gradient_passes_gradcheck_float64():
    """The penalty trains f: its gradient w.r.t. weights of every kind (conv, fusion down, up) and the
    injection matches finite differences (fixed probes: the generator is re-seeded every call)."""
    fm = MultiscaleMap(gain=0.5)
    xs = inputs(batch=2)
    z = _leaves(_fixed_point_of(fm, xs, steps=50))
    names = ["convs.0", "down.0", "up.1"]
    base = dict(fm.named_parameters())

    def penalty(w0, w1, w2, x0):
        params = {**base, **dict(zip(names, (w0, w1, w2)))}
        out = torch.func.functional_call(fm, params, (z, [x0, *xs[1:]]))
        return jacobian_frobenius(out, z, probes=2, generator=torch.Generator().manual_seed(3))

    args = tuple(base[n].detach().clone().requires_grad_() for n in names) + (xs[0].clone().requires_grad_(),)
    assert torch.autograd.gradcheck(penalty, args, eps=1e-6, atol=1e-8, rtol=1e-5)


def test_gaussian_probe_is_one_flat_draw_split_per_scale():
    z = inputs(batch=2, dtype=torch.float32)
    probe = gaussian_probe(z, torch.Generator().manual_seed(1))
    flat = torch.randn(2, sum(t[0].numel() for t in z), generator=torch.Generator().manual_seed(1))
    assert [p.shape for p in probe] == [t.shape for t in z]
    assert torch.equal(_flat(probe), flat)


def test_bad_inputs_raise():
    fm = MultiscaleMap(gain=0.5)
    xs = inputs(batch=2)
    z = _leaves(xs)
    with pytest.raises(ValueError, match="require grad"):
        jacobian_frobenius(fm(xs, xs), xs)
    with pytest.raises(ValueError, match="one per scale"):
        jacobian_frobenius(fm(z, xs)[:2], z)
    with pytest.raises(ValueError, match="probes"):
        jacobian_frobenius(fm(z, xs), z, probes=0)
    with pytest.raises(ValueError, match="iters"):
        power_method(fm(z, xs), z, iters=0)


# ----------------------------------------------------------------------------------------------
# The spectral radius by the power method.

def test_power_method_matches_eigvals_of_a_linear_map():
    """f(z)_b = A_b z_b + c over a two-scale state, A_b with a known real spectrum (one sample's dominant
    eigenvalue negative): the estimate per sample is max |eig(A_b)|."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 2, 2), (2, 1, 1)]
    B, D = 3, 14
    spectra = [torch.tensor([0.9, -0.6, 0.5] + [0.3] * (D - 3), dtype=F64),
               torch.tensor([-0.8, 0.5, -0.4] + [0.1] * (D - 3), dtype=F64),
               torch.tensor([1.3, 1.0, 0.2] + [-0.2] * (D - 3), dtype=F64)]
    A = []
    for lam in spectra:
        Q = torch.randn(D, D, generator=g, dtype=F64)
        A.append(Q @ torch.diag(lam) @ torch.linalg.inv(Q))
    A = torch.stack(A)
    c = torch.randn(B, D, generator=g, dtype=F64)
    z = _leaves([torch.randn(B, *s, generator=g, dtype=F64) for s in shapes])
    f_z = _unflat(torch.einsum("bij,bj->bi", A, _flat(z)) + c, z)
    _, radius = power_method(f_z, z, iters=300, generator=torch.Generator().manual_seed(1))
    want = torch.linalg.eigvals(A).abs().amax(dim=1)
    torch.testing.assert_close(radius, want, rtol=1e-8, atol=0)


def test_power_method_matches_eigvals_at_the_fixed_point_of_a_nonlinear_map():
    """f(z) = tanh(W z + x) with W symmetric: J = diag(1 - tanh^2) W has real eigenvalues, so the power
    method's limit is the largest |eigenvalue| of the exact Jacobian at z*."""
    g = torch.Generator().manual_seed(2)
    shapes = [(2, 4, 4), (4, 2, 2)]
    D = sum(c * h * w for c, h, w in shapes)
    M = torch.randn(D, D, generator=g, dtype=F64)
    u = torch.randn(D, 1, generator=g, dtype=F64)
    W = (u @ u.T) / u.square().sum() + 0.3 * (M + M.T) / torch.linalg.eigvalsh(M + M.T).abs().max()
    W = 0.9 * W / torch.linalg.eigvalsh(W).abs().max()  # symmetric, a planted top eigenvalue, contractive
    x = torch.randn(3, D, generator=g, dtype=F64)
    like = [torch.zeros(3, *s, dtype=F64) for s in shapes]

    def f(zs):
        return _unflat(torch.tanh(_flat(zs) @ W.T + x), like)

    with torch.no_grad():
        z_star, stats = fixed_point(f, like, max_iter=500, tol=1e-13, stop_mode="rel")
    assert stats.all_converged
    z = _leaves(z_star)
    _, radius = power_method(f(z), z, iters=400, generator=torch.Generator().manual_seed(0))
    want = []
    for b in range(3):
        J = torch.diag(1 - torch.tanh(_flat(z_star)[b] @ W.T + x[b]).square()) @ W
        eig = torch.linalg.eigvals(J)
        assert eig.imag.abs().max() < 1e-10  # the reason for a symmetric W
        top = eig.abs().sort(descending=True).values
        assert top[1] / top[0] < 0.97  # a gap: 0.97 ** 400 < 1e-5
        want.append(top[0])
    torch.testing.assert_close(radius, torch.stack(want), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# The options on the implicit layer.

def _layer(fm, **kw):
    opts = dict(max_iter=60, tol=1e-12, backward_max_iter=100, backward_tol=1e-12)
    opts.update(kw)
    return ImplicitLayer(fm, **opts)


def test_layer_spectral_radius_under_no_grad_leaves_outputs_and_the_global_stream_alone():
    fm = MultiscaleMap(gain=0.5)
    xs = inputs()
    with torch.no_grad():
        z_plain, _ = _layer(fm)(zeros_like_state(xs), xs)
        state = torch.get_rng_state()
        z, info = _layer(fm, spectral_radius_iters=80)(zeros_like_state(xs), xs)
        assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(z, z_plain):
        assert torch.equal(a, b)
    zl = _leaves(z)
    _, want = power_method(fm(zl, xs), zl, iters=80, generator=torch.Generator().manual_seed(0))
    assert info.spectral_radius.shape == (3,) and torch.equal(info.spectral_radius, want.float())


@pytest.mark.parametrize("grad", ["ift", "jfb", "phantom"])
def test_layer_jacobian_penalty_is_taken_at_z_star_and_changes_nothing_else(grad):
    fm = MultiscaleMap(gain=0.5)
    xs = [x.requires_grad_() for x in inputs()]
    w = [torch.randn_like(x) for x in xs]
    params = list(fm.parameters())

    def run(**kw):  # 6 solver steps: z* is not a fixed point to rounding, so f(z*) and z* differ
        z, info = _layer(fm, grad=grad, max_iter=6, **kw)(zeros_like_state(xs), xs)
        return z, info, torch.autograd.grad(sum((a * b).sum() for a, b in zip(z, w)), params, retain_graph=True)

    z0, info0, g0 = run()
    state = torch.get_rng_state()
    z1, info1, g1 = run(jacobian_probes=2, jacobian_seed=5)
    assert torch.equal(torch.get_rng_state(), state) and info0.jacobian_loss is None
    for a, b in list(zip(z0, z1)) + list(zip(g0, g1)):
        assert torch.equal(a, b)
    with torch.no_grad():
        z_star, _ = _layer(fm, max_iter=6)(zeros_like_state(xs), xs)
    zl = _leaves(z_star)
    want = jacobian_frobenius(fm(zl, xs), zl, probes=2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(info1.jacobian_loss, want, rtol=1e-12, atol=0)
    assert info1.jacobian_loss.grad_fn is not None  # it trains f


def test_layer_jacobian_penalty_in_the_unrolled_warm_up_is_at_the_last_unrolled_state():
    fm = MultiscaleMap(gain=0.5)
    xs = inputs()
    layer = ImplicitLayer(fm, grad="unrolled", unroll_steps=4, jacobian_probes=3, jacobian_seed=1)
    _, info = layer(zeros_like_state(xs), xs)
    z = zeros_like_state(xs)
    with torch.no_grad():
        for _ in range(4):
            z = fm(z, xs)
    zl = _leaves(z)
    want = jacobian_frobenius(fm(zl, xs), zl, probes=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(info.jacobian_loss, want, rtol=1e-12, atol=0)
    with torch.no_grad():
        assert layer(zeros_like_state(xs), xs)[1].jacobian_loss is None  # only with grad


# ----------------------------------------------------------------------------------------------
# Fixed-point correction.

def test_correction_indices_spread_states_over_the_budget_as_torchdeq():
    assert correction_indices(12, 3) == [4, 8, 12]
    assert correction_indices(15, 4) == [6, 9, 12, 15]  # 15 // 4 = 3 steps apart, ending at 15
    assert correction_indices(15, 1) == [15]
    assert correction_indices(3, 5) == [1, 2, 3]  # at most one state per step


def _correction_loss(z, info, ws, gamma):
    n = len(info.correction) + 1
    loss = sum((a * b).sum() for a, b in zip(z, ws[-1]))
    for k, s in enumerate(info.correction):
        loss = loss + gamma ** (n - 1 - k) * sum((a * b).sum() for a, b in zip(s, ws[k]))
    return loss


@pytest.mark.parametrize("final", ["jfb", "phantom"])
def test_correction_gradients_equal_autograd_through_the_solver_states_float64(final):
    """Fixed-point iteration's k-th state is f^k(0): the states at steps 4 and 8 of 12, each through 2
    damped steps (d = 0.7) with autograd, weighted 0.5^2 and 0.5, plus the layer's own gradient at z* =
    f^12(0). A wrong step, weight, damping or a graph leaking into the solve would show."""
    fm = MultiscaleMap(gain=0.6)
    xs = [x.requires_grad_() for x in inputs()]
    params = list(fm.parameters()) + xs
    g = torch.Generator().manual_seed(3)
    ws = [[torch.randn(x.shape, generator=g, dtype=F64) for x in xs] for _ in range(3)]
    layer = ImplicitLayer(fm, solver="fixed_point", max_iter=12, tol=1e-30, grad=final, phantom_steps=3,
                          phantom_damping=0.5, correction_states=3, correction_steps=2, correction_damping=0.7)
    z, info = layer(zeros_like_state(xs), xs)
    assert info.forward.nfe == 13 and (info.forward.lowest_step == 12).all()  # z* is the 12th iterate
    got = torch.autograd.grad(_correction_loss(z, info, ws, 0.5), params)

    with torch.no_grad():
        iterates = [zeros_like_state(xs)]
        for _ in range(12):
            iterates.append(fm(iterates[-1], xs))

    def damped(s, steps, d):
        s = [t.detach() for t in s]
        for _ in range(steps):
            s = [(1 - d) * a + d * b for a, b in zip(s, fm(s, xs))]
        return s

    final_out = fm(iterates[12], xs) if final == "jfb" else damped(iterates[12], 3, 0.5)
    outs = [damped(iterates[4], 2, 0.7), damped(iterates[8], 2, 0.7), final_out]
    ref = sum(wt * sum((a * b).sum() for a, b in zip(o, w)) for wt, o, w in zip((0.25, 0.5, 1.0), outs, ws))
    want = torch.autograd.grad(ref, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_correction_with_the_ift_output_equals_unrolled_autograd_float64():
    """With an IFT output at a converged z*, the corrected loss's gradient is the states' phantom gradients
    plus the gradient of unrolled autograd run to convergence (test_implicit's reference)."""
    fm = MultiscaleMap(gain=0.5)
    xs = [x.requires_grad_() for x in inputs()]
    params = list(fm.parameters()) + xs
    g = torch.Generator().manual_seed(4)
    ws = [[torch.randn(x.shape, generator=g, dtype=F64) for x in xs] for _ in range(2)]
    layer = ImplicitLayer(fm, solver="fixed_point", max_iter=80, tol=1e-30, backward_solver="broyden",
                          backward_max_iter=200, backward_tol=1e-13, correction_states=2, correction_steps=1)
    z, info = layer(zeros_like_state(xs), xs)
    got = torch.autograd.grad(_correction_loss(z, info, ws, 0.8), params)

    state = zeros_like_state(xs)
    with torch.no_grad():
        for _ in range(40):  # correction_indices(80, 2) == [40, 80]
            state = fm(state, xs)
    unrolled = zeros_like_state(xs)
    for _ in range(300):
        unrolled = fm(unrolled, xs)
    ref = 0.8 * sum((a * b).sum() for a, b in zip(fm(state, xs), ws[0])) + \
        sum((a * b).sum() for a, b in zip(unrolled, ws[1]))
    want = torch.autograd.grad(ref, params)
    for a, b in zip(got, want):
        assert ((a - b).norm() / b.norm()).item() < 1e-8


def test_correction_is_off_with_one_state_and_without_grad():
    fm = MultiscaleMap(gain=0.5)
    xs = inputs()
    assert ImplicitLayer(fm, correction_states=1)(zeros_like_state(xs), xs)[1].correction is None
    with torch.no_grad():
        assert ImplicitLayer(fm, correction_states=3)(zeros_like_state(xs), xs)[1].correction is None
    z, info = ImplicitLayer(lambda z, x: fm(z, [x]), correction_states=2)(xs[0] * 0, xs[0])  # func gets [z]
    assert isinstance(info.correction[0], torch.Tensor) and info.correction[0].shape == z.shape


# ----------------------------------------------------------------------------------------------
# The engine: schedule, objective, statistics.

def _released_weight(pretrain_steps, weight, pretrain_weight, incremental, stop_epoch, global_steps, epoch):
    """locuslab/deq MDEQ-Vision/lib/core/cls_function.py ``train``, the factor, re-stated."""
    deq_steps = global_steps - pretrain_steps
    if deq_steps < 0:
        return pretrain_weight
    if epoch >= stop_epoch:
        return 0
    return weight + 0.1 * (deq_steps // incremental)


def test_jacobian_weight_follows_the_released_schedule():
    t = TrainConfig(pretrain_steps=100, jac_reg_freq=0.5, jac_reg_weight=0.4, jac_reg_pretrain_weight=0.03,
                    jac_reg_step_every=50, jac_reg_stop_epoch=3)
    for step, epoch in [(0, 0), (99, 1), (100, 1), (149, 1), (150, 2), (199, 2), (200, 2), (260, 2), (260, 3),
                        (50, 5)]:
        want = _released_weight(100, 0.4, 0.03, 50, 3, step, epoch)
        assert jacobian_weight(t, step, epoch) == pytest.approx(want, abs=1e-12), (step, epoch)
    flat = TrainConfig(jac_reg_freq=0.02, jac_reg_weight=0.4)  # the CIFAR LARGE_reg values: no ramp, no stop
    assert jacobian_weight(flat, 10 ** 6, 10 ** 3) == 0.4


def test_jacobian_draw_has_its_frequency_is_reproducible_and_leaves_the_global_stream_alone():
    t = TrainConfig(jac_reg_freq=0.3, jac_reg_weight=1.0, seed=4)
    state = torch.get_rng_state()
    draws = [jacobian_draw(t, step) for step in range(2000)]
    assert torch.equal(torch.get_rng_state(), state)
    hits = sum(a for a, _ in draws)
    assert abs(hits - 600) < 4 * (2000 * 0.3 * 0.7) ** 0.5
    assert draws[17] == jacobian_draw(t, 17) and len({s for _, s in draws}) == 2000
    assert [a for a, _ in draws] != [a for a, _ in (jacobian_draw(TrainConfig(jac_reg_freq=0.3, jac_reg_weight=1.0,
                                                                               seed=5), s) for s in range(2000))]


def _tiny(overrides=(), batch=4, seed=0):
    cfg = load_config("cifar10_tiny_smoke", ["train.pretrain_steps=0", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg)
    set_phase(model, cfg, 0)
    model.deq.warn = False
    g = torch.Generator().manual_seed(seed + 1)
    return cfg, model, torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def _step_grads(model, x, y, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(11)  # the dropout masks
    loss, _ = train_step(model, nn.CrossEntropyLoss(), opt, x, y, **kw)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_train_step_adds_the_weighted_penalty_and_its_statistics():
    _, model, x, y = _tiny()
    loss0, plain = _step_grads(model, x, y)
    assert "jac_reg_loss" not in solver_stats(model)
    model.deq.jacobian_probes, model.deq.jacobian_seed = 2, 9
    loss1, got = _step_grads(model, x, y, jac_weight=0.7)
    penalty = solver_stats(model)["jac_reg_loss"]
    assert penalty > 0 and torch.equal(loss0, loss1)  # the reported loss is the task loss

    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    logits = model(x)
    objective = F.cross_entropy(logits, y) + 0.7 * model.last_info.jacobian_loss
    objective.backward()
    assert model.last_info.jacobian_loss.item() == pytest.approx(penalty, rel=1e-6)
    for n, g in got.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(got[n], plain[n]) for n in plain)


def test_train_step_with_correction_weights_earlier_states_and_keeps_the_batchnorm_statistics():
    cfg, model, x, y = _tiny(["solver.correction_states=3", "solver.correction_gamma=0.5"])
    _, plain_model, _, _ = _tiny()
    _, got = _step_grads(model, x, y, correction_gamma=0.5)
    _, plain = _step_grads(plain_model, x, y)
    assert len(model.last_correction_logits) == 2 and plain_model.last_correction_logits is None
    # the head ran three times, the BatchNorm running statistics moved once, as in the plain model
    for a, b in zip(model.head.state_dict().values(), plain_model.head.state_dict().values()):
        assert torch.equal(a, b)

    crit = nn.CrossEntropyLoss()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    loss = crit(model(x), y)
    first, second = model.last_correction_logits
    (loss + 0.25 * crit(first, y) + 0.5 * crit(second, y)).backward()
    for n, g in got.items():
        torch.testing.assert_close(g, model.get_parameter(n).grad, rtol=1e-4, atol=1e-7)
    assert any(not torch.allclose(got[n], plain[n]) for n in plain)


def test_training_objective_is_the_loss_itself_when_every_option_is_off():
    _, model, x, y = _tiny(["solver.correction_states=1"])
    crit = nn.CrossEntropyLoss()
    loss = crit(model(x), y)
    assert training_objective(model, crit, loss, y, jac_weight=0.5) is loss  # no penalty was computed
    assert model.last_correction_logits is None


# ----------------------------------------------------------------------------------------------
# Configs.

def test_every_shipped_config_has_the_options_off():
    for name in available_configs():
        cfg = load_config(name)
        assert not cfg.train.jac_reg and cfg.train.spectral_radius_every == 0 and cfg.solver.correction_states == 1


@pytest.mark.parametrize("override, match", [
    ("train.jac_reg_freq=0.1", "both zero"),
    ("train.jac_reg_weight=0.4", "both zero"),
    ("train.jac_reg_freq=1.5", "jac_reg_freq"),
    ("train.jac_reg_probes=0", "jac_reg_probes"),
    ("train.jac_reg_step_every=0", "jac_reg_step_every"),
    ("train.jac_reg_stop_epoch=-1", "jac_reg_stop_epoch"),
    ("train.jac_reg_weight=-1", "jac_reg_weight"),
    ("train.spectral_radius_every=-1", "spectral_radius_every"),
    ("train.spectral_radius_iters=0", "spectral_radius_iters"),
    ("solver.correction_states=0", "correction_states"),
    ("solver.correction_states=7", "max_iter"),
    ("solver.correction_steps=0", "correction_steps"),
    ("solver.correction_damping=0", "correction_damping"),
    ("solver.correction_gamma=1.5", "correction_gamma"),
    ("train.jac_reg_fre=0.1", "closest match: 'jac_reg_freq'"),
])
def test_bad_option_values_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("cifar10_tiny_smoke", [override])


def test_correction_needs_an_implicit_solve():
    with pytest.raises(ConfigError, match="unrolled"):
        load_config("cifar10_tiny_smoke", ["solver.correction_states=2", "solver.grad=unrolled"])


def test_a_checkpoint_written_before_the_options_resumes():
    """A checkpoint's config lacks the new fields; at their defaults (off) it is the same run."""
    now = config_to_dict(load_config("cifar10_tiny_smoke"))
    saved = json.loads(json.dumps(now))
    for key in [k for k in saved["train"] if k.startswith(("jac_reg", "spectral_radius"))]:
        del saved["train"][key]
    for key in [k for k in saved["solver"] if k.startswith("correction")]:
        del saved["solver"][key]
    assert config_diff(saved, now)  # what the resume check saw without the defaults
    assert config_diff(with_defaults(saved), now) == []
    saved["train"]["lr"] = 0.5
    assert config_diff(with_defaults(saved), now) == ["train.lr: checkpoint 0.5 vs now 0.001"]


# ----------------------------------------------------------------------------------------------
# A run with every option off is the run of the code before the options, to the bit.

BASELINE_COMMIT = "8ac03656ba8f345cf9f0c2bbb6a39a3b7ea5bfe0"  # the last commit before the stabilisers
RUN_SET = ["train.epochs=1", "train.pretrain_steps=3", "train.lr=3e-3"]
OFF = ["train.jac_reg_freq=0", "train.jac_reg_weight=0", "train.spectral_radius_every=0",
       "solver.correction_states=1"]


def _baseline_code(dest: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    known = subprocess.run(["git", "cat-file", "-e", f"{BASELINE_COMMIT}^{{commit}}"], cwd=paths.ROOT,
                           capture_output=True)
    if known.returncode != 0:
        pytest.skip(f"commit {BASELINE_COMMIT[:10]} is not in this clone's history (a shallow clone?)")
    archive = subprocess.run(["git", "archive", BASELINE_COMMIT, "mdeq"], cwd=paths.ROOT, capture_output=True,
                             check=True).stdout
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _train(*runs: tuple[Path, Path, Path, list[str]]) -> None:
    """Train each (code, data, out, extra) in its own 1-thread process, all at once (a 2-core machine runs two in
    the time of one), and check that every one ended cleanly."""
    procs = [_start(*run) for run in runs]
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]


def _start(code: Path, data: Path, out: Path, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-P", "-c",
           "import sys, mdeq, mdeq.train; assert mdeq.__file__.startswith(sys.argv[1]), mdeq.__file__; "
           "sys.exit(mdeq.train.cli(sys.argv[2:]))", str(code),
           "--config", "cifar10_tiny_smoke", "--set", *RUN_SET, *extra, "--data-root", str(data), "--out", str(out),
           "--limit-train", "48", "--limit-eval", "16", "--workers", "0", "--log-every", "1",
           "--checkpoint-every", "0", "--threads", "1", "--device", "cpu", "--no-progress", "--deterministic"]
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.Popen(cmd, cwd=out.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_a_run_with_every_option_off_is_bit_identical_to_the_code_before_them(tmp_path):
    """6 steps (3 unrolled, 3 implicit, dropout on) and an evaluation of the tiny MDEQ, once with the
    baseline commit's mdeq and once with this tree's, every option off: the same weights, Adam state,
    losses, solver statistics and evaluation."""
    from mdeq.engine.data.synthetic import make_synthetic

    base = _baseline_code(tmp_path / "baseline_code")
    data = tmp_path / "data"
    make_synthetic("cifar10", data)
    _train((base, data, tmp_path / "before", []), (paths.ROOT, data, tmp_path / "now", OFF))

    a, b = (load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("before", "now"))
    assert a["global_step"] == b["global_step"] == 6
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for pid, st in a["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    keys = ("step", "phase", "loss", "acc", "nfe_forward", "nfe_backward", "rel_residual_forward",
            "rel_residual_backward")
    steps = [[[json.loads(line).get(k) for k in keys]
              for line in (tmp_path / d / "steps.jsonl").read_text().splitlines()] for d in ("before", "now")]
    assert steps[0] == steps[1] and len(steps[0]) == 6
    rows = []
    for d in ("before", "now"):
        with open(tmp_path / d / "metrics.csv", newline="") as fh:
            rows.append([{k: r[k] for k in ("train_loss", "eval_top1", "eval_loss", "eval_rel_residual_forward")}
                         for r in csv.DictReader(fh)])
    assert rows[0] == rows[1] and len(rows[0]) == 1
    assert not any(k.startswith("jac_reg") for line in (tmp_path / "now" / "steps.jsonl").read_text().splitlines()
                   for k in json.loads(line))


def test_a_run_with_every_option_on_logs_them(tmp_path):
    from mdeq.engine.data.synthetic import make_synthetic

    data = tmp_path / "data"
    make_synthetic("cifar10", data)
    out = tmp_path / "on"
    on = ["train.jac_reg_freq=0.5", "train.jac_reg_weight=0.4", "train.jac_reg_pretrain_weight=0.1",
          "train.spectral_radius_every=1", "train.spectral_radius_iters=20", "solver.correction_states=2"]
    _train((paths.ROOT, data, out, on))
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    applied = [s for s in steps if s["jac_reg_applied"]]
    assert applied
    t = load_config("cifar10_tiny_smoke", [*RUN_SET, *on]).train
    assert [s["step"] - 1 for s in applied] == [k for k in range(6) if jacobian_draw(t, k)[0]]
    assert all(s["jac_reg_loss"] > 0 and s["jac_reg_weight"] == jacobian_weight(t, s["step"] - 1, 0) for s in applied)
    assert all("jac_reg_loss" not in s for s in steps if not s["jac_reg_applied"])
    with open(out / "metrics.csv", newline="") as fh:
        row = next(csv.DictReader(fh))
    assert 0 < float(row["eval_spectral_radius"]) < 10


# ----------------------------------------------------------------------------------------------
# The demonstration's part of the book page is drawn from its JSON, never typed.

def _study(name: str):
    """A script of studies/ as a module (a study imports its siblings from its own folder)."""
    sys.path.insert(0, str(paths.ROOT / "studies"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(paths.ROOT / "studies"))


def _demo_module():
    return _study("jacobian_reg_demo")


def test_the_page_part_of_the_demonstration_is_drawn_from_its_json():
    demo = _demo_module()
    json_path = paths.RESULTS / "jacobian_reg_demo.json"
    payload = json.loads(json_path.read_text()) if json_path.is_file() else None
    committed = (paths.RESULTS / "jacobian_reg_demo.md").read_text()
    assert committed == demo.render(payload), "run: python studies/jacobian_reg_demo.py --render"
    assert ("Not run yet" in committed) == (payload is None)


def test_the_demonstration_renders_every_number_from_a_payload():
    """A made-up payload (the JSON's shape, distinct values) comes out in the page part."""
    demo = _demo_module()
    at = {"lowest_rel_residual_at_training_budget": 0.00123, "f_evals_to_0.0001": 27, "f_evals_to_0.001": 14}
    measured = {"eval_mode": at, "train_mode": {**at, "f_evals_to_0.0001": None},
                "spectral_radius": {"mean": 0.8765, "max": 0.9432}, "eval_batch_loss": 0.777}
    summary = {"steps": 3, "tail_steps": 2, "train_loss_mean": 0.555, "train_loss_tail_mean": 0.444,
               "rel_residual_forward_first_tail_mean": 0.00333, "rel_residual_forward_tail_mean": 0.00222,
               "penalty_steps": 1, "step_time_ms_mean": 4321.0, "step_time_ms_mean_with_penalty": 6543.0}
    payload = {"label": demo.LABEL, "config": "cifar10_small_paper", "train_budget_f_evals": 16,
               "long_budget_f_evals": 50, "before": measured,
               "checkpoint": {"global_step": 8211, "epoch": 21, "commit": "78cc7b9abcdef"},
               "jacobian_reg": {"weight": 0.4, "freq": 0.02, "probes": 2, "source": demo.RELEASED_REG},
               "data": {"eval": "128 CIFAR-10 test images"},
               "arms": {"without": {"after": measured, "summary": {**summary, "penalty_steps": 0,
                                                                    "step_time_ms_mean_with_penalty": None}},
                        "with_jacobian_reg": {"after": measured, "summary": summary}},
               "overhead": {"step_time_mean_ratio": 1.0234, "penalty_step_vs_plain_step_ratio": 1.51},
               "provenance": {"date": "2026-12-06", "command": "python x", "hardware": {"cpu": "EPYC",
                                                                                      "torch_threads": 2}}}
    text = demo.render(payload)
    for shown in ("0.00123", "| 27 |", "not reached", "0.8765 (0.9432)", "0.777", "0.555", "0.444", "0.00333",
                  "0.00222", "| 4321 | 4321 |", "| - | 6543 |", "1.023x", "1.51x", "step 8211", "78cc7b9abc",
                  "not a Table 1", "0.8765 in both", "1 of 3 steps"):
        assert shown in text, shown


# ----------------------------------------------------------------------------------------------
# The equilibrium measurement adds later checkpoints to an earlier one, thinned, never re-measuring.

def test_equilibrium_measurement_keeps_old_rows_and_thins_new_checkpoints(tmp_path):
    eq = _study("equilibrium_over_training")
    found = [(f"c{s}", {"global_step": s}) for s in (100, 200, 1000, 1600, 1700, 3000, 3100)]
    steps = lambda kept: [int(c["global_step"]) for _, c in kept]  # noqa: E731
    assert steps(eq.thinned(found, [], 0)) == [100, 200, 1000, 1600, 1700, 3000, 3100]
    assert steps(eq.thinned(found, [], 1000)) == [100, 1600, 3000, 3100]  # the latest always
    assert steps(eq.thinned(found, [{"global_step": 1000}], 1000)) == [3000, 3100]
    assert eq.thinned(found, [{"global_step": 3100}], 0) == []
    args = type("Args", (), {"config": "cifar10_small_paper", "run": "r", "batch": 128, "num_batches": 3,
                             "budget": 50, "memory": 12, "spectral_radius": 0})()
    out = tmp_path / "eq.json"
    assert eq.kept_rows(out, args) == []
    out.write_text(json.dumps({"config": "cifar10_small_paper", "run": "r", "batch": 128, "num_batches": 3,
                               "budget": 50, "rows": [{"global_step": 5}]}))
    assert eq.kept_rows(out, args) == [{"global_step": 5}]  # an older file without memory: the config's 12
    args.memory = 30
    with pytest.raises(SystemExit, match="made with memory=12, not 30"):
        eq.kept_rows(out, args)
    args.memory = 12
    args.budget = 30
    with pytest.raises(SystemExit, match="made with budget=50, not 30"):
        eq.kept_rows(out, args)
