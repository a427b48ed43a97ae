"""Interventions along encoding directions (edpairs.interventions): removal against the LEACE oracle
(concept-erasure), set, joint removal, gating, the forward-hook context manager, layouts and
low-precision inputs, and the errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from edpairs import synthetic  # noqa: E402
from edpairs.interventions import Intervention, intervene, remove, remove_joint, set_value  # noqa: E402
from edpairs.pairs import whole_data_signal_vectors  # noqa: E402


def _pairs(W, S, mean, bias=None):
    W = np.asarray(W, np.float64)
    return SimpleNamespace(decoding_=W.astype(np.float32), encoding_=np.asarray(S, np.float32),
                           mean_=np.asarray(mean, np.float32),
                           bias_=np.zeros(len(W), np.float32) if bias is None else np.asarray(bias, np.float32))


def _random_pairs(D, I, seed=0, gain_one=False):
    rng = np.random.default_rng(seed)
    S = rng.standard_normal((I, D))
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    W = rng.standard_normal((I, D)) + 2 * S  # filters that read their own direction clearly
    if gain_one:
        W /= np.einsum("id,id->i", W, S)[:, None]
    return _pairs(W, S, rng.standard_normal(D), rng.standard_normal(I))


def _whole_data_pairs(X, U):
    """Pairs-like object: filters U, whole-data signal vectors Cov u / (u^T Cov u), mean of X
    (float64 moments, like EDPairs; ddof cancels in the signal vector)."""
    X64 = X.astype(np.float64)
    mean = X64.mean(0)
    cov = np.cov(X64.T, ddof=0)
    return _pairs(U, whole_data_signal_vectors(U, cov), mean)


def _leace(X, z, dtype):
    from concept_erasure import LeaceEraser

    Xt = torch.from_numpy(X).to(dtype)
    zt = torch.from_numpy(z).to(dtype)[:, None]
    return LeaceEraser.fit(Xt, zt, shrinkage=False)


def _as32(eraser):
    from concept_erasure import LeaceEraser

    return LeaceEraser(eraser.proj_left.float(), eraser.proj_right.float(), eraser.bias.float())


def _filters(layer, D, extra=2, seed=0):
    """The layer's ideal filters plus random directions (any u defines a z = u^T x)."""
    rng = np.random.default_rng(seed)
    return np.vstack([layer.W, rng.standard_normal((extra, D))])


# ---- (a) the LEACE oracle ---------------------------------------------------------------
def test_remove_equals_leace_fitted_in_float32():
    pytest.importorskip("concept_erasure")
    layer = synthetic.published(2000, seed=1, offset=0.0, noise=0.3, train_head=False)
    X = layer.X
    U = _filters(layer, X.shape[1])
    pairs = _whole_data_pairs(X, U)
    Xt = torch.from_numpy(X)
    worst = 0.0
    for i, u in enumerate(pairs.decoding_):
        eraser = _leace(X, X @ u, torch.float32)  # fit and apply in float32
        ours = remove(Xt, pairs, [i], gate=False)
        assert ours.dtype == torch.float32
        worst = max(worst, (ours - eraser(Xt)).abs().max().item())
        # the removal is not trivial: it moves the data by O(1)
        assert (ours - Xt).abs().max().item() > 0.3
    assert worst <= 1e-4, worst


def test_remove_equals_leace_on_the_published_layer():
    """On the published layer (offset 10) LEACE's own float32 fit drifts ~1e-4..5e-4 from its
    float64 fit (float32 accumulation of uncentred data), so the oracle is LEACE's eraser fitted
    on float64 statistics, applied in float32 to the float32 data, as ours is."""
    pytest.importorskip("concept_erasure")
    layer = synthetic.published(2000, seed=0, train_head=False)
    X = layer.X
    U = _filters(layer, X.shape[1])
    pairs = _whole_data_pairs(X, U)
    Xt = torch.from_numpy(X)
    worst = 0.0
    for i, u in enumerate(pairs.decoding_):
        eraser = _as32(_leace(X, X.astype(np.float64) @ u.astype(np.float64), torch.float64))
        worst = max(worst, (remove(Xt, pairs, [i], gate=False) - eraser(Xt)).abs().max().item())
    assert worst <= 1e-4, worst


def test_remove_equals_leace_with_edpairs_whole_data_signal():
    pytest.importorskip("concept_erasure")
    from edpairs import EDPairs

    layer = synthetic.published(2000, seed=2, train_head=False)
    X = layer.X
    pairs = EDPairs(3, signal="whole", n_init=1, random_state=0, progress=False).fit(X)
    Xt = torch.from_numpy(X)
    for i, u in enumerate(pairs.decoding_):
        eraser = _as32(_leace(X, X.astype(np.float64) @ u.astype(np.float64), torch.float64))
        ours = remove(Xt, pairs, i, gate=False)
        assert (ours - eraser(Xt)).abs().max().item() <= 1e-4
        # after removal the concept's decoded value is that of the mean everywhere
        decoded = ours.double() @ torch.from_numpy(u).double()
        assert (decoded - float(u.astype(np.float64) @ pairs.mean_.astype(np.float64))).abs().max() <= 1e-4


# ---- (b) set ----------------------------------------------------------------------------
def test_set_value_reaches_the_target_along_the_encoding_direction():
    pairs = _random_pairs(12, 4, seed=3)
    rng = np.random.default_rng(4)
    X = torch.from_numpy((rng.standard_normal((500, 12)) * 3).astype(np.float32))
    out = set_value(X, pairs, {2: 1.75})
    w = torch.from_numpy(pairs.decoding_[2]).double()
    s = torch.from_numpy(pairs.encoding_[2]).double()
    assert ((out.double() @ w) - 1.75).abs().max().item() <= 1e-4
    delta = (out - X).double()
    along = delta @ s  # unit s: the component along s; the rest must vanish
    assert (delta - along[:, None] * s).abs().max().item() <= 1e-5


