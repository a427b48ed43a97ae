"""Activation maximisation (edpairs.actmax) on a tiny CNN: the objective rises, the model's
parameters stay bit-identical (and get no .grad), the report is well formed."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import edpairs as edp  # noqa: E402
from edpairs.actmax import activation_maximisation  # noqa: E402

from test_explain import LAYER, tiny_cnn  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_cnn()
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    feats = edp.capture.capture(model, LAYER, images, batch_size=32)
    pairs = edp.EDPairs(3, random_state=0, progress=False).fit(feats.reshape(-1, 6))
    return model, pairs


@pytest.mark.parametrize("objective", ["mean", "max"])
def test_objective_rises_and_parameters_untouched(setup, objective):
    model, pairs = setup
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    res = activation_maximisation(model, LAYER, pairs, 1, steps=12, lr=0.1, jitter=2, blur_every=4,
                                  shape=(1, 3, 16, 16), objective=objective, seed=0)
    assert res.objective_final > res.objective_start
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert res.delta.shape == (6,) and np.all(np.isfinite(res.delta))
    assert -1 <= res.cos_encoding <= 1 and -1 <= res.cos_decoding <= 1
    assert res.closer_to_encoding == (res.cos_encoding > res.cos_decoding)
    assert res.image.shape == (1, 3, 16, 16) and float(res.image.abs().max()) <= 1.0 + 1e-6
    assert len(res.history) == 12


def test_cosines_match_the_reported_delta_and_split_input(setup):
    model, pairs = setup
    split = edp.split_model(model, LAYER)
    start = torch.zeros(1, 3, 16, 16)
    a = activation_maximisation(split, LAYER, pairs, 0, steps=4, start=start, jitter=0, blur_every=0, seed=3)
    b = activation_maximisation(model, LAYER, pairs, 0, steps=4, start=start, jitter=0, blur_every=0, seed=3)
    np.testing.assert_allclose(a.delta, b.delta, rtol=1e-5, atol=1e-6)
    s, w = pairs.encoding_[0].astype(np.float64), pairs.decoding_[0].astype(np.float64)
    d = a.delta
    assert a.cos_encoding == pytest.approx(d @ s / np.linalg.norm(d) / np.linalg.norm(s), abs=1e-9)
    assert a.cos_decoding == pytest.approx(d @ w / np.linalg.norm(d) / np.linalg.norm(w), abs=1e-9)
    assert torch.equal(start, torch.zeros(1, 3, 16, 16))  # the start is not modified in place


def test_bad_arguments(setup):
    model, pairs = setup
    with pytest.raises(IndexError):
        activation_maximisation(model, LAYER, pairs, 7, steps=1, shape=(1, 3, 16, 16))
    with pytest.raises(ValueError, match="objective"):
        activation_maximisation(model, LAYER, pairs, 0, steps=1, shape=(1, 3, 16, 16), objective="sum")


def test_a_bfloat16_model_runs_in_its_own_dtype(setup):
    """A model cast to bfloat16: the split's head takes float32 (or numpy, or float64) features
    in the model's dtype, and explain and activation maximisation run (they forced float32 into
    it: 'mat1 and mat2 must have the same dtype'; a reviewer's finding)."""
    import copy

    from edpairs.explain import explain
    from edpairs.ura import _head_device

    model, pairs = setup
    half = copy.deepcopy(model).to(torch.bfloat16)
    split = edp.capture.split_model(half, LAYER)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    feats = split.features(x, channel_last=True).detach()
    assert feats.dtype == torch.bfloat16
    for f in (feats, feats.float(), feats.double(), feats.float().numpy()):
        logits = split.head(f)
        assert logits.dtype == torch.bfloat16 and logits.shape[0] == 2
    assert _head_device(split.head) == torch.device("cpu")  # looked up through the split's model
    res = activation_maximisation(half, LAYER, pairs, 1, steps=3, lr=0.1, shape=(1, 3, 16, 16), seed=0)
    assert np.all(np.isfinite(res.delta)) and len(res.history) == 3
    ex = explain(split, LAYER, x[0], pairs)
    assert np.all(np.isfinite(ex.logits))


