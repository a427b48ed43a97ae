"""The goals of issue 6 read from a device run's result files: what benchmarks/gpu_check.sh
prints last (one run), and the headline goals of every committed run side by side (--history),
as a table and a figure.

    python3 benchmarks/goals.py RUN_DIR
    python3 benchmarks/goals.py --history [--results benchmarks/results] [--plot goals.png]

One run: the ceilings, the k-means, faiss and moments rows, the kernel profile, the whole fits,
the route's pieces, the CUDA test groups, then every goal reading with its measured value, the
goal and whether it is met. History: one row per goal, one column per run folder
(``<card>/`` is that card's first run, ``<card>/runN`` the later ones), the default methods'
readings only ("-" where a run has no such file or row). Nothing here needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BIG, KMEANS_F32_FILES, SMALL  # noqa: E402
from _common import load_result as _load  # noqa: E402
from _common import test_group  # noqa: E402

KMEANS_FLOPS = 2.0 * BIG[0] * BIG[1] * BIG[2]
X_BYTES = 4.0 * SMALL[0] * SMALL[1]  # one read of the float32 rows at N = 1M, D = 512
TEST_GROUPS = (("cuda_tests_new", "new kernels"), ("cuda_tests", "the rest"))


def _kmeans(folder: str, name: str) -> dict:
    r = _load(folder, name) or {}
    return {(tuple(x["size"]), x["method"]): x for x in r.get("results", [])}


def _ratio(rate, ceiling):
    """rate / ceiling, or None where the run did not measure the ceiling (no reading then)."""
    return rate / ceiling if ceiling else None


def _t(table, size, method):
    return (table.get((size, method)) or {}).get("median_s")


def read_run(folder: str) -> dict:
    """A run's result files, read once: what summary() and goal_rows() take."""
    c = _load(folder, "ceilings.json") or {}
    f32 = {}
    for name in KMEANS_F32_FILES:
        f32.update(_kmeans(folder, name))
    tests = {name: test_group(folder, name) for name, _ in TEST_GROUPS}
    return {"folder": folder, "ceilings": c, "same": c.get("same_shape") or {}, "f32": f32,
            "b16": _kmeans(folder, "kmeans_cuda_bf16.json"), "faiss": _kmeans(folder, "kmeans_cuda_faiss.json"),
            "moments": _load(folder, "moments_cuda.json") or {},
            "tests": {name: group for name, group in tests.items() if group is not None},
            "stream": {x["method"]: x for x in (_load(folder, "stream_cuda.json") or {}).get("results", [])}}


