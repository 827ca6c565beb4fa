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
# # Convergence to equilibrium: Figs. 5-7
#
# **Paper item:** Fig. 5 (= Appendix Fig. 6): MDEQ's convergence to equilibrium as a function of the
# number of f evaluations, for limited-memory Broyden (blue) and plain iteration of f (yellow), at
# CIFAR-10, ImageNet and Cityscapes resolution, mean and std over 5 batches; the same for the backward
# (IFT) solve; and Fig. 7: the per-scale convergence of the CIFAR-10 MDEQ against the single-stream DEQ.
#
# **Measures.** Top rows: the paper's `||z[i+1] - z[i]|| / ||z[i]||` per sample (the relative change of
# the iterate; `trace_steps=True` of `mdeq.broyden` / `mdeq.fixed_point`, `stats.step_trace`, undefined
# at the first step from z[0] = 0). Bottom rows: the residual `||f(z) - z|| / ||f(z)||` (`stats.rel_trace`).
# Both are averaged over the batch; every solve runs its whole budget (tolerance 1e-12); the backward
# solve uses the forward's solver, and Broyden keeps the config's history size m.
#
# **Profiles** (`profile` parameter):
# - `smoke`: shrunken models (widths / 8, CIFAR / 2) at their initial weights on synthetic
#   data (ImageNet 64 x 64, Cityscapes 128 x 256), 40 f evaluations (quick: 15); writes
#   `runs/notebooks/smoke_outputs/` (the committed copy: `--update-committed`). A smoke run, **not a reproduction**.
# - `full`: the small MDEQ of each task (`cifar10_small_<variant>`, `imagenet_small_<variant>`,
#   `cityscapes_small_<variant>`; the paper does not say which size its figure shows) at 32 x 32,
#   224 x 224 and 1024 x 2048, batches of 32, 4 and 1, budgets of 50, 120 and 150; Fig. 7 with
#   `cifar10_small_<variant>` and `cifar10_single_stream_paper`. The initial weights always, and the
#   trained ones where a checkpoint exists (`runs/full/<run>/` of notebooks 01, 02 and 04, or the CPU
#   campaign's `results/runs/<run>/`), on validation batches of the real data under `data_root`.
#   Writes `results/convergence_traces.json`. On a CPU, `benchmarks/fig5_convergence.py` runs the same
#   measurement in resumable chunks (and with CIFAR-10 test images resized as stand-in inputs where the
#   ImageNet or Cityscapes data is absent, labelled so).
# - `logs` (default): redraws from `results/convergence_traces.json` (the real traces only).
#
# **Writes** `results/table_fig5_convergence.csv` and `figures/fig5_convergence_forward`,
# `fig5_convergence_backward`, `fig7_per_scale_convergence` (`.png`, `.svg`); for our two measurements
# beyond the paper (last sections) `results/table_accuracy_vs_budget.csv`,
# `results/table_convergence_vs_resolution.csv`, `figures/accuracy_vs_solver_budget` and
# `figures/convergence_vs_resolution`.

# %% tags=["parameters"]
profile: str = "logs"  # logs | smoke | full
quick: bool = False  # smoke only: smaller budgets and batches (tests)
seed: int = 0  # seed of the initial weights and of the batch selection
data_root: str = ""  # full: folder holding cifar10/, imagenet/, cityscapes/ (empty: data/)
output_root: str = ""  # empty: the repository's results/ and figures/
variant: str = "paper"  # full: paper (Appendix Table 4) | official (released configs)
dry_run: bool = False  # full: say what would be measured, measure nothing
num_batches: int = 5  # batches per curve (the paper's 5)
device: str = "auto"  # auto | cpu | cuda; full with auto needs a GPU

# %%
from mdeq.paper import notebook, parameters
from mdeq.paper.report import beyond, beyond_tables, plots, tables
from mdeq.engine import paths

params = parameters.check_parameters(globals(), "05_convergence")
ctx = notebook.setup(params)
notebook.show_banner(ctx)

# %% [markdown]
# ## Solve (smoke and full profiles)

# %%
notebook.convergence(ctx)

# %% [markdown]
# ## Figs. 5/6: forward and backward convergence at three resolutions

