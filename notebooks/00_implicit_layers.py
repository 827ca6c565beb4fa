# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Implicit layers: the fixed point, Broyden and the IFT gradient
#
# A deep equilibrium model has no stack of layers. It has one transformation $f_\theta(z; x)$ and defines
# its output as the fixed point $z^\star = f_\theta(z^\star; x)$: the limit of applying $f_\theta$ infinitely
# often (paper, Section 3.1). This page shows, on a small multiscale $f_\theta$, the three things the package
# does with it:
#
# 1. find $z^\star$ with a root solver (`mdeq.broyden`, against plain iteration `mdeq.fixed_point`);
# 2. differentiate through $z^\star$ with `mdeq.ImplicitLayer`, whose implicit-function-theorem (IFT)
#    gradient equals backpropagation through an unrolled solve run to convergence, while autograd holds the
#    activations of one $f_\theta$ instead of one per step;
# 3. look at the multiscale state scale by scale.
#
# The NeurIPS 2020 tutorial *Deep Implicit Layers* (Kolter, Duvenaud, Johnson; implicit-layers-tutorial.org)
# makes the same points with its own toy code; here every cell calls this package's API, so the page is
# also the package's tutorial. Section 4 says where each piece lives and which part of the paper it implements.
#
# **Profiles** (`profile` parameter): the page trains nothing and computes the same in `smoke`, `logs`
# and `full`, on the CPU, in about 10 s (up to 25 s with papermill's kernel start). Everything is float64,
# so the gradient errors below measure the methods, not float32 rounding. Every number is computed in the
# cell that shows it, and every claim the text makes is checked by an `assert` next to it: a wrong number
# stops the run instead of reaching the page.
#
# **Writes** the figures `implicit_layers_solvers` and `implicit_layers_per_scale` (`.png`, `.svg`) into
# `figures/` (`logs`, `full`) or `figures/smoke/` (`smoke`, in the ignored smoke outputs folder
# unless `output_root` is given); no table.

# %% tags=["parameters"]
profile: str = "logs"  # logs | smoke | full: this page computes the same in each
quick: bool = False  # accepted as by every notebook; no effect here (the page is quick already)
seed: int = 0  # seed of f's weights, the input and the loss
output_root: str = ""  # empty: the repository's figures/ (smoke: the ignored smoke outputs folder)

# %%
import time

import matplotlib.pyplot as plt
import pandas as pd
import torch
from IPython.display import display

import mdeq
from mdeq.paper import notebook, parameters
from mdeq.paper.measure import memory
from mdeq.paper.report import style
from mdeq.core.model import FTheta

params = parameters.check_parameters(globals(), "00_implicit_layers")
ctx = notebook.setup(params)
notebook.show_banner(ctx)
kind = "smoke" if ctx.profile == "smoke" else "real"  # which figures/ folder; what is computed is the same
# One thread: the toy problems on this page are tiny, and a second OpenMP thread on a busy 2-core CPU made
# them up to 190x slower (spin-waiting), never faster.
torch.set_num_threads(1)
started = time.perf_counter()

# %% [markdown]
# ## 1. A small multiscale $f_\theta$ and its fixed point
#
# `mdeq.core.model.FTheta` is the paper's $f_\theta$ (Section 3.2, Eq. (5) and Fig. 1): one residual block per
# scale, then the multiscale fusion that sums every scale into every other, then a 1x1 conv and GroupNorm
# per scale. The state is a **list** of tensors, one per resolution, here three scales of 4, 8 and 16
# channels at 16x16, 8x8 and 4x4. Only the highest resolution receives the input injection $x$ (in an MDEQ
# it comes from the stem; here it is random); the other scales learn about $x$ only through the fusion.
# `prepare` computes the weight-normalised weights once per forward call, as the model does.

