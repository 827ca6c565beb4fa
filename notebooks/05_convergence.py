# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
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
# - `smoke` (default): shrunken models (widths / 8, CIFAR / 2) at their initial weights on synthetic
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
# - `logs`: redraws from `results/convergence_traces.json` (and the committed smoke traces).
#
# **Writes** `results/table_fig5_convergence.csv` and `figures/fig5_convergence_forward`,
# `fig5_convergence_backward`, `fig7_per_scale_convergence` (`.png`, `.svg`).

# %% tags=["parameters"]
profile: str = "smoke"  # smoke | logs | full
quick: bool = False  # smoke only: smaller budgets and batches (tests)
seed: int = 0  # seed of the initial weights and of the batch selection
data_root: str = ""  # full: folder holding cifar10/, imagenet/, cityscapes/ (empty: data/)
output_root: str = ""  # empty: the repository's results/ and figures/
variant: str = "paper"  # full: paper (Appendix Table 4) | official (released configs)
dry_run: bool = False  # full: say what would be measured, measure nothing
num_batches: int = 5  # batches per curve (the paper's 5)
device: str = "auto"  # auto | cpu | cuda; full with auto needs a GPU

# %%
from IPython.display import display

from mdeq import notebook, paths, report

params = notebook.check_parameters(globals(), "05_convergence")
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
    fig = report.plot_convergence(traces, kind, direction="forward")
    notebook.save_figure(fig, "fig5_convergence_forward", ctx, kind, source=source,
                       caption="Forward solve: the paper's ||z[i+1] - z[i]|| / ||z[i]|| (top) and the residual "
                               "||f(z) - z|| / ||f(z)|| (bottom) vs f evaluations, Broyden (blue) and plain "
                               "iteration of f (yellow), mean and std over batches; each panel names its model, "
                               "input size and batch, each legend entry its weights; a curve ends with an x where a "
                               "batch's solve diverged (its residual grew 1e6-fold) and stopped")
    fig = report.plot_convergence(traces, kind, direction="backward")
    notebook.save_figure(fig, "fig5_convergence_backward", ctx, kind, source=source,
                       caption="Backward (IFT) solve, with the forward's solver: the paper's measure (top) and "
                               "the residual (bottom) vs evaluations of the vector-Jacobian product, mean and "
                               "std over batches; an x marks where a batch's solve diverged and stopped")
    table = report.convergence_table(ctx, kind, traces)
    csv = notebook.save_table(table, "table_fig5_convergence", ctx, kind)
    display(report.show_table(table, kind, csv))

# %% [markdown]
# ## Fig. 7: per-scale convergence, MDEQ vs single-stream DEQ (CIFAR-10)

# %%
for kind in ctx.kinds():
    traces = ctx.read(kind, notebook.CONVERGENCE_TRACES)
    fig = report.plot_per_scale(traces, kind)
    source = paths.rel(ctx.inputs_dir(kind) / notebook.CONVERGENCE_TRACES)
    notebook.save_figure(fig, "fig7_per_scale_convergence", ctx, kind, source=source,
                       caption="Per scale, the paper's ||z_s[i+1] - z_s[i]|| / ||z_s[i]|| (left) and the residual "
                               "(right) of the Broyden forward solve of the CIFAR-10 MDEQ-small (scale 1 is the "
                               "highest resolution) and of the single-stream DEQ; the legend gives the weights")
