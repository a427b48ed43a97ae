"""How recovery of concepts is scored against ground truth (DESIGN section 6): detector IoU
with Hungarian matching, cosines of encoding and decoding directions (decoding ones inside the
span of the data), latent-factor RMSE, and :func:`recovery`, the one-stop report on a
:class:`edpairs.synthetic.SyntheticLayer`."""

from __future__ import annotations

import sys
import weakref

import numpy as np

from ._checks import check_indices

__all__ = ["cosines", "data_span", "iou", "latent_rmse", "match", "match_detectors", "recovery"]

# Spans of SyntheticLayer.X already computed (one covariance pass over X each), per layer.
_SPANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _numpy(x, name):
    """A numpy view of x (numpy, torch on any device, or anything np.asarray takes)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        x = x.numpy()
    try:
        x = np.asarray(x)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a numeric array ({exc})") from None
    if x.dtype == object or x.dtype.kind not in "biuf":
        what = "real" if x.dtype.kind == "c" else "numeric"
        raise ValueError(f"{name} must be a {what} array, got dtype {x.dtype}")
    return x


def _finite(x, name):
    """x, after checking it holds no NaN or Inf (they would score as 0, or break an SVD)."""
    if x.dtype.kind in "fc" and not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(x)))} NaN or Inf values "
                         f"in an array of shape {x.shape}")
    return x


def _masks(x, name):
    x = _numpy(x, name)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (N, I) membership matrix, got shape {x.shape}")
    if x.dtype != bool:
        # Scores or probabilities would silently become "nonzero = present": demand a decision.
        if not np.all((x == 0) | (x == 1)):
            raise ValueError(f"{name} must be boolean (or 0/1); threshold scores before scoring")
        x = x.astype(bool)
    return x


def _directions(x, name):
    x = _numpy(x, name)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{name} must be an (I, D) matrix of directions, got shape {x.shape}")
    return _finite(x.astype(np.float64, copy=False), name)


def iou(pred, true) -> np.ndarray:
    """Intersection over union of every predicted detector with every true concept.

    ``pred`` (N, I') and ``true`` (N, I) boolean memberships -> (I', I) float64 matrix;
    0 where both are empty."""
    pred, true = _masks(pred, "pred"), _masks(true, "true")
    if pred.shape[0] != true.shape[0]:
        raise ValueError(f"pred and true must have the same rows, got {pred.shape[0]} and {true.shape[0]}")
    # float64 products count exactly up to 2**53 rows, and use BLAS (integer matmul does not).
    p, t = pred.astype(np.float64), true.astype(np.float64)
    inter = p.T @ t
    union = p.sum(axis=0)[:, None] + t.sum(axis=0)[None, :] - inter
    out = np.zeros_like(inter)
    np.divide(inter, union, out=out, where=union > 0)
    return out


def match(score) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching maximising the total ``score`` of an (I', I) matrix.

    Returns ``(rows, cols)``: estimate ``rows[k]`` is matched to true concept ``cols[k]``,
    ordered by true concept index; ``min(I', I)`` pairs."""
    from scipy.optimize import linear_sum_assignment

    score = _numpy(score, "score").astype(np.float64)
    if score.ndim != 2:
        raise ValueError(f"score must be an (I', I) matrix, got shape {score.shape}")
    if not np.all(np.isfinite(score)):
        raise ValueError("score must be finite")
    rows, cols = linear_sum_assignment(score, maximize=True)
    order = np.argsort(cols, kind="stable")
    return rows[order].astype(np.int64), cols[order].astype(np.int64)


def match_detectors(pred, true) -> dict:
    """Matches detectors to true concepts by IoU.

    Returns ``rows``, ``cols`` (ordered by true concept index), ``iou`` (IoU of each matched
    pair, same order), ``mean_iou`` (sum of matched IoUs over the number of TRUE concepts, so
    a concept no detector is matched to counts as 0) and ``matrix`` (the full IoU matrix)."""
    m = iou(pred, true)
    rows, cols = match(m)
    values = m[rows, cols]
    n_true = m.shape[1]
    return {"rows": rows, "cols": cols, "iou": values,
            "mean_iou": float(values.sum() / n_true) if n_true else float("nan"), "matrix": m}


def _orthonormal_rows(B, name="span"):
    B = _directions(B, name)
    if B.shape[0] == 0:
        return B
    u, s, vt = np.linalg.svd(B, full_matrices=False)
    tol = s.max(initial=0.0) * max(B.shape) * np.finfo(np.float64).eps
    return vt[s > tol]