# %%
torch.manual_seed(seed)
B, H, W = 2, 16, 16
f_theta = FTheta(num_channels=(4, 8, 16), expansion=2, num_groups=2, dropout=0.0).double().eval()
x = torch.randn(B, 4, H, W, dtype=torch.float64)  # (B, C_1, H, W): the injection, scale 1 only
z0 = [x.new_zeros(B, c, H >> i, W >> i) for i, c in enumerate(f_theta.num_channels)]  # z[0] = 0 at every scale
prepared = f_theta.prepare(B, x)
print("state shapes:", [tuple(t.shape) for t in z0])
print(f"parameters of f: {sum(p.numel() for p in f_theta.parameters()):,}")
_, at_init = mdeq.broyden(lambda z: f_theta(z, x, prepared), z0, max_iter=60, tol=1e-10, warn=False)
print("at random weights:", at_init.summary())
assert not at_init.all_converged and at_init.lowest.min() > 1e-3

# %% [markdown]
# At random weights the solve fails: after 60 f evaluations Broyden is still far from a fixed point (the
# residual above). Notebook `05_convergence` shows the same for the paper's models at
# their initial weights; training is what makes the real $f_\theta$ solvable. One reason is GroupNorm,
# which divides by $\sqrt{\mathrm{var} + \epsilon}$: with PyTorch's $\epsilon = 10^{-5}$ it scales any input to
# unit variance, so on the paths that start with a normalisation $f_\theta$ ignores how small $z$ is, and its
# Jacobian grows as $z$ shrinks. For a toy that trains nothing we change that one number: with
# $\epsilon = 0.75$ in every GroupNorm of $f_\theta$, a normalisation amplifies a change of its input at most
# $1/\sqrt{0.75} \approx 1.15$-fold, and plain iteration of $f_\theta$ converges (slowly), so that
# backpropagation through it has a limit to compare with below. Nothing else changes.

# %%
for norm in f_theta.modules():
    if isinstance(norm, torch.nn.GroupNorm):
        norm.eps = 0.75


def f(z):
    return f_theta(z, x, prepared)


# %% [markdown]
# Both solvers take the same arguments and return `(z, stats)`: `z` the list of tensors, `stats` a
# `mdeq.SolverStats` with the exact number of f evaluations (`nfe`), whether each sample converged, why the
# solve stopped, and the residual $\|f(z) - z\| / \|f(z)\|$ of every iterate, per sample and per scale.
# `mdeq.broyden` is the paper's limited-memory Broyden method (Appendix B.1): a quasi-Newton step on
# $g(z) = f(z) - z$ that keeps at most `memory` (default 18) low-rank updates of its inverse-Jacobian
# estimate. `mdeq.fixed_point` applies $f$ again and again, i.e. runs the weight-tied network of Eq. (1)
# deeper and deeper. Both stop when every sample's residual is below `tol`.

# %%
TOL = 1e-10
z_broyden, broyden_stats = mdeq.broyden(f, z0, max_iter=100, tol=TOL)
z_iterated, iterated_stats = mdeq.fixed_point(f, z0, max_iter=1000, tol=TOL)
for stats in (broyden_stats, iterated_stats):
    print(stats.summary())


def rel_diff(a, b):
    """||a - b|| / ||b|| over all scales and samples."""
    num = sum((s - t).square().sum() for s, t in zip(a, b))
    return (num / sum(t.square().sum() for t in b)).sqrt().item()


def evaluations_to(stats, level):
    """The first f evaluation at which every sample's residual is below ``level``."""
    below = (stats.rel_trace.max(0).values < level).nonzero()
    return int(below[0]) + 1 if len(below) else None


agree = rel_diff(z_broyden, z_iterated)
residual = rel_diff(f(z_broyden), z_broyden)
to_1e6 = {name: evaluations_to(stats, 1e-6) for name, stats in (("broyden", broyden_stats),
                                                                 ("fixed_point", iterated_stats))}
