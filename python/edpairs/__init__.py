"""edpairs: encoding-decoding direction pairs of the concepts a layer of a deep vision network
represents, with C++/CUDA kernels under an array-agnostic Python API."""

from __future__ import annotations

__version__ = "0.1.0"

from . import (actmax, capture, dissect, distributed, explain, influence, interventions, metrics, ops, reference, refine,
               store, synthetic, ura)
from .actmax import activation_maximisation
from .capture import iter_activations, layer_names, split_model
from .cluster import SphericalKMeans, Whitener
from .errors import BackendUnavailable, CudaError
from .explain import Explanation, plot_explanation
from .influence import InfluenceResult, plot_influence
from .interventions import intervene
from .pairs import EDPairs
from .store import ActivationStore, extract

__all__ = [
    "ActivationStore",
    "Explanation",
    "InfluenceResult",
    "activation_maximisation",
    "actmax",
    "explain",
    "influence",
    "plot_explanation",
    "plot_influence",
    "probe",
    "BackendUnavailable",
    "CorrectedModel",
    "CudaError",
    "EDPairs",
    "SphericalKMeans",
    "Whitener",
    "__version__",
    "build_info",
    "capture",
    "correct",
    "pipeline",
    "report",
    "stream",
    "cuda_device_count",
    "dissect",
    "distributed",
    "extract",
    "get_num_threads",
    "intervene",
    "interventions",
    "iter_activations",
    "layer_names",
    "metrics",
    "ops",
    "reference",
    "refine",
    "set_num_threads",
    "split_model",
    "store",
    "synthetic",
    "ura",
    "zoo",
]


def build_info() -> dict:
    """What this build of edpairs contains: ``version``, ``cuda`` (were the CUDA kernels
    compiled), ``cuda_mode`` (the EDPAIRS_CUDA setting of the build), ``archs`` (CUDA
    architectures), ``cuda_version`` (nvcc), ``wgmma`` (was the Hopper wgmma assignment
    kernel, sm_90a, compiled: with 90 among the architectures), ``cpu_kernel`` (the CPU micro-kernel picked for
    this machine), ``num_threads`` and ``compiler``. Makes no CUDA call."""
    from ._backend import lib

    return dict(lib().build_info())


def cuda_device_count() -> int:
    """GPUs visible to edpairs' CUDA kernels (0 when CUDA was not built or no driver / GPU)."""
    from ._backend import lib

    return int(lib().cuda_device_count())


def get_num_threads() -> int:
    """Threads the CPU kernels use (default: the CPUs this process may run on, or
    ``EDPAIRS_NUM_THREADS``)."""
    from ._backend import lib

    return int(lib().num_threads())


def set_num_threads(n: int) -> None:
    """Sets the number of threads of the CPU kernels (1 <= n <= 1024)."""
    from ._backend import lib
    from ._checks import check_int

    check_int("set_num_threads: n", n)
    lib().set_num_threads(int(n))


_LAZY = {"zoo": ("zoo", None), "correct": ("correct", None), "CorrectedModel": ("correct", "CorrectedModel"),
         "probe": ("probe", None), "report": ("report", None), "pipeline": ("pipeline", None),
         "stream": ("stream", None)}


def __getattr__(name):
    # Modules that import torch when imported (torch Datasets / Modules at module level) load on
    # first use, so that `import edpairs` stays free of torch for numpy-only users.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        mod = importlib.import_module(f".{module}", __name__)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'edpairs' has no attribute {name!r}")
