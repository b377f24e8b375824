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
from nordfl.algorithms.base import ClientData, ClientMetrics, LossFn, Params, PRNGKey
from nordfl.algorithms.dp import DPSGD, physical_batch_size, private_value_and_grad, sampling_rate


WEIGHTINGS = ("num_examples", "uniform")
"""How a client's update is weighted in the cohort mean: by its examples (FedAvg, McMahan
et al. 2017) or equally (SCAFFOLD, Karimireddy et al. 2020)."""


SAMPLINGS = ("shuffle", "poisson")
"""How a local step picks its rows: a fixed-size slice of the epoch's shuffle, or every real
row independently with probability ``q = min(1, B / n)`` (Poisson, what DP-SGD's accounting
assumes)."""


class LocalSchedule(NamedTuple):
    """How a client trains locally: the one value the simulator, the privacy accountant and
    the runtime read the local work from (an algorithm carries it as ``Algorithm.local``).

    ``dp`` (per-example clipping and noise, ``dp.dp_sgd``) makes each step's gradient
    DP-SGD's and needs ``sampling="poisson"``.
    """

    learning_rate: float
    num_epochs: int
    batch_size: int
    drop_remainder: bool = False
    sampling: str = "shuffle"
    dp: Optional[DPSGD] = None


def local_schedule(
    *,
    client_lr,
    num_epochs=1,
    batch_size=32,
    drop_remainder: bool = False,
    dp: Optional[DPSGD] = None,
    owner: str = "local",
) -> LocalSchedule:
    """A checked ``LocalSchedule``; DP-SGD (``dp``) samples Poisson batches. Errors name ``owner``.

    Example:
      >>> fedavg(loss_fn, local_schedule(client_lr=0.1, num_epochs=5, batch_size=10))
    """
    _checks.check_positive(owner, "client_lr", client_lr)
    _checks.check_positive_int(owner, "num_epochs", num_epochs)
    _checks.check_positive_int(owner, "batch_size", batch_size)
    if dp is not None and not isinstance(dp, DPSGD):
        raise ValueError(f"{owner}: dp must be a DPSGD (algorithms.dp.dp_sgd), got {dp!r}")
    return LocalSchedule(client_lr, num_epochs, batch_size, bool(drop_remainder), "shuffle" if dp is None else "poisson", dp)


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
    objective: LossFn,
    params: Params,
    data: ClientData,
    key: PRNGKey,
    schedule: LocalSchedule,
    epochs_to_run: Optional[jax.Array] = None,
    correction: Optional[Callable[[Params], Params]] = None,
) -> tuple[Params, ClientMetrics]:
    """Runs ``schedule.num_epochs`` epochs of SGD on ``objective`` (or only ``epochs_to_run`` of them).

    Every epoch has the client's own ``ceil(n / B)`` steps (``floor`` with ``drop_remainder``).
    A step's rows: the next ``B`` of the epoch's shuffle (``sampling="shuffle"``), or each real
    row with probability ``q = min(1, B / n)``, keyed by (epoch, step, row) and never by the
    padded shape (``"poisson"``). Its gradient: ``jax.value_and_grad(objective)`` on those rows,
    or with ``schedule.dp`` DP-SGD's clipped, noised sum over the expected batch ``q n``
    (``dp.private_value_and_grad``). ``correction`` then adjusts the gradient (SCAFFOLD adds
    ``c - c_i``; it depends on no example, so it is post-processing under DP).

    Args:
      objective: ``(params, batch, mask) -> scalar`` the client minimises (the task loss,
        plus FedProx's proximal term).
      params: starting parameters.
      data: the client's examples, possibly padded.
      key: the client's PRNG key for this round.
      schedule: the local schedule.
      epochs_to_run: int scalar <= num_epochs for partial work; ``None`` runs all.
      correction: ``grads -> grads`` applied to every step's gradient, or None.

    Returns:
      The final parameters and ``ClientMetrics`` (mean loss over the steps taken, and
      their number; under DP the mean loss of the sampled rows, a metric not noised). A
      client with no data, or asked for no work, returns ``params`` with ``num_steps == 0``.
    """
    num_epochs, batch_size = schedule.num_epochs, schedule.batch_size
    num_rows, max_steps, own_steps = step_counts(data, schedule)
    if epochs_to_run is None:
        epochs_to_run = num_epochs
    _checks.check_choice("local", "sampling", schedule.sampling, SAMPLINGS)
    value_and_grad = jax.value_and_grad(objective)
    if schedule.sampling == "shuffle":
        if schedule.dp is not None:
            raise ValueError("local: DP-SGD (schedule.dp) needs sampling='poisson', the sampling its accounting assumes")
        # Pad the orders so every step reads a full batch; masked rows never count.
        padding = max(max_steps * batch_size - num_rows, 0)
        orders = jnp.pad(epoch_orders(key, num_epochs, data.num_examples, num_rows), ((0, 0), (0, padding)))
        orders = orders.reshape(num_epochs, max_steps, batch_size)

        def step_gradient(params, epoch, step, rows):
            mask = step * batch_size + jnp.arange(batch_size) < data.num_examples
            return value_and_grad(params, jax.tree_util.tree_map(lambda a: a[rows], data.examples), mask)
    else:
        orders = jnp.zeros((num_epochs, max_steps, 0), jnp.int32)  # nothing to precompute
        q = sampling_rate(jnp.asarray(data.num_examples), batch_size)
        row_index = jnp.arange(num_rows, dtype=jnp.int32)
        real = row_index < data.num_examples
        if schedule.dp is None:
            gradient = lambda params, selected, noise_key: value_and_grad(params, data.examples, selected)  # noqa: E731
        else:
            denominator = q * jnp.maximum(data.num_examples, 1).astype(jnp.float32)
            private = private_value_and_grad(objective, schedule.dp, denominator, physical_batch_size(batch_size))
            gradient = lambda params, selected, noise_key: private(params, data.examples, selected, noise_key)  # noqa: E731

        def step_gradient(params, epoch, step, rows):
            del rows
            sample_key, noise_key = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, epoch), step))
            draws = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(sample_key, i)))(row_index)
            return gradient(params, real & (draws < q), noise_key)

    def run_epoch(carry, inputs):
        epoch, batches = inputs

        def run_step(carry, inputs):
            step, rows = inputs
            loss, grads = step_gradient(carry[0], epoch, step, rows)
            if correction is not None:
                grads = correction(grads)
            active = (epoch < epochs_to_run) & (step < own_steps)
            return sgd_step(carry, loss, grads, active, schedule.learning_rate), None

        carry, _ = jax.lax.scan(run_step, carry, (jnp.arange(max_steps, dtype=jnp.int32), batches))
        return carry, None

    carry, _ = jax.lax.scan(run_epoch, sgd_init(params), (jnp.arange(num_epochs, dtype=jnp.int32), orders))
    return sgd_result(carry)


def client_weight(num_examples: jax.Array, num_steps: jax.Array, weighting: str) -> jax.Array:
    """The client's aggregation weight: 0 if it took no local step, else per ``weighting``."""
    base = num_examples.astype(jnp.float32) if weighting == "num_examples" else jnp.ones((), jnp.float32)
    return jnp.where(num_steps > 0, base, jnp.zeros((), jnp.float32))