def _scaled(A):
    """(A's rows divided by their largest magnitudes, those magnitudes (n, 1)): norms of the
    scaled rows neither overflow (rows of 1e300) nor underflow (1e-170)."""
    big = np.abs(A).max(axis=1, keepdims=True, initial=0.0)
    return np.divide(A, big, out=np.zeros_like(A, dtype=np.float64), where=big > 0), big


def _row_norms(A):
    S, big = _scaled(A)
    return np.linalg.norm(S, axis=1, keepdims=True) * big


def _unit_rows(A, scale=None):
    """Rows of A normalised; rows of norm <= 1e-10 * scale (their norm before a projection:
    what is left is rounding, pointing anywhere) become 0."""
    S, big = _scaled(A)
    unit = np.linalg.norm(S, axis=1, keepdims=True)
    floor = 0.0 if scale is None else 1e-10 * scale
    out = np.zeros_like(S)
    np.divide(S, unit, out=out, where=unit * big > floor)
    return out


def cosines(est, true, *, span=None, absolute=True) -> np.ndarray:
    """Cosine of every estimated direction with every true one: (I', D), (I, D) -> (I', I).

    With ``span`` (r, D) (any basis; it is orthonormalised) both sets are first projected
    onto that subspace: a component outside it does not change the result. ``absolute``
    compares up to sign. A zero vector (or one orthogonal to the span) has cosine 0."""
    est, true = _directions(est, "est"), _directions(true, "true")
    if est.shape[1] != true.shape[1]:
        raise ValueError(f"est and true must have the same dimension, got {est.shape[1]} and {true.shape[1]}")
    scale_e = scale_t = None
    if span is not None:
        Q = _orthonormal_rows(span)
        if Q.shape[1] != est.shape[1]:
            raise ValueError(f"span must have {est.shape[1]} columns, got {Q.shape[1]}")
        scale_e, scale_t = _row_norms(est), _row_norms(true)
        est, true = est @ Q.T, true @ Q.T
    c = _unit_rows(est, scale_e) @ _unit_rows(true, scale_t).T
    return np.abs(c) if absolute else c


def data_span(X_or_cov, *, rtol=1e-6, is_covariance=None) -> np.ndarray:
    """Orthonormal basis (r, D) of the span of centred data: eigenvectors of its covariance
    with eigenvalue > ``rtol`` times the largest, by decreasing eigenvalue.

    Takes data (N, D), a covariance (D, D), or an ``edpairs.ops.Moments``. A square input is
    read as a covariance when it is symmetric, unless ``is_covariance`` says otherwise."""
    if hasattr(X_or_cov, "m2") and hasattr(X_or_cov, "mean"):
        cov = _numpy(X_or_cov.m2, "X_or_cov").astype(np.float64)
    else:
        A = _numpy(X_or_cov, "X_or_cov")
        if A.ndim != 2:
            raise ValueError(f"X_or_cov must be (N, D) data or a (D, D) covariance, got shape {A.shape}")
        if is_covariance is None:
            is_covariance = A.shape[0] == A.shape[1] and np.allclose(A, A.T)
        if is_covariance:
            cov = A.astype(np.float64)
        else:
            cov = _scatter(A)
    d = cov.shape[0]
    if not np.all(np.isfinite(cov)):
        raise ValueError("X_or_cov must be finite")
    evals, evecs = np.linalg.eigh(0.5 * (cov + cov.T))
    top = evals[-1] if d else 0.0
    if not top > 0:
        return np.zeros((0, d))
    keep = np.flatnonzero(evals > rtol * top)[::-1]
    return np.ascontiguousarray(evecs[:, keep].T)


def _scatter(X, chunk=16384):
    """Centred scatter matrix of the rows of X in float64, a block of rows at a time."""
    n, d = X.shape
    mean = X.mean(axis=0, dtype=np.float64) if n else np.zeros(d)
    out = np.zeros((d, d))
    for start in range(0, n, chunk):
        block = X[start:start + chunk].astype(np.float64) - mean
        out += block.T @ block
    return out