def goal_rows(run: dict) -> list:
    """(reading, measured value, goal) of every goal reading the run's files allow, in the order
    gpu_check.sh prints them: k-means k = 1024 (float32, then bfloat16), k = 64, faiss, the
    moments, the streamed passes, the CUDA test groups."""
    c, same, f32, b16 = run["ceilings"], run["same"], run["f32"], run["b16"]
    copy, tf32, bf16, fp32 = (c.get(key, 0) for key in ("copy_GBps", "gemm_tf32_TFLOPs", "gemm_bf16_TFLOPs",
                                                        "gemm_fp32_TFLOPs"))
    goals = []

    def add(name, value, goal):
        if value is not None:
            goals.append((name, value, goal))

    tt = _t(f32, BIG, "torch")
    for method in ("edpairs", "edpairs-fit", "edpairs-fit5", "edpairs-half", "edpairs-half-copies",
                   "edpairs-tf32-rows", "edpairs-gemm", "edpairs-r16384", "edpairs-kernel", "edpairs-wgmma",
                   "edpairs-wgmma-tma"):
        e = _t(f32, BIG, method)
        if e and tt:
            add(f"k=1024 f32 {method}: torch TF32 / edpairs TF32 time", tt / e, 2.0)
            add(f"k=1024 f32 {method}: rate / TF32 GEMM rate", _ratio(KMEANS_FLOPS / e / 1e12, tf32), 0.6)
            add(f"k=1024 f32 {method}: rate / same-shape TF32 GEMM rate",
                _ratio(KMEANS_FLOPS / e / 1e12, same.get("kmeans_tf32_TFLOPs", 0)), 0.6)
    tt = _t(b16, BIG, "torch")
    for method in ("edpairs", "edpairs-kernel", "edpairs-wgmma"):
        e = _t(b16, BIG, method)
        if e and tt:
            add(f"k=1024 bf16 {method}: torch bf16 / edpairs time", tt / e, 1.5)
    for method in ("edpairs", "edpairs-fit", "edpairs-fit5", "edpairs-fit5-half", "edpairs-wgmma-columns", "edpairs-fused-wgmma",
                   "edpairs-mma-sorted", "edpairs-gemm", "edpairs-kernel", "edpairs-fused", "edpairs-wgmma"):
        e = _t(f32, SMALL, method)
        if e:
            add(f"k=64 f32 {method}: one read of X (GB/s) / copy GB/s", _ratio(X_BYTES / e / 1e9, copy), 0.7)
    for method in ("faiss", "faiss-search"):
        for ours in ("edpairs", "edpairs-f32"):  # TF32 (the default); exact float32 like faiss's SGEMM
            e, f = _t(run["faiss"], BIG, ours), _t(run["faiss"], BIG, method)
            if e and f:
                add(f"k=1024 f32 {method} / {ours} time, same call (goal 5)", f / e, 3.0)
    e = _t(b16, SMALL, "edpairs")
    if e:
        add("k=64 bf16 edpairs: one read of X / copy (information)", _ratio(X_BYTES / 2 / e / 1e9, copy), 0.7)
    for x in run["moments"].get("results", []):
        if not (x.get("method", "").startswith("edpairs") and "median_s" in x):
            continue
        n, d, i = x["size"]
        flops = n * d * d if x["op"] == "moments" else 2.0 * n * d * i * 3
        rate = flops / x["median_s"] / 1e12
        # The same-shape products: cuBLAS's X^T X (both triangles, 2 N D^2) for the moments, X W
        # and A^T X for the signal moments.
        kind = "gram" if x["op"] == "moments" else "signal"
        if "tf32" in x["method"]:
            add(f"{x['op']}: {x['method']} rate / TF32 GEMM rate", _ratio(rate, tf32), 0.5)
            add(f"{x['op']}: {x['method']} rate / same-shape TF32",
                _ratio(rate, same.get(f"{kind}_tf32_TFLOPs", 0)), 0.5)
        if "-half" in x["method"]:  # float16 operands: also against the 16-bit rates
            add(f"{x['op']}: {x['method']} rate / bf16 GEMM rate", _ratio(rate, bf16), 0.5)
            if x["op"] == "moments":
                add(f"{x['op']}: {x['method']} rate / same-shape fp16",
                    _ratio(rate, same.get("gram_fp16_TFLOPs", 0)), 0.5)
        elif "tf32" not in x["method"]:  # exact float32 products
            add(f"{x['op']}: {x['method']} rate / fp32 GEMM rate (exact)", _ratio(rate, fp32), 0.5)
            add(f"{x['op']}: {x['method']} rate / same-shape fp32",
                _ratio(rate, same.get(f"{kind}_fp32_TFLOPs", 0)), 0.5)
    for method in ("moments DeviceChunks", "k-means pass DeviceChunks", "moments DeviceChunks registered",
                   "k-means pass DeviceChunks registered"):
        if method in run["stream"]:
            add(f"streamed {method.replace(' DeviceChunks', '')}: host GB/s / pinned H2D GB/s",
                run["stream"][method]["ratio_to_ceiling"], 0.8)
    for name, what in TEST_GROUPS:
        if name in run["tests"]:
            n, _, bad, rc = run["tests"][name]
            add(f"CUDA tests ({what}): all pass (1 = yes)", float(bad == 0 and n > 0 and rc == "0"), 1.0)
    return goals


