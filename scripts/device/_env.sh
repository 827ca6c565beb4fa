# Shared by the device scripts: install the project if needed, set OUT.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/device_out}
mkdir -p "$OUT"
python -c "import mdeq" 2>/dev/null || python -m pip install -q --no-deps -e . >/dev/null
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
