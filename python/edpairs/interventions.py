"""Interventions at a layer along the encoding directions of fitted pairs (DESIGN section 3):
remove a concept, set its decoded value, or remove a set of concepts jointly — as plain
functions on activation arrays (torch tensors or numpy arrays) and as a forward-hook context
manager that edits a torch model's layer output in the forward pass.

For one feature vector ``x`` (a position of the layer's map), concept ``i`` with unit encoding
direction ``s_i`` (``encoding_``), filter ``w_i`` (``decoding_``), threshold ``b_i``
(``bias_``) and data mean ``m`` (``mean_``), with the latent factor
``a_i = w_i.(x - m) / (w_i.s_i)``:

* remove: ``x' = x - g * k * s_i``, gate ``g = sigmoid(w_i.x - b_i)`` (``gate=False``: 1),
  ``k = a_i`` by default ("to the mean": the concept's latent factor moves to that of the
  mean, i.e. ``w_i.x'`` becomes ``w_i.m`` where the gate is 1) or a given number. With
  ``gate=False`` and the default scale this is ``x' = x - s_i w_i.(x - m) / (w_i.s_i)``:
  for the whole-data signal vector ``s = Cov w / (w^T Cov w)`` of ``z = w.x`` it is exactly
  LEACE's eraser ``x - Cov w (w^T Cov w)^-1 w^T (x - m)`` (``EDPairs(signal="whole")``).
  Several concepts are removed independently, each from the input's decoded values; when the
  filters read each other's encoding directions use :func:`remove_joint`.
* set: ``x' = x + s_i (t - w_i.x) / (w_i.s_i)``: the decoded value becomes ``t``, the edit moves
  only along ``s_i``. Several concepts are set jointly,
  ``x' = x + S_J (W_J S_J^T)^-1 (t - W_J x)``, so that every decoded value is its target even
  when the filters read the other encoding directions.
* joint removal of a set J: ``x' = x - S_J (W_J S_J^T)^-1 W_J (x - m)`` (rows of ``W_J`` and
  ``S_J`` are the concepts' filters and encoding directions); with ``gate=True`` each joint
  latent factor is multiplied by its concept's gate.

``(W_J S_J^T)^-1`` is a pseudo-inverse (relative cutoff 1e-6 of the largest singular value):
when the matrix is singular (two concepts with the same encoding direction) the common part is
removed once, and a joint ``set`` reaches the targets in the least-squares sense.

Edits compute in float32 (float64 for float64 input) on the array's device, also inside an
autocast region; float16 / bfloat16 inputs are upcast internally and the result cast back;
an edit whose values would not fit that dtype (float16 ends at 65504) is refused with a
ValueError rather than returned as Inf (positions whose input was already NaN / Inf are not
checked); torch edits are differentiable. The functions read the last axis as channels unless
``layout`` is given; the hook infers the layout from the output's rank (4-D "nchw", 3-D "nlc",
2-D "nc") and edits the first element of a tuple output.

Example::

    import edpairs as edp
    from edpairs.interventions import intervene, remove, set_value

    pairs = edp.EDPairs(8).fit(features)             # (N*H*W, C) patches of model.layer3
    with intervene(model, "layer3", pairs, remove=[2]) as iv:   # gated removal of concept 2
        logits = model(images)
    print(iv.positions, iv.gate_mean, iv.gated_positions)       # diagnostics of that forward
    with intervene(model, "layer3", pairs, set={5: 4.0}, remove=[1, 3], joint=True):
        logits = model(images)

    fmap = model_features(images)                    # (N, C, H, W)
    edited = remove(fmap, pairs, [2], gate=False, layout="nchw")
    edited = set_value(fmap, pairs, {5: target_map}, layout="nchw")  # target_map (N, H, W)
"""

from __future__ import annotations

import builtins
import numbers
import threading
from collections import OrderedDict
from typing import Optional

import numpy as np

from ._arrays import _module_root, namespace_of
from ._arrays import to_numpy64 as _host
from ._checks import check_fitted
from ._layout import LAYOUTS, channel_last, from_channel_last, infer_layout
from .capture import SharedModuleError, _compiled, declared_width, find_module

__all__ = ["Intervention", "intervene", "remove", "remove_joint", "set_value"]

_PINV_RCOND = 1e-6
_VALUES_CACHED = 64  # uploaded scale / target vectors kept per converted pairs
_FLOAT32_MAX = float(np.finfo(np.float32).max)  # edits compute in float32: beyond it, Inf
# The largest finite values of the 16-bit dtypes an edit is cast back to (by str(dtype)).
_HALF_MAX = {"torch.float16": 65504.0, "float16": 65504.0, "torch.bfloat16": (2 - 2 ** -7) * 2.0 ** 127}


