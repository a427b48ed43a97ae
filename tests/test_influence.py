"""Global influence (edpairs.influence) on synthetic layers whose head is known (issue 5, item 4).

The true class-concept relation of a linear head with class weights w_k: adding ``s_i`` at every
position moves the logits by ``Delta_k = w_k . s_i`` (times the step), the same for every image.
The log-probability of class k then rises on *every* image when ``Delta_k`` is the largest of all
classes and falls on every image when it is the smallest (between the two its sign depends on the
image's competing classes). So the relation is +1 / -1 for those cells (``unambiguous``), and the
centred effect ``(w_k - mean_j w_j) . s_i`` gives the sign elsewhere (the direction in which the
head moves class k against the average class). A significant influence must have that sign.

The linear head is the negative control (its noise scores spread over [-1, 1], nothing comes out
significant). The positive test uses :class:`edpairs.synthetic.PresenceHead` (concepts read through
ramp detectors on the ideal filters; its relations() derive the truth) on a layer with a margin."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import importlib
import os

import edpairs as edp
from edpairs.influence import influence, plot_influence

# The module itself (edpairs.influence may be re-exported as the function at the top level).
inf_mod = importlib.import_module("edpairs.influence")


def truth(head, S):
    """(I, K): +1 / -1 where the concept's logit effect on class k is the largest / smallest of
    all classes, 0 elsewhere; and the sign of the centred effect."""
    effect = S @ head.weight.T                                       # (I, K)
    unamb = np.zeros_like(effect)
    unamb[np.arange(len(S)), effect.argmax(1)] = 1
    unamb[np.arange(len(S)), effect.argmin(1)] = -1
    centred = np.sign(effect - effect.mean(1, keepdims=True))
    return unamb, centred


def gt_pairs(layer):
    return SimpleNamespace(decoding_=layer.W, encoding_=layer.S, bias_=layer.b, mean_=layer.offset)


@pytest.fixture(scope="module")
def layer():
    return edp.synthetic.published(2000, seed=0)


def test_scores_are_the_sign_test_by_hand(layer):
    feats = layer.images()[:200]
    res = influence(layer.head, feats, gt_pairs(layer), n_noise=0)
    logits = layer.head(feats)
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    moved = layer.head(feats + 5.0 * layer.S[1] / (layer.W[1] @ layer.S[1]))
    lp1 = moved - np.log(np.exp(moved).sum(1, keepdims=True))
    up, down = (lp1 > lp).mean(0), (lp1 < lp).mean(0)
    np.testing.assert_allclose(res.scores[1], up - down, atol=1e-12)
    assert np.isnan(res.pvalues).all() and not res.significant.any()


@pytest.fixture(scope="module")
def fitted(layer):
    """EDPairs with a short URA schedule (0.3 s; without URA the encoding directions of this preset
    sit at cos ~0.7 from the truth, see bench_ura.py), and the true direction of each fitted concept."""
    from scipy.optimize import linear_sum_assignment

    ura = dict(unconstrained_epochs=2, constrained_epochs=2, min_steps=20)
    pairs = edp.EDPairs(3, random_state=0, progress=False).fit(layer.images(), head=layer.head, ura=ura)
    cos = np.abs(pairs.encoding_ @ layer.S.T)                       # (fitted, true), unit rows
    rows, cols = linear_sum_assignment(-cos)
    assert cos[rows, cols].min() > 0.9, cos
    return pairs, layer.S[cols[np.argsort(rows)]]


@pytest.mark.parametrize("which", ["ground truth", "fitted"])
@pytest.mark.parametrize("labels", [False, True])
def test_significant_influences_match_the_heads_relations(layer, fitted, which, labels):
    pairs, S_true = fitted if which == "fitted" else (gt_pairs(layer), layer.S)
    res = influence(layer.head, layer.images(), pairs, n_noise=20, labels=layer.y if labels else None, seed=0)
    unamb, centred = truth(layer.head, S_true)
    # Where the head's relation is unambiguous, every image moves the same way: score exactly +-1.
    # (Exactly +-1 with the true directions; with fitted ones, whose effects rank the classes
    # slightly differently where margins are thin, at least the sign.)
    cells = unamb != 0
    if which == "ground truth":
        np.testing.assert_array_equal(res.scores[cells], unamb[cells])
    else:
        np.testing.assert_array_equal(np.sign(res.scores[cells]), unamb[cells])
    sig = res.significant
    assert np.all(np.sign(res.scores[sig]) == centred[sig])
    assert res.scores.shape == res.pvalues.shape == (3, 3)
    assert np.all((res.pvalues_adjusted >= res.pvalues) & (res.pvalues_adjusted <= 1))


@pytest.fixture(scope="module")
def margin_layer():
    """Where RCAV's premise holds (benchmarks/bench_influence.py, preset "margin"): 16 high-variance
    distractors make the concepts a small share of the variance, and no patch lies within 1.5 of a
    detector's threshold (absent alpha U(0, 1), present U(4, 5)). Strength-matched label-permuted
    directions then rarely bring a patch into a ramp detector (width 0.5), while a concept's step
    of 5 brings every absent patch across it."""
    return edp.synthetic.make_layer(2000, n_features=32, n_concepts=3, n_distractors=16, grid=(1, 2),
                                    distractor_range=(0.0, 20.0), absent=(0.0, 1.0), present=(4.0, 5.0),
                                    classes=[(0, 1), (0, 2), (1, 2)], train_head=False, seed=0)


@pytest.mark.parametrize("which", ["ground truth", "fitted"])
def test_significant_influences_have_the_presence_heads_signs(margin_layer, which):
    """A real head with known relations (edpairs.synthetic.PresenceHead): concepts are significant
    against label-permuted noise, each with the head's sign (relations(), +1 where the class holds
    the concept, -1 elsewhere), for the true pairs and for pairs EDPairs fitted without URA."""
    from scipy.optimize import linear_sum_assignment

    layer = margin_layer
    head = edp.synthetic.PresenceHead.from_layer(layer, width=0.5)
    assert head.accuracy_ > 0.99
    if which == "fitted":
        pairs = edp.EDPairs(3, random_state=0, progress=False).fit(layer.X)
        steps = pairs.encoding_ / np.einsum("id,id->i", pairs.decoding_, pairs.encoding_)[:, None]
        read = steps.astype(np.float64) @ layer.W.T                 # true concepts each fitted step moves
        rows, cols = linear_sum_assignment(-np.abs(read))
        match = cols[np.argsort(rows)]
        # Each fitted step moves its own true concept most (0.77-0.85 of the norm here; a fit at 1000
        # images reached 0.59 and then gave significant cells of the wrong sign, bench_influence.py).
        assert np.min(np.abs(read[np.arange(3), match]) / np.linalg.norm(read, axis=1)) > 0.7
    else:
        pairs, match = gt_pairs(layer), np.arange(3)
    truth = head.relations()[match]                                  # (I, K), here every cell +-1
    assert np.all(truth != 0)
    # 180 noise directions: the fewest with which even a cell on the empirical p-value (a null the
    # normal fit does not describe) can pass Bonferroni over the 9 cells (1/181 * 9 < 0.05).
    assert inf_mod._noise_needed(9, 0.05) == 180
    res = influence(head, layer.images()[:1000], pairs, n_noise=180, seed=0)
    assert np.median(res.null_std) < 0.1                             # the noise leaves images untouched
    sig = res.significant
    assert sig.sum() >= 7, (res.pvalues_adjusted, res.test_note)
    np.testing.assert_array_equal(np.sign(res.scores[sig]), truth[sig])
    # Where the normal checks pass, the p-value is the normal fit's, as before them.
    from scipy.stats import norm

    normal = res.tests == "normal"
    assert normal.sum() >= 6
    sd = np.maximum(res.null_std, 1.0 / res.n_scored[None, :])
    np.testing.assert_allclose(res.pvalues[normal], (2 * norm.sf(np.abs(res.scores - res.null_mean) / sd))[normal],
                               rtol=1e-12)
    # Empirical p-values cannot go below 1 / (n_noise + 1): Bonferroni over 9 tests then finds nothing.
    emp = influence(head, layer.images()[:500], pairs, n_noise=10, pvalue="empirical", seed=0)
    assert emp.pvalues.min() == pytest.approx(1 / 11) and not emp.significant.any()


def test_presence_head_on_the_published_preset_signs_right_but_nothing_significant(layer):
    """The published preset has no margin and its 5-dimensional span makes every noise direction a
    concept mixture of the step's size: the null spans [-1, 1] (documented negative result), yet
    every score has the head's sign."""
    head = edp.synthetic.PresenceHead.from_layer(layer, width=0.5)
    res = influence(head, layer.images()[:1000], gt_pairs(layer), n_noise=20, seed=0)
    np.testing.assert_array_equal(np.sign(res.scores), head.relations())
    assert np.median(res.null_std) > 0.5
    assert np.all(np.sign(res.scores[res.significant]) == head.relations()[res.significant])


