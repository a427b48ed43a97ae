#!/usr/bin/env python
"""Activation maximisation check on EfficientNet-Lite0 (issue 5, item 5; DESIGN section 3): fit
pairs at `_blocks.15` on the shipped photos (with URA through the split head unless --no-ura),
then for every concept optimise an input (jitter + periodic blur) to raise its decoded value
w_i . x (mean over the 7 x 7 positions) and compare how the layer's mean feature vector moved
(delta) with the concept's encoding direction s_i and its filter w_i. Also reported: the cosine
with the classic whole-data pattern Cov w_i / (w_i^T Cov w_i) of the same filter.

Columns
  cos(d,s)    cos(delta, s_i), the positives-only encoding direction of the pairs
  cos(d,w)    cos(delta, w_i), the decoding direction (filter)
  cos(d,pat)  cos(delta, Cov w_i), the whole-data pattern of the same filter
  obj0, obj1  mean decoded value w_i . x before and after
  natural     the largest mean decoded value over the photos (the stop target with --stop natural)

    PYTHONPATH=python python benchmarks/bench_actmax.py                  # 8 concepts, 48 steps
    PYTHONPATH=python python benchmarks/bench_actmax.py --steps 16 --concepts 4 --no-ura   # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_json  # noqa: E402

LAYER = "_blocks.15"
URA = dict(unconstrained_epochs=2, constrained_epochs=2, min_steps=20, batch_images=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concepts", type=int, default=8)
    ap.add_argument("--crops", type=int, default=3, help="crops per shipped photo for the fit")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--jitter", type=int, default=8)
    ap.add_argument("--blur-every", type=int, default=4)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--start", choices=["noise", "photo"], default="noise")
    ap.add_argument("--no-ura", action="store_true")
    ap.add_argument("--stop", choices=["steps", "natural"], default="steps",
                    help="natural: stop once the objective reaches the largest mean decoded value of the photos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-2core-epyc",
                                                  "actmax.json"))
    args = ap.parse_args()

    import torch

    import edpairs as edp
    from edpairs.actmax import activation_maximisation

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model = edp.zoo.efficientnet_lite0()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = edp.zoo.PhotoDataset(crops_per_photo=args.crops, seed=0)
    acts = edp.capture.capture(model, LAYER, data, batch_size=8)            # (n, 7, 7, 320)
    split = edp.split_model(model, LAYER)
    pairs = edp.EDPairs(args.concepts, random_state=args.seed, progress=False)
    if args.no_ura:
        pairs.fit(acts.reshape(-1, acts.shape[-1]))
    else:
        pairs.fit(acts, head=split.head, ura=URA)
    fit_s = time.perf_counter() - t0
    flat = acts.reshape(-1, acts.shape[-1]).astype(np.float64)
    cov = np.cov(flat.T)
    W = pairs.decoding_.astype(np.float64)
    pattern = W @ cov
    rates = np.asarray(pairs.detect(flat.astype(np.float32), hard=True)).mean(0)
    cos_sw = [float(W[i] @ pairs.encoding_[i] / np.linalg.norm(W[i]) / np.linalg.norm(pairs.encoding_[i]))
              for i in range(args.concepts)]
    print(f"fit {fit_s:.1f}s on {acts.shape[0]} images ({'no URA' if args.no_ura else 'URA'}); "
          f"cos(s_i, w_i) {[round(c, 3) for c in cos_sw]}", flush=True)

    natural = (flat @ W.T).reshape(acts.shape[0], -1, W.shape[0]).mean(1).max(0)   # (I,) per-image mean, max
    start = None
    if args.start == "photo":
        start = data[0][0][None]
    rows, runs = [], []
    for i in range(args.concepts):
        t = time.perf_counter()
        r = activation_maximisation(split, LAYER, pairs, i, steps=args.steps, lr=args.lr, jitter=args.jitter,
                                    blur_every=args.blur_every, start=start,
                                    shape=(1, 3, args.size, args.size), seed=args.seed + i,
                                    target=float(natural[i]) if args.stop == "natural" else None)
        cos_pat = float(r.delta @ pattern[i] / max(np.linalg.norm(r.delta) * np.linalg.norm(pattern[i]), 1e-300))
        run = dict(concept=i, cos_encoding=r.cos_encoding, cos_decoding=r.cos_decoding, cos_pattern=cos_pat,
                   objective_start=r.objective_start, objective_final=r.objective_final,
                   delta_norm=float(np.linalg.norm(r.delta)), positive_rate=float(rates[i]),
                   natural_max=float(natural[i]), steps_taken=len(r.history),
                   seconds=time.perf_counter() - t)
        runs.append(run)
        rows.append({"concept": i, "cos(d,s)": f"{r.cos_encoding:.3f}", "cos(d,w)": f"{r.cos_decoding:.3f}",
                     "cos(d,pat)": f"{cos_pat:.3f}", "s closer": "yes" if r.closer_to_encoding else "no",
                     "obj0": f"{r.objective_start:.2f}", "obj1": f"{r.objective_final:.2f}",
                     "natural": f"{natural[i]:.2f}", "steps": len(r.history), "pos rate": f"{rates[i]:.3f}",
                     "s": f"{run['seconds']:.0f}"})
        print(rows[-1], flush=True)
    untouched = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # A run that never stepped (the start already reached the stop target) has no direction.
    moved = [r for r in runs if r["delta_norm"] > 0]
    frac = float(np.mean([r["cos_encoding"] > r["cos_decoding"] for r in moved])) if moved else float("nan")
    frac_pat = float(np.mean([r["cos_encoding"] > r["cos_pattern"] for r in moved])) if moved else float("nan")
    raised = float(np.mean([r["objective_final"] > r["objective_start"] for r in runs]))
    summary = dict(concepts_moved=len(moved), fraction_closer_to_encoding=frac,
                   fraction_encoding_beats_pattern=frac_pat,
                   fraction_objective_raised=raised, parameters_untouched=untouched,
                   mean_cos_encoding=float(np.mean([r["cos_encoding"] for r in runs])),
                   mean_cos_decoding=float(np.mean([r["cos_decoding"] for r in runs])),
                   mean_cos_pattern=float(np.mean([r["cos_pattern"] for r in runs])),
                   total_s=time.perf_counter() - t0, fit_s=fit_s, cos_encoding_decoding=cos_sw)
    write_json(args.out, {"benchmark": "actmax", "machine": machine_info(), "layer": LAYER,
                          "settings": {k: v for k, v in vars(args).items() if k != "out"}, "ura": URA,
                          "n_images": int(acts.shape[0]), "runs": runs, "summary": summary})
    print()
    print_table(rows, ["concept", "cos(d,s)", "cos(d,w)", "cos(d,pat)", "s closer", "obj0", "obj1", "natural", "steps",
                        "pos rate", "s"])
    print(f"\nfraction of concepts with cos(delta, s_i) > cos(delta, w_i): {frac:.3f} "
          f"({sum(r['cos_encoding'] > r['cos_decoding'] for r in moved)}/{len(moved)} concepts moved); "
          f"s_i beats the whole-data pattern: {frac_pat:.3f}; objective raised: {raised:.3f}; "
          f"parameters untouched: {untouched}; total {summary['total_s']:.0f}s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