# ---- the pairs, converted once per device and dtype --------------------------------------
class _Pairs:
    """Host float64 copies of the pairs' arrays, with per-(library, device, dtype) and per-set
    caches of what the edits need."""

    def __init__(self, pairs):
        check_fitted(pairs, ("decoding_", "encoding_", "mean_"))
        W, S, mean = (_host(getattr(pairs, a)) for a in ("decoding_", "encoding_", "mean_"))
        bias = getattr(pairs, "bias_", None)
        if W.ndim != 2 or S.shape != W.shape or mean.shape != (W.shape[1],):
            raise ValueError(f"pairs must have decoding_ (I, D), encoding_ (I, D) and mean_ (D,); got "
                             f"{W.shape}, {S.shape} and {mean.shape}")
        self.bias = None if bias is None else _host(bias)
        if self.bias is not None and self.bias.shape != (W.shape[0],):
            raise ValueError(f"pairs.bias_ must have shape (I,) = ({W.shape[0]},), got {self.bias.shape}")
        if not (np.isfinite(W).all() and np.isfinite(S).all() and np.isfinite(mean).all()):
            raise ValueError("the pairs contain NaN or Inf")
        self.W, self.S, self.mean = W, S, mean
        self.n_concepts, self.n_features = W.shape
        self.offset = W @ mean                       # (I,) decoded value of the mean
        self.gain = np.einsum("id,id->i", W, S)      # (I,) w_i . s_i (1 for EDPairs)
        self._sets = {}
        self._devices = {}
        self._values = OrderedDict()
        self._values_lock = threading.Lock()  # hooks of DataParallel replicas run in threads

    def __getstate__(self) -> dict:
        # (a lock does not pickle; the device caches are rebuilt where the copy runs)
        state = self.__dict__.copy()
        del state["_values_lock"]
        state["_devices"], state["_values"] = {}, OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._values_lock = threading.Lock()

    def check_concepts(self, concepts, what: str) -> tuple:
        out = []
        for c in concepts:
            c = _scalar_index(c)
            if isinstance(c, (bool, np.bool_)) or not isinstance(c, numbers.Integral):
                raise TypeError(f"{what}: concept indices must be integers, got {c!r}")
            c = int(c)
            if not 0 <= c < self.n_concepts:
                raise IndexError(f"{what}: concept index {c} is out of range for pairs with "
                                 f"{self.n_concepts} concepts (valid: 0..{self.n_concepts - 1})")
            out.append(c)
        if len(set(out)) != len(out):
            raise ValueError(f"{what}: concept indices must be distinct, got {out}")
        return tuple(out)

    def host_set(self, J: tuple) -> dict:
        """Host arrays for the concepts J: W_J, S_J (|J|, D), offsets, gains, biases and
        (W_J S_J^T)^+ transposed, so that row-vector latent factors are (z - offset) @ inv_t."""
        got = self._sets.get(J)
        if got is None:
            idx = list(J)
            W, S = self.W[idx], self.S[idx]
            gain = self.gain[idx]
            unread = np.abs(gain) <= 1e-12 * np.linalg.norm(W, axis=1) * np.linalg.norm(S, axis=1)
            if unread.any():
                raise ValueError(f"concepts {[J[k] for k in np.flatnonzero(unread)]}: the filter does not read "
                                 f"its own encoding direction (w_i . s_i = 0), so the edit is undefined")
            inv_t = np.linalg.pinv(W @ S.T, rcond=_PINV_RCOND).T
            got = dict(W=W, S=S, offset=self.offset[idx], gain=gain, inv_t=inv_t,
                       bias=None if self.bias is None else self.bias[idx])
            self._sets[J] = got
        return got

    def device_set(self, J: tuple, lib: "_Lib", like) -> dict:
        key = (J, lib.key(like))
        got = self._devices.get(key)
        if got is None:
            got = {k: (None if v is None else lib.constant(v, like)) for k, v in self.host_set(J).items()}
            self._devices[key] = got
        return got

    def device_values(self, values, lib: "_Lib", like):
        """The numbers ``values`` (a per-concept vector: removal scales, fixed targets) as an
        array of like's kind, uploaded once per device and dtype: a hook runs every forward,
        and a fresh host-to-device copy each time costs a transfer per edit."""
        values = np.asarray(values, dtype=np.float64)
        key = (values.tobytes(), values.shape, lib.key(like))
        with self._values_lock:
            got = self._values.get(key)
            if got is None:
                got = self._values[key] = lib.constant(values, like)
                while len(self._values) > _VALUES_CACHED:
                    self._values.popitem(last=False)
            else:
                self._values.move_to_end(key)
        return got


_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 8


def _pairs_of(pairs) -> _Pairs:
    """The converted pairs, cached while the pairs' arrays are the same objects (a refit
    assigns new arrays; arrays changed in place are not noticed)."""
    if isinstance(pairs, _Pairs):
        return pairs
    arrays = tuple(getattr(pairs, a, None) for a in ("decoding_", "encoding_", "mean_", "bias_"))
    key = (id(pairs),) + tuple(id(a) for a in arrays)
    hit = _CACHE.get(key)
    if hit is not None and hit[0] is pairs and all(x is y for x, y in zip(hit[1], arrays)):
        _CACHE.move_to_end(key)
        return hit[2]
    converted = _Pairs(pairs)
    _CACHE[key] = (pairs, arrays, converted)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return converted


