"""Network-Dissection scoring: IoU against a brute-force reference, S1 / S2 integrals, perfect
detectors, the validation split and the threshold rules."""

import numpy as np
import pytest

pytest.importorskip("torch")

from edpairs import dissect as ds  # noqa: E402


def _integral(values, count):
    """Brute-force int_0^1 count(xi) dxi on a fine grid (a step function: Riemann sum)."""
    xi = (np.arange(200000) + 0.5) / 200000
    return float(np.mean([count(x) for x in xi[::50]]))


def test_s_scores_hand_cases():
    assert ds.s_scores([0.5], [0]) == {"S1": 0.5, "S2": 0.5}
    # Two detectors on the same concept: S1 adds, S2 keeps the better one.
    assert ds.s_scores([0.5, 0.3], [2, 2]) == pytest.approx({"S1": 0.8, "S2": 0.5})
    assert ds.s_scores([0.5, 0.3, 0.2], [0, 1, 0]) == pytest.approx({"S1": 1.0, "S2": 0.8})
    assert ds.s_scores([], [], n_concepts=3) == {"S1": 0.0, "S2": 0.0}


def test_s_scores_match_integrals():
    rng = np.random.default_rng(0)
    u, c = rng.random(9), rng.integers(0, 4, 9)
    s = ds.s_scores(u, c)
    s1 = _integral(u, lambda x: (u >= x).sum())
    s2 = _integral(u, lambda x: len(set(c[u >= x])))
    assert s["S1"] == pytest.approx(s1, abs=2e-3) and s["S2"] == pytest.approx(s2, abs=2e-3)


def _brute_iou(maps, masks, thresholds, images):
    import torch
    import torch.nn.functional as F

    K, C = maps.shape[3], masks.shape[1]
    inter, union = np.zeros((K, C)), np.zeros((K, C))
    for i in images:
        up = F.interpolate(torch.from_numpy(maps[i].transpose(2, 0, 1))[None].double(), size=masks.shape[2:],
                           mode="bilinear", align_corners=False)[0].numpy()
        for k in range(K):
            d = up[k] > thresholds[k]
            for c in range(C):
                inter[k, c] += (d & masks[i, c]).sum()
                union[k, c] += (d | masks[i, c]).sum()
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def test_iou_matches_brute_force():
    rng = np.random.default_rng(1)
    maps = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
    masks = rng.random((5, 2, 16, 16)) < 0.3
    t = np.array([0.0, 0.5, -0.3], np.float32)
    got = ds.iou_matrix(maps, masks, t, batch_size=2)
    assert np.allclose(got, _brute_iou(maps, masks, t, range(5)), atol=1e-12)
    assert np.allclose(ds.iou_matrix(maps, masks, t, [1, 3]), _brute_iou(maps, masks, t, [1, 3]))


def _block_masks(n=8, size=16, cell=4, seed=0):
    """Masks made of grid cells, so a map at the grid reproduces them exactly."""
    rng = np.random.default_rng(seed)
    g = size // cell
    cells = rng.random((n, 3, g, g)) < 0.35
    masks = np.repeat(np.repeat(cells, cell, 2), cell, 3)
    return cells, masks


def test_perfect_detectors_at_mask_resolution():
    _, masks = _block_masks()
    maps = masks.transpose(0, 2, 3, 1).astype(np.float32)  # the masks themselves
    res = ds.dissect(maps, masks, ["a", "b", "c"], rule="given", thresholds=0.5)
    assert np.allclose(np.diag(res.iou), 1.0) and res.labels == ["a", "b", "c"]
    assert res.summary["S1"] == pytest.approx(3.0) and res.summary["S2"] == pytest.approx(3.0)
    for rule in ("best", "quantile"):
        r = ds.dissect(maps, masks, rule=rule, quantile=0.3)
        assert list(r.best_concept) == [0, 1, 2]
    assert np.allclose(ds.dissect(maps, masks, rule="best").best_iou, 1.0)


def test_perfect_detectors_from_a_coarse_grid():
    # Bilinear upsampling of a cell map blurs edges; the best threshold still gives high IoU and
    # the right labels, a shifted copy of the map scores lower.
    cells, masks = _block_masks(n=10, size=32, cell=8)
    maps = cells.transpose(0, 2, 3, 1).astype(np.float32)
    res = ds.dissect(maps, masks, rule="best")
    assert list(res.best_concept) == [0, 1, 2] and (res.best_iou > 0.75).all()
    shifted = ds.dissect(np.roll(maps, 1, axis=1), masks, rule="best")
    assert shifted.summary["S1"] < res.summary["S1"]


def test_labels_from_fit_half_scores_from_other():
    # Detector 0 follows concept 0 on even images and concept 1 on odd ones: labelled 0 on the
    # fit half, its score-half IoU with concept 0 is what is reported.
    _, masks = _block_masks(n=6)
    maps = np.where((np.arange(6) % 2 == 0)[:, None, None], masks[:, 0], masks[:, 1])[..., None].astype(np.float32)
    res = ds.dissect(maps, masks, rule="given", thresholds=0.5)
    assert res.best_concept[0] == 0 and res.iou_fit[0, 0] == pytest.approx(1.0)
    assert res.best_iou[0] == pytest.approx(ds.iou_matrix(maps, masks, [0.5], [1, 3, 5])[0, 0])
    assert res.best_iou[0] < 1.0
    swapped = ds.dissect(maps, masks, rule="given", thresholds=0.5, fit=[1, 3, 5])
    assert swapped.best_concept[0] == 1


