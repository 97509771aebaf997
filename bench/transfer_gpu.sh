#!/usr/bin/env bash
# The demo's comparison with a budget that matters, on one GPU (issue 9): R50-FPN PreDet and
# cls-only pre-training on the small built-in world (1000 steps x 128 images at 224 px, ~34
# epochs), then Mask R-CNN fine-tuned from PreDet, cls-only and scratch, 3 seeds each, on a
# 200-image low-shot subset. Prints compare.md (mean ± std), cls_map and the correlation table.
#   bash bench/transfer_gpu.sh [OUT] [key=value pre-training overrides are not taken here]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-transfer_gpu_out}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
predet demo --preset gpu --out "$out" --overwrite
