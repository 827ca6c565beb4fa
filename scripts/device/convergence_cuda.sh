#!/usr/bin/env bash
# Figs. 5-7 traces at CIFAR 32x32, ImageNet 224x224 and Cityscapes 1024x2048 (untrained models unless
# checkpoints are carried in runs/full/; ImageNet/Cityscapes inputs are synthetic without the data sets).
. "$(dirname "$0")/_env.sh"
python - <<'PY'
import json, os
from mdeq.paper.measure.solver_traces import convergence_traces
res = convergence_traces(profile="full")
open(os.path.join(os.environ.get("OUT", "runs/device_out"), "convergence_traces.json"), "w").write(json.dumps(res, default=str))
PY
