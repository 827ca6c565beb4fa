"""How the implicit (deep equilibrium) layer works: solve z* = f(z*, x) and attach a gradient.

Why a module of its own: the model (``model.py``) only says what f is; how the fixed point is
found and how gradients flow through it is chosen here, by name, and can change on a live model
(the paper's weight-tied warm-up switches from ``unrolled`` to ``ift`` mid-training, Appendix A).

Gradient modes (``grad``):
- ``ift``: the exact implicit-function-theorem gradient. The forward solve runs without a graph;
  one extra f(z*) call is taken with a graph, and its incoming gradient G is replaced by the root
  u of u = u J_f(z*) + G, found by a backward solver from vector-Jacobian products. No activation
  of the forward solve is stored (the paper's O(1) memory in depth).
- ``phantom``: k damped steps z <- (1 - tau) z + tau f(z) from z*, differentiated by autograd.
- ``jfb``: one step f(z*) (Jacobian-free backprop: the inverse Jacobian is replaced by I).
- ``unrolled``: f applied ``unroll_steps`` times from z0 with ordinary autograd (no solver).

Which path runs depends only on ``torch.is_grad_enabled()`` and on whether the f(z*) output needs
a gradient, never on ``module.training`` (torchdeq issue #4), so input gradients work in eval mode.
``module.training`` only picks the iteration budget (train vs eval ``max_iter`` / ``tol``).

Stabilisers of the authors' later code, all off by default (``mdeq.core.stability``, docs/training_stability.md):
- ``correction_states`` = n > 1, fixed-point correction (Bai et al., "Deep Equilibrium Optical Flow
  Estimation", CVPR 2022; torchdeq ``n_states``): in a call with grad, the inputs of n - 1 evaluations of f
  spread evenly over the forward solve are kept, and each is returned in ``info.correction`` after
  ``correction_steps`` damped steps z <- (1 - t) z + t f(z) (t = ``correction_damping``) with a graph: a
  phantom (one-step for 1 step, t = 1) gradient. A caller supervises them beside the output.
- ``jacobian_probes`` = k > 0 on a call with grad: ``info.jacobian_loss`` is the Hutchinson estimate of
  ||J_f(z*)||_F^2 / numel(z*) from k probes, with a graph (Jacobian regularisation, locuslab/deq
  ``MDEQ-Vision/lib/models/mdeq_core.py``). In ``ift`` mode it reuses the f(z*) call; otherwise it takes one
  more f evaluation at the detached state. Its probes come from a generator seeded ``jacobian_seed`` (None:
  the global stream).
- ``spectral_radius_iters`` = k > 0: ``info.spectral_radius`` is the (B,) power-method estimate of the
  spectral radius of J_f(z*) after k VJPs, in any call that solves (also under no_grad: evaluation). Its
  start vector comes from a fixed-seed generator, so the global random stream does not move.
The three are attributes that may be set between calls, as the engine does per step and per evaluation.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.profiler import record_function

from mdeq.core.solver_common import STOP_MODES, SolverStats
from mdeq.core.solvers import SOLVERS
from mdeq.core.stability import jacobian_frobenius, power_method

__all__ = ["ImplicitLayer", "DEQInfo", "GRAD_MODES", "correction_indices"]

GRAD_MODES = ("ift", "phantom", "jfb", "unrolled")


@dataclass
class DEQInfo:
    """What one call of an ImplicitLayer did.

    forward: stats of the forward solve (None in ``unrolled`` mode).
    backward: stats of the IFT backward solve; filled in when ``.backward()`` reaches the layer.
    unrolled_rel_residual: (B,) ||f(z_k) - z_k|| / ||f(z_k)|| of the last unrolled step, measured
    with one more f call under no_grad only when ``measure_unrolled`` is on (else None).
    jacobian_loss: scalar Hutchinson estimate of ||J_f||_F^2 / numel(z) at the returned state, with a graph
    (only with ``jacobian_probes`` > 0 and grad enabled; else None).
    spectral_radius: (B,) power-method estimate of rho(J_f(z*)) on the CPU (``spectral_radius_iters`` > 0).
    correction: fixed-point correction's states, earliest first, each a list of (B, C_i, H_i, W_i) with a
    phantom gradient (a tensor for a single-tensor state); None unless ``correction_states`` > 1 and grad.
    """

    mode: str
    forward: SolverStats | None = None
    backward: SolverStats | None = None
    nfe_forward: int = 0
    unrolled_rel_residual: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)
    jacobian_loss: torch.Tensor | None = None
    spectral_radius: torch.Tensor | None = None
    correction: list | None = None


def _resolve_solver(solver) -> Callable:
    if callable(solver):
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)} or pass a callable "
                         f"with the signature solver(f, z0, *, max_iter, tol, stop_mode, **options)")
    return SOLVERS[solver]


class ImplicitLayer(nn.Module):
    """Find z* = func(z*, *args) for a list state and return it with a chosen gradient.

    ``func(z_list, *args)`` maps a list of (B, C_i, H_i, W_i) tensors to a list of the same
    shapes. Call as ``z, info = layer(z0, *args)``. With grad enabled the output is func(z*, *args)
    (one extra application carrying the gradient, as the released code does in training); without
    grad it is z*. ``layer.grad`` may be reassigned at any time.
    """

    def __init__(self, func: nn.Module | Callable, *, solver="broyden", max_iter: int = 30,
                 tol: float = 1e-3, stop_mode: str = "rel", solver_options: dict | None = None,
                 eval_max_iter: int | None = None, eval_tol: float | None = None, grad: str = "ift",
                 backward_solver="broyden", backward_max_iter: int = 30, backward_tol: float = 1e-6,
                 backward_stop_mode: str = "rel", backward_options: dict | None = None, phantom_steps: int = 5,
                 phantom_damping: float = 0.5, unroll_steps: int = 5, warn: bool = True,
                 measure_unrolled: bool = False, compile_forward: bool = False, correction_states: int = 1,
                 correction_steps: int = 1, correction_damping: float = 1.0, jacobian_probes: int = 0,
                 jacobian_seed: int | None = None, spectral_radius_iters: int = 0):
        super().__init__()
        self.func = func
        self.solver = _resolve_solver(solver)
        self.backward_solver = _resolve_solver(backward_solver)
        self.solver_options = dict(solver_options or {})
        self.backward_options = dict(backward_options or {})
        _check_options(self.solver, self.solver_options, "solver_options")
        _check_options(self.backward_solver, self.backward_options, "backward_options")
        self.max_iter, self.tol, self.stop_mode = max_iter, tol, stop_mode
        self.eval_max_iter = max_iter if eval_max_iter is None else eval_max_iter
        self.eval_tol = tol if eval_tol is None else eval_tol
        self.backward_max_iter, self.backward_tol = backward_max_iter, backward_tol
        if backward_stop_mode not in STOP_MODES:
            raise ValueError(f"backward_stop_mode must be one of {STOP_MODES}, got {backward_stop_mode!r}")
        self.backward_stop_mode = backward_stop_mode
        if phantom_steps < 1 or unroll_steps < 1:
            raise ValueError("phantom_steps and unroll_steps must be >= 1")
        if not 0 < phantom_damping <= 1:
            raise ValueError(f"phantom_damping must be in (0, 1], got {phantom_damping!r}")
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.unroll_steps = unroll_steps
        if correction_states < 1 or correction_steps < 1:
            raise ValueError("correction_states and correction_steps must be >= 1")
        if not 0 < correction_damping <= 1:
            raise ValueError(f"correction_damping must be in (0, 1], got {correction_damping!r}")
        if jacobian_probes < 0 or spectral_radius_iters < 0:
            raise ValueError("jacobian_probes and spectral_radius_iters must be >= 0 (0: off)")
        self.correction_states, self.correction_steps = correction_states, correction_steps
        self.correction_damping = correction_damping
        self.jacobian_probes, self.jacobian_seed = jacobian_probes, jacobian_seed
        self.spectral_radius_iters = spectral_radius_iters
        self.warn = warn
        self.measure_unrolled = measure_unrolled
        self.compile_forward = compile_forward
        self._compiled = {}  # the torch.compile'd func of the forward solve (a plain dict: not a submodule)
        self.grad = grad

    @property
    def grad(self) -> str:
        return self._grad

    @grad.setter
    def grad(self, mode: str) -> None:
        if mode not in GRAD_MODES:
            raise ValueError(f"unknown gradient mode {mode!r}; choose one of {GRAD_MODES}")
        self._grad = mode

    def extra_repr(self) -> str:
        return (f"grad={self._grad}, solver={self.solver.__name__}, max_iter={self.max_iter}, "
                f"tol={self.tol:g}, stop_mode={self.stop_mode}, backward={self.backward_solver.__name__}"
                f"(max_iter={self.backward_max_iter}, tol={self.backward_tol:g}, "
                f"stop_mode={self.backward_stop_mode})")

    def forward(self, z0, *args):
        single = isinstance(z0, torch.Tensor)
        z0 = [z0] if single else list(z0)
        f = (lambda z: _as_list(self.func(z, *args)))
        if self._grad == "unrolled":
            z, info = self._unrolled(f, z0)
        else:
            z, info = self._implicit(f, z0, args)
        if single and info.correction is not None:
            info.correction = [s[0] for s in info.correction]
        return (z[0] if single else z), info

    # ------------------------------------------------------------------------------------------
    def _unrolled(self, f, z0):
        z = z0
        for _ in range(self.unroll_steps):
            z = f(z)
        info = DEQInfo(mode="unrolled", nfe_forward=self.unroll_steps)
        if self.measure_unrolled:
            with torch.no_grad():
                fz = f([t.detach() for t in z])
                num = sum((a - b).flatten(1).square().sum(1) for a, b in zip(fz, z)).sqrt()
                den = sum(a.flatten(1).square().sum(1) for a in fz).sqrt() + 1e-9
                info.unrolled_rel_residual = (num / den).float().cpu()
        if self.jacobian_probes and torch.is_grad_enabled():  # at the last unrolled state, one more f
            info.jacobian_loss = self._jacobian(f, z)
        return z, info

    def _jacobian(self, f, z, f_z=None):
        """The Hutchinson penalty at state z; without ``f_z`` (f(z) computed from z) one more f call at z detached."""
        if f_z is None:
            z = [t.detach().requires_grad_() for t in z]
            with record_function("mdeq::jacobian_f"):
                f_z = f(z)
        with record_function("mdeq::jacobian_reg"):
            return jacobian_frobenius(f_z, z, probes=self.jacobian_probes,
                                      generator=_generator(self.jacobian_seed, z[0].device))

    def _spectral_radius(self, f, z_star):
        """(B,) power-method estimate at z*: one f call with a graph and ``spectral_radius_iters`` VJPs."""
        with torch.enable_grad(), record_function("mdeq::spectral_radius"):
            z = [t.detach().requires_grad_() for t in z_star]
            _, radius = power_method(f(z), z, iters=self.spectral_radius_iters, generator=_generator(0, z[0].device))
        return radius.float().cpu()

    def _solve(self, f, z0, args, max_iter, tol, watch=None):
        """The forward solve, with the torch.compile'd func when ``compile_forward`` is on.

        Why only here: the no-grad solve is where f runs most (T_f times a step) and where inductor's
        fused kernels can pay; in a first CPU measurement the compiled f's graph-building call and its
        VJP were not faster, so f(z*) and the backward stay eager. A compiler that fails on its first use
        (no C++ compiler, an unsupported torch) warns once and the layer goes on eagerly.
        """
        watched = (lambda g: g) if watch is None else watch.wrap  # noqa: E731
        run = lambda g: self.solver(watched(_labelled(g, "mdeq::forward_f")), z0, max_iter=max_iter,  # noqa: E731
                                    tol=tol, stop_mode=self.stop_mode, **self.solver_options)
        if not self.compile_forward or self._compiled.get("failed"):
            return run(f)
        compiled = self._compiled.get("func")
        if compiled is None:
            compiled = self._compiled["func"] = torch.compile(self.func, dynamic=False)
        try:
            out = run(lambda z: _as_list(compiled(z, *args)))
        except Exception as exc:  # noqa: BLE001 - only before the first compiled solve has succeeded
            if self._compiled.get("ok"):
                raise
            self._compiled["failed"] = True
            warnings.warn(f"torch.compile of f failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          f"the forward solve runs eagerly", RuntimeWarning, stacklevel=3)
            return run(f)
        self._compiled["ok"] = True
        return out

    def _implicit(self, f, z0, args):
        max_iter = self.max_iter if self.training else self.eval_max_iter
        tol = self.tol if self.training else self.eval_tol
        grad = torch.is_grad_enabled()
        watch = _Trajectory(correction_indices(max_iter, self.correction_states)[:-1]) \
            if grad and self.correction_states > 1 else None
        with torch.no_grad(), record_function("mdeq::forward_solve"):
            z_star, stats = self._solve(f, [t.detach() for t in z0], args, max_iter, tol, watch)
        info = DEQInfo(mode=self._grad, forward=stats, nfe_forward=stats.nfe)
        if self.spectral_radius_iters:
            info.spectral_radius = self._spectral_radius(f, z_star)
        if not grad:
            return z_star, info
        if watch is not None:
            with record_function("mdeq::correction"):
                info.correction = [_damped_steps(f, s, self.correction_steps, self.correction_damping)
                                   for s in watch.states(z_star)]
        jacobian = bool(self.jacobian_probes)
        if self._grad == "ift":
            z_star = [t.detach().requires_grad_() for t in z_star]
            with record_function("mdeq::f_star"):
                z_new = f(z_star)
            if jacobian:
                info.jacobian_loss = self._jacobian(f, z_star, z_new)
            if not any(t.requires_grad for t in z_new):
                return [t.detach() for t in z_new], info
            backward = _IFTBackward(self, z_star, z_new, info)
            return list(_AttachBackward.apply(backward, *z_new)), info
        if jacobian:
            info.jacobian_loss = self._jacobian(f, z_star)
        if self._grad == "jfb":
            return f([t.detach() for t in z_star]), info
        return _damped_steps(f, z_star, self.phantom_steps, self.phantom_damping), info  # phantom


def correction_indices(max_iter: int, states: int) -> list[int]:
    """The solver steps whose states fixed-point correction supervises, earliest first; the last is ``max_iter``.

    ``states`` (at most ``max_iter``) spread evenly, as torchdeq ``core.py`` ``_compute_f_iter`` spreads
    ``n_states``: step k is the input of the solver's (k + 1)-th evaluation of f, i.e. the iterate after k
    updates. The last entry stands for the returned z*, which carries the layer's own gradient.
    """
    n = max(1, min(states, max_iter))
    delta = max_iter // n
    if max_iter % n == 0:
        return [(k + 1) * delta for k in range(n)]
    return [max_iter - (n - k - 1) * delta for k in range(n)]


class _Trajectory:
    """Copies of the states at which the forward solve evaluates f, at chosen evaluation indices.

    A state the solve did not reach (it stopped at ``tol`` before) is replaced by the returned z*.
    """

    def __init__(self, steps: list[int]):
        self.steps, self.calls, self.kept = list(steps), 0, {}

    def wrap(self, g):
        def watched(z):
            if self.calls in self.steps:
                self.kept[self.calls] = [t.clone() for t in z]  # the solver may reuse the buffer behind z
            self.calls += 1
            return g(z)
        return watched

    def states(self, z_star) -> list[list[torch.Tensor]]:
        return [self.kept.get(k, z_star) for k in self.steps]


def _damped_steps(f, z, steps: int, tau: float):
    """``steps`` of z <- (1 - tau) z + tau f(z) from z detached, with a graph (phantom gradient; JFB at 1, 1)."""
    z = [t.detach() for t in z]
    for _ in range(steps):
        fz = f(z)
        z = fz if tau == 1.0 else [(1 - tau) * a + tau * b for a, b in zip(z, fz)]
    return z


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded ``seed``, or None (the global stream) for None."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _labelled(fn, name):
    """fn inside a profiler range: ``benchmarks/train_step_profile.py`` splits a step by these names."""
    def wrapped(z):
        with record_function(name):
            return fn(z)
    return wrapped


def _as_list(out):
    return [out] if isinstance(out, torch.Tensor) else list(out)


def _check_options(solver, options, what):
    valid = getattr(solver, "options", None)
    if valid is None:
        return
    reserved = {"max_iter", "tol", "stop_mode"}
    bad = [k for k in options if k not in valid or k in reserved]
    if bad:
        allowed = [k for k in valid if k not in reserved]
        raise TypeError(f"{what} has unknown key(s) {bad} for {solver.__name__}; valid keys: {allowed} "
                        f"(max_iter, tol and stop_mode are set on the layer itself)")


class _IFTBackward:
    """Solves u = u J_f(z*) + G with the layer's backward solver, from VJPs of the f(z*) graph.

    The stopping rule must not depend on the scale of G: under a batch-mean loss G shrinks as 1/B
    and as the loss falls, so an absolute per-sample tolerance stops at u0 = 0 (no gradient) at the
    paper's batch of 128. The default is ``backward_stop_mode="rel"`` (||h(u) - u|| / ||h(u)|| per
    sample, where h(u) = u J + G) with ``backward_tol=1e-6``: at float32 rounding, so in training the
    solve runs to ``backward_max_iter`` as the released code's eps = 2e-10 sqrt(B D) does. u0 = 0 is
    never returned (``exclude_initial``), so the worst case is u1 = G, the JFB gradient.
    """

    def __init__(self, layer, z_star, z_new, info):
        self.layer, self.z_star, self.z_new, self.info = layer, z_star, z_new, info

    def __call__(self, grads):
        layer = self.layer
        # Under autocast f(z*) may be bf16/fp16; the backward solve still runs in (at least) float32.
        out_dtypes = [z.dtype for z in self.z_new]
        G = [torch.zeros_like(z, dtype=_solve_dtype(z)) if g is None else g.to(_solve_dtype(g))
             for g, z in zip(grads, self.z_new)]

        first = [layer.backward_solver in SOLVERS.values()]  # ours evaluate h at u0 first

        def h(u):
            if first[0]:  # u0 = 0: h(0) = G exactly, without a VJP of zeros
                first[0] = False
                return [g.clone() for g in G]
            with record_function("mdeq::backward_vjp"):
                vjp = torch.autograd.grad(self.z_new, self.z_star, [a.to(d) for a, d in zip(u, out_dtypes)],
                                          retain_graph=True, allow_unused=True)
            return [g if v is None else v.to(g.dtype) + g for v, g in zip(vjp, G)]

        options = dict(layer.backward_options)
        if "exclude_initial" in getattr(layer.backward_solver, "options", ()):
            options.setdefault("exclude_initial", True)
        with record_function("mdeq::backward_solve"):
            u, stats = layer.backward_solver(h, [torch.zeros_like(g) for g in G],
                                             max_iter=layer.backward_max_iter, tol=layer.backward_tol,
                                             stop_mode=layer.backward_stop_mode, **options)
        self.info.backward = stats
        if layer.warn and not stats.all_converged:
            warnings.warn("IFT backward solve did not converge: " + stats.summary()
                          + (f" ({stats.message})" if stats.message else ""), RuntimeWarning, stacklevel=2)
        return [t.detach().to(d) for t, d in zip(u, out_dtypes)]


def _solve_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half-precision tensors, the tensor's own dtype otherwise."""
    return torch.promote_types(t.dtype, torch.float32)


class _AttachBackward(torch.autograd.Function):
    """Identity in the forward; in the backward, maps the incoming gradient G to the IFT root u."""

    @staticmethod
    def forward(ctx, backward, *z_new):
        ctx.ift_backward = backward
        return tuple(z.view_as(z) for z in z_new)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, *ctx.ift_backward(list(grads)))
