"""Which runs the paper has, and how each profile trains them: the registry, smoke shrinking, full launches.

Why one module: a notebook, the full profile and the CPU campaign (``mdeq.campaign``) must train the
same runs with the same names, so the registry lives here once (``RUNS``). Each run is one row of
Table 1, 2 or 3:

- ``smoke``: ``train_smoke`` trains a shrunken copy in this process on a synthetic copy of its data set
  (``mdeq.engine.data.synthetic``), CPU, one thread, a few steps; checkpoints stay in ``runs/notebooks/``;
- ``full``: ``run_full`` launches the paper's protocol (Appendix Table 4 via the ``paper`` configs, or
  the released ``official`` ones; the XL models exist only as ``official``) on real data, one
  ``mdeq.train`` process per run, through ``torch.distributed.run`` (torchrun) when more than one GPU
  is used. Checkpoints stay in ``runs/full/<run>/``; the small logs are copied into
  ``results/runs/<run>/``. A run whose logs say it finished is skipped; any other is launched with
  ``--resume`` (which continues from its checkpoint or starts afresh).
"""
from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mdeq.engine import paths
from mdeq.core.config import load_config
from mdeq.engine.runlog import collect_run, finished, read_json
from mdeq.engine.loop import main
from mdeq.engine.options import RunOptions

__all__ = ["RunSpec", "RUNS", "runs_for", "spec", "config_name", "run_name", "smoke_spec", "smoke_overrides",
           "smoke_baseline_options", "smoke_data", "smoke_run_dir", "train_smoke", "visible_gpus", "default_data_root", "full_command",
           "processes_for", "Launch", "MissingDataError", "missing_data", "run_full", "FULL_RUNS", "SMOKE_RUNS"]

FULL_RUNS = paths.RUNS / "full"  # checkpoints of full runs (not committed)
SMOKE_RUNS = paths.RUNS / "notebooks"  # checkpoints and data of the notebooks' smoke runs (not committed)
VARIANTS = ("paper", "official")


@dataclass(frozen=True)
class RunSpec:
    """One trained model of a table: its config, baseline and how the smoke profile shrinks it.

    ``config`` may contain ``{variant}`` (paper | official). ``overrides`` apply in every profile
    (they define the row, e.g. the unrolled 5-layer model); ``pretrained_from`` names the run whose
    checkpoint initialises this one in the full profile (Cityscapes from ImageNet, paper 4.3).
    """

    key: str
    notebook: str
    label: str
    config: str
    table: str
    baseline: str | None = None
    overrides: tuple[str, ...] = ()
    pretrained_from: str | None = None
    smoke_div: int = 8  # smoke: channel widths divided by this

    @property
    def dataset(self) -> str:
        return self.config.split("_", 1)[0]

    @property
    def colour_key(self) -> str:
        """The model's name without the data set (``mdeq_small``, ``resnet18_170k``): one colour in every figure."""
        return self.key.split("_", 1)[1]