def test_noise_directions_are_label_permuted_encoding_directions(layer):
    rng = np.random.default_rng(0)
    X = layer.X[:4000].astype(np.float64)
    memb = layer.membership[:4000, 0]
    V = inf_mod.noise_directions(X, memb, 5, rng=rng)
    assert V.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(V, axis=1), 1.0, atol=1e-12)
    # They lie in the data's span (covariance-shaped), not along the concept more than chance.
    Xc = X - X.mean(0)
    _, sv, vt = np.linalg.svd(Xc, full_matrices=False)
    span = vt[sv > 1e-6 * sv[0]]
    np.testing.assert_allclose(np.linalg.norm(V @ span.T, axis=1), 1.0, atol=1e-6)


def test_table_plot_and_torch_features(layer, tmp_path):
    feats = layer.images()[:300]
    res = influence(layer.head, feats, gt_pairs(layer), n_noise=10, class_names=["a", "b", "c"],
                    concept_names=["x", "y", "z"])
    recs = res.to_records()
    assert len(recs) == 9 and recs[0]["concept"] == "x" and recs[0]["class_"] == "a"
    path = tmp_path / "figures" / "influence.png"  # the folder is made
    old = os.umask(0o022)
    try:
        fig = plot_influence(res, path=path)
    finally:
        os.umask(old)
    assert fig.axes and path.exists() and path.stat().st_size > 1000
    assert path.stat().st_mode & 0o777 == 0o644  # the umask's, not a private temporary file's 0o600
    assert sorted(os.listdir(path.parent)) == ["influence.png"]
    # torch features: the same scores, and the same null (only the sampled rows come to the host)
    torch = pytest.importorskip("torch")
    res_t = influence(layer.head, torch.from_numpy(np.ascontiguousarray(feats)).double(), gt_pairs(layer),
                      n_noise=10)
    np.testing.assert_allclose(res_t.scores, res.scores)
    np.testing.assert_allclose(res_t.null_scores, res.null_scores)
    pd = pytest.importorskip("pandas")
    df = res.to_pandas()
    assert isinstance(df, pd.DataFrame) and "class" in df.columns and len(df) == 9


