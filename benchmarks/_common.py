"""Shared helpers of the benchmark scripts: timing (wall clock on CPU, CUDA events on GPU,
medians after warm-up), peak-memory measurement in a fresh process, JSON output and tables."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List


@contextlib.contextmanager
def environment(env: Dict[str, str]):
    """The environment variables of `env` set inside the block, the previous values (or their
    absence) restored after it."""
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, repeat: int, warmup: int = 1) -> Dict[str, float]:
    """Median / min seconds of fn() over `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    if device.startswith("cuda"):
        import torch

        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak_rss() -> int:
    """Resets the kernel's peak-RSS mark of this process (Linux); returns the current RSS in KiB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kib("VmRSS")


def peak_rss_kib() -> int:
    return _status_kib("VmHWM")


def machine_info() -> Dict[str, object]:
    info: Dict[str, object] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def write_json(path: str, payload: dict) -> None:
    """Atomic write: a crash never leaves a truncated result file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


#: The issue's two k-means shapes (N, D, k) and the result files of a device run's float32
#: k-means rows (the step's, the k = 64 candidates', the float16-row candidates'), which the
#: readers of a run (decide.py, goals.py) merge.
BIG, SMALL = (1000000, 512, 1024), (1000000, 512, 64)
KMEANS_F32_FILES = ("kmeans_cuda_f32.json", "kmeans_cuda_k64.json", "kmeans_cuda_half.json")


def load_result(folder: str, name: str):
    """A device run's JSON file ``name`` under ``folder``, or None where it is missing or
    unreadable (a step that was skipped or cut short)."""
    try:
        with open(os.path.join(folder, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def test_group(folder: str, name: str):
    """(tests run, skipped, failed or errors, pytest's exit status as written, "?" if absent) of
    the CUDA test group ``name`` (its junit ``name``.xml and ``name``.rc under ``folder``), or
    None without a readable junit file. A group stopped by its time limit lists only what
    finished, so only exit status "0" means that it all passed."""
    import xml.etree.ElementTree as ET

    try:
        suite = ET.parse(os.path.join(folder, name + ".xml")).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, bad = int(suite.get("tests", 0)), int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
    except (OSError, ET.ParseError, AttributeError):
        return None
    try:
        with open(os.path.join(folder, name + ".rc")) as f:
            rc = f.read().strip()
    except OSError:
        rc = "?"
    return n, skipped, bad, rc


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def kmeans_fit_step(edp, X, C0, max_iter: int = 1):
    """The estimator's k-means step, as bench_kmeans.py's edpairs-fit (edpairs-fit5: max_iter=4)
    and profile_kernels.py's kmeans-fit time it: SphericalKMeans(k, init=C0, max_iter).fit(X),
    max_iter + 1 passes over X (max_iter Lloyd iterations and the final labelling, each with
    its centroid update), with what a user gets by default (the chunks ChunkSource picks, the
    first pass's finiteness check) and TF32 products (the default precision set for the call
    only)."""

    def step():
        before = edp.ops.DEFAULT_PRECISION
        edp.ops.DEFAULT_PRECISION = "tf32"
        try:
            return edp.SphericalKMeans(C0.shape[0], init=C0, max_iter=max_iter, tol=0, progress=False).fit(X)
        finally:
            edp.ops.DEFAULT_PRECISION = before

    return step
