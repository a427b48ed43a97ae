"""edpairs.metrics: IoU, Hungarian matching, cosines (in and out of a span), latent RMSE and
the recovery report, on hand-made cases and on the ground truth of a synthetic layer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edpairs import metrics, synthetic


@pytest.fixture(scope="module")
def layer():
    return synthetic.published(3000, seed=21, train_head=False)


def test_iou_exact_values():
    true = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 0]], dtype=bool)
    pred = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=bool)
    m = metrics.iou(pred, true)
    assert m.shape == (3, 2)
    # pred0 = {0,2,4}, pred1 = {2,3}, pred2 = {}; true0 = {0,1,2}, true1 = {2,3}
    np.testing.assert_allclose(m, [[2 / 4, 1 / 4], [1 / 4, 1.0], [0.0, 0.0]])
    # 0/1 integers are accepted; scores are refused.
    np.testing.assert_allclose(metrics.iou(pred.astype(np.int8), true.astype(float)), m)
    with pytest.raises(ValueError, match="threshold"):
        metrics.iou(pred * 0.7, true)
    with pytest.raises(ValueError, match="rows"):
        metrics.iou(pred[:4], true)
    # Both empty: 0, not NaN.
    assert metrics.iou(np.zeros((3, 1), bool), np.zeros((3, 1), bool))[0, 0] == 0.0


def test_hungarian_recovers_a_permutation(rng):
    N, I = 500, 5
    labels = rng.integers(0, I, size=N)
    true = np.eye(I, dtype=bool)[labels]
    perm = np.array([3, 0, 4, 1, 2])
    pred = true[:, perm].copy()  # detector k detects true concept perm[k]
    pred[:10] = ~pred[:10]        # some noise
    out = metrics.match_detectors(pred, true)
    np.testing.assert_array_equal(out["cols"], np.arange(I))
    np.testing.assert_array_equal(perm[out["rows"]], np.arange(I))
    assert np.all(out["iou"] > 0.9) and out["iou"].shape == (I,)
    assert out["mean_iou"] == pytest.approx(out["iou"].mean())
    np.testing.assert_allclose(out["iou"], out["matrix"][out["rows"], out["cols"]])


def test_hungarian_is_global_not_greedy():
    # Greedy (take 0.9 first) would give 0.9 + 0.0; the optimum pairs 0.8 + 0.8.
    score = np.array([[0.9, 0.8], [0.8, 0.0]])
    rows, cols = metrics.match(score)
    np.testing.assert_array_equal(cols, [0, 1])
    np.testing.assert_array_equal(rows, [1, 0])
    # Rectangular: more estimates than concepts, and fewer.
    rows, cols = metrics.match(np.array([[0.1, 0.2], [0.9, 0.1], [0.2, 0.7]]))
    np.testing.assert_array_equal(rows, [1, 2])
    np.testing.assert_array_equal(cols, [0, 1])
    rows, cols = metrics.match(np.array([[0.1, 0.9, 0.3]]))
    np.testing.assert_array_equal(rows, [0])
    np.testing.assert_array_equal(cols, [1])
    with pytest.raises(ValueError, match="finite"):
        metrics.match(np.array([[np.nan, 1.0]]))


def test_match_detectors_counts_missing_concepts_as_zero():
    true = np.eye(3, dtype=bool)[[0, 1, 2, 0, 1, 2]]
    out = metrics.match_detectors(true[:, :2], true)
    np.testing.assert_array_equal(out["cols"], [0, 1])
    np.testing.assert_allclose(out["iou"], [1.0, 1.0])
    assert out["mean_iou"] == pytest.approx(2 / 3)


def test_cosines_with_and_without_span(rng):
    D = 10
    true = rng.standard_normal((3, D))
    c = metrics.cosines(true, true, absolute=False)
    np.testing.assert_allclose(np.diag(c), 1.0)
    unit = true / np.linalg.norm(true, axis=1, keepdims=True)
    np.testing.assert_allclose(c, unit @ unit.T)
    np.testing.assert_allclose(metrics.cosines(-2 * true, true, absolute=False), -c)
    np.testing.assert_allclose(metrics.cosines(-2 * true, true), np.abs(c))

    # A span containing the true directions; add components outside it to the estimate.
    basis = np.linalg.qr(np.vstack([true, rng.standard_normal((2, D))]).T)[0].T  # (5, D)
    outside = rng.standard_normal((3, D))
    outside -= outside @ basis.T @ basis
    est = true + 3.0 * outside
    assert np.all(np.diag(metrics.cosines(est, true)) < 0.9)
    np.testing.assert_allclose(np.diag(metrics.cosines(est, true, span=basis)), 1.0)
    # Any basis of the span gives the same answer (it is orthonormalised), even redundant ones.
    mixed = rng.standard_normal((7, 5)) @ basis
    np.testing.assert_allclose(metrics.cosines(est, true, span=mixed, absolute=False),
                               metrics.cosines(est, true, span=basis, absolute=False), atol=1e-10)
    # A direction orthogonal to the span (or zero) has cosine 0, not NaN.
    z = metrics.cosines(np.vstack([outside[:1], np.zeros((1, D))]), true, span=basis)
    np.testing.assert_array_equal(z, 0.0)
    with pytest.raises(ValueError, match="dimension"):
        metrics.cosines(true[:, :5], true)


def test_data_span(rng):
    D, r = 12, 4
    B = np.linalg.qr(rng.standard_normal((D, r)))[0].T
    X = rng.standard_normal((2000, r)) @ B + 7.0  # centred data spans exactly B
    span = metrics.data_span(X)
    assert span.shape == (r, D)
    np.testing.assert_allclose(span @ span.T, np.eye(r), atol=1e-10)
    np.testing.assert_allclose(span.T @ span, B.T @ B, atol=1e-8)  # same projector
    # From a covariance, from Moments-like objects, and from float32 data.
    cov = np.cov(X, rowvar=False)
    np.testing.assert_allclose(metrics.data_span(cov).T @ metrics.data_span(cov), B.T @ B, atol=1e-8)
    np.testing.assert_allclose(metrics.data_span(X.astype(np.float32)).T @ metrics.data_span(X.astype(np.float32)),
                               B.T @ B, atol=1e-6)
    import edpairs

    m = edpairs.ops.moments(X.astype(np.float32))
    assert metrics.data_span(m).shape == (r, D)
    # Constant data spans nothing.
    assert metrics.data_span(np.ones((5, 3))).shape == (0, 3)


def test_latent_rmse(rng):
    a = rng.standard_normal((100, 3))
    assert metrics.latent_rmse(a, a) == 0.0
    # A constant shift is not an error (centred comparison); a scale change is.
    assert metrics.latent_rmse(a + 5.0, a) == pytest.approx(0.0, abs=1e-12)
    assert metrics.latent_rmse(a + 5.0, a, center=False) == pytest.approx(5.0)
    e = rng.standard_normal((100, 3))
    e -= e.mean(axis=0)
    assert metrics.latent_rmse(a + e, a) == pytest.approx(np.sqrt(np.mean(e ** 2)))
    # Matched pairs: estimate columns (2, 0) against true columns (0, 1).
    est = np.stack([a[:, 1], np.zeros(100), a[:, 0]], axis=1)
    assert metrics.latent_rmse(est, a, rows=[2, 0], cols=[0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.latent_rmse(est, a, rows=[1, 0], cols=[0, 1]) > 0.5
    with pytest.raises(ValueError, match="rows and cols"):
        metrics.latent_rmse(est, a, rows=[0])


def test_recovery_of_the_truth_is_perfect(layer):
    det = (layer.X.astype(np.float64) @ layer.W.T - layer.b) > 0
    out = metrics.recovery(layer, decoding=layer.W, encoding=layer.S, detections=det, latent=layer.alpha)
    assert out["matched_by"] == "iou"
    np.testing.assert_array_equal(out["rows"], [0, 1, 2])
    np.testing.assert_array_equal(out["cols"], [0, 1, 2])
    np.testing.assert_allclose(out["iou"], 1.0)
    np.testing.assert_allclose(out["cos_encoding"], 1.0)
    np.testing.assert_allclose(out["cos_decoding"], 1.0)
    np.testing.assert_allclose(out["latent_rmse"], 0.0, atol=1e-12)
    assert out["mean_iou"] == 1.0 and out["mean_latent_rmse"] == pytest.approx(0.0, abs=1e-12)
    assert out["mean_cos_encoding"] == pytest.approx(1.0) and out["mean_cos_decoding"] == pytest.approx(1.0)
    assert out["unmatched"].size == 0
    # Latents are compared centred: a constant shift (absorbed by the offset) is no error.
    shifted = metrics.recovery(layer, encoding=layer.S, latent=layer.alpha + 3.0)
    np.testing.assert_allclose(shifted["latent_rmse"], 0.0, atol=1e-12)
    scaled = metrics.recovery(layer, encoding=layer.S, latent=layer.alpha * 1.1)
    assert np.all(scaled["latent_rmse"] > 0.05)


def test_recovery_matches_permuted_and_penalises_flipped(layer):
    perm = np.array([2, 0, 1])
    sign = np.array([1.0, -1.0, 1.0])
    W = layer.W[perm] * sign[:, None]
    S = layer.S[perm] * sign[:, None]
    det = ((layer.X.astype(np.float64) @ layer.W.T - layer.b) > 0)[:, perm]
    lat = layer.alpha[:, perm] * sign
    for kwargs in (dict(detections=det), dict(encoding=S), dict(decoding=W)):
        out = metrics.recovery(layer, decoding=W, encoding=S, latent=lat,
                               **({} if "detections" not in kwargs else kwargs))
        np.testing.assert_array_equal(perm[out["rows"]], [0, 1, 2])
    out = metrics.recovery(layer, decoding=W, encoding=S, detections=det, latent=lat)
    assert out["matched_by"] == "iou"
    # True concept 0 is estimate 1, which is flipped: signed cosines -1, and its latent is wrong.
    np.testing.assert_allclose(out["cos_encoding"], [-1.0, 1.0, 1.0])
    np.testing.assert_allclose(out["cos_decoding"], [-1.0, 1.0, 1.0])
    assert out["mean_cos_encoding"] == pytest.approx(1 / 3)
    assert out["latent_rmse"][0] > 1.0 and np.allclose(out["latent_rmse"][1:], 0.0, atol=1e-12)
    assert out["mean_latent_rmse"] == pytest.approx(out["latent_rmse"][0] / np.sqrt(3))
    assert metrics.recovery(layer, encoding=S)["matched_by"] == "encoding"
    assert metrics.recovery(layer, decoding=W)["matched_by"] == "decoding"
    # A forced criterion, and a given matching.
    assert metrics.recovery(layer, encoding=S, decoding=W, match_by="decoding")["matched_by"] == "decoding"
    given = metrics.recovery(layer, encoding=S, match_by=([0, 1, 2], [0, 1, 2]))
    assert given["matched_by"] == "given" and given["mean_cos_encoding"] < 0.9


def test_recovery_decoding_cosine_ignores_components_outside_the_data(layer):
    span = metrics.data_span(layer.X)
    assert span.shape == (5, 16)  # I + F = 5 directions; the offset is removed by centring
    null = np.linalg.svd(span, full_matrices=True)[2][5:]  # orthogonal complement
    W = layer.W + 4.0 * null[:3]
    out = metrics.recovery(layer, decoding=W)
    np.testing.assert_allclose(out["cos_decoding"], 1.0, atol=1e-9)
    assert np.all(np.diag(metrics.cosines(W, layer.W)) < 0.9)
    # A wrong filter inside the span is penalised.
    W2 = layer.W.copy()
    W2[0] = layer.W[0] + 0.5 * layer.distractors[0] @ span.T @ span
    assert metrics.recovery(layer, decoding=W2)["cos_decoding"][0] < 0.99


def test_recovery_with_fewer_estimates(layer):
    det = ((layer.X.astype(np.float64) @ layer.W.T - layer.b) > 0)[:, [2, 0]]
    out = metrics.recovery(layer, encoding=layer.S[[2, 0]], detections=det)
    np.testing.assert_array_equal(out["cols"], [0, 2])
    np.testing.assert_array_equal(out["rows"], [1, 0])
    np.testing.assert_array_equal(out["unmatched"], [1])
    assert np.isnan(out["iou"][1]) and out["iou"][0] == 1.0
    assert out["mean_iou"] == pytest.approx(2 / 3)
    assert out["cos_decoding"] is None and out["latent_rmse"] is None


def test_recovery_checks_arguments(layer):
    with pytest.raises(ValueError, match="at least one"):
        metrics.recovery(layer)
    with pytest.raises(ValueError, match="disagree"):
        metrics.recovery(layer, encoding=layer.S, decoding=layer.W[:2])
    with pytest.raises(ValueError, match="detections"):
        metrics.recovery(layer, detections=layer.membership[:10])
    with pytest.raises(ValueError, match="match_by"):
        metrics.recovery(layer, encoding=layer.S, match_by="nearest")
    with pytest.raises(ValueError, match="match_by"):
        metrics.recovery(layer, encoding=layer.S, match_by="decoding")
    with pytest.raises(ValueError, match="match_by"):
        metrics.recovery(layer, encoding=layer.S, match_by=([0, 1], [0, 5]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs_are_refused_not_scored_as_zero(layer, rng, bad):
    x = rng.standard_normal((2, 4))
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"est must be finite, got 1 NaN or Inf"):
        metrics.cosines(x, np.eye(4))
    with pytest.raises(ValueError, match="true must be finite"):
        metrics.cosines(np.eye(4), x)
    with pytest.raises(ValueError, match="span must be finite"):  # not an SVD that does not converge
        metrics.cosines(np.eye(4), np.eye(4), span=x)
    with pytest.raises(ValueError, match="encoding must be finite"):
        metrics.recovery(layer, encoding=np.full_like(layer.S, bad))
    with pytest.raises(ValueError, match="decoding must be finite"):
        metrics.recovery(layer, decoding=np.where(np.eye(*layer.W.shape, dtype=bool), bad, layer.W))
    with pytest.raises(ValueError, match="latent must be finite"):
        metrics.recovery(layer, encoding=layer.S, latent=np.full(layer.alpha.shape, bad))
    with pytest.raises(ValueError, match="alpha_hat must be finite"):
        metrics.latent_rmse(x, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="alpha_true must be finite"):
        metrics.latent_rmse(np.zeros((2, 4)), x)


def test_latent_rmse_checks_rows_cols_and_dimensions(rng):
    a = rng.standard_normal((50, 3))
    for rows in ([-1], [3], [0, 5]):
        with pytest.raises(ValueError, match=r"rows must lie in \[0, 3\) \(3 columns in alpha_hat\)"):
            metrics.latent_rmse(a, a, rows=rows, cols=[0] * len(rows))
    with pytest.raises(ValueError, match=r"cols must lie in \[0, 2\) \(2 columns in alpha_true\)"):
        metrics.latent_rmse(a, a[:, :2], rows=[0], cols=[-1])
    with pytest.raises(ValueError, match="rows must be integer indices, got dtype float64"):
        metrics.latent_rmse(a, a, rows=[0.5], cols=[0])
    with pytest.raises(ValueError, match=r"same length, got 2 and 1"):
        metrics.latent_rmse(a, a, rows=[0, 1], cols=[0])
    with pytest.raises(ValueError, match=r"alpha_hat must be \(N,\) or 2-D \(N, I\).*\(50, 3, 1\)"):
        metrics.latent_rmse(a[:, :, None], a)
    with pytest.raises(ValueError, match=r"alpha_true must be \(N,\) or 2-D"):
        metrics.latent_rmse(a, a[:, :, None])
    assert metrics.latent_rmse(a[:, 1], a, rows=[0], cols=[1]) == 0.0  # (N,) is one column


def test_recovery_checks_the_given_matching_and_the_layer(layer):
    with pytest.raises(ValueError, match=r"match_by: rows and cols must have the same length, got 3 and 2"):
        metrics.recovery(layer, encoding=layer.S, match_by=([0, 1, 2], [0, 1]))
    with pytest.raises(ValueError, match=r"match_by rows must lie in \[0, 3\) \(3 estimated concepts\)"):
        metrics.recovery(layer, encoding=layer.S, match_by=([0, -1], [0, 1]))
    with pytest.raises(ValueError, match=r"match_by cols must lie in \[0, 3\) \(3 true concepts in layer\)"):
        metrics.recovery(layer, encoding=layer.S, match_by=([0, 1], [0, 3]))
    with pytest.raises(TypeError, match="layer must be an edpairs.synthetic.SyntheticLayer .*got NoneType"):
        metrics.recovery(None, encoding=layer.S)
    with pytest.raises(TypeError, match="without membership"):
        metrics.recovery(SimpleNamespace(X=layer.X, S=layer.S), detections=layer.membership)


def test_recovery_accepts_torch(layer):
    torch = pytest.importorskip("torch")
    out = metrics.recovery(layer, encoding=torch.from_numpy(layer.S).float(),
                           detections=torch.from_numpy(layer.membership))
    np.testing.assert_allclose(out["cos_encoding"], 1.0, atol=1e-6)
    np.testing.assert_allclose(out["iou"], 1.0)


def test_directions_of_any_magnitude_and_not_real_numbers(layer):
    """A direction scored against itself has cosine 1 at any magnitude (rows of 1e300 or
    1e-170 gave 0: their squares overflowed or underflowed), with a span too; complex or text
    inputs are refused by name (complex lost its imaginary part with a warning); a match_by
    list of three is named, not an unhashable-type error."""
    S = layer.S
    span = metrics.data_span(layer.X)
    for scale in (1e300, 1e-170):
        np.testing.assert_allclose(metrics.cosines(S * scale, S).diagonal(), 1, rtol=1e-12)
        np.testing.assert_allclose(metrics.cosines(S * scale, S, span=span).diagonal(), 1, rtol=1e-9)
    with pytest.raises(ValueError, match="est must be a real array, got dtype complex128"):
        metrics.cosines(S.astype(complex) * 1j, S)
    with pytest.raises(ValueError, match="alpha_hat must be a numeric array, got dtype <U1"):
        metrics.latent_rmse("x", np.zeros(3))
    with pytest.raises(ValueError, match=r"match_by must be 'iou', 'encoding', 'decoding' or \(rows, cols\), got \[0, 1, 2\]"):
        metrics.recovery(layer, encoding=S, match_by=[0, 1, 2])