RUNS: tuple[RunSpec, ...] = (
    # Table 1, without augmentation (~170K parameters): training settings of MDEQ-small for all five.
    RunSpec("cifar10_mdeq_small", "01_cifar10", "MDEQ-small", "cifar10_small_{variant}", "table1", smoke_div=2),
    # The same model with the simplified input injection (no stage0) that the authors say gave 87.1 %.
    RunSpec("cifar10_mdeq_small_simple_injection", "01_cifar10", "MDEQ-small (simplified injection)",
            "cifar10_small_simple_injection_paper", "table1", smoke_div=2),
    RunSpec("cifar10_single_stream", "01_cifar10", "Single-stream DEQ", "cifar10_single_stream_paper", "table1",
            smoke_div=2),
    RunSpec("cifar10_resnet18_170k", "01_cifar10", "ResNet-18 (170K)", "cifar10_small_{variant}", "table1",
            baseline="resnet18_170k", smoke_div=2),
    RunSpec("cifar10_node", "01_cifar10", "Neural ODE", "cifar10_small_{variant}", "table1", baseline="node_172k",
            smoke_div=4),
    RunSpec("cifar10_anode", "01_cifar10", "Aug. Neural ODE", "cifar10_small_{variant}", "table1",
            baseline="anode_172k", smoke_div=4),
    # Table 1, with augmentation (~10M): training settings of the CIFAR-10 MDEQ for both.
    RunSpec("cifar10_mdeq_large", "01_cifar10", "MDEQ (10M)", "cifar10_large_{variant}", "table1", smoke_div=4),
    RunSpec("cifar10_resnet18_10m", "01_cifar10", "ResNet-18 (10M)", "cifar10_large_{variant}", "table1",
            baseline="resnet18_10m", smoke_div=4),
    # Table 2.
    RunSpec("imagenet_mdeq_small", "02_imagenet", "MDEQ-small", "imagenet_small_{variant}", "table2"),
    RunSpec("imagenet_mdeq_large", "02_imagenet", "MDEQ-large", "imagenet_large_{variant}", "table2"),
    RunSpec("imagenet_mdeq_large_unrolled5", "02_imagenet", "Unrolled 5-layer MDEQ-large",
            "imagenet_large_{variant}", "table2",
            overrides=("solver.grad=unrolled", "solver.unroll_steps=5", "train.pretrain_steps=0")),
    RunSpec("imagenet_mdeq_xl", "02_imagenet", "MDEQ-XL", "imagenet_xl_official", "table2"),
    # Table 3: the same models, initialised from their ImageNet runs.
    RunSpec("cityscapes_mdeq_small", "04_cityscapes", "MDEQ-small", "cityscapes_small_{variant}", "table3",
            pretrained_from="imagenet_mdeq_small"),
    RunSpec("cityscapes_mdeq_large", "04_cityscapes", "MDEQ-large", "cityscapes_large_{variant}", "table3",
            pretrained_from="imagenet_mdeq_large"),
    RunSpec("cityscapes_mdeq_xl", "04_cityscapes", "MDEQ-XL", "cityscapes_xl_official", "table3",
            pretrained_from="imagenet_mdeq_xl"),
)
_BY_KEY = {r.key: r for r in RUNS}


def runs_for(notebook: str) -> list[RunSpec]:
    return [r for r in RUNS if r.notebook == notebook]


def spec(key: str) -> RunSpec:
    if key not in _BY_KEY:
        raise KeyError(f"unknown run {key!r}; known: {sorted(_BY_KEY)}")
    return _BY_KEY[key]


