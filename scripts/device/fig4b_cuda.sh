#!/usr/bin/env bash
# Fig. 4b on one GPU: batch 32, CIFAR-10-sized input, relative to ResNet-101 (no data needed).
. "$(dirname "$0")/_env.sh"
python - <<'PY'
import json, os
from mdeq.paper.measure.runtime import measure_runtime
res = measure_runtime(batch_size=32, device="cuda", variant="paper", repeats=5)
open(os.path.join(os.environ.get("OUT", "runs/device_out"), "runtime_memory.json"), "w").write(json.dumps(res, indent=2, default=str))
PY
