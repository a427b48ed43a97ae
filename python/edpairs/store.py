"""An on-disk store of a layer's activations: a folder of memory-mapped ``.npy`` shards plus a
JSON sidecar keyed by model, layer, preprocessing and dtype. Extraction writes atomically,
resumes where it stopped, and the store streams into ``EDPairs.fit`` like any chunk source.

Folder layout::

    store.json            the sidecar (key, grid, D, one entry per finished shard)
    shard-00000.npy       rows = images_in_shard * prod(grid), D columns, float16 or float32

A shard's entry records a fingerprint of the images it was extracted from (``inputs``), so
that a resume fed other images of the same count is refused rather than mixed in.

Shards hold whole images in data order: shard ``k`` covers images
``[k * images_per_shard, min((k + 1) * images_per_shard, n_images))``. Rows are image-major,
so in a complete store row ``r`` is image ``r // prod(grid)`` at grid position
``r % prod(grid)`` (``np.unravel_index(position, grid)`` gives the (row, column) of a map);
:meth:`ActivationStore.locate` answers it for any store."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zlib
from typing import Callable, Iterator, Optional

import numpy as np

from . import _layout
from ._checks import check_int, is_int
from ._io import make_folder, write_atomic

__all__ = ["ActivationStore", "StoreCorrupted", "StoreImagesMismatch", "StoreIncomplete", "StoreKeyMismatch", "extract",
           "foreign_entries", "model_fingerprint"]

SIDECAR = "store.json"
LOCKFILE = ".lock"
FORMAT = "edpairs.activation-store"
VERSION = 1
_DTYPES = ("float16", "float32")


class StoreCorrupted(RuntimeError):
    """A shard is missing, truncated or fails its checksum."""


class StoreIncomplete(RuntimeError):
    """The extraction that wrote the store did not finish."""


class StoreKeyMismatch(ValueError):
    """The folder holds a store of another model, layer, preprocessing or dtype. ``reason``
    says what differs; ``remedy`` what to do, in terms of :func:`extract` (a command line says
    it in its own flags)."""

    def __init__(self, reason: str,
                 remedy: str = "use another folder, or extract(..., overwrite=True) to replace it"):
        super().__init__(reason, remedy)
        self.reason, self.remedy = reason, remedy

    def __str__(self) -> str:
        return f"{self.reason}; {self.remedy}"


class StoreImagesMismatch(StoreKeyMismatch):
    """The images given to resume a store are not those its finished shards were extracted from
    (same settings, same count, other pixels or another order). ``reason`` names the first shard
    found to differ; nothing in the store was changed."""

    def __init__(self, reason: str,
                 remedy: str = ("pass the images it was extracted from, in the same order (a resume adds the "
                                "missing ones); or use another folder, or extract(..., overwrite=True) to start "
                                "again from these images")):
        super().__init__(reason, remedy)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


def _crc32_file(path: str, block: int = 16 * 2**20) -> str:
    crc = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(block)
            if not b:
                break
            crc = zlib.crc32(b, crc)
    return f"crc32:{crc:08x}"


def _shard_header(path: str, store: str, shape: tuple, dtype: np.dtype, hint: str) -> None:
    """Reads the ``.npy`` header of the shard at ``path`` (not its data); a StoreCorrupted naming
    the shard when it is unreadable or holds another shape, order or dtype than the sidecar's."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                found = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                found = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError) as exc:  # (not OSError: an unreadable file says so itself)
        raise StoreCorrupted(f"shard {path} of activation store {store} is not a readable .npy file (its header "
                             f"is unreadable: {exc}); {hint}") from None
    got_shape, fortran, got_dtype = found
    if tuple(got_shape) != tuple(shape) or got_dtype != dtype or (fortran and len(got_shape) > 1):
        order = " (Fortran order)" if fortran else ""
        raise StoreCorrupted(f"shard {path} of activation store {store} holds {got_dtype} {tuple(got_shape)}{order}, "
                             f"its sidecar says {dtype} {tuple(shape)}; {hint}")


def _write_json_atomic(path: str, obj) -> None:
    def write(f):
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")

    write_atomic(path, write, mode="w")


def _write_shard_atomic(path: str, array: np.ndarray) -> tuple:
    """Writes ``array`` as ``.npy`` atomically; returns (checksum of the file's bytes, size in
    bytes). The checksum is computed from the bytes handed to the file, so the data is not
    read back."""
    import io

    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    header = header.getvalue()
    data = memoryview(array).cast("B")

    def write(f):
        f.write(header)
        f.write(data)

    write_atomic(path, write)
    crc = zlib.crc32(data, zlib.crc32(header))
    return f"crc32:{crc:08x}", len(header) + data.nbytes


def model_fingerprint(model, name: Optional[str] = None) -> dict:
    """``{"name", "params"}``: the model's name (default: its class) and a SHA-256 of its
    state_dict (names, dtypes, shapes and bytes), so a store is tied to exact weights."""
    import torch

    h = hashlib.sha256()
    for k, t in model.state_dict().items():
        if not torch.is_tensor(t):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    cls = type(model)
    return {"name": name or f"{cls.__module__}.{cls.__qualname__}", "params": "sha256:" + h.hexdigest()}


_SHARD_FIELDS = ("file", "rows", "images", "checksum", "bytes")


