"""Lazy access to the compiled module, so that ``import edpairs`` never loads CUDA code."""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def lib():
    try:
        from . import _C
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError(
            "edpairs' compiled module edpairs._C could not be imported "
            f"({exc}); reinstall edpairs with `pip install .` from a checkout"
        ) from exc
    return _C
