"""Network-Dissection scores (S1, S2; DESIGN section 6) of edpairs' detectors against k-means
centroids, NMF components, PCA directions (both signs) and random directions, all with the
same number of directions, on the same EfficientNet-Lite0 layer and the same seeded probe set
(:mod:`edpairs.probe`). Every method is fitted on the activations of the fit half of the probe
images only; thresholds and labels come from the fit half, IoUs from the other half
(:mod:`edpairs.dissect`).

    OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/bench_dissection.py \
        --images 384 --layers _blocks.12 _blocks.15 _blocks.10 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "python"))

from _common import machine_info, print_table, write_json  # noqa: E402




def activations(model, layers, probe, cache):
    """{layer: (n, h, w, C) float32} from one forward pass over the probe images (hooks on
    every layer), cached as .npz."""
    import torch

    from edpairs.capture import find_module

    if cache and os.path.exists(cache):
        with np.load(cache) as z:
            if all(layer in z for layer in layers):
                return {layer: z[layer] for layer in layers}
    parts = {layer: [] for layer in layers}
    hooks = [find_module(model, layer).register_forward_hook(
        lambda _m, _i, out, layer=layer: parts[layer].append(out.permute(0, 2, 3, 1).contiguous().numpy()))
        for layer in layers]
    try:
        x = probe.tensors()
        with torch.no_grad():
            for s in range(0, len(x), 16):
                model(x[s:s + 16])
    finally:
        for h in hooks:
            h.remove()
    out = {layer: np.concatenate(v) for layer, v in parts.items()}
    if cache:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        np.savez(cache, **out)
    return out


def directions(A_fit, K, seed, with_ura=None):
    """Per method, a function from (n, h, w, D) activations to (n, h, w, K) scores, and
    edpairs' own thresholds. A_fit: the fit half's activations (n_fit, h, w, D)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import NMF, PCA

    import edpairs as edp

    D = A_fit.shape[-1]
    X = A_fit.reshape(-1, D).astype(np.float64)
    mean, std = X.mean(0), X.std(0) + 1e-6
    Xs = (X - mean) / std
    out, timings, shrinkage = {}, {}, {}

    # "edpairs": the defaults (whitening of the sample covariance, rank cut only); "oas": the
    # covariance shrunk by the Oracle Approximating Shrinkage closed form of (n rows, Cov);
    # "shrink=0.5": halfway to its scaled identity (Cov + mean eigenvalue * I, up to scale).
    for name, kw in (("edpairs", {}), ("edpairs oas", {"whiten_shrinkage": "oas"}),
                     ("edpairs shrink=0.5", {"whiten_shrinkage": 0.5}), ("edpairs whiten=False", {"whiten": False})):
        t = time.perf_counter()
        pairs = edp.EDPairs(K, random_state=seed, progress=False, **kw).fit(X.astype(np.float32))
        timings[name] = time.perf_counter() - t
        shrinkage[name] = round(float(pairs.whitener_.shrinkage), 6)
        out[name] = (lambda A, pairs=pairs: np.asarray(pairs.decode(A.reshape(-1, D))).reshape(*A.shape[:-1], K),
                     pairs.bias_.copy())
    if with_ura is not None:
        t = time.perf_counter()
        pu = edp.EDPairs(K, random_state=seed, progress=False).fit(A_fit, head=with_ura, ura={"seed": seed})
        timings["edpairs+URA"] = time.perf_counter() - t
        out["edpairs+URA"] = (lambda A: np.asarray(pu.decode(A.reshape(-1, D))).reshape(*A.shape[:-1], K),
                              pu.bias_.copy())

    t = time.perf_counter()
    km = KMeans(K, n_init=3, random_state=seed).fit(Xs)
    timings["k-means"] = time.perf_counter() - t
    C = km.cluster_centers_
    out["k-means"] = (lambda A: (((A.reshape(-1, D) - mean) / std) @ C.T).reshape(*A.shape[:-1], K), None)

    shift = X.min(0)
    t = time.perf_counter()
    nmf = NMF(K, init="nndsvda", max_iter=500, random_state=seed).fit(X - shift)
    timings["NMF"] = time.perf_counter() - t
    out["NMF"] = (lambda A: nmf.transform(np.clip(A.reshape(-1, D) - shift, 0, None)).reshape(*A.shape[:-1], K),
                  None)

    t = time.perf_counter()
    pca = PCA((K + 1) // 2, random_state=seed).fit(X)
    timings["PCA"] = time.perf_counter() - t
    P = np.concatenate([pca.components_, -pca.components_])[:K]  # both signs
    out["PCA"] = (lambda A: ((A.reshape(-1, D) - pca.mean_) @ P.T).reshape(*A.shape[:-1], K), None)

    R = np.random.default_rng(seed).standard_normal((K, D))
    out["random"] = (lambda A: (((A.reshape(-1, D) - mean) / std) @ R.T).reshape(*A.shape[:-1], K), None)
    return out, timings, shrinkage


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=384, help="probe images (half fit, half scored)")
    ap.add_argument("--layers", nargs="+", default=["_blocks.12", "_blocks.15"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="probe-set and fit seeds")
    ap.add_argument("--directions", type=int, default=0, help="directions per method (0: one per probe concept)")
    ap.add_argument("--ura", action="store_true", help="also fit edpairs with URA through the split head")
    ap.add_argument("--rules", nargs="+", default=["best", "own"], choices=["best", "own", "quantile"],
                    help="threshold rules (dissect): best on the fit half, edpairs' own b_i, top quantile")
    ap.add_argument("--quantile", type=float, default=0.005)
    ap.add_argument("--cache", default=os.path.join(HERE, "out", "dissection"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu-2core-epyc", "dissection.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from edpairs import zoo
    from edpairs.capture import split_model
    from edpairs.dissect import dissect
    from edpairs.probe import make_probe_set

    model = zoo.efficientnet_lite0()
    photos = zoo.photos()
    rows, runs = [], []
    for seed in args.seeds:
        t = time.perf_counter()
        probe = make_probe_set(args.images, seed=seed, photos=photos)
        t_probe = time.perf_counter() - t
        K = args.directions or len(probe.concepts)
        fit = np.arange(len(probe)) % 2 == 0
        t = time.perf_counter()
        cache = os.path.join(args.cache, f"n{args.images}-seed{seed}.npz") if args.cache else None
        acts = activations(model, args.layers, probe, cache)
        t_capture = time.perf_counter() - t
        for layer in args.layers:
            A = acts[layer]
            head = split_model(model, layer).head if args.ura else None
            methods, timings, shrinkage = directions(A[fit], K, seed, head)
            for name, (score_fn, own) in methods.items():
                maps = score_fn(A).astype(np.float32)
                rules = [r for r in args.rules if r != "own"] + (["given"] if own is not None and "own" in args.rules else [])
                for rule in rules:
                    t = time.perf_counter()
                    res = dissect(maps, probe.masks, probe.concepts, rule=rule, thresholds=own, fit=fit,
                                  quantile=args.quantile)
                    row = {"seed": seed, "layer": layer, "grid": f"{A.shape[1]}x{A.shape[2]}", "method": name,
                           "rule": rule if rule != "given" else "own b_i", "K": K,
                           "S1": round(res.summary["S1"], 3), "S2": round(res.summary["S2"], 3),
                           "concepts": len(res.summary["concepts_covered"]),
                           "mean IoU": round(res.summary["mean_iou"], 3)}
                    rows.append(row)
                    print(f"  {layer} seed {seed} {name:21s} {row['rule']:8s} S1 {row['S1']:.3f} S2 {row['S2']:.3f}",
                          flush=True)
                    runs.append(dict(row, fit_s=timings.get(name), dissect_s=time.perf_counter() - t,
                                     whitening_shrinkage=shrinkage.get(name),
                                     labels=res.labels, best_iou=[round(float(u), 4) for u in res.best_iou],
                                     thresholds=[float(v) for v in res.thresholds]))
            report(args, rows, runs, probe, torch.__version__)
            print(f"seed {seed} {layer}: probe {t_probe:.1f} s, capture {t_capture:.1f} s, "
                  f"fits {', '.join(f'{k} {v:.1f} s' for k, v in timings.items())}; "
                  f"whitening shrinkage {shrinkage}", flush=True)

    report(args, rows, runs, probe, torch.__version__, final=True)


def report(args, rows, runs, probe, torch_version, final=False):
    """Summary over the seeds done so far; writes the JSON (after every layer, so an interrupted
    run keeps what it measured) and, at the end, prints the tables."""
    # Mean over seeds per (layer, method, rule).
    summary = {}
    for r in rows:
        summary.setdefault((r["layer"], r["method"], r["rule"]), []).append(r)
    table = []
    for (layer, method, rule), rs in summary.items():
        s1, s2 = np.array([r["S1"] for r in rs]), np.array([r["S2"] for r in rs])
        table.append({"layer": layer, "method": method, "rule": rule, "seeds": len(rs),
                      "S1 mean": round(float(s1.mean()), 3), "S1 sd": round(float(s1.std()), 3),
                      "S2 mean": round(float(s2.mean()), 3), "S2 sd": round(float(s2.std()), 3),
                      "S2 per seed": " ".join(f"{v:.3f}" for v in s2)})
    # edpairs (default settings) against the best of k-means / NMF / PCA, per layer and seed, rule "best".
    baselines = ("k-means", "NMF", "PCA")
    margins = []
    for layer in args.layers:
        for seed in args.seeds:
            got = {r["method"]: r["S2"] for r in rows if r["layer"] == layer and r["seed"] == seed and r["rule"] == "best"}
            for name in [m for m in got if m.startswith("edpairs")]:
                best = max(baselines, key=lambda b: got[b])
                margins.append({"layer": layer, "seed": seed, "edpairs": name, "S2": got[name],
                                "best baseline": best, "baseline S2": got[best],
                                "margin": round(got[name] - got[best], 3)})
    write_json(args.out, {"benchmark": "dissection", "machine": machine_info(), "torch": torch_version,
                          "args": vars(args), "concepts": list(probe.concepts),
                          "coverage": [round(float(v), 4) for v in probe.coverage()],
                          "runs": runs, "summary": table, "s2_margins": margins, "complete": final})
    if not final:
        return
    print_table(table, ["layer", "method", "rule", "seeds", "S1 mean", "S1 sd", "S2 mean", "S2 sd", "S2 per seed"])
    print()
    print_table(margins, ["layer", "seed", "edpairs", "S2", "best baseline", "baseline S2", "margin"])


if __name__ == "__main__":
    main()
