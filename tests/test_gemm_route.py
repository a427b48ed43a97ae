"""The library-product route of moments and signal moments (edpairs._gemm): its algebra on
CPU torch tensors (the same functions the CUDA route runs, with torch's CPU products), the
detector-epilogue binding on the CPU, and on a GPU the route against the float64 reference,
the kernel route and the CPU epilogue; the TF32 flag restored after every call."""

from __future__ import annotations

import contextlib
import re
from types import SimpleNamespace

import numpy as np
import pytest
from _helpers import (
    TOL,
    Tol,
    assert_results_agree,
    assert_scatter_close,
    check_assignment,
    check_moments,
    check_signal_moments,
    make_centroids,
    make_rows,
    make_signal_data,
    to_numpy,
)

import edpairs
from edpairs import _gemm, ops, reference
from edpairs._arrays import Namespace
from edpairs._backend import lib

torch = pytest.importorskip("torch")


def t(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------------------
# The route's algebra on CPU torch tensors


@pytest.mark.parametrize("rows", [1, 7, 500, 10_000])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_route_moments_match_reference(rows, dtype, rng):
    X = (rng.standard_normal((1201, 23)) @ rng.standard_normal((23, 23)) + 50).astype(np.float32)
    Xt = t(X).to(getattr(torch, dtype))
    mean, m2 = _gemm.moments(Xt, precision="float32", rows=rows, lib=lib())
    assert mean.dtype == torch.float64 and m2.dtype == torch.float64
    check_moments(ops.Moments(1201, mean, m2), Xt.double().numpy())


def test_route_moments_shift_from_a_sample_of_the_first_step(rng, monkeypatch):
    """The moments' shift is the mean of SHIFT_ROWS rows spread over the first step (not of the
    whole step, a float64 copy of it): the moments stay exact where the first rows are ordered
    (the first quarter 40 away from the rest), and with a shift of as few as 3 rows."""
    X = (rng.standard_normal((12000, 9)) + 1000).astype(np.float32)
    X[:3000] += 40
    sums = []
    real = torch.Tensor.sum
    monkeypatch.setattr(torch.Tensor, "sum", lambda self, *a, **k: sums.append(tuple(self.shape)) or real(self, *a, **k))
    mean, m2 = _gemm.moments(t(X), precision="float32", rows=10000, lib=lib())
    assert sums[0] == (_gemm.SHIFT_ROWS, 9) == (4096, 9)
    check_moments(ops.Moments(12000, mean, m2), X)
    monkeypatch.setattr(_gemm, "SHIFT_ROWS", 3)
    sums.clear()
    mean, m2 = _gemm.moments(t(X), precision="float32", rows=10000, lib=lib())
    assert sums[0] == (3, 9)
    check_moments(ops.Moments(12000, mean, m2), X)


def test_route_moments_strided_rows(rng):
    X = (rng.standard_normal((300, 12)) + 3).astype(np.float32)
    wide = torch.zeros((300, 16))
    wide[:, :12] = t(X)
    mean, m2 = _gemm.moments(wide[:, :12], precision="float32", rows=64, lib=lib())
    check_moments(ops.Moments(300, mean, m2), X)


@pytest.mark.parametrize("rows", [1, 13, 4000])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_route_signal_moments_match_reference(rows, center, dtype, rng):
    X, W, b, c = make_signal_data(rng, 900, 17, 9, center=center, offset=3.0)
    Xt = t(X).to(getattr(torch, dtype))
    Xv = Xt.double().numpy()
    keep = np.ones(len(Xv), bool)
    if dtype != "float32":  # rounding X to bfloat16 moves z: keep the rows still safe
        from _helpers import near_zero_rows

        keep = ~near_zero_rows(Xv, W, b, c)
        Xt, Xv = Xt[torch.from_numpy(keep)], Xv[keep]
    fields = _gemm.signal_moments(Xt, t(W), t(b), t(c), precision="float32", rows=rows, lib=lib())
    check_signal_moments(ops.SignalMoments(*fields, t(c)), Xv, W, b, center=c)


@pytest.mark.parametrize("rows", [4096, 4100, 20_000])
def test_route_batched_blocks(rows, rng, monkeypatch):
    """Steps of >= 2 BLOCK_ROWS rows run one batched product over blocks plus the remainder (the
    full product's, EDPAIRS_GEMM_GRAM=cublas: exact products form the triangle by default)."""
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cublas")
    monkeypatch.setattr(_gemm, "BLOCK_ROWS", 1000)
    X = (rng.standard_normal((9001, 19)) + 7).astype(np.float32)
    mean, m2 = _gemm.moments(t(X), precision="float32", rows=rows, lib=lib())
    check_moments(ops.Moments(9001, mean, m2), X)
    Xs, W, b, c = make_signal_data(rng, 9001, 19, 5, center=True)
    fields = _gemm.signal_moments(t(Xs), t(W), t(b), t(c), precision="float32", rows=rows, lib=lib())
    check_signal_moments(ops.SignalMoments(*fields, t(c)), Xs, W, b, center=c)


@pytest.mark.parametrize("knob", ["0", "700", "100000"])
def test_route_block_rows_knob(knob, rng, monkeypatch):
    """EDPAIRS_GEMM_BLOCK_ROWS: 0 = one product per step, else blocks of that many rows (more
    than a step: one product); the moments are the same. (It serves the full product, which
    exact float32 products take with EDPAIRS_GEMM_GRAM=cublas.)"""
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cublas")
    monkeypatch.setenv("EDPAIRS_GEMM_BLOCK_ROWS", knob)
    assert _gemm.block_rows() == int(knob)
    X = (rng.standard_normal((5003, 11)) + 9).astype(np.float32)
    mean, m2 = _gemm.moments(t(X), precision="float32", rows=3000, lib=lib())
    check_moments(ops.Moments(5003, mean, m2), X)
    monkeypatch.setenv("EDPAIRS_GEMM_BLOCK_ROWS", "-2")
    for gram in ("cublas", "triangle"):  # checked where the triangle leaves it unused too
        monkeypatch.setenv("EDPAIRS_GEMM_GRAM", gram)
        with pytest.raises(ValueError, match="EDPAIRS_GEMM_BLOCK_ROWS must be a non-negative integer, got '-2'"):
            _gemm.moments(t(X), precision="float32", rows=3000, lib=lib())


def test_route_scratch_bounds(rng, monkeypatch):
    """Wide rows get shorter default steps; the batched product splits its blocks over several
    calls and the assignment its dots over shorter steps when the scratch bound says so, with
    the same results."""
    assert _gemm.default_rows(512) == _gemm.DEFAULT_ROWS
    assert _gemm.default_rows(512 + 3 * 256) == _gemm.DEFAULT_ROWS
    assert _gemm.default_rows(4096 + 3 * 4096) == 2**30 // (4 * 16384)
    assert _gemm.default_rows(10**9) == 1024
    # EDPAIRS_GEMM_OVERLAP=1 holds two steps' scratch: half each (the moments at D = 512 keep
    # their rows; the signal moments' two lanes at D = 512, I = 256 get 104857 each).
    monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", "1")
    assert _gemm.default_rows(512) == _gemm.DEFAULT_ROWS
    assert _gemm.default_rows(512 + 3 * 256) == 2**29 // (4 * 1280) == 104857
    assert _gemm.default_rows(4096 + 3 * 4096) == 2**30 // (4 * 16384) // 2
    monkeypatch.delenv("EDPAIRS_GEMM_OVERLAP")
    X = (rng.standard_normal((9001, 19)) + 7).astype(np.float32)
    monkeypatch.setattr(_gemm, "BLOCK_ROWS", 500)
    monkeypatch.setattr(_gemm, "SCRATCH_BYTES", 16 * 19 * 19 * 2)  # two blocks per batched call
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cublas")  # the batched full product
    mean, m2 = _gemm.moments(t(X), precision="float32", rows=9001, lib=lib())
    check_moments(ops.Moments(9001, mean, m2), X)
    monkeypatch.delenv("EDPAIRS_GEMM_GRAM")
    C = make_centroids(rng, 40, 19)
    Xa = make_rows(rng, 3000, 19, C=C)
    monkeypatch.setattr(_gemm, "SCRATCH_BYTES", 4 * 40 * 100)  # steps of 100 rows
    res = _route_assign(t(Xa), t(C), rows=5000)
    check_assignment(res, Xa, C)
    # With a centre the scratch holds the centred rows too, two buffers of them with the overlap.
    steps = []
    centred = _gemm.centred_steps
    monkeypatch.setattr(_gemm, "centred_steps", lambda *a, **kw: (steps.append(a[5]), centred(*a, **kw))[1])
    center = Xa.mean(0).astype(np.float32)
    monkeypatch.setattr(_gemm, "SCRATCH_BYTES", 4 * (40 + 2 * 19) * 100)
    for knob, rows in (("0", 4 * (40 + 2 * 19) * 100 // (4 * (40 + 19))), ("1", 100)):
        monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", knob)
        res = _route_assign(t(Xa), t(C), center=t(center), rows=5000)
        assert steps[-1] == rows
        check_assignment(res, Xa, C, center=center)


def test_route_signal_moments_equal_the_cpu_kernel(rng):
    X, W, b, c = make_signal_data(rng, 2000, 40, 16, center=True)
    fields = _gemm.signal_moments(t(X), t(W), t(b), t(c), precision="float32", rows=333, lib=lib())
    cpu = ops.signal_moments(X, W, b, center=c)
    for name, got in zip(("count", "sum_x", "sum_z", "sum_zz", "sum_xz"), fields):
        want = getattr(cpu, name)
        if name == "count":
            np.testing.assert_array_equal(got.numpy(), want)
        else:
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _route_runs(X, Xs, W, b, c, C, rows):
    """The three routes' outputs on the same data: the moments and an assignment with a centre
    (exact: the overlap only moves the centring), then the signal moments with a centre and on
    bfloat16 rows (both centre or convert a copy; their steps may be dealt to two lanes)."""
    out = list(_gemm.moments(t(X), precision="float32", rows=rows, lib=lib()))
    res = _route_assign(t(Xs), t(C), center=t(c), rows=rows)
    out += [res.labels, res.scores, res.sums, res.counts]
    signal = list(_gemm.signal_moments(t(Xs), t(W), t(b), t(c), precision="float32", rows=rows, lib=lib()))
    signal += _gemm.signal_moments(t(Xs).to(torch.bfloat16), t(W), t(b), None, precision="float32", rows=rows,
                                   lib=lib())
    return out, signal


def test_route_signal_moments_refuse_what_the_bindings_refuse(rng, monkeypatch):
    """ops.signal_moments on the route (CPU torch tensors sent there) refuses the shapes the
    kernels' bindings refuse, in their words: torch's products would have broadcast a b of shape
    (1,) over every concept and answered for D = 0 (a reviewer's finding)."""
    X, W, b, c = make_signal_data(rng, 200, 6, 3, center=True)
    monkeypatch.setattr(_gemm, "applies", lambda X, xp: True)
    cases = [((t(X), t(W), t(b[:1])), {}, r"b must have shape \(I\) = \(3,\), got \(1,\)"),
             ((t(X), t(W), t(b[None])), {}, r"b must have shape \(I\) = \(3,\), got \(1, 3\)"),
             ((t(X), t(W), t(b)), {"center": t(c[:5])}, r"center must have shape \(D\) = \(6,\), got \(5,\)"),
             ((t(X), t(W[:5]), t(b)), {}, r"W must be \(D, I\) with D = X.shape\[1\]"),
             ((t(X[:, :0]), t(W[:0]), t(b)), {}, r"X must have at least one column, got shape \(200, 0\)")]
    for args, kw, message in cases:
        with pytest.raises(ValueError, match=message):
            ops.signal_moments(*args, **kw)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="b must have shape"):  # the kernels' binding says the same
        ops.signal_moments(t(X), t(W), t(b[:1]))


@pytest.mark.parametrize("rows", [1, 7, 333, 5000])
def test_route_overlap_changes_nothing(rows, rng, monkeypatch):
    """EDPAIRS_GEMM_OVERLAP=1 (on CUDA on a second stream): the moments and the assignment,
    whose steps are centred into one of two buffers ahead of their products, bit for bit what
    one buffer gives; the signal moments, whose steps alternate between two lanes, equal to
    float64 rounding (counts exactly) and the same run to run; for one step, several and a
    ragged last one; bad values refused."""
    X = (rng.standard_normal((1201, 23)) @ rng.standard_normal((23, 23)) + 50).astype(np.float32)
    Xs, W, b, c = make_signal_data(rng, 1201, 23, 9, center=True, offset=3.0)
    C = make_centroids(rng, 30, 23)
    runs = {}
    for knob in ("0", "1", "1 again"):
        monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", knob[0])
        assert _gemm.centre_overlap() == (knob[0] == "1")
        runs[knob] = _route_runs(X, Xs, W, b, c, C, rows)
    for a, b_ in zip(runs["0"][0], runs["1"][0]):
        np.testing.assert_array_equal(a.numpy(), b_.numpy())
    for a, b_, again in zip(runs["0"][1], runs["1"][1], runs["1 again"][1]):
        np.testing.assert_array_equal(b_.numpy(), again.numpy())
        np.testing.assert_allclose(b_.numpy(), a.numpy(), rtol=1e-12, atol=1e-12 * float(np.abs(a.numpy()).max()))
    check_moments(ops.Moments(1201, *runs["1"][0][:2]), X)
    check_signal_moments(ops.SignalMoments(*runs["1"][1][:5], t(c)), Xs, W, b, center=c)
    monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", "yes")
    with pytest.raises(ValueError, match="EDPAIRS_GEMM_OVERLAP must be '0' or '1', got 'yes'"):
        _gemm.moments(t(X), precision="float32", rows=rows, lib=lib())


def test_centred_steps_use_two_buffers_in_turn(rng, monkeypatch):
    """With the overlap the step after next reuses a buffer, and the next step, centred ahead
    of this step's products, leaves this step's rows as they are."""
    X = torch.from_numpy(rng.standard_normal((10, 3)).astype(np.float32))
    shift = torch.full((3,), 0.5)
    monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", "1")
    seen = []
    for first, last, xt in _gemm.centred_steps(torch, lib(), X, shift, None, 4):
        np.testing.assert_array_equal(xt.numpy(), (X[first:last] - shift).numpy())
        seen.append((first, last, xt.data_ptr()))
    assert [s[:2] for s in seen] == [(0, 4), (4, 8), (8, 10)]
    assert seen[0][2] != seen[1][2] and seen[0][2] == seen[2][2]


def test_route_rejects_an_empty_step(rng):
    with pytest.raises(ValueError, match="workspace_rows"):
        _gemm.moments(t(rng.standard_normal((5, 2)).astype(np.float32)), precision="float32", rows=0, lib=lib())


def test_route_knob(monkeypatch):
    X = torch.zeros((4, 3))
    monkeypatch.delenv("EDPAIRS_GEMM_ROUTE", raising=False)
    assert _gemm.route() == "gemm"
    from edpairs._arrays import namespace_of

    assert not _gemm.applies(X, namespace_of(X))  # CPU tensors keep the CPU kernels
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "cublas")
    with pytest.raises(ValueError, match="EDPAIRS_GEMM_ROUTE must be one of"):
        _gemm.route()


def test_which_assignments_take_the_route(monkeypatch):
    class CudaLike:  # a torch CUDA float32 namespace, without a GPU
        name = "torch"

        def is_cuda(self, x):
            return True

        def dtype_name(self, x):
            return "float32"

    X, xp = torch.zeros((4, 3)), CudaLike()
    monkeypatch.delenv("EDPAIRS_GEMM_ROUTE", raising=False)
    assert _gemm.assign_applies(X, xp, 64, "float32")  # exact: always the route
    assert not _gemm.assign_applies(X, xp, 64, "tf32")  # small k, TF32: the fused kernel
    assert _gemm.assign_applies(X, xp, _gemm.TF32_MIN_K, "tf32")
    # TF32 about a centre: the route (it centres the rows before the product; the kernels'
    # error would go with ||x||), at every k, wgmma or not
    assert _gemm.assign_applies(X, xp, 64, "tf32", centred=True)
    monkeypatch.setattr(_gemm, "wgmma_labels_tf32", lambda X: True)
    assert not _gemm.assign_applies(X, xp, 1024, "tf32")
    assert _gemm.assign_applies(X, xp, 1024, "tf32", centred=True)
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")
    assert not _gemm.assign_applies(X, xp, 64, "tf32", centred=True)  # asked for: the kernels
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    assert _gemm.assign_applies(X, xp, 64, "tf32")
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")
    assert not _gemm.assign_applies(X, xp, 1024, "float32")
    assert not _gemm.assign_applies(torch.zeros((0, 3)), xp, 1024, "float32")  # no rows


@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_matmul_precision_restores_the_flag(before, precision):
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    try:
        matmul.allow_tf32 = before
        with _gemm.matmul_precision(torch, precision):
            assert matmul.allow_tf32 == (precision == "tf32")
        assert matmul.allow_tf32 == before
        with pytest.raises(KeyError):
            with _gemm.matmul_precision(torch, precision):
                raise KeyError("inside")
        assert matmul.allow_tf32 == before
    finally:
        matmul.allow_tf32 = old


@pytest.mark.parametrize("precision", ["float32", "tf32"])
@pytest.mark.parametrize("mode", ["highest", "high", "medium"])
def test_matmul_precision_leaves_the_callers_setting_readable(mode, precision):
    """After a caller's torch.set_float32_matmul_precision, the block leaves the setting as it
    was and readable (writing the old allow_tf32 flag after "medium" made torch refuse to read
    it; a reviewer's finding)."""
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(mode)
        with _gemm.matmul_precision(torch, precision):
            assert _gemm._tf32_flag(torch) == (precision == "tf32")
        assert torch.get_float32_matmul_precision() == mode
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("precision", ["float32", "tf32"])
@pytest.mark.parametrize("setting", ["ieee", "tf32"])
def test_matmul_precision_speaks_the_newer_api_where_the_caller_did(setting, precision):
    """A caller that set torch.backends.cuda.matmul.fp32_precision (torch >= 2.9) gets that
    setting back, still readable through it (the legacy flag would refuse to read a mix)."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision setting")
    before = torch.get_float32_matmul_precision()
    try:
        matmul.fp32_precision = setting
        with _gemm.matmul_precision(torch, precision):
            assert _gemm._tf32_flag(torch) == (precision == "tf32")
        assert matmul.fp32_precision == setting
    finally:
        torch.set_float32_matmul_precision(before)


def test_estimators_products_are_exact_whatever_torchs_tf32_setting(rng, monkeypatch):
    """Namespace.matmul, which the estimators' own products take (the whitened row scales, the
    thresholds' histograms, decode / detect), runs torch CUDA products in exact float32 even
    where the caller allowed TF32 for training (a reviewer's finding: they followed the flag);
    on CUDA the flag is what changes cuBLAS, here it is what the spy sees inside the product."""
    from edpairs._arrays import Namespace

    xp = Namespace("torch")
    seen = []

    class Spy(torch.Tensor):  # records the TF32 setting at the moment of the product
        def __matmul__(self, other):
            seen.append(_gemm._tf32_flag(torch))
            return torch.Tensor.__matmul__(self, other)

    monkeypatch.setattr(Namespace, "is_cuda", lambda self, x: True)
    a = torch.ones((2, 3)).as_subclass(Spy)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        out = xp.matmul(a, torch.ones((3, 4)))
        assert seen == [False] and _gemm._tf32_flag(torch)  # exact inside, the caller's flag after
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert torch.equal(out.as_subclass(torch.Tensor), torch.full((2, 4), 3.0))


def test_knob_precision(monkeypatch):
    monkeypatch.delenv("EDPAIRS_MOMENTS", raising=False)
    assert _gemm.knob_precision("float32", "EDPAIRS_MOMENTS") == "float32"
    assert _gemm.knob_precision("tf32", "EDPAIRS_MOMENTS") == "tf32"
    monkeypatch.setenv("EDPAIRS_MOMENTS", "tf32")
    assert _gemm.knob_precision("float32", "EDPAIRS_MOMENTS") == "tf32"


# ---------------------------------------------------------------------------------------
# The detector epilogue (lib().signal_masks) on the CPU


def _masks_reference(z, count, sum_z, sum_zz):
    m = z > 0
    out = np.concatenate([m.astype(np.float32), np.where(m, z, 0).astype(np.float32)], axis=1)
    zz = np.where(m, z.astype(np.float64), 0)
    return out, count + m.sum(0), sum_z + zz.sum(0), sum_zz + (zz * zz).sum(0)


def _run_masks(z, count, sum_z, sum_zz, device="cpu"):
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    zt = t(z).to(device)
    out = torch.full((z.shape[0], 2 * z.shape[1]), float("nan"), device=device)  # poisoned
    ct, st, sst = (t(a.copy()).to(device) for a in (count, sum_z, sum_zz))  # not the caller's arrays
    plan = lib().SignalMasks(c(zt), c(out), c(ct), c(st), c(sst))
    plan.run(z.shape[0], 0 if device == "cpu" else int(torch.cuda.current_stream().cuda_stream))
    return out.cpu().numpy(), ct.cpu().numpy(), st.cpu().numpy(), sst.cpu().numpy()


def test_signal_masks_adds_to_the_sums(rng):
    z = rng.standard_normal((37, 5)).astype(np.float32)
    z[3, :] = 0.0  # exactly zero is not a positive
    z[4, 0] = -0.0
    count, sum_z, sum_zz = np.array([1, 0, 2, 0, 5]), np.full(5, 0.5), np.full(5, 0.25)
    got = _run_masks(z, count, sum_z, sum_zz)
    want = _masks_reference(z, count, sum_z, sum_zz)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-12)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-12)


def test_signal_masks_checks_its_arrays():
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    z = torch.zeros((4, 3))
    good = dict(out=torch.zeros((4, 6)), count=torch.zeros(3, dtype=torch.int64),
                sum_z=torch.zeros(3, dtype=torch.float64), sum_zz=torch.zeros(3, dtype=torch.float64))
    for name, bad, msg in [("out", torch.zeros((4, 5)), "out must have shape"),
                           ("count", torch.zeros(3), "count must be int64"),
                           ("sum_zz", torch.zeros(4, dtype=torch.float64), "sum_zz must have shape")]:
        args = dict(good, **{name: bad})
        with pytest.raises(ValueError, match=msg):
            lib().SignalMasks(c(z), c(args["out"]), c(args["count"]), c(args["sum_z"]), c(args["sum_zz"]))
    plan = lib().SignalMasks(c(z), *(c(good[n]) for n in ("out", "count", "sum_z", "sum_zz")))
    with pytest.raises(ValueError, match=r"rows \[0, 5\) outside \[0, 4\)"):
        plan.run(5, 0)


# ---------------------------------------------------------------------------------------
# The assignment's pieces and the assignment on the route (CPU torch)


def _route_assign(X, C, center=None, row_scale=None, col_scale=None, rows=333, accumulate=True, precision="float32"):
    N, D = X.shape
    k = C.shape[0]
    dev = X.device
    labels = torch.full((N,), -7, dtype=torch.int64, device=dev)  # poisoned
    scores = torch.full((N,), float("nan"), device=dev)
    sums = torch.full((k, D), float("nan"), dtype=torch.float64, device=dev) if accumulate else None
    counts = torch.full((k,), -7, dtype=torch.int64, device=dev) if accumulate else None
    _gemm.assign(X, C, center, row_scale, col_scale, labels, scores, sums, counts, precision=precision, rows=rows,
                 lib=lib())
    return ops.Assignment(labels, scores, sums, counts)


def test_assign_knobs_are_the_librarys_reading(monkeypatch):
    """_gemm.assign_knobs() is the compiled library's own reading of the assignment's knobs (one
    rule for Python and the CUDA kernels, in every build): defaults, set values (integers as
    strtol reads them) and the library's refusals."""
    for name in ("EDPAIRS_ASSIGN_KERNEL", "EDPAIRS_ASSIGN_SUMS", "EDPAIRS_ASSIGN_OVERLAP", "EDPAIRS_WGMMA_PREFETCH",
                 "EDPAIRS_ASSIGN_SEG_ROWS", "EDPAIRS_ASSIGN_COUNTING"):
        monkeypatch.delenv(name, raising=False)
    assert _gemm.assign_knobs() == {"kernel": "auto", "sums": "auto", "overlap": 0, "prefetch": 4, "seg_rows": 256,
                                    "counting": "auto"}
    for name, value in (("EDPAIRS_ASSIGN_KERNEL", "wgmma-tma"), ("EDPAIRS_ASSIGN_SUMS", "fused"),
                        ("EDPAIRS_ASSIGN_OVERLAP", " +07"), ("EDPAIRS_WGMMA_PREFETCH", "0"),
                        ("EDPAIRS_ASSIGN_SEG_ROWS", "64"), ("EDPAIRS_ASSIGN_COUNTING", "global")):
        monkeypatch.setenv(name, value)
    assert _gemm.assign_knobs() == {"kernel": "wgmma-tma", "sums": "fused", "overlap": 7, "prefetch": 0,
                                    "seg_rows": 64, "counting": "global"}
    for name, bad in (("EDPAIRS_WGMMA_PREFETCH", "17"), ("EDPAIRS_ASSIGN_SEG_ROWS", "512"),
                      ("EDPAIRS_ASSIGN_COUNTING", "shared")):
        with monkeypatch.context() as m:
            m.setenv(name, bad)
            with pytest.raises(ValueError, match=f"{name} must be .*got '{bad}'"):
                _gemm.assign_knobs()


@pytest.mark.parametrize("rows", [1, 64, 333, 10_000])
def test_route_assign_matches_reference_and_cpu(rows, rng):
    C = make_centroids(rng, 70, 37, duplicates=3, zeros=1)
    X = make_rows(rng, 3001, 37, C=C, zero_rows=3, duplicate_rows=20)
    res = _route_assign(t(X), t(C), rows=rows)
    check_assignment(res, X, C)
    assert_results_agree(res, ops.assign(X, C), X, C)


@pytest.mark.parametrize("knob,value", [("EDPAIRS_ASSIGN_SEG_ROWS", "100"), ("EDPAIRS_ASSIGN_COUNTING", "x")])
def test_the_sorted_pass_knobs_are_refused_before_the_labels(knob, value, rng, monkeypatch):
    """A bad knob of the sorted sums pass is refused before the route or the float16 copies
    label anything (the CUDA library refuses it too, but only once its sums start): outputs
    untouched, nothing launched. Without sums nothing reads them."""
    C = make_centroids(rng, 140, 24)
    X = t(make_rows(rng, 500, 24, C=C))
    monkeypatch.setenv(knob, value)
    out = (torch.empty(500, dtype=torch.int64), torch.empty(500), torch.empty((140, 24), dtype=torch.float64),
           torch.empty(140, dtype=torch.int64))
    for run in (lambda: _gemm.assign(X, t(C), None, None, None, *out, precision="float32", rows=100, lib=None),
                lambda: _gemm.half_assign(X, t(C), *out, lib=None)):
        with pytest.raises(ValueError, match=f"{knob} must be"):
            run()  # (lib=None: a launch would have failed otherwise)
    assert (_route_assign(X, t(C), accumulate=False).labels >= 0).all()


@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_route_assign_tiny_centroid_counts_as_zero(precision, rng):
    """A centroid whose 1 / ||c|| is no float32 (norm ~1e-39) scores 0 for every row, as the CPU
    kernel has it (1 / ||c|| was +Inf in float32 here: scores Inf or NaN)."""
    C = make_centroids(rng, 40, 19)
    C[5] *= np.float32(1e-40)
    X = make_rows(rng, 2000, 19, C=C)
    res = _route_assign(t(X), t(C), rows=500, precision=precision)
    cpu = ops.assign(X, C)
    assert bool(torch.isfinite(res.scores).all())
    np.testing.assert_array_equal(res.labels.numpy(), to_numpy(cpu.labels))
    np.testing.assert_allclose(res.scores.numpy(), to_numpy(cpu.scores), rtol=1e-5, atol=1e-6)


def test_route_assign_options(rng):
    C = make_centroids(rng, 40, 19, duplicates=2)
    X = make_rows(rng, 2000, 19, C=C, zero_rows=2)
    center = rng.standard_normal(19).astype(np.float32)
    row_scale = (rng.random(2000) * (rng.random(2000) > 0.2)).astype(np.float32)
    col_scale = (rng.standard_normal(40) * 2).astype(np.float32)
    for kw in (dict(center=center), dict(row_scale=row_scale), dict(col_scale=col_scale),
               dict(center=center, row_scale=row_scale, col_scale=col_scale)):
        res = _route_assign(t(X), t(C), **{k: t(v) for k, v in kw.items()}, rows=500)
        check_assignment(res, X, C, **kw)
        assert_results_agree(res, ops.assign(X, C, **kw), X, C, **kw)


def test_route_assign_rows_near_the_centre(rng):
    """Rows within 1e-3 of a centre of size ~2: their centred dots keep float32 accuracy. The
    route once formed x . c - centre . c after the product, whose cancellation put a D = 1
    score 1e-5 off on an H100 (a hypothesis case); it now centres the rows first."""
    for D, k in ((1, 1), (8, 5)):
        center = (rng.standard_normal(D) + 2).astype(np.float32)
        X = (center + rng.standard_normal((400, D)) * 10.0 ** rng.uniform(-4, -2, (400, 1))).astype(np.float32)
        C = make_centroids(rng, k, D)
        res = _route_assign(t(X), t(C), center=t(center), rows=128)
        check_assignment(res, X, C, center=center)
        assert_results_agree(res, ops.assign(X, C, center=center), X, C, center=center)


def test_route_assign_strided_rows_without_sums(rng):
    C = make_centroids(rng, 9, 10)
    X = make_rows(rng, 500, 10, C=C)
    wide = torch.zeros((500, 13))
    wide[:, :10] = t(X)
    res = _route_assign(wide[:, :10], t(C), rows=77, accumulate=False)
    want = ops.assign(X, C, accumulate=False)
    np.testing.assert_array_equal(res.labels.numpy(), want.labels)
    np.testing.assert_allclose(res.scores.numpy(), want.scores, rtol=1e-5, atol=1e-6)


def _argmax(scores, X, center=None, row_scale=None, first=0, rows=None, col_scale=None, centroids=None):
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    N = X.shape[0]
    labels = torch.full((N,), -7, dtype=torch.int64, device=X.device)
    best = torch.full((N,), float("nan"), device=X.device)
    rscale = torch.full((N,), float("nan"), device=X.device)
    if col_scale is None:
        col_scale = torch.ones(scores.shape[1], device=X.device)
    cnorm = None if centroids is None else torch.linalg.vector_norm(centroids, dim=1)
    plan = lib().ArgmaxRows(c(scores), c(col_scale), c(X), c(center), c(row_scale), c(labels), c(best), c(rscale),
                            c(centroids), c(cnorm))
    stream = 0 if X.device.type == "cpu" else int(torch.cuda.current_stream().cuda_stream)
    plan.run(first, scores.shape[0] if rows is None else rows, stream)
    return labels.cpu().numpy(), best.cpu().numpy(), rscale.cpu().numpy()


def test_argmax_rows_first_maximum_and_zero_rows():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0], [-2.0, -1.0, -1.0, -3.0], [0.0, 9.0, 0.0, 0.0]])
    X = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])  # the last row is zero
    labels, best, rscale = _argmax(scores, X)
    np.testing.assert_array_equal(labels, [1, 0, 1, 0])
    np.testing.assert_allclose(best, [3.0 / 5, 5.0, -1.0, 0.0])
    np.testing.assert_allclose(rscale, [0.2, 1.0, 1.0, 0.0])
    labels, best, _ = _argmax(scores, X, row_scale=torch.tensor([2.0, 0.0, 1.0, 1.0]))
    np.testing.assert_array_equal(labels, [1, 0, 1, 1])  # row 1 has r = 0; row 3 is scored
    np.testing.assert_allclose(best, [6.0, 0.0, -1.0, 9.0])
    # The column scale multiplies the dots before the argmax (0 silences a column).
    labels, best, _ = _argmax(scores, X, col_scale=torch.tensor([1.0, 0.5, 0.0, 2.0]))
    np.testing.assert_array_equal(labels, [3, 3, 2, 0])  # row 3 is zero: label 0
    np.testing.assert_allclose(best, [4.0 / 5, 10.0, 0.0, 0.0])
    # A row whose every score is NaN (unchecked non-finite centroids): label 0 and, as in
    # ops.assign, score NaN; a zero row label 0 and score 0.
    nan = torch.full((2, 4), float("nan"))
    labels, best, _ = _argmax(nan, torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_array_equal(labels, [0, 0])
    np.testing.assert_array_equal(best, [np.nan, 0.0])


def test_argmax_rows_steps_write_only_their_rows(rng):
    X = t(rng.standard_normal((10, 3)).astype(np.float32))
    scores = t(rng.standard_normal((4, 6)).astype(np.float32))
    labels, best, _ = _argmax(scores, X, first=5, rows=4)
    assert np.all(labels[:5] == -7) and labels[9] == -7 and np.isnan(best[:5]).all()
    np.testing.assert_array_equal(labels[5:9], scores.numpy().argmax(1))
    with pytest.raises(ValueError, match=r"rows \[8, 12\) outside \[0, 10\)"):
        _argmax(scores, X, first=8, rows=4)


def _near_tie_case(rng, n=400, D=48, k=30, device="cpu", center_scale=0.2, pair_spread=1e-4):
    """Rows, centroids (near-duplicate pairs pair_spread apart), a center (entries ~
    center_scale) and column scales; the exact scores
    s_j (x - center) . c_j in float64; and float32 "TF32" scores with the best and runner-up
    swapped on every other row (by less than the TF32 bound there: the route multiplies the
    centred rows, so the bound goes with ||x - center||) - what a rounded product can do to a
    near tie."""
    base = rng.standard_normal((k // 2, D))
    C = np.repeat(base, 2, axis=0)  # near-duplicate pairs: their scores tie within the bound
    C[1::2] += pair_spread * rng.standard_normal((k // 2, D))
    C = C.astype(np.float32)
    X = (rng.standard_normal((n, D)) + 0.9 * C[rng.integers(0, k, n)] + 0.3).astype(np.float32)
    center = (center_scale * rng.standard_normal(D)).astype(np.float32)
    s = np.repeat(0.5 + rng.random(k // 2), 2).astype(np.float32)
    Xc = (X - center).astype(np.float32).astype(np.float64)
    E = (Xc @ C.astype(np.float64).T) * s[None, :].astype(np.float64)
    order = np.argsort(-E, axis=1, kind="stable")
    b, r = order[:, 0], order[:, 1]
    rows = np.arange(n)
    bound = 2.0 ** -9 * np.linalg.norm(Xc, axis=1) * (s[b] * np.linalg.norm(C[b], axis=1) +
                                                     s[r] * np.linalg.norm(C[r], axis=1))
    dots = (E / s[None, :]).astype(np.float32)  # the route's dots, before the column scale
    gap = E[rows, b] - E[rows, r]
    # (a gap float32 scores cannot show would leave an exact tie, not a swap)
    swap = (rows % 2 == 0) & (gap < 0.5 * bound) & (gap > 1e-5 * np.abs(E[rows, b]))
    hi = E[rows, b] / s[b]
    dots[rows[swap], b[swap]] = (E[rows[swap], r[swap]] / s[b[swap]]).astype(np.float32)
    dots[rows[swap], r[swap]] = (hi[swap] * s[b[swap]] / s[r[swap]]).astype(np.float32)
    t_ = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return t_(dots), t_(X), t_(C), t_(center), t_(s), E, b, swap


@pytest.mark.parametrize("center_scale,pair_spread", [(0.2, 1e-4), (8.0, 0.05)])
def test_argmax_rows_rescore_fixes_near_ties(rng, center_scale, pair_spread):
    """With the centroids given, rows whose best and runner-up lie within the TF32 bound are
    re-scored in float64: the planted swaps are undone and the score is the exact one; without
    them the swapped label stands. With a far centre ||x - center|| is several times ||x||:
    the bound of the centred rows' products goes with the former, and the swaps planted
    between the two bounds stood while the kernels took ||x|| (a reviewer's finding)."""
    dots, X, C, center, s, E, b, swap = _near_tie_case(rng, center_scale=center_scale, pair_spread=pair_spread)
    assert swap.sum() >= 20  # the case plants enough near ties to mean something
    if center_scale > 1:
        Xn, Cn, sn = (a.numpy().astype(np.float64) for a in (X, C, s))
        rows = np.arange(len(b))
        r = np.argsort(-E, axis=1, kind="stable")[:, 1]
        raw_bound = 2.0**-9 * np.linalg.norm(Xn, axis=1) * (sn[b] * np.linalg.norm(Cn[b], axis=1) +
                                                          sn[r] * np.linalg.norm(Cn[r], axis=1))
        assert (swap & (E[rows, b] - E[rows, r] > raw_bound)).sum() >= 10
    plain = _argmax(dots, X, center=center, col_scale=s)
    fixed = _argmax(dots, X, center=center, col_scale=s, centroids=C)
    assert (plain[0][swap] != b[swap]).all()
    np.testing.assert_array_equal(fixed[0], b)
    rows = np.arange(len(b))
    np.testing.assert_allclose(fixed[1][swap], (fixed[2] * E[rows, b])[swap], rtol=1e-6)
    # Exact duplicates tie exactly after the re-score too: the lower index wins.
    Cd = C.clone()
    Cd[7] = Cd[3]
    dd = torch.from_numpy((X - center).double().numpy() @ Cd.double().numpy().T).float()
    dd[:, 7] = dd[:, 3] * (1 + 2.0 ** -20)  # the "TF32" dots put the higher index ahead
    lab = _argmax(dd, X, center=center, centroids=Cd)[0]
    assert not (lab == 7).any()
    with pytest.raises(ValueError, match="centroids and cnorm together"):
        from edpairs._arrays import Namespace

        c = Namespace("torch").capsule
        N = X.shape[0]
        lib().ArgmaxRows(c(dots), c(s), c(X), None, None, c(torch.empty(N, dtype=torch.int64)), c(torch.empty(N)),
                         c(torch.empty(N)), c(C), None)


def test_cluster_sums_checks_labels_on_the_cpu(rng):
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    X = t(rng.standard_normal((5, 3)).astype(np.float32))
    labels = torch.tensor([0, 1, 2, 1, 3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\), got 3 at row 4"):
        lib().cluster_sums(c(X), c(labels), c(torch.ones(5)), None, c(torch.empty((3, 3), dtype=torch.float64)),
                           c(torch.empty(3, dtype=torch.int64)), 0)


def _centre(X, shift, first=0, rows=None, colsum=True, out_rows=None):
    """CentreRows into a poisoned out (and colsum starting at 1.0, to show it accumulates)."""
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    rows = X.shape[0] - first if rows is None else rows
    out = torch.full((rows if out_rows is None else out_rows, X.shape[1]), float("nan"), device=X.device)
    cs = torch.ones(X.shape[1], dtype=torch.float64, device=X.device) if colsum else None
    plan = lib().CentreRows(c(X), c(shift), c(out), c(cs))
    stream = 0 if X.device.type == "cpu" else int(torch.cuda.current_stream().cuda_stream)
    plan.run(first, rows, stream)
    return out.cpu().numpy(), None if cs is None else cs.cpu().numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_centre_rows_values_and_column_sums(dtype, rng):
    X = t((rng.standard_normal((700, 13)) + 40).astype(np.float32)).to(getattr(torch, dtype))
    shift = t(rng.standard_normal(13).astype(np.float32) + 40)
    out, cs = _centre(X, shift, first=100, rows=550, out_rows=600)
    want = (X[100:650].float() - shift).numpy()
    np.testing.assert_array_equal(out[:550], want)  # float32 subtraction, exactly
    assert np.isnan(out[550:]).all()  # only the step's rows are written
    np.testing.assert_allclose(cs, 1.0 + want.astype(np.float64).sum(0), rtol=1e-12, atol=1e-9)
    out2, cs2 = _centre(X, shift, colsum=False)
    assert cs2 is None and np.array_equal(out2, (X.float() - shift).numpy())


def test_centre_rows_checks(rng):
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    X = t(rng.standard_normal((10, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="shift"):
        lib().CentreRows(c(X), c(torch.zeros(5)), c(torch.empty((10, 4))), None)
    with pytest.raises(ValueError, match="out"):
        lib().CentreRows(c(X), c(torch.zeros(4)), c(torch.empty((10, 5))), None)
    with pytest.raises(ValueError, match="colsum"):
        lib().CentreRows(c(X), c(torch.zeros(4)), c(torch.empty((10, 4))), c(torch.zeros(4)))
    with pytest.raises(ValueError, match=r"rows \[8, 12\) outside \[0, 10\)"):
        _centre(X, torch.zeros(4), first=8, rows=4)
    with pytest.raises(ValueError, match=r"centre_rows \(out\)"):
        _centre(X, torch.zeros(4), first=0, rows=6, out_rows=5)


def _centred_gram(X, shift, poison=-3.0):
    """lib.centred_gram into m2 poisoned below the diagonal (must stay) and 1.0 above (added
    to), colsum starting at 1.0."""
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    D = X.shape[1]
    m2 = torch.triu(torch.ones((D, D), dtype=torch.float64)) + torch.tril(torch.full((D, D), poison, dtype=torch.float64), -1)
    m2 = m2.to(X.device)
    colsum = torch.ones(D, dtype=torch.float64, device=X.device)
    stream = 0 if X.device.type == "cpu" else int(torch.cuda.current_stream().cuda_stream)
    lib().centred_gram(c(X), c(shift), c(m2), c(colsum), stream)
    return m2.cpu().numpy(), colsum.cpu().numpy()


def test_centred_gram_cpu_adds_the_upper_triangle(rng):
    X = (rng.standard_normal((300, 12)) + 5).astype(np.float32)
    shift = (X.mean(0) + 0.1).astype(np.float32)
    m2, colsum = _centred_gram(t(X), t(shift))
    Xc = (X - shift).astype(np.float64)
    iu, il = np.triu_indices(12), np.tril_indices(12, -1)
    np.testing.assert_allclose(m2[iu], 1.0 + (Xc.T @ Xc)[iu], rtol=1e-12)
    assert (m2[il] == -3.0).all()
    np.testing.assert_allclose(colsum, 1.0 + Xc.sum(0), rtol=1e-12, atol=1e-9)
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    with pytest.raises(ValueError, match="m2"):
        lib().centred_gram(c(t(X)), c(t(shift)), c(torch.zeros((12, 11), dtype=torch.float64)),
                           c(torch.zeros(12, dtype=torch.float64)), 0)
    with pytest.raises(ValueError, match="float32"):
        lib().centred_gram(c(t(X).double()), c(t(shift)), c(torch.zeros((12, 12), dtype=torch.float64)),
                           c(torch.zeros(12, dtype=torch.float64)), 0)


def test_route_moments_through_the_centred_gram(rng, monkeypatch):
    """The moments' algebra around centred_gram (the mean from the column sums, the mirrored
    upper triangle), run here with its CPU version; and the knob is checked."""
    monkeypatch.setattr(_gemm, "gram_wgmma_applies", lambda X, precision: True)
    X = (rng.standard_normal((2003, 16)) @ rng.standard_normal((16, 16)) + 20).astype(np.float32)
    mean, m2 = _gemm.moments(t(X), precision="tf32", rows=500, lib=lib())
    check_moments(ops.Moments(2003, mean, m2), X)
    assert torch.equal(m2, m2.T)
    monkeypatch.undo()
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cutlass")
    with pytest.raises(ValueError, match="EDPAIRS_GEMM_GRAM must be one of 'cublas', 'triangle', 'wgmma', got 'cutlass'"):
        _gemm.gram_wgmma_applies(t(X), "tf32")
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "wgmma")
    assert not _gemm.gram_wgmma_applies(t(X), "tf32")  # a CPU tensor
    assert not _gemm.gram_wgmma_applies(t(X), "float32")  # exact products are cuBLAS's


@pytest.mark.parametrize("D,block", [(1, 128), (16, 5), (130, 128), (300, 64)])
def test_route_moments_triangle_gram(D, block, rng, monkeypatch):
    """EDPAIRS_GEMM_GRAM=triangle: the products of the blocks on or above the diagonal only
    (ragged last block; one block when D <= block), mirrored: the same moments as the full
    product, to float32 rounding, symmetric bit for bit; the block knob is checked."""
    X = (rng.standard_normal((1501, D)) @ rng.standard_normal((D, D)) + 20).astype(np.float32)
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cublas")  # the full product (the triangle is the default)
    full_mean, full_m2 = _gemm.moments(t(X), precision="float32", rows=400, lib=lib())
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "triangle")
    monkeypatch.setenv("EDPAIRS_GEMM_TRIANGLE_BLOCK", str(block))
    mean, m2 = _gemm.moments(t(X), precision="float32", rows=400, lib=lib())
    check_moments(ops.Moments(1501, mean, m2), X)
    assert torch.equal(m2, m2.T) and torch.equal(mean, full_mean)
    np.testing.assert_allclose(m2.numpy(), full_m2.numpy(), rtol=1e-6, atol=1e-6 * float(full_m2.abs().max()))
    monkeypatch.setenv("EDPAIRS_GEMM_TRIANGLE_BLOCK", "0")
    with pytest.raises(ValueError, match="EDPAIRS_GEMM_TRIANGLE_BLOCK must be a positive integer, got '0'"):
        _gemm.moments(t(X), precision="float32", rows=400, lib=lib())


def test_route_gram_default_is_per_precision(rng, monkeypatch):
    """Unset (or empty), EDPAIRS_GEMM_GRAM takes GRAM_DEFAULT of the products' precision: a
    triangle default for exact float32 products alone forms the triangle for them and the full
    product for TF32 ones; the variable, when set, rules both."""
    X = (rng.standard_normal((900, 20)) + 5).astype(np.float32)
    made = []

    class Spy(_gemm._TriangleProduct):
        def __init__(self, *args):
            made.append(True)
            super().__init__(*args)

    monkeypatch.setattr(_gemm, "_TriangleProduct", Spy)
    assert _gemm.GRAM_DEFAULT == {"float32": "triangle", "tf32": "cublas"}  # H200 run 6
    monkeypatch.delenv("EDPAIRS_GEMM_GRAM", raising=False)
    # TF32 operands (exact on the CPU), as the form's default was judged for them; the float16
    # operands (the moments' default since version 19) go through the same form.
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "0")
    for precision, want in (("float32", [True]), ("tf32", [])):
        made.clear()
        mean, m2 = _gemm.moments(t(X), precision=precision, rows=300, lib=lib())
        check_moments(ops.Moments(900, mean, m2), X)
        assert made == want, precision
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "")
    assert _gemm.gram_mode("float32") == "triangle" and _gemm.gram_mode("tf32") == "cublas"
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cublas")
    made.clear()
    _gemm.moments(t(X), precision="float32", rows=300, lib=lib())
    assert made == []


def test_centre_rows_writes_scaled_float16_rounded_to_nearest_even(rng):
    """CentreRows with a float16 out: float16((x - shift) * scale) bit for bit as numpy rounds
    (nearest even; subnormals; 65504 and past it Inf), the column sums of the unscaled values."""
    X = (rng.standard_normal((300, 9)) * 3.0 ** rng.integers(-30, 30, (300, 9))).astype(np.float32)
    X[0, :6] = [65504, 65519.99, 65520, -7e4, 2.0**-24 * 1.5, 2.0**-25]  # edges, with a scale of 1
    X[1, :3] = [np.nan, np.inf, 2.0**-14 * (1 - 2.0**-11)]
    shift = np.zeros(9, np.float32)
    shift[6:] = rng.standard_normal(3).astype(np.float32)
    scale = (2.0 ** np.array([0, 0, 0, 0, 0, 0, -3, 5, 12])).astype(np.float32)
    out = np.empty((300, 9), np.float16)
    colsum = np.zeros(9)
    c = Namespace("torch").capsule
    colmax = np.full(9, 0.5, np.float32)  # a maximum carried over from earlier steps
    lib().CentreRows(c(t(X)), c(t(shift)), c(t(out)), c(t(colsum)), c(t(scale)), c(t(colmax))).run(0, 300, 0)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ((X - shift) * scale).astype(np.float16)
        top = np.fmax(0.5, np.nanmax(np.abs((X - shift) * scale), axis=0))  # NaN passed over
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    np.testing.assert_array_equal(colmax, top)
    finite = np.isfinite(X).all(0)
    np.testing.assert_allclose(colsum[finite], (X - shift).astype(np.float64).sum(0)[finite], rtol=1e-12)
    with pytest.raises(ValueError, match="out"):  # float16 out without a scale: refused
        lib().CentreRows(c(t(X)), c(t(shift)), c(t(out)), c(t(colsum)))
    with pytest.raises(ValueError, match="colmax .* needs scale"):
        lib().CentreRows(c(t(X)), c(t(shift)), c(t(np.empty((300, 9), np.float32))), None, None, c(t(colmax)))


def test_half_scale_brings_each_column_under_the_top(rng):
    X = rng.standard_normal((500, 5)).astype(np.float32) * np.array([1e-30, 1e-3, 1, 7e3, 0], np.float32)
    X[:, 4] = 2.5  # no spread
    shift = t(X[:100].mean(0))
    s = _gemm._pow2_scale(torch, _gemm.half_top(torch, t(X), shift, 100))
    assert s.dtype == torch.float32
    big = (t(X[:100]) - shift).abs().amax(0)
    scaled = (big * s)[:4]
    assert bool(((scaled >= 2.0 ** (_gemm.HALF_TOP - 1)) & (scaled < 2.0**_gemm.HALF_TOP)).all()), scaled
    assert np.all(np.log2(s.numpy()) == np.round(np.log2(s.numpy())))  # powers of two: exact scaling


@pytest.mark.parametrize("gram", ["one product", "blocks", "triangle"])
def test_route_moments_from_float16_operands(gram, rng, monkeypatch):
    """EDPAIRS_GEMM_HALF=1, TF32 precision: float16 operands scaled per column (columns of very
    different sizes), the scales undone exactly: the moments within float16's rounding (11
    bits, unbiased: far inside TF32's bound), symmetric; exact-float32 calls do not use them."""
    if gram == "blocks":
        monkeypatch.setenv("EDPAIRS_GEMM_BLOCK_ROWS", "200")
    if gram == "triangle":
        monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "triangle")
        monkeypatch.setenv("EDPAIRS_GEMM_TRIANGLE_BLOCK", "5")
    X = (rng.standard_normal((3001, 13)) @ rng.standard_normal((13, 13))).astype(np.float32)
    X *= np.float32(10.0) ** np.arange(-6, 7, dtype=np.float32)
    X += 5 * X.std(0)
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "1")
    mean, m2 = _gemm.moments(t(X), precision="tf32", rows=700, lib=lib())
    check_moments(ops.Moments(3001, mean, m2), X, rtol=1e-4)  # measured 2.1e-5
    assert torch.equal(m2, m2.T)
    exact = _gemm.moments(t(X), precision="float32", rows=700, lib=lib())
    np.testing.assert_array_equal(exact[1].numpy(), _gemm.moments(t(X), precision="float32", rows=700, lib=lib(),
                                                                  half=False)[1].numpy())
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "2")
    with pytest.raises(ValueError, match="EDPAIRS_GEMM_HALF must be '0', '1', 'moments' or 'signal', got '2'"):
        _gemm.moments(t(X), precision="tf32", rows=700, lib=lib())


def test_half_products_knob_per_operation(monkeypatch):
    """EDPAIRS_GEMM_HALF: "1" both operations, "moments" / "signal" that one only, "0" neither;
    unset or empty, HALF_DEFAULT of the operation (the moments on since version 19, from H200
    runs 6a / 6b; the signal moments off)."""
    assert _gemm.HALF_DEFAULT == {"moments": True, "signal": False}
    for value, moments, signal in (("1", True, True), ("moments", True, False), ("signal", False, True),
                                   ("0", False, False), ("", True, False)):
        monkeypatch.setenv("EDPAIRS_GEMM_HALF", value)
        assert (_gemm.half_products("moments"), _gemm.half_products("signal")) == (moments, signal), value
    monkeypatch.delenv("EDPAIRS_GEMM_HALF")
    assert _gemm.half_products("moments") and not _gemm.half_products("signal")
    monkeypatch.setitem(_gemm.HALF_DEFAULT, "moments", False)
    assert not _gemm.half_products("moments")
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "moments")
    assert _gemm.half_products("moments")


def _spy_passes(monkeypatch, name):
    """Record the scale (None: TF32 / float32 operands) of every pass of _gemm.<name>."""
    seen = []
    orig = getattr(_gemm, name)

    def spy(*args):
        scale = args[-1]
        seen.append(None if scale is None else getattr(scale, "x_scale", scale).clone())
        return orig(*args)

    monkeypatch.setattr(_gemm, name, spy)
    return seen


def test_route_moments_from_float16_operands_rescale_past_the_range(rng, monkeypatch):
    """A later step 1000 times the first step's spread overflows float16 (headroom 256): the call
    runs again with float16 operands scaled for the largest values seen, and returns finite
    moments within float16's rounding."""
    X = rng.standard_normal((2000, 6)).astype(np.float32)
    X[1000:] *= 1000
    passes = _spy_passes(monkeypatch, "_moments_pass")
    mean, m2 = _gemm.moments(t(X), precision="tf32", rows=500, lib=lib(), half=True)
    assert len(passes) == 2 and all(p is not None for p in passes) and bool((passes[1] < passes[0]).all())
    check_moments(ops.Moments(2000, mean, m2), X, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 1000])
def test_route_moments_from_float16_operands_columns_still_in_the_first_step(rows, rng, monkeypatch):
    """A column constant over the first step (every column, for one-row steps) has no spread to
    scale by; where its later values would sink into float16's subnormals (spread 1e-10: 32%
    off before), the call runs again with the scales of every step: within float16's rounding.
    A column that stays constant needs no second pass."""
    X = rng.standard_normal((4000, 3)).astype(np.float32)
    X[:, 0] *= np.float32(1e-10)
    X[:1000, 0] = 0
    passes = _spy_passes(monkeypatch, "_moments_pass")
    mean, m2 = _gemm.moments(t(X), precision="tf32", rows=rows, lib=lib(), half=True)
    assert len(passes) == 2 and passes[1] is not None
    check_moments(ops.Moments(4000, mean, m2), X, rtol=1e-4)
    X[:, 0] = 3
    passes.clear()
    mean, m2 = _gemm.moments(t(X), precision="tf32", rows=1000, lib=lib(), half=True)
    assert len(passes) == 1
    check_moments(ops.Moments(4000, mean, m2), X, rtol=1e-4)


def test_route_moments_from_float16_operands_of_data_that_is_not_finite(rng, monkeypatch):
    """NaN or Inf in the data: no scale helps; the call ends on TF32 operands (as without the
    knob) after at most two float16 passes."""
    for bad in (np.nan, np.inf):
        X = rng.standard_normal((2000, 4)).astype(np.float32)
        X[1500, 2] = bad
        passes = _spy_passes(monkeypatch, "_moments_pass")
        _, m2 = _gemm.moments(t(X), precision="tf32", rows=500, lib=lib(), half=True)
        assert passes[-1] is None and len(passes) <= 3
        assert not bool(torch.isfinite(m2).all())
        monkeypatch.undo()


def test_triangle_product_computes_only_the_upper_blocks(rng):
    """The lower blocks are never formed: acc stays 0 below the diagonal blocks."""
    A = torch.from_numpy(rng.standard_normal((50, 10)))
    tri = _gemm._TriangleProduct(torch, 10, 4, "cpu")
    tri.acc = tri.acc.to(torch.float64)
    tri.outs = [o.double() for o in tri.outs]
    tri.add(A, A)
    want = (A.T @ A).numpy()
    acc = tri.acc.numpy()
    for i0, i1 in tri.bounds:
        np.testing.assert_allclose(acc[i0:i1, i0:], want[i0:i1, i0:], rtol=1e-12)
        assert (acc[i1:, i0:i1] == 0).all()
    np.testing.assert_allclose(tri.full().numpy(), want, rtol=1e-12)


# ---------------------------------------------------------------------------------------
# On a GPU

_BUILT = bool(edpairs.build_info()["cuda"])
_GPU = _BUILT and edpairs.cuda_device_count() > 0 and torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("rows,concepts", [(1, 1), (1000, 17), (70_000, 256), (4_500_000, 1)])
def test_signal_masks_cuda_equals_cpu(rows, concepts, rng):
    """Every output written (poisoned first), counts exact; the last shape has more row blocks
    than one grid dimension holds (65535 x 64 rows), so the blocks loop."""
    z = rng.standard_normal((rows, concepts)).astype(np.float32)
    z[:: 7] = 0.0
    count, sum_z, sum_zz = np.arange(concepts), np.ones(concepts), np.ones(concepts)
    got = _run_masks(z, count, sum_z, sum_zz, device="cuda")
    want = _run_masks(z, count, sum_z, sum_zz)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-9)
    np.testing.assert_allclose(got[3], want[3], rtol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("before", [False, True])
def test_cuda_route_exact_and_tf32(before, rng, monkeypatch):
    """The route on CUDA: exact float32 by default whatever torch's TF32 flag says (and the flag
    unchanged afterwards), TF32 on request; both near the float64 reference and the kernels."""
    monkeypatch.delenv("EDPAIRS_MOMENTS", raising=False)
    monkeypatch.delenv("EDPAIRS_SIGNAL_MOMENTS", raising=False)
    matmul = torch.backends.cuda.matmul
    old = matmul.allow_tf32
    matmul.allow_tf32 = before
    try:
        X = (rng.standard_normal((60_000, 96)) * (1 + rng.random(96)) + 20).astype(np.float32)
        Xg = t(X).cuda()
        monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
        exact = ops.moments(Xg, workspace_rows=8192)
        fast = ops.moments(Xg, precision="tf32", workspace_rows=8192)
        assert matmul.allow_tf32 == before
        check_moments(exact, X)
        X64 = X.astype(np.float64)
        ref = (X64 - X64.mean(0)).T @ (X64 - X64.mean(0))
        assert_scatter_close(to_numpy(fast.m2), ref, rtol=3e-3)
        assert not np.array_equal(to_numpy(fast.m2), to_numpy(exact.m2))  # TF32 rounding shows
        monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")
        kernel = ops.moments(Xg)
        assert_scatter_close(to_numpy(exact.m2), to_numpy(kernel.m2), rtol=5e-6)

        Xs, W, b, c = make_signal_data(rng, 40_000, 64, 48, center=True, offset=2.0)
        args = (t(Xs).cuda(), t(W).cuda(), t(b).cuda())
        monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
        sm = ops.signal_moments(*args, center=t(c).cuda(), workspace_rows=5000)
        assert matmul.allow_tf32 == before
        check_signal_moments(sm, Xs, W, b, center=c)
        sm32 = ops.signal_moments(*args, center=t(c).cuda(), precision="tf32")
        assert matmul.allow_tf32 == before
        # TF32 z can flip rows within its rounding of 0; the rest within TF32 rounding.
        n_flip = np.abs(to_numpy(sm32.count) - to_numpy(sm.count))
        assert n_flip.max() <= 0.002 * len(Xs), n_flip.max()
        for name in ("sum_x", "sum_xz"):
            got, want = to_numpy(getattr(sm32, name)), to_numpy(getattr(sm, name))
            assert np.linalg.norm(got - want) <= 5e-3 * np.linalg.norm(want), name
        monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "kernel")
        kern = ops.signal_moments(*args, center=t(c).cuda())
        np.testing.assert_array_equal(to_numpy(kern.count), to_numpy(sm.count))
    finally:
        matmul.allow_tf32 = old


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_cuda_triangle_gram_equals_the_full_product(precision, rng, monkeypatch):
    """EDPAIRS_GEMM_GRAM=triangle on the GPU: the moments of the full product, to float32
    rounding of the products (TF32: to its bound), symmetric bit for bit."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    X = (rng.standard_normal((200_000, 300)) @ rng.standard_normal((300, 300)) * 0.1 + 3).astype(np.float32)
    Xg = t(X).cuda()
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cublas")  # the full product (exact products' default is the triangle)
    full = ops.moments(Xg, precision=precision)
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "triangle")
    tri = ops.moments(Xg, precision=precision)
    check_moments(tri, X, rtol=1e-5 if precision == "float32" else 3e-3)
    assert torch.equal(tri.m2, tri.m2.T) and torch.equal(tri.mean, full.mean)
    rel = float((tri.m2 - full.m2).norm() / full.m2.norm())
    assert rel < (5e-6 if precision == "float32" else 2e-3), rel


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("precision", ["float32", "tf32"])
def test_cuda_route_overlap_changes_nothing(precision, rng, monkeypatch):
    """EDPAIRS_GEMM_OVERLAP=1 on the GPU, with the data written on a busy stream of the
    caller's just before: the moments and a centred assignment (each step centred on a second
    stream while the previous step's products run) bit for bit those of one stream (the cluster
    sums up to the order of their float64 atomics); the centred signal moments (steps dealt to
    two streams in turn) equal to float64 rounding, counts exactly."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    X, W, b, c = make_signal_data(rng, 400_000, 256, 64, center=True, offset=3.0)
    N, D = X.shape  # the rows kept (about 81%): three steps of the default 131072 rows
    assert N > 2 * 131072
    C = make_centroids(rng, 300, D)
    runs = {}
    for knob in ("0", "1"):
        monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", knob)
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            Xg = torch.zeros((N, D), device="cuda")
            for _ in range(20):  # keep the stream busy before the data lands
                Xg.mul_(1.0)
            Xg.copy_(t(X).cuda(non_blocking=False))
            m = ops.moments(Xg, precision=precision, check_finite=False)
            sm = ops.signal_moments(Xg, t(W).cuda(), t(b).cuda(), center=t(c).cuda(), precision=precision,
                                    check_finite=False)
            a = ops.assign(Xg, t(C).cuda(), center=t(c).cuda(), precision=precision, check_finite=False)
            s.synchronize()
        runs[knob] = (m, sm, a)
    (m0, s0, a0), (m1, s1, a1) = runs["0"], runs["1"]
    assert torch.equal(m0.mean, m1.mean) and torch.equal(m0.m2, m1.m2)
    assert torch.equal(s0.count, s1.count)
    for name in ("sum_x", "sum_z", "sum_zz", "sum_xz"):
        torch.testing.assert_close(getattr(s1, name), getattr(s0, name), rtol=1e-12, atol=1e-9)
    for name in ("labels", "scores", "counts"):
        assert torch.equal(getattr(a0, name), getattr(a1, name)), name
    torch.testing.assert_close(a0.sums, a1.sums, rtol=1e-12, atol=1e-12)
    check_moments(m1, X, rtol=1e-5 if precision == "float32" else 3e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
def test_cuda_route_runs_on_the_callers_stream(rng, monkeypatch):
    """Queued behind work already on a side stream: the result sees that work."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    X = (rng.standard_normal((20_000, 64)) + 1).astype(np.float32)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        Xg = torch.zeros((20_000, 64), device="cuda")
        for _ in range(20):  # keep the stream busy before the data lands
            Xg.mul_(1.0)
        Xg.copy_(t(X).cuda(non_blocking=False))
        m = ops.moments(Xg, check_finite=False)
        s.synchronize()
    check_moments(m, X)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("rows,k,D", [(1, 1, 1), (1000, 70, 37), (50_000, 1024, 64)])
def test_argmax_rows_cuda_equals_cpu(dtype, rows, k, D, rng):
    """Integer scores (many exact ties: the lowest index must win), zero rows, a center and a
    row scale with zeros; every output written (poisoned first)."""
    scores = t(rng.integers(-3, 4, (rows, k)).astype(np.float32))
    scores[1::7] = float("nan")  # every score NaN: label 0, score NaN (0 for the zero rows among them)
    X = t(rng.standard_normal((rows, D)).astype(np.float32)).to(getattr(torch, dtype))
    X[::5] = 0
    center = t(rng.standard_normal(D).astype(np.float32) * 0.1)
    row_scale = t((rng.random(rows) * (rng.random(rows) > 0.3)).astype(np.float32))
    col_scale = t((rng.standard_normal(k) * (rng.random(k) > 0.1)).astype(np.float32))
    for kw in (dict(), dict(center=center), dict(row_scale=row_scale), dict(col_scale=col_scale)):
        got = _argmax(scores.cuda(), X.cuda(), **{n: v.cuda() for n, v in kw.items()})
        want = _argmax(scores, X, **kw)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(got[2], want[2], rtol=2e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("rows,D,layout", [(1, 1, "dense"), (1000, 37, "dense"), (300_000, 512, "dense"),
                                           (5000, 128, "strided4"), (5000, 128, "offset1"), (2000, 1030, "dense")])
def test_centre_rows_cuda_equals_cpu(dtype, rows, D, layout, rng):
    """The vector path (D % 4 == 0, 16-byte aligned rows) and the element-wise one (ragged D,
    rows starting off 16 bytes), several row blocks and column blocks; out poisoned first."""
    cols = D + (4 if layout == "strided4" else 1 if layout == "offset1" else 0)
    big = t((rng.standard_normal((rows, cols)) * 3 + 20).astype(np.float32)).to(getattr(torch, dtype))
    X = big[:, 1:D + 1] if layout == "offset1" else big[:, :D]
    shift = t(rng.standard_normal(D).astype(np.float32) + 20)
    want = _centre(X, shift, first=rows // 3)
    got = _centre(X.cuda(), shift.cuda(), first=rows // 3)
    if dtype == "float64":  # CUDA subtracts in float64 then rounds; the CPU rounds x first
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=4e-6)
    else:
        np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
def test_argmax_rows_rescore_cuda(rng):
    """The CUDA re-score undoes the planted near-tie swaps as the CPU's does (labels equal; the
    scores to float32 rounding)."""
    dots, X, C, center, s, E, b, swap = _near_tie_case(rng, n=5000, D=130, k=300, device="cuda")
    got = _argmax(dots, X, center=center, col_scale=s, centroids=C)
    want = _argmax(dots.cpu(), X.cpu(), center=center.cpu(), col_scale=s.cpu(), centroids=C.cpu())
    np.testing.assert_array_equal(got[0], b)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=2e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_cluster_sums_cuda_equals_cpu(dtype, rng):
    from edpairs._arrays import Namespace

    c = Namespace("torch").capsule
    for N, D, k in [(1, 1, 1), (3000, 37, 70), (200_000, 130, 1024)]:
        X = t(rng.standard_normal((N, D)).astype(np.float32)).to(getattr(torch, dtype))
        labels = t(rng.integers(0, k, N))
        rscale = t((rng.random(N) * (rng.random(N) > 0.1)).astype(np.float32))
        center = t(rng.standard_normal(D).astype(np.float32))
        out = []
        for dev in ("cpu", "cuda"):
            sums = torch.full((k, D), float("nan"), dtype=torch.float64, device=dev)
            counts = torch.full((k,), -7, dtype=torch.int64, device=dev)
            stream = 0 if dev == "cpu" else int(torch.cuda.current_stream().cuda_stream)
            lib().cluster_sums(c(X.to(dev)), c(labels.to(dev)), c(rscale.to(dev)), c(center.to(dev)), c(sums),
                               c(counts), stream)
            out.append((sums.cpu().numpy(), counts.cpu().numpy()))
        np.testing.assert_array_equal(out[1][1], out[0][1])
        np.testing.assert_allclose(out[1][0], out[0][0], rtol=1e-9, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
def test_cuda_route_assign_tf32_within_the_tensor_core_bound(rng, monkeypatch):
    """The route's TF32 assignment obeys the tensor-core kernel's error model (test_cuda's
    check_tc_assignment), with a center, scales and strided rows; exact float32 by default."""
    from test_cuda import check_tc_assignment

    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    monkeypatch.setenv("EDPAIRS_GEMM_ASSIGN_ROWS", "1000")
    C = make_centroids(rng, 300, 130, duplicates=3, zeros=1)
    X = make_rows(rng, 7000, 130, C=C, zero_rows=3) + 0.5
    wide = torch.zeros((7000, 136), device="cuda")
    wide[:, :130] = t(X).cuda()
    Xg = wide[:, :130]
    center = (rng.standard_normal(130) * 0.3 + 0.5).astype(np.float32)
    row_scale = (rng.random(7000) * (rng.random(7000) > 0.2)).astype(np.float32)
    col_scale = (rng.standard_normal(300) * 2).astype(np.float32)
    for kw in (dict(), dict(center=center), dict(center=center, row_scale=row_scale, col_scale=col_scale)):
        g = {n: t(v).cuda() for n, v in kw.items()}
        res = ops.assign(Xg, t(C).cuda(), precision="tf32", **g)
        check_tc_assignment(res, X.astype(np.float64), C, "float32", **kw)
        exact = ops.assign(Xg, t(C).cuda(), **g)
        check_assignment(exact, X, C, **kw)
        assert_results_agree(exact, ops.assign(X, C, **kw), X, C, tol=TOL["float32"], **kw)


def _wgmma_gram_skip():
    return "needs edpairs built with CUDA and a GPU" if not _GPU else _gemm.wgmma_unavailable()


@pytest.mark.cuda
@pytest.mark.skipif(_wgmma_gram_skip() is not None, reason=str(_wgmma_gram_skip()))
@pytest.mark.parametrize("N,D,layout", [(1, 4, "dense"), (33, 12, "dense"), (1000, 132, "dense"),
                                        (5000, 256, "strided"), (200_000, 512, "dense"), (3000, 1028, "dense")])
def test_centred_gram_wgmma_within_tf32_of_the_cpu(N, D, layout, rng):
    """The wgmma Gram against the CPU's float64 products of the same centred values: every upper
    entry added once within the TF32 bound (operands rounded to TF32: 2 x 2^-11 per product, a
    factor 4 of slack), nothing below the diagonal touched, column sums to float32 rounding."""
    cols = D + (4 if layout == "strided" else 0)
    big = t((rng.standard_normal((N, cols)) * (1 + rng.random(cols)) + 40).astype(np.float32))
    X = big[:, :D]
    shift = X[: min(N, 1000)].double().mean(0).float()
    want_m2, want_cs = _centred_gram(X, shift)
    got_m2, got_cs = _centred_gram(X.cuda(), shift.cuda())
    Xc = (X - shift).double().numpy()
    absg = np.abs(Xc).T @ np.abs(Xc)
    iu, il = np.triu_indices(D), np.tril_indices(D, -1)
    err = np.abs(got_m2 - want_m2)[iu]
    assert np.all(err <= 4 * 2.0 ** -10 * absg[iu] + 1e-6 * absg.max()), err.max()
    assert (got_m2[il] == -3.0).all()
    np.testing.assert_allclose(got_cs, want_cs, rtol=1e-6, atol=1e-6 * np.abs(Xc).sum(0).max())


@pytest.mark.cuda
@pytest.mark.skipif(_wgmma_gram_skip() is not None, reason=str(_wgmma_gram_skip()))
def test_moments_with_the_wgmma_gram(rng, monkeypatch):
    """ops.moments with EDPAIRS_GEMM_GRAM=wgmma: the kernel path is taken and the moments are
    within TF32 of float64 (relative Frobenius error <= 1e-3, and at most twice cuBLAS's TF32
    error on the same data: operands truncated to TF32 instead of rounded gave 20 times it on an
    H100; the mean from the unrounded centred values, to 1e-5 on values of spread ~8);
    misaligned rows stay on cuBLAS."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "wgmma")
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "0")  # cuBLAS's row below with TF32 operands, as judged
    X = (rng.standard_normal((100_000, 64)) @ rng.standard_normal((64, 64)) + 30).astype(np.float32)
    Xg = t(X).cuda()
    assert _gemm.gram_wgmma_applies(Xg, "tf32")
    got = ops.moments(Xg, precision="tf32")
    Xd = X.astype(np.float64)
    mean = Xd.mean(0)
    cov = (Xd - mean).T @ (Xd - mean)
    np.testing.assert_allclose(got.mean.cpu().numpy(), mean, rtol=0, atol=1e-5)
    m2 = got.m2.cpu().numpy()
    assert np.linalg.norm(m2 - cov) <= 1e-3 * np.linalg.norm(cov)
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "cublas")
    cublas = ops.moments(Xg, precision="tf32").m2.cpu().numpy()
    assert np.linalg.norm(m2 - cov) <= 2 * np.linalg.norm(cublas - cov), (np.linalg.norm(m2 - cov), np.linalg.norm(cublas - cov))
    monkeypatch.setenv("EDPAIRS_GEMM_GRAM", "wgmma")
    wide = torch.zeros((100_000, 65), device="cuda")
    wide[:, 1:] = Xg
    assert not _gemm.gram_wgmma_applies(wide[:, 1:], "tf32")  # rows off 16 bytes
    other = ops.moments(wide[:, 1:], precision="tf32")
    assert np.linalg.norm(other.m2.cpu().numpy() - cov) <= 1e-3 * np.linalg.norm(cov)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
