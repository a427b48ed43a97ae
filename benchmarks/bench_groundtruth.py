#!/usr/bin/env python
"""Ground-truth recovery: edpairs against the decompositions people use instead, all fitted on
the same synthetic layer (edpairs.synthetic, DESIGN sections 1 and 6), all scored by
edpairs.metrics.recovery.

Presets: ``published`` (D=16, I=3 concepts, F=2 distractors, 20,000 images of 1x2 patches)
and ``large`` (D=256, I=32, F=64, cosines up to 0.5, 200,000 patches). Several seeds are
averaged (mean, and the spread over seeds in brackets).

Columns
  cos(s)     mean over true concepts of cos(estimated encoding direction, true s_i) (signed)
  cos(w)     mean cos(estimated decoding direction, ideal filter w*_i), both projected onto
             the span of the centred data (components outside it change no output)
  IoU        mean detector IoU with the true memberships (a concept left unmatched scores 0)
  latent     RMSE of the centred latent factors, pooled over concepts, in units of the unit
             true encoding direction; every method reads them the same way,
             alpha_i = w_i . (x - mean) / (w_i . s_i / |s_i|) (edpairs' own rule)
  fit s      wall-clock seconds of the fit alone (data generation and scoring excluded)
  comps      number of components the method produced (matched down to I)

How each method's directions and detectors are read
  edpairs (centroid | discriminant | biorthogonal)  EDPairs(I, method=...).fit(X):
             decoding_ = filters, encoding_ = patterns, detect(X, hard=True) = detectors with
             edpairs' OWN thresholds (no oracle). Matched to concepts by IoU (Hungarian).
  edpairs + gradient refinement  EDPairs(I, gradient=True): the default fit with the stage-3
             gradient refinement (edpairs.refine, default RefineConfig, seed = data seed) of
             its detectors before the signal vectors are estimated on their positives. With an
             edpairs whose EDPairs has no `gradient` option, the same by hand:
             refine_detectors on decoding_.T / bias_, signal vectors on the refined detectors'
             positives (ops.signal_moments + pairs.positives_signal_vectors, whole-data
             estimator where a detector has too few positives), rescaled to unit encoding
             directions as EDPairs does. Own thresholds. Skipped without edpairs.refine.
  PCA        sklearn PCA, ALL D components; each component is both filter and pattern.
  ICA        sklearn FastICA(n_components=r, whiten="unit-variance") with r = rank of the
             centred data (= I + F here: the number of true sources); unmixing rows
             (components_) = filters, mixing columns (mixing_) = patterns.
  NMF        sklearn NMF(n_components=r + 1) on X - min(X, axis=0) (shifted to be
             non-negative; NMF does not centre, so one more component for the constant part);
             components = patterns, filters = rows of the pseudo-inverse of the component
             matrix (pinv(H).T, so filter_j . pattern_k = delta_jk).
  k-means    sklearn KMeans(n_clusters=I, n_init=1); pattern = filter = centroid - data mean.
  sph. k-means  edpairs.SphericalKMeans(I) on the centred data X - mean (on raw X the constant
             offset dominates every cosine); pattern = filter = the unit centroid.
  SAE        a sparse autoencoder written here in torch (ReLU encoder, linear decoder with
             unit-norm columns re-normalised after every step, decoder bias subtracted before
             encoding, loss |x - x_hat|^2 + l1 * |h|_1 on centred data scaled to unit mean
             variance per feature, Adam, --sae-epochs epochs), dictionary 4 x I;
             encoder rows = filters, decoder columns = patterns. (The package `overcomplete`
             imports torchvision at import time, which pulls a CUDA torch onto CPU machines, so
             it is not used.)

  Baselines have more (or unordered) components: each is matched to a true concept by
  Hungarian matching on |cos| between its pattern and the true encoding directions. Their
  signs are arbitrary, so each matched pattern and each matched filter is flipped,
  independently, to a positive cosine with its true counterpart. Baselines have no thresholds:
  each matched component's projection x . f is thresholded at the cut (and polarity, > or <)
  that maximises the IoU with the TRUE membership of its concept -- an oracle advantage that
  edpairs does not get (marked * in the table).

Before reporting, the script checks that scoring the true (W, S, memberships, latents) gives
IoU = cos = 1 and RMSE = 0, and that every method's output has the right shapes and is finite.

    PYTHONPATH=python python benchmarks/bench_groundtruth.py                   # both presets
    PYTHONPATH=python python benchmarks/bench_groundtruth.py --presets published --seeds 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_json  # noqa: E402

EDPAIRS_METHODS = ("centroid", "discriminant", "biorthogonal")
BASELINES = ("pca", "ica", "nmf", "kmeans", "spherical_kmeans", "sae")
LABELS = {
    "edpairs:centroid": "edpairs (centroid)",
    "edpairs:discriminant": "edpairs (discriminant)",
    "edpairs:biorthogonal": "edpairs (biorthogonal)",
    "edpairs+refine": "edpairs + gradient refinement",
    "pca": "PCA *",
    "ica": "FastICA *",
    "nmf": "NMF (shifted) *",
    "kmeans": "k-means centroids *",
    "spherical_kmeans": "spherical k-means *",
    "sae": "sparse autoencoder *",
}


# ---- what every method returns --------------------------------------------------------------


class Fitted:
    """A method's output before scoring. Either its own detectors (``detections``, ``latent``,
    matched by IoU) or raw components (``filters``/``patterns`` with more rows than concepts,
    matched by |cos| of patterns, oracle thresholds)."""

    def __init__(self, filters, patterns, *, detections=None, latent=None, n_iter=None, note="", converged=True,
                 stats=None):
        self.filters = np.asarray(filters, dtype=np.float64)
        self.patterns = np.asarray(patterns, dtype=np.float64)
        self.detections = detections
        self.latent = latent
        self.n_iter = n_iter
        self.note = note
        self.converged = converged
        self.stats = stats or {}


def _check_finite(name: str, **arrays) -> None:
    for key, a in arrays.items():
        if a is not None and not np.all(np.isfinite(np.asarray(a, dtype=np.float64))):
            raise AssertionError(f"{name}: {key} contains NaN or Inf")


# ---- edpairs ----------------------------------------------------------------------------------


def fit_edpairs(X, I, seed, method):
    import edpairs as edp

    p = edp.EDPairs(I, method=method, random_state=seed, progress=False).fit(X)
    return p


def read_edpairs(p, X) -> Fitted:
    det = np.asarray(p.detect(X, hard=True))
    lat = np.asarray(p.latent_factors(X), dtype=np.float64)
    return Fitted(p.decoding_, p.encoding_, detections=det, latent=lat, n_iter=getattr(p, "n_refine_", None))


def refine_available() -> bool:
    try:
        from edpairs import refine
    except ImportError:
        return False
    return hasattr(refine, "refine_detectors")


def builtin_gradient() -> bool:
    import inspect

    import edpairs as edp

    return "gradient" in inspect.signature(edp.EDPairs).parameters


def fit_edpairs_refined(X, I, seed):
    """Default EDPairs with stage-3 gradient refinement of its detectors before the stage-4
    signal vectors: EDPairs(I, gradient=True) where the estimator offers it; otherwise by hand:
    refine the fitted decoding_ / bias_, then signal vectors on the refined detectors, in
    EDPairs' convention (unit encoding, gain 1)."""
    import edpairs as edp

    if builtin_gradient():
        return edp.EDPairs(I, random_state=seed, progress=False, gradient=True).fit(X)
    from edpairs import ops
    from edpairs.pairs import positives_signal_vectors, whole_data_signal_vectors
    from edpairs.refine import RefineConfig, refine_detectors

    p = edp.EDPairs(I, random_state=seed, progress=False).fit(X)
    res = refine_detectors(X, p.decoding_.T.astype(np.float32), p.bias_.astype(np.float32),
                           config=RefineConfig(seed=seed), progress=False)
    W = np.asarray(res.W, dtype=np.float64).T  # (I, D)
    b = np.asarray(res.b, dtype=np.float64)
    mean = p.mean_.astype(np.float32)
    stats = ops.signal_moments(X, W.T.astype(np.float32), b.astype(np.float32), center=mean)
    S, ok = positives_signal_vectors(stats)
    if not ok.all():
        cov = np.asarray(ops.moments(X).covariance(ddof=0), dtype=np.float64)
        S[~ok] = whole_data_signal_vectors(W[~ok], cov)
    norms = np.linalg.norm(S, axis=1)
    norms[norms == 0] = 1.0
    return {"decoding": W * norms[:, None], "bias": b * norms, "encoding": S / norms[:, None],
            "mean": p.mean_.astype(np.float64), "epochs": len(res.history)}