def test_torch_features_bring_one_vector_per_direction_to_the_host(layer, monkeypatch):
    """With torch features the log-probabilities, signs and their sums stay with the features:
    one (K,) vector per scored direction comes to the host (plus the null's sampled rows), not
    every batch's logits; the scores are those of numpy features."""
    torch = pytest.importorskip("torch")
    feats, pairs = layer.images()[:300], gt_pairs(layer)
    n_noise = 10  # (the fewest the normal p-value takes)
    expected = influence(layer.head, feats, pairs, n_noise=n_noise, batch_size=37, labels=layer.y[:300])
    host, came_down = inf_mod._host, []
    monkeypatch.setattr(inf_mod, "_host", lambda a: (came_down.append(tuple(a.shape)) if isinstance(a, torch.Tensor)
                                                     else None) or host(a))
    got = influence(layer.head, torch.from_numpy(np.ascontiguousarray(feats)), pairs, n_noise=n_noise, batch_size=37,
                    labels=layer.y[:300])
    n_concepts, K = expected.scores.shape
    assert sorted(came_down) == sorted([(min(10000, feats[..., 0].size), feats.shape[-1])]
                                       + [(K,)] * (n_concepts * (1 + n_noise)))
    np.testing.assert_array_equal(got.scores, expected.scores)
    np.testing.assert_array_equal(got.null_scores, expected.null_scores)
    with pytest.raises(ValueError, match="at least one image"):
        influence(layer.head, feats[:0], pairs)


