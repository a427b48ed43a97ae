#!/usr/bin/env python
"""Measured ceilings of the GPU at hand, for the GPU benchmarks to be read against:
device-to-device copy bandwidth (bytes read + written) and cuBLAS GEMM rates through torch
(TF32 for float32, bf16, exact float32), on random data, medians of CUDA-event timings: the
card's peak (square 8192 products) and, under "same_shape", cuBLAS at the benchmarks' own
shapes (issue 6 reads goal 2 against "the TF32 GEMM rate for the same shape"):

  kmeans   the scores X C^T of one k-means step, (N, D) x (D, k) into an (N, k) float32 /
           bf16 output: TF32 and bf16, rate 2 N D k / t
  gram     the moments' product X^T X, (D, N) x (N, D): TF32 and exact float32, and on CUDA
           float16 operands with a float32 output (the moments' EDPAIRS_GEMM_HALF products),
           rate 2 N D^2 / t (cuBLAS forms both triangles; the moments benchmark counts N D^2)
  signal   the signal moments' two products Z = X W, (N, D) x (D, I), and A^T X with
           A = [M, M o Z] (N, 2I): TF32 and exact float32, rate 6 N D I / (t_XW + t_AX)"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, time_fn, write_json  # noqa: E402


def same_shape_rates(torch, dev: str, repeat: int, kmeans=(1_000_000, 512, 1024),
                     moments=(1_000_000, 512, 256)) -> dict:
    """cuBLAS rates (TFLOP/s) of the benchmarks' products at their own shapes (module
    docstring), with the output of every product allocated once outside the timing."""

    def rate(flops, *products):
        return flops / sum(time_fn(f, dev, repeat, warmup=2)["median_s"] for f in products) / 1e12

    out = {"kmeans_shape": list(kmeans), "moments_shape": list(moments)}
    N, D, k = kmeans
    for name, dtype, tf32 in (("kmeans_tf32", torch.float32, True), ("kmeans_bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        x = torch.randn(N, D, device=dev, dtype=dtype)
        ct = torch.randn(k, D, device=dev, dtype=dtype).T
        scores = torch.empty(N, k, device=dev, dtype=dtype)
        out[f"{name}_TFLOPs"] = rate(2.0 * N * D * k, lambda: torch.mm(x, ct, out=scores))
        del x, ct, scores
    N, D, I = moments
    x = torch.randn(N, D, device=dev)
    w = torch.randn(D, I, device=dev)
    z = torch.empty(N, I, device=dev)
    a = torch.rand(N, 2 * I, device=dev)
    gram = torch.empty(D, D, device=dev)
    prod = torch.empty(2 * I, D, device=dev)
    for tag, tf32 in (("tf32", True), ("fp32", False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        out[f"gram_{tag}_TFLOPs"] = rate(2.0 * N * D * D, lambda: torch.mm(x.T, x, out=gram))
        out[f"signal_{tag}_TFLOPs"] = rate(6.0 * N * D * I, lambda: torch.mm(x, w, out=z),
                                           lambda: torch.mm(a.T, x, out=prod))
    torch.backends.cuda.matmul.allow_tf32 = False
    if dev == "cuda":  # float16 products with float32 outputs exist on CUDA only
        xh = x.half()
        out["gram_fp16_TFLOPs"] = rate(2.0 * N * D * D, lambda: torch.mm(xh.T, xh, out_dtype=torch.float32, out=gram))
    return out


def _shape(text: str):
    parts = tuple(int(v) for v in text.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive integers N,D,K, got {text!r}")
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default="benchmarks/out/gpu_ceilings.json")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--kmeans-shape", type=_shape, default=(1_000_000, 512, 1024), metavar="N,D,k",
                   help="the k-means scores' shape for the same-shape rates")
    p.add_argument("--moments-shape", type=_shape, default=(1_000_000, 512, 256), metavar="N,D,I",
                   help="the moments' and signal moments' shape for the same-shape rates")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    dev = "cuda"
    rows, out = [], {}
    n = 1 << 30  # 4 GiB of float32: far beyond L2
    a = torch.rand(n // 4, device=dev)
    b = torch.empty_like(a)
    t = time_fn(lambda: b.copy_(a), dev, args.repeat, warmup=2)
    out["copy_GBps"] = 2 * a.numel() * 4 / t["median_s"] / 1e9
    rows.append({"ceiling": "device copy (read+write)", "value": f"{out['copy_GBps']:.0f} GB/s"})
    del a, b
    for name, dtype, tf32 in [("gemm_tf32_TFLOPs", torch.float32, True), ("gemm_bf16_TFLOPs", torch.bfloat16, False),
                              ("gemm_fp32_TFLOPs", torch.float32, False)]:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m = 8192
        x = torch.randn(m, m, device=dev, dtype=dtype)
        y = torch.randn(m, m, device=dev, dtype=dtype)
        t = time_fn(lambda: x @ y, dev, args.repeat, warmup=2)
        out[name] = 2 * m**3 / t["median_s"] / 1e12
        rows.append({"ceiling": name.replace("_TFLOPs", "").replace("_", " "), "value": f"{out[name]:.0f} TFLOP/s"})
    torch.backends.cuda.matmul.allow_tf32 = False
    del x, y
    out["same_shape"] = same = same_shape_rates(torch, dev, args.repeat, args.kmeans_shape, args.moments_shape)
    for key, value in same.items():
        if key.endswith("_TFLOPs"):
            rows.append({"ceiling": f"same shape: {key[:-7].replace('_', ' ')}", "value": f"{value:.0f} TFLOP/s"})
    write_json(args.json, {"machine": machine_info(), **out})
    print_table(rows, ["ceiling", "value"])


if __name__ == "__main__":
    main()
