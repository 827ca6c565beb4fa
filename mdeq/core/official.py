"""How the authors' released checkpoints become ours: their state dicts converted, parameter counts side by side.

Why: the released ImageNet/Cityscapes weights are the fastest check that our f_theta is theirs, and
the parameter counts are where the paper, its Appendix Table 4 and the released configs disagree
(``docs/paper_vs_released.md#parameter-counts``). Both old (locuslab/mdeq) and v2 (locuslab/deq MDEQ-Vision)
layouts are read: ``fullstage.*`` holds f_theta with weight norm as ``weight_g``/``weight_v``; the
old layout also holds the frozen copies ``fullstage_copy.*`` / ``deq.func_copy.*`` and the alias
``deq.func.*``, which are dropped.

    python -m mdeq.core.official --counts
    python -m mdeq.core.official --convert released.pth converted.pt --config imagenet_small_official
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from mdeq.core.config import ExperimentConfig, available_configs, load_config
from mdeq.core.model import build_model

__all__ = ["convert_state_dict", "load_official", "parameter_counts", "RELEASED", "PAPER_PARAMS"]

# config -> (the key/shape list of a released checkpoint in tests/data/official_state_dicts, its trainable parameters).
# The paper variants listed have exactly the architecture of a released config (GroupNorm groups
# differ, which changes no shape); the others have none.
RELEASED: dict[str, tuple[str, int]] = {
    "cifar10_small_official": ("cifar_TINY.json", 158_986),
    "cifar10_small_paper": ("first_commit/cifar_TINY_17c0119.json", 175_418),
    "cifar10_small_first_commit_official": ("first_commit/cifar_TINY_17c0119.json", 175_418),
    "cifar10_large_official": ("cifar_LARGE.json", 11_098_398),
    "imagenet_small_official": ("imagenet_SMALL.json", 16_808_936),
    "imagenet_large_official": ("imagenet_LARGE_v2.json", 67_063_624),
    "imagenet_xl_official": ("imagenet_XL.json", 90_463_280),  # = imagenet_LARGE_old.json
    "cityscapes_small_official": ("cityscapes_SMALL.json", 8_968_467),
    "cityscapes_small_paper": ("cityscapes_SMALL.json", 8_968_467),
    "cityscapes_large_official": ("cityscapes_LARGE.json", 55_955_859),
    "cityscapes_large_paper": ("cityscapes_LARGE.json", 55_955_859),
    "cityscapes_xl_official": ("cityscapes_XL.json", 79_551_755),
}

# model (config name without its variant) -> the size the paper reports (Tables 1-3).
PAPER_PARAMS: dict[str, tuple[str, float]] = {
    "cifar10_small": ("170K", 170e3),
    "cifar10_small_simple_injection": ("170K", 170e3),  # MDEQ-small variants
    "cifar10_small_first_commit": ("170K", 170e3),
    "cifar10_single_stream": ("170K", 170e3),
    "cifar10_large": ("10M", 10e6),
    "imagenet_small": ("18M", 18e6),
    "imagenet_large": ("63M", 63e6),
    "imagenet_xl": ("81M", 81e6),
    "cityscapes_small": ("7.8M", 7.8e6),
    "cityscapes_large": ("53.0M", 53.0e6),
    "cityscapes_xl": ("70.9M", 70.9e6),
}

_DROPPED = ("fullstage_copy.", "deq.func_copy.", "deq.func.")

# (official key pattern, our key template), matched with re.fullmatch in this order.
_RULES = [(re.compile(p), t) for p, t in [
    (r"downsample\.(\d+)\.(.+)", r"stem.\1.\2"),
    (r"stage0\.(\d+)\.(.+)", r"injection.\1.\2"),
    (r"fullstage\.branches\.(\d+)\.blocks\.0\.(conv[12]\.weight_[gv]|gn[123]\.(?:weight|bias))",
     r"deq.func.blocks.\1.\2"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.conv\.weight", r"deq.func.fusion.paths.\1.\2.conv.weight"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.gnorm\.(weight|bias)", r"deq.func.fusion.paths.\1.\2.gn.\3"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.(\d+)\.conv\.weight",
     r"deq.func.fusion.paths.\1.\2.\3.conv.weight"),
    (r"fullstage\.fuse_layers\.(\d+)\.(\d+)\.net\.(\d+)\.gnorm\.(weight|bias)",
     r"deq.func.fusion.paths.\1.\2.\3.gn.\4"),
    (r"fullstage\.post_fuse_layers\.(\d+)\.conv\.(weight_[gv])", r"deq.func.post.\1.conv.\2"),
    (r"fullstage\.post_fuse_layers\.(\d+)\.gnorm\.(weight|bias)", r"deq.func.post.\1.gn.\2"),
    (r"incre_modules\.(\d+)\.0\.((?:conv|bn)[123]\..+)", r"head.increase.\1.\2"),
    (r"incre_modules\.(\d+)\.0\.downsample\.([01])\.(.+)", r"head.increase.\1.shortcut.\2.\3"),
    (r"downsamp_modules\.(\d+)\.([01])\.(.+)", r"head.downsample.\1.\2.\3"),
    (r"final_layer\.([01])\.(.+)", r"head.final.\1.\2"),
    (r"classifier\.(weight|bias)", r"head.classifier.\1"),
    (r"last_layer\.0\.(.+)", r"head.conv.\1"),
    (r"last_layer\.1\.(.+)", r"head.bn.\1"),
    (r"last_layer\.3\.(.+)", r"head.classifier.\1"),
]]


def _our_key(official_key: str) -> str:
    for pattern, template in _RULES:
        match = pattern.fullmatch(official_key)
        if match:
            return match.expand(template)
    raise KeyError(f"no rule maps the released key {official_key!r} to this implementation")


def _expected_shapes(target: ExperimentConfig | nn.Module) -> dict[str, torch.Size]:
    """Our state-dict shapes; a config is built on the meta device (shapes only, no memory)."""
    if isinstance(target, nn.Module):
        return {k: v.shape for k, v in target.state_dict().items()}
    with torch.device("meta"):
        model = build_model(target)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_state_dict(official: Mapping[str, Tensor], target: ExperimentConfig | nn.Module) -> dict[str, Tensor]:
    """Rename a released state dict (old or v2 layout) to ours and check it against ``target``.

    ``target`` is the config of the matching ``*_official`` variant (or a built model). The result
    loads with ``model.load_state_dict(..., strict=True)``. A leading ``module.`` (DataParallel) is
    stripped; frozen copies are dropped. Raises KeyError naming any key without a counterpart, and
    ValueError naming both keys for a shape that does not fit.
    """
    sd = dict(official)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not any(k.startswith("fullstage.") for k in sd):  # only the alias survived: use it as fullstage
        sd = {("fullstage." + k[len("deq.func."):] if k.startswith("deq.func.") else k): v for k, v in sd.items()}
    expected = _expected_shapes(target)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.startswith(_DROPPED):
            continue
        ours = _our_key(key)
        if ours not in expected:
            raise KeyError(f"the released key {key!r} maps to {ours!r}, which this model does not have; "
                           f"is the checkpoint from the architecture of this config?")
        if tuple(value.shape) != tuple(expected[ours]):
            raise ValueError(f"shape mismatch: released {key!r} has {tuple(value.shape)}, our {ours!r} "
                             f"expects {tuple(expected[ours])}")
        out[ours] = value
    missing = [k for k in expected if k not in out]
    if missing:
        raise KeyError(f"the released state dict has nothing for {len(missing)} of our keys, e.g. {missing[:5]}")
    return {k: out[k] for k in expected}


def load_official(path: str | Path, target: ExperimentConfig | nn.Module) -> dict[str, Tensor]:
    """Read a released checkpoint file (a bare state dict or one under 'state_dict') and convert it."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return convert_state_dict(obj, target)


