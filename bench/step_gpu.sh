#!/usr/bin/env bash
# The PreDet-vs-cls-only step on one GPU (issue 11's target: ratio <= 1.25, i.e. PreDet >= 80% of
# the cls-only images/s, with R50-FPN at 480x480, bf16, batch 64). Run from the repository root
# (or through bench/gpu_session.sh); each bench line ends with
# `predet_step_ms=... cls_step_ms=... ratio=...`, the line before it, `predet_proposal_ms=...
# share=...`, is the time in proposal selection (CUDA events around
# ContrastiveRPN.select_proposals: grouped_nms over all (view, level) groups).
# First: grouped_nms equals torchvision.ops.nms on this GPU (the CUDA cases of its test), and its
# time against torchvision at this config's size (64 images x 2 views x 5 levels, K 1000). The
# default run then profiles PROFILE (default 3) PreDet steps by part (`--profile`).
# VARIANTS=1 (default) adds two narrowing runs: the CRPN's 3x3 conv over P2-P6 (C=256 wide by
# default, like torchvision's RPN) at 64, and fewer proposals (a change of the method's sizes).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$(command -v python3 || command -v python)}
command -v predet > /dev/null || predet() { "$py" -m predet "$@"; }
cfg=configs/pretrain/r50_fpn_480.yaml
common=(--config "$cfg" --iters "${ITERS:-20}" --warmup "${WARMUP:-5}" train.batch_size=64 train.device=cuda)
# each part runs whatever the one before it did (one device session should bring back every
# figure); the script exits with the first failure's status at the end
rc=0
part() { "$@" || { s=$?; echo "FAILED (exit $s): $*"; [ "$rc" -ne 0 ] || rc=$s; }; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
part "$py" -m pytest -q tests/modeling/test_nms.py -k cuda
part "$py" bench/nms_vs_torchvision.py --device cuda --groups 640 --k 1000
part predet bench step "${common[@]}" --profile "${PROFILE:-3}" --profile-rows 30
if [ "${VARIANTS:-1}" = "1" ]; then
  part predet bench step "${common[@]}" model.crpn.conv_dim=64
  part predet bench step "${common[@]}" model.crpn.conv_dim=64 model.crpn.post_nms_top_n=128 model.crpn.pre_nms_top_n=300
fi
exit "$rc"
