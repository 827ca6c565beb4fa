"""The reproduction's compute side and its one command: ``python -m mdeq.reproduce --profile smoke|logs|full``.

Why a module: the five notebooks stay thin (STYLE.md 4). What they compute lives here, once, for
the three profiles, and ``mdeq.report`` draws the results:

- ``smoke``: train tiny versions of every model of a notebook in-process on a synthetic copy of its
  data set (``mdeq.data.synthetic``), CPU, one thread, a few steps; logs go to ``results/smoke/``
  (``runs/notebooks/quick_outputs/`` with ``quick``), never to the real ``results/``.
- ``full``: the paper's protocol (Appendix Table 4 via the ``paper`` configs, or the released
  ``official`` ones; the XL models exist only as ``official``) on real data, one ``mdeq.train``
  process per run, through ``torch.distributed.run`` (torchrun) when more than one GPU is used.
  Checkpoints stay in ``runs/full/<run>/``; the small logs are copied into ``results/runs/<run>/``.
  A run whose ``results/runs/<run>/final.json`` says it finished is skipped; any other is launched
  with ``--resume`` (which continues from its checkpoint or starts afresh).
- ``logs``: nothing is computed.

The command runs every notebook through papermill into ``runs/reproduce/<profile>/`` and builds the
book from those executed notebooks (``book/``, Jupyter Book 1.x, warnings are errors)::

    python -m mdeq.reproduce --profile smoke            # every notebook on CPU, a few minutes each
    python -m mdeq.reproduce --profile smoke --quick    # the CI version (about a minute each)
    python -m mdeq.reproduce --profile logs             # redraw everything from results/ in seconds
    python -m mdeq.reproduce --profile full --data-root /data --dry-run   # print the GPU launches
    python -m mdeq.reproduce --only 04_cityscapes       # one notebook
    python -m mdeq.reproduce --book-only                # build the book from the committed notebooks
    python -m mdeq.reproduce --update-committed         # smoke run written into notebooks/*.ipynb, results/smoke/, figures/smoke/
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from mdeq import paths
from mdeq.report import NOTEBOOKS, PARAMETERS, PROFILES

__all__ = ["RunSpec", "RUNS", "runs_for", "config_name", "smoke_overrides", "full_command", "run_full",
           "train_smoke", "smoke_data", "measure_runtime", "convergence_traces", "cityscapes_examples",
           "execute_notebook", "build_book", "main"]

FULL_RUNS = paths.RUNS / "full"  # checkpoints of full runs (not committed)
SMOKE_RUNS = paths.RUNS / "notebooks"  # checkpoints and data of the notebooks' smoke runs (not committed)
REPRODUCE = paths.RUNS / "reproduce"  # executed notebooks and the book of `python -m mdeq.reproduce`
BOOK = paths.ROOT / "book"


# ----------------------------------------------------------------------------------------------
# The runs of each notebook.

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


RUNS: tuple[RunSpec, ...] = (
    # Table 1, without augmentation (~170K parameters): training settings of MDEQ-small for all five.
    RunSpec("cifar10_mdeq_small", "01_cifar10", "MDEQ-small", "cifar10_small_{variant}", "table1", smoke_div=2),
    RunSpec("cifar10_single_stream", "01_cifar10", "Single-stream DEQ", "cifar10_single_stream_paper", "table1",
            smoke_div=2),
    RunSpec("cifar10_resnet18_170k", "01_cifar10", "ResNet-18 (170K)", "cifar10_small_{variant}", "table1",
            baseline="resnet18_170k", smoke_div=2),
    RunSpec("cifar10_node", "01_cifar10", "Neural ODE", "cifar10_small_{variant}", "table1", baseline="node_172k",
            smoke_div=2),
    RunSpec("cifar10_anode", "01_cifar10", "Aug. Neural ODE", "cifar10_small_{variant}", "table1",
            baseline="anode_172k", smoke_div=2),
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
    if variant not in ("paper", "official"):
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


def _even(x: float, lo: int = 2) -> int:
    return max(lo, 2 * int(round(x / 2)))


def smoke_overrides(run: RunSpec, variant: str = "paper", *, quick: bool = False) -> list[str]:
    """``section.key=value`` overrides that shrink ``run``'s config into a CPU smoke run.

    Widths are divided by ``run.smoke_div`` (rounded to even numbers, GroupNorm(2)), the solver budgets
    capped at 6, batches of 2-8, a few steps per epoch, a warm-up of one epoch, smaller images for
    ImageNet (64) and Cityscapes (64 x 128 crops of 128 x 256 images). The architecture and the
    training recipe are otherwise the real config's.
    """
    from mdeq.config import load_config

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


def smoke_data(dataset: str, *, quick: bool = False) -> tuple[Path, dict]:
    """A synthetic copy of ``dataset`` under ``runs/notebooks/data`` (made once) and its builder options."""
    from mdeq.data.synthetic import make_synthetic

    root = SMOKE_RUNS / "data" / dataset
    sizes = {"cifar10": {"n_train_per_batch": 20, "n_val": 40},
             "imagenet": {"num_classes": 10, "n_train": 2, "n_val": 2},
             "cityscapes": {"n_train": 8, "n_val": 2}}[dataset]
    if not (root / "mdeq_manifest.json").is_file() and not any(root.rglob("mdeq_manifest.json")):
        shutil.rmtree(root, ignore_errors=True)
        make_synthetic(dataset, root, **sizes)
    options = {"cityscapes": {"base_size": 256}, "imagenet": {"allow_missing_classes": True}}.get(dataset, {})
    return root, options


def train_smoke(run: RunSpec, ctx, *, variant: str = "paper", seed: int = 0) -> Path:
    """Train the smoke version of ``run`` in this process; return the folder of its collected logs."""
    from mdeq.config import load_config
    from mdeq.report import collect_run
    from mdeq.train import RunOptions, main

    quick = ctx.quick
    overrides = [*run.overrides, *smoke_overrides(run, variant, quick=quick), f"train.seed={seed}"]
    cfg = load_config(config_name(run, variant), overrides)
    root, data_options = smoke_data(cfg.data.dataset, quick=quick)
    steps, _, n_eval = _SMOKE_SIZES[quick][cfg.data.dataset]
    out_dir = SMOKE_RUNS / ("quick" if quick else "default") / run.key
    shutil.rmtree(out_dir, ignore_errors=True)  # a smoke run always starts afresh
    command = (f"mdeq.reproduce.train_smoke({run.key!r}) = python -m mdeq.train --config "
               f"{config_name(run, variant)} --set {shlex.join(overrides)}"
               + (f" --baseline {run.baseline}" if run.baseline else ""))
    options = RunOptions(out_dir=out_dir, data_root=root, device="cpu", workers=0, log_every=steps,
                         checkpoint_every=0, baseline=run.baseline, limit_train=steps * cfg.data.batch_size,
                         limit_eval=n_eval, data_options=data_options, threads=1, progress=False,
                         command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    import warnings

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
          + f"; log: {(out_dir / 'train.log').relative_to(paths.ROOT)}", flush=True)
    return collect_run(out_dir, ctx.results_dir("smoke") / "runs" / run.key)


# ----------------------------------------------------------------------------------------------
# Full profile: one mdeq.train process per run on GPUs.

def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


def default_data_root(dataset: str, data_root: str = "") -> Path:
    """``<data_root>/<dataset>``; ``data_root`` holds cifar10/, imagenet/ and cityscapes/ (default data/)."""
    return (Path(data_root) if data_root else paths.DATA) / dataset


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
    from mdeq.config import load_config

    batch = load_config(config_name(run, variant), list(run.overrides)).data.batch_size
    return max(d for d in range(1, max(gpus, 1) + 1) if batch % d == 0)


def finished(results_run_dir: Path) -> bool:
    """Whether ``results/runs/<run>/final.json`` records a run that trained all its epochs."""
    path = Path(results_run_dir) / "final.json"
    if not path.is_file():
        return False
    final = json.loads(path.read_text())
    return final.get("final") is not None and not final.get("stopped_early", False)


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
    five runs). Logs are copied into ``results/runs/<run>/`` after each launch, even a failed one.
    """
    from mdeq.report import collect_run

    results = Path(results) if results is not None else paths.RESULTS / "runs"
    n = nproc or visible_gpus()
    if not dry_run and n == 0:
        raise RuntimeError("the full profile trains on GPUs and none is visible; use profile='smoke' on a CPU, "
                           "or dry_run=True to print the commands")
    launches = []
    for run in runs_for(notebook):
        for seed in (range(seeds) if seeds > 1 else [None]):
            name = run_name(run, seed)
            cmd = full_command(run, variant=variant, data_root=data_root, nproc=processes_for(run, variant, n),
                               seed=seed)
            if finished(results / name):
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