def test_bad_arguments(layer):
    with pytest.raises(ValueError, match="channels"):
        influence(layer.head, layer.images()[:10, :, :, :8], gt_pairs(layer))
    with pytest.raises(ValueError, match="labels"):
        influence(layer.head, layer.images()[:10], gt_pairs(layer), labels=np.zeros(3), n_noise=0)
    with pytest.raises(ValueError, match="pvalue"):
        influence(layer.head, layer.images()[:10], gt_pairs(layer), pvalue="exact")
    # unfitted pairs: the shared wording, where getattr's AttributeError came
    with pytest.raises(ValueError, match="pairs must be fitted pairs .* this EDPairs has no decoding_, encoding_, bias_"):
        influence(layer.head, layer.images()[:10], edp.EDPairs(3))


def test_a_subset_of_classes_is_the_same_columns_with_a_smaller_family(layer):
    images, pairs = layer.images()[:300], gt_pairs(layer)
    labels = layer.y[:300]
    full = influence(layer.head, images, pairs, n_noise=20, seed=3)
    sub = influence(layer.head, images, pairs, n_noise=20, seed=3, classes=[2, 0])
    np.testing.assert_array_equal(sub.scores, full.scores[:, [2, 0]])
    np.testing.assert_array_equal(sub.null_scores, full.null_scores[:, :, [2, 0]])
    K = full.scores.shape[1]
    # Bonferroni over concepts x the scored classes only.
    np.testing.assert_allclose(sub.pvalues_adjusted, np.minimum(1.0, full.pvalues[:, [2, 0]] * 3 * 2))
    assert K > 2 and sub.class_indices == [2, 0] and sub.classes == ["class 2", "class 0"]
    assert [r["class_index"] for r in sub.to_records()[:2]] == [2, 0]
    by_class = influence(layer.head, images, pairs, n_noise=10, seed=3, classes=[1], labels=labels)
    assert by_class.n_scored.tolist() == [int((labels == 1).sum())] and by_class.n_scored[0] > 0
    with pytest.raises(ValueError, match="classes must be distinct"):
        influence(layer.head, images[:10], pairs, n_noise=0, classes=[0, 0])
    with pytest.raises(ValueError, match="classes must be distinct"):
        influence(layer.head, images[:10], pairs, n_noise=0, classes=[K])
    with pytest.raises(ValueError, match="class_names has 2 names"):
        influence(layer.head, images[:10], pairs, n_noise=0, class_names=["a", "b"])


def test_the_predicted_classes_come_from_the_scoring_pass(layer):
    """classes="predicted" scores the classes the head predicts for some image, as if they had
    been listed (analyse uses it instead of a head pass of its own)."""
    images, pairs = layer.images()[:200], gt_pairs(layer)
    predicted = np.unique(np.asarray(layer.head(images)).argmax(1))
    auto = influence(layer.head, images, pairs, n_noise=10, seed=1, classes="predicted")
    listed = influence(layer.head, images, pairs, n_noise=10, seed=1, classes=predicted)
    assert auto.class_indices == predicted.tolist()
    np.testing.assert_array_equal(auto.scores, listed.scores)
    np.testing.assert_array_equal(auto.pvalues_adjusted, listed.pvalues_adjusted)
    with pytest.raises(ValueError, match="classes must be class indices or 'predicted', got 'all'"):
        influence(layer.head, images[:10], pairs, n_noise=0, classes="all")