def summary(folder: str) -> None:
    """gpu_check.sh's last table: the run's rows, then every goal reading."""
    run = read_run(folder)
    c, same, f32, b16 = run["ceilings"], run["same"], run["f32"], run["b16"]
    print(f"device: {(c.get('machine') or {}).get('gpu', '?')}")
    print(f"ceilings: copy {c.get('copy_GBps', 0):.0f} GB/s, tf32 {c.get('gemm_tf32_TFLOPs', 0):.0f}, "
          f"bf16 {c.get('gemm_bf16_TFLOPs', 0):.0f}, fp32 {c.get('gemm_fp32_TFLOPs', 0):.0f} TFLOP/s")
    # cuBLAS at the benchmarks' own shapes (gpu_ceilings.py): goal 2 names "the TF32 GEMM rate for
    # the same shape"; the square-product peak above is the stricter reading, and both are printed.
    if same:
        print("same-shape cuBLAS: " + ", ".join(f"{key[:-7]} {v:.0f}" for key, v in same.items() if key.endswith("_TFLOPs"))
              + f" TFLOP/s (k-means {same.get('kmeans_shape')}, moments {same.get('moments_shape')})")
    print(f"{'file':10s} {'N,D,k':18s} {'method':20s} {'ms':>8s} {'TFLOP/s':>8s} {'labels ok':>9s} {'ok@2e-3':>8s} "
          f"{'sums err':>9s}")
    for tag, table in (("f32", f32), ("bf16", b16)):
        for (size, method), x in sorted(table.items()):
            if "median_s" not in x:
                print(f"{tag:10s} {str(size):18s} {method:20s} {str(x.get('skipped') or x.get('error'))[:60]}")
                continue
            n, d, k = size
            tfl = 2 * n * d * k / x["median_s"] / 1e12
            print(f"{tag:10s} {','.join(map(str, size)):18s} {method:20s} {x['median_s'] * 1e3:8.2f} {tfl:8.1f} "
                  f"{x.get('label_agreement', float('nan')):9.4f} {x.get('label_agreement_2e-3', float('nan')):8.4f} "
                  f"{x.get('sums_rel_err', float('nan')):9.1e}")
    for tag, table in (("f32", f32), ("bf16", b16)):
        for size in sorted({s for s, _ in table}):
            whole, labels = _t(table, size, "edpairs"), _t(table, size, "edpairs-labels")
            if whole and labels:
                print(f"{tag} {size}: labelling {labels * 1e3:.2f} ms, cluster sums {(whole - labels) * 1e3:.2f} ms "
                      f"(edpairs - edpairs-labels)")
    for (size, method), x in sorted(run["faiss"].items()):
        note = f"{x['median_s'] * 1e3:8.2f} ms, labels ok {x.get('label_agreement', float('nan')):.4f}" if "median_s" in x \
            else str(x.get("skipped") or x.get("error"))[:80]
        print(f"faiss step {','.join(map(str, size)):18s} {method:14s} {note}"
              + (f" (faiss {x['faiss_version']}; one call of one iteration {x['one_call_s'] * 1e3:.0f} ms)"
                 if "one_call_s" in x else ""))
    print(f"{'op':16s} {'N,D,I':18s} {'method':22s} {'ms':>8s} {'rel err':>9s}")
    for x in run["moments"].get("results", []):
        if "median_s" in x:
            print(f"{x['op']:16s} {','.join(map(str, x['size'])):18s} {x['method']:22s} {x['median_s'] * 1e3:8.2f} "
                  f"{x.get('rel_err_sample', float('nan')):9.1e}")
    for x in (_load(folder, "kernel_profile.json") or {}).get("results", []):
        if "kernels" in x:
            top = ", ".join(f"{k['name'][:40]} {k['seconds'] * 1e3:.2f}" for k in x["kernels"][:4])
            print(f"profile {x['case']:80s} step {x['wall_s'] * 1e3:7.2f} ms, busy {x['device_busy_s'] * 1e3:7.2f}: {top}")
            host = ", ".join(f"{h['name'][:50]} x{h['calls']} {h['self_s'] * 1e3:.2f}" for h in x.get("host", [])[:4])
            if host:
                print(f"        host (cProfile, ms of self time; a wait for the device counts in the call that waits): "
                      f"{host}")
    for method, x in ((_load(folder, "fit_cuda.json") or {}).get("results") or {}).items():
        print(f"whole fit on the GPU, {method}: "
              + (f"{x['wall_s']:.2f} s, {x.get('n_iter')} iterations, IoU {x.get('mean_iou', 0):.3f}"
                 if "wall_s" in x else str(x.get("error"))))
    for x in (_load(folder, "route_parts.json") or {}).get("results", []):
        print(f"{x['group']:14s} {x['piece']:40s} {x['ms']:8.3f} ms  {x.get('note', '')}")
    for name, what in TEST_GROUPS:
        if name not in run["tests"]:
            print(f"CUDA tests ({what}): no {name}.xml")
            continue
        n, skipped, bad, rc = run["tests"][name]
        print(f"CUDA tests ({what}): {n} run, {skipped} skipped, {bad} failed or errors, pytest exit status {rc}")
    print()
    print(f"{'goal (issue 6)':62s} {'measured':>9s} {'goal':>6s}  met")
    for name, value, goal in goal_rows(run):
        print(f"{name:62s} {value:9.2f} {goal:6.2f}  {'yes' if value >= goal else 'NO'}")


