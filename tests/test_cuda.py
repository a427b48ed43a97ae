"""The CUDA kernels: every op on torch and cupy CUDA arrays vs the float64 reference and vs
the CPU kernels, outputs on the input's device, non-contiguous inputs, edge cases, stream
ordering (work runs on the caller's current stream), check_finite, mismatched devices and
large inputs. Skipped unless edpairs was built with CUDA and a GPU is visible."""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest
from _helpers import (
    _ids,
    examples,
    LAYOUTS,
    SIGNAL_FIELDS,
    TOL,
    Tol,
    expected_sums_counts,
    as_lib,
    assert_results_agree,
    assert_scatter_close,
    assign_cases,
    check_assignment,
    check_duplicate_rows_agree,
    check_kmeans_step,
    check_moments,
    check_signal_moments,
    f64,
    layout_values,
    library_of,
    make_centroids,
    make_rows,
    make_signal_data,
    near_zero_rows,
    to_numpy,
    with_layout,
)
from hypothesis import given

import edpairs
from edpairs import ops
from edpairs import reference as ref

DEVICE = "cuda"


def _no_gpu_reason():
    if edpairs.cuda_device_count() == 0:
        return "no GPU visible to edpairs (cuda_device_count() == 0)"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no GPU visible to torch"
    return None


_BUILT = bool(edpairs.build_info()["cuda"])
_NO_GPU = _no_gpu_reason() if _BUILT else None

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _BUILT, reason="edpairs was built without CUDA kernels (build_info()['cuda'] is False)"),
    pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or ""),
]

TORCH_DTYPES = ["float32", "float16", "bfloat16", "float64"]
CUPY_DTYPES = ["float32", "float16", "float64"]


@pytest.fixture(scope="module")
def torch():
    import torch

    return torch


@pytest.fixture(scope="module")
def cupy():
    return pytest.importorskip("cupy")


ROUTES = ["gemm", "kernel"]


