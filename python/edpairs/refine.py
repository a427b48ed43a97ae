"""Stage 3 of edpairs (DESIGN §2): optional gradient refinement of concept detectors.

Detectors ``y_p = σ(Wᵀx_p − b)`` found by directional clustering (stage 2) are refined by Adam
on minibatches with the published unsupervised objective over the memberships of each patch:

* sparsity          mean_p H(q_p),  q_p = y_p / ‖y_p‖₁   (one concept per patch)
* sparsity bound    R_p(H(q_p))                           (soft maximum of the entropies)
* maximum activation mean_p −Σ_i q_{p,i} log y_{p,i}      (the dominant detector saturates)
* margin            mean_i ‖w_i‖,  w_i = u_i / M_i, ‖u_i‖ = 1  (wide margins M_i)
* inactive floor    R_i(max(0, τ/I − mean_p y_{p,i}))     (every detector fires somewhere)
* excessive cap     R_i(max(0, mean_p y_{p,i} − ρ))       (no detector fires everywhere)

where ``R(L) = Σ L_k^{ν+1} / Σ L_k^ν`` is the self-weighted soft maximum (ν = 4). The losses
that need the network head (URA, filter–signal orthogonality; DESIGN §2 stage 5) are not here:
``extra_loss(W, b, batch)`` is the extension point through which they are added to the
objective.

The optimisation runs in standardised coordinates ``x' = (x − center) / scale`` (as the
published unconstrained stage does) and the detectors are mapped back to raw coordinates
exactly, so the returned ``W, b`` apply to raw activations. Torch is imported lazily, so
``import edpairs`` does not need it.

    res = refine_detectors(X, W, b, config=RefineConfig(epochs=20, seed=0))
    res.W, res.b, res.history
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from ._arrays import device_scope, require_torch
from ._checks import check_int, check_real
from ._checks import is_int as _is_int
from ._progress import Progress

__all__ = [
    "LOSS_TERMS",
    "RefineConfig",
    "RefineResult",
    "evaluate_detectors",
    "loss_terms",
    "refine_detectors",
    "self_weighted_reduce",
    "to_raw",
    "to_standardized",
]

#: The loss terms, in the order of the weights of :class:`RefineConfig`.
LOSS_TERMS = ("sparsity", "sparsity_bound", "max_activation", "margin", "inactive", "excessive")

# Elements per block when a pass over the data only accumulates statistics (centre / scale):
# bounds the float64 working copy (32 MiB) independently of the chunk size.
_STATS_BLOCK_ELEMENTS = 1 << 22

# Floors that keep subnormal floats out of the computation (see _memberships and _reduce).
_EXP_FLOOR = -60.0
_SMALL = 1e-30


class PlateauHalving:
    """Halves an optimiser's learning rate when the epoch loss stalls: after more than
    ``patience`` epochs without a relative improvement of 1e-4 over the best (None: never).
    :meth:`step` takes the epoch's loss and returns the rate for the next epoch."""

    def __init__(self, opt, lr: float, patience: Optional[int]):
        self.opt, self.lr, self.patience = opt, float(lr), patience
        self.best, self.bad = math.inf, 0

    def step(self, loss: float) -> float:
        if self.best == math.inf or loss < self.best - 1e-4 * abs(self.best):
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.patience is not None and self.bad > self.patience:
                self.lr *= 0.5
                for group in self.opt.param_groups:
                    group["lr"] = self.lr
                self.bad = 0
        return self.lr


def _torch():
    return require_torch("edpairs.refine")


# ---------------------------------------------------------------------------------------
# Configuration and result


