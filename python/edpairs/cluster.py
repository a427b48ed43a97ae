"""Directional clustering (DESIGN section 2, stage 2): spherical k-means over streamed chunks on
the fused assignment kernel, in raw coordinates (:class:`SphericalKMeans`) or in whitened
coordinates z = P(x - mean) without ever materialising z (:class:`Whitener`)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from . import _gemm, ops
from ._arrays import device_scope, namespace_of, on_data_device, on_device_of, to_numpy64
from ._checks import check_bool, check_int, check_real
from ._checks import is_int as _is_int
from ._progress import Progress
from ._source import ChunkSource, row_blocks
from .distributed import Reducer, reducer

__all__ = ["SphericalKMeans", "Whitener"]


def _row_norms(M: np.ndarray) -> np.ndarray:
    """||m_i|| of each row in one read of M (np.linalg.norm makes the squares first: at k = 1024,
    D = 512 the centroid update between two passes, which the device waits for, took 3.7 ms
    with it on the CPU machine and about 1 ms with this)."""
    return np.sqrt(np.einsum("ij,ij->i", M, M))


def _unit_rows(M: np.ndarray) -> np.ndarray:
    """M's rows divided by their norms; zero rows stay zeros. Each row is scaled by its largest
    magnitude first, so that its squares neither overflow (rows beyond about 1e154 in float64,
    1e19 in float32) nor underflow to a zero norm (below about 1e-154)."""
    big = np.abs(M).max(axis=1, initial=0.0, keepdims=True)
    S = np.divide(M, big, out=np.zeros_like(M), where=big > 0)
    n = _row_norms(S)[:, None]
    return np.divide(S, n, out=np.zeros_like(S), where=n > 0)


def _live(sums: np.ndarray, counts: np.ndarray, norms: Optional[np.ndarray] = None) -> np.ndarray:
    """Clusters whose sum of member unit vectors (clustering space) sets a direction: members, and
    a sum longer than ops.CANCELLED times their count; shorter sums are float32 rounding noise
    (as in ops.spherical_kmeans_step). ``norms``: the sums' row norms, where known."""
    return (counts > 0) & ((_row_norms(sums) if norms is None else norms) > ops.CANCELLED * counts)


def _converged(mean_cosine: float, previous: Optional[float], tol: float) -> bool:
    """Whether the mean cosine moved by at most ``tol`` (relative) since the previous pass."""
    return previous is not None and abs(mean_cosine - previous) <= tol * max(abs(previous), 1e-12)


def oas_shrinkage(n_samples: int, cov) -> float:
    """Oracle Approximating Shrinkage intensity (Chen, Wiesel, Eldar & Hero 2010) of a sample
    covariance S of ``n_samples`` rows toward ``tr(S) / D * I``, from (n, S) alone:
    rho = min(1, (tr(S^2) + tr(S)^2) / ((n + 1) (tr(S^2) - tr(S)^2 / D))), the form
    scikit-learn's ``OAS`` uses (its ``shrinkage_``).
    It treats the rows as independent draws; for correlated rows (the patches of one image)
    the effective n is smaller and this under-estimates the shrinkage."""
    cov = np.asarray(cov, dtype=np.float64)
    D = cov.shape[0]
    n = float(n_samples)
    if D < 2 or n < 1:
        return 0.0 if D < 2 else 1.0
    tr = float(np.trace(cov))
    tr2 = float(np.sum(cov * cov))  # tr(S^2) for symmetric S
    den = (n + 1.0) * (tr2 - tr * tr / D)
    if den <= 1e-12 * tr2:  # already a multiple of the identity: nothing to shrink
        return 0.0
    return float(min(1.0, max(0.0, (tr2 + tr * tr) / den)))


def resolve_shrinkage(shrinkage, cov, n_samples: Optional[int] = None) -> float:
    """The shrinkage intensity alpha in [0, 1] for a ``shrinkage`` setting: a number (used
    as is), None (0) or ``"oas"`` (:func:`oas_shrinkage`, needs ``n_samples``)."""
    if shrinkage is None:
        return 0.0
    if isinstance(shrinkage, str):
        if shrinkage.lower() != "oas":
            raise ValueError(f'whitening shrinkage must be "oas", a number in [0, 1] or None, got {shrinkage!r}')
        if n_samples is None:
            raise ValueError('shrinkage="oas" needs n_samples (the number of rows behind the covariance)')
        return oas_shrinkage(n_samples, cov)
    if isinstance(shrinkage, bool) or not isinstance(shrinkage, (int, float, np.integer, np.floating)):
        raise ValueError(f'whitening shrinkage must be "oas", a number in [0, 1] or None, got {shrinkage!r}')
    alpha = float(shrinkage)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"whitening shrinkage must be in [0, 1], got {alpha}")
    return alpha