def test_cuda_moments_from_float16_operands(rng, monkeypatch):
    """EDPAIRS_GEMM_HALF=1 on the GPU: CentreRows' float16 operands bit for bit torch's
    rounding of (x - shift) * scale; the TF32 moments from them (cuBLAS float16 products into
    float32) within float16's rounding, symmetric, with and without the overlap; CentreRows'
    colmax the largest scaled values; a later step past float16's range runs again with the
    scales of the largest values seen and comes out finite and right."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    X = (rng.standard_normal((300_000, 256)) @ rng.standard_normal((256, 256)) * 0.1 + 3).astype(np.float32)
    X[:, :8] *= 1e3  # columns of different sizes
    Xg = t(X).cuda()
    shift = Xg[:1000].mean(0)
    scale = _gemm._pow2_scale(torch, _gemm.half_top(torch, Xg, shift, 1000))
    out = torch.empty((1000, 256), dtype=torch.float16, device="cuda")
    c = Namespace("torch").capsule
    colmax = torch.zeros(256, device="cuda")
    lib().CentreRows(c(Xg), c(shift), c(out), None, c(scale), c(colmax)).run(
        0, 1000, torch.cuda.current_stream().cuda_stream)
    assert torch.equal(out, ((Xg[:1000] - shift) * scale).half())
    assert torch.equal(colmax, ((Xg[:1000] - shift) * scale).abs().amax(0))  # a maximum: any order, the same bits
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "1")
    for overlap in ("0", "1"):
        monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", overlap)
        m = ops.moments(Xg, precision="tf32")
        check_moments(m, X, rtol=1e-4)
        assert torch.equal(m.m2, m.m2.T)
    X[200_000:] *= 1000
    m = ops.moments(t(X).cuda(), precision="tf32")
    assert bool(torch.isfinite(m.m2).all())
    check_moments(m, X, rtol=1e-4)


def test_signal_masks_write_scaled_float16(rng):
    """SignalMasks with a float16 out, of z given as z_in * alpha + shift (alpha and shift per
    concept): [M, float16(M z scale)]
    bit for bit as numpy rounds, the counts and z sums those of the float32 z with a float32 out."""
    z_in = (rng.standard_normal((400, 7)) * 10.0 ** rng.integers(-3, 4, 7)).astype(np.float32)
    shift = rng.standard_normal(7).astype(np.float32)
    alpha = (2.0 ** rng.integers(-20, 20, 7)).astype(np.float32)  # per concept
    z = z_in * alpha + shift
    scale = (2.0 ** rng.integers(-8, 9, 7)).astype(np.float32)
    c = Namespace("torch").capsule
    sums = []
    for out in (np.empty((400, 14), np.float32), np.empty((400, 14), np.float16)):
        count, sz, szz = np.zeros(7, np.int64), np.zeros(7), np.zeros(7)
        if out.dtype == np.float32:
            lib().SignalMasks(*[c(t(a)) for a in (z, out, count, sz, szz)]).run(400, 0)
        else:
            lib().SignalMasks(*[c(t(a)) for a in (z_in, out, count, sz, szz, scale, shift, alpha)]).run(400, 0)
        sums.append((count, sz, szz))
    m = z > 0
    np.testing.assert_array_equal(out[:, :7], m.astype(np.float16))
    with np.errstate(over="ignore"):  # some pass 65504: Inf, as the kernel writes
        want = np.where(m, z * scale, 0).astype(np.float16)
    np.testing.assert_array_equal(out[:, 7:].view(np.uint16), want.view(np.uint16))
    for a, b in zip(*sums):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("center", [False, True])
def test_route_signal_moments_from_float16_operands(center, rng, monkeypatch):
    """EDPAIRS_GEMM_HALF=1, TF32 precision: the signal moments from float16 x~, W and masked z
    (columns of very different sizes), the scales undone exactly: within float16's rounding of
    the reference; with the two lanes too."""
    X, W, b, c = make_signal_data(rng, 3000, 12, 6, center=center, offset=2.0)
    X = X * (10.0 ** np.arange(-3, 3, 0.5)).astype(np.float32)
    W = W / (10.0 ** np.arange(-3, 3, 0.5)).astype(np.float32)[:, None]  # the same z
    c = None if c is None else c * (10.0 ** np.arange(-3, 3, 0.5)).astype(np.float32)
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "1")
    for overlap in ("0", "1"):
        monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", overlap)
        out = _gemm.signal_moments(t(X), t(W), t(b), t(c), precision="tf32", rows=700, lib=lib())
        sm = ops.SignalMoments(*(o.numpy() for o in out), center=c)
        check_signal_moments(sm, X, W, b, center=c, rtol=2e-4)  # measured 4.9e-5


def test_route_signal_moments_from_float16_operands_keep_small_concepts(rng):
    """Each concept's W column has a float16 scale of its own: a concept a billionth of
    another's size keeps float16's accuracy (one scale for all of W flushed it to zero: 17%
    off, wrong counts)."""
    X, W, b, _ = make_signal_data(rng, 2000, 16, 3, offset=1.0)
    W[:, 0] *= np.float32(1e-9)
    b[0] *= np.float32(1e-9)
    out = _gemm.signal_moments(t(X), t(W), t(b), None, precision="tf32", rows=700, lib=lib(), half=True)
    check_signal_moments(ops.SignalMoments(*(o.numpy() for o in out)), X, W, b, rtol=2e-4)


def test_float16_operands_need_a_torch_that_has_them(rng, monkeypatch):
    """Without torch's float16 products into float32 TF32 operands serve: with a warning where
    the call or the knob asked for float16 ones, silently where only the default
    (HALF_DEFAULT['moments']) chose them."""
    import warnings

    monkeypatch.setattr(_gemm, "_half_unavailable", lambda torch: "torch 2.1 has none")
    X = rng.standard_normal((300, 5)).astype(np.float32)
    with pytest.warns(RuntimeWarning, match=r"float16 operands \(EDPAIRS_GEMM_HALF\) ignored for the moments: "
                                            "torch 2.1 has none"):
        mean, m2 = _gemm.moments(t(X), precision="tf32", rows=100, lib=lib(), half=True)
    check_moments(ops.Moments(300, mean, m2), X, rtol=1e-6)  # the CPU's TF32 products are exact
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "moments")
    with pytest.warns(RuntimeWarning, match="ignored for the moments"):
        _gemm.moments(t(X), precision="tf32", rows=100, lib=lib())
    monkeypatch.delenv("EDPAIRS_GEMM_HALF")
    assert _gemm.HALF_DEFAULT["moments"]
    passes = _spy_passes(monkeypatch, "_moments_pass")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mean, m2 = _gemm.moments(t(X), precision="tf32", rows=100, lib=lib())
    assert passes == [None]  # TF32 operands
    check_moments(ops.Moments(300, mean, m2), X, rtol=1e-6)


def test_route_signal_moments_from_float16_operands_rescale_past_the_range(rng, monkeypatch):
    """A later step 1000 times the first's overflows float16: a second float16 pass with the
    scales of every step, finite sums within float16's rounding."""
    X, W, b, _ = make_signal_data(rng, 2000, 6, 4, offset=1.0)
    X[1000:] *= 1000
    b = b * 0  # z scales with x: the later rows' z pass float16's range as well
    passes = _spy_passes(monkeypatch, "_signal_pass")
    out = _gemm.signal_moments(t(X), t(W), t(b), None, precision="tf32", rows=500, lib=lib(), half=True)
    assert len(passes) == 2 and all(p is not None for p in passes)
    check_signal_moments(ops.SignalMoments(*(o.numpy() for o in out)), X, W, b, rtol=2e-4)


