"""Where a step's GPU time goes: every kernel, copy and fill of one call, timed by the CUDA
profiler (torch.profiler, CUPTI), summed per name and divided by the steps profiled.

    python benchmarks/profile_kernels.py --cases kmeans:1000000,512,64 moments:1000000,512
    python benchmarks/profile_kernels.py --cases "kmeans:1000000,512,64:EDPAIRS_ASSIGN_SUMS=fused"

A case is OP:SIZE[:KEY=VALUE;KEY=VALUE...] (environment knobs set for that case only). OP:
  kmeans / kmeans-f32   ops.spherical_kmeans_step, TF32 / exact float32 products (SIZE N,D,k)
  labels                ops.assign without the sums, TF32 (N,D,k)
  torch-kmeans          the torch loop of bench_kmeans (normalise, matmul, argmax, index_add), TF32
  kmeans-fit            SphericalKMeans(k, init=C, max_iter=1).fit(X), TF32: two passes (N,D,k)
  moments / moments-f32 ops.moments, TF32 / exact (N,D)
  signal / signal-f32   ops.signal_moments, TF32 / exact (N,D,I)

The table gives, per case, the wall time of a step (CUDA events), the sum of its device
activities and the difference ("idle": launch gaps, host work, synchronisation; negative where
two streams overlap, as with EDPAIRS_ASSIGN_OVERLAP), then each kernel's calls and microseconds
per step and its share of the device time, and the host functions of one more step by their
own time (cProfile; on a GPU the call that waits for the device holds the wait: HOST_TOP of
them, "host" in the JSON). On a CPU there are no device activities; the script then reports the
wall time and the host functions only (a smoke run of its plumbing).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, kmeans_fit_step, machine_info, sync, time_fn, write_json  # noqa: E402

#: op -> number of size fields
OPS = {"kmeans": 3, "kmeans-f32": 3, "labels": 3, "torch-kmeans": 3, "kmeans-fit": 3, "moments": 2, "moments-f32": 2,
       "signal": 3, "signal-f32": 3}
KMEANS_OPS = ("kmeans", "kmeans-f32", "labels", "torch-kmeans", "kmeans-fit")


def parse_case(text: str):
    """'op:N,D[,k][:K=V;K=V]' -> (op, sizes, env); ValueError naming what was expected."""
    parts = text.split(":", 2)
    if len(parts) < 2 or parts[0] not in OPS:
        raise ValueError(f"a case is OP:SIZE[:KEY=VALUE;...] with OP one of {sorted(OPS)}, got {text!r}")
    op = parts[0]
    try:
        sizes = tuple(int(v) for v in parts[1].split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != OPS[op] or min(sizes) < 1:
        names = "N,D,k" if op in KMEANS_OPS else ("N,D" if OPS[op] == 2 else "N,D,I")
        raise ValueError(f"case {text!r}: {op} takes SIZE {names} (positive integers), got {parts[1]!r}")
    env: Dict[str, str] = {}
    for item in (parts[2].split(";") if len(parts) == 3 and parts[2] else []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"case {text!r}: knobs are KEY=VALUE separated by ';', got {item!r}")
        env[key] = value
    return op, sizes, env


def make_step(op: str, sizes, device: str):
    """The step to profile, on data made on `device`."""
    import torch
    import torch.nn.functional as F

    import edpairs as edp

    gen = torch.Generator(device=device).manual_seed(0)  # on the device: no 2 GB host copy per case
    randn = lambda *shape: torch.randn(*shape, device=device, generator=gen)  # noqa: E731
    N, D = sizes[0], sizes[1]
    X = randn(N, D)
    tf32 = not op.endswith("-f32")
    precision = "tf32" if tf32 else "float32"
    if op in KMEANS_OPS:
        C = randn(sizes[2], D)
        if op == "kmeans-fit":
            return kmeans_fit_step(edp, X, C.cpu().numpy())
        if op == "labels":
            return lambda: edp.ops.assign(X, C, accumulate=False, check_finite=False, precision=precision)
        if op == "torch-kmeans":
            torch.backends.cuda.matmul.allow_tf32 = True

            def step():
                Xn, Cn = F.normalize(X, dim=1), F.normalize(C, dim=1)
                labels = (Xn @ Cn.T).argmax(1)
                sums = torch.zeros_like(Cn).index_add_(0, labels, Xn)
                return F.normalize(sums, dim=1), torch.bincount(labels, minlength=C.shape[0])

            return step
        return lambda: edp.ops.spherical_kmeans_step(X, C, check_finite=False, precision=precision)
    if op.startswith("moments"):
        return lambda: edp.ops.moments(X, check_finite=False, precision=precision)
    W = randn(D, sizes[2]) / D**0.5
    b = torch.zeros(sizes[2], device=device)
    return lambda: edp.ops.signal_moments(X, W, b, check_finite=False, precision=precision)


def short_name(name: str) -> str:
    """A kernel's demangled name without return type, namespaces and parameter list:
    'void edpairs::cuda_detail::(anonymous namespace)::assign_tc_kernel<float, true>(...)' ->
    'assign_tc_kernel<float, true>'."""
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    head = name[:cut].strip()
    if head.startswith("void "):
        head = head[5:]
    base, sep, args = head.partition("<")
    base = base.split("::")[-1]
    args = re.sub(r"[\w]+::|\(anonymous namespace\)::", "", args)
    return (base + sep + args).strip()[:120]


#: Host functions kept per case by host_profile (most time spent in the function itself).
HOST_TOP = 15


def host_profile(step, device: str, top: int = HOST_TOP) -> List[dict]:
    """The Python functions (and built-ins) of one step by the time spent in them, not in what
    they call (cProfile, the device waited for at the end): where a step's host time goes, and,
    on a GPU, which calls wait for the device (a copy to the host or a .tolist() holds the time
    the queued kernels still needed). Each: name (file:line(function) or the built-in), calls,
    self and cumulative seconds."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        step()
        sync(device)
    finally:
        prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, function) -> (calls, primitive calls, self s, cum s, callers)
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"name": f"{os.path.basename(f)}:{line}({fn})" if f != "~" else fn, "calls": int(nc),
             "self_s": float(tt), "cum_s": float(ct)} for (f, line, fn), (_, nc, tt, ct, _) in rows]


