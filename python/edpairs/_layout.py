"""Layouts of a layer's output and the channel-last view the rest of edpairs works in.

A layer gives, per image, a grid of feature vectors: CNN maps ``(N, C, H, W)`` ("nchw"),
channel-last maps ``(N, H, W, C)`` ("nhwc"), token sequences ``(N, L, C)`` ("nlc") or one
vector per image ``(N, C)`` ("nc"). edpairs reads every layout as channel-last
``(N, *grid, C)``, whose rows flatten to patches ``(N * prod(grid), C)`` in image-major,
row-major order: patch ``r`` belongs to image ``r // prod(grid)`` at position
``r % prod(grid)``."""

from __future__ import annotations

from math import prod

LAYOUTS = ("nchw", "nhwc", "nlc", "nc")
_CHANNEL_AXIS = {"nchw": 1, "nhwc": 3, "nlc": 2, "nc": 1}
_NDIM = {"nchw": 4, "nhwc": 4, "nlc": 3, "nc": 2}


def infer_layout(shape, layout=None) -> str:
    """The layout of an output of this shape: ``layout`` when given (checked against the
    rank), else 4-D -> "nchw" (PyTorch's convolution layout), 3-D -> "nlc", 2-D -> "nc"."""
    ndim = len(shape)
    if layout is None:
        by_rank = {4: "nchw", 3: "nlc", 2: "nc"}
        if ndim not in by_rank:
            raise ValueError(f"cannot read a layer output of shape {tuple(shape)}: expected (N, C, H, W) maps, "
                             f"(N, L, C) tokens or (N, C) vectors")
        return by_rank[ndim]
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if ndim != _NDIM[layout]:
        raise ValueError(f"layout {layout!r} expects a {_NDIM[layout]}-D output, got shape {tuple(shape)}")
    return layout


def channel_axis(layout: str) -> int:
    return _CHANNEL_AXIS[layout]


def channel_last(x, layout: str):
    """A channel-last view ``(N, *grid, C)`` of ``x`` (torch tensor or numpy array; no copy)."""
    if layout == "nchw":
        return x.permute(0, 2, 3, 1) if hasattr(x, "permute") else x.transpose(0, 2, 3, 1)
    return x


def from_channel_last(x, layout: str):
    """The inverse of :func:`channel_last` (a view)."""
    if layout == "nchw":
        return x.permute(0, 3, 1, 2) if hasattr(x, "permute") else x.transpose(0, 3, 1, 2)
    return x


def grid_of(shape, layout: str) -> tuple:
    """The per-image grid: ``(H, W)`` for maps, ``(L,)`` for tokens, ``()`` for vectors."""
    if layout == "nchw":
        return tuple(int(s) for s in shape[2:])
    return tuple(int(s) for s in shape[1:-1])


def n_channels(shape, layout: str) -> int:
    return int(shape[_CHANNEL_AXIS[layout]])


def patches(x, layout: str):
    """``(N * prod(grid), C)`` patch rows of ``x`` (a copy only when the layout needs one)."""
    cl = channel_last(x, layout)
    c = cl.shape[-1]
    return cl.reshape(-1, c)


def patches_per_image(grid) -> int:
    return int(prod(grid))