print(f"||z_broyden - z_iterated|| / ||z_iterated|| = {agree:.1e}; ||f(z*) - z*|| / ||z*|| = {residual:.1e}")
print(f"f evaluations to a residual of 1e-6: Broyden {to_1e6['broyden']}, iterating f {to_1e6['fixed_point']}; "
      f"to {TOL:g}: {broyden_stats.nfe} and {iterated_stats.nfe}")
assert broyden_stats.all_converged and iterated_stats.all_converged  # the same z*, found two ways
assert agree < 1e-8 and residual < 1e-9
assert to_1e6["broyden"] < to_1e6["fixed_point"]  # Broyden beats plain iteration

# %%
fig, ax = plt.subplots(figsize=(5.6, 3.5))
for stats, label, colour in ((broyden_stats, "mdeq.broyden", style.COLORS["broyden"]),
                             (iterated_stats, "mdeq.fixed_point (iterating f)", style.COLORS["fixed_point"])):
    trace = stats.rel_trace.mean(0)  # (nfe,): batch mean of ||f(z) - z|| / ||f(z)|| at each f evaluation
    ax.plot(range(1, len(trace) + 1), trace, color=colour, label=f"{label}: {stats.nfe} f evaluations")
ax.axhline(TOL, color="#777777", ls=":", lw=1, label=f"tol {TOL:g}")
ax.set_yscale("log")
ax.set_xlabel("number of f evaluations")
ax.set_ylabel("||f(z) - z|| / ||f(z)||")
ax.legend()
ax.set_title(style.figure_title("Forward solve of a 3-scale toy f", kind))
source = f"the solves on this page (seed {seed})"
_ = notebook.save_figure(fig, "implicit_layers_solvers", ctx, kind, source=source,
                         caption="Residual ||f(z) - z|| / ||f(z)|| (batch mean) against f evaluations of the forward "
                                 "solve of a toy 3-scale f (mdeq.core.model.FTheta, 4/8/16 channels at 16x16/8x8/4x4, "
                                 "GroupNorm eps 0.75, random weights and injection, batch 2, float64) by "
                                 "limited-memory Broyden (m = 18) and by iterating f, both from z = 0 to the same "
                                 "tolerance")

# %% [markdown]
# Both solvers land on the same $z^\star$, and Broyden needs fewer evaluations of $f$ (checked above at a
# residual of $10^{-6}$): iterating $f$ converges at the rate at which $f$ contracts, while Broyden's
# quasi-Newton steps build an estimate of the inverse Jacobian of $g$ as they go. This is why the paper
# solves with Broyden (Section 3.2); its Figs. 5-6 compare the two on the real models (notebook
# `05_convergence`).
#
# ## 2. The gradient through $z^\star$: four modes of `mdeq.ImplicitLayer`
#
# `mdeq.ImplicitLayer(func, solver=..., grad=...)` wraps $f$: `z, info = layer(z0, *args)` solves for
# $z^\star$ without building a graph, then returns $f(z^\star)$ carrying the gradient `grad` asks for:
#
# - `ift`: the exact gradient of Eq. (3). In the backward pass the layer solves the linear fixed point
#   $u = u\,J_f(z^\star) + \partial\ell/\partial z^\star$ (Eq. (4)) with the backward solver, from
#   vector-Jacobian products of the one $f(z^\star)$ call; the forward solve's iterations are never stored.
# - `unrolled`: ordinary backpropagation through `unroll_steps` applications of $f$ from $z^{[0]}$: the
#   weight-tied network of Eq. (1), as in the paper's warm-up (Appendix A, 5 steps). No solver.
# - `phantom` (damped steps from $z^\star$, differentiated) and `jfb` (one step from $z^\star$: Jacobian-free
#   backpropagation): cheaper approximations of the IFT gradient from later work, not from the paper.
#
# Every layer below solves forward and backward with Broyden to $10^{-12}$ unless its row says otherwise.
# The reference is plain PyTorch autograd, nothing of `mdeq.core.implicit`: $f$ applied `DEPTH` times from
# $z^{[0]} = 0$, far enough that the iterate has converged to float64 rounding, then `torch.autograd.grad`
# of a small loss $\ell = \sum_i \langle w_i, z_i \rangle$ (a fixed random probe $w_i$ at each scale) with
# respect to every parameter of $f$ and the injection $x$. Each mode's gradient is compared with it, and the
# bytes of the tensors autograd saves for the backward pass are counted while the layer runs
# (`mdeq.paper.measure.memory.saved_activations`, a `torch.autograd.graph.saved_tensors_hooks` that counts each
# storage once and leaves out the parameters, the prepared weights and the input).

