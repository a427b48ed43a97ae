#!/usr/bin/env bash
# Do the CUDA sources compile to the same machine code at BASE as in the working tree?
#
#   tools/same_machine_code.sh BASE        (a git revision; needs nvcc, no GPU)
#
# For changes to kernels that a GPU has timed (refactors, shared helpers): byte-identical
# cubins mean the timings of benchmarks/results still describe the code. Each csrc/cuda/*.cu is
# compiled as CMakeLists.txt builds it (the main library for sm_80 and sm_90 with
# EDPAIRS_HAVE_WGMMA=1, the files of edpairs_cuda_sm90a for sm_90a; -O3 -DNDEBUG, C++17,
# --expt-relaxed-constexpr) but without -lineinfo: line tables move with every edit, and the
# instructions are what is compared. Both trees are compiled from the same folder (nvcc names
# anonymous namespaces after the file's path). One line per file and architecture: "same",
# "DIFFERS", "only at BASE" or "only here"; exit status 1 if any differs or stands on one side
# only, 2 on bad input or a failed compile.
set -euo pipefail

base=${1:-}
if [ -z "$base" ] || [ $# -ne 1 ]; then
  echo "usage: tools/same_machine_code.sh BASE (a git revision)" >&2
  exit 2
fi
top=$(git rev-parse --show-toplevel)
cd "$top"
if ! git rev-parse --verify -q "$base^{commit}" >/dev/null; then
  echo "same_machine_code: '$base' is not a revision of this repository" >&2
  exit 2
fi
command -v nvcc >/dev/null || { echo "same_machine_code: nvcc is not on PATH" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The sm_90a library's files, from CMakeLists.txt (the same names at both revisions).
sm90a=" $(sed -n '/add_library(edpairs_cuda_sm90a/,/)/p' CMakeLists.txt | grep -o 'csrc/cuda/[A-Za-z0-9_]*\.cu' | tr '\n' ' ')"

compile() {  # compile SIDE: every .cu of $work/tree/csrc/cuda into $work/SIDE/<file>.<arch>.cubin
  local side=$1 f name arch defs
  mkdir -p "$work/$side"
  for f in "$work"/tree/csrc/cuda/*.cu; do
    name=$(basename "$f")
    if [[ "$sm90a" == *" csrc/cuda/$name "* ]]; then
      set -- sm_90a
      defs=""
    else
      set -- sm_80 sm_90
      defs="-DEDPAIRS_HAVE_WGMMA=1"
    fi
    for arch in "$@"; do
      # (no trailing blank: xargs -L would join the next line to it)
      echo "$arch $f $work/$side/$name.$arch.cubin${defs:+ $defs}"
    done
  done | xargs -P "$(nproc)" -L 1 sh -c \
    'nvcc -std=c++17 -O3 -DNDEBUG --expt-relaxed-constexpr -cubin -arch=$0 $3 -I'"$work"'/tree/csrc/include \
       -I'"$work"'/tree/csrc/cuda -w "$1" -o "$2" 2>"$2.log" || { echo "compile failed: $1 ($0):"; cat "$2.log"; exit 255; }' \
    || { echo "same_machine_code: a compile failed at $side" >&2; exit 2; }
}

mkdir -p "$work/tree"
git archive "$base" csrc | tar -x -C "$work/tree"
compile base
rm -rf "$work/tree/csrc"
cp -r csrc "$work/tree/csrc"
compile here

status=0
for f in $( (cd "$work/base" && ls -- *.cubin; cd "$work/here" && ls -- *.cubin) | sort -u); do
  if [ ! -f "$work/here/$f" ]; then
    echo "only at $base: ${f%.cubin}"; status=1
  elif [ ! -f "$work/base/$f" ]; then
    echo "only here:     ${f%.cubin}"; status=1
  elif cmp -s "$work/base/$f" "$work/here/$f"; then
    echo "same:          ${f%.cubin}"
  else
    echo "DIFFERS:       ${f%.cubin}"; status=1
  fi
done
exit $status
