"""The activation store: round trip against a direct capture, a fit source for the estimators,
an extraction killed with SIGKILL and resumed writes the same bytes as an uninterrupted one
(and runs only the missing images through the model), corrupted / truncated / missing shards,
key mismatches and a resume with other images give clear errors, and repair rebuilds what
fails."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import edpairs as edp  # noqa: E402
from _helpers import worker_env  # noqa: E402
from edpairs.capture import capture  # noqa: E402
from edpairs.store import (  # noqa: E402
    ActivationStore,
    StoreCorrupted,
    StoreImagesMismatch,
    StoreIncomplete,
    StoreKeyMismatch,
    extract,
)

# Built the same way in the test process and in the subprocess that gets killed.
SETUP = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    images = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ARGS = dict(images_per_shard=6, batch_size=4, preprocessing={"source": "randn", "seed": 1})
""")
LAYER = "3"


@pytest.fixture(scope="module")
def setup():
    ns = {}
    exec(SETUP, ns)
    return ns


class Counter:
    """Counts the images the model is run on."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, _module, inputs):
        self.n += int(inputs[0].shape[0])

    def close(self):
        self.handle.remove()


def shard_bytes(path):
    return {n: (Path(path) / n).read_bytes() for n in sorted(os.listdir(path)) if n.endswith(".npy")}


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """An uninterrupted extraction."""
    path = tmp_path_factory.mktemp("reference")
    extract(setup["model"], LAYER, setup["images"], path, **setup["ARGS"])
    return path


def test_round_trip(setup, reference):
    store = ActivationStore(reference)
    ref = capture(setup["model"], LAYER, setup["images"])  # (40, 4, 4, 16)
    assert (store.n_images, store.grid, store.n_features, store.patches_per_image) == (40, (4, 4), 16, 16)
    assert len(store) == 7 and store.n_patches == 640 and store.complete and store.dtype == np.float16
    assert store.key["layer"] == LAYER and store.key["dtype"] == "float16"
    assert store.key["model"]["params"].startswith("sha256:")
    chunks = list(store.chunks())
    assert [c.shape[0] for c in chunks] == [96] * 6 + [64] and chunks[0].dtype == np.float16
    np.testing.assert_array_equal(np.concatenate(chunks), ref.reshape(-1, 16).astype(np.float16))
    imgs = list(store.images(batch_images=4))
    assert imgs[0].shape == (4, 4, 4, 16)
    np.testing.assert_array_equal(np.concatenate(imgs), ref.astype(np.float16))
    image, pos = store.locate([0, 15, 16, 639])
    np.testing.assert_array_equal(image, [0, 0, 1, 39])
    np.testing.assert_array_equal(pos, [0, 15, 0, 15])
    meta = json.loads((Path(reference) / "store.json").read_text())
    assert meta["shards"]["6"]["images"] == [36, 40] and meta["shards"]["0"]["checksum"].startswith("crc32:")


def test_float32_store_is_exact(setup, tmp_path):
    store = extract(setup["model"], LAYER, setup["images"], tmp_path, dtype="float32", **setup["ARGS"])
    np.testing.assert_array_equal(np.concatenate(list(store.chunks())),
                                  capture(setup["model"], LAYER, setup["images"], patches=True))


def test_store_is_a_fit_source(reference):
    store = ActivationStore(reference)
    X = np.concatenate(list(store.chunks()))
    km = edp.SphericalKMeans(3, random_state=0).fit(store)
    km_ref = edp.SphericalKMeans(3, random_state=0).fit(list(store.chunks()))
    np.testing.assert_allclose(km.cluster_centers_, km_ref.cluster_centers_, rtol=1e-6, atol=1e-6)
    pairs = edp.EDPairs(3, random_state=0).fit(store)
    assert pairs.decoding_.shape == (3, 16) and np.isfinite(pairs.encoding_).all()
    assert X.shape == (640, 16)


def test_killed_extraction_resumes_to_identical_bytes(setup, reference, tmp_path):
    path = tmp_path / "killed"
    script = SETUP + textwrap.dedent(f"""
        import os, signal
        from edpairs.store import extract
        def on_shard(k, file):
            if k == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        extract(model, {LAYER!r}, images, {str(path)!r}, on_shard=on_shard, **ARGS)
        raise SystemExit("not killed")
    """)
    env = worker_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    with pytest.raises(StoreIncomplete, match=r"stopped after 3 shards \(18 of 40 images\).*same arguments"):
        list(ActivationStore(path).chunks())
    assert ActivationStore(path, allow_partial=True).n_images == 18
    # Debris of a write cut short: a temporary file and an unlisted shard.
    (path / ".shard-00003.npy.k2j4x9.tmp").write_bytes(b"partial")  # an interrupted write_atomic
    (path / "shard-00003.npy").write_bytes(b"garbage")

    counter = Counter(setup["model"])
    try:
        store = extract(setup["model"], LAYER, setup["images"], path, **setup["ARGS"])
    finally:
        counter.close()
    # Images 0..17 are stored; the batch of 4 holding image 18 starts at image 16.
    assert counter.n == 40 - 16
    assert store.complete and store.n_images == 40
    assert shard_bytes(path) == shard_bytes(reference)
    assert sorted(os.listdir(path)) == sorted(os.listdir(reference))


def test_interrupted_iterable_skips_finished_batches(setup, reference, tmp_path):
    images = setup["images"]
    batches = [(images[s:s + 4], torch.zeros(len(images[s:s + 4]))) for s in range(0, 40, 4)]

    class Interrupt(Exception):
        pass

    def stop_at_4(k, file):
        if k == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(setup["model"], LAYER, batches, tmp_path, on_shard=stop_at_4, **setup["ARGS"])
    counter = Counter(setup["model"])
    try:
        store = extract(setup["model"], LAYER, batches, tmp_path, **setup["ARGS"])
    finally:
        counter.close()
    assert counter.n == 40 - 28  # shards 0..4 hold images 0..29; the batch at 28 is run again
    assert store.complete and store.key["n_images_expected"] is None
    assert shard_bytes(tmp_path) == shard_bytes(reference)
    again = Counter(setup["model"])
    try:
        extract(setup["model"], LAYER, batches, tmp_path, **setup["ARGS"])  # complete: nothing runs
    finally:
        again.close()
    assert again.n == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_damaged_shard_is_detected_and_repaired(setup, reference, tmp_path, damage):
    path = tmp_path / "store"
    extract(setup["model"], LAYER, setup["images"], path, **setup["ARGS"])
    victim = path / "shard-00003.npy"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[-7] ^= 0x10
        victim.write_bytes(bytes(data))
        expect = r"shard-00003\.npy.*corrupted: checksum expected crc32:[0-9a-f]{8}, found crc32:[0-9a-f]{8}.*repair"
    elif damage == "truncate":
        victim.write_bytes(bytes(data[:-10]))
        expect = rf"shard-00003\.npy.*truncated.*expected {len(data)} bytes, found {len(data) - 10}.*repair"
    else:
        victim.unlink()
        expect = r"shard-00003\.npy.*missing.*repair"
    store = ActivationStore(path)
    with pytest.raises(StoreCorrupted, match=expect):
        sum(float(c.astype(np.float32).sum()) for c in store.chunks())
    with pytest.raises(StoreCorrupted, match=expect):
        ActivationStore(path).verify()
    assert len(ActivationStore(path).verify(raise_on_error=False)) == 1
    with pytest.raises(StoreCorrupted):
        edp.SphericalKMeans(3, random_state=0).fit(ActivationStore(path))

    counter = Counter(setup["model"])
    try:
        store.repair(setup["model"], setup["images"])
    finally:
        counter.close()
    assert counter.n == 8  # the batches covering images 18..23 only
    assert shard_bytes(path) == shard_bytes(reference)
    assert store.verify() == []


def test_key_mismatch_names_what_differs(setup, reference, tmp_path):
    path = tmp_path / "store"
    extract(setup["model"], LAYER, setup["images"], path, **setup["ARGS"])
    args = dict(setup["ARGS"], preprocessing="other")
    with pytest.raises(StoreKeyMismatch, match=r"preprocessing: stored \{.*\}, requested 'other'.*overwrite=True"):
        extract(setup["model"], LAYER, setup["images"], path, **args)
    with pytest.raises(StoreKeyMismatch, match=r"layer: stored '3', requested '1'"):
        extract(setup["model"], "1", setup["images"], path, **setup["ARGS"])
    other = torch.nn.Sequential(*[torch.nn.Conv2d(3, 8, 3, padding=1)] + list(setup["model"].children())[1:])
    with pytest.raises(StoreKeyMismatch, match=r"model\.params: stored 'sha256:"):
        extract(other, LAYER, setup["images"], path, **setup["ARGS"])
    store = extract(setup["model"], LAYER, setup["images"], path, overwrite=True, **dict(args, dtype="float32"))
    assert store.key["preprocessing"] == "other" and store.dtype == np.float32 and store.complete


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an activation store"):
        ActivationStore(tmp_path)
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(StoreKeyMismatch, match="no store.json"):
        extract(torch.nn.Conv2d(3, 4, 1), "", torch.randn(2, 3, 4, 4), tmp_path)


def test_bad_sidecar_names_the_file(reference, tmp_path):
    meta = json.loads((Path(reference) / "store.json").read_text())
    sidecar = tmp_path / "store.json"
    where = re.escape(str(sidecar))
    for text, why in [("", "the file is empty"), ("{not json", r"not JSON \(Expecting"),
                      ("[1, 2]", "expected a JSON object, got list")]:
        sidecar.write_text(text)
        with pytest.raises(ValueError, match=f"{where} is not a valid edpairs activation store sidecar: {why}"):
            ActivationStore(tmp_path)
    broken = json.loads(json.dumps(meta))
    del broken["shards"]["2"]["rows"], broken["key"]["dtype"]
    for drop, fields in [("rows", r"key\.dtype, shards\.2\.rows"), ("key", "key"),
                         ("n_features", "n_features"), ("shards", "shards")]:
        sidecar.write_text(json.dumps(broken if drop == "rows" else {k: v for k, v in meta.items() if k != drop}))
        with pytest.raises(ValueError, match=f"{where} is not a valid .*: missing or malformed field\\(s\\) {fields}$"):
            ActivationStore(tmp_path)
    # extract into a folder with a broken sidecar: refused unless overwrite=True
    model = torch.nn.Conv2d(3, 4, 1).eval()
    sidecar.write_text("")
    with pytest.raises(ValueError, match="the file is empty; use another folder, or .*overwrite=True"):
        extract(model, "", torch.randn(2, 3, 4, 4), tmp_path)
    assert extract(model, "", torch.randn(2, 3, 4, 4), tmp_path, overwrite=True).complete


def test_shard_index_and_batch_images_are_checked(reference):
    store = ActivationStore(reference)
    assert store.shard(6).shape == store.shard(-1).shape == (64, 16)
    for i in (7, -8):
        with pytest.raises(IndexError, match=rf"shard index {i} is out of range: .* has 7 finished shards "
                                             r"\(valid: 0\.\.6"):
            store.shard(i)
    with pytest.raises(TypeError, match="shard index must be an integer, got float 1.0"):
        store.shard(1.0)
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match=rf"batch_images must be a positive integer .*got {bad!r}"):
            store.images(batch_images=bad)  # raised at the call, not when iterating
    assert [a.shape[0] for a in store.images(batch_images=np.int64(5))] == [5, 1] * 6 + [4]


def test_unknown_length_iterable_and_tokens(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU()).eval()
    x = torch.randn(11, 7, 6)
    gen_batches = (lambda: (x[s:s + 3] for s in range(0, 11, 3)))
    store = extract(model, "1", gen_batches(), tmp_path, images_per_shard=4, batch_size=3)
    assert store.grid == (7,) and store.layout == "nlc" and len(store) == 3 and store.n_images == 11
    np.testing.assert_array_equal(np.concatenate(list(store.images())),
                                  capture(model, "1", x).astype(np.float16))


def test_shuffled_loader_refused(setup, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(setup["images"]), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        extract(setup["model"], LAYER, loader, tmp_path, **setup["ARGS"])


def test_any_object_with_chunks_is_a_fit_source():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 8)).astype(np.float32)

    class Source:
        def chunks(self):
            return iter([X[:120], X[120:]])

    a = edp.SphericalKMeans(3, random_state=0).fit(Source())
    b = edp.SphericalKMeans(3, random_state=0).fit([X[:120], X[120:]])
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


def test_one_writer_per_store(setup, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    with open(tmp_path / ".lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(RuntimeError, match="another process is extracting"):
            extract(setup["model"], LAYER, setup["images"], tmp_path, **setup["ARGS"])
    assert extract(setup["model"], LAYER, setup["images"], tmp_path, **setup["ARGS"]).complete


def test_values_beyond_float16_or_not_finite_are_refused(tmp_path):
    model = torch.nn.Sequential(torch.nn.Identity())
    x = torch.ones(3, 2, 2, 2)
    with pytest.raises(ValueError, match="beyond float16's range.*dtype='float32'"):
        extract(model, "0", x * 1e5, tmp_path / "a", images_per_shard=2)
    assert extract(model, "0", x * 1e5, tmp_path / "b", images_per_shard=2, dtype="float32").complete
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf values for images 0\.\.2"):
        extract(model, "0", x, tmp_path / "c", images_per_shard=2)


def test_images_of_another_size_are_refused_before_they_are_stored(tmp_path):
    """Images whose layer grid differs from the first images' (a dataset of mixed sizes) were cut
    to the first grid in row-major order and the store marked complete (or, smaller, spilled
    into the next image's rows before numpy's broadcast error): refused, naming the images."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1))
    g = torch.Generator().manual_seed(0)
    for second, grid in ((10, r"\(10, 10\)"), (6, r"\(6, 6\)")):
        data = [torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, second, second, generator=g)]
        with pytest.raises(ValueError, match=rf"images 3\.\.5 give layer '0' a grid of {grid} x 4, the store's "
                                             r"first images \(8, 8\) x 4"):
            extract(model, "0", data, tmp_path / f"s{second}", images_per_shard=2)
        assert not ActivationStore(tmp_path / f"s{second}", allow_partial=True).complete


