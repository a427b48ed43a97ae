"""normalize_centroids and spherical_kmeans_step against the reference: unit rows, empty
clusters keep their previous (normalised) centroid, counts add up to N."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    examples,
    as_lib,
    check_kmeans_step,
    f64,
    library_of,
    make_centroids,
    make_rows,
    to_numpy,
)
from hypothesis import given
from hypothesis import strategies as st

from edpairs import ops
from edpairs import reference as ref

# ---------------------------------------------------------------------------------------
# normalize_centroids


def _normalize_case(rng, k, D):
    sums = rng.standard_normal((k, D)) * 10.0 ** rng.integers(-3, 4, size=(k, 1))
    counts = rng.integers(0, 5, size=k).astype(np.int64)
    sums[rng.random(k) < 0.2] = 0  # degenerate: counted rows but a zero sum
    previous = rng.standard_normal((k, D)).astype(np.float32) * 3  # deliberately not unit
    return sums, counts, previous


@examples(30)
@given(k=st.integers(1, 40), D=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
def test_normalize_centroids_matches_reference(xp, k, D, seed):
    sums, counts, previous = _normalize_case(np.random.default_rng(seed), k, D)
    out = ops.normalize_centroids(as_lib(sums, xp), as_lib(counts, xp), as_lib(previous, xp))
    assert library_of(out) == xp
    got = to_numpy(out)
    assert got.dtype == np.float32 and got.shape == (k, D)
    want = ref.normalize_centroids(sums, counts, previous)
    np.testing.assert_allclose(got, want, rtol=2e-7, atol=1e-7)
    live = (counts > 0) & (np.linalg.norm(sums, axis=1) > 0)
    np.testing.assert_allclose(np.linalg.norm(got[live].astype(np.float64), axis=1), 1.0, atol=1e-6)
    # Empty or degenerate clusters: previous, bit for bit (not re-normalised).
    np.testing.assert_array_equal(got[~live], previous[~live])


def test_normalize_centroids_table(xp):
    sums = np.array([[3.0, 4.0], [3.0, 4.0], [0.0, 0.0], [1e-30, 0.0], [-2.0, 0.0]])
    counts = np.array([2, 0, 5, 1, 1])
    previous = np.array([[9, 9], [0.5, 0.5], [7, -7], [1, 2], [0, 0]], np.float32)
    out = to_numpy(ops.normalize_centroids(as_lib(sums, xp), as_lib(counts, xp), as_lib(previous, xp)))
    want = np.array([[0.6, 0.8], [0.5, 0.5], [7, -7], [1, 0], [-1, 0]], np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-7, atol=0)


@pytest.mark.parametrize("scale", [1e300, 1e200, 1e155, 1e-155, 1e-200, 1e-310])
def test_normalize_centroids_at_extreme_magnitudes(xp, scale):
    # s.s overflows past ~1e154 and underflows below ~1e-154: the rows must still come out
    # unit (they came out zero, inexact, or as `previous`).
    sums = np.array([[3.0, 4.0, 0.0], [0.0, -1.0, 0.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0]]) * scale
    counts = np.array([2, 1, 4, 3])
    previous = np.full((4, 3), 7.0, np.float32)
    out = to_numpy(ops.normalize_centroids(as_lib(sums, xp), as_lib(counts, xp), as_lib(previous, xp)))
    want = np.array([[0.6, 0.8, 0], [0, -1, 0], [1 / 3, 2 / 3, 2 / 3], [7, 7, 7]], np.float32)
    np.testing.assert_allclose(out, want, rtol=1e-7, atol=0)
    np.testing.assert_allclose(ref.normalize_centroids(sums, counts, previous), want, rtol=1e-7, atol=0)


def test_normalize_centroids_keeps_previous_for_non_finite_sums(xp):
    sums = np.array([[np.inf, 1.0], [np.nan, 1.0], [1.0, 1.0]])
    previous = np.array([[1, 0], [0, 1], [5, 5]], np.float32)
    out = to_numpy(ops.normalize_centroids(as_lib(sums, xp), as_lib(np.array([1, 1, 1]), xp), as_lib(previous, xp),
                                           check_finite=False))
    np.testing.assert_array_equal(out[:2], previous[:2])
    np.testing.assert_allclose(out[2], [2**-0.5, 2**-0.5], rtol=1e-7)


def test_normalize_centroids_accepts_float32_sums_and_int32_counts(xp, rng):
    sums, counts, previous = _normalize_case(rng, 6, 5)
    out = ops.normalize_centroids(as_lib(sums.astype(np.float32), xp), as_lib(counts.astype(np.int32), xp),
                                  as_lib(previous.astype(np.float64), xp))
    want = ref.normalize_centroids(sums.astype(np.float32), counts, previous)
    np.testing.assert_allclose(to_numpy(out), want, rtol=2e-7, atol=1e-7)


# ---------------------------------------------------------------------------------------
# spherical_kmeans_step


def test_members_that_cancel_keep_the_previous_centroid():
    """Two rows of opposite sign (D = 1): their unit vectors cancel exactly, but in float32
    x * (1 / |x|) can be 1 - 2^-24 and -1, and the normalised rounding noise pointed the other
    way (a hypothesis case). A sum within CANCELLED x count of zero keeps the previous centroid;
    a cluster with a clear sum still moves."""
    X = np.array([[2.5744267], [-0.41306356]], np.float32)
    C = np.array([[0.94526696]], np.float32)
    cents, labels, counts = ops.spherical_kmeans_step(X, C)
    assert cents.tolist() == [[1.0]] and counts.tolist() == [2]
    X3 = np.array([[1.0, 0.0], [-1.0, 1e-3], [0.0, 1.0]], np.float32)
    cents, _, _ = ops.spherical_kmeans_step(X3, np.array([[1.0, 1.0]], np.float32))
    np.testing.assert_allclose(cents, [[0.0, 1.0]], atol=1e-3)


@examples(30)
@given(N=st.integers(1, 150), D=st.integers(1, 24), k=st.integers(1, 30), seed=st.integers(0, 2**32 - 1),
       dups=st.integers(0, 2), zero_rows=st.integers(0, 2))
def test_spherical_kmeans_step_matches_reference(xp, N, D, k, seed, dups, zero_rows):
    rng = np.random.default_rng(seed)
    C = make_centroids(rng, k, D, duplicates=dups) * 5  # not unit: the step normalises
    X = make_rows(rng, N, D, C=C, zero_rows=zero_rows)
    result = ops.spherical_kmeans_step(as_lib(X, xp), as_lib(C, xp))
    assert all(library_of(a) == xp for a in result)
    check_kmeans_step(result, X, C)


def test_empty_cluster_keeps_previous_centroid_normalised(xp, rng):
    D = 6
    X = (np.abs(rng.standard_normal((200, D))) + 0.1).astype(np.float32)  # positive orthant
    C = make_centroids(rng, 5, D)
    C[:2] = np.abs(C[:2]) + 0.1  # these attract everything
    C[2] = -5 * np.ones(D)  # far from all data: cosine < 0 with every row, never chosen
    C[3] = -np.abs(C[3]) - 0.1
    C[4] = C[0]  # exact duplicate of centroid 0: loses every tie, stays empty
    centroids, labels, counts = (to_numpy(a) for a in ops.spherical_kmeans_step(as_lib(X, xp), as_lib(C, xp)))
    assert counts[2] == 0 and counts[3] == 0 and counts[4] == 0, counts
    assert counts.sum() == 200
    for j in (2, 3, 4):
        np.testing.assert_allclose(centroids[j], C[j] / np.linalg.norm(f64(C[j])), rtol=1e-6, atol=1e-7)
    check_kmeans_step((centroids, labels, counts), X, C)


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_an_empty_clusters_centroid_keeps_its_direction_at_any_magnitude(xp, rng, scale):
    """Centroids whose float32 squares overflow (1e20) or underflow (1e-20): an empty cluster's
    centroid comes back as its unit direction, as the reference has it (its squares overflowed
    and it came back as zeros)."""
    X = rng.standard_normal((2, 8)).astype(np.float32)
    C = (rng.standard_normal((4, 8)) * scale).astype(np.float32)
    centroids, labels, counts = (to_numpy(a) for a in ops.spherical_kmeans_step(as_lib(X, xp), as_lib(C, xp)))
    want, _, want_counts = ref.spherical_kmeans_step(X, C)
    np.testing.assert_array_equal(counts, want_counts)
    assert (counts == 0).any()
    np.testing.assert_allclose(centroids, want, rtol=1e-6, atol=1e-6)


def test_zero_centroid_stays_zero_when_empty(xp, rng):
    X = (np.abs(rng.standard_normal((50, 4))) + 0.1).astype(np.float32)
    C = np.stack([np.ones(4), np.zeros(4), -np.ones(4)]).astype(np.float32)
    centroids, labels, counts = (to_numpy(a) for a in ops.spherical_kmeans_step(as_lib(X, xp), as_lib(C, xp)))
    np.testing.assert_array_equal(counts, [50, 0, 0])
    np.testing.assert_array_equal(centroids[1], 0)
    assert not np.isnan(centroids).any()
    np.testing.assert_allclose(centroids[2], -0.5, rtol=1e-6)


def test_spherical_kmeans_step_zero_rows_count_in_cluster_0(xp, rng):
    C = make_centroids(rng, 3, 5)
    X = make_rows(rng, 30, 5, C=C)
    X[[4, 9]] = 0
    centroids, labels, counts = ops.spherical_kmeans_step(as_lib(X, xp), as_lib(C, xp))
    assert (to_numpy(labels)[[4, 9]] == 0).all()
    check_kmeans_step((centroids, labels, counts), X, C)


def test_spherical_kmeans_step_iterates_to_a_fixed_point(xp, rng):
    """Repeated steps on well-separated blobs converge; every step stays consistent."""
    D, k = 8, 4
    centers = make_centroids(rng, k, D)
    X = np.concatenate([c + 0.05 * rng.standard_normal((100, D)) for c in centers]).astype(np.float32)
    C = (centers + 0.3 * rng.standard_normal((k, D))).astype(np.float32)
    Cx = as_lib(C, xp)
    for _ in range(6):
        result = ops.spherical_kmeans_step(as_lib(X, xp), Cx)
        check_kmeans_step(result, X, to_numpy(Cx))
        Cx = result[0]
    labels = to_numpy(result[1])
    np.testing.assert_array_equal(np.sort(np.bincount(labels, minlength=k)), [100] * k)


def test_spherical_kmeans_step_no_rows(xp):
    C = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    centroids, labels, counts = ops.spherical_kmeans_step(as_lib(np.zeros((0, 2), np.float32), xp), as_lib(C, xp))
    np.testing.assert_array_equal(to_numpy(counts), [0, 0])
    assert to_numpy(labels).shape == (0,)
    np.testing.assert_allclose(to_numpy(centroids), [[0.6, 0.8], [0, 0]], rtol=1e-7)


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_spherical_kmeans_step_input_dtypes(xp, dtype, rng):
    C = make_centroids(rng, 5, 7)
    X = as_lib(make_rows(rng, 120, 7, C=C), xp, dtype)
    check_kmeans_step(ops.spherical_kmeans_step(X, as_lib(C, xp)), f64(X), C)
