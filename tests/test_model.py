"""The MDEQ model: IFT gradients against unrolled autograd, the once-per-forward weight norm and
dropout mask, the unrolled warm-up, every parameter's gradient, residual reduction at init, inputs."""
import pytest
import torch
import torch.nn.functional as F

import mdeq.core.model as model_mod
from mdeq.core.config import load_config
from mdeq.core.heads import upsample_logits
from mdeq.core.model import FTheta, MDEQ, WeightNormConv2d, build_model

# the tiny test models run a 6-step backward solve that is not meant to converge
pytestmark = pytest.mark.filterwarnings("ignore:IFT backward solve did not converge:RuntimeWarning")


def _tiny(**overrides):
    """The smoke config at 16x16 (3 scales of 4/8/16 channels): a forward takes milliseconds."""
    base = {"data.image_size": [16, 16], "data.eval_image_size": [16, 16]}
    base.update(overrides)
    return load_config("cifar10_tiny_smoke", base)


def _num_wn_convs(model: MDEQ) -> int:
    return sum(isinstance(m, WeightNormConv2d) for m in model.modules())


def _record_f_calls(model: MDEQ, monkeypatch) -> list:
    """Patch f_theta.forward to log the ``prepared`` argument of every evaluation."""
    calls = []
    original = FTheta.forward

    def spy(self, z, injection, prepared):
        calls.append(prepared)
        return original(self, z, injection, prepared)

    monkeypatch.setattr(FTheta, "forward", spy)
    return calls


def test_output_shapes_and_last_info():
    torch.manual_seed(0)
    model = build_model(_tiny())
    x = torch.randn(2, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (2, 10)
    info = model.last_info
    assert info.mode == "ift" and info.forward.nfe == model.deq.max_iter + 1
    assert info.forward.scale_rel_trace.shape[:2] == (3, 2)  # per scale, per sample
    logits.sum().backward()
    assert model.last_info.backward is not None and model.last_info.backward.nfe >= 1


def test_segmentation_head_shape_and_upsampling():
    cfg = load_config("cityscapes_small_official", {
        "model.num_channels": [8, 8, 16, 16], "model.expansion": 1, "model.num_groups": 2,
        "model.dropout": 0.0, "data.image_size": [64, 128], "data.eval_image_size": [64, 128],
        "solver.max_iter": 3, "solver.memory": 3})
    model = build_model(cfg).eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 128))
    assert logits.shape == (1, 19, 16, 32)  # 1/4 of the input: two stride-2 stem convs
    up = upsample_logits(logits, (64, 128))
    assert up.shape == (1, 19, 64, 128)
    assert torch.allclose(up, F.interpolate(logits, size=(64, 128), mode="bilinear", align_corners=True))
    assert torch.equal(up[..., 0, 0], logits[..., 0, 0]) and torch.equal(up[..., -1, -1], logits[..., -1, -1])


def test_backbone_transfers_from_classifier_to_segmenter():
    """Cityscapes starts from the ImageNet model: stem, injection and f_theta, not the head."""
    common = {"model.num_channels": [8, 16], "model.expansion": 1, "model.num_groups": 2,
              "data.image_size": [32, 32], "data.eval_image_size": [32, 32]}
    cls = build_model(load_config("imagenet_small_official", {**common, "model.head_channels": [2, 4]}))
    seg = build_model(load_config("cityscapes_small_official", common))
    seg.load_backbone(cls.state_dict())
    assert torch.equal(seg.f.blocks[1].conv1.weight_v, cls.f.blocks[1].conv1.weight_v)
    assert torch.equal(seg.stem[0].weight, cls.stem[0].weight)
    with pytest.raises(KeyError, match="lacks"):
        seg.load_backbone({k: v for k, v in cls.state_dict().items() if not k.startswith("stem.")})


