"""edpairs.synthetic: layers drawn from x = S alpha + D beta + mu carry exactly the ground
truth they claim (ideal filters, memberships, classes, a working head), reproducibly."""

from __future__ import annotations


import numpy as np
import pytest

from edpairs import synthetic
from edpairs.synthetic import LinearHead, SyntheticLayer


@pytest.fixture(scope="module")
def pub() -> SyntheticLayer:
    return synthetic.published(seed=7)


@pytest.fixture(scope="module")
def pub64() -> SyntheticLayer:
    return synthetic.published(4000, seed=3, dtype=np.float64, train_head=False)


def test_shapes_and_dtypes(pub):
    n_img, (h, w) = 20000, pub.grid
    N = n_img * h * w
    assert pub.grid == (1, 2) and pub.n_images == n_img
    assert pub.X.shape == (N, 16) and pub.X.dtype == np.float32
    assert pub.S.shape == (3, 16) and pub.S.dtype == np.float64
    assert pub.distractors.shape == (2, 16)
    assert pub.offset.shape == (16,) and np.all(pub.offset == 10.0)
    assert pub.W.shape == (3, 16) and pub.b.shape == (3,)
    assert pub.membership.shape == (N, 3) and pub.membership.dtype == bool
    assert pub.alpha.shape == (N, 3) and pub.alpha.dtype == np.float64
    assert pub.beta.shape == (N, 2)
    assert pub.image.shape == (N,) and pub.image.dtype == np.int64
    assert pub.position.shape == (N, 2) and pub.position.dtype == np.int64
    assert pub.y.shape == (n_img,) and pub.y.dtype == np.int64
    assert pub.classes == [(0, 1), (0, 2), (1, 2)]
    np.testing.assert_allclose(np.linalg.norm(pub.S, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(pub.distractors, axis=1), 1.0, atol=1e-12)
    # Image-major, row-major layout, and images() is a view of X.
    imgs = pub.images()
    assert imgs.shape == (n_img, 1, 2, 16) and np.shares_memory(imgs, pub.X)
    np.testing.assert_array_equal(pub.image, np.repeat(np.arange(n_img), 2))
    np.testing.assert_array_equal(pub.position[:4], [[0, 0], [0, 1], [0, 0], [0, 1]])
    g = synthetic.make_layer(3, grid=(2, 3), train_head=False, seed=0)
    np.testing.assert_array_equal(g.position[:6], [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    np.testing.assert_array_equal(g.images()[1, 1, 2], g.X[6 + 5])


def test_ideal_filters_are_exact_inverses(pub):
    K = np.vstack([pub.S, pub.distractors])
    np.testing.assert_allclose(pub.W @ pub.S.T, np.eye(3), atol=1e-10)
    np.testing.assert_allclose(pub.W @ pub.distractors.T, 0.0, atol=1e-10)
    # Minimum norm: rows lie in the span of [S; distractors].
    coef, *_ = np.linalg.lstsq(K.T, pub.W.T, rcond=None)
    np.testing.assert_allclose(K.T @ coef, pub.W.T, atol=1e-10)
    np.testing.assert_allclose(pub.b, pub.W @ pub.offset + 2.5, atol=1e-12)
    assert pub.boundary == 2.5
    # Filters differ from patterns: directions are not orthogonal.
    assert np.min(np.abs(np.sum(pub.W / np.linalg.norm(pub.W, axis=1, keepdims=True) * pub.S, axis=1))) < 0.999


def test_pairwise_cosines_bounded_and_reach_the_bound():
    layer = synthetic.make_layer(2, n_features=320, n_concepts=150, n_distractors=150,
                                 max_cosine=0.3, train_head=False, seed=1)
    K = np.vstack([layer.S, layer.distractors])
    C = K @ K.T
    off = C[~np.eye(300, dtype=bool)]
    assert off.max() <= 0.3 + 1e-12
    assert off.max() >= 0.29  # 300 draws of c_k ~ U(0, 0.3): the two largest are close to 0.3
    np.testing.assert_allclose(layer.W @ layer.S.T, np.eye(150), atol=1e-10)
    np.testing.assert_allclose(layer.W @ layer.distractors.T, 0.0, atol=1e-10)
    # max_cosine=0 gives orthonormal directions, hence W == S.
    orth = synthetic.make_layer(5, n_features=8, n_concepts=3, n_distractors=2,
                                max_cosine=0.0, train_head=False, seed=2)
    K = np.vstack([orth.S, orth.distractors])
    np.testing.assert_allclose(K @ K.T, np.eye(5), atol=1e-12)
    np.testing.assert_allclose(orth.W, orth.S, atol=1e-12)


def test_overcomplete_directions_are_unit():
    layer = synthetic.make_layer(20, n_features=8, n_concepts=6, n_distractors=6,
                                 train_head=False, seed=3)
    np.testing.assert_allclose(np.linalg.norm(layer.S, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(layer.distractors, axis=1), 1.0)
    assert layer.X.shape == (40, 8)


def test_exclusive_membership_and_alpha_ranges(pub):
    assert np.all(pub.membership.sum(axis=1) == 1)
    a, m = pub.alpha, pub.membership
    assert np.all((a[m] >= 2.5) & (a[m] <= 5.0))
    assert np.all((a[~m] >= 0.0) & (a[~m] <= 2.5))
    assert np.all((pub.beta >= 0.0) & (pub.beta <= 5.0))
    # Both ranges are filled, not collapsed onto a point.
    assert a[m].min() < 2.6 and a[m].max() > 4.9 and a[~m].min() < 0.1 and a[~m].max() > 2.4
    assert pub.beta.min() < 0.1 and pub.beta.max() > 4.9


def test_features_follow_the_model_exactly(pub):
    ref = pub.alpha @ pub.S + pub.beta @ pub.distractors + pub.offset
    # float32 X is the float64 model rounded once (<= half an ulp, plus float64 noise).
    np.testing.assert_allclose(pub.X, ref, rtol=1e-7, atol=0)
    noisy = synthetic.published(3000, noise=0.1, train_head=False, seed=4)
    resid = noisy.X - (noisy.alpha @ noisy.S + noisy.beta @ noisy.distractors + noisy.offset)
    assert abs(resid.std() - 0.1) < 0.003 and abs(resid.mean()) < 0.003


def test_ideal_filters_separate_membership(pub, pub64):
    det = pub64.X @ pub64.W.T - pub64.b > 0
    np.testing.assert_array_equal(det, pub64.membership)
    np.testing.assert_allclose(pub64.X @ pub64.W.T - pub64.b, pub64.alpha - 2.5, atol=1e-9)
    # float32 storage can move a value lying within ~1e-5 of the boundary to the other side.
    det32 = pub.X.astype(np.float64) @ pub.W.T - pub.b > 0
    assert (det32 == pub.membership).mean() > 0.9999


def test_every_image_holds_its_class_concepts(pub):
    per_image = pub.membership.reshape(pub.n_images, -1, 3).any(axis=1)
    for c, concepts in enumerate(pub.classes):
        sel = pub.y == c
        assert sel.sum() > 6000  # classes drawn uniformly
        assert np.all(per_image[sel][:, list(concepts)])
        others = [i for i in range(3) if i not in concepts]
        assert not per_image[sel][:, others].any()
    # Larger grids: every class concept appears; remaining patches stay inside the class.
    g = synthetic.make_layer(500, n_concepts=6, grid=(2, 3), classes=[(0, 1, 2), (3,), (1, 4, 5, 2)],
                             train_head=False, seed=5)
    pi = g.membership.reshape(500, 6, 6)
    for c, concepts in enumerate(g.classes):
        sel = g.y == c
        present = pi[sel].any(axis=1)
        assert np.all(present[:, list(concepts)])
        assert not present[:, [i for i in range(6) if i not in concepts]].any()
    # Positions of the guaranteed concepts are random, not always the first patches.
    first = pi[g.y == 0][:, 0].argmax(axis=1)
    assert len(np.unique(first)) == 3
    # A class with more concepts than patches fills each patch with a distinct one.
    small = synthetic.make_layer(200, n_concepts=5, grid=(1, 3), classes=[(0, 1, 2, 3, 4)],
                                 train_head=False, seed=6)
    assert np.all(small.membership.reshape(200, 3, 5).sum(axis=1).max(axis=1) == 1)


def test_sparse_membership():
    g = synthetic.make_layer(4000, n_concepts=5, grid=(2, 2), membership="sparse", p_present=0.1,
                             classes=[(0, 1), (2,), (3, 4)], train_head=False, seed=8)
    per_image = g.membership.reshape(4000, 4, 5).any(axis=1)
    for c, concepts in enumerate(g.classes):
        assert np.all(per_image[g.y == c][:, list(concepts)])
    # Concepts outside the class keep the independent rate (1 - 0.9^4 per image).
    outside = per_image[g.y == 1][:, [0, 1, 3, 4]].mean()
    assert abs(outside - (1 - 0.9 ** 4)) < 0.03
    assert g.membership.sum(axis=1).max() >= 2 and g.membership.sum(axis=1).min() == 0
    m = g.membership
    assert np.all(g.alpha[m] >= 2.5) and np.all(g.alpha[~m] <= 2.5)


def test_default_classes():
    assert synthetic.make_layer(4, n_concepts=4, train_head=False, seed=0).classes == \
        [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert synthetic.make_layer(4, n_concepts=5, train_head=False, seed=0).classes == [(i,) for i in range(5)]
    assert synthetic.make_layer(4, n_concepts=1, n_distractors=0, train_head=False, seed=0).classes == [(0,)]


def test_head_on_published(pub):
    head = pub.head
    assert isinstance(head, LinearHead)
    assert head.weight.shape == (3, 16) and head.bias.shape == (3,)
    assert head.accuracy_ >= 0.9
    logits = head(pub.images())
    assert logits.shape == (pub.n_images, 3)
    assert np.mean(logits.argmax(axis=1) == pub.y) == pytest.approx(head.accuracy_)
    # (n, h*w, D) layout gives the same logits; the head applies to raw (unstandardised) features.
    np.testing.assert_allclose(head(pub.X.reshape(pub.n_images, 2, 16)), logits)
    pooled = pub.X.reshape(pub.n_images, 2, 16).mean(axis=1, dtype=np.float64)
    np.testing.assert_allclose(logits, pooled @ head.weight.T + head.bias)
    with pytest.raises(ValueError, match="features"):
        head(pub.X)
    # As good as the ideal rule: the class is the pair lacking the concept read lowest by W*.
    reading = pooled @ pub.W.T - pub.W @ pub.offset
    lacking = {2: 0, 1: 1, 0: 2}
    ideal = np.array([lacking[i] for i in reading.argmin(axis=1)])
    assert head.accuracy_ >= np.mean(ideal == pub.y) - 0.01


def test_head_numpy_and_torch_agree(pub):
    torch = pytest.importorskip("torch")
    x = pub.images()[:256]
    ref = pub.head(x)
    t64 = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    out = pub.head(t64)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-10, atol=1e-10)
    out32 = pub.head(torch.from_numpy(x).reshape(256, 2, 16))
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ref, rtol=1e-4, atol=1e-4)
    # Differentiable: d(sum of logit k)/dx_p = weight[k] / (h*w) for every patch.
    out[:, 1].sum().backward()
    np.testing.assert_allclose(t64.grad.numpy(), np.broadcast_to(pub.head.weight[1] / 2, t64.shape))


def test_reproducible():
    a = synthetic.published(500, seed=11)
    b = synthetic.published(500, seed=11)
    c = synthetic.published(500, seed=12)
    for name in ("X", "S", "distractors", "W", "b", "membership", "alpha", "beta", "y"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.head.weight, b.head.weight)
    assert not np.array_equal(a.X, c.X) and not np.allclose(a.S, c.S)
    assert not np.array_equal(a.y, c.y)


def test_large_preset():
    g = synthetic.large(seed=0)
    assert g.X.shape == (200_000, 256) and g.X.dtype == np.float32
    assert g.S.shape == (32, 256) and g.distractors.shape == (64, 256) and g.grid == (4, 4)
    assert g.n_images == 12_500 and g.classes == [(i,) for i in range(32)]
    assert np.all(g.membership.sum(axis=1) == 1)
    K = np.vstack([g.S, g.distractors])
    assert (K @ K.T - np.eye(96)).max() <= 0.5 + 1e-12
    np.testing.assert_allclose(g.W @ g.S.T, np.eye(32), atol=1e-10)
    rows = np.arange(0, 200_000, 997)
    ref = g.alpha[rows] @ g.S + g.beta[rows] @ g.distractors + g.offset
    np.testing.assert_allclose(g.X[rows], ref, rtol=1e-7, atol=0)
    assert g.head.accuracy_ >= 0.99


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(n_images=0), "n_images"),
        (dict(n_features=-1), "n_features"),
        (dict(n_concepts=0), "n_concepts"),
        (dict(n_distractors=-2), "n_distractors"),
        (dict(grid=(0, 2)), "grid"),
        (dict(grid=(2,)), "grid"),
        (dict(present=(5.0, 2.5)), "present"),
        (dict(absent=(1.0, 0.0)), "absent"),
        (dict(distractor_range=(3.0, 1.0)), "distractor_range"),
        (dict(max_cosine=1.0), "max_cosine"),
        (dict(max_cosine=-0.1), "max_cosine"),
        (dict(membership="dense"), "membership"),
        (dict(p_present=1.5), "p_present"),
        (dict(noise=-1.0), "noise"),
        (dict(classes=[(0, 3)]), "classes"),
        (dict(classes=[(0, -1)]), "classes"),
        (dict(classes=[(0, 0)]), "classes"),
        (dict(classes=[()]), "classes"),
        (dict(classes=[]), "classes"),
        (dict(offset=np.ones(3)), "offset"),
        (dict(dtype=np.int32), "dtype"),
        # Strings, floats and out-of-range values are refused, not converted or truncated.
        (dict(grid="12"), "grid"),
        (dict(grid=(1.9, 2.9)), "grid"),
        (dict(grid=(1, 2, 3)), "grid"),
        (dict(max_cosine="a"), "max_cosine"),
        (dict(max_cosine=np.nan), "max_cosine"),
        (dict(p_present="a"), "p_present"),
        (dict(noise="a"), "noise"),
        (dict(noise=np.inf), "noise"),
        (dict(offset="a"), "offset"),
        (dict(offset=1e300), r"offset.*float32"),
        (dict(offset=1e6, dtype=np.float16), r"offset.*float16"),
        (dict(seed=-1), "seed"),
        (dict(seed="a"), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(classes="ab"), "classes"),
        (dict(classes=[0, 1]), "classes"),
        (dict(classes=[(0.5, 1)]), "classes"),
        # Features beyond the dtype's range (here |x| >= 7e4 > 65504) are refused, not stored as inf.
        (dict(n_features=1, n_concepts=1, n_distractors=0, present=(7e4, 8e4), absent=(7e4, 8e4),
              dtype=np.float16), r"overflow.*float16"),
    ],
)
def test_bad_arguments(kwargs, name):
    args = dict(n_images=10, train_head=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        synthetic.make_layer(**args)


def test_integer_arguments_of_numpy_types_are_accepted():
    layer = synthetic.make_layer(4, grid=np.array([2, 3]), classes=np.array([[0, 1], [1, 2]]),
                                 seed=np.int64(5), train_head=False)
    assert layer.grid == (2, 3) and layer.classes == [(0, 1), (1, 2)]
    assert all(type(g) is int for g in layer.grid)
    np.testing.assert_array_equal(layer.X, synthetic.make_layer(4, grid=(2, 3), classes=[(0, 1), (1, 2)], seed=5,
                                                                train_head=False).X)


def test_fit_head_bad_arguments():
    rng = np.random.default_rng(0)
    pooled, y = rng.random((12, 3)), np.arange(12) % 2
    assert synthetic.fit_head(pooled, y.astype(np.uint8), 2).accuracy_ == synthetic.fit_head(pooled, y, 2).accuracy_
    for kwargs, name in [(dict(y=y + 0.5), "y must hold integer"), (dict(y=y.astype(float)), "y must hold integer"),
                         (dict(y=y[:5]), "y"), (dict(y=y + 1), "y"),
                         (dict(n_classes=0), "n_classes"), (dict(n_classes=2.0), "n_classes"),
                         (dict(l2=-1.0), "l2"), (dict(l2=np.nan), "l2"), (dict(l2="0.1"), "l2"),
                         (dict(maxiter=0), "maxiter"), (dict(maxiter=10.5), "maxiter")]:
        args = dict(pooled=pooled, y=y, n_classes=2)
        args.update(kwargs)
        with pytest.raises(ValueError, match=name):
            synthetic.fit_head(args.pop("pooled"), args.pop("y"), args.pop("n_classes"), **args)


def test_linear_head_bad_arguments():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="weight must be finite"):
        LinearHead(np.full((2, 3), np.nan), np.zeros(2))
    with pytest.raises(ValueError, match="bias must be finite"):
        LinearHead(np.ones((2, 3)), np.array([0.0, np.inf]))
    head = LinearHead(np.arange(6.0).reshape(2, 3), np.zeros(2))
    x = np.ones((4, 2, 2, 3))
    with pytest.raises(ValueError, match="at least one patch"):
        head(x[:, :0])
    with pytest.raises(ValueError, match="at least one patch"):
        head(torch.from_numpy(x[:, :, :0]))
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        head(x.tolist())
    with pytest.raises(ValueError, match="floating torch tensor"):
        head(torch.ones((4, 2, 2, 3), dtype=torch.int32))
    with pytest.raises(ValueError, match="real numbers"):
        head(x.astype(complex))
    assert head(x[:0]).shape == (0, 2) and head(torch.from_numpy(x[:0])).shape == (0, 2)
    np.testing.assert_allclose(head(x.astype(np.int64)), head(x))  # numpy integers are read in float64