def test_quantile_rule_fires_on_that_fraction():
    rng = np.random.default_rng(2)
    maps = rng.standard_normal((6, 8, 8, 2)).astype(np.float32)
    masks = rng.random((6, 2, 8, 8)) < 0.5
    res = ds.dissect(maps, masks, rule="quantile", quantile=0.1, bins=4096)
    frac = (maps[::2] > res.thresholds).mean(axis=(0, 1, 2))
    assert np.allclose(frac, 0.1, atol=0.01)


def test_errors():
    maps = np.zeros((4, 2, 2, 3), np.float32)
    masks = np.zeros((4, 2, 8, 8), bool)
    with pytest.raises(ValueError, match="given"):
        ds.dissect(maps, masks, rule="given")
    with pytest.raises(ValueError, match="rule"):
        ds.dissect(maps, masks, rule="nope")
    with pytest.raises(ValueError, match="same number of images"):
        ds.dissect(maps[:3], masks)
    with pytest.raises(ValueError, match="both halves"):
        ds.dissect(maps, masks, fit=np.ones(4, bool))


def test_bad_arguments_are_named_not_numpy_errors():
    """Mismatched or malformed arguments get an error naming them, not numpy's broadcast /
    index / bincount errors, and out-of-range or float fit indices and NaN maps are refused
    rather than silently dropped or scored as 0."""
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(6, 2, 2, 3)).astype(np.float32)
    masks = rng.random((6, 2, 8, 8)) < 0.5
    with pytest.raises(ValueError, match=r"one per detector \(3\), got shape \(2,\)"):
        ds.dissect(maps, masks, rule="given", thresholds=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"one per detector \(3\)"):
        ds.iou_matrix(maps, masks, [0.1, 0.2])
    with pytest.raises(ValueError, match=r"fit must lie in \[0, 6\) \(6 images\), got values from 0 to 99"):
        ds.dissect(maps, masks, fit=[0, 99])
    with pytest.raises(ValueError, match="fit must be integer indices"):
        ds.dissect(maps, masks, fit=[0.5, 2.0])
    with pytest.raises(ValueError, match=r"images must lie in \[0, 6\) \(6 images\)"):
        ds.iou_matrix(maps, masks, [0.0] * 3, images=[10])
    for name, value in (("bins", 0), ("bins", 2.5), ("batch_size", 0)):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            ds.dissect(maps, masks, **{name: value})
    with pytest.raises(ValueError, match="NaN or Inf"):
        ds.dissect(np.full_like(maps, np.nan), masks)
    with pytest.raises(ValueError, match="at least one detector, concept and pixel"):
        ds.dissect(maps[..., :0], masks)
    with pytest.raises(ValueError, match="at least one detector, concept and pixel"):
        ds.dissect(maps, masks[:, :0])
    with pytest.raises(TypeError, match="one string"):
        ds.dissect(maps, masks, concepts="ab")
    with pytest.raises(ValueError, match=r"concept indices in \[0, 2\)"):
        ds.s_scores([0.5], [3], 2)
    with pytest.raises(ValueError, match="concept indices"):
        ds.s_scores([0.5], [-1])
    for size in (0, (2, 3, 4)):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            ds.upsample(maps, size)
    assert ds.dissect(maps, masks, fit=[0, 2, 4]).summary["n_fit"] == 3  # indices still work


def test_masks_must_be_boolean_or_exactly_0_1():
    """Probabilities as masks were read as "nonzero = in" (every pixel in) and NaN as True: both
    are refused, naming masks; 0/1 numbers (numpy or torch) score as their boolean masks."""
    rng = np.random.default_rng(0)
    maps = rng.standard_normal((6, 4, 4, 3)).astype(np.float32)
    probabilities = rng.random((6, 2, 16, 16))
    with_nan = (probabilities > 0.5).astype(np.float64)
    with_nan[0, 0, 0, 0] = np.nan
    for bad in (probabilities, with_nan, np.full((6, 2, 16, 16), 2, np.int64)):
        with pytest.raises(ValueError, match=r"masks must be boolean \(or 0/1\) pixel masks, got \w+ values other "
                                             r"than 0 and 1 .*threshold"):
            ds.dissect(maps, bad)
        with pytest.raises(ValueError, match=r"masks must be boolean \(or 0/1\)"):
            ds.iou_matrix(maps, bad, 0.0)
    with pytest.raises(TypeError, match="masks must be boolean .* got dtype <U1"):
        ds.dissect(maps, np.full((6, 2, 16, 16), "1"))
    masks = probabilities > 0.5
    expected = ds.dissect(maps, masks)
    for as_numbers in (masks.astype(np.float32), masks.astype(np.uint8)):
        np.testing.assert_array_equal(ds.dissect(maps, as_numbers).iou, expected.iou)
    np.testing.assert_array_equal(ds.iou_matrix(maps, masks.astype(np.int64), 0.0), ds.iou_matrix(maps, masks, 0.0))
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(ds.dissect(maps, torch.from_numpy(masks.astype(np.float32))).iou, expected.iou)
    with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\), got '0.1'"):
        ds.dissect(maps, masks, rule="quantile", quantile="0.1")
