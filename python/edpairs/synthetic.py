"""Synthetic layers with known ground truth, drawn from the model of a layer
``x_p = S alpha_p + D beta_p + mu`` (DESIGN section 1): true encoding directions, distractors,
ideal filters and thresholds, concept memberships, latent factors, image classes and a linear
head trained on them. Used to measure how well edpairs recovers what it claims to recover."""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from itertools import combinations
from typing import Optional

import numpy as np

from ._checks import check_int, check_real, is_int

__all__ = ["LinearHead", "PresenceHead", "SyntheticLayer", "fit_head", "large", "make_layer", "published"]

# Rows generated per block: keeps the float64 temporaries in cache (measured ~1.7x faster
# than 16K-row blocks at D=256).
_CHUNK = 4096


def _few_blas_threads():
    """Limits BLAS to one thread where threadpoolctl is installed (a no-op otherwise).

    The products here are thin (inner dimension I + F, or a few dozen classes): threads buy
    little on them, and on a machine shared with other work OpenBLAS's spinning threads
    slowed them down ten-fold and more in our measurements."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_features(shape, D: int) -> None:
    """Heads take whole images: channel-last (n_images, h, w, D) or (n_images, h*w, D)."""
    if len(shape) not in (3, 4) or shape[-1] != D:
        raise ValueError(f"features must be (n_images, h, w, {D}) or (n_images, h*w, {D}), got {tuple(shape)}; "
                         f"flat (N, D) patch rows can be viewed per image with layer.images()")
    if _n_patches(shape) == 0:
        raise ValueError(f"features must hold at least one patch per image, got shape {tuple(shape)}")


def _n_patches(shape) -> int:
    return int(np.prod(shape[1:-1]))


def _finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} must be finite, got NaN or infinite entries")


class _Head:
    """What both heads share: logits ``x @ weight.T + bias`` of per-image values ``x`` in
    their library, the class count, the argmax, and the check of the features' shape against
    ``_n_features``."""

    _n_features: int

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def _check(self, features):
        """``features`` checked (a numpy array of numbers or a floating torch tensor, of a valid
        shape), as an array or the tensor."""
        if _is_torch(features):
            if not features.is_floating_point():
                raise ValueError(f"features must be a floating torch tensor (the logits are computed in its "
                                 f"dtype), got {features.dtype}")
            _check_features(tuple(features.shape), self._n_features)
            return features
        if not isinstance(features, np.ndarray):
            raise TypeError(f"features must be a numpy array or a torch tensor, got {type(features).__name__}")
        if features.dtype.kind not in "iuf":
            raise ValueError(f"features must hold real numbers, got dtype {features.dtype}")
        _check_features(features.shape, self._n_features)
        return features

    def _logits(self, x):
        if _is_torch(x):
            import torch

            w = torch.as_tensor(self.weight, dtype=x.dtype, device=x.device)
            b = torch.as_tensor(self.bias, dtype=x.dtype, device=x.device)
            return x @ w.T + b
        return x @ self.weight.T + self.bias

    def predict(self, features):
        """The predicted class of each image (argmax of the logits)."""
        logits = self(features)
        return logits.argmax(dim=1) if _is_torch(logits) else logits.argmax(axis=1)


class LinearHead(_Head):
    """A frozen linear classifier on a layer's feature maps: the logits of an image are the
    mean of its patch features times ``weight.T`` plus ``bias``.

    ``head(features)`` takes ``(n_images, h, w, D)`` or ``(n_images, h*w, D)`` features as a
    numpy array (computed in float64, float64 logits) or a torch tensor (computed in the
    tensor's dtype and device, differentiable with respect to the features), and returns the
    ``(n_images, n_classes)`` logits in the same library. ``accuracy_`` is the training
    accuracy."""

    def __init__(self, weight, bias, accuracy: float = float("nan")):
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = np.asarray(bias, dtype=np.float64)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"weight must be (n_classes, D) and bias (n_classes,), got "
                             f"{self.weight.shape} and {self.bias.shape}")
        _finite("weight", self.weight)
        _finite("bias", self.bias)
        self.accuracy_ = float(accuracy)

    @property
    def _n_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, features):
        features = self._check(features)
        if _is_torch(features):
            return self._logits(features.flatten(1, -2).mean(dim=1))
        x = features
        return self._logits(x.reshape(x.shape[0], _n_patches(x.shape), x.shape[-1]).mean(axis=1, dtype=np.float64))

    def __repr__(self) -> str:
        return (f"LinearHead(n_classes={self.weight.shape[0]}, n_features={self.weight.shape[1]}, "
                f"accuracy_={self.accuracy_:.4f})")


class PresenceHead(_Head):
    """A frozen classifier that reads a layer only through concept detectors: the logits of an
    image are ``logit_k = sum_i weight[k, i] * g_i + bias_k``, where ``g_i`` is the mean over
    positions of a detector ``d(u_{p,i})``, ``u_{p,i} = filters[i] . x_p - thresholds[i]``: the
    pooled presence of concept ``i``. ``detector="ramp"`` (default) is
    ``clip(u / width + 1/2, 0, 1) = relu(u / width + 1/2) - relu(u / width - 1/2)``, a detector
    built of ReLUs like a network's own units, exactly flat more than ``width / 2`` from the
    threshold; ``"sigmoid"`` is ``sigmoid(4 u / width)`` (the same slope at the threshold, never
    flat).

    Why this head (influence, DESIGN section 3): a known head under which the RCAV sign test can
    mean something. A head linear in the layer moves every image's logits by the same vector for
    any direction, so every direction, label-permuted noise included, moves a class's
    probability the same way on (almost) all images. Here a direction acts through detectors:
    its effect differs from image to image, and with the ramp a direction that brings no patch
    into a detector's ramp changes nothing at all (a tie). Whether the noise directions of
    :func:`edpairs.influence.influence` stay that quiet depends on the layer (their projections
    on the filters against the detectors' margin): measured in benchmarks/bench_influence.py.

    The true relation (:meth:`relations`). With :meth:`from_layer` the filters are the layer's
    ideal filters, ``filters[j] . s_i = delta_ij``, so moving every position by ``t * s_i``
    (``t > 0``) changes ``g_i`` by ``dg_i >= 0`` on every image (the detector is nondecreasing)
    and no other ``g_j``: the logits move by ``dz = dg_i * weight[:, i]``. The class-``k``
    log-probability changes by ``dz_k - [lse(z + dz) - lse(z)]
    = dg_i * (weight[k, i] - sum_j pbar_j weight[j, i])`` with ``pbar`` the softmax averaged
    along the step, a strictly positive, image-dependent probability vector. So on every image
    that moves at all (``dg_i > 0``) the probability of class ``k`` rises when ``weight[k, i]``
    is the largest entry of column ``i`` and falls when it is the smallest (unless the column
    is constant); for an entry in between the sign depends on the image: no true relation.
    With the default two-valued weight (``+scale`` where class ``k`` holds concept ``i``,
    ``-scale`` elsewhere) every cell is a column's largest or smallest entry, and the relation
    is ``sign(weight)`` everywhere.

    ``head(features)`` takes ``(n_images, h, w, D)`` or ``(n_images, h*w, D)`` features as a numpy
    array (float64 logits) or a torch tensor (its dtype and device, differentiable), like
    :class:`LinearHead`. ``accuracy_`` is the accuracy on the layer it was built from."""

    def __init__(self, filters, thresholds, weight, bias=None, *, width: float = 1.0,
                 detector: str = "ramp", accuracy: float = float("nan")):
        self.filters = np.asarray(filters, dtype=np.float64)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.weight = np.asarray(weight, dtype=np.float64)
        if self.filters.ndim != 2 or self.thresholds.shape != (self.filters.shape[0],):
            raise ValueError(f"filters must be (n_concepts, D) and thresholds (n_concepts,), got "
                             f"{self.filters.shape} and {self.thresholds.shape}")
        if self.weight.ndim != 2 or self.weight.shape[1] != self.filters.shape[0]:
            raise ValueError(f"weight must be (n_classes, {self.filters.shape[0]}), got {self.weight.shape}")
        self.bias = np.zeros(self.weight.shape[0]) if bias is None else np.asarray(bias, dtype=np.float64)
        if self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"bias must be ({self.weight.shape[0]},), got {self.bias.shape}")
        for name in ("filters", "thresholds", "weight", "bias"):
            _finite(name, getattr(self, name))
        check_real("width", width, "a finite number > 0", lambda v: v > 0)
        if detector not in ("ramp", "sigmoid"):
            raise ValueError(f"detector must be 'ramp' or 'sigmoid', got {detector!r}")
        self.width = float(width)
        self.detector = detector
        self.accuracy_ = float(accuracy)

    @classmethod
    def from_layer(cls, layer: "SyntheticLayer", weight=None, *, scale: float = 4.0, width: float = 1.0,
                   detector: str = "ramp") -> "PresenceHead":
        """The head on a :class:`SyntheticLayer`'s ideal filters ``W`` and thresholds ``b`` (so
        ``u = alpha - boundary`` on noise-free data). ``weight`` (n_classes, n_concepts) defaults
        to ``scale * (2 A - 1)``, ``A[k, i] = 1`` when class ``k`` holds concept ``i``;
        ``accuracy_`` is measured on the layer's images when there is one weight row per class."""
        if weight is None:
            check_real("scale", scale, "a finite number", lambda v: True)
            A = np.zeros((len(layer.classes), layer.n_concepts))
            for k, c in enumerate(layer.classes):
                A[k, list(c)] = 1.0
            weight = float(scale) * (2.0 * A - 1.0)
        head = cls(layer.W, layer.b, weight, width=width, detector=detector)
        if head.n_classes == len(layer.classes):
            head.accuracy_ = float(np.mean(head.predict(layer.images()) == layer.y))
        return head

    @property
    def _n_features(self) -> int:
        return self.filters.shape[1]

    def presence(self, features):
        """``(n_images, n_concepts)`` pooled presence ``g`` of each concept, in [0, 1]."""
        features = self._check(features)
        if _is_torch(features):
            import torch

            w = torch.as_tensor(self.filters, dtype=features.dtype, device=features.device)
            t = torch.as_tensor(self.thresholds, dtype=features.dtype, device=features.device)
            u = (features.flatten(1, -2) @ w.T - t) / self.width
            d = torch.clamp(u + 0.5, 0.0, 1.0) if self.detector == "ramp" else torch.sigmoid(4.0 * u)
            return d.mean(dim=1)
        x = features
        u = x.reshape(x.shape[0], _n_patches(x.shape), x.shape[-1]).astype(np.float64, copy=False) @ self.filters.T
        u -= self.thresholds
        u /= self.width
        if self.detector == "ramp":
            d = np.clip(u + 0.5, 0.0, 1.0)
        else:
            from scipy.special import expit

            d = expit(4.0 * u)
        return d.mean(axis=1)

    def __call__(self, features):
        return self._logits(self.presence(features))

    def relations(self) -> np.ndarray:
        """``(n_concepts, n_classes)`` true influence of each concept on each class's probability
        (class docstring): +1 where ``weight[k, i]`` is the largest entry of column ``i``, -1
        where it is the smallest, 0 where the sign depends on the image (an entry in between,
        or a constant column)."""
        W = self.weight
        top, bottom = W.max(axis=0, keepdims=True), W.min(axis=0, keepdims=True)
        spread = top > bottom
        rel = np.where((W == top) & spread, 1, 0) - np.where((W == bottom) & spread, 1, 0)
        return rel.T.astype(np.int64)

    def __repr__(self) -> str:
        return (f"PresenceHead(n_classes={self.weight.shape[0]}, n_concepts={self.weight.shape[1]}, "
                f"detector={self.detector!r}, width={self.width:g}, accuracy_={self.accuracy_:.4f})")


def fit_head(pooled, y, n_classes: int, *, l2: float = 1e-3, maxiter: int = 500) -> LinearHead:
    """Multinomial logistic regression on pooled (per-image, ``(n_images, D)``) features.

    Minimises mean cross-entropy + ``l2/2 * ||V||^2`` over standardised features with
    L-BFGS-B, then folds the standardisation into ``weight`` / ``bias`` so the head applies to
    raw features. Deterministic (zero initialisation). ``y`` holds integer labels in
    ``[0, n_classes)``; ``l2`` is a finite number >= 0."""
    check_int("n_classes", n_classes)
    check_real("l2", l2, "a finite number >= 0", lambda v: v >= 0)
    check_int("maxiter", maxiter)
    pooled = np.asarray(pooled, dtype=np.float64)
    y = np.asarray(y)
    if pooled.ndim != 2 or pooled.shape[0] == 0:
        raise ValueError(f"pooled must be (n_images, D) with n_images >= 1, got shape {pooled.shape}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
    if y.shape != (pooled.shape[0],) or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y must hold one label in [0, {n_classes}) per image, got shape {y.shape}")
    y = y.astype(np.int64)
    if not np.all(np.isfinite(pooled)):
        raise ValueError("pooled must be finite")
    with _few_blas_threads():
        return _fit_head(pooled, y, int(n_classes), float(l2), int(maxiter))


def _fit_head(pooled, y, n_classes, l2, maxiter):
    from scipy.optimize import minimize

    n, d = pooled.shape
    mean = pooled.mean(axis=0)
    std = pooled.std(axis=0)
    # Constant coordinates carry no information; leave them unscaled instead of dividing by 0.
    std = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max())), std, 1.0)
    Z = (pooled - mean) / std
    # The L2-regularised optimum has its rows in the row space of Z (representer theorem), so
    # fitting in an orthonormal basis of that space is exact, and cheaper when the pooled
    # features are low-rank (noise-free layers span only I + F dimensions).
    evals, evecs = np.linalg.eigh(Z.T @ Z)
    keep = evals > 1e-10 * max(float(evals[-1]), 1e-300)
    basis = evecs[:, keep].T if keep.sum() < 0.8 * d else np.eye(d)
    Z = Z @ basis.T
    d = Z.shape[1]
    rows = np.arange(n)

    def loss(theta):
        V = theta[: n_classes * d].reshape(n_classes, d)
        logits = Z @ V.T
        logits += theta[n_classes * d:]
        top = logits.max(axis=1, keepdims=True)
        e = np.exp(logits - top)
        total = e.sum(axis=1, keepdims=True)
        value = float(np.mean(np.log(total[:, 0]) + top[:, 0] - logits[rows, y])) + 0.5 * l2 * float(np.sum(V * V))
        g = e / total
        g[rows, y] -= 1.0
        g /= n
        grad = np.concatenate([(g.T @ Z + l2 * V).ravel(), g.sum(axis=0)])
        return value, grad

    res = minimize(loss, np.zeros(n_classes * (d + 1)), jac=True, method="L-BFGS-B",
                   options={"maxiter": maxiter})
    V = res.x[: n_classes * d].reshape(n_classes, d) @ basis
    c = res.x[n_classes * d:]
    weight = V / std
    bias = c - weight @ mean
    head = LinearHead(weight, bias)
    head.accuracy_ = float(np.mean((pooled @ weight.T + bias).argmax(axis=1) == y))
    return head