# ---- PresenceHead ------------------------------------------------------------------------


def test_presence_head_reads_concepts_through_the_ideal_filters(pub64):
    head = synthetic.PresenceHead.from_layer(pub64, width=0.5)
    # Default weight: +4 where the class holds the concept, -4 elsewhere (classes (0,1), (0,2), (1,2)).
    np.testing.assert_array_equal(head.weight, 4.0 * np.array([[1, 1, -1], [1, -1, 1], [-1, 1, 1]]))
    assert head.accuracy_ >= 0.99 and np.mean(head.predict(pub64.images()) == pub64.y) == head.accuracy_
    # By hand: ramp of alpha - boundary, pooled over the 2 patches.
    x = pub64.images()[:300]
    alpha = pub64.alpha.reshape(pub64.n_images, 2, 3)[:300]
    g = np.clip((alpha - pub64.boundary) / 0.5 + 0.5, 0, 1).mean(1)
    np.testing.assert_allclose(head.presence(x), g, atol=1e-9)
    np.testing.assert_allclose(head(x), g @ head.weight.T, atol=1e-8)
    np.testing.assert_allclose(head(x.reshape(300, 2, 16)), head(x))
    sig = synthetic.PresenceHead.from_layer(pub64, width=0.5, detector="sigmoid")
    np.testing.assert_allclose(sig.presence(x), (1 / (1 + np.exp(-8 * (alpha - pub64.boundary)))).mean(1), atol=1e-9)
    # A direction the filters do not read changes nothing; the flat parts of the ramp ignore small moves.
    _, _, vt = np.linalg.svd(pub64.W)
    np.testing.assert_allclose(head(x + 3.0 * vt[-1]), head(x), atol=1e-9)


