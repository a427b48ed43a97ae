"""Plain float64 numpy implementations of every kernel, written for clarity, not speed.
The tests compare the kernels against these; they define the semantics."""

from __future__ import annotations

import numpy as np

from ._arrays import to_numpy64


def _f64(a):
    return None if a is None else to_numpy64(a)


def _row_norm_inverse(M):
    norms = np.linalg.norm(M, axis=1)
    out = np.zeros_like(norms)
    np.divide(1.0, norms, out=out, where=norms > 0)
    return out


def assign(X, C, center=None, row_scale=None, col_scale=None, accumulate=True):
    """Returns (labels, scores, sums, counts) with the semantics of :func:`edpairs.ops.assign`."""
    X, C = _f64(X), _f64(C)
    Xc = X - _f64(center) if center is not None else X
    r = _f64(row_scale) if row_scale is not None else _row_norm_inverse(Xc)
    s = _f64(col_scale) if col_scale is not None else _row_norm_inverse(C)
    S = (Xc @ C.T) * s[None, :]  # (N, k); r_n > 0 does not change the argmax
    N, k = S.shape
    labels = np.argmax(S, axis=1) if k else np.zeros(N, np.int64)  # first maximum: lowest index
    labels = labels.astype(np.int64)
    live = r > 0
    labels[~live] = 0
    scores = np.where(live, r * S[np.arange(N), labels], 0.0)
    if not accumulate:
        return labels, scores, None, None
    sums = np.zeros((k, X.shape[1]))
    np.add.at(sums, labels[live], r[live, None] * Xc[live])
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return labels, scores, sums, counts


def cosine_assign(X, C, center=None, row_scale=None, col_scale=None):
    labels, scores, _, _ = assign(X, C, center, row_scale, col_scale, accumulate=False)
    return labels, scores


def normalize_centroids(sums, counts, previous):
    sums, previous = _f64(sums), _f64(previous)
    counts = np.asarray(_f64(counts)).astype(np.int64)
    # Scaled by each row's largest magnitude first: no overflow (1e200) or underflow (1e-200).
    big = np.abs(sums).max(axis=1, initial=0.0)
    keep = (counts > 0) & (big > 0) & np.isfinite(big)
    scaled = sums[keep] / big[keep, None]
    out = previous.copy()
    out[keep] = scaled / np.linalg.norm(scaled, axis=1)[:, None]
    return out


def spherical_kmeans_step(X, C):
    C = _f64(C)
    labels, _, sums, counts = assign(X, C)
    previous = C * _row_norm_inverse(C)[:, None]
    from .ops import CANCELLED  # members that cancel keep the previous centroid, as in ops

    sums = sums * (np.linalg.norm(sums, axis=1) > CANCELLED * counts)[:, None]
    return normalize_centroids(sums, counts, previous), labels, counts


def moments(X):
    """Returns (n, mean, m2) with m2 = sum (x - mean)(x - mean)^T."""
    X = _f64(X)
    mean = X.mean(axis=0)
    Xc = X - mean
    return X.shape[0], mean, Xc.T @ Xc


def signal_moments(X, W, b, center=None):
    """Returns a dict count, sum_x, sum_z, sum_zz, sum_xz (see edpairs.ops.signal_moments)."""
    X, W, b = _f64(X), _f64(W), _f64(b)
    Z = X @ W - b[None, :]  # (N, I)
    M = Z > 0
    Xc = X - _f64(center) if center is not None else X
    MZ = np.where(M, Z, 0.0)
    return {
        "count": M.sum(axis=0).astype(np.int64),
        "sum_x": M.T.astype(np.float64) @ Xc,
        "sum_z": MZ.sum(axis=0),
        "sum_zz": (MZ * MZ).sum(axis=0),
        "sum_xz": MZ.T @ Xc,
    }