def test_ift_gradients_match_unrolled_float64():
    """The implicit backward gives the gradient of the converged unrolled network (float64, no dropout).

    At init f_theta is not contractive (docs/paper_vs_released.md#the-solver-at-initialisation), so the
    test shrinks the post-fusion GroupNorm
    gains to 0.1 and draws its biases from N(0, 1): f then contracts and 60 unrolled steps reach the
    fixed point to machine precision. JFB (no inverse-Jacobian term) must then be clearly worse.
    """
    torch.manual_seed(0)
    cfg = _tiny(**{"model.dropout": 0.0, "solver.max_iter": 40, "solver.memory": 40, "solver.tol": 1e-11,
                   "solver.stop_mode": "rel", "solver.backward_max_iter": 40, "solver.backward_tol": 1e-11,
                   "solver.unroll_steps": 60})
    model = build_model(cfg).double().eval()  # eval: BN running stats, so samples do not interact
    with torch.no_grad():
        for post in model.f.post:
            post.gn.weight.mul_(0.1)
            post.gn.bias.normal_()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    w = torch.randn(2, 10, dtype=torch.float64)
    params = list(model.parameters())

    def grads(mode):
        model.deq.grad = mode
        return torch.autograd.grad((model(x) * w).sum(), params)

    ift = grads("ift")
    assert model.last_info.forward.all_converged and model.last_info.backward.all_converged
    ref, jfb = grads("unrolled"), grads("jfb")
    norm = lambda gs: torch.sqrt(sum(g.square().sum() for g in gs))  # noqa: E731
    err_ift = norm([a - b for a, b in zip(ift, ref)]) / norm(ref)
    err_jfb = norm([a - b for a, b in zip(jfb, ref)]) / norm(ref)
    assert err_ift < 1e-5
    assert err_jfb > 100 * err_ift
    for a, b in zip(ift, ref):
        assert (a - b).norm() <= 1e-5 * b.norm() + 1e-9


def test_every_parameter_gets_a_gradient_through_the_implicit_backward():
    torch.manual_seed(0)
    model = build_model(_tiny())
    logits = model(torch.randn(4, 3, 16, 16))
    F.cross_entropy(logits, torch.randint(0, 10, (4,))).backward()
    assert model.last_info.mode == "ift"
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_weight_norm_is_computed_once_per_forward(monkeypatch):
    counter = {"n": 0}
    original = model_mod._weight_norm

    def counting(g, v):
        counter["n"] += 1
        return original(g, v)

    monkeypatch.setattr(model_mod, "_weight_norm", counting)
    torch.manual_seed(0)
    model = build_model(_tiny(**{"solver.max_iter": 12, "solver.memory": 12}))
    calls = _record_f_calls(model, monkeypatch)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    n_wn = _num_wn_convs(model)
    assert n_wn == 3 * 2 + 3  # conv1 and conv2 per block, one post-fusion conv per scale
    assert len(calls) == model.last_info.forward.nfe + 1 > n_wn  # solver iterations + f(z*)
    assert counter["n"] == n_wn
    # gradients reach g and v through the shared weights
    conv = model.f.blocks[0].conv1
    assert conv.weight_g.grad.abs().sum() > 0 and conv.weight_v.grad.abs().sum() > 0


def test_weight_norm_formula_and_official_init():
    conv = WeightNormConv2d(8, 16, 3)
    w = conv.weight()
    assert torch.allclose(w, conv.weight_v)  # g = ||v|| at creation
    with torch.no_grad():
        conv.weight_g.mul_(2.0)
    assert torch.allclose(conv.weight().flatten(1).norm(dim=1), conv.weight_g.flatten())
    torch.manual_seed(0)
    model = build_model(load_config("cifar10_small_official"))
    # released init_weights (docs/paper_vs_released.md#initialisation): plain convs N(0, 0.01); WN convs
    # kaiming-uniform, std 1/sqrt(3 fan_in)
    v = model.f.blocks[0].conv1.weight_v
    assert abs(v.std().item() - 1 / (3 * 24 * 9) ** 0.5) < 0.003
    assert abs(model.stem[0].weight.std().item() - 0.01) < 0.002
    assert abs(model.f.fusion.paths[0][1].conv.weight.std().item() - 0.01) < 0.002
    paper = build_model(load_config("cifar10_small_official", {"model.init": "paper"}))
    assert abs(paper.f.blocks[0].conv1.weight_v.std().item() - 0.01) < 0.002