# %%
for kind in ctx.kinds():
    traces = ctx.read(kind, notebook.CONVERGENCE_TRACES)
    source = paths.rel(ctx.inputs_dir(kind) / notebook.CONVERGENCE_TRACES)
    fig = plots.plot_convergence(traces, kind, direction="forward")
    notebook.save_figure(fig, "fig5_convergence_forward", ctx, kind, source=source,
                       caption="Forward solve: the paper's ||z[i+1] - z[i]|| / ||z[i]|| (top) and the residual "
                               "||f(z) - z|| / ||f(z)|| (bottom) vs f evaluations, Broyden (blue) and plain "
                               "iteration of f (yellow), mean and std over batches; each panel names its model, "
                               "input size and batch, each legend entry its weights; a curve ends with an x where a "
                               "batch's solve diverged (its residual grew 1e6-fold) and stopped")
    fig = plots.plot_convergence(traces, kind, direction="backward")
    notebook.save_figure(fig, "fig5_convergence_backward", ctx, kind, source=source,
                       caption="Backward (IFT) solve, with the forward's solver: the paper's measure (top) and "
                               "the residual (bottom) vs evaluations of the vector-Jacobian product, mean and "
                               "std over batches; an x marks where a batch's solve diverged and stopped")
    table = tables.convergence_table(ctx, kind, traces)
    csv = notebook.save_table(table, "table_fig5_convergence", ctx, kind)
    notebook.display_table(tables.show_table(table, kind, csv), csv, ctx)

# %% [markdown]
# ## Fig. 7: per-scale convergence, MDEQ vs single-stream DEQ (CIFAR-10)

# %%
for kind in ctx.kinds():
    traces = ctx.read(kind, notebook.CONVERGENCE_TRACES)
    fig = plots.plot_per_scale(traces, kind)
    source = paths.rel(ctx.inputs_dir(kind) / notebook.CONVERGENCE_TRACES)
    notebook.save_figure(fig, "fig7_per_scale_convergence", ctx, kind, source=source,
                       caption="Per scale, the paper's ||z_s[i+1] - z_s[i]|| / ||z_s[i]|| (left) and the residual "
                               "(right) of the Broyden forward solve of the CIFAR-10 MDEQ-small (scale 1 is the "
                               "highest resolution) and of the single-stream DEQ; the legend gives the weights")

# %% [markdown]
# ## Beyond the paper, with trained weights (our measurements, not the paper's)
#
# The two sections below are ours: the paper has neither. Both use Table 1's MDEQ-small as the CPU campaign
# trained it (the latest committed checkpoint; the weights are named in each figure) and run every solve to
# its whole budget. Smoke profile: the shrunken MDEQ-small at its initial weights on synthetic images (the
# pipeline, not a result). Logs profile: `results/accuracy_vs_budget.json` (`studies/accuracy_vs_budget.py`)
# and `results/convergence_vs_resolution.json` (`studies/convergence_vs_resolution.py`).

# %%
notebook.trained_inference(ctx)

# %% [markdown]
# ### How much of the accuracy needs the equilibrium?
#
# The paper's claim is that MDEQ computes its representation as a fixed point z* = f(z*, x) ("infinite
# depth"); its reviewers asked whether that matters, and in locuslab/deq issue 28 a user reports that on
# CIFAR-10 one fixed-point iteration is about as accurate as 15 Broyden steps. Here the trained model is
# evaluated on the whole CIFAR-10 test set with its forward solve stopped after max_iter = k steps
# (k + 1 evaluations of f; the solver returns each image's lowest-residual iterate, so k = 0 is z = 0 and
# every image gets the same class), for Broyden and for plain iteration of f, beside the residual
# ||f(z) - z|| / ||f(z)|| those iterates have. The model was trained and is evaluated with Broyden at
# T_f = 15. If accuracy at k = 1 or 2 were close to accuracy at T_f, the equilibrium would add little at
# inference; if it rises with k while the residual falls, and stays flat once the residual is small,
# the accuracy is the fixed point's. "injection alone" feeds the head the input injection with every other
# scale at zero, with no f at all. The summary under the figure is computed from the JSON.

# %%
for kind in ctx.kinds():
    measured = ctx.read(kind, notebook.ACCURACY_VS_BUDGET)
    source = paths.rel(ctx.inputs_dir(kind) / notebook.ACCURACY_VS_BUDGET)
    fig = beyond.plot_accuracy_vs_budget(measured, kind)
    notebook.save_figure(fig, "accuracy_vs_solver_budget", ctx, kind, source=source,
                       caption="Ours, beyond the paper: test top-1 (left) and the mean relative residual of the "
                               "returned iterate (right) of MDEQ-small when its forward solve stops after max_iter "
                               "= k steps, Broyden (blue) and iterating f (yellow); dashed: the budget it was "
                               "trained and is evaluated with (T_f); dotted: the head on the injection alone")
    table = beyond_tables.budget_table(ctx, kind, measured)
    csv = notebook.save_table(table, "table_accuracy_vs_budget", ctx, kind)
    print(beyond_tables.budget_summary(measured))
    notebook.display_table(tables.show_table(table, kind, csv), csv, ctx)

