"""Reading a layer of a PyTorch model: capture its output by dotted module name (streamed per
batch, channel-last), list the hookable modules, and split the model into ``features``
(input -> layer) and ``head`` (layer -> logits) for URA, influence and interventions."""

from __future__ import annotations

import contextlib
import difflib
import sys
import operator
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np

from . import _layout
from ._arrays import require_torch
from ._checks import check_int
from ._progress import Progress

__all__ = ["Activations", "LayerNotFound", "ModelSplit", "SharedModuleError", "SplitError", "capture", "find_module",
           "iter_activations", "layer_names", "split_model"]


def _torch():
    return require_torch("edpairs model integration")


# ---------------------------------------------------------------------------------------------
# Modules by dotted name


def _refuse_script(module) -> None:
    jit = getattr(sys.modules.get("torch"), "jit", None)
    if jit is not None and isinstance(module, jit.ScriptModule):
        raise TypeError(f"{type(module).__name__} is a TorchScript module, whose layers take no forward hooks "
                        "(capture, split and interventions hook the layer): load the model as a Python "
                        "nn.Module instead (a package.module:factory, or a module saved with torch.save)")


def find_module(model, layer):
    """The submodule of ``model`` at the dotted path ``layer`` (``"_blocks.15"``, ``"layer4"``,
    ``"blocks.8.mlp"``), or ``layer`` itself when it is a module of ``model``; a wrong name
    raises :class:`LayerNotFound` (a KeyError) listing the closest valid names. Of an
    ``nn.DataParallel`` or ``DistributedDataParallel`` model, a name without the wrapper's
    ``"module."`` prefix names the wrapped module's layer too (as capture takes it). A TorchScript
    model is refused: its modules take no forward hooks, which capture and edits rely on."""
    _refuse_script(model)
    if not isinstance(layer, str):
        if hasattr(layer, "register_forward_hook"):
            if not any(m is layer for m in model.modules()):
                raise ValueError(f"the module {type(layer).__name__} given as layer is not part of the model")
            _refuse_script(layer)
            return layer
        raise TypeError(f"layer must be a dotted module name (str) or a module, got {type(layer).__name__}")
    modules = dict(model.named_modules())
    if layer not in modules and _parallel_wrapper(model) and f"module.{layer}" in modules:
        layer = f"module.{layer}"  # (a DataParallel / DistributedDataParallel model: the wrapped module's name)
    if layer in modules:
        _refuse_script(modules[layer])
        return modules[layer]
    if _compiled(model) and f"_orig_mod.{layer}" in modules:
        raise LayerNotFound(
            f"{type(model).__name__} is a torch.compile'd model: its layer {layer!r} is named "
            f"'_orig_mod.{layer}' there, and its compiled graph does not call forward hooks, so a capture or "
            f"an edit of that layer applies only to forwards of the original module: pass model._orig_mod "
            f"(and call model._orig_mod for edited forwards, or compile a CorrectedModel)")
    names = [n for n in modules if n]
    close = difflib.get_close_matches(layer, names, n=6, cutoff=0.5)
    # Also offer the children of the deepest prefix that exists ("_blocks.99" -> "_blocks.0..15").
    parts = layer.split(".")
    for k in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in modules:
            children = [f"{prefix}.{c}" for c, _ in modules[prefix].named_children()]
            if children:
                close += [c for c in (children[:3] + children[-3:]) if c not in close]
            break
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise LayerNotFound(
        f"{type(model).__name__} has no module named {layer!r}{hint}. "
        f"List every name with edpairs.capture.layer_names(model) (or dict(model.named_modules()))"
    )


def declared_width(module):
    """(attribute, value) of the channel count a module declares (out_channels, out_features or
    num_features), else (None, None)."""
    for attr in ("out_channels", "out_features", "num_features"):
        v = getattr(module, attr, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return attr, v
    return None, None


def _compiled(model) -> bool:
    """Whether model is a torch.compile'd module (an OptimizedModule around ``model._orig_mod``)."""
    return hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule"


def _parallel_wrapper(model) -> bool:
    """Whether model is an nn.DataParallel or DistributedDataParallel wrapper (its modules are
    named "module.<name>")."""
    torch = sys.modules.get("torch")
    if torch is None:
        return False
    return isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel))


