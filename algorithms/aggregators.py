"""Aggregators: how the cohort's updates become one ``Aggregate``.

``weighted_mean`` (default) is a weighted SUM divided once by the total weight, so it stays
compatible with secure aggregation. The robust ones (Yin et al., "Byzantine-Robust
Distributed Learning", ICML 2018) work coordinate-wise over the clients with non-zero
weight, unweighted: ``coordinate_median`` and ``trimmed_mean(beta)``, which drops the
``floor(beta * m)`` largest and smallest of the m values of each coordinate. Three more act on
whole updates: ``krum(byzantine, selected)`` keeps the updates closest to their neighbours,
``bulyan(byzantine)`` trims coordinate-wise among the updates Krum picks one by one, and
``centered_clipping(tau, iterations)`` bounds how far any one update moves the result.

An aggregator is *linear* (``is_linear``) when its aggregate is ``mean_of_sum`` of the
``weighted_sum`` of the updates: only then can the simulator stream chunk sums, DP-FedAvg
noise the sum, and secure aggregation reveal nothing but the sum. Each registered aggregator
declares it; callers check ``is_linear`` instead of naming ``weighted_mean``.

Every aggregator is ``(updates, weights) -> Aggregate``: ``updates`` is a pytree whose
leaves are stacked over clients on axis 0, ``weights`` is float32 [clients]. Clients of
weight 0 (padding, no data, dropped) contribute nothing; with none left, the mean is 0.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from nordfl import registry
from nordfl.algorithms import _checks
from nordfl.algorithms.base import Aggregate, Update

Aggregator = Callable[[Update, jax.Array], Aggregate]


def _per_client(values: jax.Array, leaf: jax.Array) -> jax.Array:
    """Reshapes a [clients] vector to broadcast against a [clients, ...] leaf."""
    return values.reshape(values.shape + (1,) * (leaf.ndim - 1))


def _num_clients(weights: jax.Array) -> jax.Array:
    return jnp.sum(weights > 0).astype(jnp.float32)


def weighted_sum(updates: Update, weights: jax.Array) -> Update:
    """``sum_i w_i u_i``, with clients of weight 0 left out even when their update is NaN or inf.

    The sum is one contraction over the client axis (a matrix-vector product, which XLA
    splits over the devices the clients are sharded on); a reduction of ``w * u`` ran at a
    thirtieth of its speed on CPU. Only if the sum is not finite is it redone with the
    clients of weight 0 masked out, so a NaN in the update of a client that does not count
    (dropped, padding) never reaches the sum.
    """

    def leaf_sum(u):
        fast = jnp.tensordot(weights, u, axes=1)

        def masked():
            return jnp.tensordot(weights, jnp.where(_per_client(weights > 0, u), u, 0.0), axes=1)

        return jax.lax.cond(jnp.all(jnp.isfinite(fast)), lambda: fast, masked)

    return jax.tree_util.tree_map(leaf_sum, updates)


def mean_of_sum(update_sum: Update, weights: jax.Array) -> Aggregate:
    """The ``weighted_mean`` of clients whose ``weighted_sum`` is ``update_sum`` and weights ``weights``.

    The simulator adds the sums of its chunks of clients as they finish and calls this once,
    so it never holds every client's update at the same time.
    """
    total = jnp.sum(weights)
    safe_total = jnp.where(total > 0, total, 1.0)
    mean = jax.tree_util.tree_map(lambda s: s / safe_total, update_sum)
    return Aggregate(mean, total, _num_clients(weights))


def weighted_mean(updates: Update, weights: jax.Array) -> Aggregate:
    """``sum_i w_i u_i / sum_i w_i``; 0 when the weights sum to 0 (see ``weighted_sum``)."""
    return mean_of_sum(weighted_sum(updates, weights), weights)


weighted_mean.is_linear = True


def is_linear(aggregate: Aggregator) -> bool:
    """Whether ``aggregate`` is ``mean_of_sum(weighted_sum(...))`` (see the module docstring)."""
    return bool(getattr(aggregate, "is_linear", False))


def _sorted_valid(u: jax.Array, weights: jax.Array) -> jax.Array:
    """Sorts each coordinate over clients, clients of weight 0 last (as +inf)."""
    return jnp.sort(jnp.where(_per_client(weights > 0, u), u, jnp.inf), axis=0)


def coordinate_median(updates: Update, weights: jax.Array) -> Aggregate:
    """Coordinate-wise median over the clients of non-zero weight (mean of the middle two if even)."""
    m = jnp.sum(weights > 0).astype(jnp.int32)

    def leaf_median(u):
        s = _sorted_valid(u, weights)
        low = jax.lax.dynamic_index_in_dim(s, jnp.maximum((m - 1) // 2, 0), axis=0, keepdims=False)
        high = jax.lax.dynamic_index_in_dim(s, m // 2, axis=0, keepdims=False)
        return jnp.where(m > 0, 0.5 * (low + high), 0.0)

    return Aggregate(jax.tree_util.tree_map(leaf_median, updates), jnp.sum(weights), _num_clients(weights))


def trimmed_mean(beta: float = 0.1) -> Aggregator:
    """Coordinate-wise beta-trimmed mean over the clients of non-zero weight.

    Args:
      beta: fraction trimmed from EACH end, 0 <= beta < 0.5.
    """
    _checks.check_nonnegative("trimmed_mean", "beta", beta)
    if not beta < 0.5:
        raise ValueError(f"trimmed_mean: beta must be < 0.5 (it trims from both ends), got {beta!r}")

    def aggregate(updates: Update, weights: jax.Array) -> Aggregate:
        m = jnp.sum(weights > 0).astype(jnp.int32)
        k = jnp.floor(beta * m.astype(jnp.float32)).astype(jnp.int32)
        kept = m - 2 * k

        def leaf_trimmed(u):
            s = _sorted_valid(u, weights)
            pos = _per_client(jnp.arange(u.shape[0]), u)
            keep = (pos >= k) & (pos < m - k)
            total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
            return jnp.where(kept > 0, total / jnp.maximum(kept, 1).astype(u.dtype), 0.0)

        return Aggregate(jax.tree_util.tree_map(leaf_trimmed, updates), jnp.sum(weights), _num_clients(weights))

    return aggregate


def _flatten(updates: Update) -> jax.Array:
    """Every client's update as one row: [clients, all coordinates]."""
    leaves = jax.tree_util.tree_leaves(updates)
    return jnp.concatenate([leaf.reshape(leaf.shape[0], -1).astype(jnp.float32) for leaf in leaves], axis=1)


