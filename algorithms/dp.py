"""Differential privacy inside the algorithms, as pure JAX.

Two options any algorithm can take (docs/privacy.md states the guarantees):

- **DP-SGD at the site** (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016):
  a gradient transform of the one local loop (``local.local_sgd`` with a ``LocalSchedule``
  whose ``dp`` is set): it replaces the shuffled minibatches by Poisson sampling (each
  step includes every real row independently with probability ``q = min(1, B / n)``), clips
  each example's gradient to L2 norm ``C``, adds N(0, (z C)^2) to their sum and divides by the
  expected batch size ``q n``. Steps per epoch stay ``ceil(n / B)`` as without DP, so epochs
  mean the same. ``algorithms.accounting`` accounts exactly this sampling.
- **DP-FedAvg** (McMahan et al., "Learning Differentially Private Recurrent Language Models",
  ICLR 2018): ``with_update_dp`` wraps an algorithm so each site clips its whole update to
  L2 norm ``C`` and weighs 1; the server divides the sum by the planned cohort size ``m``
  (a fixed denominator) after Gaussian noise of std ``z C`` went into the sum: once at the
  server (``central``), or ``N(0, (z C)^2 / m)`` from each of the m sites (``distributed``:
  with secure aggregation nothing un-noised leaves a site).

Per-example gradients are ``jax.vmap(jax.value_and_grad(loss))`` over the rows of a physical
batch; the simulator vmaps the whole thing over clients once more.

Cost: a step draws q for all ``n_max`` rows of the (padded) client, gathers the sampled rows
to the front (a cumulative sum, no sort) and computes per-example gradients on chunks of
``physical_batch_size(B) = B + ceil(4 sqrt(B))`` rows, in a ``while_loop`` until every
sampled row is in (nearly always one chunk). So per-example work follows the expected
batch, not n; the O(n_max) sampling per step is cheap for hospital-sized sites but grows as
n^2 / B per epoch for very large clients.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu

from nordfl.algorithms import _checks
from nordfl.algorithms.base import Aggregate, Algorithm, ClientData, ClientOutput, LossFn, Params, PRNGKey, PyTree

DP_MODES = ("none", "sgd", "update")
NOISE_PLACEMENTS = ("central", "distributed")

PrivateGradFn = Callable[[Params, PyTree, jax.Array, PRNGKey], tuple[jax.Array, Params]]
"""``grad_fn(params, examples, selected, key) -> (loss, noisy grads)``: ``examples`` are ALL the
client's rows [n_max, ...], ``selected`` bool [n_max] the rows this step sampled."""


class DPSGD(NamedTuple):
    """DP-SGD hyperparameters: per-example L2 clip bound C, noise multiplier z (std z C on the sum)."""

    l2_clip: float
    noise_multiplier: float


def dp_sgd(l2_clip: float, noise_multiplier: float, owner: str = "dp") -> DPSGD:
    """Checked ``DPSGD`` options; errors name ``owner``."""
    _checks.check_positive(owner, "clip", l2_clip)
    _checks.check_nonnegative(owner, "noise_multiplier", noise_multiplier)
    return DPSGD(float(l2_clip), float(noise_multiplier))


def sampling_rate(num_examples, batch_size: int):
    """Poisson sampling rate of a site with ``num_examples`` rows: q = min(1, B / n).

    On a JAX array: the float32 threshold the local loop compares its uniform draws with. On a
    Python int: the probability those draws ACTUALLY include a row, what the accountant must
    use: float32 uniforms are multiples of 2^-23, so P(u < q32) = ceil(q32 * 2^23) / 2^23
    (at most 1.2e-7 above q).
    """
    if isinstance(num_examples, jax.Array):
        n = jnp.maximum(num_examples, 1).astype(jnp.float32)
        return jnp.minimum(jnp.float32(1.0), jnp.float32(batch_size) / n)
    q32 = min(np.float32(1.0), np.float32(batch_size) / np.float32(max(int(num_examples), 1)))
    return math.ceil(float(q32) * 2**23) / 2**23