# ---- the history of the committed runs ----------------------------------------------------
#: The headline reading of each goal (the default methods' rows), with its short name.
HEADLINES = (
    ("1 CUDA tests pass (new kernels)", "CUDA tests (new kernels): all pass (1 = yes)"),
    ("1 CUDA tests pass (the rest)", "CUDA tests (the rest): all pass (1 = yes)"),
    ("2 k=1024 f32 step: torch / edpairs", "k=1024 f32 edpairs: torch TF32 / edpairs TF32 time"),
    ("2 k=1024 f32 step: / same-shape TF32 GEMM", "k=1024 f32 edpairs: rate / same-shape TF32 GEMM rate"),
    ("2 k=1024 f32 fit, 2 passes: torch / edpairs", "k=1024 f32 edpairs-fit: torch TF32 / edpairs TF32 time"),
    ("2 k=1024 f32 fit, 5 passes: torch / edpairs", "k=1024 f32 edpairs-fit5: torch TF32 / edpairs TF32 time"),
    ("2 k=1024 bf16: torch / edpairs", "k=1024 bf16 edpairs: torch bf16 / edpairs time"),
    ("3 k=64 f32: one read of X / copy", "k=64 f32 edpairs: one read of X (GB/s) / copy GB/s"),
    ("4 moments TF32: / same-shape TF32", "moments: edpairs-tf32 rate / same-shape TF32"),
    ("4 moments exact: / fp32 GEMM", "moments: edpairs rate / fp32 GEMM rate (exact)"),
    ("4 signal TF32: / same-shape TF32", "signal_moments: edpairs-tf32 rate / same-shape TF32"),
    ("5 faiss / edpairs", "k=1024 f32 faiss / edpairs time, same call (goal 5)"),
)


#: Readings a later session found misread in a run's files: shown as "x" with the reason, not
#: drawn.
MISREAD = {
    ("h200/run6a", "5 faiss / edpairs"): "faiss's time was read 1000x short (the shim divided its seconds by 1000 "
                                         "twice; fixed before run 6b)",
}


def run_folders(results: str) -> list:
    """(label, folder) of every run under ``results`` with a ceilings.json, in run order: a
    card's own folder is its run 1, runN[a-z] the later ones (card, then name, within a number)."""
    found = []
    for card in sorted(os.listdir(results)):
        top = os.path.join(results, card)
        if not os.path.isdir(top):
            continue
        for name in [""] + sorted(os.listdir(top)):
            folder = os.path.join(top, name) if name else top
            m = re.fullmatch(r"run(\d+)([a-z]?)", name)
            if (name and not m) or not os.path.isfile(os.path.join(folder, "ceilings.json")):
                continue
            number = int(m.group(1)) if m else 1
            found.append(((number, m.group(2) if m else "", card), f"{card}/{name}" if name else card, folder))
    return [(label, folder) for _, label, folder in sorted(found)]


