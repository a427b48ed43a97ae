"""Bad arguments raise ValueError / TypeError with a message that names the argument and
shows what was received; check_finite catches NaN/Inf and can be turned off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _helpers import _ids, as_lib

import edpairs
from edpairs import ops

rng = np.random.default_rng(7)
X = rng.standard_normal((10, 4)).astype(np.float32)
C = rng.standard_normal((3, 4)).astype(np.float32)
W = rng.standard_normal((4, 2)).astype(np.float32)
B = rng.standard_normal(2).astype(np.float32)


def _with(a, index, value):
    a = a.copy()
    a[index] = value
    return a


def _raises(exc, fn, *patterns):
    """Asserts fn() raises exc and the message matches every regex pattern."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for p in patterns:
        assert re.search(p, msg), f"message {msg!r} does not match {p!r}"
    return msg


# ---------------------------------------------------------------------------------------
# Shapes

SHAPE_ERRORS = {
    "X 3-D": (lambda xp: ops.assign(as_lib(np.zeros((3, 4, 5), np.float32), xp), as_lib(C, xp)),
              [r"\bX\b", re.escape("(3, 4, 5)")]),
    "X 1-D": (lambda xp: ops.assign(as_lib(np.zeros(4, np.float32), xp), as_lib(C, xp)),
              [r"\bX\b", re.escape("(4,)")]),
    "X no columns": (lambda xp: ops.assign(as_lib(np.zeros((3, 0), np.float32), xp), as_lib(np.zeros((2, 0), np.float32), xp)),
                     [r"\bX\b", re.escape("(3, 0)")]),
    "C wrong D": (lambda xp: ops.assign(as_lib(X, xp), as_lib(np.zeros((3, 5), np.float32), xp)),
                  [r"\bC\b", re.escape("(10, 4)"), re.escape("(3, 5)")]),
    "C 1-D": (lambda xp: ops.assign(as_lib(X, xp), as_lib(np.zeros(4, np.float32), xp)),
              [r"\bC\b", re.escape("(4,)")]),
    "k = 0 centroids": (lambda xp: ops.assign(as_lib(X, xp), as_lib(np.zeros((0, 4), np.float32), xp)),
                        [r"\bC\b", re.escape("(0, 4)")]),
    "center wrong length": (lambda xp: ops.assign(as_lib(X, xp), as_lib(C, xp), center=as_lib(np.zeros(5), xp)),
                            [r"\bcenter\b", re.escape("(5,)")]),
    "row_scale wrong length": (lambda xp: ops.assign(as_lib(X, xp), as_lib(C, xp), row_scale=as_lib(np.ones(9), xp)),
                               [r"\brow_scale\b", re.escape("(9,)")]),
    "col_scale wrong length": (lambda xp: ops.assign(as_lib(X, xp), as_lib(C, xp), col_scale=as_lib(np.ones(4), xp)),
                               [r"\bcol_scale\b", re.escape("(4,)")]),
    "kmeans C wrong D": (lambda xp: ops.spherical_kmeans_step(as_lib(X, xp), as_lib(np.ones((3, 2), np.float32), xp)),
                         [r"\bC\b", re.escape("(3, 2)")]),
    "moments X 3-D": (lambda xp: ops.moments(as_lib(np.zeros((3, 4, 5), np.float32), xp)),
                      [r"\bX\b", re.escape("(3, 4, 5)")]),
    "moments X no columns": (lambda xp: ops.moments(as_lib(np.zeros((3, 0), np.float32), xp)),
                             [r"\bX\b", re.escape("(3, 0)")]),
    "signal W wrong D": (lambda xp: ops.signal_moments(as_lib(X, xp), as_lib(np.ones((5, 2), np.float32), xp), as_lib(B, xp)),
                         [r"\bW\b", re.escape("(10, 4)"), re.escape("(5, 2)")]),
    "signal W 1-D": (lambda xp: ops.signal_moments(as_lib(X, xp), as_lib(np.ones(4, np.float32), xp), as_lib(B, xp)),
                     [r"\bW\b", re.escape("(4,)")]),
    "signal W no concepts": (lambda xp: ops.signal_moments(as_lib(X, xp), as_lib(np.ones((4, 0), np.float32), xp), as_lib(np.ones(0), xp)),
                             [r"\bW\b", re.escape("(4, 0)")]),
    "signal b wrong shape": (lambda xp: ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(np.ones(3, np.float32), xp)),
                             [r"\bb\b", re.escape("(3,)")]),
    "signal b 2-D": (lambda xp: ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(np.ones((2, 1), np.float32), xp)),
                     [r"\bb\b", re.escape("(2, 1)")]),
    "signal center wrong length": (lambda xp: ops.signal_moments(as_lib(X, xp), as_lib(W, xp), as_lib(B, xp), center=as_lib(np.ones(3), xp)),
                                   [r"\bcenter\b", re.escape("(3,)")]),
    "signal X 3-D": (lambda xp: ops.signal_moments(as_lib(np.zeros((2, 2, 4), np.float32), xp), as_lib(W, xp), as_lib(B, xp)),
                     [r"\bX\b", re.escape("(2, 2, 4)")]),
    "normalize counts wrong length": (lambda xp: ops.normalize_centroids(as_lib(np.ones((3, 4)), xp), as_lib(np.ones(2, np.int64), xp), as_lib(C, xp)),
                                      [r"\bcounts\b", re.escape("(2,)")]),
    "normalize previous wrong shape": (lambda xp: ops.normalize_centroids(as_lib(np.ones((3, 4)), xp), as_lib(np.ones(3, np.int64), xp), as_lib(np.ones((3, 5)), xp)),
                                       [r"\bprevious\b", re.escape("(3, 5)")]),
    "normalize sums 1-D": (lambda xp: ops.normalize_centroids(as_lib(np.ones(3), xp), as_lib(np.ones(3, np.int64), xp), as_lib(C, xp)),
                           [r"\bsums\b", re.escape("(3,)")]),
}