def _read_sidecar(sidecar: str) -> dict:
    """The sidecar's JSON object; a ValueError naming the file when it is empty or not JSON."""
    with open(sidecar, "rb") as f:
        text = f.read()
    try:
        meta = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        why = "the file is empty" if not text.strip() else f"not JSON ({exc})"
        raise ValueError(f"{sidecar} is not a valid edpairs activation store sidecar: {why}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar} is not a valid edpairs activation store sidecar: expected a JSON object, "
                         f"got {type(meta).__name__}")
    return meta


def _missing_fields(meta: dict) -> list:
    """The fields a reader needs that the sidecar lacks (dotted names)."""
    missing = [f for f in ("key", "n_features", "shards") if f not in meta]
    if "key" in meta:
        key = meta["key"]
        if not isinstance(key, dict):
            return missing + ["key (an object)"]
        missing += [f"key.{f}" for f in ("model", "layer", "dtype") if f not in key]
        if "dtype" in key and key["dtype"] not in _DTYPES:
            missing.append(f"key.dtype (one of {', '.join(_DTYPES)})")
        if "model" in key and not (isinstance(key["model"], dict) and "name" in key["model"]):
            missing.append("key.model (an object with a name)")
    shards = meta.get("shards", {})
    if not isinstance(shards, dict):
        return missing + ["shards (an object)"]
    for k, entry in shards.items():
        have = entry if isinstance(entry, dict) else {}
        missing += [f"shards.{k}.{f}" for f in _SHARD_FIELDS if f not in have]
        if not (k.isascii() and k.isdigit()):
            missing.append(f"shards.{k} (keyed by the shard's number)")
        for f in ("rows", "bytes"):
            if f in have and not _count(have[f]):
                missing.append(f"shards.{k}.{f} (an integer >= 0)")
        if "images" in have and not (isinstance(have["images"], list) and len(have["images"]) == 2
                                     and all(_count(v) for v in have["images"])):
            missing.append(f"shards.{k}.images (a [first, end] pair of integers)")
        if "file" in have and not (isinstance(have["file"], str) and have["file"]
                                   and os.path.basename(have["file"]) == have["file"]):
            missing.append(f"shards.{k}.file (a file name in the store's folder)")
        if "inputs" in have and not _valid_inputs(have["inputs"]):
            missing.append(f"shards.{k}.inputs (an object with the digests 'first' and 'all' of its images)")
    if shards and "n_features" in meta and not (_count(meta["n_features"]) and meta["n_features"] >= 1):
        missing.append("n_features (an integer >= 1 once the store has shards)")
    if "version" in meta and not _count(meta["version"]):
        missing.append("version (an integer)")
    grid = meta.get("grid")
    if grid is not None and not (isinstance(grid, list) and all(_count(g) for g in grid)):
        missing.append("grid (a list of integers)")
    elif grid is not None and 0 in grid:
        missing.append(f"grid (sizes >= 1, got {grid})")
    elif grid is None and shards:
        missing.append("grid (a list of integers once the store has shards)")
    if "complete" in meta and not isinstance(meta["complete"], bool):
        missing.append("complete (true or false)")
    if meta.get("layout") is not None and meta["layout"] not in _layout.LAYOUTS:
        missing.append(f"layout (one of {', '.join(_layout.LAYOUTS)}, or null)")
    if meta.get("batch_size") is not None and not (_count(meta["batch_size"]) and meta["batch_size"] >= 1):
        missing.append("batch_size (an integer >= 1, or null)")
    if missing:
        return missing
    return _inconsistent_shards(meta)


