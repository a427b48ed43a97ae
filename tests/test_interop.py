"""Array-library interop on the CPU: outputs come back in the input's library and device with
the documented dtypes; numpy parameters mix with torch data (and the other way round)."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import as_lib, check_assignment, check_moments, check_signal_moments, library_of, make_centroids, make_rows, make_signal_data, to_numpy

from edpairs import ops

torch = pytest.importorskip("torch")

# (op name, callable on (X, C-like params) in a library, expected {output: (dtype, shape)})
N, D, K, I = 37, 6, 5, 3


def _inputs(lib, rng):
    X = make_rows(rng, N, D)
    C = make_centroids(rng, K, D)
    W = rng.standard_normal((D, I)).astype(np.float32)
    b = rng.standard_normal(I).astype(np.float32)
    return X, C, W, b


def _outputs(lib, X, C, W, b):
    """Every op's outputs, by name, for inputs already in their libraries."""
    res = ops.assign(X, C)
    labels, scores = ops.cosine_assign(X, C)
    cents, klabels, kcounts = ops.spherical_kmeans_step(X, C)
    m = ops.moments(X)
    sm = ops.signal_moments(X, W, b)
    return {
        "assign.labels": (res.labels, "int64", (N,)),
        "assign.scores": (res.scores, "float32", (N,)),
        "assign.sums": (res.sums, "float64", (K, D)),
        "assign.counts": (res.counts, "int64", (K,)),
        "cosine_assign.labels": (labels, "int64", (N,)),
        "cosine_assign.scores": (scores, "float32", (N,)),
        "kmeans.centroids": (cents, "float32", (K, D)),
        "kmeans.labels": (klabels, "int64", (N,)),
        "kmeans.counts": (kcounts, "int64", (K,)),
        "normalize_centroids": (ops.normalize_centroids(res.sums, res.counts, C), "float32", (K, D)),
        "moments.mean": (m.mean, "float64", (D,)),
        "moments.m2": (m.m2, "float64", (D, D)),
        "signal.count": (sm.count, "int64", (I,)),
        "signal.sum_x": (sm.sum_x, "float64", (I, D)),
        "signal.sum_z": (sm.sum_z, "float64", (I,)),
        "signal.sum_zz": (sm.sum_zz, "float64", (I,)),
        "signal.sum_xz": (sm.sum_xz, "float64", (I, D)),
    }


@pytest.mark.parametrize("xdtype", ["float32", "float64", "float16"])
def test_outputs_are_in_the_input_library_with_documented_dtypes(xp, rng, xdtype):
    X, C, W, b = _inputs(xp, rng)
    outs = _outputs(xp, as_lib(X, xp, xdtype), as_lib(C, xp), as_lib(W, xp), as_lib(b, xp))
    for name, (arr, dtype, shape) in outs.items():
        assert library_of(arr) == xp, f"{name}: {type(arr)} for {xp} input"
        assert str(arr.dtype).replace("torch.", "") == dtype, f"{name}: dtype {arr.dtype}, expected {dtype}"
        assert tuple(arr.shape) == shape, f"{name}: shape {tuple(arr.shape)}, expected {shape}"
        if xp == "torch":
            assert arr.device.type == "cpu"
            assert not arr.requires_grad


def test_torch_bfloat16_outputs(rng):
    X, C, W, b = _inputs("torch", rng)
    outs = _outputs("torch", as_lib(X, "torch", "bfloat16"), torch.from_numpy(C), torch.from_numpy(W), torch.from_numpy(b))
    for name, (arr, dtype, shape) in outs.items():
        assert isinstance(arr, torch.Tensor) and str(arr.dtype) == f"torch.{dtype}", (name, arr.dtype)


@pytest.mark.parametrize("x_lib,param_lib", [("torch", "numpy"), ("numpy", "torch")])
def test_mixing_numpy_and_torch_parameters_on_cpu(rng, x_lib, param_lib):
    """The outputs follow X's library; parameters may come from the other library."""
    X, C, W, b = _inputs(x_lib, rng)
    Xs, Ws, bs, c = make_signal_data(rng, 200, D, I, center=True)
    Xl = as_lib(X, x_lib)
    center = rng.standard_normal(D).astype(np.float32)
    r = rng.random(N).astype(np.float32)
    s = rng.random(K).astype(np.float32) + 0.5
    res = ops.assign(Xl, as_lib(C, param_lib), center=as_lib(center, param_lib), row_scale=as_lib(r, param_lib),
                     col_scale=as_lib(s, param_lib))
    assert all(library_of(a) == x_lib for a in res)
    check_assignment(res, X, C, center=center, row_scale=r, col_scale=s)
    m = ops.moments(Xl)
    check_moments(m, X)
    sm = ops.signal_moments(as_lib(Xs, x_lib), as_lib(Ws, param_lib), as_lib(bs, param_lib),
                            center=as_lib(c, param_lib))
    assert library_of(sm.sum_x) == x_lib
    check_signal_moments(sm, Xs, Ws, bs, center=c)
    cents, labels, counts = ops.spherical_kmeans_step(Xl, as_lib(C, param_lib))
    assert library_of(cents) == library_of(labels) == library_of(counts) == x_lib
    out = ops.normalize_centroids(as_lib(to_numpy(res.sums), x_lib), as_lib(to_numpy(res.counts), param_lib),
                                  as_lib(C, param_lib))
    assert library_of(out) == x_lib


def test_numpy_rows_take_torch_bfloat16_parameters(rng):
    """numpy has no bfloat16: a torch bfloat16 C next to numpy X comes in as float32 (it raised
    a TypeError from .numpy())."""
    X, C, _, _ = _inputs("numpy", rng)
    Cb = torch.from_numpy(C).bfloat16()
    res = ops.assign(X, Cb)
    np.testing.assert_array_equal(res.labels, ops.assign(X, Cb.float().numpy()).labels)