@pytest.mark.parametrize("moves", [False, True])
def test_route_signal_moments_from_float16_operands_with_a_dead_feature(moves, rng, monkeypatch):
    """A feature without spread in the first step, its weight as large as the others' in data of
    small units (x ~ 1e-10, W ~ 1e10): its fixed scale made it set every concept's W scale and
    pushed the other weights out of float16 (counts 92 for 163, sum_z 52% off). It gets no
    weight now: right sums in one pass while it stays put, and a second pass with the scales of
    every step where it moves after the first step."""
    X, W, b, _ = make_signal_data(rng, 4000, 8, 3, offset=0.0)
    X = (X * 1e-10).astype(np.float32)
    W = (W / 1e-10).astype(np.float32)
    X[:, 0] = 0
    if moves:
        X[1000:, 0] = (rng.standard_normal(len(X) - 1000) * 1e-10).astype(np.float32)
    c = np.zeros(8, np.float32)
    passes = _spy_passes(monkeypatch, "_signal_pass")
    out = _gemm.signal_moments(t(X), t(W), t(b), t(c), precision="tf32", rows=1000, lib=lib(), half=True)
    assert len(passes) == (2 if moves else 1) and all(p is not None for p in passes)
    got = ops.SignalMoments(*(o.numpy() for o in out))
    want = reference.signal_moments(X.astype(np.float64), W, b, c)
    assert np.abs(got.count - want["count"]).max() <= 3  # rows with z within float16's rounding of 0 may flip
    np.testing.assert_allclose(got.sum_z, want["sum_z"], rtol=2e-3)


