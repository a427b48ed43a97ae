"""Shared test helpers: array conversion, reference comparisons with honest float32
tolerances (near-tie aware), and generators of data with controlled ties and zero rows.

Tolerance conventions (see the brief of the suite):
  * The kernels compute in float32 (inputs converted exactly: float16 / bfloat16 values are
    representable in float32; float64 inputs are rounded to float32). The reference
    (:mod:`edpairs.reference`) is float64 and is always evaluated on the values actually
    passed to the kernel, so for float16 / bfloat16 inputs it sees the rounded input.
  * Labels are compared only where the reference's best score beats the runner-up by more
    than a margin; inside the margin the kernel's label must score (in the reference) within
    tolerance of the best.
  * Sums and counts of ``assign`` are compared against values recomputed from the KERNEL's
    labels, so a legitimate near-tie label swap cannot cause a false failure.
"""

from __future__ import annotations

import os
import re

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st

from edpairs import reference as ref
from edpairs.ops import CANCELLED


def worker_env(**extra) -> dict:
    """The environment of a test's worker subprocess: it imports the edpairs this test process
    imported (the installed package, or the checkout's python/ in a development run) and
    nothing else that happens to sit on this process's sys.path."""
    import edpairs

    root = os.path.dirname(os.path.dirname(os.path.abspath(edpairs.__file__)))
    path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return dict(os.environ, PYTHONPATH=path, **extra)

# ---------------------------------------------------------------------------------------
# Hypothesis budget: each property test states its example count; the "thorough" profile
# (EDPAIRS_HYPOTHESIS_PROFILE=thorough) multiplies it by 10.

_EXAMPLE_SCALE = 10 if os.environ.get("EDPAIRS_HYPOTHESIS_PROFILE") == "thorough" else 1


def examples(n: int):
    """@settings(max_examples=n), scaled by the active profile."""
    return settings(max_examples=n * _EXAMPLE_SCALE)


def _ids(names):
    """Readable pytest ids without spaces (so that -k can select them)."""
    return [re.sub(r"[^A-Za-z0-9=<>+-]+", "_", n).strip("_") for n in names]


# ---------------------------------------------------------------------------------------
# Arrays


def library_of(a) -> str:
    return type(a).__module__.split(".", 1)[0]


def to_numpy(a):
    """Any numpy / torch / cupy array as a numpy array (bfloat16 -> float32, exact)."""
    if a is None:
        return None
    lib = library_of(a)
    if lib == "torch":
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        return a.numpy()
    if lib == "cupy":
        return a.get()
    return np.asarray(a)


def f64(a):
    """The values of a (any library, any float dtype) as a float64 numpy array."""
    return None if a is None else np.asarray(to_numpy(a), dtype=np.float64)


def as_lib(a, lib: str, dtype: str | None = None, device: str | None = None):
    """numpy array ``a`` as an array of ``lib`` ('numpy', 'torch', 'cupy'), optionally cast to
    ``dtype`` (a dtype name, 'bfloat16' for torch only) and moved to ``device`` (torch)."""
    if a is None:
        return None
    a = np.asarray(a)
    if lib == "numpy":
        return a.astype(dtype) if dtype else a
    if lib == "torch":
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a))
        if dtype:
            t = t.to(getattr(torch, dtype))
        if device:
            t = t.to(device)
        return t
    if lib == "cupy":
        import cupy

        c = cupy.asarray(a)
        return c.astype(dtype) if dtype else c
    raise ValueError(lib)


def dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "")


# Layouts of a 2-D input with the same values. Each returns an array of lib whose values are
# those of X (numpy) but whose memory layout is non-trivial.
LAYOUTS = ("contiguous", "transposed", "row_stride", "col_stride", "negative_row_stride", "broadcast_row")