def read_refined(r, X) -> Fitted:
    z = X.astype(np.float64) @ r["decoding"].T
    det = z > r["bias"]
    gain = np.einsum("id,id->i", r["decoding"], r["encoding"])
    lat = (z - r["decoding"] @ r["mean"]) / gain
    return Fitted(r["decoding"], r["encoding"], detections=det, latent=lat, n_iter=r["epochs"])


# ---- baselines ----------------------------------------------------------------------------------


def fit_pca(X, I, seed, rank):
    from sklearn.decomposition import PCA

    m = PCA(n_components=None, random_state=seed).fit(X)
    return Fitted(m.components_, m.components_)


def fit_ica(X, I, seed, rank):
    from sklearn.decomposition import FastICA

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = FastICA(n_components=rank, whiten="unit-variance", random_state=seed).fit(X)
    note = f"did not converge in {m.n_iter_} iterations" if any("converge" in str(w.message) for w in caught) else ""
    return Fitted(m.components_, m.mixing_.T, n_iter=m.n_iter_, note=note, converged=not note)


def fit_nmf(X, I, seed, rank):
    from sklearn.decomposition import NMF

    Xs = X - X.min(axis=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = NMF(n_components=rank + 1, init="nndsvda", random_state=seed).fit(Xs)
    note = f"did not converge in {m.n_iter_} iterations" if any("converge" in str(w.message).lower() for w in caught) else ""
    H = m.components_.astype(np.float64)
    return Fitted(np.linalg.pinv(H).T, H, n_iter=m.n_iter_, note=note, converged=not note)


def fit_kmeans(X, I, seed, rank):
    from sklearn.cluster import KMeans

    m = KMeans(n_clusters=I, n_init=1, random_state=seed).fit(X)
    C = m.cluster_centers_.astype(np.float64) - X.mean(axis=0, dtype=np.float64)
    return Fitted(C, C, n_iter=m.n_iter_)


def fit_spherical_kmeans(X, I, seed, rank):
    import edpairs as edp

    Xc = X - X.mean(axis=0, dtype=np.float64).astype(np.float32)
    m = edp.SphericalKMeans(I, random_state=seed, progress=False).fit(Xc)
    C = np.asarray(m.cluster_centers_, dtype=np.float64)
    return Fitted(C, C, n_iter=m.n_iter_)


def fit_sae(X, I, seed, rank, *, epochs=10, l1=0.2, batch_size=256, lr=1e-3, expansion=4):
    import torch

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean = X.mean(axis=0, dtype=np.float64)
    scale = float(np.sqrt(np.mean((X - mean.astype(np.float32)) ** 2, dtype=np.float64)))
    Xt = torch.from_numpy(((X - mean.astype(np.float32)) / scale).astype(np.float32))
    N, D = Xt.shape
    k = expansion * I
    enc = torch.nn.Linear(D, k)
    W_dec = torch.nn.Parameter(enc.weight.detach().T.clone())  # (D, k), tied initialisation
    with torch.no_grad():
        W_dec /= W_dec.norm(dim=0, keepdim=True)
    b_dec = torch.nn.Parameter(torch.zeros(D))
    opt = torch.optim.Adam(list(enc.parameters()) + [W_dec, b_dec], lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(N, generator=g)
        for s in range(0, N, batch_size):
            xb = Xt[perm[s:s + batch_size]]
            h = torch.relu(enc(xb - b_dec))
            xhat = h @ W_dec.T + b_dec
            loss = ((xhat - xb) ** 2).sum(1).mean() + l1 * h.abs().sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                W_dec /= W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)
    with torch.no_grad():
        h = torch.relu(enc(Xt - b_dec))
        xhat = h @ W_dec.T + b_dec
        r2 = 1.0 - float(((xhat - Xt) ** 2).sum() / (Xt - Xt.mean(0)).pow(2).sum())
        l0 = float((h > 0).float().sum(1).mean())
        dead = int(((h > 0).sum(0) == 0).sum())
    # The encoder reads (x - mean)/scale - b_dec: in raw coordinates its filter directions are
    # the encoder rows (a global scale changes no direction).
    return Fitted(enc.weight.detach().double().numpy(), W_dec.detach().double().numpy().T,
                  n_iter=epochs, note=f"R2 {r2:.3f}, L0 {l0:.1f}, dead {dead}/{k}",
                  stats={"R2": r2, "L0": l0, "dead": dead})


BASELINE_FITS: Dict[str, Callable] = {
    "pca": fit_pca, "ica": fit_ica, "nmf": fit_nmf, "kmeans": fit_kmeans,
    "spherical_kmeans": fit_spherical_kmeans, "sae": fit_sae,
}


# ---- scoring -------------------------------------------------------------------------------------


def oracle_threshold(z: np.ndarray, truth: np.ndarray):
    """The cut c and polarity sign in {+1, -1} maximising IoU(sign * z > c, truth).
    Returns (iou, sign, c). Cuts lie between distinct sorted values (ties never split)."""
    best = (-1.0, 1, 0.0)
    P = int(truth.sum())
    n = z.size
    for sign in (1, -1):
        v = sign * z
        order = np.argsort(v, kind="stable")
        vs, ts = v[order], truth[order]
        # Detect the rows from position k on (k = 0..n): tp = positives among them.
        tp = np.concatenate([[P], P - np.cumsum(ts)])  # tp[k] for k = 0..n
        k = np.arange(n + 1)
        detected = n - k
        iou = tp / np.maximum(detected + P - tp, 1)
        valid = np.ones(n + 1, bool)
        valid[1:n] = vs[1:] > vs[:-1]  # a cut at k separates vs[k-1] < vs[k]
        iou = np.where(valid, iou, -1.0)
        j = int(np.argmax(iou))
        if iou[j] > best[0]:
            if j == 0:
                c = vs[0] - 1.0
            elif j == n:
                c = vs[-1] + 1.0
            else:
                c = 0.5 * (vs[j - 1] + vs[j])
            best = (float(iou[j]), sign, float(c))
    return best


def score(layer, fitted: Fitted, span, mean) -> Dict[str, object]:
    from edpairs import metrics

    X = layer.X
    I, D = layer.S.shape
    if fitted.filters.shape[1] != D or fitted.patterns.shape != fitted.filters.shape:
        raise AssertionError(f"bad direction shapes {fitted.filters.shape} / {fitted.patterns.shape}")
    _check_finite("method", filters=fitted.filters, patterns=fitted.patterns, latent=fitted.latent)
    if fitted.detections is not None:  # edpairs: own detectors, matched by IoU
        if fitted.detections.shape != (X.shape[0], fitted.filters.shape[0]):
            raise AssertionError(f"bad detections shape {fitted.detections.shape}")
        r = metrics.recovery(layer, decoding=fitted.filters, encoding=fitted.patterns,
                             detections=fitted.detections, latent=fitted.latent, span=span)
        oracle = False
    else:  # baseline: match by |cos| of patterns, orient, oracle thresholds
        C = metrics.cosines(fitted.patterns, layer.S)  # (k, I) absolute
        rows, cols = metrics.match(C)
        if cols.size != I:
            raise AssertionError(f"only {cols.size} of {I} concepts matched")
        P = fitted.patterns[rows]
        F = fitted.filters[rows]
        P *= np.where(np.einsum("id,id->i", P, layer.S) < 0, -1.0, 1.0)[:, None]
        cos_f = metrics.cosines(F, layer.W, span=span, absolute=False)[np.arange(I), np.arange(I)]
        F *= np.where(cos_f < 0, -1.0, 1.0)[:, None]
        Z = X.astype(np.float64) @ F.T
        det = np.zeros((X.shape[0], I), bool)
        for i in range(I):
            _, sign, c = oracle_threshold(Z[:, i], layer.membership[:, i])
            det[:, i] = sign * Z[:, i] > c
        unit_p = P / np.linalg.norm(P, axis=1, keepdims=True)
        gain = np.einsum("id,id->i", F, unit_p)
        with np.errstate(divide="ignore", invalid="ignore"):
            lat = (Z - F @ mean) / gain
        lat_ok = bool(np.all(np.abs(gain) > 1e-9 * np.linalg.norm(F, axis=1)) and np.all(np.isfinite(lat)))
        r = metrics.recovery(layer, decoding=F, encoding=P, detections=det,
                             latent=lat if lat_ok else None, span=span,
                             match_by=(np.arange(I), np.arange(I)))
        oracle = True
    out = {
        "mean_cos_encoding": r["mean_cos_encoding"], "mean_cos_decoding": r["mean_cos_decoding"],
        "mean_iou": r["mean_iou"], "mean_latent_rmse": r["mean_latent_rmse"],
        "cos_encoding": r["cos_encoding"].tolist(), "cos_decoding": r["cos_decoding"].tolist(),
        "iou": r["iou"].tolist(), "oracle_thresholds": oracle, "n_components": int(fitted.filters.shape[0]),
        "n_iter": None if fitted.n_iter is None else int(fitted.n_iter), "note": fitted.note,
        "converged": bool(fitted.converged), "stats": fitted.stats,
    }
    for key in ("mean_cos_encoding", "mean_cos_decoding", "mean_iou"):
        v = out[key]
        if not (np.isfinite(v) and -1.0 - 1e-9 <= v <= 1.0 + 1e-9):
            raise AssertionError(f"{key} = {v} is not a valid score")
    return out


def sanity_check(layer, span, mean) -> Dict[str, float]:
    """Scoring the truth must give perfect scores: checks the data, the span and the metrics."""
    from edpairs import metrics

    r = metrics.recovery(layer, decoding=layer.W, encoding=layer.S, detections=layer.membership,
                         latent=layer.alpha, span=span)
    got = {k: r[k] for k in ("mean_iou", "mean_cos_encoding", "mean_cos_decoding", "mean_latent_rmse")}
    if not (got["mean_iou"] == 1.0 and got["mean_cos_encoding"] > 1 - 1e-9 and got["mean_cos_decoding"] > 1 - 1e-9
            and got["mean_latent_rmse"] < 1e-9):
        raise AssertionError(f"scoring the ground truth is not perfect: {got}")
    # The ideal thresholds reproduce the memberships on noise-free data.
    ideal = layer.X.astype(np.float64) @ layer.W.T > layer.b
    got["ideal_detector_iou"] = float(metrics.match_detectors(ideal, layer.membership)["mean_iou"])
    return got


# ---- driver ----------------------------------------------------------------------------------------


def make_preset(name: str, seed: int, n_images: Optional[int]):
    from edpairs import synthetic

    kw = {} if n_images is None else {"n_images": n_images}
    return getattr(synthetic, name)(seed=seed, train_head=False, **kw)


def run_one(method: str, layer, seed: int, rank: int, args):
    import edpairs as edp

    X = layer.X
    I = layer.n_concepts
    if method.startswith("edpairs:"):
        p = fit_edpairs(X, I, seed, method.split(":", 1)[1])
        return p, read_edpairs
    if method == "edpairs+refine":
        r = fit_edpairs_refined(X, I, seed)
        return r, (read_edpairs if isinstance(r, edp.EDPairs) else read_refined)
    if method == "sae":
        return fit_sae(X, I, seed, rank, epochs=args.sae_epochs, l1=args.sae_l1), None
    return BASELINE_FITS[method](X, I, seed, rank), None


def fmt(values: List[Optional[float]], digits: int = 3) -> str:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return "n/a"
    m = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{max(vals) - min(vals):.{digits}f}]"


