#!/usr/bin/env bash
# One call on a GPU machine: build edpairs with its CUDA kernels, measure the card's ceilings,
# run the GPU benchmarks (each with a correctness check against float64 before timing), run the
# CUDA tests, profile the steps' kernels, and print the goals of issue 6 as a short table last.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# The whole call keeps inside BUDGET seconds (default 560: a device call may run 600 s, and a
# lent machine goes back 30 s after a call, so the plan is one call): each step's time limit is
# its own or what is left of the budget before the summary's reserve, whichever is less, and a
# step with too little time left is skipped with a message. The benchmarks run first (each in
# processes of its own, on an otherwise idle GPU), then the tests, then the profile.
# Under $OUT (the device returns at most 8 files): log.txt, summary.txt and results.tar.gz,
# which holds every JSON, junit XML and test log (ceilings.json, kmeans_cuda_f32.json,
# kmeans_cuda_half.json, kmeans_cuda_k64.json, kmeans_cuda_bf16.json, moments_cuda.json,
# cuda_tests_new.xml, cuda_tests.xml, tests_*.txt, kernel_profile.json, ...), packed again after
# every step so that a call stopped early returns what had finished; build.log too when the
# build fails. The files themselves are in $RES (default /tmp/edpairs_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
RES="${RES:-/tmp/edpairs_gpu_check}"
mkdir -p "$OUT"
rm -rf "$RES" && mkdir -p "$RES"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
status=0
step() { echo "== $* ($(date -u +%H:%M:%S), ${SECONDS} s)"; }
BUDGET="${BUDGET:-560}"
RESERVE="${RESERVE:-30}"  # seconds kept for the summary and the last packing
HOLD=0  # seconds more kept back for later steps (the CUDA tests, while the benchmarks run)
# limit N: N seconds, or what is left of BUDGET before the reserve and HOLD, whichever is less.
limit() {
  local left=$((BUDGET - SECONDS - RESERVE - HOLD))
  ((left < 0)) && left=0
  echo $(($1 < left ? $1 : left))
}
# within N MIN cmd...: cmd under `limit N` seconds (SIGINT first, so that pytest and the
# benchmarks write what they have; killed KILL_AFTER seconds later, 10 by default: pytest under
# xdist writes its junit file only once its workers are down), or skipped when less than MIN
# is left (which fails the call, unless INFO=1: a step for information only).
within() {
  local t
  t=$(limit "$1")
  if ((t < $2)); then
    echo "(skipped: ${t} s left of the call's budget of ${BUDGET} s, this step needs at least $2)"
    [ "${INFO:-0}" = 1 ] || status=1
    return 1
  fi
  shift 2
  timeout -s INT -k "${KILL_AFTER:-10}" "$t" "$@"
}
# The results so far into $OUT/results.tar.gz (written beside it, then renamed: never half a file).
pack() { tar -czf "$OUT/results.tmp" -C "$RES" . && mv -f "$OUT/results.tmp" "$OUT/results.tar.gz"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
# Which source this run measures: tools/tree_hash.sh on a checkout gives the same digits.
echo "source: tree hash $(bash tools/tree_hash.sh 2>/dev/null || echo unknown), git $(git rev-parse --short HEAD 2>/dev/null || echo 'not here'); nvcc $(nvcc --version 2>/dev/null | sed -n 's/.*, V\([0-9.]*\)$/\1/p')"

# Knobs: ARCHS (CUDA architectures to build; the card's own by default, to build fast),
# PROFILE_CASES (the steps whose kernels profile_kernels.py times one by one),
# SLOW=1 (also the slow CUDA tests), REPEAT (timed repetitions per benchmark), SKIP (steps to
# leave out: ceilings, kmeans, half, k64, bf16, faiss, moments, tests, profile, fit, estimators, ncu,
# route_parts, stream; by default estimators, ncu, route_parts and stream, measured in run4 /
# run5 and unchanged since; SKIP="" runs everything the budget allows). The hardware counters
# of the k-means kernels:
#   SKIP="tests estimators kmeans half k64 bf16 moments profile route_parts stream" bash benchmarks/gpu_check.sh
# TESTS_K, NEW_K, KM_METHODS, KM_SIZES, K64_METHODS, BF16_METHODS, BF16_SIZES, STREAM_GIB,
# NCU_CASES, TEST_WORKERS, FAISS_LIB override the choices below.
ARCHS="${ARCHS:-90}"
REPEAT="${REPEAT:-5}"
SKIP="${SKIP-estimators ncu route_parts stream}"
# "edpairs" is the default dispatch: on Hopper, labels on wgmma for k >= 129 (TF32 float32 rows
# from float16 copies since H200 run 6; 16-bit rows), on mma below; edpairs-labels its labelling alone; edpairs-fit the estimator
# (SphericalKMeans.fit, per pass over X; edpairs-fit5 over five passes, where the float16 copies are made once). The cuBLAS route (edpairs-gemm;
# run5b: 7.64 ms at k = 1024) and k = 256 (run5b: 2.92 ms) are left out by default.
KM_METHODS="${KM_METHODS:-edpairs,edpairs-labels,edpairs-fit,edpairs-fit5,torch}"
KM_SIZES="${KM_SIZES:-1000000,512,1024 1000000,512,64}"
# The k = 64 candidates (wgmma labels in 64-wide tiles with the sorted sums, and with the
# owned-column sums; the fused pass; the segmented sums in blocks of 128 and 64 rows), opt-in
# until measured, against the default rows of the k-means step above.
K64_METHODS="${K64_METHODS:-edpairs-wgmma,edpairs-wgmma-columns,edpairs-fused-wgmma,edpairs-seg128,edpairs-seg64,edpairs-fit5-half}"
BF16_METHODS="${BF16_METHODS:-edpairs,torch}"
BF16_SIZES="${BF16_SIZES:-1000000,512,1024}"
STREAM_GIB="${STREAM_GIB:-4}"
# The tests of kernels that have not run on a GPU yet (or changed since): in a process of their
# own before the others, so that a fault there cannot poison the CUDA context of the rest.
NEW_K="${NEW_K:-wgmma or column or fused or tensor_core_assign_matches or prefetch or overlap or float16_operands or float16_rows or triangle or centre_rows or signal_masks or every_score_is_nan or concurrent_callers or pinned or cluster_sums}"
TESTS_K="${TESTS_K:-not ($NEW_K)}"
# The profile cases that decide the next defaults, in one process: the paths that ran on a GPU
# before first, then the candidates by the goal they serve (2, 4, 3), the two new wgmma kernels
# (the resident float16 rows, the fused small-k kernel) last: a fault in one poisons the
# process's later cases (each case is saved as it ends). The longer list of version 9:
# PROFILE_CASES="$PROFILE_ALL".
PROFILE_CASES="${PROFILE_CASES:-kmeans:1000000,512,1024 kmeans:1000000,512,64 moments:1000000,512 \
signal:1000000,512,256 kmeans-fit:1000000,512,1024 kmeans:1000000,512,1024:EDPAIRS_ASSIGN_HALF=copies \
moments:1000000,512:EDPAIRS_GEMM_HALF=1;EDPAIRS_GEMM_OVERLAP=1 signal:1000000,512,256:EDPAIRS_GEMM_HALF=1;EDPAIRS_GEMM_OVERLAP=1 \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=columns kmeans:1000000,512,1024:EDPAIRS_ASSIGN_HALF=1 \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused kmeans:1000000,512,1024:EDPAIRS_ASSIGN_SEG_ROWS=128}"
PROFILE_ALL="moments:1000000,512 moments-f32:1000000,512 signal:1000000,512,256 \
kmeans:1000000,512,1024 kmeans:1000000,512,256 kmeans:1000000,512,64 labels:1000000,512,64 \
kmeans-fit:1000000,512,1024 kmeans-fit:1000000,512,64 \
kmeans:1000000,512,1024:EDPAIRS_ASSIGN_OVERLAP=4 kmeans:1000000,512,1024:EDPAIRS_ASSIGN_OVERLAP=8 \
kmeans:1000000,512,1024:EDPAIRS_ASSIGN_HALF=1 kmeans:1000000,512,1024:EDPAIRS_ASSIGN_HALF=copies \
kmeans:1000000,512,256:EDPAIRS_ASSIGN_OVERLAP=4 \
moments-f32:1000000,512:EDPAIRS_GEMM_GRAM=triangle moments:1000000,512:EDPAIRS_GEMM_OVERLAP=1 \
moments:1000000,512:EDPAIRS_GEMM_HALF=1 moments:1000000,512:EDPAIRS_GEMM_HALF=1;EDPAIRS_GEMM_OVERLAP=1 \
signal:1000000,512,256:EDPAIRS_GEMM_HALF=1 signal:1000000,512,256:EDPAIRS_GEMM_HALF=1;EDPAIRS_GEMM_OVERLAP=1 \
signal:1000000,512,256:EDPAIRS_GEMM_OVERLAP=1 \
labels:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma labels:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_WGMMA_PREFETCH=0 \
labels:1000000,512,128:EDPAIRS_ASSIGN_KERNEL=wgmma \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_SUMS=columns kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=columns \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused;EDPAIRS_WGMMA_PREFETCH=0"
NCU_CASES="${NCU_CASES:-kmeans:1000000,512,64 kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=columns \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused kmeans:1000000,512,1024}"
skipped() { case " $SKIP " in *" $1 "*) echo "(skipped: SKIP has $1)"; return 0;; esac; return 1; }
MARK="cuda and not slow"
[ "${SLOW:-0}" = 1 ] && MARK="cuda"
# test_build checks that the build lists exactly the architectures asked for here.
export EDPAIRS_CUDA_ARCHITECTURES="$ARCHS"

