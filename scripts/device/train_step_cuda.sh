#!/usr/bin/env bash
# Training-step time and peak memory on one GPU (issue 7 item 1).
. "$(dirname "$0")/_env.sh"
python benchmarks/train_step.py --device cuda --config cifar10_small_official --batch 128 --out "$OUT/train_step_cifar10_small_b128.json"
python benchmarks/train_step.py --device cuda --config cifar10_large_official --batch 128 --out "$OUT/train_step_cifar10_large_b128.json"
python benchmarks/train_step.py --device cuda --config imagenet_small_official --batch 32 --out "$OUT/train_step_imagenet_small_b32.json"
