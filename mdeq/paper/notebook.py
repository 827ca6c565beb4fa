"""How a notebook runs: where it reads and writes (one rule for both), what each profile step does, how it saves.

Why one module: the five notebooks (STYLE.md 4) must check their parameters (``mdeq.paper.parameters``),
find their inputs and save
their tables and figures the same way, and each must stay a report, not a program. So a notebook calls
one function per step (``train``, ``runtime_memory``, ``convergence``, ``segmentation_examples``) and
that function does what the profile asks:

- ``smoke``: compute in this process on CPU with one thread (``mdeq.paper.runs.train_smoke``, ``mdeq.paper.measure``);
  outputs go under the ignored ``runs/notebooks/smoke_outputs/`` (``quick_outputs/`` with ``quick``); the
  committed reference copy in ``results/smoke/`` and ``figures/smoke/`` is written only by
  ``python -m mdeq.reproduce --profile smoke --update-committed`` (through ``output_root``);
- ``full``: launch or measure the paper's protocol on GPUs (``mdeq.paper.runs.run_full``, ``mdeq.paper.measure``);
  outputs go to ``results/`` and ``figures/``;
- ``logs``: compute nothing; redraw the real tables and figures from ``results/`` (with "not run yet" where no
  log is committed: the paper's numbers are never copied into "ours"). The committed smoke copy is not shown
  there: a page of results holds no toy number (issue 26).

``output_root`` sends every output to ``<output_root>/results`` and ``<output_root>/figures``, and a
profile reads back what it computed from there (``Context.inputs_dir``). Every smoke title and caption
says "smoke run, not a reproduction". Every saved table and figure is recorded in ``<root>/results/manifest.json``
with what it was made from (``mdeq.paper.manifest``), and its caption on the page names those inputs and the commit.
"""
from __future__ import annotations

import contextlib
import json
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import torch

from mdeq.paper import manifest, runs
from mdeq.paper.parameters import PARAMETERS, TUTORIAL, Params
from mdeq.paper.measure import examples, runtime, solver_traces, timing
from mdeq.engine import paths, progress
from mdeq.paper.report.figure_files import write_figure
from mdeq.paper.report.style import SMOKE_NOTE, set_style
from mdeq.engine.runlog import describe_run_hardware, hardware_label, read_json, read_run, write_text_atomic

__all__ = ["FIGURE_OWNERS", "TABLE_OWNERS", "Context", "setup", "save_figure", "save_table", "display_table",
           "show_banner", "write_json",
           "train", "segmentation_examples", "runtime_memory", "convergence", "RUNTIME_MEMORY", "FIG4B_MEMORY",
           "CONVERGENCE_TRACES", "CITYSCAPES_EXAMPLES", "JPEG_SENSITIVITY", "EQUILIBRIUM", "trained_inference", "ACCURACY_VS_BUDGET",
           "CONVERGENCE_VS_RESOLUTION"]

# What the measuring notebooks write into their results folder (smoke: results/smoke/).
RUNTIME_MEMORY = "runtime_memory.json"  # 03, mdeq.paper.measure.runtime.measure_runtime
FIG4B_MEMORY = "fig4b_memory_cpu.json"  # 03, benchmarks/fig4b_memory.py (mdeq.paper.measure.memory; real only)
CONVERGENCE_TRACES = "convergence_traces.json"  # 05, mdeq.paper.measure.solver_traces.convergence_traces
JPEG_SENSITIVITY = "jpeg_sensitivity.json"  # 01, studies/jpeg_sensitivity.py (real only)
EQUILIBRIUM = {  # 01, studies/equilibrium_over_training.py (real only): the 50-step series and the long solves
    "over_training": "equilibrium_over_training.json", "m = 12 (Table 4)": "equilibrium_long_solve.json",
    "m = 40": "equilibrium_long_solve_m40.json"}
ACCURACY_VS_BUDGET = "accuracy_vs_budget.json"  # 05, studies/accuracy_vs_budget.py (mdeq.paper.inference)
CONVERGENCE_VS_RESOLUTION = "convergence_vs_resolution.json"  # 05, studies/convergence_vs_resolution.py
CITYSCAPES_EXAMPLES = "cityscapes_examples"  # 04, mdeq.paper.measure.examples.cityscapes_examples (a folder)

# ----------------------------------------------------------------------------------------------
# Where a run reads and writes.