# %%
theta = list(f_theta.parameters())
probe = [torch.randn_like(t) for t in z0]


def loss_of(z):
    return sum((w * t).sum() for w, t in zip(probe, z))


def gradient(run):
    """Run ``run(x, prepared)`` (-> z, or (z, info)) on a fresh graph.

    Returns d loss / d (theta, x) as one vector, the bytes autograd saved meanwhile, and run's output.
    """
    xg = x.detach().clone().requires_grad_()
    prep = f_theta.prepare(B, xg)
    weights = [w for pair in prep.block_weights for w in pair] + list(prep.post_weights)
    with memory.saved_activations(exclude=theta + weights + [xg]) as saved:
        out = run(xg, prep)
    z = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(loss_of(z), theta + [xg])
    return torch.cat([g.flatten() for g in grads]), saved["bytes"], out


def unrolled_autograd(depth):
    def run(xg, prep):
        z = z0
        for _ in range(depth):
            z = f_theta(z, xg, prep)
        return z
    return run


DEPTH = 3 * iterated_stats.nfe  # three times the iterations that reach 1e-10
reference, reference_bytes, z_deep = gradient(unrolled_autograd(DEPTH))
deep_residual = rel_diff(f(z_deep), z_deep)
print(f"reference: {DEPTH} applications of f; at the last one ||f(z) - z|| / ||z|| = {deep_residual:.1e}")
assert deep_residual < 1e-13


# %%
def implicit_layer(grad, **options):
    settings = dict(solver="broyden", max_iter=100, tol=1e-12, backward_max_iter=100, backward_tol=1e-12)
    return mdeq.ImplicitLayer(f_theta, grad=grad, **{**settings, **options})


UNROLL_DEPTHS = (1, 5, 20, 80)
layers = {"ift": implicit_layer("ift"), "ift, forward tol 1e-4": implicit_layer("ift", tol=1e-4),
          "phantom (5 steps, damping 0.5)": implicit_layer("phantom"), "jfb": implicit_layer("jfb"),
          **{f"unrolled, depth {k}": implicit_layer("unrolled", unroll_steps=k) for k in UNROLL_DEPTHS}}
rows, infos = [], {}
for name, layer in layers.items():
    grad, saved_bytes, (z, info) = gradient(lambda xg, prep: layer(z0, xg, prep))
    infos[name] = info
    rows.append({"gradient": name, "forward f evaluations": info.nfe_forward,
                 "backward VJPs": info.backward.nfe if info.backward is not None else 0,
                 "saved for backward (KiB)": saved_bytes / 1024,
                 "relative error": ((grad - reference).norm() / reference.norm()).item()})
rows.append({"gradient": f"reference: unrolled autograd, {DEPTH} steps", "forward f evaluations": DEPTH,
             "backward VJPs": 0, "saved for backward (KiB)": reference_bytes / 1024, "relative error": 0.0})
table = pd.DataFrame(rows).set_index("gradient")
one_f = table.loc["unrolled, depth 1", "saved for backward (KiB)"]
table.insert(3, "saved / one f", table["saved for backward (KiB)"] / one_f)
display(table.style.format({"saved for backward (KiB)": "{:.1f}", "saved / one f": "{:.2f}",
                            "relative error": "{:.1e}"}))

