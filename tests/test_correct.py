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
