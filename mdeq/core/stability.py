"""How close is f to losing its fixed point: the Jacobian J_f(z*) estimated from vector-Jacobian products.

Why a module: a DEQ whose equilibrium gets harder to reach as training goes on (locuslab/deq issues 20 and
26) has a Jacobian J = df/dz at z* whose spectral radius creeps towards 1. Two estimates answer it without
forming J (D x D per sample): the power method for the spectral radius rho(J), a monitor, and Hutchinson's
estimate of ||J||_F^2, the differentiable penalty of Jacobian regularisation (Bai, Koltun, Kolter,
"Stabilizing Equilibrium Models by Jacobian Regularization", ICML 2021). Both follow locuslab/deq
``lib/jacobian.py`` (``jac_loss_estimate``, ``power_method``), here over a list state (one tensor per
scale, as the solvers take it) and with an explicit ``generator``, so a caller can draw probes without
moving the global random stream that the dropout masks come from. This module imports only torch.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["gaussian_probe", "jacobian_frobenius", "power_method"]


def _as_list(z) -> list[torch.Tensor]:
    return [z] if isinstance(z, torch.Tensor) else list(z)


def _check(f_z: list[torch.Tensor], z: list[torch.Tensor], what: str) -> None:
    if len(f_z) != len(z) or not z:
        raise ValueError(f"{what}: f(z) has {len(f_z)} tensors and z has {len(z)}; one per scale in both")
    for i, (a, b) in enumerate(zip(f_z, z)):
        if a.shape != b.shape:
            raise ValueError(f"{what}: scale {i} of f(z) has shape {tuple(a.shape)}, z {tuple(b.shape)}")
        if b.shape[0] != z[0].shape[0]:
            raise ValueError(f"{what}: every scale needs the same batch size, got {[t.shape[0] for t in z]}")
    if not all(t.requires_grad for t in z):
        raise ValueError(f"{what}: z must require grad and f(z) must be computed from it with grad enabled")


def _per_sample_norm(vs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) Euclidean norm over every scale of each sample."""
    return sum(v.flatten(1).square().sum(1) for v in vs).sqrt()


def _broadcast(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.view(-1, *([1] * (like.dim() - 1)))


def gaussian_probe(z: torch.Tensor | Sequence[torch.Tensor],
                   generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One N(0, I) vector shaped like the list state ``z`` (a list of (B, C_i, H_i, W_i)).

    Drawn as one (B, D) tensor in ``z``'s dtype and device, split per sample in scale order, so it is the
    draw torchdeq's ``jac_reg`` makes for the same state flattened as (B, D) (``torch.randn(B, D)``).
    """
    z = _as_list(z)
    sizes = [t[0].numel() for t in z]
    flat = torch.randn(z[0].shape[0], sum(sizes), generator=generator, dtype=z[0].dtype, device=z[0].device)
    return [part.reshape(t.shape) for part, t in zip(flat.split(sizes, dim=1), z)]


def jacobian_frobenius(f_z, z, *, probes: int = 2, generator: torch.Generator | None = None,
                       create_graph: bool = True) -> torch.Tensor:
    """Hutchinson's estimate of ||J||_F^2 / numel(z), J = d f(z) / dz, from ``probes`` Gaussian probes.

    ``f_z`` is f(z) computed with grad from ``z`` (tensors or lists of (B, C_i, H_i, W_i)); J is the
    Jacobian of the whole batch, block-diagonal over samples when f treats them independently, so the value
    is the batch mean of ||J_b||_F^2 / D. E ||v^T J||^2 = tr(J J^T) = ||J||_F^2 for v ~ N(0, I); each probe
    costs one VJP, taken with ``create_graph`` so that the estimate can be trained on (it then
    differentiates to the parameters of f and to z). The graph of ``f_z`` is kept for later backwards.
    Returns a scalar in at least float32. As locuslab/deq ``lib/jacobian.py`` ``jac_loss_estimate``.
    """
    f_z, z = _as_list(f_z), _as_list(z)
    _check(f_z, z, "jacobian_frobenius")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    dtype = torch.promote_types(z[0].dtype, torch.float32)
    total = None
    for _ in range(probes):
        v = gaussian_probe(z, generator)
        vjp = torch.autograd.grad(f_z, z, [a.to(o.dtype) for a, o in zip(v, f_z)], retain_graph=True,
                                  create_graph=create_graph, allow_unused=True)
        sq = sum(g.to(dtype).square().sum() for g in vjp if g is not None)
        total = sq if total is None else total + sq
    if not torch.is_tensor(total):  # f does not depend on z at all
        total = z[0].new_zeros((), dtype=dtype)
    return total / (probes * sum(t.numel() for t in z))


def power_method(f_z, z, *, iters: int = 150, generator: torch.Generator | None = None
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The spectral radius of J = d f(z) / dz per sample: (unit eigenvector as a list, (B,) |lambda_max|).

    Iterates v <- v^T J / ||v^T J|| per sample from a Gaussian start (VJPs, so it runs on J^T, which has the
    same eigenvalues) and returns ||v^T J|| for the last unit v. This converges to |lambda_max| at the rate
    |lambda_2 / lambda_1| when the largest eigenvalue in modulus is real and alone; for a complex pair on
    top it oscillates around it. locuslab/deq ``lib/jacobian.py`` returns |v^T J v| (the Rayleigh quotient)
    instead, which has the same limit. The estimates are detached; f's graph is kept.
    """
    f_z, z = _as_list(f_z), _as_list(z)
    _check(f_z, z, "power_method")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    tiny = torch.finfo(z[0].dtype).tiny
    v = gaussian_probe(z, generator)
    norm = _per_sample_norm(v).clamp_min(tiny)
    v = [a / _broadcast(norm, a) for a in v]
    radius = norm.new_zeros(norm.shape)
    for _ in range(iters):
        vjp = torch.autograd.grad(f_z, z, [a.to(o.dtype) for a, o in zip(v, f_z)], retain_graph=True,
                                  allow_unused=True)
        vjp = [torch.zeros_like(a) if g is None else g.to(a.dtype) for g, a in zip(vjp, v)]
        radius = _per_sample_norm(vjp)
        v = [g / _broadcast(radius.clamp_min(tiny), g) for g in vjp]
    return [a.detach() for a in v], radius.detach()
