"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020), with plain local SGD.

Sites that run more local steps pull FedAvg's average towards their own optimum. FedNova
normalises: site i sends its update divided by its steps, d_i = (y_i - x) / tau_i, and the
server steps by tau_eff = sum_i p_i tau_i along sum_i p_i d_i (p_i = n_i / n). With equal
steps everywhere it is FedAvg.
"""

from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from nordfl import registry
from nordfl.algorithms import Algorithm, ClientOutput, EmptyState, ModelMessage, ServerMetrics, ServerState, local_sgd
from nordfl.algorithms.config import AlgorithmConfig
from nordfl.algorithms.local import LocalSchedule, client_weight
from nordfl.algorithms.server_optimizers import server_step


@dataclass
class FedNovaConfig(AlgorithmConfig):
    """FedNova has FedAvg's keys (local schedule, server optimiser, aggregator, DP) and no others."""

    name: str = "fednova"


class NormalisedUpdate(NamedTuple):
    """A site's update per local step, and its number of steps."""

    direction: jax.Array
    steps: jax.Array


@registry.register("algorithm", "fednova", config=FedNovaConfig)
def fednova(loss_fn, local: LocalSchedule, *, server_optimizer: Optional[optax.GradientTransformation] = None) -> Algorithm:
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer

    def server_init(params):
        return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def client_init(params):
        return EmptyState()

    def broadcast(state):
        return ModelMessage(state.params)

    def client_update(message, client_state, data, key, num_epochs_to_run=None):
        params, metrics = local_sgd(loss_fn, message.params, data, key, local, num_epochs_to_run)
        steps = metrics.num_steps.astype(jnp.float32)
        direction = otu.tree_scale(1.0 / jnp.maximum(steps, 1.0), otu.tree_sub(params, message.params))
        weight = client_weight(data.num_examples, metrics.num_steps, "num_examples")
        return ClientOutput(NormalisedUpdate(direction, steps), weight, client_state, metrics)

    def server_update(state, aggregate):
        delta = otu.tree_scale(aggregate.mean.steps, aggregate.mean.direction)  # tau_eff * sum_i p_i d_i
        params, opt_state = server_step(server_optimizer, state.params, state.opt_state, delta)
        stepped = ServerState(params, opt_state, state.round + 1)
        new_state = otu.tree_where(aggregate.num_clients > 0, stepped, state._replace(round=state.round + 1))
        return new_state, ServerMetrics(otu.tree_norm(delta), aggregate.num_clients)

    return Algorithm(server_init, client_init, broadcast, client_update, server_update, local)
