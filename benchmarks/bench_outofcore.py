"""Out-of-core fit from an on-disk activation store, and scaling over processes.

1. Writes a store of N patches x D float16 (default 50,000,000 x 128 = 12.8 GB) drawn from a
   synthetic layer (DESIGN section 1: 32 concepts, 16 distractors, offset, noise) through
   ``edpairs.store.extract`` (an identity "model" whose layer output is the drawn maps), unless
   the store exists already.
2. Fits ``EDPairs`` on the store in a fresh process, with a checkpoint file, and reports wall
   time, passes over the data, patches/s per pass, peak RSS of that process (the store is
   memory-mapped shard by shard; the page cache is not the process's memory) and the mean
   |cos| of the fitted filters to the ideal ones.
3. Scaling: the same fit on the first ``--scaling-shards`` shards with 1 process x 1 thread,
   1 process x 2 threads, and 2 processes x 1 thread (torch.distributed gloo, each rank reading
   its own shards via ``edpairs.distributed.shard_store``), in patches/s per pass.

    python benchmarks/bench_outofcore.py                       # the full run (~25 min on 2 cores)
    python benchmarks/bench_outofcore.py --patches 2000000     # a quick one
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _common import write_json  # noqa: E402

GRID = (16, 16)  # patches per drawn "image"


def layer_params(D: int, seed: int = 0):
    import edpairs as edp

    layer = edp.synthetic.make_layer(n_images=64, n_features=D, n_concepts=32, n_distractors=16, grid=(1, 1),
                                     train_head=False, seed=seed)
    return layer.S, layer.distractors, layer.offset, layer.W


class Drawn:
    """Batches of drawn maps (n, D, 16, 16) float32, the same on every pass (seeded per batch)."""

    def __init__(self, n_images: int, D: int, batch: int = 256, seed: int = 0):
        self.n_images, self.D, self.batch, self.seed = n_images, D, batch, seed
        self.S, self.F, self.mu, _ = layer_params(D, seed)

    def __len__(self):
        return self.n_images

    def __iter__(self):
        import torch

        I, P = self.S.shape[0], GRID[0] * GRID[1]
        for start in range(0, self.n_images, self.batch):
            n = min(self.batch, self.n_images - start)
            rng = np.random.default_rng([self.seed, start])
            rows = n * P
            alpha = rng.uniform(0.0, 2.5, (rows, I)).astype(np.float32)
            which = rng.integers(0, I, rows)
            alpha[np.arange(rows), which] = rng.uniform(2.5, 5.0, rows)
            beta = rng.uniform(0.0, 5.0, (rows, self.F.shape[0])).astype(np.float32)
            x = alpha @ self.S.astype(np.float32) + beta @ self.F.astype(np.float32) + self.mu.astype(np.float32)
            x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(0.1)
            yield torch.from_numpy(x.reshape(n, GRID[0], GRID[1], self.D).transpose(0, 3, 1, 2).copy())


def build_store(path: str, n_patches: int, D: int, images_per_shard: int) -> dict:
    import torch

    import edpairs as edp

    n_images = -(-n_patches // (GRID[0] * GRID[1]))
    model = torch.nn.Sequential(torch.nn.Identity())
    t = time.perf_counter()
    store = edp.store.extract(model, "0", Drawn(n_images, D), path, images_per_shard=images_per_shard,
                              dtype="float16", preprocessing={"drawn": "bench_outofcore", "D": D},
                              model_name="identity", progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t
    size = sum(os.path.getsize(f) for f in store.shard_files)
    return {"patches": store.n_patches, "D": D, "bytes": size, "shards": len(store), "seconds": seconds}


FIT = r"""
import json, resource, sys, time, numpy as np, edpairs as edp
from edpairs.checkpoint import Checkpoint
path, n_shards, threads, out, ckpt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
edp.set_num_threads(threads)
store = edp.ActivationStore(path, verify=False)
source = store if n_shards <= 0 else edp.distributed.StoreShard(store, range(min(n_shards, len(store))))
saves = [0]
pairs = edp.EDPairs(32, n_init=1, max_iter=15, random_state=0, progress=False)
t = time.perf_counter()
pairs.fit(source, checkpoint=Checkpoint(ckpt, {}, on_save=lambda s, m: saves.__setitem__(0, saves[0] + 1)))
seconds = time.perf_counter() - t
json.dump({"seconds": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "n_samples": pairs.n_samples_, "saves": saves[0], "decoding": pairs.decoding_.tolist()}, open(out, "w"))
"""

DIST = r"""
import json, sys, time, torch.distributed as dist, edpairs as edp
rank, world, rdv, path, n_shards, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
edp.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + rdv, rank=rank, world_size=world)
store = edp.ActivationStore(path, verify=False)
mine = edp.distributed.StoreShard(store, [s for s in edp.distributed.shard_range(n_shards, rank, world)])
dist.barrier()
t = time.perf_counter()
pairs = edp.EDPairs(32, n_init=1, max_iter=15, random_state=0, progress=False).fit(mine, process_group=True)
seconds = time.perf_counter() - t
json.dump({"seconds": seconds, "n_samples": pairs.n_samples_}, open(out, "w"))
dist.destroy_process_group()
"""


def passes(n_iter_saves: int) -> int:
    """Passes over the data of one fit: moments, the gathering of the seeding sample, one per
    clustering iteration (each saved but the last), the last iteration, thresholds, signal
    vectors."""
    return n_iter_saves + 5


def run_fit(path, n_shards, threads, tmp):
    out, ckpt = os.path.join(tmp, f"fit-{n_shards}-{threads}.json"), os.path.join(tmp, f"fit-{n_shards}-{threads}.ckpt")
    if os.path.exists(ckpt):
        os.unlink(ckpt)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    subprocess.run([sys.executable, "-c", FIT, path, str(n_shards), str(threads), out, ckpt], check=True, env=env)
    return json.load(open(out))


def run_dist(path, n_shards, tmp, world=2):
    rdv = os.path.join(tmp, "rdv")
    if os.path.exists(rdv):
        os.unlink(rdv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", DIST, str(r), str(world), rdv, path, str(n_shards),
                               os.path.join(tmp, f"dist-{r}.json")], env=env) for r in range(world)]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("a rank failed")
    return [json.load(open(os.path.join(tmp, f"dist-{r}.json"))) for r in range(world)]


def mean_abs_cos(decoding, W_true):
    from scipy.optimize import linear_sum_assignment

    A = np.asarray(decoding, np.float64)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    B = W_true / np.linalg.norm(W_true, axis=1, keepdims=True)
    C = np.abs(A @ B.T)
    r, c = linear_sum_assignment(-C)
    return float(C[r, c].mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, default=50_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--path", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "edpairs-ooc-store"))
    ap.add_argument("--images-per-shard", type=int, default=1024)
    ap.add_argument("--scaling-shards", type=int, default=16)
    ap.add_argument("--skip-full", action="store_true", help="only the scaling table")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "cpu-2core-epyc", "outofcore.json"))
    args = ap.parse_args()
    tmp = args.path + "-work"
    os.makedirs(tmp, exist_ok=True)

    built = build_store(args.path, args.patches, args.dim, args.images_per_shard)
    print(f"store: {built['patches']:,} patches x {args.dim} float16, {built['bytes'] / 1e9:.2f} GB in "
          f"{built['shards']} shards, written in {built['seconds']:.0f} s", flush=True)
    _, _, _, W_true = layer_params(args.dim)
    results = {"store": built, "machine": os.uname().nodename}
    if not args.skip_full:
        fit = run_fit(args.path, 0, 2, tmp)
        n_pass = passes(fit["saves"] - 2)  # saves: moments, each iteration, clustered
        rate = fit["n_samples"] * n_pass / fit["seconds"]
        results["full_fit"] = {"seconds": fit["seconds"], "passes": n_pass, "patches_per_s_per_pass": rate,
                               "peak_rss_bytes": fit["peak_rss_bytes"], "mean_abs_cos_w": mean_abs_cos(fit["decoding"], W_true)}
        print(f"full fit: {fit['seconds']:.0f} s, {n_pass} passes, {rate / 1e6:.1f} M patches/s per pass, "
              f"peak RSS {fit['peak_rss_bytes'] / 2**30:.2f} GiB (goal <= 3 GB), "
              f"mean |cos(w, w*)| {results['full_fit']['mean_abs_cos_w']:.3f}", flush=True)

    rows = []
    for label, threads in (("1 process x 1 thread", 1), ("1 process x 2 threads", 2)):
        fit = run_fit(args.path, args.scaling_shards, threads, tmp)
        rows.append((label, fit["n_samples"], fit["seconds"], passes(fit["saves"] - 2)))
    ranks = run_dist(args.path, args.scaling_shards, tmp)
    fit1 = run_fit(args.path, args.scaling_shards, 1, tmp)  # the pass count of the same fit
    rows.append(("2 processes x 1 thread (gloo)", ranks[0]["n_samples"], max(r["seconds"] for r in ranks),
                 passes(fit1["saves"] - 2)))
    base = rows[0][1] * rows[0][3] / rows[0][2]
    print(f"\nscaling ({args.scaling_shards} shards):")
    print(f"{'setup':32s} {'patches':>12s} {'s':>8s} {'passes':>7s} {'M patches/s/pass':>17s} {'speed-up':>9s}")
    results["scaling"] = []
    for label, n, s, p in rows:
        rate = n * p / s
        results["scaling"].append({"setup": label, "patches": n, "seconds": s, "passes": p, "patches_per_s_per_pass": rate})
        print(f"{label:32s} {n:12,d} {s:8.1f} {p:7d} {rate / 1e6:17.2f} {rate / base:8.2f}x")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
