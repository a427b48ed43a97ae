#!/usr/bin/env python
"""Influence on synthetic layers whose head is known (issue 5, item 4): RCAV sign-test scores of
each concept on each class (edpairs.influence, strength 5, 100 noise directions from
label-permuted detectors, Bonferroni over concepts x classes), for the true pairs and for fitted
ones, compared with the trained linear head's true class-concept relations.

Truth (see tests/test_influence.py): with effect e_ik = w_k . s_i of concept i on class k's logit,
the cell is unambiguously +1 (-1) when e_ik is the largest (smallest) over classes — every
image's class-k probability then rises (falls); elsewhere the sign of e_ik - mean_k e_ik.

Columns
  sig         significant cells (p_Bonf < 0.05) of I x K
  sig agree   significant cells whose score sign equals the true relation
  unamb agree unambiguous cells whose score sign equals the relation (of all unambiguous)
  all agree   cells with a non-zero score whose sign equals the centred relation
  null sd     median standard deviation of the noise scores; |score| <= 1 caps z at ~1/sd
  min p_Bonf  smallest Bonferroni-adjusted p-value

    PYTHONPATH=python python benchmarks/bench_influence.py
    PYTHONPATH=python python benchmarks/bench_influence.py --presets published --seeds 0 --n-noise 20   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_json  # noqa: E402


def truth(head, S):
    effect = S @ head.weight.T
    unamb = np.zeros_like(effect)
    unamb[np.arange(len(S)), effect.argmax(1)] = 1
    unamb[np.arange(len(S)), effect.argmin(1)] = -1
    return unamb, np.sign(effect - effect.mean(1, keepdims=True))


def real_network(edp, influence, args) -> dict:
    """EfficientNet-Lite0 at _blocks.15, 8 pairs fitted (no URA) on 48 photo crops, 1000 classes:
    no truth to compare with, but the spread of the noise scores on a non-linear head."""
    import torch

    model = edp.zoo.efficientnet_lite0()
    data = edp.zoo.PhotoDataset(crops_per_photo=6, seed=0)
    acts = edp.capture.capture(model, "_blocks.15", data, batch_size=8)
    pairs = edp.EDPairs(8, random_state=0, progress=False).fit(acts.reshape(-1, acts.shape[-1]))
    split = edp.split_model(model, "_blocks.15")
    n_noise = min(args.n_noise, 30)
    t = time.perf_counter()
    res = influence(split.head, torch.from_numpy(acts), pairs, n_noise=n_noise, batch_size=48)
    return dict(preset="efficientnet", seed=0, pairs="fitted (no URA)", labels=False, n_images=int(acts.shape[0]),
                n_noise=n_noise, cells=int(res.significant.size), significant=int(res.significant.sum()),
                significant_per_concept=[int(v) for v in res.significant.sum(1)],
                null_sd_median=float(np.median(res.null_std)), min_p_adjusted=float(res.pvalues_adjusted.min()),
                mean_abs_score=float(np.abs(res.scores).mean()),
                mean_abs_null_score=float(np.abs(res.null_scores).mean()), seconds=time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["published", "large"],
                    choices=["published", "large", "efficientnet"],
                    help="efficientnet: no ground truth; the spread of the noise scores on a real head")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--images", type=int, default=None, help="images per layer (default 2000 / 1000)")
    ap.add_argument("--n-noise", type=int, default=100)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-2core-epyc",
                                                  "influence.json"))
    args = ap.parse_args()

    import edpairs as edp
    from edpairs.influence import influence
    from scipy.optimize import linear_sum_assignment

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    runs, table = [], []
    for preset in args.presets:
        if preset == "efficientnet":
            row = real_network(edp, influence, args)
            runs.append(row)
            table.append({"preset": preset, "seed": 0, "pairs": "fitted (no URA)", "labels": "all",
                          "cos(s)": "-", "sig": f"{row['significant']}/{row['cells']}", "sig agree": "-",
                          "unamb agree": "-", "all agree": "-", "null sd": f"{row['null_sd_median']:.2f}",
                          "min p_Bonf": f"{row['min_p_adjusted']:.3g}", "s": f"{row['seconds']:.1f}"})
            print(table[-1], flush=True)
            continue
        n_images = args.images or (2000 if preset == "published" else 1000)
        I = 3 if preset == "published" else 32
        seeds = args.seeds if preset == "published" else args.seeds[:1]
        for seed in seeds:
            layer = getattr(edp.synthetic, preset)(n_images, seed=seed)
            gt = SimpleNamespace(decoding_=layer.W, encoding_=layer.S, bias_=layer.b, mean_=layer.offset)
            variants = [("true pairs", gt, layer.S)]
            t = time.perf_counter()
            if preset == "published":  # URA is cheap here; the large preset's URA fit takes minutes
                fit = edp.EDPairs(I, random_state=0, progress=False).fit(layer.images(), head=layer.head)
                name = "fitted (URA)"
            else:
                fit = edp.EDPairs(I, random_state=0, progress=False).fit(layer.X)
                name = "fitted (no URA)"
            fit_s = time.perf_counter() - t
            cos = np.abs(fit.encoding_ @ layer.S.T)
            r, c = linear_sum_assignment(-cos)
            variants.append((name, fit, layer.S[c[np.argsort(r)]]))
            for vname, pairs, S_true in variants:
                for labels in ((False, True) if preset == "published" else (False,)):
                    t = time.perf_counter()
                    res = influence(layer.head, layer.images(), pairs, n_noise=args.n_noise,
                                    labels=layer.y if labels else None, seed=seed)
                    secs = time.perf_counter() - t
                    unamb, centred = truth(layer.head, S_true)
                    sig = res.significant
                    nz = res.scores != 0
                    um = unamb != 0
                    row = dict(preset=preset, seed=seed, pairs=vname, labels=labels, n_images=n_images,
                               cells=int(sig.size), significant=int(sig.sum()),
                               significant_agree=int((np.sign(res.scores[sig]) == centred[sig]).sum()),
                               unambiguous=int(um.sum()),
                               unambiguous_agree=int((np.sign(res.scores[um]) == unamb[um]).sum()),
                               nonzero=int(nz.sum()), all_agree=int((np.sign(res.scores[nz]) == centred[nz]).sum()),
                               null_sd_median=float(np.median(res.null_std)),
                               min_p_adjusted=float(res.pvalues_adjusted.min()),
                               min_p=float(res.pvalues.min()),
                               mean_cos_s=float(np.mean(np.abs(np.einsum("id,id->i", pairs.encoding_, S_true)))),
                               seconds=secs, fit_s=fit_s if vname != "true pairs" else 0.0,
                               head_accuracy=layer.head.accuracy_)
                    runs.append(row)
                    table.append({"preset": preset, "seed": seed, "pairs": vname,
                                  "labels": "class k" if labels else "all",
                                  "cos(s)": f"{row['mean_cos_s']:.3f}",
                                  "sig": f"{row['significant']}/{row['cells']}",
                                  "sig agree": f"{row['significant_agree']}/{row['significant']}",
                                  "unamb agree": f"{row['unambiguous_agree']}/{row['unambiguous']}",
                                  "all agree": f"{row['all_agree']}/{row['nonzero']}",
                                  "null sd": f"{row['null_sd_median']:.2f}",
                                  "min p_Bonf": f"{row['min_p_adjusted']:.3g}", "s": f"{secs:.1f}"})
                    print(table[-1], flush=True)
    write_json(args.out, {"benchmark": "influence", "machine": machine_info(),
                          "settings": {"strength": 5.0, "n_noise": args.n_noise, "alpha": 0.05, "pvalue": "normal"},
                          "runs": runs})
    print()
    print_table(table, ["preset", "seed", "pairs", "labels", "cos(s)", "sig", "sig agree", "unamb agree", "all agree",
                        "null sd", "min p_Bonf", "s"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
