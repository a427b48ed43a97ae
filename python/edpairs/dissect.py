"""Network-Dissection scoring of concept detectors against exact pixel masks (DESIGN section 6):
the IoU of every detector with every concept over a probe set, a label per detector chosen on
one half of the images and its IoU measured on the other, and the summaries
S1 = int_0^1 #{detectors with IoU >= xi} dxi and S2 = int_0^1 #{distinct concepts covered by a
detector with IoU >= xi} dxi.

Choices (the same for every method scored, so that directions are compared, not thresholds):

* Detector maps come at the layer's grid (h, w). The *scores* (before any threshold) are
  upsampled bilinearly to the mask resolution (``align_corners=False``), then thresholded, as
  Network Dissection does. For edpairs the score is the decoded value ``w_i . x`` and the own
  threshold is ``b_i``: at the grid cells ``score > b_i`` is exactly ``membership > 0.5``.
* Thresholds (``rule``): ``"given"`` — the caller's (edpairs' ``b_i``); ``"quantile"`` —
  Network Dissection's top quantile per detector (``P(score > T_k) = quantile`` over the fit
  half's upsampled pixels, classic 0.005); ``"best"`` — per detector the threshold that
  maximises its best IoU with any concept on the fit half (searched over ``bins`` levels of
  its score range). All use only the fit half.
* Validation: images are split into a fit half and a score half (default: even indices fit,
  odd score). Thresholds and each detector's concept (the argmax of its fit-half IoU) come from
  the fit half; the reported IoUs are the score half's.
* With every detector's validation IoU ``u_k`` with its concept ``c_k``: S1 = sum_k u_k and
  S2 = sum_c max_{k: c_k = c} u_k (the integrals of step functions, exactly).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np

from ._checks import check_indices, check_int, check_real, is_int

__all__ = ["Dissection", "dissect", "iou_matrix", "s_scores", "upsample"]


@dataclasses.dataclass
class Dissection:
    """The result of :func:`dissect` for K detectors and C concepts.

    ``iou`` (K, C): score-half IoU of each detector with each concept at its threshold;
    ``iou_fit`` (K, C): the same on the fit half; ``thresholds`` (K,); ``best_concept`` (K,)
    index of the concept each detector is labelled with (chosen on the fit half);
    ``best_iou`` (K,) its score-half IoU; ``concepts``: the names; ``summary``: ``{"S1", "S2",
    "rule", "n_fit", "n_score", "concepts_covered" ...}``."""

    iou: np.ndarray
    iou_fit: np.ndarray
    thresholds: np.ndarray
    best_concept: np.ndarray
    best_iou: np.ndarray
    concepts: tuple
    summary: Dict

    @property
    def labels(self):
        """The concept name each detector is labelled with."""
        return [self.concepts[c] for c in self.best_concept]

    def table(self):
        """Rows ``(detector, concept, validation IoU)``, best first."""
        order = np.argsort(-self.best_iou, kind="stable")
        return [(int(k), self.concepts[self.best_concept[k]], float(self.best_iou[k])) for k in order]


def s_scores(best_iou, best_concept, n_concepts: Optional[int] = None) -> Dict[str, float]:
    """S1 and S2 from each detector's IoU with its concept: S1 = int_0^1 #{k: u_k >= xi} dxi
    = sum_k u_k; S2 = int_0^1 #{c: some k with c_k = c has u_k >= xi} dxi = sum over concepts
    of the largest u_k labelled with it (IoUs clipped to [0, 1])."""
    u = np.clip(np.asarray(best_iou, dtype=np.float64).ravel(), 0.0, 1.0)
    c = np.asarray(best_concept, dtype=np.int64).ravel()
    if u.shape != c.shape:
        raise ValueError(f"best_iou and best_concept must have the same length, got {u.shape} and {c.shape}")
    n = int(c.max()) + 1 if n_concepts is None and c.size else int(n_concepts or 0)
    if c.size and (c.min() < 0 or c.max() >= max(n, 1)):
        raise ValueError(f"best_concept must hold concept indices in [0, {max(n, 1)}), got values in "
                         f"[{c.min()}, {c.max()}]")
    per_concept = np.zeros(max(n, 1))
    np.maximum.at(per_concept, c, u)
    return {"S1": float(u.sum()), "S2": float(per_concept.sum())}


def _as_maps(maps) -> np.ndarray:
    a = maps.detach().cpu().numpy() if hasattr(maps, "detach") else np.asarray(maps)
    if a.ndim == 3:  # (n, P, K) with a square grid
        side = int(round(np.sqrt(a.shape[1])))
        if side * side != a.shape[1]:
            raise ValueError(f"maps (n, P, K) need a square grid P, got {a.shape}")
        a = a.reshape(a.shape[0], side, side, a.shape[2])
    if a.ndim != 4:
        raise ValueError(f"maps must be (n, h, w, K) channel-last scores, got shape {a.shape}")
    if a.dtype.kind not in "fiub":
        raise TypeError(f"maps must hold real scores, got dtype {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.isfinite(a).all():
        raise ValueError("maps contain NaN or Inf (or values beyond the float32 range): a detector's score must "
                         "be a finite number at every position")
    return a


def _as_masks(masks) -> np.ndarray:
    """Boolean masks from a bool array or one holding exactly 0 and 1 (numpy or torch): scores or
    probabilities would otherwise turn into "nonzero = in" (NaN too), so they are refused."""
    a = masks.detach().cpu().numpy() if hasattr(masks, "detach") else np.asarray(masks)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "iuf":
        raise TypeError(f"masks must be boolean (or 0/1) pixel masks (n, n_concepts, H, W), got dtype {a.dtype}")
    is_01 = (a == 0) | (a == 1)
    if not is_01.all():
        bad = a[~is_01].ravel()[0]
        raise ValueError(f"masks must be boolean (or 0/1) pixel masks, got {a.dtype} values other than 0 and 1 "
                         f"(e.g. {bad.item()!r}): threshold scores or probabilities into a decision first")
    return a.astype(bool)


def upsample(maps, size) -> np.ndarray:
    """Bilinear upsampling (``align_corners=False``) of channel-last score maps (n, h, w, K) to
    (n, K, H, W) float32 — torch's ``F.interpolate``, the convention of Network Dissection's
    upsampled activations."""
    a = _as_maps(maps)
    dims = (size, size) if np.isscalar(size) else tuple(size)
    H, W = dims if len(dims) == 2 else (None, None)
    if not all(is_int(v) and v >= 1 for v in (H, W)):
        raise ValueError(f"size must be a positive integer or an (H, W) pair of them, got {size!r}")
    return _upsample(a, H, W)


def _upsample(a: np.ndarray, H: int, W: int) -> np.ndarray:
    """upsample of checked float32 maps (n, h, w, K) to (H, W)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    if x.shape[2:] == (H, W):
        return x.numpy()
    return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False).numpy()