# Every figure and table is written by exactly one notebook (tests/test_notebook.py checks the
# notebooks' sources and the files in figures/ against these maps).
FIGURE_OWNERS = {
    "implicit_layers_solvers": TUTORIAL,
    "implicit_layers_per_scale": TUTORIAL,
    "fig4a_cifar10_accuracy": "01_cifar10",
    "table1_training_and_solver": "01_cifar10",
    "table1_jpeg_sensitivity": "01_cifar10",
    "table1_equilibrium_over_training": "01_cifar10",
    "imagenet_top1_per_epoch": "02_imagenet",
    "fig4b_runtime_memory": "03_runtime_memory",
    "fig4b_training_memory": "03_runtime_memory",
    "fig8_cityscapes_examples": "04_cityscapes",
    "fig5_convergence_forward": "05_convergence",
    "fig5_convergence_backward": "05_convergence",
    "fig7_per_scale_convergence": "05_convergence",
    "accuracy_vs_solver_budget": "05_convergence",
    "convergence_vs_resolution": "05_convergence",
}
TABLE_OWNERS = {
    "table_1_cifar10": "01_cifar10",
    "table_2_imagenet": "02_imagenet",
    "table_fig4b_runtime_memory": "03_runtime_memory",
    "table_3_cityscapes": "04_cityscapes",
    "table_fig5_convergence": "05_convergence",
    "table_accuracy_vs_budget": "05_convergence",
    "table_convergence_vs_resolution": "05_convergence",
}
KINDS = ("real", "smoke")


@dataclass
class Context:
    """Where one notebook run reads logs and writes its outputs."""

    notebook: str
    profile: str
    quick: bool = False
    output_root: Path | None = None
    params: Params | None = None
    written: list = field(default_factory=list)
    recorder: manifest.Recorder = field(init=False, repr=False)  # what this run read (mdeq.paper.manifest)
    made_from: dict = field(default_factory=dict, repr=False)  # output path -> the caption's "Made from ..."
    _commit: str | None = field(default=None, repr=False)

    def __post_init__(self):
        self.recorder = manifest.Recorder(self.root(), (paths.RESULTS, self._outputs()[0]))

    def root(self) -> Path:
        """The folder holding this run's results/ and figures/ (the repository for the committed outputs)."""
        return self._outputs()[0].parent

    def _outputs(self) -> tuple[Path, Path]:
        """(results, figures) of this run: under ``output_root`` if given; a smoke run's under the ignored runs/
        (the committed reference copy in results/smoke/ is written only by ``--profile smoke --update-committed``)."""
        if self.output_root is not None:
            return self.output_root / "results", self.output_root / "figures"
        if self.profile == "smoke":
            base = paths.RUNS / "notebooks" / ("quick_outputs" if self.quick else "smoke_outputs")
            return base / "results", base / "figures"
        return paths.RESULTS, paths.FIGURES

    def results_dir(self, kind: str) -> Path:
        """Where tables, measurements and collected logs of ``kind`` ("real" or "smoke") are written."""
        base = self._outputs()[0]
        return base / "smoke" if _kind(kind) == "smoke" else base

    def figures_dir(self, kind: str) -> Path:
        base = self._outputs()[1]
        return base / "smoke" if _kind(kind) == "smoke" else base

    def inputs_dir(self, kind: str) -> Path:
        """Where logs of ``kind`` are read: what this run wrote for the kind it computes (smoke in the smoke
        profile, real in the full one, wherever ``output_root`` puts it), else the committed ones."""
        if (_kind(kind), self.profile) in (("smoke", "smoke"), ("real", "full")):
            return self.results_dir(kind)
        return paths.RESULTS / "smoke" if kind == "smoke" else paths.RESULTS

    def logs_dir(self, kind: str) -> Path:
        """Where training run logs of ``kind`` are read (``<inputs>/runs``)."""
        return self.inputs_dir(kind) / "runs"

    def read(self, kind: str, name: str) -> dict | None:
        """The measurement ``name`` (a JSON file) of ``kind``, or None where there is none (an input either way)."""
        path = self.inputs_dir(kind) / name
        if not path.is_file():
            self.recorder.note(path)  # looked for: the output is stale once it appears
        return read_json(path)

    def kinds(self) -> tuple[str, ...]:
        """What this profile draws: smoke its own toy runs; full and logs the real logs (never a toy number
        beside a real one: the committed smoke copy is the smoke profile's, ``--profile smoke --update-committed``)."""
        return {"smoke": ("smoke",), "full": ("real",), "logs": ("real",)}[self.profile]

    def source(self, kind: str, data: str, hardware: str) -> str:
        """The ``ours_source`` text of a table row: profile, data and hardware."""
        prof = "smoke" if kind == "smoke" else ("full" if self.profile in ("full", "logs") else self.profile)
        return f"{prof} profile; data: {data}; hardware: {hardware}"


