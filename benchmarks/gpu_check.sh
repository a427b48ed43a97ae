#!/usr/bin/env bash
# One call on a GPU machine: build edpairs with its CUDA kernels, run the CUDA tests, measure
# the card's ceilings, run the GPU benchmarks; JSON and logs under $OUT, a short table last.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
step() { echo "== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"

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
python3 -m pytest -q -m "$MARK" tests/test_cuda.py tests/test_errors.py tests/test_build.py -p no:cacheprovider --junitxml="$OUT/cuda_tests.xml" 2>&1 | tail -25 || status=1

step "ceilings"
python3 benchmarks/gpu_ceilings.py --json "$OUT/ceilings.json" | tee "$OUT/ceilings.txt" || status=1

step "spherical k-means iteration"
python3 benchmarks/bench_kmeans.py --device cuda --methods edpairs,torch,faiss --repeat "$REPEAT" \
  --sizes 1000000,512,1024 1000000,512,64 --json "$OUT/kmeans_cuda_f32.json" | tee "$OUT/kmeans_f32.txt" || status=1
python3 benchmarks/bench_kmeans.py --device cuda --dtype bfloat16 --methods edpairs,torch --repeat "$REPEAT" \
  --sizes 1000000,512,1024 --json "$OUT/kmeans_cuda_bf16.json" | tee "$OUT/kmeans_bf16.txt" || status=1

step "moments and signal moments"
python3 benchmarks/bench_moments.py --device cuda --sizes 1000000,512,256 --repeat "$REPEAT" \
  --json "$OUT/moments_cuda.json" | tee "$OUT/moments.txt" || status=1

step "summary"
cat "$OUT/ceilings.txt" "$OUT/kmeans_f32.txt" "$OUT/kmeans_bf16.txt" "$OUT/moments.txt" 2>/dev/null
exit $status