@dataclass
class Whitener:
    """z = P (x - mean) with Cov(z) = I on the retained rank: P = L^{-1/2} U^T over the
    eigenvalues L of the covariance above ``rtol * max(L)`` (directions where the data does
    not vary are dropped instead of blown up).

    With ``shrinkage`` alpha > 0 the retained eigenvalues are first shrunk toward their
    scaled-identity target, L <- (1 - alpha) L + alpha tr(Cov) / D (the covariance
    (1 - alpha) Cov + alpha (tr Cov / D) I on the retained subspace), so that directions of small
    variance are amplified by at most sqrt(D / (alpha tr Cov)) instead of 1 / sqrt(L).
    ``shrinkage="oas"`` takes alpha from the Oracle Approximating Shrinkage closed form
    (:func:`oas_shrinkage`), a function of (n, Cov) only, so it works on merged streaming or
    distributed moments."""

    mean: np.ndarray         # (D,) float64
    P: np.ndarray            # (r, D) float64
    eigenvalues: np.ndarray  # (r,) retained eigenvalues, descending (after shrinkage)
    shrinkage: float = 0.0   # the alpha that was applied

    @classmethod
    def from_covariance(cls, mean, cov, *, rtol: float = 1e-5, shrinkage=0.0,
                        n_samples: Optional[int] = None) -> "Whitener":
        """The whitening of data with this ``mean`` (D,) and covariance ``cov`` (D, D, symmetric
        positive semi-definite; its symmetric part is taken); ``rtol`` in [0, 1), the rank cut;
        ``shrinkage`` and ``n_samples`` (at least 1) as :func:`resolve_shrinkage` takes them."""
        mean, cov = to_numpy64(mean), to_numpy64(cov)
        if mean.ndim != 1 or cov.shape != (mean.shape[0], mean.shape[0]) or not mean.size:
            raise ValueError(f"Whitener.from_covariance needs mean (D,) and cov (D, D) for D >= 1, got shapes "
                             f"{mean.shape} and {cov.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(cov).all()):
            raise ValueError("Whitener.from_covariance: mean and cov must be finite, got NaN or Inf")
        check_real("rtol", rtol, "a number in [0, 1)", lambda v: 0 <= v < 1)
        if n_samples is not None:
            check_int("n_samples", n_samples)
        cov = 0.5 * (cov + cov.T)
        alpha = resolve_shrinkage(shrinkage, cov, n_samples)
        vals, vecs = np.linalg.eigh(cov)
        order = np.argsort(vals)[::-1]
        vals, vecs = vals[order], vecs[:, order]
        if not vals.size or vals[0] <= 0:
            if np.any(cov):
                raise ValueError(f"cov has no positive eigenvalue (the largest is {vals[0]:.3g}): it is not a "
                                 f"covariance matrix")
            raise ValueError("the data is constant (zero covariance): there are no directions to find")
        # The rank cut is on the sample spectrum: a direction with no variance holds no data to
        # whiten, whatever the shrinkage (the regularised eigenvalue would only scale rounding).
        keep = vals > rtol * vals[0]
        vals, vecs = vals[keep], vecs[:, keep]
        if alpha > 0:
            vals = (1.0 - alpha) * vals + alpha * (np.trace(cov) / cov.shape[0])
        # Fix the eigenvector signs so that results do not depend on the LAPACK build.
        signs = np.sign(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(vecs.shape[1])])
        vecs = vecs * signs
        return cls(mean, (vecs / np.sqrt(vals)).T, vals, float(alpha))

    def inverse_covariance(self) -> np.ndarray:
        """P^T P (D, D): the pseudo-inverse of the (regularised, rank-cut) covariance that
        defines this whitening."""
        return self.P.T @ self.P

    @property
    def rank(self) -> int:
        return int(self.P.shape[0])

    def transform(self, X: np.ndarray) -> np.ndarray:
        """z = P (x - mean) of the rows of X (n, D), or of one row (D,), float64 on the host."""
        X = to_numpy64(X)
        if X.ndim not in (1, 2) or X.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"Whitener.transform needs rows (n, {self.mean.shape[0]}) or one row "
                             f"({self.mean.shape[0]},), got shape {X.shape}")
        return (X - self.mean) @ self.P.T