def _each_edit_is_named(meta: dict, cases, folder) -> None:
    """Each (edit, field) of ``cases`` applied to a copy of the sidecar ``meta``, written to
    ``folder``: opening the store names the field."""
    for edit, field in cases:
        broken = json.loads(json.dumps(meta))
        edit(broken)
        (folder / "store.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=f"missing or malformed field\\(s\\) {field}"):
            ActivationStore(folder)


def test_sidecar_fields_of_the_wrong_type_are_named(reference, tmp_path):
    """A hand-edited or foreign sidecar whose fields have the wrong type is refused naming the
    field (before: int('abc'), "'int' object is not subscriptable" from deep inside), and a
    shard file that points outside the store's folder is refused rather than read."""
    meta = json.loads((Path(reference) / "store.json").read_text())
    cases = [(lambda m: m["shards"].update(abc=m["shards"]["0"]), r"shards\.abc \(keyed by the shard's number\)"),
             (lambda m: m["shards"]["0"].update(rows="x"), r"shards\.0\.rows \(an integer >= 0\)"),
             (lambda m: m["shards"]["0"].update(bytes=-1), r"shards\.0\.bytes \(an integer >= 0\)"),
             (lambda m: m["shards"]["0"].update(images=5), r"shards\.0\.images \(a \[first, end\] pair"),
             (lambda m: m["shards"]["0"].update(file="../../x.npy"), r"shards\.0\.file \(a file name in the store"),
             (lambda m: m.update(version="x"), r"version \(an integer\)"),
             (lambda m: m.update(grid="ab"), r"grid \(a list of integers\)"),
             (lambda m: m["key"].update(dtype="int8"), r"key\.dtype \(one of float16, float32\)"),
             (lambda m: m["key"].update(model="x"), r"key\.model \(an object with a name\)"),
             (lambda m: m["shards"]["0"].update(inputs="crc32:0"), r"shards\.0\.inputs \(an object with the digests"),
             (lambda m: m["shards"]["0"]["inputs"].pop("all"), r"shards\.0\.inputs \(an object with the digests")]
    _each_edit_is_named(meta, cases, tmp_path)


def test_extract_checks_its_sizes_and_path_and_writes_readable_files(setup, tmp_path):
    """images_per_shard / batch_size must be positive integers (2.5 was cut to 2 and "4" was
    taken as 4 silently, True as 1); a path that is a file is named as such; and the shards
    and sidecar get ordinary permissions (umask), not mkstemp's private 0o600."""
    model, images = setup["model"], setup["images"][:4]
    for kwargs, name in [(dict(images_per_shard=2.5), "images_per_shard"), (dict(images_per_shard="4"),
                         "images_per_shard"), (dict(images_per_shard=True), "images_per_shard"),
                         (dict(batch_size=0), "batch_size"), (dict(batch_size=2.5), "batch_size")]:
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            extract(model, LAYER, images, tmp_path / "s", **kwargs)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file; an activation store is a folder"):
        extract(model, LAYER, images, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    old = os.umask(0o022)
    try:
        store = extract(model, LAYER, images, tmp_path / "s", images_per_shard=2)
    finally:
        os.umask(old)
    for f in store.shard_files + [os.path.join(store.path, "store.json")]:
        assert os.stat(f).st_mode & 0o777 == 0o644, f


def test_a_stores_fingerprint_follows_its_shards(reference, tmp_path):
    """A checkpointed fit from a store compares the store's shard checksums (no shard read):
    the same store gives the same fingerprint, a store whose shard changed another."""
    import shutil

    from edpairs._source import ChunkSource
    from edpairs.checkpoint import data_fingerprint

    store = ActivationStore(reference)
    fp = data_fingerprint(ChunkSource(store))
    assert fp["source"] == store.fingerprint() == ActivationStore(reference).fingerprint()
    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    meta = json.loads((copy / "store.json").read_text())
    meta["shards"]["6"]["checksum"] = "sha256:" + "0" * 64  # as if the last shard were written again
    (copy / "store.json").write_text(json.dumps(meta))
    assert ActivationStore(copy, verify=False).fingerprint() != store.fingerprint()


def test_key_mismatch_carries_reason_and_remedy_apart(setup, reference, tmp_path):
    """A command line words the remedy in its own flags (--overwrite), not extract's: the
    mismatch keeps what differs and what to do apart (and survives pickling, as from a worker).
    foreign_entries lists what in a store's folder is not the store's."""
    import pickle
    import shutil

    path = tmp_path / "store"
    shutil.copytree(reference, path)
    with pytest.raises(StoreKeyMismatch) as info:
        extract(setup["model"], "1", setup["images"], path, **setup["ARGS"])
    exc = info.value
    assert "layer: stored '3', requested '1'" in exc.reason and "overwrite" not in exc.reason
    assert "overwrite=True" in exc.remedy and str(exc) == f"{exc.reason}; {exc.remedy}"
    back = pickle.loads(pickle.dumps(exc))
    assert (back.reason, back.remedy, str(back)) == (exc.reason, exc.remedy, str(exc))
    assert edp.store.foreign_entries(path) == []
    (path / "notes.txt").write_text("mine")
    (path / "sub").mkdir()
    assert edp.store.foreign_entries(path) == ["notes.txt", "sub"]
    # overwrite=True replaces the store and leaves the rest as it was.
    store = extract(setup["model"], "1", setup["images"], path, overwrite=True, **setup["ARGS"])
    assert store.key["layer"] == "1" and (path / "notes.txt").read_text() == "mine"


def test_a_failed_first_extraction_does_not_block_the_corrected_call(setup, tmp_path):
    """A first extract with a bad layout, a wrong layer name or no images left a store.json keyed
    to those arguments, and the corrected call then met StoreKeyMismatch ("layout: stored
    'bogus', requested None ... overwrite=True"). The arguments and the layer are checked before
    the folder is written to, and a store without a finished shard gives way to other settings."""
    model, images = setup["model"], setup["images"][:8]
    for n, (kwargs, error, expect) in enumerate([
            (dict(layout="bogus"), ValueError, r"layout must be one of \('nchw', 'nhwc', 'nlc', 'nc'\) or None.*"
                                               "got 'bogus'"),
            (dict(layer="9"), KeyError, "has no module named '9'"),
            (dict(data=images[:0]), ValueError, "data held no images"),
            (dict(data=[]), ValueError, "data held no images"),  # (an iterable: found out after the sidecar)
            (dict(layout="nlc"), ValueError, "layout 'nlc' expects a 3-D output")]):  # (at the first batch)
        path = tmp_path / f"s{n}"
        args = dict(dict(layer=LAYER, data=images), **kwargs)
        with pytest.raises(error, match=expect):
            extract(model, args.pop("layer"), args.pop("data"), path, images_per_shard=4, **args)
        assert not [f for f in os.listdir(path) if f.endswith(".npy")]
        store = extract(model, LAYER, images, path, images_per_shard=4)
        assert store.complete and store.n_images == 8 and store.key["layout"] is None
    # A store with finished shards is still kept from other settings.
    with pytest.raises(StoreKeyMismatch, match=r"layer: stored '3', requested '1'"):
        extract(model, "1", images, tmp_path / "s0", images_per_shard=4)


def test_locate_refuses_rows_that_are_not_integer_indices(reference):
    """locate([1.7]) answered for row 1."""
    store = ActivationStore(reference)
    for bad, dtype in (([1.7], "float64"), ([True], "bool"), (np.array([2.0]), "float64")):
        with pytest.raises(TypeError, match=f"rows must be integer row indices, got dtype {dtype}"):
            store.locate(bad)
    for bad in ([-1], [640], [[0, 700]]):
        with pytest.raises(IndexError, match=r"rows must be in \[0, 640\)"):
            store.locate(bad)
    image, pos = store.locate(np.array([[17, 639]], dtype=np.uint32))
    np.testing.assert_array_equal(image, [[1, 39]])
    np.testing.assert_array_equal(pos, [[1, 15]])
    assert [a.shape for a in store.locate([])] == [(0,), (0,)]


def test_a_shard_whose_header_is_garbage_is_corrupted_not_a_pickle(reference, tmp_path):
    """With verify=False a shard overwritten with garbage of the same size gave numpy's "This file
    contains pickled (object) data ... allow_pickle=" (advice to load it unsafely)."""
    import shutil

    path = tmp_path / "store"
    shutil.copytree(reference, path)
    victim = path / "shard-00002.npy"
    victim.write_bytes(np.random.default_rng(0).bytes(victim.stat().st_size))
    for verify in (False, True):
        with pytest.raises(StoreCorrupted, match=r"shard-00002\.npy of activation store .* is not a readable \.npy "
                                                 r"file \(its header is unreadable.*repair") as info:
            list(ActivationStore(path, verify=verify).chunks())
        assert "pickle" not in str(info.value)
    assert len(ActivationStore(path).verify(raise_on_error=False)) == 1


def test_verify_checks_each_shards_header_against_the_sidecar(setup, reference, tmp_path):
    """A hand-edited n_features (or dtype) made every read raise StoreCorrupted whose advice,
    repair, did not help, while verify() said []: verify reads each shard's .npy header too, and
    repair rebuilds the shards that contradict the sidecar."""
    import shutil

    path = tmp_path / "store"
    shutil.copytree(reference, path)
    meta = json.loads((path / "store.json").read_text())
    meta["n_features"] = 7
    (path / "store.json").write_text(json.dumps(meta))
    store = ActivationStore(path)
    problems = store.verify(raise_on_error=False)
    assert len(problems) == 7 and re.search(r"shard-00000\.npy .* holds float16 \(96, 16\), its sidecar says "
                                            r"float16 \(96, 7\); rebuild it with store\.repair", problems[0])
    with pytest.raises(StoreCorrupted, match=r"holds float16 \(96, 16\), its sidecar says float16 \(96, 7\)"):
        store.verify()
    store.repair(setup["model"], setup["images"], **{k: v for k, v in setup["ARGS"].items()
                                                     if k not in ("images_per_shard", "preprocessing")})
    assert store.n_features == 16 and store.verify() == []
    assert shard_bytes(path) == shard_bytes(reference)


def test_sidecar_entries_that_contradict_the_layout_are_named(reference, tmp_path):
    """rows that are not images x prod(grid), images not [k * ips, ...] (overlapping or swapped),
    a shard number past the data's, a zero in the grid, "complete" not a bool, a shard keyed
    "007": each was read (or failed later, vaguely); refused naming the field."""
    meta = json.loads((Path(reference) / "store.json").read_text())
    cases = [(lambda m: m["shards"]["1"].update(rows=10),
              r"shards\.1\.rows \(96: 6 images x 16 grid positions, got 10\)"),
             (lambda m: m["shards"]["1"].update(images=[0, 6]),
              r"shards\.1\.images \(\[6, 12\] for shard 1, got \[0, 6\]\)"),
             (lambda m: m["shards"]["6"].update(images=[36, 42]), r"shards\.6\.images \(\[36, 40\] for shard 6"),
             (lambda m: m["shards"].update({"7": m["shards"]["6"]}), r"shards\.7 \(a shard number below 7: 40 images"),
             (lambda m: m["shards"].update({"006": m["shards"].pop("6")}),
              r"shards\.006 \(keyed by the shard's number"),
             (lambda m: m.update(grid=[0, 4]), r"grid \(sizes >= 1, got \[0, 4\]\)"),
             (lambda m: m.update(grid=None), r"grid \(a list of integers once the store has shards\)"),
             (lambda m: m.update(n_features=0), r"n_features \(an integer >= 1 once the store has shards\)"),
             (lambda m: m.update(complete="no"), r"complete \(true or false\)"),
             (lambda m: m.update(layout=5), r"layout \(one of nchw"),
             (lambda m: m.update(batch_size=-3), r"batch_size \(an integer >= 1, or null\)"),
             (lambda m: m["key"].update(images_per_shard="6"), r"key\.images_per_shard \(an integer >= 1\)")]
    _each_edit_is_named(meta, cases, tmp_path)


# ---------------------------------------------------------------------------------------------
# A resume with other images


def folder_bytes(path) -> dict:
    """Every file of a store's folder (the sidecar and the lock too) with its bytes."""
    return {n: (Path(path) / n).read_bytes() for n in sorted(os.listdir(path))}


def as_source(kind: str, images):
    """``images`` as extract takes them: the tensor, a map-style dataset, a DataLoader (read in
    full, as an iterable, but of known length) or a list of batches."""
    from torch.utils.data import DataLoader, TensorDataset

    if kind == "tensor":
        return images
    if kind == "dataset":
        return TensorDataset(images)
    if kind == "loader":
        return DataLoader(TensorDataset(images), batch_size=5)
    return [(images[s:s + 4], torch.zeros(len(images[s:s + 4]))) for s in range(0, len(images), 4)]


def interrupt(setup, data, path, after: int = 2) -> None:
    """An extraction of ``data`` into ``path`` stopped once shard ``after`` was written."""

    class Interrupt(Exception):
        pass

    def stop(k, file):
        if k == after:
            raise Interrupt

    with pytest.raises(Interrupt):
        extract(setup["model"], LAYER, data, path, on_shard=stop, **setup["ARGS"])


def changed(images, *which):
    other = images.clone()
    other[list(which)] = -other[list(which)]
    return other


@pytest.mark.parametrize("kind, change, where", [
    ("tensor", "all", r"image 0 \(the first of shard 0, images 0\.\.5\)"),
    ("dataset", "all", r"image 0 \(the first of shard 0, images 0\.\.5\)"),
    ("batches", "all", r"image 0 \(the first of shard 0, images 0\.\.5\)"),
    ("tensor", 8, r"shard 1, images 6\.\.11 \(not its first image, 6\)"),
    ("batches", 8, r"shard 1, images 6\.\.11 \(not its first image, 6\)"),
    ("dataset", 12, r"image 12 \(the first of shard 2, images 12\.\.17\)")],  # (a dataset: first images only)
    ids=["tensor", "dataset", "batches", "tensor-one-image", "batches-one-image", "dataset-first-image"])
def test_a_resume_with_other_images_of_the_same_count_is_refused_and_changes_nothing(setup, reference, tmp_path,
                                                                                      kind, change, where):
    """The resume checked the number of images, not which: other images of the same count were
    captured into the missing shards beside the finished ones, silently mixing two image sets."""
    images = setup["images"]
    interrupt(setup, as_source(kind, images), tmp_path)  # shards 0..2 hold images 0..17
    before = folder_bytes(tmp_path)
    other = torch.randn(images.shape, generator=torch.Generator().manual_seed(2)) if change == "all" else \
        changed(images, change)
    counter = Counter(setup["model"])
    try:
        with pytest.raises(StoreImagesMismatch, match=rf"the images differ from those the activation store "
                                                      rf".* holds the activations of, first at {where}; pass the "
                                                      r"images it was extracted from.*overwrite=True") as info:
            extract(setup["model"], LAYER, as_source(kind, other), tmp_path, **setup["ARGS"])
    finally:
        counter.close()
    assert isinstance(info.value, StoreKeyMismatch) and "overwrite" not in info.value.reason
    assert counter.n == 0 and folder_bytes(tmp_path) == before  # refused before any work or write
    # The store still resumes with its own images, to the bytes of an uninterrupted extraction.
    store = extract(setup["model"], LAYER, as_source(kind, images), tmp_path, **setup["ARGS"])
    assert store.complete and shard_bytes(tmp_path) == shard_bytes(reference)


@pytest.mark.parametrize("kind", ["tensor", "dataset", "loader", "batches"])
def test_a_resume_with_the_same_images_records_the_same_fingerprints(setup, reference, tmp_path, kind):
    """Each shard records its images' fingerprint, the same whichever form fed them and whether
    the extraction was interrupted: the resumed sidecar's shard entries equal the reference's."""
    interrupt(setup, as_source(kind, setup["images"]), tmp_path)
    store = extract(setup["model"], LAYER, as_source(kind, setup["images"]), tmp_path, **setup["ARGS"])
    assert store.complete and shard_bytes(tmp_path) == shard_bytes(reference)
    shards = json.loads((tmp_path / "store.json").read_text())["shards"]
    assert shards == json.loads((Path(reference) / "store.json").read_text())["shards"]
    assert all(re.fullmatch(r"crc32:[0-9a-f]{8}", e["inputs"]["first"])
               and re.fullmatch(r"blake2b:[0-9a-f]{32}", e["inputs"]["all"]) for e in shards.values())
    assert len({e["inputs"]["all"] for e in shards.values()}) == 7


def test_a_store_without_image_fingerprints_still_resumes(setup, reference, tmp_path):
    """A store written before shards recorded their images' fingerprint resumes as before (its
    shards are not compared); the shards it gets then are, and guard it from then on."""
    images = setup["images"]
    interrupt(setup, images, tmp_path)
    meta = json.loads((tmp_path / "store.json").read_text())
    for entry in meta["shards"].values():
        del entry["inputs"]
    (tmp_path / "store.json").write_text(json.dumps(meta))
    store = extract(setup["model"], LAYER, images, tmp_path, **setup["ARGS"])
    assert store.complete and shard_bytes(tmp_path) == shard_bytes(reference)
    shards = json.loads((tmp_path / "store.json").read_text())["shards"]
    assert [k for k, e in sorted(shards.items()) if "inputs" in e] == ["3", "4", "5", "6"]
    before = folder_bytes(tmp_path)
    with pytest.raises(StoreImagesMismatch, match=r"first at image 18 \(the first of shard 3, images 18\.\.23\)"):
        extract(setup["model"], LAYER, changed(images, 0, 18), tmp_path, **setup["ARGS"])
    assert folder_bytes(tmp_path) == before


def test_other_images_and_overwrite(setup, reference, tmp_path):
    """overwrite=True replaces a store of other images (the CLI's --overwrite): from a tensor or
    dataset, compared before the store is kept; an iterable is compared as it is read, too late,
    and the error says to delete the store instead."""
    images, other = setup["images"], changed(setup["images"], 0)
    for kind in ("tensor", "loader"):
        path = tmp_path / kind
        interrupt(setup, images, path)
        if kind == "tensor":
            store = extract(setup["model"], LAYER, other, path, overwrite=True, **setup["ARGS"])
            np.testing.assert_array_equal(np.concatenate(list(store.chunks())),
                                          capture(setup["model"], LAYER, other, patches=True).astype(np.float16))
            assert store.complete and shard_bytes(path) != shard_bytes(reference)
        else:
            before = folder_bytes(path)
            with pytest.raises(StoreImagesMismatch, match=r"first at image 0 .*delete the store's files in .* to "
                                                          r"start again"):
                extract(setup["model"], LAYER, as_source(kind, other), path, overwrite=True, **setup["ARGS"])
            assert folder_bytes(path) == before


def test_an_iterable_resume_writes_no_shard_before_the_finished_ones_are_compared(setup, reference, tmp_path):
    """An iterable's finished shards are compared as their batches go past: a shard rebuilt before
    them (here shard 1, deleted) waits to be written until they all passed."""
    import shutil

    path = tmp_path / "store"
    shutil.copytree(reference, path)
    (path / "shard-00001.npy").unlink()
    before = {n: b for n, b in folder_bytes(path).items() if n != "store.json"}
    with pytest.raises(StoreImagesMismatch, match=r"first at image 30 \(the first of shard 5, images 30\.\.35\)"):
        extract(setup["model"], LAYER, as_source("loader", changed(setup["images"], 30)), path, **setup["ARGS"])
    assert {n: b for n, b in folder_bytes(path).items() if n != "store.json"} == before
    store = extract(setup["model"], LAYER, as_source("loader", setup["images"]), path, **setup["ARGS"])
    assert store.complete and shard_bytes(path) == shard_bytes(reference)