def table_note(rs: List[dict]) -> str:
    parts = []
    bad = sum(not r["converged"] for r in rs)
    if bad:
        parts.append(f"did not converge ({bad}/{len(rs)} runs)")
    keys = rs[0]["stats"].keys()
    if keys:
        k = rs[0]["n_components"]
        mean = {key: statistics.fmean(r["stats"][key] for r in rs) for key in keys}
        parts.append(", ".join(f"{key} {mean[key]:.3g}" + (f"/{k}" if key in ("L0", "dead") else "") for key in keys))
    return "; ".join(parts)


def warm_imports(methods) -> None:
    """Imports each method's library before anything is timed (import time is no fit time)."""
    if any(m in ("pca", "ica", "nmf") for m in methods):
        import sklearn.decomposition  # noqa: F401
    if "kmeans" in methods:
        import sklearn.cluster  # noqa: F401
    if any(m in ("sae", "edpairs+refine") for m in methods):
        import torch

        a = torch.ones(64, 64, requires_grad=True)  # first-use initialisation of torch's CPU kernels
        (torch.relu(a @ a) ** 2).sum().backward()
    if "edpairs+refine" in methods:
        import edpairs.refine  # noqa: F401


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["published", "large"], choices=["published", "large"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="data (and method) seeds")
    p.add_argument("--large-seeds", type=int, default=1,
                   help="use only the first N of --seeds for the large preset (default 1: keeps the run short)")
    p.add_argument("--n-images", type=int, default=None, help="override the presets' number of images (quick runs)")
    p.add_argument("--methods", default=",".join(["edpairs:" + m for m in EDPAIRS_METHODS] + ["edpairs+refine"]
                                                 + list(BASELINES)),
                   help="comma-separated subset of the rows")
    p.add_argument("--sae-epochs", type=int, default=10)
    p.add_argument("--sae-l1", type=float, default=0.2, help="L1 weight of the SAE (data scaled to unit mean variance)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for the SAE and the gradient refinement (default 1: their minibatch "
                        "products are small, and on a shared 2-core machine 2 threads ran up to 10x slower)")
    p.add_argument("--json", default="benchmarks/out/groundtruth.json")
    args = p.parse_args()

    import edpairs as edp
    from edpairs import metrics

    if args.torch_threads > 0 and any(m in args.methods for m in ("sae", "edpairs+refine")):
        import torch

        torch.set_num_threads(args.torch_threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in LABELS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(LABELS)}")
    notes = []
    if "edpairs+refine" in methods and not refine_available():
        methods.remove("edpairs+refine")
        notes.append("edpairs + gradient refinement: skipped (edpairs.refine.refine_detectors is not available)")
    default_method = edp.EDPairs(1).method
    warm_imports(methods)

    t_start = time.perf_counter()
    results = []
    sanity = {}
    for preset in args.presets:
        seeds = args.seeds[: args.large_seeds] if preset == "large" else args.seeds
        for seed in seeds:
            t0 = time.perf_counter()
            layer = make_preset(preset, seed, args.n_images)
            mean = layer.X.mean(axis=0, dtype=np.float64)
            span = metrics.data_span(edp.ops.moments(layer.X))
            rank = int(span.shape[0])
            sanity[f"{preset}/{seed}"] = dict(sanity_check(layer, span, mean), rank=rank,
                                              generate_and_check_s=time.perf_counter() - t0)
            print(f"[{preset} seed {seed}] {layer!r}, rank {rank}, truth scores perfect "
                  f"(ideal thresholds IoU {sanity[f'{preset}/{seed}']['ideal_detector_iou']:.4f})", file=sys.stderr)
            for method in methods:
                t0 = time.perf_counter()
                obj, reader = run_one(method, layer, seed, rank, args)
                fit_s = time.perf_counter() - t0
                fitted = reader(obj, layer.X) if reader else obj
                sc = score(layer, fitted, span, mean)
                results.append(dict(preset=preset, seed=seed, method=method, fit_s=fit_s, **sc))
                print(f"  {LABELS[method]:32s} fit {fit_s:7.2f}s  cos(s) {sc['mean_cos_encoding']:.3f}  "
                      f"cos(w) {sc['mean_cos_decoding']:.3f}  IoU {sc['mean_iou']:.3f}  {sc['note']}", file=sys.stderr)

    payload = {"benchmark": "ground-truth recovery", "machine": machine_info(), "args": vars(args),
               "default_method": default_method, "sanity": sanity, "notes": notes, "results": results,
               "total_s": time.perf_counter() - t_start}
    write_json(args.json, payload)

    for preset in args.presets:
        rows = []
        by = {m: [r for r in results if r["preset"] == preset and r["method"] == m] for m in methods}
        seeds = sorted({r["seed"] for r in results if r["preset"] == preset})
        for m in methods:
            rs = by[m]
            rows.append({
                "method": LABELS[m], "cos(s)": fmt([r["mean_cos_encoding"] for r in rs]),
                "cos(w)": fmt([r["mean_cos_decoding"] for r in rs]), "IoU": fmt([r["mean_iou"] for r in rs]),
                "latent RMSE": fmt([r["mean_latent_rmse"] for r in rs]),
                "fit s": fmt([r["fit_s"] for r in rs], 2), "comps": rs[0]["n_components"],
                "note": table_note(rs),
            })
        print()
        print(f"== {preset}: seeds {seeds}; mean over seeds [max - min] ==")
        print_table(rows, ["method", "cos(s)", "cos(w)", "IoU", "latent RMSE", "fit s", "comps", "note"])
        print("* baseline detectors use the best threshold and polarity for the matched concept, computed from the "
              "TRUE memberships (an oracle advantage); edpairs rows use their own thresholds.")
        mean_of = lambda m, k: statistics.fmean(r[k] for r in by[m])  # noqa: E731
        base = [m for m in methods if not m.startswith("edpairs")]
        ed = f"edpairs:{default_method}"
        if ed in methods and base:
            for key, label in (("mean_cos_encoding", "cos(encoding)"), ("mean_cos_decoding", "cos(decoding)")):
                best = max(base, key=lambda m: mean_of(m, key))
                ahead = mean_of(ed, key) > mean_of(best, key)
                others = [m for m in methods if m.startswith("edpairs") and mean_of(m, key) > mean_of(best, key)]
                print(f"edpairs ({default_method}, the default) ahead of every baseline on {label}: "
                      f"{'yes' if ahead else 'no'} ({mean_of(ed, key):.3f} vs best baseline {LABELS[best]} "
                      f"{mean_of(best, key):.3f}); edpairs rows ahead: {[LABELS[m] for m in others] or 'none'}")
        if preset == "large" and ed in methods:
            goals = (("mean_iou", "mean IoU", 0.90), ("mean_cos_encoding", "mean cos(s)", 0.95),
                     ("mean_cos_decoding", "mean cos(w)", 0.90))
            for key, label, goal in goals:
                v = mean_of(ed, key)
                per = ", ".join(f"{m.split(':')[-1].replace('edpairs+refine', 'gradient')} {mean_of(m, key):.3f}"
                                for m in methods if m.startswith("edpairs"))
                print(f"goal {label} >= {goal:.2f}: {v:.3f} ({'met' if v >= goal else 'NOT met'}) "
                      f"[edpairs rows: {per}]")
    for note in notes:
        print(note)
    print(f"total {time.perf_counter() - t_start:.0f} s; JSON: {args.json}")


if __name__ == "__main__":
    main()