def test_unfitted_pairs_are_named():
    """The edits' check of fitted pairs is the other functions' (one wording)."""
    import edpairs as edp

    X = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="pairs must be fitted pairs .* this EDPairs has no decoding_, encoding_, mean_"):
        remove(X, edp.EDPairs(2), 0)
    partial = SimpleNamespace(decoding_=np.eye(2, 6), encoding_=None, mean_=np.zeros(6))
    with pytest.raises(ValueError, match="this SimpleNamespace has no encoding_"):
        set_value(X, partial, {0: 1.0})


def test_a_zero_d_target_is_a_number(monkeypatch):
    """A target given as a 0-d array is read as the number it holds, as a Python number is: the
    same edit (float16 activations included: it was rounded to their precision first), and no
    copy of it sent to the activations' device and read back at every forward."""
    pairs = _random_pairs(12, 4, seed=3)
    X = torch.from_numpy(np.random.default_rng(4).standard_normal((50, 12)).astype(np.float32))
    for x in (X, X.half(), X.numpy()):
        want = set_value(x, pairs, {2: 0.3})
        for zero_d in (np.array(0.3), np.float64(0.3), np.array([[0.3]])[0, 0]):
            got = set_value(x, pairs, {2: zero_d})
            assert (got == want).all()
    sent = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: sent.append(a[0]) or real(*a, **k))
    set_value(X, pairs, {2: np.array(0.3), 1: np.full(50, 0.5)})
    assert not [a for a in sent if np.ndim(a) == 0] and (50,) in [np.shape(a) for a in sent]  # the map only


def test_set_value_with_a_per_position_map_and_several_concepts():
    pairs = _random_pairs(8, 3, seed=5)
    rng = np.random.default_rng(6)
    X = torch.from_numpy(rng.standard_normal((2, 8, 3, 4)).astype(np.float32))  # nchw
    target = torch.from_numpy(rng.standard_normal((2, 3, 4)).astype(np.float32))
    out = set_value(X, pairs, {0: target, 2: -0.5}, layout="nchw")
    assert out.shape == X.shape and out.is_contiguous()
    Wt = torch.from_numpy(pairs.decoding_).double()
    decoded = torch.einsum("nchw,ic->nihw", out.double(), Wt)
    assert (decoded[:, 0] - target).abs().max().item() <= 1e-4
    assert (decoded[:, 2] + 0.5).abs().max().item() <= 1e-4  # jointly: both reach their targets
    # (H, W) maps broadcast over images
    out2 = set_value(X, pairs, {1: target[0]}, layout="nchw")
    decoded2 = torch.einsum("nchw,ic->nihw", out2.double(), Wt)
    assert (decoded2[:, 1] - target[0]).abs().max().item() <= 1e-4
    # numpy activations with a numpy map and a number
    out3 = set_value(X.numpy(), pairs, {0: target.numpy(), 1: 2.0}, layout="nchw")
    decoded3 = np.einsum("nchw,ic->nihw", out3.astype(np.float64), pairs.decoding_.astype(np.float64))
    assert np.abs(decoded3[:, 0] - target.numpy()).max() <= 1e-4 and np.abs(decoded3[:, 1] - 2.0).max() <= 1e-4


# ---- (c) joint removal ------------------------------------------------------------------
def test_remove_joint_leaves_the_mean_decoded_values_and_predicts_the_others():
    pairs = _random_pairs(10, 5, seed=7)
    rng = np.random.default_rng(8)
    X = (rng.standard_normal((300, 10)) * 2 + 1).astype(np.float32)
    J = [0, 3]
    out = remove_joint(torch.from_numpy(X), pairs, J).double().numpy()
    W, S, m = (a.astype(np.float64) for a in (pairs.decoding_, pairs.encoding_, pairs.mean_))
    X64 = X.astype(np.float64)
    assert np.abs(out @ W[J].T - W[J] @ m).max() <= 1e-4
    alpha = np.linalg.solve(W[J] @ S[J].T, W[J] @ (X64 - m).T).T  # (N, |J|) joint latent factors
    expected = X64 @ W.T - alpha @ S[J] @ W.T
    others = [1, 2, 4]
    assert np.abs(out @ W[others].T - expected[:, others]).max() <= 1e-4
    # independent removal does not zero the joint decoded values when filters read each other
    single = remove(torch.from_numpy(X), pairs, J, gate=False).double().numpy()
    assert np.abs(single @ W[J].T - W[J] @ m).max() > 1e-2


def test_remove_joint_with_a_singular_set_uses_the_pseudo_inverse():
    base = _random_pairs(6, 2, seed=9)
    # two concepts with the same encoding direction and the same filter: W_J S_J^T is singular
    pairs = _pairs(np.vstack([base.decoding_[0]] * 2), np.vstack([base.encoding_[0]] * 2), base.mean_)
    X = torch.from_numpy(np.random.default_rng(10).standard_normal((50, 6)).astype(np.float32))
    out = remove_joint(X, pairs, [0, 1])
    assert torch.isfinite(out).all()
    ref = remove(X, pairs, [0], gate=False)  # the common part is removed once
    assert (out - ref).abs().max().item() <= 1e-4


# ---- (d) gating and scale ---------------------------------------------------------------
def test_gate_leaves_absent_positions_and_removes_present_ones():
    pairs = _random_pairs(8, 2, seed=11, gain_one=True)
    w, s = pairs.decoding_[0].astype(np.float64), pairs.encoding_[0].astype(np.float64)
    b = float(pairs.bias_[0])
    rng = np.random.default_rng(12)
    base = rng.standard_normal((40, 8))
    base -= np.outer(base @ w, s)  # decoded value 0 (gain 1)
    X = np.vstack([base + np.outer(np.full(40, b - 30), s),   # far below threshold
                   base + np.outer(np.full(40, b + 30), s)])  # far above
    X = X.astype(np.float32)
    out = remove(torch.from_numpy(X), pairs, [0]).numpy()
    assert np.abs(out[:40] - X[:40]).max() <= 1e-6 * 40
    # gate ~1 and scale "to the mean": decoded value becomes the mean's
    assert np.abs(out[40:] @ w - w @ pairs.mean_.astype(np.float64)).max() <= 1e-3
    # a number k: x - g k s, the gate ~1 above threshold
    out_k = remove(torch.from_numpy(X), pairs, [0], scale=5.0).numpy()
    assert np.abs(out_k[40:] - (X[40:] - 5.0 * s)).max() <= 1e-4
    assert np.abs(out_k[:40] - X[:40]).max() <= 1e-6 * 40
    # per-concept scales; relu clamps
    out_d = remove(X, pairs, [0, 1], gate=False, scale={0: 2.0, 1: "mean"}, relu=True)
    assert isinstance(out_d, np.ndarray) and out_d.min() >= 0


