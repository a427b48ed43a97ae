#!/usr/bin/env bash
# One call on a GPU machine: build edpairs with its CUDA kernels, run the CUDA tests, measure
# the card's ceilings, run the GPU benchmarks (each with a correctness check against float64
# before timing); JSON and logs under $OUT, the goals of issue 6 as a short table last.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# Files under $OUT (the device returns at most 8): log.txt, ceilings.json,
# kmeans_cuda_f32.json, kmeans_cuda_k64.json, kmeans_cuda_half.json, kmeans_cuda_bf16.json, moments_cuda.json,
# kernel_profile.json, cuda_tests_new.xml, cuda_tests.xml, and with SKIP="" also
# stream_cuda.json and route_parts.json: more than 8 unless split as below (build.log too when
# the build fails, in place of the later files). The benchmarks run before the tests, each in a
# process of its own, so that a call cut short by its time limit keeps the measurements. The
# whole default takes about 10 minutes, more than one device call, so a session runs it as two
# (PART, below), each about 5 minutes:
#   OUT=$OUT PART=1 bash benchmarks/gpu_check.sh    # build, ceilings, the goals' benchmarks, kernel profile
#   OUT=$OUT PART=2 bash benchmarks/gpu_check.sh    # the CUDA tests (the build kept on a warm machine)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out/gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/log.txt") 2>&1
status=0
step() { echo "== $* ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader

# Knobs: ARCHS (CUDA architectures to build; the card's own by default, to build fast),
# PROFILE_CASES (the steps whose kernels profile_kernels.py times one by one),
# SLOW=1 (also the slow CUDA tests), REPEAT (timed repetitions per benchmark), SKIP (steps to
# leave out: tests, estimators, ceilings, kmeans, bf16, moments, profile, ncu, route_parts,
# stream; by default estimators, route_parts and stream, measured in run4 / run5 and unchanged
# since, and ncu; SKIP="" runs everything). The hardware counters of the k-means kernels:
#   SKIP="tests estimators kmeans bf16 moments profile route_parts stream" bash benchmarks/gpu_check.sh
# QUICK=1: a shorter call (about 5 minutes, so that a session can run it twice): the main CUDA
# tests only for the route, moments and streaming, no bf16 k-means, fewer k-means rows.
# TESTS_K, KM_METHODS, KM_SIZES, BF16_METHODS, BF16_SIZES, STREAM_GIB, NCU_CASES override the
# choices below.
ARCHS="${ARCHS:-90}"
REPEAT="${REPEAT:-5}"
QUICK="${QUICK:-0}"
# PART=1 / PART=2: the default split into two device calls of about 5 minutes, so that both and
# the machine's start fit a session's 15 minutes of device time. 1: build, ceilings, k-means at
# k = 1024 and 64 with the k = 64 candidates, bf16 at k = 1024 (edpairs and torch), moments, the
# kernel profile. 2: build (kept from part 1 on a warm machine), the CUDA tests.
case "${PART:-}" in
  1) SKIP="${SKIP-tests estimators route_parts stream ncu}"
     KM_SIZES="${KM_SIZES:-1000000,512,1024 1000000,512,64}"
     BF16_METHODS="${BF16_METHODS:-edpairs,torch}"
     # The profile cases that decide the next defaults, in one process: the paths that ran on a
     # GPU before first, then the candidates by the goal they serve (2, 4, 3), the two new
     # wgmma kernels (the resident float16 rows, the fused small-k kernel) last: a fault in
     # one poisons the process's later cases (each case is saved as it ends).
     PROFILE_CASES="${PROFILE_CASES:-kmeans:1000000,512,1024 kmeans:1000000,512,64 moments:1000000,512 \
signal:1000000,512,256 kmeans:1000000,512,1024:EDPAIRS_ASSIGN_HALF=copies \
moments:1000000,512:EDPAIRS_GEMM_HALF=1;EDPAIRS_GEMM_OVERLAP=1 signal:1000000,512,256:EDPAIRS_GEMM_HALF=1;EDPAIRS_GEMM_OVERLAP=1 \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=columns kmeans:1000000,512,1024:EDPAIRS_ASSIGN_HALF=1 \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused}"
     PROFILE_TIMEOUT="${PROFILE_TIMEOUT:-100}" ;;
  2) SKIP="${SKIP-estimators ceilings kmeans bf16 moments profile route_parts stream ncu}" ;;
  "") ;;
  *) echo "PART must be 1 or 2, got '$PART'"; exit 2 ;;