def _kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


def setup(params: Params) -> Context:
    """Apply the figure style and return the run context (nothing process-wide beyond matplotlib's style)."""
    set_style()
    manifest.watch_cells()  # in a kernel, each cell begins a drawing step (what its outputs were made from)
    out = Path(params.output_root).resolve() if params.values.get("output_root") else None
    return Context(params.notebook, params.profile, bool(params.values.get("quick")), out, params)


@contextlib.contextmanager
def _threads(ctx: Context):
    """One CPU thread for the smoke profile's computations, restored after them.

    Why: the machine is shared, and one thread is also the most reproducible; the kernel's setting is
    left as it was for whatever runs next.
    """
    before = torch.get_num_threads()
    if ctx.profile == "smoke":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# The profile steps: one call per notebook step, whatever the profile.

def train(ctx: Context) -> None:
    """Train the notebook's runs: smoke in this process, full through the launcher; logs trains nothing."""
    p = ctx.params
    if ctx.profile == "smoke":
        todo = runs.runs_for(ctx.notebook)
        with _threads(ctx), progress.bar(total=len(todo), desc="smoke training", unit="run") as shown:
            for run in todo:
                shown.set_postfix_str(run.label)
                runs.train_smoke(run, ctx.results_dir("smoke") / "runs" / run.key, quick=ctx.quick,
                                 variant=p.variant, seed=p.seed)
                shown.update(1)
    elif ctx.profile == "full":
        for launch in runs.run_full(ctx.notebook, variant=p.variant, data_root=p.data_root, nproc=p.nproc,
                                    seeds=p.values.get("seeds", 1), dry_run=p.dry_run):
            print(f"{launch.status:8s} {launch.run}: {launch.shell}")
    else:
        print("logs profile: nothing is trained; reading results/")


def segmentation_examples(ctx: Context) -> None:
    """Fig. 8's examples: predicted with the MDEQ-large checkpoint of this profile's Cityscapes run."""
    p = ctx.params
    if ctx.profile == "smoke":
        root, options = runs.smoke_data("cityscapes")
        with _threads(ctx):
            examples.cityscapes_examples(runs.smoke_run_dir("cityscapes_mdeq_large", quick=ctx.quick),
                                         ctx.results_dir("smoke") / CITYSCAPES_EXAMPLES, data_root=root,
                                         data_options=options, num=1 if ctx.quick else 2, device="cpu")
    elif ctx.profile == "full" and not p.dry_run:
        examples.cityscapes_examples(runs.FULL_RUNS / "cityscapes_mdeq_large",
                                     ctx.results_dir("real") / CITYSCAPES_EXAMPLES,
                                     data_root=runs.default_data_root("cityscapes", p.data_root), num=3)


def runtime_memory(ctx: Context) -> None:
    """Fig. 4b's measurement: smoke on this CPU (batch 4, quick 2), full on a GPU (the paper's batch 32)."""
    p = ctx.params
    if ctx.profile == "smoke":
        with _threads(ctx):
            measured = runtime.measure_runtime(batch_size=2 if ctx.quick else 4, device="cpu", variant=p.variant,
                                               repeats=1 if ctx.quick else 2, warmup=0 if ctx.quick else 1,
                                               seed=p.seed)
        write_json(ctx.results_dir("smoke") / RUNTIME_MEMORY, {**measured, "profile": "smoke", "quick": ctx.quick})
    elif ctx.profile == "full":
        if p.dry_run:
            models = ", ".join(m.label for m in runtime.RUNTIME_MODELS)
            print(f"would measure {models} at batch {p.batch_size} on device {p.device!r}")
            return
        timing.check_gpu(p.device, "measures")
        measured = runtime.measure_runtime(batch_size=p.batch_size, device=p.device, variant=p.variant, repeats=10,
                                           warmup=3, seed=p.seed)
        write_json(ctx.results_dir("real") / RUNTIME_MEMORY, {**measured, "profile": "full"})
    else:
        print("logs profile: nothing is measured; reading results/")