def test_dropout_mask_is_shared_across_solver_iterations(monkeypatch):
    torch.manual_seed(0)
    p = 0.25
    model = build_model(_tiny(**{"model.dropout": p}))
    calls = _record_f_calls(model, monkeypatch)
    model(torch.randn(3, 3, 16, 16)).sum().backward()
    assert len(calls) == model.last_info.forward.nfe + 1
    first = calls[0]
    assert all(c is first for c in calls)  # one Prepared object for every evaluation in this forward
    for mask, c in zip(first.masks, model.cfg.num_channels):
        assert mask.shape == (3, c, 1, 1)
        kept = mask[mask != 0]
        assert torch.allclose(kept, torch.full_like(kept, 1.0 / (1.0 - p)))
    # a fresh forward draws fresh masks
    calls.clear()
    model(torch.randn(3, 3, 16, 16))
    assert not all(torch.equal(a, b) for a, b in zip(first.masks, calls[0].masks))


def test_dropout_masks_do_not_depend_on_autocast():
    """Under --amp the masks are the float32 run's (a bf16 draw would take another random stream)."""
    model = build_model(_tiny(**{"model.dropout": 0.25})).train()
    like = torch.zeros(4, 3, 16, 16)
    masks = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(7)
        masks.append(model.f.prepare(64, like.to(dtype)).masks)
    for a, b in zip(*masks):
        assert b.dtype == torch.bfloat16 and torch.equal(a != 0, b != 0)  # the same channels dropped
        torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=0)  # 1 / 0.75 rounded to bf16


