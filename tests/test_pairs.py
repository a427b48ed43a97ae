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


def test_use_refuses_float64_beyond_the_float32_range(published):
    model = edp.EDPairs(3, random_state=0).fit(published.X[:3000])
    Y = published.X[:2].astype(np.float64)
    Y[0, 1] = 1e300  # finite in float64, inf once cast to float32
    for use in (model.detect, model.latent_factors, model.decode):
        with pytest.raises(ValueError, match=r"X has values beyond the float32 range \(about ±3.4e38\)"):
            use(Y)
    Y[0, 1] = np.inf
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        model.detect(Y)
    Y[0, 1] = 3e38  # large but representable: no error, finite output
    assert np.isfinite(np.asarray(model.decode(Y))).all()


@pytest.mark.parametrize("params, message", [
    ({"n_init": 0}, "n_init must be a positive integer, got 0"),
    ({"n_init": True}, "n_init must be a positive integer, got True"),
    ({"n_init": 2.5}, "n_init must be a positive integer, got 2.5"),
    ({"max_iter": -5}, "max_iter must be a positive integer, got -5"),
    ({"refine_iter": "a"}, "refine_iter must be an integer >= 0, got 'a'"),
    ({"refine_iter": -1}, "refine_iter must be an integer >= 0, got -1"),
    ({"init_size": 0}, "init_size must be a positive integer or None, got 0"),
    ({"chunk_rows": -1}, "chunk_rows must be a positive integer or None, got -1"),
    ({"tol": "x"}, "tol must be a finite number >= 0, got 'x'"),
    ({"tol": float("nan")}, "tol must be a finite number >= 0, got nan"),
    ({"refine_tol": -1e-3}, "refine_tol must be a finite number >= 0, got -0.001"),
    ({"whiten_rtol": 2}, r"whiten_rtol must be a number in \[0, 1\), got 2"),
    ({"whiten_rtol": -1}, r"whiten_rtol must be a number in \[0, 1\), got -1"),
    ({"whiten_rtol": "a"}, r"whiten_rtol must be a number in \[0, 1\), got 'a'"),
    ({"whiten": "yes"}, "whiten must be True or False, got 'yes'"),
    ({"check_finite": None}, "check_finite must be True or False, got None"),
    ({"progress": 3}, "progress must be True, False or None, got 3"),
    ({"gradient": "x"}, "gradient must be None, a bool, a RefineConfig or a dict of its fields, got 'x'"),
    ({"random_state": -1}, "random_state must be None, a non-negative integer or a numpy Generator, got -1"),
    ({"random_state": True}, "random_state must be None, a non-negative integer or a numpy Generator, got True"),
    ({"n_concepts": True}, "n_concepts must be a positive integer, got True"),
    ({"signal": ["whole"]}, "signal must be 'positives' or 'whole'"),
])
def test_bad_hyperparameters_are_named_before_fitting(medium, params, message):
    params = {"n_concepts": 3, **params}
    with pytest.raises(ValueError, match=message):
        edp.EDPairs(**params).fit(medium.X[:2000])


def test_numpy_integer_hyperparameters_are_accepted(medium):
    X = medium.X[:2000]
    ref = edp.EDPairs(3, n_init=2, max_iter=20, chunk_rows=700, random_state=0).fit(X)
    model = edp.EDPairs(np.int64(3), n_init=np.int32(2), max_iter=np.int64(20), chunk_rows=np.uint16(700),
                        tol=np.float32(1e-6), random_state=np.int64(0)).fit(X)
    assert np.array_equal(model.decoding_, ref.decoding_)


def _rewrite_meta(src, dst, edit):
    data = dict(np.load(src))
    meta = json.loads(bytes(data["meta"]).decode())
    data["meta"] = np.frombuffer(json.dumps(edit(meta)).encode(), dtype=np.uint8)
    np.savez(dst, **data)
    return dst


