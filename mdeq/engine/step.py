"""What one optimiser step is made of: its phase, its objective and the solver statistics it reports.

Why apart from the loop: ``train_step`` (``mdeq.engine.loop``) is three lines of forward, backward and
update; what decides those lines (unrolled warm-up or implicit solve, the stabilisers' extra terms, which
tensors the backward reaches) is here, where benchmarks and tests can call each piece alone.
"""
from __future__ import annotations

import torch
from torch import nn

from mdeq.core.config import ExperimentConfig, TrainConfig
from mdeq.core.heads import upsample_logits
from mdeq.engine.checkpoint import unwrap_model
from mdeq.engine.data import IGNORE_INDEX
from mdeq.engine.metrics import topk_correct
from mdeq.engine.options import TrainState

__all__ = ["set_phase", "phase_at", "solver_stats", "jacobian_weight", "jacobian_draw", "request_jacobian",
           "training_objective", "batch_accuracy", "gradient_inputs"]


def set_phase(model: nn.Module, cfg: ExperimentConfig, global_step: int) -> str:
    """Choose the gradient mode for the step about to run: "unrolled" during the warm-up, else "implicit".

    Returns "none" for models without an implicit layer (the baselines).
    """
    core = unwrap_model(model)
    phase = phase_at(core, cfg, global_step)
    if phase != "none":
        core.deq.grad = "unrolled" if phase == "unrolled" else cfg.solver.grad
    return phase



def phase_at(core: nn.Module, cfg: ExperimentConfig, global_step: int) -> str:
    if getattr(core, "deq", None) is None:
        return "none"
    return "unrolled" if global_step < cfg.train.pretrain_steps else "implicit"



def solver_stats(core: nn.Module) -> dict[str, float]:
    """NFE and residuals of the last forward (and backward, once it ran), as plain numbers."""
    out: dict[str, float] = {}
    info = getattr(core, "last_info", None)
    if info is not None:
        out["nfe_forward"] = float(info.nfe_forward)
        fwd = info.forward
        if fwd is not None:
            out["rel_residual_forward"] = float(fwd.rel_lowest.float().mean())
            out["abs_residual_forward"] = float(fwd.abs_lowest.float().mean())
            out["converged_forward"] = float(fwd.converged.float().mean())
        elif info.unrolled_rel_residual is not None:
            out["rel_residual_forward"] = float(info.unrolled_rel_residual.float().mean())
        bwd = info.backward
        if bwd is not None:
            out["nfe_backward"] = float(bwd.nfe)
            out["rel_residual_backward"] = float(bwd.rel_lowest.float().mean())
            out["converged_backward"] = float(bwd.converged.float().mean())
        if info.jacobian_loss is not None:  # the Jacobian penalty was computed in this call
            out["jac_reg_loss"] = float(info.jacobian_loss.detach())
    elif hasattr(core, "nfe_forward"):  # the Neural ODE baselines
        out["nfe_forward"] = float(core.nfe_forward)
        nfe_b = getattr(core, "nfe_backward", None)
        if nfe_b is not None:
            out["nfe_backward"] = float(nfe_b)
    return out



def jacobian_weight(t: TrainConfig, global_step: int, epoch: int) -> float:
    """The Jacobian penalty's weight at optimiser step ``global_step`` of epoch ``epoch`` (0: not applied).

    As locuslab/deq ``MDEQ-Vision/lib/core/cls_function.py``: ``jac_reg_pretrain_weight`` during the unrolled
    warm-up; after it 0 from epoch ``jac_reg_stop_epoch`` on, else ``jac_reg_weight`` plus ``jac_reg_step`` for
    every ``jac_reg_step_every`` steps since the warm-up ended.
    """
    deq_steps = global_step - t.pretrain_steps
    if deq_steps < 0:
        return t.jac_reg_pretrain_weight
    if t.jac_reg_stop_epoch is not None and epoch >= t.jac_reg_stop_epoch:
        return 0.0
    ramps = deq_steps // t.jac_reg_step_every if t.jac_reg_step_every else 0
    return t.jac_reg_weight + t.jac_reg_step * ramps



def jacobian_draw(t: TrainConfig, global_step: int) -> tuple[bool, int]:
    """Whether the Jacobian penalty is drawn for step ``global_step`` (probability ``jac_reg_freq``), and the
    seed of its probes.

    Why a generator of its own, seeded by (``train.seed``, step): the released code draws from the global
    stream, so turning the penalty on would change every later dropout mask and data order; here those stay
    as in a run without it, a resumed run draws the same, and every DDP process draws the same.
    """
    g = torch.Generator().manual_seed((t.seed * 1_000_003 + global_step) % (2 ** 63))
    applied = float(torch.rand((), generator=g)) < t.jac_reg_freq
    return applied, int(torch.randint(0, 2 ** 62, (), generator=g))



def request_jacobian(core: nn.Module, t: TrainConfig, state: TrainState) -> float:
    """Ask the implicit layer for the Jacobian penalty in the coming step if the schedule and the draw say so;
    returns its weight (0: not this step). The layer's request is cleared after the step."""
    if not t.jac_reg or getattr(core, "deq", None) is None:
        return 0.0
    weight = jacobian_weight(t, state.global_step, state.epoch)
    applied, seed = jacobian_draw(t, state.global_step)
    if not (applied and weight > 0):
        return 0.0
    core.deq.jacobian_probes, core.deq.jacobian_seed = t.jac_reg_probes, seed
    return weight



def training_objective(core: nn.Module, criterion: nn.Module, loss: torch.Tensor, targets: torch.Tensor, *,
                       jac_weight: float = 0.0, correction_gamma: float = 0.8) -> torch.Tensor:
    """What a step backpropagates: ``loss`` (the task loss at the returned state) plus, when they are on,
    fixed-point correction's losses at earlier solver states and the weighted Jacobian penalty.

    With n supervised states the k-th of the n - 1 earlier ones (earliest first, ``core.last_correction_logits``)
    weighs ``correction_gamma ** (n - 1 - k)`` and z* weighs 1: torchdeq ``loss/correction.py``'s 'exp'
    weighting, as DEQ flow uses it. The Jacobian term is added only when this step's forward computed it
    (``core.last_info.jacobian_loss``). With both off this returns ``loss`` itself.
    """
    objective = loss
    extra = getattr(core, "last_correction_logits", None)
    if extra:
        n = len(extra) + 1
        for k, logits in enumerate(extra):
            objective = objective + correction_gamma ** (n - 1 - k) * criterion(logits, targets)
    info = getattr(core, "last_info", None)
    if jac_weight > 0 and info is not None and info.jacobian_loss is not None:
        objective = objective + jac_weight * info.jacobian_loss
    return objective



def batch_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy (%) of a batch, or pixel accuracy (%) over non-ignored pixels for segmentation."""
    with torch.no_grad():
        if target.dim() == 1:
            return 100.0 * topk_correct(logits, target, (1,))[0] / max(1, target.numel())
        pred = upsample_logits(logits, target.shape[-2:]).argmax(1)
        valid = target != IGNORE_INDEX
        return 100.0 * float((pred.eq(target) & valid).sum()) / max(1, int(valid.sum()))



def gradient_inputs(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors a training step's backward must reach: the optimiser's parameters that require grad.

    Why not every leaf: the IFT layer's f(z*) call takes z* as a leaf that requires grad (its VJPs
    need it), so a plain ``backward()`` also computes dL/dz* through f, one conv input-gradient per
    scale, and throws it away. Naming the inputs prunes that branch (``benchmarks/final_backward.py``);
    the parameter gradients are the same bits.
    """
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