def test_gated_removal_formula():
    pairs = _random_pairs(7, 3, seed=13)
    X = np.random.default_rng(14).standard_normal((64, 7)).astype(np.float32)
    out = remove(X, pairs, [1, 2], gate=True)
    W, S, b, m = (a.astype(np.float64) for a in (pairs.decoding_, pairs.encoding_, pairs.bias_, pairs.mean_))
    X64 = X.astype(np.float64)
    z = X64 @ W.T
    gate = 1 / (1 + np.exp(-(z - b)))
    alpha = (z - W @ m) / np.einsum("id,id->i", W, S)
    expected = X64 - (gate * alpha)[:, [1, 2]] @ S[[1, 2]]
    assert np.abs(out - expected).max() <= 1e-4


# ---- (e) the context manager on a model -------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.Conv2d(8, 6, 3, padding=1))
        self.head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture
def net():
    torch.manual_seed(0)
    return _Net().eval()


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_a_compiled_model_is_refused_by_name(net):
    """torch.compile's graph does not call forward hooks once it has run, so an edit of a
    compiled model would silently change nothing (a reviewer saw edited == unedited, calls 0):
    refused, pointing at the original module, which still takes the edit."""
    compiled = torch.compile(net, backend="eager")
    pairs = _random_pairs(6, 3, seed=15)
    with pytest.raises(ValueError, match="torch.compile'd model.*model._orig_mod"):
        intervene(compiled, "_orig_mod.features.2", pairs, remove=[1])
    with intervene(compiled._orig_mod, "features.2", pairs, remove=[1]) as iv:
        with torch.no_grad():
            net(torch.randn(2, 3, 8, 8))
    assert iv.calls == 1
    # The message says where the edit applies: forwards of the original module, not the compiled one.
    with pytest.raises(ValueError, match=r"applies only to forwards of the original module: intervene on "
                                         r"model._orig_mod and call model._orig_mod.*or compile a CorrectedModel"):
        intervene(compiled, "_orig_mod.features.2", pairs, remove=[1])


def test_intervene_edits_the_layer_output(net):
    pairs = _random_pairs(6, 3, seed=15)
    x = torch.randn(3, 3, 8, 8)
    before = _params(net)
    with torch.no_grad():
        clean = net(x)
        feats = net.features(x)
        for kwargs, edit in [
            (dict(remove=[1]), lambda f: remove(f, pairs, [1], layout="nchw")),
            (dict(remove=[0, 2], gate=False, scale=3.0), lambda f: remove(f, pairs, [0, 2], gate=False, scale=3.0,
                                                                          layout="nchw")),
            (dict(remove=[0, 1], joint=True), lambda f: remove_joint(f, pairs, [0, 1], layout="nchw")),
            (dict(set={2: 1.5}), lambda f: set_value(f, pairs, {2: 1.5}, layout="nchw")),
            (dict(remove=[0], set={1: -1.0}, gate=False),
             lambda f: set_value(remove(f, pairs, [0], gate=False, layout="nchw"), pairs, {1: -1.0}, layout="nchw")),
        ]:
            with intervene(net, "features.2", pairs, **kwargs) as iv:
                assert isinstance(iv, Intervention) and iv.active
                hooked = net(x)
            assert not iv.active
            manual = net.head(edit(feats))
            assert torch.allclose(hooked, manual, atol=1e-6, rtol=0), kwargs
            assert not torch.allclose(hooked, clean, atol=1e-4)
            assert iv.calls == 1 and iv.positions == 3 * 8 * 8 and iv.mean_shift > 0
        assert torch.equal(net(x), clean)  # hooks gone
    assert not net.features[2]._forward_hooks
    after = _params(net)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_intervene_uploads_its_constants_once(net, monkeypatch):
    """Removal scales, fixed targets and host target maps reach the activations' device once: a
    second forward makes no host-to-device copy (counted as calls of _Lib.constant and
    torch.as_tensor on host data), and edits exactly as the first. A numpy map is copied when
    the intervention is made (changing the caller's array afterwards does not change the edit)."""
    from edpairs import interventions

    pairs = _random_pairs(6, 4, seed=17)
    x = torch.randn(2, 3, 8, 8)
    target_map = np.linspace(-1, 1, 2 * 8 * 8).reshape(2, 8, 8)
    uploads = []
    constant, as_tensor = interventions._Lib.constant, torch.as_tensor
    monkeypatch.setattr(interventions._Lib, "constant", lambda self, a, like: uploads.append("c") or constant(self, a, like))
    monkeypatch.setattr(torch, "as_tensor", lambda a, *args, **kw: (uploads.append("t") if not isinstance(a, torch.Tensor)
                                                                     else None) or as_tensor(a, *args, **kw))
    with torch.no_grad():
        feats = net.features(x)
        expected = net.head(set_value(remove(feats, pairs, [0, 1], gate=False, scale={0: 2.0, 1: "mean"}, layout="nchw"),
                                      pairs, {2: 0.5, 3: target_map}, layout="nchw"))
        with intervene(net, "features.2", pairs, remove=[0, 1], gate=False, scale={0: 2.0, 1: "mean"},
                       set={2: 0.5, 3: target_map}) as iv:
            target_map += 100.0  # after the snapshot: not seen by the hook
            uploads.clear()
            first = net(x)
            assert uploads, "the first forward uploads the constants"
            uploads.clear()
            second = net(x)
            assert uploads == [] and iv.calls == 2
    assert torch.allclose(first, expected, atol=1e-6, rtol=0) and torch.equal(first, second)


