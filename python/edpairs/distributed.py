"""Scale-out over processes with ``torch.distributed`` (DESIGN section 4).

Every statistic edpairs fits from is a sum over patches, so a fit over several processes is the
single-process fit with each sum all-reduced: each rank reads its own rows, and the results are
the same on every rank as one process on the concatenation of the ranks' rows in rank order
(rank 0's rows first), up to the order of floating-point summation.

    import torch.distributed as dist
    dist.init_process_group("gloo")            # or "nccl"; torchrun sets the environment
    km = edp.SphericalKMeans(64, random_state=0).fit(my_rows, process_group=dist.group.WORLD)

``process_group=None`` means one process; ``True`` means the default (world) group.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["Reducer", "StoreShard", "merge_moments", "reducer", "shard_dataset", "shard_range", "shard_store"]


class Reducer:
    """Sums over the processes of a group (this base class: one process, sums are identities).

    ``rank`` / ``world_size`` of this process; ``sum(a)`` the elementwise sum of ``a`` (a numpy
    float64 or int64 array) over ranks, identical on every rank; ``gather(a)`` the list of
    every rank's ``a`` (same shape on all ranks) in rank order; ``offset(n)`` the number of rows
    held by lower ranks and the total, for global row indices."""

    rank = 0
    world_size = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def sum(self, a: np.ndarray) -> np.ndarray:
        return np.asarray(a)

    def gather(self, a: np.ndarray) -> list:
        return [np.asarray(a)]

    def offset(self, n: int):
        """(rows of lower ranks, rows of all ranks) for a local row count ``n``."""
        counts = [int(c) for c in np.concatenate(self.gather(np.array([n], np.int64)))]
        return sum(counts[: self.rank]), sum(counts)

    def rows(self, source, rows: np.ndarray, offset: int, n_features: int) -> np.ndarray:
        """float64 rows at sorted global indices ``rows``, each read by the rank that holds it
        and summed into place on every rank (the others contribute zeros)."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros((rows.size, n_features))
        n_local = source.n_samples
        mine = (rows >= offset) & (rows < offset + n_local)
        if mine.any():
            out[mine] = source.gather(rows[mine] - offset)
        return self.sum(out)


class _TorchReducer(Reducer):
    def __init__(self, group):
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("process_group was given but torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group(...) first (torchrun sets its environment)")
        self._torch, self._dist = torch, dist
        self.group = None if group is True else group
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        backend = dist.get_backend(self.group)
        # NCCL reduces CUDA tensors only; every other backend here works on host memory.
        self._device = (torch.device("cuda", torch.cuda.current_device()) if backend == "nccl"
                        else torch.device("cpu"))

    def sum(self, a):
        a = np.asarray(a)
        if a.dtype not in (np.float64, np.int64):
            raise TypeError(f"only float64 and int64 arrays are reduced, got {a.dtype}")
        t = self._torch.from_numpy(np.ascontiguousarray(a).copy()).to(self._device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy().reshape(a.shape)

    def gather(self, a):
        a = np.ascontiguousarray(np.asarray(a))
        t = self._torch.from_numpy(a.copy()).to(self._device)
        parts = [self._torch.empty_like(t) for _ in range(self.world_size)]
        self._dist.all_gather(parts, t, group=self.group)
        return [p.cpu().numpy() for p in parts]


_LOCAL = Reducer()


def reducer(process_group=None) -> Reducer:
    """The reducer for ``process_group``: None → one process; True → the default group; a
    ``torch.distributed`` ProcessGroup → that group."""
    if process_group is None or process_group is False:
        return _LOCAL
    if isinstance(process_group, Reducer):
        return process_group
    return _TorchReducer(process_group)


def merge_moments(red: Reducer, n: int, mean: np.ndarray, scatter: np.ndarray):
    """Count, mean and centred scatter of the union of every rank's rows: the ranks' (n, mean,
    scatter) gathered and merged pairwise in rank order (exact; no cancellation from raw second
    moments). Returns float64 (n, mean, scatter), identical on every rank."""
    if not red.active:
        return n, mean, scatter
    D = mean.shape[0]
    packed = np.concatenate([[float(n)], np.asarray(mean, np.float64), np.asarray(scatter, np.float64).ravel()])
    total_n, total_mean, total_scatter = 0.0, np.zeros(D), np.zeros((D, D))
    for part in red.gather(packed):
        nb, mb, sb = part[0], part[1:1 + D], part[1 + D:].reshape(D, D)
        if nb == 0:
            continue
        if total_n == 0:
            total_n, total_mean, total_scatter = nb, mb.copy(), sb.copy()
            continue
        delta = mb - total_mean
        n_ab = total_n + nb
        total_scatter = total_scatter + sb + np.outer(delta, delta) * (total_n * nb / n_ab)
        total_mean = total_mean + delta * (nb / n_ab)
        total_n = n_ab
    return int(total_n), total_mean, total_scatter



def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that rank ``rank`` of ``world_size`` reads. Blocks are
    in rank order, so the ranks' rows concatenated in rank order are the data in its order —
    which is what makes a distributed fit equal the single-process fit."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    per, extra = divmod(int(n), world_size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def _rank_world(process_group, rank, world_size):
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    red = reducer(True if process_group is None else process_group)
    return red.rank, red.world_size


class StoreShard:
    """The shards of an activation store that one rank reads (a fit source: ``chunks()``)."""

    def __init__(self, store, shards: range):
        self.store, self.shards = store, shards

    def chunks(self):
        self.store._check_complete()
        return (self.store.shard(i) for i in self.shards)

    def __repr__(self) -> str:
        return f"StoreShard({self.store.path!r}, shards {self.shards.start}..{self.shards.stop - 1})"


def shard_store(store, process_group=None, *, rank: Optional[int] = None, world_size: Optional[int] = None):
    """This rank's part of an :class:`edpairs.store.ActivationStore`: a contiguous block of its
    shards (see :func:`shard_range`), to pass to ``fit(..., process_group=...)``. ``rank`` /
    ``world_size`` default to the process group's (the default group when None)."""
    rank, world_size = _rank_world(process_group, rank, world_size)
    return StoreShard(store, shard_range(len(store), rank, world_size))


def shard_dataset(dataset, process_group=None, *, rank: Optional[int] = None, world_size: Optional[int] = None):
    """This rank's contiguous block of a map-style dataset (a ``torch.utils.data.Subset``), for
    capturing activations on every rank without overlap and in data order."""
    from torch.utils.data import Subset

    rank, world_size = _rank_world(process_group, rank, world_size)
    return Subset(dataset, list(shard_range(len(dataset), rank, world_size)))
