#!/usr/bin/env bash
# Peak memory of `predet data vocab` and `predet pretrain train.steps=2` on a manifest of N lines
# (issue 25, DESIGN §5: memory per process must not grow with the images beyond a few hundred
# bytes each).
#
#   bench/manifest_memory.sh [N] [WORK]      # N = 1000000, WORK = a new temporary folder
#
# The manifest repeats the built-in tiny world's 200 lines (tags only; the images exist, paths
# repeat, which is fine for memory) to N lines, beside a link to its images and its synonyms, so
# that the lines name the images as the world's query cache does. Each command runs under
# `/usr/bin/time -v` ("Maximum resident set size": the largest process of the command, loader
# workers included) at N lines and at N/100 lines; the per-image cost is the slope between the
# two, the rest is Python + torch. Needs GNU time (`apt-get install time`).
set -euo pipefail

N=${1:-1000000}
WORK=${2:-$(mktemp -d)}
N0=$(( N / 100 > 1000 ? N / 100 : 1000 ))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ -x /usr/bin/time ] || { echo "manifest_memory.sh: /usr/bin/time not found (apt-get install time)" >&2; exit 2; }
mkdir -p "$WORK"

read -r MANIFEST QUERIES < <("$PY" -c "
from predet.data.builtin import resolve_builtin
w = resolve_builtin('builtin:tiny', progress=False)
print(w.manifest, w.queries)")
ln -sfn "$(dirname "$MANIFEST")/images" "$WORK/images"
cp "$(dirname "$MANIFEST")/synonyms.json" "$WORK/synonyms.json"

make_manifest() {  # make_manifest LINES OUT: the world's image lines repeated to LINES lines
  "$PY" - "$MANIFEST" "$1" "$2" <<'EOF'
import json, sys
src, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
lines = [l for l in open(src, encoding="utf-8") if l.strip() and "image" in json.loads(l)]
with open(out, "w", encoding="utf-8") as f:
    for i in range(n):
        f.write(lines[i % len(lines)])
EOF
}

peak_kb() {  # peak_kb LOG: "Maximum resident set size (kbytes)" of a `time -v` log
  awk -F': ' '/Maximum resident set size/ {print $2}' "$1"
}

measure() {  # measure LINES: prints "vocab_kb pretrain_kb"
  local n=$1 m="$WORK/manifest-$1.jsonl"
  make_manifest "$n" "$m"
  /usr/bin/time -v "$PY" -m predet data vocab --manifest "$m" --synonyms "$WORK/synonyms.json" \
    --min-images 1 --out "$WORK/vocab-$n" --overwrite > "$WORK/vocab-$n.log" 2> "$WORK/vocab-$n.time"
  /usr/bin/time -v "$PY" -m predet pretrain --config "$ROOT/configs/pretrain/tiny_cpu.yaml" \
    --out "$WORK/run-$n" --overwrite "data.manifest=$m" "data.queries=$QUERIES" \
    train.steps=2 train.log_every=1 ckpt.every=1000 > "$WORK/run-$n.log" 2> "$WORK/run-$n.time"
  echo "$(peak_kb "$WORK/vocab-$n.time") $(peak_kb "$WORK/run-$n.time")"
}

read -r V0 P0 < <(measure "$N0")
read -r V1 P1 < <(measure "$N")
"$PY" - "$N0" "$N" "$V0" "$V1" "$P0" "$P1" <<'EOF'
import sys
n0, n, v0, v1, p0, p1 = map(int, sys.argv[1:])
mb = lambda kb: kb * 1024 / 1e6
for name, a, b in (("data vocab", v0, v1), ("pretrain train.steps=2", p0, p1)):
    per = (b - a) * 1024 / (n - n0)
    print(f"{name:<24} peak RSS {mb(a):7.0f} MB at {n0} lines, {mb(b):7.0f} MB at {n} lines: "
          f"{per:.0f} bytes per image (slope), {b * 1024 / n:.0f} bytes per line (all of it)")
print(f"vocab_mb={mb(v1):.0f} pretrain_mb={mb(p1):.0f} vocab_bytes_per_image={(v1 - v0) * 1024 / (n - n0):.0f} "
      f"pretrain_bytes_per_image={(p1 - p0) * 1024 / (n - n0):.0f} lines={n}")
EOF
