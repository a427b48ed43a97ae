"""The whitening's covariance regularisation (EDPairs(whiten_shrinkage=...), Whitener shrinkage):
the OAS closed form, the shrunk spectrum and its inverse, the rank cut kept under shrinkage,
the discriminant method on the same regularised inverse, persistence and bad settings."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edpairs as edp
from edpairs.cluster import Whitener, oas_shrinkage, resolve_shrinkage


def _spread_data(rng, n=400, D=24):
    scales = np.geomspace(10.0, 0.05, D)
    Q = np.linalg.qr(rng.standard_normal((D, D)))[0]
    return (rng.standard_normal((n, D)) * scales) @ Q.T + 3.0


@pytest.mark.parametrize("n,D", [(400, 24), (30, 50), (20000, 6)])
def test_oas_matches_scikit_learn(rng, n, D):
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    X = _spread_data(rng, n, D)
    cov = np.cov(X.T, bias=True)
    assert oas_shrinkage(n, cov) == pytest.approx(sklearn_cov.OAS().fit(X).shrinkage_, rel=1e-9)


def test_oas_limits():
    assert oas_shrinkage(1000, 2.0 * np.eye(5)) == 0.0  # already a scaled identity
    assert oas_shrinkage(1, np.diag([5.0, 1.0, 1e-3, 1e-3])) == 1.0  # one row: nothing but the target is known
    cov = np.diag(np.geomspace(1, 1e-2, 30))
    assert oas_shrinkage(10**6, cov) < oas_shrinkage(10**3, cov) < oas_shrinkage(50, cov)


def test_shrunk_whitening_is_the_inverse_square_root_of_the_shrunk_covariance(rng):
    X = _spread_data(rng)
    mean, cov = X.mean(0), np.cov(X.T, bias=True)
    D = cov.shape[0]
    for alpha in (0.0, 0.2, 1.0):
        w = Whitener.from_covariance(mean, cov, shrinkage=alpha)
        target = (1 - alpha) * cov + alpha * np.trace(cov) / D * np.eye(D)
        assert w.rank == D and w.shrinkage == alpha
        np.testing.assert_allclose(w.P @ target @ w.P.T, np.eye(D), atol=1e-9)
        np.testing.assert_allclose(w.inverse_covariance(), np.linalg.inv(target), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(w.eigenvalues, np.linalg.eigvalsh(target)[::-1], rtol=1e-10)
    # alpha = 0 is the plain whitening: Cov(z) = I on the data.
    z = Whitener.from_covariance(mean, cov, shrinkage=0.0).transform(X)
    np.testing.assert_allclose(np.cov(z.T, bias=True), np.eye(D), atol=1e-8)
    # Shrinkage bounds the gain of the weakest direction by sqrt(D / (alpha tr Cov)).
    w = Whitener.from_covariance(mean, cov, shrinkage=0.1)
    assert np.linalg.norm(w.P, 2) <= np.sqrt(D / (0.1 * np.trace(cov))) * (1 + 1e-9)
    assert np.linalg.norm(w.P, 2) < np.linalg.norm(Whitener.from_covariance(mean, cov).P, 2)


def test_oas_whitener_uses_the_closed_form(rng):
    X = _spread_data(rng, n=60, D=24)
    mean, cov = X.mean(0), np.cov(X.T, bias=True)
    w = Whitener.from_covariance(mean, cov, shrinkage="oas", n_samples=60)
    assert w.shrinkage == pytest.approx(oas_shrinkage(60, cov)) and 0 < w.shrinkage < 1
    with pytest.raises(ValueError, match="n_samples"):
        Whitener.from_covariance(mean, cov, shrinkage="oas")


def test_rank_cut_survives_shrinkage(rng):
    # Rank-5 data in 16 dimensions: the null space is dropped, not shrunk into 11 noise directions.
    X = rng.standard_normal((2000, 5)) @ rng.standard_normal((5, 16))
    mean, cov = X.mean(0), np.cov(X.T, bias=True)
    for shrinkage in (0.0, 0.5, "oas"):
        w = Whitener.from_covariance(mean, cov, shrinkage=shrinkage, n_samples=len(X))
        assert w.rank == 5, shrinkage


@pytest.mark.parametrize("bad", [-0.1, 1.5, "lw", True, [0.1]])
def test_bad_shrinkage_settings(bad, rng):
    with pytest.raises(ValueError, match="shrinkage"):
        resolve_shrinkage(bad, np.eye(3), 10)
    with pytest.raises(ValueError, match="shrinkage"):
        edp.EDPairs(2, whiten_shrinkage=bad).fit(rng.standard_normal((50, 4)).astype(np.float32))


def test_from_covariance_refuses_what_is_no_covariance(rng):
    """Shapes that do not go together, NaN or Inf, a rank cut outside [0, 1) and a negative
    n_samples are refused by name (they built a rank-0 whitener, or failed in numpy or
    LAPACK); a negative-definite matrix is not called constant data; torch tensors that
    require grad are taken."""
    torch = pytest.importorskip("torch")
    X = rng.standard_normal((500, 6))
    mean, cov = X.mean(0), np.cov(X.T)
    inf = cov.copy()
    inf[0, 0] = np.inf
    for args, kw, match in (((mean, cov[:5, :5]), {}, r"mean \(D,\) and cov \(D, D\).*\(6,\) and \(5, 5\)"),
                            ((mean, cov[0]), {}, r"\(6,\) and \(6,\)"),
                            ((mean, inf), {}, "must be finite"),
                            ((mean, np.full((6, 6), np.nan)), {}, "must be finite"),
                            ((mean, cov), {"rtol": 2}, r"rtol must be a number in \[0, 1\), got 2"),
                            ((mean, cov), {"rtol": float("nan")}, "rtol must be"),
                            ((mean, cov), {"shrinkage": "oas", "n_samples": -5}, "n_samples must be a positive integer"),
                            ((mean, -cov), {}, "no positive eigenvalue .* not a covariance matrix")):
        with pytest.raises(ValueError, match=match):
            Whitener.from_covariance(*args, **kw)
    w = Whitener.from_covariance(torch.tensor(mean, requires_grad=True), torch.tensor(cov, requires_grad=True))
    np.testing.assert_allclose(w.transform(torch.tensor(X[:3], requires_grad=True)),
                               Whitener.from_covariance(mean, cov).transform(X[:3]))
    with pytest.raises(ValueError, match=r"Whitener.transform needs rows \(n, 6\) .* got shape \(3, 5\)"):
        w.transform(X[:3, :5])


@pytest.fixture(scope="module")
def layer():
    return edp.synthetic.make_layer(n_images=3000, n_features=32, n_concepts=4, n_distractors=4, grid=(1, 2),
                                    train_head=False, seed=3)


def test_oas_is_recorded_and_persisted(layer, tmp_path):
    assert edp.EDPairs(4).whiten_shrinkage is None  # the documented default: the sample covariance
    model = edp.EDPairs(4, random_state=0, whiten_shrinkage="oas").fit(layer.X)
    assert model.get_params()["whiten_shrinkage"] == "oas"
    X = layer.X.astype(np.float64)
    cov = np.cov(X.T, bias=True)
    assert model.whitener_.shrinkage == pytest.approx(oas_shrinkage(len(X), cov), rel=1e-4)
    path = tmp_path / "pairs.npz"
    model.save(path)
    loaded = edp.EDPairs.load(path)
    assert loaded.whiten_shrinkage == "oas" and loaded.whitener_.shrinkage == model.whitener_.shrinkage
    np.testing.assert_array_equal(loaded.whitener_.P, model.whitener_.P)
    # A file written before the option was fitted without shrinkage, and loads saying so.
    data = dict(np.load(path))
    meta = json.loads(bytes(data["meta"]).decode())
    del meta["params"]["whiten_shrinkage"], meta["whitening_shrinkage"]
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    old = tmp_path / "old.npz"
    np.savez(old, **data)
    loaded = edp.EDPairs.load(old)
    assert loaded.whiten_shrinkage is None and loaded.whitener_.shrinkage == 0.0


def test_shrinkage_zero_is_the_plain_whitening(layer):
    X = layer.X.astype(np.float64)
    model = edp.EDPairs(4, random_state=0, whiten_shrinkage=None).fit(layer.X)
    ref = Whitener.from_covariance(X.mean(0), np.cov(X.T, bias=True), rtol=1e-5)
    assert model.whitener_.shrinkage == 0.0 and model.whitener_.rank == ref.rank
    np.testing.assert_allclose(model.whitener_.eigenvalues, ref.eigenvalues, rtol=1e-4)


@pytest.mark.parametrize("shrinkage", [None, 0.9])
def test_discriminant_uses_the_regularised_inverse(layer, shrinkage):
    model = edp.EDPairs(4, method="discriminant", whiten_shrinkage=shrinkage, random_state=0).fit(layer.X)
    X = layer.X.astype(np.float64)
    w = model.whitener_
    # Cluster members under the fitted centroids, as the fit assigned them (highest cosine in
    # whitened coordinates), then the closed form mu_i^T (regularised Cov)^+ by hand.
    labels = np.argmax(w.transform(X) @ model.cluster_centers_.T.astype(np.float64), axis=1)
    mu = np.stack([(X[labels == i] - X.mean(0)).mean(0) for i in range(4)])
    D = X.shape[1]
    cov = np.cov(X.T, bias=True)
    alpha = 0.0 if shrinkage is None else shrinkage
    # The layer has rank I + F < D: the inverse lives on the retained eigenvectors (rank cut 1e-5).
    vals, vecs = np.linalg.eigh(cov)
    keep = vals > 1e-5 * vals.max()
    shrunk = (1 - alpha) * vals[keep] + alpha * np.trace(cov) / D
    expected = mu @ (vecs[:, keep] / shrunk) @ vecs[:, keep].T
    got = model.decoding_.astype(np.float64)

    def cos(a, b):
        return np.einsum("id,id->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))

    assert np.all(cos(got, expected) > 0.99999), cos(got, expected)
    if alpha:  # and the shrinkage made a difference the check can see
        plain = mu @ (vecs[:, keep] / vals[keep]) @ vecs[:, keep].T
        assert cos(got, plain).min() < 0.999, cos(got, plain)


def test_streaming_equals_batch_with_shrinkage(layer):
    a = edp.EDPairs(4, random_state=0, whiten_shrinkage="oas").fit(layer.X)
    chunks = [layer.X[i:i + 1000] for i in range(0, len(layer.X), 1000)]
    b = edp.EDPairs(4, random_state=0, whiten_shrinkage="oas").fit(chunks)
    assert a.whitener_.shrinkage == pytest.approx(b.whitener_.shrinkage, rel=1e-6)
    np.testing.assert_allclose(a.decoding_, b.decoding_, rtol=1e-4, atol=1e-4)