def convergence(ctx: Context) -> None:
    """Figs. 5-7's solver traces: smoke on shrunken models at init, full on the real models and data."""
    p = ctx.params
    if ctx.profile == "smoke":
        with _threads(ctx):
            traces = solver_traces.convergence_traces(profile="smoke", quick=ctx.quick, variant=p.variant,
                                                      num_batches=p.num_batches, device="cpu", seed=p.seed)
        write_json(ctx.results_dir("smoke") / CONVERGENCE_TRACES, traces)
    elif ctx.profile == "full":
        if p.dry_run:
            for dataset, s in solver_traces.CONVERGENCE_SETS.items():
                print(f"would trace {s.config.format(variant=p.variant)} on {p.num_batches} batches of {s.batch} x "
                      f"{s.input_hw} ({dataset}), weights: initial and the first of "
                      f"{', '.join(f'{r}/checkpoint.pt' for r in s.checkpoint_runs)} that exists")
            return
        timing.check_gpu(p.device, "traces")
        traces = solver_traces.convergence_traces(profile="full", variant=p.variant, data_root=p.data_root,
                                                  num_batches=p.num_batches, device=p.device, seed=p.seed)
        write_json(ctx.results_dir("real") / CONVERGENCE_TRACES, traces)
    else:
        print("logs profile: nothing is computed; reading results/")


def trained_inference(ctx: Context) -> None:
    """Our extensions with trained weights (accuracy against the forward budget, convergence against the input
    size): smoke on the shrunken MDEQ-small at its initial weights; full on the first trained MDEQ-small checkpoint
    (``runs/full/cifar10_mdeq_small_seed0``, else the campaign's ``results/runs/cifar10_mdeq_small``) and the
    real CIFAR-10 under ``data_root``; logs reads results/ (written by ``studies/accuracy_vs_budget.py`` and
    ``studies/convergence_vs_resolution.py``)."""
    from mdeq.paper import inference  # imported here: the logs profile needs none of it

    p = ctx.params
    if ctx.profile == "smoke":
        with _threads(ctx):
            accuracy, resolution = inference.smoke_measurements(quick=ctx.quick, seed=p.seed)
        write_json(ctx.results_dir("smoke") / ACCURACY_VS_BUDGET, accuracy)
        write_json(ctx.results_dir("smoke") / CONVERGENCE_VS_RESOLUTION, resolution)
    elif ctx.profile == "full":
        found = [d for d in (runs.FULL_RUNS / "cifar10_mdeq_small_seed0", paths.RESULTS / "runs" / "cifar10_mdeq_small")
                 if (d / "checkpoint.pt").is_file()]
        if p.dry_run or not found:
            weights = found[0] / "checkpoint.pt" if found else "no trained checkpoint (none yet)"
            print(f"would measure accuracy against the forward budget {inference.BUDGETS} and convergence at sizes "
                  f"{inference.SIZES} with {weights}")
            return
        timing.check_gpu(p.device, "measures")
        _trained_inference_full(ctx, found[0], inference)
    else:
        print("logs profile: nothing is computed; reading results/")


def _trained_inference_full(ctx: Context, run_dir: Path, inference) -> None:
    """The full profile's measurements on ``run_dir``'s checkpoint, in the benchmark scripts' output format."""
    from mdeq.paper.trained import eval_dataset, load_run
    from mdeq.engine.runlog import provenance

    p = ctx.params
    trained = load_run(run_dir)
    dataset, root, _ = eval_dataset(trained, runs.default_data_root("cifar10", p.data_root))
    prov = provenance(f"notebooks/05_convergence full profile (device {p.device})", p.device)
    weights = {"run": trained.name, "checkpoint": paths.rel(trained.checkpoint), "sha256": trained.sha256,
               "config": trained.cfg.name, "weights": trained.weights_label()}
    data = {"label": dataset.source_label, "split": "CIFAR-10 test set", "images": len(dataset),
            "root": paths.rel(root)}
    accuracy = inference.accuracy_against_budget(trained, dataset, device=p.device)
    write_json(ctx.results_dir("real") / ACCURACY_VS_BUDGET, {
        "benchmark": "accuracy_vs_budget", "runs": {trained.name: {"weights": weights, "result": accuracy,
                                                                   "data": data}}, "provenance": prov})
    sources = {"cifar10": {f"test image {i}": dataset.images[i] for i in range(5)},
               "photographs": inference.photographs()}
    result = inference.convergence_against_resolution(trained, inference.resolution_inputs(sources), device=p.device)
    write_json(ctx.results_dir("real") / CONVERGENCE_VS_RESOLUTION, {
        "benchmark": "convergence_vs_resolution", "weights": weights, "result": result, "chunks": [prov],
        "sources": {"cifar10": f"the first 5 CIFAR-10 test images of {dataset.source_label}, upsampled bilinearly",
                    "photographs": f"scikit-image's {', '.join(inference.PHOTOGRAPHS)}, centre-cropped and resized"},
        "settings": {"sizes": list(inference.SIZES), "num_images": 5, "budget": result["budget"],
                     "sources": ["cifar10", "photographs"]}, "thresholds": list(inference.THRESHOLDS)})


