"""Global influence of concepts on a network's classes (DESIGN section 3): perturb a layer along
each encoding direction and count, per class, how often the class probability rises
(RCAV-style sign-test score), with significance against noise directions from label-permuted
detectors, Bonferroni-corrected over concepts x classes.

Definitions (what :func:`influence` computes):

* Perturbation. For concept ``i`` with encoding direction ``s_i`` and filter ``w_i``, every
  position of every image moves by ``delta_i = strength * s_i / (w_i . s_i)``: ``strength`` is in
  units of the concept's latent factor (the decoded value ``w_i . x`` rises by exactly
  ``strength``). For :class:`edpairs.EDPairs` (unit ``s_i``, gain-1 filters) this is
  ``strength * s_i``, a step of Euclidean length ``strength``.
* Score. ``score[i, k] = (n_up - n_down) / n`` over the ``n`` images scored for class ``k``,
  where an image counts as up (down) when its log-probability of class ``k`` (log-softmax of the
  head's logits, float64) is higher (lower) after the perturbation; ties count neither. Without
  ties this is ``2 * (fraction of images whose class-k probability rises) - 1``, in [-1, 1].
  ``labels=None`` scores every class on all images; with ``labels`` (one class per image) class
  ``k`` is scored on the images of class ``k`` only (the TCAV / RCAV convention).
* Null. For each concept, ``n_noise`` noise directions, each the encoding direction of a
  detector fitted on label-permuted data: the concept's hard memberships (``detect > 0.5``) on
  a row sample of the patches (at most ``max_rows``, images x positions) are shuffled across
  those patches; a detector is fitted to the shuffled labels by the closed-form discriminant
  ``w = Cov^+ (mean_P - mean_N)`` (P the shuffled positives, N the rest, Cov the sample's
  covariance); its encoding direction is the stage-4 positives-only estimator
  ``Cov_P(x, z) / Var_P(z)``, ``z = w . x``, over P. Each is scaled to the Euclidean length of the
  concept's own step and scored like it.
* p-values. ``pvalue="normal"`` (default): two-sided, from a normal fit to the cell's noise
  scores, ``z = (score - mean) / sd`` (``sd`` the sample sd), in the cells where that fit is
  justified (the rule below). In the other cells, and in every cell with ``pvalue="empirical"``:
  ``(1 + #{noise with |score - mean| >= |observed - mean|}) / (n_noise + 1)``, valid for any null
  but never below ``1 / (n_noise + 1)``: with 100 noise directions Bonferroni over more than five
  tests can never call it significant, hence the parametric fit where it holds. Bonferroni:
  ``p_adj = min(1, p * I * K)`` over the whole family, whichever test each cell used; significant
  when ``p_adj < alpha``. The result says per cell which test was used and why (``tests``,
  ``test_reasons``) and sums it up in one sentence (``test_note``).
* When the normal fit is justified. A score is a net count of images, ``(n_up - n_down) / n``: a
  lattice of step ``1 / n`` bounded by [-1, 1] (``n`` the images scored for the class). Its noise
  scores are described by a normal only under the conditions a binomial count's normal
  approximation needs, checked per cell:

  1. spread: ``sd * n >= MIN_NULL_SPREAD`` (3): the noise scores' sd spans at least three
     images of net count (variance >= 9 in counts, the textbook ``n p (1 - p) >= 9``). Below
     that the null is a handful of lattice values, or one when no noise direction moves any
     image (as on a layer with a margin); a normal fitted to it says nothing about its tail (an
     earlier floor ``sd >= 1 / n`` turned such a null into ``|z|`` up to ``2 n``: p = 0 at 2,000
     images).
  2. room: ``|mean| + NULL_ROOM_SD * sd <= 1`` (3 sd): the fitted normal lies inside the
     scores' range (the textbook ``n p +- 3 sqrt(n p (1 - p))`` inside ``[0, n]``). Noise scores
     crowded against -1 or 1 are censored there and skewed, their long tail pointing away from
     the bound, where an observed score of the other sign lies: there the normal tail is far too
     thin. A null wider than sd 1/3 fails too, at little cost: its ``|z|`` is below
     ``3 (1 + |mean|)`` anyway.

  Together they rule out fewer than 9 images (``3 / n <= sd <= 1 / 3``). A user trial on 14
  images (EfficientNet-Lite0, 50 noise directions) had a cell whose noise scores all lay in
  {-1, -6/7, -5/7, -4/7} (sd 0.097: 1.4 images), observed score 1, z = 19, p_adj = 4.6e-77, and
  23 of 176 cells "significant", none with the empirical p-value; rule 2 flags all 23, rule 1
  20 of them. Cells that fail use the empirical p-value, which needs ``n_noise >= I * K /
  alpha`` directions to reach significance (``test_note`` gives the number). The rules are
  necessary, not sufficient: a normal tail read far beyond every noise score is an
  extrapolation, so a p-value far below ``alpha / (I K)`` says "beyond every noise direction",
  not its digits.
* How many noise directions. The normal fit rests on their spread: use tens of them (100 by
  default); with a handful the spread is underestimated and far too many cells come out
  significant. So the normal fit needs at least ``MIN_NOISE_NORMAL`` (10) of them and fewer are
  refused: for normal noise scores the sample sd of ``m`` of them falls below half the true one
  with probability ``P(chi2_{m-1} < (m-1)/4)``, 38 % at m = 2, 9 % at m = 5, 1.3 % at m = 10; a
  halved sd doubles every z, which moves a cell at z = 1.7 past the Bonferroni threshold of a
  20-cell family (z = 3.0). (With one direction the sd is 0: p-values near 1e-57 were reported.)
  The empirical p-value is valid with any number.

When the test has power (measured on synthetic layers with known heads, bench_influence.py).
The sign test counts every image that moves, however little, so a noise direction is quiet only
where it moves no image at all. On a head linear in the layer (the synthetic
:class:`edpairs.synthetic.LinearHead`) the logits move by the same vector for every image, so every
direction, noise included, moves a class's probability the same way on all images: noise scores
spread over [-1, 1] (sd 0.6-0.9) and nothing is significant. Smooth detectors
(:class:`edpairs.synthetic.PresenceHead` with ``detector="sigmoid"``) never leave an image
untouched either (sd ~0.8). Ramp detectors (the PresenceHead default, flat away from the
threshold) leave an image untouched when a direction's projection on every filter stays inside
the margin between the patches and the thresholds: on a layer with such a margin and concepts a
small share of the variance every cell was significant with the head's sign (null sd ~0.04); on
the published and large presets (no margin; on the published one the label-permuted directions
are concept mixtures of the step's own size) nothing was, though the scores' signs matched the
head wherever the pairs' steps move mainly their own concept. On the margin layer a concept's
noise can also move no image at all (every noise score 0, most often with 20 directions, now
and then with 100): such a cell gets the empirical p-value, and its 9-cell family then needs
180 noise directions (tests/test_influence.py).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np

from ._arrays import to_host
from ._arrays import to_numpy64 as _host
from ._checks import check_fitted, check_int, check_real, is_int
from ._io import make_folder, write_atomic

__all__ = ["InfluenceResult", "influence", "plot_influence", "noise_directions"]

MIN_NOISE_NORMAL = 10  # noise directions the normal p-value needs (module docstring)
MIN_NULL_SPREAD = 3.0  # images of net count the noise scores' sd must span for the normal fit
NULL_ROOM_SD = 3.0     # the fitted normal's mean +- this many sd must lie inside [-1, 1]
MIN_NOISE_ROWS = 4     # rows a label-permuted detector needs: at least 2 positives and 2 negatives


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


@dataclass
class InfluenceResult:
    """Influence of each concept (rows) on each class (columns).

    ``scores`` (I, K) RCAV sign-test scores in [-1, 1]; ``pvalues`` / ``pvalues_adjusted``
    (Bonferroni over I x K) and ``significant`` (I, K); ``null_mean`` / ``null_std`` (I, K) and
    ``null_scores`` (I, n_noise, K) of the noise directions; ``n_scored`` (K,) images scored per
    class; ``concepts`` / ``classes`` names and ``class_indices`` (the head's index of each
    column); the settings used. Which test gave each p-value: ``tests`` (I, K) ``"normal"``,
    ``"empirical"`` or ``"none"`` (no noise directions), ``test_reasons`` (I, K) why (empty for
    the normal fit), and ``test_note``, one sentence for the whole family (module docstring)."""

    scores: np.ndarray
    pvalues: np.ndarray
    pvalues_adjusted: np.ndarray
    significant: np.ndarray
    null_mean: np.ndarray
    null_std: np.ndarray
    null_scores: np.ndarray
    n_scored: np.ndarray
    concepts: List[str]
    classes: List[str]
    strength: float
    alpha: float
    pvalue: str
    settings: dict = field(default_factory=dict)
    class_indices: List[int] = field(default_factory=list)
    tests: Optional[np.ndarray] = None
    test_reasons: Optional[np.ndarray] = None
    test_note: str = ""

    def to_records(self) -> List[dict]:
        """One dict per (concept, class): concept, class, score, p, p_adjusted, significant,
        test (and test_reason), null_mean, null_std, n_images — a tidy table."""
        rows = []
        for i, c in enumerate(self.concepts):
            for k, name in enumerate(self.classes):
                index = self.class_indices[k] if self.class_indices else k
                rows.append(dict(concept=c, concept_index=i, class_=name, class_index=index,
                                 score=float(self.scores[i, k]), p=float(self.pvalues[i, k]),
                                 p_adjusted=float(self.pvalues_adjusted[i, k]),
                                 significant=bool(self.significant[i, k]),
                                 test=None if self.tests is None else str(self.tests[i, k]),
                                 test_reason=None if self.test_reasons is None else str(self.test_reasons[i, k]),
                                 null_mean=float(self.null_mean[i, k]), null_std=float(self.null_std[i, k]),
                                 n_images=int(self.n_scored[k])))
        return rows

    def to_pandas(self):
        """The tidy table as a pandas DataFrame (column ``class`` for the class name)."""
        try:
            import pandas as pd
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("to_pandas needs pandas (pip install pandas); to_records() needs nothing") from exc
        return pd.DataFrame(self.to_records()).rename(columns={"class_": "class"})

    def __repr__(self) -> str:
        I, K = self.scores.shape
        return (f"InfluenceResult(concepts={I}, classes={K}, significant={int(self.significant.sum())}, "
                f"strength={self.strength}, alpha={self.alpha}, pvalue={self.pvalue!r})")


# ---- noise directions --------------------------------------------------------------------
def noise_directions(X, memberships, n_noise: int, *, rng, rcond: float = 1e-6) -> np.ndarray:
    """Unit encoding directions of detectors fitted on label-permuted data (see the module
    docstring): X (N, D) patches, memberships (N,) bool of one concept. Returns (n_noise, D)."""
    X = np.asarray(X, dtype=np.float64)
    N, D = X.shape
    n_pos = int(np.clip(int(np.asarray(memberships).sum()), 2, max(N - 2, 2)))
    mean = X.mean(0)
    Xc = X - mean
    cov = Xc.T @ Xc / max(N - 1, 1)
    cov_pinv = np.linalg.pinv(cov, rcond=rcond, hermitian=True)
    # Shuffled labels: each row of M picks n_pos random patches as positives.
    M = np.zeros((n_noise, N))
    for j in range(n_noise):
        M[j, rng.choice(N, n_pos, replace=False)] = 1.0
    mean_P = M @ Xc / n_pos                                  # (n_noise, D), relative to the mean
    mean_N = -mean_P * n_pos / (N - n_pos)                   # the rest sum to minus the positives
    Wn = (mean_P - mean_N) @ cov_pinv                        # discriminant filters (cov is symmetric)
    Z = Xc @ Wn.T                                            # (N, n_noise) decoded values
    zbar = (M * Z.T).sum(1) / n_pos                          # (n_noise,) mean of z over P
    Zc = (Z - zbar) * M.T                                    # centred over P, 0 elsewhere
    var_z = (Zc * Zc).sum(0)                                 # (n_noise,)
    S = (Xc.T @ Zc).T / np.maximum(var_z, 1e-300)[:, None]   # Cov_P(x, z) / Var_P(z)
    norms = np.linalg.norm(S, axis=1, keepdims=True)
    return S / np.maximum(norms, 1e-300)


# ---- argument checks ---------------------------------------------------------------------
def _index_list(v, name: str, size: int, of: str, *, out_of_range=ValueError) -> np.ndarray:
    """``v`` as distinct int64 indices in [0, size) of ``size`` ``of``: one integer (read as
    ``[v]``), or a sequence or integer array (numpy, torch) of them. Floats are refused, not
    truncated; bools, not read as indices 0 / 1 nor as a mask; negatives, not wrapped."""
    if is_int(v):
        a = np.array([int(v)], dtype=np.int64)
    elif hasattr(v, "shape") and hasattr(v, "dtype"):  # numpy, torch (any device), cupy
        a = to_host(v)
        if a.size and a.dtype.kind not in "iu":
            raise TypeError(f"{name} must be integer {of} indices, got an array of dtype {a.dtype}")
        if a.ndim > 1:
            raise ValueError(f"{name} must be a 1-D list of {of} indices, got shape {a.shape}")
        a = a.astype(np.int64).reshape(-1)
    else:
        items = None
        if not isinstance(v, (str, bytes)):
            try:
                items = list(v)
            except TypeError:
                pass
        if items is None:
            raise TypeError(f"{name} must be a {of} index (int) or a sequence of them, got "
                            f"{type(v).__name__} {v!r:.60}")
        bad = [x for x in items if not is_int(x)]
        if bad:
            raise TypeError(f"{name} must hold integer {of} indices, got {bad[0]!r} ({type(bad[0]).__name__})")
        a = np.array([int(x) for x in items], dtype=np.int64)
    shown = a.tolist()[:10]
    if a.size == 0:
        raise ValueError(f"{name} must name at least one {of} (of {size}), got none")
    if a.min() < 0 or a.max() >= size:
        raise out_of_range(f"{name} must be distinct {of} indices in [0, {size}), got {shown}")
    if len(np.unique(a)) != a.size:
        raise ValueError(f"{name} must be distinct {of} indices in [0, {size}), got {shown} (repeated)")
    return a


def _labels(labels, n: int, K: int) -> np.ndarray:
    """(n,) int64 classes in [0, K), one per image, from integer labels (numpy, torch, list)."""
    a = to_host(labels) if hasattr(labels, "shape") and hasattr(labels, "dtype") else np.asarray(labels)
    if a.size != n or a.ndim > 2 or (a.ndim == 2 and 1 not in a.shape):
        raise ValueError(f"labels must hold one class in [0, {K}) per image ({n} images), got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"labels must be integer class indices in [0, {K}), one per image, got dtype {a.dtype}")
    a = a.astype(np.int64).reshape(-1)
    if a.min() < 0 or a.max() >= K:
        raise ValueError(f"labels must hold one class in [0, {K}) per image ({n} images), got values from "
                         f"{a.min()} to {a.max()}")
    return a


def _names(names, count: int, what: str, of: str):
    """``names`` (one per item, ``count`` of ``of``) as a list, else an error naming ``what``."""
    if names is None:
        return None
    if isinstance(names, (str, bytes)):
        raise TypeError(f"{what} must be a sequence of {count} names (one each of the {of}), got one string "
                        f"{names!r:.40}")
    names = list(names)
    if len(names) != count:
        raise ValueError(f"{what} has {len(names)} names for {count} {of}")
    return names


def _check_features(features, D: int):
    """features as a numpy array (or the torch tensor itself), checked: channel-last, floating,
    at least one image, ``D`` channels, finite."""
    torch_features = _is_torch(features)
    expected = ("the images' channel-last layer activations (n_images, h, w, D), (n_images, L, D) or "
                f"(n_images, D), numpy or torch, with the pairs' D={D} channels last")
    if not torch_features:
        if not hasattr(features, "shape"):
            raise ValueError(f"features must be {expected}; got {type(features).__name__}")
        features = np.asarray(features)
    shape = tuple(features.shape)
    if len(shape) < 2:
        raise ValueError(f"features must be {expected}; got shape {shape}")
    if int(shape[-1]) != D:
        raise ValueError(f"the pairs have D={D} channels but features have shape {shape} (channel-last expected)")
    floating = features.is_floating_point() if torch_features else features.dtype.kind == "f"
    if not floating:
        # An integer array would round every step (strength * s_i) to whole numbers.
        raise TypeError(f"features must be floating-point activations, got dtype {features.dtype}")
    n = int(shape[0])
    if n < 1:
        raise ValueError(f"features must hold at least one image, got shape {shape}")
    per_image = max(1, int(np.prod(shape[1:])))
    step = max(1, (1 << 24) // per_image)  # bounded temporaries: the check reads the features once
    for start in range(0, n, step):
        part = features[start:start + step]
        if torch_features:
            ok = sys.modules["torch"].isfinite(part).reshape(part.shape[0], -1).all(1).cpu().numpy()
        else:
            ok = np.isfinite(part).reshape(part.shape[0], -1).all(1)
        if not ok.all():
            raise ValueError(f"features contain NaN or Inf (first in image {start + int(np.argmin(ok))}): every "
                             f"activation must be a finite number (the scores would all be NaN)")
    return features


# ---- scoring -----------------------------------------------------------------------------
class _Scorer:
    """Evaluates the head on the features shifted by one vector, in batches of images, and
    scores each direction: per scored class, the sum over images (weighted by ``masks``) of the
    sign of the change of the class's log-probability. With torch features the work stays on
    their device: the step goes up once per direction, log-probabilities (float64) and signs are
    formed there, and one (K,) vector of sums comes down per direction (signs are -1, 0 or 1,
    so their float64 sums are exact and the same on every device)."""

    def __init__(self, head, features, batch_size: int):
        self.head, self.features, self.batch_size = head, features, batch_size
        self.torch = sys.modules["torch"] if _is_torch(features) else None
        self.base = None
        self.base = self._log_probs(None)  # (n, K_all) float64, on the features' device
        self.cols = self.masks = None      # the scored classes (all when None); (n, K) weights

    def base_host(self) -> np.ndarray:
        return _host(self.base)

    def score_on(self, cols, masks: Optional[np.ndarray]) -> None:
        """Scores the classes ``cols`` (all, in order: no column selection per batch) with the
        (n, K) weights ``masks`` (None: all 1)."""
        if cols is not None and np.array_equal(cols, np.arange(self.base.shape[1])):
            cols = None
        self.cols, self.masks = cols, masks
        if self.torch is not None:
            device = self.base.device
            self.cols = None if cols is None else self.torch.as_tensor(cols, device=device)
            self.masks = None if masks is None else self.torch.as_tensor(masks, device=device)
        self.base_scored = self.base if self.cols is None else self.base[:, self.cols]

    def _log_softmax(self, logits):
        if self.torch is not None:  # (float64 from _logits)
            top = logits.max(dim=1, keepdim=True).values
            return logits - top - (logits - top).exp().sum(dim=1, keepdim=True).log()
        top = logits.max(axis=1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))

    def _logits(self, f):
        if self.torch is None:
            return _host(self.head(f))
        with self.torch.no_grad():
            out = self.head(f)
        if not isinstance(out, self.torch.Tensor):
            out = self.torch.as_tensor(np.asarray(out), device=f.device)
        return out.to(self.torch.float64)

    def _batches(self, delta):
        """(start, log-probabilities) of each batch of images shifted by delta."""
        n = int(self.features.shape[0])
        if delta is not None:
            delta = (self.torch.as_tensor(delta, dtype=self.features.dtype, device=self.features.device)
                     if self.torch is not None else delta.astype(self.features.dtype, copy=False))
        for start in range(0, n, self.batch_size):
            f = self.features[start:start + self.batch_size]
            if delta is not None:
                f = f + delta
            try:
                logits = self._logits(f)
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                if self.base is not None or "out of memory" in str(exc).lower():
                    raise
                # The first call: most often features of another rank or layout than the head takes.
                raise ValueError(
                    f"the head failed on the first batch of features, of shape {tuple(f.shape)} "
                    f"({type(exc).__name__}: {exc}). head must map the layer's channel-last features to "
                    f"(n_images, n_classes) logits (e.g. split_model(model, layer).head), and features "
                    f"must be that layer's activations in the rank the head takes: (n, h, w, D) for a map, "
                    f"(n, L, D) for tokens, (n, D) for vectors") from exc
            if logits.ndim != 2 or logits.shape[0] != f.shape[0]:
                raise ValueError(f"head must return (n_images, n_classes) logits, got shape {tuple(logits.shape)} "
                                 f"for {f.shape[0]} images")
            if self.base is not None and logits.shape[1] != self.base.shape[1]:
                raise ValueError(f"head returned {logits.shape[1]} classes for shifted features and "
                                 f"{self.base.shape[1]} for the unshifted ones")
            yield start, self._log_softmax(logits)

    def _log_probs(self, delta):
        parts = [lp for _, lp in self._batches(delta)]
        return self.torch.cat(parts) if self.torch is not None else np.concatenate(parts)

    def sign_sums(self, delta) -> np.ndarray:
        """(K,) float64: per scored class, the (mask-weighted) sum of the signs over images."""
        total = 0
        for start, lp in self._batches(delta):
            if self.cols is not None:
                lp = lp[:, self.cols]
            d = lp - self.base_scored[start:start + lp.shape[0]]
            signs = d.sign() if self.torch is not None else np.sign(d)
            if self.masks is not None:
                signs = signs * self.masks[start:start + lp.shape[0]]
            total = total + signs.sum(0)
        return _host(total)


# ---- which test --------------------------------------------------------------------------
def _normal_fit_fails(mean, sd, n_scored):
    """The two checks of the normal fit (module docstring), per cell: ``few`` (I, K) where the
    noise scores spread over fewer than MIN_NULL_SPREAD images of net count, ``crowded`` where
    the fitted normal leaves [-1, 1] (|mean| + NULL_ROOM_SD sd > 1)."""
    spread = sd * np.asarray(n_scored, dtype=np.float64)[None, :]
    few = ~(spread >= MIN_NULL_SPREAD - 1e-9)
    crowded = ~(np.abs(mean) + NULL_ROOM_SD * sd <= 1.0 + 1e-9)
    return few, crowded


def _test_reasons(normal, few, crowded, mean, sd, n_scored, pvalue: str) -> np.ndarray:
    """(I, K) why each cell got its test: "" for the normal fit."""
    reasons = np.full(normal.shape, "", dtype=object)
    for i, k in zip(*np.nonzero(~normal)):
        if pvalue == "empirical":
            reasons[i, k] = "pvalue='empirical' requested"
            continue
        parts = []
        if few[i, k]:
            parts.append(f"noise scores spread over {sd[i, k] * n_scored[k]:.2f} images "
                         f"(sd x n < {MIN_NULL_SPREAD:g}: too discrete for a normal fit)")
        if crowded[i, k]:
            parts.append(f"noise scores crowd the score's bound (|mean| + {NULL_ROOM_SD:g} sd = "
                         f"{abs(mean[i, k]) + NULL_ROOM_SD * sd[i, k]:.2f} > 1: censored and skewed)")
        reasons[i, k] = "; ".join(parts)
    return reasons.astype(str)


def _noise_needed(n_cells: int, alpha: float) -> int:
    """The fewest noise directions with which an empirical p-value (at least
    ``1 / (n_noise + 1)``) can pass Bonferroni over ``n_cells`` tests at ``alpha``."""
    m = max(1, int(np.floor(n_cells / alpha)) - 1)
    while n_cells / (m + 1.0) >= alpha:
        m += 1
    return m


def _test_note(tests, few, crowded, *, n_noise: int, alpha: float, pvalue: str) -> str:
    """One sentence: which test gave the family's p-values and why (InfluenceResult.test_note)."""
    cells = int(tests.size)
    if n_noise == 0:
        return ("no significance test was run: no noise directions (n_noise=0), so the p-values are NaN and "
                "no cell is marked significant; the scores stand alone")
    n_normal = int((tests == "normal").sum())
    n_empirical = cells - n_normal
    if pvalue == "empirical":
        text = f"empirical p-values (rank among {n_noise} noise directions) in all {cells} cells, as requested"
    elif n_empirical == 0:
        text = (f"normal null (a normal fit to each cell's {n_noise} noise scores) in all {cells} cells: every "
                f"cell's noise scores spread over at least {MIN_NULL_SPREAD:g} images and lie within |mean| + "
                f"{NULL_ROOM_SD:g} sd <= 1")
    else:
        why = []
        if few.any():
            why.append(f"in {int(few.sum())} they spread over fewer than {MIN_NULL_SPREAD:g} images (sd x n < "
                       f"{MIN_NULL_SPREAD:g}: too few images, or noise that moves almost none)")
        if crowded.any():
            why.append(f"in {int(crowded.sum())} they crowd the score's bound -1 or 1 (|mean| + {NULL_ROOM_SD:g} "
                       f"sd > 1)")
        both = int((few & crowded).sum())
        text = (f"normal null in {n_normal} of {cells} cells; empirical p-values (rank among {n_noise} noise "
                f"directions) in {n_empirical}, where a normal fit to the noise scores is not justified: "
                + ", ".join(why) + (f" ({both} fail both)" if both else ""))
    text += f"; Bonferroni over {cells} cells at alpha = {alpha:g}"
    if n_empirical:
        needed = _noise_needed(cells, alpha)
        text += (f". An empirical p-value cannot go below 1 / (n_noise + 1) = {1.0 / (n_noise + 1):.2g}"
                 + (f", so those cells cannot be significant with fewer than {needed} noise directions"
                    if needed > n_noise else ""))
    return text