step "build (EDPAIRS_CUDA=ON, archs $ARCHS, editable, no network)"
if ! EDPAIRS_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 within 300 60 python3 -m pip install --no-build-isolation --no-deps -e . >"$RES/build.log" 2>&1; then
  cp "$RES/build.log" "$OUT/build.log"; tail -40 "$RES/build.log"; echo "BUILD FAILED"; pack; exit 1
fi
python3 -c "import edpairs, json; i = edpairs.build_info(); print(json.dumps(i)); assert i['cuda'] and edpairs.cuda_device_count() > 0" || { pack; exit 1; }
# The benchmarks leave TEST_HOLD seconds to the CUDA tests, whatever they take (kernels that
# have never run may hang until their method's time limit).
HOLD="${TEST_HOLD:-150}"

step "ceilings"
skipped ceilings || within 60 20 python3 benchmarks/gpu_ceilings.py --json "$RES/ceilings.json" || status=1
pack

# The route's step variants, the exact float32 paths and the opt-in kernels (-r16384, -f32,
# -kernel-f32: run4; -wgmma-tma, -fused: run5) are left out to keep the call inside its time;
# add them with KMEANS_EXTRA=edpairs-f32,edpairs-wgmma-tma,...
step "spherical k-means iteration (float32 data: tensor-core kernels, TF32; torch TF32)"
skipped kmeans || within 150 40 python3 benchmarks/bench_kmeans.py --device cuda --methods "$KM_METHODS${KMEANS_EXTRA:+,$KMEANS_EXTRA}" \
  --repeat "$REPEAT" --method-timeout 60 --sizes $KM_SIZES --json "$RES/kmeans_cuda_f32.json" || status=1
