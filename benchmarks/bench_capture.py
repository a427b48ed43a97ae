#!/usr/bin/env python
"""Throughput and memory of capturing a real layer into the on-disk store, next to what a user
would write instead, in the same run on the same images.

Model and data: EfficientNet-Lite0 (ImageNet weights, ``edpairs.zoo.efficientnet_lite0``) on
``edpairs.zoo.PhotoDataset(crops)`` (the 8 shipped colour photos, ``crops`` seeded 224 x 224
views each), read by a ``torch.utils.data.DataLoader(batch_size)`` in the main process.

Methods (each in its own fresh process, so its peak memory is its own)
  edpairs store f16   ``edpairs.store.extract(..., dtype="float16")``: the forward pass stops
                      after the layer, each shard is written to a temporary file, fsynced, renamed
                      and its crc32 recorded in the sidecar
  edpairs store f32   the same in float32
  edpairs capture     ``edpairs.capture.iter_activations`` alone (batches discarded): the
                      capture's own cost, no disk
  hook + list + np.save  the usual hand-written version: a forward hook appends
                      ``output.detach().cpu()`` to a list during full forward passes, then
                      ``torch.cat``, channel-last, ``(N * 49, D)`` rows, ``np.save`` (float32)

Columns
  wall s          seconds from the first batch to the data on disk (model loading excluded);
                  median of --repeat runs, each in a fresh process, methods interleaved
  min s           the fastest of the runs (the machine's load varies between runs)
  io s            the storing itself inside that time: for the store, shard files (crc32,
                  write, fsync, rename), sidecar rewrites and the model's parameter hash; for the
                  hand-written version, np.save (median over runs)
  images/s, patches/s  images (and 7 x 7 patches) per second of wall time
  peak MiB        the process's peak resident memory (VmHWM), model and torch included (max
                  over the runs)
  extra peak MiB  that peak minus the resident memory just before the run (model loaded)
  disk MiB        bytes written (shards + sidecar, or the .npy)
  time vs store f16  the method's wall time over the float16 store's

Before reporting, the parent checks that the float32 store equals the hand-written array
exactly and the float16 store equals it within float16 rounding, and that every store verifies.

    PYTHONPATH=python python benchmarks/bench_capture.py                 # 256 images, 1 thread, 3 runs
    PYTHONPATH=python python benchmarks/bench_capture.py --crops 4 --layers _blocks.15 --repeat 1  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine_info, peak_rss_kib, print_table, reset_peak_rss, write_json  # noqa: E402

METHODS = ("store_f16", "store_f32", "capture_only", "hook_list_npsave")
LABELS = {"store_f16": "edpairs store f16", "store_f32": "edpairs store f32", "capture_only": "edpairs capture",
          "hook_list_npsave": "hook + list + np.save"}


def _disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    if not os.path.isdir(path):
        return 0
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from torch.utils.data import DataLoader

    from edpairs import zoo

    model = zoo.efficientnet_lite0()
    ds = zoo.PhotoDataset(args.crops)
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False, num_workers=0)
    out = args.target
    before = reset_peak_rss()
    t0 = time.perf_counter()
    io_s = [0.0]
    if args.method in ("store_f16", "store_f32"):
        from edpairs import store as store_module
        from edpairs.store import extract

        def timed(fn):
            def wrapper(*a, **k):
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    io_s[0] += time.perf_counter() - t
            return wrapper

        # The store's own work: shard files (crc32, write, fsync, rename) and sidecar rewrites.
        store_module._write_shard_atomic = timed(store_module._write_shard_atomic)
        store_module._write_json_atomic = timed(store_module._write_json_atomic)
        store_module.model_fingerprint = timed(store_module.model_fingerprint)
        extract(model, args.layer, loader, out, images_per_shard=args.images_per_shard, batch_size=args.batch_size,
                dtype="float16" if args.method == "store_f16" else "float32", preprocessing=ds.preprocessing,
                model_name="efficientnet-lite0")
        n_images = len(ds)
    elif args.method == "capture_only":
        from edpairs.capture import iter_activations

        n_images = 0
        for act in iter_activations(model, args.layer, loader):
            n_images += act.values.shape[0]
    else:
        module = dict(model.named_modules())[args.layer]
        kept = []
        handle = module.register_forward_hook(lambda m, i, o: kept.append(o.detach().cpu()))
        with torch.no_grad():
            for images, _ in loader:
                model(images)
        handle.remove()
        acts = torch.cat(kept)                              # (N, C, 7, 7)
        rows = acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1]).numpy()  # (N * 49, C)
        t = time.perf_counter()
        np.save(out, rows)
        io_s[0] = time.perf_counter() - t
        n_images = acts.shape[0]
    wall = time.perf_counter() - t0
    peak = peak_rss_kib()
    print(json.dumps({"wall_s": wall, "io_s": io_s[0], "n_images": n_images, "peak_kib": peak, "before_kib": before,
                      "disk_bytes": _disk_bytes(out)}))


def run_method(args, method: str, layer: str, target: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--layer", layer,
           "--target", target, "--crops", str(args.crops), "--batch-size", str(args.batch_size),
           "--images-per-shard", str(args.images_per_shard), "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check(folder: str) -> dict:
    from edpairs.store import ActivationStore

    ref = np.load(os.path.join(folder, "hook_list_npsave.npy"))
    f32 = ActivationStore(os.path.join(folder, "store_f32"))
    f16 = ActivationStore(os.path.join(folder, "store_f16"))
    assert f32.verify() == [] and f16.verify() == []
    a32 = np.concatenate(list(f32.chunks()))
    a16 = np.concatenate(list(f16.chunks()))
    assert a32.shape == ref.shape and a16.shape == ref.shape, (a32.shape, a16.shape, ref.shape)
    exact = bool(np.array_equal(a32, ref))
    f16_err = float(np.abs(a16.astype(np.float32) - ref.astype(np.float16).astype(np.float32)).max())
    assert exact, "float32 store differs from the hand-written capture"
    assert f16_err == 0.0, f"float16 store differs from float16(capture) by {f16_err}"
    return {"f32_exact": exact, "f16_max_abs_diff_vs_rounded": f16_err, "rows": int(ref.shape[0]),
            "n_features": int(ref.shape[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", default="_blocks.15,_conv_head")
    p.add_argument("--crops", type=int, default=32, help="views per photo (8 photos)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images-per-shard", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="runs per method (fresh processes); the median is reported")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "cpu-2core-epyc", "capture.json"))
    p.add_argument("--scratch", default=None, help="folder for the stores (default: a temporary folder)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--layer", help=argparse.SUPPRESS)
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    results = {"machine": machine_info(), "config": {k: v for k, v in vars(args).items()
                                                     if k in ("layers", "crops", "batch_size", "images_per_shard",
                                                              "threads", "repeat")}, "layers": {}}
    rows = []
    for layer in args.layers.split(","):
        folder = tempfile.mkdtemp(prefix="bench_capture_", dir=args.scratch)
        try:
            runs = {m: [] for m in METHODS}
            for rep in range(args.repeat):  # interleaved, so load from elsewhere spreads over all methods
                where = folder if rep == args.repeat - 1 else os.path.join(folder, f"run{rep}")
                os.makedirs(where, exist_ok=True)
                for method in METHODS:
                    target = os.path.join(where, method + (".npy" if method == "hook_list_npsave" else ""))
                    runs[method].append(run_method(args, method, layer, target))
                if where != folder:
                    shutil.rmtree(where)
            per = {}
            for method in METHODS:
                walls = sorted(r["wall_s"] for r in runs[method])
                r = dict(runs[method][-1], wall_s=statistics.median(walls), wall_s_runs=walls,
                         io_s=statistics.median(x["io_s"] for x in runs[method]),
                         peak_kib=max(x["peak_kib"] for x in runs[method]),
                         before_kib=min(x["before_kib"] for x in runs[method]))
                r["images_per_s"] = r["n_images"] / r["wall_s"]
                r["patches_per_s"] = r["images_per_s"] * 49
                r["peak_mib"] = r["peak_kib"] / 1024
                r["extra_peak_mib"] = (r["peak_kib"] - r["before_kib"]) / 1024
                per[method] = r
            checks = check(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        base = per["store_f16"]["wall_s"]
        for method in METHODS:
            per[method]["time_vs_store_f16"] = per[method]["wall_s"] / base
        results["layers"][layer] = {"methods": per, "check": checks}
        for method in METHODS:
            r = per[method]
            rows.append({"layer": layer, "method": LABELS[method], "images": r["n_images"],
                         "wall s": f"{r['wall_s']:.2f}", "min s": f"{min(r['wall_s_runs']):.2f}",
                         "io s": f"{r['io_s']:.2f}" if method != "capture_only" else "-", "images/s": f"{r['images_per_s']:.1f}",
                         "patches/s": f"{r['patches_per_s']:.0f}", "peak MiB": f"{r['peak_mib']:.0f}",
                         "extra peak MiB": f"{r['extra_peak_mib']:.1f}",
                         "disk MiB": f"{r['disk_bytes'] / 2**20:.1f}" if method != "capture_only" else "-",
                         "time vs store f16": f"{r['time_vs_store_f16']:.2f}"})
    write_json(args.out, results)
    print(f"results: {args.out}")
    print_table(rows, ["layer", "method", "images", "wall s", "min s", "io s", "images/s", "patches/s", "peak MiB",
                       "extra peak MiB", "disk MiB", "time vs store f16"])
    for layer, res in results["layers"].items():
        m = res["methods"]
        print(f"{layer}: hand-written / store f16 time {m['hook_list_npsave']['wall_s'] / m['store_f16']['wall_s']:.2f}x, "
              f"extra peak memory {m['hook_list_npsave']['extra_peak_mib']:.0f} vs {m['store_f16']['extra_peak_mib']:.0f} MiB, "
              f"disk {m['hook_list_npsave']['disk_bytes'] / 2**20:.1f} vs {m['store_f16']['disk_bytes'] / 2**20:.1f} MiB; "
              f"checks {res['check']}")


if __name__ == "__main__":
    main()