@dataclass(eq=False)
class SyntheticLayer:
    """A layer drawn from ``x_p = S alpha_p + D beta_p + mu`` with everything that generated it.

    ``X`` is ``(N, D)`` with ``N = n_images * h * w``, image-major and row-major over the grid
    (``images()`` views it as ``(n_images, h, w, D)``). ``W`` are the ideal (minimum-norm)
    filters: ``W @ S.T = I`` and ``W @ distractors.T = 0`` whenever ``[S; distractors]`` has
    full row rank (always when ``I + F <= D``). ``b = W @ offset + boundary``, where
    ``boundary`` is the midpoint of ``absent[1]`` and ``present[0]`` (2.5 in the published
    setting), so on noise-free data ``W x - b = alpha - boundary`` and ``W x > b`` is
    exactly the membership when the ranges do not overlap."""

    X: np.ndarray
    S: np.ndarray
    distractors: np.ndarray
    offset: np.ndarray
    W: np.ndarray
    b: np.ndarray
    membership: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray
    image: np.ndarray
    position: np.ndarray
    grid: tuple
    y: np.ndarray
    classes: list
    head: Optional[LinearHead] = None
    boundary: float = 2.5
    params: dict = field(default_factory=dict, repr=False)

    def images(self) -> np.ndarray:
        """``X`` viewed (no copy) as ``(n_images, h, w, D)``."""
        h, w = self.grid
        return self.X.reshape(self.n_images, h, w, self.X.shape[1])

    @property
    def n_images(self) -> int:
        return int(self.y.shape[0])

    @property
    def n_concepts(self) -> int:
        return int(self.S.shape[0])

    def __repr__(self) -> str:
        return (f"SyntheticLayer(N={self.X.shape[0]}, D={self.X.shape[1]}, concepts={self.S.shape[0]}, "
                f"distractors={self.distractors.shape[0]}, grid={self.grid}, "
                f"n_images={self.n_images}, classes={len(self.classes)})")


