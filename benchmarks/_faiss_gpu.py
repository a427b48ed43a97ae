"""faiss's GPU k-means and GPU flat search through ctypes, for machines where faiss's Python
module with GPU support cannot be installed (the device machines: no network, and PyPI's faiss
GPU wheels are larger than what a call can carry and built for CUDA 12).

The library is ``build/faiss/lib/libedpairs_faiss.so`` (made by ``benchmarks/faiss_build/build.sh``:
faiss's own C++ library and the small C interface of ``benchmarks/faiss_build/edpairs_faiss.cpp``),
or the file named by ``EDPAIRS_FAISS_LIB``. It links cuBLAS and the CUDA runtime by their
sonames: import torch and initialise CUDA first, so that torch's copies are the ones loaded.
"""

from __future__ import annotations

import ctypes
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_LIB = os.path.join(HERE, os.pardir, "build", "faiss", "lib", "libedpairs_faiss.so")
_ERR = 1024
_COMPANIONS = ("libquadmath.so.0", "libgfortran.so.5", "libgomp.so.1", "libblas.so.3", "liblapack.so.3")


def library_path() -> str:
    return os.path.abspath(os.environ.get("EDPAIRS_FAISS_LIB") or DEFAULT_LIB)


def _cuda_libraries(cuda: bool, path: str) -> None:
    """Loads the CUDA runtime and cuBLAS that the library names by soname: torch's (which is
    what a GPU benchmark measures against), or for a check on the CPU the files build.sh linked
    against (listed in cuda_libs.txt beside the library)."""
    if cuda:
        import torch

        torch.cuda.init()
        torch.ones(1, 1, device="cuda") @ torch.ones(1, 1, device="cuda")  # loads cuBLAS
        return
    listing = os.path.join(os.path.dirname(path), "cuda_libs.txt")
    if os.path.exists(listing):
        with open(listing) as f:
            for lib in f.read().split():
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)


