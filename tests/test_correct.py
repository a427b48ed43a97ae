"""Model correction without retraining (edpairs.correct.CorrectedModel): the wrapper equals
features -> remove -> head, leaves the model's parameters alone, survives a save/load round
trip and reports wrong layers, concepts and channel counts clearly. The watermark experiment
itself is benchmarks/watermark.py (MNIST, minutes)."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import edpairs as edp  # noqa: E402
from edpairs.correct import CorrectedModel  # noqa: E402
from edpairs.interventions import remove as remove_concepts  # noqa: E402


def _cnn(seed=0, channels=8):
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(collections.OrderedDict([
        ("conv1", nn.Conv2d(1, channels, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(channels, channels, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()), ("fc", nn.Linear(channels * 4 * 4, 5)),
    ])).eval()


def _images(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 16, 16, generator=g)


@pytest.fixture(scope="module")
def fitted():
    model = _cnn()
    x = _images()
    maps = edp.capture.capture(model, "relu2", x)               # (n, 8, 8, C) channel-last
    pairs = edp.EDPairs(4, random_state=0).fit(maps.reshape(-1, maps.shape[-1]))
    return model, x, pairs


def _manual(model, x, pairs, concepts, **kw):
    with torch.no_grad():
        feats = model[:5](x)                                     # input -> relu2, (n, C, h, w)
        edited = remove_concepts(feats, pairs, concepts, layout="nchw", **kw)
        return model[5:](edited)


@pytest.mark.parametrize("kw", [dict(), dict(gate=False), dict(scale=2.5, relu=True), dict(scale={1: 3.0, 2: "mean"})])
def test_output_equals_features_remove_head(fitted, kw):
    model, x, pairs = fitted
    fixed = CorrectedModel(model, "relu2", pairs, remove=[1, 2], **kw)
    with torch.no_grad():
        got = fixed(x)
    torch.testing.assert_close(got, _manual(model, x, pairs, [1, 2], **kw), rtol=0, atol=0)
    with torch.no_grad():
        plain = model(x)
    assert not torch.equal(got, plain)                           # the removal changed something
    assert fixed.last.calls == 1 and set(fixed.last.gate_mean) == ({1, 2} if kw.get("gate", True) else set())


def test_model_untouched_and_plain_calls_unedited(fitted):
    model, x, pairs = fitted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(x)
    fixed = CorrectedModel(model, model.relu2, pairs, remove=0)  # a module works as the layer
    assert fixed.layer == "relu2"
    out = fixed(x)
    out.sum().backward()                                         # differentiable, grads on the model only
    assert set(fixed.state_dict()) == {f"model.{k}" for k in before}
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(model(x), plain)                      # no hook left behind
    model.zero_grad(set_to_none=True)


def test_pairs_are_copied(fitted):
    model, x, pairs = fitted
    fixed = CorrectedModel(model, "relu2", pairs, remove=[3])
    with torch.no_grad():
        first = fixed(x)
    other = edp.EDPairs(4, random_state=5).fit(np.random.default_rng(0).standard_normal((500, 8)))
    pairs_copy = pairs.__dict__.copy()
    pairs.__dict__.update(other.__dict__)                        # the caller refits its pairs object
    try:
        with torch.no_grad():
            assert torch.equal(fixed(x), first)
    finally:
        pairs.__dict__.clear()
        pairs.__dict__.update(pairs_copy)


@pytest.mark.parametrize("kw", [dict(), dict(gate=False, scale={0: 4.0, 3: "mean"}, relu=True), dict(scale=-1.5)])
def test_save_load_round_trip(fitted, tmp_path, kw):
    model, x, pairs = fitted
    pairs.metadata = {"model": "tiny"}
    try:
        fixed = CorrectedModel(model, "relu2", pairs, remove=[0, 3], **kw)
        path = tmp_path / "fixed.npz"
        fixed.save(path)
        assert [f for f in os.listdir(tmp_path)] == ["fixed.npz"]   # no temporary left
        again = CorrectedModel.load(path, _cnn())                    # same architecture and seed
        with torch.no_grad():
            assert torch.equal(again(x), fixed(x))
        assert (again.layer, again.concepts, again.gate, again.relu) == ("relu2", (0, 3), fixed.gate, fixed.relu)
        assert again.scale == fixed.scale and again.pairs.metadata == {"model": "tiny"}
        plain = edp.EDPairs.load(path)                               # still a pairs file
        np.testing.assert_array_equal(plain.encoding_, pairs.encoding_)
    finally:
        pairs.metadata = None


def test_errors(fitted, tmp_path):
    model, x, pairs = fitted
    with pytest.raises((ValueError, KeyError), match="relu9.*relu2"):
        CorrectedModel(model, "relu9", pairs, remove=[0])
    with pytest.raises(IndexError, match="out of range.*4 concepts"):
        CorrectedModel(model, "relu2", pairs, remove=[4])
    with pytest.raises(ValueError, match="at least one"):
        CorrectedModel(model, "relu2", pairs, remove=[])
    with pytest.raises(ValueError, match="D=8 channels but layer 'conv1'.*out_channels=8|D=8"):
        CorrectedModel(_cnn(channels=6), "conv1", pairs, remove=[0])
    wrong_d = CorrectedModel(_cnn(channels=6), "relu2", pairs, remove=[0])   # ReLU declares no channels
    with pytest.raises(ValueError, match="D=8 channels but the activations have 6"):
        wrong_d(x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        CorrectedModel(lambda t: t, "relu2", pairs, remove=[0])
    with pytest.raises(ValueError, match="scale"):
        CorrectedModel(model, "relu2", pairs, remove=[0], scale="big")
    pairs.save(tmp_path / "pairs.npz")
    with pytest.raises(ValueError, match="no correction settings"):
        CorrectedModel.load(tmp_path / "pairs.npz", model)
    fixed = CorrectedModel(model, "relu2", pairs, remove=[0])
    fixed.save(tmp_path / "fixed.npz")
    with pytest.raises(ValueError, match="D=8 channels but the activations have 6"):
        CorrectedModel.load(tmp_path / "fixed.npz", _cnn(channels=6))(x)


def test_deep_copy_and_torch_save_give_an_equal_independent_model(fitted, tmp_path):
    """copy.deepcopy and torch.save failed: "cannot pickle '_thread.lock' object"."""
    import copy

    model, x, pairs = fitted
    fixed = CorrectedModel(copy.deepcopy(model), "relu2", pairs, remove=[1, 2], scale={1: 2.0, 2: "mean"})
    with torch.no_grad():
        expected = fixed(x)
        twin = copy.deepcopy(fixed)
        torch.save(fixed, tmp_path / "fixed.pt")
        loaded = torch.load(tmp_path / "fixed.pt", weights_only=False)
        for other in (twin, loaded):
            assert other.model is not fixed.model and other.last.module is other.model.relu2
            assert (other.layer, other.concepts, other.scale) == (fixed.layer, fixed.concepts, fixed.scale)
            torch.testing.assert_close(other(x), expected, rtol=0, atol=0)
            assert not other.model.relu2._forward_hooks and not other.model._forward_pre_hooks
        twin.model.conv2.weight.mul_(-1)                             # independent: the original is untouched
        assert not torch.equal(twin(x), expected)
        torch.testing.assert_close(fixed(x), expected, rtol=0, atol=0)


def test_concurrent_forwards_equal_sequential_ones(fitted):
    """Two threads calling the model at once raised "this Intervention is already active"."""
    import threading

    model, x, pairs = fitted
    meet = threading.Barrier(2, timeout=20)

    class Meet(torch.nn.Module):
        """Holds each forward until the other thread's forward runs too: the forwards overlap."""

        def forward(self, t):
            meet.wait()
            return t

    inputs = [_images(8, seed=s) for s in range(6)]
    with torch.no_grad():
        expected = [CorrectedModel(model, "relu2", pairs, remove=[0, 3])(b) for b in inputs]
    fixed = CorrectedModel(torch.nn.Sequential(model, Meet()), "0.relu2", pairs, remove=[0, 3])
    got, errors = [None] * len(inputs), []

    def work(k):
        try:
            for i in range(k, len(inputs), 2):
                with torch.no_grad():
                    got[i] = fixed(inputs[i])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
            meet.abort()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fixed.last.calls == len(inputs)
    assert not model.relu2._forward_hooks and not fixed.model._forward_pre_hooks  # the last forward removed them
    # Under DataParallel the replicas share the correction and run their forwards in threads at once.
    from _helpers import two_replicas

    with torch.no_grad():
        both = two_replicas(fixed)(torch.cat(inputs[:2]))
    torch.testing.assert_close(both, torch.cat(expected[:2]), rtol=1e-6, atol=1e-6)
    assert fixed.last.calls == len(inputs) + 2
    with torch.no_grad():
        torch.testing.assert_close(model(x), _cnn()(x), rtol=0, atol=0)


