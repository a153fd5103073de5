#!/usr/bin/env bash
# The kernel session's GPU work in one device call (issue 12), everything under $OUT:
#   1. bench/check_gpu.py               correctness of every kernel family on the shipped configs / fallback
#   2. bench/autotune.py --budget-s     tune w4a16 (+ w4a4 sweep) for this GPU -> aq/kernels/configs/<gpu>.json
#   3. bench/check_gpu.py               again, on the new config (the kernel families it touches)
#   4. bench/kernels.py                 the side-by-side table (tuned), then the w4a16 fallback with own entries hidden
# Each step has its own timeout inside a total bound (TOTAL_S, default 500 s); a step that fails or times out is
# recorded and the next one still runs. Exit code: non-zero when a check failed or a step crashed.
#   OUT=/some/dir bash bench/h200_kernels.sh            # QUICK=1: kernels.py --quick and smaller checks
# The device tool brings back at most 8 files from $OUT: everything is written under $OUT/work and packed at the end
# into $OUT/h200_kernels.tgz (steps.tsv and gpu.txt also stay beside it). Unpack with tar xzf.
set -u
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
FINAL=$OUT
OUT=$FINAL/work
TOTAL_S=${TOTAL_S:-500}
PY=${PY:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package of this checkout
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/aq-triton-cache}  # shared by the steps: compile once
mkdir -p "$OUT"
T0=$(date +%s)
STATUS=0
: > "$OUT/steps.tsv"

left() { echo $(( TOTAL_S - ($(date +%s) - T0) )); }
step() {  # step NAME PLANNED_S CMD...: runs CMD with timeout min(PLANNED_S, time left - reserve)
  local name=$1 planned=$2; shift 2
  local l; l=$(left)
  local t=$(( planned < l ? planned : l ))
  if (( t < 15 )); then echo "== $name skipped: ${l}s left"; printf '%s\tskipped\t0\n' "$name" >> "$OUT/steps.tsv"; return; fi
  echo "== $name (timeout ${t}s, ${l}s left): $*"
  local s; s=$(date +%s)
  timeout --signal=TERM --kill-after=10 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name rc=$rc in $(( $(date +%s) - s ))s"
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - s ))" >> "$OUT/steps.tsv"
  if (( rc != 0 )); then STATUS=1; fi
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || true
$PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
if [[ "${QUICK:-0}" == 1 ]]; then CHECK_SCALE=0.3; KQ=--quick; TUNE_S=100; else CHECK_SCALE=1; KQ=; TUNE_S=170; fi
BUCKETS=1,2,4,8,16,32,64,128,256,512,1024,2048,4096  # larger M takes the 4096 entry through the nearest-bucket rule

# planned seconds: 80 + (TUNE_S + 30) + 50 + 120 + 40 = 490 at TUNE_S = 170
step check_before 80 $PY bench/check_gpu.py --out "$OUT/check_before" --budget-s 65 --scale $CHECK_SCALE
step autotune $(( TUNE_S + 30 )) $PY bench/autotune.py --budget-s $TUNE_S --buckets $BUCKETS \
  --log "$OUT/autotune_log.json" --w4a4-out "$OUT/w4a4-sweep" --jobs "$(nproc)"
mkdir -p "$OUT/configs" && cp aq/kernels/configs/*.json "$OUT/configs/" 2>/dev/null  # the lead commits these
step check_after 50 $PY bench/check_gpu.py --out "$OUT/check_after" --budget-s 40 --scale $CHECK_SCALE \
  --families w4a16,w4a4,patch --seed 1
step kernels 120 $PY bench/kernels.py --out "$OUT/kernels" $KQ
# the fallback measured on tuned shapes: each shape's own entry hidden (AQ_FALLBACK=nearest), aq W4A16 only
step kernels_fallback 40 env AQ_FALLBACK=nearest $PY bench/kernels.py --out "$OUT/kernels_fallback" \
  --methods bf16,aq_w4a16 --shapes 4096x4096,4096x14336,14336x4096 --ms 1,16,128,4096
echo "== all steps in $(( $(date +%s) - T0 ))s, status $STATUS"; cat "$OUT/steps.tsv"
cp "$OUT/steps.tsv" "$OUT/gpu.txt" "$FINAL/" && tar czf "$FINAL/h200_kernels.tgz" -C "$OUT" . && rm -rf "$OUT"
exit $STATUS
