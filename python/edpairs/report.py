"""A self-contained HTML report of a layer's fitted concept pairs: an atlas of each concept's
top patches and an example concept map, the influence heatmap, the dissection scores,
explanations and interventions, and ``report.json`` with every number shown. The folder opens
offline in a browser (inline CSS, relative links only) and is written atomically."""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import shutil
import tempfile
import time
import uuid
from html.parser import HTMLParser
from typing import Iterable, List, Optional, Sequence
from urllib.parse import unquote, urlsplit

import numpy as np

from ._checks import check_fitted, check_int, is_int
from ._io import check_replaceable_folder, fsync_dir, make_folder
from ._progress import Progress
from .explain import plot_explanation
from .influence import plot_influence

__all__ = ["write_report", "check_report"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
THUMB = 96            # atlas thumbnails are THUMB x THUMB pixels
MAP_SIDE = 256        # concept-map overlays at most this many pixels on the long side,
MAP_MIN = 192         # and at least this many (small images are upsampled)
OUTLINE = (255, 221, 0)
TOP_CLASSES = 5       # influenced classes listed on each atlas card
MEMBER = 0.5          # a cell is a member of a concept when its membership exceeds this (w.x > b)
_ROWS = 1 << 16       # membership rows per detect() call


# ---- inputs --------------------------------------------------------------------------------
def _numpy(a):
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError('the report draws its figures with matplotlib: pip install matplotlib '
                          '(or pip install "edpairs[models]")') from exc


def _check_image(image, what: str, size=None) -> np.ndarray:
    a = _numpy(image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"{what} must be an (H, W, 3) uint8 image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise TypeError(f"{what} must be uint8 (display pixels 0..255), got dtype {a.dtype}")
    if size is not None and a.shape[:2] != tuple(size):
        raise ValueError(f"{what} must be {size[0]} x {size[1]} like its map, got shape {a.shape}")
    return a


def _check_inputs(pairs, images, activations):
    check_fitted(pairs, ("decoding_", "bias_", "encoding_", "detect"))
    W = np.asarray(_numpy(pairs.decoding_))
    if W.ndim != 2:
        raise ValueError(f"pairs.decoding_ must be (I, D), got shape {W.shape}")
    I, D = W.shape
    images = _numpy(images)
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"images must be (n, H, W, 3) uint8 display images, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8 (display pixels 0..255), got dtype {images.dtype}")
    activations = _numpy(activations)
    if activations.ndim != 4:
        raise ValueError(f"activations must be (n, h, w, D) channel-last, got shape {activations.shape}")
    if activations.dtype.kind not in "fiu":
        raise TypeError(f"activations must be real numbers, got dtype {activations.dtype}")
    if activations.shape[0] != images.shape[0]:
        raise ValueError(f"images and activations must hold the same images in the same order, got "
                         f"{images.shape[0]} images and activations of shape {activations.shape}")
    if activations.shape[3] != D:
        raise ValueError(f"the pairs have D={D} channels but activations have shape {activations.shape} "
                         f"(channel-last (n, h, w, D) expected)")
    if images.shape[0] == 0 or min(activations.shape[1:3]) == 0:
        raise ValueError(f"the report needs at least one image and one grid cell, got activations {activations.shape}")
    if activations.dtype.kind == "f":
        per_image = max(1, int(np.prod(activations.shape[1:])))
        step = max(1, (1 << 24) // per_image)  # bounded temporaries
        for start in range(0, activations.shape[0], step):
            ok = np.isfinite(activations[start:start + step]).reshape(-1, per_image).all(1)
            if not ok.all():
                raise ValueError(f"activations contain NaN or Inf (first in image {start + int(np.argmin(ok))}): "
                                 f"every activation must be a finite number")
    return images, activations, I


def _names(names, count: int, what: str) -> Optional[List[str]]:
    if names is None:
        return None
    if isinstance(names, str):
        raise TypeError(f"{what} must be a sequence of {count} strings, got one string")
    names = [str(s) for s in names]
    if len(names) != count:
        raise ValueError(f"{what} must have {count} names, got {len(names)}")
    return names


def _check_dissection(dissection, I: int) -> None:
    for name in ("iou", "best_concept", "best_iou", "concepts", "summary"):
        if not hasattr(dissection, name):
            raise TypeError(f"dissection must be an edpairs.dissect.Dissection, got {type(dissection).__name__} "
                            f"without {name}")
    K = len(np.asarray(dissection.best_iou).ravel())
    if K != I:
        raise ValueError(f"the dissection scores K={K} detectors but the pairs have I={I} concepts "
                         f"(its detectors must be the pairs' concepts, in order)")


def _influence_rows(result, I: int, class_names) -> List[int]:
    """The pairs' concept index of each row of ``result.scores``."""
    for name in ("scores", "significant", "pvalues_adjusted", "classes"):
        if not hasattr(result, name):
            raise TypeError(f"influence must be an edpairs.influence.InfluenceResult, got "
                            f"{type(result).__name__} without {name}")
    scores = np.asarray(result.scores)
    if scores.ndim != 2:
        raise ValueError(f"influence.scores must be (concepts, classes), got shape {scores.shape}")
    rows = getattr(result, "settings", {}).get("concepts")
    rows = list(range(scores.shape[0])) if rows is None else [int(i) for i in rows]
    if len(rows) != scores.shape[0] or any(not 0 <= i < I for i in rows):
        raise ValueError(f"the influence result scores concepts {rows} ({scores.shape[0]} rows) but the pairs "
                         f"have I={I} concepts")
    columns = _influence_columns(result)
    if class_names is not None and (len(columns) != scores.shape[1] or max(columns) >= len(class_names)):
        raise ValueError(f"class_names has {len(class_names)} names but the influence result scores classes "
                         f"{columns[:10]}{' ...' if len(columns) > 10 else ''}")
    return rows


def _influence_columns(result) -> List[int]:
    """The head's class index of each column of ``result.scores`` (all classes in order unless
    the result scored a subset, ``class_indices``)."""
    indices = getattr(result, "class_indices", None)
    return [int(k) for k in indices] if indices else list(range(np.asarray(result.scores).shape[1]))


def _check_explanations(explanations, I: int, class_names) -> list:
    out = []
    for j, rec in enumerate(explanations):
        if not isinstance(rec, dict) or not {"name", "image", "explanation"} <= set(rec):
            raise TypeError(f"explanations[{j}] must be a dict with name, image and explanation, got {rec!r:.80}")
        expl = rec["explanation"]
        if not hasattr(expl, "grid_maps") or not hasattr(expl, "contributions"):
            raise TypeError(f"explanations[{j}]['explanation'] must be an edpairs.explain.Explanation, "
                            f"got {type(expl).__name__}")
        if np.asarray(expl.grid_maps).shape[0] != I:
            raise ValueError(f"explanations[{j}] has maps of {np.asarray(expl.grid_maps).shape[0]} concepts, "
                             f"the pairs have I={I}")
        if class_names is not None and not 0 <= int(expl.predicted) < len(class_names):
            raise ValueError(f"explanations[{j}] explains class {expl.predicted} but class_names has "
                             f"{len(class_names)} names")
        K = int(np.asarray(expl.logits).reshape(-1).shape[0]) if hasattr(expl, "logits") else None
        if class_names is not None and K is not None and len(class_names) != K:
            # (plot_explanation names the classes of the explanation's head: one name each)
            raise ValueError(f"explanations[{j}] has {K} class logits but class_names has {len(class_names)} names")
        out.append(dict(rec, image=_check_image(rec["image"], f"explanations[{j}]['image']")))
    return out


def _check_ranking(ranking, what: str) -> list:
    try:
        return [(str(name), float(p)) for name, p in ranking]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of (class_name, probability) pairs, got {ranking!r:.80}") from None


def _check_interventions(interventions, I: int) -> list:
    out = []
    for j, rec in enumerate(interventions):
        need = {"name", "image", "concept", "before", "after"}
        if not isinstance(rec, dict) or not need <= set(rec):
            raise TypeError(f"interventions[{j}] must be a dict with {sorted(need)} (map, note optional), "
                            f"got {rec!r:.80}")
        concept = int(rec["concept"])
        if not 0 <= concept < I:
            raise ValueError(f"interventions[{j}]['concept'] must be in [0, {I}), got {rec['concept']!r}")
        m = rec.get("map")
        image = _check_image(rec["image"], f"interventions[{j}]['image']")
        if m is not None:
            m = np.asarray(_numpy(m), dtype=np.float64)
            if m.shape != image.shape[:2]:
                raise ValueError(f"interventions[{j}]['map'] must be (H, W) = {image.shape[:2]} like its image, "
                                 f"got shape {m.shape}")
            if not np.all(np.isfinite(m)) or m.min() < -1e-6 or m.max() > 1 + 1e-6:
                raise ValueError(f"interventions[{j}]['map'] must hold memberships in [0, 1], got range "
                                 f"[{np.nanmin(m):.3g}, {np.nanmax(m):.3g}]")
        out.append(dict(name=str(rec["name"]), image=image, concept=concept, map=m,
                        before=_check_ranking(rec["before"], f"interventions[{j}]['before']"),
                        after=_check_ranking(rec["after"], f"interventions[{j}]['after']"),
                        note=None if rec.get("note") is None else str(rec["note"])))
    return out


# ---- arrays --------------------------------------------------------------------------------
def memberships(pairs, activations, *, batch_rows: int = _ROWS) -> np.ndarray:
    """(n, h, w, I) float32 memberships ``pairs.detect`` of every cell, in batches of rows."""
    n, h, w, D = activations.shape
    flat = activations.reshape(-1, D)
    out = np.empty((flat.shape[0], np.asarray(pairs.decoding_).shape[0]), np.float32)
    for start in range(0, flat.shape[0], batch_rows):
        out[start:start + batch_rows] = _numpy(pairs.detect(flat[start:start + batch_rows]))
    return out.reshape(n, h, w, -1)


def top_patches(member: np.ndarray, top_k: int, *, min_membership: float = MEMBER) -> List[List[tuple]]:
    """Per concept, up to ``top_k`` ``(image, row, col, membership)`` by decreasing membership,
    at most one per image (its highest cell; ties go to the lower image and cell index), members
    only: cells of membership above ``min_membership`` (0.5, the detector's threshold
    ``w . x > b``). A concept with members in fewer than ``top_k`` images gets fewer, possibly
    none."""
    n, h, w, I = member.shape
    per_image = member.reshape(n, h * w, I)
    cell = np.argmax(per_image, axis=1)                                  # (n, I)
    best = np.take_along_axis(per_image, cell[:, None, :], axis=1)[:, 0]  # (n, I)
    out = []
    for i in range(I):
        order = [j for j in np.argsort(-best[:, i], kind="stable")[:top_k] if best[j, i] > min_membership]
        out.append([(int(j), int(cell[j, i] // w), int(cell[j, i] % w), float(best[j, i])) for j in order])
    return out


def _resize(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize (``align_corners=False``) of an (H, W) or (H, W, C) array, float64 out."""
    a = np.asarray(a, dtype=np.float64)
    H, W = a.shape[:2]

    def axis(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    r0, r1, fr = axis(H, out_h)
    c0, c1, fc = axis(W, out_w)
    if a.ndim == 3:
        fr, fc = fr[:, None, None], fc[None, :, None]
    else:
        fr, fc = fr[:, None], fc[None, :]
    top = a[r0][:, c0] * (1 - fc) + a[r0][:, c1] * fc
    bottom = a[r1][:, c0] * (1 - fc) + a[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def _patch(image: np.ndarray, grid, row: int, col: int, scale: float, side_out: int = THUMB) -> np.ndarray:
    """The square crop around grid cell (row, col), ``scale`` cells wide, resized to
    ``side_out`` pixels, with the cell outlined."""
    H, W = image.shape[:2]
    h, w = grid
    ch, cw = H / h, W / w
    side = int(min(max(1, round(scale * max(ch, cw))), H, W))
    top = int(np.clip(round((row + 0.5) * ch - side / 2), 0, H - side))
    left = int(np.clip(round((col + 0.5) * cw - side / 2), 0, W - side))
    crop = image[top:top + side, left:left + side]
    thumb = np.clip(np.rint(_resize(crop, side_out, side_out)), 0, 255).astype(np.uint8)
    k = side_out / side
    y0, y1 = int(np.floor((row * ch - top) * k)), int(np.ceil(((row + 1) * ch - top) * k)) - 1
    x0, x1 = int(np.floor((col * cw - left) * k)), int(np.ceil(((col + 1) * cw - left) * k)) - 1
    y0, x0 = max(y0, 0), max(x0, 0)
    y1, x1 = min(y1, side_out - 1), min(x1, side_out - 1)
    if y0 <= y1 and x0 <= x1:
        thumb[y0, x0:x1 + 1] = thumb[y1, x0:x1 + 1] = OUTLINE
        thumb[y0:y1 + 1, x0] = thumb[y0:y1 + 1, x1] = OUTLINE
    return thumb


def _display_size(H: int, W: int):
    """Overlay size: the long side brought into [MAP_MIN, MAP_SIDE] pixels."""
    k = min(max(MAP_MIN, max(H, W)), MAP_SIDE) / max(H, W)
    return max(1, round(H * k)), max(1, round(W * k))


def _overlay(image: np.ndarray, grid_map: Optional[np.ndarray], *, upsample: bool) -> np.ndarray:
    """The image (resized by :func:`_display_size`) with a membership map in [0, 1] overlaid in the
    'inferno' colours at alpha 0.55 (as :func:`edpairs.explain.plot_explanation`)."""
    from matplotlib import colormaps

    H, W = image.shape[:2]
    oh, ow = _display_size(H, W)
    base = _resize(image, oh, ow) if (oh, ow) != (H, W) else image.astype(np.float64)
    if grid_map is None:
        return np.clip(np.rint(base), 0, 255).astype(np.uint8)
    m = np.clip(_resize(grid_map, oh, ow), 0.0, 1.0) if upsample or grid_map.shape != (oh, ow) else grid_map
    colour = colormaps["inferno"](m)[..., :3] * 255.0
    return np.clip(np.rint(0.45 * base + 0.55 * colour), 0, 255).astype(np.uint8)


def _write_png(path: str, rgb: np.ndarray) -> None:
    """An (H, W, 3) uint8 array as PNG, with Pillow (a dependency of matplotlib, so present
    whenever :func:`_require_matplotlib` passed)."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb)).save(path, format="PNG")


def _write_figure(plot, path: str, *args, **kwargs) -> None:
    fig = plot(*args, path, **kwargs)
    fig.clear()  # no pyplot: dropping the reference frees it


# ---- JSON ----------------------------------------------------------------------------------
def _jsonable(x):
    """Plain JSON values: numpy scalars and arrays unwrapped, NaN / Inf as null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


# ---- HTML ----------------------------------------------------------------------------------
def _e(s) -> str:
    return html.escape(str(s), quote=True)


def _num(x, digits: int = 3) -> str:
    x = float(x)
    if not math.isfinite(x):
        return "–"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


def _img(src: str, alt: str, height: int, width: int, cls: str = "", title: str = "") -> str:
    extra = f' class="{cls}"' if cls else ""
    extra += f' title="{_e(title)}"' if title else ""
    return f'<img src="{_e(src)}" alt="{_e(alt)}" width="{width}" height="{height}"{extra}>'


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """Cells are HTML already (callers escape)."""
    h = "".join(f"<th>{c}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    c = f' class="{cls}"' if cls else ""
    return f"<table{c}><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
:root { --fg:#1d2330; --muted:#5d6675; --line:#d9dde4; --card:#f7f8fa; --pos:#b2182b; --neg:#2166ac; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       margin: 0 auto; max-width: 1500px; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 12px; } h2 { font-size: 18px; margin: 28px 0 10px;
     border-bottom: 1px solid var(--line); padding-bottom: 4px; } h3 { font-size: 15px; margin: 0 0 6px; }
nav a { margin-right: 14px; } a { color: #1a5fb4; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.meta td:first-child { color: var(--muted); }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(430px, 1fr)); gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 6px; padding: 10px; }
.patches { display: flex; flex-wrap: wrap; gap: 4px; margin: 6px 0; }
figure { margin: 0; } figcaption { font-size: 11px; color: var(--muted); text-align: center; }
.row { display: flex; gap: 14px; align-items: flex-start; flex-wrap: wrap; }
.muted { color: var(--muted); } .pos { color: var(--pos); } .neg { color: var(--neg); }
.sig { font-weight: 600; }
.bar { display: inline-block; height: 9px; background: #7a8aa6; vertical-align: middle; margin-right: 6px; }
#broken-banner { display: none; background: #c01c28; color: #fff; padding: 10px 14px; font-weight: 600;
                 position: sticky; top: 0; z-index: 10; }
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.getElementsByTagName("img"), broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken++; }
  }
  document.body.dataset.brokenImages = String(broken);
  document.body.dataset.imagesTotal = String(imgs.length);
  if (broken > 0) {
    var banner = document.getElementById("broken-banner");
    banner.textContent = broken + " images failed to load";
    banner.style.display = "block";
  }
});
"""


def _ranking_table(ranking) -> str:
    rows = [(_e(name), f'<span class="bar" style="width:{int(round(80 * min(max(p, 0.0), 1.0)))}px"></span>'
             f"{_num(p)}") for name, p in ranking]
    return _table(["class", "probability"], rows)


# ---- the report ----------------------------------------------------------------------------
def _publish(tmp: str, out_dir: str) -> None:
    """Renames the finished ``tmp`` folder to ``out_dir``; an existing folder is renamed aside
    first and deleted only after the new one is in place."""
    parent, base = os.path.split(out_dir)
    aside = None
    if os.path.lexists(out_dir):
        aside = os.path.join(parent, f".{base}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, aside)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        if aside is not None:
            os.rename(aside, out_dir)
        raise
    fsync_dir(parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# What write_report puts in a report folder: an existing folder holding only these (report.json
# among them; the subfolders only PNGs) is an earlier report, which overwrite may replace.
# Anything else there is someone's files.
REPORT_ENTRIES = ("index.html", "report.json", "influence.png", "atlas", "explanations", "interventions")
_REPORT_SUBFOLDERS = ("atlas", "explanations", "interventions")


def _foreign_report_entries(folder: str) -> list:
    """The entries of ``folder`` that an edpairs report does not write (a report folder without
    report.json counts report.json as missing)."""
    names = sorted(os.listdir(folder))
    foreign = [n for n in names if n not in REPORT_ENTRIES]
    for sub in _REPORT_SUBFOLDERS:
        p = os.path.join(folder, sub)
        if sub in names and (not os.path.isdir(p) or os.path.islink(p)
                             or any(not e.endswith(".png") for e in os.listdir(p))):
            foreign.append(f"{sub}/ (holds more than the report's PNGs)")
    for f in ("index.html", "report.json", "influence.png"):
        if f in names and not os.path.isfile(os.path.join(folder, f)):
            foreign.append(f"{f} (not a file)")
    if not foreign and "report.json" not in names:
        foreign.append("no report.json")
    return foreign


def check_report_folder(out_dir, *, overwrite: bool, what: str = "out_dir", protect=(),
                        overwrite_flag: str = "overwrite=True (CLI --overwrite)") -> None:
    """Whether a report may be written at ``out_dir`` (FileExistsError if not): not a file, not
    the current folder, one of ``protect`` (the images' folders) or a folder holding them, and
    where it exists and is not empty, ``overwrite`` and an earlier report there (the whole
    folder is replaced; :func:`edpairs._io.check_replaceable_folder`)."""
    check_replaceable_folder(out_dir, overwrite=overwrite, entries_of=_foreign_report_entries,
                             kind="an earlier edpairs report", what=what, protect=protect,
                             overwrite_flag=overwrite_flag)


def write_report(out_dir, pairs, images, activations, *, title: str = "edpairs report", concept_names=None,
                 class_names=None, dissection=None, influence=None, explanations=(), interventions=(),
                 meta: Optional[dict] = None, top_k: int = 8, patch_scale: float = 2.0, overwrite: bool = False,
                 progress: Optional[bool] = None, label_min_iou: float = 0.1) -> str:
    """Writes an offline HTML report of fitted concept pairs to the folder ``out_dir``.

    images: (n, H, W, 3) uint8 display images; activations: their (n, h, w, D) channel-last
    layer activations, same order (numpy or torch). pairs: fitted pairs (``decoding_``,
    ``bias_``, ``encoding_``, ``detect``). Optional: concept / class names, a
    :class:`edpairs.dissect.Dissection` of the pairs' concepts (in order), an
    :class:`edpairs.influence.InfluenceResult`, explanations (dicts ``name``, ``image``,
    ``explanation``), interventions (dicts ``name``, ``image``, ``concept``, ``map``,
    ``before``, ``after``, ``note``) and a ``meta`` dict shown in the header. Each atlas card
    shows up to ``top_k`` member cells (membership > 0.5) of highest membership, at most one per
    image (fewer when fewer images hold a member cell), cropped ``patch_scale`` cells wide. The
    folder is built next to ``out_dir`` and renamed into place; an existing non-empty ``out_dir``
    needs ``overwrite=True``. With a dissection, a concept is named after its best probe concept
    only when that IoU reaches ``label_min_iou`` (a detector firing everywhere already scores the
    largest concept's coverage, ~0.06 on the probe set); the label and IoU are shown either way.
    Returns the path of index.html."""
    t_start = time.perf_counter()
    _require_matplotlib()
    images, activations, I = _check_inputs(pairs, images, activations)
    n, H, W = images.shape[:3]
    h, w, D = activations.shape[1:]
    check_int("top_k", top_k)
    if not (isinstance(patch_scale, (int, float, np.number)) and math.isfinite(patch_scale) and patch_scale > 0):
        raise ValueError(f"patch_scale must be a positive number of cells, got {patch_scale!r}")
    if meta is not None and not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict or None, got {type(meta).__name__}")
    concept_names = _names(concept_names, I, "concept_names")
    if class_names is not None:
        if isinstance(class_names, str):
            raise TypeError("class_names must be a sequence of strings, got one string")
        class_names = [str(s) for s in class_names]
    if dissection is not None:
        _check_dissection(dissection, I)
    rows_of = _influence_rows(influence, I, class_names) if influence is not None else None
    explanations = _check_explanations(explanations, I, class_names)
    interventions = _check_interventions(interventions, I)

    labels = best_iou = None
    if dissection is not None:
        labels = [str(s) for s in dissection.labels]
        best_iou = np.asarray(dissection.best_iou, dtype=np.float64).ravel()
    if concept_names is None:
        concept_names = ([f"concept {i} · {labels[i]} (IoU {best_iou[i]:.2f})" if best_iou[i] >= label_min_iou
                          else f"concept {i}" for i in range(I)]
                         if dissection is not None else [f"concept {i}" for i in range(I)])

    check_report_folder(out_dir, overwrite=overwrite)
    out_dir = os.path.abspath(os.fspath(out_dir))
    parent, base = os.path.split(out_dir)
    make_folder(parent, f"the report {out_dir}")

    steps = 1 + I + (influence is not None) + len(explanations) + len(interventions) + 1
    bar = Progress(total=steps, desc="report", enabled=progress, unit=" steps")
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        timing = {}
        t0 = time.perf_counter()
        member = memberships(pairs, activations)
        timing["memberships_s"] = time.perf_counter() - t0
        bar.update(1, "memberships")
        page = _Page(title, concept_names, class_names)
        data = dict(title=title, generated=time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    n_images=n, image_size=[H, W], grid=[h, w], n_features=D, n_concepts=I,
                    top_k=int(top_k), patch_scale=float(patch_scale), concept_names=concept_names)
        fitted = getattr(pairs, "n_samples_", None)
        if is_int(fitted) and fitted > 0:
            data["fit_patches"] = int(fitted)  # rows the pairs were fitted on (images x cells)

        t0 = time.perf_counter()
        os.mkdir(os.path.join(tmp, "atlas"))
        influence_by_concept = {}
        if influence is not None:
            columns = _influence_columns(influence)
            classes = ([class_names[k] for k in columns] if class_names is not None
                       else [str(c) for c in influence.classes])
            scores = np.asarray(influence.scores, dtype=np.float64)
            sig = np.asarray(influence.significant, dtype=bool)
            padj = np.asarray(influence.pvalues_adjusted, dtype=np.float64)
            for r, i in enumerate(rows_of):
                order = sorted(range(scores.shape[1]), key=lambda k: (not sig[r, k], -abs(scores[r, k]), k))
                influence_by_concept[i] = [dict(class_index=columns[k], class_name=classes[k], score=scores[r, k],
                                                p_adjusted=padj[r, k], significant=bool(sig[r, k]))
                                           for k in order[:TOP_CLASSES]]
        tops = top_patches(member, int(top_k))
        coverage = member.mean(axis=(1, 2))                                # (n, I)
        member_images = (member.max(axis=(1, 2)) > MEMBER).sum(axis=0)      # (I,) images holding a member cell
        concepts = []
        for i in range(I):
            patches = []
            for j, (img, r, c, y) in enumerate(tops[i]):
                rel = f"atlas/concept{i:03d}_top{j:02d}.png"
                _write_png(os.path.join(tmp, rel), _patch(images[img], (h, w), r, c, float(patch_scale)))
                patches.append(dict(image=img, row=r, col=c, membership=y, file=rel))
            best_img = int(np.argmax(coverage[:, i]))
            rel = f"atlas/concept{i:03d}_map.png"
            _write_png(os.path.join(tmp, rel), _overlay(images[best_img], member[best_img, :, :, i], upsample=True))
            rec = dict(index=i, name=concept_names[i], patches=patches,
                       member_images=int(member_images[i]),
                       map=dict(image=best_img, coverage=float(coverage[best_img, i]),
                                max_membership=float(member[best_img, :, :, i].max()), file=rel))
            if dissection is not None:
                rec.update(label=labels[i], iou=float(best_iou[i]), labelled=bool(best_iou[i] >= label_min_iou))
            if i in influence_by_concept:
                rec["top_classes"] = influence_by_concept[i]
            concepts.append(rec)
            bar.update(1, f"concept {i + 1}/{I}")
        data["concepts"] = concepts
        timing["atlas_s"] = time.perf_counter() - t0
        page.atlas(concepts, (H, W), n, int(top_k))

        if influence is not None:
            shown = influence
            if dataclasses.is_dataclass(influence):  # the heatmap with the report's names
                shown = dataclasses.replace(influence, classes=list(classes),
                                            concepts=[concept_names[i] for i in rows_of])
            _write_figure(plot_influence, os.path.join(tmp, "influence.png"), shown)
            data["influence"] = _influence_data(influence, rows_of, concept_names, classes)
            page.influence(data["influence"], _png_size(os.path.join(tmp, "influence.png")))
            bar.update(1, "influence")
        if dissection is not None:
            data["dissection"] = _dissection_data(dissection, concept_names)
            page.dissection(data["dissection"])

        if explanations:
            os.mkdir(os.path.join(tmp, "explanations"))
        data["explanations"] = []
        for j, rec in enumerate(explanations):
            rel = f"explanations/explanation{j:03d}.png"
            expl = rec["explanation"]
            _write_figure(plot_explanation, os.path.join(tmp, rel), expl, rec["image"],
                          class_names=class_names, concept_names=concept_names)
            k = int(expl.predicted)
            data["explanations"].append(dict(
                name=str(rec["name"]), file=rel, predicted=k,
                predicted_name=class_names[k] if class_names is not None else f"class {k}",
                logit=float(expl.logit),
                concepts=[dict(r, name=concept_names[r["concept"]]) for r in expl.to_records()]))
            page.explanation(data["explanations"][-1], _png_size(os.path.join(tmp, rel)))
            bar.update(1, "explanations")

        if interventions:
            os.mkdir(os.path.join(tmp, "interventions"))
        data["interventions"] = []
        for j, rec in enumerate(interventions):
            rel_img = f"interventions/intervention{j:03d}_image.png"
            _write_png(os.path.join(tmp, rel_img), _overlay(rec["image"], None, upsample=False))
            rel_map = None
            if rec["map"] is not None:
                rel_map = f"interventions/intervention{j:03d}_map.png"
                _write_png(os.path.join(tmp, rel_map), _overlay(rec["image"], rec["map"], upsample=False))
            data["interventions"].append(dict(name=rec["name"], concept=rec["concept"],
                                              concept_name=concept_names[rec["concept"]], image_file=rel_img,
                                              map_file=rel_map, before=rec["before"], after=rec["after"],
                                              note=rec["note"]))
            page.intervention(data["interventions"][-1], _display_size(*rec["image"].shape[:2]))
            bar.update(1, "interventions")

        header = dict(meta or {})
        pairs_meta = getattr(pairs, "metadata", None)
        if isinstance(pairs_meta, dict):
            header = {**{k: v for k, v in pairs_meta.items()}, **header}
        data["meta"] = header
        timing["total_s"] = time.perf_counter() - t_start
        data["timing"] = timing
        page.header(data)
        with open(os.path.join(tmp, "report.json"), "w", encoding="utf-8") as f:
            json.dump(_jsonable(data), f, indent=1, allow_nan=False)
        with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as f:
            f.write(page.render())
        bar.update(1, "index.html")
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    return os.path.join(out_dir, "index.html")


def _png_size(path: str):
    """(height, width) from a PNG's IHDR chunk."""
    with open(path, "rb") as f:
        head = f.read(24)
    return int.from_bytes(head[20:24], "big"), int.from_bytes(head[16:20], "big")


def _fit(size, width: int):
    """(height, width) scaled to at most ``width`` pixels wide."""
    H, W = size
    k = min(1.0, width / W)
    return max(1, round(H * k)), max(1, round(W * k))


def _influence_tests(result, shape):
    """(tests (I, K) str array, test_note) of an influence result; results without them (made
    before they were recorded) are read from their p-values: all NaN is no test."""
    tests = getattr(result, "tests", None)
    note = str(getattr(result, "test_note", "") or "")
    if tests is None or np.shape(tests) != tuple(shape):
        untested = bool(np.isnan(np.asarray(result.pvalues, dtype=np.float64)).all())
        tests = np.full(shape, "none" if untested else str(result.pvalue))
        if not note:
            note = ("no significance test was run: no noise directions, so no cell is marked significant"
                    if untested else f"{result.pvalue} null (the result does not record per-cell tests)")
    return np.asarray(tests).astype(str), note


def _influence_data(result, rows_of, concept_names, classes) -> dict:
    scores = np.asarray(result.scores, dtype=np.float64)
    sig = np.asarray(result.significant, dtype=bool)
    padj = np.asarray(result.pvalues_adjusted, dtype=np.float64)
    tests, note = _influence_tests(result, scores.shape)
    settings = dict(getattr(result, "settings", None) or {})
    columns = _influence_columns(result)
    cells = [dict(concept=rows_of[r], concept_name=concept_names[rows_of[r]], class_index=columns[k],
                  class_name=classes[k], score=scores[r, k], p_adjusted=padj[r, k], test=tests[r, k])
             for r, k in zip(*np.nonzero(sig))]
    cells.sort(key=lambda c: (c["p_adjusted"], -abs(c["score"])))
    return dict(file="influence.png", concepts=rows_of, classes=list(classes), class_indices=columns, scores=scores,
                pvalues=np.asarray(result.pvalues, dtype=np.float64), pvalues_adjusted=padj, significant=sig,
                strength=float(result.strength), alpha=float(result.alpha), pvalue=str(result.pvalue),
                tested=bool(np.any(tests != "none")), tests=tests, test_note=note,
                n_noise=settings.get("n_noise"), n_images=settings.get("n_images"), significant_cells=cells)


def _dissection_data(d, concept_names) -> dict:
    best = np.asarray(d.best_concept, dtype=np.int64).ravel()
    iou_fit = np.asarray(d.iou_fit, dtype=np.float64) if hasattr(d, "iou_fit") else None
    thresholds = np.asarray(d.thresholds, dtype=np.float64).ravel() if hasattr(d, "thresholds") else None
    rows = []
    for k in range(len(best)):
        rows.append(dict(concept=k, name=concept_names[k], label=str(d.concepts[best[k]]),
                         iou=float(np.asarray(d.best_iou).ravel()[k]),
                         iou_fit=None if iou_fit is None else float(iou_fit[k, best[k]]),
                         threshold=None if thresholds is None else float(thresholds[k])))
    summary = {k: v for k, v in dict(d.summary).items()}
    return dict(summary=summary, per_concept=rows, labels=[str(c) for c in d.concepts],
                iou=np.asarray(d.iou, dtype=np.float64))


class _Page:
    """Collects the HTML of each section; every user string is escaped here."""

    def __init__(self, title: str, concept_names: List[str], class_names):
        self.title, self.concept_names, self.class_names = str(title), concept_names, class_names
        self.sections: List[tuple] = []  # (id, heading, html)
        self.head = ""

    def add(self, ident: str, heading: str, body: str) -> None:
        self.sections.append((ident, heading, body))

    def header(self, data: dict) -> None:
        h, w = data["grid"]
        rows = [("concepts", str(data["n_concepts"])),
                ("images shown", f'{data["n_images"]} (the atlas and concept maps are drawn from these)')]
        fitted = data.get("fit_patches")
        if fitted:
            per_image = f" = {fitted // (h * w)} images of {h} × {w} cells" if fitted % (h * w) == 0 else ""
            rows.append(("pairs fitted on", f"{fitted} patches{per_image}"))
        if data.get("influence") and data["influence"].get("n_images"):
            inf = data["influence"]
            rows.append(("influence scored on", f'{inf["n_images"]} images, {inf["n_noise"]} noise directions '
                                                f'per concept'))
        rows += [
                ("image size", f'{data["image_size"][0]} × {data["image_size"][1]}'),
                ("layer grid", f'{h} × {w}, D = {data["n_features"]}'),
                ("generated", data["generated"]),
                ("report written in", f'{data["timing"]["total_s"]:.2f} s')]
        for key, value in data["meta"].items():
            text = value if isinstance(value, str) else json.dumps(_jsonable(value))
            rows.append((str(key), text))
        self.head = _table(["", ""], [(_e(k), _e(v)) for k, v in rows], "meta")

    def atlas(self, concepts: list, size, n_images: int, top_k: int) -> None:
        cards = []
        mh, mw = _fit(_display_size(*size), 180)
        for c in concepts:
            figs, note = [], ""
            shown = len(c["patches"])
            if shown == 0:
                note = (f'<p class="muted">no member cell (membership &gt; {MEMBER:g}) in these {n_images} '
                        f'images</p>')
            elif shown < top_k:
                holds = "holds" if c["member_images"] == 1 else "hold"
                note = (f'<p class="muted">{shown} of {top_k}: only {c["member_images"]} of the {n_images} '
                        f'images {holds} a member cell (membership &gt; {MEMBER:g})</p>')
            for j, p in enumerate(c["patches"]):
                cap = f'#{p["image"]} · {p["membership"]:.2f}'
                alt = f'{c["name"]}: top patch {j + 1}, image {p["image"]}, cell ({p["row"]}, {p["col"]}), ' \
                      f'membership {p["membership"]:.3f}'
                figs.append(f"<figure>{_img(p['file'], alt, THUMB, THUMB, 'patch', alt)}"
                            f"<figcaption>{_e(cap)}</figcaption></figure>")
            m = c["map"]
            alt = f'{c["name"]}: membership map on image {m["image"]} (mean membership {m["coverage"]:.3f})'
            info = []
            if "label" in c and c.get("labelled", True):
                info.append(f'<div>label <b>{_e(c["label"])}</b>, IoU {_num(c["iou"])}</div>')
            elif "label" in c:
                info.append(f'<div class="muted">unlabelled: best probe concept {_e(c["label"])}, IoU '
                            f'{_num(c["iou"])}</div>')
            if "top_classes" in c:
                items = []
                for t in c["top_classes"]:
                    sign = "pos" if t["score"] > 0 else "neg" if t["score"] < 0 else "muted"
                    cls = f"{sign} sig" if t["significant"] else "muted"
                    star = " *" if t["significant"] else ""
                    items.append(f'<span class="{cls}">{_e(t["class_name"])} {t["score"]:+.2f}{star}</span>')
                info.append("<div>influences: " + ", ".join(items) + "</div>")
            cards.append(
                f'<div class="card" id="concept-{c["index"]}"><h3>{_e(c["name"])}</h3>'
                f'{note}<div class="patches">{"".join(figs)}</div>'
                f'<div class="row"><figure>{_img(m["file"], alt, mh, mw, "map", alt)}'
                f'<figcaption>image {m["image"]}, mean membership {m["coverage"]:.2f}</figcaption></figure>'
                f'<div>{"".join(info)}</div></div></div>')
        self.add("atlas", "Concept atlas",
                 f'<p class="muted">Per concept: up to {top_k} member cells (membership &gt; {MEMBER:g}) of highest '
                 'membership, at most one per image, fewer when fewer images hold one (the outlined square is the '
                 'cell, caption: image · membership), and its membership map on the image it covers most.</p>'
                 f'<div class="cards">{"".join(cards)}</div>')

    def influence(self, d: dict, size) -> None:
        ph, pw = _fit(size, 1400)
        heatmap = _img(d["file"], "influence heatmap of concepts on classes", ph, pw)
        scored = f" on {d['n_images']} images" if d.get("n_images") else ""
        intro = (f'RCAV sign-test scores{scored} for a step of {d["strength"]:g} along each encoding direction: '
                 f'(images whose class probability rises − images where it falls) / images, in [−1, 1].')
        note = _e(d["test_note"].rstrip("."))
        if not d["tested"]:
            self.add("influence", "Influence",
                     f'<p class="muted">{intro}</p><p><b>No significance test was run</b>: no noise directions '
                     f'(n_noise=0; CLI --noise 0), so there are no p-values and no cell is marked; the heatmap '
                     f'shows the scores alone.</p>{heatmap}')
            return
        cells = len(d["concepts"]) * len(d["classes"])
        rows = [(_e(c["concept_name"]), _e(c["class_name"]), f'<span class="{"pos" if c["score"] > 0 else "neg"}">'
                 f'{c["score"]:+.3f}</span>', _num(c["p_adjusted"]), _e(c["test"])) for c in d["significant_cells"]]
        table = (_table(["concept", "class", "score", "adjusted p", "test"], rows) if rows else
                 f'<p class="muted">No significant (concept, class) cell at alpha = {d["alpha"]:g}.</p>')
        self.add("influence", "Influence",
                 f'<p class="muted">{intro} * marks a cell significant after Bonferroni over the {cells} '
                 f'cells.</p><p>Test ({_e(d["pvalue"])} requested): {note}.</p>{heatmap}'
                 f"<h3>Significant cells ({len(rows)})</h3>{table}")

    def dissection(self, d: dict) -> None:
        s = d["summary"]
        covered = s.get("concepts_covered", [])
        summary = _table(["", ""], [
            ("S1", f'{_num(s.get("S1", float("nan")))} <span class="muted">= the sum over detectors of their IoU '
                   f'with their label (∫ #{{detectors with IoU ≥ ξ}} dξ over ξ in [0, 1]; at most '
                   f'{len(d["per_concept"])}, one per detector)</span>'),
            ("S2", f'{_num(s.get("S2", float("nan")))} <span class="muted">= the sum over probe concepts of the '
                   f'best IoU of a detector labelled with it (∫ #{{concepts covered at IoU ≥ ξ}} dξ; at most '
                   f'{len(d["labels"])}, one per probe concept)</span>'),
            ("concepts covered", f"{len(covered)}: " + _e(", ".join(str(c) for c in covered))),
            ("threshold rule", _e(s.get("rule", ""))),
            ("probe images (labels / IoU)", f'{_e(s.get("n_fit", "?"))} / {_e(s.get("n_score", "?"))} '
                                            '<span class="muted">(each detector is labelled and thresholded on one '
                                            'half of the probe images; its IoU is measured on the other)</span>')],
                         "meta")
        ordered = sorted(d["per_concept"], key=lambda r: (-r["iou"], r["concept"]))
        rows = [(_e(r["name"]), _e(r["label"]), _num(r["iou"]),
                 "–" if r["iou_fit"] is None else _num(r["iou_fit"])) for r in ordered]
        self.add("dissection", "Dissection",
                 f'{summary}<h3>Per concept (best first)</h3>'
                 f'{_table(["concept", "label", "IoU (score half)", "IoU (fit half)"], rows)}')

    def explanation(self, d: dict, size) -> None:
        ph, pw = _fit(size, 1300)
        rows = [(_e(r["name"]), f'{r["contribution"]:+.3f}', _num(r["max_membership"]), _num(r["area"]))
                for r in d["concepts"]]
        body = (f'<div class="card"><h3>{_e(d["name"])}: {_e(d["predicted_name"])} (logit {d["logit"]:.2f})</h3>'
                f'{_img(d["file"], "explanation of " + d["name"], ph, pw)}'
                + (_table(["concept", "contribution", "max membership", "area"], rows) if rows
                   else '<p class="muted">no concept present</p>') + "</div>")
        self._append("explanations", "Explanations", body)

    def intervention(self, d: dict, size) -> None:
        ih, iw = _fit(size, 200)
        pics = [f"<figure>{_img(d['image_file'], 'image ' + d['name'], ih, iw)}<figcaption>image</figcaption></figure>"]
        if d["map_file"]:
            pics.append(f"<figure>{_img(d['map_file'], 'map of ' + d['concept_name'] + ' on ' + d['name'], ih, iw)}"
                        f"<figcaption>{_e(d['concept_name'])}</figcaption></figure>")
        note = f'<p class="muted">{_e(d["note"])}</p>' if d["note"] else ""
        body = (f'<div class="card"><h3>{_e(d["name"])}: removing {_e(d["concept_name"])}</h3>{note}'
                f'<div class="row">{"".join(pics)}<div><b>before</b>{_ranking_table(d["before"])}</div>'
                f'<div><b>after</b>{_ranking_table(d["after"])}</div></div></div>')
        self._append("interventions", "Interventions", body)

    def _append(self, ident: str, heading: str, body: str) -> None:
        if self.sections and self.sections[-1][0] == ident:
            self.sections[-1] = (ident, heading, self.sections[-1][2] + body)
        else:
            self.add(ident, heading, body)

    def render(self) -> str:
        nav = " ".join(f'<a href="#{i}">{_e(h)}</a>' for i, h, _ in self.sections)
        nav += ' <a href="report.json">report.json</a>'
        body = "".join(f'<section id="{i}"><h2>{_e(h)}</h2>{b}</section>' for i, h, b in self.sections)
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(self.title)}"
                f"</title><style>{_CSS}</style></head><body>"
                f'<div id="broken-banner" role="alert"></div><h1>{_e(self.title)}</h1>{self.head}'
                f"<nav>{nav}</nav>{body}"
                '<p class="muted">All numbers shown are in <a href="report.json">report.json</a>.</p>'
                f"<script>{_SCRIPT}</script></body></html>\n")


# ---- checking ------------------------------------------------------------------------------
class _Links(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links: List[tuple] = []   # (tag, attribute, value)
        self.ids = set()
        self.bad_images: List[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for name in ("src", "href"):
            if a.get(name) is not None:
                self.links.append((tag, name, a[name]))
        if tag == "img":
            missing = [k for k in ("alt", "width", "height") if not a.get(k)]
            if missing:
                self.bad_images.append(f"<img src={a.get('src')!r}> has no {', '.join(missing)}")


def check_report(out_dir) -> List[str]:
    """The problems of a written report (empty: fine): links that leave the folder, are
    absolute (http, https, file) or point to a missing file or anchor, unreadable PNGs (empty or
    without the PNG signature), images without alt / width / height, an unreadable report.json."""
    root = os.path.realpath(os.fspath(out_dir))
    index = os.path.join(root, "index.html")
    if not os.path.isfile(index):
        return [f"{index} is missing"]
    parser = _Links()
    with open(index, encoding="utf-8") as f:
        parser.feed(f.read())
    parser.close()
    problems = list(parser.bad_images)
    pngs = set()
    for tag, attr, value in parser.links:
        where = f"<{tag} {attr}={value!r}>"
        parts = urlsplit(value)
        if value.startswith("//") or parts.scheme.lower() in ("http", "https", "file", "ftp"):
            problems.append(f"{where} is an absolute link: the report must work offline")
            continue
        if parts.scheme:
            if parts.scheme.lower() != "data":
                problems.append(f"{where} uses the scheme {parts.scheme!r}")
            continue
        if not parts.path:
            if parts.fragment and parts.fragment not in parser.ids:
                problems.append(f"{where} points to a missing anchor")
            continue
        rel = unquote(parts.path)
        if os.path.isabs(rel) or rel.startswith("\\"):
            problems.append(f"{where} is an absolute path")
            continue
        target = os.path.realpath(os.path.join(root, rel))
        if os.path.commonpath([root, target]) != root:
            problems.append(f"{where} leaves the report folder")
        elif not os.path.isfile(target):
            problems.append(f"{where} points to a missing file")
        elif target.lower().endswith(".png"):
            pngs.add(target)
        elif os.path.basename(target) == "report.json":
            try:
                with open(target, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as exc:
                problems.append(f"report.json is not valid JSON: {exc}")
    for folder, _, files in os.walk(root):
        pngs.update(os.path.join(folder, name) for name in files if name.lower().endswith(".png"))
    for path in sorted(pngs):
        with open(path, "rb") as f:
            head = f.read(len(PNG_SIGNATURE))
        if head != PNG_SIGNATURE or os.path.getsize(path) <= len(PNG_SIGNATURE):
            problems.append(f"{os.path.relpath(path, root)} is not a readable PNG")
    return problems
