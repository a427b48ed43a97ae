"""The ``edpairs`` command line: ``demo`` (the whole path on a real network, no arguments
needed), ``fit`` (model + layer + images or an activation store -> a pairs file), ``report``
(pairs -> an HTML report folder), ``layers`` (the layer names of a model), ``bench`` (the
kernels against torch / numpy on this machine), ``selfcheck`` (every kernel against the float64
reference, on the CPU and, where present, the GPU) and ``info``.

Expected failures (a wrong layer name, an unreadable image, a missing package, an existing or
unwritable output) print one ``edpairs <command>: error: ...`` line and exit with status 2, and
every output location is checked before any model or fit work. An operating-system error
during the work (a folder made unwritable meanwhile, a full disk) prints one line too and
exits with status 1; a bare ``edpairs`` prints the usage and exits with status 2."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import os
import re
import sys
import time
import warnings

import numpy as np

from ._arrays import to_host
from ._checks import is_int


def _max_rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)) if a.size else 0.0


def _checks(device: str, seed: int):
    """Yields (op, relative error, tolerance) for every op on one device."""
    import edpairs as edp
    from edpairs import reference

    rng = np.random.default_rng(seed)
    N, D, k, I = 20000, 96, 40, 12
    centers = rng.standard_normal((k, D))
    X = (4 * centers[rng.integers(0, k, N)] + rng.standard_normal((N, D)) + 2.0).astype(np.float32)
    C = X[rng.choice(N, k, replace=False)].copy()
    W = (rng.standard_normal((D, I)) / np.sqrt(D)).astype(np.float32)
    b = (2.0 * W.sum(0)).astype(np.float32)
    if device == "cpu":
        Xd = X
    else:
        import torch

        Xd = torch.from_numpy(X).to(device)
        C, W, b = (torch.from_numpy(v).to(device) for v in (C, W, b))

    res = edp.ops.assign(Xd, C)
    labels = to_host(res.labels)
    ref_labels, ref_scores, _, _ = reference.assign(X, to_host(C))
    # Labels may differ only on float32 near-ties: compare the chosen centroid's exact score.
    Xn = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    Ch = to_host(C).astype(np.float64)
    Cn = Ch / np.linalg.norm(Ch, axis=1, keepdims=True)
    chosen = np.einsum("nd,nd->n", Xn, Cn[labels])
    yield "cosine_assign (labels: best score)", float(np.abs(chosen - ref_scores).max()), 1e-5
    yield "cosine_assign (scores)", float(np.abs(to_host(res.scores) - ref_scores).max()), 1e-5
    sums = np.zeros((k, D))
    np.add.at(sums, labels, Xn)
    yield "assign (cluster sums)", _max_rel(to_host(res.sums), sums), 1e-5
    cents, _, counts = edp.ops.spherical_kmeans_step(Xd, C)
    ref_c = reference.normalize_centroids(sums, np.bincount(labels, minlength=k), Cn)
    yield "spherical_kmeans_step", _max_rel(to_host(cents), ref_c), 1e-5
    m = edp.ops.moments(Xd)
    _, ref_mean, ref_m2 = reference.moments(X)
    yield "moments (mean)", _max_rel(to_host(m.mean), ref_mean), 1e-6
    yield "moments (covariance)", _max_rel(to_host(m.m2), ref_m2), 1e-5
    s = edp.ops.signal_moments(Xd, W, b, center=X.mean(0))
    ref = reference.signal_moments(X, to_host(W), to_host(b), center=X.mean(0))
    yield "signal_moments (count)", _max_rel(to_host(s.count), ref["count"]), 1e-3
    yield "signal_moments (sum_xz)", _max_rel(to_host(s.sum_xz), ref["sum_xz"]), 1e-4


def selfcheck(seed: int = 0) -> int:
    import edpairs as edp

    info = edp.build_info()
    print(f"edpairs {info['version']}  cpu kernel: {info['cpu_kernel']}  threads: {info['num_threads']}  "
          f"CUDA built: {info['cuda']} (mode {info['cuda_mode']}, archs {','.join(info['archs']) or '-'})")
    devices = ["cpu"]
    if info["cuda"] and edp.cuda_device_count() > 0:
        try:
            import torch

            if torch.cuda.is_available():
                devices.append("cuda")
        except ImportError:
            print("a GPU is visible but torch is not installed: checking the CPU only")
    elif info["cuda"]:
        print("CUDA kernels are built but no GPU is visible: checking the CPU only")
    failed = 0
    print(f"{'check':44s} {'error':>10s} {'tolerance':>10s}  result")
    seconds = {}
    for device in devices:
        t0 = time.perf_counter()
        for name, err, tol in _checks(device, seed):
            ok = err <= tol
            failed += not ok
            print(f"{name:44s} {err:10.2e} {tol:10.0e}  {'ok' if ok else 'FAIL'}")
        seconds[device] = time.perf_counter() - t0
    # The time is no check: a line of its own under the table.
    print("time: " + ", ".join(f"all ops on {d} (with the float64 references) {t:.2f} s" for d, t in seconds.items()))
    print("selfcheck passed" if not failed else f"selfcheck FAILED: {failed} check(s)")
    return 1 if failed else 0


def cmd_selfcheck(args) -> int:
    return selfcheck(args.seed)


# ---------------------------------------------------------------------------------------------
# fit / report / demo / layers

EPILOG = """examples:
  edpairs demo                                   # EfficientNet-Lite0 + shipped photos -> edpairs-demo/index.html
  edpairs layers --model efficientnet-lite0
  edpairs fit --model efficientnet-lite0 --layer _blocks.15 --images photos/ --out pairs.npz
  edpairs fit --model efficientnet-lite0 --layer _blocks.15 --images photos/ --store acts/ --out pairs.npz
  edpairs report --pairs pairs.npz --images photos/ --out report/
