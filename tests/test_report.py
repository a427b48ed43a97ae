"""The HTML report (edpairs.report): a folder that opens offline, with the atlas patches being the
highest-membership member cells of distinct images, report.json equal to the inputs, escaped user
strings, atomic writes (no temporary folder left, an existing report replaced only on request)
and clear errors; and, where a chromium binary exists, the page rendered in a headless browser
with every image loaded."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from html import escape as html_escape

import numpy as np
import pytest

pytest.importorskip("matplotlib")

import edpairs as edp  # noqa: E402
from edpairs import report as rp  # noqa: E402
from edpairs.explain import Explanation  # noqa: E402
from edpairs.influence import influence as run_influence  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
N, GRID, SIDE = 12, (4, 4), 32   # images, layer grid, image pixels


def _images(member: np.ndarray) -> np.ndarray:
    """(n, SIDE, SIDE, 3) uint8: each cell coloured by its memberships, plus a gradient."""
    n, h, w, I = member.shape
    rgb = np.zeros((n, h, w, 3))
    rgb[..., : min(I, 3)] = member[..., :3]
    cells = np.repeat(np.repeat(rgb, SIDE // h, axis=1), SIDE // w, axis=2)
    ramp = np.linspace(0, 0.3, SIDE)[None, :, None, None]
    return np.clip(255 * (0.7 * cells + ramp), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup():
    layer = edp.synthetic.make_layer(N, n_features=8, n_concepts=3, n_distractors=1, grid=GRID,
                                     membership="sparse", p_present=0.3, seed=0)
    pairs = edp.EDPairs(3, random_state=0, progress=False).fit(layer.X)
    acts = layer.images()                                               # (n, h, w, D)
    member = np.asarray(pairs.detect(acts.reshape(-1, 8))).reshape(N, *GRID, 3)
    return layer, pairs, acts, member, _images(member)


def _dissection(pairs, acts):
    pytest.importorskip("torch")
    from edpairs.dissect import dissect

    rng = np.random.default_rng(0)
    maps = np.asarray(pairs.decode(acts.reshape(-1, acts.shape[-1]))).reshape(*acts.shape[:3], -1)
    masks = rng.random((len(acts), 2, 16, 16)) < 0.4
    return dissect(maps, masks, ["red", "green"], rule="given", thresholds=pairs.bias_)


def _explanation(member, index, class_index=1):
    grid = member[index].transpose(2, 0, 1)                             # (I, h, w)
    up = np.repeat(np.repeat(grid, SIDE // GRID[0], axis=1), SIDE // GRID[1], axis=2)
    present = [int(i) for i in np.flatnonzero((grid > 0.5).any(axis=(1, 2)))]
    logits = np.array([0.1, 2.0, -1.0])
    return Explanation(maps=up, grid_maps=grid, present=present, contributions={i: 0.5 - i for i in present},
                       predicted=class_index, logit=float(logits[class_index]), logits=logits, removed_logits={})


@pytest.fixture(scope="module")
def full(setup, tmp_path_factory):
    """A report with every section, written once."""
    layer, pairs, acts, member, images = setup
    dissection = _dissection(pairs, acts)
    result = run_influence(layer.head, acts, pairs, n_noise=10, seed=0, alpha=0.5)
    classes = ["cat", "dog", "car"]
    interventions = [dict(name="img 3", image=images[3], concept=1,
                          map=np.kron(member[3, :, :, 1], np.ones((SIDE // GRID[0], SIDE // GRID[1]))),
                          before=[("dog", 0.7), ("cat", 0.2), ("car", 0.1)],
                          after=[("cat", 0.6), ("dog", 0.3), ("car", 0.1)], note="gated removal"),
                     dict(name="img 4", image=images[4], concept=0, map=None,
                          before=[("cat", 0.9)], after=[("cat", 0.8)])]
    out = tmp_path_factory.mktemp("full") / "report"
    t0 = time.perf_counter()
    index = rp.write_report(out, pairs, images, acts, class_names=classes, dissection=dissection,
                            influence=result, meta={"model": "synthetic", "layer": "x"}, top_k=5,
                            explanations=[dict(name="img 0", image=images[0], explanation=_explanation(member, 0))],
                            interventions=interventions)
    seconds = time.perf_counter() - t0
    with open(out / "report.json", encoding="utf-8") as f:
        data = json.load(f)
    return dict(out=out, index=index, data=data, dissection=dissection, influence=result, seconds=seconds,
                html=(out / "index.html").read_text(encoding="utf-8"))


def _no_temp_left(parent, base="report"):
    return [p for p in os.listdir(parent) if p.startswith(f".{base}.")]


def test_full_report_is_complete_and_self_contained(full):
    out = full["out"]
    assert full["index"] == os.path.join(str(out), "index.html") and os.path.isfile(full["index"])
    assert rp.check_report(out) == []
    assert _no_temp_left(out.parent) == []
    html = full["html"]
    # The atlas: I * min(top_k, n) thumbnails, one example map per concept.
    assert len(re.findall(r'<img [^>]*class="patch"', html)) == 3 * 5
    assert len(os.listdir(out / "atlas")) == 3 * 5 + 3
    for section in ("atlas", "influence", "dissection", "explanations", "interventions"):
        assert f'id="{section}"' in html
    assert 'href="report.json"' in html and "brokenImages" in html
    assert not re.search(r'(src|href)="(https?:|file:|/)', html)
    assert "synthetic" in html and "gated removal" in html


def test_report_json_equals_the_inputs(full):
    data, d, res = full["data"], full["dissection"], full["influence"]
    assert data["n_images"] == N and data["grid"] == list(GRID) and data["n_concepts"] == 3
    np.testing.assert_allclose([c["iou"] for c in data["concepts"]], d.best_iou)
    assert [c["label"] for c in data["concepts"]] == d.labels
    assert data["concept_names"][0] == f"concept 0 · {d.labels[0]} (IoU {d.best_iou[0]:.2f})"
    assert data["dissection"]["summary"]["S1"] == pytest.approx(d.summary["S1"])
    assert data["dissection"]["summary"]["S2"] == pytest.approx(d.summary["S2"])
    inf = data["influence"]
    np.testing.assert_allclose(inf["scores"], res.scores)
    assert np.array_equal(np.array(inf["significant"]), res.significant)
    cells = {(c["concept"], c["class_index"]) for c in inf["significant_cells"]}
    assert cells == {(int(i), int(k)) for i, k in zip(*np.nonzero(res.significant))}
    for c in inf["significant_cells"]:
        assert c["score"] == pytest.approx(res.scores[c["concept"], c["class_index"]])
        assert c["p_adjusted"] == pytest.approx(res.pvalues_adjusted[c["concept"], c["class_index"]])
    for c in data["concepts"]:  # significant classes listed first on each card
        flags = [t["significant"] for t in c["top_classes"]]
        assert flags == sorted(flags, reverse=True)
    iv = data["interventions"]
    assert iv[0]["before"] == [["dog", 0.7], ["cat", 0.2], ["car", 0.1]] and iv[1]["map_file"] is None
    ex = data["explanations"][0]
    assert ex["predicted_name"] == "dog" and ex["logit"] == pytest.approx(2.0)


def test_top_patches_are_the_highest_cells_of_distinct_images(setup, full):
    _, _, _, member, _ = setup
    for c in full["data"]["concepts"]:
        i = c["index"]
        # Independently: each image's best cell, images by decreasing best membership.
        best = [(float(member[j, :, :, i].max()), j) for j in range(N)]
        expected = [t for t in sorted(best, key=lambda t: (-t[0], t[1]))[:5] if t[0] > 0.5]  # members only
        got = [(p["membership"], p["image"]) for p in c["patches"]]
        assert [j for _, j in got] == [j for _, j in expected]
        np.testing.assert_allclose([y for y, _ in got], [y for y, _ in expected], rtol=1e-6)
        assert len({p["image"] for p in c["patches"]}) == len(c["patches"])
        for p in c["patches"]:
            assert member[p["image"], p["row"], p["col"], i] == pytest.approx(member[p["image"], :, :, i].max())
        # The example map is on the image the concept covers most.
        assert c["map"]["image"] == int(np.argmax(member[:, :, :, i].mean(axis=(1, 2))))


def test_atlas_shows_members_only(setup, tmp_path):
    """The demo atlas showed non-members as "top patches" (concept 0: "#46 · 0.00"; ten such patches
    over the atlas): a concept now shows only cells of membership > 0.5, fewer than top_k when
    fewer images hold one (saying so), none when no image does."""
    import copy

    _, pairs, acts, _, images = setup
    few = copy.deepcopy(pairs)
    z = np.asarray(few.decode(acts.reshape(-1, 8))).reshape(N, -1, 3).max(axis=1)   # (n, I) best cell per image
    top = np.sort(z[:, 1])[::-1]
    b = np.array(few.bias_, dtype=np.float64)
    b[1] = (top[1] + top[2]) / 2      # concept 1: members in exactly two images
    b[2] = z[:, 2].max() + 50.0       # concept 2: in none
    few.bias_ = b.astype(np.float32)
    rp.write_report(tmp_path / "r", few, images, acts, top_k=5)
    data = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    shown = [len(c["patches"]) for c in data["concepts"]]
    assert shown[1:] == [2, 0] and data["concepts"][1]["member_images"] == 2
    assert all(p["membership"] > 0.5 for c in data["concepts"] for p in c["patches"])
    html = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert "2 of 5: only 2 of the 12 images hold a member cell (membership &gt; 0.5)" in html
    assert "no member cell (membership &gt; 0.5) in these 12 images" in html
    assert len(re.findall(r'<img [^>]*class="patch"', html)) == sum(shown)
    assert sorted(os.listdir(tmp_path / "r" / "atlas")) == sorted(
        [f"concept{i:03d}_top{j:02d}.png" for i in range(3) for j in range(shown[i])]
        + [f"concept{i:03d}_map.png" for i in range(3)])
    assert rp.check_report(tmp_path / "r") == []


def test_header_and_dissection_say_what_their_numbers_count(full, setup):
    """The demo header said "images 48" while the pairs were fitted on 96 images; S1 / S2 were
    never explained. The header now names the images shown, the patches (and images) the pairs
    were fitted on and the images influence scored; the dissection explains S1, S2 and its
    probe halves."""
    _, pairs, _, _, _ = setup
    html, data = full["html"], full["data"]
    head = html[:html.index("<nav>")]
    assert "images shown</td><td>12 (the atlas and concept maps are drawn from these)" in head
    assert pairs.n_samples_ == N * 16 and data["fit_patches"] == N * 16
    assert f"pairs fitted on</td><td>{N * 16} patches = {N} images of 4 × 4 cells" in head
    assert "influence scored on</td><td>12 images, 10 noise directions per concept" in head
    assert "sum over detectors of their IoU with their label" in html
    assert "sum over probe concepts of the best IoU of a detector labelled with it" in html
    assert "probe images (labels / IoU)" in html


def test_influence_section_says_which_test_was_used(full):
    """The Influence section and report.json state which test gave the p-values and why (the
    result's test_note and per-cell tests), and each significant cell's test."""
    res, inf, html = full["influence"], full["data"]["influence"], full["html"]
    assert inf["tested"] is True and inf["test_note"] == res.test_note and res.test_note
    assert np.array_equal(np.array(inf["tests"]), res.tests)
    assert inf["n_noise"] == 10 and inf["n_images"] == N
    section = html[html.index('<section id="influence">'):]
    section = section[:section.index("</section>")]
    assert f"Test (normal requested): {html_escape(res.test_note)}." in section
    assert "Bonferroni over 9 cells at alpha = 0.5" in section
    for c in inf["significant_cells"]:
        assert c["test"] == res.tests[c["concept"], c["class_index"]]


def test_no_noise_directions_says_no_test_was_run(setup, tmp_path):
    """--noise 0: the section said "significant after Bonferroni ... (normal null)" and "No
    significant (concept, class) cell at alpha = 0.05" although no test was run."""
    layer, pairs, acts, _, images = setup
    result = run_influence(layer.head, acts, pairs, n_noise=0)
    rp.write_report(tmp_path / "r", pairs, images, acts, influence=result, top_k=2)
    html = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    section = html[html.index('<section id="influence">'):]
    section = section[:section.index("</section>")]
    assert "<b>No significance test was run</b>: no noise directions (n_noise=0; CLI --noise 0)" in section
    for claim in ("Bonferroni", "normal null", "Significant cells", "No significant"):
        assert claim not in section, claim
    data = json.loads((tmp_path / "r" / "report.json").read_text(encoding="utf-8"))
    assert data["influence"]["tested"] is False and data["influence"]["significant_cells"] == []
    assert rp.check_report(tmp_path / "r") == []


def test_patch_crop_outlines_the_cell():
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:16, 16:24] = 200                            # cell (1, 2) of a 4 x 4 grid
    thumb = rp._patch(image, (4, 4), 1, 2, 2.0, side_out=64)
    assert thumb.shape == (64, 64, 3) and thumb.dtype == np.uint8
    outline = np.all(thumb == rp.OUTLINE, axis=-1)
    assert outline.any() and (thumb[..., 0] == 200).any()
    # The crop is 16 px around the cell's centre (20, 12): the cell spans 16..48 of the thumb.
    rows, cols = np.nonzero(outline)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16, 47, 16, 47)
    corner = rp._patch(image, (4, 4), 0, 0, 2.0, side_out=64)  # clamped at the border, still square
    assert corner.shape == (64, 64, 3)


