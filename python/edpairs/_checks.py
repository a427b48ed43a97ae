"""Type checks of hyperparameters shared by the estimators (bool is not a number here)."""

from __future__ import annotations

import math

import numpy as np


def is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_bool(name: str, value) -> None:
    """True or False (numpy's bool too), else a ValueError naming it: a string such as "no" is
    truthy, and would switch the option on."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_int(name: str, value, minimum: int = 1, *, optional: bool = False) -> None:
    """An integer (numpy integers too, bool refused) at least ``minimum`` (None too when
    ``optional``), else a ValueError naming it."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {expected}{' or None' if optional else ''}, got {value!r}")


def check_indices(v, name: str, size: int, of: str, *, mask: bool = False) -> np.ndarray:
    """``v`` as 1-D int64 indices in [0, size) of ``size`` ``of`` (no wrap-around of negatives),
    else a ValueError naming it; with ``mask``, a boolean mask of the ``size`` items stands for
    the indices it holds."""
    a = np.asarray(v)
    if mask and a.dtype == bool:
        if a.shape != (size,):
            raise ValueError(f"{name} must be a boolean mask of the {size} {of} or indices, got shape {a.shape}")
        return np.flatnonzero(a).astype(np.int64)
    if a.size and a.dtype.kind not in "iu":
        either = " (or a boolean mask)" if mask else ""
        raise ValueError(f"{name} must be integer indices{either}, got dtype {a.dtype}")
    a = a.astype(np.int64).reshape(-1) if a.ndim <= 1 else a
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() >= size):
        raise ValueError(f"{name} must lie in [0, {size}) ({size} {of}), got values from {a.min()} to {a.max()}")
    return a


def check_fitted(pairs, attrs) -> None:
    """``pairs`` has the fitted attributes ``attrs`` (not None), else a ValueError naming the
    missing ones: one check and one wording for every function that takes fitted pairs."""
    missing = [a for a in attrs if getattr(pairs, a, None) is None]
    if missing:
        raise ValueError(f"pairs must be fitted pairs (edpairs.EDPairs after fit or EDPairs.load); this "
                         f"{type(pairs).__name__} has no {', '.join(missing)}")


def check_real(name: str, value, expected: str, ok) -> None:
    """A real hyperparameter, finite and accepted by ``ok``, else a ValueError naming it."""
    if not is_real(value) or not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_layer_width(pairs_D: int, layer, shape) -> None:
    """Features of ``shape`` (channel-last) from ``layer`` match pairs of ``pairs_D`` channels,
    else a ValueError naming both."""
    if shape[-1] != pairs_D:
        raise ValueError(f"the pairs have D={pairs_D} channels but layer {layer!r} gives {shape[-1]} "
                         f"(features of shape {tuple(shape)})")
