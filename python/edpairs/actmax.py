"""Activation maximisation check of encoding directions (DESIGN section 3): optimise an input to
raise a concept's decoded value ``w_i . x`` at a layer, then ask how the layer's representation
moved. If the pairs are right, the change follows the encoding direction ``s_i`` (how the
network writes the concept) more than the filter ``w_i`` (how it is read).

The objective is the decoded value averaged over the layer's positions
(``objective="mean"``) or at its largest position (``"max"``). Regularisers, as in feature
visualisation: each step the input is shifted by a random roll of up to ``jitter`` pixels
before the forward pass, and every ``blur_every`` steps it is smoothed by a Gaussian of
``blur_sigma`` pixels. The step is normalised gradient ascent, ``x += lr * g / mean|g|``,
optionally clamped to the input range. Gradients are taken with ``torch.autograd.grad`` with
respect to the input only: the model's parameters and their ``.grad`` are never touched.

Reported: ``delta = mean_p (x_final_p - x_start_p)`` at the layer (both evaluated without
jitter) and ``cos(delta, s_i)`` against ``cos(delta, w_i)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ._checks import check_fitted, check_layer_width, check_real, is_int, is_real

__all__ = ["ActMaxResult", "activation_maximisation"]


@dataclass
class ActMaxResult:
    concept: int
    cos_encoding: float
    cos_decoding: float
    objective_start: float
    objective_final: float
    delta: np.ndarray
    image: object = field(repr=False)
    history: list = field(default_factory=list, repr=False)

    @property
    def closer_to_encoding(self) -> bool:
        return self.cos_encoding > self.cos_decoding


def _features_fn(split_or_model, layer):
    """(images -> channel-last features, the device the model computes on)."""
    import torch

    from .capture import _model_device, split_model

    if hasattr(split_or_model, "features") and hasattr(split_or_model, "head"):
        split = split_or_model
    else:
        # Only the features half is used: a trivial head avoids tracing the model's tail.
        split = split_model(split_or_model, layer, head=lambda f: f)
    model = getattr(split, "model", None)
    device = _model_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    return (lambda x: split.features(x, channel_last=True)), device


def _blur_radius(sigma: float) -> int:
    return max(1, int(round(3 * sigma)))


def _gaussian_blur(x, sigma: float):
    import torch

    radius = _blur_radius(sigma)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    C = x.shape[1]
    pad = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="reflect")
    out = torch.nn.functional.conv2d(pad, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return torch.nn.functional.conv2d(out, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def activation_maximisation(split_or_model, layer, pairs, concept: int, *, steps: int = 64, lr: float = 0.05,
                            jitter: int = 8, blur_every: int = 4, blur_sigma: float = 1.0,
                            objective: str = "mean", start=None, shape=(1, 3, 224, 224), init_std: float = 0.1,
                            clamp=(-1.0, 1.0), target: Optional[float] = None, seed: int = 0) -> ActMaxResult:
    """Optimises an input to raise concept ``concept``'s decoded value at ``layer`` (module
    docstring). split_or_model: a torch model or a split (``features(images,
    channel_last=True)``). start: the starting input (default: Gaussian noise of ``init_std``
    with ``shape``, seeded). clamp: (low, high) input range, or None. Returns an
    ``target``: stop as soon as the objective (measured on the jittered input) reaches it, e.g.
    the largest value natural images give, to keep the representation near the data. Returns an
    :class:`ActMaxResult` with ``cos_encoding = cos(delta, s_i)``, ``cos_decoding =
    cos(delta, w_i)``, the objective before and after, ``delta`` (D,) and the final image. Runs
    inside ``torch.no_grad()`` too (gradients are switched on for the steps); inside
    ``torch.inference_mode()``, which cannot be switched off, it raises a RuntimeError."""
    import torch

    if torch.is_inference_mode_enabled():
        # (inference mode, unlike no_grad, cannot be switched off inside: its tensors never track gradients)
        raise RuntimeError("activation_maximisation needs gradients with respect to the input, which "
                           "torch.inference_mode() disables: call it outside the inference_mode block "
                           "(inside torch.no_grad() is fine)")
    if objective not in ("mean", "max"):
        raise ValueError(f"objective must be 'mean' or 'max', got {objective!r}")
    for name, value in (("steps", steps), ("jitter", jitter), ("blur_every", blur_every)):
        if not is_int(value):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not is_int(concept):
        raise TypeError(f"concept must be an integer, got {concept!r}")
    check_real("lr", lr, "a positive number", lambda v: v > 0)
    check_real("init_std", init_std, "a number >= 0", lambda v: v >= 0)
    if blur_every:
        check_real("blur_sigma", blur_sigma, "a positive number of pixels (or blur_every=0: no blur)", lambda v: v > 0)
    if clamp is not None:
        if (not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not all(is_real(v) for v in clamp)
                or not float(clamp[0]) < float(clamp[1])):
            raise ValueError(f"clamp must be None or a (low, high) pair of numbers with low < high, got {clamp!r}")
    if target is not None:
        check_real("target", target, "a finite number or None", lambda v: True)
    if not (is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    check_fitted(pairs, ("decoding_", "encoding_"))
    W = np.asarray(pairs.decoding_, dtype=np.float64)
    S = np.asarray(pairs.encoding_, dtype=np.float64)
    if not 0 <= int(concept) < W.shape[0]:
        raise IndexError(f"concept {concept} out of range for {W.shape[0]} concepts")
    i = int(concept)
    features, device = _features_fn(split_or_model, layer)
    gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(seed)
    if start is None:  # drawn on the CPU, so that a GPU model starts from the same noise
        x = torch.randn(tuple(shape), generator=gen) * init_std
    else:
        x = torch.as_tensor(start).detach().clone().float()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        what = "start" if start is not None else "shape"
        raise ValueError(f"{what} must give images (n, C, H, W) (or one (C, H, W)), got shape {tuple(x.shape)}")
    radius = _blur_radius(blur_sigma) if blur_every and steps >= blur_every else 0
    if radius >= min(x.shape[-2:]):
        raise ValueError(f"blur_sigma={blur_sigma} needs a blur radius of {radius} pixels, which the "
                         f"{tuple(x.shape[-2:])} input is too small for: lower blur_sigma or set blur_every=0")
    x = x.to(device)  # the steps run where the model is
    w = torch.as_tensor(W[i], dtype=torch.float32, device=device)

    def value(f):  # f: (1, h, w, D) -> scalar objective
        z = (f.reshape(-1, f.shape[-1]) @ w.to(f.dtype))
        return z.mean() if objective == "mean" else z.max()

    with torch.no_grad():
        f_start = features(x)
        check_layer_width(W.shape[1], layer, f_start.shape)
        f_start = f_start.reshape(-1, W.shape[1]).double()
    obj_start = float(f_start.float().matmul(w).mean() if objective == "mean" else f_start.float().matmul(w).max())
    history = []
    x = x.clone()
    for t in range(int(steps)):
        dy, dx = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2)) if jitter else (0, 0)
        with torch.enable_grad():  # (the caller may be inside torch.no_grad())
            xin = x.detach().requires_grad_(True)
            shifted = torch.roll(xin, shifts=(dy, dx), dims=(-2, -1)) if (dy or dx) else xin
            val = value(features(shifted))
            reached = None if target is None else float(val.detach())  # (one read of the device per step)
            if reached is not None and reached >= target:
                history.append(reached)
                break
            (g,) = torch.autograd.grad(val, xin)
        with torch.no_grad():
            x = x + lr * g / g.abs().mean().clamp_min(1e-12)
            if blur_every and (t + 1) % blur_every == 0:
                x = _gaussian_blur(x, blur_sigma)
            if clamp is not None:
                x = x.clamp(float(clamp[0]), float(clamp[1]))
        history.append(float(val.detach()) if reached is None else reached)
    with torch.no_grad():
        f_end = features(x).reshape(-1, W.shape[1]).double()
    z_end = f_end.float().matmul(w)
    obj_end = float(z_end.mean() if objective == "mean" else z_end.max())
    delta = (f_end - f_start).mean(0).cpu().numpy()
    return ActMaxResult(concept=i, cos_encoding=_cos(delta, S[i]), cos_decoding=_cos(delta, W[i]),
                        objective_start=obj_start, objective_final=obj_end, delta=delta, image=x.detach(),
                        history=history)
