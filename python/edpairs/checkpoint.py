"""Checkpoints of long fits: the state of a fit saved atomically between passes over the data,
so that a fit killed mid-way resumes where it stopped and ends with the same result as an
uninterrupted fit.

``SphericalKMeans.fit(X, checkpoint="km.ckpt")`` and ``EDPairs.fit(X, checkpoint=...)`` save
after every pass (one file, replaced atomically) and, when the file exists, resume from it.
The file records what the fit depends on (its parameters and the data's shape and a
fingerprint of its rows, see :func:`data_fingerprint`: a checksum of all the rows of data in
host memory, of sampled rows of data on a GPU); a checkpoint of another fit, or of the same
fit on other data, is refused with a clear error (:class:`CheckpointMismatch`) rather than
silently mixed in, and so is a file that is not a well-formed checkpoint. It is removed when
the fit completes."""

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


def _unreadable(exc: Exception) -> str:
    """Why np.load could not open a checkpoint, in words (numpy's own text for a file that is
    not an .npy / .npz archive advises loading it with allow_pickle=True: never)."""
    if isinstance(exc, ValueError) and "pickle" in str(exc):
        return "its header is unreadable: not a NumPy .npz archive"
    return f"{type(exc).__name__}: {exc}"


def _header_problem(header) -> str:
    """What is malformed in a decoded checkpoint header of this format and version, or ""."""
    missing = [f for f in ("key", "stage", "meta") if f not in header]
    if missing:
        return f"lacks the field(s) {', '.join(missing)}"
    for field, kind, name in (("key", dict, "an object"), ("meta", dict, "an object"),
                              ("carried", dict, "an object"), ("stage", str, "a string")):
        if field in header and not isinstance(header[field], kind):
            return f"has {field} of type {type(header[field]).__name__}, expected {name}"
    return ""


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

    def _refuse(self, why: str) -> CheckpointMismatch:
        return CheckpointMismatch(f"{self.path} is not a readable edpairs checkpoint ({why}); "
                                  "delete it to start the fit afresh")

    def load(self):
        if not os.path.exists(self.path):
            return None
        try:
            with np.load(self.path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in f.files}
        except Exception as exc:
            raise self._refuse(_unreadable(exc)) from exc
        if "__meta__" not in arrays:
            raise self._refuse("it is an .npz archive without the edpairs header __meta__")
        try:
            header = json.loads(arrays.pop("__meta__").tobytes().decode())
        except Exception as exc:  # (not UTF-8, not JSON)
            raise self._refuse(f"its header is not JSON: {type(exc).__name__}: {exc}") from exc
        if not isinstance(header, dict):
            raise self._refuse(f"its header is a JSON {type(header).__name__}, expected an object")
        version = header.get("version")
        if header.get("format") != FORMAT:
            raise CheckpointMismatch(f"{self.path} is not an edpairs checkpoint of version {VERSION}")
        if not (isinstance(version, int) and not isinstance(version, bool)):
            raise self._refuse(f"its header has version {version!r}, expected an integer")
        if version != VERSION:
            raise CheckpointMismatch(f"{self.path} is an edpairs checkpoint of version {version}; this edpairs "
                                     f"reads version {VERSION}: delete it to start the fit afresh")
        problem = _header_problem(header)
        if problem:
            raise self._refuse(f"its header {problem}")
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
    """Rows, columns and a checksum of the first rows of a chunk source (cheap: one chunk), and:

    * data held in host memory (a numpy array, a CPU torch tensor, a list of them): a CRC-32 of
      all of it (``crc32``: its bytes, chunk by chunk, in data order; one pass at memory speed,
      cheap next to a fit), so that data changed anywhere is not taken for the same;
    * data held on a GPU (a CUDA tensor, a cupy array, a list holding one): a checksum of 256
      rows spread over all of it only (``spread_crc32``) — reading all of it would copy it to
      the host; a change in other rows goes unnoticed there;
    * an activation store: its shards' checksums (read from its sidecar);
    * a callable source: its first rows only (anything more would cost a pass over the data).

    The dtype of host data is part of its checksum (float32 and float64 copies of the same
    values differ)."""
    import zlib

    from ._arrays import namespace_of, to_numpy64

    first = next(iter(source), None)
    if first is None:  # e.g. a rank that holds no rows
        return {"rows": 0, "columns": source.n_features, "head_crc32": 0}
    head = np.ascontiguousarray(to_numpy64(first[: min(256, first.shape[0])]))
    out = {"rows": source.n_samples, "columns": source.n_features, "head_crc32": zlib.crc32(head.tobytes())}
    if source.held:
        arrays = source.arrays
        if all(not namespace_of(a).is_cuda(a) for a in arrays):
            crc = 0
            for a in arrays:
                crc = _crc32_rows(a, crc)
            out["crc32"] = crc
        else:
            rows = np.unique(np.linspace(0, source.n_samples - 1, num=min(256, source.n_samples)).astype(np.int64))
            out["spread_crc32"] = zlib.crc32(np.ascontiguousarray(source.gather(rows)).tobytes())
    own = getattr(source.origin, "fingerprint", None)
    if callable(own):
        out["source"] = own()
    return out


def _crc32_rows(a, crc: int, block_bytes: int = 16 * 2**20) -> int:
    """``crc`` continued over the bytes of the 2-D host array ``a`` (numpy, or a CPU torch tensor
    of any dtype) in row-major order, a block of rows at a time (a non-contiguous array is
    copied one block at a time, never whole)."""
    import zlib

    is_torch = hasattr(a, "detach")
    itemsize = a.element_size() if is_torch else a.itemsize
    step = max(1, block_bytes // max(1, int(a.shape[1]) * itemsize))
    for s in range(0, int(a.shape[0]), step):
        block = a[s:s + step]
        if is_torch:  # (bfloat16 too, which numpy lacks: its bytes, as uint8)
            import torch

            block = block.detach().contiguous().view(-1).view(torch.uint8).numpy()
        else:
            block = np.ascontiguousarray(block)
        crc = zlib.crc32(memoryview(block).cast("B"), crc)
    return crc
