"""What the trained Cityscapes MDEQ predicts on validation images: Fig. 8, the segmentation examples.

``cityscapes_examples`` writes the input (JPEG), the prediction and the ground truth (trainIds as PNG) and an
``examples.json`` that lists them; it draws nothing (the notebook shows the images).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mdeq.engine.checkpoint import load_checkpoint
from mdeq.core.config import config_from_dict
from mdeq.engine.data import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from mdeq.core.heads import upsample_logits
from mdeq.core.model import build_model
from mdeq.engine.build import resolve_device

__all__ = ["cityscapes_examples"]


def cityscapes_examples(run_dir: Path, out_dir: Path, *, data_root: Path, data_options: dict | None = None,
                        num: int = 2, max_width: int = 1024, device: str = "auto") -> list[dict]:
    """Predict ``num`` validation images with the checkpoint of ``run_dir`` and store input, prediction
    and ground truth (trainIds as PNG, input as JPEG) under ``out_dir``, at most ``max_width`` wide."""
    dev = resolve_device(device)
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
