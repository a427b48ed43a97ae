"""A seeded probe set with exact pixel masks, for Network-Dissection scoring of concept
detectors (DESIGN section 6; no Broden can be had here): crops of the real photos that ship in
packages, with colour regions recoloured on them, texture patches pasted on them and filled
shapes drawn on top, every pixel labelled with the concepts visible there."""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import numpy as np

from ._checks import check_int, is_int
from .zoo import _dataset_base

__all__ = ["COLOURS", "CONCEPTS", "SHAPES", "TEXTURES", "ProbeDataset", "ProbeSet", "make_probe_set"]

# Named colours (RGB). Colour regions and shapes use exactly these; textures are achromatic
# (two grey levels), so a texture patch never carries a colour label and vice versa.
COLOURS = {
    "red": (220, 30, 30),
    "yellow": (240, 220, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "purple": (150, 40, 190),
}
TEXTURES = ("stripes", "checker", "dots", "noise")
SHAPES = ("circle", "triangle", "square")
CONCEPTS = tuple(COLOURS) + TEXTURES + SHAPES
CATEGORIES = {**{c: "colour" for c in COLOURS}, **{t: "texture" for t in TEXTURES}, **{s: "shape" for s in SHAPES}}


@dataclasses.dataclass
class ProbeSet:
    """Images and their exact concept masks.

    ``images``: (n, H, W, 3) uint8. ``masks``: (n, n_concepts, H, W) bool — multi-label,
    since a pixel of a red circle is both "red" and "circle"; content drawn later occludes
    earlier content and takes its pixels' labels away. ``concepts``: the names, in mask order;
    ``categories``: "colour" / "texture" / "shape" per concept. ``photo_names``: the photo each
    background was cropped from; ``seed``: the generator's seed."""

    images: np.ndarray
    masks: np.ndarray
    concepts: Tuple[str, ...]
    categories: Tuple[str, ...]
    photo_names: List[str]
    seed: int

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self):
        """EfficientNet-Lite input (n, 3, H, W) float32 in [-1, 1] (``(rgb - 127) / 128``, the
        normalisation of :func:`edpairs.zoo.preprocess`) with no resize or crop, so the masks
        stay aligned with the pixels."""
        import torch

        from .zoo import MEAN_RGB, STDDEV_RGB

        x = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).float()
        return ((x - MEAN_RGB) / STDDEV_RGB).contiguous()

    def dataset(self) -> "ProbeDataset":
        """A map-style torch Dataset view: item i is (tensor (3, H, W), i)."""
        return ProbeDataset(self)

    def coverage(self) -> np.ndarray:
        """Fraction of all pixels labelled with each concept, (n_concepts,)."""
        return self.masks.mean(axis=(0, 2, 3))


