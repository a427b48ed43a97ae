"""The probe set: seeded, exact multi-label masks, a torch view aligned with the pixels."""

import numpy as np
import pytest

from edpairs import probe as pr


def _photos():
    # Small flat-ish photos keep the test free of the packaged images' decoding time.
    rng = np.random.default_rng(7)
    return [("a", rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)),
            ("b", np.full((100, 90, 3), 128, np.uint8))]


@pytest.fixture(scope="module")
def small():
    return pr.make_probe_set(6, size=96, seed=3, photos=_photos())


def test_shapes_and_names(small):
    C = len(pr.CONCEPTS)
    assert small.images.shape == (6, 96, 96, 3) and small.images.dtype == np.uint8
    assert small.masks.shape == (6, C, 96, 96) and small.masks.dtype == bool
    assert small.concepts == pr.CONCEPTS and len(small.categories) == C
    assert set(small.photo_names) <= {"a", "b"}
    assert small.coverage().shape == (C,)


def test_seeded_and_prefix_stable(small):
    again = pr.make_probe_set(6, size=96, seed=3, photos=_photos())
    assert np.array_equal(again.images, small.images) and np.array_equal(again.masks, small.masks)
    longer = pr.make_probe_set(8, size=96, seed=3, photos=_photos())
    assert np.array_equal(longer.images[:6], small.images)
    other = pr.make_probe_set(6, size=96, seed=4, photos=_photos())
    assert not np.array_equal(other.images, small.images)


def test_masks_exact_colours_and_shapes(small):
    idx = {c: i for i, c in enumerate(small.concepts)}
    shape_ids = [idx[s] for s in pr.SHAPES]
    for img, m in zip(small.images, small.masks):
        # A drawn shape is flat in a named colour and carries exactly one colour label.
        on_shape = m[shape_ids].any(0)
        assert (m[shape_ids].sum(0) <= 1).all()
        for colour, rgb in pr.COLOURS.items():
            sel = on_shape & m[idx[colour]]
            assert (img[sel] == np.array(rgb, np.uint8)).all()
        n_colour = m[[idx[c] for c in pr.COLOURS]].sum(0)
        assert (n_colour[on_shape] == 1).all()
        # Textures are achromatic and carry no other label.
        for t in pr.TEXTURES:
            sel = m[idx[t]]
            assert (m[:, sel].sum(0) == 1).all()
            px = img[sel].astype(int)
            assert (px[:, 0] == px[:, 1]).all() and (px[:, 1] == px[:, 2]).all()


def test_masks_exact_on_one_shape():
    # One grey photo, no colour region, no texture, one shape: the labelled pixels are exactly
    # the pixels whose colour changed.
    grey = [("g", np.full((64, 64, 3), 100, np.uint8))]
    p = pr.make_probe_set(5, size=64, seed=1, photos=grey, n_colour_regions=(0, 0), n_textures=(0, 0),
                          n_shapes=(1, 1))
    for img, m in zip(p.images, p.masks):
        changed = (img != 100).any(-1)
        assert np.array_equal(changed, m.any(0))
        assert m.any(0).sum() > 0


def test_texture_patch_is_a_rectangle():
    grey = [("g", np.full((64, 64, 3), 100, np.uint8))]
    p = pr.make_probe_set(4, size=64, seed=2, photos=grey, n_colour_regions=(0, 0), n_textures=(1, 1),
                          n_shapes=(0, 0))
    for m in p.masks:
        lab = m.any(0)
        rows, cols = np.flatnonzero(lab.any(1)), np.flatnonzero(lab.any(0))
        assert lab[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all() and lab.sum() == len(rows) * len(cols)


def test_torch_views_aligned(small):
    torch = pytest.importorskip("torch")
    x = small.tensors()
    assert x.shape == (6, 3, 96, 96) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    ds = small.dataset()
    item, i = ds[2]
    assert i == 2 and torch.equal(item, x[2])
    assert np.allclose(item.permute(1, 2, 0).numpy() * 128 + 127, small.images[2])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pr.make_probe_set(0, photos=_photos())
    with pytest.raises(ValueError):
        pr.make_probe_set(2, photos=[])


def test_photos_are_checked_and_grey_or_rgba_taken_as_rgb():
    """A list of bare arrays ("too many values to unpack"), a grey (H, W) photo ("too many indices"),
    float photos in [0, 1] (cast to uint8: black) and reversed ranges ("low >= high") each get an
    error naming the argument; grey and RGBA photos are read as RGB."""
    rgb = _photos()[0][1]
    with pytest.raises(TypeError, match=r"photos must be a list of \(name, image\) pairs, got photos\[0\] = an "
                                        r"array of shape \(80, 120, 3\)"):
        pr.make_probe_set(1, size=32, photos=[rgb])
    with pytest.raises(TypeError, match=r"photos must be a list of \(name, image\) pairs, got str"):
        pr.make_probe_set(1, size=32, photos="abc")
    with pytest.raises(TypeError, match=r"photos\[0\] \('f'\) must be uint8 \(pixels 0..255\), got float64: for "
                                        r"floats in \[0, 1\] pass \(image \* 255\)"):
        pr.make_probe_set(1, size=32, photos=[("f", rgb / 255.0)])
    with pytest.raises(ValueError, match=r"photos\[0\] \('w'\) must hold pixels 0..255, got values from 0 to 300"):
        pr.make_probe_set(1, size=32, photos=[("w", np.arange(300 * 4).reshape(20, 20, 3) % 301)])
    with pytest.raises(ValueError, match=r"photos\[0\] \('v'\) must be an \(H, W, 3\) RGB image .*"
                                         r"got shape \(4, 4, 2\)"):
        pr.make_probe_set(1, size=32, photos=[("v", np.zeros((4, 4, 2), np.uint8))])
    with pytest.raises(ValueError, match=r"photos\[0\] \('e'\) must be at least 2 x 2 pixels"):
        pr.make_probe_set(1, size=32, photos=[("e", np.zeros((0, 0, 3), np.uint8))])
    for name in ("n_shapes", "n_textures", "n_colour_regions"):
        for bad in ((3, 1), (-1, 0), (1.0, 2), 2):
            with pytest.raises(ValueError, match=rf"{name} must be an inclusive \(min, max\) pair of integers"):
                pr.make_probe_set(1, size=32, photos=_photos(), **{name: bad})
    for kwargs, message in ((dict(n_images=2.5), "n_images must be a positive integer"),
                            (dict(size=31), "size must be an integer >= 32"),
                            (dict(seed=-1), "seed must be an integer >= 0")):
        with pytest.raises(ValueError, match=message):
            pr.make_probe_set(**{"n_images": 1, "size": 32, "photos": _photos(), **kwargs})
    grey = rgb[:, :, 0]
    as_rgb = pr.make_probe_set(2, size=32, seed=1, photos=[("g", np.repeat(grey[:, :, None], 3, axis=2))])
    rgba = np.concatenate([np.repeat(grey[:, :, None], 3, 2), np.zeros_like(grey)[:, :, None]], 2)
    for photo in (grey, grey[:, :, None], rgba, grey.astype(np.int64)):
        got = pr.make_probe_set(2, size=32, seed=1, photos=[("g", photo)])
        np.testing.assert_array_equal(got.images, as_rgb.images)
        np.testing.assert_array_equal(got.masks, as_rgb.masks)
    ds = as_rgb.dataset()
    with pytest.raises(TypeError, match="index must be an integer, got 1.0"):
        ds[1.0]