def _model_name(config_name: str) -> str:
    return re.sub(r"_(paper|official|smoke)$", "", config_name)


def parameter_counts(names: list[str] | None = None) -> list[dict]:
    """One row per config: trainable parameters of ours, of the released model (if any), of the paper."""
    rows = []
    for name in names or available_configs():
        cfg = load_config(name)
        with torch.device("meta"):
            model = build_model(cfg)
        ours = sum(p.numel() for p in model.parameters() if p.requires_grad)
        source, released = RELEASED.get(name, (None, None))
        paper_text, paper = PAPER_PARAMS.get(_model_name(name), (None, None))
        rows.append({"config": name, "ours": ours, "released": released, "released_source": source,
                     "paper": paper_text,
                     "ours_vs_paper_pct": None if paper is None else round(100 * (ours - paper) / paper, 1)})
    return rows


def _format_counts(rows: list[dict]) -> str:
    lines = ["| config | ours | released code | paper | ours vs paper |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        released = "-" if r["released"] is None else f"{r['released']:,} ({r['released_source']})"
        delta = "-" if r["ours_vs_paper_pct"] is None else f"{r['ours_vs_paper_pct']:+.1f}%"
        lines.append(f"| {r['config']} | {r['ours']:,} | {released} | {r['paper'] or '-'} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mdeq.core.official", description=__doc__.splitlines()[0])
    parser.add_argument("--counts", action="store_true", help="print parameter counts: ours, released, paper")
    parser.add_argument("--convert", nargs=2, metavar=("SRC", "DST"), help="convert a released checkpoint")
    parser.add_argument("--config", help="config name or YAML path of the checkpoint's model (with --convert)")
    args = parser.parse_args(argv)
    if not args.counts and not args.convert:
        parser.error("give --counts or --convert SRC DST --config NAME")
    if args.counts:
        print(_format_counts(parameter_counts()))
    if args.convert:
        if not args.config:
            parser.error("--convert needs --config")
        src, dst = args.convert
        sd = load_official(src, load_config(args.config))
        torch.save(sd, dst)
        print(f"wrote {len(sd)} tensors to {dst}")


if __name__ == "__main__":
    main()
