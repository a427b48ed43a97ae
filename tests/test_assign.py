"""assign / cosine_assign (CPU kernels) against the float64 reference, over numpy and torch
inputs, every input dtype and memory layout, the scale/center options and the edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    _ids,
    examples,
    LAYOUTS,
    TOL,
    Tol,
    as_lib,
    assign_cases,
    check_assignment,
    check_duplicate_rows_agree,
    check_labels_scores,
    f64,
    layout_values,
    library_of,
    make_centroids,
    make_rows,
    to_numpy,
    with_layout,
)
from hypothesis import given
from hypothesis import strategies as st

from edpairs import ops

# ---------------------------------------------------------------------------------------
# Property tests against the reference


@examples(40)
@given(case=assign_cases())
def test_assign_matches_reference(xp, case):
    X, C, _ = case
    res = ops.assign(as_lib(X, xp), as_lib(C, xp))
    check_assignment(res, X, C)
    check_duplicate_rows_agree(X, res.labels, res.scores)


@examples(30)
@given(case=assign_cases())
def test_cosine_assign_equals_assign_and_reference(xp, case):
    X, C, _ = case
    labels, scores = ops.cosine_assign(as_lib(X, xp), as_lib(C, xp))
    check_labels_scores(labels, scores, X, C)
    full = ops.assign(as_lib(X, xp), as_lib(C, xp))
    np.testing.assert_array_equal(to_numpy(labels), to_numpy(full.labels))
    np.testing.assert_array_equal(to_numpy(scores), to_numpy(full.scores))


@examples(30)
@given(case=assign_cases(), use_center=st.booleans(), use_row=st.booleans(), use_col=st.booleans(),
       accumulate=st.booleans())
def test_assign_options_match_reference(xp, case, use_center, use_row, use_col, accumulate):
    X, C, rng = case
    N, D = X.shape
    k = C.shape[0]
    center = rng.standard_normal(D).astype(np.float32) if use_center else None
    # Some zero row scales (those rows must behave as zero rows), the rest positive.
    row_scale = (rng.random(N) * (rng.random(N) > 0.2)).astype(np.float32) if use_row else None
    # Column scales of both signs: scores are r s x.c, not cosines any more.
    col_scale = (rng.standard_normal(k) * 2).astype(np.float32) if use_col else None
    res = ops.assign(as_lib(X, xp), as_lib(C, xp), center=as_lib(center, xp), row_scale=as_lib(row_scale, xp),
                     col_scale=as_lib(col_scale, xp), accumulate=accumulate)
    kw = dict(center=center, row_scale=row_scale, col_scale=col_scale)
    if accumulate:
        check_assignment(res, X, C, **kw)
    else:
        assert res.sums is None and res.counts is None
        check_labels_scores(res.labels, res.scores, X, C, **kw)
    if row_scale is not None:
        dead = row_scale == 0
        assert np.all(to_numpy(res.labels)[dead] == 0)
        assert np.all(to_numpy(res.scores)[dead] == 0)


INPUT_DTYPES = [("numpy", "float64"), ("numpy", "float16"), ("torch", "float64"), ("torch", "float16"),
                ("torch", "bfloat16")]


@pytest.mark.parametrize("lib,dtype", INPUT_DTYPES, ids=[f"{a}-{b}" for a, b in INPUT_DTYPES])
@examples(25)
@given(case=assign_cases())
def test_assign_input_dtypes_match_reference_on_rounded_input(lib, dtype, case):
    if lib == "torch":
        pytest.importorskip("torch")
    X, C, _ = case
    Xin = as_lib(X, lib, dtype)
    res = ops.assign(Xin, as_lib(C, lib))
    # The reference sees exactly the values the kernel was given (the rounded input).
    Xr = f64(Xin)
    check_assignment(res, Xr, C, tol=TOL[dtype])
    check_duplicate_rows_agree(Xr, res.labels, res.scores)


@pytest.mark.parametrize("layout", LAYOUTS)
@examples(25)
@given(case=assign_cases())
def test_assign_noncontiguous_inputs(xp, layout, case):
    X, C, _ = case
    Xin = with_layout(X, layout, xp)
    if Xin is None:
        pytest.skip(f"{xp} cannot express layout {layout}")
    Xv = layout_values(X, layout)
    np.testing.assert_array_equal(to_numpy(Xin), Xv)
    res = ops.assign(Xin, as_lib(C, xp))
    check_assignment(res, Xv, C)
    # The same values, contiguous: bit-identical labels and scores.
    base = ops.assign(as_lib(np.ascontiguousarray(Xv), xp), as_lib(C, xp))
    np.testing.assert_array_equal(to_numpy(res.labels), to_numpy(base.labels))
    np.testing.assert_array_equal(to_numpy(res.scores), to_numpy(base.scores))


@pytest.mark.parametrize("layout", ["transposed", "row_stride", "col_stride", "negative_row_stride"])
def test_assign_noncontiguous_centroids_and_params(xp, layout, rng):
    X = make_rows(rng, 60, 9)
    C = make_centroids(rng, 7, 9)
    Cin = with_layout(C, layout, xp)
    if Cin is None:
        pytest.skip(f"{xp} cannot express layout {layout}")
    center = with_layout(rng.standard_normal((1, 9)).astype(np.float32), "col_stride", xp)[0]
    res = ops.assign(as_lib(X, xp), Cin, center=center)
    check_assignment(res, X, C, center=f64(center))


def test_torch_transpose_view_input(rng):
    torch = pytest.importorskip("torch")
    base = torch.from_numpy(rng.standard_normal((11, 90)).astype(np.float32))  # (D, N)
    X = base.t()
    assert not X.is_contiguous()
    C = make_centroids(rng, 6, 11)
    res = ops.assign(X, C)
    check_assignment(res, X.numpy(), C)


def test_torch_requires_grad_input_is_accepted(rng):
    torch = pytest.importorskip("torch")
    X = make_rows(rng, 30, 5)
    C = make_centroids(rng, 3, 5)
    Xt = torch.from_numpy(X).requires_grad_(True)
    res = ops.assign(Xt * 1.0, torch.from_numpy(C).requires_grad_(True))
    check_assignment(res, X, C)


# ---------------------------------------------------------------------------------------
# Edge cases, table-driven


def _edge_cases():
    rng = np.random.default_rng(1234)
    cases = {}
    C = make_centroids(rng, 4, 6)
    cases["N=1"] = (make_rows(rng, 1, 6, C=C), C)
    cases["k=1"] = (make_rows(rng, 40, 6), make_centroids(rng, 1, 6))
    cases["D=1"] = (make_rows(rng, 40, 1), make_centroids(rng, 5, 1))
    cases["N=1,k=1,D=1"] = (np.array([[2.5]], np.float32), np.array([[-1.0]], np.float32))
    cases["k>N"] = (make_rows(rng, 3, 8), make_centroids(rng, 50, 8))
    cases["all rows zero"] = (np.zeros((10, 4), np.float32), make_centroids(rng, 3, 4))
    cases["all centroids zero"] = (make_rows(rng, 10, 4), np.zeros((3, 4), np.float32))
    cases["all centroids identical"] = (make_rows(rng, 30, 4), np.repeat(make_centroids(rng, 1, 4), 6, 0))
    cases["all rows identical"] = (np.repeat(make_rows(rng, 1, 7), 100, 0), make_centroids(rng, 5, 7))
    cases["D>512 (depth chunks)"] = (make_rows(rng, 50, 1100), make_centroids(rng, 5, 1100))
    cases["k>1024 (score tiles)"] = (make_rows(rng, 40, 12), make_centroids(rng, 1500, 12, duplicates=20))
    cases["many row blocks"] = (make_rows(rng, 3000, 20, zero_rows=30, duplicate_rows=30),
                                make_centroids(rng, 33, 20, duplicates=3, zeros=1))
    cases["huge and tiny magnitudes"] = (make_rows(rng, 30, 5) * np.float32(1e15),
                                         make_centroids(rng, 4, 5) * np.float32(1e-15))
    return cases


EDGE_CASES = _edge_cases()


@pytest.mark.parametrize("name", list(EDGE_CASES), ids=_ids(EDGE_CASES))
def test_assign_edge_cases(xp, name):
    X, C = EDGE_CASES[name]
    # Long dot products (D > 512) accumulate more float32 rounding.
    tol = TOL["float32"] if X.shape[1] <= 512 else Tol(score=3e-5, margin=3e-4, sums=1e-5)
    res = ops.assign(as_lib(X, xp), as_lib(C, xp))
    check_assignment(res, X, C, tol=tol)
    check_duplicate_rows_agree(X, res.labels, res.scores)


def test_duplicate_centroids_lowest_index_wins(xp, rng):
    a, b = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
    C = np.stack([b * 0.5 - a, a, b, a, b, a])  # a at 1, 3, 5; b at 2, 4
    X = np.concatenate([a + 0.01 * rng.standard_normal((20, 6)), b + 0.01 * rng.standard_normal((20, 6)),
                        np.tile(a, (3, 1)), np.tile(b, (3, 1))]).astype(np.float32)
    labels, scores = ops.cosine_assign(as_lib(X, xp), as_lib(C, xp))
    labels = to_numpy(labels)
    assert set(labels.tolist()) <= {0, 1, 2}, labels
    expected = np.argmax(f64(X) @ f64(C).T / np.linalg.norm(f64(C), axis=1), axis=1)
    np.testing.assert_array_equal(labels, expected)
    # Rows exactly equal to a centroid score 1 (float32 cosine of a vector with itself).
    np.testing.assert_allclose(to_numpy(scores)[40:], 1.0, atol=1e-6)


def test_duplicate_centroids_across_score_tiles(xp, rng):
    """A centroid repeated at index 3 and far beyond the first tile of 1024 centroids."""
    C = make_centroids(rng, 2100, 5)
    C[1500] = C[3]
    C[2099] = C[3]
    X = (C[3] + 1e-3 * rng.standard_normal((25, 5))).astype(np.float32)
    labels, _ = ops.cosine_assign(as_lib(X, xp), as_lib(C, xp))
    assert not np.isin(to_numpy(labels), [1500, 2099]).any(), to_numpy(labels)
    check_labels_scores(*ops.cosine_assign(as_lib(X, xp), as_lib(C, xp)), X, C)


def test_duplicate_rows_get_same_label(xp, rng):
    C = make_centroids(rng, 9, 8)
    X = make_rows(rng, 400, 8, C=C)
    X[200:] = X[:200]  # every row twice, in different row blocks
    res = ops.assign(as_lib(X, xp), as_lib(C, xp))
    labels, scores = to_numpy(res.labels), to_numpy(res.scores)
    np.testing.assert_array_equal(labels[:200], labels[200:])
    np.testing.assert_array_equal(scores[:200], scores[200:])


def test_zero_rows_label_0_score_0_counted_in_cluster_0_and_add_nothing(xp, rng):
    C = make_centroids(rng, 4, 6)
    C[0] = -C[1]  # make cluster 0 unattractive for the rows near centroid 1
    X = make_rows(rng, 50, 6, C=C)
    zero_at = [0, 7, 8, 49]
    Xz = X.copy()
    Xz[zero_at] = 0
    res = ops.assign(as_lib(Xz, xp), as_lib(C, xp))
    labels, scores = to_numpy(res.labels), to_numpy(res.scores)
    assert np.all(labels[zero_at] == 0)
    assert np.all(scores[zero_at] == 0)
    assert not np.isnan(scores).any() and not np.isnan(to_numpy(res.sums)).any()
    # Without the zero rows: the same sums, and counts[0] smaller by exactly their number.
    keep = np.setdiff1d(np.arange(50), zero_at)
    res2 = ops.assign(as_lib(Xz[keep], xp), as_lib(C, xp))
    np.testing.assert_array_equal(labels[keep], to_numpy(res2.labels))
    np.testing.assert_allclose(to_numpy(res.sums), to_numpy(res2.sums), rtol=1e-12, atol=1e-12)
    expected_counts = to_numpy(res2.counts).copy()
    expected_counts[0] += len(zero_at)
    np.testing.assert_array_equal(to_numpy(res.counts), expected_counts)
    check_assignment(res, Xz, C)


def test_rows_and_centroids_below_float32s_normal_range_count_as_zero(rng):
    """A row or centroid of norm ~3e-40 (subnormal float32 values: 1 / norm is beyond float32)
    behaves exactly as a zero one, as on CUDA where its squares underflow; it once gave an
    infinite score and non-finite sums."""
    C = make_centroids(rng, 4, 8)
    X = make_rows(rng, 60, 8, C=C)
    tiny, zero = X.copy(), X.copy()
    tiny[[0, 7]] = np.float32(1e-40) * np.sign(X[[0, 7]])
    zero[[0, 7]] = 0
    got, want = ops.assign(tiny, C), ops.assign(zero, C)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    Ct, Cz = C.copy(), C.copy()
    Ct[2], Cz[2] = np.float32(1e-40), 0
    got, want = ops.assign(X, Ct), ops.assign(X, Cz)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.scores, want.scores)


def test_zero_centroid_scores_zero_and_wins_only_against_negative_scores(xp, rng):
    D = 5
    c = np.abs(rng.standard_normal(D)).astype(np.float32) + 0.1
    C = np.stack([c, np.zeros(D), np.zeros(D), -c]).astype(np.float32)
    Xneg = -np.abs(rng.standard_normal((10, D))).astype(np.float32) - 0.1  # cos(x, c) < 0 < cos(x, -c)
    Xpos = np.abs(rng.standard_normal((10, D))).astype(np.float32) + 0.1   # cos(x, c) > 0 > cos(x, -c)
    labels, scores = ops.cosine_assign(as_lib(np.concatenate([Xneg, Xpos]), xp), as_lib(C, xp))
    labels, scores = to_numpy(labels), to_numpy(scores)
    np.testing.assert_array_equal(labels[:10], 3)
    np.testing.assert_array_equal(labels[10:], 0)
    # Every non-zero centroid scores below 0: the lowest-indexed zero centroid wins, score 0.
    C2 = np.stack([np.zeros(D), np.zeros(D), c]).astype(np.float32)
    labels2, scores2 = ops.cosine_assign(as_lib(Xneg, xp), as_lib(C2, xp))
    np.testing.assert_array_equal(to_numpy(labels2), 0)
    np.testing.assert_array_equal(to_numpy(scores2), 0)
    C3 = np.stack([c, np.zeros(D), np.zeros(D)]).astype(np.float32)
    labels3, scores3 = ops.cosine_assign(as_lib(Xneg, xp), as_lib(C3, xp))
    np.testing.assert_array_equal(to_numpy(labels3), 1)
    np.testing.assert_array_equal(to_numpy(scores3), 0)


def test_center_equal_to_a_row_makes_it_a_zero_row(xp, rng):
    C = make_centroids(rng, 5, 7)
    X = make_rows(rng, 20, 7, C=C)
    center = X[6].copy()
    res = ops.assign(as_lib(X, xp), as_lib(C, xp), center=as_lib(center, xp))
    assert to_numpy(res.labels)[6] == 0 and to_numpy(res.scores)[6] == 0
    check_assignment(res, X, C, center=center)


def test_row_scale_scales_scores_and_sums_not_labels(xp, rng):
    C = make_centroids(rng, 6, 10)
    X = make_rows(rng, 80, 10, C=C)
    r = (rng.random(80) * 3 + 0.1).astype(np.float32)
    plain = ops.assign(as_lib(X, xp), as_lib(C, xp))
    scaled = ops.assign(as_lib(X, xp), as_lib(C, xp), row_scale=as_lib(r, xp))
    check_assignment(scaled, X, C, row_scale=r)
    np.testing.assert_array_equal(to_numpy(scaled.labels), to_numpy(plain.labels))
    # With r_n = 1/||x_n|| explicitly, the result is the default one.
    inv = (1.0 / np.linalg.norm(f64(X), axis=1)).astype(np.float32)
    explicit = ops.assign(as_lib(X, xp), as_lib(C, xp), row_scale=as_lib(inv, xp))
    np.testing.assert_array_equal(to_numpy(explicit.labels), to_numpy(plain.labels))
    np.testing.assert_allclose(to_numpy(explicit.scores), to_numpy(plain.scores), atol=1e-6)
    np.testing.assert_allclose(to_numpy(explicit.sums), to_numpy(plain.sums), rtol=1e-5, atol=1e-6)


def test_col_scale_changes_the_winner(xp, rng):
    D = 4
    C = np.eye(D, dtype=np.float32)[:2] * np.array([[1.0], [10.0]], np.float32)  # norms 1 and 10
    X = np.array([[1.0, 0.9, 0, 0]], np.float32)
    # Cosine: e0 wins (1 > 0.9). With col_scale = 1 (raw dot): 10 * 0.9 = 9 > 1, centroid 1 wins.
    lab, _ = ops.cosine_assign(as_lib(X, xp), as_lib(C, xp))
    assert to_numpy(lab).tolist() == [0]
    lab, sc = ops.cosine_assign(as_lib(X, xp), as_lib(C, xp), col_scale=as_lib(np.ones(2, np.float32), xp))
    assert to_numpy(lab).tolist() == [1]
    np.testing.assert_allclose(to_numpy(sc), 9.0 / np.linalg.norm(X), rtol=1e-6)


def test_assign_accumulate_false_returns_no_sums(xp, rng):
    X, C = make_rows(rng, 30, 4), make_centroids(rng, 3, 4)
    res = ops.assign(as_lib(X, xp), as_lib(C, xp), accumulate=False)
    assert res.sums is None and res.counts is None
    full = ops.assign(as_lib(X, xp), as_lib(C, xp))
    np.testing.assert_array_equal(to_numpy(res.labels), to_numpy(full.labels))


def test_assign_outputs_are_fresh_and_deterministic(xp, rng):
    """Repeated calls give the same results (outputs are written, never accumulated into)."""
    X, C = make_rows(rng, 500, 16), make_centroids(rng, 12, 16)
    first = ops.assign(as_lib(X, xp), as_lib(C, xp))
    second = ops.assign(as_lib(X, xp), as_lib(C, xp))
    np.testing.assert_array_equal(to_numpy(first.labels), to_numpy(second.labels))
    np.testing.assert_array_equal(to_numpy(first.scores), to_numpy(second.scores))
    np.testing.assert_array_equal(to_numpy(first.counts), to_numpy(second.counts))
    # Per-thread partial sums may be added in another order: equal to float64 rounding.
    np.testing.assert_allclose(to_numpy(first.sums), to_numpy(second.sums), rtol=1e-12, atol=1e-12)
    assert library_of(first.labels) == xp


@pytest.mark.parametrize("fn", ["assign", "cosine_assign"])
def test_assign_with_zero_rows_of_input(xp, fn):
    """N = 0: empty labels and scores; zero sums and counts (one entry per centroid)."""
    X = as_lib(np.zeros((0, 5), np.float32), xp)
    C = as_lib(np.ones((3, 5), np.float32), xp)
    if fn == "cosine_assign":
        labels, scores = ops.cosine_assign(X, C)
    else:
        res = ops.assign(X, C)
        labels, scores = res.labels, res.scores
        assert to_numpy(res.sums).shape == (3, 5) and not to_numpy(res.sums).any()
        assert to_numpy(res.counts).shape == (3,) and not to_numpy(res.counts).any()
        assert to_numpy(res.sums).dtype == np.float64 and to_numpy(res.counts).dtype == np.int64
    assert to_numpy(labels).shape == (0,) and to_numpy(labels).dtype == np.int64
    assert to_numpy(scores).shape == (0,) and to_numpy(scores).dtype == np.float32
    assert library_of(labels) == xp


def test_nonfinite_input_unchecked_does_not_raise(xp, rng):
    X, C = make_rows(rng, 20, 4), make_centroids(rng, 3, 4)
    X[3, 1] = np.nan
    X[5, 0] = np.inf
    res = ops.assign(as_lib(X, xp), as_lib(C, xp), check_finite=False)
    labels = to_numpy(res.labels)
    assert labels.shape == (20,) and np.all((labels >= 0) & (labels < 3))
    # Finite rows are unaffected by the bad ones.
    good = np.setdiff1d(np.arange(20), [3, 5])
    check_labels_scores(to_numpy(res.labels)[good], to_numpy(res.scores)[good], X[good], C)


def test_precision_is_ignored_on_the_cpu_and_validated(rng):
    """The CPU kernels are always exact float32: precision='tf32' (the default) and 'float32'
    give identical results; anything else is a ValueError."""
    C = make_centroids(rng, 17, 23, duplicates=2)
    X = make_rows(rng, 400, 23, C=C, zero_rows=2)
    a = ops.assign(X, C, precision="tf32")
    b = ops.assign(X, C, precision="float32")
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(ValueError, match="precision"):
        ops.assign(X, C, precision="bf16")
    with pytest.raises(ValueError, match="precision"):
        ops.spherical_kmeans_step(X, C, precision="TF32")


def test_default_precision_reads_the_environment_at_each_call(rng, monkeypatch):
    """Without precision=, float32 calls take EDPAIRS_PRECISION as it is at the call (it was
    read once at import, so a program setting it later had no effect); ops.DEFAULT_PRECISION,
    when set, wins; a bad value of either names itself; 16-bit data keeps TF32."""
    monkeypatch.setattr(ops, "DEFAULT_PRECISION", None)
    monkeypatch.delenv("EDPAIRS_PRECISION", raising=False)
    assert ops.default_precision() == "float32"
    monkeypatch.setenv("EDPAIRS_PRECISION", "tf32")
    assert ops.default_precision() == "tf32" and ops._precision(None) == "tf32"
    monkeypatch.setenv("EDPAIRS_PRECISION", "")
    assert ops.default_precision() == "float32"
    monkeypatch.setenv("EDPAIRS_PRECISION", "TF32")
    C = make_centroids(rng, 3, 4)
    X = make_rows(rng, 10, 4, C=C)
    with pytest.raises(ValueError, match="EDPAIRS_PRECISION must be one of .* got 'TF32'"):
        ops.assign(X, C)
    ops.assign(X, C, precision="float32")  # a call that names its precision does not read it
    monkeypatch.setattr(ops, "DEFAULT_PRECISION", "float32")
    assert ops.default_precision() == "float32"
    monkeypatch.setattr(ops, "DEFAULT_PRECISION", "fp32")
    with pytest.raises(ValueError, match="DEFAULT_PRECISION must be one of .* got 'fp32'"):
        ops.default_precision()
    assert ops._precision(None, np.zeros(2, np.float16)) == "tf32"


@pytest.mark.parametrize("offset", [1e4, 1e9])
def test_float64_rows_are_centred_before_the_float32_rounding(xp, rng, offset):
    """float64 rows offset + (cluster direction + noise) about a float64 centre: centred in
    float64 before the float32 kernels see them, so at 1e9 (a float32 ulp of 64) the labels,
    scores and sums are those of the float64 reference on the centred rows."""
    k, D, N = 5, 6, 900
    C = rng.standard_normal((k, D))
    truth = rng.integers(0, k, N)
    X = offset + 3 * C[truth] + 0.1 * rng.standard_normal((N, D))
    center = np.full(D, offset)
    res = ops.assign(as_lib(X, xp), as_lib(C, xp), center=as_lib(center, xp))
    check_assignment(res, X, C, center=center)
    np.testing.assert_array_equal(to_numpy(res.labels), truth)
    # Row scales slice with the blocks: against the reference with the same scales.
    r = rng.random(N)
    res = ops.assign(as_lib(X, xp), as_lib(C, xp), center=as_lib(center, xp), row_scale=as_lib(r, xp))
    check_assignment(res, X, C, center=center, row_scale=r)


def test_row_norms_beyond_the_float32_squares_are_detected(xp):
    """edpairs' CUDA kernels take norms from float32 squares: rows with norms past ~1.8e19 would
    count as zero rows there (label 0, score 0, silently), so ops.assign refuses them on CUDA
    with check_finite; the check itself, on each library: the largest magnitude settles the
    common case, the rows' float64 norms the rest (a centre included)."""
    from edpairs.ops import _largest_magnitude, _norms_fit_float32
    from edpairs._arrays import namespace_of

    X = np.ones((5, 4))
    X[3] = 1.5e19  # norm 3e19: past
    M = as_lib(X, xp)
    ns = namespace_of(M)
    assert _largest_magnitude(ns, M) == 1.5e19
    assert not _norms_fit_float32(ns, M, 1.5e19)
    X[3] = [1.7e19, 0, 0, 0]  # one big element, norm 1.7e19: fits though max * sqrt(D) does not
    M = as_lib(X, xp)
    assert _norms_fit_float32(ns, M, 1.7e19)
    assert not _norms_fit_float32(ns, M, 1.7e19, center=as_lib(np.array([-2e18, 0, 0, 0]), xp))
    X[3, 1] = np.nan
    assert np.isnan(_largest_magnitude(ns, as_lib(X, xp)))
    # On the CPU the squares are float64: such rows are assigned, not refused.
    X = np.array([[3e19, 4e19], [1.0, 0.0]])
    labels, scores = ops.cosine_assign(as_lib(X, xp), as_lib(np.array([[1.0, 0.0], [0.6, 0.8]]), xp))
    np.testing.assert_array_equal(to_numpy(labels), [1, 0])