@pytest.mark.parametrize("detector", ["ramp", "sigmoid"])
def test_presence_head_relations_are_what_a_step_does(pub64, detector):
    """relations(): moving every position along s_i raises class k's log-probability on every image
    that moves when weight[k, i] is the column's largest entry, lowers it when the smallest; an
    entry in between has no relation (0) and goes either way; a constant column moves nothing."""
    weight = np.array([[4.0, 4.0, -4.0], [1.0, -4.0, 4.0], [-4.0, 2.0, 4.0]])
    head = synthetic.PresenceHead(pub64.W, pub64.b, weight, width=0.5, detector=detector)
    rel = head.relations()
    np.testing.assert_array_equal(rel, np.array([[1, 0, -1], [1, -1, 0], [-1, 1, 1]]))
    x = pub64.images()[:2000]

    def log_softmax(z):
        top = z.max(1, keepdims=True)
        return z - top - np.log(np.exp(z - top).sum(1, keepdims=True))

    base = log_softmax(head(x))
    for i in range(3):
        moved = np.sign(log_softmax(head(x + 5.0 * pub64.S[i])) - base)       # (n, K)
        for k in range(3):
            if rel[i, k]:
                assert np.all(moved[:, k] * rel[i, k] >= 0) and np.mean(moved[:, k] != 0) > 0.99
            else:
                assert (moved[:, k] > 0).mean() > 0.1 and (moved[:, k] < 0).mean() > 0.1
    flat = synthetic.PresenceHead(pub64.W, pub64.b, np.array([[1.0, 2.0], [1.0, -1.0]]) @ np.eye(2, 3),
                                  width=0.5, detector=detector)
    np.testing.assert_array_equal(flat.relations(), [[0, 0], [1, -1], [0, 0]])  # weight columns 0, 2 constant
    np.testing.assert_allclose(log_softmax(flat(x + 5.0 * pub64.S[0] + 5.0 * pub64.S[2])), log_softmax(flat(x)),
                               atol=1e-12)