# ----------------------------------------------------------------------------------------------
# Saving and showing.

def write_json(path: str | Path, payload: Mapping) -> Path:
    """A measurement's JSON, its folder made, written atomically (a killed measurement leaves the last whole file).
    Unlike the run logs' ``runlog.write_json_atomic``, a NaN stays NaN: a solver trace that diverged is drawn as
    such."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=1, default=str) + "\n")
    return path


def caption_text(caption: str, notebook: str, kind: str, source: str) -> str:
    text = caption.rstrip(".") + f". Drawn by notebooks/{notebook}.ipynb from {source}."
    if kind == "smoke":
        text = f"Smoke run, not a reproduction: {text}"
    return text


def save_figure(fig, name: str, ctx: Context, kind: str, *, caption: str, source: str) -> dict:
    """Write ``fig`` as PNG and SVG (plus a JSON sidecar with its caption and writer) and return paths.

    The caption is text, not pixels: in a notebook it is shown under the figure as Markdown (and so in
    the book), and it is stored in the sidecar; the page's caption ends with what the figure was made from
    and the commit (``_record``). A smoke figure says "smoke run, not a reproduction" in
    its caption (and its title, via ``figure_title``). ``name`` must belong to ``ctx.notebook``.
    """
    owner = FIGURE_OWNERS.get(name)
    if owner != ctx.notebook:
        raise ValueError(f"figure {name!r} belongs to {owner!r}, not {ctx.notebook!r} (notebook.FIGURE_OWNERS)")
    text = caption_text(caption, ctx.notebook, kind, source)
    folder = ctx.figures_dir(kind)
    folder.mkdir(parents=True, exist_ok=True)
    out = write_figure(fig, folder, name)  # kept as it is when only the last bits of its numbers moved
    sidecar = {"figure": name, "notebook": f"notebooks/{ctx.notebook}.ipynb", "kind": kind,
               "caption": text, "source": source}
    out["json"] = folder / f"{name}.json"
    out["json"].write_text(json.dumps(sidecar, indent=1) + "\n")
    ctx.written += list(out.values())
    made = _record(ctx, folder / name, list(out.values()), kind, source)
    if _display(fig, f"*Figure ({name}).* {text} {made}"):
        plt.close(fig)  # shown once, with its caption under it
    return out


def _display(*objects) -> bool:
    """Show figures and Markdown strings in a running notebook; False outside one."""
    try:  # IPython is there in a notebook (the notebooks extra), not necessarily elsewhere
        from IPython import get_ipython
        from IPython.display import Markdown, display
    except ImportError:  # pragma: no cover
        return False
    if get_ipython() is None:
        return False
    for obj in objects:
        display(Markdown(obj) if isinstance(obj, str) else obj)
    return True


def banner(ctx: Context) -> str:
    """The line a page opens with: which profile produced it and what data and hardware are behind it."""
    if ctx.notebook == TUTORIAL:
        return (f"> **{ctx.profile.capitalize()} profile: this page is the same in every profile.** It trains "
                "nothing and reproduces no number of the paper: every number on it is computed here, on the CPU, "
                "from a toy f at random weights and a random input.")
    if ctx.profile == "smoke":
        return (f"> **Smoke profile: toy models on synthetic data, {SMOKE_NOTE}.** Every number and curve on "
                "this page comes from shrunken models trained or measured for seconds on a CPU; the paper's "
                "numbers stand beside them for orientation only.")
    if ctx.profile == "full":  # the data first (what a newcomer lacks first), then the GPUs; never "on CPU"
        values = ctx.params.values if ctx.params is not None else {}
        data = ""
        if runs.runs_for(ctx.notebook):
            missing = runs.missing_data(ctx.notebook, values.get("data_root", ""))
            data = " Data: " + ("; ".join(f"{e.dataset} is not at {paths.rel(e.root)} ({e.problem})"
                                          for e in missing) or "in place") + "."
        gpus = runs.visible_gpus()
        dry = values.get("dry_run", False)
        where = (hardware_label(world_size=gpus) if gpus else "none is visible on this machine, so "
                 + ("this dry run only prints the commands" if dry else "nothing can be trained or measured here"))
        if values.get("device") == "cpu":  # 03 and 05 measure where they are told
            where = "not used: device='cpu' measures on this machine's CPU, which is not the paper's hardware"
        return f"> **Full profile**: the paper's protocol{' (dry run)' if dry else ''}.{data} GPUs: {where}."
    folders = sorted(p for p in ctx.logs_dir("real").iterdir() if p.is_dir()) if ctx.logs_dir("real").is_dir() else []
    lines = []
    for path in folders:
        r = read_run(path)
        if r is None:
            continue
        state = "finished" if r.finished else f"epoch {r.epochs_done} of {r.epochs_planned or '?'}"
        lines.append(f"`{r.name}` ({state}; {r.meta('data_source_label', default='unknown data')}; "
                     f"{describe_run_hardware(r.provenance)})")
    real = ("real runs in results/runs/: " + ", ".join(lines)) if lines else "no real training run is committed yet"
    return (f"> **Logs profile**: redrawn from the committed logs, nothing computed; {real}. The smoke profile's "
            "toy runs are not shown here (`python -m mdeq.reproduce --profile smoke` draws them).")


def show_banner(ctx: Context) -> None:
    text = banner(ctx)
    if not _display(text):
        print(text.lstrip("> "))


def save_table(df, name: str, ctx: Context, kind: str) -> Path:
    """Write ``df`` to ``<results>/<name>.csv`` (``name`` must belong to ``ctx.notebook``)."""
    owner = TABLE_OWNERS.get(name)
    if owner != ctx.notebook:
        raise ValueError(f"table {name!r} belongs to {owner!r}, not {ctx.notebook!r} (notebook.TABLE_OWNERS)")
    for col in ("paper", "ours", "delta", "ours_source"):
        if col not in df.columns:
            raise ValueError(f"table {name!r} lacks the column {col!r}")
    folder = ctx.results_dir(kind)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    df.map(_csv_cell).to_csv(path, index=False)
    ctx.written.append(path)
    _record(ctx, folder / name, [path], kind)
    return path


def _csv_cell(value):
    """A table cell as its CSV holds it: a number rounded once to 4 significant digits, a whole number (a
    parameter count) in full, whatever the column's dtype (a column with "not run yet" in it is text)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != value:
        return value
    value = float(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def display_table(shown, csv: str | Path, ctx: Context) -> None:
    """Show a saved table as the page shows it (``report.tables.show_table``) with its caption under it: the
    notebook that drew it, what it was made from and the commit."""
    try:  # a link from the notebook's folder, as the caption's inputs (manifest.made_from)
        where = manifest.link_to(Path(csv).resolve().relative_to(ctx.root().resolve()).as_posix(), "../")
    except ValueError:
        where = paths.rel(csv)
    text = (f"*Table ({Path(csv).stem}).* Drawn by notebooks/{ctx.notebook}.ipynb into {where}. "
            + ctx.made_from.get(Path(csv), ""))
    if not _display(shown, text):
        print(f"{shown!r}\n{text}")


def _record(ctx: Context, stem: Path, files: list, kind: str, source: str | None = None) -> str:
    """Record what the output ``stem`` (its path without suffix) was made from in its manifest
    (``mdeq.paper.manifest``); return the caption's sentence that says so, with the commit."""
    if source and not any(c in source for c in " *?[") and not (paths.ROOT / source).exists():
        ctx.recorder.note(paths.ROOT / source)  # named but absent: the output is stale once it appears
    spec = PARAMETERS.get(ctx.notebook, {})
    values = ctx.params.values if ctx.params is not None else {"quick": ctx.quick}
    params = {"profile": ctx.profile, **{k: v for k, v in values.items()  # output_root: only where it went
                                        if k in spec and k not in ("profile", "output_root") and v != spec[k][1]}}
    entry = manifest.record(ctx.recorder, stem.resolve().relative_to(ctx.recorder.root).as_posix(), files, kind,
                            notebook=ctx.notebook, parameters=params, write=not values.get("dry_run", False))
    if ctx._commit is None:
        ctx._commit = manifest.commit_label()
    text = manifest.made_from(entry, (ctx.root() / "results" / manifest.MANIFEST).relative_to(ctx.root()).as_posix(),
                              ctx._commit, link="../")  # the links work from the notebook's folder, notebooks/
    ctx.made_from[Path(files[0])] = text
    return text