pack
step "k = 1024: the float16 rows made in shared memory (EDPAIRS_ASSIGN_HALF=1), the float32 rows (=0), the segmented sums in blocks of 128 / 64 against the default"
skipped half || within 110 30 python3 benchmarks/bench_kmeans.py --device cuda --methods edpairs-half,edpairs-tf32-rows,edpairs-seg128,edpairs-seg64 --repeat "$REPEAT" \
  --method-timeout 30 --sizes 1000000,512,1024 --json "$RES/kmeans_cuda_half.json" || status=1
pack
step "k = 64: the candidate defaults (wgmma labels with the sorted or the owned-column sums; the fused pass; the segmented sums in blocks of 128 / 64)"
skipped k64 || within 140 30 python3 benchmarks/bench_kmeans.py --device cuda --methods "$K64_METHODS" --repeat "$REPEAT" \
  --method-timeout 30 --sizes 1000000,512,64 --json "$RES/kmeans_cuda_k64.json" || status=1
pack
step "spherical k-means iteration (bfloat16 data)"
skipped bf16 || within 60 20 python3 benchmarks/bench_kmeans.py --device cuda --dtype bfloat16 --methods "$BF16_METHODS" --repeat "$REPEAT" \
  --method-timeout 40 --sizes $BF16_SIZES --json "$RES/kmeans_cuda_bf16.json" || status=1
