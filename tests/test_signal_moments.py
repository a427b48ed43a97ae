"""signal_moments / SignalMoments: the five masked statistics vs the float64 reference, with
and without a center; z == 0 is not a positive; chunked update / merge equals one pass."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    examples,
    LAYOUTS,
    SIGNAL_FIELDS,
    as_lib,
    check_signal_moments,
    f64,
    layout_values,
    library_of,
    make_signal_data,
    near_zero_rows,
    to_numpy,
    with_layout,
)
from hypothesis import given
from hypothesis import strategies as st

from edpairs import ops
from edpairs.ops import SignalMoments


@examples(30)
@given(N=st.one_of(st.sampled_from([1, 2, 71, 72, 73, 504, 505]), st.integers(1, 600)),
       D=st.one_of(st.sampled_from([1, 2, 8, 9]), st.integers(1, 40)),
       I=st.one_of(st.sampled_from([1, 8, 9, 16, 17]), st.integers(1, 20)),
       center=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_signal_moments_match_reference(xp, N, D, I, center, seed):
    X, W, b, c = make_signal_data(np.random.default_rng(seed), N, D, I, center=center)
    sm = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp), center=as_lib(c, xp))
    assert isinstance(sm, SignalMoments)
    for name in SIGNAL_FIELDS:
        assert library_of(getattr(sm, name)) == xp
    check_signal_moments(sm, X, W, b, center=c)
    # sum_z, sum_zz > 0 exactly where count > 0 (every positive has z > 0).
    count = to_numpy(sm.count)
    assert np.all((to_numpy(sm.sum_z) > 0) == (count > 0))
    assert np.all((to_numpy(sm.sum_zz) > 0) == (count > 0))


@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_center_shifts_the_sums_but_not_the_mask(xp, rng, offset):
    """center changes x~ in sum_x and sum_xz only; count, sum_z and sum_zz use the raw x."""
    X, W, b, c = make_signal_data(rng, 400, 6, 5, center=True, offset=offset)
    plain = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp))
    centred = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp), center=as_lib(c, xp))
    check_signal_moments(plain, X, W, b)
    check_signal_moments(centred, X, W, b, center=c)
    np.testing.assert_array_equal(to_numpy(plain.count), to_numpy(centred.count))
    for name in ("sum_z", "sum_zz"):
        np.testing.assert_allclose(to_numpy(centred.__getattribute__(name)), to_numpy(plain.__getattribute__(name)),
                                   rtol=1e-5)
    # sum_x(center) = sum_x - count * center.
    count = to_numpy(plain.count).astype(np.float64)
    np.testing.assert_allclose(to_numpy(centred.sum_x), to_numpy(plain.sum_x) - count[:, None] * f64(c)[None, :],
                               rtol=1e-5, atol=1e-5 * (1 + offset) * count.max())
    assert centred.center is not None and plain.center is None


def test_z_exactly_zero_is_not_positive(xp):
    """Rows with z = w.x - b exactly 0 (in float32 and float64) are not positives."""
    X = np.array([[1.0, 5.0], [2.0, -3.0], [0.5, 7.0], [1.0, 0.0], [3.0, 1.0]], np.float32)
    W = np.array([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], np.float32)  # z0 = x0 - b0, z1 = -b1, z2 = x0 - b2
    b = np.array([1.0, 0.0, 0.0], np.float32)
    sm = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp))
    # Detector 0: z = [0, 1, -0.5, 0, 2] -> rows 1 and 4. Detector 1: z = 0 for all -> none.
    # Detector 2: z = x0 > 0 for all rows.
    np.testing.assert_array_equal(to_numpy(sm.count), [2, 0, 5])
    np.testing.assert_allclose(to_numpy(sm.sum_x)[0], X[1] + X[4])
    np.testing.assert_array_equal(to_numpy(sm.sum_x)[1], 0)
    np.testing.assert_allclose(to_numpy(sm.sum_z), [3.0, 0.0, 7.5])
    np.testing.assert_allclose(to_numpy(sm.sum_zz), [5.0, 0.0, 1 + 4 + 0.25 + 1 + 9])
    np.testing.assert_allclose(to_numpy(sm.sum_xz)[0], 1 * X[1] + 2 * X[4])
    # With a center: z still uses the raw x (z = 0 exactly at x0 = 1 = b0).
    c = np.array([0.5, -1.0], np.float32)
    smc = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp), center=as_lib(c, xp))
    np.testing.assert_array_equal(to_numpy(smc.count), [2, 0, 5])
    np.testing.assert_allclose(to_numpy(smc.sum_x)[0], X[1] + X[4] - 2 * c)
    np.testing.assert_allclose(to_numpy(smc.sum_z), [3.0, 0.0, 7.5])


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_signal_moments_input_dtypes(xp, rng, dtype):
    if dtype == "bfloat16" and xp == "numpy":
        pytest.skip("numpy has no bfloat16")
    X, W, b, c = make_signal_data(rng, 500, 7, 4, center=True)
    Xin = as_lib(X, xp, dtype)
    Xr = f64(Xin)  # the reference sees the rounded input...
    keep = ~near_zero_rows(Xr, W, b, c)  # ...which may have moved a z next to 0
    Xin = as_lib(X[keep], xp, dtype)
    sm = ops.signal_moments(Xin, as_lib(W, xp), as_lib(b, xp), center=as_lib(c, xp))
    check_signal_moments(sm, f64(Xin), W, b, center=c)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_signal_moments_noncontiguous(xp, rng, layout):
    X, W, b, c = make_signal_data(rng, 200, 9, 3, center=True)
    Xin = with_layout(X, layout, xp)
    if Xin is None:
        pytest.skip(f"{xp} cannot express layout {layout}")
    Wt = with_layout(W, "transposed", xp)  # a non-contiguous W too
    sm = ops.signal_moments(Xin, Wt, as_lib(b, xp), center=as_lib(c, xp))
    check_signal_moments(sm, layout_values(X, layout), W, b, center=c)


def test_signal_moments_large_shapes(xp, rng):
    """Several superblocks of rows, more than one macro-tile over D (96) and over 2I (128)."""
    X, W, b, c = make_signal_data(rng, 1200, 100, 70, center=True)
    sm = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp), center=as_lib(c, xp))
    check_signal_moments(sm, X, W, b, center=c)


def test_signal_moments_no_rows(xp):
    W = np.ones((3, 2), np.float32)
    sm = ops.signal_moments(as_lib(np.zeros((0, 3), np.float32), xp), as_lib(W, xp), as_lib(np.zeros(2), xp))
    np.testing.assert_array_equal(to_numpy(sm.count), [0, 0])
    for name in ("sum_x", "sum_z", "sum_zz", "sum_xz"):
        assert not to_numpy(getattr(sm, name)).any()
    assert to_numpy(sm.sum_x).shape == (2, 3)


def test_signal_moments_outputs_are_fresh(xp, rng):
    """Outputs are overwritten, never accumulated into: a second call gives the same values
    (up to the float64 summation order of the per-thread partial sums)."""
    X, W, b, _ = make_signal_data(rng, 3000, 5, 3)
    first = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp))
    second = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp))
    np.testing.assert_array_equal(to_numpy(first.count), to_numpy(second.count))
    for name in ("sum_x", "sum_z", "sum_zz", "sum_xz"):
        np.testing.assert_allclose(to_numpy(getattr(first, name)), to_numpy(getattr(second, name)), rtol=1e-12,
                                   atol=1e-12)


# ---------------------------------------------------------------------------------------
# Streaming


@examples(25)
@given(N=st.integers(1, 1200), D=st.integers(1, 12), I=st.integers(1, 10), center=st.booleans(),
       cuts=st.lists(st.integers(0, 1200), max_size=5), seed=st.integers(0, 2**32 - 1))
def test_chunked_update_equals_one_pass(xp, N, D, I, center, cuts, seed):
    X, W, b, c = make_signal_data(np.random.default_rng(seed), N, D, I, center=center)
    N = len(X)
    bounds = sorted({0, N, *[v % (N + 1) for v in cuts]})
    args = (as_lib(W, xp), as_lib(b, xp))
    state = ops.signal_moments(as_lib(X[:0], xp), *args, center=as_lib(c, xp))
    for a, z in zip(bounds[:-1], bounds[1:]):
        assert state.update(as_lib(X[a:z], xp), *args) is state
    one = ops.signal_moments(as_lib(X, xp), *args, center=as_lib(c, xp))
    np.testing.assert_array_equal(to_numpy(state.count), to_numpy(one.count))
    check_signal_moments(state, X, W, b, center=c)
    check_signal_moments(one, X, W, b, center=c)
    # Chunks and one pass: float64 sums of float32 block sums, close at the float32 level.
    for name in ("sum_x", "sum_z", "sum_zz", "sum_xz"):
        got, want = to_numpy(getattr(state, name)), to_numpy(getattr(one, name))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * (np.abs(want).max() + 1))


def test_merge_adds_statistics_and_keeps_center(xp, rng):
    X, W, b, c = make_signal_data(rng, 400, 5, 4, center=True)
    args = (as_lib(W, xp), as_lib(b, xp))
    a = ops.signal_moments(as_lib(X[:150], xp), *args, center=as_lib(c, xp))
    z = ops.signal_moments(as_lib(X[150:], xp), *args, center=as_lib(c, xp))
    merged = a.merge(z)
    for name in SIGNAL_FIELDS:
        np.testing.assert_array_equal(to_numpy(getattr(merged, name)),
                                      to_numpy(getattr(a, name)) + to_numpy(getattr(z, name)))
    np.testing.assert_array_equal(to_numpy(merged.center), c)
    check_signal_moments(merged, X, W, b, center=c)
    assert to_numpy(a.count).sum() + to_numpy(z.count).sum() == to_numpy(merged.count).sum()


def test_merge_different_centers_raises(xp, rng):
    X, W, b, c = make_signal_data(rng, 50, 4, 2, center=True)
    args = (as_lib(X, xp), as_lib(W, xp), as_lib(b, xp))
    a = ops.signal_moments(*args, center=as_lib(c, xp))
    with pytest.raises(ValueError, match="different centers"):
        a.merge(ops.signal_moments(*args, center=as_lib(c + 1, xp)))
    with pytest.raises(ValueError, match="different centers"):
        a.merge(ops.signal_moments(*args))
    with pytest.raises(ValueError, match="different centers"):
        ops.signal_moments(*args).merge(a)


def test_merge_about_one_centre_object_compares_nothing(rng, monkeypatch):
    """Statistics taken about the same centre object (EDPairs' signal pass hands every chunk the
    one copy of the mean on its device) merge without comparing the centres: on a GPU that
    comparison waited for the device once per chunk. A torch centre comes through the op as
    itself; a centre that only equals it is still compared, a different one refused."""
    torch = pytest.importorskip("torch")
    X, W, b, c = make_signal_data(rng, 60, 4, 3, center=True)
    centre = torch.from_numpy(c)
    a = ops.signal_moments(torch.from_numpy(X[:30]), torch.from_numpy(W), torch.from_numpy(b), center=centre)
    z = ops.signal_moments(torch.from_numpy(X[30:]), torch.from_numpy(W), torch.from_numpy(b), center=centre)
    assert a.center is centre and z.center is centre
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__eq__", lambda self, other: pytest.fail("the centres were compared"))
        merged = a.merge(z)
    whole = ops.signal_moments(X, W, b, center=c)
    np.testing.assert_allclose(np.asarray(merged.sum_xz), whole.sum_xz, rtol=1e-5, atol=1e-5)
    plain = [ops.signal_moments(torch.from_numpy(x), torch.from_numpy(W), torch.from_numpy(b),
                                center=torch.from_numpy(c.copy())) for x in (X[:30], X[30:])]
    plain[0].merge(plain[1])  # equal centres, two objects: compared, accepted
    with pytest.raises(ValueError, match="different centers"):
        plain[0].merge(ops.signal_moments(torch.from_numpy(X[30:]), torch.from_numpy(W), torch.from_numpy(b),
                                          center=torch.from_numpy(c + 1)))


def test_merge_different_shapes_raises(xp, rng):
    X, W, b, _ = make_signal_data(rng, 50, 4, 3)
    a = ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(b, xp))
    z = ops.signal_moments(as_lib(X, xp), as_lib(W[:, :2], xp), as_lib(b[:2], xp))
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        a.merge(z)
    with pytest.raises(TypeError, match="SignalMoments"):
        a.merge(ops.moments(as_lib(X, xp)))


@pytest.mark.parametrize("offset", [1e4, 1e9])
def test_float64_rows_about_a_centre_are_centred_before_the_float32_rounding(xp, rng, offset):
    """float64 offset + N(0, 1) about a float64 centre: the rows and z = (x - c) W - (b - c W)
    are formed in float64 before the float32 kernels see them, so at 1e9 (a float32 ulp of 64)
    the masks and sums are those of the float64 reference; chunks continue about the same
    float64 centre."""
    N, D, I = 1500, 5, 4
    X = offset + rng.standard_normal((N, D))
    W = rng.standard_normal((D, I))
    c = X.mean(0)
    b = c @ W + 0.3 * rng.standard_normal(I)  # thresholds inside the cloud: about half positive
    z = (X - c) @ W - (b - c @ W)
    X = X[np.all(np.abs(z) > 1e-3, axis=1)]  # no row whose sign float32 could flip
    args = (as_lib(W, xp), as_lib(b, xp))
    sm = ops.signal_moments(as_lib(X, xp), *args, center=as_lib(c, xp))
    want = ops_reference_signal(X, W, b, c)
    np.testing.assert_array_equal(to_numpy(sm.count), want["count"])
    assert 0.2 * len(X) < want["count"].min() and want["count"].max() < 0.8 * len(X)
    for name in ("sum_x", "sum_z", "sum_zz", "sum_xz"):
        np.testing.assert_allclose(to_numpy(getattr(sm, name)), want[name], rtol=1e-5,
                                   atol=1e-5 * np.abs(want[name]).max())
    state = ops.signal_moments(as_lib(X[:700], xp), *args, center=as_lib(c, xp))
    state.update(as_lib(X[700:], xp), *args)
    np.testing.assert_array_equal(to_numpy(state.count), want["count"])
    np.testing.assert_allclose(to_numpy(state.sum_xz), want["sum_xz"], rtol=1e-5,
                               atol=1e-5 * np.abs(want["sum_xz"]).max())


def ops_reference_signal(X, W, b, c):
    """The float64 reference with z taken about c (as exact as float64 allows at any offset)."""
    Xc = X - c
    Z = Xc @ W - (b - c @ W)
    M = Z > 0
    MZ = np.where(M, Z, 0.0)
    return {"count": M.sum(0), "sum_x": M.T.astype(float) @ Xc, "sum_z": MZ.sum(0), "sum_zz": (MZ * MZ).sum(0),
            "sum_xz": MZ.T @ Xc}
