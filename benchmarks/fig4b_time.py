"""Fig. 4b's time: a training step and an inference step of each model, measured on this CPU
(``mdeq.paper.measure.runtime.measure_runtime``), in one run so the ratios to ResNet-101 compare like with like.

MDEQ (10M) and MDEQ-small in their implicit phase (Broyden forward with T_f, IFT backward with T_b, both
run to their budgets from the initial weights), ResNet-18 (10M), ResNet-101 and ANODE (172K), batch 32 of
3 x 32 x 32, median of ``--repeats`` steps after ``--warmup``. These are CPU times ("CPU, N threads"),
never the paper's GPU ratios (2.7x slower than ResNet-101 on an RTX 2080 Ti). The peak-memory column is
the process's resident-set growth; Fig. 4b's memory is ``benchmarks/fig4b_memory.py``'s live tensor bytes.

    python benchmarks/fig4b_time.py --threads 2        # results/runtime_memory.json (notebook 03's logs profile)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, fig4b_parser, provenance, write_json  # noqa: E402

from mdeq.paper.measure.runtime import measure_runtime  # noqa: E402


def main() -> None:
    p = fig4b_parser(__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results") / "runtime_memory.json",
                   help="relative to the repository root (default results/runtime_memory.json)")
    args = p.parse_args()
    path = args.out if args.out.is_absolute() else ROOT / args.out
    torch.set_num_threads(args.threads)
    prov = provenance(args, "cpu")
    out = measure_runtime(batch_size=args.batch, device="cpu", variant=args.variant, repeats=args.repeats,
                          warmup=args.warmup, models=args.models)
    write_json(path, {**out, "profile": "full", "provenance": prov})  # hardware names the thread count
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