@dataclass
class RefineConfig:
    """Weights, constraints and schedule of the refinement.

    The weights default to the first (unconstrained) published stage (DESIGN §7): sparsity
    2.6, max activation 2.8, margin 0.6, inactive 5.0; the later stages add the sparsity
    bound (2.6) and the excessive-activity cap (15.0). ``tau``: every detector should fire on
    at least ``tau / I`` of the patches; ``rho``: none on more than ``rho`` of them (default
    ``min(1, 12 tau / I)``). ``gamma`` sharpens memberships, ``y = σ(z)^γ`` (1.1 in the
    synthetic study). ``nu`` is the exponent of the soft maximum. ``lr`` is Adam's learning
    rate, halved when the epoch loss has not improved for ``plateau_patience`` epochs
    (``None`` never halves). ``seed`` makes the minibatch order reproducible."""

    sparsity: float = 2.6
    sparsity_bound: float = 0.0
    max_activation: float = 2.8
    margin: float = 0.6
    inactive: float = 5.0
    excessive: float = 0.0
    tau: float = 0.9
    rho: float | None = None
    gamma: float = 1.0
    nu: float = 4.0
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 4096
    plateau_patience: int | None = 3
    seed: int | None = None

    def weights(self) -> dict:
        """The loss weights by term name."""
        return {name: float(getattr(self, name)) for name in LOSS_TERMS}

    def resolved_rho(self, n_detectors: int) -> float:
        """ρ, with the default ``min(1, 12 τ / I)`` filled in (a fraction of patches cannot
        exceed 1, and for I ≤ 10 the published 12τ/I would)."""
        if self.rho is not None:
            return float(self.rho)
        return min(1.0, 12.0 * float(self.tau) / n_detectors)

    def validate(self) -> None:
        """Raises ValueError for settings outside their domain."""
        for name in LOSS_TERMS:
            check_real(f"RefineConfig.{name} (a loss weight)", getattr(self, name), "a finite number >= 0",
                       lambda v: v >= 0)
        check_real("RefineConfig.tau", self.tau, "in (0, 1]", lambda v: 0 < v <= 1)
        if self.rho is not None:
            check_real("RefineConfig.rho", self.rho, "in (0, 1] (or None for 12*tau/I)", lambda v: 0 < v <= 1)
        for name in ("gamma", "lr"):
            check_real(f"RefineConfig.{name}", getattr(self, name), "a finite number > 0", lambda v: v > 0)
        check_real("RefineConfig.nu", self.nu, "a finite number >= 0", lambda v: v >= 0)
        for name in ("epochs", "batch_size"):
            check_int(f"RefineConfig.{name}", getattr(self, name))
        check_int("RefineConfig.plateau_patience", self.plateau_patience, 0, optional=True)
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            raise ValueError(f"RefineConfig.seed must be an integer in [0, 2**63) or None, got {self.seed!r}")


@dataclass
class RefineResult:
    """What :func:`refine_detectors` returns.

    ``W`` (D, I) and ``b`` (I,): refined detectors in raw coordinates, in the library, device
    and dtype of the input ``W`` (an integer ``W`` gives float64 numpy or float32 torch).
    ``W_standardized``, ``b_standardized``: the same detectors in the coordinates the
    optimisation used, ``(x − center) / scale`` (also returned, like ``W``). ``history``: one
    dict per epoch with ``epoch``, ``lr``, ``total`` (the weighted objective) and each
    unweighted term (``extra`` when an ``extra_loss`` was given), averaged over the epoch's
    minibatches. ``config``: the configuration used, ``rho`` filled in."""

    W: Any
    b: Any
    history: list = field(default_factory=list)
    config: RefineConfig | None = None
    center: Any = None
    scale: Any = None
    W_standardized: Any = None
    b_standardized: Any = None


# ---------------------------------------------------------------------------------------
# The losses


def self_weighted_reduce(L, nu: float = 4.0, dim: int = -1):
    """Soft maximum ``R(L) = Σ L_k^{ν+1} / Σ L_k^ν`` of non-negative values along ``dim``.

    ν = 0 gives the mean, ν → ∞ the maximum; all-zero input gives 0. Computed on ``L / max L``
    (R is homogeneous of degree 1), so large ν neither overflows nor underflows; zeros are
    kept out of the power so the gradient stays finite at exact zeros (hinge losses)."""
    torch = _torch()
    L = torch.as_tensor(L)
    if not L.is_floating_point():
        L = L.to(torch.get_default_dtype())
    if L.numel() == 0:
        raise ValueError("self_weighted_reduce needs at least one value")
    check_real("nu", nu, "a finite number >= 0", lambda v: v >= 0)
    if bool((L.detach() < 0).any()):
        raise ValueError("self_weighted_reduce is defined for non-negative values")
    return _reduce(L, float(nu), dim)


def _reduce(L, nu: float, dim: int = -1):
    torch = _torch()
    if nu == 0.0:
        return L.mean(dim)
    tiny = torch.finfo(L.dtype).tiny
    # The scale is a constant for autograd: R(L) = m R(L / m) for any fixed m > 0.
    m = L.detach().amax(dim, keepdim=True).clamp_min(tiny)
    r = L / m
    # Values below r_min = 1e-30^(1/(ν+1)) of the maximum are left out: they change R by less
    # than 1e-30 each, and their powers would be subnormal floats, which make the CPU crawl
    # (tiny entropies of confident patches are common). Exact zeros are left out too, which
    # keeps the gradient finite there.
    keep = r > _SMALL ** (1.0 / (nu + 1.0))
    p = torch.where(keep, torch.where(keep, r, torch.ones_like(r)) ** nu, torch.zeros_like(r))
    return m.squeeze(dim) * (p * r).sum(dim) / p.sum(dim).clamp_min(tiny)


