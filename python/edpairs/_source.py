"""Data sources for the estimators: one in-memory array, or a re-iterable collection of (n, D)
chunks (a list, a callable that returns a fresh iterator, or an object with a ``chunks()``
method such as :class:`edpairs.store.ActivationStore`), read pass after pass. Every estimator
streams through chunks, so data larger than memory fits the same way."""

from __future__ import annotations

import os
from typing import Callable, Iterator, List, Optional

import numpy as np

from ._arrays import FLOAT_INPUTS, as_array, device_scope, namespace_of, on_device_of, to_host, to_numpy64

DEFAULT_CHUNK_BYTES = 256 * 2**20
#: An array already on a GPU is read in larger chunks: a chunk there is a view, not a copy,
#: and what a chunk costs beyond it is a few bytes a row (labels, scores, row scales; the
#: kernels bound their own scratch), while every chunk costs a pass its launches, its checks'
#: waits and its sorted sums over fewer rows (H200 run 6b: SphericalKMeans.fit in 256 MB chunks,
#: 8 per pass over 1M x 512, spent 1.55 ms a pass in the sorted sums against 0.82 ms for one
#: call on all the rows). At most 2 GiB of float32 rows (2^29 values: element offsets far from
#: 2^31) and DEVICE_CHUNK_MAX_ROWS rows (its per-row buffers in bounds at narrow widths).
DEVICE_CHUNK_BYTES = 2**31
DEVICE_CHUNK_MAX_ROWS = 2**24