def _counts(maps, masks, thresholds, images, batch_size):
    """Exact (K, C) intersections, (K,) detections and (C,) mask pixels of ``score > threshold``."""
    K, C = maps.shape[3], masks.shape[1]
    inter = np.zeros((K, C), np.float64)
    det = np.zeros(K, np.float64)
    area = np.zeros(C, np.float64)
    t = np.asarray(thresholds, np.float32)[None, :, None, None]
    for s in range(0, len(images), batch_size):
        idx = images[s:s + batch_size]
        up = _upsample(maps[idx], *masks.shape[2:])  # (b, K, H, W)
        d = (up > t).transpose(1, 0, 2, 3).reshape(K, -1).astype(np.float32)
        m = masks[idx].transpose(1, 0, 2, 3).reshape(C, -1).astype(np.float32)
        inter += d @ m.T
        det += d.sum(1)
        area += m.sum(1)
    return inter, det, area


def iou_matrix(maps, masks, thresholds, images=None, *, batch_size: int = 16) -> np.ndarray:
    """(K, C) IoU of each detector (``upsample(maps) > thresholds``) with each concept mask
    (n, C, H, W) (bool, or exactly 0 / 1), pooled over the images (all, or the given indices):
    |A & B| / |A | B|, 0 where both are empty."""
    maps = _as_maps(maps)
    masks = _as_masks(masks)
    _check(maps, masks, batch_size)
    images = np.arange(len(maps)) if images is None else check_indices(images, "images", len(maps), "images", mask=True)
    return _iou(maps, masks, _thresholds(thresholds, maps.shape[3]), images, batch_size)