def _memberships(z, gamma: float):
    """log y, y, log q and q of detector outputs z (patches × detectors), y = σ(z)^γ.

    Written out rather than with torch's log_sigmoid / log_softmax because those compute
    exp(−|z|) and exp(a − max a) unclamped: beyond |z| ≈ 87 (float32) the results are
    subnormal and every op on them is ~100x slower on a CPU. Arguments of exp are clamped at
    −60 instead; what that drops (< e^−60 ≈ 1e−26 relative) is invisible in float32 and in
    the gradients."""
    torch = _torch()
    logy = gamma * (torch.clamp_max(z, 0.0) - torch.log1p(torch.exp(-z.abs().clamp_max(-_EXP_FLOOR))))
    y = torch.exp(logy.clamp_min(_EXP_FLOOR))
    top = logy.detach().amax(1, keepdim=True)  # any constant per row gives the same softmax
    logq = logy - top - torch.log(torch.exp((logy - top).clamp_min(_EXP_FLOOR)).sum(1, keepdim=True))
    q = torch.exp(logq.clamp_min(_EXP_FLOOR))
    return logy, y, logq, q


def loss_terms(X, W, b, config: RefineConfig | None = None, *, n_detectors: int | None = None) -> dict:
    """The unweighted loss terms of one batch, as differentiable torch scalars.

    ``X`` (B, D), ``W`` (D, I), ``b`` (I,): torch tensors in the same coordinates (those of
    the optimisation: standardised in :func:`refine_detectors`); the dtype of the inputs is
    kept. Returns a dict with the keys of :data:`LOSS_TERMS`:

    * ``z = X W − b``, ``y = σ(z)^γ`` (``log y = γ log σ(z)``); ``q_p = y_p / Σ_i y_{p,i}``
      (a softmax of ``log y``, so it is exact even when every ``y_{p,i}`` underflows);
    * ``sparsity = mean_p H(q_p)``, ``H(q) = −Σ_i q_i log q_i``;
    * ``sparsity_bound = R_p(H(q_p))``;
    * ``max_activation = mean_p (−Σ_i q_{p,i} log y_{p,i})``;
    * ``margin = mean_i ‖w_i‖`` (= mean_i 1 / M_i);
    * ``inactive = R_i(max(0, τ/I − f_i))``, ``f_i = mean_p y_{p,i}`` (the soft firing rate);
    * ``excessive = R_i(max(0, f_i − ρ))``.

    ``R`` is :func:`self_weighted_reduce` with ``config.nu``; ``I`` is ``W.shape[1]`` unless
    ``n_detectors`` says otherwise (τ/I and the default ρ depend on it)."""
    torch = _torch()
    cfg = config or RefineConfig()
    I = int(n_detectors or W.shape[1])
    nu = float(cfg.nu)
    logy, y, logq, q = _memberships(X @ W - b, float(cfg.gamma))
    H = -(q * logq).sum(1)
    rate = y.mean(0)
    return {
        "sparsity": H.mean(),
        "sparsity_bound": _reduce(H, nu),
        "max_activation": -(q * logy).sum(1).mean(),
        "margin": W.norm(dim=0).mean(),
        "inactive": _reduce(torch.relu(float(cfg.tau) / I - rate), nu),
        "excessive": _reduce(torch.relu(rate - cfg.resolved_rho(I)), nu),
    }


def _weighted_total(terms: dict, weights: dict):
    total = 0.0
    for name, w in weights.items():
        if w != 0.0:  # a zero weight must not turn a non-finite term into NaN
            total = total + w * terms[name]
    return total


# ---------------------------------------------------------------------------------------
# Coordinates


def to_standardized(W, b, center, scale):
    """Detectors on raw ``x`` → the same detectors on ``x' = (x − center) / scale``:
    ``w' = scale ⊙ w``, ``b' = b − wᵀcenter``. Torch float64 in, torch float64 out."""
    return W * scale[:, None], b - center @ W


def to_raw(W, b, center, scale):
    """Inverse of :func:`to_standardized`: ``w = w' / scale``, ``b = b' + wᵀcenter``."""
    W_raw = W / scale[:, None]
    return W_raw, b + center @ W_raw


# ---------------------------------------------------------------------------------------
# Array plumbing


def _root(x) -> str:
    return type(x).__module__.split(".", 1)[0]


