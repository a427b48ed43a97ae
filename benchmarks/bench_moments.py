#!/usr/bin/env python
"""Streaming moments (mean + covariance) and masked per-concept signal moments: edpairs against
what a user would write instead, in the same run on the same data.

  moments:         edpairs.ops.moments  vs  numpy.cov  vs  torch.cov
  signal moments:  edpairs.ops.signal_moments  vs  torch (Z = X W - b, M = Z > 0, X^T M and X^T (M*Z))

On CUDA (torch tensors) the edpairs rows are: "edpairs" / "edpairs-tf32", the default route
(edpairs._gemm: cuBLAS products of 131072 rows at a time, exact float32 / TF32 operands,
float64 between steps; "-rN" rows for each --workspace-rows N, "-bN" for each --block-rows N:
the moments' product in blocks of N rows, 0 = one product per step; "-triB" for each
--triangle-blocks B: only the Gram's blocks on or above the diagonal, B features per block,
EDPAIRS_GEMM_GRAM=triangle (the exact float32 default since H200 run 6, in blocks of 128);
"edpairs-full": exact float32 with the whole product per step, EDPAIRS_GEMM_GRAM=cublas;
"edpairs-tf32-wgmma": the centred Gram on Hopper's wgmma, EDPAIRS_GEMM_GRAM=wgmma, where the
build and GPU have it; these four kinds time the moments only, the signal moments do not use
them; "-ov" after the default and each triangle row:
EDPAIRS_GEMM_OVERLAP=1, the moments' next step centred on a second stream while this step's
products run, the signal moments' steps dealt to two streams in turn; "-half" after each TF32
row but the step variants: EDPAIRS_GEMM_HALF=1, the products from float16 operands, the
moments' default since version 19; "edpairs-tf32-nohalf": EDPAIRS_GEMM_HALF=0, TF32 operands
for both) and
"edpairs-kernel" /
"edpairs-kernel-tf32", edpairs' own CUDA kernels (EDPAIRS_GEMM_ROUTE=kernel: SIMT exact, or the
tensor-core scatter / masked product with TF32 operands).

Results are checked against float64 before timing. With --device cuda the GPU rates are
printed next to the machine's measured GEMM rate when gpu_check.sh passes --gemm-tflops.

    python benchmarks/bench_moments.py
    python benchmarks/bench_moments.py --device cuda --sizes 1000000,512,256
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, machine_info, print_table, time_fn, write_json  # noqa: E402


def rel_err(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def to_numpy(a):
    return a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--sizes", nargs="+", default=["200000,512,256"], help="N,D,I triples")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", default="benchmarks/out/moments_{device}.json")
    p.add_argument("--workspace-rows", type=int, nargs="*", default=[],
                   help="CUDA: more step sizes of the cuBLAS route to time next to its default")
    p.add_argument("--block-rows", type=int, nargs="*", default=[],
                   help="CUDA: rows per block of the moments' batched product to time next to the default "
                        "(EDPAIRS_GEMM_BLOCK_ROWS; 0 = one product per step; the signal moments ignore it)")
    p.add_argument("--triangle-blocks", type=int, nargs="*", default=[],
                   help="CUDA: features per block of the triangle Gram (EDPAIRS_GEMM_GRAM=triangle) to time")
    args = p.parse_args()

    import torch

    import edpairs as edp

    dev = args.device
    tdtype = getattr(torch, args.dtype)
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    rows, results = [], []
    path, machine = args.json.format(device=dev.replace(":", "")), machine_info()
    for size in args.sizes:
        N, D, I = (int(v) for v in size.split(","))
        rng = np.random.default_rng(0)
        Xn = (rng.standard_normal((N, D), dtype=np.float32) + 5.0).astype(np.float32)
        W = (rng.standard_normal((D, I)) / np.sqrt(D)).astype(np.float32)
        b = (5.0 * W.sum(0) + 0.3).astype(np.float32)
        X = torch.from_numpy(Xn).to(device=dev, dtype=tdtype)
        Wt, bt = torch.from_numpy(W).to(dev), torch.from_numpy(b).to(dev)

        # float64 references on a sample (full float64 products on the CPU would dominate the run).
        sample = Xn[: min(N, 50000)].astype(np.float64)
        ref_cov = np.cov(sample, rowvar=False)
        Z = sample @ W - b
        M = Z > 0
        ref_sxz = (np.where(M, Z, 0.0).T @ sample)

        mom_flops = N * D * D  # symmetric rank-N update: D^2/2 entries, 2 flops each
        sig_flops = 2.0 * N * D * I * 3  # Z = XW, then X^T [M, M*Z]
        cuda = dev.startswith("cuda")
        edp_methods = _edpairs_methods(cuda, args.workspace_rows, args.block_rows, args.triangle_blocks)
        # Kernels that have never run on a GPU go last: a fault there loses no other row.
        late = {name for name in edp_methods if name.endswith(("-wgmma", "-half"))}
        moments = {name: (lambda kw=kw, env=env: _edp(edp, env, edp.ops.moments, X, check_finite=False, **kw).cov)
                   for name, (kw, env) in edp_methods.items()}
        signal = {name: (lambda kw=kw, env=env: _edp(edp, env, edp.ops.signal_moments, X, Wt, bt, check_finite=False,
                                                     **kw).sum_xz)
                  for name, (kw, env) in edp_methods.items() if not any(part in name for part in MOMENTS_ONLY)}
        cases = {
            "moments": {
                **{k: v for k, v in moments.items() if k not in late},
                "torch.cov": lambda: torch.cov(X.float().T),
                **({"numpy.cov": lambda: np.cov(Xn, rowvar=False)} if dev == "cpu" and args.dtype == "float32" else {}),
                **{k: v for k, v in moments.items() if k in late},
            },
            "signal_moments": {
                **{k: v for k, v in signal.items() if k not in late},
                "torch": lambda: _torch_signal(X.float(), Wt, bt)[1],
                **{k: v for k, v in signal.items() if k in late},
            },
        }
        checks = {
            "moments": lambda f: rel_err(to_numpy(_on_sample(f, X, 50000, edp, torch, "moments", methods=edp_methods)),
                                         ref_cov),
            "signal_moments": lambda f: rel_err(to_numpy(_on_sample(f, X, 50000, edp, torch, "signal", Wt, bt,
                                                                    methods=edp_methods)), ref_sxz),
        }
        for op, methods in cases.items():
            base = None
            flops = mom_flops if op == "moments" else sig_flops
            for name, fn in methods.items():
                try:
                    err = checks[op](name)
                    t = time_fn(fn, dev, repeat=args.repeat, warmup=1)
                except Exception as exc:  # noqa: BLE001 - a row that fails is recorded, the others still run
                    message = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    print(f"{op} {size} {name}: {message}", file=sys.stderr)
                    rows.append({"op": op, "N,D,I": size, "method": name, "ms": message[:60]})
                    results.append({"op": op, "size": [N, D, I], "method": name, "error": message})
                else:
                    base = base or t["median_s"]
                    rows.append({"op": op, "N,D,I": size, "method": name, "ms": f"{t['median_s'] * 1e3:.1f}",
                                 "GFLOP/s": f"{flops / t['median_s'] / 1e9:.1f}",
                                 "time vs edpairs": f"{t['median_s'] / base:.2f}x", "rel err (sample)": f"{err:.1e}"})
                    results.append({"op": op, "size": [N, D, I], "method": name, "rel_err_sample": err, **t})
                # After each row: a call stopped later (a time limit, a hung kernel) keeps the rows
                # already measured.
                write_json(path, {"benchmark": "moments", "device": dev, "dtype": args.dtype, "machine": machine,
                                  "results": results})
    write_json(path, {"benchmark": "moments", "device": dev, "dtype": args.dtype, "machine": machine,
                      "results": results})
    print_table(rows, ["op", "N,D,I", "method", "ms", "GFLOP/s", "time vs edpairs", "rel err (sample)"])


#: Name parts of the rows that only the moments use (the signal moments skip them).
MOMENTS_ONLY = ("-b", "-tri", "-wgmma", "-full")


def _edpairs_methods(cuda: bool, workspace_rows, block_rows=(), triangle_blocks=()):
    """edpairs variants: name -> (keyword arguments, environment). On CUDA the default route
    (cuBLAS products, exact float32 / TF32; its default step, then "-rN" rows for each
    --workspace-rows N, "-bN" for each --block-rows N and "-triB" for each --triangle-blocks
    B) and the kernels."""
    if not cuda:
        return {"edpairs": ({}, {})}
    gemm = {"EDPAIRS_GEMM_ROUTE": "gemm"}
    out = {"edpairs": ({}, gemm), "edpairs-tf32": ({"precision": "tf32"}, gemm)}
    # "-full": the whole product X~^T X~ per step for exact float32 (EDPAIRS_GEMM_GRAM=cublas; the
    # triangle is their default since H200 run 6, GRAM_DEFAULT).
    out["edpairs-full"] = ({}, {**gemm, "EDPAIRS_GEMM_GRAM": "cublas"})
    for rows in workspace_rows:
        out[f"edpairs-r{rows}"] = ({"workspace_rows": rows}, gemm)
        out[f"edpairs-tf32-r{rows}"] = ({"workspace_rows": rows, "precision": "tf32"}, gemm)
    for rows in block_rows:
        env = {**gemm, "EDPAIRS_GEMM_GRAM": "cublas", "EDPAIRS_GEMM_BLOCK_ROWS": str(rows)}  # (the full product's)
        out[f"edpairs-b{rows}"] = ({}, env)
        out[f"edpairs-tf32-b{rows}"] = ({"precision": "tf32"}, env)
    for block in triangle_blocks:
        env = {**gemm, "EDPAIRS_GEMM_GRAM": "triangle", "EDPAIRS_GEMM_TRIANGLE_BLOCK": str(block)}
        out[f"edpairs-tri{block}"] = ({}, env)
        out[f"edpairs-tf32-tri{block}"] = ({"precision": "tf32"}, env)
    # "-ov": the next step centred on a second stream during this step's products
    # (EDPAIRS_GEMM_OVERLAP=1), on the default product and on each triangle.
    for name, (kw, env) in list(out.items()):
        if "-r" not in name and "-b" not in name:
            out[f"{name}-ov"] = (kw, {**env, "EDPAIRS_GEMM_OVERLAP": "1"})
    # "-half": the TF32 moments' products from float16 operands scaled per column
    # (EDPAIRS_GEMM_HALF=1), on every TF32 row above but the step variants.
    for name, (kw, env) in list(out.items()):
        if kw.get("precision") == "tf32" and "-r" not in name and "-b" not in name:
            out[f"{name}-half"] = (kw, {**env, "EDPAIRS_GEMM_HALF": "1"})
    # "-nohalf": TF32 operands for both (EDPAIRS_GEMM_HALF=0; the moments take float16 ones by
    # default since version 19).
    out["edpairs-tf32-nohalf"] = ({"precision": "tf32"}, {**gemm, "EDPAIRS_GEMM_HALF": "0"})
    if _wgmma_gram_available():  # the centred Gram on wgmma (TF32; the signal moments ignore it)
        out["edpairs-tf32-wgmma"] = ({"precision": "tf32"}, {**gemm, "EDPAIRS_GEMM_GRAM": "wgmma"})
    kernel = {"EDPAIRS_GEMM_ROUTE": "kernel"}
    out["edpairs-kernel"] = ({}, kernel)
    out["edpairs-kernel-tf32"] = ({"precision": "tf32"}, kernel)
    return out


def _wgmma_gram_available() -> bool:
    from edpairs import _gemm

    return _gemm.wgmma_unavailable() is None


def _edp(edp, env, fn, *args, **kw):
    """fn(*args, **kw) with the environment variables of `env` set for the call."""
    with environment(env):
        return fn(*args, **kw)


def _torch_signal(X, W, b):
    Z = X @ W - b
    M = (Z > 0).to(X.dtype)
    return X.T @ M, X.T @ (M * Z)


def _on_sample(method, X, n, edp, torch, op, W=None, b=None, methods=None):
    Xs = X[:n]
    if method in methods:
        kw, env = methods[method]
        if op == "moments":
            return _edp(edp, env, edp.ops.moments, Xs, **kw).cov
        return _edp(edp, env, edp.ops.signal_moments, Xs, W, b, **kw).sum_xz
    if op == "moments":
        if method == "numpy.cov":
            return np.cov(Xs.cpu().float().numpy(), rowvar=False)
        return torch.cov(Xs.float().T)
    return _torch_signal(Xs.float(), W, b)[1].T


if __name__ == "__main__":
    main()