# ---- array libraries ---------------------------------------------------------------------
class _Lib:
    """The few operations the edits need, for torch tensors or numpy arrays."""

    def __init__(self, x):
        root = _module_root(x)
        if root == "torch":
            import torch

            self.torch = torch
            self.name = "torch"
        elif isinstance(x, np.ndarray):
            self.torch = None
            self.name = "numpy"
        else:
            raise TypeError(f"activations must be a torch tensor or a numpy array, got {type(x).__name__}")

    def check_float(self, x) -> None:
        ok = x.is_floating_point() if self.name == "torch" else np.issubdtype(x.dtype, np.floating)
        if not ok:
            raise TypeError(f"activations must be floating point, got dtype {x.dtype}")

    def compute_dtype(self, x):
        if self.name == "torch":
            return self.torch.float64 if x.dtype == self.torch.float64 else self.torch.float32
        return np.float64 if x.dtype == np.float64 else np.float32

    def key(self, like):
        if self.name == "torch":
            return ("torch", str(like.device), str(like.dtype))
        return ("numpy", "cpu", str(like.dtype))

    def constant(self, a: np.ndarray, like):
        if self.name == "torch":
            return self.torch.as_tensor(a, dtype=like.dtype, device=like.device)
        return np.asarray(a, dtype=like.dtype)

    def cast(self, x, dtype):
        if self.name == "torch":
            return x.to(dtype)
        with np.errstate(over="ignore"):  # an overflow to float16 is refused by _check_cast_back
            return x.astype(dtype, copy=False)

    def sigmoid(self, z):
        if self.name == "torch":
            return self.torch.sigmoid(z)
        return namespace_of(z).logistic(z)

    def relu(self, x):
        return x.clamp(min=0) if self.name == "torch" else np.maximum(x, 0)

    def target(self, t, like, positions_shape, concept: int, uploaded=None):
        """A target (number or per-position map) as a (P,) vector of like's kind. ``uploaded``
        (an Intervention's own dict) keeps the device copy of a host map, which the
        Intervention snapshotted, for the next forward."""
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            return None, float(t)
        if self.name == "torch":
            key = (concept, self.key(like))
            cached = uploaded is not None and not isinstance(t, self.torch.Tensor)
            if cached and key in uploaded:
                t = uploaded[key]
            else:
                t = self.torch.as_tensor(t).to(dtype=like.dtype, device=like.device)
                if cached:
                    uploaded[key] = t
            if t.ndim == 0:
                return None, float(t)
            broadcast = self.torch.broadcast_to
        else:
            t = np.asarray(t, dtype=like.dtype)
            if t.ndim == 0:
                return None, float(t)
            broadcast = np.broadcast_to
        try:
            t = broadcast(t, positions_shape)
        except (RuntimeError, ValueError):
            raise ValueError(f"set: the target of concept {concept} has shape {tuple(t.shape)}, which does not "
                             f"broadcast to the positions {tuple(positions_shape)} of the activations") from None
        return t.reshape(-1), None

    def restore_memory_format(self, out, x):
        """The edited array in the memory order of the input (a permuted result otherwise
        breaks a later ``.view``)."""
        if self.name == "torch":
            if x.is_contiguous():
                return out.contiguous()
            if x.ndim == 4 and x.is_contiguous(memory_format=self.torch.channels_last):
                return out.contiguous(memory_format=self.torch.channels_last)
            return out
        return np.ascontiguousarray(out) if x.flags.c_contiguous else out


class _NoAutocast:
    """Edits compute in float32 even inside an autocast region (a forward hook runs there)."""

    def __init__(self, lib: _Lib, x):
        self.ctx = None
        if lib.name == "torch":
            torch = lib.torch
            try:
                enabled = torch.is_autocast_enabled(x.device.type)
            except TypeError:  # torch < 2.4
                enabled = torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
            if enabled:
                self.ctx = torch.autocast(device_type=x.device.type, enabled=False)

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


# ---- the edit ----------------------------------------------------------------------------
def _integer_array(a) -> Optional[bool]:
    """Whether ``a`` (a torch tensor or numpy array) holds integers; None for other objects."""
    if isinstance(a, np.ndarray):
        return a.dtype.kind in "iu"
    if _module_root(a) == "torch" and hasattr(a, "is_floating_point"):
        return not (a.is_floating_point() or a.is_complex() or str(a.dtype) == "torch.bool")
    return None


def _scalar_index(c):
    """A 0-d integer tensor or array as the int it holds (other values as they are)."""
    if getattr(c, "ndim", None) == 0 and _integer_array(c):
        return int(c.item())
    return c