def latent_rmse(alpha_hat, alpha_true, rows=None, cols=None, *, center=True) -> float:
    """Root-mean-square error of estimated latent factors over matched pairs
    ``alpha_hat[:, rows[k]]`` vs ``alpha_true[:, cols[k]]`` (all rows / columns in order when
    not given), pooled over patches and pairs.

    With ``center`` (default) each column is centred first: a constant shift of a latent
    factor is absorbed by the offset mu and cannot be identified (edpairs reads latents
    centred). Scale is not normalised: express ``alpha_hat`` in units of the true, unit-norm
    encoding direction."""
    a = _finite(_numpy(alpha_hat, "alpha_hat").astype(np.float64, copy=False), "alpha_hat")
    t = _finite(_numpy(alpha_true, "alpha_true").astype(np.float64, copy=False), "alpha_true")
    for name, x in (("alpha_hat", a), ("alpha_true", t)):
        if x.ndim not in (1, 2):
            raise ValueError(f"{name} must be (N,) or 2-D (N, I) latent factors, got shape {x.shape}")
    if a.ndim == 1:
        a = a[:, None]
    if t.ndim == 1:
        t = t[:, None]
    if a.shape[0] != t.shape[0]:
        raise ValueError(f"alpha_hat and alpha_true must have the same rows, got {a.shape[0]} and {t.shape[0]}")
    if rows is None and cols is None:
        if a.shape[1] != t.shape[1]:
            raise ValueError("alpha_hat and alpha_true have different columns: give rows and cols")
        rows = cols = np.arange(a.shape[1])
    elif rows is None or cols is None:
        raise ValueError("give both rows and cols, or neither")
    rows = check_indices(rows, "rows", a.shape[1], "columns in alpha_hat")
    cols = check_indices(cols, "cols", t.shape[1], "columns in alpha_true")
    if rows.shape != cols.shape:
        raise ValueError(f"rows and cols must be 1-D of the same length, got {rows.size} and {cols.size}")
    if rows.size == 0 or a.shape[0] == 0:
        return float("nan")
    a, t = a[:, rows], t[:, cols]
    if center:
        a = a - a.mean(axis=0)
        t = t - t.mean(axis=0)
    return float(np.sqrt(np.mean((a - t) ** 2)))


def _per_true(n_true, cols, values):
    out = np.full(n_true, np.nan)
    out[cols] = values
    return out


