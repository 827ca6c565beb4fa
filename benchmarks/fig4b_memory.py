"""Fig. 4b's training memory as live tensor bytes, measured on this CPU (``mdeq.paper.measure.memory``).

The peak of live tensor bytes during one training step (forward, loss, backward, Adam step, after a
warm-up step) of MDEQ, MDEQ-small (implicit phase, and trained unrolled through the same number of f
evaluations), ResNet-18 (10M), ResNet-101 and ANODE (172K) at batch 32 of 3 x 32 x 32, split into
parameters + gradients + optimiser state, activations saved for backward, and the rest (solver
history, temporaries); then MDEQ-small's peak against the forward iteration budget, implicit and
unrolled. Live tensor bytes do not depend on the device; they were measured on a CPU with one thread.
No timing here (the time part of Fig. 4b is ``measure_runtime``'s). The file is rewritten after each
model, so a stopped run leaves what it finished.

    python benchmarks/fig4b_memory.py        # results/fig4b_memory_cpu.json
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fig4b_parser, provenance, write_json  # noqa: E402

from mdeq.paper.measure.memory import MEMORY_BUDGETS, measure_memory  # noqa: E402


def main() -> None:
    p = fig4b_parser(__doc__)
    p.add_argument("--budgets", type=int, nargs="*", default=list(MEMORY_BUDGETS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("results") / "fig4b_memory_cpu.json",
                   help="relative to the repository root (default results/fig4b_memory_cpu.json)")
    args = p.parse_args()
    path = args.out if args.out.is_absolute() else ROOT / args.out  # the provenance keeps the relative form
    torch.set_num_threads(args.threads)
    prov = provenance(args, "cpu")
    out = None
    for key in args.models:
        part = measure_memory(batch_size=args.batch, variant=args.variant, models=[key], budgets=())
        if out is None:
            out = part
        else:
            out["models"].update(part["models"])
        write_json(path, {**out, "hardware": f"CPU, {args.threads} thread{'s' if args.threads != 1 else ''}",
                              "provenance": prov})
    if args.budgets:
        part = measure_memory(batch_size=args.batch, variant=args.variant, models=[], budgets=args.budgets)
        out = part if out is None else {**out, "curve": part["curve"]}
    write_json(path, {**out, "hardware": f"CPU, {args.threads} thread{'s' if args.threads != 1 else ''}",
                          "provenance": prov})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