@contextmanager
def gemm_route(name):
    """EDPAIRS_GEMM_ROUTE=name inside the block (for hypothesis tests, which refuse
    function-scoped fixtures such as monkeypatch)."""
    before = os.environ.get("EDPAIRS_GEMM_ROUTE")
    os.environ["EDPAIRS_GEMM_ROUTE"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("EDPAIRS_GEMM_ROUTE", None)
        else:
            os.environ["EDPAIRS_GEMM_ROUTE"] = before


@pytest.fixture(scope="module", autouse=True)
def _kernel_route_by_default():
    """This module tests edpairs' own CUDA kernels: torch tensors would otherwise take the
    cuBLAS route of edpairs._gemm. Tests that take ``route`` run on both."""
    with gemm_route("kernel"):
        yield


def _wgmma_skip_reason():
    """Why the wgmma labelling kernel cannot run here (None where it can)."""
    from edpairs import _gemm

    return _gemm.wgmma_unavailable()


@pytest.fixture(params=["mma", "wgmma", "wgmma-tma"])
def assign_kernel(request, monkeypatch):
    """The tensor-core labelling kernel (EDPAIRS_ASSIGN_KERNEL): mma.sync, or Hopper's wgmma
    (wgmma-tma: TMA loads, centroid tiles multicast to block pairs; float32 x) where this build
    and GPU have it (skipped elsewhere: it would silently be the mma kernel)."""
    if request.param != "mma" and (reason := _wgmma_skip_reason()):
        pytest.skip(reason)
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", request.param)
    return request.param


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    """The CUDA route of assign / moments / signal moments for torch tensors (EDPAIRS_GEMM_ROUTE)."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", request.param)
    return request.param


def gpu(a, lib="torch", dtype=None):
    """numpy a on the GPU in lib ('torch' or 'cupy')."""
    if a is None:
        return None
    if lib == "torch":
        return as_lib(a, "torch", dtype, DEVICE)
    import cupy

    c = cupy.asarray(np.ascontiguousarray(a))
    return c.astype(dtype) if dtype else c


def assert_on_device(arrays, like):
    for a in arrays:
        if a is None:
            continue
        assert library_of(a) == library_of(like), (type(a), type(like))
        if library_of(like) == "torch":
            assert a.device == like.device, (a.device, like.device)
        else:
            assert a.device.id == like.device.id


# ---------------------------------------------------------------------------------------
# Every op vs the reference and vs the CPU kernels


@pytest.mark.parametrize("route_name", ROUTES)
@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@examples(25)
@given(case=assign_cases())
def test_torch_cuda_assign_matches_reference_and_cpu(torch, route_name, dtype, case):
    with gemm_route(route_name):
        X, C, _ = case
        Xg = gpu(X, "torch", dtype)
        res = ops.assign(Xg, gpu(C), precision="float32")
        assert_on_device(res, Xg)
        assert [str(a.dtype) for a in res] == ["torch.int64", "torch.float32", "torch.float64", "torch.int64"]
        Xr = f64(Xg)  # the values the kernel saw (rounded input)
        check_assignment(res, Xr, C, tol=TOL[dtype])
        check_duplicate_rows_agree(Xr, res.labels, res.scores)
        cpu = ops.assign(Xg.cpu(), C)
        assert_results_agree(res, cpu, Xr, C, tol=TOL[dtype])
        labels, scores = ops.cosine_assign(Xg, gpu(C), precision="float32")
        np.testing.assert_array_equal(to_numpy(labels), to_numpy(res.labels))
        np.testing.assert_array_equal(to_numpy(scores), to_numpy(res.scores))


@pytest.mark.parametrize("route_name", ROUTES)
@examples(25)
@given(case=assign_cases())
def test_torch_cuda_assign_options_match_reference(torch, route_name, case):
    with gemm_route(route_name):
        X, C, rng = case
        N, D = X.shape
        center = rng.standard_normal(D).astype(np.float32)
        row_scale = (rng.random(N) * (rng.random(N) > 0.2)).astype(np.float32)
        col_scale = (rng.standard_normal(C.shape[0]) * 2).astype(np.float32)
        for kw in (dict(center=center), dict(row_scale=row_scale), dict(col_scale=col_scale),
                   dict(center=center, row_scale=row_scale, col_scale=col_scale)):
            res = ops.assign(gpu(X), gpu(C), precision="float32", **{k: gpu(v) for k, v in kw.items()})
            check_assignment(res, X, C, **kw)
            cpu = ops.assign(X, C, **kw)
            assert_results_agree(res, cpu, X, C, **kw)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_cuda_moments_match_reference_and_cpu(torch, route, dtype, rng):
    for N, D in [(1, 3), (2, 1), (511, 7), (513, 16), (3000, 33), (1000, 130)]:
        X = (rng.standard_normal((N, D)) @ rng.standard_normal((D, D)) + 5).astype(np.float32)
        Xg = gpu(X, "torch", dtype)
        m = ops.moments(Xg)
        assert_on_device([m.mean, m.m2], Xg)
        assert m.mean.dtype == torch.float64 and m.m2.dtype == torch.float64
        Xr = f64(Xg)
        check_moments(m, Xr)
        cpu = ops.moments(Xg.cpu())
        # CUDA centres float64 inputs in float64, the CPU rounds them first: agreement to
        # float32 rounding of the values.
        mean_tol = 2.0 ** -23 * np.abs(Xr).max(axis=0) + 1e-12
        assert np.all(np.abs(to_numpy(m.mean) - to_numpy(cpu.mean)) <= mean_tol)
        assert_scatter_close(to_numpy(m.m2), to_numpy(cpu.m2), rtol=5e-6)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("center", [False, True])
def test_torch_cuda_signal_moments_match_reference_and_cpu(torch, route, dtype, center, rng):
    for N, D, I in [(1, 3, 1), (70, 9, 17), (2000, 40, 8), (600, 100, 70)]:
        X, W, b, c = make_signal_data(rng, N, D, I, center=center)
        Xg = gpu(X, "torch", dtype)
        Xr = f64(Xg)
        keep = ~near_zero_rows(Xr, W, b, c)
        Xg, Xr = Xg[torch.from_numpy(keep).to(DEVICE)], Xr[keep]
        sm = ops.signal_moments(Xg, gpu(W), gpu(b), center=gpu(c))
        assert_on_device([getattr(sm, f) for f in SIGNAL_FIELDS], Xg)
        check_signal_moments(sm, Xr, W, b, center=c)
        cpu = ops.signal_moments(Xg.cpu(), W, b, center=c)
        np.testing.assert_array_equal(to_numpy(sm.count), to_numpy(cpu.count))


@pytest.mark.parametrize("workspace_rows", [1, 7, 1000, 32768])
def test_torch_cuda_signal_moments_workspace_steps(torch, route, workspace_rows, rng):
    X, W, b, c = make_signal_data(rng, 3001, 20, 6, center=True)
    sm = ops.signal_moments(gpu(X), gpu(W), gpu(b), center=gpu(c), workspace_rows=workspace_rows)
    check_signal_moments(sm, X, W, b, center=c)


def test_torch_cuda_signal_moments_rejects_an_empty_workspace(torch, rng):
    X, W, b, _ = make_signal_data(rng, 10, 3, 2)
    with pytest.raises(ValueError, match="workspace_rows"):
        ops.signal_moments(gpu(X), gpu(W), gpu(b), workspace_rows=0)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_cuda_spherical_kmeans_step_and_normalize(torch, route, dtype, rng):
    for N, D, k in [(1, 4, 3), (300, 16, 5), (2000, 37, 70)]:
        C = make_centroids(rng, k, D, duplicates=1) * 3
        X = make_rows(rng, N, D, C=C, zero_rows=1 if N > 1 else 0)
        Xg = gpu(X, "torch", dtype)
        result = ops.spherical_kmeans_step(Xg, gpu(C), precision="float32")
        assert_on_device(result, Xg)
        check_kmeans_step(result, f64(Xg), C)
    sums = rng.standard_normal((6, 5))
    counts = np.array([0, 1, 2, 0, 5, 1])
    sums[4] = 0
    previous = rng.standard_normal((6, 5)).astype(np.float32)
    out = ops.normalize_centroids(gpu(sums), gpu(counts), gpu(previous))
    assert out.device.type == "cuda" and out.dtype == torch.float32
    np.testing.assert_allclose(to_numpy(out), ref.normalize_centroids(sums, counts, previous), rtol=2e-7, atol=1e-7)
    extreme = np.array([[3e200, 4e200], [3e-200, 4e-200], [np.inf, 1.0]])  # s.s overflows / underflows
    out = ops.normalize_centroids(gpu(extreme), gpu(np.array([1, 1, 1])), gpu(np.full((3, 2), 7, np.float32)),
                                  check_finite=False)
    np.testing.assert_allclose(to_numpy(out), [[0.6, 0.8], [0.6, 0.8], [7, 7]], rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", CUPY_DTYPES)
def test_cupy_ops_match_reference_and_cpu(cupy, dtype, rng):
    C = make_centroids(rng, 20, 24, duplicates=2, zeros=1)
    X = make_rows(rng, 1500, 24, C=C, zero_rows=3, duplicate_rows=5)
    Xg = gpu(X, "cupy", dtype)
    Xr = f64(Xg)
    res = ops.assign(Xg, gpu(C, "cupy"), precision="float32")
    assert all(isinstance(a, cupy.ndarray) for a in res)
    assert [str(a.dtype) for a in res] == ["int64", "float32", "float64", "int64"]
    check_assignment(res, Xr, C, tol=TOL[dtype])
    assert_results_agree(res, ops.assign(Xr.astype(np.float32), C), Xr, C, tol=TOL[dtype])
    m = ops.moments(Xg)
    assert isinstance(m.m2, cupy.ndarray) and m.m2.dtype == np.float64
    check_moments(m, Xr)
    Xs, W, b, c = make_signal_data(rng, 900, 24, 5, center=True)
    Xsg = gpu(Xs, "cupy", dtype)
    keep = ~near_zero_rows(f64(Xsg), W, b, c)
    Xsg = Xsg[cupy.asarray(keep)]
    sm = ops.signal_moments(Xsg, gpu(W, "cupy"), gpu(b, "cupy"), center=gpu(c, "cupy"))
    assert all(isinstance(getattr(sm, f), cupy.ndarray) for f in SIGNAL_FIELDS)
    check_signal_moments(sm, f64(Xsg), W, b, center=c)
    result = ops.spherical_kmeans_step(Xg, gpu(C, "cupy"), precision="float32")
    assert all(isinstance(a, cupy.ndarray) for a in result)
    check_kmeans_step(result, Xr, C)


@pytest.mark.parametrize("lib", ["torch", "cupy"])
def test_arrays_on_a_device_that_is_not_current(lib, rng, request):
    """Data on GPU 1 while GPU 0 is current (tests/test_device_scope.py checks the same with a
    stand-in for cupy on machines with fewer GPUs): results on GPU 1, equal to GPU 0's, and GPU 0
    still current afterwards."""
    mod = request.getfixturevalue(lib)
    count = mod.cuda.device_count() if lib == "torch" else mod.cuda.runtime.getDeviceCount()
    if count < 2:
        pytest.skip(f"needs two GPUs, this machine has {count}")
    C = make_centroids(rng, 20, 24)
    X = make_rows(rng, 1500, 24, C=C)

    def on(device, a):
        if lib == "torch":
            return mod.as_tensor(np.ascontiguousarray(a), device=f"cuda:{device}")
        with mod.cuda.Device(device):
            return mod.asarray(a)

    def device_of(a):
        return a.device.index if lib == "torch" else a.device.id

    def current():
        return mod.cuda.current_device() if lib == "torch" else mod.cuda.runtime.getDevice()

    res0 = ops.assign(on(0, X), on(0, C), precision="float32")
    res1 = ops.assign(on(1, X), on(1, C), precision="float32")
    assert current() == 0 and all(device_of(a) == 1 for a in res1)
    np.testing.assert_array_equal(to_numpy(res1.labels), to_numpy(res0.labels))
    m1, m0 = ops.moments(on(1, X)), ops.moments(on(0, X))
    assert current() == 0 and device_of(m1.m2) == 1
    np.testing.assert_allclose(to_numpy(m1.merge(m1).cov), to_numpy(m0.merge(m0).cov), rtol=1e-12)
    assert current() == 0


# ---------------------------------------------------------------------------------------
# Layouts and edge cases


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "negative_row_stride"])
def test_torch_cuda_noncontiguous_inputs(torch, route, layout, rng):
    C = make_centroids(rng, 9, 21)
    X = make_rows(rng, 700, 21, C=C)
    Xg = with_layout(X, layout, "torch", device=DEVICE)
    assert Xg.device.type == "cuda"
    Xv = layout_values(X, layout)
    check_assignment(ops.assign(Xg, with_layout(C, "transposed", "torch", device=DEVICE), precision="float32"), Xv, C)
    check_moments(ops.moments(Xg), Xv)
    Xs, W, b, c = make_signal_data(rng, 300, 21, 4, center=True)
    sm = ops.signal_moments(with_layout(Xs, layout, "torch", device=DEVICE), with_layout(W, "transposed", "torch", device=DEVICE),
                            gpu(b), center=gpu(c))
    check_signal_moments(sm, layout_values(Xs, layout), W, b, center=c)


@pytest.mark.parametrize("layout", ["transposed", "row_stride", "col_stride"])
def test_cupy_noncontiguous_inputs(cupy, layout, rng):
    C = make_centroids(rng, 9, 21)
    X = make_rows(rng, 500, 21, C=C)
    Xg = with_layout(X, layout, "cupy")
    check_assignment(ops.assign(Xg, gpu(C, "cupy"), precision="float32"), X, C)
    check_moments(ops.moments(Xg), X)


def _cuda_edge_cases():
    rng = np.random.default_rng(99)
    C5 = make_centroids(rng, 5, 6)
    return {
        "N=1": (make_rows(rng, 1, 6, C=C5), C5),
        "k=1": (make_rows(rng, 100, 6), make_centroids(rng, 1, 6)),
        "D=1": (make_rows(rng, 100, 1), make_centroids(rng, 4, 1)),
        "k>N": (make_rows(rng, 3, 8), make_centroids(rng, 150, 8)),
        "zero rows": (make_rows(rng, 130, 6, zero_rows=20, C=C5), C5),
        "all rows zero": (np.zeros((70, 5), np.float32), make_centroids(rng, 3, 5)),
        "zero centroids": (make_rows(rng, 100, 6), make_centroids(rng, 7, 6, zeros=4)),
        "ties across tiles": (make_rows(rng, 200, 10), np.repeat(make_centroids(rng, 3, 10), 60, 0)),
        "D not a multiple of 16, k > 64": (make_rows(rng, 1000, 45), make_centroids(rng, 130, 45, duplicates=10)),
        "D = 1000": (make_rows(rng, 300, 1000), make_centroids(rng, 10, 1000)),
    }


CUDA_EDGE = _cuda_edge_cases()


@pytest.mark.parametrize("name", list(CUDA_EDGE), ids=_ids(CUDA_EDGE))
def test_torch_cuda_assign_edge_cases(torch, route, name):
    X, C = CUDA_EDGE[name]
    tol = TOL["float32"] if X.shape[1] <= 512 else Tol(score=3e-5, margin=3e-4, sums=1e-5)
    res = ops.assign(gpu(X), gpu(C), precision="float32")
    check_assignment(res, X, C, tol=tol)
    check_duplicate_rows_agree(X, res.labels, res.scores)
    assert_results_agree(res, ops.assign(X, C), X, C, tol=tol)


@pytest.mark.parametrize("op", ["assign", "cosine_assign", "moments", "signal_moments", "spherical_kmeans_step"])
def test_torch_cuda_no_rows(torch, route, op):
    """N = 0 on CUDA: empty labels / scores, zero sums and counts, n = 0."""
    X = gpu(np.zeros((0, 5), np.float32))
    C = gpu(np.ones((3, 5), np.float32))
    if op == "assign":
        res = ops.assign(X, C)
        assert res.labels.shape == (0,) and res.scores.shape == (0,)
        assert res.labels.device.type == "cuda"
        np.testing.assert_array_equal(to_numpy(res.sums), np.zeros((3, 5)))
        np.testing.assert_array_equal(to_numpy(res.counts), [0, 0, 0])
    elif op == "cosine_assign":
        labels, scores = ops.cosine_assign(X, C)
        assert labels.shape == (0,) and scores.shape == (0,) and labels.device.type == "cuda"
    elif op == "moments":
        assert ops.moments(X).n == 0
    elif op == "signal_moments":
        sm = ops.signal_moments(X, gpu(np.ones((5, 2), np.float32)), gpu(np.zeros(2, np.float32)))
        np.testing.assert_array_equal(to_numpy(sm.count), [0, 0])
        assert not to_numpy(sm.sum_xz).any() and not to_numpy(sm.sum_z).any()
    else:
        cents, labels, counts = ops.spherical_kmeans_step(X, C)
        np.testing.assert_array_equal(to_numpy(counts), [0, 0, 0])
        np.testing.assert_allclose(to_numpy(cents), np.full((3, 5), 1 / np.sqrt(5)), rtol=1e-6)


def test_torch_cuda_outputs_are_overwritten_not_accumulated(torch, route, rng):
    """Repeated calls (the caching allocator hands back the same memory) give the same sums."""
    C = make_centroids(rng, 10, 12)
    X = gpu(make_rows(rng, 5000, 12, C=C))
    first = ops.assign(X, gpu(C))
    for _ in range(3):
        again = ops.assign(X, gpu(C))
        np.testing.assert_array_equal(to_numpy(again.labels), to_numpy(first.labels))
        np.testing.assert_array_equal(to_numpy(again.counts), to_numpy(first.counts))
        np.testing.assert_allclose(to_numpy(again.sums), to_numpy(first.sums), rtol=1e-12, atol=1e-12)
        m1, m2 = ops.moments(X), ops.moments(X)
        np.testing.assert_allclose(to_numpy(m1.m2), to_numpy(m2.m2), rtol=1e-12, atol=1e-12)


def test_torch_cuda_moments_update_and_merge(torch, route, rng):
    from edpairs.ops import Moments

    X = (rng.standard_normal((4000, 9)) + 100).astype(np.float32)
    state = Moments()
    for a, z in [(0, 1), (1, 1000), (1000, 1000), (1000, 4000)]:
        state.update(gpu(X[a:z]))
    assert state.m2.device.type == "cuda"
    check_moments(state, X)
    assert_scatter_close(to_numpy(state.m2), to_numpy(ops.moments(gpu(X)).m2), rtol=5e-6)


# ---------------------------------------------------------------------------------------
# Streams: the kernels run on the caller's current stream, after work already queued there


def _busy(torch_or_cupy, n=4096, steps=25, lib="torch"):
    """Queues ~steps * 2 n^3 flops on the current stream and returns a scalar that depends
    on all of them (without synchronising)."""
    if lib == "torch":
        torch = torch_or_cupy
        a = torch.randn(n, n, device=DEVICE)
        y = a
        for _ in range(steps):
            y = y @ a
            y = y / y.norm()
        return y[0, 0]
    cupy = torch_or_cupy
    a = cupy.random.standard_normal((n, n), dtype=cupy.float32)
    y = a
    for _ in range(steps):
        y = y @ a
        y = y / cupy.linalg.norm(y)
    return y[0, 0]


def _stream_inputs(rng):
    C = make_centroids(rng, 40, 32)
    X = make_rows(rng, 100_000, 32, C=C)
    Xs, W, b, c = make_signal_data(rng, 50_000, 32, 6, center=True)
    return X, C, Xs, W, b, c


def _check_stream_results(out, X, C, Xs, W, b, c):
    res, m, sm, (cents, klabels, kcounts) = out
    check_assignment(res, X, C)
    check_moments(m, X)
    check_signal_moments(sm, Xs, W, b, center=c)
    np.testing.assert_array_equal(to_numpy(kcounts), np.bincount(to_numpy(klabels), minlength=len(C)))
    assert to_numpy(kcounts).sum() == len(X)


def test_torch_ops_run_on_the_current_stream(torch, route, rng):
    X, C, Xs, W, b, c = _stream_inputs(rng)
    src, srcs = gpu(X), gpu(Xs)
    Cg, Wg, bg, cg = gpu(C), gpu(W), gpu(b), gpu(c)
    Xg, Xsg = torch.zeros_like(src), torch.zeros_like(srcs)  # wrong values until the stream writes them
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dep = _busy(torch, lib="torch")
        Xg.copy_(src + 0 * dep)  # the final values, written only after the long chain
        Xsg.copy_(srcs + 0 * dep)
        out = (ops.assign(Xg, Cg, check_finite=False, precision="float32"), ops.moments(Xg, check_finite=False),
               ops.signal_moments(Xsg, Wg, bg, center=cg, check_finite=False),
               ops.spherical_kmeans_step(Xg, Cg, check_finite=False, precision="float32"))
    torch.cuda.synchronize()
    _check_stream_results(out, X, C, Xs, W, b, c)


def test_cupy_ops_run_on_the_current_stream(cupy, rng):
    X, C, Xs, W, b, c = _stream_inputs(rng)
    src, srcs = gpu(X, "cupy"), gpu(Xs, "cupy")
    Cg, Wg, bg, cg = gpu(C, "cupy"), gpu(W, "cupy"), gpu(b, "cupy"), gpu(c, "cupy")
    Xg, Xsg = cupy.zeros_like(src), cupy.zeros_like(srcs)
    cupy.cuda.Device().synchronize()
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        dep = _busy(cupy, lib="cupy")
        Xg[...] = src + 0 * dep
        Xsg[...] = srcs + 0 * dep
        out = (ops.assign(Xg, Cg, check_finite=False, precision="float32"), ops.moments(Xg, check_finite=False),
               ops.signal_moments(Xsg, Wg, bg, center=cg, check_finite=False),
               ops.spherical_kmeans_step(Xg, Cg, check_finite=False, precision="float32"))
    s.synchronize()
    cupy.cuda.Device().synchronize()
    _check_stream_results(out, X, C, Xs, W, b, c)


# ---------------------------------------------------------------------------------------
# Errors on CUDA


def test_check_finite_on_cuda_raises(torch, route, rng):
    X = make_rows(rng, 50, 4)
    C = make_centroids(rng, 3, 4)
    Xn = X.copy()
    Xn[7, 2] = np.nan
    Cn = C.copy()
    Cn[1, 0] = np.inf
    W = np.ones((4, 2), np.float32)
    b = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match=r"\bX\b.*NaN"):
        ops.assign(gpu(Xn), gpu(C))
    with pytest.raises(ValueError, match=r"\bC\b.*NaN"):
        ops.assign(gpu(X), gpu(Cn))
    with pytest.raises(ValueError, match=r"\bX\b.*NaN"):
        ops.moments(gpu(Xn))
    with pytest.raises(ValueError, match=r"\bW\b.*NaN"):
        ops.signal_moments(gpu(X), gpu(np.full((4, 2), np.nan, np.float32)), gpu(b))
    with pytest.raises(ValueError, match=r"\bX\b.*NaN"):
        ops.signal_moments(gpu(Xn), gpu(W), gpu(b))
    with pytest.raises(ValueError, match=r"\bX\b.*NaN"):
        ops.assign(gpu(Xn, dtype="bfloat16"), gpu(C))
    # Skipped check: no exception (results unspecified).
    ops.assign(gpu(Xn), gpu(C), check_finite=False)
    ops.moments(gpu(Xn), check_finite=False)
    ops.signal_moments(gpu(Xn), gpu(W), gpu(b), check_finite=False)
    torch.cuda.synchronize()


def test_cupy_check_finite_raises(cupy, rng):
    X = make_rows(rng, 50, 4)
    X[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.assign(gpu(X, "cupy"), gpu(make_centroids(rng, 3, 4), "cupy"))


@pytest.mark.parametrize("param_kind", ["torch_cpu", "numpy"])
def test_mismatched_devices_raise_naming_both(torch, rng, param_kind):
    X = gpu(make_rows(rng, 20, 4))
    Cnp = make_centroids(rng, 3, 4)
    C = torch.from_numpy(Cnp) if param_kind == "torch_cpu" else Cnp
    with pytest.raises(ValueError) as info:
        ops.assign(X, C)
    msg = str(info.value)
    assert "cpu" in msg and "cuda:0" in msg, msg
    with pytest.raises(ValueError, match=r"cpu.*cuda:0|cuda:0.*cpu"):
        ops.signal_moments(X, torch.ones(4, 2) if param_kind == "torch_cpu" else np.ones((4, 2)), gpu(np.zeros(2)))
    with pytest.raises(ValueError, match=r"cpu.*cuda:0|cuda:0.*cpu"):
        ops.assign(X, gpu(Cnp), center=torch.zeros(4) if param_kind == "torch_cpu" else np.zeros(4))


@pytest.mark.parametrize("route", ["gemm", "kernel"])
def test_mismatched_devices_raise_before_any_arithmetic(torch, rng, route, monkeypatch):
    """On either route (the cuBLAS route mixed a CPU C or W into torch arithmetic and raised
    torch's RuntimeError, or named col_scale, an array the caller never passed), a parameter
    on another device is refused by name with both devices."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", route)
    X = gpu(make_rows(rng, 20, 4))
    for call, name in ((lambda: ops.assign(X, make_centroids(rng, 3, 4)), "C"),
                       (lambda: ops.assign(X, gpu(make_centroids(rng, 3, 4)), col_scale=np.ones(3, np.float32)),
                        "col_scale"),
                       (lambda: ops.signal_moments(X, np.ones((4, 2), np.float32), gpu(np.zeros(2))), "W"),
                       (lambda: ops.signal_moments(X, gpu(np.ones((4, 2))), gpu(np.zeros(2)), center=torch.zeros(4)),
                        "center")):
        with pytest.raises(ValueError, match=f"^{name} is on cpu but X is on cuda:0"):
            call()


def test_float64_values_beyond_float32_are_refused_on_cuda(torch, rng):
    """float64 X whose values float32 cannot hold (the kernels round them to Inf): refused as
    on the CPU, where signal_moments without a center silently dropped such rows from the
    positives; with a center the float64 centring takes them (here: finite once centred)."""
    X = make_rows(rng, 50, 4).astype(np.float64)
    X[7, 2] = 1e39
    W, b, C = np.ones((4, 2), np.float32), np.zeros(2, np.float32), make_centroids(rng, 3, 4)
    for on in (lambda a: gpu(a, "torch", a.dtype.name), lambda a: a):  # CUDA, then the CPU (the same message)
        for call in (lambda: ops.signal_moments(on(X), on(W), on(b)), lambda: ops.assign(on(X), on(C))):
            with pytest.raises(ValueError, match="NaN or Inf"):
                call()
    # About a centre the float64 centring takes such rows (an offset of 1e39, a spread of 1e30
    # that float64 keeps; row_scale skips the float32-squares norms check).
    Xc = 1e39 + 1e30 * make_rows(rng, 50, 4).astype(np.float64)
    res = ops.assign(gpu(Xc, "torch", "float64"), gpu(C), center=gpu(np.full(4, 1e39), "torch", "float64"),
                     row_scale=gpu(np.ones(50, np.float32)))
    assert bool(torch.isfinite(res.scores).all())


def test_cupy_with_numpy_parameters(cupy, rng):
    """A numpy C next to a cupy X: either a clear ValueError naming the device or a correct result."""
    X = make_rows(rng, 20, 4)
    C = make_centroids(rng, 3, 4)
    try:
        res = ops.assign(gpu(X, "cupy"), C, precision="float32")
    except ValueError as exc:
        assert "cuda:0" in str(exc), str(exc)
    else:
        assert isinstance(res.labels, cupy.ndarray)
        check_assignment(res, X, C)


def test_mismatched_gpus_raise(torch, rng):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    X = make_rows(rng, 20, 4)
    C = make_centroids(rng, 3, 4)
    with pytest.raises(ValueError, match="cuda:1.*cuda:0|cuda:0.*cuda:1"):
        ops.assign(as_lib(X, "torch", device="cuda:0"), as_lib(C, "torch", device="cuda:1"))


# ---------------------------------------------------------------------------------------
# Large inputs: many blocks, atomics


@pytest.mark.slow
def test_torch_cuda_large_assign(torch, route):
    rng = np.random.default_rng(2024)
    C = make_centroids(rng, 100, 64, duplicates=3, zeros=1)
    X = make_rows(rng, 300_000, 64, C=C, zero_rows=50, duplicate_rows=100)
    res = ops.assign(gpu(X), gpu(C), precision="float32")
    check_assignment(res, X, C)
    assert to_numpy(res.counts).sum() == 300_000
    res16 = ops.assign(gpu(X, dtype="float16"), gpu(C), precision="float32")
    check_assignment(res16, f64(gpu(X, dtype="float16")), C, tol=TOL["float16"])


@pytest.mark.slow
def test_torch_cuda_large_moments_and_signal_moments(torch, route):
    rng = np.random.default_rng(2025)
    X = (rng.standard_normal((300_000, 64)) + 10).astype(np.float32)
    check_moments(ops.moments(gpu(X)), X)
    Xs, W, b, c = make_signal_data(rng, 300_000, 64, 40, center=True)
    sm = ops.signal_moments(gpu(Xs), gpu(W), gpu(b), center=gpu(c))
    check_signal_moments(sm, Xs, W, b, center=c)
    sm_small_ws = ops.signal_moments(gpu(Xs), gpu(W), gpu(b), center=gpu(c), workspace_rows=1000)
    for name in SIGNAL_FIELDS:
        np.testing.assert_allclose(to_numpy(getattr(sm_small_ws, name)), to_numpy(getattr(sm, name)), rtol=1e-5,
                                   atol=1e-5 * np.abs(to_numpy(getattr(sm, name))).max())


@pytest.mark.slow
def test_torch_cuda_large_kmeans_step(torch, route):
    rng = np.random.default_rng(2026)
    C = make_centroids(rng, 100, 64)
    X = make_rows(rng, 300_000, 64, C=C)
    check_kmeans_step(ops.spherical_kmeans_step(gpu(X), gpu(C), precision="float32"), X, C)


# ---------------------------------------------------------------------------------------
# Tensor-core assignment (precision="tf32", the CUDA default): TF32 products for float32 X,
# float16 / bfloat16 products for 16-bit X (centroids rounded to X's dtype), float32
# accumulation. Error model: each product x_i c_i carries a relative error of at most u (both
# operands rounded: 2^-10 for TF32; the centroid only, X being exact in its dtype: 2^-9 for
# bfloat16, 2^-11 for float16), so a score's error is at most u r_n s_j sum_i |x_i||c_i| (x raw,
# not centred: the centring is subtracted after the product) plus float32 accumulation noise.
# A label may differ from the float64 reference only where the reference's best and the chosen
# centroid are within both error bounds of each other.

TC_UNIT = {"float32": 2.0 ** -10, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -9}


def _poisoned_tc_assign(X, C, *, center=None, row_scale=None, col_scale=None, accumulate=True):
    """ops.assign with precision='tf32' through the binding, into outputs filled with garbage
    first (labels -7, scores NaN, sums NaN, counts -7): an element the kernel never writes shows."""
    import torch

    from edpairs._arrays import namespace_of
    from edpairs._backend import lib

    N, D = X.shape
    k = C.shape[0]
    dev = X.device
    labels = torch.full((N,), -7, dtype=torch.int64, device=dev)
    scores = torch.full((N,), float("nan"), dtype=torch.float32, device=dev)
    sums = torch.full((k, D), float("nan"), dtype=torch.float64, device=dev) if accumulate else None
    counts = torch.full((k,), -7, dtype=torch.int64, device=dev) if accumulate else None
    xp = namespace_of(X)
    c = xp.capsule
    lib().assign(c(X), c(C), c(center), c(row_scale), c(col_scale), c(labels), c(scores), c(sums), c(counts),
                 False, "tf32", xp.stream(X))
    return ops.Assignment(labels, scores, sums, counts)


def check_tc_assignment(res, X, C, dtype, *, center=None, row_scale=None, col_scale=None, sums=True):
    """Labels / scores / sums / counts of a tensor-core assignment vs float64, within the error
    model above. X: the values the kernel saw (float64 numpy)."""
    X, C = f64(X), f64(C)
    labels, scores = to_numpy(res.labels), to_numpy(res.scores)
    k = C.shape[0]
    assert labels.dtype == np.int64 and scores.dtype == np.float32
    assert np.all((labels >= 0) & (labels < k)), f"label out of range or unwritten: {labels[(labels < 0) | (labels >= k)][:10]}"
    assert np.all(np.isfinite(scores)), "NaN/Inf (or unwritten) score"
    Xc = X - (f64(center) if center is not None else 0)
    norms = np.linalg.norm(Xc, axis=1)
    r = f64(row_scale) if row_scale is not None else np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    cn = np.linalg.norm(C, axis=1)
    s = f64(col_scale) if col_scale is not None else np.divide(1.0, cn, out=np.zeros_like(cn), where=cn > 0)
    S = r[:, None] * (Xc @ C.T) * s[None, :]
    # The centroids are rounded to the operand precision for the product x.c and for the
    # centre's term center.c alike, so both magnitudes enter the bound.
    absX = np.abs(X) + (np.abs(f64(center)) if center is not None else 0.0)
    bound = TC_UNIT[dtype] * np.abs(r)[:, None] * (absX @ np.abs(C).T) * np.abs(s)[None, :]
    noise = 2e-5 * np.abs(r)[:, None] * (norms[:, None] + np.linalg.norm(X, axis=1)[:, None]) * (np.abs(s) * cn)[None, :]
    bound = 2.0 * bound + noise + 1e-30  # a factor 2 of slack over the first-order model
    dead = r == 0
    assert np.all(labels[dead] == 0) and np.all(scores[dead] == 0), "rows with r_n = 0 must get label 0, score 0"
    live = np.flatnonzero(~dead)
    if live.size:
        Sl, Bl, got = S[live], bound[live], labels[live]
        ref = np.argmax(Sl, axis=1)
        rows = np.arange(live.size)
        best, chosen = Sl[rows, ref], Sl[rows, got]
        wrong = chosen < best - Bl[rows, ref] - Bl[rows, got]
        assert not wrong.any(), (
            f"labels off beyond the tensor-core error bound: rows {live[wrong][:10]}, got {got[wrong][:10]}, "
            f"expected {ref[wrong][:10]}, gaps {(best - chosen)[wrong][:10]}, bounds {(Bl[rows, ref] + Bl[rows, got])[wrong][:10]}")
        err = np.abs(scores[live].astype(np.float64) - chosen)
        far = err > Bl[rows, got]
        assert not far.any(), f"scores off: rows {live[far][:10]}, err {err[far][:10]}, bound {Bl[rows, got][far][:10]}"
    if sums and res.sums is not None:
        sums_k, counts = to_numpy(res.sums), to_numpy(res.counts)
        exp_sums, exp_counts, abs_sums = expected_sums_counts(labels, r, Xc, k)
        np.testing.assert_array_equal(counts, exp_counts)
        assert np.all(np.isfinite(sums_k)), "NaN (unwritten) sums"
        err = np.abs(sums_k - exp_sums)
        assert np.all(err <= 1e-5 * abs_sums + 1e-12), f"sums off by {err.max()}"
    return S


TC_DTYPES = ["float32", "float16", "bfloat16"]

# (N, D, k): ragged against the 128-row / 128-centroid tiles and the 128-byte slices; the
# 16-byte aligned widths (D a multiple of 8) also against the wgmma kernel's 64- and
# 128-centroid tiles.
TC_SHAPES = [(1, 1, 1), (3, 5, 2), (127, 31, 7), (129, 33, 129), (300, 64, 128), (513, 100, 300),
             (1000, 257, 65), (260, 512, 1024), (2000, 7, 3), (700, 64, 20), (257, 96, 64),
             (300, 136, 100), (129, 8, 1)]


@pytest.mark.parametrize("dtype", TC_DTYPES)
@pytest.mark.parametrize("shape", TC_SHAPES, ids=[f"{n}x{d}x{k}" for n, d, k in TC_SHAPES])
def test_tensor_core_assign_matches_reference(torch, assign_kernel, dtype, shape):
    N, D, k = shape
    rng = np.random.default_rng(N * 7 + D * 131 + k)
    C = make_centroids(rng, k, D, duplicates=min(3, k - 1), zeros=1 if k > 2 else 0)
    X = make_rows(rng, N, D, C=C, zero_rows=min(2, N - 1), duplicate_rows=min(3, N - 1))
    Xg = gpu(X, "torch", dtype)
    res = _poisoned_tc_assign(Xg, gpu(C))
    check_tc_assignment(res, f64(Xg), C, dtype)
    # The public function takes the same path.
    pub = ops.assign(Xg, gpu(C), precision="tf32")
    np.testing.assert_array_equal(to_numpy(pub.labels), to_numpy(res.labels))
    np.testing.assert_array_equal(to_numpy(pub.scores), to_numpy(res.scores))
    np.testing.assert_array_equal(to_numpy(pub.counts), to_numpy(res.counts))
    # Without accumulation: the same labels and scores, nothing else written.
    la, sc = ops.cosine_assign(Xg, gpu(C), precision="tf32")
    np.testing.assert_array_equal(to_numpy(la), to_numpy(res.labels))
    np.testing.assert_array_equal(to_numpy(sc), to_numpy(res.scores))


@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_tensor_core_assign_options(torch, assign_kernel, dtype, rng):
    for N, D, k in [(300, 37, 20), (700, 130, 150)]:
        C = make_centroids(rng, k, D)
        X = make_rows(rng, N, D, C=C) + 0.5
        Xg = gpu(X, "torch", dtype)
        Xr = f64(Xg)
        center = (rng.standard_normal(D) * 0.3 + 0.5).astype(np.float32)
        row_scale = (rng.random(N) * (rng.random(N) > 0.2)).astype(np.float32)
        col_scale = (rng.standard_normal(k) * 2).astype(np.float32)
        for kw in (dict(center=center), dict(row_scale=row_scale), dict(col_scale=col_scale),
                   dict(center=center, row_scale=row_scale, col_scale=col_scale)):
            res = _poisoned_tc_assign(Xg, gpu(C), **{key: gpu(v) for key, v in kw.items()})
            check_tc_assignment(res, Xr, C, dtype, **kw)


@pytest.mark.parametrize("dtype", TC_DTYPES)
@pytest.mark.parametrize("layout", ["padded_aligned", "row_stride_odd", "offset_start"])
def test_tensor_core_assign_strided_rows(torch, assign_kernel, dtype, layout, rng):
    """Rows with a stride: 16-byte aligned rows with a ragged last chunk (cp.async with partial
    zero fill), and unaligned rows (the element-wise loader). Bit-for-bit equal to a dense copy
    that takes the same loader: for aligned rows that is x and the centroids padded with zero
    columns to the aligned width (a dense (N, 45) copy has unaligned rows, which the wgmma
    kernels leave to the mma kernel, whose sums run in another order)."""
    N, D, k = 400, 45, 70
    cols = 48 if layout == "padded_aligned" else 49
    C = make_centroids(rng, k, D)
    big = make_rows(rng, N + 1, cols, C=np.pad(C, ((0, 0), (0, cols - D))))
    T = gpu(big, "torch", dtype)
    Xg = T[1:, 1:D + 1] if layout == "offset_start" else T[:N, :D]
    assert Xg.stride(1) == 1 and not Xg.is_contiguous()
    res = _poisoned_tc_assign(Xg, gpu(C))
    check_tc_assignment(res, f64(Xg), C, dtype)
    if layout == "padded_aligned":
        Xd = torch.zeros((N, cols), dtype=Xg.dtype, device=Xg.device)
        Xd[:, :D] = Xg
        dense = _poisoned_tc_assign(Xd, gpu(np.pad(C, ((0, 0), (0, cols - D)))))
    else:
        dense = _poisoned_tc_assign(Xg.contiguous(), gpu(C))
    np.testing.assert_array_equal(to_numpy(res.labels), to_numpy(dense.labels))
    np.testing.assert_array_equal(to_numpy(res.scores), to_numpy(dense.scores))


@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_tensor_core_agrees_with_exact_float32(torch, route, assign_kernel, dtype, rng):
    """Both CUDA paths on clustered data of the benchmark's shape family: labels agree except
    where the exact scores of the two choices are within the tensor-core bound."""
    N, D, k = 20000, 512, 256
    Cn = rng.standard_normal((k, D)).astype(np.float32)
    Cn /= np.linalg.norm(Cn, axis=1, keepdims=True)
    X = (8.0 * Cn[rng.integers(0, k, N)] + rng.standard_normal((N, D))).astype(np.float32)
    Xg = gpu(X, "torch", dtype)
    tc = ops.assign(Xg, gpu(Cn), precision="tf32")
    exact = ops.assign(Xg, gpu(Cn), precision="float32")
    S = check_tc_assignment(tc, f64(Xg), Cn, dtype)
    lt, le = to_numpy(tc.labels), to_numpy(exact.labels)
    agree = (lt == le).mean()
    assert agree > 0.99, agree
    rows = np.arange(N)
    assert np.all(np.abs(S[rows, lt] - S[rows, le]) < 0.02)


def test_tensor_core_spherical_kmeans_step(torch, route, rng):
    for dtype in TC_DTYPES:
        C = make_centroids(rng, 70, 37) * 3
        X = make_rows(rng, 3000, 37, C=C, zero_rows=2)
        Xg = gpu(X, "torch", dtype)
        cents, labels, counts = ops.spherical_kmeans_step(Xg, gpu(C), precision="tf32")
        res = ops.assign(Xg, gpu(C), precision="tf32")
        np.testing.assert_array_equal(to_numpy(labels), to_numpy(res.labels))
        np.testing.assert_array_equal(to_numpy(counts), to_numpy(res.counts))
        expected = ref.normalize_centroids(to_numpy(res.sums), to_numpy(res.counts),
                                           C / np.linalg.norm(C, axis=1, keepdims=True))
        np.testing.assert_allclose(to_numpy(cents), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_tensor_core_block_sums_equal_sorted_sums(torch, dtype, rng, monkeypatch):
    """The two ways of accumulating cluster sums (sorted segmented pass, the default; per-block
    atomics in the assignment kernel) give the same labels, counts and sums. Both on the mma
    kernel: at k >= 129 the default labels float32 rows on wgmma where it runs, which the block
    sums do not (they live in the mma kernel), and near ties of two kernels may differ."""
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", "mma")
    C = make_centroids(rng, 150, 40)
    X = make_rows(rng, 5000, 40, C=C, zero_rows=3)
    Xg = gpu(X, "torch", dtype)
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "sorted")
    a = _poisoned_tc_assign(Xg, gpu(C), center=gpu(np.full(40, 0.1, np.float32)))
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "block")
    b = _poisoned_tc_assign(Xg, gpu(C), center=gpu(np.full(40, 0.1, np.float32)))
    check_tc_assignment(b, f64(Xg), C, dtype, center=np.full(40, 0.1, np.float32))
    np.testing.assert_array_equal(to_numpy(a.labels), to_numpy(b.labels))
    np.testing.assert_array_equal(to_numpy(a.counts), to_numpy(b.counts))
    np.testing.assert_allclose(to_numpy(a.sums), to_numpy(b.sums), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel,k", [("wgmma", 1000), ("wgmma-tma", 1000), ("wgmma", 64), ("wgmma", 100)])
@pytest.mark.parametrize("dtype", TC_DTYPES)
def test_wgmma_kernel_agrees_with_the_mma_kernel(torch, dtype, kernel, k, monkeypatch):
    """EDPAIRS_ASSIGN_KERNEL=wgmma against the mma.sync kernel on the benchmark's row width, on
    four centroid tiles with a ragged last one (k = 1000) and on the 64- and 128-wide tiles
    (k = 64, 100), with a centre and the sorted sums: both within the tensor-core model, labels
    equal wherever the two kernels' scores leave room, counts summing to N and the sums of
    equal labels equal."""
    if reason := _wgmma_skip_reason():
        pytest.skip(reason)
    rng = np.random.default_rng(909 + k)
    N, D = 30_000, 512
    C = make_centroids(rng, k, D, duplicates=3)
    X = make_rows(rng, N, D, C=C, zero_rows=5) + 0.25
    center = np.full(D, 0.25, np.float32)
    Xg = gpu(X, "torch", dtype)
    runs = {}
    for name in ("mma", kernel):
        monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", name)
        runs[name] = _poisoned_tc_assign(Xg, gpu(C), center=gpu(center))
        S = check_tc_assignment(runs[name], f64(Xg), C, dtype, center=center)
    a, b = (to_numpy(runs[key].labels) for key in ("mma", kernel))
    rows = np.arange(N)
    gap = np.abs(S[rows, a] - S[rows, b])
    assert (a == b).mean() > 0.99 and np.all((a == b) | (gap < 5e-3)), (a != b).sum()
    assert int(to_numpy(runs[kernel].counts).sum()) == N


def test_tf32_assign_defaults_to_the_wgmma_kernel_on_hopper(torch, monkeypatch, rng):
    """With EDPAIRS_ASSIGN_KERNEL unset, a TF32 assignment of float32 rows with k >= 129 is
    labelled by the wgmma kernel on Hopper instead of the route: by default (since H200 run 6)
    from float16 copies of the rows, bit for bit EDPAIRS_ASSIGN_HALF=copies; with
    EDPAIRS_ASSIGN_HALF=0 from the float32 rows, bit for bit EDPAIRS_GEMM_ROUTE=kernel with
    EDPAIRS_ASSIGN_KERNEL=wgmma, not the mma kernel; "mma" sends it back to the route, and so
    do rows off 16 bytes. Below k = 129 the default keeps the mma kernel (the 64- and 128-wide
    wgmma tiles are opt-in: slower at k = 64 in H200 run 6), and "wgmma" takes them."""
    from edpairs import _gemm
    from edpairs._arrays import Namespace

    if reason := _wgmma_skip_reason():
        pytest.skip(reason)
    for name in ("EDPAIRS_ASSIGN_KERNEL", "EDPAIRS_GEMM_ROUTE", "EDPAIRS_ASSIGN_HALF"):
        monkeypatch.delenv(name, raising=False)
    xp = Namespace("torch")
    N, D, k = 20_000, 64, 300
    C = make_centroids(rng, k, D)
    Xg, Cg = gpu(make_rows(rng, N, D, C=C)), gpu(C)
    assert not _gemm.assign_applies(Xg, xp, k, "tf32") and _gemm.half_labels(Xg)
    runs = {"default": ops.assign(Xg, Cg, precision="tf32")}
    for name, knob in (("copies", "copies"), ("rows", "0")):
        monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", knob)
        runs[name] = ops.assign(Xg, Cg, precision="tf32")
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")
    for name in ("wgmma", "mma"):
        monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", name)
        runs[name] = ops.assign(Xg, Cg, precision="tf32")
    for key in ("labels", "scores", "counts"):
        np.testing.assert_array_equal(to_numpy(getattr(runs["default"], key)), to_numpy(getattr(runs["copies"], key)))
        np.testing.assert_array_equal(to_numpy(getattr(runs["rows"], key)), to_numpy(getattr(runs["wgmma"], key)))
    assert not np.array_equal(to_numpy(runs["rows"].scores), to_numpy(runs["mma"].scores))
    assert not np.array_equal(to_numpy(runs["default"].scores), to_numpy(runs["rows"].scores))
    # Below k = 129 (no route) the default labels on mma; "wgmma" in 64- and 128-wide tiles.
    for small in (40, 128):
        Cs = gpu(make_centroids(rng, small, D))
        monkeypatch.delenv("EDPAIRS_ASSIGN_KERNEL")
        default = ops.assign(Xg, Cs, precision="tf32")
        for name in ("wgmma", "mma"):
            monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", name)
            runs[name] = ops.assign(Xg, Cs, precision="tf32")
        np.testing.assert_array_equal(to_numpy(default.scores), to_numpy(runs["mma"].scores))
        assert not np.array_equal(to_numpy(default.scores), to_numpy(runs["wgmma"].scores))
    monkeypatch.delenv("EDPAIRS_GEMM_ROUTE")
    assert _gemm.assign_applies(Xg, xp, k, "tf32")  # EDPAIRS_ASSIGN_KERNEL=mma: the route
    monkeypatch.delenv("EDPAIRS_ASSIGN_KERNEL")
    odd = torch.zeros((N, D + 1), device=Xg.device)[:, 1:]
    assert _gemm.assign_applies(odd, xp, k, "tf32") and not _gemm.assign_applies(Xg, xp, 128, "tf32")


@pytest.mark.parametrize("k", [40, 100, 300])
def test_wgmma_l2_prefetch_is_only_a_hint(torch, monkeypatch, rng, k):
    """EDPAIRS_WGMMA_PREFETCH (how far beyond their ring the wgmma kernels prefetch x into L2)
    changes no label, score or count, and with the fused small-k pass (deterministic) no bit
    of the sums; the sorted pass's float64 sums vary in their last bits run to run anyway (the
    scatter's atomics order the rows within a label); a bad value is refused."""
    if reason := _wgmma_skip_reason():
        pytest.skip(reason)
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", "wgmma")
    C = make_centroids(rng, k, 96)
    Xg, Cg = gpu(make_rows(rng, 9000, 96, C=C, zero_rows=2)), gpu(C)
    for sums in ("auto", "fused"):
        monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", sums)
        runs = {}
        for depth in ("0", "4", "16"):
            monkeypatch.setenv("EDPAIRS_WGMMA_PREFETCH", depth)
            runs[depth] = _poisoned_tc_assign(Xg, Cg)
        for depth in ("4", "16"):
            for key in ("labels", "scores", "counts"):
                np.testing.assert_array_equal(to_numpy(getattr(runs[depth], key)), to_numpy(getattr(runs["0"], key)))
            a, b = to_numpy(runs[depth].sums), to_numpy(runs["0"].sums)
            if sums == "fused" and k <= 64:
                np.testing.assert_array_equal(a, b)
            else:
                assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    _assert_refused(monkeypatch, "EDPAIRS_WGMMA_PREFETCH", ("-1", "17", "four"),
                    "EDPAIRS_WGMMA_PREFETCH must be an integer from 0 to 16", lambda: _poisoned_tc_assign(Xg, Cg))


def _assert_refused(monkeypatch, knob, values, match, call):
    """call() raises an error matching `match` with each of `values` in the environment knob."""
    for bad in values:
        monkeypatch.setenv(knob, bad)
        with pytest.raises(Exception, match=match):
            call()


def test_assign_kernel_knob_is_validated(torch, monkeypatch, rng):
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", "hgmma")
    X, C = gpu(make_rows(rng, 300, 16)), gpu(make_centroids(rng, 5, 16))
    with pytest.raises(Exception, match="EDPAIRS_ASSIGN_KERNEL must be 'auto', 'mma', 'wgmma' or 'wgmma-tma', got 'hgmma'"):
        ops.assign(X, C, precision="tf32")
    Xw, Cw = gpu(make_rows(rng, 300, 16)), gpu(make_centroids(rng, 200, 16))  # k >= 129: the route's check
    with pytest.raises(ValueError, match="EDPAIRS_ASSIGN_KERNEL must be 'auto', 'mma', 'wgmma' or 'wgmma-tma', got 'hgmma'"):
        ops.assign(Xw, Cw, precision="tf32")


def test_tf32_assignment_about_a_far_centre_keeps_the_centred_accuracy(torch, rng, monkeypatch):
    """TF32 about a centre on torch float32 rows takes the route, which centres the rows before
    the product: rows at an offset of 1000 with a spread of 1 get the float64 labels except
    near ties of the centred rows' TF32 bound (the kernels, which round the raw rows and take
    center . c off after the product, had an error a thousand times that: in a numpy model of
    their rounding a third of these clear rows' labels differ from float64)."""
    monkeypatch.delenv("EDPAIRS_GEMM_ROUTE", raising=False)
    D, k = 64, 200
    C = make_centroids(rng, k, D)
    offset = np.float32(1000.0) * np.ones(D, np.float32)
    X = (make_rows(rng, 20_000, D, C=C) + offset).astype(np.float32)
    res = ops.assign(gpu(X), gpu(C), center=gpu(offset), precision="tf32")
    want_labels = ref.assign(X.astype(np.float64), C, center=offset)[0]
    S = (X.astype(np.float64) - offset) @ C.T.astype(np.float64) / np.linalg.norm(C.astype(np.float64), axis=1)
    top2 = np.sort(S, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2.0**-9 * 2 * np.linalg.norm(X.astype(np.float64) - offset, axis=1)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(to_numpy(res.labels)[clear], want_labels[clear])


def test_tensor_core_float64_input_takes_the_exact_path(torch, rng):
    C = make_centroids(rng, 9, 21)
    X = make_rows(rng, 500, 21, C=C)
    res = ops.assign(gpu(X, "torch", "float64"), gpu(C), precision="tf32")
    check_assignment(res, X, C)


@pytest.mark.parametrize("path", ["columns", "fused-mma", "fused-wgmma", "half"])
def test_shape_dependent_shared_memory_under_concurrent_callers(torch, path, monkeypatch):
    """Kernels whose dynamic shared memory follows the call's shape (owned-column sums, both
    fused kernels, the float16-row kernel) called from four host threads at once with different
    D: each result equals the one-thread result (the attribute and the launch share a lock;
    without it one thread's smaller setting could fail another's launch); the mma fused
    kernel's sums to float32 rounding (the order of its atomics changes them)."""
    from concurrent.futures import ThreadPoolExecutor

    if path in ("fused-wgmma", "half") and (reason := _wgmma_skip_reason()):
        pytest.skip(reason)
    knobs = {"columns": {"EDPAIRS_ASSIGN_SUMS": "columns"},
             "fused-mma": {"EDPAIRS_ASSIGN_SUMS": "fused", "EDPAIRS_ASSIGN_KERNEL": "mma"},
             "fused-wgmma": {"EDPAIRS_ASSIGN_SUMS": "fused", "EDPAIRS_ASSIGN_KERNEL": "wgmma"},
             "half": {"EDPAIRS_ASSIGN_HALF": "1"}}[path]
    for name, value in knobs.items():
        monkeypatch.setenv(name, value)
    if path == "half":  # (the module's EDPAIRS_GEMM_ROUTE=kernel keeps the float32 rows' kernels)
        monkeypatch.delenv("EDPAIRS_GEMM_ROUTE", raising=False)
    k = 200 if path == "half" else 40
    rng = np.random.default_rng(5)
    inputs = []
    for d in (32, 96, 256, 512):
        C = make_centroids(rng, k, d)
        inputs.append((gpu(make_rows(rng, 3000, d, C=C)), gpu(C)))
    if path == "half":
        from edpairs import _gemm
        from edpairs._arrays import Namespace

        assert all(_gemm.half_assign_applies(X, Namespace("torch"), k, "tf32", None, None, None)
                   and _gemm.half_resident_applies(X) for X, _ in inputs)

    def run(i):
        X, C = inputs[i % len(inputs)]
        res = ops.assign(X, C, precision="tf32")
        return to_numpy(res.labels), to_numpy(res.sums), to_numpy(res.counts)

    want = [run(i) for i in range(len(inputs))]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, range(40)))
    for i, (labels, sums, counts) in enumerate(got):
        w = want[i % len(inputs)]
        np.testing.assert_array_equal(labels, w[0])
        np.testing.assert_array_equal(counts, w[2])
        if path == "fused-mma":  # float32 block sums in the order of shared-memory atomics
            # (assign_tc_cuda.cu gives up bit-identical runs; the first H200 run differed by 1e-6
            # relative): float32 rounding of the sums' scale
            np.testing.assert_allclose(sums, w[1], rtol=0, atol=1e-5 * np.abs(w[1]).max())
        else:
            np.testing.assert_allclose(sums, w[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("precision,k,half", [("float32", 5, "0"), ("tf32", 5, "0"), ("tf32", 200, "0"),
                                              ("tf32", 200, "1"), ("tf32", 200, "copies")])
def test_rows_whose_every_score_is_nan_score_nan_as_on_the_cpu(torch, route, assign_kernel, precision, k, half,
                                                              monkeypatch, rng):
    """Unchecked centroids that all hold a NaN: each nonzero row gets label 0 and score NaN on
    every CUDA path (exact, mma, wgmma, the route, float16 rows), as on the CPU; a zero row
    label 0 and score 0. (The kernels wrote -inf and the route 0 before.)"""
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", half)
    if half != "0":  # the float16 rows take over only where EDPAIRS_GEMM_ROUTE leaves the choice
        monkeypatch.delenv("EDPAIRS_GEMM_ROUTE")
    X = make_rows(rng, 300, 32)
    X[7] = 0
    C = make_centroids(rng, k, 32)
    C[:, 3] = np.nan
    want = ops.assign(X, C, check_finite=False)
    got = ops.assign(gpu(X), gpu(C), check_finite=False, precision=precision)
    nonzero = np.arange(300) != 7
    assert np.isnan(want.scores[nonzero]).all() and want.scores[7] == 0 and not want.labels.any()
    np.testing.assert_array_equal(to_numpy(got.labels), want.labels)
    np.testing.assert_array_equal(to_numpy(got.scores), want.scores)  # NaN where NaN


def test_tensor_core_runs_on_the_current_stream(torch, route, assign_kernel, rng):
    X, C, _, _, _, _ = _stream_inputs(rng)
    src, Cg = gpu(X), gpu(C)
    Xg = torch.zeros_like(src)
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        dep = _busy(torch, lib="torch")
        Xg.copy_(src + 0 * dep)
        res = ops.assign(Xg, Cg, check_finite=False, precision="tf32")
        step = ops.spherical_kmeans_step(Xg, Cg, check_finite=False, precision="tf32")
    torch.cuda.synchronize()
    check_tc_assignment(res, X, C, "float32")
    np.testing.assert_array_equal(to_numpy(step[1]), to_numpy(res.labels))


def test_precision_is_validated(torch, rng):
    X, C = gpu(make_rows(rng, 10, 4)), gpu(make_centroids(rng, 3, 4))
    with pytest.raises(ValueError, match="precision"):
        ops.assign(X, C, precision="fp8")


@pytest.mark.slow
def test_tensor_core_large(torch):
    rng = np.random.default_rng(77)
    C = make_centroids(rng, 1000, 128, duplicates=3)
    X = make_rows(rng, 200_000, 128, C=C, zero_rows=10)
    for dtype in TC_DTYPES:
        Xg = gpu(X, "torch", dtype)
        res = _poisoned_tc_assign(Xg, gpu(C))
        check_tc_assignment(res, f64(Xg), C, dtype)


# (N, D, k) for the fused small-k sums: ragged tiles, one tile, k = 1 (one label group per
# tile, walked by one warp), k = 64 (the largest), a grid smaller than the tiles (persistent
# loop), and the benchmark's D = 512 (the largest that fits next to the pipeline at k = 64 on
# Hopper; falls back to the sorted pass where shared memory is smaller).
# (600_000, 8, 1): more than 32 row tiles per block on a 132-SM card, so the fused wgmma
# kernel folds its float32 runs into float64 along the way, all rows in one cluster.
FUSED_SHAPES = [(1, 1, 1), (127, 31, 7), (300, 64, 1), (1000, 100, 64), (5000, 40, 33), (200_000, 64, 64),
                (20_000, 512, 64), (600_000, 8, 1)]


@pytest.mark.parametrize("dtype", TC_DTYPES)
@pytest.mark.parametrize("N,D,k", FUSED_SHAPES)
@pytest.mark.parametrize("variant", ["plain", "center", "scales", "strided", "wgmma"])
def test_tensor_core_fused_sums(torch, dtype, N, D, k, variant, rng, monkeypatch):
    """EDPAIRS_ASSIGN_SUMS=fused (cluster sums in the assignment kernel, one read of x): the
    mma kernel by default (the labeller "auto" picks below k = 129), with EDPAIRS_ASSIGN_KERNEL=
    wgmma ("wgmma", Hopper) the wgmma kernel with summing warps: labels and scores within the
    tensor-core error model, every output written, counts exact, sums within float32
    accumulation of float64 ones, and the same labels / counts as the sorted pass after the
    same labeller (the sums knob never changes the labels)."""
    if variant not in ("plain", "wgmma") and N > 5000:
        pytest.skip("the variants run on the small shapes")
    if variant == "wgmma":
        if reason := _wgmma_skip_reason():
            pytest.skip(reason)
        monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", "wgmma")
    C = make_centroids(rng, k, D)
    X = make_rows(rng, N, D, C=C, zero_rows=min(3, N - 1))
    kw = {}
    if variant == "center":
        kw["center"] = (0.1 * rng.standard_normal(D)).astype(np.float32)
    if variant == "scales":
        kw["row_scale"] = (rng.random(N) * (rng.random(N) > 0.1)).astype(np.float32)
        kw["col_scale"] = (1 + rng.random(k)).astype(np.float32)
    # Rows 16-byte aligned (the fused kernel's condition; ragged D is padded), with a gap of 8
    # elements for the strided variant.
    stride = -(-D // 8) * 8 + (8 if variant == "strided" else 0)
    wide = torch.zeros((N, stride), dtype=getattr(torch, dtype), device=DEVICE)
    wide[:, :D] = gpu(X, "torch", dtype)
    Xg = wide[:, :D]
    gkw = {name: gpu(v) for name, v in kw.items()}
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "fused")
    fused = _poisoned_tc_assign(Xg, gpu(C), **gkw)
    check_tc_assignment(fused, f64(Xg), C, dtype, **kw)
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "sorted")
    sorted_ = _poisoned_tc_assign(Xg, gpu(C), **gkw)
    _assert_same_clusters(fused, sorted_)
    a = to_numpy(fused.sums)
    # Run to run: labels and counts identical; the sums differ only by the order of the float32
    # shared-memory atomics inside a block (the mma fused kernel) or of the float64 atomics (the
    # sorted pass, where the fused kernel does not fit this card's shared memory); the wgmma
    # fused kernel is deterministic (owned columns, float64 partials added in block order).
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "fused")
    again = _poisoned_tc_assign(Xg, gpu(C), **gkw)
    np.testing.assert_array_equal(to_numpy(again.labels), to_numpy(fused.labels))
    np.testing.assert_array_equal(to_numpy(again.counts), to_numpy(fused.counts))
    if variant == "wgmma" and _fused_applies(torch, k, D, wgmma=True):
        np.testing.assert_array_equal(to_numpy(again.sums), a)
    tol = 1e-5 if _fused_applies(torch, k, D, wgmma=variant == "wgmma") else 1e-12
    assert np.abs(to_numpy(again.sums) - a).max() <= tol * (np.abs(a).max() + 1e-30)


