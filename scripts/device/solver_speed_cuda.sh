#!/usr/bin/env bash
# Solver overhead on CUDA, ours vs torchdeq on the same f (needs torchdeq==0.1.0 installed or carried as a wheel).
. "$(dirname "$0")/_env.sh"
python benchmarks/solver_speed.py --device cuda --repeats 5 --batch 32 --out "$OUT/solver_speed_cuda.json"
