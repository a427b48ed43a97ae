"""Array-library plumbing: which library an array comes from (numpy, torch, cupy), allocating
outputs there on the same device, DLPack export, and the caller's current CUDA stream.

The kernels see every array through DLPack; results are allocated here in the caller's
library, so they come back as the same kind of array on the same device."""

from __future__ import annotations

import contextlib
import functools
import inspect

import numpy as np

FLOAT_INPUTS = ("float32", "float64", "float16", "bfloat16")


def _module_root(x) -> str:
    return type(x).__module__.split(".", 1)[0]


class Namespace:
    """Library-specific operations for arrays of one library (numpy, torch or cupy)."""

    def __init__(self, name: str):
        self.name = name
        if name == "torch":
            import torch

            self.mod = torch
        elif name == "cupy":
            import cupy

            self.mod = cupy
        else:
            self.mod = np

    # ---- inspection -----------------------------------------------------------------
    def dtype_name(self, x) -> str:
        return str(x.dtype).replace("torch.", "")

    def is_cuda(self, x) -> bool:
        if self.name == "torch":
            return x.device.type == "cuda"
        return self.name == "cupy"

    def device(self, x) -> str:
        if self.name == "torch":
            return str(x.device)
        if self.name == "cupy":
            return f"cuda:{x.device.id}"
        return "cpu"

    def stream(self, x) -> int:
        """The caller's current stream on x's device (0 on CPU)."""
        if self.name == "torch" and x.device.type == "cuda":
            return int(self.mod.cuda.current_stream(x.device).cuda_stream)
        if self.name == "cupy":
            with x.device:
                return int(self.mod.cuda.get_current_stream().ptr)
        return 0

    # ---- creation and conversion ----------------------------------------------------
    def _dtype(self, name: str):
        return getattr(self.mod, name)

    def empty(self, shape, dtype: str, like):
        if self.name == "torch":
            return self.mod.empty(tuple(shape), dtype=self._dtype(dtype), device=like.device)
        if self.name == "cupy":
            with like.device:
                return self.mod.empty(tuple(shape), dtype=dtype)
        return np.empty(tuple(shape), dtype=dtype)

    def zeros(self, shape, dtype: str, like):
        out = self.empty(shape, dtype, like)
        out[...] = 0
        return out

    def asarray(self, x, like):
        """x (any array library or a sequence) as an array of this library on like's device."""
        if _module_root(x) == self.name:
            return x
        if self.name == "numpy":
            if _module_root(x) == "torch":
                if x.device.type != "cpu":
                    raise ValueError(f"got an array on {x.device} next to numpy arrays; put all arrays on the same device")
                x = x.detach()
                return (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()  # numpy has no bfloat16
            if _module_root(x) == "cupy":
                raise ValueError("got a cupy (CUDA) array next to numpy arrays; put all arrays on the same device")
            return np.asarray(x)
        if hasattr(x, "__dlpack__"):
            if self.name == "torch" and _module_root(x) == "numpy":
                out = self.mod.from_numpy(np.ascontiguousarray(x))
            else:
                try:
                    out = self.mod.from_dlpack(x)
                except (BufferError, RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                    raise ValueError(
                        f"could not bring a {_module_root(x)} array next to {self.name} arrays on "
                        f"{self.device(like)} ({exc}); put all arrays on the same device"
                    ) from exc
        else:
            out = self.mod.asarray(np.asarray(x))
        return out

    def astype(self, x, dtype: str):
        if self.dtype_name(x) == dtype:
            return x
        if self.name == "torch":
            return x.to(self._dtype(dtype))
        return x.astype(dtype)

    def contiguous(self, x):
        if self.name == "torch":
            return x.contiguous()
        return self.mod.ascontiguousarray(x)

    def as_float32_contiguous(self, x):
        if self.name == "torch":
            if x.dtype == self.mod.float32 and x.is_contiguous() and not x.requires_grad:
                return x  # itself, as numpy and cupy give it (SignalMoments.merge tells one centre by identity)
            return x.detach().to(self.mod.float32).contiguous()
        if self.name == "cupy":
            return self.mod.ascontiguousarray(x, dtype=self.mod.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def contiguous_rows(self, x):
        """x with unit stride along its last dimension (a copy only when needed)."""
        if self.name == "torch":
            x = x.detach()
            return x if x.dim() < 2 or x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()
        if x.ndim < 2 or x.shape[-1] <= 1 or x.strides[-1] == x.itemsize:
            return x
        return self.mod.ascontiguousarray(x)

    def detach(self, x):
        if self.name == "torch":
            x = x.detach()
            if x.is_conj():
                x = x.resolve_conj()
            if x.is_neg():
                x = x.resolve_neg()
        return x

    # ---- arithmetic and reductions (for the estimators' device-side passes) -------------
    def arange(self, n: int, like):
        """0, 1, ..., n - 1 (int64) on like's device."""
        if self.name == "torch":
            return self.mod.arange(n, device=like.device)
        if self.name == "cupy":
            with like.device:
                return self.mod.arange(n, dtype=np.int64)
        return np.arange(n, dtype=np.int64)

    def clip(self, x, lo, hi):
        return self.mod.clamp(x, lo, hi) if self.name == "torch" else self.mod.clip(x, lo, hi)

    def add_counts(self, counts, idx) -> None:
        """counts[v] += the occurrences of v in the 1-D int64 idx (values in range), in place and,
        on a GPU, without waiting for the device (bincount reads its input's largest value back
        to size its result): torch's scatter_add_ (deterministic for 1-D CUDA tensors),
        cupy's add.at (cupyx.scatter_add in a cupy whose add has no ``at``; cupy 14 warns that
        scatter_add is deprecated; neither takes an int64 target: the counts, never negative,
        are added through a uint64 view of the same memory); numpy's bincount."""
        if self.name == "torch":
            counts.scatter_add_(0, idx, self.mod.ones_like(idx))
        elif self.name == "cupy":
            target = counts.view(self.mod.uint64) if counts.dtype == self.mod.int64 else counts
            at = getattr(self.mod.add, "at", None)
            if at is None:  # an older cupy
                import cupyx

                at = cupyx.scatter_add
            at(target, idx, 1)
        else:
            counts += np.bincount(idx, minlength=counts.shape[0])

    def matmul(self, a, b):
        """a @ b; for torch CUDA tensors in exact float32 whatever torch's TF32 setting (as
        edpairs' own products, which say their precision): the estimators' passes and the
        fitted pairs' decoding must not change with a flag set for training elsewhere."""
        if self.name == "torch" and self.is_cuda(a):
            from ._gemm import matmul_precision

            with matmul_precision(self.mod, "float32"):
                return a @ b
        return a @ b

    def logistic(self, z):
        """1 / (1 + exp(-z)) of an array of this library, without numpy's overflow warning far
        below 0 (exp(-z) = inf there, the value 0)."""
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + self.mod.exp(-z))

    def zeros_as_inf(self, x):
        """A copy of x with its exact zeros as +inf, in x's library and device (zero rows score
        0: this keeps them out of the lowest scores)."""
        if self.name == "torch":
            return x.masked_fill(x == 0, float("inf"))
        out = x.copy()
        out[x == 0] = float("inf")
        return out

    def k_lowest(self, x, m: int):
        """Positions of the m lowest entries of the 1-D x, in no particular order (ties broken
        as the library's selection does), in x's library and device."""
        n = int(x.shape[0])
        if m >= n:
            return self.arange(n, x)
        if self.name == "torch":
            return self.mod.topk(x, m, largest=False, sorted=False).indices
        return self.mod.argpartition(x, m - 1)[:m]

    def sum_float64(self, x):
        """The float64 sum of x, as a 0-d array of x's library and device (no synchronisation)."""
        if self.name == "torch":
            return x.sum(dtype=self.mod.float64)
        return x.sum(dtype=np.float64)

    # ---- checks ---------------------------------------------------------------------
    def all_finite(self, x) -> bool:
        """No NaN or infinity in x (one synchronisation on a GPU: the answer comes to the host)."""
        return bool(self.mod.isfinite(x).all())

    def all_nonnegative(self, x) -> bool:
        """No entry below 0 (NaN passes: the finiteness check words it)."""
        return not bool((x < 0).any())

    # ---- DLPack ---------------------------------------------------------------------
    def capsule(self, x):
        if x is None:
            return None
        if self.name == "numpy":
            try:
                return _numpy_capsule(x)
            except BufferError:
                # DLPack cannot carry it: strides that are not a multiple of the item size (a field
                # of a structured array), or, before numpy 2.1, a read-only array (a store's
                # memory map). A copy, which the capsule keeps alive; only inputs are ever such
                # arrays (outputs are edpairs' own contiguous arrays).
                return _numpy_capsule(np.array(x, copy=True))
        # We launch on the producer's current stream, so no cross-stream sync is needed.
        stream = -1 if self.is_cuda(x) else None
        try:
            return x.__dlpack__(stream=stream, max_version=(1, 0))
        except TypeError:
            return x.__dlpack__(stream=stream)


def _numpy_capsule(x):
    try:
        return x.__dlpack__(max_version=(1, 0))
    except TypeError:  # numpy < 2.1
        return x.__dlpack__()


#: Copies between a torch GPU and the host of PINNED_MIN_BYTES to PINNED_MAX_BYTES go through
#: page-locked (pinned) host memory, from torch's caching host allocator: a pageable copy is
#: staged by the driver at a fraction of the bus's rate, and a k-means fit brings its k x D
#: float64 sums home and sends its centroids out (H200 run 6b: 3.3 ms of device-to-host copies
#: in a two-pass fit at k = 1024, D = 512). Larger copies stay pageable: the allocator keeps
#: its blocks (rounded up to powers of two) for the life of the process.
PINNED_MIN_BYTES = 2**20
PINNED_MAX_BYTES = 2**26


def _pinned_block(t):
    """An empty pinned CPU tensor like the torch tensor t (its shape and dtype) where a copy of
    t's size to or from a GPU should be staged, else None (also where no pinned memory is left:
    the pageable copy then)."""
    if not PINNED_MIN_BYTES <= t.numel() * t.element_size() <= PINNED_MAX_BYTES:
        return None
    import torch

    try:
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    except RuntimeError:
        return None


def _torch_host(a):
    """A torch tensor's values as a CPU tensor (bfloat16 as float32), and whether that tensor
    is a pinned staging block (which the caller copies out of, not keeps)."""
    a = a.detach()
    host = _pinned_block(a) if a.device.type == "cuda" else None
    staged = host is not None
    if staged:
        import torch

        host.copy_(a, non_blocking=True)  # on a's device's current stream, which is then waited for
        torch.cuda.current_stream(a.device).synchronize()
        a = host
    else:
        a = a.cpu()
    if str(a.dtype) == "torch.bfloat16":
        a = a.float()
    return a, staged


def to_host(a) -> np.ndarray:
    """Any array (numpy, torch on any device, cupy) as a numpy array on the host, its dtype kept
    (torch bfloat16, which numpy lacks, becomes float32)."""
    if hasattr(a, "detach"):
        host, staged = _torch_host(a)
        return host.numpy().copy() if staged else host.numpy()
    if _module_root(a) == "cupy":
        return a.get()
    return np.asarray(a)


def to_numpy64(a) -> np.ndarray:
    """Any array (numpy, torch on any device and dtype, cupy) as a float64 numpy array on the
    host: float64 values and integers up to 2^53 exactly (never through float32). A torch or
    cupy array is always copied (a float64 CPU tensor's numpy view would share its memory); a
    numpy float64 array comes back as itself."""
    if isinstance(a, np.ndarray) and _module_root(a) == "numpy":  # (not another library's subclass)
        return np.asarray(a, dtype=np.float64)
    if hasattr(a, "detach"):  # (one copy out of a pinned staging block, into float64)
        return np.array(_torch_host(a)[0].numpy(), dtype=np.float64)
    return np.array(to_host(a), dtype=np.float64)


def on_device_of(a, like):
    """A numpy array (or None) as an array of like's library on like's device: how estimators
    hand their small host-side parameters (and row indices) to the data's device. (The
    functions of edpairs.ops refuse host parameters next to CUDA data instead: there a mix-up is
    more likely a mistake than an intent.)"""
    if a is None:
        return None
    root = _module_root(like)
    if root == "torch":
        import torch

        host = torch.as_tensor(np.ascontiguousarray(a))
        staged = _pinned_block(host) if like.device.type == "cuda" else None
        if staged is None:
            return host.to(like.device)
        # (torch's host allocator keeps the staged block from reuse until the copy is done)
        return staged.copy_(host).to(like.device, non_blocking=True)
    if root == "cupy":
        import cupy

        with like.device:
            return cupy.asarray(a)
    return a


def device_scope(x):
    """A context in which array-library calls act on x's device. CuPy runs every operation on
    its *current* device, wherever the operands live (an error without peer access, a
    cross-device read with it), and allocates there; so work on a cupy array from another
    device than the current one runs with that device current, and the caller's current
    device comes back at the end. torch CUDA tensors get torch's device guard likewise (torch's
    own ops follow their operands; streams made without a device take the current one).
    Anything else (numpy, CPU tensors, None): no context."""
    root = _module_root(x)
    if root == "cupy" and hasattr(x, "device"):
        return x.device
    if root == "torch" and getattr(x, "is_cuda", False):
        import torch

        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def on_data_device(name: str):
    """Decorator: the function (or method) runs in :func:`device_scope` of its argument
    ``name``, passed by position or keyword."""

    def wrap(f):
        index = list(inspect.signature(f).parameters).index(name)

        @functools.wraps(f)
        def run(*args, **kwargs):
            with device_scope(args[index] if len(args) > index else kwargs.get(name)):
                return f(*args, **kwargs)

        return run

    return wrap


def namespace_of(x) -> Namespace:
    root = _module_root(x)
    if root in ("torch", "cupy"):
        return Namespace(root)
    return Namespace("numpy")


def as_array(x, name: str):
    """x itself if it is a numpy / torch / cupy array, else numpy's view of it. Refused: None,
    numpy masked arrays (their masks would be ignored) and what is not numeric; numpy arrays in
    the non-native byte order are converted."""
    if x is None:
        raise TypeError(f"{name} must be an array (numpy, torch or cupy), got None")
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} is a numpy masked array, whose mask edpairs would ignore: pass {name}.filled(value) "
                        f"or only the unmasked rows")
    if _module_root(x) in ("torch", "cupy") and hasattr(x, "shape"):
        return x
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:  # noqa: BLE001 - report what arrived
            raise TypeError(f"{name} must be an array (numpy, torch or cupy), got {type(x).__name__}") from exc
        if x.dtype.kind in "OSUVMm":
            raise TypeError(f"{name} must be a numeric array (numpy, torch or cupy), got {x.dtype} values")
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def require_torch(what: str):
    """``torch``, or an ImportError saying that ``what`` needs it and how to install it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is installed wherever the tests run
        raise ImportError(f'{what} needs PyTorch: pip install "edpairs[torch]"') from exc
    return torch