def _iou(maps, masks, t, images, batch_size) -> np.ndarray:
    """iou_matrix of checked inputs: maps (n, h, w, K) float32, masks bool, t (K,) float32."""
    inter, det, area = _counts(maps, masks, t, images, batch_size)
    union = det[:, None] + area[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _check(maps, masks, batch_size):
    if masks.ndim != 4:
        raise ValueError(f"masks must be (n, n_concepts, H, W) bool, got shape {masks.shape}")
    if maps.shape[0] != masks.shape[0]:
        raise ValueError(f"maps and masks must have the same number of images, got {maps.shape[0]} and {masks.shape[0]}")
    if maps.shape[3] == 0 or masks.shape[1] == 0 or 0 in masks.shape[2:] or 0 in maps.shape[1:3]:
        raise ValueError(f"maps (n, h, w, K) and masks (n, C, H, W) need at least one detector, concept and pixel, "
                         f"got maps {maps.shape} and masks {masks.shape}")
    check_int("batch_size", batch_size)


def _thresholds(thresholds, K: int) -> np.ndarray:
    """(K,) float32 detection thresholds from one number or K of them."""
    t = np.asarray(thresholds, dtype=np.float32)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, K)):
        raise ValueError(f"thresholds must be one number or one per detector ({K}), got shape {t.shape}")
    if np.isnan(t).any():
        raise ValueError("thresholds must be numbers, got NaN")
    return np.broadcast_to(t, (K,)).copy()


def _histograms(maps, masks, lo, hi, bins, images, batch_size):
    """Per detector, histograms over ``bins`` levels of its range [lo, hi] of all upsampled
    scores (K, bins) and of those on each concept's pixels (K, C, bins)."""
    K, C = maps.shape[3], masks.shape[1]
    every = np.zeros(K * bins, np.int64)
    on = np.zeros(K * C * bins, np.int64)
    scale = (bins / np.maximum(hi - lo, 1e-30)).astype(np.float32)[:, None]
    kb = (np.arange(K) * bins)[:, None]
    for s in range(0, len(images), batch_size):
        idx = images[s:s + batch_size]
        up = _upsample(maps[idx], *masks.shape[2:]).transpose(1, 0, 2, 3).reshape(K, -1)
        b = np.clip(((up - lo[:, None].astype(np.float32)) * scale).astype(np.int64), 0, bins - 1)
        every += np.bincount((b + kb).ravel(), minlength=K * bins)
        m = masks[idx].transpose(1, 0, 2, 3).reshape(C, -1)
        for c in range(C):
            sel = b[:, m[c]]  # (K, n_c)
            on += np.bincount((sel + (kb * C + c * bins)).ravel(), minlength=K * C * bins)
    return every.reshape(K, bins), on.reshape(K, C, bins)