def config_name(run: RunSpec, variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be 'paper' or 'official', got {variant!r}")
    return run.config.format(variant=variant)


def run_name(run: RunSpec, seed: int | None) -> str:
    """Folder name of one run: ``<key>`` or, for repeated seeds (Table 1), ``<key>_seed<k>``."""
    return run.key if seed is None else f"{run.key}_seed{seed}"


# ----------------------------------------------------------------------------------------------
# Smoke profile: tiny widths, synthetic data, CPU, in-process.

_SMOKE_SIZES = {  # (steps per epoch, epochs, eval samples) for default and quick smoke runs
    False: {"cifar10": (10, 6, 40), "imagenet": (5, 6, 20), "cityscapes": (4, 6, 2)},
    True: {"cifar10": (3, 2, 16), "imagenet": (2, 2, 10), "cityscapes": (2, 2, 1)},
}
_SMOKE_BATCH = {"cifar10": 8, "imagenet": 4, "cityscapes": 2}
_SMOKE_IMAGE = {  # (train, eval) sizes; synthetic Cityscapes images are 128 x 256
    "imagenet": ([64, 64], [64, 64]),
    "cityscapes": ([64, 128], [128, 256]),
}
_SMOKE_DATA = {  # make_synthetic options per data set, and the builder options reading it back
    "cifar10": ({"n_train_per_batch": 20, "n_val": 40}, {}),
    "imagenet": ({"num_classes": 10, "n_train": 2, "n_val": 2}, {"allow_missing_classes": True}),
    "cityscapes": ({"n_train": 8, "n_val": 2}, {"base_size": 256}),
}


def _even(x: float, lo: int = 2) -> int:
    return max(lo, 2 * int(round(x / 2)))


def smoke_spec(config: str) -> RunSpec:
    """A RunSpec for a bare config, shrunk as the registry's runs of its data set are (CIFAR / 2, else / 8)."""
    dataset = config.split("_", 1)[0]
    return RunSpec(config, "", config, config, "", smoke_div=2 if dataset == "cifar10" else 8)


def smoke_overrides(run: RunSpec, variant: str = "paper", *, quick: bool = False) -> list[str]:
    """``section.key=value`` overrides that shrink ``run``'s config into a CPU smoke run.

    Widths are divided by ``run.smoke_div`` (rounded to even numbers, GroupNorm(2)), the solver budgets
    capped at 6, batches of 2-8, a few steps per epoch, a warm-up of one epoch, smaller images for
    ImageNet (64) and Cityscapes (64 x 128 crops of 128 x 256 images). The architecture and the
    training recipe are otherwise the real config's.
    """
    cfg = load_config(config_name(run, variant), list(run.overrides))
    m, s, d = cfg.model, cfg.solver, cfg.data
    div = run.smoke_div
    out = [f"model.num_channels={[_even(c / div) for c in m.num_channels]}", "model.num_groups=2"]
    if m.head == "classification":
        out += [f"model.head_channels={[max(1, round(h / div)) for h in m.head_channels]}",
                f"model.final_channels={max(8, round(m.final_channels / div))}"]
    cap = 6
    out += [f"solver.max_iter={min(s.max_iter, cap)}", f"solver.backward_max_iter={min(s.backward_max_iter, cap)}",
            f"solver.memory={min(s.memory, cap)}"]
    if s.grad != "unrolled":
        out.append(f"solver.unroll_steps={min(s.unroll_steps, 2)}")
    steps, epochs, _ = _SMOKE_SIZES[quick][d.dataset]
    batch = _SMOKE_BATCH[d.dataset]
    out += [f"data.batch_size={batch}", f"data.eval_batch_size={batch if d.dataset != 'cityscapes' else 1}",
            f"train.epochs={epochs}"]
    if s.grad != "unrolled" and run.baseline is None:
        out.append(f"train.pretrain_steps={steps}")  # epoch 0 unrolled, the later ones implicit
    if d.dataset == "imagenet":
        out.append("data.num_classes=10")
    if d.dataset in _SMOKE_IMAGE:
        train_hw, eval_hw = _SMOKE_IMAGE[d.dataset]
        out += [f"data.image_size={train_hw}", f"data.eval_image_size={eval_hw}"]
    out.append("train.pretrained=null")
    return out


def smoke_baseline_options(run: RunSpec) -> dict:
    """A smoke baseline's builder options: its paper width divided by ``run.smoke_div``, as the MDEQs' are."""
    if run.baseline is None:
        return {}
    # Imported here: the baselines pull in torchdiffeq, which the registry's other users never need.
    from mdeq.engine.baselines import default_width

    return {"width": max(2, round(default_width(run.baseline) / run.smoke_div))}


def smoke_data(dataset: str) -> tuple[Path, dict]:
    """A synthetic copy of ``dataset`` under ``runs/notebooks/data`` (made once) and its builder options."""
    root = SMOKE_RUNS / "data" / dataset
    sizes, options = _SMOKE_DATA[dataset]
    if not (root / "mdeq_manifest.json").is_file() and not any(root.rglob("mdeq_manifest.json")):
        # Imported here: the data package pulls in PIL and torchvision, which the registry's other users
        # (the campaign, the launcher) never need.
        from mdeq.engine.data.synthetic import make_synthetic

        shutil.rmtree(root, ignore_errors=True)
        make_synthetic(dataset, root, **sizes)
    return root, dict(options)


def smoke_run_dir(key: str, *, quick: bool = False) -> Path:
    """The folder (checkpoint and logs) of run ``key``'s smoke training."""
    return SMOKE_RUNS / ("quick" if quick else "default") / key


def train_smoke(run: RunSpec, logs_to: Path, *, quick: bool = False, variant: str = "paper", seed: int = 0) -> Path:
    """Train the smoke version of ``run`` in this process; copy its logs into ``logs_to`` and return it."""
    overrides = [*run.overrides, *smoke_overrides(run, variant, quick=quick), f"train.seed={seed}"]
    cfg = load_config(config_name(run, variant), overrides)
    root, data_options = smoke_data(cfg.data.dataset)
    steps, _, n_eval = _SMOKE_SIZES[quick][cfg.data.dataset]
    out_dir = smoke_run_dir(run.key, quick=quick)
    shutil.rmtree(out_dir, ignore_errors=True)  # a smoke run always starts afresh
    baseline_options = smoke_baseline_options(run)
    command = (f"mdeq.paper.runs.train_smoke({run.key!r}) = python -m mdeq.train --config "
               f"{config_name(run, variant)} --set {shlex.join(overrides)}"
               + (f" --baseline {run.baseline}" if run.baseline else "")
               + "".join(f" --baseline-option {k}={v}" for k, v in baseline_options.items()))
    options = RunOptions(out_dir=out_dir, data_root=root, device="cpu", workers=0, log_every=steps,
                         checkpoint_every=0, baseline=run.baseline, baseline_options=baseline_options,
                         limit_train=steps * cfg.data.batch_size,
                         limit_eval=n_eval, data_options=data_options, threads=1, progress=False,
                         command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out_dir / "train.log", "w") as log, contextlib.redirect_stdout(log), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = main(cfg, options)
        for w in caught:  # e.g. unconverged IFT solves of an untrained tiny model: logged, not shown
            print(f"warning: {w.category.__name__}: {w.message}")
    value = final.get("final")
    shown = "-" if value is None else (f"mIoU {100 * value:.1f}%" if final.get("metric") == "miou"
                                       else f"top-1 {value:.1f}%")
    print(f"smoke run {run.key} ({run.label}): {final.get('global_step')} steps, final {shown}, "
          f"{time.perf_counter() - t0:.1f} s"
          + (f", {len(caught)} warnings" if caught else "")
          + f"; log: {paths.rel(out_dir / 'train.log')}", flush=True)
    return collect_run(out_dir, logs_to)


# ----------------------------------------------------------------------------------------------
# Full profile: one mdeq.train process per run on GPUs.

def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def default_data_root(dataset: str, data_root: str = "") -> Path:
    """``<data_root>/<dataset>``; ``data_root`` holds cifar10/, imagenet/ and cityscapes/ (default data/)."""
    return (Path(data_root) if data_root else paths.DATA) / dataset


class MissingDataError(FileNotFoundError):
    """A data set the full profile trains on is not where its commands point: the first line of the message says
    what to do (put it there, or pass another ``data_root``; how to get it), the next ones the expected layout."""

    def __init__(self, errors):
        self.errors = list(errors)
        lines = []
        for e in self.errors:
            lines.append(f"{e.dataset} is not at {e.root} ({e.problem}): put it there in the expected layout, or point "
                         f"data_root (papermill -p data_root DIR, python -m mdeq.reproduce --data-root DIR) at a "
                         f"folder holding {e.dataset}/; to get it: {e.how_to_get}")
        for e in self.errors:
            lines += [f"{e.dataset}: expected layout under {e.root}:", *("  " + ln for ln in e.layout.splitlines())]
        super().__init__("\n".join(lines))


def missing_data(notebook: str, data_root: str = "") -> list:
    """The data sets the full runs of ``notebook`` read that are not where ``full_command`` points them, as
    ``DatasetNotFoundError``s (folder, problem, expected layout, download). Cheap: folders and file names only."""
    # Imported here: the data package pulls in PIL and torchvision, which the registry's other users never need.
    from mdeq.engine.data import DatasetNotFoundError, check_root

    errors = []
    for dataset in dict.fromkeys(r.dataset for r in runs_for(notebook)):
        try:
            check_root(dataset, default_data_root(dataset, data_root))
        except DatasetNotFoundError as exc:
            errors.append(exc)
    return errors


def full_command(run: RunSpec, *, variant: str = "paper", data_root: str = "", nproc: int = 1,
                 seed: int | None = None, workers: int = 8, python: str | None = None) -> list[str]:
    """The command line that trains ``run`` with the paper's protocol (``--resume`` continues a run).

    ``nproc`` > 1 launches ``torch.distributed.run`` (torchrun) with that many processes on this
    node; ``data.batch_size`` is the global batch either way.
    """
    python = python or sys.executable
    name = run_name(run, seed)
    argv = ["-m", "mdeq.train", "--config", config_name(run, variant),
            "--data-root", str(default_data_root(run.dataset, data_root)),
            "--out", str(FULL_RUNS / name), "--resume", "--workers", str(workers), "--no-progress"]
    sets = list(run.overrides)
    if seed is not None:
        sets.append(f"train.seed={seed}")
    if run.pretrained_from is not None:
        sets.append(f"train.pretrained={FULL_RUNS / run.pretrained_from / 'checkpoint.pt'}")
    if sets:
        argv += ["--set", *sets]
    if run.baseline:
        argv += ["--baseline", run.baseline]
    if nproc > 1:
        return [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *argv]
    return [python, *argv]


def processes_for(run: RunSpec, variant: str, gpus: int) -> int:
    """The most processes (<= ``gpus``) that split the run's global batch evenly (mdeq.train requires it)."""
    batch = load_config(config_name(run, variant), list(run.overrides)).data.batch_size
    return max(d for d in range(1, max(gpus, 1) + 1) if batch % d == 0)


@dataclass
class Launch:
    run: str
    command: list[str]
    status: str  # "done" (skipped), "dry-run", "ran", "failed"
    seconds: float = 0.0

    @property
    def shell(self) -> str:
        return shlex.join(self.command)


def run_full(notebook: str, *, variant: str = "paper", data_root: str = "", nproc: int = 0, seeds: int = 1,
             dry_run: bool = False, results: Path | None = None) -> list[Launch]:
    """Train every run of ``notebook`` with the paper's protocol, skipping finished ones.

    ``nproc`` 0 uses every visible GPU; ``seeds`` > 1 trains ``<key>_seed<k>`` for k < seeds (Table 1's
    five runs). Logs are copied into ``results/runs/<run>/`` after each launch, even a failed one. The data is
    checked first, dry run included (``MissingDataError``; a dry run prints it and goes on), then the GPUs.
    """
    results = Path(results) if results is not None else paths.RESULTS / "runs"
    names = [(run, seed) for run in runs_for(notebook) for seed in (range(seeds) if seeds > 1 else [None])]
    pending = any(not finished(read_json(results / run_name(run, seed) / "final.json")) for run, seed in names)
    missing = missing_data(notebook, data_root) if pending else []  # finished runs read no data
    if missing and not dry_run:
        raise MissingDataError(missing)
    if missing:
        print(f"data missing: the commands below would stop at once. {MissingDataError(missing)}", flush=True)
    n = nproc or visible_gpus()
    if not dry_run and n == 0:
        raise RuntimeError("the full profile trains on GPUs and none is visible; use profile='smoke' on a CPU, "
                           "or dry_run=True to print the commands")
    launches = []
    for run, seed in names:
        name = run_name(run, seed)
        cmd = full_command(run, variant=variant, data_root=data_root, nproc=processes_for(run, variant, n), seed=seed)
        if finished(read_json(results / name / "final.json")):
            launches.append(Launch(name, cmd, "done"))
            continue
        if dry_run:
            launches.append(Launch(name, cmd, "dry-run"))
            continue
        if run.pretrained_from and not (FULL_RUNS / run.pretrained_from / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"{name} starts from the ImageNet run {run.pretrained_from}, whose checkpoint "
                                    f"{FULL_RUNS / run.pretrained_from / 'checkpoint.pt'} is missing: run "
                                    f"notebooks/02_imagenet with profile='full' first")
        print("$", shlex.join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=paths.ROOT)
        collect_run(FULL_RUNS / name, results / name)
        status = "ran" if proc.returncode == 0 else "failed"
        launches.append(Launch(name, cmd, status, time.perf_counter() - t0))
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed with exit code {proc.returncode}: {shlex.join(cmd)}")
    return launches