class _Geometry:
    """Where cosines are measured. Plain: between raw rows and centroids. Whitened: between
    z = P(x - mean) and unit whitened centroids c, computed on raw rows as
    (x - mean) . (P^T c) / ||P(x - mean)||; the per-row norms are cached per chunk."""

    def __init__(self, whitener: Optional[Whitener] = None):
        self.whitener = whitener
        self._row_scale: List = []
        self._placed = None  # P^T and the mean on each device the chunks live on (_Placed)

    @property
    def dim(self) -> Optional[int]:
        return None if self.whitener is None else self.whitener.rank

    def filters(self, C: np.ndarray) -> np.ndarray:
        """Raw-space filters (k, D) for clustering-space unit centroids C."""
        return C if self.whitener is None else C @ self.whitener.P

    def center(self):
        return None if self.whitener is None else self.whitener.mean.astype(np.float32)

    def col_scale(self, k: int):
        return None if self.whitener is None else np.ones(k, np.float32)

    def row_scale(self, index: int, chunk):
        if self.whitener is None:
            return None
        while len(self._row_scale) <= index:
            self._row_scale.append(None)
        if self._row_scale[index] is None:
            xp = namespace_of(chunk)
            if self._placed is None:  # sent to a device once, not once per chunk (each copy waits)
                self._placed = _Placed(np.ascontiguousarray(self.whitener.P.T, np.float32),
                                       self.whitener.mean.astype(np.float32))
            Pt, mu = self._placed.on(chunk)
            parts = []
            for block in row_blocks(chunk):
                norms = (xp.matmul(xp.astype(block, "float32") - mu, Pt) ** 2).sum(1) ** 0.5
                parts.append(xp.astype(1.0 / (norms + (norms == 0)) * (norms > 0), "float32"))
            self._row_scale[index] = xp.contiguous(_concat(parts))
        return self._row_scale[index]

    def centroids_from_sums(self, sums: np.ndarray, counts: np.ndarray):
        """Unit clustering-space centroids from raw-space sums of members' unit vectors, and the
        clusters left empty or whose members cancel (not :func:`_live`; a zero row there)."""
        S = sums if self.whitener is None else sums @ self.whitener.P.T
        norms = _row_norms(S)
        live = _live(S, counts, norms)
        return np.divide(S, norms[:, None], out=np.zeros_like(S), where=live[:, None]), ~live

    def embed(self, rows: np.ndarray) -> np.ndarray:
        """Unit vectors in clustering space for raw rows (float64)."""
        return _unit_rows(rows if self.whitener is None else self.whitener.transform(rows))


def _initial_centroids(init, n_clusters: int, dim: int) -> np.ndarray:
    """Unit rows (n_clusters, dim) of an ``init`` array of centroids; refuses a wrong shape,
    NaN or Inf, and a zero row (a centroid without a direction)."""
    dtype = getattr(init, "dtype", None)
    if "complex" in str(dtype) or (dtype is None and np.iscomplexobj(init)):
        raise ValueError(f"init centroids must be real, got complex values ({dtype or 'complex'})")
    try:
        C = to_numpy64(init)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"init centroids must be an array of real numbers, got {type(init).__name__} ({exc})") from None
    if C.shape != (n_clusters, dim):
        raise ValueError(f"init centroids must have shape ({n_clusters}, {dim}), got {C.shape}")
    if not np.isfinite(C).all():
        bad = np.flatnonzero(~np.isfinite(C).all(axis=1))
        raise ValueError(f"init centroids must be finite, got NaN or Inf in row(s) {bad.tolist()}")
    zero = np.flatnonzero(~np.any(C != 0, axis=1))
    if zero.size:
        raise ValueError(f"init centroid {zero[0]} is zero: a centroid needs a direction")
    return _unit_rows(C)


def _check_finite_rows(rows: np.ndarray, name: str = "X") -> None:
    """Before seeding: k-means++ on NaN or Inf would fail with numpy's own message (Inf rows
    normalise to NaN), the assignment kernels' check only comes after."""
    if not np.isfinite(rows).all():
        raise ValueError(ops._NONFINITE.format(name))


def _live_rows(E: np.ndarray) -> np.ndarray:
    """Positions of E's nonzero rows, the only ones that can seed a centroid; an error where
    there are none."""
    valid = np.flatnonzero(np.linalg.norm(E, axis=1) > 0)
    if valid.size == 0:
        raise ValueError("every row is zero (after centring): cosines are undefined")
    return valid


