"""EDPairs on ground truth (edpairs.synthetic), the signal-vector estimators, streaming equals
batch, persistence and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edpairs as edp
from edpairs.pairs import positives_signal_vectors, whole_data_signal_vectors


def score(layer, model):
    X = layer.X
    return edp.metrics.recovery(layer, decoding=model.decoding_, encoding=model.encoding_,
                                detections=np.asarray(model.detect(X, hard=True)),
                                latent=np.asarray(model.latent_factors(X)))


@pytest.fixture(scope="module")
def medium():
    return edp.synthetic.make_layer(n_images=5000, n_features=64, n_concepts=8, n_distractors=8, grid=(2, 4),
                                    train_head=False, seed=0)


@pytest.fixture(scope="module")
def published():
    return edp.synthetic.published(seed=0, train_head=False)


def test_published_preset_every_detector_iou_at_least_095(published):
    model = edp.EDPairs(3, random_state=0).fit(published.X)
    r = score(published, model)
    assert np.all(np.asarray(r["iou"]) >= 0.95), r["iou"]
    # Without the head the signal vectors are not fully identifiable with three mutually
    # exclusive concepts (DESIGN section 6); check they are clearly informative.
    assert r["mean_cos_encoding"] > 0.6
    assert r["mean_latent_rmse"] < 0.6


def test_medium_layer_recovers_filters_and_signals(medium):
    model = edp.EDPairs(8, random_state=0).fit(medium.X)
    r = score(medium, model)
    assert r["mean_iou"] >= 0.90
    assert r["mean_cos_encoding"] >= 0.90
    assert r["mean_cos_decoding"] >= 0.92
    # Gain convention: unit encoding directions, each filter reads its own with gain 1.
    np.testing.assert_allclose(np.linalg.norm(model.encoding_, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.einsum("id,id->i", model.decoding_, model.encoding_), 1, atol=1e-4)


@pytest.mark.slow
def test_large_preset_goals():
    layer = edp.synthetic.large(seed=0, train_head=False)
    r = score(layer, edp.EDPairs(32, random_state=0).fit(layer.X))
    assert r["mean_iou"] >= 0.90
    assert r["mean_cos_encoding"] >= 0.95
    assert r["mean_cos_decoding"] >= 0.90


def test_positives_estimator_is_exact_with_the_ideal_filters(published):
    """With the ideal filters, z_i = alpha_i + const, and over positives the other latents are
    independent of z_i: Cov_P(x, z) / Var_P(z) is exactly s_i (up to float32 arithmetic)."""
    L = published
    stats = edp.ops.signal_moments(L.X, L.W.T.astype(np.float32), L.b.astype(np.float32),
                                   center=L.X.mean(0))
    S, ok = positives_signal_vectors(stats)
    assert ok.all()
    cos = np.einsum("id,id->i", S, L.S) / np.linalg.norm(S, axis=1)
    assert cos.min() > 0.999
    np.testing.assert_allclose(np.einsum("id,id->i", L.W, S), 1, atol=1e-3)  # w . s = 1 by construction


def test_whole_data_estimator_formula(rng):
    A = rng.standard_normal((6, 6))
    cov = A @ A.T
    W = rng.standard_normal((3, 6))
    S = whole_data_signal_vectors(W, cov)
    for i in range(3):
        np.testing.assert_allclose(S[i], cov @ W[i] / (W[i] @ cov @ W[i]), rtol=1e-12)


def test_latent_factors_are_centred_decoded_values(medium):
    model = edp.EDPairs(8, random_state=0).fit(medium.X)
    X = medium.X[:1000]
    lat = np.asarray(model.latent_factors(X))
    W, S = model.decoding_.astype(np.float64), model.encoding_.astype(np.float64)
    expected = (X @ W.T - W @ model.mean_) / np.einsum("id,id->i", W, S)
    np.testing.assert_allclose(lat, expected, rtol=1e-4, atol=1e-4)
    hard = np.asarray(model.detect(X, hard=True))
    soft = np.asarray(model.detect(X))
    assert np.array_equal(hard, soft > 0.5)
    assert soft.min() >= 0 and soft.max() <= 1


def test_streaming_equals_batch(medium):
    X = medium.X
    a = edp.EDPairs(8, random_state=3).fit(X)
    b = edp.EDPairs(8, random_state=3).fit([X[:7000], X[7000:25000], X[25000:]])
    for name in ("decoding_", "bias_", "encoding_", "mean_"):
        np.testing.assert_allclose(getattr(b, name), getattr(a, name), rtol=1e-5, atol=1e-5, err_msg=name)
    assert np.array_equal(a.n_positives_, b.n_positives_)


@pytest.mark.parametrize("method", ["centroid", "discriminant", "biorthogonal"])
def test_every_method_recovers_the_detectors(published, method):
    r = score(published, edp.EDPairs(3, method=method, random_state=0).fit(published.X))
    assert r["mean_iou"] >= 0.95


def test_optional_gradient_refinement_runs_and_keeps_the_conventions(published):
    pytest.importorskip("torch")
    model = edp.EDPairs(3, random_state=0, gradient={"epochs": 1, "batch_size": 4096, "seed": 0}).fit(published.X)
    assert np.isfinite(model.decoding_).all() and np.isfinite(model.encoding_).all()
    np.testing.assert_allclose(np.linalg.norm(model.encoding_, axis=1), 1, atol=1e-5)
    assert model.get_params()["gradient"]["epochs"] == 1


def test_torch_in_torch_out(medium):
    torch = pytest.importorskip("torch")
    X = torch.from_numpy(medium.X)
    model = edp.EDPairs(8, random_state=0).fit(X)
    ref = edp.EDPairs(8, random_state=0).fit(medium.X)
    np.testing.assert_allclose(model.decoding_, ref.decoding_, rtol=1e-5, atol=1e-5)
    for out in (model.detect(X[:10]), model.latent_factors(X[:10]), model.decode(X[:10])):
        assert isinstance(out, torch.Tensor) and out.shape == (10, 8)


def test_save_load_round_trips_exactly(tmp_path, medium):
    model = edp.EDPairs(8, random_state=0, metadata={"model": "synthetic", "layer": "x"}).fit(medium.X)
    path = tmp_path / "pairs.npz"
    model.save(path)
    loaded = edp.EDPairs.load(path)
    for name in ("decoding_", "bias_", "encoding_", "mean_", "n_positives_", "cluster_centers_"):
        assert np.array_equal(getattr(loaded, name), getattr(model, name)), name
    assert loaded.metadata == {"model": "synthetic", "layer": "x"}
    assert loaded.method == model.method and loaded.n_concepts == 8
    assert loaded.get_params() == model.get_params()  # whiten_rtol / whiten_shrinkage included
    assert loaded.whitener_.shrinkage == model.whitener_.shrinkage
    X = medium.X[:500]
    assert np.array_equal(np.asarray(loaded.detect(X)), np.asarray(model.detect(X)))
    assert not list(tmp_path.glob(".edpairs-*"))  # no temporary file left behind


def test_load_rejects_wrong_files(tmp_path, medium):
    model = edp.EDPairs(8, random_state=0).fit(medium.X)
    path = tmp_path / "pairs.npz"
    model.save(path)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not an edpairs pairs file"):
        edp.EDPairs.load(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.ones(3))
    with pytest.raises(ValueError, match="not an edpairs pairs file"):
        edp.EDPairs.load(other)
    # A file from a newer edpairs is refused with a clear message.
    data = dict(np.load(path))
    meta = json.loads(bytes(data["meta"]).decode())
    meta["format_version"] = 99
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    newer = tmp_path / "newer.npz"
    np.savez(newer, **data)
    with pytest.raises(ValueError, match="upgrade edpairs"):
        edp.EDPairs.load(newer)
    # Inconsistent shapes are caught.
    data = dict(np.load(path))
    data["bias"] = data["bias"][:3]
    broken = tmp_path / "broken.npz"
    np.savez(broken, **data)
    with pytest.raises(ValueError, match="bias has shape"):
        edp.EDPairs.load(broken)
    with pytest.raises(ValueError, match=r"\.npz"):
        model.save(tmp_path / "pairs.txt")
    with pytest.raises(FileNotFoundError):
        edp.EDPairs.load(tmp_path / "missing.npz")


def test_bad_inputs(rng, medium):
    X = medium.X[:2000].copy()
    with pytest.raises(ValueError, match="n_concepts"):
        edp.EDPairs(0).fit(X)
    with pytest.raises(ValueError, match="larger than the number of rows"):
        edp.EDPairs(8).fit(X[:5])
    bad = X.copy()
    bad[17, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        edp.EDPairs(8).fit(bad)
    with pytest.raises(ValueError, match="constant"):
        edp.EDPairs(2).fit(np.ones((100, 8), np.float32))
    with pytest.raises(ValueError, match="method"):
        edp.EDPairs(2, method="magic").fit(X)
    with pytest.raises(ValueError, match="with a head, X must hold whole images"):  # URA: tests/test_ura.py
        edp.EDPairs(2).fit(X, head=lambda z: z)
    with pytest.raises(ValueError, match="not fitted"):
        edp.EDPairs(2).detect(X)
    model = edp.EDPairs(8, random_state=0).fit(X)
    with pytest.raises(ValueError, match=r"fitted on D=64.*\(10, 32\)"):
        model.detect(X[:10, :32])
    with pytest.raises(ValueError, match="2-D"):
        model.latent_factors(X[0])
    with pytest.raises(ValueError, match="JSON"):
        edp.EDPairs(2, metadata={"f": object()}).fit(X)