def _as_concepts(concepts, what: str) -> list:
    if concepts is None:
        return []
    if isinstance(concepts, numbers.Integral) and not isinstance(concepts, (bool, np.bool_)):
        return [concepts]
    integer = _integer_array(concepts)
    if integer is not None:  # a torch tensor or numpy array of indices
        if not integer or concepts.ndim > 1:
            kind = "numpy array" if isinstance(concepts, np.ndarray) else "torch tensor"
            raise TypeError(f"{what}: concepts must be a concept index (int) or a 1-D integer array of indices, got "
                            f"a {kind} of dtype {concepts.dtype} and shape {tuple(concepts.shape)}")
        return [int(c) for c in concepts.reshape(-1).tolist()]
    if not isinstance(concepts, (bool, np.bool_, str, bytes)):
        try:
            return list(concepts)
        except TypeError:
            pass
    raise TypeError(f"{what}: concepts must be a concept index (int) or an iterable of indices (list, tuple, "
                    f"range, integer array), got {type(concepts).__name__} {concepts!r}")


def _check_flag(value, name: str, what: str) -> bool:
    """A switch given as True or False (a numpy bool too): a string such as "no" is truthy, and
    would switch the option on."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{what}: {name} must be True or False, got {type(value).__name__} {value!r}")


def _check_targets(targets, what: str) -> dict:
    """The targets {concept: t} checked up front: t a finite real number or a per-position map of
    them (a None or NaN target would turn every edited position into NaN). A host number given
    as a 0-d array comes back as the Python number it holds (read once here, not sent to the
    activations' device and read back at every forward)."""
    if not isinstance(targets, dict):
        raise TypeError(f"{what}: targets must be a dict {{concept: target}}, got {type(targets).__name__}")
    expected = "a finite real number or a per-position map of them (numpy array or torch tensor)"
    checked = dict(targets)
    for c, t in targets.items():
        beyond = (f"{what}: the target of concept {c} must lie within the float32 range (|t| <= "
                  f"{_FLOAT32_MAX:.4g}), where the edits compute; got")
        if isinstance(t, numbers.Real) and not isinstance(t, (bool, np.bool_)):
            if not np.isfinite(float(t)):
                raise ValueError(f"{what}: the target of concept {c} must be {expected}, got {t!r}")
            if abs(float(t)) > _FLOAT32_MAX:
                raise ValueError(f"{beyond} {t!r} (the edited activations would overflow to Inf)")
            continue
        if _module_root(t) == "torch" and hasattr(t, "is_complex"):
            real = not t.is_complex() and str(t.dtype) != "torch.bool"
            finite = real and bool(t.isfinite().all())
            largest = float(t.abs().max()) if finite and t.numel() and t.is_floating_point() else 0.0
        else:
            try:
                a = np.asarray(t)
            except (TypeError, ValueError):
                a = np.asarray(None)
            real = a.dtype.kind in "iuf"
            finite = real and bool(np.isfinite(a).all())
            largest = float(np.abs(a).max()) if finite and a.size and a.dtype.kind == "f" else 0.0
        if not real:
            got = (f"{type(t).__name__} of dtype {t.dtype}" if getattr(t, "ndim", 0) else repr(t)[:80])
            raise TypeError(f"{what}: the target of concept {c} must be {expected}, got {got}")
        if not finite:
            raise ValueError(f"{what}: the target of concept {c} must be {expected}; the map contains NaN or Inf")
        if largest > _FLOAT32_MAX:
            raise ValueError(f"{beyond} a map holding {largest:.4g} (the edited activations would overflow to Inf)")
        if _module_root(t) != "torch" and a.ndim == 0:
            checked[c] = float(a)
    return checked


def _scales(scale, J: tuple):
    """Per-concept removal amounts: (to_mean (|J|,) bool, k (|J|,) float)."""
    def one(v, c):
        if v is None or (isinstance(v, str) and v == "mean"):
            return True, 0.0
        if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)):
            if not (np.isfinite(float(v)) and abs(float(v)) <= _FLOAT32_MAX):
                raise ValueError(f"remove: scale of concept {c} must be a finite number within the float32 range "
                                 f"(|k| <= {_FLOAT32_MAX:.4g}) or 'mean', got {v!r} (the edit would give NaN or Inf)")
            return False, float(v)
        raise ValueError(f"remove: scale of concept {c} must be a number or 'mean' (the default: to the "
                         f"mean's latent factor), got {v!r}")

    if isinstance(scale, dict):
        unknown = sorted(set(scale) - set(J))
        if unknown:
            raise ValueError(f"remove: scale given for concepts {unknown} that are not removed ({list(J)})")
        pairs = [one(scale.get(c), c) for c in J]
    else:
        pairs = [one(scale, c) for c in J]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _edit(x, pairs, *, remove=(), gate=True, scale=None, joint=False, targets=None, relu=False,
          layout=None, infer_layout_from_shape=False, stats=None, uploaded=None):
    """Applies removal (then set) to x. ``layout=None`` reads the last axis as channels unless
    ``infer_layout_from_shape`` (the hook: 4-D -> nchw, 3-D -> nlc, 2-D -> nc). ``uploaded``: an
    Intervention's cache of its host target maps on the device (see _Lib.target)."""
    lib = _Lib(x)
    lib.check_float(x)
    P = _pairs_of(pairs)
    J_remove = P.check_concepts(_as_concepts(remove, "remove"), "remove")
    targets = {} if targets is None else dict(targets)
    J_set = P.check_concepts(list(targets), "set")
    both = sorted(set(J_remove) & set(J_set))
    if both:
        raise ValueError(f"concepts {both} are both removed and set; give each concept one edit")
    if joint and scale is not None:
        raise ValueError("joint removal moves the concepts to the mean's latent factors; scale applies only "
                         "to independent removal (joint=False)")
    if J_remove and gate and P.bias is None:
        raise ValueError("gated removal needs the pairs' thresholds bias_; pass gate=False or pairs with bias_")

    if layout is not None or infer_layout_from_shape:
        layout = infer_layout(tuple(x.shape), layout)
        cl = channel_last(x, layout)
    else:
        if x.ndim < 1:
            raise ValueError(f"activations must have a channel axis, got shape {tuple(x.shape)}")
        cl = x
    D = int(cl.shape[-1])
    if D != P.n_features:
        where = f"layout {layout!r}" if layout is not None else "channels on the last axis"
        hint = ""
        if layout is None and x.ndim == 4 and int(x.shape[1]) == P.n_features:
            hint = "; for (N, C, H, W) maps pass layout='nchw'"
        raise ValueError(f"the pairs have D={P.n_features} channels but the activations have {D} "
                         f"({where}, shape {tuple(x.shape)}){hint}")
    positions_shape = tuple(cl.shape[:-1])

    with _NoAutocast(lib, x):
        rows_in = lib.cast(cl.reshape(-1, D), lib.compute_dtype(x))  # (P, D)
        rows = rows_in
        if J_remove:
            T = P.device_set(J_remove, lib, rows)
            z = rows @ T["W"].T                                  # (P, |J|) decoded values
            if joint:
                amount = (z - T["offset"]) @ T["inv_t"]          # joint latent factors
            else:
                amount = (z - T["offset"]) / T["gain"]           # latent factors
                to_mean, k = _scales(scale, J_remove)
                if not to_mean.all():
                    keep = P.device_values(to_mean, lib, rows)
                    amount = amount * keep + P.device_values(k, lib, rows)
            g = lib.sigmoid(z - T["bias"]) if gate else None
            if g is not None:
                amount = amount * g
            rows = rows - amount @ T["S"]
            if stats is not None and g is not None:
                stats["concepts"] = J_remove
                stats["gate_mean"] = _detached(g.mean(0))
                stats["gated"] = _detached((g > 0.5).sum(0))
        if J_set:
            T = P.device_set(J_set, lib, rows)
            z = rows @ T["W"].T
            cols, fixed = [], []
            for c in J_set:
                vec, num = lib.target(targets[c], rows, positions_shape, c, uploaded)
                cols.append(vec)
                fixed.append(num)
            _check_fits(fixed, J_set, x)
            if all(v is None for v in cols):
                t = P.device_values(fixed, lib, rows)                  # (|J|,) broadcast over positions
            else:
                full = [v if v is not None else z[:, k] * 0 + f for k, (v, f) in enumerate(zip(cols, fixed))]
                t = lib.torch.stack(full, 1) if lib.name == "torch" else np.stack(full, 1)  # (P, |J|)
            rows = rows + ((t - z) @ T["inv_t"]) @ T["S"]
        if relu:
            rows = lib.relu(rows)
        if stats is not None:
            stats["positions"] = int(rows.shape[0])
            shift = rows - rows_in
            stats["mean_shift"] = _detached(((shift * shift).sum(1) ** 0.5).mean())
        out = lib.cast(rows, x.dtype)
        _check_cast_back(out, rows, rows_in, lib)
        out = out.reshape(tuple(cl.shape))
    if layout is not None:
        out = from_channel_last(out, layout)
    return lib.restore_memory_format(out, x)


