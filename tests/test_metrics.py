"""Metrics: running averages, top-k, the confusion matrix against brute force and against the Cityscapes
benchmark's own evaluation (cityscapesscripts), and the peak-memory meter."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import importorskip
from mdeq.engine.metrics import ConfusionMatrix, MetricLogger, PeakMemory, SmoothedValue, accuracy, topk_correct


def test_smoothed_value_window_and_global_average():
    v = SmoothedValue(window_size=2)
    v.update(1.0, n=1)
    v.update(3.0, n=3)
    v.update(5.0, n=1)
    assert v.value == 5.0 and v.avg == 4.0 and v.max == 5.0
    assert v.global_avg == pytest.approx((1 + 9 + 5) / 5)
    assert math.isnan(SmoothedValue().global_avg)


def test_metric_logger_skips_missing_values():
    m = MetricLogger()
    m.update(n=2, loss=1.0, nfe_backward=None, rel=float("nan"))
    m.update(n=2, loss=3.0, acc=torch.tensor(50.0))
    assert m.global_avgs() == {"loss": 2.0, "acc": 50.0}
    assert "nfe_backward" not in m and "loss" in str(m)


def test_topk():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    target = torch.tensor([2, 0, 0])
    assert topk_correct(logits, target, (1, 2, 5)) == [1, 2, 3]  # k capped at the number of classes
    assert accuracy(logits, target, (1,)) == [pytest.approx(100 / 3)]
    with pytest.raises(ValueError, match="expected logits"):
        topk_correct(logits, target[:2])


def test_confusion_matrix_against_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 5
    target = torch.randint(0, n, (4, 7, 9), generator=g)
    target[0, :3] = 255
    pred = torch.randint(0, n, (4, 7, 9), generator=g)
    cm = ConfusionMatrix(n, ignore_index=255)
    cm.update(target[:2], pred[:2])
    cm.update(target[2:], pred[2:])
    t, p = target.flatten().numpy(), pred.flatten().numpy()
    keep = t != 255
    ref = np.zeros((n, n), dtype=np.int64)
    for a, b in zip(t[keep], p[keep]):
        ref[a, b] += 1
    assert np.array_equal(cm.mat.numpy(), ref)
    r = cm.compute()
    iou = [ref[c, c] / (ref[c].sum() + ref[:, c].sum() - ref[c, c]) for c in range(n)]
    assert r["iou"] == pytest.approx(iou)
    assert r["miou"] == pytest.approx(np.mean(iou))
    assert r["pixel_acc"] == pytest.approx(100 * np.trace(ref) / ref.sum())


def test_confusion_matrix_absent_class_and_bad_prediction():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]))
    r = cm.compute()
    assert math.isnan(r["iou"][2])  # neither in the labels nor predicted: left out of the mean
    assert r["miou"] == pytest.approx((0.5 + 0.5) / 2)
    with pytest.raises(ValueError, match="predictions must lie"):
        cm.update(torch.tensor([0]), torch.tensor([3]))


def test_miou_matches_cityscapesscripts(tmp_path):
    """Our confusion-matrix mIoU equals cityscapesscripts' evaluatePixelLevelSemanticLabeling on labelId PNGs."""
    PIL = importorskip("PIL.Image")
    ev = importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from cityscapesscripts.helpers.labels import labels as cs_labels, trainId2label

    from mdeq.engine.data import CITYSCAPES_CLASSES, label_ids_to_train_ids

    rng = np.random.default_rng(0)
    valid_ids = np.array([lab.id for lab in cs_labels if lab.id >= 0])  # void ids included
    train_to_id = np.array([trainId2label[t].id for t in range(19)])
    ours = ConfusionMatrix(19, ignore_index=255)
    gts, preds = [], []
    for k in range(3):
        gt = rng.choice(valid_ids, size=(24, 40)).astype(np.uint8)
        gt[:8, :10] = 26  # a car block the prediction partly gets right
        pred_train = rng.integers(0, 19, size=gt.shape)
        gt_train = label_ids_to_train_ids(gt)
        agree = (rng.random(gt.shape) < 0.6) & (gt_train != 255)
        pred_train[agree] = gt_train[agree]
        if k == 0:
            pred_train[pred_train == 18] = 17  # one class never predicted in one image
        gt_path, pred_path = tmp_path / f"c_{k:06d}_000019_gtFine_labelIds.png", tmp_path / f"c_{k:06d}_pred.png"
        PIL.fromarray(gt).save(gt_path)
        PIL.fromarray(train_to_id[pred_train].astype(np.uint8)).save(pred_path)
        gts.append(str(gt_path))
        preds.append(str(pred_path))
        ours.update(torch.from_numpy(gt_train.astype(np.int64)), torch.from_numpy(pred_train))

    args = ev.CArgs()
    for name, value in dict(evalInstLevelScore=False, evalPixelAccuracy=False, evalLabels=[], printRow=5,
                            normalized=True, colorized=False, bold="", nocol="", JSONOutput=False, quiet=True,
                            avgClassSize=ev.args.avgClassSize, exportFile=str(tmp_path / "r.json")).items():
        setattr(args, name, value)
    result = ev.evaluateImgLists(preds, gts, args)
    r = ours.compute()
    assert r["miou"] == pytest.approx(result["averageScoreClasses"], abs=1e-12)
    theirs = [result["classScores"][name] for name in CITYSCAPES_CLASSES]
    assert r["iou"] == pytest.approx(theirs, abs=1e-12)


def test_peak_memory_cpu_sees_a_large_allocation():
    """Run in a fresh process: in a long test session freed heap pages can absorb the allocation.

    Not timing-dependent: 64 MiB written in full are 64 MiB of resident anonymous pages (a tensor this size
    is mmap'ed afresh by glibc), whatever the load; the bounds allow the interpreter's own few MiB."""
    code = (
        "import torch\n"
        "from mdeq.engine.metrics import PeakMemory\n"
        "mem = PeakMemory('cpu'); mem.reset(); before = mem.peak_mb()\n"
        "x = torch.ones(64 * 2**20 // 4); x += 1\n"
        "after = mem.peak_mb(); del x\n"
        "mem.reset(); again = mem.peak_mb()\n"
        "print(mem.kind, after - before, again - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith("cpu_")
    assert 60 < float(out[1]) < 80  # the 64 MiB, in MiB
    if out[0] == "cpu_peak_rss":  # a meter that can be reset forgets the freed 64 MiB
        assert float(out[2]) < 16