esac
# "edpairs" is the default dispatch: on Hopper, labels on wgmma for k >= 129 (float32 and
# 16-bit), on mma below; edpairs-labels its labelling alone; edpairs-kernel the mma.sync kernel. The cuBLAS route
# (edpairs-gemm, the float32 default there before run 5; run5b: 7.64 ms at k = 1024) is left
# out by default.
# The tests of kernels that have not run on a GPU yet (or changed since): in a process of their
# own before the others, so that a fault there cannot poison the CUDA context of the rest.
NEW_K="${NEW_K:-wgmma or column or fused or tensor_core_assign_matches or prefetch or overlap or float16_operands or float16_rows}"
if [ "$QUICK" = 1 ]; then
  SKIP="${SKIP-estimators route_parts stream bf16 ncu}"
  TESTS_K="${TESTS_K:-not ($NEW_K) and (moment or route or centre or rescore or argmax or stream or gram)}"
  KM_METHODS="${KM_METHODS:-edpairs,edpairs-labels,torch}"
else
  SKIP="${SKIP-estimators route_parts stream ncu}"
  TESTS_K="${TESTS_K:-not ($NEW_K)}"
  KM_METHODS="${KM_METHODS:-edpairs,edpairs-labels,torch}"
fi
KM_SIZES="${KM_SIZES:-1000000,512,1024 1000000,512,256 1000000,512,64}"
BF16_METHODS="${BF16_METHODS:-edpairs,edpairs-kernel,torch}"
BF16_SIZES="${BF16_SIZES:-1000000,512,1024}"
STREAM_GIB="${STREAM_GIB:-4}"
K64_METHODS="${K64_METHODS:-edpairs-wgmma-columns,edpairs-fused-wgmma}"
# The k = 64 rows time the candidate defaults (wgmma labels in 64-wide tiles, owned-column sums,
# the fused kernel; opt-in until measured) against the default (mma labels, sorted sums: run 5's
# path) piece by piece. All cases share one process, so the paths that ran on a GPU before go
# first and the kernels that never did last, the fused one at the very end (a fault poisons
# the process's later cases; the JSON keeps the earlier ones).
PROFILE_CASES="${PROFILE_CASES:-moments:1000000,512 moments-f32:1000000,512 signal:1000000,512,256 \
kmeans:1000000,512,1024 kmeans:1000000,512,256 kmeans:1000000,512,64 labels:1000000,512,64 \
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
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused;EDPAIRS_WGMMA_PREFETCH=0}"
NCU_CASES="${NCU_CASES:-kmeans:1000000,512,64 kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=columns \
kmeans:1000000,512,64:EDPAIRS_ASSIGN_KERNEL=wgmma;EDPAIRS_ASSIGN_SUMS=fused kmeans:1000000,512,1024}"
skipped() { case " $SKIP " in *" $1 "*) echo "(skipped: SKIP has $1)"; return 0;; esac; return 1; }
MARK="cuda and not slow"
[ "${SLOW:-0}" = 1 ] && MARK="cuda"
# test_build checks that the build lists exactly the architectures asked for here.
export EDPAIRS_CUDA_ARCHITECTURES="$ARCHS"

step "build (EDPAIRS_CUDA=ON, archs $ARCHS, editable, no network)"
if ! EDPAIRS_CUDA=ON CMAKE_BUILD_PARALLEL_LEVEL=16 timeout 420 python3 -m pip install --no-build-isolation --no-deps -e . >/tmp/edpairs_build.log 2>&1; then
  cp /tmp/edpairs_build.log "$OUT/build.log"; tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
python3 -c "import edpairs, json; i = edpairs.build_info(); print(json.dumps(i)); assert i['cuda'] and edpairs.cuda_device_count() > 0"

step "ceilings"
skipped ceilings || timeout 120 python3 benchmarks/gpu_ceilings.py --json "$OUT/ceilings.json" || status=1

# The route's step variants, the exact float32 paths and the opt-in kernels (-r16384, -f32,
# -kernel-f32: run4; -wgmma-tma, -fused: run5) are left out to keep the call inside its time;
# add them with KMEANS_EXTRA=edpairs-f32,edpairs-wgmma-tma,...
step "spherical k-means iteration (float32 data: cuBLAS route / tensor-core kernels, TF32; torch TF32)"
skipped kmeans || timeout 420 python3 benchmarks/bench_kmeans.py --device cuda --methods "$KM_METHODS${KMEANS_EXTRA:+,$KMEANS_EXTRA}" --repeat "$REPEAT" \
  --sizes $KM_SIZES --json "$OUT/kmeans_cuda_f32.json" || status=1
