"""A fit killed between passes (SIGKILL, in a subprocess) and called again resumes from its
checkpoint and ends with the same result as an uninterrupted fit."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edpairs as edp
from edpairs.checkpoint import Checkpoint, CheckpointMismatch
from _helpers import worker_env

WORKER = textwrap.dedent("""
    import os, signal, sys, numpy as np, edpairs as edp
    from edpairs.checkpoint import Checkpoint
    what, data, path, kill_at, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    X = np.load(data)
    saves = [0]
    def on_save(stage, meta):
        saves[0] += 1
        if saves[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    ckpt = Checkpoint(path, {}, on_save=on_save)
    chunks = [X[: len(X) // 2], X[len(X) // 2:]]
    if what == "kmeans":
        km = edp.SphericalKMeans(7, n_init=3, random_state=0, progress=False).fit(chunks, checkpoint=ckpt)
        np.savez(out, C=km.cluster_centers_, n_iter=km.n_iter_, counts=km.counts_, saves=saves[0])
    else:
        p = edp.EDPairs(5, n_init=2, random_state=0, progress=False).fit(chunks, checkpoint=ckpt)
        np.savez(out, W=p.decoding_, b=p.bias_, S=p.encoding_, saves=saves[0])
""")


def _run(tmp_path, what, X, ckpt, kill_at, out):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    data = tmp_path / "X.npy"
    np.save(data, X)
    env = worker_env(OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(script), what, str(data), str(ckpt), str(kill_at), str(out)],
                          env=env, capture_output=True, timeout=240)


def _rows():
    return edp.synthetic.make_layer(n_images=2500, n_features=16, n_concepts=5, grid=(2, 2), seed=1).X.astype(np.float32)


@pytest.mark.parametrize("kill_at", [2, 9])  # inside the first restart, and in a later one
def test_kmeans_killed_and_resumed_equals_uninterrupted(tmp_path, kill_at):
    X = _rows()
    full = _run(tmp_path, "kmeans", X, tmp_path / "a.ckpt", 0, tmp_path / "full.npz")
    assert full.returncode == 0, full.stderr.decode()[-2000:]
    killed = _run(tmp_path, "kmeans", X, tmp_path / "b.ckpt", kill_at, tmp_path / "never.npz")
    assert killed.returncode == -9 and (tmp_path / "b.ckpt").exists() and not (tmp_path / "never.npz").exists()
    resumed = _run(tmp_path, "kmeans", X, tmp_path / "b.ckpt", 0, tmp_path / "resumed.npz")
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    np.testing.assert_array_equal(a["C"], b["C"])
    assert int(a["n_iter"]) == int(b["n_iter"])
    np.testing.assert_array_equal(a["counts"], b["counts"])
    assert int(b["saves"]) < int(a["saves"])  # the resumed run did not start over
    assert not (tmp_path / "b.ckpt").exists()  # removed once the fit completed


def test_checkpoint_of_another_fit_is_refused(tmp_path):
    X = _rows()
    path = tmp_path / "k.ckpt"
    Checkpoint(path, {"fit": "something else"}).save("cluster", {}, {"C": np.zeros((2, 2))})
    with pytest.raises(CheckpointMismatch, match="another fit"):
        edp.SphericalKMeans(3, random_state=0).fit(X, checkpoint=path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="delete it"):
        edp.SphericalKMeans(3, random_state=0).fit(X, checkpoint=path)


def test_checkpointed_fit_equals_plain_fit(tmp_path):
    X = _rows()
    plain = edp.SphericalKMeans(4, n_init=2, random_state=3).fit(X)
    ck = edp.SphericalKMeans(4, n_init=2, random_state=3).fit(X, checkpoint=tmp_path / "c.ckpt")
    np.testing.assert_array_equal(plain.cluster_centers_, ck.cluster_centers_)
    np.testing.assert_array_equal(plain.labels_, ck.labels_)


def test_edpairs_killed_and_resumed_equals_uninterrupted(tmp_path):
    X = _rows()
    full = _run(tmp_path, "pairs", X, tmp_path / "a.ckpt", 0, tmp_path / "full.npz")
    assert full.returncode == 0, full.stderr.decode()[-2000:]
    for kill_at in (1, 4, int(np.load(tmp_path / "full.npz")["saves"])):  # after the moments, mid-clustering, clustered
        ckpt = tmp_path / f"k{kill_at}.ckpt"
        killed = _run(tmp_path, "pairs", X, ckpt, kill_at, tmp_path / "never.npz")
        assert killed.returncode == -9 and ckpt.exists()
        resumed = _run(tmp_path, "pairs", X, ckpt, 0, tmp_path / "resumed.npz")
        assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
        a, b = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
        for name in ("W", "b", "S"):
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"killed after save {kill_at}: {name}")
        assert not ckpt.exists()


def test_checkpoint_path_is_checked_before_the_fit(tmp_path):
    """A checkpoint in a missing folder failed only after the first pass over the data, naming
    write_atomic's temporary file (later: after the key's fingerprint had read a chunk); a
    checkpoint that is not a path got os.fspath's message. Now nothing is read first."""
    X = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    passes = [0]

    def chunks():
        passes[0] += 1
        return iter([X])

    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nowhere/k\.ckpt: its folder .*nowhere does not exist"):
        edp.SphericalKMeans(3, random_state=0).fit(chunks, checkpoint=tmp_path / "nowhere" / "k.ckpt")
    with pytest.raises(FileNotFoundError, match=r"checkpoint .*nowhere/p\.ckpt: its folder .*nowhere does not exist"):
        edp.EDPairs(2, random_state=0).fit(chunks, checkpoint=tmp_path / "nowhere" / "p.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint .* is a folder; name a file in it"):  # (it said: delete it)
        edp.SphericalKMeans(3, random_state=0).fit(chunks, checkpoint=tmp_path)
    assert passes[0] == 0
    with pytest.raises(TypeError, match="checkpoint must be a file path .* got int"):
        edp.EDPairs(2, random_state=0).fit(X, checkpoint=5)


def test_data_that_differs_only_after_its_first_rows_is_not_resumed(tmp_path):
    """The data's fingerprint covered its shape and first 256 rows only: a fit resumed on data of
    the same shape and first rows took the other data's saved statistics without a word. Data
    in memory (an array, a list of chunks) is now also fingerprinted on rows spread over all of
    it."""
    from edpairs._source import ChunkSource
    from edpairs.checkpoint import data_fingerprint

    X = _rows()
    Y = X.copy()
    Y[-1] += 1.0
    for make in (lambda a: a, lambda a: [a[:1000], a[1000:]]):
        assert data_fingerprint(ChunkSource(make(X))) == data_fingerprint(ChunkSource(make(X.copy())))
        assert data_fingerprint(ChunkSource(make(X))) != data_fingerprint(ChunkSource(make(Y)))

    class Stop(Exception):
        pass

    def stop(stage, meta):
        raise Stop

    path = tmp_path / "p.ckpt"
    with pytest.raises(Stop):
        edp.EDPairs(5, random_state=0, progress=False).fit(X, checkpoint=Checkpoint(path, {}, on_save=stop))
    assert path.exists()
    with pytest.raises(CheckpointMismatch, match="another fit"):
        edp.EDPairs(5, random_state=0, progress=False).fit(Y, checkpoint=path)


def test_resume_on_data_changed_only_in_unsampled_rows_is_refused(tmp_path):
    """The fingerprint of data in memory covered its first rows and 256 rows spread over it: a
    fit stopped after its moments resumed on data changed in two other rows and used the old
    moments without a word. Host data is now checksummed whole (an array, a list of chunks, a
    CPU torch tensor: the same bytes give the same fingerprint however they are chunked)."""
    import torch

    from edpairs._source import ChunkSource
    from edpairs.checkpoint import data_fingerprint

    X = np.random.default_rng(0).standard_normal((3000, 8)).astype(np.float32)
    sampled = np.unique(np.linspace(0, 2999, 256).astype(np.int64))
    assert not np.isin([1001, 1002], sampled).any()
    Y = X.copy()
    Y[1001:1003] += 100.0
    same = data_fingerprint(ChunkSource(X))
    for other in ([X[:1000], X[1000:]], torch.from_numpy(X.copy()), np.asfortranarray(X)):
        assert data_fingerprint(ChunkSource(other)) == same
    for changed in (Y, [Y[:1000], Y[1000:]], torch.from_numpy(Y)):
        assert data_fingerprint(ChunkSource(changed)) != same

    class Stop(Exception):
        pass

    def stop(stage, meta):
        raise Stop(stage)

    path = tmp_path / "p.ckpt"
    with pytest.raises(Stop, match="moments"):
        edp.EDPairs(3, random_state=0, progress=False).fit(X, checkpoint=Checkpoint(path, {}, on_save=stop))
    with pytest.raises(CheckpointMismatch, match=r"another fit \(differs in: data\)"):
        edp.EDPairs(3, random_state=0, progress=False).fit(Y, checkpoint=path)
    resumed = edp.EDPairs(3, random_state=0, progress=False).fit([X[:1000], X[1000:]], checkpoint=path)
    np.testing.assert_array_equal(resumed.mean_, edp.EDPairs(3, random_state=0, progress=False).fit(X).mean_)


def test_malformed_checkpoints_are_refused_naming_the_problem(tmp_path):
    """A header without "key" raised KeyError, "version": "x" int()'s ValueError, a header that is
    a JSON list or a "key" that is a string AttributeError; a file that is no archive gave
    numpy's advice to load it with allow_pickle. All are a CheckpointMismatch naming the file."""
    import json

    X = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    path = tmp_path / "c.ckpt"

    def craft(header, **arrays):
        if header is not None:
            arrays["__meta__"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez(f, **arrays)

    good = {"format": "edpairs-checkpoint", "version": 1, "key": {}, "stage": "s", "meta": {}}
    for header, why in [({k: v for k, v in good.items() if k != "key"}, r"its header lacks the field\(s\) key"),
                        (dict(good, version="x"), "its header has version 'x', expected an integer"),
                        ([1, 2], "its header is a JSON list, expected an object"),
                        (dict(good, key="s"), "its header has key of type str, expected an object"),
                        (dict(good, meta=[1]), "its header has meta of type list, expected an object"),
                        (None, r"it is an \.npz archive without the edpairs header __meta__")]:
        craft(header, a=np.zeros(2))
        with pytest.raises(CheckpointMismatch, match=f"{re.escape(str(path))} is not a readable edpairs checkpoint "
                                                     f"\\({why}\\); delete it"):
            edp.SphericalKMeans(3, random_state=0).fit(X, checkpoint=path)
    craft(dict(good, version=2))
    with pytest.raises(CheckpointMismatch, match="checkpoint of version 2; this edpairs reads version 1"):
        edp.SphericalKMeans(3, random_state=0).fit(X, checkpoint=path)
    path.write_bytes(b"garbage, not an archive")
    with pytest.raises(CheckpointMismatch, match=r"its header is unreadable: not a NumPy \.npz archive") as info:
        edp.SphericalKMeans(3, random_state=0).fit(X, checkpoint=path)
    assert "pickle" not in str(info.value)