def test_numpy_settings_are_saved_as_plain_numbers(fitted, tmp_path):
    """scale=np.float32(2) failed in save: "Object of type float32 is not JSON serializable"."""
    model, x, pairs = fitted
    path = tmp_path / "fixed.npz"
    for scale, plain in ((np.float32(2), 2.0), ({np.int64(1): np.float64(-1.5), 2: "mean"}, {1: -1.5, 2: "mean"})):
        fixed = CorrectedModel(model, "relu2", pairs, remove=np.array([1, 2]), scale=scale, gate=np.bool_(False))
        assert fixed.scale == plain and fixed.gate is False
        fixed.save(path)
        again = CorrectedModel.load(path, model)
        assert again.scale == plain and again.concepts == (1, 2) and again.gate is False
        with torch.no_grad():
            torch.testing.assert_close(again(x), fixed(x), rtol=0, atol=0)


def test_non_finite_scales_and_flags_that_are_not_bools_are_refused(fitted):
    model, x, pairs = fitted
    for scale in (float("inf"), float("nan"), np.float32("nan"), {0: float("inf")}):
        with pytest.raises(ValueError, match="scale of concept 0 must be a finite number"):
            CorrectedModel(model, "relu2", pairs, remove=[0], scale=scale)
    with pytest.raises(TypeError, match="CorrectedModel: gate must be True or False, got str 'no'"):
        CorrectedModel(model, "relu2", pairs, remove=[0], gate="no")
    with pytest.raises(TypeError, match="CorrectedModel: relu must be True or False, got int 1"):
        CorrectedModel(model, "relu2", pairs, remove=[0], relu=1)


def test_no_grad_and_device(fitted):
    model, x, pairs = fitted
    fixed = CorrectedModel(model, "relu2", pairs, remove=[2])
    with torch.no_grad():
        ref = fixed(x)
    assert not ref.requires_grad
    if not torch.cuda.is_available():
        pytest.skip("no GPU: the CUDA path of the wrapper is not exercised")
    import copy

    on_gpu = copy.deepcopy(fixed).cuda()
    with torch.no_grad():
        got = on_gpu(x.cuda())
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