def _check_cast_back(out, rows, rows_in, lib) -> None:
    """Refuses an edit whose values lie beyond the finite range of the 16-bit dtype it was cast
    back to (``out``: (P, D) in float16 / bfloat16; ``rows``: the same edit in the compute dtype;
    ``rows_in``: the input there): the cast gives +-Inf, which the layers after the edit would
    turn into NaN logits without an error. A target that fits the dtype can still get there, e.g.
    a large removal scale, or a shift added to a value already near 65504.

    Positions (rows) whose input already held NaN or Inf are not checked: the edit mixes a
    position's channels, so such a row comes out NaN / Inf whatever the dtype (as in float32,
    where nothing is checked); only values the edit made non-finite are refused.

    Cost: one reduction over ``out`` and a wait for its result (on a GPU, a synchronisation),
    for 16-bit dtypes only; the details are computed only when it finds a non-finite value.
    Skipped while a CUDA graph is being captured, where no result can be waited for."""
    limit = _HALF_MAX.get(str(out.dtype))
    if limit is None:
        return
    xp = lib.torch if lib.name == "torch" else np
    if lib.name == "torch" and out.is_cuda and xp.cuda.is_current_stream_capturing():
        return
    if bool(xp.isfinite(out).all()):
        return
    rows, rows_in = _detached(rows), _detached(rows_in)
    made = ~xp.isfinite(out) & xp.isfinite(rows_in).all(1)[:, None]  # (P, D) non-finite because of the edit
    count = int(made.sum())
    if count == 0:
        return
    positions = int(made.any(1).sum())
    magnitudes = xp.abs(rows[made])
    magnitudes = magnitudes[~xp.isnan(magnitudes)]
    largest = f"{float(magnitudes.max()):.4g}" if len(magnitudes) else "NaN"
    if largest in ("inf", "NaN"):
        largest += f" (the edit overflowed the {rows.dtype} computation itself)"
    raise ValueError(
        f"the edited activations must fit their dtype {out.dtype} (|v| <= {limit:.5g}), but {count} edited "
        f"value(s), at {positions} of {int(out.shape[0])} positions, lie beyond it (largest magnitude {largest}); "
        f"cast back to {out.dtype} they would be Inf and turn the layers after the edit into NaN. Run the model "
        f"(or at least this layer) in float32, or use a smaller edit (removal scale or target)")