def _as_tensor(x, name: str):
    """x as a torch tensor without copying where possible (numpy, torch, DLPack producers)."""
    torch = _torch()
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        # from_numpy warns on read-only arrays (memory maps, broadcast views): copy those.
        return torch.from_numpy(x if x.flags.writeable else x.copy())
    if hasattr(x, "__dlpack__") and _root(x) != "numpy":
        return torch.from_dlpack(x)
    try:
        arr = np.asarray(x)
    except Exception as exc:  # noqa: BLE001 - report what arrived
        raise TypeError(f"{name} must be an array (numpy, torch or a DLPack producer), got {type(x).__name__}") from exc
    if arr.dtype == object:
        raise TypeError(f"{name} must be a numeric array, got {type(x).__name__}")
    return torch.from_numpy(arr)


def _check_real(t, name: str) -> None:
    torch = _torch()
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {t.dtype}")


def _like(t, ref):
    """t (torch) in the library, device and floating dtype of ref."""
    torch = _torch()
    if isinstance(ref, torch.Tensor):
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        return t.to(device=ref.device, dtype=dtype)
    if isinstance(ref, np.ndarray):
        dtype = ref.dtype if np.issubdtype(ref.dtype, np.floating) else np.float64
        return t.detach().cpu().numpy().astype(dtype, copy=False)
    root = _root(ref)
    if hasattr(ref, "__dlpack__") and root not in ("numpy", "builtins"):
        # e.g. cupy: hand the tensor back through DLPack, on the device it was computed on.
        mod = importlib.import_module(root)
        with device_scope(ref):  # (cupy's astype runs on the current device)
            out = mod.from_dlpack(t.to(torch.float32).contiguous())
            return out.astype(ref.dtype) if hasattr(out, "astype") else out
    return t.detach().cpu().numpy().astype(np.float64, copy=False)


class _Source:
    """The data: one (N, D) array, a sequence of chunks, a re-iterable of chunks, a
    zero-argument callable returning an iterator of chunks, or an object whose ``chunks()``
    returns one (the chunk source protocol of edpairs._source). Chunks stay in their library
    (numpy memory maps are read only where a batch needs rows)."""

    def __init__(self, X, D: int):
        self.D = D
        if _is_array(X):
            self.kind, self.obj = "array", X
            self._check_chunk(X, 0)
        elif callable(getattr(X, "chunks", None)):
            self.kind, self.obj = "callable", X.chunks
        elif callable(X):
            self.kind, self.obj = "callable", X
        elif isinstance(X, (list, tuple)):
            self.kind, self.obj = "sequence", list(X)
        elif hasattr(X, "__iter__"):
            if iter(X) is X:
                raise ValueError(
                    "X is a one-shot iterator, but refinement reads the data once per epoch: pass a list of "
                    "chunks or a zero-argument callable that returns a fresh iterator"
                )
            self.kind, self.obj = "iterable", X
        else:
            raise TypeError(
                f"X must be an (N, D) array, a list of (n, D) chunks, a callable returning an iterator of "
                f"chunks or an object with a chunks() method, got {type(X).__name__}"
            )

    def _check_chunk(self, c, k: int):
        shape = tuple(getattr(c, "shape", ()))
        where = "X" if self.kind == "array" else f"chunk {k} of X"
        if len(shape) != 2:
            raise ValueError(f"{where} must be 2-D (patches, D), got shape {shape}")
        if shape[1] != self.D:
            raise ValueError(f"{where} has D = {shape[1]} features but W has {self.D} rows (W must be (D, I))")

    def chunks(self, generator=None):
        """The chunks in reading order, as numpy arrays or torch tensors. A sequence is read in
        a random order when a generator is given (a chunk per class must not become a
        phase of training)."""
        torch = _torch()
        if self.kind == "array":
            items = [self.obj]
        elif self.kind == "sequence":
            items = self.obj
            if generator is not None and len(items) > 1:
                items = [items[int(i)] for i in torch.randperm(len(items), generator=generator)]
        elif self.kind == "callable":
            items = self.obj()
        else:
            items = iter(self.obj)
        for k, c in enumerate(items):
            if not _is_array(c):
                c = _as_tensor(c, f"chunk {k} of X")
            self._check_chunk(c, k)
            yield c

    def batches(self, batch_size: int, generator, device, check_finite: bool):
        """Shuffled float32 minibatches on ``device``. Rows left over at the end of a chunk are
        completed from the next chunk, so every batch but the last is full; at most one chunk
        and one batch are held beyond the input."""
        torch = _torch()
        pending, n_pending = [], 0
        total = 0
        for k, chunk in enumerate(self.chunks(generator)):
            n = int(chunk.shape[0])
            total += n
            # Without a generator (evaluation) rows are read in order: no global RNG is touched.
            perm = torch.arange(n) if generator is None else torch.randperm(n, generator=generator)
            pos = 0
            while pos < n:
                take = min(batch_size - n_pending, n - pos)
                piece = _take_rows(chunk, perm[pos : pos + take], device)
                pos += take
                if check_finite and not bool(torch.isfinite(piece).all()):
                    raise ValueError(f"X contains NaN or Inf (in {'X' if self.kind == 'array' else f'chunk {k}'})")
                pending.append(piece)
                n_pending += take
                if n_pending == batch_size:
                    yield pending[0] if len(pending) == 1 else torch.cat(pending)
                    pending, n_pending = [], 0
        if n_pending:
            yield pending[0] if len(pending) == 1 else torch.cat(pending)
        if total == 0:
            raise ValueError("X holds no rows (patches)")