def physical_batch_size(batch_size: int) -> int:
    """Rows per per-example-gradient chunk: the expected batch B plus 4 standard deviations."""
    return batch_size + math.ceil(4 * math.sqrt(batch_size))


def _global_norms(grads: Params) -> jax.Array:
    """Per-example L2 norms over the whole pytree: [P]."""
    squares = [jnp.sum(jnp.reshape(g * g, (g.shape[0], -1)), axis=1) for g in jax.tree_util.tree_leaves(grads)]
    return jnp.sqrt(sum(squares))


def clipped_gradient_sum(loss_fn: LossFn, params: Params, batch: PyTree, valid: jax.Array, l2_clip: float):
    """Sum over the valid rows of per-example gradients, each clipped to L2 norm ``l2_clip``.

    Args:
      loss_fn: ``(params, batch, mask) -> scalar`` masked mean loss; called on single rows.
      batch: pytree of arrays with leading axis P.
      valid: bool [P].
      l2_clip: C; a gradient g becomes ``g / max(1, |g| / C)``.

    Returns:
      ``(loss_sum, grad_sum, norms)``: summed loss of the valid rows, the clipped sum (shaped
      like params) and the per-example norms before clipping [P].
    """

    def one(row):
        single = jax.tree_util.tree_map(lambda a: a[None], row)
        return jax.value_and_grad(loss_fn)(params, single, jnp.ones((1,), bool))

    losses, grads = jax.vmap(one)(batch)
    norms = _global_norms(grads)
    factors = jnp.where(valid, 1.0 / jnp.maximum(1.0, norms / l2_clip), 0.0)
    grad_sum = jax.tree_util.tree_map(lambda g: jnp.tensordot(factors, g, axes=1), grads)
    return jnp.sum(jnp.where(valid, losses, 0.0)), grad_sum, norms


