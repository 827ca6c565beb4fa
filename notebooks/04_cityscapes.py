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
# # Cityscapes: Table 3 and Fig. 8
#
# **Paper item:** the MDEQ rows of Table 3 (Cityscapes val mIoU and size of MDEQ-small, -large and
# -XL; the paper's other rows are reference models, listed in `results/paper_numbers.yaml` only) and
# Fig. 8 (input, MDEQ-large prediction and ground truth in the Cityscapes palette).
#
# **Profiles** (`profile` parameter):
# - `smoke`: the three models with widths / 8 and solver budgets 6, trained from scratch
#   for a few steps on CPU on 64 x 128 crops of a synthetic Cityscapes copy (128 x 256 images,
#   evaluated whole); writes under the ignored
#   `runs/notebooks/smoke_outputs/` (the committed copy: `--update-committed`). A smoke run, **not a reproduction**.
# - `full`: the paper's protocol on GPUs: `cityscapes_small_<variant>`, `cityscapes_large_<variant>`
#   (`variant` = `paper`, Appendix Table 4: SGD 0.01, 480 epochs, batch 12, 1024 x 512 crops, full
#   2048 x 1024 evaluation; or `official`) and `cityscapes_xl_official`, each initialised from the
#   ImageNet model of the same size trained by `02_imagenet` (`runs/full/imagenet_*/checkpoint.pt`).
#   Real data under `<data_root>/cityscapes/` (`leftImg8bit/`, `gtFine/`). Logs go to
#   `results/runs/<run>/`, the examples of Fig. 8 to `results/cityscapes_examples/`.
# - `logs` (default): redraws from the real logs and examples in `results/`, computing nothing.
#
# **Writes** `results/table_3_cityscapes.csv` and `figures/fig8_cityscapes_examples.{png,svg}`
# (smoke: under `runs/notebooks/smoke_outputs/`).

# %% tags=["parameters"]
profile: str = "logs"  # logs | smoke | full
quick: bool = False  # smoke only: fewer steps (tests)
seed: int = 0  # smoke: the training seed
data_root: str = ""  # full: folder holding cityscapes/ (empty: data/)
output_root: str = ""  # empty: the repository's results/ and figures/
variant: str = "paper"  # full: paper (Appendix Table 4) | official (released configs)
nproc: int = 0  # full: GPUs per run (0: all visible)
dry_run: bool = False  # full: print the training commands, launch nothing

# %%
from mdeq.paper import notebook, parameters
from mdeq.paper.report import plots, tables
from mdeq.engine import paths

params = parameters.check_parameters(globals(), "04_cityscapes")
ctx = notebook.setup(params)
notebook.show_banner(ctx)

# %% [markdown]
# ## Train, then predict the examples of Fig. 8 (smoke and full profiles)

# %%
notebook.train(ctx)
notebook.segmentation_examples(ctx)

# %% [markdown]
# ## Table 3: paper vs ours

# %%
for kind in ctx.kinds():
    table = tables.paper_table(ctx, kind, "table3")
    csv = notebook.save_table(table, "table_3_cityscapes", ctx, kind)
    notebook.display_table(tables.show_table(table, kind, csv), csv, ctx)

# %% [markdown]
# ## Fig. 8: segmentation examples

# %%
for kind in ctx.kinds():
    folder = ctx.inputs_dir(kind) / notebook.CITYSCAPES_EXAMPLES
    fig = plots.plot_segmentation_examples(folder, kind)
    notebook.save_figure(fig, "fig8_cityscapes_examples", ctx, kind,
                       caption="Cityscapes val images, the MDEQ-large prediction and the ground truth in the "
                               "Cityscapes palette (void in black)",
                       source=paths.rel(folder))
