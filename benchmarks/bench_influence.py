#!/usr/bin/env python
"""Influence on synthetic layers whose head is known (issue 5, item 4): RCAV sign-test scores of
each concept on each class (edpairs.influence, strength 5, 100 noise directions from
label-permuted detectors, Bonferroni over concepts x classes), for the true pairs and for fitted
ones, compared with the known head's true class-concept relations.

Heads
  presence  edpairs.synthetic.PresenceHead (main rows): logit_k = sum_i H[k,i] g_i, g_i the pooled
            output of a ReLU-built ramp detector (width 0.5) on the layer's ideal filter w_i,
            H = 4 (2A - 1) from the classes' concepts. Truth = head.relations(): a step along s_i
            changes g_i alone, so class k's probability rises on every image that moves when
            H[k,i] is the column's largest entry, falls when it is the smallest; with a
            two-valued H that is every cell (= sign H).
  sigmoid   the same head with smooth detectors (never flat): every image moves under any
            direction.
  linear    the trained LinearHead (negative control): a linear head moves every image's logits
            by the same vector for any direction, so noise scores spread over [-1, 1]. Truth:
            +1 / -1 where the logit effect w_k . s_i is the largest / smallest over classes.

Layers
  published D=16, I=3, F=2, touching alpha ranges (absent U(0, 2.5), present U(2.5, 5))
  large     D=256, I=32, F=64, 4x4 grids, touching ranges
  margin    D=32, I=3, F=16 distractors U(0, 20), absent U(0, 1), present U(4, 5), classes as
            published: a layer where RCAV's premise holds - the concepts are a small share of the
            variance, so strength-matched label-permuted directions project on every filter by
            less than the detectors' margin (1.5, minus the ramp's half-width) and leave images
            untouched, while a concept's step of 5 crosses it.

Columns
  sig         significant cells (p_Bonf < 0.05) of I x K
  sig agree   significant cells whose score sign equals the truth (of significant cells with a truth)
  unamb agree cells with a truth whose score sign equals it (of all cells with a truth)
  null sd     median standard deviation of the noise scores; |score| <= 1 caps z at ~1/sd
  |w.v| max   largest projection of a strength-5 noise direction on a true filter (alpha units),
              next to the layer's margin (half the gap between absent and present alpha)
  cos(s)      mean |cos| between the pairs' encoding directions and their matched true ones
  purity      mean over concepts of |w*_m . step_i| / ||W* step_i||: the share of the concept's
              step (strength s_i / (w_i . s_i)) that the true filters W* read as its matched true
              concept m (1 for the true pairs; the head sees nothing else of the step)

    OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/bench_influence.py
    PYTHONPATH=python python benchmarks/bench_influence.py --presets published margin --seeds 0 --n-noise 20   # quick
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


PRESETS = ("published", "large", "margin")


def make(edp, preset, n_images, seed):
    if preset == "margin":
        return edp.synthetic.make_layer(n_images, n_features=32, n_concepts=3, n_distractors=16, grid=(1, 2),
                                        distractor_range=(0.0, 20.0), absent=(0.0, 1.0), present=(4.0, 5.0),
                                        classes=[(0, 1), (0, 2), (1, 2)], seed=seed)
    return getattr(edp.synthetic, preset)(n_images, seed=seed)


def linear_truth(head, S):
    """+1 / -1 where the concept's logit effect w_k . s_i is the largest / smallest over classes."""
    effect = S @ head.weight.T
    unamb = np.zeros(effect.shape, dtype=np.int64)
    unamb[np.arange(len(S)), effect.argmax(1)] = 1
    unamb[np.arange(len(S)), effect.argmin(1)] = -1
    return unamb


def noise_projection(layer, strength=5.0, n_noise=100, max_rows=10000, seed=0):
    """Largest |w_j . v| over true filters j and strength-scaled noise directions v of every concept."""
    from edpairs.influence import noise_directions

    rng = np.random.default_rng(seed)
    take = rng.choice(layer.X.shape[0], min(max_rows, layer.X.shape[0]), replace=False)
    X = layer.X[np.sort(take)].astype(np.float64)
    memb = (X @ layer.W.T - layer.b) > 0
    best = 0.0
    for i in range(layer.n_concepts):
        V = strength * noise_directions(X, memb[:, i], n_noise, rng=rng)
        best = max(best, float(np.abs(V @ layer.W.T).max()))
    return best


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
                normal_cells=_normal_cells(res), mean_abs_score=float(np.abs(res.scores).mean()),
                mean_abs_null_score=float(np.abs(res.null_scores).mean()), seconds=time.perf_counter() - t)


