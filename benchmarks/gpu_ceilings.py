#!/usr/bin/env python
"""Measured ceilings of the GPU at hand, for the GPU benchmarks to be read against:
device-to-device copy bandwidth (bytes read + written) and cuBLAS GEMM rates through torch
(TF32 for float32, bf16), on random data, medians of CUDA-event timings."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, time_fn, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", default="benchmarks/out/gpu_ceilings.json")
    p.add_argument("--repeat", type=int, default=10)
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
    write_json(args.json, {"machine": machine_info(), **out})
    print_table(rows, ["ceiling", "value"])


if __name__ == "__main__":
    main()