def test_load_names_damaged_arrays(tmp_path):
    """A member whose bytes were damaged (zip's CRC check), pickled objects, NaN in the
    directions and cluster centres of no coordinates of the pairs are refused with the file and
    the array named (zipfile's BadZipFile and numpy's pickle error came out raw; NaN loaded, and
    detect gave NaN)."""
    import zipfile

    path = tmp_path / "pairs.npz"
    edp.EDPairs(2, random_state=0, progress=False).fit(
        np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)).save(path)
    damaged = tmp_path / "crc.npz"
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("decoding.npy")
    raw = bytearray(path.read_bytes())
    body = info.header_offset + 30 + len(info.filename) + len(info.extra)  # (stored, not compressed)
    raw[body + info.file_size - 1] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"crc\.npz' is damaged: its array 'decoding' cannot be read \(BadZipFile"):
        edp.EDPairs.load(damaged)

    def rewrite(name, edit):
        data = dict(np.load(path))
        data.update(edit(data))
        np.savez(tmp_path / name, **data)
        return tmp_path / name

    with pytest.raises(ValueError, match=r"objects\.npz' is damaged: its array 'bias' cannot be read"):
        edp.EDPairs.load(rewrite("objects.npz", lambda d: {"bias": np.array([object(), object()])}))
    nan = rewrite("nan.npz", lambda d: {"decoding": np.full_like(d["decoding"], np.nan)})
    with pytest.raises(ValueError, match=r"nan\.npz' is damaged: decoding holds NaN or Inf"):
        edp.EDPairs.load(nan)
    with pytest.raises(ValueError, match=r"cluster_centers has shape \(3,\), expected \(k, 5\)"):
        edp.EDPairs.load(rewrite("centres.npz", lambda d: {"cluster_centers": np.zeros(3)}))


def test_load_names_bad_metadata_fields(tmp_path, published):
    path = tmp_path / "pairs.npz"
    edp.EDPairs(3, random_state=0).fit(published.X[:3000]).save(path)
    cases = [
        (lambda m: {k: v for k, v in m.items() if k != "n_concepts"},
         r"field 'n_concepts' must be a positive integer; it is missing"),
        (lambda m: {**m, "n_features": "16"}, r"field 'n_features' must be a positive integer; got '16'"),
        (lambda m: {**m, "format_version": "1"}, r"field 'format_version' must be an integer; got '1'"),
        (lambda m: {**m, "params": [1, 2]}, r"field 'params' must be a JSON object"),
        (lambda m: {**m, "whitening_shrinkage": "oas"}, r"field 'whitening_shrinkage' must be a number; got 'oas'"),
        (lambda m: list(m.items()), r"not an edpairs pairs file \(its metadata is a JSON list, expected an object\)"),
    ]
    for k, (edit, message) in enumerate(cases):
        bad = _rewrite_meta(path, tmp_path / f"bad{k}.npz", edit)
        with pytest.raises(ValueError, match=message) as info:
            edp.EDPairs.load(bad)
        assert f"bad{k}.npz" in str(info.value)


@pytest.mark.parametrize("kind", ["str", "pathlib", "bytes"])
def test_save_and_load_take_str_pathlike_and_bytes_paths(tmp_path, published, kind):
    model = edp.EDPairs(3, random_state=0).fit(published.X[:3000])
    path = {"str": str, "pathlib": lambda p: p, "bytes": lambda p: bytes(p)}[kind](tmp_path / "pairs.npz")
    model.save(path)
    assert np.array_equal(edp.EDPairs.load(path).decoding_, model.decoding_)
    with pytest.raises(TypeError, match="path must be a str, bytes or os.PathLike, got int"):
        model.save(3)