# ----------------------------------------------------------------------------------------------
# Fig. 4b: time and peak memory of one training step and one inference pass.

RUNTIME_MODELS = (  # (key, label, what): an MDEQ config (with {variant}) or a baseline name
    ("mdeq", "MDEQ", "config:cifar10_large_{variant}"),
    ("mdeq_small", "MDEQ-small", "config:cifar10_small_{variant}"),
    ("resnet18", "ResNet-18", "baseline:resnet18_10m"),
    ("resnet101", "ResNet-101", "baseline:resnet101"),
    ("anode", "ANODE", "baseline:anode_172k"),
)


def _build_runtime_model(what: str, variant: str):
    kind, name = what.split(":", 1)
    if kind == "baseline":
        from mdeq.baselines import build_baseline

        return build_baseline(name), None
    from mdeq.config import load_config
    from mdeq.model import build_model

    cfg = load_config(name.format(variant=variant))
    return build_model(cfg), cfg


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _release_memory(device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_runtime(*, batch_size: int = 32, device: str = "auto", variant: str = "paper", repeats: int = 3,
                    warmup: int = 1, models: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Time (ms per batch) of a training step (forward + backward) and of inference, and the peak
    training memory, of each model of Fig. 4b on a CIFAR-10-sized batch (3 x 32 x 32).

    MDEQs run in their implicit phase (Broyden forward with T_f, IFT backward with T_b) from their
    initial weights, so every solve uses its full budget. Memory: on a GPU the allocator's peak during
    the step (``max_memory_allocated``, weights included); on a CPU the increase of the process's peak
    resident set over its resident set before the model was built.
    """
    import torch

    from mdeq.metrics import PeakMemory
    from mdeq.report import hardware_label

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    keys = list(models) if models is not None else [m[0] for m in RUNTIME_MODELS]
    table = {m[0]: m for m in RUNTIME_MODELS}
    out: dict[str, Any] = {"batch_size": batch_size, "input": [3, 32, 32], "device": str(dev),
                           "hardware": hardware_label(str(dev)), "repeats": repeats, "warmup": warmup,
                           "variant": variant, "torch": torch.__version__, "models": {}}
    for key in keys:
        _, label, what = table[key]
        torch.manual_seed(seed)
        _release_memory(dev)
        meter = PeakMemory(dev)
        rss0 = _rss_mb()
        base_gpu = torch.cuda.memory_allocated(dev) / 2**20 if dev.type == "cuda" else 0.0
        model, cfg = _build_runtime_model(what, variant)
        model.to(dev).train()
        if getattr(model, "deq", None) is not None:
            model.deq.warn = False  # unconverged solves from the initial weights are expected here
        x = torch.randn(batch_size, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (batch_size,), device=dev)
        params = sum(p.numel() for p in model.parameters())

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        def train_step():
            model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()

        def infer():
            with torch.no_grad():
                model(x)

        times = {}
        meter.reset()
        for name, fn, mode in (("train", train_step, True), ("inference", infer, False)):
            model.train(mode)
            for _ in range(warmup):
                fn()
            sync()
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                ts.append(1000 * (time.perf_counter() - t0))
            times[name] = ts
            if name == "train":
                peak = meter.peak_mb()
                peak_mb = peak - base_gpu if dev.type == "cuda" else peak - rss0
        info = getattr(model, "last_info", None)
        nfe = {}
        if info is not None and info.forward is not None:
            nfe = {"nfe_forward": info.forward.nfe,
                   "nfe_backward": info.backward.nfe if info.backward is not None else None}
        out["models"][key] = {
            "label": label, "what": what.format(variant=variant), "params": params,
            "train_ms": float(sorted(times["train"])[len(times["train"]) // 2]), "train_ms_all": times["train"],
            "inference_ms": float(sorted(times["inference"])[len(times["inference"]) // 2]),
            "inference_ms_all": times["inference"], "peak_train_memory_mb": float(peak_mb),
            "memory_kind": meter.kind if dev.type == "cuda" else "cpu_peak_rss_increase", **nfe,
        }
        print(f"{label}: train {out['models'][key]['train_ms']:.0f} ms, inference "
              f"{out['models'][key]['inference_ms']:.0f} ms, peak {peak_mb:.0f} MB", flush=True)
        del model, x, y
    _release_memory(dev)
    return out


# ----------------------------------------------------------------------------------------------
# Figs. 5-7: solver traces.

CONVERGENCE_SETS = {  # dataset: (config with {variant}, checkpoint run key, full batch, full input size)
    "cifar10": ("cifar10_large_{variant}", "cifar10_mdeq_large_seed0", 32, (32, 32)),
    "imagenet": ("imagenet_large_{variant}", "imagenet_mdeq_large", 8, (224, 224)),
    "cityscapes": ("cityscapes_large_{variant}", "cityscapes_mdeq_large", 1, (1024, 2048)),
}
CONVERGENCE_BUDGET = {"full": {"cifar10": 50, "imagenet": 120, "cityscapes": 150},
                      "smoke": {"cifar10": 40, "imagenet": 40, "cityscapes": 40},
                      "quick": {"cifar10": 15, "imagenet": 15, "cityscapes": 15}}
_SMOKE_TRACE = {  # smoke: (batch, eval image size) per data set
    "cifar10": (8, None), "imagenet": (4, [64, 64]), "cityscapes": (1, [128, 256])}


def _trace_stats(traces: list) -> dict:
    """Mean and std over batches of the batch-mean trace; shorter traces are padded with NaN."""
    import numpy as np

    n = max(len(t) for t in traces)
    arr = np.full((len(traces), n), np.nan)
    for i, t in enumerate(traces):
        arr[i, :len(t)] = t
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(arr, axis=0)
            std = np.nanstd(arr, axis=0)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std], "n_batches": len(traces)}


def _val_batches(dataset: str, cfg, root: Path, data_options: dict, batch: int, num: int, seed: int):
    import torch
    from torch.utils.data import DataLoader

    from mdeq.data import build_dataset

    opts = {"augment": False, **data_options}
    if dataset == "imagenet":
        opts["image_size"] = cfg.data.eval_image_size[0]
    ds = build_dataset(dataset, root, "val", **opts)
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, generator=g, num_workers=0)
    out = []
    for images, targets in loader:
        out.append((images, targets))
        if len(out) == num:
            break
    return out, getattr(ds, "source_label", "unknown")


def _solve_traces(model, batches, solver: str, budget: int, device, backward: bool) -> tuple[list, list, list]:
    """Forward (and backward) relative-residual traces of ``model`` with ``solver`` on each batch."""
    import torch

    from mdeq.solvers import SOLVERS

    deq = model.deq
    deq.solver = SOLVERS[solver]
    deq.solver_options = {"memory": budget} if "memory" in SOLVERS[solver].options else {}
    deq.max_iter = deq.eval_max_iter = budget
    deq.tol = deq.eval_tol = 1e-12  # run the whole budget (or until stagnation)
    deq.stop_mode = "rel"
    deq.grad = "ift"
    deq.backward_max_iter, deq.backward_tol, deq.backward_stop_mode = budget, 1e-12, "rel"
    deq.backward_solver = SOLVERS["broyden"]
    deq.backward_options = {"memory": budget}
    deq.warn = False
    fwd, bwd, scale = [], [], []
    for images, targets in batches:
        images, targets = images.to(device), targets.to(device)
        model.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward):
            logits = model(images)
            info = model.last_info
            fwd.append(info.forward.rel_trace.float().mean(0).tolist())
            scale.append(info.forward.scale_rel_trace.float().mean(1).tolist())  # (S, nfe)
            if backward:
                if targets.dim() == 1:
                    loss = torch.nn.functional.cross_entropy(logits, targets)
                else:
                    from mdeq.model import upsample_logits

                    loss = torch.nn.functional.cross_entropy(upsample_logits(logits, targets.shape[-2:]), targets,
                                                             ignore_index=255)
                loss.backward()
                bwd.append(info.backward.rel_trace.float().mean(0).tolist())
    return fwd, bwd, scale


def convergence_traces(*, profile: str = "smoke", quick: bool = False, variant: str = "paper", data_root: str = "",
                       num_batches: int = 5, device: str = "auto", seed: int = 0,
                       checkpoints: Path | None = None) -> dict:
    """Relative residual vs f evaluations, forward (Broyden and plain iteration) and backward (Broyden),
    mean and std over ``num_batches`` validation batches, at CIFAR, ImageNet and Cityscapes resolution
    (Figs. 5/6); and per scale for MDEQ vs the single-stream DEQ on CIFAR-10 (Fig. 7).

    Weights: the full profile's checkpoints (``runs/full/<run>/checkpoint.pt``) where they exist
    ("final"), and always the initial weights ("init"). The smoke profile uses shrunken models at
    initialisation on synthetic data.
    """
    import torch

    from mdeq.checkpoint import load_pretrained
    from mdeq.config import load_config
    from mdeq.model import build_model
    from mdeq.report import hardware_label

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    checkpoints = Path(checkpoints) if checkpoints is not None else FULL_RUNS
    budgets = CONVERGENCE_BUDGET["quick" if quick else profile if profile == "smoke" else "full"]
    out: dict[str, Any] = {"profile": profile, "quick": quick, "variant": variant, "device": str(dev),
                           "hardware": hardware_label(str(dev)), "num_batches": num_batches,
                           "measure": "per-sample ||f(z) - z|| / ||f(z)||, averaged over the batch",
                           "datasets": {}, "per_scale": {}}
    for dataset, (config, ckpt_key, batch, size) in CONVERGENCE_SETS.items():
        cfg_name = config.format(variant=variant)
        overrides: list[str] = []
        if profile == "smoke":
            overrides = smoke_overrides(_smoke_spec(cfg_name), variant, quick=quick)
            batch, eval_hw = _SMOKE_TRACE[dataset]
            if quick:
                batch = max(1, batch // 2)
                if dataset == "cityscapes":
                    eval_hw = [64, 128]
            if eval_hw is not None:
                overrides.append(f"data.eval_image_size={eval_hw}")
            root, data_options = smoke_data(dataset, quick=quick)
        else:
            root, data_options = default_data_root(dataset, data_root), {}
        cfg = load_config(cfg_name, overrides)
        batches, source = _val_batches(dataset, cfg, root, data_options, batch, num_batches, seed)
        if dataset == "cityscapes" and profile == "smoke" and tuple(cfg.data.eval_image_size) != (128, 256):
            h, w = cfg.data.eval_image_size
            batches = [(x[..., :h, :w], t[..., :h, :w]) for x, t in batches]
        entry: dict[str, Any] = {"config": cfg_name, "batch": batch, "input_hw": list(batches[0][0].shape[-2:]),
                                 "data": source, "budget": budgets[dataset], "curves": {}}
        weights = [("init", None)]
        ckpt = checkpoints / ckpt_key / "checkpoint.pt"
        if profile != "smoke" and ckpt.is_file():
            weights.append(("final", ckpt))
        for tag, path in weights:
            torch.manual_seed(seed)
            model = build_model(cfg).to(dev).eval()
            if path is not None:
                load_pretrained(model, path)
            entry["params"] = sum(p.numel() for p in model.parameters())
            for solver in ("broyden", "fixed_point"):
                fwd, bwd, _ = _solve_traces(model, batches, solver, budgets[dataset], dev, backward=(solver == "broyden"))
                entry["curves"][f"{solver}_{tag}"] = {"forward": _trace_stats(fwd),
                                                      "weights": str(path) if path else "initial (N(0, 0.01) init)"}
                if bwd:
                    entry["curves"][f"{solver}_{tag}"]["backward"] = _trace_stats(bwd)
            del model
        out["datasets"][dataset] = entry
        print(f"convergence traces: {dataset} done", flush=True)
    # Fig. 7: per-scale convergence of the CIFAR-10 MDEQ-small and the single-stream DEQ.
    for key, cfg_tmpl, ckpt_key in (("mdeq", "cifar10_small_{variant}", "cifar10_mdeq_small_seed0"),
                                    ("single_stream", "cifar10_single_stream_paper", "cifar10_single_stream_seed0")):
        cfg_name = cfg_tmpl.format(variant=variant)
        overrides = smoke_overrides(_smoke_spec(cfg_name, div=2), variant, quick=quick) if profile == "smoke" else []
        cfg = load_config(cfg_name, overrides)
        if profile == "smoke":
            root, data_options = smoke_data("cifar10", quick=quick)
            batch = 4 if quick else 8
        else:
            root, data_options, batch = default_data_root("cifar10", data_root), {}, 32
        batches, source = _val_batches("cifar10", cfg, root, data_options, batch, num_batches, seed)
        torch.manual_seed(seed)
        model = build_model(cfg).to(dev).eval()
        ckpt = checkpoints / ckpt_key / "checkpoint.pt"
        tag = "init"
        if profile != "smoke" and ckpt.is_file():
            load_pretrained(model, ckpt)
            tag = "final"
        _, _, scale = _solve_traces(model, batches, "broyden", budgets["cifar10"], dev, backward=False)
        per_scale = [_trace_stats([s[i] for s in scale]) for i in range(len(scale[0]))]
        out["per_scale"][key] = {"config": cfg_name, "weights": tag, "data": source, "scales": per_scale,
                                 "channels": list(cfg.model.num_channels)}
        del model
    return out


def _smoke_spec(config: str, div: int = 8) -> RunSpec:
    """A RunSpec for a bare config (used to shrink the models of the convergence figures)."""
    dataset = config.split("_", 1)[0]
    return RunSpec(config, "05_convergence", config, config, "", smoke_div=2 if dataset == "cifar10" else div)


# ----------------------------------------------------------------------------------------------
# Fig. 8: segmentation examples.

def cityscapes_examples(run_dir: Path, out_dir: Path, *, data_root: Path, data_options: dict | None = None,
                        num: int = 2, max_width: int = 1024, device: str = "auto") -> list[dict]:
    """Predict ``num`` validation images with the checkpoint of ``run_dir`` and store input, prediction
    and ground truth (trainIds as PNG, input as JPEG) under ``out_dir``, at most ``max_width`` wide."""
    import numpy as np
    import torch
    from PIL import Image

    from mdeq.checkpoint import load_checkpoint
    from mdeq.config import config_from_dict
    from mdeq.data import build_dataset
    from mdeq.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from mdeq.model import build_model, upsample_logits

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    ckpt = load_checkpoint(Path(run_dir) / "checkpoint.pt", map_location="cpu")
    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    model.to(dev).eval()
    ds = build_dataset("cityscapes", data_root, "val", augment=False, **(data_options or {}))
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    mean = np.array(IMAGENET_MEAN)[:, None, None]
    std = np.array(IMAGENET_STD)[:, None, None]
    records = []
    for k in range(min(num, len(ds))):
        image, label = ds[k]
        with torch.no_grad():
            logits = model(image[None].to(dev))
            pred = upsample_logits(logits.float(), label.shape[-2:]).argmax(1)[0].cpu().numpy().astype(np.uint8)
        rgb = np.clip((image.numpy() * std + mean) * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
        gt = label.numpy().astype(np.uint8)
        step = max(1, int(np.ceil(gt.shape[1] / max_width)))
        files = {}
        for name, arr, ext in (("input", rgb[::step, ::step], "jpg"), ("prediction", pred[::step, ::step], "png"),
                               ("ground_truth", gt[::step, ::step], "png")):
            path = out_dir / f"example{k}_{name}.{ext}"
            Image.fromarray(arr).save(path, **({"quality": 85} if ext == "jpg" else {}))
            files[name] = path.name
        records.append({"index": k, **files})
    (out_dir / "examples.json").write_text(json.dumps({"run": Path(run_dir).name, "config": cfg.name,
                                                       "examples": records}, indent=1) + "\n")
    return records


# ----------------------------------------------------------------------------------------------
# Running the notebooks and building the book.

@contextlib.contextmanager
def kernel_for_this_python():
    """Make the ``python3`` kernel spec resolve to ``sys.executable`` (this venv), whatever else is installed.

    Why: a ``python3`` spec in the user's Jupyter folder may point at another interpreter; papermill
    would then run the notebooks without ``mdeq``. A spec folder in ``JUPYTER_PATH`` wins over those.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="mdeq-kernel-") as tmp:
        spec_dir = Path(tmp) / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (mdeq)", "language": "python"}))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp + (os.pathsep + old if old else "")
        try:
            yield "python3"
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def strip_execution_metadata(path: Path) -> None:
    """Drop papermill's timings and per-cell execution metadata, so that a re-run gives a small diff."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)


def normalize_ipynb(src: Path, dest: Path | None = None, *, drop_injected: bool = False) -> Path:
    """Write ``src`` as JupyterLab would save it: papermill's empty ``tags`` lists dropped, nbformat's layout.

    Why: the committed ``.ipynb`` must not change when a user opens and saves it unchanged.
    ``drop_injected`` removes papermill's injected-parameters cell (the committed notebooks show the
    default parameters).
    """
    import nbformat

    nb = nbformat.read(src, as_version=4)
    if drop_injected:
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for cell in nb.cells:
        if cell.metadata.get("tags") == []:
            del cell.metadata["tags"]
    dest = Path(dest) if dest is not None else Path(src)
    nbformat.write(nb, dest)
    return dest


def execute_notebook(name: str, out: Path, parameters: dict | None = None, *, timeout: int = 3600,
                     log_output: bool = False) -> float:
    """Run ``notebooks/<name>.ipynb`` with papermill into ``out``; returns the wall time in seconds."""
    import papermill as pm

    from mdeq.report import PARAMETERS

    parameters = dict(parameters or {})
    unknown = sorted(set(parameters) - set(PARAMETERS[name]))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {name}; valid: {list(PARAMETERS[name])}")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with kernel_for_this_python() as kernel:
        pm.execute_notebook(str(paths.NOTEBOOKS / f"{name}.ipynb"), str(out), parameters=parameters,
                            kernel_name=kernel, cwd=str(paths.ROOT), progress_bar=False, log_output=log_output,
                            execution_timeout=timeout)
    return time.perf_counter() - t0


def build_book(notebooks_dir: Path, out: Path, *, strict: bool = True) -> Path:
    """Stage ``book/`` with the executed notebooks of ``notebooks_dir`` under ``out`` and build it with
    Jupyter Book 1.x (no execution, warnings are errors). Returns the HTML folder."""
    stage = Path(out) / "book_src"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "book" / "notebooks").mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml", "intro.md", "paper_vs_released.md"):
        shutil.copyfile(BOOK / name, stage / "book" / name)
    shutil.copyfile(paths.ROOT / "README.md", stage / "README.md")  # intro.md includes ../README.md
    (stage / "docs").mkdir()
    shutil.copyfile(paths.ROOT / "docs" / "paper_vs_released.md", stage / "docs" / "paper_vs_released.md")
    missing = [n for n in NOTEBOOKS if not (Path(notebooks_dir) / f"{n}.ipynb").is_file()]
    if missing:
        raise FileNotFoundError(f"{notebooks_dir} lacks the executed notebooks {missing}")
    for n in NOTEBOOKS:
        shutil.copyfile(Path(notebooks_dir) / f"{n}.ipynb", stage / "book" / "notebooks" / f"{n}.ipynb")
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(stage / "book"), "--path-output", str(out)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the book build failed ({shlex.join(cmd)}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return Path(out) / "_build" / "html"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdeq.reproduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--profile", default="smoke", choices=PROFILES)
    p.add_argument("--quick", action="store_true", help="smoke only: the short version the tests run")
    p.add_argument("--only", nargs="+", choices=NOTEBOOKS, default=None, metavar="NOTEBOOK",
                   help=f"run only these notebooks ({', '.join(NOTEBOOKS)})")
    p.add_argument("--data-root", default="", help="full: folder holding cifar10/, imagenet/ and cityscapes/ "
                   "(default data/)")
    p.add_argument("--variant", default="paper", choices=("paper", "official"))
    p.add_argument("--nproc", type=int, default=0, help="full: GPUs per run (0: all visible)")
    p.add_argument("--dry-run", action="store_true", help="full: print the training commands, launch nothing")
    p.add_argument("--out", default=None, help="folder for the executed notebooks and the book "
                   "(default runs/reproduce/<profile>[-quick])")
    p.add_argument("--no-book", action="store_true", help="do not build the book")
    p.add_argument("--book-only", action="store_true", help="only build the book from the committed notebooks")
    p.add_argument("--update-committed", "--update-notebooks", dest="update_committed", action="store_true",
                   help="smoke (default parameters) only: write the committed reference outputs "
                        "(results/smoke/, figures/smoke/, and the executed notebooks into notebooks/)")
    args = p.parse_args(argv)
    if args.quick and args.profile != "smoke":
        p.error("--quick applies to the smoke profile only")
    if args.update_committed and (args.profile != "smoke" or args.quick or args.only):
        p.error("--update-committed writes the committed notebooks and smoke outputs: only with the default "
                "smoke profile, without --quick and --only")
    label = args.profile + ("-quick" if args.quick else "")
    out = Path(args.out) if args.out else REPRODUCE / label
    if args.book_only:
        html = build_book(paths.NOTEBOOKS, out)
        print(f"book: {html / 'index.html'}")
        return 0
    names = args.only or list(NOTEBOOKS)
    times = {}
    for name in names:
        spec = PARAMETERS[name]
        params: dict[str, Any] = {"profile": args.profile}
        if args.quick:
            params["quick"] = True
        if args.profile == "full":
            for key, value in (("data_root", args.data_root), ("variant", args.variant), ("nproc", args.nproc),
                               ("dry_run", args.dry_run)):
                if key in spec:
                    params[key] = value
        params = {k: v for k, v in params.items() if v != spec[k][1]}  # defaults: no injected cell
        if args.update_committed:
            params["output_root"] = str(paths.ROOT)  # the injected cell is dropped again below
        print(f"== {name} ({label})" + (f" {params}" if params else ""), flush=True)
        times[name] = execute_notebook(name, out / f"{name}.ipynb", params)
        strip_execution_metadata(out / f"{name}.ipynb")
        print(f"   {times[name]:.1f} s -> {out / f'{name}.ipynb'}", flush=True)
    (out / "timings.json").write_text(json.dumps({"profile": label, "seconds": times}, indent=1) + "\n")
    if args.update_committed:
        for name in names:
            normalize_ipynb(out / f"{name}.ipynb", paths.NOTEBOOKS / f"{name}.ipynb", drop_injected=True)
        print("updated notebooks/*.ipynb, results/smoke/ and figures/smoke/ with the executed smoke run")
    if not args.no_book:
        if set(names) != set(NOTEBOOKS):
            for n in NOTEBOOKS:  # the book needs all five: take the committed ones for the others
                if not (out / f"{n}.ipynb").is_file():
                    shutil.copyfile(paths.NOTEBOOKS / f"{n}.ipynb", out / f"{n}.ipynb")
        html = build_book(out, out)
        print(f"book: {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
