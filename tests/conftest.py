"""Shared fixtures. JAX runs with strict dtype and rank promotion, so silent upcasts and
accidental broadcasts in library code fail the tests (the equinox habit)."""

import atexit
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

# One compilation cache for the session and the processes it starts (nordfl-sim, sites,
# coordinators): many tests compile the same programs, and XLA compiles dominate the suite.
_CACHE = tempfile.mkdtemp(prefix="nordfl-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)

from nordfl.tasks import Examples, logistic_regression, softmax_cross_entropy  # noqa: E402

from tests.reference import NUM_CLASSES, NUM_FEATURES  # noqa: E402


@pytest.fixture(scope="session")
def softmax_model():
    """A small multinomial logistic regression with non-trivial initial params."""
    model = logistic_regression(NUM_FEATURES, NUM_CLASSES, seed=1)
    rng = np.random.default_rng(7)
    params = {
        "linear": {
            "kernel": rng.normal(0, 0.5, (NUM_FEATURES, NUM_CLASSES)).astype(np.float32),
            "bias": rng.normal(0, 0.5, NUM_CLASSES).astype(np.float32),
        }
    }
    params = jax.tree_util.tree_map(jax.numpy.asarray, params)

    def loss_fn(p, batch: Examples, mask):
        return softmax_cross_entropy(model.apply(p, batch.x), batch.y, mask)

    return model, params, loss_fn


@pytest.fixture
def clean_registry():
    """Entries a test registers, and the plugin modules that registered them, are dropped
    afterwards, so tests do not leak plugins into each other."""
    from nordfl import registry

    saved = {kind: dict(found) for kind, found in registry._ENTRIES.items()}
    yield
    added = {entry.module.split(".")[0] for kind, found in registry._ENTRIES.items()
             for name, entry in found.items() if name not in saved[kind]}
    for kind, found in saved.items():
        registry._ENTRIES[kind].clear()
        registry._ENTRIES[kind].update(found)
    for name in [m for m in sys.modules if m.split(".")[0] in added]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Consoles (rich) in a test and in the processes it starts print each line whole: tests read paths in their
    output, and a narrow console folds a long path mid-word. (Per test, so pytest's own report keeps its width.)"""
    monkeypatch.setenv("COLUMNS", "1000")