def test_route_signal_moments_dead_feature_moving_within_its_old_scale(rng, monkeypatch):
    """A feature without spread in the first step that later reaches values in [0.5, 1): the
    scale of those values is the one a zero gets (2^8), so the scales alone do not change, but
    the feature is no longer dead (it gets its weight back): the second pass still takes
    float16 operands instead of giving up to TF32 ones (a reviewer's case)."""
    X, W, b, _ = make_signal_data(rng, 400, 6, 3, offset=0.0)
    X[:100, 2] = 0
    X[100:, 2] = (rng.uniform(0.5, 1.0, 300) * np.sign(rng.standard_normal(300))).astype(np.float32)
    passes = _spy_passes(monkeypatch, "_signal_pass")
    out = _gemm.signal_moments(t(X), t(W), t(b), None, precision="tf32", rows=100, lib=lib(), half=True)
    assert len(passes) == 2 and all(p is not None for p in passes)
    got = ops.SignalMoments(*(o.numpy() for o in out))
    want = reference.signal_moments(X.astype(np.float64), W, b, None)
    assert np.abs(got.count - want["count"]).max() <= 3  # rows with z within float16's rounding of 0 may flip
    np.testing.assert_allclose(got.sum_z, want["sum_z"], rtol=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
def test_cuda_signal_moments_from_float16_operands(rng, monkeypatch):
    """EDPAIRS_GEMM_HALF=1 on the GPU: SignalMasks' float16 out (of z = z_in alpha + shift) bit
    for bit torch's rounding of M z scale; the TF32 signal moments from float16 operands within float16's rounding of the
    reference (rows whose z lies within 1% of sum |w x| of 0 left out: their masks may flip),
    with one lane and two; a later step past float16's range runs again, scaled for the
    largest values seen, and comes out finite."""
    monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", "gemm")
    X, W, b, c = make_signal_data(rng, 300_000, 256, 64, center=True, offset=3.0)
    zscale = np.abs(X - c) @ np.abs(W) + np.abs(b - c @ W)
    X = X[np.all(np.abs((X - c) @ W - (b - c @ W)) > 1e-2 * zscale, axis=1)]
    z = torch.randn((1000, 64), device="cuda")
    scale = (2.0 ** torch.randint(-4, 5, (64,), device="cuda")).float()
    out = torch.empty((1000, 128), dtype=torch.float16, device="cuda")
    sums = [torch.zeros(64, dtype=dt, device="cuda") for dt in (torch.int64, torch.float64, torch.float64)]
    cap = Namespace("torch").capsule
    shift = torch.randn(64, device="cuda")
    alpha = (2.0 ** torch.randint(-20, 20, (64,), device="cuda")).float()
    lib().SignalMasks(cap(z), cap(out), *map(cap, sums), cap(scale), cap(shift), cap(alpha)).run(
        1000, torch.cuda.current_stream().cuda_stream)
    z = z * alpha + shift
    m = z > 0
    assert torch.equal(out, torch.cat([m.half(), torch.where(m, z * scale, 0).half()], 1))
    monkeypatch.setenv("EDPAIRS_GEMM_HALF", "1")
    for overlap in ("0", "1"):
        monkeypatch.setenv("EDPAIRS_GEMM_OVERLAP", overlap)
        sm = ops.signal_moments(t(X).cuda(), t(W).cuda(), t(b).cuda(), center=t(c).cuda(), precision="tf32")
        check_signal_moments(sm, X, W, b, center=c, rtol=2e-4)
    X[len(X) // 2:] *= 1000
    sm = ops.signal_moments(t(X).cuda(), t(W).cuda(), t(b * 1000).cuda(), center=t(c).cuda(), precision="tf32")
    assert all(bool(torch.isfinite(getattr(sm, f)).all()) for f in ("sum_x", "sum_z", "sum_zz", "sum_xz"))


def _half_rows_reference(X):
    """float16(x * 2^(8 - e)) per row, max |x| = m 2^e (m in [0.5, 1); NaN passed over, Inf
    taking e = 0), and 1 / ||x||; zero rows and rows whose 1 / ||x|| passes float32 as zeros;
    rows with NaN or Inf among non-zero values as they scale, with rscale 0 (ops.h 3e')."""
    big = np.fmax.reduce(np.abs(X), axis=1)
    _, e = np.frexp(np.where(np.isfinite(big), big, 0))
    k = np.ldexp(np.float32(1), np.clip(8 - e, -126, 127)).astype(np.float32)
    norm = np.linalg.norm(X.astype(np.float64), axis=1)
    finite = np.isfinite(norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(norm > 0, 1 / norm, np.inf)
    zero = ~(big > 0) | (finite & ~(inv <= np.finfo(np.float32).max))
    with np.errstate(over="ignore", invalid="ignore"):
        out = (X * k[:, None]).astype(np.float16)
    out[zero] = 0
    return out, np.where(zero | ~finite, 0, inv).astype(np.float32)


def test_half_rows_scale_each_row_by_a_power_of_two(rng):
    """half_rows: each row times its own power of two (its largest magnitude into [128, 256)) as
    float16 bit for bit as numpy rounds, 1 / ||x|| to float32 rounding; zero rows and rows too
    short for a float32 1 / ||x|| come out as zeros with rscale 0."""
    X = (rng.standard_normal((200, 37)) * 10.0 ** rng.integers(-30, 30, (200, 1))).astype(np.float32)
    X[0] = 0
    X[1] = 1e-40  # norm ~6e-40: 1 / norm passes float32
    X[2, :] = 0
    X[2, 5] = 3e38
    X[3, 4] = np.nan  # NaN beside other values: written as it scales, rscale 0
    X[4, :] = 0
    X[4, 7] = np.nan  # NaN and zeros only: a zero row
    X[5, 6] = np.inf  # Inf: the scale 2^8, rscale 0
    out, rscale = np.empty((200, 37), np.float16), np.empty(200, np.float32)
    c = Namespace("torch").capsule
    lib().half_rows(c(t(X)), c(t(out)), c(t(rscale)), 0)
    want, want_r = _half_rows_reference(X)
    np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))
    np.testing.assert_allclose(rscale, want_r, rtol=2e-6)
    assert rscale[0] == 0 and rscale[1] == 0 and not out[:2].any()
    assert (rscale[3:6] == 0).all() and np.isnan(out[3, 4]) and not out[4].any() and np.isinf(out[5, 6])
    assert np.abs(out[6:].astype(np.float32)).max(1).min() >= 128


HALF_TOL = Tol(score=2e-3, margin=4e-3, sums=1e-5)  # float16 operands (11 bits), float32 sums


def test_half_assign_labels_from_float16_rows(rng):
    """half_assign on CPU tensors (the same functions the CUDA route runs): labels and cosines
    of the float16 copies within float16's rounding of the float64 reference, zero rows label
    0 with score 0, the cluster sums those of the float32 rows for the labels given."""
    C = make_centroids(rng, 150, 24) * np.float32(1e-20)  # centroids' own scale does not matter
    X = make_rows(rng, 3000, 24, C=C * np.float32(1e20), zero_rows=3) * np.float32(1e5)
    labels, scores = torch.empty(3000, dtype=torch.int64), torch.empty(3000)
    sums, counts = torch.empty((150, 24), dtype=torch.float64), torch.empty(150, dtype=torch.int64)
    _gemm.half_assign(t(X), t(C), labels, scores, sums, counts, lib=lib())
    check_assignment(ops.Assignment(labels, scores, sums, counts), X, C, tol=HALF_TOL, check_ties=False)


def test_half_assign_without_memory_labels_the_float32_rows(rng, monkeypatch):
    """Under the default ("auto"), a device without memory for the float16 copies gets the
    float32 rows' labels with a warning naming what did not fit, nothing written by the half
    path; with EDPAIRS_ASSIGN_HALF=copies the out-of-memory error stands. (CPU tensors with
    half_assign_applies forced on, and float16 allocations failing as a full GPU's do.)"""
    C = make_centroids(rng, 140, 24)
    X = make_rows(rng, 1700, 24, C=C)
    want = ops.assign(t(X), t(C), precision="tf32")
    real_empty = torch.empty

    def empty(*args, **kwargs):
        if kwargs.get("dtype") == torch.float16:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(_gemm, "half_assign_applies", lambda *args: True)
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.delenv("EDPAIRS_ASSIGN_HALF", raising=False)
    with pytest.warns(RuntimeWarning, match=r"EDPAIRS_ASSIGN_HALF: no device memory for the float16 copies of the "
                                            r"rows \(0.1 MiB\): labelling the float32 rows instead \(CUDA out of memory"):
        got = ops.assign(t(X), t(C), precision="tf32")
    for name in ("labels", "scores", "sums", "counts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "copies")
    with pytest.raises(torch.cuda.OutOfMemoryError, match="a test"):
        ops.assign(t(X), t(C), precision="tf32")


def test_half_assign_copies_the_rows_in_steps(rng, monkeypatch):
    """The float16 copies are made SCRATCH_BYTES at a time: steps of 500 rows (and a ragged
    last one) give the labels, scores and sums of one copy of all the rows."""
    C = make_centroids(rng, 140, 24)
    X = make_rows(rng, 1700, 24, C=C)
    runs = []
    for scratch in (None, 2 * 24 * 500):
        if scratch:
            monkeypatch.setattr(_gemm, "SCRATCH_BYTES", scratch)
        out = (torch.empty(1700, dtype=torch.int64), torch.empty(1700), torch.empty((140, 24), dtype=torch.float64),
               torch.empty(140, dtype=torch.int64))
        _gemm.half_assign(t(X), t(C), *out, lib=lib())
        runs.append(out)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    # torch's default dtype does not reach the scratch (its 1 / ||c|| were float64 there)
    torch.set_default_dtype(torch.float64)
    try:
        out = (torch.empty(1700, dtype=torch.int64), torch.empty(1700, dtype=torch.float32),
               torch.empty((140, 24), dtype=torch.float64), torch.empty(140, dtype=torch.int64))
        _gemm.half_assign(t(X), t(C), *out, lib=lib())
    finally:
        torch.set_default_dtype(torch.float32)
    for a, b in zip(runs[0], out):
        assert torch.equal(a, b)


class _CountingLib:
    """The compiled module, counting half_rows calls by the shape of the rows they copy."""

    def __init__(self):
        self.real, self.copied = lib(), []

    def half_rows(self, x, *args):
        x = torch.from_dlpack(x)  # (takes the capsule: a new one goes on)
        self.copied.append(tuple(x.shape))
        return self.real.half_rows(Namespace("torch").capsule(x), *args)

    def __getattr__(self, name):
        return getattr(self.real, name)


def fits_with_and_without_kept_rows(X, C0, monkeypatch) -> dict:
    """SphericalKMeans(k, init=C0, max_iter=3) fitted on X with TF32 products, with the float16
    copies kept (True) and without (keep_half_rows a no-op: False), each fit's copies counted:
    its passes (n_iter_ + 1, at least three) copy X once, where without the keeping every pass
    copied it, and copy the centroids every pass."""
    monkeypatch.setattr(ops, "DEFAULT_PRECISION", "tf32")
    fits = {}
    with monkeypatch.context() as m:
        for keep in (True, False):
            if not keep:
                m.setattr(_gemm, "keep_half_rows", lambda arrays: contextlib.nullcontext())
            counting = _CountingLib()
            m.setattr(ops, "lib", lambda: counting)
            fits[keep] = edpairs.SphericalKMeans(C0.shape[0], init=C0, max_iter=3, tol=0, progress=False).fit(X)
            passes = fits[keep].n_iter_ + 1
            assert passes >= 3, passes  # (data that converges at once would test nothing)
            assert counting.copied.count(tuple(X.shape)) == (1 if keep else passes), counting.copied
            assert counting.copied.count(tuple(C0.shape)) == passes, counting.copied
    assert fits[True].n_iter_ == fits[False].n_iter_
    return fits


def test_a_fit_copies_its_rows_to_float16_once(rng, monkeypatch):
    """SphericalKMeans.fit keeps the float16 copies of held rows for all its passes
    (keep_half_rows, fits_with_and_without_kept_rows); the fit is the same bit for bit. (CPU
    tensors, half_assign_applies forced on: the functions the CUDA route runs.)"""
    C0 = make_centroids(rng, 140, 24)
    X = t(make_rows(rng, 2000, 24, C=C0))
    monkeypatch.setattr(_gemm, "half_assign_applies", lambda *args: True)
    fits = fits_with_and_without_kept_rows(X, C0, monkeypatch)
    for name in ("cluster_centers_", "labels_"):
        assert torch.equal(getattr(fits[True], name), getattr(fits[False], name)), name
    np.testing.assert_array_equal(fits[True].counts_, fits[False].counts_)
    assert fits[True].inertia_ == fits[False].inertia_


def test_kept_float16_rows(rng, monkeypatch):
    """keep_half_rows: rows of a held array are copied once and labelled from the copies again;
    rows written in place since are copied again, into the same memory; rows outside the held
    arrays, and chunks whose copies would pass the budget, are copied every call; the labels
    are always those of a call outside the context."""
    C = t(make_centroids(rng, 140, 24))
    X = t(make_rows(rng, 1700, 24, C=C.numpy()))
    other = X.clone()

    def run(rows):
        out = (torch.empty(rows.shape[0], dtype=torch.int64), torch.empty(rows.shape[0]),
               torch.empty((140, 24), dtype=torch.float64), torch.empty(140, dtype=torch.int64))
        _gemm.half_assign(rows, C, *out, lib=counting)
        return out

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b))

    counting = _CountingLib()
    want = run(X)
    with _gemm.keep_half_rows([X, np.zeros(3)]):
        counting.copied.clear()
        assert same(run(X), want) and same(run(X[:]), want) and counting.copied == [(140, 24), (1700, 24), (140, 24)]
        kept = next(iter(_gemm._KEPT.get().copies.values())).Xh
        part = run(X[100:600])  # another view: its own copies
        assert same(part[:2], tuple(a[100:600] for a in want[:2]))
        X[:50] *= -1  # written in place
        counting.copied.clear()
        flipped = run(X)
        assert counting.copied == [(140, 24), (1700, 24)]
        assert next(iter(_gemm._KEPT.get().copies.values())).Xh is kept
        counting.copied.clear()
        run(other)
        run(other)
        assert counting.copied == [(140, 24), (1700, 24)] * 2  # not held: copied every call
    assert _gemm._KEPT.get() is None
    assert same(flipped, run(X)) and not same(flipped, want)  # the written rows' labels, as outside
    for budget, copies in ((2 * 1700 * 24 - 1, 2), (2 * 1700 * 24, 1)):  # (the float16 bytes count)
        counting.copied.clear()
        with _gemm.keep_half_rows([X], budget=budget):
            run(X)
            run(X)
        assert counting.copied.count((1700, 24)) == copies, budget  # over the budget: copied every call
    with _gemm.keep_half_rows([np.zeros(3)]):
        assert _gemm._KEPT.get() is None  # nothing of torch's held: no state
    # Copies kept for rows whose call then found no memory for the centroids' float16 values
    # (the call labels nothing): the next call makes them, rather than reading unmade ones.
    real_empty = torch.empty

    def no_room(shape, *args, **kwargs):
        if tuple(shape) == (140,):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
        return real_empty(shape, *args, **kwargs)

    counting.copied.clear()
    monkeypatch.delenv("EDPAIRS_ASSIGN_HALF", raising=False)  # ("auto": no memory is a warning)
    out = (torch.empty(1700, dtype=torch.int64), torch.empty(1700), None, None)
    with _gemm.keep_half_rows([X]):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", no_room)
            with pytest.warns(RuntimeWarning, match="no device memory"):
                assert _gemm.half_assign(X, C, *out, lib=counting) is False
        assert counting.copied == []
        assert same(run(X), flipped) and counting.copied == [(140, 24), (1700, 24)]
    # No memory for the copies themselves: the rows are copied per call, and the keeping is not
    # tried again (each failed try makes torch free its cache).
    tries = []

    def no_copies(shape, *args, **kwargs):
        if kwargs.get("dtype") == torch.float16 and tuple(shape) == (1700, 24):
            tries.append(1)
            if len(tries) == 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
        return real_empty(shape, *args, **kwargs)

    counting.copied.clear()
    with _gemm.keep_half_rows([X]):
        with monkeypatch.context() as m:
            m.setattr(torch, "empty", no_copies)
            assert same(run(X), flipped)
            assert _gemm._KEPT.get().left == 0 and not _gemm._KEPT.get().copies  # nothing more to try
            assert same(run(X), flipped)
    assert counting.copied.count((1700, 24)) == 2 and len(tries) == 3  # the refused try, then per-call scratch


