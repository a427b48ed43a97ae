"""Fixtures shared by the edpairs tests: the array library under test, a seeded RNG, the
hypothesis profile, and a guard that restores the CPU thread count."""

from __future__ import annotations

import os
import warnings
import zlib

# Tests use small arrays, where torch's and OpenBLAS's thread pools cost more than they give
# (several times slower on a loaded 2-core machine). edpairs' own pool is unaffected
# (EDPAIRS_NUM_THREADS), so the kernels still run multi-threaded.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# When a property test fails, hypothesis lazily imports libcst (to write a patch of the failing
# example); in some environments that import emits a DeprecationWarning, which the suite's
# ``filterwarnings = error`` would turn into an INTERNALERROR hiding the real failure. Import
# it once here, with warnings silenced, so a failure is always reported as a failure.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    try:
        import libcst.metadata  # noqa: F401
    except ImportError:
        pass

# Bounded property tests: the CPU suite must stay fast. EDPAIRS_HYPOTHESIS_PROFILE=thorough
# runs more examples locally.
settings.register_profile(
    "default",
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("EDPAIRS_HYPOTHESIS_PROFILE", "default"))

LIBRARIES = ("numpy", "torch")


@pytest.fixture(params=LIBRARIES)
def xp(request) -> str:
    """The array library the inputs are given in ('numpy' or 'torch' on the CPU)."""
    if request.param == "torch":
        pytest.importorskip("torch")
    return request.param


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's id, so every test has its own reproducible data."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def restore_threads():
    """Restores edpairs' CPU thread count after a test that changes it."""
    import edpairs

    before = edpairs.get_num_threads()
    yield before
    edpairs.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """torch limited to one thread for the test (its pool costs more than it gives on small
    models on a loaded 2-core machine); the previous count is restored."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