def _is_array(x) -> bool:
    return _root(x) in ("numpy", "torch", "cupy") and hasattr(x, "shape") and hasattr(x, "dtype")


def _take_rows(chunk, idx, device):
    """Rows idx of chunk as a float32 torch tensor on device. Indices are sorted: the order
    inside a batch does not matter to the losses, and sorted reads are what a memory map
    wants."""
    torch = _torch()
    idx = idx.sort().values
    if isinstance(chunk, np.ndarray):
        rows = torch.from_numpy(np.ascontiguousarray(chunk[idx.numpy()]))
    else:
        t = _as_tensor(chunk, "X")
        _check_real(t, "X")
        rows = t.index_select(0, idx.to(t.device))
    return rows.to(device=device, dtype=torch.float32, non_blocking=True)


def _data_statistics(source: _Source, device):
    """Mean and std (population) of every column, float64, in one pass over blocks of rows.
    Sums are taken about a shift (the first block's mean) so a large offset does not cancel
    the variance. Also the finiteness check of the data, before any training."""
    torch = _torch()
    shift = s1 = s2 = None
    n = 0
    rows = max(1, _STATS_BLOCK_ELEMENTS // source.D)
    for k, chunk in enumerate(source.chunks()):
        for start in range(0, int(chunk.shape[0]), rows):
            block = chunk[start : start + rows]
            t = _as_tensor(np.ascontiguousarray(block) if isinstance(block, np.ndarray) else block, "X")
            _check_real(t, "X")
            t = t.to(device=device, dtype=torch.float64)
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"X contains NaN or Inf (in {'X' if source.kind == 'array' else f'chunk {k}'})")
            if shift is None:
                shift = t.mean(0)
                s1 = torch.zeros_like(shift)
                s2 = torch.zeros_like(shift)
            d = t - shift
            s1 += d.sum(0)
            s2 += (d * d).sum(0)
            n += t.shape[0]
    if n == 0:
        raise ValueError("X holds no rows (patches)")
    mean_d = s1 / n
    var = (s2 / n - mean_d * mean_d).clamp_min(0.0)
    return shift + mean_d, var.sqrt()


def _resolve_standardization(source: _Source, center, scale, D: int, device):
    """(center, scale) as float64 tensors on device; missing ones from the data, the std
    floored at 1e-6 of the largest (a constant column must not divide by zero)."""
    torch = _torch()
    mean = std = None
    if center is None or scale is None:
        mean, std = _data_statistics(source, device)
    out = []
    for name, given, default in (("center", center, mean), ("scale", scale, std)):
        if given is None:
            v = default
            if name == "scale":
                top = float(v.max())
                v = v.clamp_min(1e-6 * top if top > 0 else 1.0)
        else:
            v = _as_tensor(given, name)
            _check_real(v, name)
            v = v.to(device=device, dtype=torch.float64)
            if v.dim() == 0:
                v = v.expand(D).clone()
            if tuple(v.shape) != (D,):
                raise ValueError(f"{name} must be a scalar or have shape (D,) = ({D},), got {tuple(v.shape)}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name} contains NaN or Inf")
            if name == "scale" and not bool((v > 0).all()):
                raise ValueError("scale must be > 0 in every column")
        out.append(v)
    return out[0], out[1]