def _one_device(model, layer):
    """(model, layer) with an ``nn.DataParallel`` wrapper taken off: DataParallel runs a replica
    of the model per GPU on its share of the batch, and each replica calls the capture hook,
    which would then see (and keep) only one share. The wrapped module runs the whole batch on
    its own device instead (the wrapper's parameters are that module's, on device_ids[0]).
    ``layer`` may name the module either way ("module.layer4" or "layer4"). A torch.compile'd
    model runs as its original module too (``_orig_mod``: the same values; the compiled graph
    need not call the hooks capture relies on), its layer named "_orig_mod.layer4" or "layer4"."""
    torch = _torch()
    while True:
        if isinstance(model, torch.nn.DataParallel):
            inner, prefix = model.module, "module."
        elif _compiled(model):
            inner, prefix = model._orig_mod, "_orig_mod."
        else:
            return model, layer
        if isinstance(layer, str) and layer.startswith(prefix) and layer not in dict(inner.named_modules()):
            layer = layer[len(prefix):]
        model = inner


def layer_names(model, example=None, *, leaves: bool = False) -> list:
    """Dotted names of the modules of ``model`` that can be captured, in definition order.

    With ``example`` (an input batch) each entry is ``(name, output_shape)`` from one forward
    pass (``None`` for modules that did not run or returned no tensor); ``leaves=True`` keeps
    only modules without children."""
    torch = _torch()
    names = [n for n, m in model.named_modules() if n and (not leaves or not any(True for _ in m.children()))]
    if example is None:
        return names
    shapes = {}
    handles = []
    modules = dict(model.named_modules())

    def hook_for(name):
        def hook(_module, _inputs, output):
            if name not in shapes and torch.is_tensor(output):
                shapes[name] = tuple(output.shape)
        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(hook_for(n)))
    if torch.is_tensor(example) or isinstance(example, np.ndarray):
        example = _to_model(model, _as_images(example, "layer_names: example"))
    try:
        with torch.no_grad(), _eval_mode(model):
            model(example)
    finally:
        for h in handles:
            h.remove()
    return [(n, shapes.get(n)) for n in names]