def test_thresholds_are_scale_equivariant(published):
    """The detectors of c X are those of X with c times the thresholds: no absolute epsilon
    (an absolute floor on the variance of the scores changed the positives of X * 1e-18)."""
    X = published.X[:3000]
    ref = edp.EDPairs(3, random_state=0).fit(X)
    for c in (1e-18, 1e-12, 1e12):
        model = edp.EDPairs(3, random_state=0).fit(X * np.float32(c))
        assert np.array_equal(model.n_positives_, ref.n_positives_), c
        np.testing.assert_allclose(model.bias_ / c, ref.bias_, rtol=1e-4, atol=1e-4 * np.abs(ref.bias_).max())
        # Unit filters and signal vectors s = Cov(x, z) / Var(z) do not change with the scale.
        for name in ("decoding_", "encoding_"):
            np.testing.assert_allclose(getattr(model, name), getattr(ref, name), atol=1e-4, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rows_far_from_the_origin_are_refused_with_the_remedy(published, dtype):
    """The pairs compute in float32: an offset 1e5 times the spread left ~7 bits for it and
    silently flipped detections (float64 rows with an offset of 1e9 gave [3000, 0, 3000]
    positives). Below the bound the fit runs and matches the centred data's."""
    X = published.X[:3000].astype(np.float64)
    with pytest.raises(ValueError, match=r"1\.\d+e\+05 times their spread.*Centre the rows first"):
        edp.EDPairs(3, random_state=0).fit((X + 1e5).astype(dtype))
    ref = edp.EDPairs(3, random_state=0).fit(X.astype(dtype))
    model = edp.EDPairs(3, random_state=0).fit((X + 1e3).astype(dtype))  # 1.4e3 times the spread
    assert np.array_equal(model.n_positives_, ref.n_positives_)
    np.testing.assert_allclose(model.decoding_, ref.decoding_, atol=1e-4)


def test_threshold_histograms_are_the_same_in_every_library(rng):
    """The thresholds' histograms are made where the rows are (torch here on the CPU, a GPU's
    bincount on CUDA): with exact products (small integers) the thresholds equal numpy's."""
    torch = pytest.importorskip("torch")
    from edpairs._arrays import on_device_of
    from edpairs._source import ChunkSource
    from edpairs.pairs import _thresholds

    X = rng.integers(-8, 9, size=(3000, 6)).astype(np.float32)
    W = rng.integers(-3, 4, size=(4, 6)).astype(np.float64)
    truth = rng.integers(0, 4, size=3000)
    parts = np.array_split(np.arange(3000), 3)

    class Members:  # as _MemberLabels: the labels in the block's library
        def labels(self, index, block):
            return on_device_of(truth[parts[index]], block)

    args = (W, Members(), X.mean(0).astype(np.float64), np.cov(X.T))
    want = _thresholds(ChunkSource([X[p] for p in parts]), *args, bins=64)
    got = _thresholds(ChunkSource([torch.from_numpy(X[p]) for p in parts]), *args, bins=64)
    np.testing.assert_array_equal(got, want)
    assert np.unique(want).size == 4


def test_load_refuses_a_npy_file_and_arrays_that_are_not_numbers(tmp_path):
    """A .npy file (np.load gives an array, not an archive) got "'numpy.ndarray' object does
    not support the context manager protocol"; a pairs file whose arrays hold strings loaded
    and failed at detect with a ufunc error."""
    X = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    path = tmp_path / "pairs.npz"
    edp.EDPairs(2, random_state=0).fit(X).save(path)
    np.save(tmp_path / "rows.npy", X)
    with pytest.raises(ValueError, match=r"is not an edpairs pairs file: it holds one ndarray \(a \.npy file\)"):
        edp.EDPairs.load(tmp_path / "rows.npy")
    data = dict(np.load(path))
    data["bias"] = np.array(["a", "b"])
    np.savez(tmp_path / "strings.npz", **data)
    with pytest.raises(ValueError, match="bias holds <U1 values, expected real numbers"):
        edp.EDPairs.load(tmp_path / "strings.npz")


def test_save_names_a_missing_folder_or_a_folder_in_the_way_and_keeps_permissions(tmp_path):
    """The errors named write_atomic's temporary file ('.pairs.npz.x8s2.tmp'), not the path
    asked for; and the file came out private (0o600, mkstemp's mode) instead of following the
    umask, or keeping the mode of the file it replaces."""
    import os

    model = edp.EDPairs(2, random_state=0).fit(np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32))
    with pytest.raises(FileNotFoundError, match=r"cannot write .*nowhere/p\.npz: its folder .*nowhere does not exist"):
        model.save(tmp_path / "nowhere" / "p.npz")
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError, match=r"cannot write .*d\.npz: it is a folder"):
        model.save(tmp_path / "d.npz")
    assert os.listdir(tmp_path) == ["d.npz"]  # no temporary file left behind
    old = os.umask(0o027)
    try:
        model.save(tmp_path / "p.npz")
        assert os.stat(tmp_path / "p.npz").st_mode & 0o777 == 0o640
        os.chmod(tmp_path / "p.npz", 0o604)
        model.save(tmp_path / "p.npz")  # a replaced file keeps its mode
        assert os.stat(tmp_path / "p.npz").st_mode & 0o777 == 0o604
    finally:
        os.umask(old)