def dissect(maps, masks, concepts: Optional[Sequence[str]] = None, *, rule: str = "best", thresholds=None,
            quantile: float = 0.005, fit=None, bins: int = 512, batch_size: int = 16) -> Dissection:
    """Network-Dissection scores of K detectors against C concepts.

    ``maps``: per-image detector scores at the layer's grid, channel-last (n, h, w, K) (or
    (n, h*w, K) for a square grid), e.g. ``pairs.decode(X)`` reshaped. ``masks``: (n, C, H, W)
    bool (a :class:`edpairs.probe.ProbeSet`'s), or numbers exactly 0 / 1 (anything else, NaN
    included, is refused: threshold scores first). ``rule``: ``"given"`` (``thresholds`` (K,):
    detection is ``score > threshold``), ``"quantile"`` (top ``quantile`` of each detector's
    upsampled fit-half scores) or ``"best"`` (the threshold maximising the detector's best
    fit-half IoU). ``fit``: the fit half, a boolean (n,) mask or indices (default: even
    images); the others are scored. See the module docstring for why."""
    maps = _as_maps(maps)
    masks = _as_masks(masks)
    _check(maps, masks, batch_size)
    check_int("bins", bins)
    n, K, C = maps.shape[0], maps.shape[3], masks.shape[1]
    if isinstance(concepts, str):
        raise TypeError(f"concepts must be a sequence of {C} names, got one string {concepts!r}")
    concepts = tuple(concepts) if concepts is not None else tuple(f"concept{c}" for c in range(C))
    if len(concepts) != C:
        raise ValueError(f"{len(concepts)} concept names for masks with {C} concepts")
    if fit is None:
        fit_mask = np.arange(n) % 2 == 0
    else:
        fit_mask = np.zeros(n, bool)
        fit_mask[check_indices(fit, "fit", n, "images", mask=True)] = True
    fit_idx, score_idx = np.flatnonzero(fit_mask), np.flatnonzero(~fit_mask)
    if len(fit_idx) == 0 or len(score_idx) == 0:
        raise ValueError(f"both halves need images: {len(fit_idx)} fit, {len(score_idx)} score")
    if rule == "given":
        if thresholds is None:
            raise ValueError('rule="given" needs thresholds (K,)')
        t = _thresholds(thresholds, K)
    elif rule in ("quantile", "best"):
        # Bilinear interpolation is a convex combination: the grid's range is the upsampled range.
        fm = maps[fit_idx].reshape(-1, K)
        lo, hi = fm.min(0).astype(np.float64), fm.max(0).astype(np.float64)
        every, on = _histograms(maps, masks, lo, hi, bins, fit_idx, batch_size)
        edges = lo[:, None] + (hi - lo)[:, None] * np.arange(bins)[None, :] / bins  # lower edge of each bin
        above = np.cumsum(every[:, ::-1], axis=1)[:, ::-1]  # (K, bins): scores in bins >= j
        if rule == "quantile":
            check_real("quantile", quantile, "in (0, 1)", lambda v: 0 < v < 1)
            under = above <= quantile * every.sum(1, keepdims=True)
            j = np.where(under.any(1), np.argmax(under, axis=1), bins - 1)  # first bin edge with <= q above
        else:
            tp = np.cumsum(on[:, :, ::-1], axis=2)[:, :, ::-1]  # (K, C, bins)
            area = on.sum(2, keepdims=True)
            union = above[:, None, :] + area - tp
            iou = np.divide(tp, union, out=np.zeros(tp.shape), where=union > 0)
            j = np.argmax(iou.max(1), axis=1)
        # Detection is score > t: taking t just below the bin's lower edge keeps that bin.
        t = np.nextafter(edges[np.arange(K), j].astype(np.float32), np.float32(-np.inf))
    else:
        raise ValueError(f'rule must be "given", "quantile" or "best", got {rule!r}')
    iou_fit = _iou(maps, masks, t, fit_idx, batch_size)
    iou = _iou(maps, masks, t, score_idx, batch_size)
    best_concept = np.argmax(iou_fit, axis=1)
    best_iou = iou[np.arange(K), best_concept]
    summary = s_scores(best_iou, best_concept, C)
    summary.update(rule=rule, n_fit=int(len(fit_idx)), n_score=int(len(score_idx)), n_detectors=K,
                   concepts_covered=sorted({concepts[c] for c in best_concept[best_iou > 0]}),
                   mean_iou=float(best_iou.mean()))
    return Dissection(iou, iou_fit, t, best_concept, best_iou, concepts, summary)
