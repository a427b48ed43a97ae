"""Type checks of hyperparameters shared by the estimators (bool is not a number here)."""

from __future__ import annotations

import math

import numpy as np


def is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_real(name: str, value, expected: str, ok) -> None:
    """A real hyperparameter, finite and accepted by ``ok``, else a ValueError naming it."""
    if not is_real(value) or not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
