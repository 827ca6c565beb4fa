"""How sensitive is each trained Table 1 model to the JPEG artifacts that our whole training set carries?

Our CIFAR-10 is the JPEG-q75 re-encoding of all 60,000 images, with the exact pixels known for 1,017
test images (the first rows of the official ``test_batch``). Each committed Table 1 checkpoint
(``results/runs/<run>/checkpoint.pt``, inference only, eval mode, the run's own config; runs with no
evaluated epoch yet are listed as skipped) classifies
those 1,017 images

- with their exact pixels (``exact``),
- as the data set's JPEG-q75 twins (``dataset_q75``: the files the training set is made of),
- re-encoded from the exact pixels by PIL at each ``--qualities`` level (``pil_q<Q>``: PIL's JPEG encoder,
  ``Image.save(format="JPEG", quality=Q)`` with PIL's defaults otherwise: 4:2:0 chroma subsampling,
  no optimisation, baseline),

and each version's PSNR against the exact pixels (over all pixels of the 1,017 images), its accuracy
and McNemar's test against ``exact`` (the discordant pairs b = right on exact only, c = right on the
version only; chi-squared with continuity correction and the exact two-sided binomial p-value) are
written to ``results/jpeg_sensitivity.json``. Drawn in ``01_cifar10`` (logs profile).

    python studies/jpeg_sensitivity.py --threads 2
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch

from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json

RUNS = ("cifar10_resnet18_170k", "cifar10_mdeq_small", "cifar10_mdeq_small_simple_injection",
        "cifar10_single_stream", "cifar10_anode", "cifar10_node")
EXACT = "data/cifar10-partial-exact/cifar10_exact_prefix_subset.npz"
JPEG = "data/cifar10-jpeg-q75"


def exact_and_twins(exact_path: Path, jpeg_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact, dataset_q75, labels): uint8 (N, 3, 32, 32) twice and int64 (N,) for the exact test images."""
    from mdeq.engine.data.cifar10 import _find_npz, load_jpeg_npz

    with np.load(exact_path) as npz:
        exact = npz["test_batch_data"].reshape(-1, 3, 32, 32)
        labels = npz["test_batch_labels"].astype(np.int64)[: exact.shape[0]]
    jpeg, jpeg_labels, _ = load_jpeg_npz(_find_npz(jpeg_root), train=False)
    if not np.array_equal(jpeg_labels[: exact.shape[0]], labels):
        raise SystemExit(f"{exact_path} and {jpeg_root}: the labels of test_batch differ (not the same order)")
    return exact, jpeg[: exact.shape[0]], labels


def pil_jpeg(images: np.ndarray, quality: int) -> np.ndarray:
    """Each image encoded by PIL as JPEG at ``quality`` (defaults otherwise) and decoded again."""
    from PIL import Image

    out = np.empty_like(images)
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im.transpose(1, 2, 0)).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as dec:
            out[i] = np.asarray(dec.convert("RGB")).transpose(2, 0, 1)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def mcnemar(ref: np.ndarray, other: np.ndarray) -> dict:
    """McNemar's test of two paired correctness vectors: discordant counts, chi-squared (continuity
    corrected) and the exact two-sided binomial p-value."""
    b = int(np.sum(ref & ~other))
    c = int(np.sum(~ref & other))
    n = b + c
    chi2 = (abs(b - c) - 1) ** 2 / n if n else 0.0
    p = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n) if n else 1.0
    return {"b_right_on_exact_only": b, "c_right_on_version_only": c, "chi2": chi2, "p_exact": p}


def load_run(folder: Path):
    """(model in eval mode, the ``mdeq.paper.trained.Trained`` record) of a run folder: its config, weights (one read,
    hashed: a campaign may replace the file while this runs) and baseline, as ``python -m mdeq.evaluate`` loads them."""
    from mdeq.paper.trained import build_trained, load_run as load_trained

    trained = load_trained(folder)
    model = build_trained(trained)
    if hasattr(model, "deq"):
        model.deq.warn = False
    return model, trained


@torch.no_grad()
def correct(model, images: np.ndarray, labels: np.ndarray, batch: int) -> np.ndarray:
    from mdeq.engine.data.transforms import CIFAR10Transform

    tf = CIFAR10Transform(augment=False)
    right = []
    for i in range(0, len(images), batch):
        x = torch.stack([tf(torch.from_numpy(im)) for im in images[i:i + batch]])
        right.append(model(x).argmax(1).numpy() == labels[i:i + batch])
    return np.concatenate(right)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="*", default=list(RUNS), help="runs under results/runs/ (absent ones are skipped)")
    p.add_argument("--qualities", type=int, nargs="*", default=[95, 90, 75, 50, 30])
    p.add_argument("--exact", default=EXACT)
    p.add_argument("--data-root", default=JPEG)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results") / "jpeg_sensitivity.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for path in (args.exact, args.data_root):
        if not (ROOT / path).exists():
            raise SystemExit(f"{path} does not exist: the exact test images and the JPEG-q75 set are needed "
                             "(docs/cpu_campaign.md)")
    exact, twins, labels = exact_and_twins(ROOT / args.exact, ROOT / args.data_root)
    versions = {"exact": exact, "dataset_q75": twins, **{f"pil_q{q}": pil_jpeg(exact, q) for q in args.qualities}}
    record = {"benchmark": "jpeg_sensitivity", "images": int(len(labels)),
              "images_what": "the CIFAR-10 test images whose exact pixels are known (first rows of test_batch)",
              "encoder": {"library": "PIL", "version": __import__("PIL").__version__,
                          "settings": "Image.save(format='JPEG', quality=Q), PIL defaults otherwise (4:2:0, baseline)"},
              "psnr_db": {name: psnr(exact, im) for name, im in versions.items() if name != "exact"},
              "runs": {}, "skipped": {}, "provenance": script_provenance(args, "cpu", folder="studies")}
    for run in args.runs:
        folder = ROOT / "results" / "runs" / run
        if not (folder / "checkpoint.pt").is_file():
            record["skipped"][run] = "no committed checkpoint"
            continue
        model, trained = load_run(folder)
        if not trained.epoch:
            record["skipped"][run] = f"step {trained.global_step}: no epoch evaluated yet"
            print(f"{run}: {record['skipped'][run]}, skipped", flush=True)
            continue
        right = {name: correct(model, im, labels, args.batch) for name, im in versions.items()}
        record["runs"][run] = {
            "checkpoint_sha256": trained.sha256,
            "global_step": int(trained.global_step), "epoch": int(trained.epoch),
            "epochs_planned": int(trained.cfg.train.epochs),
            "accuracy": {name: 100.0 * float(r.mean()) for name, r in right.items()},
            "mcnemar_vs_exact": {name: mcnemar(right["exact"], r) for name, r in right.items() if name != "exact"},
        }
        acc = record["runs"][run]["accuracy"]
        print(f"{run} (step {trained.global_step}): " + ", ".join(f"{k} {v:.1f}" for k, v in acc.items()), flush=True)
    write_json(ROOT / args.out, record)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
