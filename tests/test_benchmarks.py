"""The GPU benchmark scripts' pieces that run without a GPU: the same-shape cuBLAS rates of
gpu_ceilings.py on CPU torch, goals.py (gpu_check.sh's summary, and the runs' history) read against result files of the layout a
device run writes, and its plan (order of steps, time budget, packed results) run with fake
python3 / nvidia-smi: a broken script would waste a device session's minutes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
RATE_KEYS = ("kmeans_tf32", "kmeans_bf16", "gram_tf32", "gram_fp32", "signal_tf32", "signal_fp32")


def _script(name: str):
    """The benchmark script ``name`` (benchmarks/<name>.py) imported as a module."""
    import importlib

    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


def _ceilings():
    return _script("gpu_ceilings")


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
    _write(tmp_path, "kmeans_cuda_faiss.json", {"results": [
        {"size": [1000000, 512, 1024], "method": "edpairs", "median_s": 0.006},
        {"size": [1000000, 512, 1024], "method": "edpairs-f32", "median_s": 0.012},
        {"size": [1000000, 512, 1024], "method": "faiss", "median_s": 0.3, "one_call_s": 0.9, "faiss_version": "1.7.3"},
        {"size": [1000000, 512, 1024], "method": "faiss-search", "median_s": 0.015}]})
    _write(tmp_path, "fit_cuda.json", {"results": {"edpairs": {"wall_s": 1.5, "n_iter": 40, "mean_iou": 0.9},
                                                   "spherical_kmeans": {"error": "RuntimeError: boom"}}})
    # Two test groups without failures in their junit files; the second was stopped by its time
    # limit (pytest's exit status 2), so it does not count as passing.
    for name, rc in (("cuda_tests_new", "0"), ("cuda_tests", "2")):
        (tmp_path / f"{name}.xml").write_text('<testsuites><testsuite tests="5" failures="0" errors="0" skipped="1">'
                                              '</testsuite></testsuites>')
        (tmp_path / f"{name}.rc").write_text(rc + "\n")
    res = subprocess.run([sys.executable, os.path.join(BENCH, "goals.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
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
    assert goal("k=1024 f32 faiss / edpairs time, same call (goal 5)") == pytest.approx(50.0, abs=0.01)
    assert goal("k=1024 f32 faiss-search / edpairs time, same call (goal 5)") == pytest.approx(2.5, abs=0.01)
    assert goal("k=1024 f32 faiss-search / edpairs-f32 time, same call (goal 5)") == pytest.approx(1.25, abs=0.01)
    assert any("faiss 1.7.3; one call of one iteration 900 ms" in line for line in lines)
    assert goal("moments: edpairs-tf32 rate / same-shape TF32") == pytest.approx(1e6 * 512**2 / 0.004 / 102e12, abs=0.01)
    signal = 6e6 * 512 * 256 / 0.02
    assert goal("signal_moments: edpairs rate / fp32 GEMM rate (exact)") == pytest.approx(signal / 50e12, abs=0.01)
    assert goal("signal_moments: edpairs rate / same-shape fp32") == pytest.approx(signal / 105e12, abs=0.01)
    assert any(line.startswith("same-shape cuBLAS: kmeans_tf32 100") for line in lines)
    assert "whole fit on the GPU, edpairs: 1.50 s, 40 iterations, IoU 0.900" in lines
    assert "whole fit on the GPU, spherical_kmeans: RuntimeError: boom" in lines
    assert goal("CUDA tests (new kernels): all pass (1 = yes)") == 1.0
    assert goal("CUDA tests (the rest): all pass (1 = yes)") == 0.0
    # The TF32 moments row is read against the TF32 rates only, not the exact float32 one.
    assert not any(line.startswith("moments: edpairs-tf32 rate / fp32") for line in lines)


def _goals():
    return _script("goals")


def _run_files(folder, torch_s, edpairs_s, same=True, tests=None):
    os.makedirs(folder, exist_ok=True)
    ceilings = {"copy_GBps": 4000.0, "gemm_tf32_TFLOPs": 400.0, "gemm_bf16_TFLOPs": 800.0, "gemm_fp32_TFLOPs": 50.0}
    if same:
        ceilings["same_shape"] = {"kmeans_tf32_TFLOPs": 300.0}
    _write(folder, "ceilings.json", ceilings)
    _write(folder, "kmeans_cuda_f32.json", {"results": [
        {"size": [1000000, 512, 1024], "method": "torch", "median_s": torch_s},
        {"size": [1000000, 512, 1024], "method": "edpairs", "median_s": edpairs_s},
        {"size": [1000000, 512, 64], "method": "edpairs", "median_s": 0.001}]})
    for name, rc in (tests or {}).items():
        with open(os.path.join(folder, f"{name}.xml"), "w") as f:
            f.write('<testsuite tests="3" failures="0" errors="0" skipped="0"></testsuite>')
        with open(os.path.join(folder, f"{name}.rc"), "w") as f:
            f.write(rc)


def test_goal_readings_need_their_ceiling(tmp_path):
    """A run whose ceilings lack the same-shape rates (older runs) gives no same-shape reading,
    not a 0.00 that reads as "not met"."""
    g = _goals()
    _run_files(str(tmp_path), 0.01, 0.005, same=False)
    names = [name for name, _, _ in g.goal_rows(g.read_run(str(tmp_path)))]
    assert "k=1024 f32 edpairs: rate / TF32 GEMM rate" in names
    assert not any("same-shape" in name for name in names)


def test_goals_history_table_and_plot(tmp_path, monkeypatch, capsys):
    """--history: one column per run folder in run order (a card's folder is its run 1; folders
    without ceilings.json or not named runN are not runs), "-" where a run lacks a reading, "x"
    with the reason for a reading known to be misread; --plot writes a PNG (atomically: no
    temporary left) that is not blank."""
    g = _goals()
    results = tmp_path / "results"
    _run_files(str(results / "h9"), 0.02, 0.01)
    _run_files(str(results / "h9" / "run10"), 0.02, 0.004, tests={"cuda_tests": "0", "cuda_tests_new": "2"})
    _run_files(str(results / "h9" / "run2b"), 0.02, 0.008)
    _run_files(str(results / "a1" / "run2"), 0.02, 0.005)
    (results / "h9" / "notes").mkdir()
    _run_files(str(results / "h9" / "old"), 0.02, 0.001)  # (not a run's name)
    labels, table = g.history(str(results))
    assert labels == ["h9", "a1/run2", "h9/run2b", "h9/run10"]
    assert table["2 k=1024 f32 step: torch / edpairs"] == (2.0, [2.0, 4.0, 2.5, 5.0])
    assert table["3 k=64 f32: one read of X / copy"][1] == [pytest.approx(2.048e9 / 0.001 / 4000e9)] * 4
    assert table["1 CUDA tests pass (the rest)"] == (1.0, [None, None, None, 1.0])
    assert table["1 CUDA tests pass (new kernels)"] == (1.0, [None, None, None, 0.0])
    assert table["4 moments TF32: / same-shape TF32"] == (None, [None] * 4)
    monkeypatch.setitem(g.MISREAD, ("h9/run2b", "2 k=1024 f32 step: torch / edpairs"), "a test's reason")
    plot = tmp_path / "goals.png"
    assert g.main(["--history", "--results", str(results), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(line for line in out if line.startswith("2 k=1024 f32 step: torch / edpairs"))
    assert row.split()[-5:] == ["2.00", "2.00", "4.00", "x", "5.00"]
    assert "x: h9/run2b, 2 k=1024 f32 step: torch / edpairs: a test's reason" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and sorted(os.listdir(tmp_path)) == ["goals.png", "results"]
    from PIL import Image

    with Image.open(plot) as im:
        assert len(im.convert("RGB").getcolors(1 << 20)) > 3


def test_goals_cli_refuses_what_it_cannot_read(tmp_path, capsys):
    g = _goals()
    for argv, message in (([], "give one run's folder or --history"),
                          ([str(tmp_path), "--history"], "give one run's folder or --history"),
                          ([str(tmp_path), "--plot", "x.png"], "--plot goes with --history"),
                          ([str(tmp_path / "missing")], "no folder"),
                          (["--history", "--results", str(tmp_path)], "no run (a folder with ceilings.json)")):
        with pytest.raises(SystemExit) as exc:
            g.main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err, argv


_FAKE_PYTHON = """#!/bin/sh
# python3 for gpu_check.sh without a GPU: the summary, decide.py, the build check and the
# package probes run for real; every other command is logged (with the faiss library it was
# given, if any) and touches the result file it names (and the one matching SLOW_MATCH sleeps
# FAKE_SLEEP seconds).
case "$1" in
  -) exec "$REAL_PY" "$@" ;;
  -c) case "$2" in *cuda_device_count*) exit 0 ;; esac; exec "$REAL_PY" "$@" ;;
  benchmarks/decide.py|benchmarks/goals.py) exec "$REAL_PY" "$@" ;;
