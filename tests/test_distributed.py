"""Fits over two processes (torch.distributed, gloo on CPU, spawned here) equal the fit of one
process on the union of the ranks' rows."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import edpairs as edp
from _helpers import worker_env

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

WORKER = textwrap.dedent("""
    import sys, numpy as np, torch.distributed as dist
    import edpairs as edp
    rank, world, rdv, out, what = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method="file://" + rdv, rank=rank, world_size=world)
    X = np.load(sys.argv[6])
    mine = np.array_split(X, world)[rank]
    chunks = [mine[: len(mine) // 3], mine[len(mine) // 3:]]  # ranks stream chunks too
    if what in ("kmeans", "kmeans-empty"):
        # kmeans-empty: two equal initial centroids leave a cluster empty, re-seeded from every
        # rank's worst-fit rows
        init = np.stack([X[0], X[0], X[1], X[2], X[3], X[4]]) if what == "kmeans-empty" else "k-means++"
        km = edp.SphericalKMeans(6, init=init, random_state=0, n_init=2 if what == "kmeans" else 1,
                                 progress=False).fit(chunks, process_group=True)
        np.savez(out, C=km.cluster_centers_, n_iter=km.n_iter_, counts=km.counts_)
    else:
        p = edp.EDPairs(4, method=what, random_state=0, progress=False).fit(chunks, process_group=True)
        np.savez(out, W=p.decoding_, b=p.bias_, S=p.encoding_, mean=p.mean_, n=p.n_samples_, pos=p.n_positives_)
    dist.destroy_process_group()
""")


def _run_ranks(tmp_path, what: str, X: np.ndarray, world: int = 2) -> list:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    data = tmp_path / "X.npy"
    np.save(data, X)
    env = worker_env(OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(world), str(tmp_path / "rdv"),
                               str(tmp_path / f"out{r}.npz"), what, str(data)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    deadline = time.monotonic() + 240
    # Wait for every rank, but stop at the first failure: the others would wait at the
    # rendezvous for it until the timeout.
    while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    outputs = [p.communicate()[0].decode(errors="replace") for p in procs]
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, (f"rank {r} (exit {p.returncode}; killed when it outlived a failed rank "
                                   f"or 240 s):\n{out[-3000:]}")
    return [dict(np.load(tmp_path / f"out{r}.npz")) for r in range(world)]


def _layer_rows():
    layer = edp.synthetic.make_layer(n_images=2500, n_features=16, n_concepts=4, n_distractors=2, grid=(2, 2),
                                     seed=0)
    return layer.X.astype(np.float32)


def test_spherical_kmeans_two_processes_equal_one(tmp_path):
    X = _layer_rows()
    one = edp.SphericalKMeans(6, random_state=0, n_init=2, progress=False).fit(X)
    for r, res in enumerate(_run_ranks(tmp_path, "kmeans", X)):
        np.testing.assert_allclose(res["C"], one.cluster_centers_, atol=1e-5, err_msg=f"rank {r}")
        assert int(res["n_iter"]) == one.n_iter_
        np.testing.assert_array_equal(res["counts"], one.counts_)


def test_two_processes_reseed_an_empty_cluster_as_one(tmp_path):
    X = _layer_rows()
    C0 = np.stack([X[0], X[0], X[1], X[2], X[3], X[4]])
    one = edp.SphericalKMeans(6, init=C0, progress=False).fit(X)
    assert one.counts_[1] > 0  # (the duplicate's cluster, empty in the first pass, was re-seeded)
    for r, res in enumerate(_run_ranks(tmp_path, "kmeans-empty", X)):
        np.testing.assert_allclose(res["C"], one.cluster_centers_, atol=1e-5, err_msg=f"rank {r}")
        assert int(res["n_iter"]) == one.n_iter_
        np.testing.assert_array_equal(res["counts"], one.counts_)


def test_process_group_without_init_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        edp.SphericalKMeans(2).fit(np.random.default_rng(0).standard_normal((10, 3)), process_group=True)


@pytest.mark.parametrize("method", ["centroid", "discriminant"])
def test_edpairs_two_processes_equal_one(tmp_path, method):
    X = _layer_rows()
    one = edp.EDPairs(4, method=method, random_state=0, progress=False).fit(X)
    for r, res in enumerate(_run_ranks(tmp_path, method, X)):
        for name, ref in (("W", one.decoding_), ("b", one.bias_), ("S", one.encoding_), ("mean", one.mean_)):
            np.testing.assert_allclose(res[name], ref, atol=1e-5, rtol=1e-5, err_msg=f"rank {r}: {name}")
        assert int(res["n"]) == one.n_samples_
        np.testing.assert_array_equal(res["pos"], one.n_positives_)


def test_edpairs_process_group_with_head_is_refused():
    X = _layer_rows()
    with pytest.raises(NotImplementedError, match="process_group"):
        edp.EDPairs(2).fit(X.reshape(-1, 4, 16), head=lambda f: f.mean(1), process_group=True)
