"""Model correction without retraining (DESIGN section 3): a torch module that wraps a model and
removes chosen concepts at one layer in every forward pass — the gated removal of
:func:`edpairs.interventions.remove` — and that saves to, and loads from, one pairs file.

Example::

    import edpairs as edp
    from edpairs.correct import CorrectedModel

    pairs = edp.EDPairs(6, random_state=0).fit(patches)       # (N*H*W, C) of model.relu5
    fixed = CorrectedModel(model, "relu5", pairs, remove=[3])  # concept 3: a watermark
    logits = fixed(images)                                     # removal applied at relu5
    fixed.save("fixed.npz")                                    # the pairs + the settings
    again = CorrectedModel.load("fixed.npz", model)            # same outputs

The wrapped model is registered as the submodule ``model`` (so ``.to``, ``.eval``,
``.parameters`` act on it and ``fixed.state_dict()`` holds its entries under ``model.``); its
parameters and buffers are never changed. The edit is installed as a forward hook only while a
:meth:`CorrectedModel.forward` runs (from the first of concurrent calls to the last), so
calling the plain model outside the wrapper gives its original outputs (a call of the plain
model from another thread *while* the wrapper runs would be edited too). A CorrectedModel
deep-copies, pickles (``torch.save``) and runs forwards from several threads at once.
"""

from __future__ import annotations

import copy
import json
import numbers
import os

import numpy as np

from ._arrays import require_torch
from .interventions import Intervention, _as_concepts, _check_flag

__all__ = ["CorrectedModel"]

_SETTINGS_KEY = "edpairs_correction"
_SETTINGS_VERSION = 1


def _torch():
    return require_torch("edpairs.correct")


def _layer_name(model, layer) -> str:
    """The dotted name of ``layer`` (a name, or a module of ``model``) — what the file stores."""
    if isinstance(layer, str):
        return layer
    for name, module in model.named_modules():
        if module is layer and name:
            return name
    if hasattr(layer, "register_forward_hook"):
        raise ValueError(f"the module {type(layer).__name__} given as layer is not a submodule of the model")
    raise TypeError(f"layer must be a dotted module name (str) or a submodule, got {type(layer).__name__}")


def _scale_to_json(scale):
    if isinstance(scale, dict):
        return {"by_concept": [[int(c), v] for c, v in sorted(scale.items())]}
    return {"all": scale}


def _scale_from_json(record, path):
    if not isinstance(record, dict) or not ({"all"} == set(record) or {"by_concept"} == set(record)):
        raise ValueError(f"{path!r}: corrupted correction settings (scale {record!r})")
    if "all" in record:
        return record["all"]
    return {int(c): v for c, v in record["by_concept"]}


def _plain_scale(scale):
    """The scale with numpy numbers as Python ones (the settings are stored as JSON)."""
    def plain(v):
        if isinstance(v, np.generic):
            return v.item()
        if isinstance(v, np.ndarray) and v.ndim == 0:
            return v.item()
        return v

    if isinstance(scale, dict):
        return {(int(c) if isinstance(c, numbers.Integral) and not isinstance(c, (bool, np.bool_)) else c): plain(v)
                for c, v in scale.items()}
    return plain(scale)


def _base():
    return _torch().nn.Module