# ---- argument checks ---------------------------------------------------------------------


def _count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _range(name, value):
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if lo > hi:
        raise ValueError(f"{name} must have low <= high, got {value!r}")
    return lo, hi


def _classes(classes, n_concepts, membership):
    if classes is None:
        if n_concepts <= 4 and n_concepts >= 2:
            return [tuple(c) for c in combinations(range(n_concepts), 2)]
        return [(i,) for i in range(n_concepts)]
    expected = f"classes must be a list of tuples of integer concept indices, got {classes!r}"
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise ValueError(expected)
    out = []
    for c in classes:
        if isinstance(c, (str, bytes)) or not hasattr(c, "__iter__"):
            raise ValueError(expected)
        c = tuple(c)
        if not all(is_int(i) for i in c):
            raise ValueError(expected)
        out.append(tuple(int(i) for i in c))
    if not out:
        raise ValueError("classes must hold at least one class")
    for c in out:
        if any(i < 0 or i >= n_concepts for i in c):
            raise ValueError(f"classes: concept index out of range [0, {n_concepts}) in class {c}")
        if len(set(c)) != len(c):
            raise ValueError(f"classes: class {c} repeats a concept")
        if not c and membership == "exclusive":
            raise ValueError("classes: a class without concepts cannot fill patches with exclusive membership")
    return out