def with_layout(X: np.ndarray, layout: str, lib: str, dtype: str | None = None, device: str | None = None):
    """X's values in ``lib`` / ``dtype`` / ``device`` with the memory layout ``layout``.
    Returns None for a layout the library cannot express (negative strides in torch)."""
    N, D = X.shape
    if layout == "contiguous":
        return as_lib(X, lib, dtype, device)
    if layout == "transposed":  # a (D, N) contiguous buffer viewed as (N, D): X.T of it
        base = as_lib(np.ascontiguousarray(X.T), lib, dtype, device)
        return base.t() if lib == "torch" else base.T
    if layout == "row_stride":  # X[::2] of an array with interleaved garbage rows
        big = np.full((2 * N, D), 7.5, dtype=X.dtype)
        big[::2] = X
        return as_lib(big, lib, dtype, device)[::2]
    if layout == "col_stride":  # X[:, ::2] of an array with interleaved garbage columns
        big = np.full((N, 2 * D), -3.25, dtype=X.dtype)
        big[:, ::2] = X
        return as_lib(big, lib, dtype, device)[:, ::2]
    if layout == "negative_row_stride":
        if lib != "numpy":
            return None
        return as_lib(np.ascontiguousarray(X[::-1]), lib, dtype, device)[::-1]
    if layout == "broadcast_row":  # every row the same, stride 0 along rows
        if lib == "torch":
            return as_lib(X[:1], lib, dtype, device).expand(N, D)
        return np.broadcast_to(as_lib(X[:1], lib, dtype, device), (N, D))
    raise ValueError(layout)


def layout_values(X: np.ndarray, layout: str) -> np.ndarray:
    """The values with_layout(X, layout, ...) holds (broadcast_row repeats row 0)."""
    return np.repeat(X[:1], X.shape[0], 0) if layout == "broadcast_row" else X


# ---------------------------------------------------------------------------------------
# Data generators


def make_centroids(rng, k: int, D: int, *, duplicates: int = 0, zeros: int = 0, dtype=np.float32):
    """k random centroids with ``duplicates`` rows copied exactly from lower-indexed rows
    (exact ties) and ``zeros`` zero rows, placed at random indices."""
    C = rng.standard_normal((k, D)).astype(dtype)
    if k > 1:
        for _ in range(duplicates):
            j = int(rng.integers(1, k))
            C[j] = C[int(rng.integers(0, j))]
    for _ in range(zeros):
        C[int(rng.integers(0, k))] = 0
    return C


def make_rows(rng, N: int, D: int, *, zero_rows: int = 0, duplicate_rows: int = 0, C=None, dtype=np.float32):
    """N random rows; about half are drawn near random centroids of C (when given) so that
    clusters are non-trivial; ``zero_rows`` exact zero rows and ``duplicate_rows`` exact
    copies of other rows."""
    X = rng.standard_normal((N, D))
    if C is not None and len(C) and N:
        near = rng.random(N) < 0.5
        picks = rng.integers(0, len(C), size=N)
        X[near] = 3.0 * np.asarray(C, np.float64)[picks[near]] + 0.5 * X[near]
    X = X.astype(dtype)
    if N > 1:
        for _ in range(duplicate_rows):
            i, j = rng.choice(N, size=2, replace=False)
            X[i] = X[j]
    for _ in range(zero_rows if N else 0):
        X[int(rng.integers(0, N))] = 0
    return X


# ---------------------------------------------------------------------------------------
# Assignment comparison


class Tol:
    """Tolerances for one input precision: ``score`` is the absolute tolerance on a cosine
    (scaled by the row's score scale with custom scales), ``margin`` the reference margin above
    which labels must agree exactly, ``sums`` the relative tolerance of accumulated sums."""

    def __init__(self, score: float, margin: float, sums: float):
        self.score, self.margin, self.sums = score, margin, sums


TOL = {
    "float32": Tol(score=1e-5, margin=1e-4, sums=1e-5),
    "float64": Tol(score=1e-5, margin=1e-4, sums=1e-5),
    # The reference sees the rounded input, so the arithmetic error is float32's again; keep a
    # little slack for the larger dynamic range of rounded values.
    "float16": Tol(score=2e-5, margin=2e-4, sums=2e-5),
    "bfloat16": Tol(score=2e-5, margin=2e-4, sums=2e-5),
}


def _row_inv_norm(M):
    n = np.linalg.norm(M, axis=1)
    out = np.zeros_like(n)
    np.divide(1.0, n, out=out, where=n > 0)
    return out