def test_user_strings_are_escaped(setup, tmp_path):
    _, pairs, acts, _, images = setup
    evil = "<script>alert(1)</script>"
    rp.write_report(tmp_path / "r", pairs, images, acts, title=f"t {evil}", concept_names=[evil, "a&b", "c"],
                    meta={"<b>key</b>": evil}, top_k=2)
    html = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert evil not in html and "<b>key</b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a&amp;b" in html
    assert html.count("<script>") == 1                  # only the report's own load check
    assert rp.check_report(tmp_path / "r") == []
    # Without a dissection the default names are "concept i"; top_k above n gives n patches.
    rp.write_report(tmp_path / "s", pairs, images[:3], acts[:3], top_k=10)
    data = json.loads((tmp_path / "s" / "report.json").read_text())
    assert data["concept_names"] == ["concept 0", "concept 1", "concept 2"]
    assert [len(c["patches"]) for c in data["concepts"]] == [3, 3, 3]


def test_existing_folder_needs_overwrite(setup, tmp_path):
    _, pairs, acts, _, images = setup
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"overwrite=True.*--overwrite"):
        rp.write_report(out, pairs, images[:4], acts[:4], top_k=2)
    assert (out / "keep.txt").read_text() == "old" and _no_temp_left(tmp_path) == []
    # overwrite replaces only an earlier report: a folder of other files is refused (it was
    # deleted), so is the current folder
    with pytest.raises(FileExistsError, match=r"is not an earlier edpairs report \(found: keep.txt"):
        rp.write_report(out, pairs, images[:4], acts[:4], top_k=2, overwrite=True)
    assert (out / "keep.txt").read_text() == "old" and _no_temp_left(tmp_path) == []
    (out / "keep.txt").unlink()
    rp.write_report(out, pairs, images[:4], acts[:4], top_k=2)
    rp.write_report(out, pairs, images[:4], acts[:4], top_k=2, overwrite=True)  # an earlier report: replaced
    assert rp.check_report(out) == [] and _no_temp_left(tmp_path) == []
    here = os.getcwd()
    try:
        os.chdir(out)
        with pytest.raises(FileExistsError, match="is the current folder"):
            rp.write_report(".", pairs, images[:4], acts[:4], top_k=2, overwrite=True)
    finally:
        os.chdir(here)
    assert rp.check_report(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()                                       # an empty folder is not "existing work"
    rp.write_report(empty, pairs, images[:4], acts[:4], top_k=2)
    assert rp.check_report(empty) == []


def test_a_file_where_a_parent_folder_should_be_is_named(setup, tmp_path):
    """makedirs' bare "[Errno 17] File exists" / "[Errno 20] Not a directory" named some path;
    the report, a store and a figure now name the file in the way (FileExistsError, which the
    CLI turns into one line)."""
    torch = pytest.importorskip("torch")
    from edpairs.influence import save_figure
    from edpairs.store import extract

    _, pairs, acts, _, images = setup
    (tmp_path / "plain").write_text("x")
    for call in (lambda: rp.write_report(tmp_path / "plain" / "sub" / "report", pairs, images[:4], acts[:4]),
                 lambda: extract(torch.nn.Identity(), "", images[:2], tmp_path / "plain" / "store"),
                 lambda: save_figure(None, tmp_path / "plain" / "fig.png")):
        with pytest.raises(FileExistsError, match=r"plain is a file, not a folder"):
            call()
    assert (tmp_path / "plain").read_text() == "x"


def test_failure_mid_write_leaves_no_temp_and_keeps_the_old_report(setup, tmp_path, monkeypatch):
    _, pairs, acts, _, images = setup
    out = tmp_path / "report"
    rp.write_report(out, pairs, images[:4], acts[:4], top_k=2)
    before = sorted(os.listdir(out))
    calls = []

    def failing(path, rgb):
        calls.append(path)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(path, rgb)

    original = rp._write_png
    monkeypatch.setattr(rp, "_write_png", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        rp.write_report(out, pairs, images, acts, overwrite=True)
    assert sorted(os.listdir(out)) == before and rp.check_report(out) == []
    assert _no_temp_left(tmp_path) == []
    with pytest.raises(RuntimeError, match="disk full"):   # a fresh path: nothing created
        calls.clear()
        rp.write_report(tmp_path / "fresh", pairs, images, acts)
    assert not (tmp_path / "fresh").exists() and _no_temp_left(tmp_path, "fresh") == []


def test_check_report_finds_broken_links_and_pngs(setup, tmp_path):
    _, pairs, acts, _, images = setup
    out = tmp_path / "r"
    rp.write_report(out, pairs, images[:4], acts[:4], top_k=2)
    os.remove(out / "atlas" / "concept000_top00.png")
    (out / "atlas" / "concept001_top00.png").write_bytes(b"not a png")
    index = out / "index.html"
    index.write_text(index.read_text(encoding="utf-8").replace(
        "</body>", '<a href="https://example.com/x">x</a><img src="../secret.png" alt="s" width="1" height="1">'
                   '<a href="#nowhere">n</a></body>'), encoding="utf-8")
    problems = "\n".join(rp.check_report(out))
    assert "concept000_top00.png" in problems and "missing file" in problems
    assert "concept001_top00.png is not a readable PNG" in problems
    assert "absolute link" in problems and "leaves the report folder" in problems
    assert "missing anchor" in problems
    assert rp.check_report(tmp_path / "nothing") == [f"{tmp_path / 'nothing' / 'index.html'} is missing"]


def _bad(setup, **change):
    _, pairs, acts, _, images = setup
    args = dict(pairs=pairs, images=images[:4], activations=acts[:4])
    args.update(change)
    return args


@pytest.mark.parametrize("change, error, message", [
    (lambda s: dict(images=s[4][:4].astype(np.float32)), TypeError, "uint8"),
    (lambda s: dict(images=s[4][:4, :, :, 0]), ValueError, r"\(n, H, W, 3\).*\(4, 32, 32\)"),
    (lambda s: dict(activations=s[2][:4].reshape(4, 16, 8)), ValueError, r"\(n, h, w, D\).*\(4, 16, 8\)"),
    (lambda s: dict(activations=s[2][:3]), ValueError, "same number|4 images"),
    (lambda s: dict(activations=s[2][:4, :, :, :5]), ValueError, "D=8"),
    (lambda s: dict(pairs=object()), ValueError, "pairs must be fitted pairs .*object has no decoding_, bias_, encoding_, detect"),
    (lambda s: dict(concept_names=["a", "b"]), ValueError, "3 names, got 2"),
    (lambda s: dict(top_k=0), ValueError, "top_k"),
    (lambda s: dict(patch_scale=-1.0), ValueError, "patch_scale"),
    (lambda s: dict(meta=["x"]), TypeError, "meta"),
    (lambda s: dict(interventions=[dict(name="x", image=s[4][0], concept=7, before=[], after=[])]),
     ValueError, r"concept.*\[0, 3\)"),
    (lambda s: dict(interventions=[dict(name="x", image=s[4][0], concept=0, map=np.ones((5, 5)), before=[],
                                        after=[])]), ValueError, r"\(H, W\)"),
    (lambda s: dict(explanations=[dict(name="x", image=s[4][0])]), TypeError, "explanation"),
    # write_report has no X or check_finite: the NaN is named as its own argument (detect's words before).
    (lambda s: dict(activations=np.where(np.arange(4)[:, None, None, None] == 2, np.nan, s[2][:4])), ValueError,
     r"^activations contain NaN or Inf \(first in image 2\)"),
    (lambda s: dict(activations=np.where(np.arange(4)[:, None, None, None] == 0, -np.inf, s[2][:4])), ValueError,
     r"^activations contain NaN or Inf \(first in image 0\)"),
    (lambda s: dict(class_names=["a", "b", "c", "d"],
                    explanations=[dict(name="x", image=s[4][0], explanation=_explanation(s[3], 0))]),
     ValueError, r"explanations\[0\] has 3 class logits but class_names has 4 names"),
], ids=["dtype", "images-3d", "acts-3d", "n-mismatch", "D-mismatch", "pairs", "names", "top_k",
        "patch_scale", "meta", "intervention-concept", "intervention-map", "explanation-keys", "acts-nan",
        "acts-inf", "explanation-class-names"])
def test_wrong_inputs_raise_clear_errors(setup, tmp_path, change, error, message):
    args = _bad(setup, **change(setup))
    pairs, images, acts = args.pop("pairs"), args.pop("images"), args.pop("activations")
    with pytest.raises(error, match=message):
        rp.write_report(tmp_path / "r", pairs, images, acts, **args)
    assert os.listdir(tmp_path) == []


def test_dissection_of_other_detectors_is_rejected(setup, tmp_path):
    _, pairs, acts, _, images = setup
    d = _dissection(pairs, acts)
    d.best_iou, d.best_concept = d.best_iou[:2], d.best_concept[:2]
    with pytest.raises(ValueError, match="K=2 detectors but the pairs have I=3"):
        rp.write_report(tmp_path / "r", pairs, images, acts, dissection=d)


def test_torch_inputs(setup, tmp_path):
    torch = pytest.importorskip("torch")
    _, pairs, acts, _, images = setup
    rp.write_report(tmp_path / "r", pairs, torch.from_numpy(images[:4]), torch.from_numpy(acts[:4]), top_k=2)
    assert rp.check_report(tmp_path / "r") == []


def test_without_matplotlib(setup, tmp_path, monkeypatch):
    _, pairs, acts, _, images = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install matplotlib.*edpairs\[models\]'):
        rp.write_report(tmp_path / "r", pairs, images[:3], acts[:3])
    assert os.listdir(tmp_path) == []


def _render_script():
    path = os.path.join(HERE, "..", "benchmarks", "render_report.py")
    spec = importlib.util.spec_from_file_location("render_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_renders_in_headless_chromium(full, tmp_path):
    render = _render_script()
    binary = render.find_chromium()
    if binary is None:
        pytest.skip("no chromium / chromium-browser / google-chrome on PATH: the browser check needs one")
    result = render.render(full["out"], screenshot=tmp_path / "shot.png", chromium=binary)
    assert result["problems"] == [], result
    assert result["broken_images"] == 0 and result["images_total"] == 3 * 5 + 3 + 1 + 1 + 3
    assert result["screenshot_colours"] > 8


def test_weak_detectors_stay_unlabelled(tmp_path, setup):
    """A concept is named after its probe concept only at IoU >= label_min_iou."""
    layer, pairs, acts, member, images = setup
    dissection = _dissection(pairs, acts)
    best = np.asarray(dissection.best_iou)
    cut = float(np.sort(best)[1])  # one concept below the cut, two at or above it
    rp.write_report(tmp_path / "r", pairs, images, acts, dissection=dissection, label_min_iou=cut, progress=False)
    with open(tmp_path / "r" / "report.json", encoding="utf-8") as f:
        names = json.load(f)["concept_names"]
    assert [("IoU" in name) for name in names] == [bool(b >= cut) for b in best]
    assert sum("IoU" in name for name in names) == 2
    html = (tmp_path / "r" / "index.html").read_text(encoding="utf-8")
    assert html.count("unlabelled: best probe concept") == 1
