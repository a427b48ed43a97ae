#!/usr/bin/env bash
# One call on a GPU machine: build edpairs with its CUDA kernels, run the CUDA tests, measure
# the card's ceilings, run the GPU benchmarks; JSON and logs under $OUT, a short table last.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# At most 8 files come back from a device call: JSON, the build log, the test report, one log.
exec > >(tee "$OUT/log.txt") 2>&1
status=0
step() { echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# Knobs: ARCHS (CUDA architectures to build; the card's own by default, to build fast),
# SLOW=1 (also the slow CUDA tests), REPEAT (timed repetitions per benchmark).
ARCHS="${ARCHS:-90}"
REPEAT="${REPEAT:-5}"
MARK="cuda and not slow"
[ "${SLOW:-0}" = 1 ] && MARK="cuda"

step "build (EDPAIRS_CUDA=ON, archs $ARCHS, editable, no network)"
if ! EDPAIRS_CUDA=ON EDPAIRS_CUDA_ARCHITECTURES="$ARCHS" python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python3 -c "import edpairs, json; i = edpairs.build_info(); print(json.dumps(i)); assert i['cuda'] and edpairs.cuda_device_count() > 0"

step "CUDA tests"
python3 -m pytest -q -m "$MARK" tests/test_cuda.py tests/test_cuda_estimators.py tests/test_errors.py tests/test_build.py -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" 2>&1 | tail -25 || status=1

step "ceilings"
python3 benchmarks/gpu_ceilings.py --json "$OUT/ceilings.json" || status=1

step "spherical k-means iteration"
python3 benchmarks/bench_kmeans.py --device cuda --methods edpairs,torch,faiss --repeat "$REPEAT" \
  --sizes 1000000,512,1024 1000000,512,64 --json "$OUT/kmeans_cuda_f32.json" || status=1
python3 benchmarks/bench_kmeans.py --device cuda --dtype bfloat16 --methods edpairs,torch --repeat "$REPEAT" \
  --sizes 1000000,512,1024 --json "$OUT/kmeans_cuda_bf16.json" || status=1

step "moments and signal moments"
python3 benchmarks/bench_moments.py --device cuda --sizes 1000000,512,256 --repeat "$REPEAT" \
  --json "$OUT/moments_cuda.json" || status=1

step "summary"
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
c = load("ceilings.json") or {}
print(f"ceilings: copy {c.get('copy_GBps', 0):.0f} GB/s, tf32 {c.get('gemm_tf32_TFLOPs', 0):.0f}, "
      f"bf16 {c.get('gemm_bf16_TFLOPs', 0):.0f}, fp32 {c.get('gemm_fp32_TFLOPs', 0):.0f} TFLOP/s")
for name in ("kmeans_cuda_f32.json", "kmeans_cuda_bf16.json", "moments_cuda.json"):
    r = load(name)
    for row in (r or {}).get("results", []):
        if "median_s" in row:
            print(f"{name:22s} {row.get('op', 'kmeans'):15s} {str(row['size']):18s} {row['method']:10s} {row['median_s'] * 1e3:8.2f} ms")
PY
exit $status