# %% [markdown]
# What the table shows, each line checked in the cell below:
#
# - **IFT is exact and holds one $f$.** Its gradient equals the converged unrolled one to the solvers'
#   float64 tolerance, while autograd holds exactly the activations of one application of $f$, however many
#   iterations the forward solve took: the paper's O(1) memory in depth (Section 3.1; Section 4.4 and
#   Fig. 4b measure it on the real models, notebook `03_runtime_memory`). With a loose forward solve
#   (`tol=1e-4`, fewer iterations) the memory is the same, but the gradient is exact only at an exact
#   $z^\star$: it is off by far more than the IFT's at $10^{-12}$.
# - **Unrolling** converges to the same gradient only with depth, and holds one $f$'s activations per step.
# - **phantom** and **jfb** hold a few steps of $f$ but are approximations: their error does not vanish at a
#   converged $z^\star$.
#
# Broyden's own buffers (the `memory` updates of its inverse-Jacobian estimate) are not held by autograd:
# they live only during a solve, and their size is bounded by `memory`, not by the number of iterations.

# %%
err, saved = table["relative error"], table["saved / one f"]
unrolled = [f"unrolled, depth {k}" for k in UNROLL_DEPTHS]
assert err["ift"] < 1e-9 and infos["ift"].backward.all_converged
assert saved["ift"] == saved["ift, forward tol 1e-4"] == 1.0  # one f, however deep the forward solve
assert infos["ift, forward tol 1e-4"].nfe_forward < infos["ift"].nfe_forward
assert err["ift, forward tol 1e-4"] > 1e3 * err["ift"]
assert all(a > b for a, b in zip(err[unrolled], err[unrolled][1:])), "unrolled errors must fall with depth"
assert all(saved[name] == k for name, k in zip(unrolled, UNROLL_DEPTHS)), "one f per unrolled step"
assert err["jfb"] > 1e-2 and err["phantom (5 steps, damping 0.5)"] > 1e-2  # approximations, even at z*
assert saved["jfb"] == 1.0 and saved["phantom (5 steps, damping 0.5)"] == 5.0
print(f"IFT: relative error {err['ift']:.1e}, autograd holds {saved['ift']:.0f} f; "
      f"unrolled to depth {UNROLL_DEPTHS[-1]}: error {err[unrolled[-1]]:.1e}, {saved[unrolled[-1]]:.0f} f; "
      f"reference ({DEPTH} steps): {saved.iloc[-1]:.0f} f")
print(f"Broyden's buffers (m = {infos['ift'].forward.extra['memory']}): "
      f"{infos['ift'].forward.extra['history_bytes'] / 1024:.0f} KiB in the forward solve, "
      f"{infos['ift'].backward.extra['history_bytes'] / 1024:.0f} KiB in the backward one")

# %% [markdown]
# ## 3. The multiscale state: per-scale residuals of the solve
#
# The solvers update the list $[z_1, z_2, z_3]$ as one unknown (Section 3.2: the scales are "not a
# concatenation" but are solved for simultaneously), and `stats.scale_rel_trace` keeps the residual of each
# scale, $\|f_i(z) - z_i\| / \|f_i(z)\|$. Appendix B.2 and Fig. 7 of the paper plot this for a trained
# CIFAR-10 MDEQ (notebook `05_convergence` measures it) and find that all scales converge together. Here the
# same view of the two solves of Section 1.

# %%
channels = f_theta.num_channels
fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.5), sharey=True)
reached = {}
for ax, stats, title in zip(axes, (broyden_stats, iterated_stats), ("mdeq.broyden", "mdeq.fixed_point")):
    per_scale = stats.scale_rel_trace.max(1).values  # (scales, nfe): the worst sample of the batch
    for i, trace in enumerate(per_scale):
        ax.plot(range(1, len(trace) + 1), trace, color=style.SCALE_COLORS[i],
                label=f"scale {i + 1}: {channels[i]} channels, {H >> i}x{W >> i}")
        below = (trace < 1e-6).nonzero()
        reached[(title, f"scale {i + 1}")] = int(below[0]) + 1 if len(below) else None
    ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("number of f evaluations")
