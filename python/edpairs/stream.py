"""Host data streamed to a GPU with the copies overlapped with compute (DESIGN section 4, issue
6): :class:`DeviceChunks` wraps any fit source held in host memory — an array, a list of
chunks, a callable, an :class:`edpairs.store.ActivationStore` — and yields it as CUDA tensors,
so ``EDPairs(...).fit(DeviceChunks(store))`` runs the kernels on the GPU on data larger than
GPU memory.

How the copies overlap (CUDA): host chunks are cut into pieces of about ``chunk_bytes``; each
piece is copied into one of ``buffers`` pinned host buffers (by ``copy_threads`` threads at
once: one thread's memcpy, about 5-10 GB/s, is far below a PCIe 5 link's 55 GB/s), then to the
matching device buffer
on a separate copy stream (``non_blocking``). The piece after the one being handed out is
staged before it is handed out, so its transfer runs while the caller's kernels work on the
current one. Events order everything without a device-wide synchronisation:

* the caller's (current) stream waits for a piece's copy event before the piece is handed out;
* a device buffer is refilled only after the caller's stream has passed the point where the
  caller finished queuing work on it (an event recorded when the caller asks for the next
  piece);
* a pinned buffer is overwritten on the host only after the copy that read it has completed.

So a piece is valid until the caller asks for the next one; a caller that keeps a piece longer
must copy it (``.clone()``). The estimators only keep results computed from each chunk.

With ``register=True`` (an array or a list / tuple of arrays in memory) the host arrays are
page-locked where they are (``cudaHostRegister``, once, on the first pass; released by
``close()``), and contiguous pieces go to the device straight from them: no staging copy,
which otherwise bounds the stream at the host's memcpy rate (H100, 2 GiB of float16 rows:
49-51 GB/s registered against 18-19 GB/s staged, 0.94-0.99 of the pinned copy rate).
Registering costs time once (the kernel locks every page: 0.07 s for those 2 GiB), which the
first pass already repays. Arrays that are not C-contiguous are not registered (their pieces
are staged all the same).

On a non-CUDA device (``device="cpu"``) the pieces are plain torch tensors of the host data:
the same code path minus the streams, which is what the CPU tests check."""

from __future__ import annotations

import ctypes
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from ._arrays import FLOAT_INPUTS, require_torch, to_host
from ._checks import check_bool, check_int, is_int
from ._source import ChunkSource

__all__ = ["DeviceChunks"]


