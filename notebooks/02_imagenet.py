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
# # ImageNet: Table 2
#
# **Paper item:** the MDEQ rows of Table 2 (top-1 and top-5 accuracy and size of MDEQ-small,
# MDEQ-large, MDEQ-XL, and the unrolled 5-layer MDEQ-large); the paper's other rows (ResNets,
# HRNet, DenseNet, ...) are reference models and are listed in `results/paper_numbers.yaml` only.
#
# **Profiles** (`profile` parameter):
# - `smoke`: the four models with widths / 8, solver budgets 6, 64 x 64 crops, a few steps on
#   CPU on a synthetic ImageNet copy (10 classes); writes under the ignored
#   `runs/notebooks/smoke_outputs/` (the committed copy: `--update-committed`).
#   A smoke run, **not a reproduction**.
# - `full`: the paper's protocol on GPUs: `imagenet_small_<variant>`, `imagenet_large_<variant>`
#   (`variant` = `paper`, Appendix Table 4: SGD 0.05 Nesterov, 100 epochs, batch 128; or `official`),
#   the same large model trained as a weight-tied 5-layer stack (`solver.grad=unrolled`,
#   `solver.unroll_steps=5`), and `imagenet_xl_official` (the XL model has no Table 4 column). Real data
#   under `<data_root>/imagenet/` (ImageFolder layout). Logs go to `results/runs/<run>/`; the
#   checkpoints in `runs/full/` initialise the Cityscapes models of `04_cityscapes`.
# - `logs` (default): redraws from the real runs' logs in `results/runs/`, computing nothing.
#
# **Writes** `results/table_2_imagenet.csv` and `figures/imagenet_top1_per_epoch.{png,svg}`
# (smoke: under `runs/notebooks/smoke_outputs/`).

# %% tags=["parameters"]
profile: str = "logs"  # logs | smoke | full
quick: bool = False  # smoke only: fewer steps (tests)
seed: int = 0  # smoke: the training seed
data_root: str = ""  # full: folder holding imagenet/ (empty: data/)
output_root: str = ""  # empty: the repository's results/ and figures/
variant: str = "paper"  # full: paper (Appendix Table 4) | official (released configs)
nproc: int = 0  # full: GPUs per run (0: all visible)
dry_run: bool = False  # full: print the training commands, launch nothing

# %%
from mdeq.paper import notebook, parameters, runs
from mdeq.paper.report import plots, tables
from mdeq.engine import paths

params = parameters.check_parameters(globals(), "02_imagenet")
ctx = notebook.setup(params)
notebook.show_banner(ctx)

# %% [markdown]
# ## Train (smoke and full profiles)

# %%
notebook.train(ctx)

# %% [markdown]
# ## Table 2: paper vs ours

# %%
for kind in ctx.kinds():
    table = tables.paper_table(ctx, kind, "table2")
    csv = notebook.save_table(table, "table_2_imagenet", ctx, kind)
    notebook.display_table(tables.show_table(table, kind, csv), csv, ctx)

# %% [markdown]
# ## Validation top-1 accuracy per epoch (not a figure of the paper)

# %%
for kind in ctx.kinds():
    fig = plots.plot_training_curves(ctx, kind, runs.runs_for("02_imagenet"), column="eval_top1", ylabel="val top-1 accuracy (%)",
                                      title="ImageNet validation top-1 per epoch")
    notebook.save_figure(fig, "imagenet_top1_per_epoch", ctx, kind,
                       caption="Validation top-1 accuracy of the Table 2 MDEQs per training epoch",
                       source=f"{paths.rel(ctx.logs_dir(kind))}/imagenet_*/metrics.csv")