def recovery(layer, *, decoding=None, encoding=None, detections=None, latent=None,
             match_by="iou", span=None) -> dict:
    """Scores estimated concepts against a :class:`~edpairs.synthetic.SyntheticLayer`.

    Estimates (any subset, I' concepts each): ``decoding`` (I', D) filters, ``encoding``
    (I', D) signal vectors, ``detections`` (N, I') boolean memberships of ``layer.X``'s rows,
    ``latent`` (N, I') latent factors.

    Matching (Hungarian, one estimate per true concept): ``match_by="iou"`` uses detector IoU
    when ``detections`` are given, else |cos| of encoding directions, else |cos| of decoding
    directions (in the data span); ``"encoding"`` / ``"decoding"`` force that criterion; a
    ``(rows, cols)`` pair is used as given. Matching by |cos| lets a sign-flipped estimate
    find its concept; the reported cosines are then SIGNED, so a flipped direction scores
    -1: a filter that reads a concept negatively detects its absence, which is an error.

    Returns per true concept (length I, NaN for a concept left unmatched when I' < I) and
    mean: ``iou`` / ``mean_iou``, ``cos_encoding`` / ``mean_cos_encoding`` (cos(ŝ_i, s_i)),
    ``cos_decoding`` / ``mean_cos_decoding`` (cos(w_i, w*_i) inside the span of the centred
    data, ``data_span(layer.X)``, or ``span``: filter components outside it change no output
    and cannot be identified), ``latent_rmse`` (per concept) / ``mean_latent_rmse`` (pooled
    over matched concepts; centred, see :func:`latent_rmse`). Means are over all I true
    concepts with unmatched ones scoring 0 (IoU, cosines); the RMSE mean covers matched ones.
    Also ``rows``, ``cols`` (the matching, by true concept index), ``matched_by``,
    ``unmatched`` (true concepts without an estimate). A quantity not estimated is None."""
    needed = ["X", "S"] + [a for a, v in (("W", decoding), ("membership", detections), ("alpha", latent))
                           if v is not None]
    missing = [a for a in needed if getattr(layer, a, None) is None]
    if missing:
        raise TypeError(f"layer must be an edpairs.synthetic.SyntheticLayer (or an object with "
                        f"{', '.join(needed)}), got {type(layer).__name__} without {', '.join(missing)}")
    n, d = layer.X.shape
    n_true = layer.S.shape[0]
    est = {}
    if decoding is not None:
        est["decoding"] = _directions(decoding, "decoding")
    if encoding is not None:
        est["encoding"] = _directions(encoding, "encoding")
    if detections is not None:
        est["detections"] = _masks(detections, "detections")
        if est["detections"].shape[0] != n:
            raise ValueError(f"detections must have {n} rows (one per row of layer.X), "
                             f"got {est['detections'].shape[0]}")
    if latent is not None:
        lat = _finite(_numpy(latent, "latent").astype(np.float64, copy=False), "latent")
        est["latent"] = lat[:, None] if lat.ndim == 1 else lat
        if est["latent"].ndim != 2 or est["latent"].shape[0] != n:
            raise ValueError(f"latent must be ({n}, I'), got shape {est['latent'].shape}")
    if not est:
        raise ValueError("give at least one of decoding, encoding, detections, latent")
    for key in ("decoding", "encoding"):
        if key in est and est[key].shape[1] != d:
            raise ValueError(f"{key} must have {d} columns, got {est[key].shape[1]}")
    counts = {k: (v.shape[1] if k in ("detections", "latent") else v.shape[0]) for k, v in est.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the estimates disagree on the number of concepts: {counts}")

    need_span = "decoding" in est
    if need_span:
        if span is None:
            span = _SPANS.get(layer)
            if span is None:
                span = data_span(layer.X)
                _SPANS[layer] = span
        span = _orthonormal_rows(span)

    cos_enc = cosines(est["encoding"], layer.S, absolute=False) if "encoding" in est else None
    cos_dec = cosines(est["decoding"], layer.W, span=span, absolute=False) if need_span else None
    iou_m = iou(est["detections"], layer.membership) if "detections" in est else None

    if isinstance(match_by, (tuple, list)) and len(match_by) == 2:
        n_est = next(iter(counts.values()))
        rows = check_indices(match_by[0], "match_by rows", n_est, "estimated concepts")
        cols = check_indices(match_by[1], "match_by cols", n_true, "true concepts in layer")
        if rows.shape != cols.shape:  # checked before the reordering below, which would drop the extra
            raise ValueError(f"match_by: rows and cols must have the same length, got {rows.size} and {cols.size}")
        if len(set(cols.tolist())) != cols.size or len(set(rows.tolist())) != rows.size:
            raise ValueError("match_by: rows and cols must pair estimates and true concepts one to one")
        order = np.argsort(cols, kind="stable")
        rows, cols, used = rows[order], cols[order], "given"
    else:
        chain = {"iou": ("iou", "encoding", "decoding"), "encoding": ("encoding",),
                 "decoding": ("decoding",)}.get(match_by) if isinstance(match_by, str) else None
        if chain is None:
            raise ValueError(f"match_by must be 'iou', 'encoding', 'decoding' or (rows, cols), got {match_by!r}")
        scores = {"iou": iou_m, "encoding": None if cos_enc is None else np.abs(cos_enc),
                  "decoding": None if cos_dec is None else np.abs(cos_dec)}
        used = next((c for c in chain if scores[c] is not None), None)
        if used is None:
            raise ValueError(f"match_by={match_by!r} needs "
                             + {"iou": "detections, encoding or decoding", "encoding": "encoding",
                                "decoding": "decoding"}[match_by])
        rows, cols = match(scores[used])

    def per_concept(matrix):
        if matrix is None:
            return None, None
        values = matrix[rows, cols]
        return _per_true(n_true, cols, values), float(values.sum() / n_true)

    out = {"rows": rows, "cols": cols, "matched_by": used,
           "unmatched": np.setdiff1d(np.arange(n_true), cols)}
    out["iou"], out["mean_iou"] = per_concept(iou_m)
    out["cos_encoding"], out["mean_cos_encoding"] = per_concept(cos_enc)
    out["cos_decoding"], out["mean_cos_decoding"] = per_concept(cos_dec)
    if "latent" in est and rows.size:
        a = est["latent"][:, rows]
        t = np.asarray(layer.alpha, dtype=np.float64)[:, cols]
        err = (a - a.mean(axis=0)) - (t - t.mean(axis=0))
        mse = np.mean(err * err, axis=0)
        out["latent_rmse"] = _per_true(n_true, cols, np.sqrt(mse))
        out["mean_latent_rmse"] = float(np.sqrt(mse.mean()))
    else:
        out["latent_rmse"], out["mean_latent_rmse"] = None, None
    return out