def reference_scores(X, C, center=None, row_scale=None, col_scale=None):
    """Full float64 score matrix r_n s_j x~_n.c_j (N, k), the row scales r (N,), and a
    per-row score scale (the magnitude a float32 rounding error is relative to)."""
    X, C = f64(X), f64(C)
    Xc = X - f64(center) if center is not None else X
    r = f64(row_scale) if row_scale is not None else _row_inv_norm(Xc)
    s = f64(col_scale) if col_scale is not None else _row_inv_norm(C)
    S = r[:, None] * (Xc @ C.T) * s[None, :]
    scale = r * np.linalg.norm(Xc, axis=1) * (np.abs(s) * np.linalg.norm(C, axis=1)).max(initial=0.0)
    return S, r, np.maximum(scale, 1e-30), Xc


def check_labels_scores(labels, scores, X, C, *, center=None, row_scale=None, col_scale=None,
                        tol: Tol = TOL["float32"], check_ties: bool = True):
    """Asserts the kernel's labels/scores agree with the float64 reference, near-tie aware.
    Returns the reference pieces (S, r, Xc) for further checks."""
    labels, scores = to_numpy(labels), to_numpy(scores)
    assert labels.dtype == np.int64, labels.dtype
    assert scores.dtype == np.float32, scores.dtype
    S, r, scale, Xc = reference_scores(X, C, center, row_scale, col_scale)
    N, k = S.shape
    assert labels.shape == (N,) and scores.shape == (N,)
    assert np.all(np.isfinite(scores)), "NaN/Inf score"
    assert np.all((labels >= 0) & (labels < max(k, 1))), f"label out of range: {labels}"

    # Rows with r_n == 0 (zero rows, zero row_scale): label 0 and score exactly 0.
    dead = r == 0
    assert np.all(labels[dead] == 0), f"zero rows got labels {labels[dead]}"
    assert np.all(scores[dead] == 0), f"zero rows got scores {scores[dead]}"

    live = np.flatnonzero(~dead)
    if live.size:
        Sl = S[live]
        ref_labels = np.argmax(Sl, axis=1)  # lowest index on exact ties
        best = Sl[np.arange(live.size), ref_labels]
        if k > 1:
            runner = np.partition(Sl, k - 2, axis=1)[:, k - 2]
            margin = best - runner
        else:
            margin = np.full(live.size, np.inf)
        got = labels[live]
        sc = scale[live]
        clear = margin > tol.margin * sc
        bad = clear & (got != ref_labels)
        assert not bad.any(), (
            f"labels differ where the reference margin is clear: rows {live[bad][:10]}, "
            f"got {got[bad][:10]}, expected {ref_labels[bad][:10]}, margins {margin[bad][:10]}")
        chosen = Sl[np.arange(live.size), got]
        worse = chosen < best - tol.score * sc
        assert not worse.any(), (
            f"near-tie label scores worse than the best: rows {live[worse][:10]}, "
            f"chosen {chosen[worse][:10]}, best {best[worse][:10]}")
        err = np.abs(scores[live].astype(np.float64) - chosen)
        too_far = err > tol.score * sc
        assert not too_far.any(), (
            f"scores off the reference: rows {live[too_far][:10]}, got {scores[live][too_far][:10]}, "
            f"expected {chosen[too_far][:10]}")

    if check_ties and live.size:
        # Exact duplicate centroids (same float32 row, same column scale): the lowest index wins.
        C32 = np.asarray(f64(C), dtype=np.float32)
        s32 = None if col_scale is None else np.asarray(f64(col_scale), dtype=np.float32)
        first = {}
        lowest = np.arange(k)
        for j in range(k):
            key = C32[j].tobytes() + (b"" if s32 is None else s32[j].tobytes())
            lowest[j] = first.setdefault(key, j)
        got = labels[live]
        bad = lowest[got] != got
        assert not bad.any(), (
            f"a tie between identical centroids went to a higher index: rows {live[bad][:10]}, "
            f"labels {got[bad][:10]}, lowest duplicate {lowest[got][bad][:10]}")
    return S, r, Xc


def clear_rows(X, C, *, center=None, row_scale=None, col_scale=None, tol: Tol = TOL["float32"]):
    """Rows whose reference winner beats the runner-up by more than the margin (their label is
    unambiguous in float32), and the per-row score scale."""
    S, r, scale, _ = reference_scores(X, C, center, row_scale, col_scale)
    N, k = S.shape
    if k == 1:
        return r > 0, scale
    part = np.partition(S, [k - 2, k - 1], axis=1)
    margin = part[:, k - 1] - part[:, k - 2]
    return (r > 0) & (margin > tol.margin * scale), scale


