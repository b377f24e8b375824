"""Local minibatch SGD on one client's data, shared by every algorithm.

The schedule depends only on the client's own data and key, never on how much padding it
carries: each epoch shuffles the client's ``num_examples`` real rows with a key derived
from (client key, epoch, row index), and runs ``ceil(num_examples / batch_size)`` steps
(``floor`` with ``drop_remainder``). Steps past the client's own schedule are no-ops. So a
client padded to ``n_max`` rows inside a vmapped cohort trains exactly as it would alone.
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


def epoch_permutation(key: PRNGKey, num_examples: jax.Array, num_rows: int) -> jax.Array:
    """A random order of rows ``0..num_examples-1``, followed by the padding rows.

    The order of the real rows depends only on ``key`` and the row indices, so it is the
    same whether the client is padded or not.

    Returns:
      int32 [num_rows] permutation.
    """
    rows = jnp.arange(num_rows)
    sort_keys = jax.vmap(lambda i: jax.random.bits(jax.random.fold_in(key, i), dtype=jnp.uint32))(rows)
    # lexsort: the last key is the primary one, so padding rows go last.
    return jnp.lexsort((sort_keys, rows >= num_examples)).astype(jnp.int32)


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
    num_rows = jax.tree_util.tree_leaves(data.examples)[0].shape[0]
    max_steps = steps_per_epoch(num_rows, batch_size, drop_remainder)
    own_steps = steps_per_epoch(data.num_examples, batch_size, drop_remainder)
    if epochs_to_run is None:
        epochs_to_run = num_epochs
    # Pad the permutation so every step can slice a full batch; masked rows never count.
    padding = max(max_steps * batch_size - num_rows, 0)

    def run_epoch(carry, epoch):
        perm = epoch_permutation(jax.random.fold_in(key, epoch), data.num_examples, num_rows)
        perm = jnp.pad(perm, (0, padding))

        def run_step(carry, step):
            params, loss_sum, num_steps = carry
            start = step * batch_size
            rows = jax.lax.dynamic_slice(perm, (start,), (batch_size,))
            mask = start + jnp.arange(batch_size) < data.num_examples
            batch = jax.tree_util.tree_map(lambda a: a[rows], data.examples)
            loss, grads = grad_fn(params, batch, mask)
            stepped = jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads)
            active = (epoch < epochs_to_run) & (step < own_steps)
            params = otu.tree_where(active, stepped, params)
            loss_sum = loss_sum + jnp.where(active, loss, 0.0)
            return (params, loss_sum, num_steps + active.astype(jnp.int32)), None

        carry, _ = jax.lax.scan(run_step, carry, jnp.arange(max_steps))
        return carry, None

    init = (params, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (params, loss_sum, num_steps), _ = jax.lax.scan(run_epoch, init, jnp.arange(num_epochs))
    mean_loss = loss_sum / jnp.maximum(num_steps, 1).astype(jnp.float32)
    return params, ClientMetrics(train_loss=mean_loss, num_steps=num_steps)


def client_weight(num_examples: jax.Array, num_steps: jax.Array, weighting: str) -> jax.Array:
    """The client's aggregation weight: 0 if it took no local step, else per ``weighting``."""
    base = num_examples.astype(jnp.float32) if weighting == "num_examples" else jnp.ones((), jnp.float32)
    return jnp.where(num_steps > 0, base, jnp.zeros((), jnp.float32))
