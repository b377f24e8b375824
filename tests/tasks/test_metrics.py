"""Masked losses and metrics (classification and regression) against plain NumPy."""

import jax.numpy as jnp
import numpy as np

from nordfl.tasks import (accuracy, mean_absolute_error, mean_squared_error, r_squared, roc_auc, root_mean_squared_error,
                          softmax_cross_entropy)


def _auc_pairwise(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_roc_auc_with_ties_and_padding():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 50).astype(np.float32)  # many ties
    labels = (rng.random(50) < 0.4).astype(np.int32)
    mask = np.arange(50) < 41
    scores[41:] = 100.0  # padding would dominate if it counted
    got = roc_auc(jnp.asarray(scores), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(got, _auc_pairwise(scores[:41], labels[:41]), rtol=1e-6)


def test_roc_auc_is_nan_with_one_class():
    assert np.isnan(roc_auc(jnp.ones(4), jnp.ones(4, jnp.int32), jnp.ones(4, bool)))


def test_cross_entropy_and_accuracy_ignore_padding():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(8, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 8).astype(np.int32)
    mask = np.array([1, 1, 1, 0, 1, 1, 0, 0], bool)
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    want_ce = -logp[np.arange(8), labels][mask].mean()
    want_acc = (logits.argmax(axis=1) == labels)[mask].mean()
    args = jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)
    np.testing.assert_allclose(softmax_cross_entropy(*args), want_ce, rtol=1e-6)
    np.testing.assert_allclose(accuracy(*args), want_acc, rtol=1e-6)
    empty = jnp.zeros(8, bool)
    assert float(softmax_cross_entropy(args[0], args[1], empty)) == 0.0


def test_regression_metrics_ignore_padding_against_numpy():
    rng = np.random.default_rng(2)
    predictions = rng.normal(3, 2, 12).astype(np.float32)
    targets = rng.normal(3, 2, 12).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1], bool)
    predictions[~mask] = 1e4  # padding would dominate if it counted
    p, t = predictions[mask].astype(np.float64), targets[mask].astype(np.float64)
    mse = np.mean((p - t) ** 2)
    args = jnp.asarray(predictions), jnp.asarray(targets), jnp.asarray(mask)
    np.testing.assert_allclose(mean_squared_error(*args), mse, rtol=1e-5)
    np.testing.assert_allclose(root_mean_squared_error(*args), np.sqrt(mse), rtol=1e-5)
    np.testing.assert_allclose(mean_absolute_error(*args), np.mean(np.abs(p - t)), rtol=1e-5)
    np.testing.assert_allclose(r_squared(*args), 1 - np.sum((p - t) ** 2) / np.sum((t - t.mean()) ** 2), rtol=1e-5)


def test_r_squared_is_nan_when_targets_do_not_vary_and_errors_are_zero_without_rows():
    assert np.isnan(r_squared(jnp.arange(4.0), jnp.ones(4), jnp.ones(4, bool)))
    assert np.isnan(r_squared(jnp.arange(4.0), jnp.arange(4.0), jnp.zeros(4, bool)))
    assert float(mean_squared_error(jnp.arange(4.0), jnp.zeros(4), jnp.zeros(4, bool))) == 0.0