"""


class UserError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def _top_layer_names(model, depth: int = 2) -> list:
    return [n for n, _ in model.named_modules() if n and n.count(".") < depth]


def _some(names, most: int = 12) -> str:
    """``names`` joined by commas, at most ``most`` of them (the first and the last ones)."""
    names = list(names)
    if len(names) <= most:
        return ", ".join(names)
    return ", ".join(names[:most - 3] + ["..."] + names[-3:]) + f" ({len(names)} in all)"


def _layers_command(spec) -> str:
    return f"edpairs layers --model {spec} --shapes"


def _cli_words(text: str, spec) -> str:
    """A library message with its Python-only pointers put in the command line's terms."""
    return text.replace("edpairs.capture.layer_names(model)", _layers_command(spec))


def _no_such_layer(model, name: str, spec, layer: str) -> str:
    """One line for a layer name ``model`` lacks: the children of the deepest prefix that
    exists ("_blocks.99": "_blocks holds _blocks.0 to _blocks.15"), a few close names, or the
    layers to depth 2 when neither says anything; then the command that lists them all."""
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    parts = layer.split(".")
    span = prefix = ""
    for k in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:k]) in modules:
            prefix = ".".join(parts[:k])
            children = [f"{prefix}.{c}" for c, _ in modules[prefix].named_children()]
            if children:
                span = (f"{prefix} holds {children[0]}" if len(children) == 1 else
                        f"{prefix} holds {children[0]} to {children[-1]} ({len(children)} layers)")
            break
    # Close names other than the prefix's children (which the span covers), four at most.
    close = [c for c in difflib.get_close_matches(layer, names, n=10, cutoff=0.6)
             if not (span and c.startswith(prefix + ".") and c.count(".") == prefix.count(".") + 1)][:4]
    hints = ([span] if span else []) + ([f"close names: {', '.join(close)}"] if close else [])
    if not hints:
        hints = [f"valid layers of {name} (to depth 2): {_some(_top_layer_names(model))}"]
    return (f"{name} has no module named {layer!r}; {'; '.join(hints)} "
            f"(every name: {_layers_command(spec)})")


def _model_and_layer(args, pairs_meta=None):
    """(model, name, layer, module, spec): spec is what the model was loaded from."""
    from . import pipeline

    meta = pairs_meta or {}
    # A model file is found where the fit read it (model_file: its absolute path), else by the name
    # recorded (its file name, in the current folder).
    recorded = meta.get("model_file") if isinstance(meta.get("model_file"), str) else None
    spec = getattr(args, "model", None) or (recorded if recorded and os.path.isfile(recorded) else meta.get("model"))
    if not spec:
        raise UserError("which model? pass --model (e.g. --model efficientnet-lite0)")
    model, name = pipeline.load_model(spec)
    layer = args.layer or meta.get("layer")
    if not layer:
        raise UserError(f"which layer? pass --layer; the layers of {name} (to depth 2): "
                        f"{_some(_top_layer_names(model))} (all of them: edpairs layers --model {spec})")
    return model, name, layer, _find_layer(model, name, spec, layer), spec


def _find_layer(model, name: str, spec: str, layer: str):
    """The module at ``layer``, else a UserError listing the valid names; a container that never
    runs itself (ModuleList, ModuleDict: no forward of its own) is refused naming its children."""
    import torch

    from .capture import find_module

    try:
        module = find_module(model, layer)
    except KeyError as exc:  # LayerNotFound
        if "has no module named" in str(exc):
            raise UserError(_no_such_layer(model, name, spec, layer)) from None
        raise UserError(_cli_words(_first_line(exc), spec)) from None
    if type(module).forward is torch.nn.Module.forward:
        children = [f"{layer}.{c}" for c, _ in module.named_children()]
        some = children if len(children) <= 6 else children[:3] + ["..."] + children[-3:]
        raise UserError(f"layer {layer!r} of {name} is a {type(module).__name__}, a container that never runs "
                        f"itself (it has no forward; the model runs its children): name one of its children"
                        f"{': ' + ', '.join(some) if some else ''}")
    return module