class ProbeDataset(_dataset_base()):
    """Torch Dataset over a :class:`ProbeSet`: item i is ``(image (3, H, W) float32 in [-1, 1],
    i)``, preprocessed as :meth:`ProbeSet.tensors` (no resize, masks stay aligned)."""

    def __init__(self, probe: ProbeSet):
        self.probe = probe

    def __len__(self) -> int:
        return len(self.probe)

    def __getitem__(self, i: int):
        import torch

        from .zoo import MEAN_RGB, STDDEV_RGB

        if not is_int(i):
            raise TypeError(f"index must be an integer, got {i!r}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        i = i % len(self)
        x = torch.from_numpy(np.ascontiguousarray(self.probe.images[i])).permute(2, 0, 1).float()
        return ((x - MEAN_RGB) / STDDEV_RGB).contiguous(), i


# ---------------------------------------------------------------------------------------------
# Drawing: every primitive returns a boolean (H, W) region; the caller paints it and labels it.


def _background(rng, photos, size: int):
    """A random square crop (30-100 % of the shorter side) of a random photo, resized to size."""
    from PIL import Image

    j = int(rng.integers(len(photos)))
    name, photo = photos[j]
    H, W = photo.shape[:2]
    side = int(round(min(H, W) * rng.uniform(0.3, 1.0)))
    t = int(rng.integers(0, H - side + 1))
    l = int(rng.integers(0, W - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(photo[t:t + side, l:l + side]))
    out = np.asarray(crop.resize((size, size), Image.BILINEAR), dtype=np.uint8).copy()
    if rng.random() < 0.5:
        out = out[:, ::-1].copy()
    return name, out


def _blob(rng, size: int, radius: float):
    """An irregular star-shaped polygon (8-12 vertices, radii 60-100 % of ``radius``)."""
    from skimage.draw import polygon

    n = int(rng.integers(8, 13))
    cy, cx = rng.uniform(radius * 0.6, size - radius * 0.6, 2)
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = radius * rng.uniform(0.6, 1.0, n)
    rr, cc = polygon(cy + radii * np.sin(angles), cx + radii * np.cos(angles), shape=(size, size))
    region = np.zeros((size, size), bool)
    region[rr, cc] = True
    return region


def _rectangle(rng, size: int, lo: int, hi: int):
    h, w = (int(v) for v in rng.integers(lo, hi + 1, 2))
    t, l = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
    region = np.zeros((size, size), bool)
    region[t:t + h, l:l + w] = True
    return region


def _texture(rng, kind: str, size: int):
    """A full (size, size, 3) uint8 texture of two grey levels (contrast >= 110)."""
    dark = int(rng.integers(0, 80))
    light = int(rng.integers(dark + 110, 256))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind == "stripes":
        period = rng.uniform(8, 16)
        theta = rng.uniform(0, np.pi)
        on = ((xx * np.cos(theta) + yy * np.sin(theta)) % period) < period / 2
    elif kind == "checker":
        cell = int(rng.integers(6, 15))
        on = ((yy // cell + xx // cell) % 2) == 0
    elif kind == "dots":
        spacing = rng.uniform(10, 16)
        r = rng.uniform(2.0, 4.0)
        oy, ox = rng.uniform(0, spacing, 2)
        dy = (yy + oy) % spacing - spacing / 2
        dx = (xx + ox) % spacing - spacing / 2
        on = dy * dy + dx * dx <= r * r
    elif kind == "noise":
        cell = int(rng.integers(1, 4))
        small = rng.random((size // cell + 1, size // cell + 1)) < 0.5
        on = np.repeat(np.repeat(small, cell, 0), cell, 1)[:size, :size]
    else:  # pragma: no cover
        raise ValueError(kind)
    grey = np.where(on, light, dark).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _shape(rng, kind: str, size: int):
    from skimage.draw import disk, polygon

    region = np.zeros((size, size), bool)
    r = rng.uniform(0.1, 0.22) * size  # circumradius / half side
    cy, cx = rng.uniform(r, size - r, 2)
    if kind == "circle":
        rr, cc = disk((cy, cx), r, shape=(size, size))
    else:
        k = 3 if kind == "triangle" else 4
        phase = rng.uniform(0, 2 * np.pi / k)
        angles = phase + 2 * np.pi * np.arange(k) / k
        rad = r if k == 3 else r * np.sqrt(2)  # a square of half side r fits the same box
        if k == 4:
            cy, cx = np.clip([cy, cx], rad, size - rad) if size > 2 * rad else (size / 2, size / 2)
        rr, cc = polygon(cy + rad * np.sin(angles), cx + rad * np.cos(angles), shape=(size, size))
    region[rr, cc] = True
    return region


def _paint(masks, region, labels):
    """Content drawn on ``region`` occludes what was there: its old labels go, the new come."""
    masks[:, region] = False
    for c in labels:
        masks[c, region] = True


def _check_photos(photos) -> List[Tuple[str, np.ndarray]]:
    """``[(name, (H, W, 3) uint8)]`` from a sequence of (name, image) pairs: grey (H, W) or
    (H, W, 1) images become RGB, RGBA loses its alpha; integer images must lie in 0..255 and
    floating-point ones are refused (their scale, 0..1 or 0..255, would be a guess)."""
    if isinstance(photos, (str, bytes, np.ndarray)) or not hasattr(photos, "__iter__"):
        raise TypeError(f"photos must be a list of (name, image) pairs, got {type(photos).__name__}")
    out = []
    for j, item in enumerate(photos):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            got = (f"an array of shape {np.shape(item)}" if hasattr(item, "shape")
                   else f"{type(item).__name__} {item!r:.40}")
            raise TypeError(f"photos must be a list of (name, image) pairs, got photos[{j}] = {got}")
        name, a = item
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a)
        what = f"photos[{j}] ({name!r})"
        if a.ndim == 2:
            a = a[:, :, None]
        if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
            raise ValueError(f"{what} must be an (H, W, 3) RGB image (or (H, W) grey, (H, W, 4) RGBA), "
                             f"got shape {a.shape}")
        if a.shape[0] < 2 or a.shape[1] < 2:
            raise ValueError(f"{what} must be at least 2 x 2 pixels, got shape {a.shape}")
        if a.dtype.kind == "f":
            raise TypeError(f"{what} must be uint8 (pixels 0..255), got {a.dtype}: for floats in [0, 1] pass "
                            f"(image * 255).round().astype(np.uint8)")
        if a.dtype.kind not in "iu":
            raise TypeError(f"{what} must be uint8 (pixels 0..255), got {a.dtype}")
        if a.dtype != np.uint8 and a.size and (a.min() < 0 or a.max() > 255):
            raise ValueError(f"{what} must hold pixels 0..255, got values from {a.min()} to {a.max()}")
        a = a[:, :, :3] if a.shape[2] != 1 else np.repeat(a, 3, axis=2)
        out.append((str(name), np.ascontiguousarray(a.astype(np.uint8, copy=False))))
    if not out:
        raise ValueError("photos is empty: give at least one (name, image) pair")
    return out


def _check_range(name: str, value) -> Tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2 or not all(is_int(v) for v in value)
            or not 0 <= value[0] <= value[1]):
        raise ValueError(f"{name} must be an inclusive (min, max) pair of integers with 0 <= min <= max, got {value!r}")
    return int(value[0]), int(value[1])


def make_probe_set(n_images: int = 64, size: int = 224, seed: int = 0, *, photos=None,
                   n_colour_regions: Tuple[int, int] = (1, 2), n_textures: Tuple[int, int] = (1, 2),
                   n_shapes: Tuple[int, int] = (1, 3)) -> ProbeSet:
    """A seeded probe set of ``n_images`` (size x size) images with exact multi-label masks.

    Each image: a random crop of a photo (``photos``: ``[(name, (H, W, 3) uint8)]``, default
    :func:`edpairs.zoo.photos`; grey (H, W) and RGBA photos are taken as RGB, integer pixels
    must lie in 0..255, floating-point photos are refused rather than guessed at), then, in
    this order (later content occludes earlier):
    ``n_colour_regions`` irregular regions of the photo recoloured in a named colour (the
    photo's luminance kept as shading, so the region keeps its texture: label = the colour);
    ``n_textures`` rectangular achromatic texture patches (stripes, checker, dots, noise: label
    = the texture over the whole patch); ``n_shapes`` filled circles, triangles and squares in
    a named colour (labels = the shape and the colour). Ranges are inclusive (min, max),
    integers with 0 <= min <= max. Image
    i depends only on (seed, i), so a larger set starts with the smaller one. No antialiasing:
    a pixel is labelled exactly where content was drawn."""
    check_int("n_images", n_images)
    check_int("size", size, 32)
    check_int("seed", seed, 0)
    n_colour_regions = _check_range("n_colour_regions", n_colour_regions)
    n_textures = _check_range("n_textures", n_textures)
    n_shapes = _check_range("n_shapes", n_shapes)
    if photos is None:
        from .zoo import photos as zoo_photos

        photos = zoo_photos()
    photos = _check_photos(photos)
    colour_names = list(COLOURS)
    index = {c: i for i, c in enumerate(CONCEPTS)}
    images = np.empty((n_images, size, size, 3), np.uint8)
    masks = np.zeros((n_images, len(CONCEPTS), size, size), bool)
    names = []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        name, img = _background(rng, photos, size)
        names.append(name)
        m = masks[i]
        luminance = img.astype(np.float32).mean(axis=2) / 255.0
        for _ in range(int(rng.integers(n_colour_regions[0], n_colour_regions[1] + 1))):
            colour = colour_names[int(rng.integers(len(colour_names)))]
            region = _blob(rng, size, rng.uniform(size * 0.18, size * 0.32))
            shade = 0.55 + 0.45 * luminance[region][:, None]
            img[region] = np.clip(np.array(COLOURS[colour], np.float32) * shade, 0, 255).astype(np.uint8)
            _paint(m, region, [index[colour]])
        for _ in range(int(rng.integers(n_textures[0], n_textures[1] + 1))):
            kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
            region = _rectangle(rng, size, int(size * 0.22), int(size * 0.45))
            img[region] = _texture(rng, kind, size)[region]
            _paint(m, region, [index[kind]])
        for _ in range(int(rng.integers(n_shapes[0], n_shapes[1] + 1))):
            kind = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = colour_names[int(rng.integers(len(colour_names)))]
            region = _shape(rng, kind, size)
            img[region] = COLOURS[colour]
            _paint(m, region, [index[kind], index[colour]])
        images[i] = img
    return ProbeSet(images, masks, CONCEPTS, tuple(CATEGORIES[c] for c in CONCEPTS), names, int(seed))
