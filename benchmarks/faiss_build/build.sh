#!/usr/bin/env bash
# Builds faiss's GPU library for Hopper (sm_90) and the small C interface that bench_kmeans.py
# loads with ctypes (edpairs_faiss.cpp), into build/faiss/lib, for carrying to a device machine:
#   bash benchmarks/faiss_build/build.sh   # about 15 min on 2 cores, and ~480 MB of CUDA wheels fetched once
# then a device call with carry ["build/faiss"] runs bench_kmeans.py's faiss and faiss-search
# methods (gpu_check.sh does where build/faiss/lib/libedpairs_faiss.so exists).
#
# Why this and not a wheel: the device machines have no network and a call carries at most
# 64 MiB; PyPI's faiss GPU wheels are built for CUDA 12 (the devices have CUDA 13) and larger
# than that with their CUDA libraries. The source is faiss 1.7.3 as Debian 12 ships it (the
# newest faiss source this machine's registries serve), checked against its SHA-256 below;
# nothing of it is kept in this repository. One change to its files: C++17 in its top
# CMakeLists.txt (CUDA 13's Thrust and CUB refuse older dialects); cuBLAS is pointed to by
# CMake variables. cuBLAS's headers and link library and cuRAND's headers come from PyPI's
# CUDA 13 wheels (only for the build: on the device the library uses torch's cuBLAS and CUDA
# runtime, loaded by soname). BLAS/LAPACK (faiss links them; k-means on a GPU index does not
# call them): Debian's reference libblas/liblapack, copied beside the library with libgfortran,
# libquadmath and libgomp, so that the device needs nothing installed.
#
# Needs: nvcc (CUDA 13), cmake, ninja, g++, and the Debian packages libblas-dev liblapack-dev
# gfortran (`apt-get install -y libblas-dev liblapack-dev gfortran`). JOBS (default: all cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SRC=build/faiss-src
DEPS=build/faiss-deps
OUTDIR=build/faiss
FAISS_URL=http://deb.debian.org/debian/pool/main/f/faiss/faiss_1.7.3.orig.tar.gz
FAISS_SHA256=3e4fac26d8c9e9008ecea4ae5fc414c658998fce4ba75835058b1a71d3516002  # Debian bookworm's Sources index
CUBLAS=nvidia-cublas==13.0.2.14
CURAND=nvidia-curand==10.4.0.35
JOBS="${JOBS:-$(nproc)}"

for tool in nvcc cmake ninja g++ gfortran; do
  command -v "$tool" >/dev/null || { echo "build.sh: $tool is needed and not on PATH" >&2; exit 2; }
done
libdir=/usr/lib/x86_64-linux-gnu
for lib in libblas.so.3 liblapack.so.3; do
  [ -e "$libdir/$lib" ] || { echo "build.sh: $libdir/$lib missing: apt-get install -y libblas-dev liblapack-dev gfortran" >&2; exit 2; }
done

mkdir -p "$DEPS"
if [ ! -f "$DEPS/faiss.tar.gz" ]; then
  curl -fsSL -o "$DEPS/faiss.tar.gz.part" "$FAISS_URL"
  mv "$DEPS/faiss.tar.gz.part" "$DEPS/faiss.tar.gz"
fi
got=$(sha256sum "$DEPS/faiss.tar.gz" | cut -d' ' -f1)
[ "$got" = "$FAISS_SHA256" ] || { echo "build.sh: $FAISS_URL has SHA-256 $got, expected $FAISS_SHA256" >&2; exit 1; }

# cuBLAS (headers, link library) and cuRAND (headers: faiss's IcmEncoder.cu) from PyPI's CUDA 13
# wheels, into one folder; this machine's toolkit has neither.
CU=$ROOT/$DEPS/cuda
if [ ! -e "$CU/include/curand_kernel.h" ] || [ ! -e "$CU/lib/libcublas.so.13" ]; then
  rm -rf "$CU" "$DEPS/wheel" && mkdir -p "$DEPS/wheel" "$CU"
  python3 -m pip download --no-deps -q -d "$DEPS/wheel" "$CUBLAS" "$CURAND"
  python3 - "$DEPS/wheel" "$CU" <<'PY'
