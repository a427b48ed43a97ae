"""moments / Moments: mean and centred scatter vs the float64 reference, precision with a
large offset, chunked update / merge equal to one pass, and the small-N edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _helpers import (
    LAYOUTS,
    as_lib,
    assert_scatter_close,
    check_moments,
    examples,
    f64,
    layout_values,
    library_of,
    to_numpy,
    with_layout,
)
from hypothesis import given
from hypothesis import strategies as st

from edpairs import ops
from edpairs import reference as ref
from edpairs.ops import Moments


def _data(rng, N, D, offset=0.0, dtype=np.float32):
    # Correlated columns with different scales, so the scatter has real off-diagonal structure.
    A = rng.standard_normal((D, D)) * 10.0 ** rng.uniform(-1, 1, size=(1, D))
    return (offset + rng.standard_normal((N, D)) @ A).astype(dtype)


@examples(30)
@given(N=st.one_of(st.sampled_from([1, 2, 511, 512, 513]), st.integers(1, 1200)),
       D=st.one_of(st.sampled_from([1, 2, 6, 16, 97, 129]), st.integers(1, 40)), seed=st.integers(0, 2**32 - 1))
def test_moments_match_reference(xp, N, D, seed):
    X = _data(np.random.default_rng(seed), N, D)
    m = ops.moments(as_lib(X, xp))
    assert isinstance(m, Moments)
    assert library_of(m.mean) == xp and library_of(m.m2) == xp
    assert to_numpy(m.mean).dtype == np.float64 and to_numpy(m.m2).dtype == np.float64
    check_moments(m, X)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_moments_keep_precision_with_a_large_offset(xp, rng, offset):
    """float32 values offset + N(0, 1): a naive float32 E[x^2] - E[x]^2 would lose every digit
    of the variance; the kernel centres first and must stay within 1e-5 of the reference."""
    X = (offset + rng.standard_normal((4000, 7))).astype(np.float32)
    m = ops.moments(as_lib(X, xp))
    check_moments(m, X, rtol=1e-5)
    np.testing.assert_allclose(np.diag(to_numpy(m.m2)) / 3999, 1.0, rtol=0.1)  # unit variances


@pytest.mark.parametrize("offset", [1e4, 1e9])
def test_float64_moments_are_centred_before_the_float32_rounding(xp, rng, offset):
    """float64 offset + N(0, 1): rounding to float32 first would keep nothing of the spread at
    1e9 (ulp 64); the rows are centred in float64 first, so the float32 products see values of
    order 1 and the scatter is as exact as without the offset."""
    noise = rng.standard_normal((3000, 6))
    noise[:, 1] *= 1e-3  # a column whose spread is a thousandth of the others'
    X = offset + noise
    m = ops.moments(as_lib(X, xp))
    check_moments(m, X, rtol=1e-6)
    exact_mean = np.array([math.fsum(column) for column in X.T]) / len(X)
    assert np.all(np.abs(to_numpy(m.mean) - exact_mean) <= 1e-6 * X.std(0) + 2 * np.spacing(offset))


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_moments_input_dtypes(xp, rng, dtype):
    if dtype == "bfloat16" and xp == "numpy":
        pytest.skip("numpy has no bfloat16")
    Xin = as_lib(_data(rng, 700, 9), xp, dtype)
    check_moments(ops.moments(Xin), f64(Xin))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moments_noncontiguous(xp, rng, layout):
    X = _data(rng, 300, 11)
    Xin = with_layout(X, layout, xp)
    if Xin is None:
        pytest.skip(f"{xp} cannot express layout {layout}")
    check_moments(ops.moments(Xin), layout_values(X, layout))


def test_moments_single_row(xp, rng):
    X = _data(rng, 1, 5)
    m = ops.moments(as_lib(X, xp))
    assert m.n == 1
    np.testing.assert_allclose(to_numpy(m.mean), X[0].astype(np.float64), rtol=1e-12)
    np.testing.assert_array_equal(to_numpy(m.m2), np.zeros((5, 5)))
    with pytest.raises(ValueError, match="n=1"):
        m.cov
    np.testing.assert_array_equal(to_numpy(m.covariance(ddof=0)), np.zeros((5, 5)))


def test_moments_single_column(xp, rng):
    X = _data(rng, 1000, 1, offset=50.0)
    m = ops.moments(as_lib(X, xp))
    check_moments(m, X)
    np.testing.assert_allclose(to_numpy(m.cov)[0, 0], np.var(f64(X), ddof=1), rtol=1e-5)


def test_moments_constant_columns_have_zero_scatter(xp):
    X = np.tile(np.array([[3.0, -1.5, 1e3]], np.float32), (700, 1))
    m = ops.moments(as_lib(X, xp))
    np.testing.assert_array_equal(to_numpy(m.m2), 0.0)
    np.testing.assert_array_equal(to_numpy(m.mean), X[0].astype(np.float64))


def test_moments_no_rows(xp):
    m = ops.moments(as_lib(np.zeros((0, 4), np.float32), xp))
    assert m.n == 0
    with pytest.raises(ValueError):
        m.cov


def test_moments_cov_and_covariance(xp, rng):
    X = _data(rng, 200, 4)
    m = ops.moments(as_lib(X, xp))
    np.testing.assert_allclose(to_numpy(m.cov), np.cov(f64(X), rowvar=False), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(to_numpy(m.covariance(ddof=0)), np.cov(f64(X), rowvar=False, ddof=0),
                               rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------
# Streaming: update / merge

MERGE_RTOL = 5e-6  # merged chunks vs one pass (both float32 block sums, see below)


@examples(30)
@given(N=st.integers(1, 1500), D=st.integers(1, 20), cuts=st.lists(st.integers(0, 1500), max_size=6),
       seed=st.integers(0, 2**32 - 1), offset=st.sampled_from([0.0, 100.0]))
def test_chunked_update_equals_one_pass(xp, N, D, cuts, seed, offset):
    X = _data(np.random.default_rng(seed), N, D, offset=offset)
    bounds = sorted({0, N, *[c % (N + 1) for c in cuts]})  # may include empty chunks
    state = Moments()
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert state.update(as_lib(X[a:b], xp)) is state
    one = ops.moments(as_lib(X, xp))
    assert state.n == one.n == N
    # Both are float32 products summed over blocks of <= 512 rows, merged in float64; the
    # blocks differ, so they agree to the float32 accumulation error: ~sqrt(512) * 2^-24 ~ 1.3e-6
    # of the scatter scale per evaluation, hence 5e-6 between two ...
    np.testing.assert_allclose(to_numpy(state.mean), to_numpy(one.mean), rtol=1e-12, atol=1e-12 * (1 + offset))
    assert_scatter_close(to_numpy(state.m2), to_numpy(one.m2), rtol=MERGE_RTOL, atol=1e-9)
    # ... and both match the float64 reference.
    check_moments(state, X)
    check_moments(one, X)


@examples(25)
@given(N=st.integers(2, 800), D=st.integers(1, 12), seed=st.integers(0, 2**32 - 1))
def test_merge_of_parts_equals_one_pass_in_any_order(xp, N, D, seed):
    rng = np.random.default_rng(seed)
    X = _data(rng, N, D)
    cut1, cut2 = sorted(rng.integers(1, N, size=2))
    parts = [ops.moments(as_lib(X[a:b], xp)) for a, b in [(0, cut1), (cut1, cut2), (cut2, N)] if b > a]
    left = parts[0]
    for p in parts[1:]:
        left = left.merge(p)
    right = parts[-1]
    for p in reversed(parts[:-1]):
        right = p.merge(right)
    one = ops.moments(as_lib(X, xp))
    for merged in (left, right):
        assert merged.n == N
        assert_scatter_close(to_numpy(merged.m2), to_numpy(one.m2), rtol=MERGE_RTOL)
        check_moments(merged, X)


def test_merge_with_empty_moments(xp, rng):
    X = _data(rng, 50, 3)
    m = ops.moments(as_lib(X, xp))
    empty_from_data = ops.moments(as_lib(X[:0], xp))
    for merged in (m.merge(Moments()), Moments().merge(m), m.merge(empty_from_data), empty_from_data.merge(m)):
        assert merged.n == 50
        np.testing.assert_array_equal(to_numpy(merged.mean), to_numpy(m.mean))
        np.testing.assert_array_equal(to_numpy(merged.m2), to_numpy(m.m2))
    assert Moments().merge(Moments()).n == 0


def test_merge_does_not_modify_its_operands(xp, rng):
    a, b = ops.moments(as_lib(_data(rng, 30, 3), xp)), ops.moments(as_lib(_data(rng, 20, 3), xp))
    a_mean, a_m2 = to_numpy(a.mean).copy(), to_numpy(a.m2).copy()
    a.merge(b)
    assert a.n == 30
    np.testing.assert_array_equal(to_numpy(a.mean), a_mean)
    np.testing.assert_array_equal(to_numpy(a.m2), a_m2)


def test_merge_mismatched_columns_raises(xp, rng):
    a, b = ops.moments(as_lib(_data(rng, 10, 3), xp)), ops.moments(as_lib(_data(rng, 10, 4), xp))
    with pytest.raises(ValueError, match="3 and 4 columns"):
        a.merge(b)
    with pytest.raises(ValueError):
        a.update(as_lib(_data(rng, 5, 4), xp))


def test_merge_with_a_non_moments_raises_type_error(rng):
    m = ops.moments(_data(rng, 10, 3))
    with pytest.raises(TypeError, match="Moments"):
        m.merge((10, None, None))


def test_moments_many_rows_match_reference(xp, rng):
    """Several float32 superblocks of 512 rows and more than one macro-tile of columns."""
    X = _data(rng, 5000, 130, offset=3.0)
    check_moments(ops.moments(as_lib(X, xp)), X)
    n, mean, m2 = ref.moments(X)
    assert n == 5000