def influence(head, features, pairs, *, strength: float = 5.0, n_noise: int = 100, alpha: float = 0.05,
              labels=None, batch_size: int = 64, concepts: Optional[Sequence[int]] = None,
              classes: Optional[Sequence[int]] = None, concept_names: Optional[Sequence[str]] = None,
              class_names: Optional[Sequence[str]] = None,
              pvalue: str = "normal", max_rows: int = 10000, seed=0) -> InfluenceResult:
    """RCAV-style influence of each concept on each class, with significance (module docstring).

    head: features -> (n, K) logits (numpy or torch, e.g. a
    :class:`edpairs.synthetic.LinearHead` or ``split_model(model, layer).head``). features:
    the images' channel-last layer activations ``(n, h, w, D)`` (or ``(n, L, D)``, or ``(n, D)``
    for a vector layer), floating-point and finite, numpy or torch, in the rank the head takes;
    the head is called on slices of it, shifted. pairs: fitted pairs (``decoding_``,
    ``bias_``, ``encoding_``). labels: optional (n,) integer class of each image: class ``k`` is
    then scored on its own images. concepts: the concepts to score (default all): distinct
    integer indices, or one integer (read as ``[concept]``). classes: the class indices to score
    (default all; distinct integers, or one; probabilities still come from every logit), or
    ``"predicted"``: the classes the head predicts for some image, read off the same pass that
    scores the unshifted features — the result's columns, and the Bonferroni family is
    concepts x these classes. Floats and bools are refused as indices (never truncated or read
    as a mask). concept_names / class_names: one name per concept of the pairs / class of the
    head. strength: finite, nonzero. ``n_noise=0`` skips the null (p-values NaN, nothing
    significant, ``tests`` "none"); the normal p-value needs ``n_noise >= MIN_NOISE_NORMAL`` (10,
    module docstring), the empirical one any number. With ``pvalue="normal"`` a cell whose noise
    scores fail the normal fit's checks (spread over fewer than ``MIN_NULL_SPREAD`` images, or
    crowding the bound -1 or 1: ``|mean| + 3 sd > 1``) gets the empirical p-value instead; the
    result's ``tests``, ``test_reasons`` and ``test_note`` say which and why. max_rows: at most
    this many patches (>= 4) are sampled for the noise detectors. Deterministic for a given
    ``seed`` (an integer >= 0)."""
    if pvalue not in ("normal", "empirical"):
        raise ValueError(f"pvalue must be 'normal' or 'empirical', got {pvalue!r}")
    check_real("strength", strength, "a finite nonzero number (the step, in units of the concept's latent factor)",
               lambda v: v != 0)
    check_real("alpha", alpha, "a significance level in (0, 1)", lambda v: 0 < v < 1)
    check_int("n_noise", n_noise, 0)
    if pvalue == "normal" and 0 < n_noise < MIN_NOISE_NORMAL:
        raise ValueError(f"n_noise={n_noise} noise directions are too few for the normal p-value: their spread "
                         f"would be underestimated and cells reported significant by chance; use n_noise >= "
                         f"{MIN_NOISE_NORMAL} (tens: 100 by default), pvalue='empirical', or n_noise=0 for no "
                         f"significance test")
    check_int("batch_size", batch_size)
    check_int("max_rows", max_rows, MIN_NOISE_ROWS)
    if seed is not None and not (is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    check_fitted(pairs, ("decoding_", "encoding_", "bias_"))
    W, S, b = (_host(getattr(pairs, a)) for a in ("decoding_", "encoding_", "bias_"))
    if W.ndim != 2 or S.shape != W.shape or b.shape != W.shape[:1]:
        raise ValueError(f"pairs must have decoding_ and encoding_ (I, D) and bias_ (I,), got shapes {W.shape}, "
                         f"{S.shape} and {b.shape}")
    if not (np.isfinite(W).all() and np.isfinite(S).all() and np.isfinite(b).all()):
        raise ValueError("the pairs contain NaN or Inf (decoding_, encoding_ or bias_)")
    I, D = W.shape
    features = _check_features(features, D)
    n = int(features.shape[0])
    idx = list(range(I)) if concepts is None else _index_list(concepts, "concepts", I, "concept",
                                                               out_of_range=IndexError).tolist()
    concept_names = _names(concept_names, I, "concept_names", "concepts")
    if n_noise > 0 and min(max_rows, n * int(np.prod(features.shape[1:-1]))) < MIN_NOISE_ROWS:
        raise ValueError(f"the noise directions need at least {MIN_NOISE_ROWS} rows (images x positions) of "
                         f"features, got {n * int(np.prod(features.shape[1:-1]))} (features of shape "
                         f"{tuple(features.shape)}); pass more images or n_noise=0")

    scorer = _Scorer(head, features, batch_size)
    K_all = int(scorer.base.shape[1])
    if isinstance(classes, str):
        if classes != "predicted":
            raise ValueError(f"classes must be class indices or 'predicted', got {classes!r}")
        cols = np.unique(scorer.base_host().argmax(1))
    else:
        cols = np.arange(K_all) if classes is None else _index_list(classes, "classes", K_all, "class")
    K = int(cols.size)
    class_names = _names(class_names, K_all, "class_names", "classes")
    masks = None
    if labels is not None:
        labels = _labels(labels, n, K_all)
        masks = (labels[:, None] == cols[None, :]).astype(np.float64)
    n_scored = np.full(K, n) if masks is None else masks.sum(0).astype(np.int64)
    scorer.score_on(cols, masks)
    per_class = np.maximum(n_scored, 1)

    gain = np.einsum("id,id->i", W, S)
    if np.any(np.abs(gain) < 1e-12):
        raise ValueError("a filter does not read its own encoding direction (w_i . s_i = 0)")
    steps = strength * S / gain[:, None]                         # (I, D) per-concept perturbation

    rng = np.random.default_rng(seed)
    rows = memb = None
    if n_noise > 0:
        flat = features.reshape(-1, D)
        take = np.sort(rng.choice(flat.shape[0], min(max_rows, flat.shape[0]), replace=False))
        rows = _host(flat[take])  # only the sampled rows come to the host, in float64
        memb = (rows @ W.T - b) > 0                               # hard memberships (rows, I)

    Iq = len(idx)
    scores = np.zeros((Iq, K))
    null = np.full((Iq, n_noise, K), np.nan)
    for r, i in enumerate(idx):
        scores[r] = scorer.sign_sums(steps[i]) / per_class
        if n_noise:
            length = float(np.linalg.norm(steps[i]))
            for j, v in enumerate(noise_directions(rows, memb[:, i], n_noise, rng=rng)):
                null[r, j] = scorer.sign_sums(length * v) / per_class

    if n_noise:
        mean = null.mean(1)
        sd = null.std(1, ddof=1) if n_noise > 1 else np.zeros_like(mean)
        extreme = np.abs(null - mean[:, None, :]) >= np.abs(scores - mean)[:, None, :] - 1e-12
        p = (1.0 + extreme.sum(1)) / (n_noise + 1.0)             # empirical
        few, crowded = _normal_fit_fails(mean, sd, n_scored)
        if pvalue == "normal":
            normal = ~(few | crowded)
            if normal.any():
                from scipy.stats import norm

                # (sd >= MIN_NULL_SPREAD / n > 0 wherever the normal fit is used)
                z = np.abs(scores - mean)[normal] / sd[normal]
                p[normal] = 2.0 * norm.sf(z)
        else:
            normal = np.zeros((Iq, K), dtype=bool)
        p_adj = np.minimum(1.0, p * Iq * K)
        significant = p_adj < alpha
        tests = np.where(normal, "normal", "empirical")
        reasons = _test_reasons(normal, few, crowded, mean, sd, n_scored, pvalue)
    else:
        mean = sd = p = p_adj = np.full((Iq, K), np.nan)
        significant = np.zeros((Iq, K), dtype=bool)
        few = crowded = np.zeros((Iq, K), dtype=bool)
        tests = np.full((Iq, K), "none")
        reasons = np.full((Iq, K), "no noise directions (n_noise=0)")
    note = _test_note(tests, few, crowded, n_noise=int(n_noise), alpha=float(alpha), pvalue=pvalue)

    names_c = [str(concept_names[i]) if concept_names is not None else f"concept {i}" for i in idx]
    names_k = [str(class_names[k]) if class_names is not None else f"class {k}" for k in cols]
    return InfluenceResult(scores=scores, pvalues=p, pvalues_adjusted=p_adj, significant=significant,
                           null_mean=mean, null_std=sd, null_scores=null, n_scored=n_scored,
                           concepts=names_c, classes=names_k, strength=float(strength), alpha=float(alpha),
                           pvalue=pvalue, settings=dict(n_noise=int(n_noise), n_images=n, concepts=idx,
                                                        labels=labels is not None, max_rows=int(max_rows),
                                                        seed=seed),
                           class_indices=[int(k) for k in cols], tests=tests, test_reasons=reasons,
                           test_note=note)


# ---- plots -------------------------------------------------------------------------------
def save_figure(fig, path) -> None:
    """Saves a figure as PNG atomically (a temporary file in the same folder, then renamed; the
    folder is made if missing)."""
    path = os.fspath(path)
    make_folder(os.path.dirname(os.path.abspath(path)), f"the figure {path}")
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=fig.dpi, bbox_inches="tight"))