def test_nan_or_inf_strength_features_or_pairs_are_refused(layer):
    """A NaN strength or a NaN activation made every score NaN (and, with noise directions,
    'Eigenvalues did not converge'): both refused by name, as are pairs holding NaN."""
    feats, pairs = layer.images()[:20], gt_pairs(layer)
    for bad in (float("nan"), float("inf"), 0.0, "5", None):
        with pytest.raises(ValueError, match=r"strength must be a finite nonzero number .*, got"):
            influence(layer.head, feats, pairs, n_noise=0, strength=bad)
    nan_feats = feats.copy()
    nan_feats[3, 0, 1, 2] = np.nan
    for n_noise in (0, 10):
        with pytest.raises(ValueError, match=r"features contain NaN or Inf \(first in image 3\)"):
            influence(layer.head, nan_feats, pairs, n_noise=n_noise)
    inf_feats = feats.copy()
    inf_feats[7, 0, 0, 0] = -np.inf
    with pytest.raises(ValueError, match=r"features contain NaN or Inf \(first in image 7\)"):
        influence(layer.head, inf_feats, pairs, n_noise=0)
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"features contain NaN or Inf \(first in image 3\)"):
        influence(layer.head, torch.from_numpy(nan_feats), pairs, n_noise=0)
    nan_pairs = gt_pairs(layer)
    nan_pairs.encoding_ = layer.S.copy()
    nan_pairs.encoding_[0, 0] = np.nan
    with pytest.raises(ValueError, match="the pairs contain NaN or Inf"):
        influence(layer.head, feats, nan_pairs, n_noise=0)
    # A negative strength stays meaningful (the concept lowered): where the linear head's relation
    # is unambiguous every image moves the other way.
    unamb, _ = truth(layer.head, layer.S)
    cells = unamb != 0
    up = influence(layer.head, feats, pairs, n_noise=0, strength=2.0)
    down = influence(layer.head, feats, pairs, n_noise=0, strength=-2.0)
    np.testing.assert_array_equal(up.scores[cells], unamb[cells])
    np.testing.assert_array_equal(down.scores[cells], -unamb[cells])


def test_indices_are_integers_in_range_and_distinct(layer):
    """concepts=[1.7] was scored as concept 1, [True] as concept 1, classes=[True, False] (a mask)
    as classes [1, 0], labels of 1.7 counted as class 1 and concepts [1, 1] scored twice: each is
    refused, saying what was expected. One integer is read as a list of one."""
    feats, pairs = layer.images()[:20], gt_pairs(layer)
    I, K = 3, 3

    def run(**kw):
        return influence(layer.head, feats, pairs, n_noise=0, **kw)

    for bad in ([1.7], [True], np.array([1.0]), np.array([True, False, True]), [np.float64(2.0)]):
        with pytest.raises(TypeError, match="concepts must (hold|be) integer concept indices"):
            run(concepts=bad)
    for bad in ([1.9], [True, False], np.array([True, False, True]), [0, 1.0]):
        with pytest.raises(TypeError, match="classes must (hold|be) integer class indices"):
            run(classes=bad)
    with pytest.raises(TypeError, match=r"concepts must be a concept index \(int\) or a sequence"):
        run(concepts="1")
    with pytest.raises(TypeError, match=r"concepts must be a concept index \(int\) or a sequence"):
        run(concepts=True)
    with pytest.raises(ValueError, match=r"concepts must be distinct concept indices in \[0, 3\), got \[1, 1\]"):
        run(concepts=[1, 1])
    with pytest.raises(IndexError, match=r"concepts must be distinct concept indices in \[0, 3\), got \[-1\]"):
        run(concepts=[-1])
    with pytest.raises(IndexError, match=r"in \[0, 3\), got \[3\]"):
        run(concepts=np.array([3]))
    with pytest.raises(ValueError, match=r"concepts must name at least one concept \(of 3\)"):
        run(concepts=[])
    with pytest.raises(ValueError, match=r"classes must be distinct class indices in \[0, 3\), got \[-1\]"):
        run(classes=[-1])
    for bad in (np.full(20, 1.7), np.ones(20, dtype=bool), np.full(20, np.nan)):
        with pytest.raises(TypeError, match=r"labels must be integer class indices in \[0, 3\), one per image, "
                                            r"got dtype"):
            run(labels=bad)
    with pytest.raises(ValueError, match=r"labels must hold one class in \[0, 3\) per image \(20 images\), "
                                         r"got values from 0 to 3"):
        run(labels=np.arange(20) % 4)
    # One integer, numpy integers and torch integer tensors are indices.
    full = run()
    one = run(concepts=np.int64(2), classes=1)
    assert one.settings["concepts"] == [2] and one.class_indices == [1]
    np.testing.assert_array_equal(one.scores, full.scores[2:3, 1:2])
    torch = pytest.importorskip("torch")
    labelled = run(labels=torch.as_tensor(layer.y[:20]), concepts=torch.tensor([2, 0]))
    np.testing.assert_array_equal(labelled.scores, run(labels=layer.y[:20]).scores[[2, 0]])
    assert I == K == full.scores.shape[0] == full.scores.shape[1]