def test_nan_row_scale_is_named_as_nan(rng):
    """A NaN in row_scale gets the NaN / Inf message, not "must be >= 0" (NaN is not below 0)."""
    X, C, _, _ = _inputs("numpy", rng)
    r = np.ones(len(X), np.float32)
    r[3] = np.nan
    with pytest.raises(ValueError, match="row_scale contains NaN"):
        ops.assign(X, C, row_scale=r)
    r[3] = -1
    with pytest.raises(ValueError, match="row_scale must be >= 0"):
        ops.assign(X, C, row_scale=r)


def test_python_sequences_are_accepted_as_numpy(rng):
    X, C, _, _ = _inputs("numpy", rng)
    labels, scores = ops.cosine_assign(X.tolist(), C.tolist())
    assert isinstance(labels, np.ndarray)
    np.testing.assert_array_equal(labels, ops.cosine_assign(X.astype(np.float64), C)[0])


def test_torch_input_memory_is_not_modified(rng):
    X, C, W, b = _inputs("torch", rng)
    Xt, Ct = torch.from_numpy(X.copy()), torch.from_numpy(C.copy())
    ops.assign(Xt, Ct)
    ops.spherical_kmeans_step(Xt, Ct)
    ops.moments(Xt)
    ops.signal_moments(Xt, torch.from_numpy(W), torch.from_numpy(b))
    np.testing.assert_array_equal(Xt.numpy(), X)
    np.testing.assert_array_equal(Ct.numpy(), C)


def test_torch_and_numpy_give_identical_results(rng):
    X, C, W, b = _inputs("numpy", rng)
    a = _outputs("numpy", X, C, W, b)
    t = _outputs("torch", torch.from_numpy(X), torch.from_numpy(C), torch.from_numpy(W), torch.from_numpy(b))
    for name in a:
        np.testing.assert_array_equal(to_numpy(t[name][0]), a[name][0], err_msg=name)


def test_host_float64_copies_keep_float64_and_large_counts():
    """to_numpy64 (how the estimators bring sums and counts home): torch float64 and int64 values
    arrive exactly (it once went through float32: 1 + 2^-40 became 1, 2^25 + 1 became 2^25),
    bfloat16 as its float value, always as a copy."""
    from edpairs._arrays import to_numpy64

    got = to_numpy64(torch.tensor([1 + 2.0**-40, -3.5], dtype=torch.float64))
    assert got.dtype == np.float64 and got[0] == 1 + 2.0**-40 and got[1] == -3.5
    assert to_numpy64(torch.tensor([2**25 + 1], dtype=torch.int64))[0] == 2**25 + 1
    assert to_numpy64(torch.tensor([1.5, 256.0], dtype=torch.bfloat16)).tolist() == [1.5, 256.0]
    assert to_numpy64(np.array([7], np.int32)).dtype == np.float64
    t = torch.zeros(3, dtype=torch.float64)
    host = to_numpy64(t)
    t += 1  # the host copy does not share the tensor's memory
    assert host.tolist() == [0.0, 0.0, 0.0]


def test_numpy_arrays_dlpack_cannot_carry_are_copied(rng, monkeypatch):
    """A field of a structured array (row strides not a multiple of the item size), and a
    read-only array under a numpy that cannot export one (before 2.1, e.g. a store's memory
    map), give the results of a plain copy instead of a BufferError (a reviewer's finding)."""
    rec = np.zeros(300, dtype=[("a", np.float32, (5,)), ("b", np.int8)])
    rec["a"] = rng.standard_normal((300, 5))
    X = rec["a"]
    assert X.strides[0] % X.itemsize != 0
    want = ops.moments(np.ascontiguousarray(X))
    np.testing.assert_array_equal(ops.moments(X).m2, want.m2)
    C = rng.standard_normal((4, 5)).astype(np.float32)
    np.testing.assert_array_equal(ops.assign(X, C).labels, ops.assign(np.ascontiguousarray(X), C).labels)

    import edpairs._arrays as arrays

    real = arrays._numpy_capsule

    def old_numpy(x):  # numpy < 2.1 refuses to export a read-only array
        if not x.flags.writeable:
            raise BufferError("Cannot export readonly array since signalling readonly is unsupported by DLPack")
        return real(x)

    monkeypatch.setattr(arrays, "_numpy_capsule", old_numpy)
    ro = np.ascontiguousarray(X)
    ro.setflags(write=False)
    np.testing.assert_array_equal(ops.moments(ro).m2, want.m2)


def test_pinned_staging_sizes(monkeypatch):
    """GPU copies are staged in pinned memory from PINNED_MIN_BYTES to PINNED_MAX_BYTES (torch's
    allocator keeps its pinned blocks for the process's life); where pinned memory cannot be
    had, the pageable copy (None here)."""
    torch = pytest.importorskip("torch")
    from edpairs import _arrays

    asked = []
    real = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: asked.append(k.get("pin_memory")) or real(*a))
    for numel, staged in ((2**18 - 1, False), (2**18, True), (2**24, True), (2**24 + 1, False)):  # float32
        block = _arrays._pinned_block(torch.zeros(numel))
        assert (block is not None) == staged and (block is None or tuple(block.shape) == (numel,)), numel
    assert asked == [True, True]

    def no_pinned(*a, **k):
        raise RuntimeError("pinned memory: out of memory (a test)")

    monkeypatch.setattr(torch, "empty", no_pinned)
    assert _arrays._pinned_block(torch.zeros(2**20)) is None
