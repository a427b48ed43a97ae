#!/usr/bin/env python
"""Host data streamed to the GPU (issue 6: "large N streamed in chunks with host->device copies
overlapped with compute, so data larger than GPU memory runs at copy speed"), in one run:

  ceiling        a pinned host tensor copied to the device (the card's host->device rate)
  pageable       a pageable numpy array copied to the device (what .to("cuda") on numpy does)
  on-device      edpairs.ops.moments / one k-means pass on data already on the GPU (compute only)
  naive          per chunk: torch.from_numpy(chunk).to("cuda"), then the op (copy, then compute)
  DeviceChunks   edpairs.stream.DeviceChunks: pinned buffers, a copy stream, the next piece's
                 transfer overlapping the current piece's kernels
  staging        DeviceChunks' host half alone: one chunk copied into pinned memory by 1, the
                 default and 16 threads (whether the host copy or the link bounds the stream)
  registered     DeviceChunks(register=True): the host data page-locked in place once (that
                 time is its own row), then every piece copied straight from it (CUDA only)

Each row prints GB/s of host data consumed and its ratio to the pinned ceiling; the results of
the streamed moments are checked against the on-device ones before timing. Peak GPU memory
shows that the streamed runs hold two pieces, not the data.

    python benchmarks/bench_stream.py --gib 8 --json out.json          # a GPU machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from _common import machine_info, print_table, sync, write_json  # noqa: E402


def timed(fn, repeat: int, device: str):
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8.0, help="host data size in GiB")
    ap.add_argument("--features", type=int, default=512)
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--chunk-mib", type=int, default=256, help="host chunk size (a store shard) in MiB")
    ap.add_argument("--piece-mib", type=int, default=64, help="DeviceChunks transfer size in MiB")
    ap.add_argument("--clusters", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import torch

    import edpairs as edp
    from edpairs.stream import DeviceChunks

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_stream needs a CUDA device (--device cpu only checks that the script runs)")
        return 2
    cuda = device == "cuda"
    peak = (lambda: round(torch.cuda.max_memory_allocated() / 2**20)) if cuda else (lambda: None)
    reset = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    D, dt = args.features, np.dtype(args.dtype)
    N = int(args.gib * 2**30 // (D * dt.itemsize))
    rng = np.random.default_rng(0)
    X = np.empty((N, D), dt)
    step = 1 << 20
    for s in range(0, N, step):
        X[s:s + step] = rng.standard_normal((min(step, N - s), D), dtype=np.float32) + 0.5
    rows = max(1, args.chunk_mib * 2**20 // (D * dt.itemsize))
    chunks = [X[s:s + rows] for s in range(0, N, rows)]
    gb = X.nbytes / 1e9
    print(f"host data {N} x {D} {args.dtype} = {gb:.2f} GB in {len(chunks)} chunks of {args.chunk_mib} MiB")

    results = []

    def row(name, seconds, **extra):
        r = dict(method=name, seconds=round(seconds, 4), GBps=round(gb / seconds, 2), **extra)
        results.append(r)
        return r

    # Ceilings: one chunk copied from pinned / pageable memory, scaled to the data size.
    host = torch.from_numpy(chunks[0])
    pinned = host.pin_memory() if cuda else host.clone()
    target = torch.empty_like(pinned, device=device)
    t = timed(lambda: target.copy_(pinned, non_blocking=True), args.repeat * 3, device)
    ceiling = chunks[0].nbytes / 1e9 / t
    results.append(dict(method="ceiling: pinned H2D", GBps=round(ceiling, 2)))
    t = timed(lambda: target.copy_(host), args.repeat * 3, device)
    results.append(dict(method="pageable H2D", GBps=round(chunks[0].nbytes / 1e9 / t, 2)))
    target = None
    from concurrent.futures import ThreadPoolExecutor

    from edpairs.stream import _copy_rows

    for threads in sorted({1, DeviceChunks(chunks[:1], device="cpu").copy_threads, 16}):
        with ThreadPoolExecutor(threads) as pool:
            dst = pinned.numpy()
            t = timed(lambda: _copy_rows(dst, chunks[0], pool if threads > 1 else None, threads), args.repeat * 3,
                      "cpu")
        results.append(dict(method=f"staging copy into pinned, {threads} thread(s)",
                            GBps=round(chunks[0].nbytes / 1e9 / t, 2)))
    pinned = None

    # Moments: on device (the part of the data that fits), naive, streamed.
    sub = torch.from_numpy(X[: min(N, 8 * rows)]).to(device)
    t_dev = timed(lambda: edp.ops.moments(sub, check_finite=False), args.repeat, device) * N / sub.shape[0]
    results.append(dict(method="moments on-device (compute only)", GBps=round(gb / t_dev, 2),
                        seconds=round(t_dev, 4)))
    sub = None
    if cuda:
        torch.cuda.empty_cache()

    def moments_from(source):
        m = edp.ops.Moments()
        for c in source:
            m.update(c, check_finite=False)
        return m

    ref = moments_from(torch.from_numpy(c).to(device) for c in chunks)
    streamed = DeviceChunks(chunks, device=device, chunk_bytes=args.piece_mib * 2**20)
    got = moments_from(streamed.chunks())
    a, b = edp._arrays.to_numpy64(got.m2), edp._arrays.to_numpy64(ref.m2)
    err = float(np.abs(a - b).max() / np.abs(b).max())
    print(f"streamed vs naive moments: max |scatter diff| / max |scatter| {err:.1e} over {got.n} rows")
    if not (err < 1e-5 and got.n == N):
        print("FAILED: the streamed moments differ from the naive ones")
        return 1
    naive = lambda: (torch.from_numpy(c).to(device) for c in chunks)  # noqa: E731
    registered = DeviceChunks(chunks, device=device, chunk_bytes=args.piece_mib * 2**20, register=True)
    reg_rows = ()
    if cuda:
        t0 = time.perf_counter()
        registered._register(torch)
        row("registering the host data (once)", time.perf_counter() - t0)
        got = moments_from(registered.chunks())
        a = edp._arrays.to_numpy64(got.m2)
        if not float(np.abs(a - b).max() / np.abs(b).max()) < 1e-5:
            print("FAILED: the moments streamed from registered memory differ from the naive ones")
            return 1
        reg_rows = (("moments DeviceChunks registered", registered.chunks),)
    for name, make in (("moments naive (.to per chunk)", naive), ("moments DeviceChunks", streamed.chunks),
                       *reg_rows):
        reset()
        t = timed(lambda: moments_from(make()), args.repeat, device)
        row(name, t, ratio_to_ceiling=round(gb / t / ceiling, 3), peak_gpu_MiB=peak())

    # One k-means pass (assignment + sums) per chunk: compute-heavier, so the copy can hide.
    C = torch.nn.functional.normalize(torch.randn(args.clusters, D, device=device), dim=1)

    def kmeans_pass(source):
        for c in source:
            edp.ops.assign(c, C, check_finite=False)

    wide = DeviceChunks(chunks, device=device, chunk_bytes=args.piece_mib * 2**20, copy_threads=16)
    for name, make in (("k-means pass naive", naive), ("k-means pass DeviceChunks", streamed.chunks),
                       ("k-means pass DeviceChunks, 16 staging threads", wide.chunks),
                       *((("k-means pass DeviceChunks registered", registered.chunks),) if cuda else ())):
        reset()
        t = timed(lambda: kmeans_pass(make()), args.repeat, device)
        row(name, t, ratio_to_ceiling=round(gb / t / ceiling, 3), peak_gpu_MiB=peak())
    sub = torch.from_numpy(X[: min(N, 8 * rows)]).to(device)
    t = timed(lambda: kmeans_pass([sub]), args.repeat, device) * N / sub.shape[0]
    results.append(dict(method="k-means pass on-device (compute only)", GBps=round(gb / t, 2), seconds=round(t, 4)))

    registered.close()
    print_table(results, ["method", "seconds", "GBps", "ratio_to_ceiling", "peak_gpu_MiB"])
    if args.json:
        write_json(args.json, dict(benchmark="stream", machine=machine_info(), args=vars(args), n_rows=N,
                                   data_GB=gb, results=results, moments_rel_diff=err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
