#!/usr/bin/env bash
# Data figures of issue 3: query recall on the built-in `small` world (truth.jsonl, IoU >= 0.5,
# top 100), then query / two-view loader throughput. Usage: bench/data_small_world.sh [OUT] [WORKERS]
set -euo pipefail
OUT=${1:-runs/bench_data}
WORKERS=${2:-2}
if [ ! -f "$OUT/small/pretrain/manifest.jsonl" ]; then
  predet data synth --out "$OUT/small" --preset small --seed 0 --workers "$WORKERS"
fi
# prints "query recall vs truth.jsonl: R of N true boxes ..." (resumable: finished shards are kept)
predet data queries --manifest "$OUT/small/pretrain/manifest.jsonl" --out "$OUT/small_queries" --workers "$WORKERS"
predet bench data --images 32 --size 480