def _inconsistent_shards(meta: dict) -> list:
    """The shard entries of a well-typed sidecar that contradict the store's layout: shard ``k``
    holds images ``[k * ips, min((k + 1) * ips, n))``, ``(images) * prod(grid)`` rows, and
    ``k`` is below the number of shards (where the number of images is known)."""
    key, shards = meta["key"], meta.get("shards", {})
    ips = key.get("images_per_shard")
    if not (_count(ips) and ips >= 1):
        return ["key.images_per_shard (an integer >= 1)"] if shards else []
    n = key.get("n_images_expected")
    n = n if _count(n) else meta.get("n_images") if _count(meta.get("n_images")) else None
    ppi = int(np.prod(meta["grid"], dtype=np.int64)) if meta.get("grid") is not None else None
    out = []
    for name, entry in shards.items():
        k = int(name)
        if name != str(k):
            out.append(f"shards.{name} (keyed by the shard's number, without leading zeros)")
            continue
        if n is not None and k >= -(-n // ips):
            out.append(f"shards.{name} (a shard number below {-(-n // ips)}: {n} images, {ips} a shard)")
            continue
        first, end = entry["images"]
        want_end = (k + 1) * ips if n is None else min((k + 1) * ips, n)
        if first != k * ips or not (first < end <= want_end) or (n is not None and end != want_end):
            out.append(f"shards.{name}.images ([{k * ips}, {want_end}] for shard {k}, got {entry['images']})")
        elif ppi is not None and entry["rows"] != (end - first) * ppi:
            out.append(f"shards.{name}.rows ({(end - first) * ppi}: {end - first} images x {ppi} grid positions, "
                       f"got {entry['rows']})")
    return out


def _valid_inputs(value) -> bool:
    """A shard's ``inputs`` entry as :func:`_inputs_entry` writes it."""
    return (isinstance(value, dict) and set(value) == {"first", "all"}
            and all(isinstance(v, str) and ":" in v for v in value.values()))


def _count(value) -> bool:
    """An integer >= 0 as JSON gives it (bool refused)."""
    return is_int(value) and value >= 0


def _json_value(value, what: str):
    try:
        return json.loads(json.dumps(value, sort_keys=True))
    except TypeError as exc:
        raise TypeError(f"{what} must be JSON-serialisable (a string or a dict of plain values), "
                        f"got {type(value).__name__}") from exc


# ---------------------------------------------------------------------------------------------
# Reading


class ActivationStore:
    """An existing activation store (see the module docstring for the folder layout).

    ``verify=True`` checks each shard's checksum the first time it is read by this object
    (:meth:`verify` checks all at once); sizes and ``.npy`` headers are always checked. A store
    whose extraction did not finish raises :class:`StoreIncomplete` when read unless
    ``allow_partial=True``.

    Also a fit source: ``edp.EDPairs(8).fit(store)`` streams :meth:`chunks`."""

    def __init__(self, path, *, verify: bool = True, allow_partial: bool = False):
        self.path = os.fspath(path)
        self.verify_checksums = verify
        self.allow_partial = allow_partial
        sidecar = os.path.join(self.path, SIDECAR)
        if not os.path.isfile(sidecar):
            raise FileNotFoundError(
                f"{self.path} is not an activation store (no {SIDECAR}); create one with "
                "edpairs.store.extract(model, layer, data, path, ...)"
            )
        meta = _read_sidecar(sidecar)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{sidecar} is not an edpairs activation store sidecar")
        missing = _missing_fields(meta)
        if missing:
            raise ValueError(f"{sidecar} is not a valid edpairs activation store sidecar: missing or malformed "
                             f"field(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if meta.get("version", 0) > VERSION:  # (an integer: _missing_fields checked it)
            raise ValueError(f"{sidecar} has format version {meta['version']}; this edpairs reads up to {VERSION}")
        self._meta = meta
        self._verified: set = set()
        self._index()

    def _index(self) -> None:
        shards = self._meta.get("shards", {})
        self._shards = sorted(((int(k), v) for k, v in shards.items()), key=lambda kv: kv[0])
        rows = np.array([v["rows"] for _, v in self._shards], dtype=np.int64)
        self._row_start = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._image_start = np.array([v["images"][0] for _, v in self._shards], dtype=np.int64)

    # -- description
    @property
    def key(self) -> dict:
        """What the store was extracted with: model (name, parameter hash), layer,
        preprocessing, dtype, layout, images_per_shard, n_images_expected."""
        return dict(self._meta["key"])

    @property
    def grid(self) -> tuple:
        return tuple(self._meta.get("grid") or ())

    @property
    def layout(self) -> Optional[str]:
        return self._meta.get("layout")

    @property
    def n_features(self) -> int:
        return int(self._meta["n_features"])

    @property
    def patches_per_image(self) -> int:
        return _layout.patches_per_image(self.grid)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._meta["key"]["dtype"])

    @property
    def complete(self) -> bool:
        return bool(self._meta.get("complete"))

    @property
    def n_images(self) -> int:
        """Images in the finished shards."""
        return int(sum(v["images"][1] - v["images"][0] for _, v in self._shards))

    @property
    def n_patches(self) -> int:
        return int(self._row_start[-1])

    @property
    def n_samples(self) -> int:
        """The rows that chunks() yields (the patches of the finished shards): a fit knows them
        without a counting pass."""
        return self.n_patches

    @property
    def shard_files(self) -> list:
        return [os.path.join(self.path, v["file"]) for _, v in self._shards]

    def __len__(self) -> int:
        return len(self._shards)

    def __repr__(self) -> str:
        k = self._meta["key"]
        state = "complete" if self.complete else "INCOMPLETE"
        return (f"ActivationStore({self.path!r}: {k['model']['name']} {k['layer']!r}, {self.n_images} images x "
                f"{self.grid} x {self._meta.get('n_features')} {k['dtype']}, {len(self)} shards, {state})")

    # -- reading
    def _check_complete(self) -> None:
        if not self.complete and not self.allow_partial:
            expected = self._meta["key"].get("n_images_expected")
            of = f" of {expected}" if expected else ""
            raise StoreIncomplete(
                f"activation store {self.path} is incomplete: the extraction stopped after {len(self)} shards "
                f"({self.n_images}{of} images). Resume it by re-running edpairs.store.extract with the same "
                "arguments, or open it with ActivationStore(path, allow_partial=True) to read the finished shards"
            )

    def _fix_hint(self) -> str:
        return ("rebuild it with store.repair(model, data) or by re-running edpairs.store.extract with the same "
                "arguments (finished shards are verified and those that fail are rebuilt)")

    def _check_shard(self, k: int, entry: dict, checksum: bool) -> None:
        path = os.path.join(self.path, entry["file"])
        if not os.path.isfile(path):
            raise StoreCorrupted(f"shard {path} of activation store {self.path} is missing; {self._fix_hint()}")
        size = os.path.getsize(path)
        if size != entry["bytes"]:
            raise StoreCorrupted(
                f"shard {path} of activation store {self.path} is truncated or altered: expected {entry['bytes']} "
                f"bytes, found {size}; {self._fix_hint()}"
            )
        _shard_header(path, self.path, (entry["rows"], self.n_features), self.dtype, self._fix_hint())
        if checksum and k not in self._verified:
            found = _crc32_file(path)
            if found != entry["checksum"]:
                raise StoreCorrupted(
                    f"shard {path} of activation store {self.path} is corrupted: checksum expected "
                    f"{entry['checksum']}, found {found}; {self._fix_hint()}"
                )
            self._verified.add(k)

    def _load(self, k: int, entry: dict) -> np.ndarray:
        self._check_shard(k, entry, self.verify_checksums)  # (its .npy header: shape and dtype)
        return np.load(os.path.join(self.path, entry["file"]), mmap_mode="r", allow_pickle=False)

    def shard(self, i: int) -> np.ndarray:
        """The ``i``-th finished shard, memory-mapped, ``(rows, D)`` in the stored dtype."""
        n = len(self._shards)
        if not is_int(i):
            raise TypeError(f"shard index must be an integer, got {type(i).__name__} {i!r}")
        if not -n <= i < n:
            raise IndexError(f"shard index {i} is out of range: the store {self.path} has {n} finished shards "
                             f"(valid: 0..{n - 1}, or negative from the end)")
        k, entry = self._shards[i]
        return self._load(k, entry)

    def fingerprint(self) -> str:
        """A SHA-256 over the finished shards' numbers, rows and checksums: what a checkpointed fit
        compares to see that it resumes on the same data (without reading the shards)."""
        h = hashlib.sha256()
        for k, entry in self._shards:
            h.update(f"{k}:{entry['rows']}:{entry['checksum']};".encode())
        return "sha256:" + h.hexdigest()

    def chunks(self) -> Iterator[np.ndarray]:
        """A fresh iterator over the shards as memory-mapped ``(rows, D)`` arrays in the stored
        dtype (float16 or float32; edpairs' kernels read both)."""
        self._check_complete()
        return (self._load(k, entry) for k, entry in self._shards)

    def images(self, batch_images: Optional[int] = None) -> Iterator[np.ndarray]:
        """A fresh iterator over channel-last ``(n, *grid, D)`` arrays: one per shard, or batches
        of ``batch_images`` images (never crossing a shard)."""
        check_int("batch_images", batch_images, optional=True)
        self._check_complete()
        grid, d, ppi = self.grid, self.n_features, self.patches_per_image

        def gen():
            for k, entry in self._shards:
                arr = self._load(k, entry)
                n = entry["rows"] // ppi
                step = batch_images or n
                for s in range(0, n, step):
                    yield arr[s * ppi:min(n, s + step) * ppi].reshape(-1, *grid, d)

        return gen()

    def locate(self, rows):
        """``(image, position)`` int64 arrays for global row indices (rows counted over the
        finished shards in order): the image's index in the data and the flat grid position."""
        given = np.asarray(rows)
        if given.size and given.dtype.kind not in "iu":
            raise TypeError(f"rows must be integer row indices, got dtype {given.dtype}"
                            f"{' (not cut to integers)' if given.dtype.kind == 'f' else ''}")
        if given.size and (given.min() < 0 or given.max() >= self.n_patches):
            raise IndexError(f"rows must be in [0, {self.n_patches}), got [{given.min()}, {given.max()}]")
        rows = given.astype(np.int64)
        i = np.searchsorted(self._row_start, rows, side="right") - 1
        local = rows - self._row_start[i]
        ppi = self.patches_per_image
        return self._image_start[i] + local // ppi, local % ppi

    def verify(self, *, raise_on_error: bool = True) -> list:
        """Checks every finished shard's size, ``.npy`` header (shape and dtype against the
        sidecar) and checksum now. Returns the messages of the shards that fail (raises
        :class:`StoreCorrupted` on the first one by default)."""
        problems = []
        for k, entry in self._shards:
            self._verified.discard(k)
            try:
                self._check_shard(k, entry, True)
            except StoreCorrupted as exc:
                if raise_on_error:
                    raise
                problems.append(str(exc))
        return problems

    def repair(self, model, data, **kwargs) -> "ActivationStore":
        """Rebuilds missing, truncated or corrupted shards (and finishes an interrupted
        extraction) by running :func:`extract` with this store's key; ``data`` must be the
        data it was extracted from. Returns the repaired store."""
        k = self._meta["key"]
        store = extract(model, k["layer"], data, self.path, images_per_shard=k["images_per_shard"], dtype=k["dtype"],
                        preprocessing=k["preprocessing"], layout=k["layout"], model_name=k["model"]["name"], **kwargs)
        self.__init__(self.path, verify=self.verify_checksums, allow_partial=self.allow_partial)
        return store


# ---------------------------------------------------------------------------------------------
# Writing


# Fingerprints of the images. Each image fed to the model gets a CRC-32 of its dtype, shape and
# bytes, and a shard records the first image's tag and a BLAKE2b of all its tags (``inputs``).
# It is taken from the batches as they are fed (no image is read for it), and zlib's CRC-32 runs
# at several GB/s, four times BLAKE2b, so it keeps pace with a GPU's extraction; it is a check
# against other images given by mistake, not against tampering. On resume the finished shards
# are compared where that costs no second read of the images: a tensor or array is in memory (all
# their images are compared), an iterable is read in full anyway (its finished batches are
# compared on their way past), a map-style dataset loads one image per finished shard (its first).
# File names, sizes and mtimes would serve only image files, and a tensor has none.


def _image_tags(images) -> Optional[list]:
    """One CRC-32 per image of the batch ``images`` (a tensor or numpy array ``(n, ...)``), over its
    dtype, its shape and its bytes as the model is fed them; None when they cannot be read as
    numbers (capture refuses such a batch itself)."""
    import torch

    try:
        if torch.is_tensor(images):
            t = images.detach().to("cpu").contiguous()
            name, shape = str(t.dtype).replace("torch.", ""), tuple(t.shape)
            raw = t.reshape(shape[0], -1).view(torch.uint8).numpy()
        elif isinstance(images, np.ndarray) and images.dtype.kind in "biufc":
            a = np.ascontiguousarray(images)
            name, shape = a.dtype.name, a.shape
            raw = a.reshape(shape[0], -1).view(np.uint8)
        else:
            return None
    except (RuntimeError, TypeError, ValueError, IndexError):  # a 0-d batch, a dtype without bytes
        return None
    seed = zlib.crc32(f"{name}|{shape[1:]}|".encode())
    return [zlib.crc32(row, seed) for row in raw]


def _inputs_entry(tags) -> Optional[dict]:
    """A shard's ``inputs`` from the tags of its images in order (None when one is unknown)."""
    if tags is None or not len(tags) or any(t is None for t in tags):
        return None
    everything = hashlib.blake2b(np.asarray(tags, dtype="<u4").tobytes(), digest_size=16)
    return {"first": f"crc32:{tags[0]:08x}", "all": "blake2b:" + everything.hexdigest()}


def _image_of_item(item):
    """The image of one item of a map-style dataset (as capture's batches read it)."""
    from .capture import _split_item

    return item if isinstance(item, np.ndarray) else _split_item(item)[0]


def _compare_inputs(path: str, k: int, entry: dict, found: Optional[dict], first_only: bool = False,
                    remedy: Optional[str] = None) -> None:
    """A :class:`StoreImagesMismatch` when the images found for finished shard ``k`` are not those
    its ``entry`` was extracted from (nothing to compare when either side is unknown)."""
    stored = entry.get("inputs")
    if stored is None or found is None:
        return
    first, end = entry["images"]
    if found["first"] != stored["first"]:
        where = f"image {first} (the first of shard {k}, images {first}..{end - 1})"
    elif not first_only and found["all"] != stored["all"]:
        where = f"shard {k}, images {first}..{end - 1} (not its first image, {first})"
    else:
        return
    reason = f"the images differ from those the activation store {path} holds the activations of, first at {where}"
    raise StoreImagesMismatch(reason) if remedy is None else StoreImagesMismatch(reason, remedy)


def _check_finished_images(store: "ActivationStore", data, in_memory: bool, is_map: bool) -> None:
    """Compares the images of ``store``'s finished shards with ``data``'s: all of them when ``data``
    is in memory, the first of each shard for a map-style dataset (an iterable: as it is read)."""
    for k, entry in store._shards:
        if "inputs" not in entry:  # (a shard of an older edpairs: not fingerprinted)
            continue
        first, end = entry["images"]
        if in_memory:
            _compare_inputs(store.path, k, entry, _inputs_entry(_image_tags(data[first:end])))
        elif is_map:
            try:
                found = _inputs_entry(_image_tags(_image_of_item(data[first])[None]))
            except Exception:  # (an item capture cannot read: it names the problem itself)
                found = None
            _compare_inputs(store.path, k, entry, found, first_only=True)


class _InputTags:
    """The tags of the images an extraction feeds the model, gathered per shard for the shards it
    writes (``done``: shard -> ``inputs``), and compared on the way past with the finished shards
    in ``check`` (shard -> its sidecar entry) once all their images went by."""

    def __init__(self, path: str, ips: int, n_known: Optional[int], needed: Callable[[int], bool], check: dict,
                 remedy: Optional[str] = None):
        self.path, self.ips, self.n_known, self.needed, self.remedy = path, ips, n_known, needed, remedy
        self.check = dict(check)
        self.tags: dict = {}  # shard -> {image: tag or None}
        self.done: dict = {}

    def _size(self, k: int) -> int:
        if k in self.check:
            first, end = self.check[k]["images"]
            return end - first
        return self.ips if self.n_known is None else min(self.ips, self.n_known - k * self.ips)

    def add(self, start: int, n: int, tags: Optional[list]) -> None:
        """Images ``start .. start + n - 1`` were fed, with these tags (None: unknown)."""
        for i in range(n):
            k = (start + i) // self.ips
            if k in self.check or self.needed(k):
                seen = self.tags.setdefault(k, {})
                seen[start + i] = None if tags is None else tags[i]
                if len(seen) == self._size(k):
                    self._close(k)

    def end(self, n_seen: int) -> None:
        """The data ended after ``n_seen`` images: the last shard of data of unknown length is whole."""
        k = (n_seen - 1) // self.ips
        if n_seen and k in self.tags and k not in self.check and len(self.tags[k]) == n_seen - k * self.ips:
            self._close(k)

    def _close(self, k: int) -> None:
        seen = self.tags.pop(k)
        found = _inputs_entry([seen[i] for i in sorted(seen)])
        if k in self.check:
            _compare_inputs(self.path, k, self.check.pop(k), found, remedy=self.remedy)
        elif found is not None:
            self.done[k] = found


def _tagged_dataset(dataset, tags: _InputTags):
    """``dataset`` (map-style) with the image of each item it gives tagged on the way."""
    from torch.utils.data import Dataset

    class Tagged(Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            item = dataset[i]
            if tags.needed(i // tags.ips):
                try:
                    image = _image_of_item(item)
                    found = _image_tags(image[None])
                except Exception:  # (an item capture cannot read: it names the problem itself)
                    found = None
                tags.add(i, 1, found)
            return item

    return Tagged()


def _tagged_batches(batches, tags: _InputTags):
    """The iterable of batches ``batches`` with each batch's images tagged on the way (finished
    shards are compared as their batches go past, before any shard is written)."""
    s = 0
    for item in batches:
        try:
            images = _image_of_item(item)
            n = int(images.shape[0])
        except Exception:  # (capture refuses the batch and says why)
            yield item
            return
        tags.add(s, n, _image_tags(images))
        s += n
        yield item
    tags.end(s)


def _counted(acts, bar):
    """The activations of ``acts``, counted on ``bar`` (closed when they end or are left)."""
    try:
        for act in acts:
            bar.update(len(act.index))
            yield act
    finally:
        bar.close()


def _differences(old: dict, new: dict, prefix: str = "") -> list:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: stored {a!r}, requested {b!r}")
    return out


def _holds_nothing(meta: dict) -> bool:
    """A store's sidecar that lists no finished shard."""
    return meta.get("format") == FORMAT and meta.get("shards") == {}


def _is_temporary(name: str) -> bool:
    """A leftover of an interrupted atomic write (edpairs._io.write_atomic's naming)."""
    return name.endswith(".tmp") and (name.startswith(".shard-") or name.startswith("." + SIDECAR))


def _is_store_file(name: str) -> bool:
    """A file a store's folder holds: the sidecar, the lock, a shard or a temporary write."""
    return (name in (SIDECAR, LOCKFILE) or (name.startswith("shard-") and name.endswith(".npy"))
            or _is_temporary(name))


def foreign_entries(path) -> list:
    """The entries of the folder ``path`` that are not an activation store's files (sorted):
    what replacing the store there (``overwrite=True``) would leave beside it, and what says the
    folder is not (only) a store."""
    path = os.fspath(path)
    return sorted(n for n in os.listdir(path) if not (_is_store_file(n) and os.path.isfile(os.path.join(path, n))))


def _clear(path: str) -> None:
    for name in os.listdir(path):
        if name != LOCKFILE and _is_store_file(name):
            os.remove(os.path.join(path, name))


@contextlib.contextmanager
def _exclusive(path: str):
    """An advisory lock on the store's folder for one extraction at a time (released by the OS
    when the process ends, even when killed)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform: no lock
        yield
        return
    fd = os.open(os.path.join(path, LOCKFILE), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise RuntimeError(f"another process is extracting into {path}; wait for it to finish or use "
                               "another folder (one writer per store)") from exc
        yield
    finally:
        os.close(fd)


def extract(model, layer: str, data, path, *, images_per_shard: int = 256, dtype: str = "float16",
            preprocessing=None, batch_size: Optional[int] = None, layout: Optional[str] = None, autocast=None,
            device=None, model_name: Optional[str] = None, progress: Optional[bool] = None, overwrite: bool = False,
            verify: bool = True, on_shard: Optional[Callable[[int, str], None]] = None,
            fingerprint: Optional[dict] = None) -> ActivationStore:
    """Captures ``layer`` of ``model`` over ``data`` into the store at ``path``, creating it or
    resuming it, and returns the :class:`ActivationStore`. ``fingerprint``: the caller's
    :func:`model_fingerprint` ``(model, model_name)`` when it has it already (a model is hashed
    once per command; it is taken as given), else computed here.

    ``data``: a tensor of images, a map-style torch Dataset, a DataLoader or any iterable of
    batches (as for :func:`edpairs.capture.iter_activations`); it must yield the same images
    in the same order on every run. ``preprocessing``: a string or dict describing how the
    images were prepared (part of the key). ``dtype``: "float16" or "float32".

    Resuming: a folder holding a store with the same key keeps its finished shards (verified
    with their checksums when ``verify``; failing ones are rebuilt) and only the missing
    images go through the model: tensors and datasets load only the batches that cover them,
    other iterables are read but their other batches skipped before the model
    (``batch_size`` defaults to the first run's, else 32). A different key raises
    :class:`StoreKeyMismatch` naming what differs (``overwrite=True`` replaces the store).
    Other images with the same key raise :class:`StoreImagesMismatch` (``overwrite=True``
    replaces the store) naming the first finished shard whose images differ, before anything
    is written: each shard records a fingerprint of its images, taken as they are fed, and a
    tensor's images are all compared, a map-style dataset's first image of each finished
    shard, an iterable's finished batches as they go past (too late for ``overwrite=True`` to
    replace the store; a complete store is returned without reading an iterable). Shards
    written by an edpairs without fingerprints are not compared.
    Shard boundaries depend only on image indices, and batches are cut at multiples of
    ``batch_size``, so an interrupted and resumed extraction writes the same bytes as an
    uninterrupted one with the same ``batch_size``. Every shard is written to a temporary
    file, fsynced and renamed, then the sidecar is replaced atomically; ``on_shard(k, file)``
    is called after that. One extraction at a time per folder (a file lock); memory: one
    shard buffer (``images_per_shard * prod(grid) * D`` values, two while a batch straddles a
    shard boundary) plus one batch."""
    path = os.fspath(path)
    check_int("images_per_shard", images_per_shard)
    check_int("batch_size", batch_size, optional=True)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} is a file; an activation store is a folder: name a folder (new or a store)")
    make_folder(path, "the activation store")
    with _exclusive(path):
        return _extract(model, layer, data, path, images_per_shard=images_per_shard, dtype=dtype,
                        preprocessing=preprocessing, batch_size=batch_size, layout=layout, autocast=autocast,
                        device=device, model_name=model_name, progress=progress, overwrite=overwrite, verify=verify,
                        on_shard=on_shard, fingerprint=fingerprint)


def _extract(model, layer: str, data, path, *, images_per_shard: int = 256, dtype: str = "float16",
            preprocessing=None, batch_size: Optional[int] = None, layout: Optional[str] = None, autocast=None, device=None,
            model_name: Optional[str] = None, progress: Optional[bool] = None, overwrite: bool = False,
            verify: bool = True, on_shard: Optional[Callable[[int, str], None]] = None,
            fingerprint: Optional[dict] = None) -> ActivationStore:
    import torch

    from ._progress import Progress
    from .capture import _is_map_dataset, iter_activations, n_images_of

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if layout is not None and layout not in _layout.LAYOUTS:
        raise ValueError(f"layout must be one of {_layout.LAYOUTS} or None (from the output's rank), got {layout!r}")
    if int(images_per_shard) < 1 or (batch_size is not None and int(batch_size) < 1):
        raise ValueError(f"images_per_shard and batch_size must be >= 1, got {images_per_shard}, {batch_size}")
    ips = int(images_per_shard)
    path = os.fspath(path)
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        raise ValueError("extract needs the images in the same order on every run (shards are cut by image index); "
                         "pass a DataLoader with shuffle=False, or the Dataset itself")
    from .capture import _one_device, find_module

    find_module(*_one_device(model, layer))  # a wrong name is refused before the folder is written to
    n_expected = n_images_of(data)
    if n_expected == 0:
        raise ValueError("data held no images")
    key = {
        "model": dict(fingerprint) if fingerprint is not None else model_fingerprint(model, model_name),
        "layer": layer,
        "preprocessing": _json_value(preprocessing, "preprocessing"),
        "dtype": dtype,
        "layout": layout,
        "images_per_shard": ips,
        "n_images_expected": n_expected,
    }
    sidecar = os.path.join(path, SIDECAR)
    meta = None
    if os.path.isfile(sidecar):
        try:
            meta = _read_sidecar(sidecar)
        except ValueError as exc:
            if not overwrite:
                raise ValueError(f"{exc}; use another folder, or extract(..., overwrite=True) to replace it") from None
            meta = {}
        if meta.get("key") != key:
            # A store with no shard written (its first extraction failed before one was done)
            # holds nothing to lose: a call with other settings takes its place.
            if not overwrite and not _holds_nothing(meta):
                diff = "; ".join(_differences(meta.get("key", {}), key))
                raise StoreKeyMismatch(f"{path} holds an activation store extracted with other settings ({diff})")
            meta = None
            _clear(path)
    elif any(n.endswith(".npy") for n in os.listdir(path)):
        if not overwrite:
            raise StoreKeyMismatch(f"{path} holds .npy files but no {SIDECAR}",
                                   "use an empty folder or overwrite=True")
        _clear(path)
    # The finished shards' images, where that needs no second read of them (see _image_tags), before
    # anything in the folder is touched: a refused resume leaves the store as it was.
    in_memory, is_map = torch.is_tensor(data) or isinstance(data, np.ndarray), _is_map_dataset(data)
    if meta is not None:
        try:
            _check_finished_images(ActivationStore(path, verify=verify, allow_partial=True), data, in_memory, is_map)
        except StoreImagesMismatch:
            if not overwrite:
                raise
            meta = None  # (a store of other images is replaced, as one of other settings)
            _clear(path)
    if batch_size is None:  # a resumed extraction cuts the same batches as the first run
        batch_size = int(meta.get("batch_size") or 32) if meta is not None else 32
    batch_size = int(batch_size)
    if meta is None:
        meta = {"format": FORMAT, "version": VERSION, "key": key, "grid": None, "layout": None, "n_features": None,
                "batch_size": batch_size, "shards": {}, "complete": False, "n_images": None}
        _write_json_atomic(sidecar, meta)
    # Leftovers of an interrupted write.
    for name in os.listdir(path):
        if _is_temporary(name):
            os.remove(os.path.join(path, name))

    # Keep the finished shards that pass verification.
    store = ActivationStore(path, verify=verify, allow_partial=True)
    finished = {}
    for k, entry in store._shards:
        try:
            store._check_shard(k, entry, verify)
            finished[k] = entry
        except StoreCorrupted:
            fp = os.path.join(path, entry["file"])
            if os.path.exists(fp):
                os.remove(fp)
    # The number of images: known from the data, or from an earlier complete run over it.
    n_known = n_expected if n_expected is not None else meta.get("n_images")
    n_shards = None if n_known is None else -(-n_known // ips)
    if len(finished) != len(meta["shards"]):
        meta["shards"] = {str(k): v for k, v in finished.items()}
        meta["complete"] = False
        if not finished:  # what the layer gives is learnt again (a hand-edited width is not kept)
            meta["grid"] = meta["layout"] = meta["n_features"] = None
        _write_json_atomic(sidecar, meta)
    if meta["complete"] and n_shards is not None and all(k in finished for k in range(n_shards)):
        return ActivationStore(path, verify=verify)

    def needed(k: int) -> bool:
        return k not in finished and (n_shards is None or k < n_shards)

    def wanted(s: int, e: int) -> bool:
        return any(needed(k) for k in range(s // ips, (e - 1) // ips + 1))

    # The images' tags: a tensor's are taken from it when a shard is written; a dataset's and an
    # iterable's as they are fed (an iterable's finished shards compared on the way past).
    # An iterable's images are compared after the store was kept: overwrite=True cannot replace it then.
    late = (f"pass the images it was extracted from, in the same order; or use another folder, or delete the store's "
            f"files in {path} to start again from these images (an iterable's images are compared as they are "
            "read, after the store was kept)") if overwrite else None
    tags = _InputTags(path, ips, n_known, needed, {} if in_memory or is_map else
                      {k: e for k, e in finished.items() if "inputs" in e}, late)
    feed = data if in_memory else _tagged_dataset(data, tags) if is_map else _tagged_batches(data, tags)

    f16_max = float(np.finfo(np.float16).max)
    buffers: dict = {}  # shard -> [rows array, images filled]
    seen = [0]

    def flush(k: int, n_images_in_shard: int) -> None:
        arr = buffers.pop(k)[0][:n_images_in_shard * ppi]
        name = _shard_name(k)
        first, end = k * ips, k * ips + n_images_in_shard
        inputs = _inputs_entry(_image_tags(data[first:end])) if in_memory else tags.done.pop(k, None)
        checksum, nbytes = _write_shard_atomic(os.path.join(path, name), arr)
        entry = {"file": name, "rows": int(arr.shape[0]), "images": [first, end], "checksum": checksum,
                 "bytes": int(nbytes)}
        if inputs is not None:
            entry["inputs"] = inputs
        meta["shards"][str(k)] = entry
        _write_json_atomic(sidecar, meta)
        if on_shard is not None:
            on_shard(k, os.path.join(path, name))

    # Whole shards wait to be written while finished shards after them are still to be compared
    # (an iterable resumed over a rebuilt shard): a refused resume writes nothing.
    whole: list = []

    def flush_whole() -> None:
        while whole and not tags.check:
            flush(*whole.pop(0))

    ppi = None
    # (the bar is drawn here: the tagged iterable no longer tells iter_activations its length)
    bar = Progress(total=n_expected, desc=f"capture {layer}", enabled=progress, unit=" images")
    acts = iter_activations(model, layer, feed, layout=layout, batch_size=batch_size, autocast=autocast, device=device,
                            dtype=torch.float32, progress=False, _wanted=wanted, _seen=seen)
    for act in _counted(acts, bar):
        values = act.values
        grid = tuple(int(g) for g in values.shape[1:-1])
        d = int(values.shape[-1])
        if ppi is None:
            if meta["grid"] is None:
                meta["grid"], meta["n_features"] = list(grid), d
                meta["layout"] = layout or {2: "nchw", 1: "nlc", 0: "nc"}[len(grid)]
            elif tuple(meta["grid"]) != grid or meta["n_features"] != d:
                raise StoreKeyMismatch(
                    f"{path}: the layer now gives grid {grid} x {d}, the store holds {tuple(meta['grid'])} x "
                    f"{meta['n_features']}", "use overwrite=True"
                )
            ppi = _layout.patches_per_image(grid)
        s, e = int(act.index[0]), int(act.index[-1]) + 1
        if grid != tuple(meta["grid"]) or d != meta["n_features"]:  # (images of another size in the data)
            raise ValueError(f"images {s}..{e - 1} give layer {layer!r} a grid of {grid} x {d}, the store's first "
                             f"images {tuple(meta['grid'])} x {meta['n_features']}: a store holds images of one size "
                             "(resize or crop them alike); nothing of them was stored")
        rows = values.numpy().reshape(-1, d)
        # Stored numbers must be the activations: no NaN/Inf, no float16 overflow to inf.
        peak = float(np.abs(rows).max(initial=0.0))
        if not np.isfinite(peak):
            raise ValueError(f"layer {layer!r} gave NaN or Inf values for images {s}..{e - 1}; nothing of them was stored")
        if dtype == "float16" and peak > f16_max:
            raise ValueError(f"layer {layer!r} gave values up to {peak:.4g} for images {s}..{e - 1}, beyond float16's "
                             f"range ({f16_max:.0f}); extract with dtype='float32'")
        for k in range(s // ips, (e - 1) // ips + 1):
            if not needed(k):
                continue
            lo, hi = max(s, k * ips), min(e, (k + 1) * ips)
            if k not in buffers:
                buffers[k] = [np.empty((ips * ppi, d), dtype=dtype), 0]
            buf = buffers[k]
            buf[0][(lo - k * ips) * ppi:(hi - k * ips) * ppi] = rows[(lo - s) * ppi:(hi - s) * ppi]
            buf[1] += hi - lo
            full = ips if n_known is None else min(ips, n_known - k * ips)
            if buf[1] == full:
                whole.append((k, full))
        flush_whole()
    n_seen = seen[0]
    if n_seen == 0:
        raise ValueError("data held no images")
    if n_known is not None and n_seen != n_known:
        raise ValueError(f"data yielded {n_seen} images, expected {n_known}; it must yield the same images on every run")
    if tags.check:
        raise ValueError(f"data ended after {n_seen} images, before the images of the finished shards "
                         f"{sorted(tags.check)}; it must yield the same images on every run")
    flush_whole()
    n_shards = -(-n_seen // ips)
    for k in sorted(buffers):  # the last, partial shard of an iterable of unknown length
        filled = buffers[k][1]
        if k == n_shards - 1 and filled == n_seen - k * ips:
            flush(k, filled)
        else:
            raise ValueError(f"data changed between runs: shard {k} got {filled} images")
    missing = [k for k in range(n_shards) if str(k) not in meta["shards"]]
    if missing:
        raise ValueError(f"data ended before shards {missing} were filled ({n_seen} images); it must yield the same "
                         "images on every run")
    meta["complete"], meta["n_images"] = True, n_seen
    _write_json_atomic(sidecar, meta)
    return ActivationStore(path, verify=verify)
