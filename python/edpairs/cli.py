"""The ``edpairs`` command line. For now: ``edpairs selfcheck`` (build report + every kernel
against the float64 reference, on CPU and, where present, on the GPU) and ``edpairs info``."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _max_rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if a.size else 0.0


def _host(a):
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return np.asarray(a)


def _checks(device: str, seed: int):
    """Yields (op, relative error, tolerance) for every op on one device."""
    import edpairs as edp
    from edpairs import reference

    rng = np.random.default_rng(seed)
    N, D, k, I = 20000, 96, 40, 12
    centers = rng.standard_normal((k, D))
    X = (4 * centers[rng.integers(0, k, N)] + rng.standard_normal((N, D)) + 2.0).astype(np.float32)
    C = X[rng.choice(N, k, replace=False)].copy()
    W = (rng.standard_normal((D, I)) / np.sqrt(D)).astype(np.float32)
    b = (2.0 * W.sum(0)).astype(np.float32)
    if device == "cpu":
        Xd = X
    else:
        import torch

        Xd = torch.from_numpy(X).to(device)
        C, W, b = (torch.from_numpy(v).to(device) for v in (C, W, b))

    t0 = time.perf_counter()
    res = edp.ops.assign(Xd, C)
    labels = _host(res.labels)
    ref_labels, ref_scores, _, _ = reference.assign(X, _host(C))
    # Labels may differ only on float32 near-ties: compare the chosen centroid's exact score.
    Xn = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    Ch = _host(C).astype(np.float64)
    Cn = Ch / np.linalg.norm(Ch, axis=1, keepdims=True)
    chosen = np.einsum("nd,nd->n", Xn, Cn[labels])
    yield "cosine_assign (labels: best score)", float(np.abs(chosen - ref_scores).max()), 1e-5
    yield "cosine_assign (scores)", float(np.abs(_host(res.scores) - ref_scores).max()), 1e-5
    sums = np.zeros((k, D))
    np.add.at(sums, labels, Xn)
    yield "assign (cluster sums)", _max_rel(_host(res.sums), sums), 1e-5
    cents, _, counts = edp.ops.spherical_kmeans_step(Xd, C)
    ref_c = reference.normalize_centroids(sums, np.bincount(labels, minlength=k), Cn)
    yield "spherical_kmeans_step", _max_rel(_host(cents), ref_c), 1e-5
    m = edp.ops.moments(Xd)
    _, ref_mean, ref_m2 = reference.moments(X)
    yield "moments (mean)", _max_rel(_host(m.mean), ref_mean), 1e-6
    yield "moments (covariance)", _max_rel(_host(m.m2), ref_m2), 1e-5
    s = edp.ops.signal_moments(Xd, W, b, center=X.mean(0))
    ref = reference.signal_moments(X, _host(W), _host(b), center=X.mean(0))
    yield "signal_moments (count)", _max_rel(_host(s.count), ref["count"]), 1e-3
    yield "signal_moments (sum_xz)", _max_rel(_host(s.sum_xz), ref["sum_xz"]), 1e-4
    yield f"(all ops on {device}: {time.perf_counter() - t0:.2f} s)", 0.0, 1.0


def selfcheck(seed: int = 0) -> int:
    import edpairs as edp

    info = edp.build_info()
    print(f"edpairs {info['version']}  cpu kernel: {info['cpu_kernel']}  threads: {info['num_threads']}  "
          f"CUDA built: {info['cuda']} (mode {info['cuda_mode']}, archs {','.join(info['archs']) or '-'})")
    devices = ["cpu"]
    if info["cuda"] and edp.cuda_device_count() > 0:
        try:
            import torch

            if torch.cuda.is_available():
                devices.append("cuda")
        except ImportError:
            print("a GPU is visible but torch is not installed: checking the CPU only")
    elif info["cuda"]:
        print("CUDA kernels are built but no GPU is visible: checking the CPU only")
    failed = 0
    print(f"{'check':44s} {'error':>10s} {'tolerance':>10s}  result")
    for device in devices:
        for name, err, tol in _checks(device, seed):
            ok = err <= tol
            failed += not ok
            print(f"{name:44s} {err:10.2e} {tol:10.0e}  {'ok' if ok else 'FAIL'}")
    print("selfcheck passed" if not failed else f"selfcheck FAILED: {failed} check(s)")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="edpairs",
        description="Encoding-decoding direction pairs of concepts in deep vision networks.",
    )
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("selfcheck", help="check every kernel against the float64 reference (CPU, and GPU if present)")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="print what this build contains (JSON)")
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        return selfcheck(args.seed)
    if args.command == "info":
        import edpairs as edp

        print(json.dumps(dict(edp.build_info(), cuda_devices=edp.cuda_device_count()), indent=2))
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