def _figure(**kwargs):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(**kwargs)


def plot_influence(result: InfluenceResult, path=None, *, max_classes: int = 40):
    """Heatmap of the scores (concepts x classes, diverging colours in [-1, 1]); significant
    cells marked with a star (the title says when no test was run). With more than
    ``max_classes`` classes only the classes with a significant cell (else the largest |score|)
    are shown. Returns a matplotlib Figure; saved atomically as PNG when ``path`` is given."""
    scores = result.scores
    cols = np.arange(scores.shape[1])
    if len(cols) > max_classes:
        key = result.significant.any(0) * 10 + np.abs(scores).max(0)
        cols = np.sort(np.argsort(-key, kind="stable")[:max_classes])
    data = scores[:, cols]
    I, K = data.shape
    fig = _figure(figsize=(max(4.0, 0.45 * K + 2.5), max(2.5, 0.4 * I + 1.5)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(data, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for r in range(I):
        for c, k in enumerate(cols):
            if result.significant[r, k]:
                ax.text(c, r, "*", ha="center", va="center", fontsize=12, color="black")
    ax.set_xticks(range(K))
    ax.set_xticklabels([result.classes[k] for k in cols], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(I))
    ax.set_yticklabels(result.concepts, fontsize=8)
    untested = (np.all(np.asarray(result.tests) == "none") if result.tests is not None
                else bool(np.isnan(np.asarray(result.pvalues, dtype=np.float64)).all()))
    marks = "no significance test (no noise directions)" if untested else f"* p_Bonf < {result.alpha:g}"
    ax.set_title(f"influence (RCAV score, strength {result.strength:g}); {marks}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if path is not None:
        save_figure(fig, path)
    return fig
