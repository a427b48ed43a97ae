"""A stand-in for cupy on machines without a GPU, for one question: does edpairs compute on the
device where a cupy array lives when that is not the current device?

CuPy launches every kernel on the *current* device; an operand on another device is an error
(without peer access) or is read across devices, and new arrays land on the current device. The
stand-in keeps its data in host memory (numpy) and tracks, for each array, the fake device it
lives on; any operation that writes new data while an operand lives on a device other than the
current one raises, as cupy does without peer access. Views (slices, reshapes) are allowed
anywhere and stay on their base's device, as in cupy. DLPack exports host memory, so edpairs'
compiled library runs its CPU kernels on these arrays: what is tested is the Python side's
device handling, not the CUDA kernels.

``install(monkeypatch)`` puts the module in ``sys.modules["cupy"]``; ``Device(i)`` is the
context manager that makes fake device i current (device 0 is current at first)."""

from __future__ import annotations

import sys
import types

import numpy as np

_current = [0]
copies_to_host = [0]  # calls of ndarray.get(), the copies (and waits) a GPU would make


class DeviceMismatch(ValueError):
    pass


class Device:
    def __init__(self, device_id=None):
        self.id = _current[0] if device_id is None else int(device_id)
        self._previous = []

    def __enter__(self):
        self._previous.append(_current[0])
        _current[0] = self.id
        return self

    def __exit__(self, *exc):
        _current[0] = self._previous.pop()
        return False

    def synchronize(self):
        pass

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


def _plain(a):
    return a.view(np.ndarray) if isinstance(a, ndarray) else a


def _fakes(values):
    for v in values:
        if isinstance(v, ndarray):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _fakes(v)


def _check_current(operands, what: str):
    for a in _fakes(operands):
        if a._device != _current[0]:
            raise DeviceMismatch(f"{what}: an operand lives on device {a._device}, the current device is {_current[0]}")


def _wrap(result, operands):
    """result (numpy) as fake arrays: memory shared with an operand stays on its device, new
    memory lands on the current device (after the operands were checked to live there)."""
    if isinstance(result, tuple):
        return tuple(_wrap(r, operands) for r in result)
    if not isinstance(result, np.ndarray):
        return result
    for a in _fakes(operands):
        if np.shares_memory(result, a.view(np.ndarray)):
            out = result.view(ndarray)
            out._device = a._device
            return out
    out = result.view(ndarray)
    out._device = _current[0]
    return out


class ndarray(np.ndarray):
    """Host memory tagged with a fake device."""

    def __array_finalize__(self, obj):
        # Views inherit their base's device; new data (astype, copy) is checked by the callers
        # below where numpy does not route it through __array_ufunc__.
        self._device = getattr(obj, "_device", _current[0])

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        operands = list(inputs) + list(kwargs.get("out", ()) or ())
        _check_current(operands, f"{ufunc.__name__}.{method}")
        if "out" in kwargs:
            kwargs["out"] = tuple(_plain(o) for o in kwargs["out"])
        result = getattr(ufunc, method)(*[_plain(i) for i in inputs], **kwargs)
        return _wrap(result, operands)

    @property
    def device(self):
        return Device(self._device)

    def astype(self, dtype, *args, **kwargs):
        _check_current([self], "astype")
        return _wrap(self.view(np.ndarray).astype(dtype, *args, **kwargs), [self])

    def copy(self, *args, **kwargs):
        _check_current([self], "copy")
        return _wrap(self.view(np.ndarray).copy(*args, **kwargs), [])

    def __setitem__(self, key, value):
        _check_current([self, value], "setitem")
        self.view(np.ndarray)[key] = _plain(value)

    def __getitem__(self, key):
        if isinstance(key, ndarray) or (isinstance(key, tuple) and any(isinstance(k, ndarray) for k in key)):
            _check_current([self, key], "fancy indexing")
        keys = tuple(_plain(k) for k in key) if isinstance(key, tuple) else _plain(key)
        return _wrap(self.view(np.ndarray)[keys], [self])

    def get(self):
        copies_to_host[0] += 1
        return np.array(self.view(np.ndarray))

    def __dlpack__(self, stream=None, max_version=None, **kwargs):
        plain = self.view(np.ndarray)
        try:
            return plain.__dlpack__(max_version=max_version)
        except TypeError:
            return plain.__dlpack__()

    def __dlpack_device__(self):
        return self.view(np.ndarray).__dlpack_device__()


ndarray.__module__ = "cupy"


def _function(name):
    f = getattr(np, name)

    def call(*args, **kwargs):
        operands = list(args) + list(kwargs.values())
        result = f(*[_plain(a) if not isinstance(a, (list, tuple)) else type(a)(_plain(x) for x in a) for a in args],
                   **{k: _plain(v) for k, v in kwargs.items()})
        shares = isinstance(result, np.ndarray) and any(np.shares_memory(result, a.view(np.ndarray))
                                                        for a in _fakes(operands))
        if not shares:
            _check_current(operands, name)
        return _wrap(result, operands)

    return call


def _module():
    mod = types.ModuleType("cupy")
    mod.ndarray = ndarray
    mod.DeviceMismatch = DeviceMismatch
    for dtype in ("float16", "float32", "float64", "int32", "int64", "uint32", "uint64", "uint8", "bool_"):
        setattr(mod, dtype, getattr(np, dtype))

    def __getattr__(name):
        if callable(getattr(np, name, None)):
            return _function(name)
        raise AttributeError(name)

    mod.__getattr__ = __getattr__

    def asarray(a, dtype=None):
        if isinstance(a, ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        return _function("asarray")(a, dtype=dtype)

    mod.asarray = asarray
    cuda = types.SimpleNamespace(Device=Device, get_current_stream=lambda: types.SimpleNamespace(ptr=0))
    mod.cuda = cuda
    return mod


scatter_calls: list = []  # which of cupy.add.at / cupyx.scatter_add each in-place count used


def _scatter(name):
    def scatter(a, indices, value):
        """a[indices] += value, repeated indices adding up, in place; as cupy (cupyx.scatter_add,
        and cupy.add.at, which runs it), only into int32, float16, float32, float64, uint32 or
        uint64 arrays (its atomicAdd types)."""
        _check_current([a, indices, value], name)
        if a.dtype not in (np.int32, np.float16, np.float32, np.float64, np.uint32, np.uint64):
            raise TypeError(f"{name} only supports int32, float16, float32, float64, uint32, uint64, as data type")
        scatter_calls.append(name)
        np.add.at(a.view(np.ndarray), _plain(indices), _plain(value))

    return scatter


def install(monkeypatch, add_at: bool = True):
    """The stand-in as ``cupy`` (and ``cupyx``) for the rest of the test; device 0 current.
    ``add_at``: cupy.add has ``at`` (CuPy >= 13), else only cupyx.scatter_add counts in place."""
    _current[0] = 0
    scatter_calls.clear()
    mod = _module()
    add = _function("add")
    if add_at:
        add.at = _scatter("add.at")
    mod.add = add
    monkeypatch.setitem(sys.modules, "cupy", mod)
    monkeypatch.setitem(sys.modules, "cupyx", types.SimpleNamespace(scatter_add=_scatter("scatter_add")))
    return mod


def on_device(a: np.ndarray, device_id: int):
    """numpy a as a fake cupy array on device_id."""
    with Device(device_id):
        out = np.array(a).view(ndarray)
        out._device = device_id
    return out
