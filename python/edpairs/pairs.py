"""The EDPairs estimator (DESIGN section 2, stages 1, 2 and 4, and 5 with a head): decoding
directions (filters and thresholds) from directional clustering in whitened coordinates,
encoding directions (signal vectors) from the positives of each detector, refined jointly so
that each filter reads its own signal with gain 1 and the others with 0; with the network head,
Uncertainty Region Alignment (:mod:`edpairs.ura`). Every stage but URA streams over chunks;
URA streams over batches of whole images."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from types import SimpleNamespace
from typing import Optional

import numpy as np

from . import ops
from ._arrays import device_scope, namespace_of, on_data_device, on_device_of, to_numpy64
from ._checks import check_bool, check_real
from ._checks import check_int as _check_int
from ._checks import is_int as _is_int
from ._checks import is_real as _is_real
from ._io import write_atomic
from ._progress import Progress
from ._source import ChunkSource, row_blocks
from .cluster import _OrderedSum, _Placed, _where, Whitener, _count_rows, _Geometry, _unit_rows, cluster, resolve_shrinkage
from .distributed import merge_moments, reducer

__all__ = ["EDPairs", "positives_signal_vectors", "whole_data_signal_vectors"]

FORMAT = "edpairs.pairs"
FORMAT_VERSION = 1
METHODS = ("centroid", "discriminant", "biorthogonal")
#: fit refuses rows whose mean is more than this many times their spread (|mean| against
#: sqrt(trace cov)): the pairs compute in float32 (24 bits), and beyond 2^13 the rounding of the
#: offset costs the directions ~3e-4 and the signal vectors ~1e-3 (more, and detections flip, as
#: it grows). Centring the rows first loses nothing.
MAX_OFFSET_RATIO = 2.0**13


def positives_signal_vectors(stats: ops.SignalMoments, *, min_count: int = 2):
    """s_i = Cov_P(x, z_i) / Var_P(z_i) over the positives P_i of each detector (stage 4).

    Returns (S (I, D) float64, ok (I,) bool); rows with fewer than ``min_count`` positives or
    no variance of z among them are zero and flagged False."""
    n = to_numpy64(stats.count)
    sx, sz, szz, sxz = (to_numpy64(a) for a in (stats.sum_x, stats.sum_z, stats.sum_zz, stats.sum_xz))
    safe = np.maximum(n, 1)
    mean_x = sx / safe[:, None]
    mean_z = sz / safe
    var_z = szz / safe - mean_z**2
    cov_xz = sxz / safe[:, None] - mean_x * mean_z[:, None]
    ok = (n >= min_count) & (var_z > 1e-12 * np.maximum(szz / safe, 1e-300))
    S = np.zeros_like(cov_xz)
    S[ok] = cov_xz[ok] / var_z[ok, None]
    return S, ok


def whole_data_signal_vectors(W: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """The classic estimator s = Cov w / (w^T Cov w) (PatternNet / LEACE), rows of W (I, D)."""
    W = np.asarray(W, dtype=np.float64)
    CW = W @ np.asarray(cov, dtype=np.float64)  # (I, D): rows Cov w_i (Cov is symmetric)
    return CW / np.einsum("id,id->i", CW, W)[:, None]


class EDPairs:
    """Encoding-decoding direction pairs of the concepts a layer represents.

    Parameters
    ----------
    n_concepts : number of concepts I to find.
    method : how decoding directions are formed from the whitened clusters —
        ``"centroid"`` (default; measured best on ground truth, see benchmarks/README.md):
        the raw-space filters ``P^T c_i`` of the whitened centroids;
        ``"discriminant"``: closed-form ``Cov^+ (mu_i - mu)`` from the cluster means;
        ``"biorthogonal"``: centroid filters, then alternating ``W <- (W S^T)^+ W`` with
        positives-only re-estimation of the signal vectors S (each filter reads its own signal
        with gain 1 and the others with 0). With mutually exclusive concepts the cluster
        filters span one dimension less than the concepts, which this cannot restore.
    whiten : cluster in whitened coordinates (True) or merely standardised ones.
    whiten_rtol : rank cut of the whitening: eigenvalues of the covariance at or below
        ``whiten_rtol * max`` are directions where the data does not vary; they are dropped
        (the discriminant method's pseudo-inverse uses the same cut).
    whiten_shrinkage : regularisation of the covariance that the whitening (and the
        discriminant method's inverse) uses, ``(1 - a) Cov + a (tr Cov / D) I`` on the retained
        rank: None or 0 (default): the sample covariance; ``"oas"``: ``a`` from the Oracle
        Approximating Shrinkage closed form of (n rows, Cov)
        (:func:`edpairs.cluster.oas_shrinkage`; about (1 + effective rank) / n, so it matters
        only when rows are few for the dimension); a number in [0, 1] fixes ``a``. Measured
        (benchmarks/bench_groundtruth.py, bench_dissection.py): "oas" leaves the ground truth
        unchanged and gives a ~ 0.01 on EfficientNet-Lite0 layers (no measurable effect);
        a = 0.5 loses the large synthetic preset entirely (IoU 0.92 -> 0.02: its distractors
        out-vary its concepts). The encoding directions and thresholds use the sample
        covariance: shrinkage regularises an inverse, not the data's own spread.
        ``whitener_.shrinkage`` holds the ``a`` applied.
    signal : ``"positives"`` (stage 4 estimator, default) or ``"whole"`` (``Cov w / w^T Cov w``).
    n_init, max_iter, tol, init_size : spherical k-means restarts, iterations, relative
        tolerance on the mean cosine, rows sampled for k-means++ seeding.
    refine_iter, refine_tol : biorthogonal iterations and their stopping tolerance.
    gradient : optional gradient refinement of the detectors with the published losses
        (DESIGN section 2 stage 3, :mod:`edpairs.refine`): ``True`` for the default
        :class:`edpairs.refine.RefineConfig`, or a config / dict of its fields. Off by default:
        on the synthetic ground truth it lowered IoU and cosines (benchmarks/README.md).
    random_state : seed; the same seed gives the same pairs, for an array or its chunks.
    progress : progress display on stderr (default: only when stderr is a terminal).
    metadata : JSON-serialisable description (model, layer, preprocessing) kept with the pairs;
        :func:`edpairs.pipeline.fit_pairs` adds ``model_params``, the fingerprint of the model's
        weights (checked before an analysis), and ``fit_warnings`` when the data was too little.

    Fitted attributes (numpy float32): ``decoding_`` (I, D), ``bias_`` (I,), ``encoding_`` (I, D),
    ``mean_`` (D,), ``n_positives_`` (I,), ``whitener_``, ``cluster_centers_`` (whitened),
    ``n_samples_``; ``ura_``: the per-stage loss history of Uncertainty Region Alignment when
    ``fit`` was given a head (None otherwise). ``detect``, ``latent_factors`` and ``decode``
    return X's library/device.
    """

    def __init__(self, n_concepts: int, *, method: str = "centroid", whiten: bool = True,
                 signal: str = "positives", n_init: int = 3, max_iter: int = 100, tol: float = 1e-6,
                 init_size: Optional[int] = None, refine_iter: int = 20, refine_tol: float = 1e-5, gradient=None,
                 whiten_rtol: float = 1e-5, whiten_shrinkage=None, random_state=None, check_finite: bool = True,
                 progress: Optional[bool] = None, chunk_rows: Optional[int] = None, metadata: Optional[dict] = None):
        self.n_concepts = n_concepts
        self.method = method
        self.whiten = whiten
        self.signal = signal
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.init_size = init_size
        self.refine_iter = refine_iter
        self.refine_tol = refine_tol
        self.gradient = gradient
        self.whiten_rtol = whiten_rtol
        self.whiten_shrinkage = whiten_shrinkage
        self.random_state = random_state
        self.check_finite = check_finite
        self.progress = progress
        self.chunk_rows = chunk_rows
        self.metadata = metadata

    # ---- fitting ------------------------------------------------------------------------
    def _validate(self) -> None:
        _check_int("n_concepts", self.n_concepts, 1)
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.signal, str) or self.signal not in ("positives", "whole"):
            raise ValueError(f"signal must be 'positives' or 'whole', got {self.signal!r}")
        for name in ("whiten", "check_finite"):
            check_bool(name, getattr(self, name))
        if self.progress is not None and not isinstance(self.progress, (bool, np.bool_)):
            raise ValueError(f"progress must be True, False or None, got {self.progress!r}")
        _check_int("n_init", self.n_init, 1)
        _check_int("max_iter", self.max_iter, 1)
        _check_int("refine_iter", self.refine_iter, 0)
        _check_int("init_size", self.init_size, 1, optional=True)
        _check_int("chunk_rows", self.chunk_rows, 1, optional=True)
        check_real("tol", self.tol, "a finite number >= 0", lambda v: v >= 0)
        check_real("refine_tol", self.refine_tol, "a finite number >= 0", lambda v: v >= 0)
        check_real("whiten_rtol", self.whiten_rtol, "a number in [0, 1)", lambda v: 0 <= v < 1)
        resolve_shrinkage(self.whiten_shrinkage, np.eye(2), 1)  # raises on a bad setting
        if self.gradient is not None and not isinstance(self.gradient, (bool, dict)):
            from .refine import RefineConfig

            if not isinstance(self.gradient, RefineConfig):
                raise ValueError(f"gradient must be None, a bool, a RefineConfig or a dict of its fields, "
                                 f"got {self.gradient!r}")
        if isinstance(self.random_state, (bool, np.bool_)):
            raise ValueError(f"random_state must be None, a non-negative integer or a numpy Generator, "
                             f"got {self.random_state!r}")
        try:
            np.random.default_rng(self.random_state)  # returns a Generator as is: its state is untouched
        except (TypeError, ValueError) as exc:
            raise ValueError(f"random_state must be None, a non-negative integer or a numpy Generator, "
                             f"got {self.random_state!r} ({exc})") from exc
        if self.metadata is not None:
            try:
                json.dumps(self.metadata)
            except TypeError as exc:
                raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc

    def fit(self, X, head=None, ura=None, *, process_group=None, checkpoint=None) -> "EDPairs":
        """Fits the pairs on X: an (N, D) array (numpy, torch, cupy) or a re-iterable of chunks
        (a list, or a callable returning a fresh iterator of (n, D) arrays).

        With ``head`` (the network after the layer, features -> logits; see :mod:`edpairs.ura`
        for its contract), stages 1-4 run on the patches and then Uncertainty Region Alignment
        (DESIGN section 2 stage 5) aligns the detectors and signal vectors with the head's
        uncertainty region. X must then hold whole images: a (n_images, h, w, D) or
        (n_images, P, D) channel-last array (numpy or torch), or an object whose ``images()``
        returns a fresh iterator of such arrays (its ``chunks()``, where it has one, feeds
        stages 1-4). ``ura``: a :class:`edpairs.ura.URAConfig` or a dict of its fields (default
        settings when None; ``False`` skips URA; the seed defaults to ``random_state``).
        ``ura_`` then holds the per-stage loss history (None when URA did not run).

        ``process_group`` (a ``torch.distributed`` group, or True for the default one): X holds
        this rank's rows, every statistic is all-reduced, and every rank ends with the pairs of
        one process fitted on all ranks' rows in rank order (:mod:`edpairs.distributed`; not
        with ``head`` or ``gradient`` yet). ``checkpoint``: a file path (one per rank) where
        the state is saved atomically after the moments and after every clustering pass; a fit
        killed mid-way and called again with the same arguments resumes there
        (:mod:`edpairs.checkpoint`); the file is removed when the fit completes."""
        self._validate()
        if process_group not in (None, False) and (head is not None or self.gradient):
            raise NotImplementedError("process_group is not supported with head= (URA) or gradient= yet; "
                                      "fit the detectors with process_group and no head, or fit on one process")
        red = reducer(process_group)
        images = None
        self.ura_ = None
        if head is not None and ura is not False:
            from .ura import ImageSource, URAConfig

            if not callable(head):
                raise TypeError(f"head must be callable (features -> logits), got {type(head).__name__}")
            seed = self.random_state if isinstance(self.random_state, (int, np.integer)) else None
            if isinstance(ura, dict):
                ura = URAConfig(**{"seed": seed, **ura})
            elif ura is None or ura is True:
                ura = URAConfig(seed=seed)
            elif not isinstance(ura, URAConfig):
                raise TypeError(
                    f"ura must be a URAConfig, a dict of its fields, None or False, got {type(ura).__name__}")
            ura.validate()
            images = ImageSource(X)
            X = images.patches()
        elif head is not None:  # ura=False: the same fit on the patches, without URA
            from .ura import ImageSource

            X = ImageSource(X).patches()
        source = ChunkSource(X, chunk_rows=self.chunk_rows)
        I = int(self.n_concepts)
        progress = self.progress if red.rank == 0 else False
        ckpt, saved = self._checkpoint(checkpoint, source, red, head is not None)
        if saved is not None:
            n_rows, mean, cov = int(saved[1]["carried"]["n"]), saved[2]["mean"], saved[2]["cov"]
            _count_rows(source)
        else:
            with Progress(total=None, desc="edpairs: moments", enabled=progress, unit=" chunks") as bar:
                mom = ops.Moments()
                for chunk in source:
                    mom.update(chunk, check_finite=self.check_finite)
                    bar.update(1)
            if source.n_features is None:  # (not one chunk: not even the width is known)
                raise ValueError("X has no rows: the source gave no chunks")
            n_rows, mean, m2 = merge_moments(red, mom.n, to_numpy64(mom.mean) if mom.n else np.zeros(source.n_features),
                                             to_numpy64(mom.m2) if mom.n else np.zeros((source.n_features,) * 2))
            if n_rows == 0:
                raise ValueError("X has no rows")
            cov = m2 / n_rows
            if ckpt is not None:
                ckpt.carry({"n": n_rows}, {"mean": mean, "cov": cov})
                ckpt.save("moments", {}, {})
        if I > n_rows:
            raise ValueError(f"n_concepts={I} is larger than the number of rows N={n_rows}")
        _check_offset(mean, cov)
        # The regularised covariance: the whitening's, and the discriminant method's inverse.
        regularised = Whitener.from_covariance(mean, cov, rtol=self.whiten_rtol, shrinkage=self.whiten_shrinkage,
                                               n_samples=n_rows)
        if self.whiten:
            whitener = regularised
        else:
            std = np.sqrt(np.clip(np.diag(cov), 0, None))
            if not (std > 0).any():
                raise ValueError("the data is constant (zero covariance): there are no directions to find")
            inv = np.divide(1.0, std, out=np.zeros_like(std), where=std > 1e-12 * std.max())
            whitener = Whitener(mean, np.diag(inv)[inv > 0], std[inv > 0] ** 2)
        geometry = _Geometry(whitener)
        if saved is not None and saved[0] == "clustered":
            C, mean_cosine = saved[2]["C"], float(saved[1]["meta"]["mean_cosine"])
        else:
            clusters = cluster(source, I, geometry=geometry, n_init=self.n_init, max_iter=self.max_iter, tol=self.tol,
                               init_size=self.init_size, random_state=self.random_state, check_finite=False,
                               progress=progress, keep_labels=False, desc="edpairs: clustering", red=red,
                               checkpoint=ckpt)
            C, mean_cosine = clusters.centers, float(clusters.mean_cosine)
            if ckpt is not None:
                ckpt.save("clustered", {"mean_cosine": mean_cosine}, {"C": C})
        W = geometry.filters(C)
        member_labels = _MemberLabels(geometry, W.astype(np.float32))

        with Progress(total=None, desc="edpairs: pairs", enabled=progress, unit=" passes") as bar:
            if self.method == "discriminant":
                sums, counts = member_labels.member_sums(source)
                sums, counts = red.sum(sums), red.sum(counts)
                mu = sums / np.maximum(counts, 1)[:, None]  # cluster means of x - mean
                # The whitening's regularised inverse, with its rank cut: directions where the data
                # barely varies carry no discriminant signal, only rounding (fits of one array and
                # of its chunks agreed only there), and shrinkage bounds what noise directions get.
                W = (mu @ regularised.P.T) @ regularised.P
            W = _unit_rows(W)
            b = _thresholds(source, W, member_labels, mean, cov, red=red)
            bar.update(1)
            if self.gradient:
                W, b = self._gradient_refine(source, W, b)
                bar.update(1, note="gradient refinement")
            S, n_pos = self._signal(source, W, b, mean, cov, red)
            bar.update(1)
            self.n_refine_ = 0
            if self.method == "biorthogonal":
                for _ in range(self.refine_iter):
                    # (W S^T)^{-1} W; a pseudo-inverse, since with mutually exclusive concepts the
                    # cluster filters span one dimension less than the concepts (they sum to ~0).
                    W_new = np.linalg.pinv(W @ S.T, rcond=1e-3) @ W
                    change = np.abs(W_new - W).max() / max(np.abs(W).max(), 1e-300)
                    W = W_new
                    b = _thresholds(source, W, member_labels, mean, cov, red=red)
                    S, n_pos = self._signal(source, W, b, mean, cov, red)
                    self.n_refine_ += 1
                    bar.update(2, note=f"change {change:.2e}")
                    if change < self.refine_tol:
                        break
            if images is not None:
                W, b, S, n_pos = self._align(images, head, ura, source, W, b, S, n_pos, whitener, mean, cov,
                                             member_labels)
                bar.update(1, note="URA")
        # Convention: unit encoding directions, filters scaled to read them with gain 1, so
        # latent factors are in units of the encoding direction (as the model x = S alpha + ...).
        norms = np.linalg.norm(S, axis=1)
        norms[norms == 0] = 1.0
        self.decoding_ = (W * norms[:, None]).astype(np.float32)
        self.bias_ = (b * norms).astype(np.float32)
        self.encoding_ = (S / norms[:, None]).astype(np.float32)
        self.mean_ = mean.astype(np.float32)
        self.n_positives_ = n_pos
        self.whitener_ = whitener
        self.cluster_centers_ = C.astype(np.float32)
        self.cluster_mean_cosine_ = mean_cosine
        self.n_samples_ = n_rows
        self.n_features_in_ = int(source.n_features)
        if ckpt is not None:
            ckpt.done()
        return self

    def _checkpoint(self, checkpoint, source, red, with_head: bool):
        """The fit's Checkpoint (None without one) and its saved state (None when fresh)."""
        if checkpoint is None:
            return None, None
        from .checkpoint import Checkpoint, data_fingerprint

        params = {k: v for k, v in self.get_params().items() if k not in ("progress", "metadata")}
        ckpt = Checkpoint.of(checkpoint, lambda: {"fit": "EDPairs", "data": data_fingerprint(source), "rank": red.rank,
                                                  "world": red.world_size, "head": with_head, **params})
        saved = ckpt.load()
        if saved is not None:
            ckpt.carry({"n": saved[1]["carried"]["n"]}, {"mean": saved[2]["mean"], "cov": saved[2]["cov"]})
        return ckpt, saved

    def _gradient_refine(self, source, W, b):
        from .refine import RefineConfig, refine_detectors

        config = self.gradient
        if config is True:
            config = RefineConfig(seed=self.random_state if isinstance(self.random_state, (int, np.integer)) else None)
        elif isinstance(config, dict):
            config = RefineConfig(**config)
        data = source.array if source.in_memory else (lambda: iter(source))
        res = refine_detectors(data, W.T.astype(np.float32), b.astype(np.float32), config=config,
                               progress=self.progress)
        return to_numpy64(res.W).T, to_numpy64(res.b)

    def _align(self, images, head, config, source, W, b, S, n_pos, whitener, mean, cov, member_labels):
        from .ura import align

        counts = {"n_pos": n_pos}

        def signal(W_new, b_new):
            S_new, counts["n_pos"] = self._signal(source, W_new, b_new, mean, cov)
            return S_new

        def thresholds(W_new):
            return _thresholds(source, W_new, member_labels, mean, cov)

        res = align(images, head, W, b, S, whitener=whitener, signal=signal, thresholds=thresholds, config=config,
                    progress=self.progress)
        if not config.resignal and config.constrained_epochs:  # counts of the final detectors
            counts["n_pos"] = self._signal(source, res.W, res.b, mean, cov)[1]
        self.ura_ = res.history
        return res.W, res.b, res.S, counts["n_pos"]

    def _signal(self, source, W, b, mean, cov, red=None):
        stats = None
        # W, b and the mean go to each device once (a copy from host memory waits for the
        # device), and every chunk's statistics share that centre, so merging them compares
        # nothing on the device (SignalMoments.merge). float64 chunks keep a float64 centre (the
        # same float32 values): given the float32 one, signal_moments cast it anew per chunk,
        # and each merge compared the two casts on the device, a wait per chunk.
        mean32 = mean.astype(np.float32)
        params = _Placed(np.ascontiguousarray(W.T, np.float32), b.astype(np.float32), mean32, mean32.astype(np.float64))
        for chunk in source:
            Wt, bb, mu32, mu64 = params.on(chunk)
            mu = mu64 if namespace_of(chunk).dtype_name(chunk) == "float64" else mu32
            s = ops.signal_moments(chunk, Wt, bb, center=mu, check_finite=False)
            stats = s if stats is None else stats.merge(s)
        if red is not None and red.active:  # sums around the same (global) centre: all-reduce them
            stats = SimpleNamespace(**{f: red.sum(to_numpy64(getattr(stats, f)))
                                       for f in ("count", "sum_x", "sum_z", "sum_zz", "sum_xz")})
        n_pos = to_numpy64(stats.count).astype(np.int64)
        if self.signal == "whole":
            return whole_data_signal_vectors(W, cov), n_pos
        S, ok = positives_signal_vectors(stats)
        if not ok.all():  # too few positives for the stage-4 estimator: fall back to the whole data
            S[~ok] = whole_data_signal_vectors(W[~ok], cov)
        return S, n_pos

    # ---- use ----------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "decoding_"):
            raise ValueError("this EDPairs is not fitted yet: call fit first (or EDPairs.load)")

    def _project(self, X, name="X"):
        """z = X W^T in X's library (float32), after checking X."""
        self._check_fitted()
        X, xp = ops._data(X, name)
        if X.shape[1] != self.decoding_.shape[1]:
            raise ValueError(
                f"{name} has {X.shape[1]} columns but the pairs were fitted on D={self.decoding_.shape[1]}: "
                f"got shape {tuple(X.shape)}"
            )
        with np.errstate(over="ignore"):  # float64 beyond the float32 range: reported below
            Xf = xp.astype(X, "float32")
        # Checked after the cast, so that finite float64 values beyond the float32 range are caught.
        if self.check_finite and not xp.all_finite(Xf):
            if xp.all_finite(X):
                raise ValueError(f"{name} has values beyond the float32 range (about ±3.4e38), which the "
                                 "pairs compute in; rescale the input or set check_finite=False")
            raise ValueError(f"{name} contains NaN or Inf; clean the input or set check_finite=False")
        return xp.matmul(Xf, on_device_of(self.decoding_.T, X)), xp, X

    @on_data_device("X")
    def decode(self, X):
        """Decoded values z = W x (N, I), before the threshold."""
        return self._project(X)[0]

    @on_data_device("X")
    def detect(self, X, *, hard: bool = False):
        """Memberships y = sigmoid(W x - b) (N, I); with ``hard=True`` the booleans W x > b."""
        check_bool("hard", hard)
        z, xp, X = self._project(X)
        z = z - on_device_of(self.bias_, X)
        if hard:
            return z > 0
        return xp.logistic(z)

    @on_data_device("X")
    def latent_factors(self, X):
        """Centred latent factors alpha_i = (w_i . x - w_i . mean) / (w_i . s_i), (N, I)."""
        z, xp, X = self._project(X)
        W = self.decoding_.astype(np.float64)
        offset = W @ self.mean_.astype(np.float64)
        gain = np.einsum("id,id->i", W, self.encoding_.astype(np.float64))
        return (z - on_device_of(offset.astype(np.float32), X)) / on_device_of(gain.astype(np.float32), X)

    # ---- persistence --------------------------------------------------------------------
    def save(self, path) -> None:
        """Writes the fitted pairs to one .npz file (arrays + JSON metadata), atomically."""
        self._check_fitted()
        from . import __version__

        params = self.get_params()
        if not isinstance(self.random_state, (type(None), int, np.integer)):
            params["random_state"] = None  # (a Generator's state is not kept: a refit of the loaded pairs draws afresh)
        try:  # what load will check of the parameters, checked before anything is written
            self._rebuilt(self.n_concepts, params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot save these pairs: a parameter would not load back ({exc})") from None
        meta = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "edpairs_version": __version__,
            "n_concepts": int(self.decoding_.shape[0]), "n_features": int(self.decoding_.shape[1]),
            "n_samples": self.n_samples_, "params": params, "metadata": self.metadata,
            "whitening_shrinkage": float(getattr(self.whitener_, "shrinkage", 0.0)),
        }
        if getattr(self, "ura_", None):
            meta["ura"] = self.ura_  # per-stage loss history (plain floats); older readers ignore it
        try:
            meta_json = json.dumps(meta)
        except TypeError as exc:  # (metadata set after fit)
            raise ValueError(f"cannot save these pairs: metadata must be JSON-serialisable ({exc})") from None
        arrays = {
            "decoding": self.decoding_, "bias": self.bias_, "encoding": self.encoding_, "mean": self.mean_,
            "n_positives": np.asarray(self.n_positives_, np.int64), "whitening": self.whitener_.P,
            "whitening_eigenvalues": self.whitener_.eigenvalues, "whitening_mean": self.whitener_.mean,
            "cluster_centers": self.cluster_centers_,
            "meta": np.frombuffer(meta_json.encode(), dtype=np.uint8),
        }
        path = _path(path)
        if not path.endswith(".npz"):
            raise ValueError(f"the pairs file must end in .npz, got {path!r}")
        write_atomic(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path) -> "EDPairs":
        """Reads pairs written by :meth:`save`, checking the format, version and shapes."""
        path = _path(path)
        try:
            data = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear message
            raise ValueError(f"{path!r} is not an edpairs pairs file (not a readable .npz: {exc})") from exc
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file: np.load gives its one array
            raise ValueError(f"{path!r} is not an edpairs pairs file: it holds one {type(data).__name__} "
                             f"(a .npy file), expected the .npz archive that EDPairs.save writes")
        with data:
            if "meta" not in data.files:
                raise ValueError(f"{path!r} is not an edpairs pairs file (no metadata record)")
            try:
                meta = json.loads(bytes(data["meta"]).decode())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path!r} has a corrupted metadata record: {exc}") from exc
            if not isinstance(meta, dict):
                raise ValueError(f"{path!r} is not an edpairs pairs file (its metadata is a JSON "
                                 f"{type(meta).__name__}, expected an object)")
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path!r} is not an edpairs pairs file (format {meta.get('format')!r})")
            if not _is_int(meta.get("format_version", -1)):  # files without one predate versioning
                raise _invalid_field(path, meta, "format_version", "an integer")
            if meta.get("format_version", -1) > FORMAT_VERSION:
                raise ValueError(
                    f"{path!r} was written by edpairs {meta.get('edpairs_version')} in format version "
                    f"{meta.get('format_version')}; this edpairs reads up to version {FORMAT_VERSION}: upgrade edpairs"
                )
            for field in ("n_concepts", "n_features"):
                if not _is_int(meta.get(field)) or meta[field] < 1:
                    raise _invalid_field(path, meta, field, "a positive integer")
            if not isinstance(meta.get("params") or {}, dict):
                raise _invalid_field(path, meta, "params", "a JSON object of the constructor's parameters")
            if not _is_real(meta.get("whitening_shrinkage", 0.0)):
                raise _invalid_field(path, meta, "whitening_shrinkage", "a number")
            need = ("decoding", "bias", "encoding", "mean", "n_positives", "whitening", "whitening_eigenvalues",
                    "whitening_mean", "cluster_centers")
            missing = [k for k in need if k not in data.files]
            if missing:
                raise ValueError(f"{path!r} is missing arrays {missing}")
            arr = {}
            for k in need:
                try:
                    arr[k] = data[k]
                except Exception as exc:  # noqa: BLE001 - a damaged member (bad CRC, truncated, pickled objects)
                    raise ValueError(f"{path!r} is damaged: its array {k!r} cannot be read ({type(exc).__name__}: "
                                     f"{exc})") from None
        I, D = meta["n_concepts"], meta["n_features"]
        for k, a in arr.items():
            if a.dtype.kind not in "fiu":
                raise ValueError(f"{path!r}: {k} holds {a.dtype} values, expected real numbers")
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise ValueError(f"{path!r} is damaged: {k} holds NaN or Inf")
        expected = {"decoding": (I, D), "bias": (I,), "encoding": (I, D), "mean": (D,), "n_positives": (I,),
                    "whitening_mean": (D,)}
        for k, shape in expected.items():
            if arr[k].shape != shape:
                raise ValueError(f"{path!r}: {k} has shape {arr[k].shape}, expected {shape} for I={I}, D={D}")
        if arr["whitening"].ndim != 2 or arr["whitening"].shape[1] != D:
            raise ValueError(f"{path!r}: whitening has shape {arr['whitening'].shape}, expected (r, {D})")
        r = arr["whitening"].shape[0]
        if arr["whitening_eigenvalues"].shape != (r,):
            raise ValueError(f"{path!r}: whitening_eigenvalues has shape {arr['whitening_eigenvalues'].shape}, "
                             f"expected ({r},) for the whitening's rank")
        centers = arr["cluster_centers"]
        if centers.ndim != 2 or centers.shape[1] not in (D, r):
            raise ValueError(f"{path!r}: cluster_centers has shape {centers.shape}, expected (k, {D}) or (k, {r}) "
                             f"(raw or whitened coordinates)")
        params = dict(meta.get("params") or {})
        params.pop("n_concepts", None)
        params.setdefault("whiten_shrinkage", None)  # files from before the option: no shrinkage
        try:  # a refit of the loaded pairs would meet a bad saved parameter only then
            self = cls._rebuilt(I, params)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path!r} holds a parameter this edpairs cannot use: {exc}") from None
        self.metadata = meta.get("metadata")
        self.decoding_, self.bias_, self.encoding_ = arr["decoding"], arr["bias"], arr["encoding"]
        self.mean_, self.n_positives_ = arr["mean"], arr["n_positives"]
        self.whitener_ = Whitener(arr["whitening_mean"], arr["whitening"], arr["whitening_eigenvalues"],
                                  float(meta.get("whitening_shrinkage", 0.0)))
        self.cluster_centers_ = arr["cluster_centers"]
        self.n_samples_ = meta.get("n_samples")
        self.n_features_in_ = D
        self.ura_ = meta.get("ura")
        return self

    @classmethod
    def _rebuilt(cls, n_concepts: int, params: dict) -> "EDPairs":
        """An unfitted instance of these parameters (get_params' names), validated: what load
        makes of a file's parameters, and what save checks before writing them."""
        made = cls(n_concepts, **{k: v for k, v in params.items() if k in cls._param_names()})
        made._validate()
        return made

    @staticmethod
    def _param_names():
        return ("method", "whiten", "signal", "n_init", "max_iter", "tol", "init_size", "refine_iter", "refine_tol",
                "gradient", "whiten_rtol", "whiten_shrinkage", "random_state", "check_finite", "progress", "chunk_rows",
                "metadata")

    def get_params(self) -> dict:
        params = {"n_concepts": int(self.n_concepts)}
        for k in self._param_names():
            v = getattr(self, k)
            if dataclasses.is_dataclass(v) and not isinstance(v, type):
                v = dataclasses.asdict(v)
            if isinstance(v, np.generic):  # (numpy scalars as the Python numbers they hold)
                v = v.item()
            params[k] = v if isinstance(v, (type(None), bool, int, float, str, dict, list)) else repr(v)
        return params

    def __repr__(self) -> str:
        return f"EDPairs(n_concepts={self.n_concepts}, method={self.method!r})"