esac
echo "$*${EDPAIRS_FAISS_LIB:+ [EDPAIRS_FAISS_LIB=$EDPAIRS_FAISS_LIB]}" >> "$CALLS"
for a in "$@"; do
  case "$a" in --junitxml=*) : > "${a#--junitxml=}" ;; esac
done
prev=""
for a in "$@"; do
  [ "$prev" = "--json" ] && echo '{"results": []}' > "$a"
  prev="$a"
done
case "$*" in *"${SLOW_MATCH:-@none@}"*) sleep "$FAKE_SLEEP" ;; esac
"""


def _fake_gpu_check(tmp_path, **env):
    """gpu_check.sh with fake python3 / nvidia-smi first on PATH: (return code, output, the
    logged commands, the names packed into results.tar.gz)."""
    import tarfile

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(_FAKE_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho fake card\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    calls.write_text("")
    run_env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "REAL_PY": sys.executable, "CALLS": str(calls),
               "OUT": str(out), "RES": str(tmp_path / "res"), "FAISS_LIB": str(tmp_path / "no_faiss.so"), **env}
    res = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh")], env=run_env, capture_output=True, text=True,
                         timeout=120)
    with tarfile.open(out / "results.tar.gz") as tar:
        packed = {os.path.basename(n) for n in tar.getnames()}
    return res.returncode, res.stdout, calls.read_text().splitlines(), packed


def test_gpu_check_runs_every_step_in_one_call(tmp_path):
    """The default plan (one call): build, ceilings, the k-means, float16-row, k = 64 and bf16
    rows, the moments, the three test groups, the profile, in that order; every result packed
    into results.tar.gz (the device returns at most 8 files); the summary written."""
    code, stdout, calls, packed = _fake_gpu_check(tmp_path)
    assert code == 0, stdout
    order = ["pip install", "gpu_ceilings.py", "bench_kmeans.py --device cuda --methods edpairs,edpairs-labels,edpairs-fit,edpairs-fit5,torch",
             "--methods edpairs-half,edpairs-tf32-rows,edpairs-seg128,edpairs-seg64",
             "--methods edpairs-wgmma,edpairs-wgmma-columns,edpairs-fused-wgmma,edpairs-seg128,edpairs-seg64",
             "--dtype bfloat16", "bench_moments.py", "-m pytest", "-m pytest", "tests/test_errors.py",
             "profile_kernels.py", "bench_fit.py --device cuda"]
    assert len(calls) == len(order), calls
    for call, part in zip(calls, order):
        assert part in call, (part, call)
    assert "-k wgmma or column" in calls[7].replace("(", "") and "-k not (wgmma or column" in calls[8]
    assert {"ceilings.json", "kmeans_cuda_f32.json", "kmeans_cuda_half.json", "kmeans_cuda_k64.json",
            "kmeans_cuda_bf16.json", "moments_cuda.json", "cuda_tests_new.xml", "cuda_tests.xml", "tests_new.txt",
            "kernel_profile.json", "build.log"} <= packed
    assert sorted(os.listdir(tmp_path / "out")) == ["log.txt", "results.tar.gz", "summary.txt"]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert summary.index("candidates against the defaults") < summary.index("goal (issue 6)")
    assert "decisions.json" in packed
    assert f"(no {tmp_path / 'no_faiss.so'}: make it with benchmarks/faiss_build/build.sh" in stdout


def test_gpu_check_runs_the_faiss_rows_where_the_library_is_carried(tmp_path):
    """With faiss's GPU library present (build/faiss, carried), goal 5's rows run after the bf16
    ones, edpairs beside faiss in the same call, with the library named to the benchmark."""
    lib = tmp_path / "libedpairs_faiss.so"
    lib.write_text("")
    code, stdout, calls, packed = _fake_gpu_check(tmp_path, FAISS_LIB=str(lib))
    assert code == 0, stdout
    faiss = [i for i, c in enumerate(calls) if "--methods edpairs,edpairs-f32,faiss,faiss-search" in c]
    assert len(faiss) == 1 and "--dtype bfloat16" in calls[faiss[0] - 1] and "bench_moments.py" in calls[faiss[0] + 1]
    assert calls[faiss[0]].endswith(f"[EDPAIRS_FAISS_LIB={lib}]")
    assert "kmeans_cuda_faiss.json" in packed


def test_gpu_check_keeps_inside_its_budget(tmp_path):
    """Steps that would outlast the call's budget are skipped with a message (and the call fails),
    and what finished is still packed and summarised."""
    # The build (at least 60 s) must still start with 8 s of the budget spent: the steps before it
    # (tree_hash.sh over the sources, git) took 1-5 s on a loaded 2-core machine, and bash's
    # SECONDS counts whole seconds, so BUDGET=61 (a start within 1 s) failed there.
    code, stdout, calls, packed = _fake_gpu_check(tmp_path, BUDGET="68", RESERVE="0", TEST_HOLD="0",
                                                  SLOW_MATCH="bench_moments", FAKE_SLEEP="10")
    assert code == 1, stdout
    # The two CUDA test groups (and the whole fits, last, for information: no failure of its
    # own) need 60 s, of which at most 58 are left after the moments.
    assert [c for c in calls if "-m pytest" in c] == [next(c for c in calls if "tests/test_errors.py" in c)], calls
    assert stdout.count("s left of the call's budget of 68 s, this step needs at least 60)") == 3, stdout
    assert not any("bench_fit.py" in c for c in calls), calls
    assert any("profile_kernels.py" in c for c in calls), calls
    assert {"ceilings.json", "moments_cuda.json", "kernel_profile.json"} <= packed
    assert "goal (issue 6)" in (tmp_path / "out" / "summary.txt").read_text()


def test_gpu_check_information_steps_do_not_fail_the_call(tmp_path):
    """The whole fits (information only) skipped for want of time leave the call's status alone:
    with every other step done in time (a slow profile leaves under the fits' 60 s), it passes."""
    code, stdout, calls, packed = _fake_gpu_check(tmp_path, BUDGET="70", RESERVE="0", TEST_HOLD="0",
                                                  SLOW_MATCH="profile_kernels", FAKE_SLEEP="12")
    assert code == 0, stdout
    assert len([c for c in calls if "-m pytest" in c]) == 3 and any("profile_kernels.py" in c for c in calls), calls
    assert not any("bench_fit.py" in c for c in calls), calls
    assert stdout.count("this step needs at least 60)") == 1, stdout
    assert "goal (issue 6)" in (tmp_path / "out" / "summary.txt").read_text()


def test_gpu_check_benchmarks_leave_the_tests_their_time(tmp_path):
    """While the benchmarks run, TEST_HOLD seconds stay kept for the CUDA tests: benchmark steps
    that would eat into them are skipped, and the tests still run."""
    # 29 s outside TEST_HOLD: under the 30 s that the half, k = 64 and moments steps need (and
    # the k-means step's 40) from the start, while the ceilings and bf16 steps (20 s) still run
    # with up to 9 s spent before them (5 s, with BUDGET=100, ran out on a loaded machine).
    code, stdout, calls, packed = _fake_gpu_check(tmp_path, BUDGET="104", RESERVE="0", TEST_HOLD="75")
    assert code == 1, stdout
    assert not any("bench_kmeans.py --device cuda --methods edpairs," in c for c in calls), calls
    assert not any("bench_moments.py" in c for c in calls), calls
    assert any("gpu_ceilings.py" in c for c in calls) and any("--dtype bfloat16" in c for c in calls), calls
    assert len([c for c in calls if "-m pytest" in c]) == 3, calls
    assert {"cuda_tests_new.xml", "cuda_tests.xml", "cuda_tests_new.rc", "cuda_tests.rc"} <= packed


def _decide_run(folder, tests_rc="0", failures=0):
    """Result files of a device run in which the float16 rows in shared memory beat the default
    (the copies), the float32 rows do not, the segmented sums in blocks of 128 win at both k
    and those of 64 at k = 1024 only, the k = 64 wgmma labels win with the sorted sums and
    are faster but label worse with the owned columns, the small-k fit from kept float16 copies
    wins, the fused row is missing, the moments' TF32 operands beat their float16 default and the float16
    signal moments lose, the full
    exact product beats the default triangle, the triangle loses for TF32 products."""
    size, small = [1000000, 512, 1024], [1000000, 512, 64]

    def km(size, method, s, agree=0.9990):
        return {"size": size, "method": method, "median_s": s, "label_agreement_2e-3": agree}

    _write(folder, "kmeans_cuda_f32.json", {"results": [km(size, "edpairs", 0.0063), km(size, "torch", 0.0114),
                                                        km(small, "edpairs", 0.00266),
                                                        km(small, "edpairs-fit5", 0.0024)]})
    _write(folder, "kmeans_cuda_half.json", {"results": [km(size, "edpairs-half", 0.0040, 0.9991),
                                                         km(size, "edpairs-tf32-rows", 0.0062),
                                                         km(size, "edpairs-seg128", 0.0060),
                                                         km(size, "edpairs-seg64", 0.0061)]})
    _write(folder, "kmeans_cuda_k64.json", {"results": [km(small, "edpairs-wgmma", 0.0022),
                                                        km(small, "edpairs-wgmma-columns", 0.0015, 0.9900),
                                                        km(small, "edpairs-seg128", 0.00250),
                                                        km(small, "edpairs-seg64", 0.00264),
                                                        km(small, "edpairs-fit5-half", 0.0016, 0.9992),
                                                        {"size": small, "method": "edpairs-fused-wgmma",
                                                         "error": "RuntimeError: ..."}]})

    def mo(op, method, s, err=3e-5):
        return {"op": op, "size": [1000000, 512, 256], "method": method, "median_s": s, "rel_err_sample": err}

    _write(folder, "moments_cuda.json", {"results": [
        mo("moments", "edpairs", 0.0124, 2e-7), mo("moments", "edpairs-tf32", 0.0047),
        mo("moments", "edpairs-tf32-nohalf", 0.0031, 1e-5), mo("moments", "edpairs-full", 0.0090, 2e-7),
        mo("moments", "edpairs-tf32-tri128", 0.0047), mo("signal_moments", "edpairs-tf32", 0.0052),
        mo("signal_moments", "edpairs-tf32-half", 0.0055, 1e-5)]})
    (folder / "cuda_tests_new.xml").write_text(f'<testsuites><testsuite tests="40" failures="{failures}" errors="0">'
                                               '</testsuite></testsuites>')
    (folder / "cuda_tests_new.rc").write_text(tests_rc + "\n")


def _verdicts(folder):
    return {d.knob.split(" (")[0]: d for d in _script("decide").decisions(str(folder))}


def test_decide_flips_only_faster_accurate_tested_candidates(tmp_path):
    _decide_run(tmp_path)
    v = _verdicts(tmp_path)
    assert v["EDPAIRS_ASSIGN_HALF=1"].verdict == "FLIP"
    assert v["EDPAIRS_ASSIGN_HALF=0"].verdict == "keep" and "not 3% faster" in v["EDPAIRS_ASSIGN_HALF=0"].detail
    assert v["EDPAIRS_ASSIGN_SEG_ROWS=128"].verdict == "FLIP"
    assert v["wgmma labels below k = 129 with the sorted sums"].verdict == "FLIP"
    seg64 = v["EDPAIRS_ASSIGN_SEG_ROWS=64"]
    assert seg64.verdict == "keep" and "not 3% faster everywhere (faster alone: k=1024)" in seg64.detail
    columns = v["wgmma labels below k = 129 + owned-column sums"]
    assert columns.verdict == "keep" and "less accurate" in columns.detail and "not 3% faster" not in columns.detail
    assert v["EDPAIRS_ASSIGN_SUMS=fused on wgmma"].verdict == "not measured"
    small_k = v["EDPAIRS_ASSIGN_HALF_SMALL_K=1 on wgmma"]
    assert small_k.verdict == "FLIP" and "k=64 fit: 1.60 vs 2.40 ms" in small_k.detail
    assert v["EDPAIRS_GEMM_HALF=0 for the moments"].verdict == "FLIP"  # TF32 operands won back
    signal = v["EDPAIRS_GEMM_HALF=signal"]
    assert signal.verdict == "keep" and "not 3% faster" in signal.detail
    assert v["EDPAIRS_GEMM_OVERLAP=1"].verdict == "not measured"
    # The Gram's form is judged per precision of the products (GRAM_DEFAULT): for exact ones the
    # full product against the default triangle (it won here), for TF32 ones the triangle.
    assert v["EDPAIRS_GEMM_GRAM=cublas"].verdict == "FLIP"
    assert v["EDPAIRS_GEMM_GRAM=triangle, tf32 products, block 128"].verdict == "keep"
    assert v["EDPAIRS_GEMM_TRIANGLE_BLOCK=256, float32 products"].verdict == "not measured"
    assert v["EDPAIRS_GEMM_GRAM=triangle, tf32 products, block 256"].verdict == "not measured"
    out = tmp_path / "decisions.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "decide.py"), str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "fastest moments tf32 row: edpairs-tf32-nohalf 3.10 ms" in res.stdout
    assert "default lives in: python/edpairs/_gemm.py half_labels()' auto" in res.stdout
    assert "default lives in: python/edpairs/_gemm.py GRAM_DEFAULT['float32']" in res.stdout
    assert [d["verdict"] for d in json.loads(out.read_text())["decisions"]].count("FLIP") == 6


@pytest.mark.parametrize("rc,failures", [("0", 1), ("2", 0)])
def test_decide_flips_nothing_when_the_new_kernel_tests_did_not_pass(tmp_path, rc, failures):
    _decide_run(tmp_path, tests_rc=rc, failures=failures)
    half = _verdicts(tmp_path)["EDPAIRS_ASSIGN_HALF=1"]
    assert half.verdict == "keep" and f"{failures} failed, exit status {rc}" in half.detail


def test_benchmarks_folder_shadows_no_package():
    """The benchmark scripts put their own folder first on sys.path: an entry there named like a
    package they import (a benchmarks/faiss folder did) would be imported instead of it."""
    for name in ("faiss", "torch", "numpy", "edpairs", "sklearn", "cupy"):
        for entry in (name, name + ".py"):
            assert not os.path.exists(os.path.join(BENCH, entry)), entry


def test_profile_kernels_lists_the_host_functions_of_a_step(tmp_path):
    """profile_kernels.py keeps, per case, the host functions of one step by their own time
    (cProfile): the kmeans-fit case on the CPU names the assignment binding it spends its time in."""
    out = tmp_path / "kp.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "profile_kernels.py"), "--device", "cpu", "--cases",
                          "kmeans-fit:3000,16,8", "--repeat", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    (case,) = json.loads(out.read_text())["results"]
    host = case["host"]
    assert 0 < len(host) <= 15 and all(h["calls"] >= 1 and 0 <= h["self_s"] <= h["cum_s"] + 1e-9 for h in host), host
    assert [h["self_s"] for h in host] == sorted((h["self_s"] for h in host), reverse=True)
    assert any("edpairs._C.assign" in h["name"] for h in host), [h["name"] for h in host]
    assert "host, one step (cProfile" in res.stdout
