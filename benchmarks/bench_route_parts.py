#!/usr/bin/env python
"""Where the time of the library-product route goes (GPU only): each piece of one k-means
iteration and of the moments timed alone on the issue's shapes, next to the whole call, so the
next change aims at the largest piece.

  assign k:  cuBLAS scores of every step (TF32), ArgmaxRows over precomputed score blocks,
             cluster_sums (the sorted pass) alone, and the whole ops.assign
  moments:   the float64 column sums, the centring copies, the Gram products (TF32), whole call
  signal:    X W - b (TF32), SignalMasks, [M, M*Z]^T X (TF32), whole call

    python benchmarks/bench_route_parts.py --json out/route_parts.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_json  # noqa: E402


def timed(torch, fn, repeat: int) -> float:
    """Median milliseconds of fn over `repeat` runs after a warm-up: CUDA events on a GPU, the
    host clock on the CPU (--device cpu: a smoke run of this script, not a measurement)."""
    import time

    fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--ks", type=int, nargs="+", default=[1024, 64])
    p.add_argument("--i", type=int, default=256)
    p.add_argument("--rows", type=int, nargs="+", default=[16384, 32768])
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    p.add_argument("--json", default="benchmarks/out/route_parts.json")
    args = p.parse_args()

    import torch

    import edpairs as edp
    from edpairs import _gemm
    from edpairs._arrays import Namespace
    from edpairs._backend import lib

    c = Namespace("torch").capsule
    dev = args.device
    N, D = args.n, args.d
    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn((N, D), device=dev, generator=g) + 0.5
    stream = int(torch.cuda.current_stream().cuda_stream) if dev.startswith("cuda") else 0
    rows_out, results = [], []

    def add(group, piece, ms, note=""):
        rows_out.append({"group": group, "piece": piece, "ms": f"{ms:.3f}", "note": note})
        results.append({"group": group, "piece": piece, "ms": ms, "note": note})

    for k in args.ks:
        C = torch.randn((k, D), device=dev, generator=g)
        for rows in args.rows:
            block = torch.empty((rows, k), device=dev)

            def scores_only():
                with _gemm.matmul_precision(torch, "tf32"):
                    for first in range(0, N, rows):
                        torch.mm(X[first:first + rows], C.T, out=block[: min(rows, N - first)])

            add(f"assign k={k}", f"scores, {rows}-row steps", timed(torch, scores_only, args.repeat),
                f"{2 * N * D * k / 1e12:.2f} TFLOP")
            labels = torch.empty(N, dtype=torch.int64, device=dev)
            best = torch.empty(N, device=dev)
            rscale = torch.empty(N, device=dev)
            plan = lib().ArgmaxRows(c(block), c(torch.ones(k, device=dev)), c(X), None, None, c(labels), c(best),
                                    c(rscale))

            def argmax_only():
                for first in range(0, N, rows):
                    plan.run(first, min(rows, N - first), stream)

            add(f"assign k={k}", f"ArgmaxRows, {rows}-row steps", timed(torch, argmax_only, args.repeat),
                "scores block reread each step")
        sums = torch.empty((k, D), dtype=torch.float64, device=dev)
        counts = torch.empty(k, dtype=torch.int64, device=dev)
        labels = torch.randint(0, k, (N,), device=dev, generator=g)
        rscale = torch.rand(N, device=dev, generator=g)
        add(f"assign k={k}", "cluster_sums (sorted pass)",
            timed(torch, lambda: lib().cluster_sums(c(X), c(labels), c(rscale), None, c(sums), c(counts), stream),
                  args.repeat), f"one read of X = {N * D * 4 / 1e9:.2f} GB")
        for route in ("gemm", "kernel"):
            os.environ["EDPAIRS_GEMM_ROUTE"] = route
            add(f"assign k={k}", f"ops.assign whole ({route})",
                timed(torch, lambda: edp.ops.assign(X, C, check_finite=False, precision="tf32"), args.repeat))
        os.environ.pop("EDPAIRS_GEMM_ROUTE", None)

    rows = args.rows[-1]
    work = torch.empty((rows, D), device=dev)
    gram = torch.empty((D, D), device=dev)
    shift = X[:rows].mean(0)
    add("moments", "float64 column sums", timed(torch, lambda: X.sum(0, dtype=torch.float64), args.repeat))

    def centre_only():
        for first in range(0, N, rows):
            torch.sub(X[first:first + rows], shift, out=work[: min(rows, N - first)])

    def gram_only():
        with _gemm.matmul_precision(torch, "tf32"):
            for first in range(0, N, rows):
                w = work[: min(rows, N - first)]
                torch.mm(w.T, w, out=gram)

    add("moments", f"centring copies, {rows}-row steps", timed(torch, centre_only, args.repeat))
    add("moments", f"Gram products (TF32), {rows}-row steps", timed(torch, gram_only, args.repeat),
        f"{2 * N * D * D / 1e12:.2f} TFLOP (full product)")
    add("moments", "ops.moments whole (tf32)",
        timed(torch, lambda: edp.ops.moments(X, check_finite=False, precision="tf32", workspace_rows=rows),
              args.repeat))

    I = args.i
    W = torch.randn((D, I), device=dev, generator=g) / D ** 0.5
    b = 0.5 * W.sum(0)
    z = torch.empty((rows, I), device=dev)
    masks = torch.empty((rows, 2 * I), device=dev)
    prod = torch.empty((2 * I, D), device=dev)

    def z_only():
        with _gemm.matmul_precision(torch, "tf32"):
            for first in range(0, N, rows):
                torch.addmm(-b, X[first:first + rows], W, out=z[: min(rows, N - first)])

    cnt = torch.zeros(I, dtype=torch.int64, device=dev)
    sz = torch.zeros(I, dtype=torch.float64, device=dev)
    szz = torch.zeros(I, dtype=torch.float64, device=dev)
    masks_plan = lib().SignalMasks(c(z), c(masks), c(cnt), c(sz), c(szz))

    def masks_only():
        for first in range(0, N, rows):
            masks_plan.run(min(rows, N - first), stream)

    def product_only():
        with _gemm.matmul_precision(torch, "tf32"):
            for first in range(0, N, rows):
                r = min(rows, N - first)
                torch.mm(masks[:r].T, X[first:first + r], out=prod)

    add("signal", f"X W - b (TF32), {rows}-row steps", timed(torch, z_only, args.repeat),
        f"{2 * N * D * I / 1e12:.2f} TFLOP")
    add("signal", f"SignalMasks, {rows}-row steps", timed(torch, masks_only, args.repeat))
    add("signal", f"[M, M*Z]^T X (TF32), {rows}-row steps", timed(torch, product_only, args.repeat),
        f"{4 * N * D * I / 1e12:.2f} TFLOP")
    add("signal", "ops.signal_moments whole (tf32)",
        timed(torch, lambda: edp.ops.signal_moments(X, W, b, check_finite=False, precision="tf32",
                                                    workspace_rows=rows), args.repeat))
    write_json(args.json, {"benchmark": "route_parts", "n": N, "d": D, "machine": machine_info(),
                           "results": results})
    print_table(rows_out, ["group", "piece", "ms", "note"])


if __name__ == "__main__":
    main()