# ---- helpers ------------------------------------------------------------------------------


def _invalid_field(path: str, meta: dict, field: str, expected: str) -> ValueError:
    got = "it is missing" if field not in meta else f"got {meta[field]!r}"
    return ValueError(f"{path!r} is not a valid edpairs pairs file: metadata field {field!r} must be {expected}; {got}")


def _check_offset(mean: np.ndarray, cov: np.ndarray) -> None:
    spread = math.sqrt(max(float(np.trace(cov)), 0.0))
    ratio = float(np.linalg.norm(mean)) / spread if spread > 0 else 0.0
    if ratio > MAX_OFFSET_RATIO:
        raise ValueError(
            f"X's rows sit {ratio:.3g} times their spread from the origin (|mean| / sqrt(trace cov)); the pairs "
            f"compute in float32, where that offset leaves about {max(0.0, 24 - math.log2(ratio)):.0f} of 24 bits for "
            f"the spread (refused above {MAX_OFFSET_RATIO:g}). Centre the rows first (X - X.mean(0)) and give the "
            "pairs centred rows later too")


def _path(path) -> str:
    """A file path argument as str (str, bytes or os.PathLike)."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str, bytes or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(path)


def _blocks(source):
    """The rows of every chunk in blocks that bound library-side temporaries, in a fixed order."""
    return (block for chunk in source for block in row_blocks(chunk))


class _MemberLabels:
    """Cluster membership of each row under the final centroids, from the assignment kernel
    (labels do not depend on positive row scales, so unit ones serve); computed once per block
    and kept where the rows are (8 bytes a row) for the later passes."""

    def __init__(self, geometry: _Geometry, F: np.ndarray):
        self.geometry, self.F = geometry, F
        self._params = _Placed(F, geometry.center(), geometry.col_scale(F.shape[0]))  # sent once per device
        self._labels: list = []

    def _assign(self, block, accumulate: bool):
        xp = namespace_of(block)
        with device_scope(block):
            F, center, col_scale = self._params.on(block)
            ones = xp.zeros((block.shape[0],), "float32", block) + 1
            return ops.assign(block, F, center=center, row_scale=ones, col_scale=col_scale, accumulate=accumulate,
                              check_finite=False)

    def labels(self, index: int, block):
        if index == len(self._labels):
            self._labels.append(self._assign(block, False).labels)
        return self._labels[index]

    def member_sums(self, source):
        """Per-cluster sums of x - mean and counts (unweighted), added where the rows are
        (:class:`edpairs.cluster._OrderedSum`: no wait per block on a GPU)."""
        k, D = self.F.shape
        sums, counts = _OrderedSum((k, D)), _OrderedSum(k, np.int64)
        for index, block in enumerate(_blocks(source)):
            res = self._assign(block, True)
            sums.add(res.sums)
            counts.add(res.counts)
            if index == len(self._labels):
                self._labels.append(res.labels)
        return sums.result(), counts.result()


def _thresholds(source, W: np.ndarray, members: _MemberLabels, mean: np.ndarray, cov: np.ndarray,
                bins: int = 4096, red=None) -> np.ndarray:
    """Per detector, the threshold along w_i that best reproduces its cluster (highest IoU
    between {w_i . x > b_i} and the cluster's members), from streamed histograms of w_i . x."""
    I = W.shape[0]
    center = W @ mean
    # The floor only keeps a detector along a direction without variance from a zero-width
    # range; it is relative to the data's variance so that thresholds scale with the data.
    floor = 1e-30 * max(np.trace(cov) / cov.shape[0], np.finfo(np.float64).tiny)
    sd = np.sqrt(np.maximum(np.einsum("id,de,ie->i", W, cov, W), floor))
    lo, hi = center - 8 * sd, center + 8 * sd
    # The histograms are made where the rows are (the float64 bin arithmetic is the same there;
    # counts added without a wait, Namespace.add_counts), one pair per device, added on the host
    # at the end: no (n, I) z to the host. Rows go in slices of at most 2^22 / I, which bounds
    # the (rows, I) temporaries (32 MB each).
    W32 = W.astype(np.float32)
    params = _Placed(W32.T, lo, hi - lo, np.arange(I) * bins)
    hist: dict = {}  # (library, device) -> (members of cluster i by bin of w_i . x, all rows by bin)
    step = max(1, (1 << 22) // max(I, 1))
    for index, block in enumerate(_blocks(source)):
        xp = namespace_of(block)
        labels = members.labels(index, block)
        with device_scope(block):
            Wt, lo_, span, offsets = params.on(block)
            key = _where(block)
            if key not in hist:
                hist[key] = (xp.zeros((I * bins,), "int64", block), xp.zeros((I * bins,), "int64", block))
            pos_here, every_here = hist[key]
            for r0 in range(0, block.shape[0], step):
                z = xp.astype(xp.matmul(xp.astype(block[r0:r0 + step], "float32"), Wt), "float64")  # (rows, I)
                lab = labels[r0:r0 + step]
                # (clipped before the cast too: a value beyond int64 would cast to anything)
                idx = xp.clip(xp.astype(xp.clip((z - lo_) / span * bins, 0, bins - 1), "int64"), 0, bins - 1)
                xp.add_counts(pos_here, lab * bins + idx[xp.arange(z.shape[0], block), lab])
                xp.add_counts(every_here, (idx + offsets).ravel())
    pos, every = np.zeros(I * bins, np.int64), np.zeros(I * bins, np.int64)
    for members_by_bin, all_by_bin in hist.values():
        pos += to_numpy64(members_by_bin).astype(np.int64)
        every += to_numpy64(all_by_bin).astype(np.int64)
    if red is not None and red.active:
        pos, every = red.sum(pos), red.sum(every)
    pos, neg = pos.reshape(I, bins), (every - pos).reshape(I, bins)
    # Threshold at the lower edge of bin k: detections are the rows in bins >= k.
    tp = np.cumsum(pos[:, ::-1], axis=1)[:, ::-1]
    fp = np.cumsum(neg[:, ::-1], axis=1)[:, ::-1]
    fn = pos.sum(1, keepdims=True) - tp
    iou = tp / np.maximum(tp + fp + fn, 1)
    best = np.argmax(iou, axis=1)
    return lo + best * (hi - lo) / bins