def test_intervene_under_data_parallel_edits_every_share(net):
    """Under DataParallel each replica's hook edits its share of the batch: the output is the
    one-device edit, calls counts both replicas' edits, positions one share's."""
    from _helpers import two_replicas

    pairs = _random_pairs(6, 3, seed=18)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        with intervene(net, "features.2", pairs, remove=[0], set={2: 0.25}, scale=2.0, gate=False) as one:
            expected = net(x)
        with intervene(net, "features.2", pairs, remove=[0], set={2: 0.25}, scale=2.0, gate=False) as iv:
            got = two_replicas(net)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert one.calls == 1 and iv.calls == 2 and iv.positions == one.positions // 2
    # The wrapper itself, its layer named with or without "module." (as capture takes it).
    wrapped = two_replicas(net)
    for name in ("features.2", "module.features.2"):
        with torch.no_grad(), intervene(wrapped, name, pairs, remove=[0], set={2: 0.25}, scale=2.0, gate=False) as w:
            torch.testing.assert_close(wrapped(x), expected, rtol=1e-5, atol=1e-6)
        assert w.module is net.features[2] and w.calls == 2
    with pytest.raises(KeyError, match="no module named 'features.9'"):
        intervene(wrapped, "features.9", pairs, remove=[0])


def test_intervene_diagnostics_nesting_and_exceptions(net):
    pairs = _random_pairs(6, 3, seed=16)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        feats = net.features(x)
        with intervene(net, "features.2", pairs, remove=[0, 2]) as outer:
            with intervene(net, "features.2", pairs, set={1: 0.25}):
                nested = net(x)
            single = net(x)
        g = torch.sigmoid(torch.einsum("nchw,ic->nhwi", feats, torch.from_numpy(pairs.decoding_))
                          - torch.from_numpy(pairs.bias_))
        assert outer.gate_mean.keys() == {0, 2}
        assert abs(outer.gate_mean[2] - g[..., 2].mean().item()) <= 1e-5
        assert outer.gated_positions[0] == int((g[..., 0] > 0.5).sum())
        manual = net.head(set_value(remove(feats, pairs, [0, 2], layout="nchw"), pairs, {1: 0.25}, layout="nchw"))
        assert torch.allclose(nested, manual, atol=1e-6, rtol=0)
        assert torch.allclose(single, net.head(remove(feats, pairs, [0, 2], layout="nchw")), atol=1e-6, rtol=0)
        with pytest.raises(RuntimeError, match="boom"):
            with intervene(net, "features.2", pairs, remove=[1]):
                net(x)
                raise RuntimeError("boom")
    assert not net.features[2]._forward_hooks
    assert "Intervention(layer='features.2'" in repr(outer)


def test_intervene_is_differentiable_and_works_under_autocast(net):
    pairs = _random_pairs(6, 3, seed=17)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with intervene(net, "features.2", pairs, remove=[1], set={0: 2.0}):
        net(x).sum().backward()
    grad_hooked = x.grad.clone()
    x.grad = None
    f = net.features(x)
    net.head(set_value(remove(f, pairs, [1], layout="nchw"), pairs, {0: 2.0}, layout="nchw")).sum().backward()
    assert torch.allclose(grad_hooked, x.grad, atol=1e-5)
    assert all(p.grad is not None for p in net.parameters())  # gradients reach the weights, unchanged
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with intervene(net, "features.2", pairs, remove=[1]):
            out = net(x)
    assert torch.isfinite(out).all()


