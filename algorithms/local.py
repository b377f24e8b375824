"""Local minibatch SGD on one client's data, shared by every algorithm.

The schedule depends only on the client's own data and key, never on how much padding it
carries: each epoch visits the client's ``num_examples`` real rows in a random order drawn
from (client key, epoch) alone, and runs ``ceil(num_examples / batch_size)`` steps
(``floor`` with ``drop_remainder``). Steps past the client's own schedule are no-ops. So a
client padded to ``n_max`` rows inside a vmapped cohort trains exactly as it would alone.

The shuffles are keyed Feistel permutations (``epoch_orders``), not sorts: on a CPU a
vmapped ``jax.random.permutation`` or ``argsort`` of random keys costs a sort per client
and epoch, which was a quarter of a small model's round; a Feistel network is a few
integer operations per row, all epochs at once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax.tree_utils as otu

from nordfl.algorithms import _checks
from nordfl.algorithms.base import ClientData, ClientMetrics, Params, PRNGKey, PyTree

GradFn = Callable[[Params, PyTree, jax.Array], tuple[jax.Array, Params]]
"""``grad_fn(params, batch, mask) -> (loss, grads)``."""


WEIGHTINGS = ("num_examples", "uniform")
"""How a client's update is weighted in the cohort mean: by its examples (FedAvg, McMahan
et al. 2017) or equally (SCAFFOLD, Karimireddy et al. 2020)."""


class LocalSchedule(NamedTuple):
    """Static hyperparameters of a client's local SGD."""

    learning_rate: float
    num_epochs: int
    batch_size: int
    drop_remainder: bool = False


def local_schedule(owner: str, client_lr, num_epochs, batch_size, drop_remainder: bool = False) -> LocalSchedule:
    """Validates the local hyperparameters every algorithm shares; errors name ``owner``."""
    _checks.check_positive(owner, "client_lr", client_lr)
    _checks.check_positive_int(owner, "num_epochs", num_epochs)
    _checks.check_positive_int(owner, "batch_size", batch_size)
    return LocalSchedule(client_lr, num_epochs, batch_size, bool(drop_remainder))


def steps_per_epoch(num_examples, batch_size: int, drop_remainder: bool):
    """Local steps in one epoch over ``num_examples`` rows (works on ints and int arrays)."""
    if drop_remainder:
        return num_examples // batch_size
    return (num_examples + batch_size - 1) // batch_size


FEISTEL_ROUNDS = 8
"""Rounds of the shuffle's Feistel network. Four suffice for large domains (Luby-Rackoff);
tiny ones (2-bit halves for 3 or 4 rows) need about eight to draw every order equally often."""


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32"): the Feistel round function."""
    x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
    x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _feistel(x: jax.Array, half_bits: jax.Array, round_keys: jax.Array) -> jax.Array:
    """A bijection of ``[0, 4**half_bits)``: balanced Feistel rounds on the two halves of ``x``."""
    mask = (jnp.uint32(1) << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for r in range(FEISTEL_ROUNDS):
        left, right = right, left ^ (_mix32(right ^ round_keys[r]) & mask)
    return (left << half_bits) | right


def shuffle_order(round_keys: jax.Array, num_examples: jax.Array, num_rows: int) -> jax.Array:
    """A random order of rows ``0..num_examples-1``, followed by the padding rows in place.

    A keyed Feistel network permutes ``[0, 4**h)``, the smallest such range holding the
    ``num_examples`` real rows; its values below ``num_examples``, kept in sequence, are the
    order. (Filtering rather than cycle walking: walks inherit the network's parity and
    favour some orders of 5 or 6 rows.) The order depends only on ``round_keys`` and
    ``num_examples``, never on ``num_rows``.

    Args:
      round_keys: uint32 [FEISTEL_ROUNDS].
      num_examples: int scalar, the real rows.
      num_rows: static padded length.

    Returns:
      int32 [num_rows].
    """
    n = jnp.maximum(num_examples, 1).astype(jnp.uint32)
    half_bits = (33 - jax.lax.clz(n - 1)) // 2  # ceil(ceil(log2 n) / 2)
    static_half_bits = (max(num_rows - 1, 0).bit_length() + 1) // 2
    candidates = jnp.arange(4 ** static_half_bits, dtype=jnp.uint32)
    values = _feistel(candidates, half_bits, round_keys)
    keep = (candidates < (jnp.uint32(1) << (2 * half_bits))) & (values < n)
    slot = jnp.where(keep, jnp.cumsum(keep.astype(jnp.int32)) - 1, num_rows)  # num_rows: dropped
    index = jnp.arange(num_rows, dtype=jnp.int32)
    order = jnp.zeros(num_rows, jnp.int32).at[slot].set(values.astype(jnp.int32), mode="drop")
    return jnp.where(index < num_examples, order, index)


def epoch_orders(key: PRNGKey, num_epochs: int, num_examples: jax.Array, num_rows: int) -> jax.Array:
    """Every epoch's row order for one client: int32 [num_epochs, num_rows] (see ``shuffle_order``)."""
    round_keys = jax.random.bits(key, (num_epochs, FEISTEL_ROUNDS), jnp.uint32)
    return jax.vmap(shuffle_order, in_axes=(0, None, None))(round_keys, num_examples, num_rows)


def step_counts(data: ClientData, schedule: LocalSchedule) -> tuple[int, int, jax.Array]:
    """(padded rows, steps per epoch over them, the client's own steps per epoch): the loop's bounds."""
    num_rows = jax.tree_util.tree_leaves(data.examples)[0].shape[0]
    max_steps = steps_per_epoch(num_rows, schedule.batch_size, schedule.drop_remainder)
    return num_rows, max_steps, steps_per_epoch(data.num_examples, schedule.batch_size, schedule.drop_remainder)


def sgd_step(carry, loss, grads, active, learning_rate: float):
    """One SGD step on the carry ``(params, loss_sum, num_steps)``, taken only where ``active``."""
    params, loss_sum, num_steps = carry
    stepped = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads)
    params = otu.tree_where(active, stepped, params)
    return params, loss_sum + jnp.where(active, loss, 0.0), num_steps + active.astype(jnp.int32)