def test_half_assign_knob(monkeypatch):
    """EDPAIRS_ASSIGN_HALF: "auto" / unset (the default since H200 run 6) on where the wgmma
    kernel would label the rows and the float16 copies' rows start on 16-byte boundaries (D a
    multiple of 8), off elsewhere; "0" off, "1" on (in one kernel where it runs), "copies" on
    (always the copies); anything else refused with the values it takes. CPU tensors never take
    the one-kernel path (wide and unaligned rows: the CUDA tests)."""
    X, X12 = torch.zeros((4, 8)), torch.zeros((4, 12))
    for value, on in (("0", False), ("1", True), ("copies", True)):
        monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", value)
        assert _gemm.half_labels(X) is on and _gemm.half_labels(X12) is on
        assert not _gemm.half_resident_applies(X)  # a CPU tensor
    for value in ("", "auto", None):
        if value is None:
            monkeypatch.delenv("EDPAIRS_ASSIGN_HALF", raising=False)
        else:
            monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", value)
        assert not _gemm.half_labels(X)  # no wgmma here (a CPU tensor, a build without sm_90a)
        with monkeypatch.context() as m:
            m.setattr(_gemm, "wgmma_labels_tf32", lambda rows: True)
            assert _gemm.half_labels(X) and not _gemm.half_labels(X12)
            assert not _gemm.half_resident_applies(X)  # the copies, not the one kernel
            # Knobs that only the float32 rows' kernels honour keep them.
            for name, asked in (("EDPAIRS_ASSIGN_KERNEL", "wgmma-tma"), ("EDPAIRS_ASSIGN_SUMS", "columns"),
                                ("EDPAIRS_ASSIGN_SUMS", "block"), ("EDPAIRS_ASSIGN_OVERLAP", "4"),
                                ("EDPAIRS_ASSIGN_OVERLAP", " +02")):  # (the library's strtol reads it)
                m.setenv(name, asked)
                assert not _gemm.half_labels(X), (name, asked)
                m.delenv(name)
            # Values the library refuses are refused here, in its words, before any choice.
            for name, bad, words in (("EDPAIRS_ASSIGN_OVERLAP", "2 ", "an integer from 0 to 64"),
                                     ("EDPAIRS_ASSIGN_OVERLAP", "x", "an integer from 0 to 64"),
                                     ("EDPAIRS_ASSIGN_SUMS", "rows", "'auto', 'columns', 'sorted', 'block' or 'fused'"),
                                     ("EDPAIRS_ASSIGN_KERNEL", "tma", "'auto', 'mma', 'wgmma' or 'wgmma-tma'")):
                m.setenv(name, bad)
                with pytest.raises(ValueError, match=f"{name} must be {re.escape(words)}, got '{bad}'"):
                    _gemm.half_labels(X)
                m.delenv(name)
            for name, same in (("EDPAIRS_ASSIGN_KERNEL", "wgmma"), ("EDPAIRS_ASSIGN_SUMS", "sorted"),
                               ("EDPAIRS_ASSIGN_OVERLAP", "1"), ("EDPAIRS_ASSIGN_OVERLAP", "01"),
                               ("EDPAIRS_ASSIGN_OVERLAP", " 0"), ("EDPAIRS_ASSIGN_OVERLAP", "")):
                m.setenv(name, same)
                assert _gemm.half_labels(X), (name, same)
                m.delenv(name)
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "yes")
    with pytest.raises(ValueError, match="EDPAIRS_ASSIGN_HALF must be 'auto', '0', '1' or 'copies', got 'yes'"):
        _gemm.half_labels(X)
    cuda_torch = SimpleNamespace(name="torch", is_cuda=lambda a: True, dtype_name=lambda a: "float32")
    with pytest.raises(ValueError, match="EDPAIRS_ASSIGN_HALF must be"):  # checked before anything else
        _gemm.half_assign_applies(X, cuda_torch, 2, "float32", None, None, None)
    # Which knob wins: the float16 rows only where EDPAIRS_GEMM_ROUTE leaves the choice ("gemm"
    # asks for the route and its near-tie re-score, "kernel" for the float32 kernels).
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "copies")
    for route, on in ((None, True), ("auto", True), ("gemm", False), ("kernel", False)):
        if route is None:
            monkeypatch.delenv("EDPAIRS_GEMM_ROUTE", raising=False)
        else:
            monkeypatch.setenv("EDPAIRS_GEMM_ROUTE", route)
        assert _gemm.half_assign_applies(X, cuda_torch, 200, "tf32", None, None, None) is on, route
    assert not _gemm.half_assign_applies(X, cuda_torch, 200, "float32", None, None, None)