def _unflatten(vector: jax.Array, updates: Update) -> Update:
    """One client's row back into the update's structure (the inverse of ``_flatten`` for one client)."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    out, start = [], 0
    for leaf in leaves:
        size = leaf[0].size
        out.append(vector[start:start + size].reshape(leaf.shape[1:]).astype(leaf.dtype))
        start += size
    return treedef.unflatten(out)


def _squared_distances(x: jax.Array) -> jax.Array:
    squared = jnp.sum(x * x, axis=1)
    return jnp.maximum(squared[:, None] + squared[None, :] - 2 * x @ x.T, 0.0)


def _krum_scores(distance: jax.Array, among: jax.Array, byzantine: int) -> jax.Array:
    """Each client's Krum score among the clients ``among`` (bool): the sum of its squared distances to its
    ``count - byzantine - 2`` nearest others there (at least 1); +inf for clients not among them."""
    others = among[:, None] & among[None, :] & ~jnp.eye(distance.shape[0], dtype=bool)
    ranked = jnp.sort(jnp.where(others, distance, jnp.inf), axis=1)
    neighbours = jnp.maximum(jnp.sum(among).astype(jnp.int32) - byzantine - 2, 1)
    near = jnp.arange(distance.shape[0])[None, :] < neighbours
    return jnp.where(among, jnp.sum(jnp.where(near & jnp.isfinite(ranked), ranked, 0.0), axis=1), jnp.inf)


def krum(byzantine: int = 1, selected: int = 1) -> Aggregator:
    """(Multi-)Krum (Blanchard et al., NeurIPS 2017): each client's score is the sum of squared distances
    to its ``m - byzantine - 2`` nearest others (m: clients of non-zero weight); the mean of the ``selected``
    lowest-scoring updates is the aggregate (``selected=1``: Krum). Tolerates ``byzantine`` < (m - 2) / 2.
    """
    _checks.check_int_at_least("krum", "byzantine", byzantine, 0)
    _checks.check_int_at_least("krum", "selected", selected, 1)

    def aggregate(updates: Update, weights: jax.Array) -> Aggregate:
        x = _flatten(updates)
        valid = weights > 0
        m = jnp.sum(valid).astype(jnp.int32)
        score = _krum_scores(_squared_distances(x), valid, byzantine)
        rank = jnp.argsort(jnp.argsort(score))
        chosen = valid & (rank < jnp.minimum(selected, m))
        mean = jnp.sum(jnp.where(chosen[:, None], x, 0.0), axis=0) / jnp.maximum(jnp.sum(chosen), 1).astype(x.dtype)
        return Aggregate(_unflatten(mean, updates), jnp.sum(weights), _num_clients(weights))

    return aggregate


def bulyan(byzantine: int = 1) -> Aggregator:
    """Bulyan (El Mhamdi, Guerraoui & Rouault, ICML 2018): Krum picks ``theta = m - 2 * byzantine`` updates
    one at a time (each pick leaves the pool before the next Krum); then each coordinate is the mean of the
    ``theta - 2 * byzantine`` picked values closest to the picked values' median. Meant for m >= 4f + 3;
    with fewer clients both counts stay at least 1."""
    _checks.check_int_at_least("bulyan", "byzantine", byzantine, 0)

    def aggregate(updates: Update, weights: jax.Array) -> Aggregate:
        x = _flatten(updates)
        n = x.shape[0]
        valid = weights > 0
        m = jnp.sum(valid).astype(jnp.int32)
        theta = jnp.maximum(m - 2 * byzantine, 1)
        distance = _squared_distances(x)

        def pick(i, chosen):
            score = _krum_scores(distance, valid & ~chosen, byzantine)
            tied = score <= jnp.min(score) * (1 + 1e-5)  # mutual nearest neighbours tie: the lower index wins
            best = jnp.argmax(tied)
            return jnp.where(i < theta, chosen.at[best].set(True), chosen)

        chosen = jax.lax.fori_loop(0, n, pick, jnp.zeros(n, bool))
        ordered = jnp.sort(jnp.where(chosen[:, None], x, jnp.inf), axis=0)
        median = 0.5 * (ordered[(theta - 1) // 2] + ordered[theta // 2])
        beta = jnp.maximum(theta - 2 * byzantine, 1)
        closest = jnp.argsort(jnp.where(chosen[:, None], jnp.abs(x - median[None, :]), jnp.inf), axis=0)
        nearest = jnp.take_along_axis(x, closest, axis=0)
        keep = (jnp.arange(n) < beta)[:, None]
        mean = jnp.sum(jnp.where(keep, nearest, 0.0), axis=0) / beta.astype(x.dtype)
        mean = jnp.where(m > 0, mean, 0.0)
        return Aggregate(_unflatten(mean, updates), jnp.sum(weights), _num_clients(weights))

    return aggregate


def centered_clipping(tau: float = 1.0, iterations: int = 3) -> Aggregator:
    """Centred clipping (Karimireddy, He & Jaggi, ICML 2021), started from the coordinate median:
    ``v <- v + mean_i (x_i - v) * min(1, tau / ||x_i - v||)``, ``iterations`` times, over clients of non-zero weight.
    No client moves the aggregate by more than ``tau / m`` per iteration."""
    _checks.check_positive("centered_clipping", "tau", tau)
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"centered_clipping: iterations must be an integer >= 1, got {iterations!r}")

    def aggregate(updates: Update, weights: jax.Array) -> Aggregate:
        x = _flatten(updates)
        valid = weights > 0
        m = jnp.maximum(jnp.sum(valid), 1).astype(x.dtype)
        v = _flatten(jax.tree_util.tree_map(lambda leaf: leaf[None], coordinate_median(updates, weights).mean))[0]
        for _ in range(iterations):
            diff = jnp.where(valid[:, None], x - v[None, :], 0.0)
            norm = jnp.sqrt(jnp.sum(diff * diff, axis=1))
            scale = jnp.minimum(1.0, tau / jnp.maximum(norm, 1e-12))
            v = v + jnp.sum(diff * scale[:, None], axis=0) / m
        return Aggregate(_unflatten(v, updates), jnp.sum(weights), _num_clients(weights))

    return aggregate


registry.register("aggregator", "weighted_mean", is_linear=is_linear(weighted_mean))(lambda: weighted_mean)
registry.register("aggregator", "median", is_linear=False)(lambda: coordinate_median)
registry.register("aggregator", "trimmed_mean", is_linear=False)(trimmed_mean)
registry.register("aggregator", "krum", is_linear=False)(krum)
registry.register("aggregator", "bulyan", is_linear=False)(bulyan)
registry.register("aggregator", "centered_clipping", is_linear=False)(centered_clipping)


def linear_aggregators() -> tuple[str, ...]:
    """The names of the registered aggregators that declare ``is_linear``."""
    return tuple(name for name in registry.names("aggregator") if registry.lookup("aggregator", name).properties.get("is_linear"))


def aggregator(name: str, **hyperparameters) -> Aggregator:
    """Builds a registered aggregator by name: ``weighted_mean``, ``median``, ``trimmed_mean(beta=...)``, or a plugin's."""
    entry = registry.lookup("aggregator", name, field="aggregator")
    _checks.check_keywords(f"aggregator.{name}", entry.builder, hyperparameters)
    return entry.builder(**hyperparameters)
