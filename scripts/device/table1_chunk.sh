#!/usr/bin/env bash
# One resumable chunk of Table 1's CIFAR-10 MDEQ-small (paper config, no augmentation, 50 epochs of
# 391 steps) on the JPEG-q75 archive: trains until STEPS optimiser steps in all, checkpointing every
# 200 steps, then copies the run folder to $OUT. Call again with a larger STEPS to continue.
. "$(dirname "$0")/_env.sh"
STEPS=${1:?usage: table1_chunk.sh STEPS (total optimiser steps to reach; 19550 = 50 epochs)}
RUN=runs/full/cifar10_mdeq_small
python -m mdeq.train --config cifar10_small_paper --data-root .data/cifar10-jpeg-q75 \
    --data-option source=jpeg_q75 --out "$RUN" --resume --device cuda --workers 8 \
    --checkpoint-every 200 --max-steps "$STEPS" --no-progress
mkdir -p "$OUT/cifar10_mdeq_small"
cp "$RUN"/{checkpoint.pt,metrics.csv,steps.jsonl,provenance.json} "$OUT/cifar10_mdeq_small/" 2>/dev/null || true
cp "$RUN"/final.json "$OUT/cifar10_mdeq_small/" 2>/dev/null || true