@contextlib.contextmanager
def _eval_mode(model):
    """``model.eval()`` for the block; every module's own training flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


class LayerNotFound(KeyError, ValueError):
    """No module of that dotted name (a KeyError and a ValueError; the message is not quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class _StopForward(Exception):
    """Raised by a capture hook to end the forward pass right after the captured layer."""


def _model_device(model):
    torch = _torch()
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _model_float_dtype(model):
    """The dtype of the model's first floating parameter (float32 for a model without one)."""
    torch = _torch()
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _to_model(model, x):
    """x (a tensor, or an array-like) on the model's device, floating values in its dtype: a
    CPU batch or numpy features reach a CUDA / float16 / bfloat16 model as it computes
    (autograd flows back through the move)."""
    torch = _torch()
    if not torch.is_tensor(x):
        x = torch.as_tensor(np.asarray(x))
    if next(iter(model.parameters()), None) is None and next(iter(model.buffers()), None) is None:
        return x.float() if x.is_floating_point() else x  # nothing says where or how it computes
    dtype = _model_float_dtype(model) if x.is_floating_point() else x.dtype
    return x.to(device=_model_device(model), dtype=dtype)


class SharedModuleError(RuntimeError):
    """The hooked module ran more than once in one forward pass (a module used at several places),
    where one output, or one edit per forward, was asked for."""


def _ran_twice(layer) -> RuntimeError:
    return SharedModuleError(
        f"module {layer!r} ran more than once in one forward pass (a shared module); "
        "capture a module that runs once, e.g. a wrapper around one of its uses"
    )


class _LayerTap:
    """A forward hook on one module that records its output (and optionally stops the pass)."""

    def __init__(self, module, layer: str, stop_after: bool):
        self.layer, self.stop_after = layer, stop_after
        self.output = None
        self.calls = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        torch = _torch()
        self.calls += 1
        if self.calls > 1:
            raise _ran_twice(self.layer)
        if not torch.is_tensor(output):
            kind = type(output).__name__
            raise TypeError(
                f"module {self.layer!r} returned a {kind}, not a tensor; capture one of its submodules "
                f"that returns a tensor (see edpairs.capture.layer_names(model))"
            )
        self.output = output
        if self.stop_after:
            raise _StopForward()

    def run(self, model, x):
        self.output, self.calls = None, 0
        try:
            model(x)
        except _StopForward:
            pass
        if self.output is None:
            raise RuntimeError(f"module {self.layer!r} did not run in the model's forward pass")
        out = self.output
        self.output = None
        return out

    def remove(self):
        self._handle.remove()


def _runs_once_by_structure(model, module) -> bool:
    """Whether ``module`` runs once per forward of ``model`` by construction: every container on
    its path is a plain ``nn.Sequential`` (which calls each child once) and the module is
    registered under one name only. Otherwise only a forward pass can tell."""
    torch = _torch()
    names = [n for n, m in model.named_modules(remove_duplicate=False) if m is module]
    if len(names) != 1:
        return False
    node = model
    for part in names[0].split(".") if names[0] else []:
        if not isinstance(node, torch.nn.Sequential) or type(node).forward is not torch.nn.Sequential.forward:
            return False
        node = getattr(node, part)
    return True


def _check_runs_once(model, module, layer, x) -> None:
    """Raises when ``module`` runs more than once in a forward pass of ``model`` on ``x`` (one
    image suffices): with ``stop_after`` a capture ends at its first use and would silently keep
    that one. The pass goes past the layer; a failure there leaves the question open (a capture
    never runs that part) and is not raised."""
    tap = _LayerTap(module, layer, stop_after=False)
    try:
        model(x)
    except Exception:  # noqa: BLE001 - other than the tap's own refusal: the part after the layer failed
        if tap.calls > 1:
            raise _ran_twice(layer) from None
    finally:
        tap.remove()


def _as_images(images, where: str):
    """A batch's images as a tensor: numpy arrays are taken as they are; anything else is named."""
    torch = _torch()
    if isinstance(images, np.ndarray):
        if images.dtype == object or images.dtype.kind not in "biuf":
            raise TypeError(f"{where}: the images must be a numeric array (n, C, H, W), got a numpy array of dtype "
                            f"{images.dtype}")
        return torch.from_numpy(images)
    if torch.is_tensor(images):
        return images
    raise TypeError(f"{where}: the images must be a torch tensor or a numpy array of n images (n, C, H, W), got "
                    f"{type(images).__name__} {_short(images)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_batch_kept(layer, images, out) -> None:
    """The layer's output must keep the batch's leading size: a single image (C, H, W) run as
    an unbatched input, or a layer that puts another axis first, would be read as other images."""
    n = int(images.shape[0]) if getattr(images, "ndim", 0) else None
    if n is None or (out.ndim >= 1 and int(out.shape[0]) == n):
        return
    raise ValueError(
        f"layer {layer!r} gave an output of shape {tuple(out.shape)} for a batch of shape {tuple(images.shape)}: "
        f"expected a batch of n images (n, C, H, W) whose output keeps the leading size n = {n}. A single image "
        f"(C, H, W) needs a batch axis (x[None]); a list of images, torch.stack(images); a layer whose output "
        f"puts another axis first (e.g. (L, n, C)) cannot be captured as it is"
    )


def _run_batch(tap, model, images, layer):
    """tap.run, with an integer batch the model could not take named as such (uint8 images reach a
    float model as torch's 'Input type (unsigned char) and bias type (float)')."""
    try:
        return tap.run(model, images)
    except RuntimeError as exc:
        if tap.calls or not _torch().is_tensor(images) or images.is_floating_point() or images.is_complex():
            raise
        raise TypeError(
            f"the model could not take a batch of dtype {images.dtype} (shape {tuple(images.shape)}) at or before "
            f"layer {layer!r}: an image model expects floating images, e.g. x.float() / 255 followed by the "
            f"model's normalisation (torch said: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc


# ---------------------------------------------------------------------------------------------
# Batches of images


def _split_item(item):
    """(images, labels) of one batch: a tensor, an (images, labels, ...) tuple/list, or a dict
    with an 'image'/'images'/'pixel_values' entry."""
    torch = _torch()
    if isinstance(item, dict):
        for k in ("image", "images", "pixel_values", "input", "x"):
            if k in item:
                labels = item.get("label", item.get("labels"))
                return item[k], labels
        raise TypeError(f"a batch dict needs an 'image' or 'images' entry, got keys {sorted(item)}")
    if isinstance(item, (tuple, list)):
        if not item:
            raise TypeError("an empty batch tuple")
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, np.ndarray):
        return torch.from_numpy(item), None
    if torch.is_tensor(item):
        return item, None
    raise TypeError(
        f"a batch must be a tensor, an (images, labels) tuple or a dict, got {type(item).__name__}"
    )


def _is_map_dataset(data) -> bool:
    _torch()
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, DataLoader) or isinstance(data, IterableDataset):
        return False
    return isinstance(data, Dataset) and hasattr(data, "__len__")


def n_images_of(data) -> Optional[int]:
    """The number of images ``data`` yields, when it can be known without reading it."""
    torch = _torch()
    from torch.utils.data import DataLoader

    if torch.is_tensor(data) or isinstance(data, np.ndarray):
        return int(data.shape[0])
    if _is_map_dataset(data):
        return len(data)
    if isinstance(data, DataLoader):
        try:
            if data.batch_size is not None:
                n = len(data.sampler)
                return (n // data.batch_size) * data.batch_size if data.drop_last else n
            return int(sum(len(b) for b in data.batch_sampler))
        except TypeError:
            return None
    return None


def _collated(dataset, start: int, stop: int):
    """(images, labels) of items start..stop-1 of a map-style dataset."""
    from torch.utils.data import default_collate

    images, labels = _split_item(default_collate([dataset[i] for i in range(start, stop)]))
    return _as_images(images, f"items {start}..{stop - 1} of the dataset"), labels


class _Batch(NamedTuple):
    start: int            # index of the batch's first image in the data's order
    n: int                # images in the batch
    load: Callable        # () -> (images, labels); not called for batches that are skipped


def _iter_batches(data, batch_size: int, wanted: Optional[Callable[[int, int], bool]] = None,
                  seen: Optional[list] = None) -> Iterator[_Batch]:
    """Batches of ``data`` with their image ranges. Tensors, arrays and map-style datasets are
    cut at multiples of ``batch_size`` (so a batch's content never depends on where a run
    starts) and only batches with ``wanted(start, stop)`` are loaded; other iterables are read
    in full and unwanted batches dropped before any model work. ``seen[0]`` counts the images
    passed so far (wanted or not)."""
    torch = _torch()
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if torch.is_tensor(data) or _is_map_dataset(data):
        n = n_images_of(data)
        is_tensor = torch.is_tensor(data)
        for s in range(0, n, batch_size):
            e = min(n, s + batch_size)
            if seen is not None:
                seen[0] = e
            if wanted is not None and not wanted(s, e):
                continue
            if is_tensor:
                yield _Batch(s, e - s, (lambda s=s, e=e: (data[s:e], None)))
            else:
                from torch.utils.data import default_collate

                yield _Batch(s, e - s, (lambda s=s, e=e: _collated(data, s, e)))
        return
    if not hasattr(data, "__iter__"):
        raise TypeError(
            f"data must be a tensor of images, a torch Dataset or DataLoader, or an iterable of batches, "
            f"got {type(data).__name__}"
        )
    s = 0
    for k, item in enumerate(data):
        images, labels = _split_item(item)
        images = _as_images(images, f"batch {k}")
        if images.ndim == 0:
            raise ValueError(f"batch {k}: expected a batch of n images (n, C, H, W), got a 0-d tensor")
        n = int(images.shape[0])
        if wanted is None or wanted(s, s + n):
            yield _Batch(s, n, (lambda images=images, labels=labels: (images, labels)))
        s += n
        if seen is not None:
            seen[0] = s


# ---------------------------------------------------------------------------------------------
# Capture


class Activations(NamedTuple):
    """One batch of a layer's output: ``values`` channel-last ``(n, *grid, C)`` (a torch tensor),
    ``index`` the images' positions in the data's order (int64 numpy ``(n,)``), ``labels``
    what the batches carried next to the images (or None)."""

    values: object
    index: np.ndarray
    labels: object = None


def _autocast_context(device, autocast):
    torch = _torch()
    if autocast is None or autocast is False:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if autocast is True and device.type == "cpu" else (torch.float16 if autocast is True else autocast)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return torch.autocast(device_type=device.type, dtype=dtype)


def iter_activations(model, layer: str, batches, *, layout: Optional[str] = None, batch_size: int = 32,
                     autocast=None, device=None, dtype=None, keep_on_device: bool = False,
                     progress: Optional[bool] = None, stop_after: bool = True,
                     _wanted: Optional[Callable[[int, int], bool]] = None,
                     _seen: Optional[list] = None) -> Iterator[Activations]:
    """Streams the output of module ``layer`` of ``model`` batch by batch.

    ``batches``: a torch DataLoader, an iterable of image tensors or (images, labels) tuples, a
    map-style torch Dataset, or one tensor / array of images (cut into ``batch_size`` batches).
    Each batch is run under ``torch.no_grad()`` with the model in eval mode (every module's
    mode is restored afterwards), optionally under ``torch.autocast`` (``autocast=torch.float16``
    / ``torch.bfloat16`` / True), on ``device`` (default: the model's), floating images in the
    model's floating dtype (a float64 or numpy batch meets float32 weights). With ``stop_after``
    the forward pass ends right after the layer (the layers behind it are not computed); unless
    the layer sits in plain ``nn.Sequential`` containers, one image of the first batch runs the
    whole forward pass once, to refuse a module that runs more than once per forward (a shared
    module, :class:`SharedModuleError`) rather than keep its first use. A layer output whose
    leading size is not the batch's number of images (one unbatched image (C, H, W)) is refused.

    Yields :class:`Activations` with channel-last values ``(n, *grid, C)`` of ``dtype``
    (default float32), contiguous, on the CPU unless ``keep_on_device``. ``layout`` names the
    layer's output layout ("nchw", "nhwc", "nlc", "nc"; default from its rank). Nothing is
    accumulated across batches. An ``nn.DataParallel`` model runs as the module it wraps, on its
    device (its replicas would each show the hook only their share of a batch)."""
    torch = _torch()
    check_int("batch_size", batch_size)
    model, layer = _one_device(model, layer)
    module = find_module(model, layer)
    device = torch.device(device) if device is not None else _model_device(model)
    out_dtype = torch.float32 if dtype is None else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    float_dtype = _model_float_dtype(model)
    # With stop_after a shared module would be captured at its first use, silently: unless the
    # model's structure says it runs once, one image of the first batch runs the whole forward.
    check_reuse = stop_after and not _runs_once_by_structure(model, module)
    total = n_images_of(batches)
    bar = Progress(total=total, desc=f"capture {layer}", enabled=progress, unit=" images")
    try:
        for batch in _iter_batches(batches, batch_size, _wanted, _seen):
            images, labels = batch.load()  # (a tensor: _iter_batches took every form through _as_images)
            # Hook, no_grad and eval mode only around the forward pass: while the caller holds a
            # batch, its own code runs with its grad mode and model modes, and without the hook.
            tap = _LayerTap(module, layer, stop_after)
            try:
                with torch.no_grad(), _eval_mode(model):
                    # floating images in the model's dtype (a float64 or numpy batch meets float32 weights)
                    images = images.to(device, dtype=float_dtype if images.is_floating_point() else None,
                                       non_blocking=True)
                    with _autocast_context(device, autocast):
                        out = _run_batch(tap, model, images, layer)
                        _check_batch_kept(layer, images, out)
                        if check_reuse:
                            tap.remove()
                            _check_runs_once(model, module, layer, images[:1])
                            check_reuse = False
                    lay = _layout.infer_layout(out.shape, layout)
                    values = _layout.channel_last(out, lay).to(dtype=out_dtype)
                    if not keep_on_device:
                        values = values.to("cpu")
                    values = values.contiguous()
            finally:
                tap.remove()
            del out
            bar.update(batch.n)
            yield Activations(values, np.arange(batch.start, batch.start + batch.n, dtype=np.int64), labels)
    finally:
        bar.close()


def capture(model, layer: str, inputs, *, layout: Optional[str] = None, batch_size: int = 32, autocast=None,
            device=None, dtype=None, progress: Optional[bool] = None, patches: bool = False, stop_after: bool = True):
    """The whole output of ``layer`` for ``inputs`` as one float32 numpy array, channel-last
    ``(N, *grid, C)`` (or ``(N * prod(grid), C)`` patch rows with ``patches=True``; row ``r`` is
    image ``r // prod(grid)`` at grid position ``r % prod(grid)``). This is the form that holds
    every activation in memory; :func:`iter_activations` or an
    :class:`edpairs.store.ActivationStore` stream instead."""
    parts = [a.values.numpy() for a in iter_activations(
        model, layer, inputs, layout=layout, batch_size=batch_size, autocast=autocast, device=device,
        dtype=dtype, progress=progress, stop_after=stop_after)]
    if not parts:
        raise ValueError("inputs held no images")
    out = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return out.reshape(-1, out.shape[-1]) if patches else out


# ---------------------------------------------------------------------------------------------
# Model split


class SplitError(ValueError):
    """The model cannot be split automatically at this layer; pass ``head=callable``."""


class ModelSplit:
    """``features(images)``: input -> the layer's output, in the module's native layout (the
    forward pass stops after the layer; gradients flow when enabled by the caller).
    ``head(features)``: a torch tensor (or array), channel-last ``(n, h, w, C)`` for maps or
    ``(n, L, C)`` for tokens (``(n, C)`` for vectors), -> ``(n, n_classes)`` logits,
    differentiable with respect to the features. Both take their input to the model's device
    and floating dtype (a CPU batch, numpy or float64 features reach a CUDA or bfloat16 model),
    run the model in eval mode (its modes are restored afterwards) and never change its
    parameters. ``how`` says how the head was
    built: "sequential", "fx" or "user"."""

    def __init__(self, model, layer: str, head_fn: Callable, *, layout: Optional[str], how: str):
        self.model, self.layer, self.layout, self.how = model, layer, layout, how
        self._module = find_module(model, layer)
        self._head_fn = head_fn
        # The layer's output as features() last saw it, channel-last (None before): what head takes.
        self._seen_shape = None

    def native_layout(self, x) -> str:
        return _layout.infer_layout(x.shape, self.layout)

    def features(self, images, *, channel_last: bool = False):
        torch = _torch()
        if isinstance(images, np.ndarray):
            images = _as_images(images, "features")
        if torch.is_tensor(images):
            images = _to_model(self.model, images)
        tap = _LayerTap(self._module, self.layer, stop_after=True)
        try:
            with _eval_mode(self.model):
                out = _run_batch(tap, self.model, images, self.layer)
        finally:
            tap.remove()
        if torch.is_tensor(images):
            _check_batch_kept(self.layer, images, out)
        try:
            lay = self.native_layout(out)
        except ValueError:
            if channel_last:
                raise
            return out  # (a native output no layout reads: returned as it is)
        cl = _layout.channel_last(out, lay)
        self._seen_shape = tuple(cl.shape)
        return cl if channel_last else out

    def _width(self):
        """The layer's channel count D when known: from its last output, else its declared width."""
        if self._seen_shape is not None:
            return self._seen_shape[-1], f"its output, channel-last, was {self._seen_shape}"
        attr, v = declared_width(self._module)
        return (None, None) if v is None else (v, f"{type(self._module).__name__} with {attr}={v}")

    def head(self, features):
        torch = _torch()
        if not (torch.is_tensor(features) or isinstance(features, (np.ndarray, list, tuple))):
            raise TypeError(f"head expects the layer's channel-last features as a torch tensor or numpy array, "
                            f"got {type(features).__name__}")
        features = _to_model(self.model, features)  # (the model's device and dtype)
        by_rank = {4: "nhwc", 3: "nlc", 2: "nc"}
        shape = tuple(features.shape)
        if features.ndim not in by_rank:
            raise ValueError(f"head expects channel-last features (n, h, w, C), (n, L, C) or (n, C), "
                             f"got shape {shape}")
        native = self.layout or {4: "nchw", 3: "nlc", 2: "nc"}[features.ndim]
        _layout.infer_layout(shape, native)  # checks the rank against the layout
        D, why = self._width()
        seen = self._seen_shape
        if D is not None and (shape[-1] != D or (seen is not None and len(seen) != len(shape))):
            hint = ""
            if features.ndim == 4 and shape[1] == D:
                hint = ("; that looks like the native (n, C, h, w) layout: move the channels last "
                        "(x.permute(0, 2, 3, 1))")
            expected = f"{len(seen)}-D " if seen is not None else ""
            raise ValueError(
                f"head expects the {expected}channel-last output of layer {self.layer!r} with D={D} channels on the "
                f"last axis ({why}; features(x, channel_last=True) gives it), got shape {shape}{hint}")
        with _eval_mode(self.model):
            try:
                return self._head_fn(_layout.from_channel_last(features, native))
            except RuntimeError as exc:
                if D is not None:
                    raise
                raise ValueError(
                    f"the model after layer {self.layer!r} could not take features of shape {shape} (read "
                    f"channel-last: D={shape[-1]} channels on the last axis; expected the layer's output, "
                    f"channel-last, as features(x, channel_last=True) gives it). torch said: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc

    def __call__(self, images):
        """The whole model through the split: ``head(features(images))`` (channel-last between)."""
        return self.head(self.features(images, channel_last=True))

    def __repr__(self) -> str:
        return f"ModelSplit(layer={self.layer!r}, how={self.how!r}, layout={self.layout!r})"


def split_model(model, layer: str, *, head: Optional[Callable] = None, layout: Optional[str] = None) -> ModelSplit:
    """Splits ``model`` at module ``layer`` into ``features`` and ``head`` (see
    :class:`ModelSplit`). ``head`` given: a callable taking the layer's output in its native
    layout and returning logits. Otherwise the tail is found automatically: in nested
    ``nn.Sequential`` containers, the modules after the layer; else by ``torch.fx`` tracing with
    the layer kept as one node, the graph after it. Raises :class:`SplitError` naming the
    reason (tracing fails, the layer runs twice, or the tail reads a value computed before the
    layer other than through its output, e.g. a skip connection across the split). An
    ``nn.DataParallel`` model is split as the module it wraps, which runs on its own device."""
    model, layer = _one_device(model, layer)
    find_module(model, layer)
    if head is not None:
        if not callable(head):
            raise TypeError(f"head must be a callable (layer output -> logits), got {type(head).__name__}")
        return ModelSplit(model, layer, head, layout=layout, how="user")
    tail = _sequential_tail(model, layer)
    if tail is not None:
        return ModelSplit(model, layer, tail, layout=layout, how="sequential")
    return ModelSplit(model, layer, _fx_tail(model, layer), layout=layout, how="fx")


def _sequential_tail(model, layer: str):
    """The modules after ``layer`` when every container on its path is an nn.Sequential."""
    torch = _torch()
    parts = layer.split(".")
    containers = []
    node = model
    for p in parts:
        if not isinstance(node, torch.nn.Sequential):
            return None
        names = [n for n, _ in node.named_children()]
        containers.append((node, names.index(p)))
        node = getattr(node, p)
    stages = []
    for container, i in reversed(containers):
        rest = list(container.children())[i + 1:]
        stages.extend(rest)

    def tail(x):
        for m in stages:
            x = m(x)
        return x

    return tail


def _fx_tail(model, layer: str):
    _torch()  # a clear error when torch is missing
    import torch.fx as fx

    class _KeepLayer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            if qualname == layer:
                return True
            if layer.startswith(qualname + "."):
                return False  # trace through the containers on the way to the layer
            return super().is_leaf_module(m, qualname)

    try:
        graph = _KeepLayer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no automatic split
        raise SplitError(
            f"cannot split {type(model).__name__} at {layer!r} automatically: torch.fx could not trace it "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); pass head=callable, "
            "a function from the layer's output (native layout) to logits"
        ) from exc
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == layer]
    if len(calls) != 1:
        raise SplitError(
            f"cannot split {type(model).__name__} at {layer!r} automatically: the traced graph calls it "
            f"{len(calls)} times; pass head=callable"
        )
    split_node = calls[0]
    items = [u for u in split_node.users if u.op == "call_function" and u.target is operator.getitem
             and isinstance(u.args[1], int) and not isinstance(u.args[1], bool)]
    if items:
        raise SplitError(
            f"cannot split {type(model).__name__} at {layer!r}: the model reads item {items[0].args[1]} of its output, "
            f"so the layer returns a tuple or list, not a tensor (capture and the split take a tensor); split at "
            f"one of its submodules that returns a tensor (see edpairs.capture.layer_names(model))"
        )
    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}

    # Nodes that depend on the layer's output: the tail.
    tail = {split_node}
    for n in nodes[pos[split_node] + 1:]:
        if any(a in tail for a in n.all_input_nodes):
            tail.add(n)
    output = next(n for n in nodes if n.op == "output")
    if output not in tail:
        raise SplitError(f"cannot split at {layer!r}: the model's output does not depend on it; pass head=callable")

    # Values the tail may take from before the layer: parameters/buffers, constants (no input
    # behind them), and the batch size (read from the features instead).
    placeholders = {n for n in nodes if n.op == "placeholder"}
    depends_on_input = set()
    for n in nodes:
        if n in placeholders or any(a in depends_on_input for a in n.all_input_nodes):
            depends_on_input.add(n)

    def is_batch_size(n) -> bool:
        if n.op == "call_method" and n.target == "size":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
            return dim == 0
        if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
            src = n.args[0]
            return isinstance(src, fx.Node) and src.op == "call_function" and src.target is getattr and src.args[1] == "shape"
        return False

    new = fx.Graph()
    feats = new.placeholder("features")
    env = {split_node: feats}
    batch_node = []

    def copy_from_before(n, user):
        if n in env:
            return env[n]
        if is_batch_size(n):
            if not batch_node:
                batch_node.append(new.call_method("size", (feats, 0)))
            env[n] = batch_node[0]
            return env[n]
        if n in depends_on_input:
            raise SplitError(
                f"cannot split {type(model).__name__} at {layer!r} automatically: the tail node "
                f"{user.name!r} ({user.op} {_target_name(user)}) reads {n.name!r} ({n.op} {_target_name(n)}), "
                f"a value computed before {layer!r} other than through its output (a skip connection "
                "across the split); choose a layer at a block boundary or pass head=callable"
            )
        env[n] = new.node_copy(n, lambda a: copy_from_before(a, n))
        return env[n]

    for n in nodes[pos[split_node] + 1:]:
        if n not in tail:
            continue
        for a in n.all_input_nodes:
            if a not in tail:
                copy_from_before(a, n)
        env[n] = new.node_copy(n, lambda a: env[a])
    try:
        gm = fx.GraphModule(model, new)
    except Exception as exc:  # noqa: BLE001
        raise SplitError(f"cannot build the head after {layer!r}: {exc}; pass head=callable") from exc
    return gm


def _target_name(n) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))
