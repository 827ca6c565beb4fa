#!/usr/bin/env bash
# The check that docs/cpu_campaign.md ("MDEQ-small's equilibrium over the epochs") asks for before a DEQ run that the
# campaign holds (its epoch's mean forward residual passed residual_limit) gets residual_limit_run raised: on the
# run's latest checkpoint (the working tree's, added to the committed series), long solves with the paper's Broyden
# memory (m = 12) and with m = 40, with the spectral radius of J_f; then the test accuracy against the forward
# budget. Raise the limit only if they say what they said before: every sample reached with m = 40, and the
# accuracy at the training budget (15 steps) within noise of 50 steps. About 50 minutes of one core for MDEQ-small.
#   scripts/equilibrium_check.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-1}
long=(--budget 200 --num-batches 1 --every 4000 --spectral-radius 100 --threads "$threads" --keep)
python studies/equilibrium_over_training.py "${long[@]}" --out results/equilibrium_long_solve.json
python studies/equilibrium_over_training.py "${long[@]}" --memory 40 --out results/equilibrium_long_solve_m40.json
python studies/accuracy_vs_budget.py --from-tree --threads "$threads"
