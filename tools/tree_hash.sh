#!/usr/bin/env bash
# A short hash of the source a build and its benchmarks come from: every C++/CUDA, Python, CMake,
# TOML and shell file under csrc, python, benchmarks, tests, tools, cmake and the top folder
# (names and contents, in a fixed order; build outputs, results and caches left out). gpu_check.sh
# prints it in its log, so that a device run can be matched to a commit afterwards:
#   git checkout REV && tools/tree_hash.sh     (the same 16 hex digits for the same source)
set -euo pipefail
cd "$(dirname "$0")/.."
{
  find csrc python benchmarks tests tools cmake -type f \
    \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.cpp' -o -name '*.py' -o -name '*.sh' \
       -o -name '*.cmake' -o -name 'CMakeLists.txt' \) \
    -not -path '*/__pycache__/*' -not -path 'benchmarks/results/*' -not -path 'benchmarks/out/*' -print
  find . -maxdepth 1 -type f \( -name 'CMakeLists.txt' -o -name 'pyproject.toml' \) -printf '%P\n'
} | LC_ALL=C sort | while IFS= read -r f; do
  printf '%s\n' "$f"
  sha256sum < "$f"
done | sha256sum | cut -c1-16