step "k = 64: the candidate defaults (wgmma labels + owned-column sums; the fused pass)"
skipped kmeans || timeout 200 python3 benchmarks/bench_kmeans.py --device cuda --methods "$K64_METHODS" --repeat "$REPEAT" \
  --method-timeout 60 --sizes 1000000,512,64 --json "$OUT/kmeans_cuda_k64.json" || status=1
step "k = 1024: the candidate float16 rows (EDPAIRS_ASSIGN_HALF=1: made in shared memory; =copies: half_rows copies)"
skipped kmeans || timeout 150 python3 benchmarks/bench_kmeans.py --device cuda --methods edpairs-half,edpairs-half-copies --repeat "$REPEAT" \
  --method-timeout 60 --sizes 1000000,512,1024 --json "$OUT/kmeans_cuda_half.json" || status=1
step "spherical k-means iteration (bfloat16 data)"
skipped bf16 || timeout 200 python3 benchmarks/bench_kmeans.py --device cuda --dtype bfloat16 --methods "$BF16_METHODS" --repeat "$REPEAT" \
  --sizes $BF16_SIZES --json "$OUT/kmeans_cuda_bf16.json" || status=1

step "moments and signal moments"
skipped moments || timeout 240 python3 benchmarks/bench_moments.py --device cuda --sizes 1000000,512,256 --repeat "$REPEAT" \
  --triangle-blocks 128 256 --json "$OUT/moments_cuda.json" || status=1

step "where each step's device time goes (every kernel, torch.profiler)"
skipped profile || timeout "${PROFILE_TIMEOUT:-150}" python3 benchmarks/profile_kernels.py --cases $PROFILE_CASES --json "$OUT/kernel_profile.json" || status=1

step "hardware counters of the k-means step's kernels (ncu, clocks left alone; into this log)"
if ! skipped ncu; then
  if command -v ncu >/dev/null; then
    timeout 240 ncu --clock-control none -k "regex:assign|segmented|scatter|histogram|reduce_fused" --launch-count 12 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section Occupancy \
      python3 benchmarks/profile_kernels.py --run-only --cases $NCU_CASES 2>&1 | grep -v "^==PROF==" | cut -c1-140
    [ "${PIPESTATUS[0]}" != 0 ] && status=1
  else
    echo "(no ncu on this machine)"
  fi
fi

step "where the route's time goes (each piece alone)"
skipped route_parts || timeout 120 python3 benchmarks/bench_route_parts.py --json "$OUT/route_parts.json" || status=1

step "host data streamed to the GPU (DeviceChunks vs .to per chunk vs the pinned copy rate)"
skipped stream || timeout 240 python3 benchmarks/bench_stream.py --gib "$STREAM_GIB" --repeat 3 --json "$OUT/stream_cuda.json" || status=1

step "CUDA tests"
if ! skipped tests; then
# Every test marked cuda (any file; those needing packages the device lacks skip), plus the
# error and build tests. The tests of the new kernels (NEW_K) run in a process of their own
# first: a fault of a kernel that has never run on a GPU would otherwise poison the CUDA context
# of every test after it.
# A kernel that deadlocks blocks its process in a CUDA call, where no signal handler runs:
# with pytest-timeout's thread method a test over 90 s dumps the stacks (naming the test) and
# ends its process at once, instead of the group's 300 s running out (its junit file is lost).
PER_TEST=""
python3 -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout 90 --timeout-method thread"
timeout 300 python3 -m pytest -q -m "$MARK" tests/ -k "$NEW_K" -p no:cacheprovider $PER_TEST --junitxml="$OUT/cuda_tests_new.xml" 2>&1 | tail -15
[ "${PIPESTATUS[0]}" != 0 ] && status=1
timeout 300 python3 -m pytest -q -m "$MARK" tests/ -k "$TESTS_K" -p no:cacheprovider $PER_TEST --junitxml="$OUT/cuda_tests.xml" 2>&1 | tail -30
[ "${PIPESTATUS[0]}" != 0 ] && status=1
timeout 200 python3 -m pytest -q tests/test_errors.py tests/test_build.py -p no:cacheprovider 2>&1 | tail -5
[ "${PIPESTATUS[0]}" != 0 ] && status=1
fi
# Information only: the estimators with TF32 as the float32 default (EDPAIRS_PRECISION=tf32).
step "estimator tests with EDPAIRS_PRECISION=tf32 (information, not a gate)"
skipped estimators || EDPAIRS_PRECISION=tf32 timeout 120 python3 -m pytest -q -m "$MARK" tests/test_cuda_estimators.py -p no:cacheprovider 2>&1 | tail -5

