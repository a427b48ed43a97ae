"""The ``edpairs`` command line: ``demo`` (the whole path on a real network, no arguments
needed), ``fit`` (model + layer + images or an activation store -> a pairs file), ``report``
(pairs -> an HTML report folder), ``layers`` (the layer names of a model), ``bench`` (the
kernels against torch / numpy on this machine), ``selfcheck`` (every kernel against the float64
reference, on the CPU and, where present, the GPU) and ``info``.

Expected failures (a wrong layer name, an unreadable image, a missing package, an existing
output) print one ``edpairs <command>: error: ...`` line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from ._arrays import to_host


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

    t0 = time.perf_counter()
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
    yield f"(all ops on {device}: {time.perf_counter() - t0:.2f} s)", 0.0, 1.0


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
    for device in devices:
        for name, err, tol in _checks(device, seed):
            ok = err <= tol
            failed += not ok
            print(f"{name:44s} {err:10.2e} {tol:10.0e}  {'ok' if ok else 'FAIL'}")
    print("selfcheck passed" if not failed else f"selfcheck FAILED: {failed} check(s)")
    return 1 if failed else 0


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


def _model_and_layer(args, pairs_meta=None):
    from . import pipeline
    from .capture import find_module

    spec = args.model or (pairs_meta or {}).get("model")
    if not spec:
        raise UserError("which model? pass --model (e.g. --model efficientnet-lite0)")
    model, name = pipeline.load_model(spec)
    layer = args.layer or (pairs_meta or {}).get("layer")
    if not layer:
        raise UserError(f"which layer? pass --layer; the layers of {name}: "
                        f"{', '.join(_top_layer_names(model))} (all of them: edpairs layers --model {spec})")
    try:
        module = find_module(model, layer)
    except KeyError as exc:  # LayerNotFound
        raise UserError(f"{exc}\nvalid layers of {name} (to depth 2): {', '.join(_top_layer_names(model))}\n"
                        f"every name with its output shape: edpairs layers --model {spec}") from None
    return model, name, layer, module


def _check_pairs_fit_layer(module, layer: str, pairs, meta: dict) -> None:
    """Pairs of D channels at a layer that declares another width (out_channels, out_features,
    num_features) are refused before any image is read, naming the layer they were fitted at."""
    from .interventions import width_mismatch

    wrong = width_mismatch(module, int(pairs.decoding_.shape[1]), layer)
    if wrong:
        fitted = (f" (they were fitted at {meta['layer']!r}: leave out --layer)"
                  if meta.get("layer") and meta["layer"] != layer else "")
        raise UserError(wrong + fitted)


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


def _check_output(path: str, overwrite: bool, what: str) -> None:
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{what} {path!r} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"the folder of {what} {path!r} does not exist ({parent})")


def _check_report_folder(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out {path!r} is a file, not a folder: name a folder for the report")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise UserError(f"the report folder {path!r} exists; pass --overwrite to replace it (or --out another)")


def cmd_fit(args) -> int:
    import torch

    from . import pipeline
    from .store import ActivationStore, extract

    _check_output(args.out, args.overwrite, "the pairs file")
    if not args.out.endswith(".npz"):
        raise UserError(f"--out must name a .npz file, got {args.out!r}")
    for flag, value in (("--concepts", args.concepts), ("--batch-size", args.batch_size)):
        _at_least(flag, value, 1)
    log = pipeline.Log(enabled=not args.quiet)
    store_exists = args.store and os.path.isfile(os.path.join(args.store, "store.json"))
    need_model = not store_exists or args.ura
    model = name = None
    layer = args.layer
    if need_model:
        with log.step("loading the model"):
            model, name, layer, _ = _model_and_layer(args)
    elif not layer:
        raise UserError("pass --layer (the layer the store holds, recorded in the pairs file)")
    torch.manual_seed(args.seed)
    if store_exists and not args.images:
        with log.step(f"opening the activation store {args.store}"):
            source = ActivationStore(args.store)
            key = source.key
            if key.get("layer") != layer:
                raise UserError(f"the store {args.store!r} holds layer {key.get('layer')!r}, not {layer!r}")
            preprocessing = key.get("preprocessing")
            log.say(f"{source.n_images} images, grid {source.grid}, {source.n_features} channels")
    else:
        with log.step("reading the images"):
            data = pipeline.image_dataset(args.images, crops_per_photo=_crops(args), seed=args.seed)
            norm = _normalisation(args, name)
            preprocessing = dict(data.preprocessing, normalisation=norm)
            log.say(f"{len(data)} views of {len(data.names)} images" +
                    ("" if args.images else " (the photos shipped in packages)"))
        inputs = pipeline.model_input(pipeline.images_of(data), norm)
        if args.store:
            with log.step(f"capturing {layer} into the store {args.store} (resumable)"):
                source = extract(model, layer, inputs, args.store, preprocessing=preprocessing, model_name=name,
                                 batch_size=args.batch_size, progress=False if args.quiet else None)
        else:
            from .capture import capture

            with log.step(f"capturing {layer} on {len(inputs)} images"):
                source = capture(model, layer, inputs, batch_size=args.batch_size,
                                 progress=False if args.quiet else None)
                log.say(f"activations {tuple(source.shape[1:])} per image")
    if getattr(source, "ndim", 4) != 4 and args.ura:
        raise UserError(f"URA needs a spatial layer; {layer} gives {tuple(source.shape)}; pass --no-ura")
    with log.step(f"fitting {args.concepts} pairs" + (" with URA through the model's head" if args.ura else "")):
        pairs = pipeline.fit_pairs(model, layer, source, args.concepts, ura=args.ura,
                                   model_name=name or (args.model or None), preprocessing=preprocessing,
                                   seed=args.seed, progress=False if args.quiet else None)
    pairs.save(args.out)
    log.say(f"pairs written to {args.out}: decoding/encoding directions of shape {pairs.decoding_.shape}")
    return 0


def cmd_report(args) -> int:
    import torch

    from . import pipeline
    from .pairs import EDPairs
    from .probe import make_probe_set

    log = pipeline.Log(enabled=not args.quiet)
    for flag, value in (("--probe", args.probe), ("--noise", args.noise)):
        _at_least(flag, value, 0)
    if not os.path.isfile(args.pairs):
        raise UserError(f"no pairs file {args.pairs!r} (make one with: edpairs fit ... --out {args.pairs})")
    pairs = EDPairs.load(args.pairs)
    meta = pairs.metadata or {}
    _check_report_folder(args.out, args.overwrite)
    with log.step("loading the model"):
        model, name, layer, module = _model_and_layer(args, meta)
        _check_pairs_fit_layer(module, layer, pairs, meta)
    torch.manual_seed(args.seed)
    with log.step("reading the images"):
        data = pipeline.image_dataset(args.images, crops_per_photo=_crops(args), seed=args.seed)
        images = pipeline.images_of(data)
        probe = make_probe_set(args.probe, seed=args.seed) if args.probe else None
    class_names = None
    if name == "efficientnet-lite0":
        from .zoo import imagenet_class_names

        class_names = imagenet_class_names()
    inputs = pipeline.analyse(model, layer, pairs, images, probe=probe, class_names=class_names,
                              explain_images=pipeline.first_views(data), n_noise=args.noise,
                              normalisation=_normalisation(args, name), log=log, seed=args.seed)
    inputs.meta.update(model=name, layer=layer, pairs=os.path.abspath(args.pairs), images=len(images))
    index = pipeline.write(args.out, pairs, inputs, title=args.title or f"edpairs report: {name} {layer}",
                           overwrite=args.overwrite, log=log)
    print(index)
    return 0


def cmd_demo(args) -> int:
    from . import pipeline

    _check_report_folder(args.out, args.overwrite)
    kwargs = dict(layer=args.layer, n_concepts=args.concepts, ura=args.ura, seed=args.seed, overwrite=args.overwrite,
                  log=not args.quiet)
    if args.quick:
        kwargs.update(crops_per_photo=2, n_probe=32, n_noise=10)
    index = pipeline.demo(args.out, **kwargs)
    print(index)
    return 0


def cmd_layers(args) -> int:
    from . import pipeline
    from .capture import layer_names

    model, name = pipeline.load_model(args.model)
    example = None
    if args.shapes:
        import torch

        _at_least("--size", args.size, 1, " (pixels)")
        example = torch.zeros(1, 3, args.size, args.size)
    try:
        rows = layer_names(model, example)
    except RuntimeError as exc:  # the model refuses the zero image (too small, other channels ...)
        if example is None:
            raise
        raise UserError(f"{name} could not run one zero image of {args.size} x {args.size} pixels to find the "
                        f"output shapes ({type(exc).__name__}: {str(exc).splitlines()[0]}); try another --size, "
                        "or leave out --shapes") from None
    for r in rows:
        if isinstance(r, tuple):
            print(f"{r[0]:40s} {'x'.join(map(str, r[1])) if r[1] else '-'}")
        else:
            print(r)
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, model_required):
        p.add_argument("--model", required=model_required,
                       help="efficientnet-lite0 (ships in packages), package.module:factory, or a TorchScript/.pt file")
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
    p.add_argument("--title", help="the report's title (default: edpairs report: MODEL LAYER)")

    p = sub.add_parser("layers", help="list the layer names of a model (with output shapes: --shapes)")
    p.add_argument("--model", required=True, help="efficientnet-lite0, package.module:factory or a .pt file")
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

    p = sub.add_parser("selfcheck", help="check every kernel against the float64 reference (CPU, and GPU if present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the test data (default 0)")
    sub.add_parser("info", help="print what this build contains (JSON)")
    return parser


COMMANDS = {"fit": cmd_fit, "report": cmd_report, "demo": cmd_demo, "layers": cmd_layers, "bench": cmd_bench}


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        return selfcheck(args.seed)
    if args.command == "info":
        import edpairs as edp

        print(json.dumps(dict(edp.build_info(), cuda_devices=edp.cuda_device_count()), indent=2))
        return 0
    if args.command in COMMANDS:
        from .store import StoreCorrupted, StoreIncomplete

        try:
            return COMMANDS[args.command](args)
        except (UserError, FileNotFoundError, FileExistsError, ImportError, ValueError, TypeError,
                StoreCorrupted, StoreIncomplete) as exc:
            print(f"edpairs {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"edpairs {args.command}: interrupted", file=sys.stderr)
            return 130
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
