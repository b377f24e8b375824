"""Masked loss, accuracy and ROC AUC against plain NumPy."""

import jax.numpy as jnp
import numpy as np

from nordfl.tasks import accuracy, roc_auc, softmax_cross_entropy


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
