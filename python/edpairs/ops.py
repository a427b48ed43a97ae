"""The kernels as plain functions on arrays: numpy, torch (CPU or CUDA) or cupy in, the same
library and device out. CUDA work is queued on the caller's current stream, on the device where
X lives (made current for the call, as cupy computes on the current device; the caller's
current device is restored at the end).

Every function checks its inputs for NaN/Inf, and its results for float32 products that
overflowed, unless ``check_finite=False``. On the CPU the checks are free (the kernels check
the inputs while reading); on CUDA they cost a device-to-host synchronisation per array
checked (each input's largest magnitude before the kernels, the results after them), so pass
``check_finite=False`` to keep a CUDA pipeline asynchronous."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

import numpy as np

from ._arrays import FLOAT_INPUTS, Namespace, as_array, device_scope, namespace_of, on_data_device
from . import _gemm
from ._backend import lib
from ._checks import check_bool, check_int

__all__ = [
    "Assignment",
    "Moments",
    "SignalMoments",
    "assign",
    "cosine_assign",
    "moments",
    "normalize_centroids",
    "signal_moments",
    "spherical_kmeans_step",
]

_NONFINITE = (
    "{} contains NaN or Inf (or values beyond the float32 range); "
    "clean the input or pass check_finite=False to skip this check"
)


def _data(X, name: str = "X"):
    """X as a 2-D float array of its own library, ready for the kernels."""
    X = as_array(X, name)
    xp = namespace_of(X)
    X = xp.detach(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(X.shape)}")
    if xp.dtype_name(X) not in FLOAT_INPUTS:
        raise ValueError(
            f"{name} dtype not supported: expected float32, float64, float16 or bfloat16, got {xp.dtype_name(X)}"
        )
    if xp.is_cuda(X):
        X = xp.contiguous_rows(X)
    return X, xp


def _param(value, xp: Namespace, like, name: str, required: bool = False, dtype: str = "float32"):
    """A small parameter array as contiguous float32 (or `dtype`) in X's library (None stays
    None unless `required`); complex values are refused rather than losing their imaginary parts."""
    if value is None:
        if required:
            raise TypeError(f"{name} must be an array (numpy, torch or cupy), got None")
        return None
    value = as_array(value, name)
    kind = namespace_of(value).dtype_name(value)
    if "complex" in kind:
        raise TypeError(f"{name} must be real, got {kind} values")
    value = xp.asarray(value, like)
    if xp.device(value) != xp.device(like):  # (before any arithmetic mixes them: every route, one message)
        raise ValueError(f"{name} is on {xp.device(value)} but X is on {xp.device(like)}; put all arrays on the same "
                         "device")
    if dtype == "float32":
        return xp.as_float32_contiguous(value)
    return xp.contiguous(xp.astype(value, dtype))


# float64 X: the kernels compute in float32, so an offset that dwarfs the spread (1e9 +- 1) would
# be lost in the rounding if the rows were rounded first. Rows are therefore centred in float64
# (about the caller's centre, or each block's column means for the moments) and only then
# rounded, a block of at most F64_BLOCK_ELEMENTS elements at a time (64 MB of float32 rows).
F64_BLOCK_ELEMENTS = 1 << 24


def _float64_blocks(X):
    N, D = X.shape
    rows = max(1, F64_BLOCK_ELEMENTS // max(int(D), 1))
    return [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)] or [(0, 0)]


def _centred_float32(xp: Namespace, block, shift):
    """(block - shift) in float64, then rounded to float32 (values beyond float32 become Inf,
    which the kernels' finiteness check reports)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if xp.name == "numpy":  # one pass: the float64 difference rounded as it is stored
            out = np.empty(block.shape, np.float32)
            return np.subtract(block, shift[None, :], out=out, casting="unsafe")
        return xp.as_float32_contiguous(block - shift[None, :])


def _same_place(mine, theirs, what: str) -> None:
    """Two states' arrays in one library on one device, else a TypeError saying where each is."""
    a, b = namespace_of(mine), namespace_of(theirs)
    if (a.name, a.device(mine)) != (b.name, b.device(theirs)):
        raise TypeError(f"cannot {what}: this state holds {a.name} arrays on {a.device(mine)}, the other "
                        f"{b.name} arrays on {b.device(theirs)}; move one to the other's library and device")


def _check_results(xp: Namespace, check_finite: bool, inputs: str, arrays) -> None:
    """With check_finite, finite inputs that gave non-finite results: their products passed the
    float32 range (about 3.4e38)."""
    if check_finite and any(a is not None and not xp.all_finite(a) for a in arrays):
        raise ValueError(f"{inputs} too large for float32 arithmetic: the products overflowed (beyond about "
                         f"3.4e38); rescale the input or pass check_finite=False to skip this check")


def _check_finite_cuda(xp: Namespace, arrays, wide=()) -> dict:
    """The CPU kernels check while packing; on CUDA the check is a library reduction of each
    array's largest magnitude (no N x D temporary), which must lie within float32's range (the
    kernels round float64 arrays to float32), except for the arrays named in ``wide``, which
    stay float64 (a float64 centre and what is centred on it) and need only be finite. Returns
    the magnitudes read, by name (for the norms check, which needs them again)."""
    seen = {}
    for name, a in arrays:
        if a is not None and xp.is_cuda(a):
            big = seen[name] = _largest_magnitude(xp, a)
            if not (big < float("inf") if name in wide else _fits_float32(big)):
                raise ValueError(_NONFINITE.format(name))
    return seen


def _fits_float32(big: float) -> bool:
    """Whether an array whose largest magnitude is ``big`` is finite and within float32's range
    (which float64 arrays must be too: the kernels round them to float32)."""
    return big <= _gemm.FLOAT32_MAX


#: The largest row norm whose float32 sum of squares is finite: edpairs' CUDA kernels take the
#: assignment's row and centroid norms from float32 squares, and a row beyond it would count as
#: a zero row there (label 0, score 0; the CPU sums squares in float64).
FLOAT32_NORM_MAX = 1.8e19


def _largest_magnitude(xp: Namespace, M) -> float:
    """max |M| as a float (NaN if M holds one), without an |M| temporary (torch: one read of M
    and one synchronisation)."""
    if (M.numel() if xp.name == "torch" else M.size) == 0:
        return 0.0
    if xp.name == "torch":
        lo, hi = xp.mod.stack(list(xp.mod.aminmax(M))).double().tolist()
    else:
        lo, hi = float(M.min()), float(M.max())
    return float("nan") if lo != lo or hi != hi else max(abs(lo), abs(hi))


def _norms_fit_float32(xp: Namespace, M, big: float, center=None, center_big=None) -> bool:
    """Whether every row of M (less center) has a norm below FLOAT32_NORM_MAX, given big =
    max |M| (and center_big = max |center|, read here when not given): settled by big where it
    can be (the common case), else by the rows' norms in float64 (in blocks)."""
    if M.shape[0] == 0 or M.shape[1] == 0:
        return True
    if center is not None:
        big += _largest_magnitude(xp, center) if center_big is None else center_big
    if big * M.shape[1] ** 0.5 < FLOAT32_NORM_MAX:
        return True
    for r0, r1 in _float64_blocks(M):
        block = xp.astype(M[r0:r1], "float64")
        if center is not None:
            block = block - xp.astype(center, "float64")
        if float(((block * block).sum(1) ** 0.5).max()) >= FLOAT32_NORM_MAX:
            return False
    return True


class Assignment(NamedTuple):
    """Result of :func:`assign`: labels (N,) int64, scores (N,) float32, and when accumulated
    sums (k, D) float64 (sum of r_n (x_n - center) per cluster) and counts (k,) int64."""

    labels: Any
    scores: Any
    sums: Any = None
    counts: Any = None


PRECISIONS = ("tf32", "float32")

#: Precision of the assignment's products on CUDA for float32 data when a call does not name
#: one. None (the default): the environment variable EDPAIRS_PRECISION, read at each call, and
#: exact "float32" (as torch leaves TF32 off for float32 matmuls by default) where it is unset;
#: a program may set this attribute to "tf32" or "float32" instead, which wins over the
#: variable. float16 / bfloat16 data always runs on tensor cores in its own precision unless
#: "float32" is asked for by the call. Why float32 stays the default: rows that share a large
#: offset bunch all cosines together (in our synthetic ReLU-like layer 95% of the rows are
#: within 1e-3 of their runner-up), where TF32 changes labels (6.5% there) that exact float32
#: keeps.
DEFAULT_PRECISION: Optional[str] = None


def default_precision() -> str:
    """The precision a float32 call without ``precision=`` gets: :data:`DEFAULT_PRECISION` if
    set, else EDPAIRS_PRECISION (read now), else "float32"."""
    if DEFAULT_PRECISION is not None:
        if DEFAULT_PRECISION not in PRECISIONS:
            raise ValueError(f"edpairs.ops.DEFAULT_PRECISION must be one of {PRECISIONS} or None, "
                             f"got {DEFAULT_PRECISION!r}")
        return DEFAULT_PRECISION
    value = os.environ.get("EDPAIRS_PRECISION", "") or "float32"
    if value not in PRECISIONS:
        raise ValueError(f"EDPAIRS_PRECISION must be one of {PRECISIONS} (or unset), got {value!r}")
    return value


def _precision(precision: Optional[str], X=None) -> str:
    if precision is None:
        sixteen = X is not None and namespace_of(X).dtype_name(X) in ("float16", "bfloat16")
        return "tf32" if sixteen else default_precision()
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@on_data_device("X")
def assign(X, C, *, center=None, row_scale=None, col_scale=None, accumulate: bool = True,
           check_finite: bool = True, precision: Optional[str] = None) -> Assignment:
    """Fused cosine assignment of the rows of X (N, D) to the centroids C (k, D).

    For x~ = x - center, r_n = row_scale[n] (default 1/||x~_n||, 0 for a zero row) and
    s_j = col_scale[j] (default 1/||c_j||), the score of row n for centroid j is
    r_n s_j x~_n . c_j (the cosine with the defaults). ``labels[n]`` is the lowest index of
    the highest score (0 for a row with r_n = 0, whose score is 0) and ``scores[n]`` that
    score. With ``accumulate`` also returns per-cluster sums of r_n x~_n (float64) and counts;
    no (N, k) matrix is ever formed. The CPU kernels add the sums in the same read of X; on
    CUDA the tensor-core path adds them in a pass of their own (``EDPAIRS_ASSIGN_SUMS``: by
    default a float64 pass over the rows sorted by label; ``columns``, opt-in until timed on a
    GPU, float32 runs of at most 4096 rows per cluster and column, added in float64, where the
    k x D sums fit in shared memory).

    ``precision`` matters on CUDA only (the CPU kernels are always exact float32): ``"tf32"``
    computes the products on tensor cores with float32 accumulation, TF32 operands for float32 X
    and the input's own precision for float16 / bfloat16 X (the centroids are rounded to it);
    ``"float32"`` uses exact float32 arithmetic. The default (None): tensor cores for float16 /
    bfloat16 X, :func:`default_precision` (exact float32 unless EDPAIRS_PRECISION or
    :data:`DEFAULT_PRECISION` says "tf32") for float32 X. With tensor cores a
    label can differ from the exact one only where two centroids' scores are within about 1e-3
    (TF32) or 1e-2 (bfloat16) of each other relative to the row's scale; scores carry a relative
    error of the same order. With a ``center`` that scale is ||x - center|| where the rows are
    centred before the product: torch float32 X with TF32 takes the route for that (below);
    edpairs' tensor-core kernels on float32 X (cupy X, ``EDPAIRS_GEMM_ROUTE=kernel``) round the
    raw rows to TF32 and take center . c off after the product, so their scale is ||x||, and
    rows far from the origin against their spread lose labels (pass ``precision="float32"``
    there). float64 X always takes the exact path, and with a ``center`` its rows are centred in
    float64 before they are rounded to float32 (an offset of 1e9 keeps a spread of 1).

    torch CUDA float32 X with exact products, or TF32 about a ``center`` or with k >= 129, takes
    the library-product route (edpairs._gemm; ``EDPAIRS_GEMM_ROUTE=kernel`` keeps edpairs' fused
    kernels): cuBLAS forms the scores of EDPAIRS_GEMM_ASSIGN_ROWS rows at a time (default 32768;
    a (rows, k) float32 block, never the whole (N, k) matrix) in the precision asked for, an
    edpairs kernel takes each row's argmax and norm (with TF32 products it re-scores a row's
    best and runner-up in float64 where they lie within the TF32 error bound of each other, so
    near ties get the float64 label; the fused kernels do not), and the sums come from one
    sorted pass over X. For that near-tie safety at every k and on Hopper too,
    ``EDPAIRS_GEMM_ROUTE=gemm`` sends TF32 assignments of torch float32 rows to the route (run
    5, H100, k = 1024: 7.6 ms against the wgmma kernel's 6.3 ms). On Hopper (compute capability
    9.0, a build with sm_90a) tensor-core assignments of 16-byte aligned rows with k >= 129 are
    labelled by edpairs' wgmma kernel, TF32 float32 ones without a centre too instead of the
    route (``EDPAIRS_ASSIGN_KERNEL=mma`` keeps mma.sync and the route, ``wgmma`` takes the wgmma
    kernel below k = 129 too). There, by default (since H200 run 6), the TF32 cosine labels of
    float32 rows with D a multiple of 8, without center, row_scale or col_scale, come from
    float16 copies of the rows and centroids, each row scaled by a power of two of its own
    (edpairs._gemm.half_labels, half_assign: at k = 1024, 1M x 512, 5.3 ms against the float32
    rows' 6.6-6.7 ms); EDPAIRS_ASSIGN_HALF=0 keeps the float32 rows, =copies takes the copies on
    every GPU, =1 makes the float16 rows in shared memory on Hopper with D <= 512 (slower so
    far); a set EDPAIRS_GEMM_ROUTE, and knobs that only the float32 rows' kernels honour
    (EDPAIRS_ASSIGN_KERNEL=wgmma-tma, EDPAIRS_ASSIGN_SUMS other than sorted,
    EDPAIRS_ASSIGN_OVERLAP above 1), keep the float32 rows.
    """
    check_bool("accumulate", accumulate)
    check_bool("check_finite", check_finite)
    X, xp = _data(X)
    precision = _precision(precision, X)
    N, D = X.shape
    C = _param(C, xp, X, "C", required=True)
    if C.ndim != 2:
        raise ValueError(f"C must be 2-D (k, D), got shape {tuple(C.shape)}")
    wide = xp.dtype_name(X) == "float64"
    center = _param(center, xp, X, "center", dtype="float64" if wide else "float32")
    row_scale = _param(row_scale, xp, X, "row_scale")
    col_scale = _param(col_scale, xp, X, "col_scale")
    if check_finite:
        # X's largest magnitude serves both its finiteness and its norms' check (one read of X).
        big = _largest_magnitude(xp, X) if xp.is_cuda(X) else 0.0
        # float64 X is rounded to float32 by the kernels, unless the float64 centring path takes it.
        if not (_fits_float32(big) or (wide and center is not None and big < float("inf"))):
            raise ValueError(_NONFINITE.format("X"))
        seen = _check_finite_cuda(xp, [("C", C), ("center", center), ("row_scale", row_scale),
                                       ("col_scale", col_scale)], wide=("center",) if wide else ())
        if row_scale is not None and not xp.all_nonnegative(row_scale):
            raise ValueError("row_scale must be >= 0 (it scales the norm of each row)")
        if xp.is_cuda(X):
            c_ok = center is not None and tuple(center.shape) == (D,)  # (a wrong shape: the kernels word it)
            for name, M, top, scaled, c in (("X", X, big, row_scale, center if c_ok else None),
                                            ("C", C, seen.get("C"), col_scale, None)):
                if scaled is not None or M.ndim != 2:
                    continue
                if not _norms_fit_float32(xp, M, _largest_magnitude(xp, M) if top is None else top, c,
                                          seen.get("center")):
                    raise ValueError(
                        f"{name} has rows with norms beyond about {FLOAT32_NORM_MAX:.1e}, whose float32 squares overflow: "
                        "edpairs' CUDA kernels would count them as zero rows; rescale the input (cosines do not "
                        "change) or pass check_finite=False")
    if wide and center is not None:
        if tuple(center.shape) == (D,) and (row_scale is None or tuple(row_scale.shape) == (N,)):
            return _assign_float64(X, xp, C, center, row_scale, col_scale, accumulate, check_finite)
        center = xp.as_float32_contiguous(center)  # a shape error, which the kernels word
    k = C.shape[0]
    labels = xp.empty((N,), "int64", X)
    scores = xp.empty((N,), "float32", X)
    sums = xp.empty((k, D), "float64", X) if accumulate else None
    counts = xp.empty((k,), "int64", X) if accumulate else None
    shapes_ok = k >= 1 and D >= 1 and C.shape[1] == D and (col_scale is None or tuple(col_scale.shape) == (k,))
    if (shapes_ok and _gemm.half_assign_applies(X, xp, k, precision, center, row_scale, col_scale)
            and _gemm.half_assign(X, C, labels, scores, sums, counts, lib=lib())):
        pass  # labelled from float16 copies (half_assign gives False where the default finds no
        # memory for them: the float32 rows below then)
    elif shapes_ok and _gemm.assign_applies(X, xp, k, precision, centred=center is not None):
        # (the kernels' bindings word the shape errors)
        _gemm.assign(X, C, center, row_scale, col_scale, labels, scores, sums, counts, precision=precision,
                     rows=_gemm.assign_rows(), lib=lib())
    else:
        c = xp.capsule
        lib().assign(c(X), c(C), c(center), c(row_scale), c(col_scale), c(labels), c(scores), c(sums), c(counts),
                     bool(check_finite), precision, xp.stream(X))
    _check_results(xp, check_finite, "X or C has values", [scores, sums])
    return Assignment(labels, scores, sums, counts)


def _assign_float64(X, xp: Namespace, C, center, row_scale, col_scale, accumulate: bool,
                    check_finite: bool) -> Assignment:
    """assign of float64 X about a float64 centre: blocks of rows centred in float64 first."""
    # (else the centred rows' NaN would be blamed on X; on a GPU assign's _check_finite_cuda did this)
    if check_finite and not xp.is_cuda(X) and not xp.all_finite(center):
        raise ValueError(_NONFINITE.format("center"))
    N, D = X.shape
    k = C.shape[0]
    labels = xp.empty((N,), "int64", X)
    scores = xp.empty((N,), "float32", X)
    sums = xp.zeros((k, D), "float64", X) if accumulate else None
    counts = xp.zeros((k,), "int64", X) if accumulate else None
    for r0, r1 in _float64_blocks(X):
        part = assign(_centred_float32(xp, X[r0:r1], center), C,
                      row_scale=None if row_scale is None else row_scale[r0:r1], col_scale=col_scale,
                      accumulate=accumulate, check_finite=check_finite, precision="float32")
        labels[r0:r1], scores[r0:r1] = part.labels, part.scores
        if accumulate:
            sums += part.sums
            counts += part.counts
    return Assignment(labels, scores, sums, counts)


@on_data_device("X")
def cosine_assign(X, C, *, center=None, row_scale=None, col_scale=None, check_finite: bool = True,
                  precision: Optional[str] = None):
    """Index of the most cosine-similar centroid for each row of X, and that cosine.

    Returns ``(labels, scores)``: int64 (N,) and float32 (N,), in X's library and device.
    Ties go to the lowest centroid index; a zero row gets label 0 and score 0 (never NaN);
    a zero centroid scores 0 against every row. See :func:`assign` for the optional scales
    and ``precision``.
    """
    out = assign(X, C, center=center, row_scale=row_scale, col_scale=col_scale, accumulate=False,
                 check_finite=check_finite, precision=precision)
    return out.labels, out.scores


@on_data_device("sums")
def normalize_centroids(sums, counts, previous, *, check_finite: bool = True):
    """Unit centroids from cluster sums: ``sums[j] / ||sums[j]||`` where ``counts[j] > 0`` and the
    sum is non-zero, else ``previous[j]`` unchanged (the caller decides how to re-seed).
    ``counts`` must hold non-negative integers."""
    sums = as_array(sums, "sums")
    xp = namespace_of(sums)
    sums = xp.detach(sums)
    if sums.ndim != 2:
        raise ValueError(f"sums must be 2-D (k, D), got shape {tuple(sums.shape)}")
    if check_finite and not xp.all_finite(sums):
        raise ValueError(_NONFINITE.format("sums"))
    sums = xp.contiguous(xp.astype(sums, "float64"))
    counts = as_array(counts, "counts")
    kind = namespace_of(counts).dtype_name(counts)
    if not kind.startswith(("int", "uint")):
        raise TypeError(f"counts must hold integers (members per cluster), got {kind} values")
    counts = xp.contiguous(xp.astype(xp.asarray(counts, sums), "int64"))
    if not xp.all_nonnegative(counts):
        raise ValueError("counts must be >= 0 (members per cluster)")
    previous = _param(previous, xp, sums, "previous", required=True)
    if check_finite and not xp.all_finite(previous):
        raise ValueError(_NONFINITE.format("previous"))
    return _normalize(xp, sums, counts, previous)


def _normalize(xp: Namespace, sums, counts, previous):
    """The normalize_centroids kernel on checked arrays: contiguous float64 sums, int64 counts,
    float32 previous."""
    out = xp.empty(tuple(sums.shape), "float32", sums)
    c = xp.capsule
    lib().normalize_centroids(c(sums), c(counts), c(previous), c(out), xp.stream(sums))
    return out


def _unit_rows(xp: Namespace, C):
    """C's rows divided by their norms (zero rows stay zero), each scaled by its largest
    magnitude first: float32 squares of rows beyond about 1e19 overflow (the centroid of an
    empty cluster came back as zeros), those below about 1e-19 underflow."""
    big = xp.mod.amax(abs(C), 1)
    S = C / (big + (big == 0))[:, None]
    norms = (S * S).sum(1) ** 0.5
    return xp.as_float32_contiguous(S / (norms + (norms == 0))[:, None])


#: A cluster whose sum of member unit vectors is at most this times its count long keeps its
#: previous centroid in spherical_kmeans_step (its direction would be rounding noise).
CANCELLED = 2.0**-16


@on_data_device("X")
def spherical_kmeans_step(X, C, *, check_finite: bool = True, precision: Optional[str] = None):
    """One spherical k-means iteration: assign every row of X to its most cosine-similar
    centroid and replace each centroid by the normalised sum of its members' unit vectors.

    Returns ``(centroids, labels, counts)``: float32 (k, D) unit rows, int64 (N,), int64 (k,).
    An empty cluster (count 0) keeps its previous centroid, normalised, and so does a cluster
    whose members cancel: a sum of length at most CANCELLED (2^-16) times the count, where
    float32 rounding of the unit vectors, not the data, would set the direction. Re-seeding is
    the estimator's job (:class:`edpairs.SphericalKMeans`). ``precision`` as in :func:`assign`.
    """
    X, xp = _data(X)
    C = _param(C, xp, X, "C", required=True)
    res = assign(X, C, accumulate=True, check_finite=check_finite, precision=precision)
    sums = res.sums * ((res.sums * res.sums).sum(1) ** 0.5 > CANCELLED * res.counts)[:, None]
    # The kernel straight away: assign's outputs and C are checked already (the checks of
    # normalize_centroids would cost a synchronisation each on CUDA, every iteration).
    centroids = _normalize(xp, xp.contiguous(sums), res.counts, _unit_rows(xp, C))
    return centroids, res.labels, res.counts


# ---------------------------------------------------------------------------------------
# Moments


@dataclass
class Moments:
    """Streaming, mergeable moments of rows: count ``n``, ``mean`` (D,) and the centred
    scatter ``m2`` (D, D) = sum (x - mean)(x - mean)^T, float64 in the data's library.

    ``update(X)`` adds a chunk, ``merge(other)`` combines two partial states exactly as if
    their rows had been seen together (Chan, Golub & LeVeque's pairwise update)."""

    n: int = 0
    mean: Any = None
    m2: Any = None

    @property
    def cov(self):
        """Unbiased covariance ``m2 / (n - 1)``."""
        return self.covariance(ddof=1)

    def covariance(self, ddof: int = 1):
        check_int("ddof", ddof, 0)
        if self.n - ddof < 1:
            raise ValueError(f"the covariance with ddof={ddof} needs more than {ddof} rows, got n={self.n}")
        with device_scope(self.m2):
            return self.m2 / (self.n - ddof)

    def update(self, X, *, check_finite: bool = True) -> "Moments":
        """Adds the rows of X in place; returns self."""
        merged = self.merge(moments(X, check_finite=check_finite))
        self.n, self.mean, self.m2 = merged.n, merged.mean, merged.m2
        return self

    def merge(self, other: "Moments") -> "Moments":
        """A new state holding the rows of both."""
        if not isinstance(other, Moments):
            raise TypeError(f"can only merge Moments with Moments, got {type(other).__name__}")
        if other.n == 0:
            return Moments(self.n, self.mean, self.m2)
        if self.n == 0:
            return Moments(other.n, other.mean, other.m2)
        if tuple(self.mean.shape) != tuple(other.mean.shape):
            raise ValueError(f"cannot merge moments of {self.mean.shape[0]} and {other.mean.shape[0]} columns")
        _same_place(self.mean, other.mean, "merge moments")
        n = self.n + other.n
        with device_scope(self.mean):
            delta = other.mean - self.mean
            mean = self.mean + delta * (other.n / n)
            m2 = self.m2 + other.m2 + (delta[:, None] * delta[None, :]) * (self.n * other.n / n)
        return Moments(n, mean, m2)


def _product_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@on_data_device("X")
def moments(X, *, check_finite: bool = True, precision: str = "float32",
            workspace_rows: Optional[int] = None) -> Moments:
    """Count, mean and centred scatter of the rows of X (N, D), one pass of the kernels.

    Products are float32 on centred values, accumulated in float32 over at most 512 rows
    and in float64 beyond; the mean is float64. Merge chunk results with :meth:`Moments.merge`.
    float64 X is centred in float64 (on each block's column means) before it is rounded to
    float32, so an offset that dwarfs the spread (1e9 +- 1) keeps it.
    ``precision="tf32"`` (CUDA, float32 X with 16-byte aligned rows; exact elsewhere) takes the
    products of the centred rows on tensor cores with TF32 operands (relative error ~1e-4,
    float32 within a block of rows, float64 across blocks); the CPU is always exact.

    torch CUDA tensors of float32, float16 or bfloat16 take the library-product route
    (edpairs._gemm; ``EDPAIRS_GEMM_ROUTE=kernel`` keeps edpairs' own kernels): the products
    are cuBLAS matrix products of ``workspace_rows`` centred rows at a time (default 131072,
    fewer for rows wider than 2048 columns: about 1 GB of scratch at most), float32
    accumulation over the step inside cuBLAS; for exact products only the Gram's blocks on or
    above the diagonal by default (128 features per block), for TF32 ones the full product, one
    per step (EDPAIRS_GEMM_GRAM chooses; EDPAIRS_GEMM_BLOCK_ROWS batches the full product's step
    over blocks of that many rows), exact float32 operands by default,
    TF32-class products with ``precision="tf32"``: from float16 operands scaled per column by
    default (11 significant bits like TF32, half the bytes; EDPAIRS_GEMM_HALF=0 or signal keeps
    TF32 operands),
    the steps added in float64; the scratch is ``workspace_rows x D`` float32.
    """
    precision = _product_precision(precision)
    X, xp = _data(X)
    N, D = X.shape
    if D < 1:
        raise ValueError(f"X must have at least one column, got shape {tuple(X.shape)}")
    check_int("workspace_rows", workspace_rows, optional=True)
    if N == 0:
        return Moments(0, None, None)
    if xp.dtype_name(X) == "float64":  # each block centred on its own column means, then merged (and checked)
        total = Moments()
        for r0, r1 in _float64_blocks(X):
            shift = X[r0:r1].mean(0)
            part = moments(_centred_float32(xp, X[r0:r1], shift), check_finite=check_finite,
                           precision="float32", workspace_rows=workspace_rows)
            total = total.merge(Moments(part.n, part.mean + shift, part.m2))
        return total
    if check_finite:
        _check_finite_cuda(xp, [("X", X)])
    if _gemm.applies(X, xp):
        mean, m2 = _gemm.moments(X, precision=_gemm.knob_precision(precision, "EDPAIRS_MOMENTS"),
                                 rows=_gemm.default_rows(D) if workspace_rows is None else int(workspace_rows),
                                 lib=lib())
    else:
        mean = xp.empty((D,), "float64", X)
        m2 = xp.empty((D, D), "float64", X)
        c = xp.capsule
        lib().moments(c(X), c(mean), c(m2), bool(check_finite), xp.stream(X), precision=precision)
    _check_results(xp, check_finite, "X has values", [m2])
    return Moments(int(N), mean, m2)


# ---------------------------------------------------------------------------------------
# Signal moments


@dataclass
class SignalMoments:
    """Per-concept statistics over each detector's positives P_i = {n : w_i.x_n - b_i > 0}
    (DESIGN section 2, stage 4), with x~ = x - center:

    ``count`` (I,) int64, ``sum_x`` (I, D) = sum x~, ``sum_z`` (I,), ``sum_zz`` (I,),
    ``sum_xz`` (I, D) = sum x~ z, all float64 except count. States over the same W, b and
    center add up: ``merge`` / ``update`` stream over chunks."""

    count: Any
    sum_x: Any
    sum_z: Any
    sum_zz: Any
    sum_xz: Any
    center: Optional[Any] = None

    def merge(self, other: "SignalMoments") -> "SignalMoments":
        if not isinstance(other, SignalMoments):
            raise TypeError(f"can only merge SignalMoments with SignalMoments, got {type(other).__name__}")
        if tuple(self.sum_x.shape) != tuple(other.sum_x.shape):
            raise ValueError(f"cannot merge statistics of shapes {tuple(self.sum_x.shape)} and {tuple(other.sum_x.shape)}")
        _same_place(self.sum_x, other.sum_x, "merge signal moments")
        with device_scope(self.sum_x):
            if (self.center is None) != (other.center is None) or (
                self.center is not None and self.center is not other.center  # (one centre: no wait)
                and not bool((self.center == other.center).all())
            ):
                raise ValueError("cannot merge signal moments taken about different centers")
            return SignalMoments(self.count + other.count, self.sum_x + other.sum_x, self.sum_z + other.sum_z,
                                 self.sum_zz + other.sum_zz, self.sum_xz + other.sum_xz, self.center)

    def update(self, X, W, b, *, check_finite: bool = True) -> "SignalMoments":
        """Adds the rows of X (same W, b and center) in place; returns self."""
        merged = self.merge(signal_moments(X, W, b, center=self.center, check_finite=check_finite))
        self.count, self.sum_x, self.sum_z, self.sum_zz, self.sum_xz = (
            merged.count, merged.sum_x, merged.sum_z, merged.sum_zz, merged.sum_xz)
        return self


@on_data_device("X")
def signal_moments(X, W, b, *, center=None, check_finite: bool = True, workspace_rows: Optional[int] = None,
                   precision: str = "float32") -> SignalMoments:
    """Masked per-concept statistics of the rows of X (N, D) for detectors ``z = X @ W - b``
    (W is (D, I), b is (I,)), over each detector's positives ``z > 0`` only: one masked
    product ``X~^T [M, M*Z]`` per block of rows, no (D, D) matrix.

    ``center`` (D,) shifts x before the sums (z always uses the raw x); pass the data mean to
    keep the later covariance arithmetic well conditioned; for float64 X the rows are centred
    in float64 before they are rounded to float32, and z is formed as (x - c) W - (b - c W)
    with the offset c W in float64 (the state's ``center`` stays float64, so ``update``
    continues the same way). ``workspace_rows`` bounds the
    scratch memory on CUDA (rows x 2I float32; default 32768 rows on the kernels, 131072 on the
    library-product route below, fewer there when D + 3I > 2048: about 1 GB of scratch at
    most). ``precision="tf32"`` (CUDA, float32 X with 16-byte aligned rows; exact elsewhere)
    takes the masked product on tensor cores with TF32 operands; z and the masks stay exact
    float32, so counts and the z sums do not change.

    torch CUDA tensors of float32, float16 or bfloat16 take the library-product route
    (edpairs._gemm; ``EDPAIRS_GEMM_ROUTE=kernel`` keeps edpairs' own kernels): ``Z = X~ W - b'``
    and ``X~^T [M, M*Z]`` are cuBLAS products of ``workspace_rows`` rows at a time, the masks
    and the z sums an edpairs kernel, the steps added in float64; scratch ``workspace_rows x
    (3I + D)`` float32. There ``precision="tf32"`` rounds the operands of both products to
    TF32, so z, and with it the mask of a row whose z is within TF32 rounding (~1e-3 of
    sum |w x|) of 0, may differ from the exact path.
    """
    precision = _product_precision(precision)
    X, xp = _data(X)
    N, D = X.shape
    Wraw = W
    W = _param(W, xp, X, "W", required=True)
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (D, I), got shape {tuple(W.shape)}")
    I = W.shape[1]
    wide = xp.dtype_name(X) == "float64" and center is not None
    b = _param(b, xp, X, "b", required=True, dtype="float64" if wide else "float32")
    center = _param(center, xp, X, "center", dtype="float64" if wide else "float32")
    if check_finite:
        _check_finite_cuda(xp, [("X", X), ("W", W), ("b", b), ("center", center)],
                           wide=("X", "b", "center") if wide else ())
    if wide:
        if tuple(W.shape) == (D, I) and tuple(b.shape) == (I,) and tuple(center.shape) == (D,):
            return _signal_moments_float64(X, xp, Wraw, b, center, check_finite, workspace_rows)
        b, center = xp.as_float32_contiguous(b), xp.as_float32_contiguous(center)  # shape errors: the kernels word them
    count = xp.empty((I,), "int64", X)
    sum_x = xp.empty((I, D), "float64", X)
    sum_z = xp.empty((I,), "float64", X)
    sum_zz = xp.empty((I,), "float64", X)
    sum_xz = xp.empty((I, D), "float64", X)
    check_int("workspace_rows", workspace_rows, optional=True)
    if _gemm.applies(X, xp):
        _route_signal_shapes(X, W, b, center)  # torch would broadcast what the bindings refuse
        rows = _gemm.default_rows(D + 3 * I) if workspace_rows is None else int(workspace_rows)
        count, sum_x, sum_z, sum_zz, sum_xz = _gemm.signal_moments(
            X, W, b, center, rows=rows, lib=lib(), precision=_gemm.knob_precision(precision, "EDPAIRS_SIGNAL_MOMENTS"))
    else:
        workspace = None
        if xp.is_cuda(X):
            rows = 32768 if workspace_rows is None else int(workspace_rows)
            workspace = xp.empty((max(1, min(rows, max(N, 1))), 2 * I), "float32", X)
        c = xp.capsule
        lib().signal_moments(c(X), c(W), c(b), c(center), c(count), c(sum_x), c(sum_z), c(sum_zz), c(sum_xz),
                             c(workspace), bool(check_finite), xp.stream(X), precision=precision)
    _check_results(xp, check_finite, "X or W has values", [sum_zz, sum_xz])  # sum_x: float64 sums of X
    return SignalMoments(count, sum_x, sum_z, sum_zz, sum_xz, center)


def _route_signal_shapes(X, W, b, center) -> None:
    """The shapes signal_moments' bindings check, in their words, for the library-product route,
    whose torch products would broadcast a b of shape (1,) over every concept instead."""
    D, I = X.shape[1], W.shape[1]
    if D < 1:
        raise ValueError(f"X must have at least one column, got shape {tuple(X.shape)}")
    if I < 1:
        raise ValueError(f"W must hold at least one concept (column), got shape {tuple(W.shape)}")
    if W.shape[0] != D:
        raise ValueError(f"W must be (D, I) with D = X.shape[1]: X is {tuple(X.shape)}, W is {tuple(W.shape)}")
    for name, v, n, dim in (("b", b, I, "I"), ("center", center, D, "D")):
        if v is not None and tuple(v.shape) != (n,):
            raise ValueError(f"{name} must have shape ({dim}) = ({n},), got {tuple(v.shape)}")


def _signal_moments_float64(X, xp: Namespace, W, b, center, check_finite: bool,
                            workspace_rows: Optional[int]) -> SignalMoments:
    """signal_moments of float64 X about a float64 centre: blocks of rows centred in float64
    first, and z = (x - c) W - (b - c W) with the offset c W taken in float64."""
    W64 = _param(W, xp, X, "W", dtype="float64")
    # (else a NaN of W or center would be blamed on b, whose offset they make; on a GPU
    # signal_moments' _check_finite_cuda did this)
    if check_finite and not xp.is_cuda(X):
        for name, v in (("W", W64), ("center", center), ("b", b)):
            if not xp.all_finite(v):
                raise ValueError(_NONFINITE.format(name))
    shifted = _param((b - center @ W64), xp, X, "b")
    W = xp.as_float32_contiguous(W64)
    total = None
    for r0, r1 in _float64_blocks(X):
        part = signal_moments(_centred_float32(xp, X[r0:r1], center), W, shifted, check_finite=check_finite,
                              workspace_rows=workspace_rows, precision="float32")
        total = part if total is None else total.merge(part)
    total.center = center  # float64: update() centres the next chunk the same way
    return total
