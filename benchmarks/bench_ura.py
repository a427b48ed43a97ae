#!/usr/bin/env python
"""Uncertainty Region Alignment on ground truth: the same EDPairs fit without URA, with the
unconstrained stage only, and with the published schedule (unconstrained, then constrained),
plus ablations (the same schedule with the head's entropy switched off; URA with the other
regularisers), on synthetic layers with a trained linear head (edpairs.synthetic, DESIGN sections 2 stage 5
and 6), all scored by edpairs.metrics.recovery.

Columns (mean over true concepts; spread over seeds in brackets)
  cos(w)   cos(decoding direction, ideal filter w*_i) inside the data span
  cos(s)   cos(encoding direction, true s_i)
  IoU      detector IoU with the true memberships (min over detectors in `min IoU`)
  RMSE     latent-factor RMSE (centred, units of the unit true encoding direction)
  fit s    wall-clock seconds of the whole fit (stages 1-4 and URA)
  head acc the head's training accuracy (a weak head cannot align anything)

    PYTHONPATH=python python benchmarks/bench_ura.py                       # both presets
    PYTHONPATH=python python benchmarks/bench_ura.py --presets published --seeds 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_json  # noqa: E402

# name -> the ``ura`` argument of EDPairs.fit (False: the same fit without URA).
VARIANTS = {
    "no URA": False,
    "URA unconstrained": {"constrained_epochs": 0},
    "URA unconstrained + constrained": {},
    # Ablations: what the head's entropy adds to the exclusivity regulariser, and URA with the
    # other regularisers (published stage-3 losses; fidelity to the starting memberships).
    "same schedule, entropy off (ura=0)": {"ura": 0.0},
    "URA, membership fidelity": {"regularizer": "memberships"},
    "URA, published stage losses": {"regularizer": "stage"},
}
# The large preset's fits take minutes each on 2 cores: the main rows only.
LARGE_VARIANTS = ("no URA", "URA unconstrained + constrained", "same schedule, entropy off (ura=0)")


def score(edp, layer, model):
    r = edp.metrics.recovery(layer, decoding=model.decoding_, encoding=model.encoding_,
                             detections=np.asarray(model.detect(layer.X, hard=True)),
                             latent=np.asarray(model.latent_factors(layer.X)))
    return {"cos_w": r["mean_cos_decoding"], "cos_s": r["mean_cos_encoding"], "iou": r["mean_iou"],
            "min_iou": float(np.nanmin(r["iou"])), "rmse": r["mean_latent_rmse"],
            "iou_per_concept": [float(v) for v in r["iou"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["published", "large"], choices=["published", "large"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--large-seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cpu-2core-epyc", "ura.json"))
    args = ap.parse_args()

    import torch

    import edpairs as edp

    torch.set_num_threads(1)
    runs = []
    for preset in args.presets:
        seeds = args.seeds if preset == "published" else args.large_seeds
        n_concepts = 3 if preset == "published" else 32
        for seed in seeds:
            layer = getattr(edp.synthetic, preset)(seed=seed)
            for name, ura in VARIANTS.items():
                if preset == "large" and name not in LARGE_VARIANTS:
                    continue
                start = time.perf_counter()
                model = edp.EDPairs(n_concepts, random_state=0).fit(layer.images(), head=layer.head, ura=ura)
                elapsed = time.perf_counter() - start
                row = {"preset": preset, "seed": seed, "variant": name, "fit_s": elapsed,
                       "head_accuracy": layer.head.accuracy_, **score(edp, layer, model)}
                if model.ura_:
                    row["entropy"] = {k: [v[0]["entropy"], v[-1]["entropy"]] for k, v in model.ura_.items()}
                runs.append(row)
                print(f"{preset} seed {seed} {name}: cos(w) {row['cos_w']:.4f} cos(s) {row['cos_s']:.4f} "
                      f"IoU {row['iou']:.4f} (min {row['min_iou']:.4f}) RMSE {row['rmse']:.4f} {elapsed:.1f}s",
                      flush=True)

    def agg(values, fmt):
        m = statistics.mean(values)
        if len(values) > 1:
            return f"{m:{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"
        return f"{m:{fmt}}"

    table = []
    for preset in args.presets:
        for name in VARIANTS:
            rows = [r for r in runs if r["preset"] == preset and r["variant"] == name]
            if not rows:
                continue
            table.append({"preset": preset, "variant": name, "seeds": len(rows),
                          "cos(w)": agg([r["cos_w"] for r in rows], ".4f"),
                          "cos(s)": agg([r["cos_s"] for r in rows], ".4f"),
                          "IoU": agg([r["iou"] for r in rows], ".4f"),
                          "min IoU": f"{min(r['min_iou'] for r in rows):.4f}",
                          "RMSE": agg([r["rmse"] for r in rows], ".4f"),
                          "fit s": agg([r["fit_s"] for r in rows], ".1f"),
                          "head acc": f"{statistics.mean(r['head_accuracy'] for r in rows):.3f}"})
    write_json(args.out, {"benchmark": "ura", "machine": machine_info(), "torch": torch.__version__,
                          "threads": {"torch": 1, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
                          "runs": runs, "table": table})
    print()
    print_table(table, ["preset", "variant", "seeds", "cos(w)", "cos(s)", "IoU", "min IoU", "RMSE", "fit s",
                        "head acc"])
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