_SHAPE_PROBE = """
import numpy as np
from edpairs import ops
try:
    ops.assign(np.zeros((10, 4), np.float32), np.ones((3, 4), np.float32), center=np.zeros(5, np.float32))
except ValueError as exc:
    print("raised:", exc)
"""


@pytest.fixture(scope="module")
def shape_error_probe():
    """Formats one shape error (an int64 streamed into the message) in a subprocess first: a
    build in which that path crashes the interpreter then fails the tests below one by one
    instead of killing the whole test run."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(edpairs.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", _SHAPE_PROBE], env=env, capture_output=True, text=True, timeout=120)


def test_formatting_a_shape_error_does_not_crash(shape_error_probe):
    out = shape_error_probe
    assert out.returncode == 0, f"the interpreter died (exit code {out.returncode}): {out.stderr[-2000:]}"
    assert "raised: center must have shape" in out.stdout and "(5,)" in out.stdout, out.stdout


@pytest.mark.parametrize("case", list(SHAPE_ERRORS), ids=_ids(SHAPE_ERRORS))
def test_shape_errors_name_the_argument_and_show_the_shape(xp, case, shape_error_probe):
    if shape_error_probe.returncode != 0:
        pytest.fail(f"not run in-process: formatting a shape error crashed a subprocess "
                    f"(exit code {shape_error_probe.returncode}); see test_formatting_a_shape_error_does_not_crash")
    fn, patterns = SHAPE_ERRORS[case]
    _raises(ValueError, lambda: fn(xp), *patterns)


# ---------------------------------------------------------------------------------------
# Dtypes

BAD_DTYPES = ["int32", "int64", "uint8", "bool", "complex64"]


@pytest.mark.parametrize("dtype", BAD_DTYPES)
@pytest.mark.parametrize("op", ["assign", "cosine_assign", "spherical_kmeans_step", "moments", "signal_moments"])
def test_unsupported_x_dtype(xp, dtype, op):
    Xbad = as_lib((X * 3).astype(dtype), xp)
    calls = {
        "assign": lambda: ops.assign(Xbad, as_lib(C, xp)),
        "cosine_assign": lambda: ops.cosine_assign(Xbad, as_lib(C, xp)),
        "spherical_kmeans_step": lambda: ops.spherical_kmeans_step(Xbad, as_lib(C, xp)),
        "moments": lambda: ops.moments(Xbad),
        "signal_moments": lambda: ops.signal_moments(Xbad, as_lib(W, xp), as_lib(B, xp)),
    }
    _raises((ValueError, TypeError), calls[op], r"\bX\b", "dtype not supported", re.escape(dtype))


def test_non_array_input_raises_type_error():
    with pytest.raises((TypeError, ValueError), match=r"\bX\b"):
        ops.assign(object(), C)


def test_missing_text_masked_and_complex_arrays_are_refused():
    """None where an array is required, text, numpy masked arrays (whose masks the kernels would
    ignore) and complex parameters (whose imaginary parts would be dropped): TypeErrors that
    name the argument."""
    cases = [
        (lambda: ops.assign(X, None), r"\bC\b.*got None"),
        (lambda: ops.spherical_kmeans_step(X, None), r"\bC\b.*got None"),
        (lambda: ops.signal_moments(X, None, B), r"\bW\b.*got None"),
        (lambda: ops.signal_moments(X, W, None), r"\bb\b.*got None"),
        (lambda: ops.moments(None), r"\bX\b.*got None"),
        (lambda: ops.assign(X, "abc"), r"\bC\b must be a numeric array.*<U3"),
        (lambda: ops.assign(np.ma.masked_array(X, mask=X > 1), C), r"\bX\b is a numpy masked array"),
        (lambda: ops.moments(np.ma.masked_array(X)), r"\bX\b is a numpy masked array"),
        (lambda: ops.assign(X, C.astype(np.complex64)), r"\bC\b must be real, got complex64"),
        (lambda: ops.normalize_centroids(np.ones((3, 4)), np.array([1, 1, 1]), None), r"\bprevious\b.*got None"),
    ]
    for call, pattern in cases:
        _raises(TypeError, call, pattern)


def test_big_endian_input_is_read_as_its_values():
    swapped = X.astype(">f4")
    got, want = ops.assign(swapped, C.astype(">f4")), ops.assign(X, C)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(got.scores, want.scores)
    np.testing.assert_array_equal(ops.moments(swapped).m2, ops.moments(X).m2)


def test_normalize_centroids_checks_its_inputs():
    prev = C.copy()
    good = np.ones((3, 4))
    _raises(ValueError, lambda: ops.normalize_centroids(_with(good, (1, 2), np.inf), np.array([1, 1, 1]), prev),
            r"\bsums\b", "NaN or Inf")
    _raises(ValueError, lambda: ops.normalize_centroids(good, np.array([1, 1, 1]), _with(prev, (0, 0), np.nan)),
            r"\bprevious\b", "NaN or Inf")
    _raises(TypeError, lambda: ops.normalize_centroids(good, np.array([0.5, 0.2, 1.7]), prev),
            r"\bcounts\b must hold integers.*float64")
    _raises(ValueError, lambda: ops.normalize_centroids(good, np.array([1, -1, 1]), prev), r"\bcounts\b must be >= 0")
    out = ops.normalize_centroids(_with(good, (1, 2), np.inf), np.array([1, 1, 1]), prev, check_finite=False)
    assert out.shape == (3, 4)  # no check: the result is unspecified


def test_states_of_different_libraries_do_not_merge():
    torch = pytest.importorskip("torch")
    mine, theirs = ops.moments(X), ops.moments(torch.from_numpy(X))
    _raises(TypeError, lambda: mine.merge(theirs), "cannot merge moments", "numpy arrays on cpu", "torch arrays on cpu")
    _raises(TypeError, lambda: mine.update(torch.from_numpy(X)), "cannot merge moments")
    s_np = ops.signal_moments(X, W, B)
    s_t = ops.signal_moments(torch.from_numpy(X), torch.from_numpy(W), torch.from_numpy(B))
    _raises(TypeError, lambda: s_np.merge(s_t), "cannot merge signal moments")


# ---------------------------------------------------------------------------------------
# Non-finite values

NONFINITE = {
    "X NaN": ("assign", dict(X=_with(X, (3, 1), np.nan)), r"\bX\b"),
    "X +Inf": ("assign", dict(X=_with(X, (9, 3), np.inf)), r"\bX\b"),
    "X -Inf": ("assign", dict(X=_with(X, (0, 0), -np.inf)), r"\bX\b"),
    "X beyond float32": ("assign", dict(X=_with(X.astype(np.float64), (2, 2), 1e300)), r"\bX\b"),
    "C NaN": ("assign", dict(C=_with(C, (1, 1), np.nan)), r"\bC\b"),
    "C Inf": ("assign", dict(C=_with(C, (2, 3), np.inf)), r"\bC\b"),
    "center NaN": ("assign", dict(center=_with(np.zeros(4, np.float32), 2, np.nan)), r"\bcenter\b"),
    "col_scale Inf": ("assign", dict(col_scale=_with(np.ones(3, np.float32), 0, np.inf)), r"\bcol_scale\b"),
    "row_scale Inf": ("assign", dict(row_scale=_with(np.ones(10, np.float32), 4, np.inf)), r"\brow_scale\b"),
    "kmeans X NaN": ("kmeans", dict(X=_with(X, (5, 0), np.nan)), r"\bX\b"),
    "kmeans C NaN": ("kmeans", dict(C=_with(C, (0, 0), np.nan)), r"\bC\b"),
    "moments X NaN": ("moments", dict(X=_with(X, (4, 2), np.nan)), r"\bX\b"),
    "moments X Inf": ("moments", dict(X=_with(X, (9, 0), -np.inf)), r"\bX\b"),
    "signal X NaN": ("signal", dict(X=_with(X, (7, 3), np.nan)), r"\bX\b"),
    "signal W NaN": ("signal", dict(W=_with(W, (1, 1), np.nan)), r"\bW\b"),
    "signal b Inf": ("signal", dict(b=_with(B, 0, np.inf)), r"\bb\b"),
    "signal center NaN": ("signal", dict(center=_with(np.zeros(4, np.float32), 3, np.nan)), r"\bcenter\b"),
    # float64 X about a float64 centre (its own path): each NaN named where it is, not in X or b
    "f64 assign center NaN": ("assign", dict(X=X.astype(np.float64), center=_with(np.zeros(4), 2, np.nan)),
                              r"^center\b"),
    "f64 signal W NaN": ("signal", dict(X=X.astype(np.float64), W=_with(W.astype(np.float64), (1, 1), np.nan),
                                        center=np.zeros(4)), r"^W\b"),
    "f64 signal center NaN": ("signal", dict(X=X.astype(np.float64), center=_with(np.zeros(4), 3, np.nan)),
                              r"^center\b"),
}


def _call(op, xp, check_finite=True, **over):
    a = dict(X=X, C=C, W=W, b=B, center=None, row_scale=None, col_scale=None)
    a.update(over)
    a = {k: as_lib(v, xp) for k, v in a.items()}
    if op == "assign":
        return ops.assign(a["X"], a["C"], center=a["center"], row_scale=a["row_scale"], col_scale=a["col_scale"],
                          check_finite=check_finite)
    if op == "kmeans":
        return ops.spherical_kmeans_step(a["X"], a["C"], check_finite=check_finite)
    if op == "moments":
        return ops.moments(a["X"], check_finite=check_finite)
    return ops.signal_moments(a["X"], a["W"], a["b"], center=a["center"], check_finite=check_finite)


@pytest.mark.parametrize("case", list(NONFINITE), ids=_ids(NONFINITE))
def test_nonfinite_values_raise_naming_the_argument(xp, case):
    op, over, name = NONFINITE[case]
    _raises(ValueError, lambda: _call(op, xp, **over), name, "NaN", "check_finite=False")


@pytest.mark.parametrize("case", list(NONFINITE), ids=_ids(NONFINITE))
def test_check_finite_false_skips_the_check(xp, case):
    op, over, _ = NONFINITE[case]
    _call(op, xp, check_finite=False, **over)  # no exception; the result is unspecified


def test_nonfinite_in_float16_and_bfloat16_inputs_is_caught(xp):
    dtypes = ["float16"] + (["bfloat16"] if xp == "torch" else [])
    for dtype in dtypes:
        Xbad = as_lib(_with(X, (2, 2), np.inf), xp, dtype)
        _raises(ValueError, lambda: ops.assign(Xbad, as_lib(C, xp)), r"\bX\b", "NaN")
        _raises(ValueError, lambda: ops.moments(Xbad), r"\bX\b", "NaN")


def test_nonfinite_in_a_late_row_block_is_caught(xp):
    """The CPU kernels check while packing every block, not only the first."""
    big = np.random.default_rng(3).standard_normal((5000, 8)).astype(np.float32)
    big[4999, 7] = np.nan
    _raises(ValueError, lambda: ops.assign(as_lib(big, xp), as_lib(np.ones((2, 8), np.float32), xp)), "NaN")
    _raises(ValueError, lambda: ops.moments(as_lib(big, xp)), "NaN")
    _raises(ValueError, lambda: ops.signal_moments(as_lib(big, xp), as_lib(np.ones((8, 1), np.float32), xp),
                                                   as_lib(np.zeros(1, np.float32), xp)), "NaN")


def test_negative_row_scale_raises(xp):
    r = _with(np.ones(10, np.float32), 6, -0.5)
    _raises(ValueError, lambda: ops.assign(as_lib(X, xp), as_lib(C, xp), row_scale=as_lib(r, xp)), r"\brow_scale\b", ">= 0")


def test_nan_row_scale_raises_naming_row_scale(xp):
    r = _with(np.ones(10, np.float32), 6, np.nan)
    _raises(ValueError, lambda: ops.assign(as_lib(X, xp), as_lib(C, xp), row_scale=as_lib(r, xp)), r"\brow_scale\b")


# ---------------------------------------------------------------------------------------
# Misc


def test_moments_covariance_needs_enough_rows():
    m = ops.moments(X[:1])
    _raises(ValueError, lambda: m.cov, "ddof=1", "n=1")
    _raises(ValueError, lambda: ops.moments(X[:2]).covariance(ddof=2), "ddof=2", "n=2")


def test_set_num_threads_rejects_zero_and_too_many(restore_threads):
    _raises(ValueError, lambda: edpairs.set_num_threads(0), "num_threads", "0")
    _raises(ValueError, lambda: edpairs.set_num_threads(100_000), "num_threads must be from 1 to 1024, got 100000")
    assert edpairs.get_num_threads() == restore_threads


def test_settings_of_the_wrong_type_are_named(restore_threads):
    """A string where a number or a flag belongs got Python's operator errors, or (a flag) was
    truthy and switched the option on; a float thread count was cut to an integer."""
    for call, words in ((lambda: ops.moments(X, workspace_rows="a"), "workspace_rows must be a positive integer"),
                        (lambda: ops.moments(X).covariance(ddof="a"), "ddof must be an integer >= 0, got 'a'"),
                        (lambda: ops.moments(X).covariance(ddof=-5), "ddof must be an integer >= 0, got -5"),
                        (lambda: edpairs.set_num_threads(2.7), "n must be a positive integer, got 2.7"),
                        (lambda: edpairs.set_num_threads(True), "n must be a positive integer, got True"),
                        (lambda: ops.assign(X, C, accumulate="no"), "accumulate must be True or False, got 'no'"),
                        (lambda: ops.assign(X, C, check_finite="no"), "check_finite must be True or False")):
        _raises(ValueError, call, re.escape(words))
    assert edpairs.get_num_threads() == restore_threads
    pairs = edpairs.EDPairs(2, random_state=0, progress=False).fit(rng.standard_normal((200, 4)).astype(np.float32))
    _raises(ValueError, lambda: pairs.detect(X, hard="no"), "hard must be True or False, got 'no'")


def test_cuda_tensor_without_cuda_build_raises_backend_unavailable():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU visible to torch (to make a CUDA tensor)")
    if edpairs.build_info()["cuda"]:
        pytest.skip("this build of edpairs has CUDA kernels")
    Xc = torch.from_numpy(X).cuda()
    Cc = torch.from_numpy(C).cuda()
    for call in (lambda: ops.assign(Xc, Cc), lambda: ops.moments(Xc),
                 lambda: ops.signal_moments(Xc, torch.from_numpy(W).cuda(), torch.from_numpy(B).cuda())):
        with pytest.raises(edpairs.BackendUnavailable, match="EDPAIRS_CUDA=ON"):
            call()
    assert issubclass(edpairs.BackendUnavailable, RuntimeError)


def test_a_list_of_rows_is_refused_by_every_estimator():
    """A list is read as a list of (n, D) chunks (ChunkSource); a list of 1-D rows gets a hint."""
    rows = list(rng.standard_normal((50, 4)).astype(np.float32))
    for fit in (lambda: edpairs.SphericalKMeans(2).fit(rows), lambda: edpairs.EDPairs(2).fit(rows)):
        _raises(ValueError, fit, r"list of 50 1-D items", r"np\.asarray\(X\)")


def test_finite_inputs_whose_products_overflow_are_refused(xp):
    """Finite float32 values whose products pass the float32 range (a centroid of 3e38, rows of
    2e19 in the moments) gave infinite scores and wrong labels, or infinite moments; with
    check_finite they raise, without they run (the result is unspecified)."""
    big_c = as_lib(_with(C, 0, np.float32(3e38)), xp)
    big_x = as_lib(_with(X, 3, np.float32(2e19)), xp)
    calls = [lambda cf: ops.assign(as_lib(np.full((5, 4), 10, np.float32), xp), big_c, check_finite=cf),
             lambda cf: ops.moments(big_x, check_finite=cf),
             lambda cf: ops.signal_moments(big_x, as_lib(W, xp), as_lib(B, xp), check_finite=cf)]
    for call in calls:
        _raises(ValueError, lambda: call(True), "too large for float32 arithmetic", "check_finite=False")
        call(False)
