"""Checkpoints of long fits: the state of a fit saved atomically between passes over the data,
so that a fit killed mid-way resumes where it stopped and ends with the same result as an
uninterrupted fit.

``SphericalKMeans.fit(X, checkpoint="km.ckpt")`` and ``EDPairs.fit(X, checkpoint=...)`` save
after every pass (one file, replaced atomically) and, when the file exists, resume from it.
The file records what the fit depends on (its parameters and the data's shape and a
fingerprint of its rows, see :func:`data_fingerprint`); a checkpoint of another fit is
refused with a clear error rather than silently mixed in. It is removed when the fit
completes."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import numpy as np

from ._io import existing_folder, write_atomic

__all__ = ["Checkpoint", "CheckpointMismatch"]

FORMAT = "edpairs-checkpoint"
VERSION = 1


class CheckpointMismatch(ValueError):
    """The checkpoint file belongs to a different fit (other parameters or data)."""


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


class Checkpoint:
    """One checkpoint file for one fit, identified by ``key`` (a JSON-able dict).

    ``load()`` returns the saved ``(stage, {"meta": ..., "carried": ...}, arrays)`` or None
    when there is no file;
    ``save(stage, meta, arrays)`` replaces the file atomically; ``done()`` removes it.
    ``on_save(stage, meta)`` (optional) is called after each save — a hook for progress and
    for tests that interrupt a fit."""

    def __init__(self, path, key: dict, *, on_save: Optional[Callable[[str, dict], None]] = None):
        if not isinstance(path, (str, bytes, os.PathLike)):
            raise TypeError(f"checkpoint must be a file path (str or os.PathLike) or a Checkpoint, "
                            f"got {type(path).__name__}")
        self.path = os.fsdecode(path)
        existing_folder(self.path, f"checkpoint {self.path}")  # refused now, not after the fit's first pass
        if os.path.isdir(self.path):
            raise ValueError(f"checkpoint {self.path} is a folder; name a file in it for the checkpoint")
        self.key = _jsonable(key)
        self.on_save = on_save
        self._carried_meta, self._carried_arrays = {}, {}

    def carry(self, meta: dict, arrays: dict) -> None:
        """State saved with every later save (e.g. the moments every stage after them needs);
        ``load`` returns it in ``meta["carried"]`` and among the arrays."""
        self._carried_meta, self._carried_arrays = _jsonable(meta), dict(arrays)

    @classmethod
    def of(cls, checkpoint, key) -> Optional["Checkpoint"]:
        """``checkpoint`` as given to a fit: None, a path, or a Checkpoint (its key is set).
        ``key``: a dict, or a function that returns it, called only once a path has been
        accepted (a fit's key reads the data: a bad path is refused before that)."""
        if checkpoint is None:
            return None
        made = checkpoint if isinstance(checkpoint, Checkpoint) else cls(checkpoint, {})
        made.key = _jsonable(key() if callable(key) else key)
        return made

    def load(self):
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
            header = json.loads(arrays.pop("__meta__").tobytes().decode())
        except Exception as exc:
            raise CheckpointMismatch(
                f"{self.path} is not a readable edpairs checkpoint ({type(exc).__name__}: {exc}); "
                "delete it to start the fit afresh"
            ) from exc
        if header.get("format") != FORMAT or int(header.get("version", 0)) != VERSION:
            raise CheckpointMismatch(f"{self.path} is not an edpairs checkpoint of version {VERSION}")
        if header["key"] != self.key:
            diff = sorted(k for k in set(header["key"]) | set(self.key) if header["key"].get(k) != self.key.get(k))
            raise CheckpointMismatch(
                f"{self.path} holds the checkpoint of another fit (differs in: {', '.join(diff)}); "
                "delete it, or give this fit another checkpoint path"
            )
        return header["stage"], {"meta": header["meta"], "carried": header.get("carried", {})}, arrays

    def save(self, stage: str, meta: dict, arrays: dict) -> None:
        header = {"format": FORMAT, "version": VERSION, "key": self.key, "stage": stage, "meta": _jsonable(meta),
                  "carried": self._carried_meta}
        payload = dict(self._carried_arrays, **arrays)
        payload["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        write_atomic(self.path, lambda f: np.savez(f, **payload))
        if self.on_save is not None:
            self.on_save(stage, header["meta"])

    def done(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)


def data_fingerprint(source) -> dict:
    """Rows, columns and a checksum of the first rows of a chunk source (cheap: one chunk); for
    data held in memory (an array or a list of chunks) also of 256 rows spread over all of it,
    and for an activation store its shards' checksums, so that data which only differs after
    its first rows is not taken for the same. A callable source is checked on its first rows
    only (anything more would cost a pass over the data)."""
    import zlib

    from ._arrays import to_numpy64

    first = next(iter(source), None)
    if first is None:  # e.g. a rank that holds no rows
        return {"rows": 0, "columns": source.n_features, "head_crc32": 0}
    head = np.ascontiguousarray(to_numpy64(first[: min(256, first.shape[0])]))
    out = {"rows": source.n_samples, "columns": source.n_features, "head_crc32": zlib.crc32(head.tobytes())}
    if source.held:
        rows = np.unique(np.linspace(0, source.n_samples - 1, num=min(256, source.n_samples)).astype(np.int64))
        out["spread_crc32"] = zlib.crc32(np.ascontiguousarray(source.gather(rows)).tobytes())
    own = getattr(source.origin, "fingerprint", None)
    if callable(own):
        out["source"] = own()
    return out
