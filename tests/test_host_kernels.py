"""CUDA kernel code run on the host, where a GPU is not needed to check it: the owned-column
cluster sums of csrc/cuda/assign_sums.cuh (the tensor-core path's EDPAIRS_ASSIGN_SUMS=columns,
and the summing warps of the fused wgmma kernel), built as plain C++ by
tests/host/column_sums.cpp with the machine's C++ compiler and the CUDA toolkit's fp16 / bf16
headers. Skipped where either is missing."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _cuda_include():
    """The toolkit's include folder (cuda_fp16.h): CUDA_HOME / CUDA_PATH, nvcc's own report, or
    /usr/local/cuda."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            candidates += re.findall(r'INCLUDES="-I([^"]+?)"', out.stdout + out.stderr)
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append("/usr/local/cuda/include")
    for path in candidates:
        if os.path.exists(os.path.join(path, "cuda_fp16.h")):
            return path
    return None


@pytest.fixture(scope="module")
def column_sums(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    include = _cuda_include()
    if cxx is None or include is None:
        pytest.skip("needs a C++ compiler and the CUDA toolkit's headers")
    exe = str(tmp_path_factory.mktemp("host") / "column_sums")
    cmd = [cxx, "-std=c++17", "-O2", "-I", include, "-I", os.path.join(ROOT, "csrc", "include"),
           "-I", os.path.join(ROOT, "csrc", "cuda"), os.path.join(HERE, "host", "column_sums.cpp"), "-o", exe]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    return exe


# N, D, K, dtype, center, stride padding, resident blocks: ragged against the 32-lane slices
# (16-bit: 64 columns), the 16-row groups (16-bit: 8), the block partition and the runs of
# 1024 staged rows (the last two cases: blocks of 3750 and 3000 rows).
CASES = [
    (1, 1, 1, "f32", 0, 0, 132),
    (300, 5, 3, "f32", 1, 3, 5),
    (5000, 130, 40, "bf16", 1, 1, 16),
    (70_000, 33, 2, "f32", 0, 0, 132),
    (9000, 600, 7, "f16", 1, 0, 132),
    (20_000, 512, 64, "f32", 1, 0, 132),
    (100_000, 96, 20, "bf16", 0, 5, 264),
    (4097, 1100, 3, "f32", 0, 2, 7),
    (257, 64, 64, "f16", 1, 0, 1),
    (30_000, 40, 5, "f32", 1, 1, 8),
    (9000, 70, 9, "f16", 0, 0, 3),
]


@pytest.mark.parametrize("n,d,k,dtype,center,pad,resident", CASES)
def test_column_sums_on_the_host_match_float64(column_sums, n, d, k, dtype, center, pad, resident):
    run = subprocess.run([column_sums, str(n), str(d), str(k), dtype, str(center), str(pad), str(resident),
                          str(n + d + k)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


def test_column_sums_harness_refuses_bad_arguments(column_sums):
    run = subprocess.run([column_sums, "10", "4", "2", "f64", "0", "0", "1", "1"], capture_output=True, text=True)
    assert run.returncode == 2 and "DTYPE must be f32, f16 or bf16, got f64" in run.stderr
