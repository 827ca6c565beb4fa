"""The implicit layer: IFT gradients against unrolled float64 autograd, gradcheck, modes, budgets."""
import warnings

import pytest
import torch

from mdeq.core.implicit import ImplicitLayer
from problems import Counted, MultiscaleMap, inputs, zeros_like_state


def _loss(z, w):
    return sum((a * b).sum() for a, b in zip(z, w))


def _reference_grads(fm, xs, w, steps=300):
    """Unrolled float64 autograd run to convergence: the gradient the IFT must reproduce."""
    z = zeros_like_state(xs)
    for _ in range(steps):
        z = fm(z, xs)
    return torch.autograd.grad(_loss(z, w), list(fm.parameters()) + xs)


def _tight(fm, **kw):
    opts = dict(max_iter=200, tol=1e-13, backward_max_iter=200, backward_tol=1e-13)
    opts.update(kw)
    return ImplicitLayer(fm, **opts)


@pytest.mark.parametrize("solver", ["broyden", "anderson", "fixed_point"])
def test_ift_gradients_match_unrolled_float64(solver):
    fm = MultiscaleMap(gain=0.5)
    xs = [x.requires_grad_() for x in inputs()]
    w = [torch.randn_like(x) for x in xs]
    layer = _tight(fm, solver=solver, backward_solver=solver)
    z, info = layer(zeros_like_state(xs), xs)
    got = torch.autograd.grad(_loss(z, w), list(fm.parameters()) + xs)
    want = _reference_grads(fm, xs, w)
    for g, r in zip(got, want):
        assert ((g - r).norm() / r.norm()).item() < 1e-6
    assert info.backward is not None and info.backward.all_converged and info.backward.nfe > 1