def test_small_k_takes_the_kept_copies_only_when_asked(monkeypatch):
    """Below TF32_MIN_K the float16 copies apply only with EDPAIRS_ASSIGN_HALF_SMALL_K=1 and only
    to rows whose copies a fit keeps (keep_half_rows; their copies are then made, once): never a
    copy per call; k >= TF32_MIN_K as before; a bad value refused, naming the values."""
    X, other = torch.zeros((40, 8)), torch.zeros((40, 8))
    cuda_torch = SimpleNamespace(name="torch", is_cuda=lambda a: True, dtype_name=lambda a: "float32")
    monkeypatch.delenv("EDPAIRS_ASSIGN_HALF", raising=False)
    monkeypatch.delenv("EDPAIRS_GEMM_ROUTE", raising=False)
    monkeypatch.setattr(_gemm, "wgmma_labels_tf32", lambda rows: True)

    def applies(rows, k):
        return _gemm.half_assign_applies(rows, cuda_torch, k, "tf32", None, None, None)

    for knob in (None, "0", "1"):
        if knob is None:
            monkeypatch.delenv("EDPAIRS_ASSIGN_HALF_SMALL_K", raising=False)
        else:
            monkeypatch.setenv("EDPAIRS_ASSIGN_HALF_SMALL_K", knob)
        assert applies(X, _gemm.TF32_MIN_K) and not applies(X, 64)
        with _gemm.keep_half_rows([X]):
            assert applies(X, 64) is (knob == "1") and not applies(other, 64)
            kept = _gemm._KEPT.get().copies
            assert len(kept) == (1 if knob == "1" else 0)  # (made for the rows asked about: kept for the fit)
        assert not applies(X, 64)
    with _gemm.keep_half_rows([X], budget=2 * 40 * 8 - 1):  # no room to keep them: the float32 rows
        assert not applies(X, 64)
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF_SMALL_K", "yes")
    with pytest.raises(ValueError, match="EDPAIRS_ASSIGN_HALF_SMALL_K must be '0' or '1', got 'yes'"):
        applies(X, 64)
    assert applies(X, _gemm.TF32_MIN_K)  # (read only below TF32_MIN_K)