def _check_fits(fixed, concepts, x) -> None:
    """Number targets must fit the activations' dtype (float16 tops at 65504): the edit is cast
    back to it and would hold Inf."""
    largest = _HALF_MAX.get(str(x.dtype))
    if largest is None:
        return
    for c, f in zip(concepts, fixed):
        if f is not None and abs(f) > largest:
            raise ValueError(f"set: the target {f!r} of concept {c} is beyond the range of the activations' dtype "
                             f"{x.dtype} (|t| <= {largest:.5g}): the edited activations would hold Inf")


def _detached(a):
    return a.detach() if hasattr(a, "detach") else a


# ---- plain functions ---------------------------------------------------------------------
def remove(x, pairs, concepts, *, gate=True, scale=None, relu=False, layout=None):
    """Removes concepts from activations x: ``x' = x - g * k * s_i`` for each concept i (each
    computed from x), gate ``g = sigmoid(w_i.x - b_i)`` (1 with ``gate=False``).

    x: a torch tensor or numpy array, channel-last ``(..., D)`` rows, or a layer output in
    ``layout`` ("nchw", "nhwc", "nlc", "nc"). pairs: an :class:`edpairs.EDPairs` or any object
    with ``decoding_``, ``bias_``, ``encoding_``, ``mean_``. concepts: an index or indices.
    scale: ``None`` / ``"mean"`` (default: k is the concept's centred latent factor, so the
    decoded value moves to the mean's where the gate is 1; with ``gate=False`` this is LEACE
    for whole-data signal vectors), a number k in units of the unit encoding direction
    (the published toy used 450 with unnormalised vectors), or a dict {concept: number |
    "mean"}. relu: clamp at 0 afterwards (non-negative layers). Returns an array of x's kind,
    dtype, device and layout."""
    return _edit(x, pairs, remove=_as_concepts(concepts, "remove"), gate=_check_flag(gate, "gate", "remove"),
                 scale=scale, relu=_check_flag(relu, "relu", "remove"), layout=layout)


def set_value(x, pairs, targets: dict, *, relu=False, layout=None):
    """Sets decoded values: ``x' = x + s_i (t_i - w_i.x) / (w_i.s_i)``, jointly for several
    concepts (``x + S_J (W_J S_J^T)^+ (t - W_J x)``), so that ``w_i.x' = t_i``. targets:
    {concept: t}, t a number or a per-position map broadcastable to x's positions (x's shape
    without the channel axis, e.g. (N, H, W) for "nchw"). relu: clamp at 0 afterwards (which
    can undo part of the edit)."""
    return _edit(x, pairs, targets=_check_targets(targets, "set_value"), relu=_check_flag(relu, "relu", "set_value"),
                 layout=layout)


def remove_joint(x, pairs, concepts, *, gate=False, relu=False, layout=None):
    """Removes a set J of concepts jointly: ``x' = x - S_J (W_J S_J^T)^+ W_J (x - m)`` (rows of
    W_J, S_J: the concepts' filters and encoding directions; a pseudo-inverse when singular),
    which leaves ``W_J x' = W_J m``. gate=True multiplies each joint latent factor by its
    concept's gate ``sigmoid(w_i.x - b_i)``."""
    return _edit(x, pairs, remove=_as_concepts(concepts, "remove_joint"),
                 gate=_check_flag(gate, "gate", "remove_joint"), joint=True,
                 relu=_check_flag(relu, "relu", "remove_joint"), layout=layout)


# ---- the model hook ----------------------------------------------------------------------
def width_mismatch(module, D: int, layer: str) -> Optional[str]:
    """Why pairs of D channels cannot edit ``module`` (the layer named ``layer``), where it
    declares another width (out_channels, out_features or num_features), else None."""
    attr, v = declared_width(module)
    if v is None or v == D:
        return None
    return f"the pairs have D={D} channels but layer {layer!r} ({type(module).__name__}) has {attr}={v}"