# ---- generation --------------------------------------------------------------------------


def _directions(rng, n, d, max_cosine):
    """n unit vectors in R^d; pairwise cosines sqrt(c_a c_b) <= max_cosine when n + 1 <= d."""
    if n == 0:
        return np.zeros((0, d))
    if n + 1 <= d:
        q, _ = np.linalg.qr(rng.standard_normal((d, n + 1)))
        g, u = q[:, :n].T, q[:, n]
        c = rng.uniform(0.0, max_cosine, size=n)
        v = np.sqrt(1.0 - c)[:, None] * g + np.sqrt(c)[:, None] * u[None, :]
    else:
        v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _patch_slots(rng, n_images, n_patches, sizes):
    """For each patch, which of its class's concepts (an index into the class tuple) it holds:
    every concept of the class at a random position when the grid has room, the other patches
    uniformly among the class's concepts."""
    kmax = int(sizes.max())
    k = sizes[:, None]
    # A random permutation of positions per image (rank of each position) ...
    rank = np.argsort(np.argsort(rng.random((n_images, n_patches)), axis=1), axis=1)
    # ... and a random order of the class's concepts per image (padding slots sort last).
    keys = rng.random((n_images, kmax))
    keys[np.arange(kmax)[None, :] >= k] = 2.0
    order = np.argsort(keys, axis=1)
    fill = np.floor(rng.random((n_images, n_patches)) * k).astype(np.int64)
    first = np.take_along_axis(order, np.minimum(rank, kmax - 1), axis=1)
    return np.where(rank < np.minimum(k, n_patches), first, fill)


