"""Explain one prediction (edpairs.explain) on a tiny CNN: concept maps, present concepts, and
contributions that equal the logit differences computed by hand (gated removal at the layer,
then the rest of the network)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import edpairs as edp  # noqa: E402
from edpairs.explain import explain, plot_explanation  # noqa: E402
from edpairs.interventions import remove  # noqa: E402

LAYER = "3"  # the ReLU after the second convolution: (n, 6, 8, 8) for 16 x 16 inputs


def tiny_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 6, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 4)).eval()


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = tiny_cnn()
    images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    feats = edp.capture.capture(model, LAYER, images, batch_size=32)      # (32, 8, 8, 6) channel-last
    pairs = edp.EDPairs(3, random_state=0, progress=False).fit(feats.reshape(-1, 6))
    return model, images, pairs


def by_hand(model, image, pairs, concept):
    """Logits without and with the concept removed (gated) at the layer, through the tail."""
    with torch.no_grad():
        x = model[:4](image[None])                                        # (1, 6, 8, 8)
        cl = x.permute(0, 2, 3, 1)
        tail = model[4:]
        before = tail(x)[0]
        edited = remove(cl, pairs, [concept], gate=True)
        after = tail(edited.permute(0, 3, 1, 2))[0]
    return before.double().numpy(), after.double().numpy()


def test_contributions_equal_logit_differences_by_hand(setup):
    model, images, pairs = setup
    image = images[0]
    res = explain(model, LAYER, image, pairs)
    logits, _ = by_hand(model, image, pairs, 0)
    assert res.predicted == int(np.argmax(logits))
    np.testing.assert_allclose(res.logits, logits, rtol=1e-5, atol=1e-6)
    assert res.maps.shape == (3, 16, 16) and res.grid_maps.shape == (3, 8, 8)
    with torch.no_grad():
        fmap = model[:4](image[None]).permute(0, 2, 3, 1).reshape(-1, 6)
    y = np.asarray(pairs.detect(fmap)).reshape(8, 8, 3).transpose(2, 0, 1)
    np.testing.assert_allclose(res.grid_maps, y, rtol=1e-5, atol=1e-6)
    assert sorted(res.present) == [i for i in range(3) if (y[i] > 0.5).any()]
    assert res.present, "no concept present in the test image"
    for i in res.present:
        before, after = by_hand(model, image, pairs, i)
        np.testing.assert_allclose(res.contributions[i], before[res.predicted] - after[res.predicted],
                                   rtol=1e-5, atol=1e-5)
    # Ordered by decreasing contribution.
    c = [res.contributions[i] for i in res.present]
    assert c == sorted(c, reverse=True)


def test_split_and_class_index_and_figure(setup, tmp_path):
    model, images, pairs = setup
    split = edp.split_model(model, LAYER)
    a = explain(split, LAYER, images[1], pairs, class_index=2)
    b = explain(model, LAYER, images[1:2], pairs, class_index=2)
    assert a.predicted == 2 and b.predicted == 2
    assert a.contributions == pytest.approx(b.contributions)
    path = tmp_path / "sub" / "explanation.png"
    fig = plot_explanation(a, images[1], path=path)
    assert fig.axes and path.exists() and path.stat().st_size > 1000
    assert not list(path.parent.glob(".tmp-*"))
    assert a.to_records()[0].keys() >= {"concept", "contribution"}


def test_bad_image_shape(setup):
    model, images, pairs = setup
    with pytest.raises(ValueError, match="one preprocessed"):
        explain(model, LAYER, images[:2], pairs)


def test_bad_class_index_threshold_and_unfitted_pairs(setup):
    """A class index outside the head's logits (or a negative one, which numpy would wrap to the
    last class) and a float index are refused by name, as are a NaN threshold (no concept would
    ever be present) and pairs that were never fitted (an AttributeError before)."""
    model, images, pairs = setup
    with pytest.raises(ValueError, match=r"class_index 4 is out of range: the head gives 4 class logits"):
        explain(model, LAYER, images[0], pairs, class_index=4)
    with pytest.raises(ValueError, match="class_index -1 is out of range"):
        explain(model, LAYER, images[0], pairs, class_index=-1)
    with pytest.raises(TypeError, match="class_index must be an integer"):
        explain(model, LAYER, images[0], pairs, class_index=1.5)
    with pytest.raises(ValueError, match="threshold must be"):
        explain(model, LAYER, images[0], pairs, threshold=float("nan"))
    with pytest.raises(ValueError, match="fitted pairs.*no decoding_"):
        explain(model, LAYER, images[0], edp.EDPairs(3))
    assert explain(model, LAYER, images[0], pairs, class_index=np.int64(3)).predicted == 3


def test_scale_gate_and_image_are_checked(setup):
    """scale=NaN gave NaN contributions and gate="no" ran as gated: refused by name. A NaN image
    found no concept present (a silent empty answer): refused. A dict of scales applies each
    concept's own entry (remove() refused it before, naming the other concepts as not removed)."""
    model, images, pairs = setup
    for bad in (float("nan"), float("inf"), "half", True):
        with pytest.raises(ValueError, match=r"scale must be a finite number, 'mean' or None"):
            explain(model, LAYER, images[0], pairs, scale=bad)
    with pytest.raises(ValueError, match=r"scale\[1\] must be a finite number"):
        explain(model, LAYER, images[0], pairs, scale={0: 1.0, 1: float("nan")})
    with pytest.raises(ValueError, match=r"scale's keys must be concept indices in \[0, 3\), got 3"):
        explain(model, LAYER, images[0], pairs, scale={3: 1.0})
    for name in ("gate", "relu"):
        with pytest.raises(TypeError, match=f"{name} must be True or False, got 'no'"):
            explain(model, LAYER, images[0], pairs, **{name: "no"})
    bad_image = images[0].clone()
    bad_image[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        explain(model, LAYER, bad_image, pairs)
    res = explain(model, LAYER, images[0], pairs)
    assert len(res.present) >= 2
    i, j = res.present[:2]
    mixed = explain(model, LAYER, images[0], pairs, scale={i: 0.5, j: "mean"})
    own_i = explain(model, LAYER, images[0], pairs, scale=0.5)
    assert mixed.contributions[i] == pytest.approx(own_i.contributions[i])
    assert mixed.contributions[j] == pytest.approx(res.contributions[j])
    assert np.isfinite(list(own_i.contributions.values())).all()


def test_plot_explanation_checks_names_and_image(setup):
    """Too few concept names raised IndexError mid-drawing (and too few class names drew a wrong
    or missing name): each count is checked against the explanation."""
    model, images, pairs = setup
    res = explain(model, LAYER, images[0], pairs)
    with pytest.raises(ValueError, match="concept_names has 1 names for the explanation's 3 concepts"):
        plot_explanation(res, images[0], concept_names=["a"])
    with pytest.raises(ValueError, match="class_names has 2 names for the explanation's 4 classes"):
        plot_explanation(res, images[0], class_names=["a", "b"])
    with pytest.raises(TypeError, match="concept_names must be a sequence of 3 names, got one string"):
        plot_explanation(res, images[0], concept_names="abc")
    with pytest.raises(ValueError, match="max_concepts must be an integer >= 0, got -1"):
        plot_explanation(res, images[0], max_concepts=-1)
    with pytest.raises(TypeError, match="image must be a numeric"):
        plot_explanation(res, "img")
    with pytest.raises(ValueError, match="image contains NaN or Inf"):
        plot_explanation(res, torch.full((3, 16, 16), float("nan")))
    fig = plot_explanation(res, images[0], concept_names=["x", "y", "z"], class_names=list("abcd"))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("abcd"[res.predicted]) and titles[1].startswith("xyz"[res.present[0]])
