"""edpairs.stream.DeviceChunks: host data handed to the estimators piece by piece on a device.
On the CPU the same pieces as plain tensors (the fits agree with fits of the host data); on a
GPU (marked cuda) the pieces cross through pinned buffers on a copy stream while the caller's
stream computes, and the results equal those of the data already on the device."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import edpairs as edp  # noqa: E402
from edpairs.stream import DeviceChunks, _clear_cuda_error  # noqa: E402
from test_cuda import _BUILT, _NO_GPU  # noqa: E402



def cuda(test):
    """Marked cuda; skipped without a CUDA build and a visible GPU."""
    for mark in (pytest.mark.cuda, pytest.mark.skipif(not _BUILT, reason="edpairs was built without CUDA kernels"),
                 pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or "")):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def layer():
    return edp.synthetic.make_layer(n_images=1500, n_features=32, n_concepts=6, n_distractors=4, grid=(2, 2),
                                    train_head=False, seed=1)


def test_pieces_cover_the_data_in_order_and_respect_the_size(layer):
    X = layer.X
    src = DeviceChunks([X[:1000], X[1000:]], device="cpu", chunk_bytes=300 * X.shape[1] * 4)
    pieces = list(src.chunks())
    assert all(isinstance(p, torch.Tensor) and p.device.type == "cpu" for p in pieces)
    assert max(p.shape[0] for p in pieces) == 300
    np.testing.assert_array_equal(torch.cat(pieces).numpy(), X)
    again = torch.cat(list(src.chunks())).numpy()  # re-iterable: the fits read it several times
    np.testing.assert_array_equal(again, X)
    half = DeviceChunks(X, device="cpu", dtype="float16")
    assert all(p.dtype == torch.float16 for p in half.chunks())


def test_fits_through_device_chunks_match_the_host_fit(layer, tmp_path):
    X = layer.X
    host = edp.EDPairs(6, random_state=0, progress=False).fit(X)
    streamed = edp.EDPairs(6, random_state=0, progress=False).fit(
        DeviceChunks(X, device="cpu", chunk_bytes=997 * X.shape[1] * 4))
    np.testing.assert_allclose(streamed.decoding_, host.decoding_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(streamed.encoding_, host.encoding_, rtol=1e-4, atol=1e-5)
    km = edp.SphericalKMeans(6, random_state=0).fit(X)
    km_s = edp.SphericalKMeans(6, random_state=0).fit(DeviceChunks(X, device="cpu", chunk_bytes=4096))
    np.testing.assert_allclose(np.asarray(km_s.cluster_centers_), km.cluster_centers_, atol=1e-5)
    assert km_s.n_iter_ == km.n_iter_


def test_an_activation_store_streams_through(layer, tmp_path):
    """Store shards are read-only memory maps: streamed as copies, no warning, same fit."""
    torch_x = torch.from_numpy(layer.images()).permute(0, 3, 1, 2).contiguous()   # (n, D, h, w) "images"
    model = torch.nn.Sequential(torch.nn.Identity())
    store = edp.extract(model, "0", torch_x, tmp_path / "store", images_per_shard=400, dtype="float32",
                        progress=False)
    host = edp.EDPairs(6, random_state=0, progress=False).fit(store)
    streamed = edp.EDPairs(6, random_state=0, progress=False).fit(DeviceChunks(store, device="cpu"))
    np.testing.assert_allclose(streamed.decoding_, host.decoding_, rtol=1e-5, atol=1e-6)
    assert sum(int(p.shape[0]) for p in DeviceChunks(store, device="cpu").chunks()) == layer.X.shape[0]


def test_bad_arguments(layer):
    with pytest.raises(ValueError, match="buffers must be >= 2"):
        DeviceChunks(layer.X, device="cpu", buffers=1)
    with pytest.raises(ValueError, match="chunk_bytes"):
        DeviceChunks(layer.X, device="cpu", chunk_bytes=0)
    with pytest.raises(TypeError, match="one-shot iterator"):
        DeviceChunks(iter([layer.X]), device="cpu")
    with pytest.raises(AttributeError, match="URA needs whole images"):
        DeviceChunks(layer.X, device="cpu").images()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cpu'"):
            DeviceChunks(layer.X)


@cuda
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_cuda_pieces_survive_slow_consumers(layer, dtype):
    """Small pieces and a slow kernel on the caller's stream after each: if a buffer were
    refilled before the caller's work on it had run, the per-piece sums would be wrong."""
    X16 = layer.X.astype(np.float16)
    src = DeviceChunks(X16, chunk_bytes=64 * X16.shape[1] * 2, dtype=dtype)
    big = torch.randn(2048, 2048, device="cuda")
    sums = []
    for p in src.chunks():
        for _ in range(3):
            big = big @ big / 2048.0                 # keeps the stream busy while copies run
        sums.append(p.double().sum(0))
    got = torch.stack(sums).sum(0).cpu().numpy()
    np.testing.assert_allclose(got, X16.astype(np.float64).sum(0), rtol=1e-9)
    assert src.bytes_copied == X16.nbytes