def make_layer(n_images=20000, n_features=16, n_concepts=3, n_distractors=2, *, grid=(1, 2),
               offset=10.0, max_cosine=0.5, present=(2.5, 5.0), absent=(0.0, 2.5),
               distractor_range=(0.0, 5.0), membership="exclusive", p_present=0.2, noise=0.0,
               classes=None, train_head=True, dtype=np.float32, seed=None) -> SyntheticLayer:
    """Draws a layer ``x_p = S alpha_p + D beta_p + mu (+ noise)`` with known ground truth.

    Directions: when ``I + F + 1 <= D``, ``v_k = sqrt(1 - c_k) g_k + sqrt(c_k) u`` with
    orthonormal ``g_k, u`` and ``c_k ~ U(0, max_cosine)``, so pairwise cosines are
    ``sqrt(c_a c_b) <= max_cosine``; otherwise unit Gaussian directions. The first ``I`` are
    ``S``, the rest the distractors.

    Membership ``"exclusive"``: one concept per patch, chosen among the image's class concepts
    (each of them in at least one patch when the grid has room); ``"sparse"``: each concept
    present independently with probability ``p_present``, the class's concepts forced into at
    least one patch of the image. Present concepts get ``alpha ~ U(present)``, absent ones
    ``alpha ~ U(absent)``, distractors ``beta ~ U(distractor_range)``; ``offset`` is a scalar
    (``offset * ones(D)``) or a ``(D,)`` vector; ``noise`` is the std of isotropic Gaussian
    noise. ``classes`` (list of concept tuples; default all pairs when ``2 <= I <= 4``, else
    one class per concept) define the images' labels ``y``; ``train_head`` fits a
    :class:`LinearHead` on the mean-pooled features. Reproducible from ``seed``."""
    n_images = _count("n_images", n_images, 1)
    d = _count("n_features", n_features, 1)
    n_concepts = _count("n_concepts", n_concepts, 1)
    n_distractors = _count("n_distractors", n_distractors, 0)
    if (isinstance(grid, (str, bytes)) or not hasattr(grid, "__len__") or len(grid) != 2
            or not all(is_int(g) and g >= 1 for g in grid)):
        raise ValueError(f"grid must be an (h, w) pair of positive integers, got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    present = _range("present", present)
    absent = _range("absent", absent)
    distractor_range = _range("distractor_range", distractor_range)
    check_real("max_cosine", max_cosine, "a number in [0, 1)", lambda v: 0.0 <= v < 1.0)
    if membership not in ("exclusive", "sparse"):
        raise ValueError(f"membership must be 'exclusive' or 'sparse', got {membership!r}")
    check_real("p_present", p_present, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
    check_real("noise", noise, "a finite number >= 0", lambda v: v >= 0.0)
    if not (seed is None or isinstance(seed, (np.random.SeedSequence, np.random.Generator))):
        check_int("seed", seed, 0, optional=True)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    try:
        mu = np.asarray(offset, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"offset must be a finite number or a ({d},) vector of numbers, got {offset!r}") from None
    if mu.ndim == 0:
        mu = np.full(d, float(mu))
    if mu.shape != (d,) or not np.all(np.isfinite(mu)):
        raise ValueError(f"offset must be a finite scalar or a ({d},) vector, got shape {mu.shape}")
    top = float(np.finfo(dtype).max)
    if np.abs(mu).max() > top:
        raise ValueError(f"offset must lie within the range of dtype {dtype} (|offset| <= {top:.4g}), got "
                         f"values up to {np.abs(mu).max():.4g}")
    classes = _classes(classes, n_concepts, membership)
    with _few_blas_threads():
        return _make_layer(n_images, d, n_concepts, n_distractors, h, w, mu, float(max_cosine),
                           present, absent, distractor_range, membership, float(p_present),
                           float(noise), classes, bool(train_head), dtype, seed)


def _make_layer(n_images, d, n_concepts, n_distractors, h, w, mu, max_cosine, present, absent,
                distractor_range, membership, p_present, noise, classes, train_head, dtype, seed):
    rng = np.random.default_rng(seed)
    n_patches = h * w
    n = n_images * n_patches

    V = _directions(rng, n_concepts + n_distractors, d, float(max_cosine))
    S, Dst = V[:n_concepts], V[n_concepts:]
    # Minimum-norm ideal filters: rows of the pseudo-inverse of [S; D]^T that read the concepts.
    W = np.linalg.pinv(V.T)[:n_concepts]
    boundary = 0.5 * (absent[1] + present[0])
    b = W @ mu + boundary

    y = rng.integers(0, len(classes), size=n_images)
    sizes = np.array([len(c) for c in classes], dtype=np.int64)
    kmax = max(int(sizes.max()), 1)
    table = np.zeros((len(classes), kmax), dtype=np.int64)
    for ci, c in enumerate(classes):
        table[ci, : len(c)] = c

    if membership == "exclusive":
        slots = _patch_slots(rng, n_images, n_patches, sizes[y])
        concept = table[y[:, None], slots].reshape(n)
        memb = np.zeros((n, n_concepts), dtype=bool)
        memb[np.arange(n), concept] = True
    else:
        memb3 = rng.random((n_images, n_patches, n_concepts)) < float(p_present)
        # Force each class concept into one random patch of images that lack it entirely.
        pos = rng.integers(0, n_patches, size=(n_images, kmax))
        for j in range(kmax):
            img = np.flatnonzero(sizes[y] > j)
            con = table[y[img], j]
            missing = ~memb3[img, :, con].any(axis=1)
            memb3[img[missing], pos[img[missing], j], con[missing]] = True
        memb = memb3.reshape(n, n_concepts)

    alpha = rng.random((n, n_concepts))
    alpha *= np.where(memb, present[1] - present[0], absent[1] - absent[0])
    alpha += np.where(memb, present[0], absent[0])
    beta = rng.uniform(distractor_range[0], distractor_range[1], size=(n, n_distractors))

    X = np.empty((n, d), dtype=dtype)
    top = float(np.finfo(dtype).max)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        block = alpha[sl] @ S
        block += beta[sl] @ Dst
        block += mu
        if noise > 0:
            block += float(noise) * rng.standard_normal(block.shape)
        if not (-top <= block.min() and block.max() <= top):
            raise ValueError(f"the features overflow dtype {dtype} (|x| <= {top:.4g}): reduce offset, present, "
                             f"absent, distractor_range or noise, or pass a wider dtype")
        X[sl] = block

    image = np.repeat(np.arange(n_images, dtype=np.int64), n_patches)
    cell = np.tile(np.arange(n_patches, dtype=np.int64), n_images)
    position = np.stack([cell // w, cell % w], axis=1)

    layer = SyntheticLayer(
        X=X, S=S, distractors=Dst, offset=mu, W=W, b=b, membership=memb, alpha=alpha, beta=beta,
        image=image, position=position, grid=(h, w), y=y.astype(np.int64), classes=classes,
        head=None, boundary=boundary,
        params=dict(n_images=n_images, n_features=d, n_concepts=n_concepts,
                    n_distractors=n_distractors, grid=(h, w), max_cosine=float(max_cosine),
                    present=present, absent=absent, distractor_range=distractor_range,
                    membership=membership, p_present=float(p_present), noise=float(noise),
                    dtype=dtype.name, seed=seed),
    )
    if train_head:
        pooled = X.reshape(n_images, n_patches, d).mean(axis=1, dtype=np.float64)
        layer.head = _fit_head(pooled, layer.y, len(classes), 1e-3, 500)
    return layer


def published(n_images=20000, *, seed=None, **overrides) -> SyntheticLayer:
    """The published synthetic setting: D=16, I=3 concepts, F=2 distractors, offset 10,
    alpha present U(2.5, 5) / absent U(0, 2.5), beta U(0, 5), pairwise cosines up to 0.5,
    exclusive membership, images of 1x2 patches, classes (c0, c1), (c0, c2), (c1, c2)."""
    kwargs = dict(n_features=16, n_concepts=3, n_distractors=2, grid=(1, 2), offset=10.0,
                  max_cosine=0.5, present=(2.5, 5.0), absent=(0.0, 2.5),
                  distractor_range=(0.0, 5.0), membership="exclusive",
                  classes=[(0, 1), (0, 2), (1, 2)])
    kwargs.update(overrides)
    return make_layer(n_images, seed=seed, **kwargs)


def large(n_images=12500, *, seed=None, **overrides) -> SyntheticLayer:
    """A larger layer: D=256, I=32 concepts, F=64 distractors, pairwise cosines up to 0.5,
    exclusive membership, 4x4 grids (12,500 images = 200,000 patches), one class per concept."""
    kwargs = dict(n_features=256, n_concepts=32, n_distractors=64, grid=(4, 4), max_cosine=0.5,
                  membership="exclusive", classes=[(i,) for i in range(32)])
    kwargs.update(overrides)
    if "n_concepts" in overrides and "classes" not in overrides:
        kwargs["classes"] = [(i,) for i in range(int(overrides["n_concepts"]))]
    return make_layer(n_images, seed=seed, **kwargs)