import glob, os, shutil, sys, zipfile
wheels, dest = sys.argv[1], sys.argv[2]
for whl in glob.glob(os.path.join(wheels, "*.whl")):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            part = name.split("/")
            if len(part) == 4 and part[:2] == ["nvidia", "cu13"] and part[2] in ("include", "lib") and part[3]:
                os.makedirs(os.path.join(dest, part[2]), exist_ok=True)
                with z.open(name) as src, open(os.path.join(dest, part[2], part[3]), "wb") as out:
                    shutil.copyfileobj(src, out)
PY
  rm -rf "$DEPS/wheel"
fi
ln -sf libcublas.so.13 "$CU/lib/libcublas.so"
ln -sf libcublasLt.so.13 "$CU/lib/libcublasLt.so"

# A fresh source tree unless this one was unpacked from the same tarball (then ninja rebuilds
# only what changed: a rerun after a late failure takes seconds).
if [ "$(cat "$SRC/.edpairs_source" 2>/dev/null)" != "$FAISS_SHA256" ]; then
  rm -rf "$SRC" && mkdir -p "$SRC"
  tar -xzf "$DEPS/faiss.tar.gz" -C "$SRC" --strip-components=1
  sed -i 's/set(CMAKE_CXX_STANDARD 11)/set(CMAKE_CXX_STANDARD 17)\nset(CMAKE_CUDA_STANDARD 17)/' "$SRC/CMakeLists.txt"
  grep -q "CMAKE_CUDA_STANDARD 17" "$SRC/CMakeLists.txt" || { echo "build.sh: the C++17 change did not apply" >&2; exit 1; }
  echo "$FAISS_SHA256" >"$SRC/.edpairs_source"
fi

cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DFAISS_ENABLE_GPU=ON -DFAISS_ENABLE_PYTHON=OFF -DFAISS_ENABLE_C_API=OFF -DBUILD_TESTING=OFF \
  -DBUILD_SHARED_LIBS=ON -DFAISS_OPT_LEVEL=generic -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
  -DCUDA_cublas_LIBRARY="$CU/lib/libcublas.so" -DCUDA_cublasLt_LIBRARY="$CU/lib/libcublasLt.so" \
  -DCMAKE_CXX_FLAGS="-I$CU/include" -DCMAKE_CUDA_FLAGS="-I$CU/include" -DBLA_VENDOR=Generic
ninja -C "$SRC/build" -j "$JOBS" faiss

rm -rf "$OUTDIR.tmp" && mkdir -p "$OUTDIR.tmp/lib"
cp -L "$SRC/build/faiss/libfaiss.so" "$OUTDIR.tmp/lib/"
# The toolkit's root as nvcc itself reports it (nvcc on PATH may be a wrapper script).
CUDA_ROOT=$(readlink -f "$(nvcc --dryrun -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)")
CUDART_DIR=$CUDA_ROOT/lib64
[ -e "$CUDART_DIR/libcudart.so.13" ] || { echo "build.sh: no libcudart.so.13 under $CUDART_DIR" >&2; exit 1; }
g++ -O2 -std=c++17 -shared -fPIC -o "$OUTDIR.tmp/lib/libedpairs_faiss.so" benchmarks/faiss_build/edpairs_faiss.cpp \
  -I"$SRC" -I"$CU/include" -I"$CUDA_ROOT/include" \
  -L"$OUTDIR.tmp/lib" -lfaiss -L"$CUDART_DIR" -lcudart -Wl,-rpath,'$ORIGIN'
for lib in libblas.so.3 liblapack.so.3 libgfortran.so.5 libquadmath.so.0 libgomp.so.1; do
  cp -L "$libdir/$lib" "$OUTDIR.tmp/lib/"
done
strip --strip-unneeded "$OUTDIR.tmp"/lib/*.so*
# For a check on a machine without a GPU (benchmarks/_faiss_gpu.py, device -1): the CUDA
# runtime and cuBLAS that this build linked against, loaded before the library.
printf '%s\n' "$CUDART_DIR/libcudart.so.13" "$CU/lib/libcublasLt.so.13" "$CU/lib/libcublas.so.13" >"$OUTDIR.tmp/lib/cuda_libs.txt"
rm -rf "$OUTDIR" && mv "$OUTDIR.tmp" "$OUTDIR"
du -sh "$OUTDIR"/lib/*
echo "faiss GPU library in $OUTDIR/lib ($(du -sm "$OUTDIR" | cut -f1) MiB; a device call carries at most 64 MiB)"