def small_k_fits(X, C0, monkeypatch, fake_cuda: bool = False) -> dict:
    """SphericalKMeans(64, init=C0, max_iter=3) fitted on X with TF32 products and
    EDPAIRS_ASSIGN_HALF_SMALL_K "0" and "1", by knob: with "1" the rows are copied to float16
    once (the centroids every pass), with "0" never. ``fake_cuda``: torch CPU tensors taken for
    CUDA ones."""
    monkeypatch.setattr(ops, "DEFAULT_PRECISION", "tf32")
    monkeypatch.delenv("EDPAIRS_ASSIGN_HALF", raising=False)
    monkeypatch.delenv("EDPAIRS_GEMM_ROUTE", raising=False)
    fits = {}
    for knob in ("0", "1"):
        monkeypatch.setenv("EDPAIRS_ASSIGN_HALF_SMALL_K", knob)
        with monkeypatch.context() as m:
            counting = _CountingLib()
            m.setattr(ops, "lib", lambda: counting)
            if fake_cuda:
                m.setattr(Namespace, "is_cuda", lambda self, a: self.name == "torch")
            fits[knob] = edpairs.SphericalKMeans(64, init=C0, max_iter=3, tol=0, progress=False).fit(X)
        passes = fits[knob].n_iter_ + 1
        assert counting.copied.count(tuple(X.shape)) == (1 if knob == "1" else 0), counting.copied
        assert counting.copied.count(tuple(C0.shape)) == (passes if knob == "1" else 0), counting.copied
    return fits