pack

# Goal 5: faiss's GPU k-means (rows on the host, as faiss.Kmeans(gpu=True) keeps them) and its
# GPU flat search on resident rows, beside edpairs in the same call on the same data: the
# default (TF32) and edpairs-f32 (exact float32 products, as faiss's SGEMM). The library is made
# by benchmarks/faiss_build/build.sh on the CPU machine and carried (carry ["build/faiss"], ~50 MiB).
step "faiss's GPU k-means and flat search against edpairs (goal 5; information where build/faiss is absent)"
FAISS_LIB="${FAISS_LIB:-build/faiss/lib/libedpairs_faiss.so}"
if ! skipped faiss; then
  if [ -e "$FAISS_LIB" ]; then
    EDPAIRS_FAISS_LIB="$FAISS_LIB" INFO=1 within 90 40 python3 benchmarks/bench_kmeans.py --device cuda --methods edpairs,edpairs-f32,faiss,faiss-search --repeat "$REPEAT" \
      --method-timeout 40 --sizes 1000000,512,1024 --json "$RES/kmeans_cuda_faiss.json" || echo "(faiss rows: failed, see above)"
  else
    echo "(no $FAISS_LIB: make it with benchmarks/faiss_build/build.sh and carry build/faiss)"
  fi
fi
pack

step "moments and signal moments"
skipped moments || within 120 30 python3 benchmarks/bench_moments.py --device cuda --sizes 1000000,512,256 --repeat "$REPEAT" \
  --triangle-blocks 128 256 --json "$RES/moments_cuda.json" || status=1
pack

HOLD=0
step "CUDA tests"
if ! skipped tests; then
# Every test marked cuda (any file; those needing packages the device lacks skip), plus the
# error and build tests. The tests of the new kernels (NEW_K) run in processes of their own
# first: a fault of a kernel that has never run on a GPU would otherwise poison the CUDA context
# of every test after it. pytest-xdist (TEST_WORKERS processes, 8 by default where it is
# installed) spreads each group over processes: the float64 references on the CPU dominate.
# A kernel that deadlocks blocks its process in a CUDA call, where no signal handler runs:
# with pytest-timeout's thread method a test over 45 s (run5b: 0.44 s a test on average) dumps
# the stacks (naming the test) and ends its process (xdist starts another), instead of the
# group's time running out. A group stopped by its limit writes a junit file of the tests that
# finished, without failures: its exit status (cuda_tests_*.rc) tells the summary.
PER_TEST=""
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 45 --timeout-method thread"
# (pytest-benchmark, on the device too, warns under xdist, which the suite's filterwarnings =
# error turns into an INTERNALERROR: its plugin stays off.)
PAR=""
python3 -c "import xdist" 2>/dev/null && PAR="-n ${TEST_WORKERS:-8} -p no:benchmark"
KILL_AFTER=30 within 200 60 python3 -m pytest -q -m "$MARK" tests/ -k "$NEW_K" -p no:cacheprovider $PER_TEST $PAR \
  --junitxml="$RES/cuda_tests_new.xml" >"$RES/tests_new.txt" 2>&1
