"""Stage 5 of edpairs (DESIGN §2): Uncertainty Region Alignment (URA) of the detectors with the
network head ``f⁺`` (layer → logits).

The network should be maximally uncertain where every detector is undecided. Each feature
vector of an image is moved towards the intersection of all detector hyperplanes,
``x'_p = x_p − κ dx_p`` with ``κ ~ U[κ_lo, κ_hi]`` (one draw per image), and the frozen head is
asked for maximal prediction entropy, ``loss = −mean_n H(softmax(f⁺(X'_n)))`` over batches of
WHOLE images. Rows of ``W`` (I, D) are the filters, so the decoded values are ``W x − b``:

* unconstrained shift  ``dx_p = Wᵀ (W Wᵀ)⁺ (W x_p − b)``  (= ``(Wᵀ)⁺ (W x_p − b)``);
* constrained shift    ``dx_p = Ŝᵀ (W Ŝᵀ)⁺ (W x_p − b)``  (moves only along the encoding
  directions ``Ŝ`` (I, D); ``Ŝ`` is trained too, with the filter–signal orthogonality
  ``sqrt(mean_{i≠j} (ŵ_iᵀ ŝ_j)²)`` on unit vectors).

Schedule (the published one, DESIGN §7, with far fewer epochs): an unconstrained stage, the
signal vectors re-estimated by the stage-4 estimator on the detectors it produced, then a
constrained stage training ``W, b, Ŝ`` jointly; finally the thresholds are re-fitted along the
aligned filters against the stage-2 clusters and the signal vectors re-estimated by stage 4.

Detectors are kept tied to the data by a regulariser on the patches of the same images
(``config.regularizer``):

* ``"exclusive"`` (default): the soft count of detectors firing on a patch should be one,
  ``mean_p (Σ_i σ(k d_{p,i}) − 1)²`` with ``d`` the whitened distance to each hyperplane and
  ``k = config.sharpness``. This is a sharp, simplified form of the published sparsity and
  maximum-activation losses (one dominant, saturated detector per patch; an idea beyond the
  published recipe, chosen by measurement);
* ``"memberships"``: binary cross-entropy to the memberships the detectors had when URA
  started;
* ``"stage"``: the published stage-3 losses of :mod:`edpairs.refine` with the published
  weights (measured on the published synthetic preset with these short schedules: every
  detector ends up firing everywhere, IoU 0.33);
* ``"none"``.

The optimisation works in the whitened coordinates of stage 1, ``z = P (x − mean)``
(filters ``W = C P``, ``b = t + C P mean``; signal vectors ``Ŝ = G P⁺ᵀ``): filters and signal
vectors stay inside the span of the data (a component outside it changes no decoded value and
cannot be identified) and Adam sees a well-conditioned problem. The shifts and the head work
in the raw coordinates the head was given.

What the head can and cannot identify (measured, benchmarks/README.md section "URA"). On
layers with mutually exclusive concepts (one per patch; ``edpairs.synthetic.published``) the
clustering filters lack the "sum of concepts" direction (they sum to ~0, rank I−1): the total
of the latent factors of a patch has the same distribution whatever concept it holds, so no
class depends on it and a head trained on the classes barely reads it (published preset: the
class-centred logit response to it is ~2% of the response to one concept). The head's
entropy (with ``regularizer="memberships"``) barely moves the recovery (published preset,
seeds 0-2: cos(ŝ, s) 0.74 → 0.77); what restores the direction is the exclusivity
regulariser (cos(ŝ, s) ≥ 0.99 with or without the entropy term, ``ura=0``). On the large
preset (I=32) the full schedule also lifts IoU from 0.91 to 0.97.

The head contract: ``head(features)`` takes a float32 torch tensor shaped like the image
batches (``(n, h, w, D)`` or ``(n, P, D)``, channel-last) on the device of the computation and
returns ``(n, n_classes)`` logits, differentiable with respect to the features. Every torch
module the head reaches is put in eval mode with ``requires_grad`` off for the duration (each
once), and its training and ``requires_grad`` flags are restored afterwards, also when
:func:`align` raises; its parameters and buffers are never written. Reached are: the head
itself when it is a ``torch.nn.Module``; a bound method's owner and the owner's ``.model`` (a
:class:`edpairs.capture.ModelSplit`'s head); a ``functools.partial``'s function, arguments and
keywords; a function's closure cells and the module-level globals its code names (a notebook's
``def head(f): return model.fc(f)``); and, the same way, the functions, partials and bound
methods found there. Modules held only inside containers or in other attributes of objects are
not found: such a head runs them in the mode they are in (pass the module, or a bound method
of it, as the head).

    res = align(images, head, W, b, S, whitener=pairs.whitener_, signal=estimate,
                config=URAConfig(seed=0))
    res.W, res.b, res.S, res.history
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ._arrays import require_torch, to_numpy64
from ._progress import Progress
from ._checks import check_bool, check_int, check_real, is_int
from .refine import PlateauHalving

__all__ = ["ImageSource", "URAConfig", "URAResult", "align", "entropy", "filter_signal_orthogonality",
           "shift"]

REGULARIZERS = ("exclusive", "memberships", "stage", "none")


def _torch():
    return require_torch("Uncertainty Region Alignment (edpairs.ura)")


# ---------------------------------------------------------------------------------------
# Configuration and result


@dataclass
class URAConfig:
    """Schedule, weights and shift of URA.

    ``unconstrained_epochs`` / ``constrained_epochs``: passes over the images in each stage (0
    skips a stage), extended to at least ``min_steps`` optimiser steps per stage (small data
    sets have few batches per epoch; measured: 200 steps left the published preset at 5,000
    images short of converged on one platform); ``lr_unconstrained`` / ``lr_constrained``: Adam's learning rates, halved
    when an epoch's loss has not improved for ``plateau_patience`` epochs. ``batch_images``:
    whole images per step. ``kappa``: the range of the shift fraction κ. ``ura``: weight of
    the entropy loss; ``orthogonality``: weight of the filter–signal orthogonality (constrained
    stage). ``regularizer``: ``"stage"`` (the published stage-3 losses with the published
    weights, ``stage_unconstrained`` / ``stage_constrained``, :class:`edpairs.refine.RefineConfig`
    or dicts of its fields), ``"memberships"`` (binary cross-entropy of ``σ(fidelity_scale ·
    (W x − b) / sd)`` to the memberships at the start, weight ``fidelity``) or ``"none"``.
    ``exclusivity`` / ``sharpness``: weight and sharpness ``k`` of the ``"exclusive"``
    regulariser (soft count of firing detectors per patch against one; ``k`` in whitened
    units). ``resignal``: re-estimate the signal vectors by the stage-4 estimator after the constrained
    stage too (else the trained ``Ŝ`` are kept). ``thresholds``: ``"clusters"`` re-fits each
    threshold along the aligned filter to best reproduce its stage-2 cluster (as stage 2 does;
    measured: URA's own thresholds lost IoU after the constrained stage), ``"ura"`` keeps
    URA's. ``seed`` makes image order and κ reproducible.

    The entropy weight is the published 0.25 (DESIGN §7, against sparsity 2.6, max activation
    2.8, margin 0.6, inactive 5.0, ...; those are the defaults of ``regularizer="stage"``);
    ``exclusivity=10`` was chosen by measurement (with 1 the entropy term held the detectors
    short of the truth on the published preset: cos(ŝ, s) 0.98-0.99 instead of 0.996). The
    published epoch counts (800 and
    2000 + 2000 over ~63K images) are far longer than synthetic presets need: the defaults
    here converge on them in seconds (benchmarks/bench_ura.py)."""

    unconstrained_epochs: int = 20
    constrained_epochs: int = 20
    lr_unconstrained: float = 1e-2
    lr_constrained: float = 5e-3
    batch_images: int = 256
    kappa: tuple = (0.5, 0.9)
    ura: float = 0.25
    orthogonality: float = 1.0
    regularizer: str = "exclusive"
    stage_unconstrained: Any = None
    stage_constrained: Any = None
    fidelity: float = 1.0
    fidelity_scale: float = 4.0
    exclusivity: float = 10.0
    sharpness: float = 30.0
    resignal: bool = True
    thresholds: str = "clusters"
    min_steps: int = 400
    plateau_patience: Optional[int] = 3
    seed: Optional[int] = None

    def stage_configs(self):
        """The stage-3 loss configurations of the two stages (published weights by default)."""
        from .refine import RefineConfig

        def resolve(value, default):
            if value is None:
                return default
            if isinstance(value, dict):
                return dataclasses.replace(default, **value)
            if isinstance(value, RefineConfig):
                return value
            raise TypeError(f"a stage configuration must be a RefineConfig or a dict, got {type(value).__name__}")

        first = RefineConfig(sparsity=2.6, sparsity_bound=0.0, max_activation=2.8, margin=0.6, inactive=5.0,
                             excessive=0.0, tau=0.9)
        second = RefineConfig(sparsity=0.85, sparsity_bound=2.6, max_activation=2.8, margin=0.6, inactive=15.0,
                              excessive=15.0, tau=0.2, rho=1.0)
        return resolve(self.stage_unconstrained, first), resolve(self.stage_constrained, second)

    def validate(self) -> None:
        for name in ("unconstrained_epochs", "constrained_epochs", "min_steps"):
            check_int(f"URAConfig.{name}", getattr(self, name), 0)
        check_int("URAConfig.batch_images", self.batch_images)
        for name in ("lr_unconstrained", "lr_constrained", "fidelity_scale", "sharpness"):
            check_real(f"URAConfig.{name}", getattr(self, name), "a finite number > 0", lambda v: v > 0)
        for name in ("ura", "orthogonality", "fidelity", "exclusivity"):
            check_real(f"URAConfig.{name} (a loss weight)", getattr(self, name), "a finite number >= 0",
                       lambda v: v >= 0)
        try:
            lo, hi = (float(k) for k in self.kappa)
        except (TypeError, ValueError):
            raise ValueError(f"URAConfig.kappa must be a (low, high) pair, got {self.kappa!r}") from None
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"URAConfig.kappa must satisfy 0 <= low <= high <= 1, got {self.kappa!r}")
        if self.thresholds not in ("clusters", "ura"):
            raise ValueError(f"URAConfig.thresholds must be 'clusters' or 'ura', got {self.thresholds!r}")
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"URAConfig.regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        check_int("URAConfig.plateau_patience", self.plateau_patience, 0, optional=True)
        if self.seed is not None and not (is_int(self.seed) and 0 <= self.seed < 2**63):
            raise ValueError(f"URAConfig.seed must be an integer in [0, 2**63) or None, got {self.seed!r}")
        check_bool("URAConfig.resignal", self.resignal)
        for cfg in self.stage_configs():
            cfg.validate()


@dataclass
class URAResult:
    """What :func:`align` returns: raw-space ``W`` (I, D), ``b`` (I,) and ``S`` (I, D) as
    float64 numpy (``S``: the constrained stage's trained signal vectors, or the stage-4
    estimate when ``config.resignal``), and ``history``: per stage (``"unconstrained"``,
    ``"constrained"``) a list of per-epoch dicts (``epoch``, ``lr``, ``total``, ``entropy``
    (mean prediction entropy of the shifted images, nats), the regulariser's terms and
    ``orthogonality``)."""

    W: np.ndarray
    b: np.ndarray
    S: np.ndarray
    history: dict = field(default_factory=dict)
    config: Optional[URAConfig] = None


# ---------------------------------------------------------------------------------------
# The pieces, on torch tensors


def shift(X, W, b, S=None):
    """``dx`` of every row of ``X`` (n, D): the unconstrained ``Wᵀ (W Wᵀ)⁺ (W x − b)`` or, with
    ``S`` (I, D), the constrained ``Sᵀ (W Sᵀ)⁺ (W x − b)``. ``W`` (I, D), ``b`` (I,)."""
    torch = _torch()
    r = X @ W.T - b  # (n, I)
    if S is None:
        return r @ torch.linalg.pinv(W @ W.T, hermitian=True) @ W
    return r @ torch.linalg.pinv(W @ S.T).T @ S


def entropy(logits):
    """Prediction entropy (nats) of each row of ``logits`` (n, K)."""
    torch = _torch()
    logp = torch.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1)


def filter_signal_orthogonality(W, S):
    """``sqrt(mean_{i≠j} (ŵ_iᵀ ŝ_j)²)`` of unit filters ``W`` (I, D) and signal vectors ``S``."""
    torch = _torch()
    I = W.shape[0]
    if I < 2:
        return W.sum() * 0.0
    wu = W / W.norm(dim=1, keepdim=True)
    su = S / S.norm(dim=1, keepdim=True)
    O = wu @ su.T
    off = O * (1.0 - torch.eye(I, dtype=O.dtype, device=O.device))
    return torch.sqrt((off * off).sum() / (I * (I - 1)) + 1e-12)


# ---------------------------------------------------------------------------------------
# Images


class ImageSource:
    """Whole images of a layer: a 3-D ``(n_images, P, D)`` or 4-D ``(n_images, h, w, D)``
    channel-last array (numpy or torch), or an object whose ``images()`` returns a fresh
    iterator of such arrays (an activation store). ``patches()`` gives the flat (rows, D)
    chunks for stages 1-4 (the object's ``chunks()`` where it has one)."""

    def __init__(self, data, name: str = "X"):
        self.name = name
        self.array = None
        self.obj = None
        if hasattr(data, "images") and callable(data.images) and not hasattr(data, "shape"):
            self.obj = data
            self.shape = None
        elif hasattr(data, "shape") and hasattr(data, "dtype"):
            shape = tuple(int(s) for s in data.shape)
            if len(shape) not in (3, 4):
                raise ValueError(
                    f"with a head, {name} must hold whole images: pass images shaped (n_images, h, w, D) or "
                    f"(n_images, P, D) (e.g. layer.images()), got shape {shape}"
                )
            if shape[0] == 0 or int(np.prod(shape[1:-1])) == 0:
                raise ValueError(f"{name} holds no images or no patches: shape {shape}")
            self.array = data
            self.shape = shape
        else:
            raise TypeError(
                f"with a head, {name} must be an array of whole images ((n_images, h, w, D) or (n_images, P, D)) or "
                f"an object with an images() method, got {type(data).__name__}"
            )

    @property
    def n_features(self):
        return None if self.shape is None else self.shape[-1]

    def patches(self):
        """Flat (rows, D) patches: the array reshaped (no copy when contiguous), or a callable
        returning a fresh iterator of chunks."""
        if self.array is not None:
            return self.array.reshape(-1, self.shape[-1])
        if hasattr(self.obj, "chunks") and callable(self.obj.chunks):
            return self.obj.chunks
        return lambda: (_check_images(a, self.name).reshape(-1, a.shape[-1]) for a in self.obj.images())

    def batches(self, batch_images: int, generator=None):
        """Arrays of at most ``batch_images`` whole images, in a random order when a torch
        generator is given (over the array, or within each array the object yields)."""
        torch = _torch()
        arrays = [self.array] if self.array is not None else (
            _check_images(a, self.name) for a in self.obj.images())
        for a in arrays:
            n = int(a.shape[0])
            order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            for start in range(0, n, batch_images):
                idx = order[start:start + batch_images].sort().values
                if isinstance(a, np.ndarray):
                    yield a[idx.numpy()]
                else:
                    yield a[idx.to(a.device)] if hasattr(a, "device") else np.asarray(a)[idx.numpy()]


def _check_images(a, name):
    shape = tuple(int(s) for s in getattr(a, "shape", ()))
    if len(shape) not in (3, 4):
        raise ValueError(
            f"{name}.images() must yield (n_images, h, w, D) or (n_images, P, D) arrays, got shape {shape}")
    return a


def _as_tensor(a, device, dtype):
    torch = _torch()
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=dtype)
    a = np.asarray(a)
    return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------
# The head


def _head_modules(head) -> list:
    """The torch modules ``head`` reaches (the head contract, module docstring), each once, in the
    order found."""
    torch = _torch()
    modules, seen = [], set()
    pending = [head]  # a stack, not recursion: the functions a head names may form long chains
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        found = []
        if isinstance(obj, torch.nn.Module):
            modules.append(obj)
        elif isinstance(obj, functools.partial):
            found = [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, types.MethodType):
            # The owner, a ModelSplit's model (the owner's .model) and the function's own reach.
            found = [obj.__self__, getattr(obj.__self__, "model", None), obj.__func__]
        elif isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    found.append(cell.cell_contents)
                except ValueError:  # an empty cell: a name not bound yet
                    pass
            found += [obj.__globals__.get(name) for name in _code_names(obj.__code__)]
        pending += reversed(found)  # visited in the order found
    return modules


def _code_names(code) -> dict:
    """The names a code object and the code nested in it (comprehensions, lambdas) look up,
    in order: globals among them (attribute names too, which match a global only by chance)."""
    names = dict.fromkeys(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.update(_code_names(const))
    return names


@contextlib.contextmanager
def frozen(head):
    """Every torch module the head reaches in eval mode with requires_grad off; the training and
    requires_grad flags restored on exit, also on an error."""
    roots = _head_modules(head)
    modes = {id(m): (m, m.training) for root in roots for m in root.modules()}
    flags = {id(p): (p, p.requires_grad) for root in roots for p in root.parameters()}
    try:
        for p, _ in flags.values():
            p.requires_grad_(False)
        for root in roots:
            root.eval()
        yield head
    finally:
        for p, flag in flags.values():
            p.requires_grad_(flag)
        # Flag by flag, not by train() (which recurses): the roots may share submodules, or one
        # may sit inside another, and a later train() would overwrite an earlier restored mode.
        for m, mode in modes.values():
            m.training = mode


def _head_device(head):
    """The device of the first parameter or buffer of the modules the head reaches (None: none)."""
    for module in _head_modules(head):
        for t in itertools.chain(module.parameters(), module.buffers()):
            return t.device
    return None


def _logits(head, features, differentiable: bool):
    """head(features) with the shapes checked and a failure reported with them; with
    ``differentiable``, logits through which the gradient reaches ``features``."""
    torch = _torch()
    try:
        out = head(features)
    except Exception as exc:  # noqa: BLE001 - say which shape the head was given
        raise RuntimeError(
            f"the head raised {type(exc).__name__} on features of shape {tuple(features.shape)} "
            f"(dtype {features.dtype}, device {features.device}); URA calls head(features) with channel-last "
            f"(n_images, h, w, D) or (n_images, P, D) float32 torch tensors and expects (n_images, n_classes) "
            f"logits: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        need = ", differentiable with respect to the features" if differentiable else ""
        raise TypeError(f"the head must return a torch tensor of logits{need}, got {type(out).__name__}")
    if out.dim() != 2 or out.shape[0] != features.shape[0]:
        raise ValueError(
            f"the head must return 2-D (n_images, n_classes) logits; for features of shape "
            f"{tuple(features.shape)} it returned shape {tuple(out.shape)}"
        )
    if out.shape[1] < 2:
        raise ValueError(f"the head must return logits for at least 2 classes, got shape {tuple(out.shape)}")
    if differentiable and features.requires_grad and not out.requires_grad:
        raise TypeError(
            "the head must be differentiable (a torch function of its input whose output requires grad): URA's "
            "entropy loss (URAConfig.ura > 0) trains the detectors through it; given features with "
            f"requires_grad=True it returned a {type(out).__name__} with requires_grad=False (detached, computed "
            "under torch.no_grad, or not computed from the features?)"
        )
    return out


# ---------------------------------------------------------------------------------------
# Alignment


def align(images, head, W, b, S, *, whitener, signal: Optional[Callable] = None, thresholds: Optional[Callable] = None,
          config: Optional[URAConfig] = None, device=None, progress: Optional[bool] = None) -> URAResult:
    """Aligns detectors ``W`` (I, D), ``b`` (I,) and signal vectors ``S`` (I, D) (raw
    coordinates, numpy) with the head's uncertainty region.

    ``images``: an :class:`ImageSource` or what it accepts. ``whitener``: the stage-1
    :class:`edpairs.cluster.Whitener` (the coordinates of the optimisation). ``signal(W, b)``:
    the stage-4 estimator, returning (I, D) signal vectors for raw detectors (used between the
    stages and, with ``config.resignal``, at the end); without it the given ``S`` is used.
    The constrained stage starts from ``signal``'s estimate for the unconstrained stage's
    detectors; without ``signal`` it starts from the given ``S`` (measured: recovery then
    depends on the platform's rounding; :meth:`edpairs.EDPairs.fit` always passes it).
    ``thresholds(W)``: the stage-2 threshold rule, (I,) thresholds for raw filters, applied to
    the aligned filters when ``config.thresholds == "clusters"``.
    ``device``: where to compute (default: the head's, else the images', else the CPU)."""
    torch = _torch()
    cfg = config or URAConfig()
    if not isinstance(cfg, URAConfig):
        raise TypeError(f"config must be a URAConfig, got {type(cfg).__name__}")
    cfg.validate()
    if not callable(head):
        raise TypeError(f"head must be callable (features -> logits), got {type(head).__name__}")
    from .cluster import Whitener

    if not isinstance(whitener, Whitener):
        raise TypeError(f"whitener must be the stage-1 edpairs.cluster.Whitener, got {type(whitener).__name__}")
    W0, b0 = to_numpy64(W), to_numpy64(b)
    D = int(whitener.mean.shape[0])
    S0 = None if S is None else to_numpy64(S)
    if W0.ndim != 2 or W0.shape[1] != D or b0.shape != W0.shape[:1] or (S0 is not None and S0.shape != W0.shape):
        raise ValueError(f"align needs W (I, {D}), b (I,) and S (I, {D}) for the whitener's D = {D}, got shapes "
                         f"{W0.shape}, {b0.shape} and {None if S0 is None else S0.shape}")
    if S0 is None and signal is None:
        raise ValueError("align needs the signal vectors S (I, D), or signal(W, b) to estimate them")
    for name, a in (("W", W0), ("b", b0), ("S", S0)):
        if a is not None and not np.isfinite(a).all():
            raise ValueError(f"align: {name} contains NaN or Inf")
    if not np.any(W0, axis=1).all():
        raise ValueError(f"align: W has zero rows {np.flatnonzero(~np.any(W0, axis=1)).tolist()}: a detector needs a "
                         "direction")
    source = images if isinstance(images, ImageSource) else ImageSource(images)
    if device is None:
        device = _head_device(head)
    if device is None and source.array is not None and isinstance(source.array, torch.Tensor):
        device = source.array.device
    device = torch.device(device or "cpu")
    f64 = dict(dtype=torch.float64, device=device)
    P = torch.as_tensor(np.asarray(whitener.P, np.float64), **f64)  # (r, D)
    mean = torch.as_tensor(np.asarray(whitener.mean, np.float64), **f64)
    Pinv = torch.linalg.pinv(P)  # (D, r): x - mean = Pinv z on the data span
    # Whitened detectors: c = W Pinv (W restricted to the span), t = b - W mean.
    C = torch.as_tensor(W0, **f64) @ Pinv
    t = torch.as_tensor(b0, **f64) - torch.as_tensor(W0, **f64) @ mean
    gen = torch.Generator()
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(cfg.seed))
    first, second = cfg.stage_configs()
    history = {}
    start_C, start_t = C.clone(), t.clone()

    def raw(Cw, tw):
        Wr = Cw @ P
        return Wr, tw + Wr @ mean

    n_batches = None
    if source.array is not None:
        n_batches = -(-source.shape[0] // cfg.batch_images)
    total = None
    if n_batches is not None:
        total = sum(max(e * n_batches, cfg.min_steps) if e else 0
                    for e in (cfg.unconstrained_epochs, cfg.constrained_epochs))
    bar = Progress(total=total, desc="edpairs: URA", enabled=progress, unit=" batches")
    try:
        with frozen(head):
            if cfg.unconstrained_epochs:
                C, t, _, history["unconstrained"] = _stage(
                    source, head, C, t, None, P, Pinv, mean, cfg, first, cfg.unconstrained_epochs,
                    cfg.lr_unconstrained, gen, bar, "unconstrained", start_C, start_t)
            Wr, br = raw(C, t)
            S_now = S0
            if signal is not None and cfg.constrained_epochs:
                S_now = np.asarray(signal(Wr.cpu().numpy(), br.cpu().numpy()), np.float64)
            if cfg.constrained_epochs:
                G = torch.as_tensor(S_now, **f64) @ P.T  # whitened-space signal vectors: S = G Pinv^T
                C, t, G, history["constrained"] = _stage(
                    source, head, C, t, G, P, Pinv, mean, cfg, second, cfg.constrained_epochs,
                    cfg.lr_constrained, gen, bar, "constrained", start_C, start_t)
                S_now = (G @ Pinv.T).cpu().numpy()
    finally:
        bar.close()
    Wr, br = raw(C, t)
    Wr, br = Wr.cpu().numpy(), br.cpu().numpy()
    if thresholds is not None and cfg.thresholds == "clusters":
        br = np.asarray(thresholds(Wr), np.float64)
    if signal is not None and (cfg.resignal or not cfg.constrained_epochs):
        S_now = np.asarray(signal(Wr, br), np.float64)
    return URAResult(W=Wr, b=br, S=S_now, history=history, config=cfg)


def _ura_divergence(stage: str, epoch: int, step: int, seen: str, lr: float, finite_logits: bool = True) -> str:
    """The FloatingPointError message when URA diverges: what was seen, then the causes that fit
    it (the learning rate only after the stage has taken a step)."""
    if not finite_logits:
        cause = "the head returned non-finite logits"
    elif step > 1:
        cause = (f"too large a learning rate (lr = {lr:g}) sent the detectors or signal vectors to values the head "
                 "or the loss cannot take")
    else:
        cause = "the data, detectors or signal vectors hold values beyond the float32 range before any update"
    return f"URA diverged in the {stage} stage at step {step} (epoch {epoch}): {seen}; likely cause: {cause}"


def _stage(source, head, C, t, G, P, Pinv, mean, cfg, stage_cfg, epochs, lr, gen, bar, name, start_C, start_t):
    """One URA stage: Adam on (C, t) (and G when constrained) over batches of whole images."""
    torch = _torch()
    from .refine import _weighted_total, loss_terms

    device = C.device
    I = C.shape[0]
    C = C.float().clone().requires_grad_()
    t = t.float().clone().requires_grad_()
    params = [C, t]
    if G is not None:
        G = G.float().clone().requires_grad_()
        params.append(G)
    P32, Pinv32, mean32 = P.float(), Pinv.float(), mean.float()
    start_C32, start_t32 = start_C.float(), start_t.float()
    opt = torch.optim.Adam(params, lr=lr, eps=1e-4)  # a larger eps: less noise amplified along flat directions
    weights = stage_cfg.weights() if cfg.regularizer == "stage" else {}
    stage_cfg = dataclasses.replace(stage_cfg, rho=stage_cfg.resolved_rho(I))
    k_lo, k_hi = (float(k) for k in cfg.kappa)
    plateau = PlateauHalving(opt, lr, cfg.plateau_patience)
    records = []
    steps = 0
    epoch = 0
    # At least ``epochs`` passes and ``min_steps`` steps: on few images an epoch is a few steps.
    while epoch < epochs or steps < cfg.min_steps:
        sums: dict = {}
        count = 0
        for batch in source.batches(cfg.batch_images, gen):
            steps += 1
            X = _as_tensor(batch, device, torch.float32)  # (n, ..., D)
            shape = X.shape
            n = shape[0]
            flat = X.reshape(-1, shape[-1])  # (n * patches, D)
            z = (flat - mean32) @ P32.T  # whitened patches (n * patches, r)
            Wr = C @ P32
            br = t + Wr @ mean32
            Sr = None if G is None else G @ Pinv32.T
            try:
                dx = shift(flat, Wr, br, Sr)
            except RuntimeError as exc:  # torch's LinAlgError: a pseudo-inverse of non-finite products
                seen = (f"the shifts could not be formed ({type(exc).__name__}; largest |w| "
                        f"{float(Wr.detach().abs().max()):.3g})")
                raise FloatingPointError(_ura_divergence(name, epoch, steps, seen, lr)) from exc
            kappa = k_lo + (k_hi - k_lo) * torch.rand(n, generator=gen)
            kappa = kappa.to(device).repeat_interleave(flat.shape[0] // n)[:, None]
            logits = _logits(head, (flat - kappa * dx).reshape(shape), differentiable=cfg.ura > 0)
            H = entropy(logits).mean()
            terms = {"entropy": H}
            total = -cfg.ura * H
            if cfg.regularizer == "stage":
                st = loss_terms(z, C.T, t, stage_cfg, n_detectors=I)
                terms.update(st)
                total = total + _weighted_total(st, weights)
            elif cfg.regularizer == "exclusive":
                # Soft count of the detectors firing on each patch, against exactly one; the
                # memberships use the whitened distance to each hyperplane, so ``sharpness`` is
                # in units of the data's spread and does not depend on the filters' norms.
                y = torch.sigmoid(cfg.sharpness * (z @ C.T - t) / C.norm(dim=1))
                ex = ((y.sum(1) - 1.0) ** 2).mean()
                terms["exclusivity"] = ex
                total = total + cfg.exclusivity * ex
            elif cfg.regularizer == "memberships":
                with torch.no_grad():
                    target = (z @ start_C32.T - start_t32 > 0).float()
                scale = cfg.fidelity_scale / C.norm(dim=1).detach()
                bce = torch.nn.functional.binary_cross_entropy_with_logits((z @ C.T - t) * scale, target)
                terms["memberships"] = bce
                total = total + cfg.fidelity * bce
            if G is not None:
                orth = filter_signal_orthogonality(Wr, Sr)
                terms["orthogonality"] = orth
                total = total + cfg.orthogonality * orth
            terms["total"] = total
            values = {key: float(v.detach()) for key, v in terms.items()}
            if not math.isfinite(values["total"]):  # checked before the step: NaN parameters break shift()
                bad = ", ".join(f"{k} {v}" for k, v in values.items() if not math.isfinite(v))
                raise FloatingPointError(_ura_divergence(name, epoch, steps, f"the loss became non-finite ({bad})", lr,
                                                         finite_logits=bool(torch.isfinite(logits.detach()).all())))
            # Gradients of URA's own parameters only: a head that is a plain callable (e.g. a
            # model split's tail) gets no .grad written onto the network's parameters.
            params = [p for group in opt.param_groups for p in group["params"]]
            for p, g in zip(params, torch.autograd.grad(total, params, allow_unused=True)):
                p.grad = g
            opt.step()
            for key, v in values.items():
                sums[key] = sums.get(key, 0.0) + v * n
            count += n
            bar.update(1, note=f"{name} {epoch + 1}/{epochs} H {float(H.detach()):.4f}")
        record = {"epoch": epoch, "lr": lr}
        record.update({k: v / max(count, 1) for k, v in sums.items()})
        records.append(record)
        lr = plateau.step(record["total"])
        epoch += 1
    out_G = None if G is None else G.detach().double()
    return C.detach().double(), t.detach().double(), out_G, records