def test_the_normal_pvalue_needs_enough_noise_directions(layer):
    """With one noise direction the null's spread is 0, floored at 1/n, and p came out near 1e-57
    (made-up significance). The normal p-value now needs MIN_NOISE_NORMAL directions; the
    empirical one (at least 1 / (n_noise + 1), never spuriously small) takes any number, and
    n_noise=0 still means no test."""
    feats, pairs = layer.images()[:40], gt_pairs(layer)
    assert inf_mod.MIN_NOISE_NORMAL == 10
    for n_noise in (1, 2, 9):
        with pytest.raises(ValueError, match=rf"n_noise={n_noise} noise directions are too few for the normal "
                                             r"p-value.*n_noise >= 10.*pvalue='empirical'.*n_noise=0"):
            influence(layer.head, feats, pairs, n_noise=n_noise)
    ok = influence(layer.head, feats, pairs, n_noise=10)
    assert np.isfinite(ok.pvalues).all() and ok.null_scores.shape == (3, 10, 3)
    emp = influence(layer.head, feats, pairs, n_noise=1, pvalue="empirical")
    assert emp.pvalues.min() >= 0.5 and not emp.significant.any()
    none = influence(layer.head, feats, pairs, n_noise=0)
    assert np.isnan(none.pvalues).all() and not none.significant.any()


def _pinned(n_images, sigma=0.5, seed=0):
    """A trial-like null: (n, 8) vector features 4 units from a class-0 prototype along concept 0,
    a head whose class-0 logit is minus the squared distance to it. Concept 0's step of 5 brings
    every image closer (score 1); a noise direction of the same length takes nearly every image
    away (scores piled at -1, a few values above)."""
    rng = np.random.default_rng(seed)
    D = 8
    X = -4.0 * np.eye(D)[0] + sigma * rng.standard_normal((n_images, D))

    def head(f):
        f = np.asarray(f)
        return np.stack([-np.sum(f * f, axis=1), np.zeros(len(f))], axis=1)

    pairs = SimpleNamespace(decoding_=np.eye(D)[:2], encoding_=np.eye(D)[:2], bias_=np.array([-4.0, 0.0]))
    return head, X, pairs


def test_a_few_images_null_crowding_the_bound_gets_the_empirical_test():
    """User trial (14 images, 50 noise directions): a cell's noise scores were all in
    {-1, -6/7, -5/7, -4/7} (sd 0.097), the observed score 1, z = 19, p_adj = 4.6e-77, and 23 of 176
    cells 'significant' where the empirical test found none. Here the same shape: the normal fit
    is refused for such a null (too few images of spread, crowding -1), the cell gets the
    empirical p-value, and the result says so."""
    head, X, pairs = _pinned(14)
    res = influence(head, X, pairs, n_noise=50, seed=0, classes=[0], alpha=0.01)
    null = res.null_scores[0, :, 0]
    assert res.scores[0, 0] == 1.0 and null.mean() < -0.85 and len(np.unique(null)) <= 8
    # (before: z = 9.6 on the normal fit, p_adj ~ 1e-21, significant)
    assert res.pvalues[0, 0] == pytest.approx(1 / 51)                 # beyond every noise score
    assert res.pvalues.min() >= 1 / 51 and not res.significant.any()
    assert res.tests[0, 0] == "empirical"
    assert "spread over" in res.test_reasons[0, 0] and "bound" in res.test_reasons[0, 0]
    note = res.test_note
    assert "normal null in 0 of 2 cells" in note and "empirical p-values" in note and "bound" in note
    assert "Bonferroni over 2 cells at alpha = 0.01" in note
    assert "cannot be significant with fewer than 200 noise directions" in note
    rec = res.to_records()[0]
    assert rec["test"] == "empirical" and rec["test_reason"] == res.test_reasons[0, 0]
    # The same shape on 200 images: ample spread, but still crowding -1 (|mean| + 3 sd > 1).
    head, X, pairs = _pinned(200)
    big = influence(head, X, pairs, n_noise=50, seed=0, classes=[0], alpha=0.01)
    assert big.null_std[0, 0] * 200 > 3 and big.tests[0, 0] == "empirical"
    assert "spread" not in big.test_reasons[0, 0] and "bound" in big.test_reasons[0, 0]
    assert "spread over fewer" not in big.test_note and "in 2 they crowd the score's bound" in big.test_note
    assert not big.significant.any()


