"""The CUDA kernels: every op on torch and cupy CUDA arrays vs the float64 reference and vs
the CPU kernels, outputs on the input's device, non-contiguous inputs, edge cases, stream
ordering (work runs on the caller's current stream), check_finite, mismatched devices and
large inputs. Skipped unless edpairs was built with CUDA and a GPU is visible."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    _ids,
    examples,
    LAYOUTS,
    SIGNAL_FIELDS,
    TOL,
    Tol,
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


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@examples(25)
@given(case=assign_cases())
def test_torch_cuda_assign_matches_reference_and_cpu(torch, dtype, case):
    X, C, _ = case
    Xg = gpu(X, "torch", dtype)
    res = ops.assign(Xg, gpu(C))
    assert_on_device(res, Xg)
    assert [str(a.dtype) for a in res] == ["torch.int64", "torch.float32", "torch.float64", "torch.int64"]
    Xr = f64(Xg)  # the values the kernel saw (rounded input)
    check_assignment(res, Xr, C, tol=TOL[dtype])
    check_duplicate_rows_agree(Xr, res.labels, res.scores)
    cpu = ops.assign(Xg.cpu(), C)
    assert_results_agree(res, cpu, Xr, C, tol=TOL[dtype])
    labels, scores = ops.cosine_assign(Xg, gpu(C))
    np.testing.assert_array_equal(to_numpy(labels), to_numpy(res.labels))
    np.testing.assert_array_equal(to_numpy(scores), to_numpy(res.scores))


@examples(25)
@given(case=assign_cases())
def test_torch_cuda_assign_options_match_reference(torch, case):
    X, C, rng = case
    N, D = X.shape
    center = rng.standard_normal(D).astype(np.float32)
    row_scale = (rng.random(N) * (rng.random(N) > 0.2)).astype(np.float32)
    col_scale = (rng.standard_normal(C.shape[0]) * 2).astype(np.float32)
    for kw in (dict(center=center), dict(row_scale=row_scale), dict(col_scale=col_scale),
               dict(center=center, row_scale=row_scale, col_scale=col_scale)):
        res = ops.assign(gpu(X), gpu(C), **{k: gpu(v) for k, v in kw.items()})
        check_assignment(res, X, C, **kw)
        cpu = ops.assign(X, C, **kw)
        assert_results_agree(res, cpu, X, C, **kw)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_cuda_moments_match_reference_and_cpu(torch, dtype, rng):
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
def test_torch_cuda_signal_moments_match_reference_and_cpu(torch, dtype, center, rng):
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
def test_torch_cuda_signal_moments_workspace_steps(torch, workspace_rows, rng):
    X, W, b, c = make_signal_data(rng, 3001, 20, 6, center=True)
    sm = ops.signal_moments(gpu(X), gpu(W), gpu(b), center=gpu(c), workspace_rows=workspace_rows)
    check_signal_moments(sm, X, W, b, center=c)


def test_torch_cuda_signal_moments_rejects_an_empty_workspace(torch, rng):
    X, W, b, _ = make_signal_data(rng, 10, 3, 2)
    with pytest.raises(ValueError, match="workspace_rows"):
        ops.signal_moments(gpu(X), gpu(W), gpu(b), workspace_rows=0)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
def test_torch_cuda_spherical_kmeans_step_and_normalize(torch, dtype, rng):
    for N, D, k in [(1, 4, 3), (300, 16, 5), (2000, 37, 70)]:
        C = make_centroids(rng, k, D, duplicates=1) * 3
        X = make_rows(rng, N, D, C=C, zero_rows=1 if N > 1 else 0)
        Xg = gpu(X, "torch", dtype)
        result = ops.spherical_kmeans_step(Xg, gpu(C))
        assert_on_device(result, Xg)
        check_kmeans_step(result, f64(Xg), C)
    sums = rng.standard_normal((6, 5))
    counts = np.array([0, 1, 2, 0, 5, 1])
    sums[4] = 0
    previous = rng.standard_normal((6, 5)).astype(np.float32)
    out = ops.normalize_centroids(gpu(sums), gpu(counts), gpu(previous))
    assert out.device.type == "cuda" and out.dtype == torch.float32
    np.testing.assert_allclose(to_numpy(out), ref.normalize_centroids(sums, counts, previous), rtol=2e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", CUPY_DTYPES)
def test_cupy_ops_match_reference_and_cpu(cupy, dtype, rng):
    C = make_centroids(rng, 20, 24, duplicates=2, zeros=1)
    X = make_rows(rng, 1500, 24, C=C, zero_rows=3, duplicate_rows=5)
    Xg = gpu(X, "cupy", dtype)
    Xr = f64(Xg)
    res = ops.assign(Xg, gpu(C, "cupy"))
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
    result = ops.spherical_kmeans_step(Xg, gpu(C, "cupy"))
    assert all(isinstance(a, cupy.ndarray) for a in result)
    check_kmeans_step(result, Xr, C)


# ---------------------------------------------------------------------------------------
# Layouts and edge cases


@pytest.mark.parametrize("layout", [lay for lay in LAYOUTS if lay != "negative_row_stride"])
def test_torch_cuda_noncontiguous_inputs(torch, layout, rng):
    C = make_centroids(rng, 9, 21)
    X = make_rows(rng, 700, 21, C=C)
    Xg = with_layout(X, layout, "torch", device=DEVICE)
    assert Xg.device.type == "cuda"
    Xv = layout_values(X, layout)
    check_assignment(ops.assign(Xg, with_layout(C, "transposed", "torch", device=DEVICE)), Xv, C)
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
    check_assignment(ops.assign(Xg, gpu(C, "cupy")), X, C)
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
def test_torch_cuda_assign_edge_cases(torch, name):
    X, C = CUDA_EDGE[name]
    tol = TOL["float32"] if X.shape[1] <= 512 else Tol(score=3e-5, margin=3e-4, sums=1e-5)
    res = ops.assign(gpu(X), gpu(C))
    check_assignment(res, X, C, tol=tol)
    check_duplicate_rows_agree(X, res.labels, res.scores)
    assert_results_agree(res, ops.assign(X, C), X, C, tol=tol)


@pytest.mark.parametrize("op", ["assign", "cosine_assign", "moments", "signal_moments", "spherical_kmeans_step"])
def test_torch_cuda_no_rows(torch, op):
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


def test_torch_cuda_outputs_are_overwritten_not_accumulated(torch, rng):
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


def test_torch_cuda_moments_update_and_merge(torch, rng):
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


def test_torch_ops_run_on_the_current_stream(torch, rng):
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
        out = (ops.assign(Xg, Cg, check_finite=False), ops.moments(Xg, check_finite=False),
               ops.signal_moments(Xsg, Wg, bg, center=cg, check_finite=False),
               ops.spherical_kmeans_step(Xg, Cg, check_finite=False))
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
        out = (ops.assign(Xg, Cg, check_finite=False), ops.moments(Xg, check_finite=False),
               ops.signal_moments(Xsg, Wg, bg, center=cg, check_finite=False),
               ops.spherical_kmeans_step(Xg, Cg, check_finite=False))
    s.synchronize()
    cupy.cuda.Device().synchronize()
    _check_stream_results(out, X, C, Xs, W, b, c)


# ---------------------------------------------------------------------------------------
# Errors on CUDA


def test_check_finite_on_cuda_raises(torch, rng):
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


def test_cupy_with_numpy_parameters(cupy, rng):
    """A numpy C next to a cupy X: either a clear ValueError naming the device or a correct result."""
    X = make_rows(rng, 20, 4)
    C = make_centroids(rng, 3, 4)
    try:
        res = ops.assign(gpu(X, "cupy"), C)
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
def test_torch_cuda_large_assign(torch):
    rng = np.random.default_rng(2024)
    C = make_centroids(rng, 100, 64, duplicates=3, zeros=1)
    X = make_rows(rng, 300_000, 64, C=C, zero_rows=50, duplicate_rows=100)
    res = ops.assign(gpu(X), gpu(C))
    check_assignment(res, X, C)
    assert to_numpy(res.counts).sum() == 300_000
    res16 = ops.assign(gpu(X, dtype="float16"), gpu(C))
    check_assignment(res16, f64(gpu(X, dtype="float16")), C, tol=TOL["float16"])


@pytest.mark.slow
def test_torch_cuda_large_moments_and_signal_moments(torch):
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
def test_torch_cuda_large_kmeans_step(torch):
    rng = np.random.default_rng(2026)
    C = make_centroids(rng, 100, 64)
    X = make_rows(rng, 300_000, 64, C=C)
    check_kmeans_step(ops.spherical_kmeans_step(gpu(X), gpu(C)), X, C)
