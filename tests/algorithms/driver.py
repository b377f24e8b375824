"""The plain driver the algorithm tests share: every client in every round, vmapped, no simulator."""

import jax
import jax.numpy as jnp

from nordfl.algorithms import weighted_mean


def run_rounds(alg, params, data, rounds, seed=0):
    """``rounds`` rounds over every client of ``data`` (client i's key in round r: ``fold_in(key(seed + r), i)``).

    Returns (server state, stacked client states, the last round's ``ClientOutput``)."""
    num = data.num_examples.shape[0]
    state = alg.server_init(params)
    states = jax.vmap(alg.client_init)(jax.tree_util.tree_map(lambda p: jnp.stack([p] * num), params))
    update = jax.jit(jax.vmap(alg.client_update, in_axes=(None, 0, 0, 0)))
    out = None
    for r in range(rounds):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed + r), i))(jnp.arange(num))
        out = update(alg.broadcast(state), states, data, keys)
        states = out.client_state
        state, _ = alg.server_update(state, weighted_mean(out.update, out.weight))
    return state, states, out