# %% [markdown]
# **What it says about the paper's claim** (read with the numbers printed above, which come from the JSON).
# One application of f (k = 1: z = f(0), the same for both solvers, since Broyden's first step is f's) is
# far from the trained model's accuracy, and so is the injection alone: the representation this MDEQ
# classifies is not one layer deep, and the observation of locuslab/deq issue 28 does not carry over to it
# (that user may have trained with a one-step solver; this model was trained with 15 Broyden steps and the
# IFT gradient). Accuracy stops rising after a handful of Broyden steps, while the relative residual is
# still of order 0.1; the steps from there to T_f bring the residual down by orders of magnitude and change
# the class of only a few percent of the images. Plain iteration of f never gets its residual far below 0.3
# (the spectral radius of f's Jacobian at the fixed point is above 1, and grows over training:
# docs/cpu_campaign.md), and its accuracy stays several points under Broyden's, a gap that grew from
# the checkpoint of epoch 23 to that of epoch 35. So what the accuracy needs is the first few quasi-Newton
# steps towards the equilibrium, not the equilibrium to full precision: the fixed point is what training
# solves for (its gradient is exact only there), and at inference a looser Broyden solve costs little
# accuracy for this model; iterating f is no substitute for the solver.

# %% [markdown]
# ### Does convergence slow down with the input size? (our extension of Figs. 5-6)
#
# The paper's Figs. 5-6 and Appendix B.2 say that larger images need more Broyden steps: information must
# cross a larger image through f's small receptive field. Our Fig. 5 panels at ImageNet and Cityscapes
# sizes can only use initial weights, where nothing converges. The CIFAR-10 MDEQ-small has no downsampling
# stem and is fully convolutional, so its trained weights can be solved at any size: per size, each image
# is solved alone, and the f evaluations until the paper's ||z[i+1] - z[i]|| / ||z[i]|| first falls below
# 1e-2 and 1e-3 are counted, Broyden (with the training's m) against iterating f, on CIFAR-10 test images
# upsampled and on natural photographs resized. The model never saw an image larger than 32 x 32, so
# this asks how its f behaves on larger inputs, not how a model trained at that size would.

# %%
for kind in ctx.kinds():
    measured = ctx.read(kind, notebook.CONVERGENCE_VS_RESOLUTION)
    source = paths.rel(ctx.inputs_dir(kind) / notebook.CONVERGENCE_VS_RESOLUTION)
    fig = beyond.plot_convergence_vs_resolution(measured, kind)
    notebook.save_figure(fig, "convergence_vs_resolution", ctx, kind, source=source,
                       caption="Our extension of Figs. 5-6, not in the paper: f evaluations until the paper's "
                               "||z[i+1] - z[i]|| / ||z[i]|| falls below 1e-2 (solid, circles) and 1e-3 (dashed, "
                               "squares) against the input side, for the trained CIFAR-10 MDEQ-small, Broyden (blue) "
                               "and iterating f (yellow), median over images with bars from the fewest to the most; "
                               "a hollow marker on the dotted budget line: the median image did not get there")
    table = beyond_tables.resolution_table(ctx, kind, measured)
    csv = notebook.save_table(table, "table_convergence_vs_resolution", ctx, kind)
    notebook.display_table(tables.show_table(table, kind, csv), csv, ctx)

# %% [markdown]
# **What it shows.** On natural photographs, Broyden needs a few more f evaluations as the image grows
# (the table gives the counts per size): the direction of the paper's receptive-field argument, though
# much milder than the paper's CIFAR-10 vs Cityscapes contrast, which compares different models. Upsampled
# CIFAR-10 images are another matter: blown up, they are large smooth areas unlike anything the model saw,
# and at the larger sizes its f stops being contractive there, so that neither solver reaches 1e-2 within
# the budget. Plain iteration of f does not reach 1e-2 at any size, as at 32 x 32 in Fig. 5. What slows
# convergence here is less the number of pixels than how far the input is from the training images.
