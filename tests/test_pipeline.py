"""The pipeline's guards (edpairs.pipeline): images read upright as viewers show them (EXIF
orientation), the pairs tied to the weights they were fitted with (a fingerprint in their
metadata, compared before any analysis, hashed once per command), a report that records the
inputs and normalisation it used, and fits on too little data warned about or refused."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("PIL")

import edpairs as edp  # noqa: E402
from edpairs import cli, pipeline  # noqa: E402
from edpairs.capture import capture  # noqa: E402
from edpairs.store import model_fingerprint  # noqa: E402

LAYER = "2"  # the second convolution: 12 channels on a 7 x 7 grid of 56 x 56 images


def _net(seed: int = 0) -> "torch.nn.Module":
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4, padding=2), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.BatchNorm2d(12), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 5)).eval()


def _images(n: int = 8, seed: int = 0) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 56, 56, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def fitted():
    """A model, its images and activations, and pairs fitted by the pipeline (no URA)."""
    model, images = _net(), _images()
    with torch.no_grad():
        acts = capture(model, LAYER, images, progress=False)
    pairs = pipeline.fit_pairs(model, LAYER, acts, 3, ura=False, model_name="net", progress=False,
                               preprocessing=dict(size=56, normalisation="efficientnet-lite"))
    return model, images, acts, pairs


def _analyse(model, pairs, images, acts=None, **kwargs):
    """The cheapest analysis: no probe set, no noise directions, no explanation."""
    return pipeline.analyse(model, LAYER, pairs, images, activations=acts, n_noise=0, explain_images=[], **kwargs)


class _Counted:
    """Counts the calls of edpairs.store.model_fingerprint (the one hash of a model's weights)."""

    def __init__(self, monkeypatch):
        import edpairs.store

        self.calls = 0

        def counted(model, name=None):
            self.calls += 1
            return model_fingerprint(model, name)

        monkeypatch.setattr(edpairs.store, "model_fingerprint", counted)


# ---------------------------------------------------------------------------------------------
# Item: EXIF orientation


def _exif(orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_load_images_applies_the_exif_orientation(tmp_path):
    """A 200 x 100 JPEG stored landscape with orientation 6 (rotate 90 degrees clockwise to
    view, as phones write portraits) loads as the 100 x 200 portrait viewers show: its stored
    left half (red) is then on top. Without the tag, or with orientation 1, pixels stay as stored."""
    from PIL import Image

    stored = np.zeros((100, 200, 3), np.uint8)
    stored[:, :100] = [220, 20, 20]
    stored[:, 100:] = [20, 20, 220]
    for name, tag in (("portrait.jpg", 6), ("upright.jpg", 1), ("plain.jpg", None)):
        kwargs = {} if tag is None else dict(exif=_exif(tag))
        Image.fromarray(stored).save(tmp_path / name, quality=95, **kwargs)
    loaded = dict(pipeline.load_images([str(tmp_path)]))
    portrait = loaded["portrait.jpg"]
    assert portrait.shape == (200, 100, 3)
    top, bottom = portrait[:100].reshape(-1, 3).mean(0), portrait[100:].reshape(-1, 3).mean(0)
    assert top[0] > 180 > 60 > top[2] and bottom[2] > 180 > 60 > bottom[0]
    for name in ("upright.jpg", "plain.jpg"):
        assert loaded[name].shape == (100, 200, 3), name
        assert loaded[name][:, :100, 0].mean() > 180 and loaded[name][:, 100:, 2].mean() > 180


def test_a_16_bit_image_with_an_orientation_keeps_its_scale(tmp_path):
    """The orientation is applied after the file's raw mode is read: a rotated 16-bit grey PNG
    is still scaled 0..65535 -> 0..255 (not clipped white, nor refused as 32-bit)."""
    from PIL import Image

    a = np.full((100, 200), 1000, np.uint16)
    a[:, :100] = 65535
    Image.fromarray(a).save(tmp_path / "grey16.png", exif=_exif(6))
    (name, rgb), = pipeline.load_images([str(tmp_path / "grey16.png")])
    assert rgb.shape == (200, 100, 3)
    assert (rgb[:100] == 255).all() and (rgb[100:] == 4).all()  # 1000 * 255 / 65535 = 3.9


# ---------------------------------------------------------------------------------------------
# Item: the pairs are tied to the model's weights


def test_fit_records_the_fingerprint_of_parameters_and_buffers(fitted):
    model, _, _, pairs = fitted
    assert pairs.metadata["model_params"] == model_fingerprint(model)["params"]
    assert pairs.metadata["model_params"] == pipeline.model_params(model)
    # Buffers count: only BatchNorm's running mean changed gives another fingerprint.
    other = _net()
    other[3].running_mean += 0.5
    assert pipeline.model_params(other) != pairs.metadata["model_params"]


def _buffer_changed():
    """The fit's architecture and weights, only BatchNorm's running variance doubled."""
    model = _net()
    model[3].running_var *= 2.0
    return model


@pytest.mark.parametrize("other", [lambda: _net(seed=1), _buffer_changed], ids=["another-seed", "a-buffer"])
def test_analyse_refuses_other_weights_before_any_work(fitted, monkeypatch, other):
    _, images, acts, pairs = fitted
    import edpairs.capture

    with monkeypatch.context() as m:
        m.setattr(edpairs.capture, "capture", pytest.fail)  # refused before any capture
        with pytest.raises(pipeline.WeightsMismatch, match="the model's weights differ from those the pairs were "
                                                           "fitted with .*pass the model they were fitted with"):
            _analyse(other(), pairs, images)
    # The same weights in another object pass; the result is computed.
    assert _analyse(_net(), pairs, images, acts).influence is not None


def test_pairs_without_a_fingerprint_are_not_checked_nor_hashed(fitted, monkeypatch):
    _, images, acts, pairs = fitted
    bare = edp.EDPairs(3, random_state=0, progress=False, metadata=dict(model="net", layer=LAYER))
    bare.fit(acts.reshape(-1, acts.shape[-1]))  # through the Python API: no fingerprint
    counted = _Counted(monkeypatch)
    _analyse(_net(seed=1), bare, images)
    assert counted.calls == 0


def test_a_store_fit_without_the_model_records_the_stores_fingerprint(fitted, tmp_path):
    model, images, _, _ = fitted
    from edpairs.store import extract

    store = extract(model, LAYER, images, str(tmp_path / "acts"), model_name="net", progress=False)
    pairs = pipeline.fit_pairs(None, LAYER, store, 3, ura=False, progress=False)
    assert pairs.metadata["model_params"] == store.key["model"]["params"] == pipeline.model_params(model)
    with pytest.raises(pipeline.WeightsMismatch):
        _analyse(_net(seed=1), pairs, images)


def _png_folder(folder, n: int = 4):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        a[16:48, 16:48] = [200, 30, 30] if k % 2 else [30, 30, 200]
        Image.fromarray(a).save(folder / f"img{k}.png")
    return str(folder)


def test_cli_report_refuses_a_model_file_with_other_weights_hashing_once(tmp_path, capsys, monkeypatch,
                                                                         one_torch_thread):
    """The trial's case: fit with a model saved whole, replace the file by the same architecture
    with another seed, report: one error line (status 2). With the right file the report runs,
    and the command hashed the model's weights once."""
    monkeypatch.chdir(tmp_path)  # (the pairs name the model file as given: the report finds it here)
    images = _png_folder(tmp_path / "images")
    model_file, pairs_file = "model.pt", "pairs.npz"
    torch.save(_net(), model_file)
    counted = _Counted(monkeypatch)
    rc = cli.main(["fit", "--model", model_file, "--layer", LAYER, "--images", images, "--concepts", "3", "--no-ura",
                   "--out", pairs_file, "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert counted.calls == 1
    torch.save(_net(seed=1), model_file)
    report = ["report", "--pairs", pairs_file, "--images", images, "--probe", "0", "--noise", "0", "--quiet"]
    rc = cli.main(report + ["--out", str(tmp_path / "wrong")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "the model's weights differ from those the pairs were fitted" in err
    assert not os.path.exists(tmp_path / "wrong" / "index.html")
    torch.save(_net(), model_file)
    counted.calls = 0
    rc = cli.main(report + ["--out", str(tmp_path / "right")])
    assert rc == 0, capsys.readouterr().err
    assert counted.calls == 1


def test_demo_style_fit_then_analyse_hashes_once(monkeypatch):
    """fit_pairs and analyse given the fingerprint (as the demo does) hash nothing more."""
    model, images = _net(), _images()
    counted = _Counted(monkeypatch)
    params = pipeline.model_params(model)
    with torch.no_grad():
        acts = capture(model, LAYER, images, progress=False)
    pairs = pipeline.fit_pairs(model, LAYER, acts, 3, ura=False, progress=False, fingerprint=params)
    _analyse(model, pairs, images, acts, fingerprint=params)
    assert counted.calls == 1


# ---------------------------------------------------------------------------------------------
# Item: the report records its own inputs and normalisation


def test_analyse_records_its_inputs_apart_from_the_fits(fitted, tmp_path):
    model, images, _, pairs = fitted
    out = _analyse(model, pairs, images[:5])  # default normalisation: the fit's
    assert out.meta["preprocessing"] == dict(images=5, size=[56, 56], normalisation="efficientnet-lite")
    assert out.meta["fit_preprocessing"] == pairs.metadata["preprocessing"]
    assert "warnings" not in out.meta
    mine = dict(size=56, photos=["a.png"], crops_per_photo=1)
    out = _analyse(model, pairs, images[:5], preprocessing=mine)
    assert out.meta["preprocessing"] == dict(mine, normalisation="efficientnet-lite")
    # report.json (and the HTML header) show these, not the fit's preprocessing.
    pipeline.write(str(tmp_path / "report"), pairs, out, title="t")
    with open(tmp_path / "report" / "report.json") as f:
        meta = json.load(f)["meta"]
    assert meta["preprocessing"]["photos"] == ["a.png"]
    assert meta["fit_preprocessing"] == pairs.metadata["preprocessing"]
    assert meta["model_params"] == pairs.metadata["model_params"]


def test_another_normalisation_than_the_fits_is_used_recorded_and_warned(fitted):
    model, images, _, pairs = fitted
    with pytest.warns(pipeline.PipelineWarning, match="normalised as 'imagenet' but the pairs were fitted on "
                                                      "'efficientnet-lite' inputs"):
        out = _analyse(model, pairs, images[:4], normalisation="imagenet")
    assert out.meta["preprocessing"]["normalisation"] == "imagenet"
    assert out.meta["fit_preprocessing"]["normalisation"] == "efficientnet-lite"
    assert "'imagenet'" in out.meta["warnings"][0]
    # What the model got is the imagenet input: the recorded value is the one applied.
    with torch.no_grad():
        expected = capture(model, LAYER, pipeline.model_input(images[:4], "imagenet"), progress=False)
    np.testing.assert_array_equal(out.activations, np.asarray(expected))
    with pytest.raises(ValueError, match="normalisation must be one of"):
        _analyse(model, pairs, images[:4], normalisation="caffe")


# ---------------------------------------------------------------------------------------------
# Item: too little data


def test_fewer_rows_than_concepts_is_refused():
    acts = np.random.default_rng(0).standard_normal((1, 2, 2, 12)).astype(np.float32)
    with pytest.raises(ValueError, match=r"4 patch rows \(1 image x 2 x 2\) are fewer than the 5 concepts"):
        pipeline.fit_pairs(None, LAYER, acts, 5, ura=False, progress=False)


def test_one_image_warns_and_the_pairs_keep_the_warnings():
    """The trial's case: one image (49 rows of a 7 x 7 grid) for 16 concepts: under 20 rows per
    concept, and concepts with a handful of positive patches; both warned, both kept in the
    pairs' metadata (a report's header shows them)."""
    model = _net()
    with torch.no_grad():
        acts = capture(model, LAYER, _images(1), progress=False)
    with pytest.warns(pipeline.PipelineWarning) as caught:
        pairs = pipeline.fit_pairs(model, LAYER, acts, 16, ura=False, progress=False)
    texts = [str(w.message) for w in caught]
    assert any("49 patch rows (1 image x 7 x 7) for 16 concepts at D = 12: 3.1 rows per concept (under 20)" in t
               for t in texts), texts
    assert any("concepts have fewer than 10 positive patches of 49 (concept: positives 0: " in t for t in texts), texts
    assert pairs.metadata["fit_warnings"] == texts


def test_fewer_rows_than_channels_warns():
    acts = np.random.default_rng(0).standard_normal((2, 3, 3, 24)).astype(np.float32)  # 18 rows, D = 24
    with pytest.warns(pipeline.PipelineWarning) as caught:
        pipeline.fit_pairs(None, LAYER, acts, 2, ura=False, progress=False)
    assert "fewer patch rows than channels (18 < D = 24: the covariance has rank at most 17" in str(caught[0].message)


def test_enough_data_fits_without_warning(fitted):
    """Eight images (392 rows) for 3 concepts at D = 12: no warning (pytest turns one into an
    error), no fit_warnings."""
    _, _, acts, pairs = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = pipeline.fit_pairs(None, LAYER, acts, 3, ura=False, progress=False)
    assert "fit_warnings" not in pairs.metadata and "fit_warnings" not in again.metadata
    assert int(np.min(pairs.n_positives_)) >= pipeline.MIN_POSITIVES


def test_cli_fit_through_a_store_hashes_the_model_once(tmp_path, capsys, monkeypatch, one_torch_thread):
    """fit --store: extracting hashes the model once (the store's key), and the pairs take the
    fingerprint from there; run again on the finished store, the check of its key against the
    model is the one hash (the resumed extraction takes the checked fingerprint)."""
    images = _png_folder(tmp_path / "images")
    counted = _Counted(monkeypatch)
    torch.save(_net(), tmp_path / "model.pt")
    command = ["fit", "--model", str(tmp_path / "model.pt"), "--layer", LAYER, "--images", images, "--concepts", "3",
               "--no-ura", "--store", str(tmp_path / "store"), "--quiet"]
    for run, out in enumerate(("first.npz", "again.npz")):
        counted.calls = 0
        rc = cli.main(command + ["--out", str(tmp_path / out)])
        assert rc == 0, capsys.readouterr().err
        assert counted.calls == 1, f"run {run}: {counted.calls} hashes"
    assert (edp.EDPairs.load(str(tmp_path / "again.npz")).metadata["model_params"]
            == model_fingerprint(_net())["params"])