def _assert_same_clusters(a, b):
    """Two assignments with the same labels and counts, and sums equal to float32 accumulation."""
    np.testing.assert_array_equal(to_numpy(a.labels), to_numpy(b.labels))
    np.testing.assert_array_equal(to_numpy(a.counts), to_numpy(b.counts))
    sa, sb = to_numpy(a.sums), to_numpy(b.sums)
    assert np.abs(sa - sb).max() <= 1e-5 * (np.abs(sb).max() + 1e-30)


def _fused_applies(torch, k, D, wgmma=False):
    """Whether the fused small-k kernel fits (k <= 64; pipeline, k x D float32 sums and the
    rest in the block's shared memory) on the current card: the mma kernel of
    assign_tc_cuda.cu, or with ``wgmma`` assign_wgmma_sums_kernel (ring 96 KB, sums, counts,
    two tiles' scales and labels, 1 KB of alignment slack: sums_smem_bytes)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    optin = getattr(props, "shared_memory_per_block_optin", 0) or (232448 if props.major >= 9 else 166912)
    need = 98304 + 4 * k * D + 4 * k + 2 * 128 * 4 + 2 * 128 + 1023 if wgmma else 82944 + 4 * k * D + 2304
    return k <= 64 and need <= optin


@pytest.mark.parametrize("N,D,k", [(3000, 37, 65), (3000, 4096, 64)])
def test_tensor_core_fused_sums_falls_back(torch, N, D, k, rng, monkeypatch):
    """Where the fused kernel does not apply (k > 64; k x D sums larger than shared memory;
    rows not 16-byte aligned), EDPAIRS_ASSIGN_SUMS=fused takes the pass of the default (the
    sorted pass): same results."""
    C = make_centroids(rng, k, D)
    X = make_rows(rng, N, D, C=C, zero_rows=2)
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "fused")
    res = _poisoned_tc_assign(gpu(X), gpu(C))
    check_tc_assignment(res, X, C, "float32")
    wide = torch.zeros((N, D + 1), dtype=torch.float32, device=DEVICE)
    wide[:, :D] = gpu(X)
    res = _poisoned_tc_assign(wide[:, :D], gpu(C))  # unaligned rows
    check_tc_assignment(res, X, C, "float32")


COLUMN_SHAPES = [(5000, 40, 150), (3000, 512, 64), (20_000, 33, 7), (700, 1000, 9), (1, 8, 1), (70_000, 96, 20)]


@pytest.mark.parametrize("dtype", TC_DTYPES)
@pytest.mark.parametrize("N,D,k", COLUMN_SHAPES)
@pytest.mark.parametrize("variant", ["plain", "center", "strided"])
def test_tensor_core_column_sums_equal_sorted_sums(torch, dtype, N, D, k, variant, rng, monkeypatch):
    """EDPAIRS_ASSIGN_SUMS=columns (opt-in where k x D float32 sums fit in shared memory: one
    ordered read of x, each sums column owned by one warp, float32 runs of at most 4096 rows,
    float64 across blocks) against the sorted pass (the default) on the same labels: counts
    exact, sums within float32 accumulation, every output written; bit-for-bit the same run to
    run."""
    C = make_centroids(rng, k, D)
    X = make_rows(rng, N, D, C=C, zero_rows=min(3, N - 1))
    kw = {"center": (0.1 * rng.standard_normal(D)).astype(np.float32)} if variant == "center" else {}
    if variant == "strided":
        wide = torch.zeros((N, D + 3), dtype=getattr(torch, dtype), device=DEVICE)
        wide[:, 1:D + 1] = gpu(X, "torch", dtype)
        Xg = wide[:, 1:D + 1]  # rows off 16 bytes: the mma kernel labels, the sums read elements
    else:
        Xg = gpu(X, "torch", dtype)
    gkw = {name: gpu(v) for name, v in kw.items()}
    runs = {}
    for mode in ("columns", "sorted"):
        monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", mode)
        runs[mode] = _poisoned_tc_assign(Xg, gpu(C), **gkw)
    check_tc_assignment(runs["columns"], f64(Xg), C, dtype, **kw)
    a = runs["columns"]
    _assert_same_clusters(a, runs["sorted"])
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "columns")
    again = _poisoned_tc_assign(Xg, gpu(C), **gkw)
    for key in ("labels", "counts", "sums"):
        np.testing.assert_array_equal(to_numpy(getattr(again, key)), to_numpy(getattr(a, key)))


def test_tensor_core_column_sums_fall_back_to_sorted(torch, rng, monkeypatch):
    """Where k x D float32 sums exceed the block's shared memory (k = 300, D = 512: 600 KB),
    "columns" takes the sorted pass (the default): the same sums bit for bit up to the order of
    its float64 atomics."""
    C = make_centroids(rng, 300, 512)
    Xg = gpu(make_rows(rng, 4000, 512, C=C))
    runs = {}
    for mode in ("columns", "sorted", "auto"):
        monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", mode)
        runs[mode] = _poisoned_tc_assign(Xg, gpu(C))
    check_tc_assignment(runs["auto"], f64(Xg), C, "float32")
    for mode in ("columns", "auto"):
        np.testing.assert_array_equal(to_numpy(runs[mode].counts), to_numpy(runs["sorted"].counts))
        np.testing.assert_allclose(to_numpy(runs[mode].sums), to_numpy(runs["sorted"].sums), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", ["auto", "mma"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overlapped_sums_equal_the_plain_schedule(torch, kernel, dtype, rng, monkeypatch):
    """EDPAIRS_ASSIGN_OVERLAP=c (the sorted sums of each of c chunks of rows on a side stream
    while the next chunk is labelled): the same labels, scores and counts bit for bit, the sums
    up to the order of their float64 atomics, on the caller's stream (a busy stream first) and
    for every chunk count, small inputs included; bad values refused."""
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", kernel)
    C = make_centroids(rng, 301, 512)  # k x D too large for the owned columns: the sorted pass; odd k
    X = make_rows(rng, 20_001, 512, C=C, zero_rows=3)
    Xg, Cg = gpu(X, "torch", dtype), gpu(C)
    monkeypatch.delenv("EDPAIRS_ASSIGN_OVERLAP", raising=False)
    plain = _poisoned_tc_assign(Xg, Cg)
    check_tc_assignment(plain, f64(Xg), C, dtype)
    for chunks in ("2", "3", "7", "64"):
        monkeypatch.setenv("EDPAIRS_ASSIGN_OVERLAP", chunks)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            dep = _busy(torch, lib="torch")
            Xs = Xg + (0 * dep).to(Xg.dtype)
            got = _poisoned_tc_assign(Xs, Cg)
        torch.cuda.synchronize()
        for key in ("labels", "scores", "counts"):
            np.testing.assert_array_equal(to_numpy(getattr(got, key)), to_numpy(getattr(plain, key)))
        np.testing.assert_allclose(to_numpy(got.sums), to_numpy(plain.sums), rtol=1e-12, atol=1e-12)
    small = _poisoned_tc_assign(Xg[:100], Cg)  # fewer rows than chunks x 128: no overlap
    np.testing.assert_array_equal(to_numpy(small.labels), to_numpy(plain.labels)[:100])
    _assert_refused(monkeypatch, "EDPAIRS_ASSIGN_OVERLAP", ("-1", "65", "two"),
                    "EDPAIRS_ASSIGN_OVERLAP must be an integer from 0 to 64", lambda: _poisoned_tc_assign(Xg, Cg))


def test_assign_sums_knob_is_validated(torch, rng, monkeypatch):
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "segmented")
    X, C = gpu(make_rows(rng, 300, 16)), gpu(make_centroids(rng, 5, 16))
    with pytest.raises(Exception, match="EDPAIRS_ASSIGN_SUMS must be 'auto', 'columns', 'sorted', 'block' or 'fused', "
                                        "got 'segmented'"):
        ops.assign(X, C, precision="tf32")


@pytest.mark.parametrize("labeller", ["auto", "wgmma"])
def test_tensor_core_fused_kmeans_step(torch, labeller, rng, monkeypatch):
    """spherical_kmeans_step with the fused sums equals the step with the sorted sums, for the
    default labeller (mma below k = 129) and for wgmma (Hopper)."""
    if labeller == "wgmma" and (reason := _wgmma_skip_reason()):
        pytest.skip(reason)
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", labeller)
    C = make_centroids(rng, 50, 96) * 3
    X = make_rows(rng, 20_000, 96, C=C, zero_rows=2)
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "fused")
    c1, l1, n1 = ops.spherical_kmeans_step(gpu(X), gpu(C), precision="tf32")
    monkeypatch.setenv("EDPAIRS_ASSIGN_SUMS", "sorted")
    c2, l2, n2 = ops.spherical_kmeans_step(gpu(X), gpu(C), precision="tf32")
    np.testing.assert_array_equal(to_numpy(l1), to_numpy(l2))
    np.testing.assert_array_equal(to_numpy(n1), to_numpy(n2))
    np.testing.assert_allclose(to_numpy(c1), to_numpy(c2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N,D", [(1, 1), (70, 5), (1000, 130), (5000, 257), (100_000, 512)])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_moments_tf32_opt_in(torch, N, D, layout, rng, monkeypatch):
    """EDPAIRS_MOMENTS=tf32 (tensor-core scatter, float32 x): mean exact, m2 symmetric, every
    entry written, within TF32 rounding of the float64 scatter on offset data (the centring
    comes before the rounding)."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")  # the tensor-core kernels, not cuBLAS
    X = (rng.standard_normal((N, D)) * (1 + rng.random(D)) + 40.0).astype(np.float32)
    # Rows 16-byte aligned (the kernel's condition; ragged D padded), a gap for "strided".
    wide = torch.zeros((N, -(-D // 4) * 4 + (4 if layout == "strided" else 0)), dtype=torch.float32, device=DEVICE)
    wide[:, :D] = gpu(X)
    Xg = wide[:, :D]
    monkeypatch.setenv("EDPAIRS_MOMENTS", "tf32")
    m = ops.moments(Xg)
    mean, m2 = to_numpy(m.mean), to_numpy(m.m2)
    X64 = X.astype(np.float64)
    ref_mean = X64.mean(0)
    ref = (X64 - ref_mean).T @ (X64 - ref_mean)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-12, atol=1e-12)
    assert np.isfinite(m2).all()
    np.testing.assert_array_equal(m2, m2.T)
    # TF32 keeps 11 significant bits: a product's relative error is below 2^-10; summed terms
    # of both signs can cancel, so the bound is on the sum of |terms| (the diagonal's scale).
    Xc = np.abs(X64 - ref_mean)
    bound = 2.0 ** -9 * (Xc.T @ Xc) + 1e-6 * np.abs(ref).max()
    assert np.all(np.abs(m2 - ref) <= bound), np.abs(m2 - ref).max()
    if N > 1:
        assert np.linalg.norm(m2 - ref) <= 3e-3 * np.linalg.norm(ref)


def test_moments_tf32_falls_back_to_exact(torch, rng, monkeypatch):
    """Where the tensor-core scatter does not apply (16-bit or float64 x, rows not 16-byte
    aligned) EDPAIRS_MOMENTS=tf32 keeps the exact float32 kernel: equal to the default."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")  # the tensor-core kernels, not cuBLAS
    X = rng.standard_normal((3000, 37)).astype(np.float32) + 5
    wide = torch.zeros((3000, 38), dtype=torch.float32, device=DEVICE)
    wide[:, :37] = gpu(X)
    for Xg in (wide[:, :37], gpu(X, "torch", "float64"), gpu(X, "torch", "bfloat16")):
        monkeypatch.setenv("EDPAIRS_MOMENTS", "tf32")
        a = ops.moments(Xg)
        monkeypatch.setenv("EDPAIRS_MOMENTS", "float32")
        b = ops.moments(Xg)
        np.testing.assert_array_equal(to_numpy(a.mean), to_numpy(b.mean))
        np.testing.assert_allclose(to_numpy(a.m2), to_numpy(b.m2), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("N,D,I", [(1, 3, 2), (300, 37, 70), (5000, 130, 64), (50_000, 512, 256)])
@pytest.mark.parametrize("center", [False, True])
def test_signal_moments_tf32_opt_in(torch, N, D, I, center, rng, monkeypatch):
    """EDPAIRS_SIGNAL_MOMENTS=tf32 (kernel B on tensor cores): count, sum_z, sum_zz as the exact
    path (kernel A is shared), sum_x and sum_xz within TF32 rounding of it, every entry written."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")  # the tensor-core kernels, not cuBLAS
    X = (rng.standard_normal((N, D)) + 1.0).astype(np.float32)
    W = (rng.standard_normal((D, I)) / np.sqrt(D)).astype(np.float32)
    b = (rng.standard_normal(I) * 0.3).astype(np.float32)
    c = (0.5 * rng.standard_normal(D)).astype(np.float32) if center else None
    wide = torch.zeros((N, -(-D // 4) * 4), dtype=torch.float32, device=DEVICE)  # aligned rows
    wide[:, :D] = gpu(X)
    args = (wide[:, :D], gpu(W), gpu(b))
    monkeypatch.setenv("EDPAIRS_SIGNAL_MOMENTS", "float32")
    exact = ops.signal_moments(*args, center=gpu(c))
    monkeypatch.setenv("EDPAIRS_SIGNAL_MOMENTS", "tf32")
    fast = ops.signal_moments(*args, center=gpu(c))
    np.testing.assert_array_equal(to_numpy(fast.count), to_numpy(exact.count))
    np.testing.assert_allclose(to_numpy(fast.sum_z), to_numpy(exact.sum_z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(to_numpy(fast.sum_zz), to_numpy(exact.sum_zz), rtol=1e-12, atol=1e-12)
    Xc = np.abs(X.astype(np.float64) - (c if center else 0))
    Z = X.astype(np.float64) @ W - b  # z uses the raw x
    absM = (Z > -1e-3).astype(np.float64)  # masks as far as float32 rounding can move them
    scale_x = absM.T @ Xc
    scale_xz = (absM * np.abs(Z)).T @ Xc
    for got, want, scale in ((fast.sum_x, exact.sum_x, scale_x), (fast.sum_xz, exact.sum_xz, scale_xz)):
        got, want = to_numpy(got), to_numpy(want)
        assert np.isfinite(got).all()
        assert np.all(np.abs(got - want) <= 2.0 ** -9 * scale + 1e-6 * (np.abs(want).max() + 1e-30))


def test_moments_precision_argument(torch, rng, monkeypatch):
    """precision='tf32' of ops.moments / ops.signal_moments takes the same kernels as the
    environment knobs; precision='float32' (the default) the exact ones; others are refused."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")  # the tensor-core kernels, not cuBLAS
    X = (rng.standard_normal((20_000, 96)) + 3).astype(np.float32)
    W = (rng.standard_normal((96, 40)) / 10).astype(np.float32)
    b = (rng.standard_normal(40) * 0.1).astype(np.float32)
    monkeypatch.delenv("EDPAIRS_MOMENTS", raising=False)
    monkeypatch.delenv("EDPAIRS_SIGNAL_MOMENTS", raising=False)
    arg = ops.moments(gpu(X), precision="tf32")
    sig_arg = ops.signal_moments(gpu(X), gpu(W), gpu(b), precision="tf32")
    exact = ops.moments(gpu(X))
    monkeypatch.setenv("EDPAIRS_MOMENTS", "tf32")
    monkeypatch.setenv("EDPAIRS_SIGNAL_MOMENTS", "tf32")
    env = ops.moments(gpu(X))
    sig_env = ops.signal_moments(gpu(X), gpu(W), gpu(b))
    np.testing.assert_allclose(to_numpy(arg.m2), to_numpy(env.m2), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(to_numpy(sig_arg.sum_xz), to_numpy(sig_env.sum_xz), rtol=1e-12, atol=1e-9)
    assert not np.array_equal(to_numpy(arg.m2), to_numpy(exact.m2))  # TF32 rounding shows
    with pytest.raises(ValueError, match="precision"):
        ops.moments(gpu(X), precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        ops.signal_moments(gpu(X), gpu(W), gpu(b), precision="bf16")


def test_cuda_assign_refuses_rows_whose_float32_squares_overflow(torch, rng):
    """A row with norm 3e19 would count as a zero row in the CUDA kernels (float32 squares):
    refused with check_finite (centroids too); 1e19 is assigned as on the CPU."""
    C = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    X = np.array([[3e19, 4e19], [1.0, 0.0]], np.float32)
    with pytest.raises(ValueError, match="X has rows with norms beyond about 1.8e\\+19"):
        ops.assign(gpu(X), gpu(C))
    with pytest.raises(ValueError, match="C has rows with norms beyond"):
        ops.assign(gpu(X[1:]), gpu(C * np.float32(1e20)))
    labels, scores = ops.cosine_assign(gpu(X / np.float32(5)), gpu(C))  # norm 1e19
    np.testing.assert_array_equal(to_numpy(labels), [1, 0])
    np.testing.assert_allclose(to_numpy(scores), [1, 1], rtol=1e-5)