def test_detect_far_below_a_threshold_is_zero_without_an_overflow_warning():
    """sigmoid(z) for z below about -88 (float32): exp(-z) overflows to inf and the membership is
    0, which numpy announced with a RuntimeWarning on every report of a real network."""
    import warnings

    X = np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)
    model = edp.EDPairs(2, random_state=0).fit(X)
    far = (X * 1e4).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = model.detect(far)
    z = model.decode(far).astype(np.float64) - model.bias_
    assert np.all(y[z < -200] == 0) and np.all(y[z > 200] == 1) and (z < -200).any()


def test_fit_on_maps_without_a_head_says_to_pass_patch_rows():
    maps = np.random.default_rng(0).normal(size=(6, 3, 3, 5)).astype(np.float32)
    with pytest.raises(ValueError, match=r"got shape \(6, 3, 3, 5\) \(for a layer's .* X\.reshape\(-1, D\)"):
        edp.EDPairs(2, random_state=0).fit(maps)


def test_load_refuses_saved_parameters_a_refit_could_not_use(tmp_path):
    """A file whose parameters were edited (method="bogus") loaded, and only a refit failed."""
    path = tmp_path / "pairs.npz"
    edp.EDPairs(2, random_state=0).fit(np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32)).save(path)
    _rewrite_meta(path, tmp_path / "edited.npz", lambda m: {**m, "params": {**m["params"], "method": "bogus"}})
    with pytest.raises(ValueError, match=r"edited\.npz' holds a parameter this edpairs cannot use: method must be one of"):
        edp.EDPairs.load(tmp_path / "edited.npz")
    assert edp.EDPairs.load(path).method != "bogus"


@pytest.mark.parametrize("kw", [{"random_state": np.int64(0)}, {"n_init": np.int64(1)}, {"chunk_rows": np.int64(100)},
                                {"tol": np.float32(1e-6)}, {"whiten": np.bool_(True)},
                                {"random_state": np.random.default_rng(0)}, {"random_state": np.random.SeedSequence(0)}])
def test_saved_parameters_load_back(tmp_path, kw):
    """Parameters that fit takes (numpy scalars, a Generator or SeedSequence seed) are saved as
    load takes them back (the numbers they hold; a generator's seed as None: its state is not
    kept), not as their repr, which load refused: the file was written and could not be read."""
    X = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    pairs = edp.EDPairs(3, progress=False, **kw).fit(X)
    pairs.save(tmp_path / "p.npz")
    (name, value), = kw.items()
    loaded = edp.EDPairs.load(tmp_path / "p.npz").get_params()[name]
    assert loaded is None if isinstance(value, (np.random.Generator, np.random.SeedSequence)) else loaded == value
    assert type(loaded) in (type(None), bool, int, float)


def test_save_refuses_metadata_set_after_fit_that_json_cannot_hold(tmp_path):
    pairs = edp.EDPairs(2, random_state=0, progress=False).fit(
        np.random.default_rng(0).normal(size=(300, 5)).astype(np.float32))
    pairs.metadata = {"x": object()}
    with pytest.raises(ValueError, match="cannot save these pairs: .*metadata must be JSON-serialisable"):
        pairs.save(tmp_path / "p.npz")
    assert not (tmp_path / "p.npz").exists()


def test_float64_chunks_share_one_signal_centre(published, monkeypatch):
    """The signal pass over float64 chunks (torch here; on a GPU each merge that compares two
    centres waits for the device) gives every chunk's statistics the same centre object, so
    merging compares nothing; the fit agrees with the whole array's up to the chunks' order of
    summation (bit for bit the fit before the change, checked when it was made)."""
    torch = pytest.importorskip("torch")
    from edpairs import ops as edp_ops

    X = published.X[:3000].astype(np.float64)
    chunks = [torch.from_numpy(X[i:i + 700]) for i in range(0, 3000, 700)]
    merges = []
    real = edp_ops.SignalMoments.merge

    def merge(self, other):
        merges.append(self.center is other.center)
        return real(self, other)

    monkeypatch.setattr(edp_ops.SignalMoments, "merge", merge)
    model = edp.EDPairs(3, random_state=0).fit(chunks)
    assert merges and all(merges), merges
    monkeypatch.undo()
    ref = edp.EDPairs(3, random_state=0).fit(X)
    for name in ("decoding_", "encoding_", "bias_"):
        np.testing.assert_allclose(getattr(model, name), getattr(ref, name), rtol=1e-5, atol=1e-6, err_msg=name)
