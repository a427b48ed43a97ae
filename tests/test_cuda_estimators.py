"""The estimators on CUDA arrays (marked cuda; skipped without a CUDA build and a GPU): results in
the caller's library and device, and the same recovery as on the CPU."""

from __future__ import annotations

import numpy as np
import pytest

import edpairs as edp
from test_cuda import _BUILT, _NO_GPU

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not _BUILT, reason="edpairs was built without CUDA kernels (build_info()['cuda'] is False)"),
    pytest.mark.skipif(_NO_GPU is not None, reason=_NO_GPU or ""),
]


@pytest.fixture(scope="module")
def layer():
    return edp.synthetic.make_layer(n_images=5000, n_features=64, n_concepts=8, n_distractors=8, grid=(2, 4),
                                    train_head=False, seed=0)


def _scores(layer, model, X):
    det = model.detect(X, hard=True)
    det = det.cpu().numpy() if hasattr(det, "cpu") else np.asarray(det)
    return edp.metrics.recovery(layer, decoding=model.decoding_, encoding=model.encoding_, detections=det)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_edpairs_on_torch_cuda_matches_the_cpu_fit(layer, dtype):
    import torch

    X = torch.from_numpy(layer.X).to("cuda", getattr(torch, dtype))
    gpu = edp.EDPairs(8, random_state=0).fit(X)
    cpu = edp.EDPairs(8, random_state=0).fit(X.float().cpu().numpy())
    out = gpu.latent_factors(X[:100])
    assert out.device.type == "cuda" and out.shape == (100, 8)
    g, c = _scores(layer, gpu, X), _scores(layer, cpu, layer.X)
    assert g["mean_iou"] >= c["mean_iou"] - 0.01
    assert g["mean_cos_encoding"] >= c["mean_cos_encoding"] - 0.01
    assert g["mean_cos_decoding"] >= c["mean_cos_decoding"] - 0.01


def test_edpairs_on_cupy_matches_the_cpu_fit(layer):
    """cupy rows: the fit's every pass on cupy (its thresholds' histograms went through a
    cupyx.scatter_add that takes no int64 target), results in cupy, the CPU fit's recovery."""
    cupy = pytest.importorskip("cupy")
    X = cupy.asarray(layer.X)
    gpu = edp.EDPairs(8, random_state=0).fit(X)
    cpu = edp.EDPairs(8, random_state=0).fit(layer.X)
    out = gpu.latent_factors(X[:100])
    assert isinstance(out, cupy.ndarray) and out.shape == (100, 8)
    det = cupy.asnumpy(gpu.detect(X, hard=True))
    g = edp.metrics.recovery(layer, decoding=gpu.decoding_, encoding=gpu.encoding_, detections=det)
    c = _scores(layer, cpu, layer.X)
    assert g["mean_iou"] >= c["mean_iou"] - 0.01
    assert g["mean_cos_encoding"] >= c["mean_cos_encoding"] - 0.01