axes[0].set_ylabel("per scale: ||f_i(z) - z_i|| / ||f_i(z)||", fontsize=8)
axes[0].legend()
fig.suptitle(style.figure_title("Per-scale residuals of the forward solve (toy 3-scale f)", kind))
fig.tight_layout()
notebook.save_figure(fig, "implicit_layers_per_scale", ctx, kind, source=source,
                     caption="Per-scale residual ||f_i(z) - z_i|| / ||f_i(z)|| (worst sample of the batch) of the "
                             "two forward solves of the first figure, Broyden (left) and iterating f (right); "
                             "scale 1 is the highest resolution, the only one that receives the input")
reached = pd.Series(reached).unstack()
reached.index.name, reached.columns.name = "solver", "f evaluations to 1e-6"
display(reached)
assert reached.notna().all().all()
assert (reached.max(axis=1) <= 1.25 * reached.min(axis=1)).all()  # no scale lags: they converge together
assert all(stats.scale_rel_trace[:, :, -1].max() < 1e-9 for stats in (broyden_stats, iterated_stats))

# %% [markdown]
# Every scale reaches $10^{-6}$ within a quarter of the f evaluations of the others, under both solvers:
# the fusion drives the three streams to equilibrium together, and the scales that never see $x$ are not
# behind the one that does. (The paper also finds that its trained model's lower resolutions converge
# faster; this toy at random weights is not meant to show that.)
#
# ## 4. Where each piece lives
#
# | piece | in the package | paper |
# | --- | --- | --- |
# | $f_\theta$: residual block per scale, multiscale fusion, post-fusion conv + GroupNorm | `mdeq.core.model.FTheta` (`ResidualBlock`, `MultiscaleFusion`); `FTheta.prepare`: weight norm and variational-dropout masks once per forward | Section 3.2, Eq. (5), Figs. 1-2; Section 3.3 (GroupNorm, variational dropout) |
# | the whole model: stem, injection, solve, heads | `mdeq.MDEQ`, `mdeq.build_model(mdeq.load_config(...))`, `mdeq/configs/*.yaml` | Section 3.2, Figs. 1 and 3; Appendix A, Table 4 |
# | root solvers over a list state, `SolverStats` | `mdeq.broyden` (limited memory: `memory` = m), `mdeq.fixed_point`, `mdeq.anderson`, `mdeq.SOLVERS` (`mdeq/core/solvers.py`, `broyden.py`, `anderson.py`; `SolverStats` in `solver_common.py`) | Section 3.1, Eq. (2); Section 3.2, "(Limited-memory) multiscale equilibrium solver"; Appendix B.1, Eqs. (6)-(8) |
# | the implicit layer and its IFT backward | `mdeq.ImplicitLayer(grad="ift")`, `info.forward`, `info.backward` (`mdeq/core/implicit.py`) | Section 3.1, Eqs. (3)-(4) |
# | unrolled weight-tied warm-up | `ImplicitLayer(grad="unrolled", unroll_steps=5)`; the training engine switches `model.deq.grad` to `"ift"` after it | Eq. (1); Appendix A (5-layer weight-tied warm-up) |
# | phantom and JFB gradients | `ImplicitLayer(grad="phantom")`, `ImplicitLayer(grad="jfb")` | not in the paper |
# | memory held by autograd; convergence traces | `mdeq.paper.measure.memory.saved_activations`; `mdeq.paper.measure.solver_traces.convergence_traces` | Section 4.4, Fig. 4b (notebook `03_runtime_memory`); Section 4.5, Appendix B.2, Figs. 5-7 (notebook `05_convergence`) |
#
# The notebooks that follow use these pieces at the paper's scale: `01_cifar10` trains MDEQ-small with
# them (Table 1), `05_convergence` traces Broyden and iterating f on the paper's models (Figs. 5-7).

# %%
print(f"this page computed in {time.perf_counter() - started:.1f} s on {torch.get_num_threads()} CPU thread(s)")
