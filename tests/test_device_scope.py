"""cupy arrays on a GPU other than the current one: every edpairs call computes where the data
lives and gives the caller's current device back. CuPy runs each operation on the current
device, so without edpairs' device scope the Python-side arithmetic of a call (checks, casts,
small products) would fail without peer access, or read across devices and leave results on
the wrong GPU. No machine here has two GPUs, so tests/_fake_cupy.py stands in for cupy: host
memory tagged with a fake device, raising where cupy would (DLPack hands host memory to the
CPU kernels, so the results are compared with numpy's bit for bit)."""

import numpy as np
import pytest

import _fake_cupy as fc
from edpairs import ops
from edpairs._source import ChunkSource
from edpairs.cluster import SphericalKMeans
from edpairs.pairs import EDPairs


@pytest.fixture
def cupy(monkeypatch, request):
    mod = fc.install(monkeypatch, add_at=getattr(request, "param", True))
    yield mod
    assert fc._current[0] == 0, "the caller's current device was not given back"


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    X = np.abs(rng.standard_normal((500, 12))).astype(np.float32)
    C = rng.standard_normal((5, 12)).astype(np.float32)
    W = rng.standard_normal((12, 3)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    return X, C, W, b


def on1(a):
    return fc.on_device(a, 1)


def same(got, want):
    assert isinstance(got, fc.ndarray) and got._device == 1, f"result on device {getattr(got, '_device', None)}"
    np.testing.assert_array_equal(got.get(), want)


def test_the_stand_in_refuses_work_off_the_current_device(cupy, data):
    X = on1(data[0])
    with pytest.raises(fc.DeviceMismatch):
        X + 1
    with pytest.raises(fc.DeviceMismatch):
        cupy.isfinite(X)
    with pytest.raises(fc.DeviceMismatch):
        X.astype(np.float64)
    X[1:3].reshape(-1)  # views need no device
    with fc.Device(1):
        assert (X + 1)._device == 1


def test_ops_compute_on_the_arrays_device(cupy, data):
    X, C, W, b = data
    Xg, Cg = on1(X), on1(C)
    got, want = ops.assign(Xg, Cg), ops.assign(X, C)
    for g, w in zip(got, want):
        same(g, w)
    got = ops.assign(X=on1(X.astype(np.float64)), C=Cg, center=on1(np.full(12, 0.5)))  # keywords, float64 route
    same(got.labels, ops.assign(X.astype(np.float64), C, center=np.full(12, 0.5)).labels)
    same(ops.cosine_assign(Xg, Cg)[1], ops.cosine_assign(X, C)[1])
    for g, w in zip(ops.spherical_kmeans_step(Xg, Cg), ops.spherical_kmeans_step(X, C)):
        same(g, w)
    m, mw = ops.moments(Xg), ops.moments(X)
    same(m.m2, mw.m2)
    same(m.merge(ops.moments(Xg)).cov, mw.merge(ops.moments(X)).cov)
    s, sw = ops.signal_moments(Xg, on1(W), on1(b)), ops.signal_moments(X, W, b)
    same(s.merge(s).sum_xz, sw.merge(sw).sum_xz)
    res = ops.assign(X, C)
    same(ops.normalize_centroids(on1(res.sums), on1(res.counts), Cg), ops.normalize_centroids(res.sums, res.counts, C))


def test_a_failing_call_gives_the_device_back(cupy, data):
    X = data[0].copy()
    X[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ops.moments(on1(X))
    assert fc._current[0] == 0


def test_estimators_fit_and_predict_on_the_datas_device(cupy, data):
    X = data[0]
    want = SphericalKMeans(4, random_state=0, progress=False).fit(X)
    for source in (on1(X), [on1(X[:200]), on1(X[200:])]):
        got = SphericalKMeans(4, random_state=0, progress=False).fit(source)
        same(got.cluster_centers_, want.cluster_centers_)
    same(got.predict(on1(X)), want.predict(X))
    assert got.score(on1(X)) == want.score(X)
    online = SphericalKMeans(4, random_state=0, progress=False).partial_fit(on1(X))
    same(online.cluster_centers_, SphericalKMeans(4, random_state=0, progress=False).partial_fit(X).cluster_centers_)

    pw = EDPairs(3, random_state=0, progress=False).fit([X[:250], X[250:]])
    pg = EDPairs(3, random_state=0, progress=False).fit([on1(X[:250]), on1(X[250:])])
    np.testing.assert_array_equal(pg.decoding_, pw.decoding_)
    np.testing.assert_array_equal(pg.encoding_, pw.encoding_)
    np.testing.assert_array_equal(pg.bias_, pw.bias_)  # (the thresholds' histograms made on the device)
    for method in ("decode", "detect", "latent_factors"):
        same(getattr(pg, method)(on1(X)), getattr(pw, method)(X))
        same(getattr(pg, method)(X=on1(X)), getattr(pw, method)(X))


def test_chunks_on_several_devices(cupy, data):
    """Each chunk is worked on where it lives: k-means (host-side sums between chunks) fits
    chunks spread over two GPUs as their concatenation; the pairs' device-side moments cannot
    merge across devices and say so."""
    X = data[0]
    spread = [on1(X[:250]), fc.on_device(X[250:], 2)]
    got = SphericalKMeans(4, random_state=0, progress=False).fit(spread)
    np.testing.assert_array_equal(got.cluster_centers_.get(),
                                  SphericalKMeans(4, random_state=0, progress=False).fit(X).cluster_centers_)
    with pytest.raises(TypeError, match="cuda:1, the other cupy arrays on cuda:2"):
        EDPairs(3, random_state=0, progress=False).fit(spread)


def test_iterating_chunks_leaves_the_current_device_alone(cupy, data):
    """The chunk loops scope their own bodies; the iterator itself never switches devices, so a
    loop that stops early or fails leaves nothing switched behind it."""
    source = ChunkSource([on1(data[0][:100]), on1(data[0][100:])])
    for chunk in source:
        assert fc._current[0] == 0
        break
    assert fc._current[0] == 0


def test_kmeans_passes_copy_to_the_host_once_per_pass(cupy, data):
    """On a GPU the Lloyd passes keep each chunk's sums, counts, score total and lowest scores
    on the device: the copies to the host per pass do not grow with the number of chunks (they
    were three per chunk: sums, counts and every row's score), and the fit is the host's."""
    X = data[0]
    C0 = X[:5].copy()
    copies = {}
    for chunks in (1, 6):
        parts = np.array_split(X, chunks)
        for passes in (2, 4):
            fc.copies_to_host[0] = 0
            got = SphericalKMeans(5, init=C0, max_iter=passes - 1, tol=0, progress=False).fit([on1(p) for p in parts])
            copies[chunks, passes] = fc.copies_to_host[0]
            want = SphericalKMeans(5, init=C0, max_iter=passes - 1, tol=0, progress=False).fit(parts)
            same(got.cluster_centers_, want.cluster_centers_)
            assert got.inertia_ == want.inertia_ and got.n_iter_ == want.n_iter_ == passes - 1
    per_pass = (copies[1, 4] - copies[1, 2]) / 2
    assert per_pass == (copies[6, 4] - copies[6, 2]) / 2 and per_pass <= 5, copies


def test_kmeans_reseeds_from_the_devices_lowest_scores(cupy, data):
    """Two equal initial centroids leave one cluster empty: it is re-seeded from the rows with
    the lowest scores, which the device picks per chunk (global row numbers kept), as the host
    does."""
    X = data[0]
    C0 = np.stack([X[0], X[0], X[1], X[2]])
    parts = np.array_split(X, 3)
    want = SphericalKMeans(4, init=C0, max_iter=3, tol=0, progress=False).fit(parts)
    got = SphericalKMeans(4, init=C0, max_iter=3, tol=0, progress=False).fit([on1(p) for p in parts])
    same(got.cluster_centers_, want.cluster_centers_)
    assert np.all(want.counts_ > 0)


def test_strided_rows_on_another_device(cupy, data):
    """Rows that are not contiguous are copied where they live (the copy is an operation of the
    current device in cupy): predict, score and partial_fit on every other row of device-1 data."""
    X = data[0]
    km = SphericalKMeans(4, random_state=0, progress=False).fit(X)
    strided = on1(np.repeat(X, 2, axis=1))[:, ::2]
    assert not strided.flags.c_contiguous
    same(km.predict(strided), km.predict(X))
    assert km.score(strided) == km.score(X)
    online = SphericalKMeans(4, init=X[:4], progress=False).partial_fit(strided)
    same(online.cluster_centers_, SphericalKMeans(4, init=X[:4], progress=False).partial_fit(X).cluster_centers_)


def test_a_fit_that_fails_mid_pass_gives_the_device_back(cupy, data):
    """NaN in the second chunk stops the fit inside the chunk loop, where the chunk's device is
    current: the caller's device is current again once the error arrives."""
    X = data[0]
    bad = X[250:].copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SphericalKMeans(4, init=X[:4], progress=False).fit([on1(X[:250]), on1(bad)])
    assert fc._current[0] == 0


def test_labels_of_a_chunked_array_stay_on_its_device(cupy, data):
    """An in-memory array read in several chunks: the labels of the final pass are concatenated
    on the array's device."""
    X = data[0]
    got = SphericalKMeans(4, init=X[:4], progress=False, chunk_rows=100).fit(on1(X))
    want = SphericalKMeans(4, init=X[:4], progress=False, chunk_rows=100).fit(X)
    same(got.labels_, want.labels_)
    same(got.cluster_centers_, want.cluster_centers_)


def test_ordered_sums_add_in_the_hosts_order_across_devices(cupy):
    """Float64 sums of arrays on two GPUs and the host, in runs: each addition is the host's, in
    the same order (magnitudes chosen so that another order rounds differently)."""
    from edpairs.cluster import _OrderedSum

    rng = np.random.default_rng(3)
    parts = [rng.standard_normal(64) * 10.0 ** rng.integers(-8, 16, 64) for _ in range(7)]
    where = [1, 1, None, 2, 2, 2, 1]
    acc, want = _OrderedSum(64), np.zeros(64)
    for p, d in zip(parts, where):
        acc.add(p if d is None else fc.on_device(p, d))
        want += p
    np.testing.assert_array_equal(acc.result(), want)
    runs = np.zeros(64)
    for group in ([0, 1], [2], [3, 4, 5], [6]):  # what adding up each run first would give
        runs += np.sum([parts[i] for i in group], axis=0) if len(group) > 1 else parts[group[0]]
    assert not np.array_equal(runs, want)  # (so the check above can fail)


@pytest.mark.parametrize("cupy", [True, False], indirect=True, ids=["add_at", "scatter_add"])
def test_histograms_count_through_add_at_or_the_older_scatter_add(cupy, data):
    """The thresholds' histograms count on the device through cupy.add.at (CuPy >= 13; cupy 14
    deprecates cupyx.scatter_add, which the suite's warnings would make an error) or, in a
    cupy without it, cupyx.scatter_add: the same thresholds either way."""
    add_at = hasattr(cupy.add, "at")
    X = data[0]
    want = EDPairs(3, random_state=0, progress=False).fit([X[:250], X[250:]])
    got = EDPairs(3, random_state=0, progress=False).fit([on1(X[:250]), on1(X[250:])])
    np.testing.assert_array_equal(got.bias_, want.bias_)
    assert fc.scatter_calls and set(fc.scatter_calls) == {"add.at" if add_at else "scatter_add"}, fc.scatter_calls