def _validate_detectors(W, b):
    torch = _torch()
    Wt = _as_tensor(W, "W")
    bt = _as_tensor(b, "b")
    _check_real(Wt, "W")
    _check_real(bt, "b")
    # Integer detectors are real values (as ops._param treats parameters); norms need a float.
    Wt, bt = (t if t.is_floating_point() else t.double() for t in (Wt, bt))
    if Wt.dim() != 2:
        raise ValueError(f"W must be 2-D (D, I): one column per detector, got shape {tuple(Wt.shape)}")
    D, I = Wt.shape
    if D == 0 or I == 0:
        raise ValueError(f"W must have at least one row and one column, got shape {tuple(Wt.shape)}")
    if bt.dim() == 0 and I == 1:
        bt = bt.reshape(1)
    if tuple(bt.shape) != (I,):
        raise ValueError(
            f"b must have shape (I,) = ({I},) to match W of shape {tuple(Wt.shape)}, got {tuple(bt.shape)}"
        )
    if not bool(torch.isfinite(Wt).all()):
        raise ValueError("W contains NaN or Inf")
    if not bool(torch.isfinite(bt).all()):
        raise ValueError("b contains NaN or Inf")
    if not bool((Wt.norm(dim=0) > 0).all()):
        raise ValueError("W has an all-zero column: a detector needs a direction")
    return Wt, bt


def _pick_device(*arrays):
    """The first CUDA device among the inputs (CUDA inputs stay on CUDA), else the CPU."""
    torch = _torch()
    for a in arrays:
        if isinstance(a, torch.Tensor) and a.device.type != "cpu":
            return a.device
        if _root(a) == "cupy":
            return torch.device("cuda", a.device.id)
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# Refinement