def test_a_null_that_moves_no_image_gets_the_empirical_test(margin_layer):
    """On the margin layer most of 20 noise directions move no image: a cell's noise scores all 0,
    sd 0, which the old floor (sd >= 1/n) turned into z = n and p_adj = 0. Such a cell now gets
    the empirical p-value; cells whose noise does spread keep the normal fit."""
    layer = margin_layer
    head = edp.synthetic.PresenceHead.from_layer(layer, width=0.5)
    res = influence(head, layer.images()[:1000], gt_pairs(layer), n_noise=20, seed=0)
    one_value = np.array([[len(np.unique(res.null_scores[i, :, k])) == 1 for k in range(3)] for i in range(3)])
    assert one_value.any()
    assert np.all(res.pvalues[one_value] >= 1 / 21) and not res.significant[one_value].any()
    assert np.all(res.tests[one_value] == "empirical")
    assert all(r.startswith("noise scores spread over 0.00 images") for r in res.test_reasons[one_value])
    assert np.all(res.tests[~one_value & (res.null_std * 1000 >= 3)] == "normal")


@pytest.mark.parametrize("null, n, normal, why", [
    # (noise scores, images scored): the normal fit's two checks (module docstring)
    (np.linspace(-0.3, 0.3, 20), 100, True, ""),
    (np.zeros(20), 2000, False, "spread"),                            # no noise direction moved an image
    (np.r_[np.zeros(19), 2 / 2000], 2000, False, "spread"),          # one moved two images
    (np.r_[-np.ones(15), np.full(5, -6 / 7)], 14, False, "spread+bound"),
    (np.linspace(0.2, 1.0, 20), 100, False, "bound"),                # crowds +1: sd 0.24, mean 0.6
    (np.linspace(-1.0, 1.0, 20), 2000, False, "bound"),              # wide (sd 0.62): |z| < 3 (1 + |mean|)
    (np.linspace(-0.03, 0.03, 20), 100, False, "spread"),           # sd x n = 1.9
    (np.linspace(-0.03, 0.03, 20), 200, True, ""),                   # sd x n = 3.8
])
def test_the_normal_fit_checks(null, n, normal, why):
    mean, sd = null.mean()[None, None], null.std(ddof=1)[None, None]
    few, crowded = inf_mod._normal_fit_fails(mean, sd, np.array([n]))
    assert (not (few | crowded)[0, 0]) == normal
    assert bool(few[0, 0]) == ("spread" in why) and bool(crowded[0, 0]) == ("bound" in why)


