"""Explain one prediction (DESIGN section 3): the concept maps of an image at a layer, upsampled
to the image, and the contribution of each concept present in it to the logit of the predicted
class — the logit minus the logit with the concept removed at the layer (gated removal,
:func:`edpairs.interventions.remove`) — as data and as a figure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from ._checks import check_fitted, check_int, check_layer_width, check_real, is_int, is_real
from .influence import _figure, save_figure

__all__ = ["Explanation", "explain", "plot_explanation"]


@dataclass
class Explanation:
    """``maps`` (I, H, W): memberships ``y_{p,i}`` upsampled (bilinear) to the image;
    ``grid_maps`` (I, h, w) on the layer's grid; ``present``: concepts with ``y > threshold`` at
    some position, by decreasing contribution; ``contributions`` {concept: logit - logit with the
    concept removed}; ``predicted`` (the class explained), ``logit`` its logit, ``logits`` (K,)."""

    maps: np.ndarray
    grid_maps: np.ndarray
    present: List[int]
    contributions: dict
    predicted: int
    logit: float
    logits: np.ndarray
    removed_logits: dict

    def to_records(self) -> List[dict]:
        return [dict(concept=i, contribution=float(self.contributions[i]),
                     max_membership=float(self.grid_maps[i].max()),
                     area=float((self.grid_maps[i] > 0.5).mean())) for i in self.present]


def _as_split(model_or_split, layer):
    if hasattr(model_or_split, "features") and hasattr(model_or_split, "head"):
        return model_or_split
    from .capture import split_model

    return split_model(model_or_split, layer)


def _as_batch(image):
    import torch

    x = torch.as_tensor(image)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"image must be one preprocessed (C, H, W) or (1, C, H, W) tensor, got {tuple(x.shape)}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("image contains NaN or Inf: every pixel must be a finite number (no concept would be "
                         "found present)")
    return x


def _scale_of(scale, I: int):
    """``scale`` checked (None / "mean", a finite number, or a dict {concept: one of those}), as a
    function concept -> the scale to pass to :func:`edpairs.interventions.remove` for that one concept."""
    def check(v, what):
        if v is None or (isinstance(v, str) and v == "mean"):
            return v
        if not is_real(v) or not math.isfinite(v):
            raise ValueError(f"{what} must be a finite number, 'mean' or None (to the mean's latent factor), "
                             f"got {v!r}")
        return v

    if not isinstance(scale, dict):
        one = check(scale, "scale")
        return lambda i: one
    for c, v in scale.items():
        if not is_int(c) or not 0 <= c < I:
            raise ValueError(f"scale's keys must be concept indices in [0, {I}), got {c!r}")
        check(v, f"scale[{c}]")
    # Each present concept is removed on its own: it takes its own entry (the default when absent).
    return lambda i: {i: scale[i]} if i in scale else None


def explain(model_or_split, layer, image, pairs, *, class_index: Optional[int] = None, threshold: float = 0.5,
            gate: bool = True, scale=None, relu: bool = False) -> Explanation:
    """Explains the prediction of ``image`` (a preprocessed (C, H, W) tensor) by the concepts of
    ``pairs`` at ``layer``.

    model_or_split: a torch model (split at ``layer`` by :func:`edpairs.capture.split_model`) or
    a split (an object with ``features(images, channel_last=True)`` and ``head(features)``).
    class_index: the class to explain (default: the predicted one). A concept is present when
    its membership exceeds ``threshold`` at some position; its contribution is
    ``logit - logit'`` where ``logit'`` is the class logit after removing the concept from every
    position of the layer (``remove(..., gate=gate, scale=scale, relu=relu)``; gated by default,
    so positions where the detector is off are left nearly unchanged). scale: None / ``"mean"``
    (to the mean's latent factor), a finite number, or a dict {concept: either}, where each
    concept takes its own entry (the default when it has none). image: finite values."""
    import torch

    from .interventions import remove

    check_fitted(pairs, ("decoding_", "bias_", "encoding_", "mean_"))
    check_real("threshold", threshold, "a membership level in [0, 1]", lambda v: 0.0 <= v <= 1.0)
    if class_index is not None and not is_int(class_index):
        raise TypeError(f"class_index must be an integer class index or None, got {class_index!r}")
    for name, flag in (("gate", gate), ("relu", relu)):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    scale_of = _scale_of(scale, int(np.shape(pairs.decoding_)[0]))
    split = _as_split(model_or_split, layer)
    x = _as_batch(image)
    with torch.no_grad():
        feats = split.features(x, channel_last=True)               # (1, h, w, D)
        if feats.ndim != 4:
            raise ValueError(f"explain needs a spatial layer (n, h, w, D) output, got {tuple(feats.shape)}")
        logits = split.head(feats)[0].double().cpu().numpy()
        if logits.ndim != 1:
            raise ValueError(f"the head must give one row of class logits per image, got shape "
                             f"{(1,) + logits.shape} for one image")
        k = int(np.argmax(logits)) if class_index is None else int(class_index)
        if not 0 <= k < logits.shape[0]:
            raise ValueError(f"class_index {class_index} is out of range: the head gives {logits.shape[0]} "
                             f"class logits (valid: 0..{logits.shape[0] - 1})")
        h, w, D = (int(s) for s in feats.shape[1:])
        # Memberships sigmoid(W x - b) from the arrays, so any object with the pairs' attributes works.
        W = torch.as_tensor(np.asarray(pairs.decoding_, dtype=np.float32), device=feats.device)
        b = torch.as_tensor(np.asarray(pairs.bias_, dtype=np.float32), device=feats.device)
        check_layer_width(W.shape[1], layer, feats.shape)
        y = torch.sigmoid(feats.reshape(-1, D).float() @ W.T - b)
        y = y.reshape(h, w, -1).permute(2, 0, 1)                  # (I, h, w)
        up = torch.nn.functional.interpolate(y[None], size=tuple(x.shape[-2:]), mode="bilinear",
                                             align_corners=False)[0].clamp(0, 1)
        grid = y.cpu().numpy()
        present = [int(i) for i in np.flatnonzero((grid > threshold).any(axis=(1, 2)))]
        contributions, removed = {}, {}
        for i in present:
            edited = remove(feats, pairs, [i], gate=bool(gate), scale=scale_of(i), relu=bool(relu))
            out = split.head(edited)[0].double().cpu().numpy()
            removed[i] = out
            contributions[i] = float(logits[k] - out[k])
    present.sort(key=lambda i: -contributions[i])
    return Explanation(maps=up.cpu().numpy(), grid_maps=grid, present=present, contributions=contributions,
                       predicted=k, logit=float(logits[k]), logits=logits, removed_logits=removed)


def _display_image(image) -> np.ndarray:
    """(H, W, 3) float in [0, 1] from a (C, H, W) / (1, C, H, W) tensor or an (H, W, 3) array,
    min-max scaled when outside [0, 1] (preprocessed inputs)."""
    a = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    shape = np.shape(a)
    if a.dtype.kind not in "biuf":
        raise TypeError(f"image must be a numeric (C, H, W) / (1, C, H, W) tensor or (H, W, 3) array, "
                        f"got dtype {a.dtype}")
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3) or 0 in a.shape:
        raise ValueError(f"image must be one (C, H, W) / (1, C, H, W) tensor or (H, W, 3) array, got shape {shape}")
    if not np.isfinite(a).all():
        raise ValueError("image contains NaN or Inf: every pixel must be a finite number")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.max() > 1.0 or a.min() < 0.0:
        if a.max() > 1.0 and a.min() >= 0 and a.max() <= 255:
            a = a / 255.0
        else:
            a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    return np.clip(a, 0, 1)


def plot_explanation(result: Explanation, image, path=None, *, max_concepts: int = 8, class_names=None,
                     concept_names=None):
    """The image, then each present concept's map overlaid on it (by decreasing contribution),
    the contribution to the explained class's logit in each title. Returns a matplotlib Figure;
    saved atomically as PNG when ``path`` is given. class_names: one per class of the head (as
    many as ``result.logits``); concept_names: one per concept of the pairs (``result.maps``)."""
    check_int("max_concepts", max_concepts, 0)
    K, I = int(np.shape(result.logits)[0]), int(np.shape(result.maps)[0])
    for what, names, count, of in (("class_names", class_names, K, "classes of the head"),
                                   ("concept_names", concept_names, I, "concepts of the pairs")):
        if names is None:
            continue
        if isinstance(names, (str, bytes)):
            raise TypeError(f"{what} must be a sequence of {count} names, got one string {names!r:.40}")
        if len(names) != count:
            raise ValueError(f"{what} has {len(names)} names for the explanation's {count} {of}")
    shown = result.present[:max_concepts]
    n = 1 + len(shown)
    cols = min(n, 5)
    rows = (n + cols - 1) // cols
    fig = _figure(figsize=(2.6 * cols, 2.8 * rows), dpi=100)
    img = _display_image(image)
    name = class_names[result.predicted] if class_names is not None else f"class {result.predicted}"
    ax = fig.add_subplot(rows, cols, 1)
    ax.imshow(img)
    ax.set_title(f"{name}\nlogit {result.logit:.2f}", fontsize=8)
    ax.axis("off")
    for j, i in enumerate(shown):
        ax = fig.add_subplot(rows, cols, j + 2)
        ax.imshow(img)
        ax.imshow(result.maps[i], cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        label = concept_names[i] if concept_names is not None else f"concept {i}"
        ax.set_title(f"{label}\ncontribution {result.contributions[i]:+.2f}", fontsize=8)
        ax.axis("off")
    if not shown:
        fig.suptitle("no concept present", fontsize=9)
    if path is not None:
        save_figure(fig, path)
    return fig