def _first_line(exc) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _channels_mismatch(exc, name: str):
    """What to say when the model's first convolution refused the RGB input for its channels
    (torch: "expected input[...] to have 1 channels, but got 3 channels instead"), else None."""
    found = re.search(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels", str(exc))
    if found is None:
        return None
    return (f"{name} expects {found.group(1)} input channels, but the images have {found.group(2)} (RGB): "
            "edpairs feeds RGB images; use a model that takes 3 channels")


def _store_in_use(exc) -> bool:
    """Whether ``exc`` is the activation store's refusal of a second writer (its folder's lock
    is held by another extraction)."""
    return isinstance(exc, RuntimeError) and isinstance(exc.__cause__, OSError) and "another process" in str(exc)


def _in_use_error(path) -> "UserError":
    return UserError(f"the store {path!r} is in use by another process (an extraction into it is running): wait "
                     "for it to finish, then run this again (it reads or resumes the store), or --store another "
                     "folder")


def _model_failure(exc, name: str, layer: str, what: str, spec=None) -> "UserError":
    """A UserError saying why the model could not run ``what`` (one image, the images) up to
    ``layer``: other input channels than RGB's 3, a layer the forward pass never calls, a
    layer that runs more than once (a shared module), or the exception's first line."""
    from .capture import SharedModuleError

    spec = spec or name
    text = str(exc)
    channels = _channels_mismatch(exc, name)
    if channels:
        return UserError(channels)
    if isinstance(exc, SharedModuleError):
        return UserError(f"layer {layer!r} of {name} runs more than once in one forward pass (a module shared by "
                         f"several places in the model), so it has no one output to capture: name a layer that runs "
                         f"once ({_layers_command(spec)} marks the shared ones)")
    if "did not run in the model's forward pass" in text:
        return UserError(f"layer {layer!r} did not run when {name} ran {what} (its forward pass never calls it): "
                         f"name a layer that runs ({_layers_command(spec)} marks those that do not with '-')")
    return UserError(f"{name} failed on {what} at or before layer {layer!r} ({type(exc).__name__}: "
                     f"{_cli_words(_first_line(exc), spec)})")


def _split_failure(exc, name: str, layer: str, spec, command: str) -> "UserError":
    """The library's SplitError (no automatic head after ``layer``) in the command line's
    terms: ``head=callable`` is Python's remedy; the command line's is another layer, or for
    fit ``--no-ura`` (only URA needs the head)."""
    text = _cli_words(_first_line(exc), spec)
    text = re.sub(r"[;,]?\s*(choose a layer at a block boundary or )?pass head=callable.*$", "", text)
    layer_hint = ("a layer at a block boundary (one whose output is all that the rest of the model reads)"
                  if "skip connection" in text else "another layer")
    if command == "fit":
        return UserError(f"{text}; URA needs the model's head after the layer: fit at {layer_hint}, "
                         f"or pass --no-ura")
    if command == "demo":
        return UserError(f"{text}; the demo runs the model's head after the layer: choose {layer_hint} (--layer)")
    return UserError(f"{text}; the report runs the model's head after the layer (influence, explanations): "
                     f"use pairs fitted at {layer_hint}")


def _preflight(model, name: str, layer: str, size: int, spec=None) -> tuple:
    """The channel-last shape of ``layer``'s output for one zero image of ``size`` pixels: a
    forward pass that finds a model that cannot run the images (other input channels, a layer
    that never runs, a shared one) before any long work."""
    import torch

    from .capture import capture

    try:
        out = capture(model, layer, torch.zeros(1, 3, size, size), batch_size=1, progress=False)
    except (RuntimeError, TypeError) as exc:  # (TypeError: the layer returns no tensor)
        raise _model_failure(exc, name, layer, f"one {size} x {size} image", spec) from None
    return tuple(out.shape)


def _check_head(model, name: str, layer: str, spec, command: str) -> None:
    """The model splits at ``layer`` into features and head (URA and the report's analyses run
    the head), else a UserError in the command line's terms, before any long work."""
    from .capture import SplitError, split_model

    try:
        split_model(model, layer)
    except SplitError as exc:
        raise _split_failure(exc, name, layer, spec, command) from None


class _ModelRuns:
    """Inside: a RuntimeError of the model's forward pass becomes a UserError, as does the
    store's lock held by another process (``store``: its path); the store's other errors,
    which are RuntimeErrors too, pass through."""

    def __init__(self, name: str, layer: str, what: str = "the images", spec=None, store=None):
        self.name, self.layer, self.what, self.spec, self.store = name, layer, what, spec, store

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        from .store import StoreCorrupted, StoreIncomplete

        if exc_type is not None and _store_in_use(exc):
            raise _in_use_error(self.store) from None
        if exc_type is not None and issubclass(exc_type, RuntimeError) and not isinstance(
                exc, (StoreCorrupted, StoreIncomplete)):
            raise _model_failure(exc, self.name, self.layer, self.what, self.spec) from None
        return False


def _fitted_hint(meta: dict, layer: str) -> str:
    """Where the pairs were fitted, when --layer names another layer (else "")."""
    return (f" (they were fitted at {meta['layer']!r}: leave out --layer)"
            if meta.get("layer") and meta["layer"] != layer else "")


def _check_pairs_fit_layer(module, layer: str, pairs, meta: dict) -> None:
    """Pairs of D channels at a layer that declares another width (out_channels, out_features,
    num_features) are refused before any image is read, naming the layer they were fitted at."""
    from .interventions import width_mismatch

    wrong = width_mismatch(module, int(pairs.decoding_.shape[1]), layer)
    if wrong:
        raise UserError(wrong + _fitted_hint(meta, layer))


def _normalisation(args, model_name: str) -> str:
    if args.normalisation:
        return args.normalisation
    return "efficientnet-lite" if model_name == "efficientnet-lite0" else "imagenet"


def _crops(args) -> int:
    crops = args.crops if args.crops is not None else (1 if args.images else 6)
    _at_least("--crops", crops, 1)
    return crops


def _at_least(flag: str, value, minimum: int, unit: str = "") -> None:
    """A command-line number at least ``minimum``, else a UserError naming the flag."""
    if value < minimum:
        raise UserError(f"{flag} must be >= {minimum}{unit}, got {value}")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**32:
        raise UserError(f"--seed must be an integer in [0, 2**32), got {seed}")


def _pairs_file_problem(path) -> "str | None":
    """Why the file ``path`` is not a pairs file written by ``EDPairs.save`` (None when it is
    one), read without unpickling anything: a .npz (zip) archive holding the arrays save
    writes and a JSON metadata record of the pairs format."""
    import zipfile

    from .pairs import FORMAT

    try:
        if not zipfile.is_zipfile(path):
            return "it is not a .npz archive"
        with np.load(path, allow_pickle=False) as data:
            arrays = list(data.files)
            if not {"meta", "decoding", "bias", "encoding"} <= set(arrays):
                return f"it holds the arrays {_some(arrays, 6)}" if arrays else "it holds no arrays"
            meta = json.loads(bytes(data["meta"]).decode())
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        return f"it cannot be read ({type(exc).__name__}: {_first_line(exc)})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return "its metadata record is not an edpairs pairs file's"
    return None


def _location(check, *args, **kwargs) -> None:
    """``check`` (one of edpairs._io's output checks) with its OSError as a UserError."""
    try:
        check(*args, **kwargs)
    except OSError as exc:  # (FileNotFoundError, NotADirectoryError, PermissionError: one line each)
        raise UserError(str(exc)) from None


def _check_output(path: str, overwrite: bool, what: str) -> None:
    """The pairs file --out may be written, before any work: not a folder; when it exists,
    --overwrite and an earlier pairs file there (never someone's other .npz); its folder
    exists (not a file) and takes new files."""
    from ._io import check_output_file

    if os.path.isdir(path):
        raise UserError(f"{what} {path!r} is a folder, not a file: name a file (--out)")
    if os.path.lexists(path):
        if not overwrite:
            raise UserError(f"{what} {path!r} exists; pass --overwrite to replace it")
        problem = _pairs_file_problem(path) if os.path.isfile(path) else "it is not a regular file"
        if problem:
            raise UserError(f"{what} {path!r} exists and is not an edpairs pairs file ({problem}): --overwrite "
                            "replaces only an earlier pairs file; name another --out")
    _location(check_output_file, path, what)


def _check_report_folder(path: str, overwrite: bool, images=None) -> None:
    """The report folder --out may be written: not a file, not the current folder or the
    images' (or a folder holding them), and when it exists and is not empty, --overwrite and
    an earlier report there (the whole folder is replaced); its parent folder exists (it is not
    created) and takes new files (the report is built beside the folder and renamed into place)."""
    from ._io import check_output_folder
    from .report import check_report_folder

    try:
        check_report_folder(path, overwrite=overwrite, what="--out", protect=images or (), overwrite_flag="--overwrite")
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    _location(check_output_folder, path, "--out", written_inside=False)


def _check_store_folder(path: str, images) -> None:
    """The folder --store may be written into (an extraction, new or resumed, or with
    --overwrite a replaced store): not a file, neither the current folder nor the images' (nor
    a folder holding them), nothing in it but a store's files (an empty folder, or an earlier
    store: resumed, or replaced with --overwrite), its parent existing, files creatable where
    the shards go, and no other process extracting into it."""
    from ._io import check_output_folder, check_replaceable_folder
    from .store import LOCKFILE, foreign_entries

    try:  # the file, current folder and images' folder checks (what the folder holds: below)
        check_replaceable_folder(path, overwrite=True, what="--store", protect=images or (),
                                 entries_of=lambda _: [], kind="an activation store", overwrite_flag="--overwrite")
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    if os.path.isdir(path):
        foreign = foreign_entries(path)
        if foreign:
            raise UserError(f"--store {path!r} is not an activation store (found: {_some(foreign, 6)}): a store is "
                            "written only into a new or empty folder or an earlier store's (which it resumes, or "
                            "with --overwrite replaces); name another folder")
    _location(check_output_folder, path, "--store", written_inside=True)
    if os.path.isfile(os.path.join(path, LOCKFILE)) and _lock_held(os.path.join(path, LOCKFILE)):
        raise _in_use_error(path)


def _lock_held(lockfile: str) -> bool:
    """Whether another process holds the store's lock (store.extract takes it for the whole
    extraction); an unreadable lock or a platform without flock says no."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        return False
    try:
        fd = os.open(lockfile, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing releases the lock taken)
    return False


def _store_mismatch(exc) -> "UserError":
    return UserError(f"{exc.reason}; pass --overwrite to replace the store (the images are captured again), "
                     f"or --store another folder")


def _store_model_check(model, name: str, layer: str, key: dict, path: str, width: int, n_features,
                       remedy: str) -> dict:
    """The store at ``path`` (its ``key``) was extracted from this model at this layer, else a
    UserError naming both: its activations fed to another model's head (URA), or recorded in
    the pairs under another model's name, would be silently wrong. Returns the model's
    fingerprint (for the extraction that resumes the store: hashed once)."""
    from .store import model_fingerprint

    stored = key.get("model") or {}
    if key.get("layer") != layer:
        raise UserError(f"the store {path!r} holds layer {key.get('layer')!r}, not {layer!r}; {remedy}")
    if n_features is not None and int(n_features) != width:
        raise UserError(f"the store {path!r} holds {n_features} channels at layer {layer!r} (extracted from "
                        f"{stored.get('name')!r}) but layer {layer!r} of --model {name!r} gives {width}; {remedy}")
    mine = model_fingerprint(model, name)
    if stored.get("name") != mine["name"] or stored.get("params") != mine["params"]:
        what = "name" if stored.get("params") == mine["params"] else (
            "parameters" if stored.get("name") == mine["name"] else "name and parameters")
        raise UserError(f"the store {path!r} was extracted from the model {stored.get('name')!r} (parameters "
                        f"{str(stored.get('params'))[:19]}...), not from --model {mine['name']!r} (parameters "
                        f"{mine['params'][:19]}...: the {what} differ); {remedy}")
    return mine


def cmd_fit(args) -> int:
    import torch

    from . import pipeline
    from .store import ActivationStore, StoreKeyMismatch, extract
    from .zoo import IMAGE_SIZE

    _check_output(args.out, args.overwrite, "the pairs file")
    if not args.out.endswith(".npz"):
        raise UserError(f"--out must name a .npz file, got {args.out!r}")
    for flag, value in (("--concepts", args.concepts), ("--batch-size", args.batch_size)):
        _at_least(flag, value, 1)
    crops = _crops(args)
    log = pipeline.Log(enabled=not args.quiet)
    store_exists = bool(args.store) and os.path.isfile(os.path.join(args.store, "store.json"))
    # The store is read as it is without --images; with them it is filled (or resumed, or with
    # --overwrite replaced when it was extracted otherwise).
    read_store = store_exists and not args.images
    if args.store and not read_store:  # (a store only read is written nowhere)
        _check_store_folder(args.store, args.images)
    key = n_features = None
    if store_exists:
        try:
            opened = ActivationStore(args.store, verify=False, allow_partial=True)
            key, n_features = opened.key, opened.n_features if len(opened) else None  # (known from a shard)
        except ValueError as exc:  # a broken sidecar
            if read_store or not args.overwrite:
                raise UserError(f"{exc}; pass --images with --overwrite to extract the store again, or --store "
                                "another folder") from None
        else:
            if read_store and not opened.complete:
                expected = key.get("n_images_expected")
                raise UserError(f"the store {args.store!r} is incomplete: its extraction stopped after "
                                f"{opened.n_images}{f' of {expected}' if expected else ''} images; pass --images "
                                "with the same images and flags to resume it")
    need_model = not read_store or args.ura or bool(args.model)
    checked = None  # the model's fingerprint where the store's key was checked against it
    model = name = None
    layer = (args.layer or (key or {}).get("layer")) if read_store else args.layer
    if need_model:
        if not args.model and key:
            why = "URA runs the model's head" if read_store else "the images go through the model"
            raise UserError(f"which model? {why}: pass --model (the store {args.store!r} was extracted from "
                            f"{(key.get('model') or {}).get('name')!r})")
        with log.step("loading the model"):
            model, name, layer, _, spec = _model_and_layer(args, dict(layer=layer) if layer else None)
            prep = (key or {}).get("preprocessing")
            size = prep.get("size") if isinstance(prep, dict) else None
            shape = _preflight(model, name, layer, size if is_int(size) and size > 0 else IMAGE_SIZE, spec)
            if args.ura and len(shape) != 4:
                raise UserError(f"URA needs a spatial layer; {layer} gives {shape[1:]} per image; pass --no-ura")
            if args.ura:
                _check_head(model, name, layer, spec, "fit")
            if key is not None and not (args.images and args.overwrite):
                remedy = ("pass the store's model and layer, or --store another folder" if read_store else
                          "pass --overwrite to extract the store again from these images, or --store another folder")
                checked = _store_model_check(model, name, layer, key, args.store, shape[-1], n_features, remedy)
    elif not layer:
        raise UserError("pass --layer (the layer the store holds, recorded in the pairs file)")
    torch.manual_seed(args.seed)
    if read_store:
        with log.step(f"opening the activation store {args.store}"):
            source = ActivationStore(args.store)
            key = source.key
            if key.get("layer") != layer:
                raise UserError(f"the store {args.store!r} holds layer {key.get('layer')!r}, not {layer!r}")
            preprocessing = key.get("preprocessing")
            name = name or (key.get("model") or {}).get("name")
            log.say(f"{source.n_images} images, grid {source.grid}, {source.n_features} channels")
    else:
        with log.step("reading the images"):
            data = pipeline.image_dataset(args.images, crops_per_photo=crops, seed=args.seed)
            norm = _normalisation(args, name)
            preprocessing = dict(data.preprocessing, normalisation=norm)
            log.say(f"{len(data)} views of {len(data.names)} images" +
                    ("" if args.images else " (the photos shipped in packages)"))
        inputs = pipeline.model_input(pipeline.images_of(data), norm)
        if args.store:
            with log.step(f"capturing {layer} into the store {args.store} (resumable)"), \
                    _ModelRuns(name, layer, spec=args.model, store=args.store):
                try:
                    source = extract(model, layer, inputs, args.store, preprocessing=preprocessing, model_name=name,
                                     batch_size=args.batch_size, overwrite=args.overwrite, fingerprint=checked,
                                     progress=False if args.quiet else None)
                except StoreKeyMismatch as exc:
                    raise _store_mismatch(exc) from None
        else:
            from .capture import capture

            with log.step(f"capturing {layer} on {len(inputs)} images"), _ModelRuns(name, layer, spec=args.model):
                source = capture(model, layer, inputs, batch_size=args.batch_size,
                                 progress=False if args.quiet else None)
                log.say(f"activations {tuple(source.shape[1:])} per image")
    with log.step(f"fitting {args.concepts} pairs" + (" with URA through the model's head" if args.ura else "")):
        # With a store, its key holds this model's fingerprint by now (checked or just extracted).
        fingerprint = ((source.key.get("model") or {}).get("params")) if args.store and model is not None else None
        pairs = pipeline.fit_pairs(model, layer, source, args.concepts, ura=args.ura, model_name=name,
                                   preprocessing=preprocessing, seed=args.seed, fingerprint=fingerprint,
                                   progress=False if args.quiet else None)
    if args.model and os.path.isfile(args.model):  # (report finds it there without --model)
        pairs.metadata["model_file"] = os.path.abspath(args.model)
    pairs.save(args.out)
    log.say(f"pairs written to {args.out}: decoding/encoding directions of shape {pairs.decoding_.shape}")
    return 0


def cmd_report(args) -> int:
    import torch

    from . import influence, pipeline
    from .pairs import EDPairs
    from .probe import make_probe_set
    from .zoo import IMAGE_SIZE

    log = pipeline.Log(enabled=not args.quiet)
    for flag, value in (("--probe", args.probe), ("--noise", args.noise)):
        _at_least(flag, value, 0)
    fewest = influence.MIN_NOISE_NORMAL  # (the normal p-value's fit needs that many)
    if args.pvalue == "normal" and 0 < args.noise < fewest:
        raise UserError(f"--noise must be 0 (no significance test) or >= {fewest} (the normal p-values rest on the "
                        f"noise directions' spread; --pvalue empirical takes any number), got {args.noise}")
    if args.probe == 1:
        raise UserError("--probe must be 0 (no dissection) or >= 2 (half the probe images set the detectors' "
                        "thresholds, the other half score them), got 1")
    crops = _crops(args)
    if not os.path.isfile(args.pairs):
        raise UserError(f"no pairs file {args.pairs!r} (make one with: edpairs fit ... --out {args.pairs})")
    problem = _pairs_file_problem(args.pairs)
    if problem:
        raise UserError(f"--pairs {args.pairs!r} is not an edpairs pairs file (the .npz that edpairs fit writes): "
                        f"{problem}")
    pairs = EDPairs.load(args.pairs)
    meta = pairs.metadata or {}
    _check_report_folder(args.out, args.overwrite, args.images)
    with log.step("loading the model"):
        model, name, layer, module, spec = _model_and_layer(args, meta)
        _check_pairs_fit_layer(module, layer, pairs, meta)
        shape = _preflight(model, name, layer, IMAGE_SIZE, spec)
        D = int(pairs.decoding_.shape[1])
        if shape[-1] != D:
            raise UserError(f"the pairs have D={D} channels but layer {layer!r} of {name} gives {shape[-1]}"
                            f"{_fitted_hint(meta, layer)}")
        _check_head(model, name, layer, spec, "report")
        fingerprint = pipeline.check_weights(model, pairs)  # (before the images are read; hashed once)
    normalisation = args.normalisation or pipeline._fitted_normalisation(pairs) or _normalisation(args, name)
    torch.manual_seed(args.seed)
    with log.step("reading the images"):
        data = pipeline.image_dataset(args.images, crops_per_photo=crops, seed=args.seed)
        images = pipeline.images_of(data)
        probe = make_probe_set(args.probe, seed=args.seed) if args.probe else None
    class_names = None
    if name == "efficientnet-lite0":
        from .zoo import imagenet_class_names

        class_names = imagenet_class_names()
    with _ModelRuns(name, layer, spec=spec):
        inputs = pipeline.analyse(model, layer, pairs, images, probe=probe, class_names=class_names,
                                  explain_images=pipeline.first_views(data), n_noise=args.noise, pvalue=args.pvalue,
                                  normalisation=normalisation, preprocessing=data.preprocessing,
                                  fingerprint=fingerprint, log=log, seed=args.seed)
    inputs.meta.update(model=name, layer=layer, pairs=os.path.abspath(args.pairs), images=len(images))
    index = pipeline.write(args.out, pairs, inputs, title=args.title or f"edpairs report: {name} {layer}",
                           overwrite=args.overwrite, log=log)
    print(index)
    return 0


def cmd_demo(args) -> int:
    from . import pipeline
    from .zoo import IMAGE_SIZE

    _at_least("--concepts", args.concepts, 1)
    _check_report_folder(args.out, args.overwrite)
    # The layer is checked on the loaded model (which the demo then uses) before any other work.
    model, name = pipeline.load_model(pipeline.DEMO_MODEL)
    _find_layer(model, name, pipeline.DEMO_MODEL, args.layer)
    _preflight(model, name, args.layer, IMAGE_SIZE, pipeline.DEMO_MODEL)
    _check_head(model, name, args.layer, pipeline.DEMO_MODEL, "demo")  # (URA and the analyses run the head)
    kwargs = dict(layer=args.layer, n_concepts=args.concepts, ura=args.ura, seed=args.seed, overwrite=args.overwrite,
                  log=not args.quiet, model=model)
    if args.quick:
        kwargs.update(crops_per_photo=2, n_probe=32, n_noise=10)
    index = pipeline.demo(args.out, **kwargs)
    print(index)
    return 0


def cmd_layers(args) -> int:
    from . import pipeline
    from .capture import layer_names

    if args.shapes:
        _at_least("--size", args.size, 1, " (pixels)")
    model, name = pipeline.load_model(args.model)
    import torch

    if isinstance(model, torch.jit.ScriptModule):
        raise UserError(f"{name} is a TorchScript module, whose layers take no forward hooks: fit and report cannot "
                        "capture any of them, so it has no layers to list; load the model as a Python nn.Module "
                        "(package.module:factory, or a module saved with torch.save(model, path))")
    example = torch.zeros(1, 3, args.size, args.size) if args.shapes else None
    # How often each module runs in the forward pass that finds the shapes: one that runs more
    # than once (a shared module) has no one output, and fit / report refuse it.
    runs: dict = {}
    handles = []
    if example is not None:
        for n, m in model.named_modules():
            if n:
                handles.append(m.register_forward_hook(
                    lambda _m, _i, _o, n=n: runs.__setitem__(n, runs.get(n, 0) + 1)))
    try:
        rows = layer_names(model, example)
    except RuntimeError as exc:  # the model refuses the zero image (too small, other channels ...)
        if example is None:
            raise
        channels = _channels_mismatch(exc, name)
        if channels:
            raise UserError(f"{channels}; leave out --shapes for the names only") from None
        raise UserError(f"{name} could not run one zero image of {args.size} x {args.size} pixels to find the "
                        f"output shapes ({type(exc).__name__}: {_first_line(exc)}); try another --size, "
                        "or leave out --shapes") from None
    finally:
        for h in handles:
            h.remove()
    shared = 0
    for r in rows:
        if isinstance(r, tuple):
            line = f"{r[0]:40s} {'x'.join(map(str, r[1])) if r[1] else '-'}"
            if runs.get(r[0], 0) > 1:
                shared += 1
                line += f"  shared: runs {runs[r[0]]} times, cannot be captured"
            print(line.rstrip())
        else:
            print(r)
    if shared:
        print(f"({shared} shared module(s): each runs at several places in one forward pass, so it has no one output "
              "to capture; fit and report refuse them)", file=sys.stderr)
    return 0


def _median_time(fn, device: str, repeat: int) -> float:
    def sync():
        if device == "cuda":
            import torch

            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cmd_bench(args) -> int:
    """One spherical k-means iteration and the moments, edpairs against the torch / numpy code a
    user would write, on this machine; the results are checked before timing."""
    import edpairs as edp

    try:
        N, D, k = (int(v) for v in args.size.split(","))
    except ValueError:
        raise UserError(f"--size must be N,D,k (e.g. 200000,256,256), got {args.size!r}") from None
    if min(N, D, k) < 1 or k > N:
        raise UserError(f"--size N,D,k needs N, D, k >= 1 and k <= N (k centroids drawn from the N rows), "
                        f"got {args.size!r}")
    _at_least("--repeat", args.repeat, 1)
    torch = None
    try:
        import torch
    except ImportError:
        if args.device == "cuda":
            raise UserError('--device cuda needs torch: pip install "edpairs[torch]"') from None
    if args.device == "cuda" and not (edp.build_info()["cuda"] and torch.cuda.is_available()):
        raise UserError("--device cuda needs a CUDA build of edpairs and a visible GPU (edpairs info)")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((k, D)).astype(np.float32)
    X = (3 * centers[rng.integers(0, k, N)] / np.sqrt(D) + rng.standard_normal((N, D), dtype=np.float32) / np.sqrt(D))
    C = X[rng.choice(N, k, replace=False)].copy()
    C /= np.linalg.norm(C, axis=1, keepdims=True)
    if args.device == "cuda":
        Xd, Cd = torch.from_numpy(X).cuda(), torch.from_numpy(C).cuda()
    else:
        Xd, Cd = X, C
    rows = []
    # Correctness first: the chosen centroid's exact cosine is the float64 best on a sample.
    sample = min(2000, N)
    lab = edp.ops.cosine_assign(Xd[:sample], Cd)[0]
    lab = lab.cpu().numpy() if hasattr(lab, "cpu") else np.asarray(lab)
    Xn = X[:sample].astype(np.float64)
    Xn /= np.linalg.norm(Xn, axis=1, keepdims=True)
    cos = Xn @ C.astype(np.float64).T
    ok = float(np.mean(cos[np.arange(sample), lab] >= cos.max(1) - 1e-5))
    t_e = _median_time(lambda: edp.ops.spherical_kmeans_step(Xd, Cd, check_finite=False), args.device, args.repeat)
    rows.append(("k-means iteration", "edpairs", t_e, 2.0 * N * D * k))
    if torch is not None:
        import torch.nn.functional as F

        Xt, Ct = torch.as_tensor(Xd), torch.as_tensor(Cd)

        def torch_step():
            Xn_ = F.normalize(Xt, dim=1)
            lab_ = (Xn_ @ F.normalize(Ct, dim=1).T).argmax(1)
            sums = torch.zeros_like(Ct).index_add_(0, lab_, Xn_)
            return F.normalize(sums, dim=1), torch.bincount(lab_, minlength=k)

        t_t = _median_time(torch_step, args.device, args.repeat)
        rows.append(("k-means iteration", "torch", t_t, 2.0 * N * D * k))
    t_m = _median_time(lambda: edp.ops.moments(Xd, check_finite=False), args.device, args.repeat)
    rows.append(("moments (mean + cov)", "edpairs", t_m, 1.0 * N * D * D))
    if args.device == "cpu":
        rows.append(("moments (mean + cov)", "numpy.cov",
                     _median_time(lambda: np.cov(X, rowvar=False), "cpu", args.repeat), 1.0 * N * D * D))
    if torch is not None:
        Xt = torch.as_tensor(Xd)
        rows.append(("moments (mean + cov)", "torch.cov",
                     _median_time(lambda: torch.cov(Xt.T), args.device, args.repeat), 1.0 * N * D * D))
    info = edp.build_info()
    print(f"edpairs bench on {args.device}: N={N} D={D} k={k} float32, median of {args.repeat} "
          f"(cpu kernel {info['cpu_kernel']}, {info['num_threads']} threads); labels at the float64 best: {ok:.4f}")
    print(f"{'op':22s} {'method':10s} {'ms':>10s} {'GFLOP/s':>9s} {'edpairs speed-up':>17s}")
    best = {op: t for op, m, t, _ in rows if m == "edpairs"}
    for op, method, t, flops in rows:
        ratio = "" if method == "edpairs" else f"{t / best[op]:.2f}x"
        print(f"{op:22s} {method:10s} {t * 1e3:10.2f} {flops / t / 1e9:9.1f} {ratio:>17s}")
    if ok < 0.999:
        print("FAILED: labels disagree with the float64 reference")
        return 1
    return 0


def _parser():
    parser = argparse.ArgumentParser(
        prog="edpairs",
        description="Encoding-decoding direction pairs of the concepts a layer of a vision network represents: "
                    "fit them, see what they detect and how they sway the predictions, edit them away. "
                    "New here? Run `edpairs demo` and open the report it writes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"edpairs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, model_required):
        p.add_argument("--model", required=model_required,
                       help="efficientnet-lite0 (ships in packages), package.module:factory, or a .pt file of a "
                            "whole module saved with torch.save (not TorchScript, whose layers take no hooks)")
        p.add_argument("--layer", help="dotted module name, e.g. _blocks.15 (list them: edpairs layers --model M)")
        p.add_argument("--images", nargs="+", metavar="PATH",
                       help="image files and/or folders (default: the 8 photos shipped in scikit-image, "
                            "scikit-learn and matplotlib)")
        p.add_argument("--crops", type=int, help="views per image: 1 = the centre crop, more adds seeded random "
                                                 "crops (default 1 for your images, 6 for the shipped photos)")
        p.add_argument("--normalisation", choices=("efficientnet-lite", "imagenet"),
                       help="how pixels become model inputs (default: efficientnet-lite for efficientnet-lite0, "
                            "imagenet mean/std otherwise)")
        flags(p)

    def flags(p):
        p.add_argument("--seed", type=int, default=0,
                       help="seed of the random crops, the fit and the noise directions (default 0)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        p.add_argument("--quiet", action="store_true", help="no step lines or progress bars")

    p = sub.add_parser("demo", help="the whole path on EfficientNet-Lite0 and shipped photos; writes a report",
                       description="Runs everything on EfficientNet-Lite0 (ImageNet weights shipped in a package), "
                                   "the photos shipped in scikit-image/scikit-learn/matplotlib and a generated probe "
                                   "set with exact concept masks: capture a layer, fit the pairs with URA, dissect, "
                                   "influence, explain, remove a concept; writes an HTML report. About 2 minutes "
                                   "on 2 CPU cores.")
    p.add_argument("--out", default="edpairs-demo", help="report folder (default edpairs-demo)")
    p.add_argument("--layer", default="_blocks.12", help="layer of EfficientNet-Lite0 (default _blocks.12)")
    p.add_argument("--concepts", type=int, default=16, help="number of concepts (default 16)")
    p.add_argument("--no-ura", dest="ura", action="store_false", help="skip URA (faster, detectors less aligned)")
    p.add_argument("--quick", action="store_true", help="fewer images and noise directions (about a minute)")
    flags(p)

    p = sub.add_parser("fit", help="fit pairs at a layer: model + images (or an activation store) -> pairs .npz",
                       description="Captures the layer on the images (optionally into a resumable on-disk store), "
                                   "fits the encoding-decoding pairs (with URA through the model's head unless "
                                   "--no-ura) and writes them to a .npz file with the model, layer and preprocessing.")
    common(p, model_required=False)
    p.add_argument("--out", required=True, help="the pairs file to write (.npz)")
    p.add_argument("--store", help="activation store folder: read when it exists, else filled from the images "
                                   "(an interrupted capture resumes)")
    p.add_argument("--concepts", type=int, default=16, help="number of concepts (default 16)")
    p.add_argument("--no-ura", dest="ura", action="store_false", help="skip URA (no model head needed)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass of the capture (default 16)")

    p = sub.add_parser("report", help="write an HTML report of fitted pairs (atlas, dissection, influence, edits)",
                       description="Analyses fitted pairs on images and a generated probe set and writes a folder "
                                   "with index.html (viewable offline) and report.json.")
    common(p, model_required=False)
    p.add_argument("--pairs", required=True, help="pairs file from `edpairs fit` (model and layer are read from it)")
    p.add_argument("--out", default="edpairs-report", help="report folder (default edpairs-report)")
    p.add_argument("--probe", type=int, default=64, help="probe images with concept masks for dissection "
                                                         "(default 64; 0 skips the dissection)")
    p.add_argument("--noise", type=int, default=50, help="noise directions per concept for influence p-values")
    p.add_argument("--pvalue", choices=["normal", "empirical"], default="normal",
                   help="influence p-values: a normal fit to the noise scores where they justify one, else the "
                        "empirical p-value (normal, the default); or the empirical p-value in every cell, which "
                        "needs about concepts x classes / 0.05 noise directions to reach significance")
    p.add_argument("--title", help="the report's title (default: edpairs report: MODEL LAYER)")

    p = sub.add_parser("layers", help="list the layer names of a model (with output shapes: --shapes)",
                       description="Lists the dotted names of a model's modules, what fit --layer takes; with "
                                   "--shapes one zero image runs through the model to show each output shape, "
                                   "'-' marking modules that did not run and 'shared' those that run more than "
                                   "once (neither can be captured).")
    p.add_argument("--model", required=True, help="efficientnet-lite0, package.module:factory, or a .pt file of a "
                                                  "whole module saved with torch.save (not TorchScript)")
    p.add_argument("--shapes", action="store_true", help="run one zero image to show each output shape")
    p.add_argument("--size", type=int, default=224, help="image side in pixels for --shapes (default 224)")

    p = sub.add_parser("bench", help="time edpairs' kernels against torch / numpy on this machine",
                       description="One spherical k-means iteration and the streaming moments, edpairs against "
                                   "the torch loop (normalise, matmul, argmax, index_add) and numpy.cov / torch.cov, "
                                   "checked against float64 first. The full benchmarks (faiss, GPU ceilings) live "
                                   "in the repository's benchmarks/ folder.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", default="200000,256,256", help="N,D,k (default 200000,256,256)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions; the median is shown (default 3)")

    p = sub.add_parser("selfcheck", help="check every kernel against the float64 reference (CPU, and GPU if present)",
                       description="Runs every kernel (assignment, k-means step, moments, signal moments) on seeded "
                                   "data and compares it with the float64 reference, on the CPU and, where CUDA was "
                                   "built and a GPU is visible, on the GPU; prints each error against its tolerance. "
                                   "Exit status 1 when a check fails.")
    p.add_argument("--seed", type=int, default=0, help="seed of the test data (default 0)")
    sub.add_parser("info", help="print what this build contains (JSON)",
                   description="Prints edpairs.build_info() as JSON: the version, the CPU kernel and threads, "
                               "whether the CUDA kernels were built (and for which architectures), their limits, "
                               "and how many GPUs are visible.")
    return parser


COMMANDS = {"fit": cmd_fit, "report": cmd_report, "demo": cmd_demo, "layers": cmd_layers, "bench": cmd_bench,
            "selfcheck": cmd_selfcheck}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        import edpairs as edp

        print(json.dumps(dict(edp.build_info(), cuda_devices=edp.cuda_device_count()), indent=2))
        return 0
    if args.command in COMMANDS:
        from .store import StoreCorrupted, StoreIncomplete

        try:
            if hasattr(args, "seed"):
                _check_seed(args.seed)
            with _warnings_as_lines(args.command):
                return COMMANDS[args.command](args)
        except (UserError, FileNotFoundError, FileExistsError, ImportError, ValueError, TypeError,
                StoreCorrupted, StoreIncomplete) as exc:
            print(f"edpairs {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:  # while writing or reading (permissions changed, a full disk ...): one line
            print(f"edpairs {args.command}: error: {_os_error_line(exc)}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"edpairs {args.command}: interrupted", file=sys.stderr)
            return 130
    # No command: argparse's convention for a missing argument (usage, an error line, status 2).
    parser.print_usage(sys.stderr)
    commands = ", ".join(["demo", "fit", "report", "layers", "bench", "selfcheck", "info"])
    print(f"edpairs: error: name a command: {commands} (edpairs --help describes them; edpairs COMMAND --help "
          "lists its options)", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _warnings_as_lines(command: str):
    """edpairs' own warnings (a fit on too little data, a report with another normalisation than
    the fit's) printed as one line each, ``edpairs COMMAND: warning: ...``, instead of Python's
    file:line form with a source line; other warnings as Python prints them."""
    from .pipeline import PipelineWarning

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PipelineWarning):
            print(f"edpairs {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _os_error_line(exc: OSError) -> str:
    """One line for an operating-system error: its reason and the file(s) it names."""
    files = " -> ".join(repr(os.fspath(f)) for f in (exc.filename, exc.filename2) if f is not None)
    reason = exc.strerror or _first_line(exc)
    return f"{reason}{': ' + files if files else ''} ({type(exc).__name__})"


if __name__ == "__main__":
    sys.exit(main())