def add_gaussian_noise(tree: PyTree, std, key: PRNGKey) -> PyTree:
    """``tree`` plus independent N(0, std^2) on every coordinate."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [x + std * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, noisy)


def private_value_and_grad(loss_fn: LossFn, options: DPSGD, denominator: jax.Array, physical: int) -> PrivateGradFn:
    """DP-SGD's gradient: ``(sum of clipped per-example grads over the selected rows + N(0, (zC)^2)) / denominator``.

    The selected rows are gathered to the front (cumulative-sum compaction) and processed in
    chunks of ``physical`` rows until all are in, so the result does not depend on
    ``physical``. The returned loss is the mean loss of the selected rows (a metric, not noised).
    """

    def grad_fn(params, examples, selected, key):
        num_rows = selected.shape[0]
        count = jnp.sum(selected.astype(jnp.int32))
        slot = jnp.where(selected, jnp.cumsum(selected.astype(jnp.int32)) - 1, num_rows)
        width = math.ceil(num_rows / physical) * physical
        order = jnp.zeros(width, jnp.int32).at[slot].set(jnp.arange(num_rows, dtype=jnp.int32), mode="drop")

        def chunk(carry):
            k, loss_sum, grad_sum = carry
            position = k * physical + jnp.arange(physical, dtype=jnp.int32)
            rows = jax.lax.dynamic_slice_in_dim(order, k * physical, physical)
            batch = jax.tree_util.tree_map(lambda a: a[rows], examples)
            chunk_loss, chunk_grads, _ = clipped_gradient_sum(loss_fn, params, batch, position < count, options.l2_clip)
            return k + 1, loss_sum + chunk_loss, otu.tree_add(grad_sum, chunk_grads)

        init = (jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32), otu.tree_zeros_like(params))
        _, loss_sum, grad_sum = jax.lax.while_loop(lambda c: c[0] * physical < count, chunk, init)
        noisy = add_gaussian_noise(grad_sum, options.noise_multiplier * options.l2_clip, key)
        grads = otu.tree_scale(1.0 / denominator, noisy)
        return loss_sum / jnp.maximum(count, 1).astype(jnp.float32), grads

    return grad_fn


# ----------------------------------------------------------------------------- DP-FedAvg


class UpdateDP(NamedTuple):
    """DP-FedAvg hyperparameters: update clip C, noise multiplier z, noise placement, planned cohort size m."""

    l2_clip: float
    noise_multiplier: float
    placement: str
    expected_clients: int


def update_dp(l2_clip: float, noise_multiplier: float, placement: str, expected_clients: int, owner: str = "dp") -> UpdateDP:
    """Checked ``UpdateDP`` options; errors name ``owner``."""
    _checks.check_positive(owner, "clip", l2_clip)
    _checks.check_nonnegative(owner, "noise_multiplier", noise_multiplier)
    _checks.check_choice(owner, "noise", placement, NOISE_PLACEMENTS)
    _checks.check_positive_int(owner, "expected_clients", expected_clients)
    return UpdateDP(float(l2_clip), float(noise_multiplier), placement, int(expected_clients))


def clip_update(update: PyTree, l2_clip: float) -> PyTree:
    """The whole update scaled to L2 norm at most ``l2_clip`` (all of its leaves together)."""
    return otu.tree_scale(1.0 / jnp.maximum(1.0, otu.tree_norm(update) / l2_clip), update)


def with_update_dp(algorithm: Algorithm, options: UpdateDP, noise_seed: int = 0) -> Algorithm:
    """``algorithm`` as DP-FedAvg: clipped updates, uniform weights, a fixed denominator, Gaussian noise.

    Sites: the update (every leaf, e.g. SCAFFOLD's control delta too) is clipped to
    ``l2_clip`` jointly; the weight is 1 if the site trained, else 0; with ``distributed``
    noise the site adds N(0, (z C)^2 / m) from its own ``key`` (the runtime must feed that
    key site-secret entropy, or the coordinator could subtract the noise).
    Server: from the weighted mean (a sum over the total weight) it rebuilds the sum, adds
    N(0, (z C)^2) with ``central`` noise (key: the 64-bit ``noise_seed`` folded with the round;
    keep the seed secret at the coordinator), divides by ``m`` and hands that to the inner
    ``server_update``. Distributed noise carries the full (z C)^2 only if all m sites
    contribute; account with fewer and the guarantee is weaker.

    Needs the weighted-mean aggregator (a sum), and an inner server state with a ``round``.
    """
    clip, z, placement, m = options
    if not isinstance(noise_seed, (int, np.integer)) or isinstance(noise_seed, bool) or not 0 <= noise_seed < 2**64:
        raise ValueError(f"dp: noise_seed must be an integer in [0, 2**64), got {noise_seed!r}")
    # All 64 bits of the seed make the key (jax.random.key keeps only 32 of a Python int without x64).
    seed_words = np.array([(int(noise_seed) >> 32) & 0xFFFFFFFF, int(noise_seed) & 0xFFFFFFFF], np.uint32)

    def client_update(message, client_state, data: ClientData, key: PRNGKey, num_epochs_to_run=None) -> ClientOutput:
        out = algorithm.client_update(message, client_state, data, key, num_epochs_to_run)
        update = clip_update(out.update, clip)
        if placement == "distributed":
            update = add_gaussian_noise(update, z * clip / math.sqrt(m), jax.random.fold_in(key, 0x0D9))
        weight = jnp.where(out.weight > 0, jnp.float32(1.0), jnp.float32(0.0))
        return out._replace(update=update, weight=weight)

    def server_update(state, aggregate: Aggregate):
        total = otu.tree_scale(aggregate.total_weight, aggregate.mean)
        if placement == "central":
            key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(seed_words)), state.round)
            total = add_gaussian_noise(total, z * clip, key)
        mean = otu.tree_scale(1.0 / m, total)
        return algorithm.server_update(state, aggregate._replace(mean=mean))

    return algorithm._replace(client_update=client_update, server_update=server_update)