def load(cuda: bool = True):
    """The library with its functions typed; RuntimeError saying why where it cannot be loaded.
    cuda=False: without a GPU (faiss's CPU index, device -1)."""
    path = library_path()
    if not os.path.exists(path):
        raise RuntimeError(f"no faiss GPU library at {path} (make it with benchmarks/faiss_build/build.sh, "
                           "or name one with EDPAIRS_FAISS_LIB)")
    try:
        _cuda_libraries(cuda, path)
        # BLAS, LAPACK and their runtimes beside the library (build.sh copies them there): loaded
        # first by path, since Debian's liblapack finds libgfortran only in the system folders.
        # OpenMP's runtime only where the process and the system have none (one thread pool).
        for companion in _COMPANIONS:
            beside = os.path.join(os.path.dirname(path), companion)
            if companion == "libgomp.so.1":
                try:
                    ctypes.CDLL(companion, mode=ctypes.RTLD_GLOBAL)
                    continue
                except OSError:
                    pass
            if os.path.exists(beside):
                ctypes.CDLL(beside, mode=ctypes.RTLD_GLOBAL)
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise RuntimeError(f"cannot load {path}: {exc}") from exc
    vp, i64, err = ctypes.c_void_p, ctypes.c_int64, ctypes.c_char_p
    sig = {
        "edf_faiss_version": (ctypes.c_char_p, []),
        "edf_resources_new": (ctypes.c_int, [ctypes.c_int, vp, ctypes.POINTER(vp), err, ctypes.c_int]),
        "edf_resources_free": (None, [vp]),
        "edf_kmeans": (ctypes.c_int, [vp, ctypes.c_int, i64, ctypes.c_int, ctypes.c_int, vp, vp, ctypes.c_int,
                                      ctypes.POINTER(ctypes.c_double), err, ctypes.c_int]),
        "edf_flat_ip_new": (ctypes.c_int, [vp, ctypes.c_int, ctypes.c_int, ctypes.POINTER(vp), err, ctypes.c_int]),
        "edf_flat_ip_free": (None, [vp]),
        "edf_flat_ip_set": (ctypes.c_int, [vp, i64, vp, err, ctypes.c_int]),
        "edf_flat_ip_search": (ctypes.c_int, [vp, i64, vp, vp, vp, err, ctypes.c_int]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def _call(fn, *args) -> None:
    buf = ctypes.create_string_buffer(_ERR)
    if fn(*args, buf, _ERR) != 0:
        raise RuntimeError(f"faiss: {buf.value.decode(errors='replace')}")


def _ptr(a, dtype: str = "float32", width: int | None = None) -> int:
    """The data address of a C-contiguous numpy array or torch tensor of `dtype` (and, given
    `width`, of rows that long); ValueError naming what arrived otherwise (faiss would read the
    bytes as they are)."""
    got = str(a.dtype).replace("torch.", "")
    contiguous = a.is_contiguous() if hasattr(a, "data_ptr") else a.flags["C_CONTIGUOUS"]
    if got != dtype or not contiguous:
        raise ValueError(f"faiss needs contiguous {dtype} arrays, got {'a contiguous' if contiguous else 'a strided'} "
                         f"{got} array")
    if width is not None and (a.ndim != 2 or a.shape[1] != width):
        raise ValueError(f"faiss needs rows of {width} values, got shape {tuple(a.shape)}")
    return a.data_ptr() if hasattr(a, "data_ptr") else a.ctypes.data


class FaissGpu:
    """One device's faiss resources on torch's current stream (so CUDA events and torch's later
    kernels see faiss's work in order); device -1: faiss's CPU indexes (a check without a GPU)."""

    def __init__(self, device: int = 0):
        self.lib, self.device = load(cuda=device >= 0), device
        self.version = self.lib.edf_faiss_version().decode()
        handle = ctypes.c_void_p()
        stream = 0
        if device >= 0:
            import torch

            stream = torch.cuda.current_stream(device).cuda_stream
        _call(self.lib.edf_resources_new, device, ctypes.c_void_p(stream), ctypes.byref(handle))
        self.res = handle

    def close(self) -> None:
        if self.res:
            self.lib.edf_resources_free(self.res)
            self.res = None

    def kmeans(self, X, C, niter: int):
        """faiss.Kmeans(spherical=True, gpu=True) from the centroids C on the host rows X (both
        float32 numpy): (new centroids, faiss's time of each iteration in seconds)."""
        import numpy as np

        N, D = X.shape
        cent = np.array(C, dtype=np.float32, order="C")  # a copy: faiss writes the result into it
        times = (ctypes.c_double * niter)()
        _call(self.lib.edf_kmeans, self.res, self.device, N, D, cent.shape[0], ctypes.c_void_p(_ptr(X)),
              ctypes.c_void_p(_ptr(cent, width=D)), niter, times)
        return cent, list(times)  # seconds (ClusteringIterationStats.time; edf_kmeans takes differences)

    def flat_ip(self, d: int) -> "FlatIP":
        return FlatIP(self, d)


class FlatIP:
    """faiss's GpuIndexFlatIP: set(C) holds the centroids, search(X) gives each row's largest
    inner product and its index (torch CUDA tensors in and out, used in place; numpy arrays on
    the CPU index)."""

    def __init__(self, gpu: FaissGpu, d: int):
        self.gpu, self.d, handle = gpu, d, ctypes.c_void_p()
        _call(gpu.lib.edf_flat_ip_new, gpu.res, gpu.device, d, ctypes.byref(handle))
        self.index = handle

    def set(self, C) -> None:
        _call(self.gpu.lib.edf_flat_ip_set, self.index, C.shape[0], ctypes.c_void_p(_ptr(C, width=self.d)))

    def search(self, X, scores, labels) -> None:
        n = X.shape[0]
        if scores.shape != (n,) or labels.shape != (n,):
            raise ValueError(f"search of {n} rows needs ({n},) scores and labels, got {tuple(scores.shape)} and "
                             f"{tuple(labels.shape)}")
        _call(self.gpu.lib.edf_flat_ip_search, self.index, n, ctypes.c_void_p(_ptr(X, width=self.d)),
              ctypes.c_void_p(_ptr(scores)), ctypes.c_void_p(_ptr(labels, "int64")))

    def close(self) -> None:
        if self.index:
            self.gpu.lib.edf_flat_ip_free(self.index)
            self.index = None