class DeviceChunks:
    """A fit source that streams host ``data`` to ``device`` (default: the current CUDA device).

    ``device``: a CUDA device, or ``"cpu"`` (the devices the fits compute on).
    ``dtype``: the dtype on the device, float32, float64, float16 or bfloat16 (a torch dtype,
    its name, or a numpy float dtype; default: the host dtype, float16 stores stay float16 —
    the kernels read it natively). ``chunk_bytes``: the size of one transfer, a positive
    integer (host chunks are cut into pieces of at most this many bytes, at least one row).
    ``buffers``: pinned / device buffer pairs in rotation, an integer >= 2 (2 = double
    buffering). ``copy_threads``: threads that copy a piece into pinned memory together, a
    positive integer (default: up to 8, one per CPU core). All are checked here, not at the
    first chunk. ``register``: page-lock ``data`` in place instead of staging copies
    (see the module docstring); then ``close()`` (or a ``with`` block) unregisters it.
    Implements the chunk-source protocol (``chunks()``), and passes ``images()`` through when
    the wrapped source has it (URA reads whole images, on the host)."""

    def __init__(self, data, device=None, *, dtype=None, chunk_bytes: int = 64 * 2**20, buffers: int = 2,
                 copy_threads: int = None, register: bool = False):
        self._registered = None  # the registered (pointer, bytes) spans, after the first pass
        torch = require_torch("DeviceChunks")
        check_bool("register", register)
        if register and not _host_arrays(data):
            raise TypeError("DeviceChunks(register=True) needs data that stays in memory: a numpy array or a list / "
                            f"tuple of numpy arrays, got {type(data).__name__}")
        self.register = bool(register)
        if not is_int(buffers) or buffers < 2:
            raise ValueError(f"buffers must be >= 2, an integer (one buffer in use, one being filled), got {buffers!r}")
        check_int("chunk_bytes", chunk_bytes)
        if copy_threads is not None and (not is_int(copy_threads) or copy_threads < 1):
            raise ValueError(f"copy_threads must be >= 1, an integer (or None: one per CPU core, up to 8), "
                             f"got {copy_threads!r}")
        if copy_threads is None:
            copy_threads = max(1, min(8, os.cpu_count() or 1))
        self.copy_threads = int(copy_threads)
        self.device = _device(torch, device)
        self.dtype = _dtype(torch, dtype)
        self.source = ChunkSource(data)
        self._data = data
        self.chunk_bytes, self.buffers = int(chunk_bytes), int(buffers)
        self.n_features = self.source.n_features
        self.n_samples = self.source.n_samples  # (None where the wrapped source does not know them)
        self.bytes_copied = 0

    def __repr__(self) -> str:
        return (f"DeviceChunks(device={str(self.device)!r}, dtype={self.dtype}, chunk_bytes={self.chunk_bytes}, "
                f"buffers={self.buffers}, register={self.register})")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Unregisters the host memory that ``register=True`` page-locked (a no-op otherwise);
        a later pass registers it again."""
        spans, self._registered = self._registered, None
        if not spans:
            return
        import torch

        failed = [ptr for ptr, _ in spans if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0]
        if failed:
            _clear_cuda_error()
            raise RuntimeError(f"DeviceChunks.close: cudaHostUnregister failed for {len(failed)} of {len(spans)} spans")

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 (interpreter shutdown: nothing left to tell)
            pass

    def _register(self, torch) -> None:
        """Page-locks the host arrays of ``data`` (their page spans, merged), once."""
        if self._registered is not None:
            return
        cudart = torch.cuda.cudart()
        done = []
        try:
            arrays = [a for a in _host_arrays(self._data) if a.flags.c_contiguous]  # the others are staged
            for ptr, size, read_only in _page_spans(arrays, os.sysconf("SC_PAGE_SIZE")):
                err = int(cudart.cudaHostRegister(ptr, size, 8 if read_only else 0))  # 8: cudaHostRegisterReadOnly
                if err != 0:
                    _clear_cuda_error()
                    raise RuntimeError(f"DeviceChunks(register=True): cudaHostRegister of {size} bytes failed with "
                                       f"CUDA error {err}; use register=False (staged copies)")
                done.append((ptr, size))
        except BaseException:
            for ptr, _ in done:
                cudart.cudaHostUnregister(ptr)
            raise
        self._registered = done

    def _in_registered(self, piece: np.ndarray) -> bool:
        """Whether the bytes of `piece` lie inside one registered span."""
        lo = piece.__array_interface__["data"][0]
        hi = lo + piece.nbytes
        return any(ptr <= lo and hi <= ptr + size for ptr, size in self._registered or ())

    def images(self, *args, **kwargs):
        if not callable(getattr(self._data, "images", None)):
            raise AttributeError(f"{type(self._data).__name__} has no images(): URA needs whole images")
        return self._data.images(*args, **kwargs)

    def _pieces(self) -> Iterator[np.ndarray]:
        for chunk in self.source:
            host = to_host(chunk)
            rows = max(1, self.chunk_bytes // max(1, host.shape[1] * host.itemsize))
            for s in range(0, host.shape[0], rows):
                yield host[s:s + rows]

    def chunks(self):
        """A fresh iterator of (n, D) torch tensors on the device (see the module docstring for
        how long each stays valid)."""
        torch = require_torch("DeviceChunks")
        if self.device.type != "cuda":
            for piece in self._pieces():
                t = torch.from_numpy(np.array(piece)).to(self.device)  # a copy: store shards are read-only maps
                yield t if self.dtype is None else t.to(self.dtype)
            return
        yield from self._cuda_chunks(torch)

    def _cuda_chunks(self, torch):
        device = self.device
        compute = torch.cuda.current_stream(device)
        copy = torch.cuda.Stream(device)
        slots = [dict(pinned=None, dev=None, copied=None, consumed=None) for _ in range(self.buffers)]
        pool = ThreadPoolExecutor(self.copy_threads) if self.copy_threads > 1 else None
        try:
            yield from self._cuda_pieces(torch, device, compute, copy, slots, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _cuda_pieces(self, torch, device, compute, copy, slots, pool):
        if self.register:
            self._register(torch)

        def stage(piece: np.ndarray, slot: dict):
            n, D = piece.shape
            host_dtype = torch.from_numpy(np.empty(0, piece.dtype)).dtype  # (piece may be a read-only map)
            if self.register and piece.flags.c_contiguous and self._in_registered(piece):
                with warnings.catch_warnings():  # a read-only array: torch only reads it
                    warnings.simplefilter("ignore", UserWarning)
                    src = torch.from_numpy(piece)  # page-locked in place: the copy reads it directly
            else:
                if slot["copied"] is not None:
                    slot["copied"].synchronize()      # the pinned buffer's last transfer has read it
                if slot["pinned"] is None or slot["pinned"].shape[0] < n or slot["pinned"].dtype != host_dtype:
                    slot["pinned"] = torch.empty((n, D), dtype=host_dtype, pin_memory=True)
                _copy_rows(slot["pinned"][:n].numpy(), piece, pool, self.copy_threads)  # into page-locked memory
                src = slot["pinned"][:n]
            dev_dtype = self.dtype or host_dtype
            with torch.cuda.stream(copy):
                if slot["consumed"] is not None:
                    copy.wait_event(slot["consumed"])  # the caller's work on the old contents is done
                if slot["dev"] is None or slot["dev"].shape[0] < n or slot["dev"].dtype != dev_dtype:
                    slot["dev"] = torch.empty((n, D), dtype=dev_dtype, device=device)
                out = slot["dev"][:n]
                if dev_dtype == host_dtype:
                    out.copy_(src, non_blocking=True)
                else:
                    out.copy_(src.to(device, non_blocking=True))
                ev = torch.cuda.Event()
                ev.record(copy)
                slot["copied"] = ev
            self.bytes_copied += piece.nbytes
            return out

        pieces = self._pieces()
        first = next(pieces, None)
        if first is None:
            return
        k = 0
        current = stage(first, slots[0])
        while current is not None:
            slot = slots[k % self.buffers]
            nxt = next(pieces, None)
            upcoming = stage(nxt, slots[(k + 1) % self.buffers]) if nxt is not None else None
            compute.wait_event(slot["copied"])
            # The tensor was allocated on the copy stream and is used on the caller's: tell the
            # caching allocator, so its memory is not reused before the caller's work is done.
            current.record_stream(compute)
            yield current
            done = torch.cuda.Event()
            done.record(compute)
            slot["consumed"] = done
            current = upcoming
            k += 1
        torch.cuda.current_stream(device).wait_stream(copy)


def _device(torch, device):
    """``device`` as a torch.device of the kinds the fits compute on: a CUDA device (default: the
    current one; one must be available) or the CPU; else an error naming it."""
    if device is None:
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"device must be a CUDA device ('cuda', 'cuda:1', an index, a torch.device) or 'cpu', got "
                         f"{device!r} ({exc})") from None
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be a CUDA device or 'cpu' (the fits' kernels run on those), got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DeviceChunks: no CUDA device is available to torch; pass device='cpu' to read "
                           "the data as CPU tensors")
    return dev


def _dtype(torch, dtype):
    """``dtype`` (None, a torch dtype, its name, or a numpy float dtype) as None or a torch
    floating dtype the fits read; else a ValueError naming it."""
    if dtype is None:
        return None
    expected = f"None (the host dtype) or one of {', '.join(FLOAT_INPUTS)} (a torch or numpy dtype, or its name)"
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    elif isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name  # np.float16, np.dtype("float32")
        except TypeError:
            raise ValueError(f"dtype must be {expected}, got {dtype!r}") from None
    if name not in FLOAT_INPUTS:
        raise ValueError(f"dtype must be {expected}, got {dtype!r}")
    return getattr(torch, name)


def _clear_cuda_error() -> None:
    """Takes the pending error of a failed cudaHostRegister / cudaHostUnregister off torch's CUDA
    runtime (torch's bindings do not), so that it does not surface as the error of an unrelated
    later kernel launch: cudaGetLastError of the libcudart this process has loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libcudart.so" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except (OSError, AttributeError):  # not Linux, or a static runtime: nothing to reach
        pass


def _host_arrays(data) -> list:
    """The numpy arrays of `data` when it is one or a list / tuple of them, else []."""
    if isinstance(data, np.ndarray):
        return [data]
    if isinstance(data, (list, tuple)) and data and all(isinstance(a, np.ndarray) for a in data):
        return list(data)
    return []


def _page_spans(arrays, page: int) -> list:
    """(pointer, bytes, read_only) spans covering the memory of `arrays`, widened to whole pages
    and merged where they touch or overlap (views of one array, chunks sharing a page):
    cudaHostRegister refuses a page registered twice."""
    spans = []
    for a in arrays:
        if a.size == 0:
            continue
        lo = hi = a.__array_interface__["data"][0]
        for n, st in zip(a.shape, a.strides):  # the lowest and highest byte a strided view touches
            if st < 0:
                lo += (n - 1) * st
            else:
                hi += (n - 1) * st
        hi += a.itemsize
        spans.append([lo // page * page, -(-hi // page) * page, not a.flags.writeable])
    spans.sort()
    merged = []
    for lo, hi, ro in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
            merged[-1][2] = merged[-1][2] or ro
        else:
            merged.append([lo, hi, ro])
    return [(lo, hi - lo, ro) for lo, hi, ro in merged]


def _copy_rows(dst: np.ndarray, src: np.ndarray, pool, threads: int) -> None:
    """dst[...] = src, split by rows over the pool's threads (numpy releases the GIL while it
    copies); in the calling thread without a pool or for a small piece."""
    n = src.shape[0]
    if pool is None or n < 2 * threads or src.nbytes < 8 * 2**20:
        dst[...] = src
        return
    bounds = [n * i // threads for i in range(threads + 1)]
    for f in [pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in zip(bounds, bounds[1:])]:
        f.result()
