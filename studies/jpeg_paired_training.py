"""What does training on JPEG-q75 cost? ResNet-18 (170K) trained on the same images, exact or JPEG.

The 5,170 CIFAR-10 training images whose exact pixels are known are trained on twice with Table 1's
recipe (``cifar10_small_paper``'s protocol: Adam 1e-3, cosine, 50 epochs, batch 128, no augmentation):
once with their exact pixels, once as their JPEG-q75 twins (``--data-option rows=exact_known
exact_pixels=...``: same images, same order, same seed), for each of ``--seeds``. Every trained model
is then evaluated on both versions of the 1,017 exactly known test images, giving the 2x2 matrix
(train exact/JPEG x test exact/JPEG) as mean +- std over seeds in ``results/jpeg_paired_training.json``.

At 5,170 images the model is far from the 50,000-image regime of Table 1 (it fits its training set
and generalises much worse), so the matrix bounds the effect of JPEG at this scale only; it is not
subtracted from any Table 1 number. Each run is a resumable ``mdeq.train`` folder under
``runs/jpeg_paired/`` (a finished run is not trained again); its small logs are copied to
``results/jpeg_paired/<run>/``.

    python studies/jpeg_paired_training.py --seeds 0 1 2 3 4 --threads 2
    python studies/jpeg_paired_training.py --render   # re-draw results/jpeg_paired_training.md from the JSON

The ``.md`` file is the part of the book's page "Why our Table 1 differs" (docs/table1_gaps.md) that shows the
matrix: ``render`` draws it from the JSON alone (or says "not run yet" when there is none).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json
# A sibling study: a script's own folder is on sys.path when it runs (the tests add it).
from jpeg_sensitivity import EXACT, JPEG, correct, load_run

SIDES = {"exact": True, "jpeg": False}  # training pixels: exact_pixels option
WORK = ROOT / "runs" / "jpeg_paired"
LOGS = ("metrics.csv", "provenance.json", "final.json")


def train(side: str, seed: int, args) -> Path:
    out = (WORK if not args.set else WORK.with_name("jpeg_paired_check")) / f"{side}_seed{seed}"
    if (out / "final.json").is_file():
        return out
    cmd = [sys.executable, "-m", "mdeq.train", "--config", "cifar10_small_paper", "--baseline", "resnet18_170k",
           "--data-root", args.data_root, "--out", str(out.relative_to(ROOT)), "--resume",
           "--threads", str(args.threads), "--workers", "0", "--no-progress", "--log-every", "50",
           "--data-option", "source=jpeg_q75", f"exact_subset={args.exact}", "rows=exact_known",
           f"exact_pixels={str(SIDES[side]).lower()}", "--set", f"train.seed={seed}", *args.set]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    if args.set:  # a shortened check: its logs are not results
        return out
    dest = ROOT / "results" / "jpeg_paired" / out.name
    dest.mkdir(parents=True, exist_ok=True)
    for name in LOGS:
        shutil.copyfile(out / name, dest / name)
    return out


def test_sets(args) -> tuple[dict[str, np.ndarray], np.ndarray]:
    from mdeq.engine.data import build_dataset

    sets = {side: build_dataset("cifar10", ROOT / args.data_root, "val", source="jpeg_q75",
                                exact_subset=ROOT / args.exact, rows="exact_known", exact_pixels=exact)
            for side, exact in SIDES.items()}
    labels = sets["exact"].labels.numpy()
    return {side: ds.images.numpy() for side, ds in sets.items()}, labels


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2, 3, 4])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--exact", default=EXACT)
    p.add_argument("--data-root", default=JPEG)
    p.add_argument("--set", nargs="*", default=[], help="config overrides for a shortened check (never a result)")
    p.add_argument("--out", type=Path, default=Path("results") / "jpeg_paired_training.json")
    p.add_argument("--render", action="store_true", help="only re-draw the .md from the JSON (or 'not run yet')")
    args = p.parse_args()
    if args.render:
        out = ROOT / args.out
        out.with_suffix(".md").write_text(render(json.loads(out.read_text()) if out.is_file() else None))
        print(f"wrote {out.with_suffix('.md')}")
        return 0
    torch.set_num_threads(args.threads)
    images, labels = test_sets(args)
    acc = {(train_side, test_side): [] for train_side in SIDES for test_side in SIDES}
    runs = {}
    for seed in args.seeds:
        for side in SIDES:
            model, trained = load_run(train(side, seed, args))
            runs[f"{side}_seed{seed}"] = {"checkpoint_sha256": trained.sha256, "epochs": int(trained.epoch)}
            for test_side, ims in images.items():
                a = 100.0 * float(correct(model, ims, labels, 128).mean())
                runs[f"{side}_seed{seed}"][f"test_{test_side}"] = a
                acc[(side, test_side)].append(a)
    matrix = {f"train_{t}_test_{e}": {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                                      "n": len(v)} for (t, e), v in acc.items()}
    record = {"study": "jpeg_paired_training", "model": "resnet18_170k", "protocol": "cifar10_small_paper",
              "train_images": "the 5,170 CIFAR-10 training images whose exact pixels are known",
              "test_images": f"the {len(labels):,} CIFAR-10 test images whose exact pixels are known",
              "overrides": args.set, "seeds": args.seeds, "matrix": matrix, "runs": runs,
              "provenance": script_provenance(args, "cpu", folder="studies")}
    write_json(ROOT / args.out, record)
    if not args.set:
        (ROOT / args.out).with_suffix(".md").write_text(render(record))
    for key, m in matrix.items():
        print(f"{key}: {m['mean']:.2f} +- {m['std'] if m['std'] is not None else float('nan'):.2f} (n={m['n']})")
    return 0


def _pm(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def render(record: dict | None) -> str:
    """The Markdown part of the page: the 2x2 matrix, the paired differences and each run, from the JSON alone."""
    if record is None:
        return ("**Not run yet.** The study is `python studies/jpeg_paired_training.py --seeds 0 1 2 3 4 "
                "--threads 2`; it writes `results/jpeg_paired_training.json` and redraws this part of the page.\n")
    runs, seeds, prov = record["runs"], record["seeds"], record["provenance"]
    acc = {(t, e): [runs[f"{t}_seed{s}"][f"test_{e}"] for s in seeds] for t in SIDES for e in SIDES}
    from mdeq.engine.runlog import describe_hardware

    hw = prov.get("hardware", {})
    lines = [f"*Measured at 5,170 training images, not at Table 1's 50,000.* ResNet-18 (170K) with Table 1's recipe "
             f"({record['protocol']}: Adam 1e-3, cosine, 50 epochs, batch 128, no augmentation), trained on "
             f"{record['train_images']}, with their exact pixels or as their JPEG-q75 twins (same images, order and "
             f"seed), seeds {', '.join(map(str, seeds))}; every model tested on {record['test_images']}, exact and "
             f"JPEG-q75. Test accuracy (%), mean ± std over the {len(seeds)} seeds. Hardware: "
             f"{describe_hardware(hw)}; commit `{str(prov.get('git_commit', '?'))[:10]}`; {prov.get('date', '?')}; "
             f"`{prov.get('command', '?')}`.",
             "", "| trained on | tested on exact | tested on JPEG-q75 |", "| --- | --- | --- |"]
    for t in SIDES:
        name = "exact pixels" if t == "exact" else "JPEG-q75"
        lines.append(f"| {name} | {_pm(acc[t, 'exact'])} | {_pm(acc[t, 'jpeg'])} |")
    diff = {e: [a - b for a, b in zip(acc["exact", e], acc["jpeg", e])] for e in SIDES}
    lines += ["", "Paired by seed (same seed, same images, only the training pixels differ), trained on exact minus "
              f"trained on JPEG: {_pm(diff['exact'])} points on the exact test images, {_pm(diff['jpeg'])} on their "
              "JPEG twins.", "", "| run | epochs | tested on exact | tested on JPEG-q75 |", "| --- | --- | --- | --- |"]
    for s in seeds:
        for t in SIDES:
            r = runs[f"{t}_seed{s}"]
            lines.append(f"| {t}, seed {s} | {r['epochs']} | {r['test_exact']:.2f} | {r['test_jpeg']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