def assert_results_agree(a, b, X, C, *, tol: Tol = TOL["float32"], **kw):
    """Two assignments of the same input (CPU vs CUDA, or two devices) agree: identical labels
    where the label is unambiguous, scores within twice the tolerance where labels agree."""
    la, lb = to_numpy(a[0]), to_numpy(b[0])
    sa, sb = to_numpy(a[1]), to_numpy(b[1])
    clear, scale = clear_rows(X, C, tol=tol, **kw)
    bad = clear & (la != lb)
    assert not bad.any(), f"labels disagree on unambiguous rows {np.flatnonzero(bad)[:10]}: {la[bad][:10]} vs {lb[bad][:10]}"
    same = la == lb
    err = np.abs(sa.astype(np.float64) - sb)
    assert np.all(err[same] <= 2 * tol.score * scale[same]), f"scores disagree by {err[same].max()}"


def expected_sums_counts(labels, r, Xc, k):
    """Per-cluster sums of r_n x~_n and counts over the given (kernel) labels, float64, and the
    matching sums of |r_n x~_n| (the scale of a rounding error)."""
    labels = to_numpy(labels)
    live = r > 0
    sums = np.zeros((k, Xc.shape[1]))
    abs_sums = np.zeros((k, Xc.shape[1]))
    np.add.at(sums, labels[live], r[live, None] * Xc[live])
    np.add.at(abs_sums, labels[live], np.abs(r[live, None] * Xc[live]))
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return sums, counts, abs_sums


def check_assignment(res, X, C, *, center=None, row_scale=None, col_scale=None, tol: Tol = TOL["float32"],
                     check_ties: bool = True):
    """Full check of an :class:`edpairs.ops.Assignment` (with accumulate=True)."""
    S, r, Xc = check_labels_scores(res.labels, res.scores, X, C, center=center, row_scale=row_scale,
                                   col_scale=col_scale, tol=tol, check_ties=check_ties)
    k = S.shape[1]
    sums, counts = to_numpy(res.sums), to_numpy(res.counts)
    assert sums.dtype == np.float64 and sums.shape == (k, Xc.shape[1]), (sums.dtype, sums.shape)
    assert counts.dtype == np.int64 and counts.shape == (k,), (counts.dtype, counts.shape)
    exp_sums, exp_counts, abs_sums = expected_sums_counts(res.labels, r, Xc, k)
    np.testing.assert_array_equal(counts, exp_counts)
    assert counts.sum() == Xc.shape[0]
    assert np.all(np.isfinite(sums))
    err = np.abs(sums - exp_sums)
    bound = tol.sums * abs_sums + 1e-12
    assert np.all(err <= bound), f"sums off by {err.max()} (bound {bound[np.unravel_index(err.argmax(), err.shape)]})"


# ---------------------------------------------------------------------------------------
# Spherical k-means step


def check_kmeans_step(result, X, C):
    """The step's centroids/labels/counts vs the reference, using the kernel's labels for the
    expected centroids (a near-tie label swap changes the sums legitimately)."""
    centroids, labels, counts = (to_numpy(a) for a in result)
    k, D = np.shape(C)
    assert centroids.dtype == np.float32 and centroids.shape == (k, D)
    assert labels.dtype == np.int64 and counts.dtype == np.int64
    check_labels_scores(labels, _scores_for(X, C, labels), X, C)  # labels vs reference, near-tie aware
    _, r, _, Xc = reference_scores(X, C)
    sums, exp_counts, abs_sums = expected_sums_counts(labels, r, Xc, k)
    np.testing.assert_array_equal(counts, exp_counts)
    assert counts.sum() == len(X)
    Cv = f64(C)
    norms = np.linalg.norm(Cv, axis=1)
    previous = np.where(norms[:, None] > 0, Cv / np.where(norms > 0, norms, 1)[:, None], 0.0)
    snorm = np.linalg.norm(sums, axis=1)
    live = (exp_counts > 0) & (snorm > CANCELLED * exp_counts)  # members that cancel: previous
    want = previous.copy()
    want[live] = sums[live] / snorm[live, None]
    # float32 sums of unit vectors: relative error of a sum ~1e-6 of the sum of |terms|.
    tol = 1e-5 * np.linalg.norm(abs_sums, axis=1) / np.where(snorm > 0, snorm, 1) + 1e-6
    err = np.abs(centroids - want).max(axis=1)
    assert np.all(err <= tol), f"centroids off by {err.max()}"
    cn = np.linalg.norm(centroids.astype(np.float64), axis=1)
    nonzero_prev = norms > 0
    np.testing.assert_allclose(cn[live | nonzero_prev], 1.0, atol=2e-6)
    np.testing.assert_array_equal(centroids[~live & ~nonzero_prev], 0)


