"""Does Broyden's history size change MDEQ-small's training step? Table 4's m = 12 against the released code's.

Why: Appendix Table 4 gives a limited-memory Broyden with m = 12 for MDEQ-small, and our paper config
follows it: a solve drops its oldest update once it holds 12, so the forward solve (T_f = 15) runs its last
steps and the IFT backward solve (T_b = 18) its last six on a truncated history. The released solver of the
paper's time kept min(threshold, 27) updates (locuslab/mdeq ``lib/modules/broyden.py``), so with these
budgets it never dropped one. On a trained checkpoint and real training images (train mode, the same
dropout masks for every variant) this computes one training step's parameter gradient three ways:

  paper      m = 12, T_f = 15, T_b = 18: what our Table 1 run trains with
  released   m = 18: the same budgets, no update ever dropped
  reference  m = 100, 100 forward and 100 backward steps, tolerance 1e-12: the IFT gradient to solver precision

and reports for the first two the forward and backward relative residuals where their solves ended, and the
gradient's relative error ||g - g_ref|| / ||g_ref|| and cosine against the reference, per batch.

    python studies/broyden_memory.py --threads 1   # results/broyden_memory_cpu.json
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from mdeq.engine.cli import parse_kv
from mdeq.engine.paths import ROOT
from mdeq.engine.runlog import script_provenance, write_result_json as write_json
from mdeq.core.config import load_config
from mdeq.core.model import build_model
from mdeq.engine.checkpoint import load_checkpoint
from mdeq.engine.data import build_dataset
from mdeq.engine.step import set_phase

VARIANTS = {
    "paper": [],
    "released": ["solver.memory=18"],
    "reference": ["solver.memory=100", "solver.max_iter=100", "solver.backward_max_iter=100", "solver.tol=1e-12",
                  "solver.stop_mode=rel", "solver.backward_tol=1e-12", "solver.backward_stop_mode=rel"],
}


def batches(args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``args.num_batches`` batches of training images and labels, drawn once with ``args.seed``."""
    options = parse_kv(args.data_option)
    ds = build_dataset("cifar10", ROOT / args.data_root, "train", augment=False, **options)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed))[:args.batch * args.num_batches]
    items = [ds[i] for i in idx.tolist()]
    x = torch.stack([a for a, _ in items])
    y = torch.tensor([int(b) for _, b in items])
    return list(zip(x.split(args.batch), y.split(args.batch)))


def gradient(overrides: list[str], state: dict, x: torch.Tensor, y: torch.Tensor, seed: int, args) -> dict:
    """One training step's parameter gradient (flattened) and where its solves ended."""
    cfg = load_config(args.config, overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.load_state_dict(state)
    model.deq.warn = False
    set_phase(model, cfg, cfg.train.pretrain_steps)  # the implicit phase: IFT backward
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # the same dropout masks for every variant
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    info = model.last_info
    flat = torch.cat([(torch.zeros_like(p) if g is None else g).flatten().double() for g, p in zip(grads, params)])
    return {"grad": flat, "loss": loss.item(), "memory": cfg.solver.memory,
            "forward_rel_residual": float(info.forward.rel_lowest.double().mean()), "forward_nfe": info.forward.nfe,
            "backward_rel_residual": float(info.backward.rel_lowest.double().mean()), "backward_nfe": info.backward.nfe}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cifar10_small_paper")
    p.add_argument("--weights", default="results/runs/cifar10_mdeq_small/checkpoint.pt")
    p.add_argument("--data-root", default="data/cifar10-jpeg-q75")
    p.add_argument("--data-option", nargs="*", default=["source=jpeg_q75",
                   "exact_subset=data/cifar10-partial-exact/cifar10_exact_prefix_subset.npz"], metavar="KEY=VALUE")
    p.add_argument("--batch", type=int, default=128, help="the paper's training batch")
    p.add_argument("--num-batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="results/broyden_memory_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(ROOT / args.weights)
    rows = []
    for i, (x, y) in enumerate(batches(args)):
        got = {name: gradient(over, ckpt["model"], x, y, args.seed + i, args) for name, over in VARIANTS.items()}
        ref = got["reference"]["grad"]
        row = {"batch": i}
        for name, g in got.items():
            entry = {k: v for k, v in g.items() if k != "grad"}
            if name != "reference":
                entry["grad_rel_error"] = float((g["grad"] - ref).norm() / ref.norm())
                entry["grad_cosine"] = float(torch.dot(g["grad"], ref) / (g["grad"].norm() * ref.norm()))
            row[name] = entry
        rows.append(row)
        print(f"batch {i}: " + "; ".join(
            f"{n} (m={row[n]['memory']}): forward {row[n]['forward_rel_residual']:.2e} after {row[n]['forward_nfe']}, "
            f"backward {row[n]['backward_rel_residual']:.2e} after {row[n]['backward_nfe']}"
            + (f", gradient error {row[n]['grad_rel_error']:.2e}, cosine {row[n]['grad_cosine']:.6f}" if n != "reference"
               else "") for n in VARIANTS), flush=True)
    mean = {n: {k: sum(r[n][k] for r in rows) / len(rows) for k in ("forward_rel_residual", "backward_rel_residual",
                                                                    "grad_rel_error", "grad_cosine")}
            for n in ("paper", "released")}
    write_json(ROOT / args.out, {
        "benchmark": "broyden_memory", "config": args.config, "weights": args.weights,
        "global_step": int(ckpt["global_step"]), "batch": args.batch, "num_batches": args.num_batches,
        "variants": VARIANTS, "measure": "relative residuals: batch mean of each sample's returned iterate; gradient: "
        "all parameters of one training step (cross-entropy, train mode, IFT backward), float64 comparison",
        "data": f"{args.num_batches} x {args.batch} CIFAR-10 training images ({args.data_root}), seed {args.seed}",
        "rows": rows, "mean": mean, "provenance": script_provenance(args, "cpu", folder="studies")})


if __name__ == "__main__":
    main()