def refine_detectors(
    X,
    W,
    b,
    *,
    config: RefineConfig | None = None,
    center=None,
    scale=None,
    progress: bool | None = None,
    extra_loss: Callable | None = None,
) -> RefineResult:
    """Refines detectors ``y = σ(Wᵀx − b)`` by Adam on the stage-3 objective.

    ``X``: an (N, D) array (numpy, torch, or a DLPack producer), shuffled into minibatches
    every epoch; or chunks of shape (n, D): a list/tuple (read in a random order every
    epoch), a re-iterable, a zero-argument callable returning an iterator, or an object with
    a ``chunks()`` method returning one, such as :class:`edpairs.store.ActivationStore` (read
    in their order); minibatches are drawn from each chunk in turn, shuffled within the chunk.
    ``W`` (D, I): one detector per column (``EDPairs.decoding_.T``); ``b`` (I,).
    ``center``/``scale``: scalars or (D,) arrays defining the standardised coordinates the
    optimisation works in; each one left out is the data's mean / std (one extra pass).
    ``progress``: a progress line on stderr (``None``: when stderr is a terminal).
    ``extra_loss(W, b, batch)``: added to the objective at every step, with ``W``, ``b`` and
    ``batch`` (B, D) torch float32 tensors in standardised coordinates (``W``, ``b``
    differentiable); it must return a scalar tensor — the extension point for the URA and
    orthogonality losses, which it should weight itself.

    Computation is float32 on the device of the first CUDA input (CPU otherwise). Each
    detector is parametrised as ``w_i = u_i / M_i`` with ``‖u_i‖ = 1`` (renormalised after
    every step), a log-margin ``log M_i`` and an offset ``t_i = b_i M_i`` of the hyperplane
    along ``u_i``, so margins and positions move in data units. Deterministic for a given
    ``config.seed`` on a given device."""
    torch = _torch()
    cfg = config or RefineConfig()
    if not isinstance(cfg, RefineConfig):
        raise TypeError(f"config must be a RefineConfig, got {type(cfg).__name__}")
    cfg.validate()
    if extra_loss is not None and not callable(extra_loss):
        raise TypeError("extra_loss must be a callable extra_loss(W, b, batch) -> scalar tensor")
    Wt, bt = _validate_detectors(W, b)
    D, I = Wt.shape
    source = _Source(X, D)
    first = source.obj if source.kind == "array" else None
    device = _pick_device(W, b, first)
    cfg = dataclasses.replace(cfg, rho=cfg.resolved_rho(I))
    weights = cfg.weights()

    c64, s64 = _resolve_standardization(source, center, scale, D, device)
    W_std, b_std = to_standardized(Wt.to(device, torch.float64), bt.to(device, torch.float64), c64, s64)
    norms = W_std.norm(dim=0)
    if not bool((norms > 0).all()) or not bool(torch.isfinite(norms).all()):
        raise ValueError("W is degenerate in standardised coordinates (a column scaled to zero or overflowed)")
    u = (W_std / norms).float().requires_grad_()
    log_margin = (-norms.log()).float().requires_grad_()
    offset = (b_std / norms).float().requires_grad_()
    c32, s32 = c64.float(), s64.float()

    gen = torch.Generator()
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(int(cfg.seed))
    opt = torch.optim.Adam([u, offset, log_margin], lr=cfg.lr)
    lr = float(cfg.lr)
    plateau = PlateauHalving(opt, lr, cfg.plateau_patience)
    history = []
    names = list(LOSS_TERMS) + (["extra"] if extra_loss is not None else [])
    bar = Progress(desc="refine", enabled=progress, unit=" batches")

    def current():
        margin_inv = torch.exp(-log_margin)
        return u / u.norm(dim=0) * margin_inv, offset * margin_inv

    try:
        for epoch in range(cfg.epochs):
            # Sums on the device; one synchronisation per epoch to read them.
            sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)
            count = 0
            batches = source.batches(cfg.batch_size, gen, device, check_finite=epoch == 0)
            for k, xb in enumerate(batches):
                xb = (xb - c32) / s32
                Wc, bc = current()
                terms = loss_terms(xb, Wc, bc, cfg, n_detectors=I)
                total = _weighted_total(terms, weights)
                if extra_loss is not None:
                    extra = extra_loss(Wc, bc, xb)
                    if not isinstance(extra, torch.Tensor) or extra.numel() != 1:
                        raise TypeError("extra_loss must return a scalar torch tensor")
                    extra = extra.reshape(())
                    terms["extra"] = extra
                    total = total + extra
                if not isinstance(total, torch.Tensor):  # every weight zero, no extra loss
                    total = (Wc.sum() + bc.sum()) * 0.0
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                with torch.no_grad():
                    u /= u.norm(dim=0).clamp_min(torch.finfo(torch.float32).tiny)
                n = xb.shape[0]
                row = torch.stack([total.detach()] + [terms[name].detach() for name in names])
                if epoch == 0 and k == 0:  # the loss before any update, for the divergence message
                    first = dict(zip(["total"] + names, row.tolist()))
                sums += row.to(torch.float64) * n
                count += n
                if k == 0:
                    bar.set_description(f"refine: epoch {epoch + 1}/{cfg.epochs}")
                bar.update(1, note=f"lr {lr:.2e}")
            values = (sums / count).tolist()
            record = {"epoch": epoch, "lr": lr, "total": values[0]}
            record.update(zip(names, values[1:]))
            history.append(record)
            bar.note = f"lr {lr:.2e} loss {values[0]:.5g}"
            bar.set_description(f"refine: epoch {epoch + 1}/{cfg.epochs}")
            if not math.isfinite(values[0]):
                chunked = source.kind != "array"
                raise FloatingPointError(_divergence(record, first, float(norms.max()), cfg.lr, chunked))
            lr = plateau.step(values[0])
    finally:
        bar.close()

    with torch.no_grad():
        Wc, bc = current()
        W_s, b_s = Wc.double(), bc.double()
        W_r, b_r = to_raw(W_s, b_s, c64, s64)
        # A filter driven to (numerically) zero reads nothing: the steps overshot, with no
        # non-finite loss to say so (a learning rate far too large sends every filter there).
        collapsed = (W_s.norm(dim=0) <= 1e-8 * norms.double()).nonzero().flatten().tolist()
    if collapsed:
        raise FloatingPointError(f"refinement collapsed detector(s) {collapsed} to zero filters (norm below 1e-8 of "
                                 f"their starting norm): likely too large a learning rate (config.lr = {cfg.lr:g})")
    return RefineResult(
        W=_like(W_r, W),
        b=_like(b_r, W),
        history=history,
        config=cfg,
        center=_like(c64, W),
        scale=_like(s64, W),
        W_standardized=_like(W_s, W),
        b_standardized=_like(b_s, W),
    )


def _divergence(record: dict, first: dict, largest_norm: float, lr: float, chunked: bool) -> str:
    """The FloatingPointError message for a non-finite epoch loss (``record``) given the loss
    terms of the first step (``first``): what was observed and what can cause it (the learning
    rate only when the loss was finite before the first update)."""
    causes = [f"values beyond the float32 range in standardised coordinates: detectors, center or scale that do not "
              f"fit this data (largest |w_i| there at the start: {largest_norm:.3g})"]
    if "extra" in record:
        causes.append("NaN/Inf from extra_loss")
    if chunked:
        causes.append("NaN/Inf in chunks read after the first epoch (only the first pass over X is checked)")
    if math.isfinite(first["total"]):
        when, seen = f"in epoch {record['epoch']} (epoch mean {record['total']}", record
        causes.append(f"too large a learning rate (config.lr = {lr:g})")
    else:
        when, seen = f"at the first step, before any update (loss {first['total']}", first
    bad = [k for k, v in seen.items() if k not in ("epoch", "lr", "total") and not math.isfinite(v)]
    return (f"refinement diverged: the loss became non-finite {when}; non-finite terms: {', '.join(bad)}); "
            f"likely causes: {'; '.join(causes)}")


