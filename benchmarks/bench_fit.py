#!/usr/bin/env python
"""Time and memory of a whole fit: ``EDPairs(32).fit(X)`` (stages 1, 2 and 4, no URA) on
1,000,000 x 256 float32 rows with I = 32 concepts, next to what a user would run instead on the
same data: scikit-learn's ``KMeans(n_clusters=32, n_init=1)`` and ``edpairs.SphericalKMeans(32)``.

Data: ``edpairs.synthetic.make_layer(n_images=rows/16, n_features=256, n_concepts=32,
n_distractors=64, grid=(4, 4), train_head=False, seed=...)`` (cosines up to 0.5, exclusive
memberships, the model of DESIGN section 1), generated once, written to a scratch folder and
loaded (fully, into memory) by each method's own fresh process.

Columns
  wall s        wall-clock seconds of fit(X) alone, one run (loading and scoring excluded)
  extra peak MiB  peak resident memory during the fit minus the resident memory just before it
                (the data itself excluded), as in bench_kmeans.py; each method runs in its own
                fresh process, so the peak is its own
  restarts      k-means restarts (EDPairs' n_init; sklearn and SphericalKMeans use 1 here)
  iters         Lloyd iterations, summed over restarts (EDPairs: per restart in brackets, counted
                by wrapping edpairs.cluster._lloyd; "+ N refine" = biorthogonal refinement steps)
  IoU           mean IoU of the detectors with the true memberships (Hungarian matching,
                metrics.recovery). EDPairs: its own detectors (detect(X, hard=True)). k-means
                rows: their cluster labels, read as memberships (no threshold to choose)
  cos(s), cos(w)  EDPairs only: mean cosine of the encoding directions with the true ones and of
                the decoding directions with the ideal filters (inside the data span)
  time vs edpairs  the method's time over EDPairs' time (above 1: EDPairs is faster)

With ``--device cuda`` the edpairs methods fit a torch CUDA tensor (timed to the end of the GPU's
work; the CUDA context is made before the clock starts); scikit-learn stays on the CPU.

Before it reports, each worker checks the outputs: shapes, finite values, unit centroids, and
that every label / detector matrix has one row per input row.

    PYTHONPATH=python python benchmarks/bench_fit.py                  # 1,000,000 x 256, I = 32
    PYTHONPATH=python python benchmarks/bench_fit.py --rows 200000    # a quick run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, peak_rss_kib, print_table, reset_peak_rss, write_json  # noqa: E402

GRID = (4, 4)
METHODS = ("edpairs", "sklearn_kmeans", "spherical_kmeans")
LABELS = {"edpairs": "EDPairs(32).fit", "sklearn_kmeans": "sklearn KMeans(n_init=1)",
          "spherical_kmeans": "edpairs.SphericalKMeans"}


def generate(args, folder: str) -> dict:
    from edpairs import synthetic

    n_images = -(-args.rows // (GRID[0] * GRID[1]))
    t0 = time.perf_counter()
    layer = synthetic.make_layer(n_images=n_images, n_features=args.features, n_concepts=args.concepts,
                                 n_distractors=args.distractors, grid=GRID, train_head=False, seed=args.seed)
    gen_s = time.perf_counter() - t0
    np.save(os.path.join(folder, "X.npy"), layer.X)
    np.savez(os.path.join(folder, "truth.npz"), S=layer.S, W=layer.W, membership=layer.membership,
             alpha=layer.alpha)
    return {"rows": int(layer.X.shape[0]), "features": int(layer.X.shape[1]), "generate_s": gen_s,
            "data_mib": layer.X.nbytes / 2**20}


def _labels_iou(labels, membership) -> float:
    from edpairs import metrics

    labels = np.asarray(labels).astype(np.int64)
    k = int(labels.max()) + 1
    onehot = np.zeros((labels.size, max(k, membership.shape[1])), bool)
    onehot[np.arange(labels.size), labels] = True
    return metrics.match_detectors(onehot, membership)["mean_iou"]


def worker(args) -> None:
    folder = args.folder
    X = np.load(os.path.join(folder, "X.npy"))
    N, D = X.shape
    I = args.concepts
    out = {}
    lloyd_iters = []
    data = X  # what the edpairs methods fit: X itself, or with --device cuda a torch CUDA copy of it
    if args.device != "cpu" and args.worker != "sklearn_kmeans":
        import torch

        data = torch.from_numpy(X).to(args.device)
        torch.zeros(1, device=args.device).sum().item()  # the CUDA context before the clock starts

    if args.worker == "edpairs":
        import edpairs as edp
        from edpairs import cluster as _cluster

        original = _cluster._lloyd

        def counting_lloyd(*a, **kw):  # instrumentation only: records each restart's iterations
            res = original(*a, **kw)
            lloyd_iters.append(int(res.n_iter))
            return res

        _cluster._lloyd = counting_lloyd
        kw = {} if args.edpairs_method is None else {"method": args.edpairs_method}
        model = edp.EDPairs(I, random_state=args.seed, progress=False, **kw)
        fit = lambda: model.fit(data)  # noqa: E731
    elif args.worker == "sklearn_kmeans":
        from sklearn.cluster import KMeans

        model = KMeans(n_clusters=I, n_init=1, random_state=args.seed)
        fit = lambda: model.fit(X)  # noqa: E731
    elif args.worker == "spherical_kmeans":
        import edpairs as edp

        model = edp.SphericalKMeans(I, random_state=args.seed, progress=False)
        fit = lambda: model.fit(data)  # noqa: E731
    else:
        raise SystemExit(f"unknown method {args.worker}")

    base = reset_peak_rss()
    t0 = time.perf_counter()
    fit()
    if data is not X:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    out["wall_s"] = wall
    out["extra_peak_mib"] = round(max(0, peak_rss_kib() - base) / 1024, 1)

    # ---- checks and scores (not timed) ----
    truth = np.load(os.path.join(folder, "truth.npz"))
    membership = truth["membership"]
    if args.worker == "edpairs":
        from edpairs import metrics

        for name, shape in (("decoding_", (I, D)), ("encoding_", (I, D)), ("bias_", (I,))):
            a = getattr(model, name)
            if a.shape != shape or not np.all(np.isfinite(a)):
                raise AssertionError(f"EDPairs.{name}: shape {a.shape} (expected {shape}) or not finite")
        det = np.asarray(model.detect(X, hard=True))
        lat = np.asarray(model.latent_factors(X))
        if det.shape != (N, I) or lat.shape != (N, I) or not np.all(np.isfinite(lat)):
            raise AssertionError("EDPairs detections / latent factors have the wrong shape or are not finite")
        layer = types.SimpleNamespace(X=X, S=truth["S"], W=truth["W"], membership=membership, alpha=truth["alpha"])
        span = metrics.data_span(edp.ops.moments(X))
        r = metrics.recovery(layer, decoding=model.decoding_, encoding=model.encoding_, detections=det,
                             latent=lat, span=span)
        out.update(mean_iou=r["mean_iou"], mean_cos_encoding=r["mean_cos_encoding"],
                   mean_cos_decoding=r["mean_cos_decoding"], mean_latent_rmse=r["mean_latent_rmse"],
                   restarts=int(model.n_init), lloyd_iters=lloyd_iters, n_iter=int(sum(lloyd_iters)),
                   refine_iters=int(getattr(model, "n_refine_", 0)), method=model.method)
    else:
        labels = model.labels_.cpu().numpy() if hasattr(model.labels_, "cpu") else np.asarray(model.labels_)
        if labels.shape != (N,) or labels.min() < 0 or labels.max() >= I:
            raise AssertionError(f"labels: shape {labels.shape}, range [{labels.min()}, {labels.max()}]")
        C = model.cluster_centers_
        C = np.asarray(C.cpu().numpy() if hasattr(C, "cpu") else C, dtype=np.float64)
        if C.shape != (I, D) or not np.all(np.isfinite(C)):
            raise AssertionError(f"centroids: shape {C.shape} or not finite")
        if args.worker == "spherical_kmeans" and not np.allclose(np.linalg.norm(C, axis=1), 1.0, atol=1e-4):
            raise AssertionError("spherical k-means centroids are not unit vectors")
        out.update(mean_iou=_labels_iou(labels, membership), restarts=1, n_iter=int(model.n_iter_))
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="rows N (rounded up to whole 4x4 images)")
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--concepts", type=int, default=32)
    p.add_argument("--distractors", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--edpairs-method", default=None,
                   help="EDPairs method (centroid, discriminant, biorthogonal); default: the package default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu",
                   help="cuda: the edpairs methods fit a torch CUDA tensor (scikit-learn stays on the CPU)")
    p.add_argument("--workdir", default=None, help="scratch folder for the data (default: a temporary one)")
    p.add_argument("--json", default="benchmarks/out/fit.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; choose from {list(METHODS)}")
    t_start = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="edpairs-bench-fit-", dir=args.workdir)
    try:
        data = generate(args, folder)
        print(f"data: {data['rows']} x {data['features']} float32 ({data['data_mib']:.0f} MiB), "
              f"generated in {data['generate_s']:.1f} s", file=sys.stderr)
        per = {}
        for method in methods:
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--folder", folder,
                   "--concepts", str(args.concepts), "--seed", str(args.seed), "--device", args.device]
            if args.edpairs_method:
                cmd += ["--edpairs-method", args.edpairs_method]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = proc.stderr.strip().splitlines()
                per[method] = {"error": err[-1] if err else f"exit {proc.returncode}"}
            else:
                per[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {method}: {per[method]} (process {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    payload = {"benchmark": "whole fit", "machine": machine_info(), "args": {k: v for k, v in vars(args).items()
                                                                            if k not in ("worker", "folder")},
               "data": data, "results": per, "total_s": time.perf_counter() - t_start}
    write_json(args.json, payload)

    base = per.get("edpairs", {}).get("wall_s")
    rows = []
    for method in methods:
        r = per[method]
        row = {"method": LABELS[method]}
        if "wall_s" not in r:
            row["wall s"] = r.get("error", "failed")
            rows.append(row)
            continue
        iters = str(r["n_iter"])
        if method == "edpairs":
            row["method"] += f" ({r['method']})"
            iters += f" ({'+'.join(map(str, r['lloyd_iters']))})"
            if r.get("refine_iters"):
                iters += f" + {r['refine_iters']} refine"
        row.update({
            "wall s": f"{r['wall_s']:.1f}", "extra peak MiB": r["extra_peak_mib"], "restarts": r["restarts"],
            "iters": iters, "IoU": f"{r['mean_iou']:.3f}",
            "cos(s)": f"{r['mean_cos_encoding']:.3f}" if "mean_cos_encoding" in r else "",
            "cos(w)": f"{r['mean_cos_decoding']:.3f}" if "mean_cos_decoding" in r else "",
            "time vs edpairs": f"{r['wall_s'] / base:.2f}x" if base else "",
        })
        rows.append(row)
    print(f"N={data['rows']:,} D={data['features']} I={args.concepts} float32 ({data['data_mib']:.0f} MiB), "
          f"seed {args.seed}, one run each, edpairs on {args.device}; total {time.perf_counter() - t_start:.0f} s")
    print_table(rows, ["method", "wall s", "extra peak MiB", "restarts", "iters", "IoU", "cos(s)", "cos(w)",
                       "time vs edpairs"])


if __name__ == "__main__":
    main()