def _scores_for(X, C, labels):
    """Scores of the reference for the given labels (the step returns no scores)."""
    S, r, _, _ = reference_scores(X, C)
    sc = S[np.arange(len(labels)), labels] if len(labels) else np.zeros(0)
    return np.where(r > 0, sc, 0.0).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Moments


def check_moments(m, X, *, rtol: float = 1e-5):
    """Moments state m vs the float64 reference on X's values."""
    n, mean, m2 = ref.moments(X)
    assert m.n == n
    got_mean, got_m2 = f64(m.mean), f64(m.m2)
    assert got_mean.shape == mean.shape and got_m2.shape == m2.shape
    Xv = f64(X)
    # The kernel reads float32 values: a float64 input is rounded (relative 2^-24), the mean
    # itself is summed in float64.
    mean_tol = 2.0 ** -23 * np.abs(Xv).max(axis=0) + 1e-12
    assert np.all(np.abs(got_mean - mean) <= mean_tol), f"mean off by {np.abs(got_mean - mean).max()}"
    assert_scatter_close(got_m2, m2, rtol)
    np.testing.assert_array_equal(got_m2, got_m2.T)  # both triangles written, symmetric


def assert_scatter_close(got, want, rtol, atol=1e-9):
    """|got - want| <= rtol sqrt(want_ii want_jj) + atol: the natural scale of a scatter entry."""
    d = np.sqrt(np.maximum(np.outer(np.diag(want), np.diag(want)), 0))
    err = np.abs(got - want)
    bound = rtol * d + atol
    assert np.all(err <= bound), (
        f"scatter off: max relative error {(err / (d + 1e-300)).max():.3g} > {rtol}")


# ---------------------------------------------------------------------------------------
# Signal moments

SIGNAL_FIELDS = ("count", "sum_x", "sum_z", "sum_zz", "sum_xz")


def _z_and_scale(X, W, b, center=None):
    """z = X W - b (float64) and the magnitude its float32 evaluation errs relative to: the
    kernels form w.x~ in float32 plus the constant (w.center - b)."""
    Xv, Wv, bv = f64(X), f64(W), f64(b)
    cv = f64(center) if center is not None else np.zeros(Xv.shape[1])
    Z = Xv @ Wv - bv[None, :]
    zscale = np.abs(Xv - cv) @ np.abs(Wv) + np.abs(cv @ Wv - bv)[None, :]
    return Z, zscale, Xv - cv


def signal_scales(X, W, b, center=None):
    """For each statistic, the same masked sum taken over absolute values of the terms and of
    the float32 quantities they are built from: the scale of a rounding error."""
    Z, zscale, Xc = _z_and_scale(X, W, b, center)
    Mf = (Z > 0).astype(np.float64)
    return {
        "count": np.zeros(Z.shape[1]),
        "sum_x": Mf.T @ np.abs(Xc),
        "sum_z": (Mf * zscale).sum(0),
        "sum_zz": (Mf * 2 * np.abs(Z) * zscale).sum(0),
        "sum_xz": (Mf * (np.abs(Z) + zscale)).T @ np.abs(Xc),
    }


def near_zero_rows(X, W, b, center=None, rel: float = 1e-4, abs_: float = 1e-3):
    """Rows for which some detector's z is so close to 0 that float32 may flip its sign."""
    Z, zscale, _ = _z_and_scale(X, W, b, center)
    return (np.abs(Z) < abs_ + rel * zscale).any(axis=1)


