"""What the build contains (build_info), a light `import edpairs`, the CPU thread count, and
thread safety / determinism of the CPU kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from _helpers import check_assignment, check_moments, make_centroids, make_rows, make_signal_data

import edpairs
from edpairs import ops

# ---------------------------------------------------------------------------------------
# build_info


def test_build_info_keys_and_types():
    info = edpairs.build_info()
    for key in ("version", "cuda", "cuda_mode", "archs", "cpu_kernel"):
        assert key in info, f"build_info() lacks {key!r}: {sorted(info)}"
    assert info["version"] == edpairs.__version__
    assert isinstance(info["cuda"], bool)
    assert info["cuda_mode"] in ("AUTO", "ON", "OFF"), info["cuda_mode"]
    assert isinstance(info["archs"], list) and all(isinstance(a, str) for a in info["archs"])
    assert info["cpu_kernel"] in ("avx2+fma", "generic"), info["cpu_kernel"]
    assert info["num_threads"] == edpairs.get_num_threads()
    # The wgmma kernel is built exactly when the CUDA build targets compute capability 9.0.
    assert info["wgmma"] is (info["cuda"] and "90" in info["archs"]), info


def test_python_dispatch_agrees_with_the_kernels_limits():
    """Python's dispatch (edpairs._gemm) decides which rows reach a kernel by limits that the
    kernels check again (ops.h); build_info()["limits"] hands the C++ values over, and the
    Python constants must equal them in every build (CPU-only ones too)."""
    from edpairs import _gemm

    limits = edpairs.build_info()["limits"]
    assert limits == {"wgmma_auto_min_k": _gemm.TF32_MIN_K, "half_resident_max_d": _gemm.HALF_RESIDENT_MAX_D}


def test_cuda_mode_on_means_cuda_was_compiled_for_80_and_90():
    """How CI proves the CUDA kernels were compiled: a build asked for EDPAIRS_CUDA=ON. The
    default architectures are 80 and 90; a build that chose its own (EDPAIRS_CUDA_ARCHITECTURES
    set in this environment, as gpu_check.sh does to build for the card at hand only) must list
    exactly those."""
    info = edpairs.build_info()
    if info["cuda_mode"] == "OFF":
        assert info["cuda"] is False
    if info["cuda_mode"] == "ON":
        assert info["cuda"] is True, info
        chosen = os.environ.get("EDPAIRS_CUDA_ARCHITECTURES")
        if chosen:
            assert info["archs"] == [a for a in chosen.replace(";", ",").split(",") if a], (chosen, info["archs"])
        else:
            assert "80" in info["archs"] and "90" in info["archs"], info["archs"]
    if info["cuda"]:
        assert info["archs"], "a CUDA build must list its architectures"
        assert info.get("cuda_version"), info
    else:
        assert info["archs"] == []
        assert edpairs.cuda_device_count() == 0


def test_cuda_device_count_is_a_non_negative_int():
    n = edpairs.cuda_device_count()
    assert isinstance(n, int) and n >= 0


def test_errors_are_runtime_errors():
    assert issubclass(edpairs.CudaError, RuntimeError)
    assert issubclass(edpairs.BackendUnavailable, RuntimeError)


# ---------------------------------------------------------------------------------------
# A light import

_PROBE = r"""
import json, sys
import edpairs
light = {name: name in sys.modules for name in ("torch", "cupy", "edpairs._C")}
edpairs.build_info()
after = "edpairs._C" in sys.modules
print(json.dumps({"light": light, "after": after, "file": edpairs.__file__}))
"""


def test_import_edpairs_loads_neither_torch_cupy_nor_the_compiled_module():
    env = dict(os.environ)
    pkg_root = str(Path(edpairs.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).resolve() == Path(edpairs.__file__).resolve()
    assert result["light"] == {"torch": False, "cupy": False, "edpairs._C": False}, result
    assert result["after"] is True  # the probe itself is sound: build_info() loads it


# ---------------------------------------------------------------------------------------
# Threads


def test_set_get_num_threads_round_trip(restore_threads):
    for n in (1, 3, 2, 1):
        edpairs.set_num_threads(n)
        assert edpairs.get_num_threads() == n
        assert edpairs.build_info()["num_threads"] == n


def _all_results(X, C, Xs, W, b, c):
    res = ops.assign(X, C)
    m = ops.moments(X)
    sm = ops.signal_moments(Xs, W, b, center=c)
    cents, _, _ = ops.spherical_kmeans_step(X, C)
    return res, m, sm, cents


def test_one_and_two_threads_give_the_same_results(restore_threads):
    rng = np.random.default_rng(11)
    C = make_centroids(rng, 37, 24, duplicates=3)
    X = make_rows(rng, 3000, 24, C=C, zero_rows=5, duplicate_rows=20)
    Xs, W, b, c = make_signal_data(rng, 3000, 24, 9, center=True)
    edpairs.set_num_threads(1)
    one = _all_results(X, C, Xs, W, b, c)
    edpairs.set_num_threads(2)
    two = _all_results(X, C, Xs, W, b, c)
    (r1, m1, s1, k1), (r2, m2, s2, k2) = one, two
    np.testing.assert_array_equal(r1.labels, r2.labels)
    np.testing.assert_array_equal(r1.scores, r2.scores)
    np.testing.assert_array_equal(r1.counts, r2.counts)
    np.testing.assert_allclose(r1.sums, r2.sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m1.mean, m2.mean, rtol=1e-12, atol=0)
    np.testing.assert_allclose(m1.m2, m2.m2, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(s1.count, s2.count)
    for name in ("sum_x", "sum_z", "sum_zz", "sum_xz"):
        np.testing.assert_allclose(getattr(s1, name), getattr(s2, name), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(k1, k2, rtol=1e-6, atol=1e-7)
    check_assignment(r2, X, C)
    check_moments(m2, X)


def test_concurrent_python_threads_get_correct_results():
    """Two (and more) Python threads calling the kernels at once (the GIL is released)."""
    rng = np.random.default_rng(5)
    jobs = []
    for t in range(4):
        C = make_centroids(rng, 20 + t, 16)
        X = make_rows(rng, 4000 + 100 * t, 16, C=C)
        jobs.append((X, C))
    expected = [ops.assign(X, C) for X, C in jobs]
    results, errors = {}, []
    start = threading.Barrier(len(jobs))

    def worker(i):
        try:
            X, C = jobs[i]
            start.wait()
            out = []
            for _ in range(5):
                out.append(ops.assign(X, C))
                out.append(ops.moments(X))
            results[i] = out
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    for i, (X, C) in enumerate(jobs):
        for res in results[i][0::2]:
            np.testing.assert_array_equal(res.labels, expected[i].labels)
            np.testing.assert_array_equal(res.scores, expected[i].scores)
            np.testing.assert_array_equal(res.counts, expected[i].counts)
            np.testing.assert_allclose(res.sums, expected[i].sums, rtol=1e-12, atol=1e-12)
        check_assignment(results[i][0], X, C)
        check_moments(results[i][1], X)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kernels_work_in_a_forked_child():
    """DataLoader workers fork: the child must get a working thread pool."""
    rng = np.random.default_rng(2)
    C = make_centroids(rng, 8, 10)
    X = make_rows(rng, 2000, 10, C=C)
    expected = ops.assign(X, C).labels  # the parent's pool is running
    script = (
        "import os, sys, numpy as np\n"
        "from edpairs import ops\n"
        "X = np.load(sys.argv[1]); C = np.load(sys.argv[2]); want = np.load(sys.argv[3])\n"
        "ops.assign(X, C)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    ok = np.array_equal(ops.assign(X, C).labels, want)\n"
        "    os._exit(0 if ok else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for name, a in (("X", X), ("C", C), ("want", expected)):
            p = os.path.join(tmp, name + ".npy")
            np.save(p, a)
            paths.append(p)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(edpairs.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, "-c", script, *paths], env=env, capture_output=True, text=True,
                             timeout=120)
    assert out.returncode == 0, (out.returncode, out.stderr)