step "summary against the goals of issue 6"
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
c = load("ceilings.json") or {}
copy, tf32, bf16 = c.get("copy_GBps", 0), c.get("gemm_tf32_TFLOPs", 0), c.get("gemm_bf16_TFLOPs", 0)
print(f"device: {(c.get('machine') or {}).get('gpu', '?')}")
print(f"ceilings: copy {copy:.0f} GB/s, tf32 {tf32:.0f}, bf16 {bf16:.0f}, fp32 {c.get('gemm_fp32_TFLOPs', 0):.0f} TFLOP/s")
# cuBLAS at the benchmarks' own shapes (gpu_ceilings.py): goal 2 names "the TF32 GEMM rate for
# the same shape"; the square-product peak above is the stricter reading, and both are printed.
same = c.get("same_shape") or {}
if same:
    print("same-shape cuBLAS: " + ", ".join(f"{key[:-7]} {v:.0f}" for key, v in same.items() if key.endswith("_TFLOPs"))
          + f" TFLOP/s (k-means {same.get('kmeans_shape')}, moments {same.get('moments_shape')})")
def ratio(rate, ceiling):
    return rate / ceiling if ceiling else 0
rows = []
def kmeans(name):
    r = load(name) or {}
    return {(tuple(x["size"]), x["method"]): x for x in r.get("results", [])}
f32, b16 = kmeans("kmeans_cuda_f32.json"), kmeans("kmeans_cuda_bf16.json")
f32.update(kmeans("kmeans_cuda_k64.json"))
f32.update(kmeans("kmeans_cuda_half.json"))
print(f"{'file':10s} {'N,D,k':18s} {'method':20s} {'ms':>8s} {'TFLOP/s':>8s} {'labels ok':>9s} {'ok@2e-3':>8s} {'sums err':>9s}")
for tag, table in (("f32", f32), ("bf16", b16)):
    for (size, method), x in sorted(table.items()):
        if "median_s" not in x:
            print(f"{tag:10s} {str(size):18s} {method:20s} {str(x.get('skipped') or x.get('error'))[:60]}")
            continue
        n, d, k = size
        tfl = 2 * n * d * k / x["median_s"] / 1e12
        print(f"{tag:10s} {','.join(map(str, size)):18s} {method:20s} {x['median_s'] * 1e3:8.2f} {tfl:8.1f} "
              f"{x.get('label_agreement', float('nan')):9.4f} {x.get('label_agreement_2e-3', float('nan')):8.4f} "
              f"{x.get('sums_rel_err', float('nan')):9.1e}")
def t(table, size, method):
    return (table.get((size, method)) or {}).get("median_s")
for tag, table in (("f32", f32), ("bf16", b16)):
    for size in sorted({s for s, _ in table}):
        whole, labels = t(table, size, "edpairs"), t(table, size, "edpairs-labels")
        if whole and labels:
            print(f"{tag} {size}: labelling {labels * 1e3:.2f} ms, cluster sums {(whole - labels) * 1e3:.2f} ms "
                  f"(edpairs - edpairs-labels)")
big, small = (1000000, 512, 1024), (1000000, 512, 64)
goals = []
tt = t(f32, big, "torch")
for method in ("edpairs", "edpairs-half", "edpairs-half-copies", "edpairs-gemm", "edpairs-r16384", "edpairs-kernel", "edpairs-wgmma",
               "edpairs-wgmma-tma"):
    e = t(f32, big, method)
    if e and tt:
        goals.append((f"k=1024 f32 {method}: torch TF32 / edpairs TF32 time", tt / e, 2.0))
        goals.append((f"k=1024 f32 {method}: rate / TF32 GEMM rate", ratio(2 * 1e6 * 512 * 1024 / e / 1e12, tf32), 0.6))
        goals.append((f"k=1024 f32 {method}: rate / same-shape TF32 GEMM rate",
                      ratio(2 * 1e6 * 512 * 1024 / e / 1e12, same.get("kmeans_tf32_TFLOPs", 0)), 0.6))
tt = t(b16, big, "torch")
for method in ("edpairs", "edpairs-kernel", "edpairs-wgmma"):
    e = t(b16, big, method)
    if e and tt:
        goals.append((f"k=1024 bf16 {method}: torch bf16 / edpairs time", tt / e, 1.5))
