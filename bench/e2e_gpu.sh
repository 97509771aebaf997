#!/usr/bin/env bash
# Issue 11's end-to-end check: does `predet pretrain` keep up with its own step? On one machine,
# one after the other: `predet bench step` (the PreDet step on a ready batch, no data loading) and
# a real pre-training run on the small built-in world with the config's default loader workers,
# same config, same batch. Last line: `e2e_images_s=... bench_images_s=... fraction=...`
# (target: fraction >= 0.90 with the defaults on one H100 / H200).
#   bash bench/e2e_gpu.sh                  # R50-FPN 480, batch 64, bf16, channels_last, CUDA
#   CFG=configs/pretrain/tiny_cpu.yaml DATA=builtin:tiny BATCH=4 DEVICE=cpu STEPS=8 \
#     bash bench/e2e_gpu.sh                # the same measurement on a CPU, in seconds
# STEPS pre-training steps (default 60); the first SKIP logged rows (default 2, 10 steps each) are
# left out of the mean: the loader's warm-up and cuDNN's autotuning.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$(command -v python3 || command -v python)}
command -v predet > /dev/null || predet() { "$py" -m predet "$@"; }  # the GPU image: not installed
cfg=${CFG:-configs/pretrain/r50_fpn_480.yaml}
data=${DATA:-builtin:small}
batch=${BATCH:-64}
device=${DEVICE:-cuda}
steps=${STEPS:-60}
every=${LOG_EVERY:-10}
skip=${SKIP:-2}
out=$(mktemp -d "${TMPDIR:-/tmp}/predet_e2e.XXXXXX")
trap 'rm -rf "$out"' EXIT
common=(train.batch_size="$batch" train.device="$device")
bench=$(predet bench step --config "$cfg" --iters "${ITERS:-20}" --warmup "${WARMUP:-5}" "${common[@]}" | tail -1)
echo "$bench"
predet pretrain --config "$cfg" --out "$out/run" "${common[@]}" data.manifest="$data" \
  train.steps="$steps" train.warmup_steps=0 train.log_every="$every" ckpt.every=1000000 train.eval_every=null \
  > "$out/pretrain.log" 2>&1 || { tail -20 "$out/pretrain.log"; exit 1; }
"$py" - "$bench" "$out/run/metrics.jsonl" "$batch" "$skip" <<'PY'
import json, re, sys
bench, metrics, batch, skip = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
m = re.search(r"predet_step_ms=([0-9.]+)", bench)
if m is None:
    sys.exit(f"no predet_step_ms in the bench line: {bench!r}")
bench_ips = batch * 1000.0 / float(m.group(1))
rows = [json.loads(line) for line in open(metrics)]
rows = [r for r in rows if "images_per_s" in r][skip:]
if not rows:
    sys.exit(f"{metrics}: no logged rows after the first {skip}: raise STEPS")
e2e = sum(r["images_per_s"] for r in rows) / len(rows)
print(f"e2e rows: {[round(r['images_per_s'], 1) for r in rows]}")
print(f"e2e_images_s={e2e:.1f} bench_images_s={bench_ips:.1f} fraction={e2e / bench_ips:.3f}")
PY
