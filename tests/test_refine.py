"""edpairs.refine (stage 3, gradient refinement of detectors): every loss term against a plain
numpy formula on a hand-sized batch, the soft maximum's limits, exact mapping between raw and
standardised coordinates, improvement on a toy layer with known memberships, the inactive
floor and the excessive cap doing their jobs, determinism, chunked input, and input errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edpairs.refine import (  # noqa: E402
    LOSS_TERMS,
    RefineConfig,
    evaluate_detectors,
    loss_terms,
    refine_detectors,
    self_weighted_reduce,
    to_raw,
    to_standardized,
)

# ---------------------------------------------------------------------------------------
# The toy layer: three well-separated directional clusters in 8-D. Patch p belongs to
# cluster k (x_p ≈ a_p s_k, a_p ∈ [1, 3], with multiplicative and additive noise); the
# ideal detector of cluster k is w ∝ s_k with its threshold halfway.

D_TOY, I_TOY = 8, 3


def make_toy(n=1500, seed=0):
    rng = np.random.default_rng(seed)
    S = np.linalg.qr(rng.standard_normal((D_TOY, D_TOY)))[0][:, :I_TOY].T  # (I, D) orthonormal
    labels = rng.integers(0, I_TOY, n)
    a = rng.uniform(1.0, 3.0, n)[:, None]
    X = a * S[labels] + 0.15 * a * rng.standard_normal((n, D_TOY)) + 0.1 * rng.standard_normal((n, D_TOY))
    return X.astype(np.float32), labels, S


def fires(X, W, b):
    return (np.asarray(X, np.float64) @ np.asarray(W, np.float64) - np.asarray(b, np.float64)) > 0


def mean_iou(X, W, b, labels):
    """Detector i against cluster i (the detectors are initialised in cluster order)."""
    y = fires(X, W, b)
    ious = []
    for i in range(W.shape[1]):
        truth = labels == i
        ious.append((y[:, i] & truth).sum() / max(1, (y[:, i] | truth).sum()))
    return float(np.mean(ious))


# Small problems need a larger rate and smaller batches than the published large-data ones.
FAST = dict(lr=1e-2, epochs=20, batch_size=128, seed=0)


@pytest.fixture(scope="module")
def toy():
    return make_toy()


# ---------------------------------------------------------------------------------------
# Losses on a hand-checkable batch


def _plain_terms(X, W, b, gamma, tau, rho, nu):
    """The published terms written out directly in numpy float64, independently of the module."""

    def R(L):
        L = np.asarray(L, np.float64)
        if nu == 0:
            return L.mean()
        den = np.sum(L**nu)
        return 0.0 if den == 0 else np.sum(L ** (nu + 1)) / den

    z = X @ W - b
    y = (1.0 / (1.0 + np.exp(-z))) ** gamma
    q = y / y.sum(1, keepdims=True)
    H = -(q * np.log(q)).sum(1)
    rate = y.mean(0)
    I = W.shape[1]
    return {
        "sparsity": H.mean(),
        "sparsity_bound": R(H),
        "max_activation": (-(q * np.log(y)).sum(1)).mean(),
        "margin": np.mean([np.sqrt(np.sum(W[:, i] ** 2)) for i in range(I)]),
        "inactive": R(np.maximum(0.0, tau / I - rate)),
        "excessive": R(np.maximum(0.0, rate - rho)),
    }


@pytest.mark.parametrize("gamma", [1.0, 1.1])
def test_loss_terms_match_plain_formulas(gamma):
    X = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [0.5, -0.5]])
    W = np.array([[2.0, -1.0, 0.3], [0.5, 1.5, -2.0]])  # (D=2, I=3)
    b = np.array([0.5, 1.0, 2.0])
    # tau and rho chosen so that both hinge terms are active for some detector but not all
    cfg = RefineConfig(tau=0.9, rho=0.35, gamma=gamma, nu=4.0)
    plain = _plain_terms(X, W, b, gamma, cfg.tau, cfg.rho, cfg.nu)
    assert plain["inactive"] > 0 and plain["excessive"] > 0
    got = loss_terms(torch.tensor(X), torch.tensor(W), torch.tensor(b), cfg)
    assert set(got) == set(LOSS_TERMS)
    for name in LOSS_TERMS:
        assert got[name].dtype == torch.float64
        np.testing.assert_allclose(float(got[name]), plain[name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_loss_terms_default_rho_is_12_tau_over_I_capped_at_one():
    cfg = RefineConfig(tau=0.2)
    assert cfg.resolved_rho(100) == pytest.approx(12 * 0.2 / 100)
    assert RefineConfig(tau=0.2).resolved_rho(3) == pytest.approx(0.8)
    assert RefineConfig(tau=0.9).resolved_rho(3) == 1.0


def test_loss_terms_are_differentiable_and_finite_when_memberships_underflow():
    X = torch.tensor([[100.0, 0.0], [0.0, 100.0]], requires_grad=False)
    W = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], requires_grad=True)  # every y ≈ e^-100
    b = torch.zeros(2, requires_grad=True)
    terms = loss_terms(X, W, b, RefineConfig())
    sum(terms.values()).backward()
    terms = {k: v.detach() for k, v in terms.items()}
    assert all(torch.isfinite(t) for t in terms.values())
    assert torch.isfinite(W.grad).all() and torch.isfinite(b.grad).all()
    # q is still a proper distribution: equal memberships give the maximal entropy log 2
    assert terms["sparsity"].item() == pytest.approx(np.log(2))


def test_self_weighted_reduce_limits():
    L = torch.tensor([0.1, 0.5, 0.3, 0.0], dtype=torch.float64)
    assert float(self_weighted_reduce(L, nu=0)) == pytest.approx(float(L.mean()))
    assert float(self_weighted_reduce(L, nu=1)) == pytest.approx(float((L**2).sum() / L.sum()))
    assert float(self_weighted_reduce(L, nu=4)) == pytest.approx(float((L**5).sum() / (L**4).sum()))
    assert float(self_weighted_reduce(L, nu=500)) == pytest.approx(0.5, abs=1e-12)
    # between mean and max, increasing in nu
    vals = [float(self_weighted_reduce(L, nu=v)) for v in (0, 1, 2, 4, 8, 32)]
    assert all(a < b for a, b in zip(vals, vals[1:]))
    # all zero: 0, with a finite (zero) gradient
    Z = torch.zeros(3, requires_grad=True)
    r = self_weighted_reduce(Z, nu=4)
    r.backward()
    r = r.detach()
    assert r.item() == 0.0 and torch.equal(Z.grad, torch.zeros(3))
    # along a dimension
    M = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    np.testing.assert_allclose(self_weighted_reduce(M, nu=1000, dim=1).numpy(), [2.0, 3.0], rtol=1e-6)
    with pytest.raises(ValueError, match="non-negative"):
        self_weighted_reduce(torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="nu"):
        self_weighted_reduce(L, nu=-1)


def test_evaluate_accumulates_the_full_data_objective_exactly(toy):
    X, _, S = toy
    rng = np.random.default_rng(3)
    W = (4 * S.T + rng.standard_normal(S.T.shape)).astype(np.float64)
    b = np.array([2.0, 1.0, 6.0])
    cfg = RefineConfig(sparsity_bound=2.6, excessive=15.0, tau=0.9, rho=0.3, gamma=1.1)
    center, scale = X.mean(0).astype(np.float64), X.std(0).astype(np.float64)
    # one batch over everything, by hand
    Ws, bs = to_standardized(torch.tensor(W), torch.tensor(b), torch.tensor(center), torch.tensor(scale))
    Xs = (torch.tensor(X, dtype=torch.float64) - torch.tensor(center)) / torch.tensor(scale)
    whole = {k: float(v) for k, v in loss_terms(Xs, Ws, bs, cfg).items()}
    # streamed in uneven batches (the running-maximum rescaling of Σ H^ν is exercised)
    streamed = evaluate_detectors(X, W, b, config=cfg, center=center, scale=scale, batch_size=97)
    for name in LOSS_TERMS:
        assert streamed[name] == pytest.approx(whole[name], rel=1e-4, abs=1e-6), name
    assert streamed["total"] == pytest.approx(sum(w * whole[k] for k, w in cfg.weights().items()), rel=1e-4)


# ---------------------------------------------------------------------------------------
# Coordinates


def test_standardised_and_raw_detectors_give_the_same_memberships(toy):
    X, _, S = toy
    rng = np.random.default_rng(5)
    W0 = (4 * S.T + rng.standard_normal(S.T.shape)).astype(np.float32)
    b0 = np.array([2.0, 2.5, 1.5], np.float32)
    center = rng.normal(size=D_TOY)
    scale = rng.uniform(0.5, 2.0, D_TOY)
    res = refine_detectors(X, W0, b0, config=RefineConfig(**dict(FAST, epochs=2)), center=center, scale=scale)
    np.testing.assert_array_equal(res.center, center.astype(np.float32))
    Xd = X.astype(np.float64)
    z_raw = Xd @ res.W.astype(np.float64) - res.b.astype(np.float64)
    z_std = ((Xd - center) / scale) @ res.W_standardized.astype(np.float64) - res.b_standardized.astype(np.float64)
    # the returned arrays are float32 (like W0), so the agreement is float32's, not better
    np.testing.assert_allclose(z_raw, z_std, rtol=1e-5, atol=1e-5 * np.abs(z_std).max())
    np.testing.assert_allclose(1 / (1 + np.exp(-z_raw)), 1 / (1 + np.exp(-z_std)), atol=1e-5)
    # and the maps themselves are exact inverses (float64)
    Wt, bt = torch.tensor(W0, dtype=torch.float64), torch.tensor(b0, dtype=torch.float64)
    c, s = torch.tensor(center), torch.tensor(scale)
    Wr, br = to_raw(*to_standardized(Wt, bt, c, s), c, s)
    np.testing.assert_allclose(Wr.numpy(), Wt.numpy(), rtol=1e-14)
    np.testing.assert_allclose(br.numpy(), bt.numpy(), rtol=1e-13, atol=1e-13)


def test_default_standardisation_is_the_data_mean_and_std(toy):
    X = toy[0].copy()
    X[:, 3] = 7.0  # a constant column: its scale is floored, not zero
    W0 = np.eye(D_TOY, I_TOY, dtype=np.float64)
    res = refine_detectors(X, W0, np.zeros(I_TOY), config=RefineConfig(**dict(FAST, epochs=1)))
    np.testing.assert_allclose(res.center, X.astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
    std = X.astype(np.float64).std(0)
    keep = std > 0
    np.testing.assert_allclose(res.scale[keep], std[keep], rtol=1e-6)
    assert res.scale[3] == pytest.approx(1e-6 * std.max())
    assert np.isfinite(res.W).all() and np.isfinite(res.b).all()


# ---------------------------------------------------------------------------------------
# Refinement on the toy layer


def _perturbed_start(S, seed):
    rng = np.random.default_rng(seed)
    W0 = (4 * S.T + 1.2 * rng.standard_normal(S.T.shape)).astype(np.float32)
    b0 = (2.0 + rng.uniform(-1.5, 2.5, I_TOY)).astype(np.float32)
    return W0, b0


def test_refinement_recovers_memberships_and_lowers_the_objective(toy):
    X, labels, S = toy
    W0, b0 = _perturbed_start(S, seed=12)
    # First published stage plus the later stages' cap on excessive activity (with I = 3 the
    # published 12 tau / I exceeds 1, so the cap is set explicitly).
    cfg = RefineConfig(**FAST, excessive=15.0, rho=0.5)
    res = refine_detectors(X, W0, b0, config=cfg)
    before, after = mean_iou(X, W0, b0, labels), mean_iou(X, res.W, res.b, labels)
    print(f"IoU with the true memberships: before {before:.3f}, after {after:.3f}")
    assert before < 0.8
    assert after > 0.95 and after > before + 0.15
    # the full-data objective (same standardised coordinates) went down
    e0 = evaluate_detectors(X, W0, b0, config=cfg, center=res.center, scale=res.scale)
    e1 = evaluate_detectors(X, res.W, res.b, config=cfg, center=res.center, scale=res.scale)
    assert e1["total"] < 0.8 * e0["total"]
    # history: one record per epoch with every term, and the training objective decreased
    assert len(res.history) == cfg.epochs
    assert set(LOSS_TERMS) | {"epoch", "lr", "total"} <= set(res.history[0])
    assert res.history[-1]["total"] < res.history[0]["total"]
    assert res.config.rho == 0.5 and res.W.dtype == np.float32 and res.W.shape == W0.shape


def test_inactive_floor_revives_a_detector_that_never_fires(toy):
    X, _, S = toy
    W0 = (4 * S.T).astype(np.float32)
    b0 = np.array([2.0, 2.0, 16.0], np.float32)  # detector 2's hyperplane lies beyond its cluster
    assert fires(X, W0, b0)[:, 2].mean() == 0.0
    rates = {}
    for weight in (0.0, 15.0):
        res = refine_detectors(X, W0, b0, config=RefineConfig(**FAST, inactive=weight))
        rates[weight] = fires(X, res.W, res.b)[:, 2].mean()
    assert rates[0.0] == 0.0  # without the floor nothing brings it back
    assert rates[15.0] > 0.1  # with it, it fires on a sizeable share (the floor is 0.9 / 3)


def test_excessive_cap_reins_in_a_detector_that_fires_everywhere(toy):
    X, _, S = toy
    W0 = (4 * S.T).astype(np.float32)
    b0 = np.array([2.0, 2.0, -8.0], np.float32)  # detector 2 fires on every patch
    assert fires(X, W0, b0)[:, 2].mean() == 1.0
    rates = {}
    for weight in (0.0, 15.0):
        res = refine_detectors(X, W0, b0, config=RefineConfig(**FAST, excessive=weight, rho=0.5))
        rates[weight] = fires(X, res.W, res.b)[:, 2].mean()
    assert rates[0.0] > 0.95
    assert rates[15.0] < 0.55


def test_extra_loss_is_added_to_the_objective(toy):
    X, _, S = toy
    W0 = (4 * S.T).astype(np.float32)
    b0 = np.array([2.0, 2.0, 2.0], np.float32)
    seen = {}

    def pull_bias_to_minus_one(W, b, batch):
        seen.update(W=tuple(W.shape), b=tuple(b.shape), batch=tuple(batch.shape), grad=W.requires_grad)
        seen["batch_mean"] = float(batch.mean())
        return 100.0 * ((b + 1.0) ** 2).sum()

    cfg = RefineConfig(**FAST)
    res = refine_detectors(X, W0, b0, config=cfg, extra_loss=pull_bias_to_minus_one)
    plain = refine_detectors(X, W0, b0, config=cfg)
    assert seen["W"] == (D_TOY, I_TOY) and seen["b"] == (I_TOY,) and seen["batch"][1] == D_TOY
    assert seen["grad"] and abs(seen["batch_mean"]) < 0.5  # standardised coordinates
    assert "extra" in res.history[0] and "extra" not in plain.history[0]
    assert res.history[-1]["extra"] < res.history[0]["extra"]
    np.testing.assert_allclose(res.b_standardized, -1.0, atol=0.1)
    assert np.abs(plain.b_standardized + 1.0).max() > 0.5

    with pytest.raises(TypeError, match="scalar"):
        refine_detectors(X, W0, b0, config=cfg, extra_loss=lambda W, b, x: b)
    # evaluate_detectors refuses a NaN extra loss as refine_detectors does (its total was NaN),
    # and a config that is no RefineConfig by name
    torch = pytest.importorskip("torch")
    with pytest.raises(FloatingPointError, match="extra_loss gave nan .* must return a finite number"):
        evaluate_detectors(X, W0, b0, config=cfg, extra_loss=lambda W, b, x: torch.tensor(float("nan")))
    with pytest.raises(TypeError, match="config must be a RefineConfig or None, got str"):
        evaluate_detectors(X, W0, b0, config="x")
    with pytest.raises(ValueError, match=r"RefineConfig.seed must be an integer in \[0, 2\*\*63\) or None"):
        evaluate_detectors(X, W0, b0, config=RefineConfig(seed=2**70))


def test_filters_driven_to_zero_are_refused(toy):
    """A learning rate far too large drove every filter to norm ~1e-13 with a finite loss: the
    detectors came back collapsed, without an error."""
    X, _, S = toy
    W0 = (4 * S.T).astype(np.float32)
    b0 = np.array([2.0, 2.0, 2.0], np.float32)
    with pytest.raises(FloatingPointError, match=r"collapsed detector\(s\) \[0, 1, 2\] to zero filters .*config.lr = 10"):
        refine_detectors(X, W0, b0, config=RefineConfig(**{**FAST, "lr": 10.0, "epochs": 5}))


# ---------------------------------------------------------------------------------------
# Determinism, input forms, schedule


def test_same_seed_same_result_other_seed_differs(toy):
    X, _, S = toy
    W0, b0 = _perturbed_start(S, seed=11)
    cfg = RefineConfig(**dict(FAST, epochs=3))
    state = torch.random.get_rng_state()
    r1 = refine_detectors(X, W0, b0, config=cfg)
    r2 = refine_detectors(X, W0, b0, config=cfg)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is untouched
    np.testing.assert_array_equal(r1.W, r2.W)
    np.testing.assert_array_equal(r1.b, r2.b)
    assert r1.history == r2.history
    r3 = refine_detectors(X, W0, b0, config=RefineConfig(**dict(FAST, epochs=3, seed=1)))
    assert not np.array_equal(r1.W, r3.W)


def test_chunked_input_matches_array_input(toy):
    X, labels, S = toy
    W0, b0 = _perturbed_start(S, seed=12)
    cfg = RefineConfig(**FAST, excessive=15.0, rho=0.5)
    whole = refine_detectors(X, W0, b0, config=cfg)
    # a single chunk is the array itself: identical
    one = refine_detectors([X], W0, b0, config=cfg)
    np.testing.assert_array_equal(one.W, whole.W)
    # uneven chunks (batches straddle chunk ends), as a list and as a callable
    parts = [X[:400], X[400:401], X[401:1100], X[1100:]]
    listed = refine_detectors(parts, W0, b0, config=cfg)
    called = refine_detectors(lambda: iter(parts), W0, b0, config=cfg)

    class Store:  # the chunk source protocol of edpairs.store.ActivationStore
        def chunks(self):
            return iter(parts)

    stored = refine_detectors(Store(), W0, b0, config=cfg)
    np.testing.assert_array_equal(stored.W, called.W)
    for res in (listed, called):
        np.testing.assert_allclose(res.center, whole.center, rtol=1e-5, atol=1e-6)
        agree = (fires(X, res.W, res.b) == fires(X, whole.W, whole.b)).mean()
        assert agree > 0.98
        assert mean_iou(X, res.W, res.b, labels) > 0.95
        cos = (res.W * whole.W).sum(0) / np.linalg.norm(res.W, axis=0) / np.linalg.norm(whole.W, axis=0)
        assert cos.min() > 0.95


def test_batches_straddle_chunks_and_memory_maps_are_read(toy, tmp_path):
    X, _, S = toy
    path = tmp_path / "x.f32"
    X.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=X.shape)  # read-only, as a store gives it
    parts = [mm[:400], mm[400:401], mm[401:1100], mm[1100:]]
    sizes = []

    def record(W, b, batch):
        sizes.append(batch.shape[0])
        return (b * 0.0).sum()

    cfg = RefineConfig(**dict(FAST, epochs=2))
    res = refine_detectors(
        parts, (4 * S.T).astype(np.float32), np.full(I_TOY, 2.0, np.float32), config=cfg, extra_loss=record
    )
    full, tail = divmod(X.shape[0], cfg.batch_size)
    assert sizes == ([cfg.batch_size] * full + [tail]) * cfg.epochs  # only the epoch's last batch is short
    np.testing.assert_allclose(res.center, X.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)


def test_torch_in_torch_out(toy):
    X, _, S = toy
    W0, b0 = _perturbed_start(S, seed=11)
    cfg = RefineConfig(**dict(FAST, epochs=2))
    res = refine_detectors(torch.from_numpy(X), torch.tensor(W0, dtype=torch.float64), torch.from_numpy(b0), config=cfg)
    ref = refine_detectors(X, W0.astype(np.float64), b0, config=cfg)
    assert isinstance(res.W, torch.Tensor) and res.W.dtype == torch.float64 and res.W.shape == (D_TOY, I_TOY)
    assert isinstance(res.b, torch.Tensor) and res.b.shape == (I_TOY,)
    np.testing.assert_allclose(res.W.numpy(), ref.W, rtol=1e-6, atol=1e-6)


def test_learning_rate_halves_on_plateau(toy):
    X = toy[0]
    zero = {name: 0.0 for name in LOSS_TERMS}  # a constant (zero) objective never improves
    res = refine_detectors(
        X,
        np.eye(D_TOY, I_TOY),
        np.zeros(I_TOY),
        config=RefineConfig(**dict(FAST, epochs=5), **zero, plateau_patience=1),
    )
    assert [h["lr"] for h in res.history] == [1e-2, 1e-2, 1e-2, 5e-3, 5e-3]
    res = refine_detectors(
        X,
        np.eye(D_TOY, I_TOY),
        np.zeros(I_TOY),
        config=RefineConfig(**dict(FAST, epochs=3), **zero, plateau_patience=None),
    )
    assert [h["lr"] for h in res.history] == [1e-2] * 3


def test_progress_goes_to_stderr_only_when_asked(toy, capsys):
    X, _, S = toy
    args = (X[:300], (4 * S.T).astype(np.float32), np.full(I_TOY, 2.0, np.float32))
    cfg = RefineConfig(**dict(FAST, epochs=2))
    refine_detectors(*args, config=cfg, progress=True)
    out = capsys.readouterr()
    assert "refine: epoch 2/2" in out.err and out.out == ""
    refine_detectors(*args, config=cfg)  # None: stderr is not a terminal under pytest
    refine_detectors(*args, config=cfg, progress=False)
    out = capsys.readouterr()
    assert out.err == "" and out.out == ""


def test_importing_refine_does_not_import_torch():
    code = "import sys, edpairs, edpairs.refine; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_clear_errors(toy):
    X, _, S = toy
    X = X[:200]
    W = (4 * S.T).astype(np.float32)
    b = np.full(I_TOY, 2.0, np.float32)
    cfg = RefineConfig(**dict(FAST, epochs=1))

    def call(X=X, W=W, b=b, config=cfg, **kw):
        return refine_detectors(X, W, b, config=config, **kw)

    with pytest.raises(ValueError, match=r"W must be 2-D \(D, I\)"):
        call(W=W[:, 0])
    with pytest.raises(ValueError, match=r"D = 8 features but W has 3 rows"):
        call(W=W.T.copy(), b=np.zeros(D_TOY))
    with pytest.raises(ValueError, match=r"b must have shape \(I,\) = \(3,\)"):
        call(b=np.zeros(4))
    with pytest.raises(ValueError, match="X must be 2-D"):
        call(X=X[0])
    with pytest.raises(ValueError, match="chunk 1 of X has D = 5"):
        call(X=[X, X[:, :5]])
    bad = X.copy()
    bad[17, 2] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        call(X=bad)
    with pytest.raises(ValueError, match="X contains NaN or Inf"):  # also when nothing is computed from X first
        call(X=[X, bad], center=0.0, scale=1.0)
    Wn = W.copy()
    Wn[0, 0] = np.nan
    with pytest.raises(ValueError, match="W contains NaN"):
        call(W=Wn)
    with pytest.raises(ValueError, match="b contains NaN"):
        call(b=np.array([0.0, np.inf, 0.0]))
    with pytest.raises(ValueError, match="all-zero column"):
        call(W=np.concatenate([W[:, :2], np.zeros((D_TOY, 1), np.float32)], 1))
    with pytest.raises(ValueError, match="X holds no rows"):
        call(X=X[:0])
    with pytest.raises(ValueError, match="one-shot iterator"):
        call(X=iter([X]))
    with pytest.raises(ValueError, match=r"center must be a scalar or have shape \(D,\)"):
        call(center=np.zeros(3))
    with pytest.raises(ValueError, match="scale must be > 0"):
        call(scale=np.zeros(D_TOY))
    for field, value, pattern in [
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("lr", -1e-3, "lr must be a finite number > 0"),
        ("epochs", 0, "epochs must be a positive integer"),
        ("epochs", 2.5, "epochs must be a positive integer"),
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("tau", 0.0, r"tau must be in \(0, 1\]"),
        ("tau", 1.5, r"tau must be in \(0, 1\]"),
        ("rho", 0.0, r"rho must be in \(0, 1\]"),
        ("rho", 2.0, r"rho must be in \(0, 1\]"),
        ("sparsity", -1.0, "loss weight"),
        ("gamma", 0.0, "gamma must be"),
        ("plateau_patience", -1, "plateau_patience"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            call(config=RefineConfig(**{**FAST, "epochs": 1, field: value}))
    with pytest.raises(TypeError, match="config must be a RefineConfig"):
        call(config={"lr": 1e-3})
    with pytest.raises(TypeError, match="X must be an"):
        call(X=42)


def test_integer_detectors_are_real_values(toy):
    """Integer W and b (numpy or torch) refine like the same values in float64."""
    X = toy[0][:300]
    W = np.round(4 * toy[2].T).astype(np.int64)
    b = np.full(I_TOY, 2, np.int64)
    cfg = RefineConfig(**dict(FAST, epochs=2))
    ref = refine_detectors(X, W.astype(np.float64), b.astype(np.float64), config=cfg)
    for Wi, bi in [(W, b), (torch.from_numpy(W), torch.from_numpy(b))]:
        res = refine_detectors(X, Wi, bi, config=cfg)
        np.testing.assert_allclose(np.asarray(res.W), ref.W, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(res.b), ref.b, rtol=1e-6, atol=1e-6)
    assert evaluate_detectors(X, W, b, config=cfg) == evaluate_detectors(X, W * 1.0, b * 1.0, config=cfg)


def test_divergence_reports_what_was_seen_and_the_likely_causes(toy):
    X = toy[0][:300]
    W = (4 * toy[2].T).astype(np.float32)
    b = np.full(I_TOY, 2.0, np.float32)
    cfg = RefineConfig(**dict(FAST, epochs=3))
    # Detectors far off the data's scale overflow float32 before any update: not the learning rate.
    overflow = r"first step, before any update.*terms: margin.*start: \d\.\d+e\+30"
    with pytest.raises(FloatingPointError, match=overflow) as err:
        refine_detectors(X, W * 1e30, b, config=cfg)
    assert "learning rate" not in str(err.value)
    with pytest.raises(FloatingPointError, match=r"non-finite terms: extra\).*NaN/Inf from extra_loss"):
        refine_detectors(X, W, b, config=cfg, extra_loss=lambda W, b, x: W.sum() * float("nan"))
    # Chunks are checked in the first epoch only: data turning NaN later is named, with the rate.
    bad = X.copy()
    bad[5, 0] = np.nan
    reads = []

    def chunks():
        reads.append(None)
        return iter([X if len(reads) <= 2 else bad])  # statistics pass, epoch 0, then NaN

    with pytest.raises(FloatingPointError, match=r"in epoch 1 .*chunks read after the first epoch.*config.lr = 0.01"):
        refine_detectors(chunks, W, b, config=cfg)


# ---------------------------------------------------------------------------------------
# CUDA


@pytest.mark.cuda
def test_cuda_inputs_stay_on_cuda(toy):
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible to torch")
    X, labels, S = toy
    W0, b0 = _perturbed_start(S, seed=12)
    cfg = RefineConfig(**FAST, excessive=15.0, rho=0.5)
    res = refine_detectors(
        torch.from_numpy(X).cuda(), torch.from_numpy(W0).cuda(), torch.from_numpy(b0).cuda(), config=cfg
    )
    assert res.W.is_cuda and res.b.is_cuda and res.W.dtype == torch.float32
    assert mean_iou(X, res.W.cpu().numpy(), res.b.cpu().numpy(), labels) > 0.95
    again = refine_detectors(
        torch.from_numpy(X).cuda(), torch.from_numpy(W0).cuda(), torch.from_numpy(b0).cuda(), config=cfg
    )
    np.testing.assert_allclose(again.W.cpu().numpy(), res.W.cpu().numpy(), rtol=1e-5, atol=1e-6)
