#!/usr/bin/env bash
# Commit a running campaign's progress (results/runs/) with the files the pages quote from it, consistent with each
# other. The campaign copies each new checkpoint into results/runs/ every few minutes, and
# results/trained_models.md names each checkpoint's step and sha256: written a moment before `git add`, it can
# describe an older checkpoint than the one staged (tests/test_evaluate.py then fails on the commit). So: redraw the
# stale tables and figures, rewrite the quoted files, stage, and rewrite again until nothing moved in between.
#   scripts/commit_campaign_progress.sh "message"
set -euo pipefail
cd "$(dirname "$0")/.."
message=${1:?"usage: scripts/commit_campaign_progress.sh MESSAGE"}
python -m mdeq.reproduce --profile logs --stale-only --update-committed --no-book
for attempt in 1 2 3 4 5; do
  git add -A README.md docs figures notebooks results
  if ! python -m mdeq.reproduce --readme | grep -q rewritten; then
    python -m mdeq.reproduce --status > /dev/null || { echo "stale tables or figures: see --status" >&2; exit 1; }
    git commit -q -m "$message"
    git log --oneline -1
    exit 0
  fi
  echo "a checkpoint moved while staging (attempt $attempt); again" >&2
done
echo "the campaign kept moving the checkpoints; nothing committed" >&2
exit 1