def _random_start(E: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """init="random": k nonzero rows of E (with repeats only where fewer exist)."""
    live = _live_rows(E)
    return E[rng.choice(live, size=k, replace=live.size < k)]


def _kmeanspp(E: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ on unit vectors E (m, r): the spherical distance 1 - cos plays the role
    of the squared Euclidean distance (||a - b||^2 = 2(1 - cos) for unit vectors)."""
    m = E.shape[0]
    valid = _live_rows(E)
    trials = 2 + int(math.log(k))
    centers = np.empty((k, E.shape[1]))
    first = rng.choice(valid)
    centers[0] = E[first]
    closest = np.clip(1.0 - E @ E[first], 0.0, None)
    closest[np.linalg.norm(E, axis=1) == 0] = 0.0
    for c in range(1, k):
        potential = closest.sum()
        if potential <= 1e-12:  # fewer distinct directions than clusters: duplicate, re-seeded later
            centers[c] = E[rng.choice(valid)]
            continue
        cand = rng.choice(m, size=trials, p=closest / potential)
        dist = np.clip(1.0 - E[cand] @ E.T, 0.0, None)
        new = np.minimum(closest[None, :], dist)
        best = int(np.argmin(new.sum(1)))
        centers[c] = E[cand[best]]
        closest = new[best]
    return centers


@dataclass
class _LloydResult:
    centers: np.ndarray  # (k, r) unit, clustering space
    mean_cosine: float
    counts: np.ndarray
    n_iter: int
    labels: Optional[object] = None  # in-memory data only: labels of the final centres
    sums: Optional[np.ndarray] = None  # (k, D) raw-space sums of the unit vectors assigned to the final centres


def _where(x) -> tuple:
    """(library, device) of an array: what the device-side passes key their per-device state by."""
    xp = namespace_of(x)
    return xp.name, xp.device(x)


class _Placed:
    """A pass's centroid filters, centre and column scales (numpy), sent to each device the
    chunks live on once per pass rather than once per chunk."""

    def __init__(self, *arrays):
        self.arrays = arrays
        self._at: dict = {}

    def on(self, chunk):
        key = _where(chunk)
        if key not in self._at:
            self._at[key] = tuple(on_device_of(a, chunk) for a in self.arrays)
        return self._at[key]


def _kept_on_device(xp, a) -> bool:
    """Whether a pass keeps what it sums of a chunk where the chunk is: on a GPU (in host memory
    there is nothing to gain by deferring)."""
    return xp.is_cuda(a)


class _OrderedSum:
    """A host total (numpy) of arrays added one after another, each where it lives. For a run of
    arrays on one GPU the total moves there (one copy), takes their additions there, and comes
    back (one copy, waiting for the device) when the device changes or at the end: the same
    float64 additions in the same order as on the host, without a wait per array. The total
    starts at zero, which a run of arrays on a GPU starts from there (x + 0: the bits of
    zeros + x, -0.0 included) instead of copying zeros over (4 MB a pass for k = 1024 sums at
    D = 512)."""

    def __init__(self, shape, dtype=np.float64):
        self.total = np.zeros(shape, dtype)
        self._host = False  # something added on the host, or a run brought home (else the total is 0)
        self._key = None
        self._run = None

    def add(self, x) -> None:
        xp = namespace_of(x)
        if not _kept_on_device(xp, x):
            self.flush()
            self.total += to_numpy64(x).astype(self.total.dtype, copy=False)
            self._host = True
            return
        key = _where(x)
        with device_scope(x):
            if key != self._key:
                self.flush()
                self._key = key
                if not self._host and tuple(x.shape) == self.total.shape:  # (else broadcast as zeros + x would)
                    self._run = xp.astype(x, self.total.dtype.name) + 0
                    return
                self._run = on_device_of(self.total, x)
            self._run = self._run + x

    def flush(self) -> None:
        if self._run is not None:
            self.total = to_numpy64(self._run).astype(self.total.dtype)
            self._key = self._run = None
            self._host = True

    def alone(self):
        """The total where every array added was one device's (on that device, not copied home),
        else None."""
        return None if self._host else self._run

    def result(self) -> np.ndarray:
        self.flush()
        return self.total


# The scores a pass keeps (4 bytes a row) to pick its k lowest only where a cluster empties;
# past this many bytes the kept chunks are reduced to their k lowest at once.
PENDING_SCORE_BYTES = 64 << 20


class _PassTotals:
    """What one Lloyd pass needs of each chunk's assignment: float64 cluster sums and counts,
    the total and number of the scores, and (only where a cluster empties) the k lowest scores
    with their global rows, the candidates for re-seeding it. On a GPU the sums, counts and
    score totals stay on the chunks' device (:class:`_OrderedSum`) and come to the host once
    per run of chunks on one device, not chunk by chunk; the sums and the chunks' score totals
    are added in chunk order, as on the host (within a chunk, the total of its scores is the
    library's float64 sum: rounding may differ from numpy's). Each chunk's scores are kept
    where they are (up to PENDING_SCORE_BYTES) and reduced to their k lowest, there, only when
    :meth:`worst` asks: a pass with no empty cluster never selects them. Ties among the lowest
    scores are broken by the library's selection."""

    def __init__(self, k: int, D: int, offset: int):
        self.k, self.offset = k, offset
        self.sums, self.counts = _OrderedSum((k, D)), _OrderedSum(k, np.int64)
        self.total = _OrderedSum(())  # of the chunks' float64 score totals (0-d), in chunk order
        self.n = 0
        self._pending: list = []  # (scores, global row of the first), in chunk order
        self._pending_bytes = 0
        self._lows: list = []  # (k lowest scores, their global rows) per chunk, where the chunk was

    def add(self, res) -> None:
        self.sums.add(res.sums)
        self.counts.add(res.counts)
        scores = res.scores
        xp = namespace_of(scores)
        if _kept_on_device(xp, scores):
            self.total.add(xp.sum_float64(scores))
        else:
            self.total.add(np.asarray(to_numpy64(scores).sum()))
        size = int(scores.shape[0])
        self._pending.append((scores, self.offset + self.n))
        self._pending_bytes += 4 * size
        self.n += size
        if self._pending_bytes > PENDING_SCORE_BYTES:
            self._settle()

    def _settle(self) -> None:
        """The kept chunks' scores reduced to their k lowest, each where it is. Zero rows score 0
        and cannot seed a cluster: they rank as +inf, so that k or more of them cannot push
        every usable candidate out of the k lowest."""
        for scores, first in self._pending:
            xp = namespace_of(scores)
            with device_scope(scores):
                ranked = xp.zeros_as_inf(scores)
                low = xp.k_lowest(ranked, min(self.k, int(scores.shape[0])))
                self._lows.append((ranked[low], low + first))
        self._pending, self._pending_bytes = [], 0

    def worst(self):
        """(scores, global rows) of each chunk's k lowest scores, float64 and int64 on the host."""
        self._settle()
        return ([to_numpy64(v) for v, _ in self._lows],
                [to_numpy64(r).astype(np.int64) for _, r in self._lows])

    def alone_on_device(self):
        """(sums, counts, total) on the device where every chunk of the pass was, else None."""
        runs = (self.sums.alone(), self.counts.alone(), self.total.alone())
        return None if any(r is None for r in runs) else runs

    def result(self):
        return self.sums.result(), self.counts.result(), float(self.total.result()), self.n


def _device_centroids(sums, counts, total, C):
    """The host update of a pass (centroids_from_sums, empty clusters keeping their centroid) on
    the device of float64 ``sums`` (k, D), ``counts`` and the 0-d score ``total``, for
    float64 centroids C (k, D) there: plain cosines only. Returns (new centroids there, total,
    number of empty clusters) with one synchronisation. The norms are the library's float64
    sums (rounding may differ from numpy's in the last bit)."""
    xp = namespace_of(sums)
    mod = xp.mod
    with device_scope(sums):
        norms = mod.sqrt((sums * sums).sum(1))
        live = (counts > 0) & (norms > ops.CANCELLED * xp.astype(counts, "float64"))
        new = mod.where(live[:, None], sums / mod.where(live, norms, 1.0)[:, None], C)
        seen = mod.stack([total, xp.astype((~live).sum(), "float64")])
        total, empty = seen.tolist()
    return new, total, int(empty)


def _lloyd(source: ChunkSource, geometry: _Geometry, C: np.ndarray, *, max_iter: int, tol: float,
           check_finite: bool, progress: Progress, keep_labels: bool, red: Reducer, offset: int = 0,
           start: int = 0, previous: Optional[float] = None, save=None) -> _LloydResult:
    """Full-batch spherical k-means, streaming the chunks once per iteration, then one more
    pass to label every row with the final centres. With several processes (``red``), each
    reads its own rows (global indices from ``offset``) and every sum is all-reduced.
    ``start``/``previous``: resume at iteration ``start`` (C are that iteration's centres,
    ``previous`` the mean cosine before them); ``save(C, previous, n_iter)`` is called with
    the state after every pass that does not end the fit."""
    k = C.shape[0]
    n_iter = start
    # Plain cosines in one process: where a pass's chunks were all on one GPU, the centroid
    # update stays there (_device_centroids; one wait for the mean cosine and the empty count),
    # and the next pass's filters with it: no sums home, no centroids out, no host arithmetic
    # between passes. ``C_dev``: those centroids (float64) on that GPU, else None; C is stale
    # while it is set.
    plain = geometry.whitener is None and not red.active
    C_dev = None
    for it in range(start, max_iter + 1):
        final = it == max_iter
        F_dev = None
        if C_dev is not None:
            with device_scope(C_dev):
                F_dev = namespace_of(C_dev).as_float32_contiguous(C_dev)
        params = None
        totals = _PassTotals(k, source.n_features, offset)
        labels = [] if keep_labels else None
        for index, chunk in enumerate(source):
            with device_scope(chunk):
                if F_dev is not None and _where(chunk) == _where(F_dev):
                    F_here, center_here, col_here = F_dev, None, None
                else:
                    if params is None:
                        if C_dev is not None:  # a chunk elsewhere: the host's centroids from here on
                            C, C_dev, F_dev = to_numpy64(C_dev), None, None
                        params = _Placed(geometry.filters(C).astype(np.float32), geometry.center(), geometry.col_scale(k))
                    F_here, center_here, col_here = params.on(chunk)
                res = ops.assign(chunk, F_here, center=center_here, row_scale=geometry.row_scale(index, chunk),
                                 col_scale=col_here, accumulate=True, check_finite=check_finite and it == 0)
                totals.add(res)
            if keep_labels:
                labels.append(res.labels)
        alone = totals.alone_on_device() if plain else None
        if alone is not None:  # (C_dev, where set, is on the device every chunk was on)
            sums_d, counts_d, total_d = alone
            new_d, total, empty = _device_centroids(sums_d, counts_d, total_d,
                                                    C_dev if C_dev is not None else on_device_of(C, sums_d))
            if empty == 0:  # (empty clusters: the host's update below re-seeds them)
                mean_cosine = total / max(totals.n, 1)
                progress.update(1, note=f"mean cos {mean_cosine:.5f}")
                if final or _converged(mean_cosine, previous, tol):
                    return _LloydResult(C if C_dev is None else to_numpy64(C_dev), mean_cosine,
                                        to_numpy64(counts_d).astype(np.int64), n_iter,
                                        _concat(labels) if keep_labels else None, to_numpy64(sums_d))
                previous, C_dev = mean_cosine, new_d
                n_iter += 1
                if save is not None:
                    save(to_numpy64(new_d), previous, n_iter)
                continue
        if C_dev is not None:  # the host's update from here: the centroids this pass labelled to
            C, C_dev = to_numpy64(C_dev), None
        sums, counts, total, n = totals.result()
        if red.active:
            sums = red.sum(sums)
            counts = red.sum(counts)
            total, n = red.sum(np.array([total]))[0], int(red.sum(np.array([n], np.int64))[0])
        mean_cosine = total / max(n, 1)
        new, empty = geometry.centroids_from_sums(sums, counts)  # (empty: no members, or they cancel)
        new[empty] = C[empty]
        if empty.any():
            # Re-seed empty clusters from the worst-fit rows (lowest cosine to their centre); the
            # rows are read only now, which is rare.
            worst_scores, worst_index = totals.worst()
            scores_all, index_all = np.concatenate(worst_scores), np.concatenate(worst_index)
            if red.active:  # every rank's k worst (padded to k), then the same choice everywhere
                pad = k - scores_all.size if scores_all.size < k else 0
                part = np.argsort(scores_all, kind="stable")[:k]
                mine = np.stack([np.concatenate([scores_all[part], np.full(pad, np.inf)]),
                                 np.concatenate([index_all[part], np.full(pad, -1)]).astype(np.float64)])
                every = np.concatenate(red.gather(mine), axis=1)
                every = every[:, np.isfinite(every[0])]
                scores_all, index_all = every[0], every[1].astype(np.int64)
                order = np.lexsort((index_all, scores_all))
            else:
                order = np.argsort(scores_all, kind="stable")
                order = order[np.isfinite(scores_all[order])]  # (zero rows: +inf)
            worst = index_all[order[:k]]
            rows = (red.rows(source, np.sort(worst), offset, source.n_features) if red.active
                    else source.gather(np.sort(worst)))
            E = geometry.embed(rows[np.searchsorted(np.sort(worst), worst)])
            E = E[np.linalg.norm(E, axis=1) > 0]
            for j, e in zip(np.flatnonzero(empty), E):
                new[j] = e
        progress.update(1, note=f"mean cos {mean_cosine:.5f}")
        if final or (_converged(mean_cosine, previous, tol) and not empty.any()):
            # This pass assigned rows to C (not to `new`): C and these labels belong together.
            lab = None
            if keep_labels:
                lab = _concat(labels)
            return _LloydResult(C, mean_cosine, counts, n_iter, lab, sums)
        previous = mean_cosine
        C = new
        n_iter += 1
        if save is not None:
            save(C, previous, n_iter)
    raise AssertionError("unreachable")


def _concat(parts):
    """Arrays of one library and device, concatenated there."""
    if len(parts) == 1:
        return parts[0]
    xp = namespace_of(parts[0])
    with device_scope(parts[0]):
        return xp.mod.cat(parts) if xp.name == "torch" else xp.mod.concatenate(parts)


def _seed_sample(source: ChunkSource, geometry: _Geometry, size: int, rng: np.random.Generator, *,
                 red: Reducer, offset: int, N: int, check_finite: bool) -> np.ndarray:
    rows = np.sort(rng.choice(N, size=min(N, size), replace=False))
    rows = red.rows(source, rows, offset, source.n_features) if red.active else source.gather(rows)
    if check_finite:
        _check_finite_rows(rows, source.name)
    return geometry.embed(rows)


def _count_rows(source: ChunkSource) -> None:
    if source.n_samples is None:
        for _ in source:
            pass


def cluster(source: ChunkSource, n_clusters: int, *, geometry: _Geometry, init="k-means++", n_init: int = 1,
            max_iter: int = 100, tol: float = 1e-6, init_size: Optional[int] = None, random_state=None,
            check_finite: bool = True, progress: Optional[bool] = None, keep_labels: bool = False,
            desc: str = "spherical k-means", red: Reducer = reducer(None), checkpoint=None) -> _LloydResult:
    """Spherical k-means on a chunk source with restarts; the best mean cosine wins. With a
    reducer over several processes the rows are the union of the ranks' sources. With a
    :class:`edpairs.checkpoint.Checkpoint` the state is saved after every pass (stage
    "cluster") and a saved state of that stage is resumed."""
    _count_rows(source)
    offset, N = red.offset(source.n_samples) if red.active else (0, source.n_samples)
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if N == 0:
        raise ValueError(f"{source.name} has no rows: the source gave no chunks, or only empty ones")
    if n_clusters > N:
        raise ValueError(f"n_clusters={n_clusters} is larger than the number of rows N={N}")
    rng = np.random.default_rng(random_state)
    best = None
    first, resume = 0, None
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None and saved[0] == "cluster":
        meta, arrays = saved[1]["meta"], saved[2]
        rng.bit_generator.state = meta["rng"]
        first, resume = int(meta["restart"]), (arrays["C"], meta["previous"], int(meta["n_iter"]))
        if "best_centers" in arrays:
            best = _LloydResult(arrays["best_centers"], float(meta["best_mean_cosine"]), arrays["best_counts"],
                                int(meta["best_n_iter"]), sums=arrays.get("best_sums"))

    def saver(restart):
        def save(C, previous, n_iter):
            meta = {"rng": rng.bit_generator.state, "restart": restart, "previous": previous, "n_iter": n_iter}
            arrays = {"C": C}
            if best is not None:
                meta.update(best_mean_cosine=best.mean_cosine, best_n_iter=best.n_iter)
                arrays.update(best_centers=best.centers, best_counts=best.counts)
                if best.sums is not None:  # None only when resumed from a checkpoint that lacked them
                    arrays["best_sums"] = best.sums
            checkpoint.save("cluster", meta, arrays)
        return None if checkpoint is None else save

    # The float16 copies that TF32 labels of float32 rows take on a GPU (ops.assign's default on
    # Hopper) are made once for the fit where the rows are held, not once per pass.
    with Progress(total=None, desc=desc, enabled=progress, unit=" iterations") as bar, \
            _gemm.keep_half_rows(source.arrays):
        for restart in range(first, n_init if isinstance(init, str) else 1):
            start, previous = 0, None
            if resume is not None and restart == first:
                C0, previous, start = resume
            elif isinstance(init, str):
                size = init_size or max(20 * n_clusters, 4096)
                E = _seed_sample(source, geometry, size, rng, red=red, offset=offset, N=N, check_finite=check_finite)
                if init == "k-means++":
                    C0 = _kmeanspp(E, n_clusters, rng)
                elif init == "random":
                    C0 = _random_start(E, n_clusters, rng)
                else:
                    raise ValueError(f"init must be 'k-means++', 'random' or an array of centroids, got {init!r}")
            else:
                C0 = _initial_centroids(init, n_clusters, geometry.dim or source.n_features)
            bar.set_description(f"{desc} (restart {restart + 1})" if n_init > 1 else desc)
            res = _lloyd(source, geometry, C0, max_iter=max_iter, tol=tol, check_finite=check_finite,
                         progress=bar, keep_labels=keep_labels, red=red, offset=offset, start=start,
                         previous=previous, save=saver(restart))
            if best is None or res.mean_cosine > best.mean_cosine:
                best = res
        if (keep_labels and best.labels is None) or best.sums is None:
            # The best restart ran before a resume (and its sums were not in the checkpoint): one
            # more assignment pass to its centres.
            again = _lloyd(source, geometry, best.centers, max_iter=0, tol=tol, check_finite=False,
                           progress=bar, keep_labels=keep_labels, red=red, offset=offset)
            best.labels, best.sums = again.labels, again.sums
    return best


class SphericalKMeans:
    """Spherical k-means: rows are compared by cosine similarity and each centroid is the
    normalised sum of its members' unit vectors. Runs on edpairs' fused assignment kernel
    (CPU or CUDA), streams over chunks, never forms the N x k score matrix.

    ``fit`` takes an (N, D) array (numpy, torch, cupy) or a re-iterable of chunks (a list of
    (n, D) arrays, or a callable returning a fresh iterator); with chunks it performs exactly the
    same Lloyd iterations as on their concatenation. ``partial_fit`` is the online (mini-batch)
    variant, and continues a model that ``fit`` returned.
    A cluster left without members, or whose members' unit vectors cancel to float32 rounding
    noise (a sum at most ``ops.CANCELLED`` times their count long), is re-seeded by ``fit`` from
    the worst-fit rows and keeps its centroid in ``partial_fit``.

    Fitted attributes: ``cluster_centers_`` (k, D) unit rows in the data's library and
    device, ``labels_`` (in-memory data only), ``counts_``, ``mean_cosine_``, ``inertia_``
    (sum over rows of 1 - cos, lower is better, like scikit-learn's), ``n_iter_``.
    """

    def __init__(self, n_clusters: int = 8, *, init="k-means++", n_init: int = 1, max_iter: int = 100,
                 tol: float = 1e-6, init_size: Optional[int] = None, random_state=None, check_finite: bool = True,
                 progress: Optional[bool] = None, chunk_rows: Optional[int] = None):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.init_size = init_size
        self.random_state = random_state
        self.check_finite = check_finite
        self.progress = progress
        self.chunk_rows = chunk_rows

    def _params(self) -> dict:
        return {"n_clusters": self.n_clusters, "n_init": self.n_init, "max_iter": self.max_iter, "tol": self.tol,
                "init_size": self.init_size, "random_state": self.random_state, "chunk_rows": self.chunk_rows}

    def _validate(self) -> None:
        for name in ("n_clusters", "n_init", "max_iter", "init_size", "chunk_rows"):
            check_int(name, getattr(self, name), 1, optional=name in ("init_size", "chunk_rows"))
        check_real("tol", self.tol, "a finite number >= 0", lambda v: v >= 0)
        seed = self.random_state
        if not (seed is None or (_is_int(seed) and seed >= 0)
                or isinstance(seed, (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence))):
            raise ValueError(f"random_state must be None, an integer >= 0 or a numpy Generator, got {seed!r}")
        check_bool("check_finite", self.check_finite)
        if self.init is None or (isinstance(self.init, str) and self.init not in ("k-means++", "random")):
            raise ValueError(f"init must be 'k-means++', 'random' or an array of centroids, got {self.init!r}")

    def fit(self, X, y=None, *, process_group=None, checkpoint=None) -> "SphericalKMeans":
        """Fits on X. ``process_group`` (a ``torch.distributed`` group, or True for the default
        one): X holds this rank's rows, and every rank gets the fit of all ranks' rows (see
        :mod:`edpairs.distributed`); ``labels_`` are this rank's. ``checkpoint``: a file path
        (or :class:`edpairs.checkpoint.Checkpoint`) where the state is saved after every pass;
        a fit killed mid-way and called again resumes there (see :mod:`edpairs.checkpoint`).
        With several processes give each rank its own path."""
        self._validate()
        red = reducer(process_group)
        source = ChunkSource(X, chunk_rows=self.chunk_rows)
        ckpt = None
        if checkpoint is not None:
            from .checkpoint import Checkpoint, data_fingerprint

            init = self.init if isinstance(self.init, str) else zlib.crc32(np.ascontiguousarray(to_numpy64(self.init)).tobytes())
            ckpt = Checkpoint.of(checkpoint, lambda: {"fit": "SphericalKMeans", "data": data_fingerprint(source),
                                                      "rank": red.rank, **self._params(), "init": init})
        res = cluster(source, int(self.n_clusters), geometry=_Geometry(), init=self.init, n_init=self.n_init,
                      max_iter=self.max_iter, tol=self.tol, init_size=self.init_size, random_state=self.random_state,
                      check_finite=self.check_finite, progress=self.progress if red.rank == 0 else False,
                      keep_labels=source.in_memory, red=red, checkpoint=ckpt)
        if ckpt is not None:
            ckpt.done()
        self.cluster_centers_ = on_device_of(res.centers.astype(np.float32), source.like)
        self.labels_ = res.labels
        self.counts_ = res.counts
        self.mean_cosine_ = float(res.mean_cosine)
        self.inertia_ = float((1.0 - res.mean_cosine) * int(red.sum(np.array([source.n_samples], np.int64))[0]))
        self.n_iter_ = res.n_iter
        self.n_features_in_ = source.n_features
        # partial_fit continues from here: the sums behind the final assignment (counts_, labels_).
        self._sums, self._centers = res.sums.copy(), res.centers
        return self

    @on_data_device("X")
    def partial_fit(self, X, y=None) -> "SphericalKMeans":
        """One online step on a batch: assign it to the current centroids and move each centroid
        to the normalised running sum of every unit vector assigned to it so far. After ``fit``
        it continues from the fitted model: the running sums start as those of fit's final
        assignment (the one behind ``counts_``) and ``counts_`` keeps accumulating."""
        self._validate()
        X, xp = ops._data(X)
        if X.shape[1] == 0:
            raise ValueError(f"X must have at least one column, got shape {tuple(X.shape)}")
        if getattr(self, "_centers", None) is not None and self._centers.shape[0] != self.n_clusters:
            raise ValueError(f"n_clusters was changed to {self.n_clusters} after fitting {self._centers.shape[0]} "
                             "clusters: make a new SphericalKMeans for another number of clusters")
        if not hasattr(self, "cluster_centers_") or getattr(self, "_sums", None) is None:
            if X.shape[0] < self.n_clusters:
                raise ValueError(f"the first batch needs at least n_clusters={self.n_clusters} rows, got {X.shape[0]}")
            rng = np.random.default_rng(self.random_state)
            rows = to_numpy64(X)
            if self.check_finite:
                _check_finite_rows(rows)
            E = _unit_rows(rows)
            if not isinstance(self.init, str):
                C = _initial_centroids(self.init, self.n_clusters, X.shape[1])
            elif self.init == "k-means++":
                C = _kmeanspp(E, self.n_clusters, rng)
            else:  # "random" (_validate refused the rest): from the nonzero rows, as fit's seeding
                C = _random_start(E, self.n_clusters, rng)
            self._sums = np.zeros((self.n_clusters, X.shape[1]))
            self.counts_ = np.zeros(self.n_clusters, np.int64)
            self._centers = C
            self.n_features_in_ = X.shape[1]
        else:
            self._check_columns(X)
        res = ops.assign(X, on_device_of(self._centers.astype(np.float32), X), accumulate=True,
                         check_finite=self.check_finite)
        self._sums += to_numpy64(res.sums)
        self.counts_ += to_numpy64(res.counts).astype(np.int64)
        live = _live(self._sums, self.counts_)
        self._centers = np.where(live[:, None], _unit_rows(self._sums), self._centers)
        self.cluster_centers_ = on_device_of(self._centers.astype(np.float32), X)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise ValueError("this SphericalKMeans is not fitted yet: call fit or partial_fit first")

    def _check_columns(self, X) -> None:
        if X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} columns but the model was fitted on {self.n_features_in_}")

    @on_data_device("X")
    def predict(self, X):
        """Index of the most cosine-similar centroid of each row (X's library and device)."""
        self._check_fitted()
        X, xp = ops._data(X)
        self._check_columns(X)
        C = on_device_of(to_numpy64(self.cluster_centers_).astype(np.float32), X)
        return ops.cosine_assign(X, C, check_finite=self.check_finite)[0]

    @on_data_device("X")
    def score(self, X) -> float:
        """Mean cosine of the rows of X to their nearest centroid (higher is better)."""
        self._check_fitted()
        X, xp = ops._data(X)
        self._check_columns(X)
        C = on_device_of(to_numpy64(self.cluster_centers_).astype(np.float32), X)
        scores = ops.cosine_assign(X, C, check_finite=self.check_finite)[1]
        return float(to_numpy64(scores).mean()) if X.shape[0] else float("nan")
