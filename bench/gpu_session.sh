#!/usr/bin/env bash
# Issue 11's GPU figures in one command, for a session lent a GPU (about 6 minutes of device time).
#
#   bash bench/gpu_session.sh prepare     # here, on the CPU machine, once: writes two ignored folders,
#       .whl/           the wheels the GPU image lacks (omegaconf, antlr4 runtime, pycocotools,
#                       webdataset, braceexpand; its image has torch, torchvision, numpy, opencv...)
#       .predet_cache/  the small built-in world with its query cache (the GPU image's OpenCV has
#                       no EdgeBoxes, so the queries are computed here)
#   (again after any change to predet/data/{synth,synth_render,queries}.py: the world records the
#   code that made it), then, with the device tool:  run(command="bash bench/gpu_session.sh",
#                                    carry=[".whl", ".predet_cache"], timeout_s=590)
#
# On the GPU it runs, logging each part under $OUT (the device tool's folder; else ./gpu_session_out):
#   step.log  bench/step_gpu.sh: grouped_nms == torchvision.ops.nms on CUDA, the NMS micro-bench, and
#             `predet bench step` at the defaults (R50-FPN 480, bf16, batch 64) with a profile of the
#             PreDet step by part; its last line is the issue's ratio (target <= 1.25)
#   e2e.log   bench/e2e_gpu.sh: `predet pretrain` end to end against its own bench step (>= 0.90)
# VARIANTS=1 adds step_gpu.sh's narrowing runs (CRPN width, fewer proposals) to step.log.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(command -v python3 || command -v python)

if [ "${1:-}" = "prepare" ]; then
  mkdir -p .whl
  plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  for p in omegaconf==2.3.0 pycocotools==2.0.10 webdataset==1.0.2 braceexpand==0.1.7; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl "$p"
  done
  "$py" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist: pure Python
  PREDET_CACHE=$PWD/.predet_cache "$py" -c "from predet.data.builtin import resolve_builtin; print(resolve_builtin('builtin:small').root)"
  du -sh .whl .predet_cache
  exit 0
fi

out=${OUT:-gpu_session_out}
mkdir -p "$out"
if [ -d .whl ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v predet > /dev/null; then  # not installed there: the module is the same CLI
  predet() { "$py" -m predet "$@"; }
  export -f predet
fi
export PYTHON=$py PREDET_CACHE=${PREDET_CACHE:-$PWD/.predet_cache} PYTHONUNBUFFERED=1
# the carried world must match this code (its generator's fingerprint), else it would be generated
# here, and this image's OpenCV has no EdgeBoxes: stop at once rather than spend device time on it
"$py" - <<'PY' || exit 3
import sys
from predet.data.builtin import BuiltinWorld, _is_complete, cache_root, generator_fingerprint
world = BuiltinWorld(cache_root() / "small-seed0", "small", 0)
if not _is_complete(world, generator_fingerprint()):
    sys.exit(f"{world.root}: missing or made by other code: run `bash bench/gpu_session.sh prepare` "
             "on the CPU machine and carry .predet_cache")
print(f"world: {world.root} (ready)")
PY
"$py" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
rc=0  # both parts run whatever the first did; the first failure's status is the exit status
VARIANTS=${VARIANTS:-0} PROFILE=${PROFILE:-3} bash bench/step_gpu.sh 2>&1 | tee "$out/step.log" || rc=$?
bash bench/e2e_gpu.sh 2>&1 | tee "$out/e2e.log" || { s=$?; [ "$rc" -ne 0 ] || rc=$s; }
echo "== summary"
grep -h "^device=\|^FAILED\|^predet_proposal_ms=\|^predet_step_ms=\|^e2e_images_s=" "$out/step.log" "$out/e2e.log" || true
exit "$rc"