for method in ("edpairs", "edpairs-wgmma-columns", "edpairs-fused-wgmma", "edpairs-mma-sorted", "edpairs-gemm",
               "edpairs-kernel", "edpairs-fused", "edpairs-wgmma"):
    e = t(f32, small, method)
    if e:
        goals.append((f"k=64 f32 {method}: one read of X (GB/s) / copy GB/s", 1e6 * 512 * 4 / e / 1e9 / copy if copy else 0, 0.7))
e = t(b16, small, "edpairs")
if e:
    goals.append(("k=64 bf16 edpairs: one read of X / copy (information)", 1e6 * 512 * 2 / e / 1e9 / copy if copy else 0, 0.7))
m = load("moments_cuda.json") or {}
print(f"{'op':16s} {'N,D,I':18s} {'method':22s} {'ms':>8s} {'rel err':>9s}")
for x in m.get("results", []):
    if "median_s" in x:
        print(f"{x['op']:16s} {','.join(map(str, x['size'])):18s} {x['method']:22s} {x['median_s'] * 1e3:8.2f} "
              f"{x.get('rel_err_sample', float('nan')):9.1e}")
fp32 = c.get("gemm_fp32_TFLOPs", 0)
for x in m.get("results", []):
    if x.get("method", "").startswith("edpairs") and "median_s" in x:
        n, d, i = x["size"]
        flops = n * d * d if x["op"] == "moments" else 2.0 * n * d * i * 3
        rate = flops / x["median_s"] / 1e12
        # The same-shape products: cuBLAS's X^T X (both triangles, 2 N D^2) for the moments, X W
        # and A^T X for the signal moments.
        kind = "gram" if x["op"] == "moments" else "signal"
        if "tf32" in x["method"]:
            goals.append((f"{x['op']}: {x['method']} rate / TF32 GEMM rate", ratio(rate, tf32), 0.5))
            goals.append((f"{x['op']}: {x['method']} rate / same-shape TF32", ratio(rate, same.get(f"{kind}_tf32_TFLOPs", 0)), 0.5))
        if "-half" in x["method"]:  # float16 operands: also against the 16-bit rates
            goals.append((f"{x['op']}: {x['method']} rate / bf16 GEMM rate", ratio(rate, bf16), 0.5))
            if x["op"] == "moments":
                goals.append((f"{x['op']}: {x['method']} rate / same-shape fp16", ratio(rate, same.get("gram_fp16_TFLOPs", 0)), 0.5))
        else:
            goals.append((f"{x['op']}: {x['method']} rate / fp32 GEMM rate (exact)", ratio(rate, fp32), 0.5))
            goals.append((f"{x['op']}: {x['method']} rate / same-shape fp32", ratio(rate, same.get(f"{kind}_fp32_TFLOPs", 0)), 0.5))
for x in (load("kernel_profile.json") or {}).get("results", []):
    if "kernels" in x:
        top = ", ".join(f"{k['name'][:40]} {k['seconds'] * 1e3:.2f}" for k in x["kernels"][:4])
        print(f"profile {x['case']:80s} step {x['wall_s'] * 1e3:7.2f} ms, busy {x['device_busy_s'] * 1e3:7.2f}: {top}")
for x in (load("route_parts.json") or {}).get("results", []):
    print(f"{x['group']:14s} {x['piece']:40s} {x['ms']:8.3f} ms  {x.get('note', '')}")
st = {x["method"]: x for x in (load("stream_cuda.json") or {}).get("results", [])}
for method in ("moments DeviceChunks", "k-means pass DeviceChunks", "moments DeviceChunks registered",
               "k-means pass DeviceChunks registered"):
    if method in st:
        goals.append((f"streamed {method.replace(' DeviceChunks', '')}: host GB/s / pinned H2D GB/s",
                      st[method]["ratio_to_ceiling"], 0.8))
import xml.etree.ElementTree as ET
for name, what in (("cuda_tests_new.xml", "new kernels"), ("cuda_tests.xml", "the rest")):
    try:
        suite = ET.parse(os.path.join(out, name)).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, bad = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        print(f"CUDA tests ({what}): {n} run, {int(suite.get('skipped', 0))} skipped, {bad} failed or errors")
        goals.append((f"CUDA tests ({what}): all pass (1 = yes)", float(bad == 0 and n > 0), 1.0))
    except (OSError, ET.ParseError, AttributeError):
        print(f"CUDA tests ({what}): no {name}")
print()
print(f"{'goal (issue 6)':62s} {'measured':>9s} {'goal':>6s}  met")
for name, value, goal in goals:
    print(f"{name:62s} {value:9.2f} {goal:6.2f}  {'yes' if value >= goal else 'NO'}")
PY
step "done (status $status)"
exit $status
