"""SphericalKMeans: recovery of planted directional clusters, streaming equals batch,
reproducibility, empty-cluster re-seeding, the online variant, errors."""

from __future__ import annotations

import numpy as np
import pytest

import edpairs as edp
from edpairs.cluster import Whitener


def planted(rng, n=6000, d=24, k=6, spread=0.35):
    centers = rng.standard_normal((k, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    X = centers[labels] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
    return X.astype(np.float32), labels, centers


def matched_accuracy(pred, true, k):
    from scipy.optimize import linear_sum_assignment

    M = np.zeros((k, k))
    np.add.at(M, (np.asarray(pred), true), 1)
    r, c = linear_sum_assignment(-M)
    return M[r, c].sum() / len(true)


def test_recovers_planted_clusters(rng):
    X, labels, centers = planted(rng)
    km = edp.SphericalKMeans(6, random_state=0).fit(X)
    assert matched_accuracy(km.labels_, labels, 6) > 0.99
    cos = np.abs(np.asarray(km.cluster_centers_) @ centers.T).max(1)
    assert cos.min() > 0.99
    assert np.allclose(np.linalg.norm(km.cluster_centers_, axis=1), 1, atol=1e-5)
    assert km.counts_.sum() == len(X)
    assert 0 < km.mean_cosine_ <= 1 and km.inertia_ == pytest.approx((1 - km.mean_cosine_) * len(X))


def test_labels_are_the_assignment_to_the_final_centres(rng):
    X, _, _ = planted(rng)
    km = edp.SphericalKMeans(6, random_state=1, max_iter=3).fit(X)
    assert np.array_equal(np.asarray(km.labels_), np.asarray(km.predict(X)))


def test_streaming_over_chunks_equals_one_fit(rng):
    X, _, _ = planted(rng, n=5000)
    a = edp.SphericalKMeans(6, random_state=3, n_init=2).fit(X)
    chunks = [X[:1234], X[1234:4000], X[4000:]]
    b = edp.SphericalKMeans(6, random_state=3, n_init=2).fit(chunks)
    c = edp.SphericalKMeans(6, random_state=3, n_init=2).fit(lambda: iter(chunks))
    for other in (b, c):
        np.testing.assert_allclose(np.asarray(other.cluster_centers_), np.asarray(a.cluster_centers_), atol=1e-6)
        assert other.n_iter_ == a.n_iter_
        assert other.labels_ is None  # not kept for streamed data
    np.testing.assert_array_equal(b.predict(X), a.labels_)


def test_same_seed_same_result_other_seed_other_start(rng):
    X, _, _ = planted(rng, k=8)
    a = edp.SphericalKMeans(8, random_state=5, max_iter=1).fit(X)
    b = edp.SphericalKMeans(8, random_state=5, max_iter=1).fit(X)
    c = edp.SphericalKMeans(8, random_state=6, max_iter=1).fit(X)
    assert np.array_equal(np.asarray(a.cluster_centers_), np.asarray(b.cluster_centers_))
    assert not np.array_equal(np.asarray(a.cluster_centers_), np.asarray(c.cluster_centers_))


def test_empty_cluster_is_reseeded_from_the_worst_fit_rows(rng):
    X, _, centers = planted(rng, k=3, n=3000)
    far = -np.ones((1, X.shape[1]), np.float32)  # a start that attracts nobody...
    init = np.vstack([centers[:2], far]).astype(np.float32)
    X = X[np.asarray(edp.ops.cosine_assign(X, centers.astype(np.float32))[0]) != 2]  # ...since cluster 2 is gone
    X = np.vstack([X, rng.standard_normal((30, X.shape[1])).astype(np.float32)])  # a few outliers
    km = edp.SphericalKMeans(3, init=init, max_iter=5).fit(X)
    assert (km.counts_ > 0).all()


def test_zero_rows_do_not_crowd_out_the_reseeding_candidates(rng):
    """Zero rows score 0, below every clustered row, but cannot seed a cluster: with at least k
    of them among the data the empty cluster still gets a worst-fit row (before, the k lowest
    were all zero rows, the cluster stayed empty and the fit ran to max_iter; a reviewer's
    case). With zero rows only beside too few usable ones, nothing breaks."""
    centres = np.eye(8, dtype=np.float32)[:3] * 5
    X = np.concatenate([c + 0.3 * rng.standard_normal((300, 8)) for c in centres]).astype(np.float32)
    init = np.concatenate([centres, -np.ones((1, 8), np.float32)])
    plain = edp.SphericalKMeans(4, init=init, max_iter=30).fit(X)
    zeros = edp.SphericalKMeans(4, init=init, max_iter=30).fit(np.concatenate([X, np.zeros((20, 8), np.float32)]))
    assert (plain.counts_ > 0).all() and (zeros.counts_[1:] > 0).all() and zeros.counts_[0] > plain.counts_[0] - 1
    assert zeros.n_iter_ == plain.n_iter_ < 30
    np.testing.assert_array_equal(np.asarray(zeros.cluster_centers_), np.asarray(plain.cluster_centers_))
    few = np.concatenate([np.zeros((10, 8), np.float32), centres[:1]])  # one usable row for two clusters
    km = edp.SphericalKMeans(2, init=np.eye(8, dtype=np.float32)[[0, 7]] * -1, max_iter=3).fit(few)
    assert np.isfinite(np.asarray(km.cluster_centers_)).all()


def test_members_that_cancel_count_as_empty():
    """Members whose unit vectors cancel leave a sum of float32 rounding noise: fit re-seeds
    such a cluster from the worst-fit row instead of pointing it along the noise, partial_fit
    keeps its centroid, as ops.spherical_kmeans_step does (ops.CANCELLED)."""
    angles = 0.3 + 2 * np.pi / 3 * np.arange(3)  # three unit rows 120 degrees apart: sum ~1e-8
    X = (np.stack([np.cos(angles), np.sin(angles)], 1) * [[1.0], [2.5], [0.7]]).astype(np.float32)
    init = np.array([[1.0, 0.0]], np.float32)
    km = edp.SphericalKMeans(1, init=init, max_iter=1).fit(X)
    worst = X[np.argmin(X[:, 0] / np.linalg.norm(X, axis=1))]
    np.testing.assert_allclose(np.asarray(km.cluster_centers_)[0], worst / np.linalg.norm(worst), atol=1e-6)
    # D = 1: in float32 x * (1 / |x|) is 1 - 2^-24 for the first row and -1 for the second.
    pair = np.array([[2.5744267], [-0.41306356]], np.float32)
    km = edp.SphericalKMeans(1, init=np.array([[1.0]], np.float32)).partial_fit(pair)
    assert np.asarray(km.cluster_centers_).tolist() == [[1.0]]
    km.partial_fit(np.array([[-3.0]], np.float32))  # a clear sum moves it
    assert np.asarray(km.cluster_centers_).tolist() == [[-1.0]] and km.counts_.tolist() == [3]


def test_whitened_geometry_matches_explicit_whitening(rng):
    """Clustering in whitened coordinates without materialising them equals clustering the
    explicitly whitened data."""
    from edpairs.cluster import _Geometry, cluster
    from edpairs._source import ChunkSource

    A = rng.standard_normal((12, 12))
    X, _, _ = planted(rng, d=12)
    X = (X @ A + 3.0).astype(np.float32)
    m = edp.ops.moments(X)
    wh = Whitener.from_covariance(m.mean, m.covariance(ddof=0))
    Z = wh.transform(X).astype(np.float32)
    init = Z[:6] / np.linalg.norm(Z[:6], axis=1, keepdims=True)
    res = cluster(ChunkSource(X), 6, geometry=_Geometry(wh), init=init, max_iter=20, keep_labels=True)
    ref = edp.SphericalKMeans(6, init=init, max_iter=20).fit(Z)
    assert np.mean(np.asarray(res.labels) == np.asarray(ref.labels_)) > 0.999
    np.testing.assert_allclose(res.centers, np.asarray(ref.cluster_centers_), atol=1e-4)


def test_whitener_drops_directions_without_variance(rng):
    B = rng.standard_normal((3, 10))
    X = rng.standard_normal((500, 3)) @ B + 5.0
    m = edp.ops.moments(X)
    wh = Whitener.from_covariance(m.mean, m.covariance(ddof=0))
    assert wh.rank == 3
    Z = wh.transform(X)
    # The moments kernel multiplies in float32: whitening is exact to float32 precision.
    np.testing.assert_allclose(np.cov(Z, rowvar=False, ddof=0), np.eye(3), atol=1e-5)
    with pytest.raises(ValueError, match="constant"):
        Whitener.from_covariance(np.zeros(4), np.zeros((4, 4)))


def test_partial_fit_learns_the_clusters_online(rng):
    X, labels, _ = planted(rng, n=8000)
    km = edp.SphericalKMeans(6, random_state=0)
    for s in range(0, len(X), 1000):
        km.partial_fit(X[s:s + 1000])
    assert matched_accuracy(km.predict(X), labels, 6) > 0.97
    assert km.counts_.sum() == len(X)


def test_a_source_that_declares_its_rows_is_not_counted_first(rng):
    """An object with chunks() that declares n_samples and n_features (ActivationStore,
    DeviceChunks) spares the fit the pass that would count its rows (on a GPU source, every
    piece streamed just to count; a reviewer's finding): one call of chunks() fewer, the same
    fit. A wrong declaration is named at the first pass."""
    X, _, _ = planted(rng, k=4, n=900)

    class Source:
        def __init__(self, declare):
            self.calls = 0
            if declare is not None:
                self.n_samples, self.n_features = declare

        def chunks(self):
            self.calls += 1
            return iter([X[:400], X[400:]])

    plain, declared = Source(None), Source((900, X.shape[1]))
    a = edp.SphericalKMeans(4, random_state=0, max_iter=5).fit(plain)
    b = edp.SphericalKMeans(4, random_state=0, max_iter=5).fit(declared)
    assert declared.calls == plain.calls - 1
    np.testing.assert_array_equal(np.asarray(a.cluster_centers_), np.asarray(b.cluster_centers_))
    with pytest.raises(ValueError, match="declares 901 rows \\(n_samples\\) but its chunks\\(\\) gave 900"):
        edp.SphericalKMeans(4, random_state=0, max_iter=5).fit(Source((901, X.shape[1])))


def test_partial_fit_random_start_skips_zero_rows(rng):
    """init="random" draws partial_fit's first centroids from the nonzero rows, as fit does: a
    zero row would be a zero centroid, which no row can join (a reviewer's case)."""
    X = np.concatenate([np.zeros((40, 6), np.float32), rng.standard_normal((3, 6)).astype(np.float32)])
    for seed in range(5):
        km = edp.SphericalKMeans(3, init="random", random_state=seed).partial_fit(X)
        assert (np.linalg.norm(np.asarray(km.cluster_centers_), axis=1) > 0.99).all()
    for how in ("fit", "partial_fit"):  # only zero rows: the error k-means++ gives, not numpy's
        with pytest.raises(ValueError, match="every row is zero"):
            getattr(edp.SphericalKMeans(3, init="random"), how)(np.zeros((20, 6), np.float32))


def test_partial_fit_accepts_initial_centroids(rng):
    X, labels, centers = planted(rng, n=3000)
    km = edp.SphericalKMeans(6, init=centers.astype(np.float32)).partial_fit(X[:1000])
    assert matched_accuracy(km.predict(X), labels, 6) > 0.99
    with pytest.raises(ValueError, match="init centroids must have shape"):
        edp.SphericalKMeans(6, init=centers[:2]).partial_fit(X)


def test_torch_in_torch_out(rng):
    torch = pytest.importorskip("torch")
    X, _, _ = planted(rng)
    km = edp.SphericalKMeans(6, random_state=0).fit(torch.from_numpy(X))
    assert isinstance(km.cluster_centers_, torch.Tensor) and isinstance(km.labels_, torch.Tensor)
    ref = edp.SphericalKMeans(6, random_state=0).fit(X)
    np.testing.assert_allclose(km.cluster_centers_.numpy(), ref.cluster_centers_, atol=1e-6)
    assert isinstance(km.predict(torch.from_numpy(X)), torch.Tensor)


@pytest.mark.parametrize(
    "kwargs, data, match",
    [
        ({"n_clusters": 0}, None, "n_clusters"),
        ({"n_clusters": 50}, "small", "larger than the number of rows"),
        ({"n_clusters": 3, "init": "nonsense"}, None, "init must be"),
        ({"n_clusters": 3, "init": np.ones((2, 24), np.float32)}, None, "init centroids must have shape"),
    ],
)
def test_bad_arguments(rng, kwargs, data, match):
    X, _, _ = planted(rng, n=200)
    if data == "small":
        X = X[:10]
    with pytest.raises(ValueError, match=match):
        edp.SphericalKMeans(**kwargs).fit(X)


def test_bad_data(rng):
    X, _, _ = planted(rng, n=200)
    Y = X.copy()
    Y[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        edp.SphericalKMeans(3).fit(Y)
    with pytest.raises(TypeError, match="one-shot iterator"):
        edp.SphericalKMeans(3).fit(iter([X]))
    with pytest.raises(ValueError, match="columns"):
        edp.SphericalKMeans(3).fit([X, X[:, :5]])
    with pytest.raises(ValueError, match="not fitted"):
        edp.SphericalKMeans(3).predict(X)
    km = edp.SphericalKMeans(3, random_state=0).fit(X)
    with pytest.raises(ValueError, match="columns"):
        km.predict(X[:, :5])


def _unit_sums(rows, labels, k):
    """Per-cluster sums of the rows' unit vectors (float64 reference)."""
    rows = np.asarray(rows, np.float64)
    sums = np.zeros((k, rows.shape[1]))
    np.add.at(sums, np.asarray(labels), rows / np.linalg.norm(rows, axis=1, keepdims=True))
    return sums


def test_partial_fit_after_fit_continues_from_the_fit(rng):
    """scikit-learn semantics: partial_fit after fit adds the batch to the running sums of fit's
    final assignment (not a fresh start), and counts_ keeps accumulating."""
    X, _, _ = planted(rng, n=3000)
    rows, batch = X[:2500], X[2500:]
    km = edp.SphericalKMeans(6, random_state=0, n_init=2, max_iter=4).fit(rows)
    fit_counts = km.counts_.copy()
    batch_labels = np.asarray(km.predict(batch))
    expected = _unit_sums(rows, km.labels_, 6) + _unit_sums(batch, batch_labels, 6)
    km.partial_fit(batch)
    assert km.counts_.sum() == len(rows) + len(batch)
    np.testing.assert_array_equal(km.counts_, fit_counts + np.bincount(batch_labels, minlength=6))
    np.testing.assert_allclose(np.asarray(km.cluster_centers_),
                               expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("drop_sums", [False, True])  # True: a checkpoint written before they were saved
def test_partial_fit_continues_a_resumed_fit(rng, tmp_path, drop_sums):
    """A fit interrupted in a later restart (the best so far from the checkpoint) and resumed
    leaves the same running sums for partial_fit as an uninterrupted fit."""
    from edpairs.checkpoint import Checkpoint

    X, _, _ = planted(rng, n=3000)
    chunks, batch = [X[:1200], X[1200:2500]], X[2500:]
    params = dict(n_init=2, random_state=4, max_iter=5, progress=False)

    def stop(stage, meta):
        if "best_mean_cosine" in meta:  # the first save of the second restart
            raise _Interrupted

    path = tmp_path / "km.ckpt"
    with pytest.raises(_Interrupted):
        edp.SphericalKMeans(6, **params).fit(chunks, checkpoint=Checkpoint(path, {}, on_save=stop))
    if drop_sums:
        with np.load(path) as f:
            saved = {name: f[name] for name in f.files if name != "best_sums"}
        np.savez(path.with_suffix(".npz"), **saved)
        path.with_suffix(".npz").replace(path)
    resumed = edp.SphericalKMeans(6, **params).fit(chunks, checkpoint=path).partial_fit(batch)
    plain = edp.SphericalKMeans(6, **params).fit(chunks).partial_fit(batch)
    np.testing.assert_array_equal(resumed.counts_, plain.counts_)
    assert resumed.counts_.sum() == len(X)
    np.testing.assert_allclose(np.asarray(resumed.cluster_centers_), np.asarray(plain.cluster_centers_), atol=1e-7)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
@pytest.mark.parametrize(
    "init, match",
    [
        (np.full((3, 24), np.nan), r"init centroids must be finite, got NaN or Inf in row\(s\) \[0, 1, 2\]"),
        (np.vstack([np.eye(2, 24), np.full((1, 24), np.inf)]), r"must be finite.*row\(s\) \[2\]"),
        (np.vstack([np.eye(2, 24), np.zeros((1, 24))]), "init centroid 2 is zero"),
        (np.ones(24), r"init centroids must have shape \(3, 24\), got \(24,\)"),
    ],
)
def test_bad_init_centroids(rng, method, init, match):
    X, _, _ = planted(rng, n=200)
    with pytest.raises(ValueError, match=match):
        getattr(edp.SphericalKMeans(3, init=init), method)(X)


@pytest.mark.parametrize("method", ["fit", "partial_fit"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_data_gets_the_finite_check_message(rng, method, value):
    """Inf as well as NaN: checked before k-means++ seeding (which failed with numpy's
    "Probabilities contain NaN" on an Inf row)."""
    X, _, _ = planted(rng, n=200)
    X[7, 2] = value
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        getattr(edp.SphericalKMeans(3, random_state=0), method)(X)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_init": "2"}, "n_init must be a positive integer, got '2'"),
        ({"n_init": True}, "n_init must be a positive integer, got True"),
        ({"max_iter": 2.5}, "max_iter must be a positive integer, got 2.5"),
        ({"max_iter": 0}, "max_iter must be a positive integer, got 0"),
        ({"init_size": -5}, "init_size must be a positive integer or None, got -5"),
        ({"chunk_rows": -3}, "chunk_rows must be a positive integer or None, got -3"),
        ({"chunk_rows": 10.0}, "chunk_rows must be a positive integer or None, got 10.0"),
        ({"tol": "x"}, "tol must be a finite number >= 0, got 'x'"),
        ({"tol": -1e-3}, "tol must be a finite number >= 0, got -0.001"),
        ({"tol": float("nan")}, "tol must be a finite number >= 0, got nan"),
        ({"random_state": "a"}, "random_state must be None, an integer >= 0 or a numpy Generator, got 'a'"),
        ({"random_state": -1}, "random_state must be None, an integer >= 0 or a numpy Generator, got -1"),
        ({"check_finite": "no"}, "check_finite must be True or False, got 'no'"),
    ],
)
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_bad_hyperparameters_are_named(rng, kwargs, match, method):
    X, _, _ = planted(rng, n=200)
    with pytest.raises(ValueError, match=match):
        getattr(edp.SphericalKMeans(3, **kwargs), method)(X)


def test_numpy_scalars_are_accepted_as_hyperparameters(rng):
    X, _, _ = planted(rng, n=300)
    params = dict(n_init=2, max_iter=5, init_size=100, chunk_rows=70, random_state=1, tol=1e-4)
    a = edp.SphericalKMeans(3, **params).fit(X)
    b = edp.SphericalKMeans(np.int64(3), n_init=np.int32(2), max_iter=np.int64(5), init_size=np.int64(100),
                            chunk_rows=np.int64(70), random_state=np.int64(1), tol=np.float32(1e-4)).fit(X)
    np.testing.assert_array_equal(np.asarray(a.cluster_centers_), np.asarray(b.cluster_centers_))


def test_score_names_the_column_mismatch_like_predict(rng):
    X, _, _ = planted(rng, n=200)
    km = edp.SphericalKMeans(3, random_state=0).fit(X)
    for method in (km.predict, km.score):
        with pytest.raises(ValueError, match="X has 5 columns but the model was fitted on 24"):
            method(X[:, :5])


def test_a_list_of_rows_is_refused_with_a_hint(rng):
    """A list is a list of (n, D) chunks; a list of 1-D rows gets told to use np.asarray."""
    X, _, _ = planted(rng, n=200)
    with pytest.raises(ValueError, match=r"list of 200 1-D items.*list of \(n, D\) chunks.*np\.asarray\(X\)"):
        edp.SphericalKMeans(3).fit(X.tolist())
    km = edp.SphericalKMeans(3, random_state=0).fit([X[:100], X[100:]])  # chunks still work
    assert km.counts_.sum() == len(X)
    assert edp.SphericalKMeans(3, random_state=0).fit(np.asarray(X.tolist())).counts_.sum() == len(X)


def test_pass_totals_kept_on_a_torch_device(rng, monkeypatch):
    """The Lloyd passes' device-side totals (torch: topk, float64 sums, stack, cat), run here
    on CPU tensors as if they were on a GPU: the same fit as the host's, re-seeding included
    (two equal initial centroids leave one cluster empty)."""
    torch = pytest.importorskip("torch")
    import edpairs.cluster as cl

    X, _, _ = planted(rng)
    C0 = np.stack([X[0], X[0], X[1], X[2], X[3], X[4]]).astype(np.float32)
    parts = np.array_split(X, 4)
    want = edp.SphericalKMeans(6, init=C0, max_iter=4, tol=0, progress=False).fit(parts)
    seen = []
    monkeypatch.setattr(cl, "_kept_on_device", lambda xp, s: seen.append(xp.name) or xp.name == "torch")
    got = edp.SphericalKMeans(6, init=C0, max_iter=4, tol=0, progress=False).fit([torch.from_numpy(p) for p in parts])
    assert seen and set(seen) == {"torch"}
    np.testing.assert_array_equal(got.cluster_centers_.numpy(), want.cluster_centers_)
    np.testing.assert_array_equal(got.counts_, want.counts_)
    assert got.inertia_ == pytest.approx(want.inertia_, rel=1e-12) and np.all(want.counts_ > 0)


def test_the_lowest_scores_are_picked_only_when_a_cluster_empties(rng, monkeypatch):
    """A pass picks each chunk's k lowest scores (the re-seeding candidates) only where a
    cluster empties: none in a fit where none does. Kept scores past PENDING_SCORE_BYTES are
    reduced as the pass goes, with the same fit (host chunks and "device" ones alike)."""
    torch = pytest.importorskip("torch")
    import edpairs.cluster as cl
    from edpairs._arrays import Namespace

    X, _, _ = planted(rng)
    parts = np.array_split(X, 4)
    picks = []
    real = Namespace.k_lowest
    monkeypatch.setattr(Namespace, "k_lowest", lambda self, x, m: picks.append(int(x.shape[0])) or real(self, x, m))

    def fit(C0, data):
        return edp.SphericalKMeans(6, init=C0, max_iter=4, tol=0, progress=False).fit(data)

    assert np.all(fit(X[:6], parts).counts_ > 0) and picks == []
    C0 = np.stack([X[0], X[0], X[1], X[2], X[3], X[4]])  # (one cluster empties in the first pass)
    want = fit(C0, parts)
    assert sorted(picks) == sorted(len(p) for p in parts)  # one pass re-seeded, each chunk once
    monkeypatch.setattr(cl, "PENDING_SCORE_BYTES", 4 * len(parts[0]))  # reduced after every chunk
    monkeypatch.setattr(cl, "_kept_on_device", lambda xp, s: xp.name == "torch")
    for data in (parts, [torch.from_numpy(p) for p in parts]):
        picks.clear()
        got = fit(C0, data)
        assert len(picks) == 4 * got.n_iter_ + 4  # every pass, as it goes (the last pass too)
        np.testing.assert_array_equal(np.asarray(got.cluster_centers_), want.cluster_centers_)
        np.testing.assert_array_equal(got.counts_, want.counts_)


@pytest.mark.parametrize("scale", [1e300, 1e-200])
def test_init_centroids_of_any_magnitude_are_their_directions(rng, scale):
    """Init centroids are directions: rows of 1e300 (float64 squares overflow) or 1e-200 (they
    underflow, and the row was refused as zero) fit as the unit rows do, and partial_fit too."""
    X, _, _ = planted(rng)
    C0 = X[:3].astype(np.float64)
    want = edp.SphericalKMeans(3, init=C0, progress=False).fit(X)
    got = edp.SphericalKMeans(3, init=C0 * scale, progress=False).fit(X)
    np.testing.assert_array_equal(got.counts_, want.counts_)
    np.testing.assert_allclose(got.cluster_centers_, want.cluster_centers_, atol=1e-12)
    part = edp.SphericalKMeans(3, init=C0 * scale, progress=False).partial_fit(X)
    np.testing.assert_array_equal(part.counts_, edp.SphericalKMeans(3, init=C0, progress=False).partial_fit(X).counts_)
    np.testing.assert_allclose(np.linalg.norm(part.cluster_centers_, axis=1), 1, rtol=1e-6)


def test_a_callable_source_must_yield_the_same_chunks_every_pass(rng):
    """A callable source whose chunks come in another order (a shuffling DataLoader), other
    sizes or another number in a later pass is refused, naming the chunk: EDPairs keeps per-chunk
    state between passes, and a reordered pass gave it another chunk's row scales (a different
    fit, no error) or a row_scale shape error."""
    X, _, _ = planted(rng, n=600)
    parts = np.array_split(X, 4)
    passes = []

    def shuffled():
        passes.append(1)
        order = [0, 1, 2, 3] if len(passes) == 1 else [1, 0, 2, 3]
        return iter([parts[i] for i in order])

    with pytest.raises(ValueError, match=r"X changed between passes \(chunk 0 holds other rows than before\).*"
                                         r"same order every pass \(a torch DataLoader with shuffle=True does not"):
        edp.EDPairs(2, random_state=0, progress=False).fit(shuffled)
    sizes = [np.array_split(X, 4), np.array_split(X, 3)]
    calls = []

    def resized():
        calls.append(1)
        return iter(sizes[min(len(calls) - 1, 1)])

    with pytest.raises(ValueError, match=r"chunk 0 had 150 rows, now 200"):
        edp.SphericalKMeans(3, random_state=0, progress=False).fit(resized)
    more = [parts, parts + [X[:10]]]
    calls.clear()

    def longer():
        calls.append(1)
        return iter(more[min(len(calls) - 1, 1)])

    with pytest.raises(ValueError, match=r"changed between passes \(4 chunks before, more now\)"):
        edp.SphericalKMeans(3, random_state=0, progress=False).fit(longer)
    same = edp.SphericalKMeans(3, random_state=0, progress=False).fit(lambda: iter(parts))
    np.testing.assert_array_equal(same.cluster_centers_, edp.SphericalKMeans(3, random_state=0, progress=False)
                                  .fit(parts).cluster_centers_)


def test_what_is_not_data_is_named(rng):
    """A path, a dict, a callable that returns one array, a source with no rows, rows without
    columns, an init that is None, not numbers or complex, and n_clusters changed after fitting
    each get their own message (they got "a one-shot iterator", "chunks must be 2-D", numpy's
    shape errors, "every row is zero", or nothing)."""
    X, _, _ = planted(rng, n=200)
    km = edp.SphericalKMeans(3, progress=False)
    for data, kind, match in (("data.npy", TypeError, r"X is a path \('data.npy'\), not data: load the array first"),
                              ({"a": X}, TypeError, "X is a dict: pass an array"),
                              (lambda: X, TypeError, r"the callable returned an array of shape \(200, 24\)"),
                              (lambda: iter([]), ValueError, "X has no rows"),
                              (np.zeros((10, 0), np.float32), ValueError, r"at least one column, got shape \(10, 0\)")):
        with pytest.raises(kind, match=match):
            km.fit(data)
    with pytest.raises(ValueError, match="at least one column"):
        edp.SphericalKMeans(2).partial_fit(np.zeros((10, 0), np.float32))
    with pytest.raises(ValueError, match="X has no rows"):
        edp.EDPairs(2, progress=False).fit(lambda: iter([]))
    for init, match in ((None, r"init must be 'k-means\+\+', 'random' or an array of centroids, got None"),
                        (np.array([["a"] * 24] * 3, object), "init centroids must be an array of real numbers"),
                        (X[:3] + 1j, r"init centroids must be real, got complex values \(complex64\)")):
        with pytest.raises(ValueError, match=match):
            edp.SphericalKMeans(3, init=init, progress=False).fit(X)
    for fitted in (edp.SphericalKMeans(3, random_state=0, progress=False).fit(X),
                   edp.SphericalKMeans(3, random_state=0).partial_fit(X)):
        fitted.n_clusters = 5
        with pytest.raises(ValueError, match="n_clusters was changed to 5 after fitting 3 clusters"):
            fitted.partial_fit(X)


def test_a_chunk_callable_that_returns_no_iterator_is_named(rng):
    """A callable source that returns something not iterable (a forgotten ``yield``, an array
    count) gave Python's bare "'int' object is not iterable"."""
    X, _, _ = planted(rng, n=200)
    with pytest.raises(TypeError, match="X: the callable returned a int, expected an iterator of \\(n, D\\) chunks"):
        edp.SphericalKMeans(3).fit(lambda: 5)

    class Source:
        def chunks(self):
            return None

    with pytest.raises(TypeError, match="its chunks\\(\\) returned a NoneType"):
        edp.EDPairs(2).fit(Source())
    assert edp.SphericalKMeans(3, random_state=0).fit(lambda: iter([X])).counts_.sum() == 200


def test_an_array_on_a_gpu_is_read_in_larger_chunks(monkeypatch):
    """In-memory rows are read 256 MB at a time; an array on a GPU (a torch CPU tensor taken
    for one here) in chunks of up to 2 GiB of float32 rows and at most 2^24 rows, where a chunk
    is a view and costs a pass its launches; chunk_rows still wins."""
    torch = pytest.importorskip("torch")
    from edpairs import _source
    from edpairs._arrays import Namespace

    host = np.zeros((3, 512), np.float32)
    assert _source.ChunkSource(host).chunk_rows == 2**28 // (512 * 4)
    monkeypatch.setattr(Namespace, "is_cuda", lambda self, x: self.name == "torch")
    assert _source.ChunkSource(host).chunk_rows == 2**28 // (512 * 4)
    assert _source.ChunkSource(torch.zeros(3, 512)).chunk_rows == 2**31 // (512 * 4)  # 1M x 512: one chunk
    assert _source.ChunkSource(torch.zeros(3, 512, dtype=torch.bfloat16)).chunk_rows == 2**31 // (512 * 4)
    assert _source.ChunkSource(torch.zeros(3, 8)).chunk_rows == 2**24
    assert _source.ChunkSource(torch.zeros(3, 512), chunk_rows=7).chunk_rows == 7


def test_ordered_sum_starts_a_device_run_from_zero_there(monkeypatch):
    """_OrderedSum on "device" arrays (torch CPU tensors taken for GPU ones): the first run
    starts from x + 0, no zeros copied over, with the bits of zeros + x (-0.0 becomes +0.0);
    later runs, after host additions, start from the host total; the result is the host's
    float64 additions in order."""
    torch = pytest.importorskip("torch")
    import edpairs.cluster as cl

    monkeypatch.setattr(cl, "_kept_on_device", lambda xp, a: xp.name == "torch")
    uploads = []
    real = cl.on_device_of
    monkeypatch.setattr(cl, "on_device_of", lambda a, like: uploads.append(a.shape) or real(a, like))
    parts = [np.array([-0.0, 1e16, 3.0]), np.array([2.0, 1.0, -0.0]), np.array([0.5, -1e16, 1.0])]
    total = cl._OrderedSum(3)
    total.add(torch.tensor(parts[0]))
    total.add(torch.tensor(parts[1]))
    assert uploads == []
    total.add(parts[2])  # a host array ends the run (one copy home) and is added on the host
    total.add(torch.tensor(parts[0]))  # a new run starts from the host total: one upload
    assert uploads == [(3,)]
    want = np.zeros(3)
    for p in parts + parts[:1]:
        want = want + p
    got = total.result()
    np.testing.assert_array_equal(got, want)
    assert not np.signbit(got[0]) and got.dtype == np.float64
    counts = cl._OrderedSum(2, np.int64)
    counts.add(torch.tensor([3, 4], dtype=torch.int32))
    assert counts.result().dtype == np.int64 and counts.result().tolist() == [3, 4]
    empty = cl._OrderedSum((2, 2))
    assert empty.result().tolist() == [[0.0, 0.0], [0.0, 0.0]]
    uploads.clear()
    score = cl._OrderedSum(())  # a pass's score total: 0-d sums start on the device too
    score.add(torch.tensor(2.5, dtype=torch.float64))
    score.add(torch.tensor(1.0, dtype=torch.float64))
    assert uploads == [] and float(score.result()) == 3.5
    # A first run that had to start from the uploaded zeros (a shape to broadcast) counts as
    # started: the next device's run starts from the host total, not from zero again.
    monkeypatch.setattr(cl, "_where", lambda x: ("torch", getattr(x, "gpu", 0)))
    wide = cl._OrderedSum(2)
    wide.add(torch.tensor(1.0, dtype=torch.float64))  # broadcast: zeros (2,) + 1.0
    other = torch.tensor([10.0, 20.0], dtype=torch.float64)
    other.gpu = 1  # "another GPU": the first run comes home, the second starts from it
    wide.add(other)
    assert wide.result().tolist() == [11.0, 21.0]


def test_the_centroid_update_stays_on_the_device(rng, monkeypatch, tmp_path):
    """Chunks all on one "GPU" (torch CPU tensors taken for GPU ones): each pass's centroid
    update runs there (no host update, centroids_from_sums, unless a cluster empties: the
    host re-seeds it), with the host's results: the same centres, counts, iterations and
    inertia as a fit on numpy chunks; a checkpointed fit saves host arrays and ends the same."""
    torch = pytest.importorskip("torch")
    import edpairs.cluster as cl

    X, _, _ = planted(rng)
    parts = np.array_split(X, 3)
    monkeypatch.setattr(cl, "_kept_on_device", lambda xp, s: xp.name == "torch")
    host_updates = []
    real = cl._Geometry.centroids_from_sums
    monkeypatch.setattr(cl._Geometry, "centroids_from_sums", lambda self, *a: host_updates.append(1) or real(self, *a))

    def fit(data, C0, **kw):
        return edp.SphericalKMeans(6, init=C0, max_iter=8, tol=0, progress=False).fit(data, **kw)

    want_first = fit(parts, X[:6])
    for C0, host_passes in ((X[:6], 0), (np.stack([X[0], X[0], X[1], X[2], X[3], X[4]]), 1)):  # (one empties)
        want = fit(parts, C0)
        host_updates.clear()
        got = fit([torch.from_numpy(p) for p in parts], C0)
        assert len(host_updates) == host_passes, C0
        np.testing.assert_array_equal(got.cluster_centers_.numpy(), want.cluster_centers_)
        np.testing.assert_array_equal(got.counts_, want.counts_)
        assert got.n_iter_ == want.n_iter_ >= 3 and got.inertia_ == pytest.approx(want.inertia_, rel=1e-12)
    saved = fit([torch.from_numpy(p) for p in parts], X[:6], checkpoint=tmp_path / "k.ckpt")
    np.testing.assert_array_equal(saved.cluster_centers_.numpy(), fit(parts, X[:6]).cluster_centers_)
    # Stopped after its second save (the state of a device pass) and fitted again: it resumes
    # there (start, previous) and ends as the uninterrupted fit.
    from edpairs.checkpoint import Checkpoint

    class Stop(Exception):
        pass

    seen = []

    def stop_at_two(stage, meta):
        seen.append(meta["n_iter"])
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        fit([torch.from_numpy(p) for p in parts], X[:6], checkpoint=Checkpoint(tmp_path / "s.ckpt", {}, on_save=stop_at_two))
    updates = len(host_updates)
    resumed = fit([torch.from_numpy(p) for p in parts], X[:6], checkpoint=tmp_path / "s.ckpt")
    assert len(host_updates) == updates and not (tmp_path / "s.ckpt").exists()
    np.testing.assert_array_equal(resumed.cluster_centers_.numpy(), want_first.cluster_centers_)
    assert resumed.n_iter_ == want_first.n_iter_ and resumed.inertia_ == pytest.approx(want_first.inertia_, rel=1e-12)
