"""The GPU benchmark scripts' pieces that run without a GPU: the same-shape cuBLAS rates of
gpu_ceilings.py on CPU torch, and gpu_check.sh's summary read against result files of the
layout a device run writes (a broken summary would waste a device session's minutes)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
RATE_KEYS = ("kmeans_tf32", "kmeans_bf16", "gram_tf32", "gram_fp32", "signal_tf32", "signal_fp32")


def _ceilings():
    sys.path.insert(0, BENCH)
    try:
        import gpu_ceilings
    finally:
        sys.path.remove(BENCH)
    return gpu_ceilings


def test_same_shape_rates_on_the_cpu():
    torch = pytest.importorskip("torch")
    g = _ceilings()
    out = g.same_shape_rates(torch, "cpu", 1, kmeans=(300, 16, 8), moments=(200, 12, 5))
    assert out["kmeans_shape"] == [300, 16, 8] and out["moments_shape"] == [200, 12, 5]
    for key in RATE_KEYS:
        assert math.isfinite(out[f"{key}_TFLOPs"]) and out[f"{key}_TFLOPs"] > 0, key
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert g._shape("10,4,3") == (10, 4, 3)
    for bad in ("10,4", "10,0,3", "a,b,c"):
        with pytest.raises(Exception):
            g._shape(bad)


def _summary_script() -> str:
    with open(os.path.join(BENCH, "gpu_check.sh")) as f:
        text = f.read()
    match = re.search(r"python3 - \"\$OUT\" <<'PY'\n(.*?)\nPY\n", text, re.S)
    assert match, "gpu_check.sh has no summary block"
    return match.group(1)


def _write(folder, name, data):
    with open(os.path.join(folder, name), "w") as f:
        json.dump(data, f)


def test_gpu_check_summary_reads_a_device_run(tmp_path):
    """Ceilings with same-shape rates, k-means (with the float16-row candidates' file) and
    moments rows: the summary prints both readings of goal 2 and 4 with the ratios the numbers
    give."""
    same = {"kmeans_shape": [1000000, 512, 1024], "moments_shape": [1000000, 512, 256]}
    same.update({f"{key}_TFLOPs": 100.0 + i for i, key in enumerate(RATE_KEYS)})
    _write(tmp_path, "ceilings.json", {"copy_GBps": 3000.0, "gemm_tf32_TFLOPs": 400.0, "gemm_bf16_TFLOPs": 800.0,
                                       "gemm_fp32_TFLOPs": 50.0, "machine": {"gpu": "test card"}, "same_shape": same})
    rows = [{"size": [1000000, 512, 1024], "method": m, "median_s": s} for m, s in (("edpairs", 0.005), ("torch", 0.01))]
    rows.append({"size": [1000000, 512, 64], "method": "edpairs", "median_s": 0.002})
    _write(tmp_path, "kmeans_cuda_f32.json", {"results": rows})
    _write(tmp_path, "kmeans_cuda_half.json", {"results": [
        {"size": [1000000, 512, 1024], "method": m, "median_s": s} for m, s in (("edpairs-half", 0.004),
                                                                             ("edpairs-half-copies", 0.0045))]})
    _write(tmp_path, "moments_cuda.json", {"results": [
        {"op": "moments", "size": [1000000, 512, 256], "method": "edpairs-tf32", "median_s": 0.004},
        {"op": "signal_moments", "size": [1000000, 512, 256], "method": "edpairs", "median_s": 0.02}]})
    res = subprocess.run([sys.executable, "-c", _summary_script(), str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()

    def goal(label):
        hit = [line for line in lines if line.startswith(label)]
        assert len(hit) == 1, (label, res.stdout)
        return float(hit[0][len(label):].split()[0])

    flops = 2e6 * 512 * 1024
    assert goal("k=1024 f32 edpairs: torch TF32 / edpairs TF32 time") == pytest.approx(2.0, abs=0.01)
    assert goal("k=1024 f32 edpairs: rate / TF32 GEMM rate") == pytest.approx(flops / 0.005 / 400e12, abs=0.01)
    assert goal("k=1024 f32 edpairs: rate / same-shape TF32 GEMM rate") == pytest.approx(flops / 0.005 / 100e12, abs=0.01)
    assert goal("k=1024 f32 edpairs-half: torch TF32 / edpairs TF32 time") == pytest.approx(2.5, abs=0.01)
    assert goal("k=1024 f32 edpairs-half-copies: torch TF32 / edpairs TF32 time") == pytest.approx(2.22, abs=0.01)
    assert goal("k=64 f32 edpairs: one read of X (GB/s) / copy GB/s") == pytest.approx(2.048e9 / 0.002 / 3000e9, abs=0.01)
    assert goal("moments: edpairs-tf32 rate / same-shape TF32") == pytest.approx(1e6 * 512**2 / 0.004 / 102e12, abs=0.01)
    signal = 6e6 * 512 * 256 / 0.02
    assert goal("signal_moments: edpairs rate / fp32 GEMM rate (exact)") == pytest.approx(signal / 50e12, abs=0.01)
    assert goal("signal_moments: edpairs rate / same-shape fp32") == pytest.approx(signal / 105e12, abs=0.01)
    assert any(line.startswith("same-shape cuBLAS: kmeans_tf32 100") for line in lines)


def test_gpu_check_parts_split_the_default():
    """PART=1 measures (no tests), PART=2 tests (no benchmarks), together everything the
    default runs; another PART is refused."""
    with open(os.path.join(BENCH, "gpu_check.sh")) as f:
        text = f.read()
    knobs = text[text.index("ARCHS="):text.index("skipped() {")]
    steps = {"tests", "ceilings", "kmeans", "bf16", "moments", "profile"}

    def run(part):
        script = knobs + '\necho "SKIP=$SKIP"\n'
        env = {k: v for k, v in os.environ.items() if k not in ("SKIP", "KM_SIZES", "BF16_METHODS")}
        return subprocess.run(["bash", "-c", script], env={**env, "PART": part}, capture_output=True, text=True,
                              timeout=30)

    skips = {}
    for part in ("1", "2", ""):
        res = run(part)
        assert res.returncode == 0, res.stderr
        skips[part] = set(res.stdout.strip().rpartition("SKIP=")[2].split())
    ran = {part: steps - skips[part] for part in skips}
    assert ran["1"] == steps - {"tests"} and ran["2"] == {"tests"} and ran[""] == steps
    res = run("3")
    assert res.returncode == 2 and "PART must be 1 or 2, got '3'" in res.stdout
