"""Table 1 baselines: sizes against the paper, the logits contract, gradients, NFE counting."""
import pytest
import torch

from mdeq.engine.baselines import BASELINES, ResNet, build_baseline, default_width, resnet18
from mdeq.engine.baselines.resnet import BasicBlock

# Paper sizes (Table 1; ResNet-101 from torchvision's 44.5M less its 1000-class head).
TARGETS = {"resnet18_170k": 170e3, "resnet18_10m": 10e6, "resnet101": 42.5e6,
           "node_172k": 172e3, "anode_172k": 172e3}
EXACT = {"resnet18_170k": 176_402, "resnet18_10m": 10_151_691, "resnet101": 42_512_970,
         "node_172k": 173_611, "anode_172k": 172_452}
STUDY = {"resnet14_170k": 175_258}  # the recipe study's three-stage CIFAR ResNet (16/32/64), not a paper row


def _count(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parameter_counts(name):
    n = _count(build_baseline(name))
    assert n == EXACT[name]
    assert abs(n - TARGETS[name]) / TARGETS[name] < 0.05


def test_three_stage_resnet_for_the_recipe_study():
    model = build_baseline("resnet14_170k")
    assert _count(model) == STUDY["resnet14_170k"] and len(model.stages) == 3
    assert [stage[0].conv1.out_channels for stage in model.stages] == [16, 32, 64]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="one or more positive block counts"):
        ResNet(BasicBlock, (), width=8)


@pytest.mark.parametrize("name,width", [("resnet18_170k", 8), ("resnet18_10m", 61), ("node_172k", 125),
                                        ("anode_172k", 64)])
def test_width_option_defaults_to_the_paper_size(name, width):
    assert default_width(name) == width
    assert _count(build_baseline(name, width=width)) == EXACT[name]
    assert _count(build_baseline(name, width=width // 2)) < 0.9 * EXACT[name]


def test_unknown_baseline_option_is_one_line():
    with pytest.raises(ValueError, match=r"baseline 'anode_172k': .*got an unexpected keyword argument 'filters'"):
        build_baseline("anode_172k", filters=3)


def test_resnet18_width_knob_and_standard_size():
    assert _count(resnet18(64)) == 11_173_962  # the usual CIFAR ResNet-18
    assert _count(resnet18(16)) < _count(resnet18(32))


@pytest.mark.parametrize("name", ["resnet18_170k", "resnet101", "node_172k", "anode_172k"])
def test_logits_and_every_parameter_gets_a_gradient(name):
    model = build_baseline(name)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 7])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_node_counts_function_evaluations():
    model = build_baseline("anode_172k")
    model(torch.randn(2, 3, 32, 32))
    nfe = model.nfe_forward
    assert nfe >= 8 and (nfe - 2) % 6 == 0  # dopri5: 2 initial evaluations, then 6 per step (FSAL)
    fixed = build_baseline("node_172k", method="rk4", options={"step_size": 0.25})
    fixed(torch.randn(1, 3, 32, 32))
    assert fixed.nfe_forward == 16  # 4 steps of rk4 (3/8 rule), 4 evaluations each


def test_adjoint_counts_backward_evaluations():
    model = build_baseline("node_172k", adjoint=True, rtol=1e-2, atol=1e-2)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert model.nfe_forward > 0 and model.nfe_backward > 0
    assert all(p.grad is not None for p in model.parameters())


def test_tolerance_changes_the_work_done():
    x = torch.randn(1, 3, 32, 32)
    loose = build_baseline("node_172k", rtol=1e-1, atol=1e-1)
    tight = build_baseline("node_172k", rtol=1e-6, atol=1e-6)
    tight.load_state_dict(loose.state_dict())
    with torch.no_grad():
        loose(x), tight(x)
    assert tight.nfe_forward > loose.nfe_forward


def test_errors_list_the_valid_choices():
    with pytest.raises(ValueError) as info:
        build_baseline("resnet50")
    for name in BASELINES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="dopri5"):
        build_baseline("node_172k", method="rk45")(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        build_baseline("anode_172k")(torch.randn(1, 3, 28, 28))