def test_a_small_k_fit_labels_from_kept_copies(rng, monkeypatch):
    """With EDPAIRS_ASSIGN_HALF_SMALL_K=1 a fit at k = 64 copies its rows to float16 once and
    labels every pass from the copies (CPU tensors taken for CUDA ones; the CPU labels float16
    values exactly), with the fit of the float32 rows' labels where no row lies near a tie."""
    monkeypatch.setattr(_gemm, "wgmma_labels_tf32", lambda rows: True)
    C0 = make_centroids(rng, 64, 24)
    fits = small_k_fits(t(make_rows(rng, 3000, 24, C=C0)), C0, monkeypatch, fake_cuda=True)
    assert (fits["1"].labels_ == fits["0"].labels_).float().mean() > 0.99


def test_assign_binding_takes_tf32_half_on_the_cpu_as_exact(rng):
    """The binding's "tf32-half" (the one-kernel float16 rows, CUDA only) is, like "tf32", a
    choice of CUDA arithmetic: the CPU, exact float32 always, gives what "float32" gives; an
    unknown precision is refused."""
    X, C = make_rows(rng, 300, 20), make_centroids(rng, 140, 20)
    c = Namespace("torch").capsule
    runs = []
    for precision in ("float32", "tf32-half"):
        out = [torch.empty(300, dtype=torch.int64), torch.empty(300)]
        lib().assign(c(t(X)), c(t(C)), None, None, None, c(out[0]), c(out[1]), None, None, True, precision, 0)
        runs.append(out)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    with pytest.raises(ValueError, match="precision must be 'tf32' or 'float32', got 'half'"):
        lib().assign(c(t(X)), c(t(C)), None, None, None, c(runs[0][0]), c(runs[0][1]), None, None, True, "half", 0)


@pytest.mark.cuda
@pytest.mark.skipif(not _GPU, reason="needs edpairs built with CUDA and a GPU")
@pytest.mark.parametrize("mode", ["copies", "1"])
def test_cuda_assign_from_float16_rows(mode, rng, monkeypatch):
    """EDPAIRS_ASSIGN_HALF on the GPU (TF32, k >= 129), from float16 copies ("copies") or, on
    Hopper, rows made float16 in the labelling kernel ("1"): half_rows' copies bit for bit the
    CPU's (a NaN's bits aside), and the assignment (and a k-means step) within float16's rounding of the reference;
    below k = 129, with a center or with exact products the knob changes nothing."""
    X = make_rows(rng, 20_000, 96, C=make_centroids(rng, 300, 96), zero_rows=2) * np.float32(3.0)
    C = make_centroids(rng, 300, 96)
    Xbad = X.copy()  # and rows that are not finite (ops.h 3e')
    Xbad[5, 3], Xbad[6, :], Xbad[7, 9] = np.nan, 0, np.inf
    Xbad[6, 2] = np.nan
    out, rscale = torch.empty((20_000, 96), dtype=torch.float16), torch.empty(20_000)
    c = Namespace("torch").capsule
    lib().half_rows(c(t(Xbad)), c(out), c(rscale), 0)
    out_g, rscale_g = out.cuda(), rscale.cuda()
    lib().half_rows(c(t(Xbad).cuda()), c(out_g), c(rscale_g), torch.cuda.current_stream().cuda_stream)
    # Elementwise the same bits, but for NaN's: CUDA's conversion writes its one NaN (0x7fff),
    # the CPU's keeps the sign (0x7e00 | sign); a NaN is all the labelling reads of either.
    got_g, want = out_g.cpu(), out
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got_g), nan)
    differ = (got_g.view(torch.int16) != want.view(torch.int16)) & ~nan
    assert not bool(differ.any()), (differ.nonzero()[:10].tolist(), got_g[differ][:10], want[differ][:10])
    np.testing.assert_allclose(rscale_g.cpu().numpy(), rscale.numpy(), rtol=1e-6)  # sums in another order
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", mode)
    res = ops.assign(t(X).cuda(), t(C).cuda(), precision="tf32")
    check_assignment(res, X, C, tol=HALF_TOL, check_ties=False)
    centroids, labels, counts = ops.spherical_kmeans_step(t(X).cuda(), t(C).cuda(), precision="tf32")
    assert bool(torch.isfinite(centroids).all()) and int(counts.sum()) == 20_000
    exact = ops.assign(t(X).cuda(), t(C).cuda(), precision="float32")
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "0")
    assert torch.equal(exact.labels, ops.assign(t(X).cuda(), t(C).cuda(), precision="float32").labels)


def _resident_skip():
    return "needs edpairs built with CUDA and a GPU" if not _GPU else _gemm.wgmma_unavailable()


@pytest.mark.cuda
@pytest.mark.skipif(_resident_skip() is not None, reason=str(_resident_skip()))
@pytest.mark.parametrize("N,D,k,layout", [(1, 1, 129, "dense"), (127, 3, 130, "padded"), (129, 64, 256, "dense"),
                                          (1000, 45, 300, "padded"), (5000, 100, 1024, "dense"),
                                          (20_000, 512, 200, "dense"), (3000, 500, 129, "padded")])
def test_cuda_float16_rows_in_shared_memory_match_reference(N, D, k, layout, rng, monkeypatch):
    """The one-kernel float16 rows (EDPAIRS_ASSIGN_HALF=1, Hopper, D <= 512): labels, scores, sums
    and counts within float16's rounding of the float64 reference for ragged N (row tiles of
    128 spread over persistent blocks), D not a multiple of the 64-column slice (zero padding
    inside the tile), k padded to tiles of 128, rows padded to 16-byte strides; zero rows label
    0 with score 0; the same labels as the float16 copies on unambiguous rows."""
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "1")
    C = make_centroids(rng, k, D)
    X = make_rows(rng, N, D, C=C, zero_rows=min(2, N - 1))
    cols = D + (-D) % 4 + (4 if layout == "padded" else 0)
    buf = torch.zeros((N, cols), device="cuda")
    buf[:, :D] = t(X).cuda()
    Xg = buf[:, :D]
    assert _gemm.half_resident_applies(Xg)
    monkeypatch.setenv("EDPAIRS_ASSIGN_KERNEL", "mma")  # keeps mma.sync: the copies, not the wgmma kernel
    assert not _gemm.half_resident_applies(Xg)
    monkeypatch.delenv("EDPAIRS_ASSIGN_KERNEL")
    res = ops.assign(Xg, t(C).cuda(), precision="tf32")
    check_assignment(res, X, C, tol=HALF_TOL, check_ties=False)
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "copies")
    copies = ops.assign(Xg, t(C).cuda(), precision="tf32")
    assert_results_agree(res, copies, X, C, tol=HALF_TOL)


@pytest.mark.cuda
@pytest.mark.skipif(_resident_skip() is not None, reason=str(_resident_skip()))
def test_cuda_float16_rows_in_shared_memory_any_magnitude_streams_and_fallbacks(rng, monkeypatch):
    """Rows or centroids times 2^-100 and 2^100 (norms no float32 square holds, values float16
    cannot hold; check_finite=False, since the check refuses such rows for the other kernels)
    label and score bit for bit as at unit scale (the float16 values and the scaled norms are
    the same); a side stream
    gives the same results; rows wider than 512 or not 16-byte aligned take the copies; the
    binding refuses "tf32-half" where the kernel cannot run, with what arrived."""
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "1")
    C = make_centroids(rng, 300, 96)
    X = make_rows(rng, 4000, 96, C=C)
    unit = ops.assign(t(X).cuda(), t(C).cuda(), precision="tf32")
    for scale in (2.0**-100, 2.0**100):
        res = ops.assign(t(X).cuda() * scale, t(C).cuda(), precision="tf32", check_finite=False)
        assert torch.equal(res.labels, unit.labels) and torch.equal(res.scores, unit.scores)
        # The centroids too: each is made float16 times a power of two of its own.
        res = ops.assign(t(X).cuda(), t(C).cuda() * scale, precision="tf32", check_finite=False)
        assert torch.equal(res.labels, unit.labels) and torch.equal(res.scores, unit.scores)
    # A centroid of norm ~1e-39 (its 1 / ||c|| no float32) counts as a zero centroid, as on the
    # CPU: score 0, so it wins no row here (every row has a positive best); its s_j was +Inf in
    # the TF32 kernels and its true cosine's scale here before.
    tiny = C.copy()
    tiny[7] = (C[7] * np.float32(1e-40)).astype(np.float32)
    for knob in ("1", "0"):
        monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", knob)
        res = ops.assign(t(X).cuda(), t(tiny).cuda(), precision="tf32", check_finite=False)
        assert not bool((res.labels == 7).any()) and bool(torch.isfinite(res.scores).all())
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "1")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        res = ops.assign(t(X).cuda(), t(C).cuda(), precision="tf32")
    side.synchronize()
    assert torch.equal(res.labels, unit.labels) and torch.equal(res.scores, unit.scores)
    wide = make_rows(rng, 600, 520, C=make_centroids(rng, 150, 520))
    Cw = make_centroids(rng, 150, 520)
    assert not _gemm.half_resident_applies(t(wide).cuda())
    check_assignment(ops.assign(t(wide).cuda(), t(Cw).cuda(), precision="tf32"), wide, Cw, tol=HALF_TOL,
                     check_ties=False)
    odd = torch.zeros((600 * 97 + 1,), device="cuda")[1:].view(600, 97)[:, :96]  # rows off 16-byte boundaries
    odd.copy_(t(X[:600]).cuda())
    assert not _gemm.half_resident_applies(odd)
    check_assignment(ops.assign(odd, t(C).cuda(), precision="tf32"), X[:600], C, tol=HALF_TOL, check_ties=False)
    c = Namespace("torch").capsule
    labels, scores = torch.empty(600, dtype=torch.int64, device="cuda"), torch.empty(600, device="cuda")
    # col_scale through the binding (ops.assign keeps such calls off this path): s_j = col_scale_j 2^-e_j.
    cs = (1 + rng.random(300)).astype(np.float32)
    lib().assign(c(t(X[:600]).cuda()), c(t(C).cuda()), None, None, c(t(cs).cuda()), c(labels), c(scores), None, None,
                 False, "tf32-half", torch.cuda.current_stream().cuda_stream)
    want = ops.assign(X[:600], C, col_scale=cs)
    assert_results_agree(ops.Assignment(labels, scores, None, None), want, X[:600], C, tol=HALF_TOL, col_scale=cs)
    for bad, why in ((t(wide).cuda(), r"X \(600, 520\)"), (odd, "unaligned rows"), (t(X[:600]).cuda().half(), "float16 X")):
        with pytest.raises(ValueError, match=f"precision 'tf32-half' needs float32 X.*{why}"):
            lib().assign(c(bad), c(t(C if bad.shape[1] == 96 else Cw).cuda()), None, None, None, c(labels), c(scores),
                         None, None, False, "tf32-half", torch.cuda.current_stream().cuda_stream)


@pytest.mark.cuda
@pytest.mark.skipif(_resident_skip() is not None, reason=str(_resident_skip()))
@pytest.mark.parametrize("prefetch", ["0", "4"])
def test_cuda_float16_rows_in_shared_memory_kmeans_step(prefetch, rng, monkeypatch):
    """A spherical k-means step on the one-kernel float16 rows, with and without the next row
    tile named to L2 (EDPAIRS_WGMMA_PREFETCH): the labels those of ops.assign, the centroids
    the normalised sums of its rows."""
    monkeypatch.setenv("EDPAIRS_ASSIGN_HALF", "1")
    monkeypatch.setenv("EDPAIRS_WGMMA_PREFETCH", prefetch)
    C = make_centroids(rng, 256, 128)
    X = make_rows(rng, 50_000, 128, C=C)
    centroids, labels, counts = ops.spherical_kmeans_step(t(X).cuda(), t(C).cuda(), precision="tf32")
    assert int(counts.sum()) == 50_000
    res = ops.assign(t(X).cuda(), t(C).cuda(), precision="tf32")
    assert torch.equal(res.labels, labels)
    check_assignment(res, X, C, tol=HALF_TOL, check_ties=False)
    want = res.sums / res.sums.norm(dim=1, keepdim=True)
    live = res.counts > 0
    torch.testing.assert_close(centroids[live].double(), want[live], rtol=0, atol=1e-6)
