"""Losses and metrics that honour example masks (padding rows never count).

All take ``mask`` bool [B]; a batch with no real row gives 0 loss rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    count = jnp.sum(mask).astype(values.dtype)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(count, 1.0)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of ``logits`` [B, C] against integer ``labels`` [B] over masked rows."""
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return _masked_mean(per_example, mask)


def accuracy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Fraction of masked rows whose argmax logit is the label."""
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    return _masked_mean(correct, mask)


def roc_auc(scores: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
    """Area under the ROC curve for binary ``labels`` (1 = positive), ties counted half.

    The Mann-Whitney statistic from mid-ranks, O(B log B). NaN when the masked rows hold
    only one class (AUC is undefined there).
    """
    scores = scores.astype(jnp.float32)
    positive = mask & (labels == 1)
    negative = mask & (labels != 1)
    ranked = jnp.sort(jnp.where(mask, scores, jnp.inf))  # padding sorts last
    below = jnp.searchsorted(ranked, scores, side="left").astype(jnp.float32)
    not_above = jnp.searchsorted(ranked, scores, side="right").astype(jnp.float32)
    mid_rank = 0.5 * (below + not_above + 1.0)  # 1-based rank, ties averaged
    num_pos = jnp.sum(positive).astype(jnp.float32)
    num_neg = jnp.sum(negative).astype(jnp.float32)
    rank_sum = jnp.sum(jnp.where(positive, mid_rank, 0.0))
    u = rank_sum - num_pos * (num_pos + 1.0) / 2.0
    return u / (num_pos * num_neg)


def mean_squared_error(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``(predictions - targets)**2`` over masked rows (``predictions`` and ``targets`` [B])."""
    return _masked_mean(jnp.square(predictions - targets), mask)


def root_mean_squared_error(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Square root of ``mean_squared_error``: the typical error, in the outcome's unit."""
    return jnp.sqrt(mean_squared_error(predictions, targets, mask))


def mean_absolute_error(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``|predictions - targets|`` over masked rows."""
    return _masked_mean(jnp.abs(predictions - targets), mask)


def r_squared(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Coefficient of determination 1 - SSE/SST over the masked rows, SST about those rows' mean target.

    NaN when the masked rows' targets do not vary (or there are none): R² is undefined there.
    """
    mean = _masked_mean(targets, mask)
    sse = jnp.sum(jnp.where(mask, jnp.square(predictions - targets), 0.0))
    sst = jnp.sum(jnp.where(mask, jnp.square(targets - mean), 0.0))
    return jnp.where(sst > 0, 1.0 - sse / jnp.where(sst > 0, sst, 1.0), jnp.nan)
