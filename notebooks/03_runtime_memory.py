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
# # Runtime and memory: Fig. 4b
#
# **Paper item:** Fig. 4b: training time, inference time and peak training memory of MDEQ
# (`cifar10_large_<variant>`), MDEQ-small (`cifar10_small_<variant>`), ResNet-18 (the 10M CIFAR
# ResNet-18 of Table 1), ResNet-101 and ANODE (172K) on CIFAR-10-sized input (3 x 32 x 32), relative
# to ResNet-101, and the numbers Section 4.4 states (ResNet-101 ~150 ms per batch of 32 on an RTX
# 2080 Ti, a 2.7x slowdown of MDEQ, > 60% memory saved, MDEQ-small 3x faster than ANODE).
# A training step is forward + backward (MDEQs in their implicit phase: Broyden forward with T_f,
# IFT backward with T_b, from the initial weights, so every solve uses its full budget); inference is
# a forward pass without gradients.
#
# **Profiles** (`profile` parameter):
# - `smoke`: the real models on CPU with a batch of 4 (quick: 2) and 2 repetitions; memory
#   is the increase of the process's peak resident set. A smoke run, **not a reproduction**: CPU
#   ratios say little about GPU ones. Writes under the ignored
#   `runs/notebooks/smoke_outputs/` (the committed copy: `--update-committed`).
# - `full`: batch `batch_size` (32, as the paper) on a GPU (`device`), 10 timed repetitions after 3
#   warm-ups; memory is `torch.cuda.max_memory_allocated` during the training step.
#   Writes `results/runtime_memory.json`.
# - `logs` (default): redraws from `results/runtime_memory.json` (the real measurement only).
#
# **Training memory as live tensor bytes** (`results/fig4b_memory_cpu.json`, written by
# `python benchmarks/fig4b_memory.py`, `mdeq.paper.measure.memory.measure_memory`; drawn in the `logs` and `full`
# profiles): the peak of live tensor bytes during one training step (forward, loss, backward, Adam step)
# at batch 32, split into parameters + gradients + Adam state, activations saved for backward, and the
# rest (solver history, temporaries), for the five models and for the MDEQs trained unrolled through the
# same number of f evaluations; and MDEQ-small's peak against the forward iteration budget. Live tensor
# bytes do not depend on the device; they were measured on a CPU. The smoke profile does not measure them.
#
# **Writes** `results/table_fig4b_runtime_memory.csv`, `figures/fig4b_runtime_memory.{png,svg}` and
# `figures/fig4b_training_memory.{png,svg}`.

# %% tags=["parameters"]
profile: str = "logs"  # logs | smoke | full
quick: bool = False  # smoke only: smaller batch, one repetition (tests)
seed: int = 0  # seed of the random input and of the initial weights
data_root: str = ""  # unused: the input is random, of CIFAR-10's shape
output_root: str = ""  # empty: the repository's results/ and figures/
variant: str = "paper"  # paper (Appendix Table 4) | official (released configs) MDEQs
dry_run: bool = False  # full: say what would be measured, measure nothing
batch_size: int = 32  # full: batch size (the paper's 32); smoke uses 4 (quick: 2)
device: str = "auto"  # auto | cpu | cuda; full with auto needs a GPU

# %%
from mdeq.paper import notebook, parameters
from mdeq.paper.report import plots, tables
from mdeq.engine import paths

params = parameters.check_parameters(globals(), "03_runtime_memory")
ctx = notebook.setup(params)
notebook.show_banner(ctx)

# %% [markdown]
# ## Measure (smoke and full profiles)

# %%
notebook.runtime_memory(ctx)

# %% [markdown]
# ## Fig. 4b and the numbers of Section 4.4: paper vs ours

# %%
for kind in ctx.kinds():
    measured = ctx.read(kind, notebook.RUNTIME_MEMORY)
    memory = ctx.read(kind, notebook.FIG4B_MEMORY)
    table = tables.table_fig4b(ctx, kind, measured, memory=memory)
    csv = notebook.save_table(table, "table_fig4b_runtime_memory", ctx, kind)
    notebook.display_table(tables.show_table(table, kind, csv), csv, ctx)
    fig = plots.plot_runtime_memory(measured, kind)
    notebook.save_figure(fig, "fig4b_runtime_memory", ctx, kind,
                       caption="Training time, inference time and peak training memory per batch relative to "
                               "ResNet-101 (lower is better); MDEQs from their initial weights with the full "
                               "solver budgets",
                       source=paths.rel(ctx.inputs_dir(kind) / notebook.RUNTIME_MEMORY))

# %% [markdown]
# ## Fig. 4b's memory in live tensor bytes, and the O(1)-memory claim

# %%
for kind in ctx.kinds():
    memory = ctx.read(kind, notebook.FIG4B_MEMORY)
    fig = plots.plot_training_memory(memory, kind)
    notebook.save_figure(fig, "fig4b_training_memory", ctx, kind,
                       caption="Left: peak live tensor bytes of one training step (forward, loss, backward, Adam "
                               "step) per model, split by component, with the ratio to ResNet-101 on each bar and "
                               "the paper's bound (MDEQ saves > 60%) as a dashed line; MDEQs in their implicit "
                               "phase with the full solver budgets, and trained unrolled through the same number "
                               "of f evaluations. Right: MDEQ-small's peak against the forward iteration budget, "
                               "implicit backward against backpropagation through the unrolled solver",
                       source=paths.rel(ctx.inputs_dir(kind) / notebook.FIG4B_MEMORY))