def test_no_noise_directions_is_no_test(layer):
    """n_noise=0: no test was run, and the result says so (the report used to announce a
    Bonferroni test under a normal null and 'no significant cell')."""
    res = influence(layer.head, layer.images()[:20], gt_pairs(layer), n_noise=0)
    assert np.all(res.tests == "none") and np.isnan(res.pvalues).all() and not res.significant.any()
    assert res.test_note.startswith("no significance test was run") and "n_noise=0" in res.test_note
    assert res.to_records()[0]["test"] == "none"
    emp = influence(layer.head, layer.images()[:20], gt_pairs(layer), n_noise=3, pvalue="empirical")
    assert np.all(emp.tests == "empirical") and "as requested" in emp.test_note
    assert np.all(emp.test_reasons == "pvalue='empirical' requested")


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(alpha="0.05"), ValueError, r"alpha must be a significance level in \(0, 1\), got '0.05'"),
    (dict(alpha=float("nan")), ValueError, r"alpha must be a significance level in \(0, 1\), got nan"),
    (dict(alpha=1.0), ValueError, r"alpha must be a significance level in \(0, 1\), got 1.0"),
    (dict(n_noise=2.5), ValueError, r"n_noise must be an integer >= 0, got 2.5"),
    (dict(n_noise=-1), ValueError, r"n_noise must be an integer >= 0, got -1"),
    (dict(batch_size=2.5), ValueError, r"batch_size must be a positive integer, got 2.5"),
    (dict(batch_size=0), ValueError, r"batch_size must be a positive integer, got 0"),
    (dict(max_rows=0), ValueError, r"max_rows must be an integer >= 4, got 0"),
    (dict(max_rows=-5), ValueError, r"max_rows must be an integer >= 4, got -5"),
    (dict(max_rows=1), ValueError, r"max_rows must be an integer >= 4, got 1"),
    (dict(max_rows=100.0), ValueError, r"max_rows must be an integer >= 4, got 100.0"),
    (dict(seed="x"), ValueError, r"seed must be a non-negative integer or None, got 'x'"),
    (dict(concept_names=["a"]), ValueError, r"concept_names has 1 names for 3 concepts"),
    (dict(concept_names="abc"), TypeError, r"concept_names must be a sequence of 3 names .*one string"),
    (dict(class_names="abc"), TypeError, r"class_names must be a sequence of 3 names .*one string"),
])
def test_other_arguments_are_refused_by_name(layer, kwargs, error, message):
    """'int' object is not iterable, IndexError, UFuncTypeError, "'<' not supported" and numpy's
    sampling errors came before; a float batch_size was cut to an integer."""
    with pytest.raises(error, match=message):
        influence(layer.head, layer.images()[:20], gt_pairs(layer), **{"n_noise": 10, **kwargs})


def test_features_are_checked_against_the_pairs_and_the_head():
    """Features of a map layer passed as (n, D) reached the head and failed inside it ("mat1 and
    mat2 shapes cannot be multiplied"): the failure now names the features' shape and the forms
    expected. (n, D) features of a vector layer, whose head takes them, are scored; integer
    features (a step would be rounded to whole numbers) and a too-small null sample are refused."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    images = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    acts = edp.capture.capture(model, "3", images, progress=False)                 # (12, 8, 8, 16)
    pairs = edp.EDPairs(4, random_state=0, progress=False).fit(acts.reshape(-1, 16))
    head = edp.split_model(model, "3").head
    assert influence(head, acts, pairs, n_noise=0).scores.shape == (4, 5)
    with pytest.raises(ValueError, match=r"the head failed on the first batch of features, of shape \(12, 16\) "
                                         r"\(\w+Error: .*\(n, h, w, D\) for a map"):
        influence(head, acts[:, 0, 0, :], pairs, n_noise=0)
    with pytest.raises(ValueError, match=r"the pairs have D=4 channels but features have shape \(12, 8, 8, 16\)"):
        influence(head, acts, SimpleNamespace(decoding_=np.eye(4), encoding_=np.eye(4), bias_=np.zeros(4)))
    with pytest.raises(ValueError, match=r"features must be .*\(n_images, D\).*got shape \(12,\)"):
        influence(head, acts[:, 0, 0, 0], pairs, n_noise=0)
    with pytest.raises(TypeError, match="features must be floating-point activations, got dtype int64"):
        influence(head, acts.astype(np.int64), pairs, n_noise=0)
    with pytest.raises(ValueError, match=r"the noise directions need at least 4 rows .* got 3"):
        influence(lambda f: np.asarray(f) @ np.ones((16, 5)), acts[:3, 0, 0, :], pairs, n_noise=10)
    # A vector layer: (n, D) features and a head that takes them.
    vectors = edp.capture.capture(model, "5", images, progress=False)              # (12, 16)
    vpairs = edp.EDPairs(2, random_state=0, progress=False).fit(vectors)
    res = influence(edp.split_model(model, "5").head, vectors, vpairs, n_noise=10)
    assert res.scores.shape == (2, 5) and np.isfinite(res.pvalues).all()