class _Tokens(torch.nn.Module):
    """A token model whose block returns a tuple (as many transformer blocks do)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(5, 6)

        def forward(self, x):
            return self.proj(x), "aux"

    def __init__(self):
        super().__init__()
        self.block = self.Block()
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, x):
        h, aux = self.block(x)
        assert aux == "aux"
        return self.fc(h.mean(1))


def test_intervene_on_token_sequences_and_tuple_outputs():
    torch.manual_seed(1)
    model = _Tokens()
    pairs = _random_pairs(6, 2, seed=28)
    x = torch.randn(3, 7, 5)  # (N, L, C) tokens
    target = torch.randn(3, 7)
    with torch.no_grad(), intervene(model, "block", pairs, set={1: target}, remove=0) as iv:
        hooked = model(x)
    with torch.no_grad():
        h = model.block.proj(x)
        manual = model.fc(set_value(remove(h, pairs, [0]), pairs, {1: target}).mean(1))
    assert torch.allclose(hooked, manual, atol=1e-6, rtol=0)
    assert iv.positions == 21


# ---- (f) layouts, dtypes, numpy ---------------------------------------------------------
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nlc", "nc"])
def test_layouts_agree_with_channel_last_rows(layout):
    pairs = _random_pairs(5, 3, seed=18)
    rng = np.random.default_rng(19)
    shape_cl = {"nchw": (2, 3, 4, 5), "nhwc": (2, 3, 4, 5), "nlc": (2, 7, 5), "nc": (6, 5)}[layout]
    cl = torch.from_numpy(rng.standard_normal(shape_cl).astype(np.float32))
    x = cl.permute(0, 3, 1, 2).contiguous() if layout == "nchw" else cl
    for fn in (lambda a, **k: remove(a, pairs, [0, 2], **k), lambda a, **k: remove_joint(a, pairs, [1, 2], **k),
               lambda a, **k: set_value(a, pairs, {1: 0.5}, **k)):
        out = fn(x, layout=layout)
        ref = fn(cl.reshape(-1, 5)).reshape(shape_cl)
        out_cl = out.permute(0, 2, 3, 1) if layout == "nchw" else out
        assert out.shape == x.shape and out.is_contiguous()
        assert torch.allclose(out_cl, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_tensors(dtype):
    dt = getattr(torch, dtype)
    pairs = _random_pairs(16, 4, seed=20)
    x32 = torch.from_numpy(np.random.default_rng(21).standard_normal((4, 16, 3, 3)).astype(np.float32))
    x = x32.to(dt)
    for fn in (lambda a: remove(a, pairs, [1, 3], layout="nchw"),
               lambda a: set_value(a, pairs, {2: 1.0}, layout="nchw"),
               lambda a: remove_joint(a, pairs, [0, 1], layout="nchw")):
        out = fn(x)
        assert out.dtype == dt
        ref = fn(x.float())  # the same edit computed in float32 on the same (rounded) input
        eps = torch.finfo(dt).eps
        assert (out.float() - ref).abs().max().item() <= eps * max(1.0, ref.abs().max().item())


def test_numpy_inputs_match_torch():
    pairs = _random_pairs(9, 3, seed=22)
    X = np.random.default_rng(23).standard_normal((2, 9, 4, 4)).astype(np.float32)
    for dtype in (np.float32, np.float64, np.float16):
        x = X.astype(dtype)
        out = remove(x, pairs, [0, 1], layout="nchw")
        assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == x.shape
        assert out.flags.c_contiguous
        ref = remove(torch.from_numpy(x.astype(np.float32)), pairs, [0, 1], layout="nchw").numpy()
        tol = 1e-5 if dtype != np.float16 else 4e-3
        assert np.abs(out.astype(np.float32) - ref).max() <= tol * max(1.0, np.abs(ref).max())
    out64 = set_value(X.astype(np.float64), pairs, {2: 3.0}, layout="nchw")
    decoded = np.einsum("nchw,c->nhw", out64, pairs.decoding_[2].astype(np.float64))
    assert np.abs(decoded - 3.0).max() <= 1e-10  # float64 input computes in float64


def test_converted_pairs_follow_a_refit():
    pairs = _random_pairs(4, 2, seed=24)
    X = np.random.default_rng(25).standard_normal((10, 4)).astype(np.float32)
    first = remove(X, pairs, [0], gate=False)
    assert np.array_equal(remove(X, pairs, [0], gate=False), first)  # cached conversion
    pairs.encoding_ = _random_pairs(4, 2, seed=26).encoding_  # a refit assigns new arrays
    assert not np.allclose(remove(X, pairs, [0], gate=False), first)


# ---- (g) errors --------------------------------------------------------------------------
def test_errors(net):
    pairs = _random_pairs(6, 3, seed=27)
    X = torch.randn(4, 6)
    with pytest.raises(IndexError, match="out of range for pairs with 3 concepts"):
        remove(X, pairs, [3])
    with pytest.raises(IndexError, match="concept index -1"):
        set_value(X, pairs, {-1: 0.0})
    with pytest.raises(TypeError, match="integers"):
        remove(X, pairs, [1.5])
    with pytest.raises(ValueError, match="distinct"):
        remove(X, pairs, [1, 1])
    with pytest.raises(ValueError, match=r"D=6 channels but the activations have 5"):
        remove(torch.randn(4, 5), pairs, [0])
    with pytest.raises(ValueError, match="layout='nchw'"):
        remove(torch.randn(2, 6, 3, 3), pairs, [0])
    with pytest.raises(ValueError, match="layout must be one of"):
        remove(torch.randn(2, 6, 3, 3), pairs, [0], layout="ncwh")
    with pytest.raises(ValueError, match="expects a 4-D output"):
        remove(X, pairs, [0], layout="nchw")
    with pytest.raises(TypeError, match="floating point"):
        remove(torch.ones(4, 6, dtype=torch.int64), pairs, [0])
    with pytest.raises(ValueError, match="does not broadcast"):
        set_value(torch.randn(2, 6, 3, 3), pairs, {0: torch.zeros(4, 4)}, layout="nchw")
    with pytest.raises(ValueError, match="scale"):
        remove(X, pairs, [0], scale="max")
    with pytest.raises(ValueError, match="has no encoding_, mean_"):
        remove(X, SimpleNamespace(decoding_=pairs.decoding_), [0])
    no_bias = SimpleNamespace(decoding_=pairs.decoding_, encoding_=pairs.encoding_, mean_=pairs.mean_)
    with pytest.raises(ValueError, match="bias_"):
        remove(X, no_bias, [0])
    assert remove(X, no_bias, [0], gate=False).shape == X.shape
    with pytest.raises(ValueError, match="no module named 'features.3'.*features.2"):
        intervene(net, "features.3", pairs, remove=[0])
    with pytest.raises(ValueError, match="no module named 'haed'.*head"):
        intervene(net, "haed", pairs, remove=[0])
    with pytest.raises(ValueError, match=r"D=6 channels but layer 'features.0' \(Conv2d\) has out_channels=8"):
        intervene(net, "features.0", pairs, remove=[0])
    with pytest.raises(ValueError, match="both removed and set"):
        intervene(net, "features.2", pairs, remove=[0], set={0: 1.0})
    with pytest.raises(ValueError, match="joint"):
        intervene(net, "features.2", pairs, remove=[0], joint=True, scale=2.0)
    with pytest.raises(ValueError, match="nothing to do"):
        intervene(net, "features.2", pairs)
    with pytest.raises(ValueError, match="layout must be one of"):
        intervene(net, "features.2", pairs, remove=[0], layout="chw")
    # a channel mismatch found only in the forward (a module without a declared width)
    with intervene(net, "features.1", pairs, remove=[0]), pytest.raises(ValueError, match="features.1.*D=6.*8"):
        net(torch.randn(1, 3, 4, 4))
    assert not net.features[1]._forward_hooks


@pytest.mark.parametrize("lib", ["numpy", "torch"])
@pytest.mark.parametrize("target, error, match", [
    (None, TypeError, "concept 0 must be a finite real number.*got None"),
    (float("nan"), ValueError, "concept 0 must be a finite real number.*got nan"),
    (float("inf"), ValueError, "concept 0 must be a finite.*got inf"),
    (True, TypeError, "concept 0.*got True"),
    ("1.0", TypeError, "concept 0.*got '1.0'"),
    (1 + 2j, TypeError, "concept 0.*got \\(1\\+2j\\)"),
    (np.array([0.0, np.nan, 1.0, 2.0]), ValueError, "concept 0.*contains NaN or Inf"),
    (torch.tensor([0.0, 1.0, float("inf"), 2.0]), ValueError, "concept 0.*contains NaN or Inf"),
    (torch.zeros(4, dtype=torch.bool), TypeError, "concept 0.*Tensor of dtype torch.bool"),
])
def test_set_targets_are_checked_up_front(net, lib, target, error, match):
    pairs = _random_pairs(6, 3, seed=30)
    X = np.random.default_rng(31).standard_normal((4, 6)).astype(np.float32)
    x = torch.from_numpy(X) if lib == "torch" else X
    with pytest.raises(error, match="set_value: the target of " + match):
        set_value(x, pairs, {1: 0.5, 0: target})
    # at construction, not first inside the forward pass
    with pytest.raises(error, match="intervene: set: the target of " + match):
        intervene(net, "features.2", pairs, set={0: target})
    # integer maps and numpy scalars are real numbers
    assert np.isfinite(np.asarray(set_value(x, pairs, {0: np.float32(1.0), 1: np.arange(4)}))).all()


def test_concepts_of_a_wrong_type_give_a_clear_error(net):
    pairs = _random_pairs(6, 3, seed=32)
    X = torch.randn(4, 6)
    for concepts in (True, np.bool_(False), 1.5, "0"):
        with pytest.raises(TypeError, match=r"remove: concepts must be a concept index \(int\) or an iterable"):
            remove(X, pairs, concepts)
    with pytest.raises(TypeError, match="remove_joint: concepts must be"):
        remove_joint(X, pairs, True)
    with pytest.raises(TypeError, match="remove: concepts must be"):
        intervene(net, "features.2", pairs, remove=True)
    assert remove(X, pairs, np.array([0, 2])).shape == remove(X, pairs, range(0, 3, 2)).shape == X.shape


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_non_finite_scales_and_targets_beyond_float32_are_refused(net, lib):
    """A NaN / Inf scale, or a target beyond float32 (where the edit computes), gave all-NaN or Inf
    activations without a word."""
    pairs = _random_pairs(6, 3, seed=33)
    X = np.random.default_rng(34).standard_normal((4, 6)).astype(np.float32)
    x = torch.from_numpy(X) if lib == "torch" else X
    for scale in (float("nan"), float("inf"), -float("inf"), 1e39, {1: float("nan")}):
        with pytest.raises(ValueError, match=r"remove: scale of concept [01] must be a finite number within the "
                                             r"float32 range .* or 'mean', got"):
            remove(x, pairs, [0, 1], scale=scale)
        with pytest.raises(ValueError, match="scale of concept"):
            intervene(net, "features.2", pairs, remove=[0, 1], scale=scale)
    for target, got in ((1e40, r"1e\+40"), (-1e39, r"-1e\+39"), (np.full(4, 1e39), r"a map holding 1e\+39")):
        with pytest.raises(ValueError, match=r"set_value: the target of concept 0 must lie within the float32 range "
                                             r"\(\|t\| <= 3.403e\+38\).*got " + got + r" \(the edited activations "
                                             r"would overflow to Inf\)"):
            set_value(x, pairs, {0: target})
        with pytest.raises(ValueError, match="intervene: set: the target of concept 0 must lie within the float32"):
            intervene(net, "features.2", pairs, set={0: target})
    with pytest.raises(ValueError, match=r"float32 range.*a map holding 1e\+39"):
        set_value(x, pairs, {0: torch.full((4,), 1e39, dtype=torch.float64)})
    assert np.isfinite(np.asarray(set_value(x, pairs, {0: 3e38 / 4, 1: np.float64(-2.0)}))).all()
    assert np.isfinite(np.asarray(remove(x, pairs, [0], scale=np.float32(2.5)))).all()


def test_number_targets_beyond_a_half_precision_range_are_refused():
    pairs = _random_pairs(6, 3, seed=35)
    x = torch.randn(4, 6, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"set: the target 100000.0 of concept 0 is beyond the range of the "
                                         r"activations' dtype torch.float16 \(\|t\| <= 65504\)"):
        set_value(x, pairs, {0: 1e5})
    assert torch.isfinite(set_value(x, pairs, {0: 100.0})).all()
    assert torch.isfinite(set_value(x.to(torch.bfloat16), pairs, {0: 1e5})).all()


def _overflowing_edits():
    """Edits of 16-bit activations whose targets and scales fit the dtype but whose results do
    not: (case, activations, edit). Concept 0 of the near-max case reads its direction with gain
    1/2, so target 33000 (< 65504) moves channel 0 from 65000 to 66000."""
    rng = np.random.default_rng(36)
    random_pairs = _random_pairs(6, 3, seed=35)
    X = rng.standard_normal((5, 6)).astype(np.float32)
    near_max = X.copy()
    near_max[[1, 3], 0] = 65000.0
    half_gain = _pairs(np.eye(6)[:2] / 2, np.eye(6)[:2], np.zeros(6))
    one_hot = _pairs(np.eye(6)[:2], np.eye(6)[:2], np.zeros(6))
    return {
        "float16 large scale": (torch.from_numpy(X).half(),
                                lambda a: remove(a, random_pairs, [0], gate=False, scale=-2e5)),
        "numpy float16 large scale": (X.astype(np.float16),
                                      lambda a: remove(a, random_pairs, [0], gate=False, scale=-2e5)),
        "float16 near the maximum": (torch.from_numpy(near_max).half(),
                                     lambda a: set_value(a, half_gain, {0: 33000.0})),
        "bfloat16 large scale": (torch.from_numpy(X).bfloat16(),
                                 lambda a: remove(a, one_hot, [0], gate=False, scale=3.4e38)),
    }


@pytest.mark.parametrize("case", list(_overflowing_edits()))
def test_half_precision_edits_beyond_the_dtype_range_are_refused(case):
    """An edit whose target fits float16 but whose result does not (a large removal scale, a
    shift of a value already near 65504) was cast back to +-Inf without a word, and the layers
    after it turned it into NaN logits. The same edit of float32 / float64 activations holds."""
    x, edit = _overflowing_edits()[case]
    full = edit(x.astype(np.float32) if isinstance(x, np.ndarray) else x.float())  # the float32 edit
    full = torch.as_tensor(full)
    beyond = torch.isinf(full.to(torch.bfloat16 if "bfloat16" in case else torch.float16))
    count, positions = int(beyond.sum()), int(beyond.any(1).sum())
    largest = f"{full.abs().max().item():.4g}".replace("+", r"\+")
    dtype = {"numpy float16 large scale": "float16", "bfloat16 large scale": "torch.bfloat16"}.get(case,
                                                                                                  "torch.float16")
    limit = r"3.3895e\+38" if "bfloat16" in case else "65504"
    assert count > 0
    with pytest.raises(ValueError, match=rf"the edited activations must fit their dtype {dtype} \(\|v\| <= {limit}\), "
                                         rf"but {count} edited value\(s\), at {positions} of 5 positions, lie beyond "
                                         rf"it \(largest magnitude {largest}\).*Run the model \(or at least this "
                                         rf"layer\) in float32, or use a smaller edit"):
        edit(x)
    for dt in (np.float32, np.float64) if isinstance(x, np.ndarray) else (torch.float32, torch.float64):
        wide = x.astype(dt) if isinstance(x, np.ndarray) else x.to(dt)
        out = edit(wide)
        assert out.dtype == wide.dtype
        assert np.isfinite(np.asarray(out, dtype=np.float64)).all()
        assert np.abs(np.asarray(out, dtype=np.float64)).max() > 65504


def test_half_precision_edits_in_range_and_non_finite_inputs_are_left_alone():
    """The check changes nothing for an edit that fits (bit-identical to the float32 edit cast
    back), and positions whose input already held Inf / NaN are not blamed on the edit: they
    come out non-finite as they would in float32, and only positions the edit pushed beyond the
    range are counted."""
    pairs = _random_pairs(6, 3, seed=37)
    X = torch.from_numpy(np.random.default_rng(38).standard_normal((6, 6)).astype(np.float32)).half()
    X[2, 4], X[4, 1] = float("inf"), float("nan")
    for edit in (lambda a: remove(a, pairs, [0, 2]), lambda a: remove(a, pairs, [1], gate=False, scale=40.0),
                 lambda a: set_value(a, pairs, {1: 300.0, 2: -2.0}), lambda a: remove_joint(a, pairs, [0, 1])):
        for x in (X, X.numpy()):
            with np.errstate(invalid="ignore", over="ignore"):  # numpy warns about the Inf / NaN inputs
                out = edit(x)
                expected = edit(x.astype(np.float32) if isinstance(x, np.ndarray) else x.float())
            expected = expected.astype(np.float16) if isinstance(x, np.ndarray) else expected.half()
            assert out.dtype == x.dtype
            assert torch.equal(torch.as_tensor(out).view(torch.int16), torch.as_tensor(expected).view(torch.int16))
            assert not torch.isfinite(torch.as_tensor(out)[[2, 4]]).any()  # the edit mixes a position's channels
    # An overflow at positions 0 and 5 (3 channels each) is counted there; positions 2 and 4, which
    # held Inf / NaN already and come out NaN, are not.
    X[0, :] = X[5, :] = 60000.0
    for x in (X, X.numpy()):
        with np.errstate(invalid="ignore"), pytest.raises(
                ValueError, match=r"but 6 edited value\(s\), at 2 of 6 positions, lie beyond it \(largest magnitude "
                                  r"6.914e\+04\)"):
            remove(x, pairs, [0], gate=False, scale=-2e4)


def test_intervene_in_half_precision_refuses_an_edit_beyond_the_range(net):
    """The hook path: a float16 model edited beyond 65504 gave NaN logits without an error."""
    pairs = _random_pairs(6, 3, seed=15)
    x = torch.randn(2, 3, 8, 8)
    half = net.half()
    with torch.no_grad():
        clean = half(x.half())
        with pytest.raises(ValueError, match=r"intervene at layer 'features.2': the edited activations must fit "
                                             r"their dtype torch.float16 \(\|v\| <= 65504\), but \d+ edited "
                                             r"value\(s\), at \d+ of 128 positions, lie beyond it"):
            with intervene(half, "features.2", pairs, remove=[1], gate=False, scale=1e5):
                half(x.half())
        assert not half.features[2]._forward_hooks
        with intervene(half, "features.2", pairs, remove=[1], gate=False, scale=10.0) as iv:  # in range: edited
            edited = half(x.half())
        assert iv.calls == 1 and torch.isfinite(edited).all() and not torch.equal(edited, clean)
        wide = net.float()
        with intervene(wide, "features.2", pairs, remove=[1], gate=False, scale=1e5):
            assert torch.isfinite(wide(x)).all()  # the same edit in float32


@pytest.mark.parametrize("flag", ["gate", "relu"])
def test_switches_must_be_true_or_false(net, flag):
    """gate="no" and relu="no" are truthy: the edit ran with both switched on."""
    pairs = _random_pairs(6, 3, seed=36)
    X = torch.randn(4, 6)
    for bad in ("no", 1, None, np.array([True])):
        with pytest.raises(TypeError, match=f"remove: {flag} must be True or False, got"):
            remove(X, pairs, [0], **{flag: bad})
        with pytest.raises(TypeError, match=f"remove_joint: {flag} must be True or False"):
            remove_joint(X, pairs, [0], **{flag: bad})
        if bad is None and flag == "gate":
            continue  # intervene's gate=None: the default of the removal (gated unless joint)
        with pytest.raises(TypeError, match=f"intervene: {flag} must be True or False"):
            intervene(net, "features.2", pairs, remove=[0], **{flag: bad})
    with pytest.raises(TypeError, match="set_value: relu must be True or False, got str 'no'"):
        set_value(X, pairs, {0: 1.0}, relu="no")
    with pytest.raises(TypeError, match="intervene: joint must be True or False, got str 'yes'"):
        intervene(net, "features.2", pairs, remove=[0], joint="yes")
    torch.testing.assert_close(remove(X, pairs, [0], **{flag: np.bool_(False)}), remove(X, pairs, [0], **{flag: False}))


def test_concept_indices_given_as_tensors_or_arrays():
    """torch.tensor([1]) gave "concept indices must be integers, got tensor(1)"."""
    pairs = _random_pairs(6, 3, seed=37)
    X = torch.randn(4, 6)
    expected = remove(X, pairs, [0, 2])
    for concepts in (torch.tensor([0, 2]), np.array([0, 2], np.int32), [torch.tensor(0), np.int64(2)]):
        torch.testing.assert_close(remove(X, pairs, concepts), expected, rtol=0, atol=0)
    torch.testing.assert_close(remove(X, pairs, torch.tensor(2)), remove(X, pairs, 2), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"remove: concepts must be a concept index \(int\) or a 1-D integer array of "
                                        r"indices, got a torch tensor of dtype torch.float32 and shape \(1,\)"):
        remove(X, pairs, torch.tensor([1.0]))
    with pytest.raises(TypeError, match=r"got a numpy array of dtype int64 and shape \(1, 1\)"):
        remove(X, pairs, np.array([[1]]))
    with pytest.raises(TypeError, match="got a torch tensor of dtype torch.bool"):
        remove(X, pairs, torch.tensor([True]))


class _DictOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        return {"feat": self.conv(x)}


def test_a_layer_returning_a_dict_is_named():
    """The edit said "activations must be a torch tensor or a numpy array, got dict"."""
    torch.manual_seed(2)
    block = _DictOut()
    model = torch.nn.Module()
    model.block = block
    model.forward = lambda x: block(x)["feat"].mean((2, 3))
    pairs = _random_pairs(6, 3, seed=38)
    with intervene(model, "block", pairs, remove=[0]):
        with pytest.raises(TypeError, match=r"layer 'block' returns a dict \(keys \['feat'\]\), which an edit cannot "
                                            r"take: intervene edits a tensor output.*submodules"):
            model(torch.randn(1, 3, 4, 4))
    assert not block._forward_hooks


class _Shared(torch.nn.Module):
    """Runs its ``act`` twice per forward (a shared module)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 6, 3, padding=1)
        self.act = torch.nn.Tanh()
        self.fc = torch.nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.act(self.conv1(x)))).mean((2, 3)))