class CorrectedModel(_base()):
    """``model`` with the concepts ``remove`` removed at ``layer`` in every forward pass.

    model: a ``torch.nn.Module``. layer: the dotted name of the module whose output is edited
    (e.g. ``"features.relu5"``), or the module itself. pairs: fitted :class:`edpairs.EDPairs` at
    that layer (any object with ``decoding_``, ``bias_``, ``encoding_``, ``mean_`` works, but only
    an ``EDPairs`` can be saved); a copy is kept, so refitting the caller's pairs later does not
    change the correction. remove: a concept index or indices. gate, scale, relu, layout: as in
    :func:`edpairs.interventions.remove` — the gated removal ``x' = x - g k s_i`` with
    ``g = sigmoid(w_i.x - b_i)``, ``k`` the concept's centred latent factor by default ("to the
    mean") or a number (dict per concept); ``relu=True`` clamps at 0 afterwards (use it when the
    layer is a ReLU output). ``layout`` of the layer output (default from its rank).

    Errors (at construction): a layer name the model lacks (with close names), a concept index
    outside ``0..I-1``, pairs whose D differs from the layer's declared channels, a scale that is
    not finite, gate / relu that are not True or False; a layer with no declared channel count
    is checked at the first forward, and so is a layer that runs more than once per forward of
    the model (a shared module: refused, :class:`edpairs.capture.SharedModuleError`).

    After each forward, :attr:`last` holds the edit's diagnostics (``gate_mean``,
    ``gated_positions``, ``positions``, ``mean_shift``; see :class:`edpairs.interventions.Intervention`).
    """

    def __init__(self, model, layer, pairs, remove, *, gate: bool = True, scale=None, relu: bool = False,
                 layout=None):
        torch = _torch()
        super().__init__()
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        concepts = _as_concepts(remove, "CorrectedModel: remove")
        if not concepts:
            raise ValueError("CorrectedModel: remove must name at least one concept index")
        gate = _check_flag(gate, "gate", "CorrectedModel")
        relu = _check_flag(relu, "relu", "CorrectedModel")
        scale = _plain_scale(scale)
        self.model = model
        try:
            pairs = copy.deepcopy(pairs)
        except Exception:  # noqa: BLE001 - an uncopyable pairs-like object is used as given
            pass
        # Validates the layer, the concepts, the scale and D, and snapshots the pairs' arrays.
        self._intervention = Intervention(model, layer, pairs, remove=concepts, gate=gate, scale=scale,
                                          relu=relu, layout=layout)
        self.pairs = pairs
        self.layer = _layer_name(model, layer)
        self.concepts = tuple(self._intervention.remove)
        self.gate, self.scale, self.relu, self.layout = gate, scale, relu, layout

    @property
    def last(self) -> Intervention:
        """The intervention object; its attributes describe the last forward's edit."""
        return self._intervention

    def forward(self, *args, **kwargs):
        # The first of concurrent forwards (threads, DataParallel replicas) installs the hook, the
        # last one removes it.
        self._intervention._acquire()
        try:
            return self.model(*args, **kwargs)
        finally:
            self._intervention._release()

    # ---- persistence --------------------------------------------------------------------
    def settings(self) -> dict:
        """The correction settings as stored in the file (JSON-serialisable)."""
        scale = self.scale
        if isinstance(scale, dict):
            bad = {c: v for c, v in scale.items() if not (v is None or v == "mean" or isinstance(v, numbers.Real))}
            if bad:  # pragma: no cover - rejected by the constructor already
                raise ValueError(f"scale values must be numbers or 'mean', got {bad}")
        return {"version": _SETTINGS_VERSION, "layer": self.layer, "remove": list(self.concepts),
                "gate": self.gate, "scale": _scale_to_json(scale), "relu": self.relu, "layout": self.layout,
                "model_class": type(self.model).__name__}

    def save(self, path) -> None:
        """Writes the pairs and the correction settings to one ``.npz`` file, atomically (the
        pairs file format of :meth:`edpairs.EDPairs.save`; the settings live in its metadata
        under ``"edpairs_correction"``, the pairs' own metadata under ``"pairs_metadata"``).
        The model's weights are not stored: save them as usual (``model.state_dict()``)."""
        if not callable(getattr(self.pairs, "save", None)):
            raise TypeError(f"only edpairs.EDPairs pairs can be saved; these pairs are a {type(self.pairs).__name__}")
        settings = self.settings()
        json.dumps(settings)  # fails here, before any file is touched
        stored = copy.copy(self.pairs)
        stored.metadata = {_SETTINGS_KEY: settings, "pairs_metadata": getattr(self.pairs, "metadata", None)}
        stored.save(path)

    @classmethod
    def load(cls, path, model) -> "CorrectedModel":
        """Rebuilds a correction written by :meth:`save` around ``model`` (the same architecture:
        the layer must exist and have the pairs' number of channels)."""
        from .pairs import EDPairs

        path = os.fspath(path)
        pairs = EDPairs.load(path)
        meta = pairs.metadata
        if not isinstance(meta, dict) or _SETTINGS_KEY not in meta:
            raise ValueError(f"{path!r} holds pairs but no correction settings (it was written by EDPairs.save, "
                             f"not CorrectedModel.save); build one with CorrectedModel(model, layer, "
                             f"EDPairs.load(path), remove=[...])")
        s = meta[_SETTINGS_KEY]
        if not isinstance(s, dict) or not {"layer", "remove", "gate", "scale", "relu"} <= set(s):
            raise ValueError(f"{path!r}: corrupted correction settings {s!r}")
        if int(s.get("version", 0)) > _SETTINGS_VERSION:
            raise ValueError(f"{path!r} holds correction settings version {s.get('version')}; this edpairs reads "
                             f"up to version {_SETTINGS_VERSION}: upgrade edpairs")
        pairs.metadata = meta.get("pairs_metadata")
        return cls(model, s["layer"], pairs, [int(c) for c in s["remove"]], gate=bool(s["gate"]),
                   scale=_scale_from_json(s["scale"], path), relu=bool(s["relu"]), layout=s.get("layout"))

    def extra_repr(self) -> str:
        return (f"layer={self.layer!r}, remove={list(self.concepts)}, gate={self.gate}, scale={self.scale!r}, "
                f"relu={self.relu}")
