"""One federated round over a full cohort, as a single jitted program."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax

from nordfl.algorithms import Algorithm, ClientData, ClientMetrics, ServerMetrics, weighted_mean
from nordfl.algorithms.aggregators import Aggregator


class RoundMetrics(NamedTuple):
    """Per-client metrics (stacked over clients) and the server's metrics for one round."""

    clients: ClientMetrics
    server: ServerMetrics


def make_round(algorithm: Algorithm, aggregate: Aggregator = weighted_mean) -> Callable:
    """Builds ``round(server_state, client_states, data, key) -> (server_state, client_states, RoundMetrics)``.

    Every client in ``data`` (stacked on axis 0, as ``pack_clients`` gives) trains from
    the broadcast with its own key ``fold_in(key, client_index)``; ``client_states`` are
    stacked the same way and come back updated.
    """
    vmapped_update = jax.vmap(algorithm.client_update, in_axes=(None, 0, 0, 0))

    def run_round(server_state, client_states, data: ClientData, key):
        num_clients = data.num_examples.shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jax.numpy.arange(num_clients))
        outputs = vmapped_update(algorithm.broadcast(server_state), client_states, data, keys)
        server_state, server_metrics = algorithm.server_update(server_state, aggregate(outputs.update, outputs.weight))
        return server_state, outputs.client_state, RoundMetrics(outputs.metrics, server_metrics)

    return jax.jit(run_round)