def test_a_layer_run_twice_per_forward_is_refused_unless_every_use():
    """The edit applied at every use of a shared module, silently (capture refuses such a layer)."""
    model = _Shared().eval()
    pairs = _random_pairs(6, 3, seed=39)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        with intervene(model, "act", pairs, remove=[0], gate=False) as iv:
            with pytest.raises(RuntimeError, match=r"intervene: layer 'act' ran more than once in one forward pass "
                                                   r"of the model \(a shared module.*every_use=True"):
                model(x)
            model.act(model.conv1(x))  # a submodule called on its own: one use, edited
            model.act(model.conv1(x))
            assert iv.calls == 3
        with intervene(model, "act", pairs, remove=[0], gate=False, every_use=True) as every:
            got = model(x)
        edit = lambda h: remove(h, pairs, [0], gate=False, layout="nchw")  # noqa: E731
        manual = model.fc(edit(model.act(model.conv2(edit(model.act(model.conv1(x)))))).mean((2, 3)))
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    assert every.calls == 2
    assert not model._forward_pre_hooks and not model._forward_hooks and not model.act._forward_hooks
    with pytest.raises(TypeError, match="intervene: every_use must be True or False"):
        intervene(model, "act", pairs, remove=[0], every_use="yes")


def test_an_intervention_pickles_and_deep_copies():
    """Its lock did not pickle ("cannot pickle '_thread.lock' object")."""
    import copy
    import pickle

    net = _Net().eval()
    pairs = _random_pairs(6, 3, seed=40)
    x = torch.randn(2, 3, 4, 4)
    iv = intervene(net, "features.2", pairs, remove=[1], set={0: np.full((2, 4, 4), 0.5)})
    with torch.no_grad(), iv:
        expected = net(x)
    for copied in (copy.deepcopy(iv), pickle.loads(pickle.dumps(iv))):
        assert not copied.active and copied.module is not iv.module
        with torch.no_grad(), copied:
            torch.testing.assert_close(copied._root(x), expected, rtol=0, atol=0)


# ---- CUDA (plain torch; needs a GPU, not edpairs' CUDA build) ----------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch")
def test_intervene_on_cuda_with_autocast(net):
    pairs = _random_pairs(6, 3, seed=29)
    model = net.cuda()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    feats = model.features(x)
    out = remove(feats, pairs, [1], layout="nchw")
    assert out.device == feats.device and out.dtype == torch.float32
    ref = remove(feats.cpu(), pairs, [1], layout="nchw")
    assert torch.allclose(out.cpu(), ref, atol=1e-5, rtol=0)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        half = model.features(x)
        with intervene(model, "features.2", pairs, remove=[1], set={0: 2.0}) as iv:
            hooked = model(x)
        manual = model.head(set_value(remove(half, pairs, [1], layout="nchw"), pairs, {0: 2.0}, layout="nchw"))
    assert half.dtype == torch.float16 and torch.allclose(hooked.float(), manual.float(), atol=1e-3, rtol=0)
    assert iv.positions == 4 * 8 * 8 and 0 <= iv.gate_mean[1] <= 1