def test_eval_mode_turns_dropout_off(monkeypatch):
    torch.manual_seed(0)
    model = build_model(_tiny(**{"model.dropout": 0.5})).eval()
    calls = _record_f_calls(model, monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert all(m is None for m in calls[0].masks)
    assert torch.equal(a, b)
    p0 = build_model(_tiny(**{"model.dropout": 0.0}))
    assert all(m is None for m in p0.f.prepare(2, x).masks)


def test_unrolled_mode_applies_f_exactly_k_times_from_zero(monkeypatch):
    torch.manual_seed(0)
    k = 3
    model = build_model(_tiny(**{"model.dropout": 0.0, "solver.unroll_steps": k}))
    model.deq.grad = "unrolled"
    calls = _record_f_calls(model, monkeypatch)
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert len(calls) == k and model.last_info.mode == "unrolled" and model.last_info.forward is None
    # by hand: k applications of f from z = 0 (same BN batch statistics, no dropout)
    inj = model.injection(model.stem(x))
    prepared = model.f.prepare(2, inj)
    z = [inj.new_zeros(2, c, 16 >> i, 16 >> i) for i, c in enumerate(model.cfg.num_channels)]
    for _ in range(k):
        z = model.f(z, inj, prepared)
    assert torch.allclose(out, model.head(z), atol=1e-6, rtol=1e-5)
    out.sum().backward()  # ordinary autograd through the stack
    assert model.f.blocks[2].conv2.weight_v.grad.abs().sum() > 0


def test_single_stream_is_one_block_without_fusion():
    model = build_model(load_config("cifar10_single_stream_paper", {"solver.max_iter": 4}))
    assert len(model.f.blocks) == 1 and model.f.fusion is None and model.f.post is None
    assert _num_wn_convs(model) == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.last_info.forward.scale_rel_trace.shape[0] == 1


def test_broyden_lowers_the_residual_at_init_cifar_small():
    """Untrained CIFAR MDEQ-small (released config), float32: the solve reduces ||f(z)-z||/||f(z)||."""
    torch.manual_seed(0)
    cfg = load_config("cifar10_small_official")
    model = build_model(cfg)
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    stats = model.last_info.forward
    assert stats.nfe == cfg.solver.max_iter + 1 and stats.stop_reason == "max_iter"  # abs eps never reached
    assert torch.allclose(stats.rel_trace[:, 0], torch.ones(4))  # z0 = 0: rel residual 1
    assert stats.rel_lowest.max() < 0.5
    assert (stats.lowest_step > 0).all()
    assert stats.scale_rel_trace.shape == (2, 4, stats.nfe)


def test_image_size_not_divisible_raises_with_the_rule():
    model = build_model(_tiny())  # 3 scales, no stem downsampling: divisor 4
    with pytest.raises(ValueError, match=r"not divisible by 2\^\(downsample_times \+ num_scales - 1\) = .* = 4; "
                                         r"nearest valid height: 28 or 32"):
        model(torch.randn(1, 3, 30, 32))
    big = load_config("imagenet_small_official")
    assert big.model.size_divisor == 32
    with torch.device("meta"):
        imagenet = build_model(big)
    with pytest.raises(ValueError, match="width 200 .* = 32; nearest valid width: 192 or 224"):
        imagenet.check_input(torch.empty(1, 3, 224, 200, device="meta"))


def test_wrong_channel_count_and_rank_raise():
    model = build_model(_tiny())
    with pytest.raises(ValueError, match="expected 3 input channels"):
        model(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expected an image batch of shape \(B, 3, H, W\)"):
        model(torch.randn(3, 16, 16))


def test_paper_config_backward_runs_to_its_cap_at_batch_128():
    """cifar10_small_paper at init, train mode, batch 128, batch-mean cross-entropy: the backward
    rule that stopped at u0 = 0 here (initial abs residual 8.4e-4 < 1e-3) now runs its T_b = 18,
    and f_theta and the stem get an implicit gradient. The forward runs its T_f = 15 too."""
    torch.manual_seed(0)
    cfg = load_config("cifar10_small_paper")
    model = build_model(cfg).train()
    model.deq.grad = "ift"
    model.deq.warn = False
    logits = model(torch.rand(128, 3, 32, 32))
    F.cross_entropy(logits, torch.randint(0, 10, (128,))).backward()
    fwd, bwd = model.last_info.forward, model.last_info.backward
    assert fwd.nstep == cfg.solver.max_iter and fwd.stop_reason == "max_iter"
    assert bwd.nstep == cfg.solver.backward_max_iter and bwd.stop_reason == "max_iter"
    assert (bwd.lowest_step >= 1).all()
    assert bwd.abs_trace[:, 0].max() < 1e-3  # the regime of the old bug: dL/dz* per sample below 1e-3
    implicit = [(n, p) for n, p in model.named_parameters() if n.startswith(("deq.", "stem.", "injection."))]
    assert len(implicit) > 20
    for name, p in implicit:
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no implicit gradient"


def _step_grads(cfg, x, y, *, channels_last, implicit, dtype):
    from mdeq.engine.build import build_criterion
    from mdeq.engine.step import set_phase
    torch.manual_seed(0)
    model = build_model(cfg).train().to(dtype)
    set_phase(model, cfg, cfg.train.pretrain_steps if implicit else 0)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(1)  # the same dropout masks
    loss = build_criterion(cfg)(model(x), y)
    loss.backward()
    z_fmt = model.last_info.forward
    return loss.detach(), [p.grad for p in model.parameters()], z_fmt


def _rel(a, b):
    return (torch.cat([(p - q.to(p.dtype)).flatten() for p, q in zip(a, b)]).norm()
            / torch.cat([p.flatten() for p in a]).norm()).item()


@pytest.mark.parametrize("implicit", [True, False])
def test_channels_last_step_equals_contiguous(implicit):
    """The engine feeds images channels_last on a CPU (faster oneDNN kernels). In float64 the loss and
    every parameter gradient of a training step equal the contiguous step's (both solves at their caps,
    the paper config); in float32 the channels_last step is no further from the float64 step than the
    contiguous float32 step is (at init both are about 1e-2 off: the step is ill-conditioned there)."""
    cfg = load_config("cifar10_small_paper", {"solver.tol": 1e-12, "model.dropout": 0.0,  # same masks in any dtype
                                              "data.image_size": [16, 16]})
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 16, 16, generator=g), torch.randint(0, 10, (3,), generator=g)
    runs = {(cl, dt): _step_grads(cfg, x, y, channels_last=cl, implicit=implicit, dtype=dt)
            for cl in (False, True) for dt in (torch.float64, torch.float32)}
    (l64, g64, _), (l64cl, g64cl, _) = runs[False, torch.float64], runs[True, torch.float64]
    torch.testing.assert_close(l64cl, l64, rtol=1e-12, atol=0)
    assert _rel(g64, g64cl) < 1e-9
    err_nchw, err_cl = _rel(g64, runs[False, torch.float32][1]), _rel(g64, runs[True, torch.float32][1])
    assert err_cl < 2 * err_nchw + 5e-3, (err_cl, err_nchw)
    torch.testing.assert_close(runs[True, torch.float32][0].double(), l64, rtol=1e-5, atol=0)