@pytest.mark.cuda
def test_a_cuda_model_takes_cpu_inputs(setup):
    """A model on the GPU: the split moves CPU images and numpy features to it, URA's device is
    the model's, activation maximisation starts from the CPU's seeded noise and runs there, and
    explain takes a CPU image."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU visible to torch")
    import copy

    from edpairs.explain import explain
    from edpairs.ura import _head_device

    model, pairs = setup
    gpu = copy.deepcopy(model).cuda()
    split = edp.capture.split_model(gpu, LAYER)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    feats = split.features(x, channel_last=True).detach()
    assert feats.device.type == "cuda"
    assert split.head(feats.cpu().numpy()).device.type == "cuda"
    assert _head_device(split.head).type == "cuda"
    on_gpu = activation_maximisation(gpu, LAYER, pairs, 1, steps=3, lr=0.1, shape=(1, 3, 16, 16), seed=0)
    on_cpu = activation_maximisation(model, LAYER, pairs, 1, steps=3, lr=0.1, shape=(1, 3, 16, 16), seed=0)
    np.testing.assert_allclose(on_gpu.delta, on_cpu.delta, rtol=1e-3, atol=1e-4)
    ex = explain(split, LAYER, x[0], pairs)
    assert np.all(np.isfinite(ex.logits))


def test_bad_settings_and_pairs_of_another_layer_are_named(setup):
    """Settings that numpy / torch failed on deep inside (a negative jitter, a one-number clamp,
    pairs of another width, a blur wider than the image) or that gave NaN or truncated
    silently (blur_sigma=0, lr=nan, steps=2.5, concept=1.7) are refused by name."""
    model, pairs = setup
    kw = dict(steps=1, shape=(1, 3, 16, 16))
    narrow = edp.EDPairs(2, random_state=0, progress=False).fit(
        np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32))
    with pytest.raises(ValueError, match=r"the pairs have D=4 channels but layer '3' gives 6"):
        activation_maximisation(model, LAYER, narrow, 0, **kw)
    cases = [(dict(jitter=-3), ValueError, "jitter must be >= 0"),
             (dict(clamp=(1.0,)), ValueError, "clamp must be None or a"),
             (dict(clamp=(1.0, -1.0)), ValueError, "low < high"),
             (dict(blur_sigma=0, blur_every=1), ValueError, "blur_sigma must be a positive"),
             (dict(blur_sigma=10, blur_every=1), ValueError, "too small for"),
             (dict(lr=float("nan")), ValueError, "lr must be a positive number"),
             (dict(steps=2.5), TypeError, "steps must be an integer"),
             (dict(blur_every=-1), ValueError, "blur_every must be >= 0")]
    for extra, error, message in cases:
        with pytest.raises(error, match=message):
            activation_maximisation(model, LAYER, pairs, 0, **{**kw, **extra})
    with pytest.raises(TypeError, match="concept must be an integer"):
        activation_maximisation(model, LAYER, pairs, 1.7, **kw)
    one = activation_maximisation(model, LAYER, pairs, 0, steps=1, shape=(3, 16, 16))  # one (C, H, W) image
    assert one.image.shape == (1, 3, 16, 16)


def test_runs_inside_no_grad_and_names_inference_mode(setup):
    """Inside torch.no_grad() the steps failed with "element 0 of tensors does not require grad":
    gradients are switched on for them (the same result as outside; the caller's mode is kept).
    torch.inference_mode() cannot be switched off from inside: a RuntimeError says to call it
    outside."""
    model, pairs = setup
    kw = dict(steps=4, lr=0.1, jitter=2, blur_every=2, shape=(1, 3, 16, 16), seed=0)
    outside = activation_maximisation(model, LAYER, pairs, 1, **kw)
    with torch.no_grad():
        inside = activation_maximisation(model, LAYER, pairs, 1, **kw)
        assert not torch.is_grad_enabled()
    assert torch.equal(inside.image, outside.image) and inside.history == outside.history
    assert inside.objective_final > inside.objective_start
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="call it outside the inference_mode block"):
            activation_maximisation(model, LAYER, pairs, 1, **kw)
    for bad in (1.5, -1, "0", None):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            activation_maximisation(model, LAYER, pairs, 1, **{**kw, "seed": bad})