def test_spherical_kmeans_on_torch_cuda(layer):
    import torch

    X = torch.from_numpy(layer.X).to("cuda")
    km = edp.SphericalKMeans(8, random_state=0).fit(X)
    assert km.cluster_centers_.device.type == "cuda" and km.labels_.device.type == "cuda"
    ref = edp.SphericalKMeans(8, random_state=0).fit(layer.X)
    got, want = km.labels_.cpu().numpy(), np.asarray(ref.labels_)
    # This raw-space layer bunches every cosine near 0.9988: 0.2% of the rows have their
    # runner-up within 1e-6 under the CPU fit's centroids, so any other float32 summation order
    # (cuBLAS on the default route, the SIMT kernel) relabels some of them. The fits must agree
    # exactly wherever float32 can tell the choices apart (margin > 1e-5), reach the same
    # objective, and agree on nearly every row.
    Xn = layer.X.astype(np.float64)
    Xn /= np.linalg.norm(Xn, axis=1, keepdims=True)
    C_cpu = np.asarray(ref.cluster_centers_, dtype=np.float64)
    C_gpu = km.cluster_centers_.double().cpu().numpy()
    top2 = np.sort(Xn @ C_cpu.T, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-5
    np.testing.assert_array_equal(got[clear], want[clear])
    assert (got == want).mean() > 0.995
    objective = lambda C, labels: (Xn * C[labels]).sum(1).mean()  # noqa: E731
    assert abs(objective(C_gpu, got) - objective(C_cpu, want)) < 1e-6
    np.testing.assert_allclose(C_gpu, C_cpu, atol=1e-3)


def test_cuda_fit_makes_float16_rows_once(monkeypatch):
    """TF32 labels from float16 copies (EDPAIRS_ASSIGN_HALF=copies: on any GPU) in a fit: the
    rows are copied once for four passes, against once a pass without keep_half_rows, and the
    fit is the same one: labels equal (the copies are the same bits), centres to float64
    rounding (the sorted sums' float64 atomics add in a varying order)."""
    import torch
    from _helpers import make_centroids, make_rows

    from test_gemm_route import fits_with_and_without_kept_rows

    rng = np.random.default_rng(0)
    C0 = make_centroids(rng, 200, 64)
    X = torch.from_numpy(make_rows(rng, 30000, 64, C=C0)).cuda()  # (half the rows near no centroid: several passes)
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "copies")
    fits = fits_with_and_without_kept_rows(X, C0, monkeypatch)
    assert torch.equal(fits[True].labels_, fits[False].labels_)
    np.testing.assert_array_equal(fits[True].counts_, fits[False].counts_)
    torch.testing.assert_close(fits[True].cluster_centers_, fits[False].cluster_centers_, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel", ["auto", "wgmma"])
def test_cuda_small_k_fit_labels_float16_rows_kept(kernel, monkeypatch):
    """EDPAIRS_ASSIGN_HALF_SMALL_K=1: a TF32 fit at k = 64 copies its rows to float16 once and
    labels every pass from the copies (the 16-bit mma kernel, or wgmma where asked and on
    Hopper), with the fit of the float32 rows up to near ties."""
    import torch
    from _helpers import make_centroids, make_rows

    from edpairs import _gemm
    from test_gemm_route import small_k_fits

    rng = np.random.default_rng(1)
    C0 = make_centroids(rng, 64, 64)
    X = torch.from_numpy(make_rows(rng, 30000, 64, C=C0)).cuda()
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", kernel)
    if _gemm.wgmma_unavailable(X.device) is not None:
        pytest.skip("the float16 copies' default ('auto') labels only where the wgmma kernels run")
    fits = small_k_fits(X, C0, monkeypatch)
    assert (fits["1"].labels_ == fits["0"].labels_).float().mean().item() > 0.99
    torch.testing.assert_close(fits["1"].cluster_centers_, fits["0"].cluster_centers_, rtol=0, atol=1e-2)


def test_cuda_copies_through_pinned_memory():
    """to_numpy64 / to_host / on_device_of stage torch GPU copies of 1 to 64 MiB in pinned host
    memory: the same values as torch's own copies (float64, int64, bfloat16, strided; and a
    larger one, pageable), a host result that owns its memory, and device copies that later
    writes to the numpy source (or the next staged copy) do not reach."""
    import torch

    from edpairs._arrays import PINNED_MIN_BYTES, on_device_of, to_host, to_numpy64

    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(1024, 512, device="cuda", dtype=torch.float64, generator=g)  # 4 MiB
    assert big.numel() * 8 >= PINNED_MIN_BYTES
    np.testing.assert_array_equal(to_numpy64(big), big.cpu().numpy())
    np.testing.assert_array_equal(to_numpy64(big.T), big.T.cpu().numpy())
    labels = torch.randint(0, 2**40, (300000,), device="cuda", generator=g)
    np.testing.assert_array_equal(to_numpy64(labels), labels.cpu().numpy().astype(np.float64))
    half = big.to(torch.bfloat16)
    host = to_host(half)
    assert host.dtype == np.float32 and host.base is None and host.flags.writeable
    np.testing.assert_array_equal(host, half.float().cpu().numpy())
    src = np.arange(2**19, dtype=np.float32)  # 2 MiB
    on = [on_device_of(src, big)]
    src[:] = -1
    on.append(on_device_of(src, big))
    torch.cuda.synchronize()
    np.testing.assert_array_equal(on[0].cpu().numpy(), np.arange(2**19, dtype=np.float32))
    assert (on[1] == -1).all() and on[0].device == big.device
    huge = torch.randn(2**25, device="cuda", generator=g)  # 128 MiB: past PINNED_MAX_BYTES, a pageable copy
    np.testing.assert_array_equal(to_numpy64(huge), huge.cpu().numpy())
