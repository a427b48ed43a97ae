"""Type checks of hyperparameters shared by the estimators (bool is not a number here)."""

from __future__ import annotations

import math

import numpy as np


def is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_int(name: str, value, minimum: int = 1, *, optional: bool = False) -> None:
    """An integer (numpy integers too, bool refused) at least ``minimum`` (None too when
    ``optional``), else a ValueError naming it."""
    if optional and value is None:
        return
    if not is_int(value) or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {expected}{' or None' if optional else ''}, got {value!r}")


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