class ChunkSource:
    """Re-iterable (n_i, D) chunks with a known number of columns.

    ``data`` may be a 2-D array (numpy, torch, cupy), a list/tuple of 2-D arrays, a
    zero-argument callable returning an iterator of 2-D arrays, or any object with a
    ``chunks()`` method returning a fresh iterator of 2-D arrays on every call (the chunk
    source protocol; :class:`edpairs.store.ActivationStore` implements it). Such an object may
    declare its rows and columns as integers ``n_samples`` and ``n_features``, which saves the
    pass that would count the rows (checked against every pass). A one-shot iterator or generator is refused: fitting reads
    the data several times."""

    def __init__(self, data, *, chunk_rows: Optional[int] = None, name: str = "X"):
        self.name = name
        self._array = None
        self._chunks: Optional[List] = None
        self._factory: Optional[Callable[[], Iterator]] = None
        self._layout: Optional[List] = None  # a callable source's chunks in its first whole pass (_signature)
        self.origin = data  # what the caller passed (a store's own fingerprint is read from it)
        if not hasattr(data, "shape") and callable(getattr(data, "chunks", None)):
            self._factory = data.chunks
        elif callable(data) and not hasattr(data, "shape"):
            self._factory = data
        elif isinstance(data, (list, tuple)):
            if len(data) == 0:
                raise ValueError(f"{name} is an empty list of chunks")
            if all(np.ndim(item) == 1 for item in data):
                raise ValueError(f"{name} is a list of {len(data)} 1-D items, but a list is read as a list of (n, D) "
                                 f"chunks; for a list of rows pass np.asarray({name})")
            self._chunks = [self._check(as_array(c, name)) for c in data]
        elif isinstance(data, (str, bytes, os.PathLike)):
            raise TypeError(f"{name} is a path ({data!r}), not data: load the array first (np.load), or open an "
                            "edpairs.store.ActivationStore, which is a chunk source")
        elif isinstance(data, (dict, set, frozenset)):
            raise TypeError(f"{name} is a {type(data).__name__}: pass an array, a list of (n, D) chunks, or a callable "
                            "that returns a fresh iterator of chunks")
        elif hasattr(data, "__next__") or (hasattr(data, "__iter__") and not hasattr(data, "shape") and not isinstance(data, np.ndarray)):
            raise TypeError(
                f"{name} is a one-shot iterator; fitting reads the data several times: pass an array, "
                "a list of chunks, or a callable that returns a fresh iterator of chunks"
            )
        else:
            self._array = self._check(as_array(data, name))
        first = self._array if self._array is not None else (self._chunks[0] if self._chunks else None)
        self.n_features: Optional[int] = None if first is None else int(first.shape[1])
        self.like = first  # an array of the data's library and device (known after a first pass otherwise)
        if self._array is not None:
            self.n_samples: Optional[int] = int(self._array.shape[0])
            itemsize = np.dtype("float32").itemsize if namespace_of(self._array).name != "numpy" else self._array.itemsize
            per_row = max(1, int(self._array.shape[1]) * max(itemsize, 2))
            if namespace_of(self._array).is_cuda(self._array):
                default = min(DEVICE_CHUNK_MAX_ROWS, DEVICE_CHUNK_BYTES // per_row)
            else:
                default = DEFAULT_CHUNK_BYTES // per_row
            self.chunk_rows = chunk_rows or max(1, default)
        elif self._chunks is not None:
            self.n_samples = int(sum(c.shape[0] for c in self._chunks))
            self.chunk_rows = chunk_rows
        else:
            declared = self._declared_shape(data)
            self.n_samples = None if declared is None else declared[0]
            if declared is not None:
                self.n_features = declared[1]
            self.chunk_rows = chunk_rows
        self._declared = self.n_samples is not None and self._factory is not None

    @staticmethod
    def _declared_shape(data) -> Optional[tuple]:
        """(rows, columns) that an object with chunks() declares as integers ``n_samples`` >= 0
        and ``n_features`` >= 1, else None (then the first pass finds them)."""
        if not callable(getattr(data, "chunks", None)):
            return None
        try:
            rows, cols = getattr(data, "n_samples", None), getattr(data, "n_features", None)
        except (KeyError, ValueError, TypeError):  # (a store without shards has no columns yet)
            return None
        whole = [isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (rows, cols)]
        if all(whole) and rows >= 0 and cols >= 1:
            return int(rows), int(cols)
        return None

    @property
    def in_memory(self) -> bool:
        """True for a single in-memory array (labels of all rows can be kept)."""
        return self._array is not None

    @property
    def held(self) -> bool:
        """True for data held as an array or a list of chunks (rows can be gathered without a
        pass over a callable source)."""
        return self._factory is None

    @property
    def array(self):
        return self._array

    @property
    def arrays(self) -> list:
        """The arrays a held source reads pass after pass (its array, or its list's chunks);
        none for a callable source, whose chunks may be new each pass."""
        if self._array is not None:
            return [self._array]
        return list(self._chunks or [])

    def _check(self, X):
        xp = namespace_of(X)
        if X.ndim != 2:
            hint = (" (for a layer's (n, ..., D) activations pass the patch rows X.reshape(-1, D), or fit "
                    "with head= for URA, which takes the maps)" if X.ndim > 2 else "")
            raise ValueError(f"{self.name} chunks must be 2-D (n, D), got shape {tuple(X.shape)}{hint}")
        if xp.dtype_name(X) not in FLOAT_INPUTS:
            raise ValueError(
                f"{self.name} dtype not supported: expected float32, float64, float16 or bfloat16, got {xp.dtype_name(X)}"
            )
        if X.shape[1] == 0:
            raise ValueError(f"{self.name} must have at least one column, got shape {tuple(X.shape)}")
        if getattr(self, "n_features", None) is not None and X.shape[1] != self.n_features:
            raise ValueError(f"{self.name} chunks must all have {self.n_features} columns, got shape {tuple(X.shape)}")
        return X

    def __iter__(self) -> Iterator:
        """The chunks. They may live on a GPU other than the current one: a loop that computes
        on a chunk does so inside ``with device_scope(chunk)`` (cupy computes on the current
        device). The scope is the loop body's, not this generator's: a generator suspended inside
        a context would keep the chunk's device current for as long as it lives, after an
        error too."""
        if self._array is not None:
            N = self._array.shape[0]
            step = self.chunk_rows
            for s in range(0, N, step):
                yield self._array[s:s + step]
            return
        it = iter(self._chunks) if self._chunks is not None else self._fresh_iterator()
        total = 0
        seen = [] if self._factory is not None else None
        for chunk in it:
            chunk = self._check(as_array(chunk, self.name))
            if self.n_features is None:
                self.n_features = int(chunk.shape[1])
            if self.like is None:
                self.like = chunk
            if chunk.shape[0] == 0:
                continue
            if seen is not None:
                self._same_chunk(chunk, seen)
            total += int(chunk.shape[0])
            if self.chunk_rows and chunk.shape[0] > self.chunk_rows:
                for s in range(0, chunk.shape[0], self.chunk_rows):
                    yield chunk[s:s + self.chunk_rows]
            else:
                yield chunk
        if seen is not None:
            if self._layout is not None and len(seen) != len(self._layout):
                raise ValueError(self._changed(f"{len(self._layout)} chunks before, {len(seen)} now"))
            self._layout = seen
        if self.n_samples is None:
            self.n_samples = total
        elif total != self.n_samples and self._declared:
            raise ValueError(f"{self.name} declares {self.n_samples} rows (n_samples) but its chunks() gave {total}")
        elif total != self.n_samples:
            raise ValueError(
                f"{self.name} changed between passes: {self.n_samples} rows before, {total} now; "
                "a callable source must return the same chunks every time"
            )

    @staticmethod
    def _signature(chunk) -> tuple:
        """What a later pass must find again of a callable source's chunk: its rows and, for a
        chunk in host memory, the first values of its first and last rows (a GPU chunk's values
        would cost a wait for the device per chunk: its rows only)."""
        rows = int(chunk.shape[0])
        xp = namespace_of(chunk)
        if xp.is_cuda(chunk):
            return (rows,)
        return rows, to_host(chunk[0, :8]).tobytes(), to_host(chunk[rows - 1, :8]).tobytes()

    def _changed(self, what: str) -> str:
        return (f"{self.name} changed between passes ({what}): a callable source must yield the same chunks in the "
                "same order every pass (a torch DataLoader with shuffle=True does not; shuffle once, or pass a list "
                "of chunks)")

    def _same_chunk(self, chunk, seen: list) -> None:
        """Records the next chunk of this pass in ``seen``, and checks it against the first pass's."""
        index = len(seen)
        sig = self._signature(chunk)
        seen.append(sig)
        if self._layout is None:
            return
        if index >= len(self._layout):
            raise ValueError(self._changed(f"{len(self._layout)} chunks before, more now"))
        before = self._layout[index]
        if sig[0] != before[0]:
            raise ValueError(self._changed(f"chunk {index} had {before[0]} rows, now {sig[0]}"))
        if len(sig) == len(before) and sig != before:
            raise ValueError(self._changed(f"chunk {index} holds other rows than before"))

    def _fresh_iterator(self) -> Iterator:
        made = self._factory()
        if hasattr(made, "shape"):
            raise TypeError(f"{self.name}: the callable returned an array of shape {tuple(made.shape)}, expected an "
                            "iterator of (n, D) chunks (return iter([X]), or pass the array itself)")
        try:
            return iter(made)
        except TypeError:
            what = "its chunks()" if getattr(self._factory, "__name__", "") == "chunks" else "the callable"
            raise TypeError(f"{self.name}: {what} returned a {type(made).__name__}, expected an iterator of "
                            "(n, D) chunks (e.g. a generator)") from None

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Rows at the given sorted global indices, as float64 numpy (for seeding on a sample)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((rows.size, self.n_features), dtype=np.float64)
        if self._array is not None:
            with device_scope(self._array):
                return to_numpy64(self._array[on_device_of(rows, self._array)])
        offset, k = 0, 0
        for chunk in self:
            n = chunk.shape[0]
            j = np.searchsorted(rows, offset + n, side="left")
            if j > k:
                with device_scope(chunk):
                    out[k:j] = to_numpy64(chunk[on_device_of(rows[k:j] - offset, chunk)])
                k = j
            offset += n
            if k == rows.size:
                break
        return out


def row_blocks(X, rows: int = 32768):
    """Slices of at most `rows` rows: bounds the temporaries of library-side products."""
    for s in range(0, X.shape[0], rows):
        yield X[s:s + rows]