def evaluate_detectors(
    X,
    W,
    b,
    *,
    config: RefineConfig | None = None,
    center=None,
    scale=None,
    batch_size: int = 65536,
    extra_loss: Callable | None = None,
) -> dict:
    """The stage-3 objective of raw-space detectors ``W`` (D, I), ``b`` (I,) over the whole
    data, in the standardised coordinates given by ``center``/``scale`` (data mean / std when
    left out; pass ``RefineResult.center``/``.scale`` to compare with a refinement).

    Unlike the per-epoch history (averages of minibatch estimates), the soft maxima and
    firing rates here are those of the full data: the firing rates and the sums
    ``Σ H^{ν+1}``, ``Σ H^ν`` are accumulated exactly over batches (the latter rescaled by a
    running maximum). Returns floats: each term, ``total`` (weighted), and ``extra``
    (batch-size-weighted mean) when ``extra_loss`` is given."""
    torch = _torch()
    if config is not None and not isinstance(config, RefineConfig):
        raise TypeError(f"config must be a RefineConfig or None, got {type(config).__name__}")
    cfg = config or RefineConfig()
    cfg.validate()
    check_int("batch_size", batch_size)
    Wt, bt = _validate_detectors(W, b)
    D, I = Wt.shape
    source = _Source(X, D)
    device = _pick_device(W, b, source.obj if source.kind == "array" else None)
    cfg = dataclasses.replace(cfg, rho=cfg.resolved_rho(I))
    nu = float(cfg.nu)
    c64, s64 = _resolve_standardization(source, center, scale, D, device)
    W_s, b_s = to_standardized(Wt.to(device, torch.float64), bt.to(device, torch.float64), c64, s64)
    W32, b32, c32, s32 = W_s.float(), b_s.float(), c64.float(), s64.float()

    n = 0
    sum_h = sum_ma = sum_extra = 0.0
    rate = torch.zeros(I, dtype=torch.float64, device=device)
    h_max, s_hi, s_lo = 0.0, 0.0, 0.0  # running max of H and Σ(H/max)^{ν+1}, Σ(H/max)^ν
    with torch.no_grad():
        for xb in source.batches(batch_size, None, device, check_finite=True):
            xb = (xb - c32) / s32
            logy, y, logq, q = _memberships(xb @ W32 - b32, float(cfg.gamma))
            H = (-(q * logq).sum(1)).double()
            sum_h += float(H.sum())
            sum_ma += float(-(q * logy).sum(1).double().sum())
            rate += y.double().sum(0)
            if nu == 0.0:
                s_lo += H.shape[0]
                s_hi += float(H.sum())
                h_max = 1.0
            else:
                m = max(h_max, float(H.max()))
                if m > 0:
                    if h_max > 0 and m > h_max:
                        s_hi *= (h_max / m) ** (nu + 1)
                        s_lo *= (h_max / m) ** nu
                    h_max = m
                    r = H / m
                    keep = r > _SMALL ** (1.0 / (nu + 1.0))  # as in _reduce
                    p = torch.where(keep, r, torch.ones_like(r)) ** nu * keep
                    s_hi += float((p * r).sum())
                    s_lo += float(p.sum())
            if extra_loss is not None:
                value = float(extra_loss(W32, b32, xb))
                if not math.isfinite(value):  # (refine_detectors refuses the same: the total would be NaN)
                    raise FloatingPointError(f"extra_loss gave {value} on a batch of {xb.shape[0]} rows: it must "
                                             "return a finite number")
                sum_extra += value * xb.shape[0]
            n += xb.shape[0]
    rate /= n
    terms = {
        "sparsity": sum_h / n,
        "sparsity_bound": h_max * s_hi / s_lo if s_lo > 0 else 0.0,
        "max_activation": sum_ma / n,
        "margin": float(W_s.norm(dim=0).mean()),
        "inactive": float(_reduce(torch.relu(float(cfg.tau) / I - rate), nu)),
        "excessive": float(_reduce(torch.relu(rate - cfg.rho), nu)),
    }
    terms["total"] = float(sum(w * terms[k] for k, w in cfg.weights().items() if w != 0.0))
    if extra_loss is not None:
        terms["extra"] = sum_extra / n
        terms["total"] += terms["extra"]
    return terms