rc=$?; echo "$rc" >"$RES/cuda_tests_new.rc"; [ "$rc" != 0 ] && status=1
tail -15 "$RES/tests_new.txt"
pack
KILL_AFTER=30 within 150 60 python3 -m pytest -q -m "$MARK" tests/ -k "$TESTS_K" -p no:cacheprovider $PER_TEST $PAR \
  --junitxml="$RES/cuda_tests.xml" >"$RES/tests_rest.txt" 2>&1
rc=$?; echo "$rc" >"$RES/cuda_tests.rc"; [ "$rc" != 0 ] && status=1
tail -30 "$RES/tests_rest.txt"
pack
within 60 20 python3 -m pytest -q tests/test_errors.py tests/test_build.py -p no:cacheprovider $PAR >"$RES/tests_errors_build.txt" 2>&1
[ $? != 0 ] && status=1
tail -5 "$RES/tests_errors_build.txt"
pack
fi

step "where each step's device time goes (every kernel, torch.profiler)"
skipped profile || within 100 30 python3 benchmarks/profile_kernels.py --cases $PROFILE_CASES --json "$RES/kernel_profile.json" || status=1
pack

# Information: the estimators' whole fits on GPU rows (bench_fit.py: EDPairs(32) and
# SphericalKMeans(32) on 1M x 256; the data made on the CPU first, about 5-10 s), last of the
# default steps, so it runs only where the budget has room; neither a skip nor a failure fails
# the call (a failing fit prints its error in the summary; the CUDA tests gate the estimators).
step "whole fits on the GPU (information)"
skipped fit || INFO=1 within 120 60 python3 benchmarks/bench_fit.py --device cuda --methods edpairs,spherical_kmeans \
  --json "$RES/fit_cuda.json" || echo "(whole fits: not run or failed; information only)"
pack

# Information only: the estimators with TF32 as the float32 default (EDPAIRS_PRECISION=tf32).
step "estimator tests with EDPAIRS_PRECISION=tf32 (information, not a gate)"
skipped estimators || EDPAIRS_PRECISION=tf32 within 120 30 python3 -m pytest -q -m "$MARK" tests/test_cuda_estimators.py -p no:cacheprovider 2>&1 | tail -5

step "hardware counters of the k-means step's kernels (ncu, clocks left alone; into this log)"
if ! skipped ncu; then
  if command -v ncu >/dev/null; then
    within 240 60 ncu --clock-control none -k "regex:assign|segmented|scatter|histogram|reduce_fused" --launch-count 12 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section Occupancy \
      python3 benchmarks/profile_kernels.py --run-only --cases $NCU_CASES 2>&1 | grep -v "^==PROF==" | cut -c1-140
    [ "${PIPESTATUS[0]}" != 0 ] && status=1
  else
    echo "(no ncu on this machine)"
  fi
fi

step "where the route's time goes (each piece alone)"
skipped route_parts || within 120 30 python3 benchmarks/bench_route_parts.py --json "$RES/route_parts.json" || status=1
step "host data streamed to the GPU (DeviceChunks vs .to per chunk vs the pinned copy rate)"
skipped stream || within 240 60 python3 benchmarks/bench_stream.py --gib "$STREAM_GIB" --repeat 3 --json "$RES/stream_cuda.json" || status=1
pack

step "summary against the goals of issue 6"
# First which candidates the run says to make defaults (benchmarks/decide.py), then the goals.
python3 benchmarks/decide.py "$RES" --json "$RES/decisions.json" | tee "$OUT/summary.txt"
python3 benchmarks/goals.py "$RES" | tee -a "$OUT/summary.txt"
pack
step "done (status $status)"
exit $status