def profile_case(step, device: str, repeat: int):
    """Wall seconds per step (median of `repeat`) and {kernel: [calls, seconds]} per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    timing = time_fn(step, device, repeat=repeat, warmup=1)
    kernels: Dict[str, List[float]] = {}
    if not device.startswith("cuda"):
        return timing, kernels
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(repeat):
            step()
        sync(device)
    for e in prof.events():
        if e.device_type != DeviceType.CUDA:
            continue
        entry = kernels.setdefault(short_name(e.name), [0, 0.0])
        entry[0] += 1
        entry[1] += e.time_range.elapsed_us() * 1e-6
    return timing, {name: [calls / repeat, seconds / repeat] for name, (calls, seconds) in kernels.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda where available, else cpu")
    p.add_argument("--cases", nargs="+", default=["kmeans:1000000,512,1024", "kmeans:1000000,512,64",
                                                  "moments:1000000,512", "signal:1000000,512,256"])
    p.add_argument("--repeat", type=int, default=3, help="steps profiled (and timed) per case")
    p.add_argument("--json", default="benchmarks/out/kernel_profile_{device}.json")
    p.add_argument("--run-only", action="store_true",
                   help="run each case's step once, with no timing, profiler or JSON: for an outside profiler "
                        "(ncu) to watch")
    args = p.parse_args(argv)
    try:
        cases = [parse_case(c) for c in args.cases]
    except ValueError as exc:
        p.error(str(exc))
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = args.json.format(device=device.replace(":", ""))
    results = []

    def save():  # after every case: a later case that hangs or faults loses none of the earlier ones
        write_json(path, {"benchmark": "kernel_profile", "device": device, "repeat": args.repeat,
                          "machine": machine_info(), "results": results})

    for text, (op, sizes, env) in zip(args.cases, cases):
        try:
            with environment(env):
                step = make_step(op, sizes, device)
                if args.run_only:
                    step()
                    sync(device)
                    print(f"{text}: ran")
                    continue
                timing, kernels = profile_case(step, device, args.repeat)
                host = host_profile(step, device)
        except Exception as exc:  # noqa: BLE001 - one failing case must not lose the others
            print(f"{text}: failed: {type(exc).__name__}: {exc}")
            results.append({"case": text, "error": f"{type(exc).__name__}: {exc}"})
            if not args.run_only:
                save()
            continue
        finally:
            step = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        busy = sum(s for _, s in kernels.values())
        wall = timing["median_s"]
        results.append({"case": text, "op": op, "size": list(sizes), "env": env, "wall_s": wall,
                        "device_busy_s": busy,
                        "kernels": [{"name": n, "calls": c, "seconds": s}
                                    for n, (c, s) in sorted(kernels.items(), key=lambda kv: -kv[1][1])],
                        "host": host})
        print(f"\n{text}: step {wall * 1e3:.3f} ms (CUDA events), device busy {busy * 1e3:.3f} ms, "
              f"idle {(wall - busy) * 1e3:.3f} ms" if kernels else f"\n{text}: step {wall * 1e3:.3f} ms (no device activities)")
        for row in results[-1]["kernels"]:
            print(f"  {row['seconds'] * 1e6:10.1f} us  {100 * row['seconds'] / busy:5.1f}%  x{row['calls']:<5g} {row['name']}")
        print("  host, one step (cProfile; self time, the device waited for inside the call that waits):")
        for row in host:
            print(f"  {row['self_s'] * 1e6:10.1f} us self {row['cum_s'] * 1e6:10.1f} us cum  x{row['calls']:<5d} {row['name']}")
        save()
    if args.run_only:
        return 1 if results else 0
    print(f"\nwrote {path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