def test_presence_head_numpy_and_torch_agree(pub64):
    torch = pytest.importorskip("torch")
    head = synthetic.PresenceHead.from_layer(pub64, width=0.5, detector="sigmoid")
    x = pub64.images()[:256]
    t = torch.from_numpy(np.ascontiguousarray(x)).requires_grad_(True)
    out = head(t)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.detach().numpy(), head(x), rtol=1e-10, atol=1e-10)
    out[:, 0].sum().backward()
    assert t.grad is not None and torch.isfinite(t.grad).all()
    ramp = synthetic.PresenceHead.from_layer(pub64, width=0.5)
    out32 = ramp(torch.from_numpy(x.astype(np.float32)).reshape(256, 2, 16))
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), ramp(x), atol=1e-4)


def test_presence_head_bad_arguments(pub64):
    W, b = pub64.W, pub64.b
    with pytest.raises(ValueError, match="weight"):
        synthetic.PresenceHead(W, b, np.ones((3, 2)))
    with pytest.raises(ValueError, match="thresholds"):
        synthetic.PresenceHead(W, b[:2], np.ones((3, 3)))
    with pytest.raises(ValueError, match="bias"):
        synthetic.PresenceHead(W, b, np.ones((3, 3)), bias=np.ones(2))
    with pytest.raises(ValueError, match="width"):
        synthetic.PresenceHead(W, b, np.ones((3, 3)), width=0.0)
    with pytest.raises(ValueError, match="detector"):
        synthetic.PresenceHead(W, b, np.ones((3, 3)), detector="step")
    with pytest.raises(ValueError, match="features"):
        synthetic.PresenceHead(W, b, np.ones((3, 3)))(pub64.X[:10])
    bad = np.ones((3, 3))
    bad[1, 2] = np.nan
    for kwargs, name in [(dict(weight=bad), "weight"), (dict(filters=W * np.inf), "filters"),
                         (dict(thresholds=b * np.nan), "thresholds"), (dict(bias=np.array([0.0, np.nan, 0.0])), "bias")]:
        args = dict(filters=W, thresholds=b, weight=np.ones((3, 3)))
        args.update(kwargs)
        with pytest.raises(ValueError, match=f"{name} must be finite"):
            synthetic.PresenceHead(**args)
    with pytest.raises(ValueError, match="width"):
        synthetic.PresenceHead(W, b, np.ones((3, 3)), width="1")
    with pytest.raises(ValueError, match="scale"):
        synthetic.PresenceHead.from_layer(pub64, scale=np.nan)
    with pytest.raises(ValueError, match="scale"):
        synthetic.PresenceHead.from_layer(pub64, scale="4")
    with pytest.raises(ValueError, match="weight must be finite"):
        synthetic.PresenceHead.from_layer(pub64, weight=bad)
    head = synthetic.PresenceHead(W, b, np.ones((3, 3)))
    with pytest.raises(ValueError, match="at least one patch"):
        head(pub64.images()[:5, :, :0])
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        head.presence(pub64.images()[:2].tolist())
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="floating torch tensor"):  # would have read int-truncated filters
        head(torch.ones((2, 1, 2, 16), dtype=torch.int64))