def sgd_init(params: Params):
    """The loop's starting carry: ``(params, loss_sum 0.0, num_steps 0)``."""
    return params, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)


def sgd_result(carry) -> tuple[Params, ClientMetrics]:
    """The final params and ``ClientMetrics`` (mean loss over the steps taken) from the loop's carry."""
    params, loss_sum, num_steps = carry
    return params, ClientMetrics(train_loss=loss_sum / jnp.maximum(num_steps, 1).astype(jnp.float32), num_steps=num_steps)


def local_sgd(
    grad_fn: GradFn,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    schedule: LocalSchedule,
    epochs_to_run: Optional[jax.Array] = None,
) -> tuple[Params, ClientMetrics]:
    """Runs ``schedule.num_epochs`` epochs of plain SGD (or only ``epochs_to_run`` of them).

    Args:
      grad_fn: ``(params, batch, mask) -> (loss, grads)``; algorithms put their local
        objective (proximal term) or gradient correction (control variates) here.
      params: starting parameters.
      data: the client's examples, possibly padded.
      key: the client's PRNG key for this round.
      schedule: step size, epochs, batch size, whether to drop each epoch's last partial batch.
      epochs_to_run: int scalar <= num_epochs for partial work; ``None`` runs all.

    Returns:
      The final parameters and ``ClientMetrics`` (mean loss over the steps taken, and
      their number). A client with no data, or asked for no work, returns ``params``
      unchanged with ``num_steps == 0``.
    """
    learning_rate, num_epochs, batch_size, drop_remainder = schedule
    num_rows, max_steps, own_steps = step_counts(data, schedule)
    if epochs_to_run is None:
        epochs_to_run = num_epochs
    # Pad the orders so every step reads a full batch; masked rows never count.
    padding = max(max_steps * batch_size - num_rows, 0)
    orders = jnp.pad(epoch_orders(key, num_epochs, data.num_examples, num_rows), ((0, 0), (0, padding)))
    orders = orders.reshape(num_epochs, max_steps, batch_size)

    def run_epoch(carry, inputs):
        epoch, batches = inputs

        def run_step(carry, inputs):
            step, rows = inputs
            mask = step * batch_size + jnp.arange(batch_size) < data.num_examples
            batch = jax.tree_util.tree_map(lambda a: a[rows], data.examples)
            loss, grads = grad_fn(carry[0], batch, mask)
            active = (epoch < epochs_to_run) & (step < own_steps)
            return sgd_step(carry, loss, grads, active, learning_rate), None

        carry, _ = jax.lax.scan(run_step, carry, (jnp.arange(max_steps), batches))
        return carry, None

    carry, _ = jax.lax.scan(run_epoch, sgd_init(params), (jnp.arange(num_epochs), orders))
    return sgd_result(carry)


def client_weight(num_examples: jax.Array, num_steps: jax.Array, weighting: str) -> jax.Array:
    """The client's aggregation weight: 0 if it took no local step, else per ``weighting``."""
    base = num_examples.astype(jnp.float32) if weighting == "num_examples" else jnp.ones((), jnp.float32)
    return jnp.where(num_steps > 0, base, jnp.zeros((), jnp.float32))