def _normal_cells(res) -> int:
    """Cells whose p-value came from the normal fit (the rest: the empirical test, where the
    noise scores do not justify a normal; edpairs.influence's module docstring)."""
    return int((np.asarray(res.tests) == "normal").sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS) + ["efficientnet"],
                    help="efficientnet: no ground truth; the spread of the noise scores on a real head")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the large preset runs the first only")
    ap.add_argument("--images", type=int, default=None, help="images per layer (default 2000; large 500)")
    ap.add_argument("--n-noise", type=int, default=100)
    ap.add_argument("--labels", action="store_true", help="also score class k on its own images only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-2core-epyc",
                                                  "influence.json"))
    args = ap.parse_args()

    import edpairs as edp
    from edpairs.influence import influence
    from edpairs.synthetic import PresenceHead
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
            table.append({"preset": preset, "seed": 0, "head": "network", "pairs": "fitted (no URA)",
                          "labels": "all", "cos(s)": "-", "sig": f"{row['significant']}/{row['cells']}",
                          "sig agree": "-", "unamb agree": "-", "null sd": f"{row['null_sd_median']:.2f}",
                          "|w.v| max": "-", "min p_Bonf": f"{row['min_p_adjusted']:.3g}",
                          "normal": f"{row['normal_cells']}/{row['cells']}", "s": f"{row['seconds']:.1f}"})
            print(table[-1], flush=True)
            continue
        n_images = args.images or (500 if preset == "large" else 2000)
        seeds = args.seeds[:1] if preset == "large" else args.seeds
        for seed in seeds:
            layer = make(edp, preset, n_images, seed)
            I = layer.n_concepts
            lo, hi = layer.params["absent"][1], layer.params["present"][0]
            margin = max(0.0, (hi - lo) / 2)
            projection = noise_projection(layer)
            heads = [("presence", PresenceHead.from_layer(layer, width=0.5))]
            if preset != "large":  # the large preset's runs take minutes each
                heads.append(("sigmoid", PresenceHead.from_layer(layer, width=0.5, detector="sigmoid")))
            heads.append(("linear", layer.head))
            gt = SimpleNamespace(decoding_=layer.W, encoding_=layer.S, bias_=layer.b, mean_=layer.offset)
            variants = [("true pairs", gt, np.arange(I))]
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
            variants.append((name, fit, c[np.argsort(r)]))  # true concept of each fitted one
            for vname, pairs, match in variants:
                S_true = layer.S[match]
                steps = np.asarray(pairs.encoding_, np.float64)
                steps = steps / np.einsum("id,id->i", np.asarray(pairs.decoding_, np.float64), steps)[:, None]
                read = steps @ layer.W.T                                      # (I, I) true concepts moved
                purity = float(np.mean(np.abs(read[np.arange(I), match]) / np.linalg.norm(read, axis=1)))
                for hname, head in heads:
                    for labels in ((False, True) if args.labels else (False,)):
                        t = time.perf_counter()
                        res = influence(head, layer.images(), pairs, n_noise=args.n_noise,
                                        labels=layer.y if labels else None, seed=seed)
                        secs = time.perf_counter() - t
                        truth = linear_truth(head, S_true) if hname == "linear" else head.relations()[match]
                        sig = res.significant
                        has = truth != 0
                        agree = np.sign(res.scores) == truth
                        row = dict(preset=preset, seed=seed, head=hname, pairs=vname, labels=labels,
                                   n_images=n_images, cells=int(sig.size), significant=int(sig.sum()),
                                   significant_with_truth=int((sig & has).sum()),
                                   significant_agree=int((sig & has & agree).sum()),
                                   unambiguous=int(has.sum()), unambiguous_agree=int((has & agree).sum()),
                                   null_sd_median=float(np.median(res.null_std)),
                                   min_p_adjusted=float(res.pvalues_adjusted.min()), min_p=float(res.pvalues.min()),
                                   normal_cells=_normal_cells(res), noise_projection_max=projection, margin=margin,
                                   purity=purity,
                                   mean_cos_s=float(np.mean(np.abs(np.einsum("id,id->i", pairs.encoding_, S_true)))),
                                   seconds=secs, fit_s=fit_s if vname != "true pairs" else 0.0,
                                   head_accuracy=float(head.accuracy_))
                        runs.append(row)
                        table.append({"preset": preset, "seed": seed, "head": hname, "pairs": vname,
                                      "labels": "class k" if labels else "all",
                                      "cos(s)": f"{row['mean_cos_s']:.3f}", "purity": f"{purity:.3f}",
                                      "sig": f"{row['significant']}/{row['cells']}",
                                      "sig agree": f"{row['significant_agree']}/{row['significant_with_truth']}",
                                      "unamb agree": f"{row['unambiguous_agree']}/{row['unambiguous']}",
                                      "null sd": f"{row['null_sd_median']:.2f}",
                                      "|w.v| max": f"{projection:.2f} (m {margin:g})",
                                      "min p_Bonf": f"{row['min_p_adjusted']:.3g}",
                                      "normal": f"{row['normal_cells']}/{row['cells']}", "s": f"{secs:.1f}"})
                        print(table[-1], flush=True)
    write_json(args.out, {"benchmark": "influence", "machine": machine_info(),
                          "settings": {"strength": 5.0, "n_noise": args.n_noise, "alpha": 0.05, "pvalue": "normal",
                                       "presence_width": 0.5, "presets": args.presets, "seeds": args.seeds},
                          "runs": runs})
    print()
    print_table(table, ["preset", "seed", "head", "pairs", "labels", "cos(s)", "purity", "sig", "sig agree",
                        "unamb agree", "null sd", "|w.v| max", "min p_Bonf", "normal", "s"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
