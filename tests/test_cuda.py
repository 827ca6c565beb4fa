"""CUDA code paths: skipped with a reason on machines without a GPU (CI has none; run on a GPU box)."""
import warnings

import pytest
import torch

from mdeq.core.implicit import ImplicitLayer
from mdeq.core.solvers import SOLVERS
from problems import MultiscaleMap, inputs, zeros_like_state

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_on_cuda_match_cpu(name):
    fm = MultiscaleMap(gain=0.5)
    xs = inputs()
    z_cpu, st_cpu = SOLVERS[name](lambda z: fm(z, xs), zeros_like_state(xs), max_iter=100, tol=1e-10)
    fm_c = fm.cuda()
    xs_c = [x.cuda() for x in xs]
    z_gpu, st_gpu = SOLVERS[name](lambda z: fm_c(z, xs_c), zeros_like_state(xs_c), max_iter=100, tol=1e-10,
                                  check_every=4)
    assert st_gpu.all_converged and z_gpu[0].is_cuda
    for a, b in zip(z_cpu, z_gpu):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("history", ["low_rank", "residuals"])
def test_broyden_stores_on_cuda_match_cpu(history):
    """The residual store (float64 coefficients on the device, no host sync per iteration) on CUDA."""
    fm = MultiscaleMap(gain=0.9)
    xs = inputs(batch=6)
    kw = dict(max_iter=18, tol=1e-14, memory=12, history=history)
    z_cpu, st_cpu = SOLVERS["broyden"](lambda z: fm(z, xs), zeros_like_state(xs), **kw)
    fm_c, xs_c = fm.cuda(), [x.cuda() for x in xs]
    z_gpu, st_gpu = SOLVERS["broyden"](lambda z: fm_c(z, xs_c), zeros_like_state(xs_c), check_every=4, **kw)
    assert st_gpu.extra["history"] == history and z_gpu[0].is_cuda and st_gpu.nfe == st_cpu.nfe
    torch.testing.assert_close(st_gpu.abs_trace, st_cpu.abs_trace, rtol=1e-5, atol=0)
    for a, b in zip(z_cpu, z_gpu):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name, options", [("broyden", {"history": "low_rank"}), ("broyden", {"history": "residuals"}),
                                           ("anderson", {}), ("fixed_point", {})])
def test_solver_loops_do_not_sync_with_the_host_between_checks(name, options):
    """A solve's host syncs are its stopping checks, its set-up and its finish, none per iteration: with the
    checks spaced past the budget, 24 iterations sync as often as 12 (CUDA's sync debug mode counts them)."""
    fm = MultiscaleMap(gain=0.5).cuda()
    xs = [x.cuda() for x in inputs()]

    def syncs(max_iter):
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                _, stats = SOLVERS[name](lambda z: fm(z, xs), zeros_like_state(xs), max_iter=max_iter, tol=1e-30,
                                         check_every=100, warn=False, **options)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert stats.nfe == max_iter + 1
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(12)  # warm-up: first-call library initialisation may sync
    assert syncs(24) == syncs(12)


def test_ift_gradients_on_cuda_match_cpu():
    fm = MultiscaleMap(gain=0.5)
    xs = [x.requires_grad_() for x in inputs()]
    layer = ImplicitLayer(fm, max_iter=200, tol=1e-12, backward_max_iter=200, backward_tol=1e-12)
    w = [torch.randn_like(x) for x in xs]
    z, _ = layer(zeros_like_state(xs), xs)
    g_cpu = torch.autograd.grad(sum((a * b).sum() for a, b in zip(z, w)), xs)
    xs_c = [x.detach().cuda().requires_grad_() for x in xs]
    layer.cuda()
    z, info = layer(zeros_like_state(xs_c), xs_c)
    g_gpu = torch.autograd.grad(sum((a * b.cuda()).sum() for a, b in zip(z, w)), xs_c)
    assert info.backward.all_converged
    for a, b in zip(g_cpu, g_gpu):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-9)


def test_amp_float16_training_step_keeps_solver_state_float32():
    from mdeq.core.config import load_config
    from mdeq.core.model import build_model
    from mdeq.engine.loop import train_step

    model = build_model(load_config("cifar10_tiny_smoke")).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.randn(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    scaler = torch.amp.GradScaler("cuda")
    loss, _ = train_step(model, torch.nn.CrossEntropyLoss(), opt, x, y, scaler=scaler,
                         autocast=torch.autocast("cuda", dtype=torch.float16))
    assert torch.isfinite(loss)
    assert model.last_info.forward.rel_lowest.dtype == torch.float32
    assert model.last_info.backward is not None