def test_gradcheck_float64():
    """Finite differences agree with the IFT gradient w.r.t. inputs and a weight passed as an input."""
    import torch.nn.functional as F

    def func(z, x, W):  # two scales, fused by pooling / upsampling
        a = torch.tanh(F.conv2d(z[0], W, padding=1) + x[0] + F.interpolate(z[1], scale_factor=2))
        b = torch.tanh(0.5 * F.avg_pool2d(z[0], 2) + 0.3 * z[1] + x[1])
        return [a, b]

    layer = _tight(func, max_iter=100, backward_max_iter=100)

    def fn(x0, x1, W):
        z, _ = layer([torch.zeros_like(x0), torch.zeros_like(x1)], [x0, x1], W)
        return tuple(z)

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x1 = torch.randn(2, 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    W = (0.1 * torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x0, x1, W), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_backward_stats_after_backward_and_warning_when_not_converged():
    fm = MultiscaleMap(gain=0.9)
    xs = [x.requires_grad_() for x in inputs()]
    layer = ImplicitLayer(fm, max_iter=50, tol=1e-8, backward_max_iter=2, backward_tol=1e-12)
    z, info = layer(zeros_like_state(xs), xs)
    assert info.backward is None
    with pytest.warns(RuntimeWarning, match="IFT backward solve did not converge"):
        _loss(z, xs).backward()
    assert info.backward.nfe == 3 and info.backward.stop_reason == "max_iter"
    assert not info.backward.converged.any()


def test_input_gradients_in_eval_mode():
    """The gradient path follows torch.is_grad_enabled(), not module.training (torchdeq #4)."""
    fm = MultiscaleMap(gain=0.5)
    xs = [x.requires_grad_() for x in inputs()]
    w = [torch.randn_like(x) for x in xs]
    layer = _tight(fm)
    train_grads = torch.autograd.grad(_loss(layer(zeros_like_state(xs), xs)[0], w), xs)
    layer.eval()
    z, info = layer(zeros_like_state(xs), xs)
    eval_grads = torch.autograd.grad(_loss(z, w), xs)
    assert info.backward is not None
    for a, b in zip(train_grads, eval_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_no_grad_returns_z_star_without_graph():
    fm = MultiscaleMap(gain=0.5)
    xs = inputs()
    f = Counted(lambda z: fm(z, xs))
    layer = _tight(lambda z: f(z))
    with torch.no_grad():
        z, info = layer(zeros_like_state(xs))
    assert all(t.grad_fn is None for t in z) and f.calls == info.forward.nfe


def test_unrolled_applies_f_exactly_k_times_from_zero():
    fm = MultiscaleMap(gain=0.5)
    xs = [x.requires_grad_() for x in inputs()]
    calls = []
    layer = ImplicitLayer(lambda z, x: calls.append(1) or fm(z, x), grad="unrolled", unroll_steps=4)
    z, info = layer(zeros_like_state(xs), xs)
    manual = zeros_like_state(xs)
    for _ in range(4):
        manual = fm(manual, xs)
    assert len(calls) == 4 and info.mode == "unrolled" and info.forward is None
    for a, b in zip(z, manual):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert z[0].grad_fn is not None  # ordinary autograd through the stack


def test_jfb_and_phantom_gradients():
    fm = MultiscaleMap(gain=0.5)
    xs = inputs()
    w = [torch.randn_like(x) for x in xs]
    params = list(fm.parameters())
    layer = _tight(fm, grad="ift")
    with torch.no_grad():
        z_star, _ = layer(zeros_like_state(xs), xs)
    # JFB: d/dtheta of f(z*) with z* held constant
    layer.grad = "jfb"
    got = torch.autograd.grad(_loss(layer(zeros_like_state(xs), xs)[0], w), params)
    want = torch.autograd.grad(_loss(fm([t.detach() for t in z_star], xs), w), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # phantom: k damped steps from z*
    layer.grad, layer.phantom_steps, layer.phantom_damping = "phantom", 3, 0.5
    got = torch.autograd.grad(_loss(layer(zeros_like_state(xs), xs)[0], w), params)
    z = [t.detach() for t in z_star]
    for _ in range(3):
        z = [0.5 * a + 0.5 * b for a, b in zip(z, fm(z, xs))]
    want = torch.autograd.grad(_loss(z, w), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_switch_modes_on_live_layer_and_budgets():
    fm = MultiscaleMap(gain=0.9)
    xs = inputs()
    layer = ImplicitLayer(fm, max_iter=40, tol=1e-12, eval_max_iter=5, eval_tol=1e-12, grad="unrolled")
    _, info = layer(zeros_like_state(xs), xs)
    assert info.mode == "unrolled"
    layer.grad = "ift"
    with torch.no_grad():
        _, info = layer(zeros_like_state(xs), xs)
        assert info.forward.nfe == 41
        layer.eval()
        _, info = layer(zeros_like_state(xs), xs)
        assert info.forward.nfe == 6
    with pytest.raises(ValueError, match="unknown gradient mode"):
        layer.grad = "implicit"


def test_unknown_solver_and_options_raise():
    fm = MultiscaleMap()
    with pytest.raises(ValueError, match="unknown solver 'broyd'"):
        ImplicitLayer(fm, solver="broyd")
    with pytest.raises(TypeError, match=r"unknown key\(s\) \['memroy'\].*'memory'"):
        ImplicitLayer(fm, solver_options={"memroy": 5})
    with pytest.raises(TypeError, match="set on the layer itself"):
        ImplicitLayer(fm, backward_options={"max_iter": 5})


def test_ift_stores_no_forward_activations():
    """Only the f(z*) graph is kept: the saved-tensor count does not grow with solver iterations."""
    fm = MultiscaleMap(gain=0.9)
    xs = [x.requires_grad_() for x in inputs()]
    counts = []
    for max_iter in (5, 40):
        n = [0]

        def pack(t):
            n[0] += 1
            return t

        layer = ImplicitLayer(fm, max_iter=max_iter, tol=1e-14)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(zeros_like_state(xs), xs)
        counts.append(n[0])
    assert counts[0] == counts[1] > 0


# ----------------------------------------------------------------------------------------------
# The backward stopping rule: at the paper's batch of 128 and a batch-mean loss, dL/dz* is O(1/B)
# per sample, so an absolute per-sample tolerance of 1e-3 returned u0 = 0 (no implicit gradient).

class _PooledHead(torch.nn.Module):
    """Global average pool of every scale, then a linear classifier: dL/dz* as small as MDEQ's."""

    def __init__(self, shapes, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        feats = sum(s[0] for s in shapes)
        self.weight = torch.nn.Parameter(torch.randn(classes, feats, generator=g, dtype=torch.float64) / (2 * feats))

    def forward(self, z):
        pooled = torch.cat([t.mean((2, 3)) for t in z], 1)
        return pooled @ self.weight.t()


def _paper_batch_problem(batch=128):
    fm = MultiscaleMap(gain=0.5)
    xs = [x.requires_grad_() for x in inputs(batch=batch)]
    head = _PooledHead([s for s in __import__("problems").SHAPES])
    labels = torch.arange(batch) % 10
    loss_fn = lambda z: torch.nn.functional.cross_entropy(head(z), labels)  # noqa: E731  (batch mean)
    return fm, xs, loss_fn


def test_backward_at_batch_128_runs_and_matches_float64_unrolled():
    fm, xs, loss_fn = _paper_batch_problem()
    params = list(fm.parameters()) + xs
    z = zeros_like_state(xs)
    for _ in range(200):  # the converged unrolled network: the true gradient of this contractive f
        z = fm(z, xs)
    want = torch.autograd.grad(loss_fn(z), params)
    # the layer's default backward rule, with the forward solved tightly
    layer = ImplicitLayer(fm, max_iter=100, tol=1e-13, backward_max_iter=30)
    z, info = layer(zeros_like_state(xs), xs)
    G = torch.autograd.grad(loss_fn(z), z, retain_graph=True)
    rhs = torch.cat([g.flatten(1) for g in G], 1).norm(dim=1)
    assert rhs.max() < 1e-3  # the regime of the bug: the right-hand side is below the old absolute tol
    got = torch.autograd.grad(loss_fn(z), params)
    assert info.backward.nstep >= 5 and info.backward.lowest_step.min() >= 1
    for g, r in zip(got, want):  # the default tol is 1e-6 relative: the gradient is as close
        assert ((g - r).norm() / r.norm()).item() < 1e-5
    # the old rule (abs 1e-3, z0 eligible) stops at u0 = 0: no gradient reaches f or the input
    old = ImplicitLayer(fm, max_iter=100, tol=1e-13, backward_max_iter=30, backward_tol=1e-3,
                        backward_stop_mode="abs", backward_options={"exclude_initial": False})
    z, info = old(zeros_like_state(xs), xs)
    stale = torch.autograd.grad(loss_fn(z), params)
    assert info.backward.nstep == 0 and all(float(g.abs().max()) == 0 for g in stale)


def test_backward_rule_does_not_depend_on_the_loss_scale():
    fm, xs, loss_fn = _paper_batch_problem(batch=16)
    layer = ImplicitLayer(fm, max_iter=100, tol=1e-13, backward_max_iter=30, backward_tol=1e-9)
    out = []
    for scale in (1.0, 1e-6):
        z, info = layer(zeros_like_state(xs), xs)
        grads = torch.autograd.grad(scale * loss_fn(z), list(fm.parameters()))
        out.append((info.backward.nstep, info.backward.lowest_step, grads))
    (n1, low1, g1), (n2, low2, g2) = out
    assert n1 == n2 > 1 and torch.equal(low1, low2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, 1e-6 * a, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["rel", "abs"])
def test_backward_never_returns_zero_for_a_nonzero_right_hand_side(mode):
    """A backward whose residual only grows (u <- 1.5 u + G diverges) still returns u1 = G, not u0 = 0."""
    xs = [x.requires_grad_() for x in inputs()]
    lin = lambda z, x: [1.5 * a + b for a, b in zip(z, x)]  # noqa: E731  (z* = -2x)
    layer = ImplicitLayer(lin, max_iter=20, tol=1e-12, backward_solver="fixed_point", backward_max_iter=6,
                          backward_tol=1e-12, backward_stop_mode=mode, warn=False)
    z, info = layer(zeros_like_state(xs), xs)
    grads = torch.autograd.grad(sum(t.sum() for t in z), xs)
    assert info.backward.nfe == 7 and info.backward.lowest_step.min() >= 1
    assert all(float(g.abs().min()) > 0 for g in grads)


def test_channels_last_state_gives_the_same_ift_gradients_float64():
    """The layer in channels_last (the engine's CPU default): same z*, same IFT gradients."""
    fm = MultiscaleMap(gain=0.5)
    w = inputs(seed=3)
    grads = []
    for cl in (False, True):
        xs = [x.requires_grad_() for x in inputs()]
        z0 = zeros_like_state(xs)
        if cl:
            z0 = [t.contiguous(memory_format=torch.channels_last) for t in z0]
        layer = _tight(lambda z, x: fm(z, x), solver="broyden", backward_solver="broyden")
        z, info = layer(z0, xs)
        grads.append(torch.autograd.grad(_loss(z, w), list(fm.parameters()) + xs))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_compile_forward_falls_back_to_eager_with_one_warning(monkeypatch):
    """A compiler that fails on first use (no C++ toolchain, an unsupported torch) costs a warning, not the run."""
    fm = MultiscaleMap(gain=0.5)
    xs = inputs()

    def broken_compile(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no working C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = ImplicitLayer(lambda z, x: fm(z, x), max_iter=20, tol=1e-10)
    layer = ImplicitLayer(lambda z, x: fm(z, x), max_iter=20, tol=1e-10, compile_forward=True)
    with torch.no_grad():
        z_ref, _ = eager(zeros_like_state(xs), xs)
        with pytest.warns(RuntimeWarning, match="torch.compile of f failed"):
            z1, _ = layer(zeros_like_state(xs), xs)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning: the layer stays eager
            z2, _ = layer(zeros_like_state(xs), xs)
    for a, b, c in zip(z_ref, z1, z2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)


@pytest.mark.slow
def test_compile_forward_solves_like_eager():
    """torch.compile'd f in the forward solve (inductor, float32): the same z* and NFE to float32 rounding,
    and the gradient path (f(z*), the backward) stays eager."""
    fm = MultiscaleMap(gain=0.5, dtype=torch.float32)
    xs = inputs(batch=4, dtype=torch.float32)
    w = inputs(batch=4, seed=3, dtype=torch.float32)
    out = []
    for comp in (False, True):
        layer = ImplicitLayer(fm, max_iter=30, tol=1e-5, backward_max_iter=30, compile_forward=comp)
        z, info = layer(zeros_like_state(xs), xs)
        g = torch.autograd.grad(_loss(z, w), list(fm.parameters()))
        out.append((z, info.forward.nfe, g))
        if comp:
            assert layer._compiled.get("ok") and not layer._compiled.get("failed")
            assert "_compiled" not in dict(layer.named_modules())  # not a submodule: no extra state_dict keys
            assert set(layer.state_dict()) == set(ImplicitLayer(fm).state_dict())
    (z0, n0, g0), (z1, n1, g1) = out
    assert n0 == n1
    for a, b in zip(z0, z1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def _mdeq_small_step(batch, dtype, history):
    """Loss and gradients of one implicit training step of MDEQ-small (T_f 15, T_b 18, m 12) from the Table 1
    campaign's checkpoint at step 3250 (trained weights: both solves converge; the benchmarks start from it
    too), dropout off, a fixed batch."""
    from pathlib import Path

    from mdeq.engine.checkpoint import load_checkpoint
    from mdeq.core.config import load_config
    from mdeq.core.model import build_model
    from mdeq.engine.build import build_criterion
    from mdeq.engine.step import set_phase

    ckpt = Path(__file__).resolve().parents[1] / "results" / "benchmarks" / "weights" / "cifar10_mdeq_small_step3250.pt"
    cfg = load_config("cifar10_small_paper", {"data.batch_size": batch, "model.dropout": 0.0})
    model = build_model(cfg).train()
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    set_phase(model, cfg, cfg.train.pretrain_steps)
    model.deq.solver_options["history"] = model.deq.backward_options["history"] = history
    model = model.to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(dtype)
    y = torch.randint(0, 10, (batch,), generator=g)
    loss = build_criterion(cfg)(model(x), y)
    loss.backward()
    info = model.last_info
    assert (info.forward.nfe, info.backward.nfe) == (16, 19)
    assert info.forward.extra["history"] == info.backward.extra["history"] == history
    grads = torch.cat([p.grad.flatten().double() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads


@pytest.mark.parametrize("batch", [8, pytest.param(128, marks=pytest.mark.slow)])
def test_broyden_stores_give_the_same_training_step(batch):
    """The Table 1 campaign may switch Broyden's history store mid-run: float64 loss and gradients agree to
    rounding, and in float32 the residual store is at least as close to the float64 step as the low-rank one."""
    warnings.filterwarnings("ignore", "IFT backward solve did not converge")
    l64, g64 = _mdeq_small_step(batch, torch.float64, "low_rank")
    l64r, g64r = _mdeq_small_step(batch, torch.float64, "residuals")
    assert abs(l64r - l64) <= 1e-12 * abs(l64) and ((g64r - g64).norm() / g64.norm()).item() < 1e-10
    err = {}
    for history in ("low_rank", "residuals"):
        loss, grads = _mdeq_small_step(batch, torch.float32, history)
        assert abs(loss - l64) <= 1e-6 * abs(l64)
        err[history] = ((grads - g64).norm() / g64.norm()).item()
    assert err["residuals"] <= err["low_rank"] + 1e-5, err
