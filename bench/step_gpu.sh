#!/usr/bin/env bash
# The PreDet-vs-cls-only step on one GPU (issue 4's target: PreDet >= 80% of the cls-only
# images/s with R50-FPN at 480x480, bf16, batch 64). Run from the repository root; each line
# ends with `predet_step_ms=... cls_step_ms=... ratio=...` (ratio <= 1.25 meets the target).
# The line before it, `predet_proposal_ms=... share=...`, is the time in proposal selection
# (CUDA events around ContrastiveRPN.select_proposals: grouped_nms over all (view, level) groups).
# The second and third runs narrow the two costliest PreDet parts: the CRPN's 3x3 conv over
# P2-P6 (C=256 wide by default, like torchvision's RPN) and the box head on K_nms proposals.
# First: grouped_nms equals torchvision.ops.nms on this GPU (the CUDA cases of its test), and
# its time against torchvision at this config's size (64 images x 2 views x 5 levels, K 1000).
set -euo pipefail
cfg=configs/pretrain/r50_fpn_480.yaml
common=(--config "$cfg" --iters "${ITERS:-20}" --warmup "${WARMUP:-5}" train.batch_size=64 train.device=cuda)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m pytest -q tests/modeling/test_nms.py -k cuda
python bench/nms_vs_torchvision.py --device cuda --groups 640 --k 1000
predet bench step "${common[@]}"
predet bench step "${common[@]}" model.crpn.conv_dim=64
predet bench step "${common[@]}" model.crpn.conv_dim=64 model.crpn.post_nms_top_n=128 model.crpn.pre_nms_top_n=300