def history(results: str) -> tuple:
    """(labels of the runs, {headline: (goal, [value per run: None where not read, "x" where misread])})."""
    runs = run_folders(results)
    table = {short: [None, [None] * len(runs)] for short, _ in HEADLINES}
    for j, (_, folder) in enumerate(runs):
        rows = {name: (value, goal) for name, value, goal in goal_rows(read_run(folder))}
        for short, name in HEADLINES:
            if name in rows:
                table[short][0] = rows[name][1]
                if (runs[j][0], short) not in MISREAD:
                    table[short][1][j] = rows[name][0]
                else:
                    table[short][1][j] = "x"
    return [label for label, _ in runs], {short: tuple(v) for short, v in table.items()}


def _cell(v) -> str:
    return "-" if v is None else v if isinstance(v, str) else f"{v:.2f}"


def print_history(labels: list, table: dict) -> None:
    width = max(8, *(len(label) for label in labels))
    name = max(len(short) for short in table)
    print(f"{'goal (issue 6)':{name}s} {'goal':>5s} " + " ".join(f"{label:>{width}s}" for label in labels))
    for short, (goal, values) in table.items():
        print(f"{short:{name}s} {_cell(goal):>5s} " + " ".join(f"{_cell(v):>{width}s}" for v in values))
    notes = [(label, short, why) for (label, short), why in MISREAD.items() if label in labels]
    for label, short, why in notes:
        print(f"x: {label}, {short}: {why}")


def plot_history(labels: list, table: dict, path: str) -> None:
    """One panel per headline: the measured value per run (filled where the goal is met), the
    goal as a dashed line. Written atomically (a temporary file renamed over ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [(short, goal, [v if isinstance(v, float) else None for v in values])
             for short, (goal, values) in table.items() if any(isinstance(v, float) for v in values)]
    if not shown:
        raise SystemExit("no run has any of the headline readings: nothing to plot")
    cols = 3
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False)
    xs = range(len(labels))
    for ax, (short, goal, values) in zip(axes.flat, shown):
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        ax.plot([x for x, _ in pts], [v for _, v in pts], color="0.6", lw=1, zorder=1)
        for x, v in pts:
            met = goal is not None and v >= goal
            ax.scatter([x], [v], s=28, zorder=2, color="tab:green" if met else "white", edgecolors="tab:green" if met
                       else "tab:red")
        if goal is not None:
            ax.axhline(goal, color="tab:blue", ls="--", lw=1)
        ax.set_title(short, fontsize=9)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=60, fontsize=7, ha="right")
        ax.tick_params(axis="y", labelsize=7)
        top = max([v for _, v in pts] + ([goal] if goal is not None else []))
        ax.set_ylim(0, 1.12 * top if top > 0 else 1)
        ax.set_xlim(-0.5, len(labels) - 0.5)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("issue 6 across the device runs (dashed: the goal; filled: met)", fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", help="one run's result folder (gpu_check.sh's summary)")
    ap.add_argument("--history", action="store_true", help="every committed run side by side")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--plot", help="with --history: also draw the table into this PNG")
    args = ap.parse_args(argv)
    if args.history == (args.run is not None):
        ap.error("give one run's folder or --history")
    if args.plot and not args.history:
        ap.error("--plot goes with --history")
    if args.run is not None:
        if not os.path.isdir(args.run):
            ap.error(f"no folder {args.run!r}")
        summary(args.run)
        return 0
    if not os.path.isdir(args.results):
        ap.error(f"no results folder {args.results!r}")
    labels, table = history(args.results)
    if not labels:
        ap.error(f"no run (a folder with ceilings.json) under {args.results!r}")
    print_history(labels, table)
    if args.plot:
        plot_history(labels, table, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