def check_signal_moments(sm, X, W, b, *, center=None, rtol: float = 1e-5):
    want = ref.signal_moments(X, W, b, center)
    scales = signal_scales(X, W, b, center)
    I, D = f64(W).shape[1], f64(X).shape[1]
    shapes = {"count": (I,), "sum_x": (I, D), "sum_z": (I,), "sum_zz": (I,), "sum_xz": (I, D)}
    for name in SIGNAL_FIELDS:
        got = to_numpy(getattr(sm, name))
        assert got.shape == shapes[name], (name, got.shape)
        if name == "count":
            assert got.dtype == np.int64, got.dtype
            np.testing.assert_array_equal(got, want["count"])
            continue
        assert got.dtype == np.float64, (name, got.dtype)
        err = np.abs(got - want[name])
        bound = rtol * scales[name] + 1e-9
        assert np.all(err <= bound), f"{name} off by {err.max()} (relative {(err / (scales[name] + 1e-300)).max():.3g})"


def make_signal_data(rng, N, D, I, *, center: bool = False, offset: float = 0.0, dtype=np.float32):
    """X, W, b (and center) with no row having a z within the float32 noise of 0."""
    X = (offset + rng.standard_normal((N, D))).astype(dtype)
    W = rng.standard_normal((D, I)).astype(np.float32)
    b = (rng.standard_normal(I) + (np.asarray(offset * W.sum(0)) if offset else 0)).astype(np.float32)
    c = (offset + 0.1 * rng.standard_normal(D)).astype(np.float32) if center else None
    # Safe both with and without the center (tests compare the two).
    keep = ~near_zero_rows(X, W, b, c) & ~near_zero_rows(X, W, b, None)
    return X[keep], W, b, c


# ---------------------------------------------------------------------------------------
# Strategies: shapes and features drawn by hypothesis, values from a seeded numpy generator
# (placed after the generators they use).

sizes_n = st.one_of(st.sampled_from([1, 2, 5, 71, 73, 150]), st.integers(1, 200))
sizes_d = st.one_of(st.sampled_from([1, 2, 3, 16, 17]), st.integers(1, 40))
sizes_k = st.one_of(st.sampled_from([1, 2, 15, 16, 17]), st.integers(1, 40))


@st.composite
def assign_cases(draw, max_n=None):
    N = draw(sizes_n if max_n is None else st.integers(1, max_n))
    D = draw(sizes_d)
    k = draw(sizes_k)
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    C = make_centroids(rng, k, D, duplicates=draw(st.integers(0, 3)), zeros=draw(st.integers(0, 2)))
    X = make_rows(rng, N, D, C=C, zero_rows=draw(st.integers(0, 3)), duplicate_rows=draw(st.integers(0, 3)))
    return X, C, rng


def check_duplicate_rows_agree(X, labels, scores):
    """Bitwise-identical rows must get the same label and the same score."""
    X = np.ascontiguousarray(X)
    labels, scores = to_numpy(labels), to_numpy(scores)
    first = {}
    for n in range(X.shape[0]):
        m = first.setdefault(X[n].tobytes(), n)
        assert labels[n] == labels[m], f"rows {m} and {n} are identical but got labels {labels[m]} and {labels[n]}"
        assert scores[n] == scores[m], f"rows {m} and {n} are identical but got scores {scores[m]} and {scores[n]}"


def two_replicas(module):
    """``module`` wrapped in an nn.DataParallel that does, on the CPU, what DataParallel does on
    two GPUs: the batch is cut in two, each half runs on a replica of the module (new module
    objects that share its hooks) in a thread of its own, and the outputs are concatenated."""
    import threading

    import torch

    def replica(m):
        r = m._replicate_for_data_parallel()
        r._parameters = dict(m._parameters)
        r._modules = {name: replica(child) for name, child in m._modules.items()}
        return r

    class TwoReplicas(torch.nn.DataParallel):
        def forward(self, x):
            halves, outs, errors = x.chunk(2), [None, None], []

            def run(i):
                try:
                    outs[i] = replica(self.module)(halves[i])
                except BaseException as exc:  # noqa: BLE001 (re-raised below, as parallel_apply does)
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            return torch.cat(outs)

    return TwoReplicas(module)