class Intervention:
    """An edit of a model's layer output while active (use :func:`intervene`). After each
    forward it holds diagnostics of the last edit: ``calls`` (forwards edited),
    ``positions`` (feature vectors edited), ``gate_mean`` {concept: mean gate} and
    ``gated_positions`` {concept: positions with gate > 0.5} (gated removal only),
    ``mean_shift`` (mean L2 norm of the edit per position). Under ``nn.DataParallel`` each
    replica edits its own share of the batch (the same edit as on one device); ``calls`` then
    counts the replicas' edits and the other diagnostics describe the share edited last.

    A layer that runs more than once in one forward pass of ``model`` (a shared module, used at
    several places) is refused at its second use with :class:`edpairs.capture.SharedModuleError`,
    as capture refuses it: the edit would apply at every use. ``every_use=True`` edits every use
    (the diagnostics then describe the last one). Forwards of ``model``'s submodules called on
    their own, outside a forward of ``model``, are edited and not counted."""

    def __init__(self, model, layer, pairs, *, remove=(), set=None, gate=None, scale=None, joint=False,
                 relu=False, layout=None, every_use=False):
        joint = _check_flag(joint, "joint", "intervene")
        if gate is None:  # the defaults of remove (gated) and remove_joint (not gated)
            gate = not joint
        gate = _check_flag(gate, "gate", "intervene")
        relu = _check_flag(relu, "relu", "intervene")
        self.every_use = _check_flag(every_use, "every_use", "intervene")
        if _compiled(model):
            raise ValueError(
                "intervene on a torch.compile'd model: its compiled graph does not call forward hooks, so the edit "
                "would silently do nothing. An edit applies only to forwards of the original module: intervene on "
                "model._orig_mod and call model._orig_mod (calls of the compiled model stay unedited), or compile "
                "a CorrectedModel of the original module")
        self.module = find_module(model, layer)
        self._root = model
        self.layer = layer if isinstance(layer, str) else type(layer).__name__
        self._pairs = _Pairs(pairs)  # a snapshot: the edit uses the pairs as they were here
        self.remove = self._pairs.check_concepts(_as_concepts(remove, "remove"), "remove")
        self.targets = {} if set is None else _check_targets(set, "intervene: set")
        # Host maps are copied here, like the pairs: the hook uploads each once per device.
        self.targets = {c: t if isinstance(t, numbers.Real) or _module_root(t) == "torch" else np.array(t)
                        for c, t in self.targets.items()}
        self._uploaded = {}
        self._pairs.check_concepts(list(self.targets), "set")
        if not self.remove and not self.targets:
            raise ValueError("intervene: nothing to do; give remove=[...] and/or set={concept: target}")
        both = sorted(builtins.set(self.remove) & builtins.set(self.targets))
        if both:
            raise ValueError(f"concepts {both} are both removed and set; give each concept one edit")
        if joint and scale is not None:
            raise ValueError("joint removal moves the concepts to the mean's latent factors; scale applies only "
                             "to independent removal (joint=False)")
        if self.remove and gate and self._pairs.bias is None:
            raise ValueError("gated removal needs the pairs' thresholds bias_; pass gate=False or pairs with bias_")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        wrong = width_mismatch(self.module, self._pairs.n_features, self.layer)
        if wrong:
            raise ValueError(wrong)
        _scales(scale, self.remove)  # validates
        self.gate, self.scale, self.joint, self.relu, self.layout = gate, scale, joint, relu, layout
        self._handle = None
        self._root_handles = []
        self.calls = 0
        self._stats = {}
        self._lock = threading.Lock()  # DataParallel's replicas run the hook in threads
        self._forward = threading.local()  # per thread: depth in forwards of model, uses of the layer
        self._users = 0  # forwards running now that hold the hook (_acquire / _release)
        self._users_lock = threading.Lock()

    def __getstate__(self) -> dict:
        # (locks and thread-local state do not pickle; a copy starts inactive, its uploads rebuilt)
        state = self.__dict__.copy()
        for name in ("_lock", "_forward", "_users_lock"):
            del state[name]
        state.update(_handle=None, _root_handles=[], _uploaded={}, _users=0)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._users_lock = threading.Lock()
        self._forward = threading.local()

    def _acquire(self) -> None:
        """Activates the edit for one forward; concurrent forwards (threads, DataParallel replicas
        sharing this object) share the hook, which the first installs and the last removes."""
        with self._users_lock:
            if self._users == 0:
                self.__enter__()
            self._users += 1

    def _release(self) -> None:
        with self._users_lock:
            self._users -= 1
            if self._users == 0:
                self.close()

    # diagnostics, converted on access (no device synchronisation inside the forward)
    @property
    def positions(self) -> int:
        return int(self._stats.get("positions", 0))

    @property
    def gate_mean(self) -> dict:
        g = self._stats.get("gate_mean")
        return {} if g is None else {c: float(v) for c, v in zip(self._stats["concepts"], g.tolist())}

    @property
    def gated_positions(self) -> dict:
        g = self._stats.get("gated")
        return {} if g is None else {c: int(v) for c, v in zip(self._stats["concepts"], g.tolist())}

    @property
    def mean_shift(self) -> float:
        d = self._stats.get("mean_shift")
        return float("nan") if d is None else float(d)

    @property
    def active(self) -> bool:
        return self._handle is not None

    def _root_enter(self, module, inputs):
        state = self._forward
        depth = getattr(state, "depth", 0)
        if depth == 0:
            state.uses = 0
        state.depth = depth + 1

    def _root_leave(self, module, inputs, output):
        state = self._forward
        state.depth = max(0, getattr(state, "depth", 0) - 1)

    def _count_use(self) -> None:
        state = self._forward
        if getattr(state, "depth", 0):
            state.uses += 1
            if state.uses > 1:
                raise SharedModuleError(
                    f"intervene: layer {self.layer!r} ran more than once in one forward pass of the model (a shared "
                    f"module, used at several places), so the edit would apply at every use; intervene on a module "
                    f"that runs once (e.g. a wrapper around one of its uses), or edit every use on purpose with "
                    f"intervene(..., every_use=True)")

    def _hook(self, module, inputs, output):
        if not self.every_use:
            self._count_use()
        first = output
        if isinstance(output, (tuple, list)):
            if not output or not hasattr(output[0], "dtype"):
                raise TypeError(f"layer {self.layer!r} returns a {type(output).__name__} without a tensor first; "
                                f"intervene edits a tensor output (or the first element of a tuple)")
            first = output[0]
        elif _module_root(output) != "torch" and not isinstance(output, np.ndarray):
            kind = type(output).__name__
            if isinstance(output, dict):
                kind += f" (keys {list(output)[:6]})"
            raise TypeError(f"layer {self.layer!r} returns a {kind}, which an edit cannot take: intervene edits a "
                            f"tensor output (or the first element of a tuple); intervene on one of its submodules "
                            f"that returns a tensor (see edpairs.capture.layer_names(model))")
        stats = {}
        try:
            edited = _edit(first, self._pairs, remove=self.remove, gate=self.gate, scale=self.scale,
                           joint=self.joint, targets=self.targets, relu=self.relu, layout=self.layout,
                           infer_layout_from_shape=True, stats=stats, uploaded=self._uploaded)
        except ValueError as exc:
            raise ValueError(f"intervene at layer {self.layer!r}: {exc}") from None
        with self._lock:
            self.calls += 1
            self._stats = stats
        if first is output:
            return edited
        return type(output)([edited, *output[1:]]) if isinstance(output, list) else (edited, *output[1:])

    def __enter__(self) -> "Intervention":
        if self._handle is not None:
            raise RuntimeError("this Intervention is already active")
        if not self.every_use and self._root is not self.module:
            # Forwards of the model delimit "one forward pass" for the shared-module check.
            self._root_handles = [self._root.register_forward_pre_hook(self._root_enter),
                                  self._root.register_forward_hook(self._root_leave, always_call=True)]
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def close(self) -> None:
        """Removes the hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for h in self._root_handles:
            h.remove()
        self._root_handles = []

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        what = []
        if self.remove:
            what.append(f"remove={list(self.remove)}{' (joint)' if self.joint else ''}")
        if self.targets:
            what.append(f"set={sorted(self.targets)}")
        return (f"Intervention(layer={self.layer!r}, {', '.join(what)}, gate={self.gate}, "
                f"active={self.active}, calls={self.calls})")


def intervene(model, layer, pairs, remove=(), set=None, gate=None, scale=None, joint=False, relu=False,
              layout=None, every_use=False) -> Intervention:
    """A context manager that edits the output of ``layer`` (a dotted module name, e.g.
    ``"layer4"`` or ``"_blocks.15"``, or the module) in every forward pass of ``model`` while
    active: removes the concepts ``remove`` (independently, or jointly with ``joint=True``),
    then sets the decoded values ``set={concept: target}`` (numbers or per-position maps; a
    numpy map is copied here and sent to the device once, a torch map is read at each forward).
    ``gate`` (default: True for independent removal, False for joint removal, as in
    :func:`remove` and :func:`remove_joint`), ``scale`` and ``relu`` as in :func:`remove`;
    ``layout`` of the layer output (default from its rank: 4-D "nchw", 3-D "nlc",
    2-D "nc"). The hook is removed on exit, also on an exception; contexts nest (inner edits
    apply after outer ones on the same layer). Returns the :class:`Intervention`, whose
    attributes describe the last forward's edit. Model parameters are never touched; the edit
    is differentiable. A layer that runs more than once per forward of ``model`` (a shared
    module) is refused at its second use (:class:`edpairs.capture.SharedModuleError`) unless
    ``every_use=True``, which edits every use. A torch.compile'd model is refused: its compiled
    graph calls no hooks; intervene on ``model._orig_mod`` and call that, or compile a
    :class:`edpairs.correct.CorrectedModel`."""
    return Intervention(model, layer, pairs, remove=remove, set=set, gate=gate, scale=scale, joint=joint,
                        relu=relu, layout=layout, every_use=every_use)