@cuda
def test_cuda_fit_from_host_chunks_matches_the_device_fit(layer):
    X = layer.X
    on_device = edp.EDPairs(6, random_state=0, progress=False).fit(torch.from_numpy(X).cuda())
    streamed = edp.EDPairs(6, random_state=0, progress=False).fit(DeviceChunks(X, chunk_bytes=200 * X.shape[1] * 4))
    np.testing.assert_allclose(streamed.decoding_, on_device.decoding_, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(streamed.encoding_, on_device.encoding_, rtol=1e-4, atol=1e-5)


def test_pinned_staging_copy_splits_rows_over_threads(rng):
    """The staging copy into pinned memory, split over a thread pool, equals a plain copy for
    piece sizes that do and do not divide evenly (and small pieces copy in one go)."""
    from concurrent.futures import ThreadPoolExecutor

    from edpairs.stream import _copy_rows

    with ThreadPoolExecutor(3) as pool:
        for rows, cols in [(5, 3), (4099, 1024), (12_289, 256)]:
            src = rng.standard_normal((rows, cols)).astype(np.float32)
            dst = np.full_like(src, np.nan)
            _copy_rows(dst, src, pool, 3)
            np.testing.assert_array_equal(dst, src)
    dst = np.zeros((7, 2))
    _copy_rows(dst, np.ones((7, 2)), None, 1)
    assert (dst == 1).all()
    with pytest.raises(ValueError, match="copy_threads must be >= 1"):
        DeviceChunks(np.zeros((4, 2), np.float32), device="cpu", copy_threads=0)


def test_register_needs_arrays_that_stay_in_memory(layer):
    with pytest.raises(TypeError, match=r"register=True\) needs data that stays in memory"):
        DeviceChunks(lambda: iter([layer.X]), device="cpu", register=True)
    src = DeviceChunks([layer.X[:10], layer.X[10:]], device="cpu", register=True)
    assert src.register and "register=True" in repr(src)
    src.close()  # nothing registered on the CPU path: a no-op


def test_only_pieces_inside_registered_spans_are_copied_directly(layer):
    """_in_registered: the direct (page-locked) copy is taken only for bytes inside a
    registered span; nothing registered, or a piece of another array, stays staged."""
    X, other = np.ascontiguousarray(layer.X), np.ones((10, 4), np.float32)
    src = DeviceChunks(X, device="cpu", register=True)
    assert not src._in_registered(X[:5])  # nothing registered yet
    base = X.__array_interface__["data"][0]
    src._registered = [(base, X.nbytes)]
    assert src._in_registered(X[:5]) and src._in_registered(X[-3:]) and not src._in_registered(other)
    src._registered = [(base, X[:5].nbytes)]
    assert not src._in_registered(X[4:6])  # reaches past the span
    src._registered = None


def test_page_spans_merge_views_and_keep_apart_what_is_apart():
    from edpairs.stream import _page_spans

    page = 4096
    X = np.zeros((1000, 37), np.float32)  # 148,000 bytes: views of it share pages
    base = X.__array_interface__["data"][0]
    views = [X[s:s + 77] for s in range(0, 1000, 77)]
    (ptr, size, ro), = _page_spans(views, page)
    assert ptr == base // page * page and ptr + size >= base + X.nbytes and size % page == 0
    assert size - X.nbytes < 2 * page and not ro
    # A strided view (every other row, reversed: rows 999, 997, .., 1) spans from row 1's page
    # to the last page (row 0's bytes may lie on a page of their own: that depends on the address).
    (p2, s2, _), = _page_spans([X[::-2]], page)
    assert p2 == (base + 37 * 4) // page * page and p2 + s2 == ptr + size
    # Pieces far apart stay separate spans; a read-only one is flagged. Both are cut from one
    # buffer, 40 pages apart: two separate allocations may lie next to each other (malloc puts
    # them wherever it likes), and spans that touch are merged, as they must be.
    buf = np.ones(100 * page, np.uint8)
    A, B = buf[:10 * page], buf[50 * page:60 * page]
    B.flags.writeable = False
    spans = _page_spans([B, A, np.zeros(0)], page)
    assert len(spans) == 2 and [ro for _, _, ro in spans] == [False, True]
    assert all(p % page == 0 and s % page == 0 for p, s, _ in spans)
    # Touching spans merge, and the merged span is read-only if any part of it is.
    (p3, s3, ro3), = _page_spans([buf[10 * page:20 * page][::-1], buf[:10 * page]], page)
    assert not ro3 and 20 * page <= s3 <= 21 * page
    (p4, s4, ro4), = _page_spans([buf[:50 * page], B], page)
    assert ro4 and p4 <= buf.__array_interface__["data"][0] and p4 + s4 >= B.__array_interface__["data"][0] + B.nbytes


@cuda
def test_cuda_registered_source_streams_the_same_and_unregisters(layer):
    """register=True: pieces straight from the page-locked host array equal the staged ones
    (also for a converting dtype), close() unregisters (registering the same spans again then
    succeeds), a non-contiguous array is not registered and its pieces are staged; and a failed
    unregister leaves no pending error in torch's CUDA runtime (_clear_cuda_error), which would
    otherwise surface at the next kernel launch."""
    X = np.ascontiguousarray(layer.X)
    for dtype in (None, "float16"):
        staged = torch.cat([p.clone() for p in DeviceChunks(X, chunk_bytes=100 * X.shape[1] * 4, dtype=dtype).chunks()])
        with DeviceChunks([X[:333], X[333:]], chunk_bytes=100 * X.shape[1] * 4, dtype=dtype, register=True) as src:
            direct = torch.cat([p.clone() for p in src.chunks()])
            again = torch.cat([p.clone() for p in src.chunks()])  # registered once, two passes
            spans = list(src._registered)
        assert torch.equal(direct, staged) and torch.equal(again, staged)
    cudart = torch.cuda.cudart()
    assert spans and all(int(cudart.cudaHostRegister(p, n, 0)) == 0 for p, n in spans)
    assert all(int(cudart.cudaHostUnregister(p)) == 0 for p, _ in spans)
    strided = X[:, ::2]
    with DeviceChunks(strided, register=True) as src:
        got = torch.cat([p.clone() for p in src.chunks()]).cpu().numpy()
        assert src._registered == []
    np.testing.assert_array_equal(got, strided)
    assert int(cudart.cudaHostUnregister(spans[0][0])) != 0  # not registered: an error is pending
    _clear_cuda_error()
    assert float((torch.ones(4, device="cuda") * 2).sum()) == 8.0  # the next launch reports no stale error


def test_arguments_are_checked_in_the_constructor(layer):
    """dtype=np.float16 or "device" was taken and the first chunk raised torch's TypeError,
    buffers="2" / chunk_bytes=None gave "'<' not supported", buffers=2.5 was cut to 2, and
    device="meta" failed deep inside the fit: each is named at construction now."""
    X = layer.X
    for kwargs, expect in [(dict(dtype="device"), "dtype must be None .* or one of float32.*got 'device'"),
                           (dict(dtype="int8"), "dtype must be .*got 'int8'"),
                           (dict(dtype=torch.complex64), "dtype must be .*got torch.complex64"),
                           (dict(dtype=object()), "dtype must be .*got <object"),
                           (dict(buffers="2"), "buffers must be >= 2, an integer .*got '2'"),
                           (dict(buffers=2.5), "buffers must be >= 2, an integer .*got 2.5"),
                           (dict(chunk_bytes=None), "chunk_bytes must be a positive integer, got None"),
                           (dict(chunk_bytes=1e3), "chunk_bytes must be a positive integer, got 1000.0"),
                           (dict(copy_threads=0), "copy_threads must be >= 1, an integer .*got 0"),
                           (dict(copy_threads="4"), "copy_threads must be >= 1, an integer .*got '4'"),
                           (dict(register="no"), "register must be True or False, got 'no'")]:
        with pytest.raises(ValueError, match=expect):
            DeviceChunks(X, device="cpu", **kwargs)
    for device, expect in [("meta", "device must be a CUDA device or 'cpu' .*got 'meta'"),
                           ("gpu0", "device must be a CUDA device .*got 'gpu0'")]:
        with pytest.raises(ValueError, match=expect):
            DeviceChunks(X, device=device)
    # A numpy float dtype stands for torch's of the same name.
    assert {p.dtype for p in DeviceChunks(X[:10], device="cpu", dtype=np.float16).chunks()} == {torch.float16}
    assert DeviceChunks(X, device="cpu", dtype="bfloat16", buffers=np.int64(3)).buffers == 3
