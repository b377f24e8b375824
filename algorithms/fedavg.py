"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017), with a pluggable server optimiser (FedOpt, Reddi et
al., ICLR 2021) and a pluggable local objective (which is all FedProx changes).

``fedavgm``, ``fedadam``, ``fedyogi`` and ``fedadagrad`` are registered as FedAvg with that
server optimiser (Reddi et al., ICLR 2021); their hyperparameters go in ``server``.

Each round: the server broadcasts x; client i runs E epochs of minibatch SGD from x on its
own data and returns delta_i = y_i - x with weight n_i; the server applies its optimiser to
the pseudo-gradient -sum_i(n_i delta_i) / sum_i(n_i).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from nordfl import registry
from nordfl.algorithms import _checks
from nordfl.algorithms.config import AlgorithmConfig
from nordfl.algorithms.base import (
    Aggregate,
    Algorithm,
    ClientData,
    ClientOutput,
    EmptyState,
    LossFn,
    Params,
    PRNGKey,
    ServerMetrics,
)
from nordfl.algorithms.local import WEIGHTINGS, LocalSchedule, client_weight, local_sgd
from nordfl.algorithms.server_optimizers import server_step

LocalObjective = Callable[[LossFn, Params], LossFn]
"""``(loss_fn, global_params) -> loss_fn`` the client minimises this round."""


class ServerState(NamedTuple):
    """Server state of FedAvg-family algorithms: global params, optimiser state, rounds done (int32)."""

    params: Params
    opt_state: optax.OptState
    round: jax.Array


class ModelMessage(NamedTuple):
    """The broadcast: the global params."""

    params: Params


class ModelDelta(NamedTuple):
    """A client's update: local params minus the global params it started from."""

    delta: Params


def plain_objective(loss_fn: LossFn, global_params: Params) -> LossFn:
    """FedAvg's local objective: the task loss itself."""
    del global_params
    return loss_fn


@registry.register("algorithm", "fedavg", config=AlgorithmConfig)
@registry.register("algorithm", "fedavgm", config=AlgorithmConfig, server_optimizer="fedavgm")
@registry.register("algorithm", "fedadam", config=AlgorithmConfig, server_optimizer="fedadam")
@registry.register("algorithm", "fedyogi", config=AlgorithmConfig, server_optimizer="fedyogi")
@registry.register("algorithm", "fedadagrad", config=AlgorithmConfig, server_optimizer="fedadagrad")
def fedavg(
    loss_fn: LossFn,
    local: LocalSchedule,
    *,
    server_optimizer: Optional[optax.GradientTransformation] = None,
    weighting: str = "num_examples",
    local_objective: LocalObjective = plain_objective,
    name: str = "fedavg",
) -> Algorithm:
    """Builds FedAvg.

    Args:
      loss_fn: ``(params, batch, mask) -> scalar`` masked mean loss.
      local: the local schedule (``local.local_schedule``: step size, epochs, batch size;
        with ``dp`` set, DP-SGD at the site).
      server_optimizer: optax transformation on the pseudo-gradient; default SGD with lr 1
        (plain FedAvg). See ``server_optimizers`` for FedAvgM, FedAdam, FedYogi, FedAdagrad.
      weighting: ``"num_examples"`` (default) or ``"uniform"`` client weights.
      local_objective: builds the loss a client minimises from the task loss and the
        global params (FedProx adds its proximal term here).
      name: used in error messages.

    Returns:
      An ``Algorithm``.

    Example:
      >>> alg = fedavg(loss_fn, local_schedule(client_lr=0.1, num_epochs=5, batch_size=10))
      >>> state = alg.server_init(params)
      >>> out = alg.client_update(alg.broadcast(state), alg.client_init(params), data, key)
    """
    _checks.check_choice(name, "weighting", weighting, WEIGHTINGS)
    server_optimizer = optax.sgd(1.0) if server_optimizer is None else server_optimizer

    def server_init(params: Params) -> ServerState:
        return ServerState(params, server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def client_init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def broadcast(state: ServerState) -> ModelMessage:
        return ModelMessage(state.params)

    def client_update(
        message: ModelMessage,
        client_state: EmptyState,
        data: ClientData,
        key: PRNGKey,
        num_epochs_to_run: Optional[jax.Array] = None,
    ) -> ClientOutput:
        objective = local_objective(loss_fn, message.params)
        params, metrics = local_sgd(objective, message.params, data, key, local, num_epochs_to_run)
        delta = ModelDelta(otu.tree_sub(params, message.params))
        weight = client_weight(data.num_examples, metrics.num_steps, weighting)
        return ClientOutput(delta, weight, client_state, metrics)

    def server_update(state: ServerState, aggregate: Aggregate) -> tuple[ServerState, ServerMetrics]:
        params, opt_state = server_step(server_optimizer, state.params, state.opt_state, aggregate.mean.delta)
        stepped = ServerState(params, opt_state, state.round + 1)
        # A round in which nobody trained leaves the model (and optimiser moments) alone.
        new_state = otu.tree_where(aggregate.num_clients > 0, stepped, state._replace(round=state.round + 1))
        metrics = ServerMetrics(otu.tree_norm(aggregate.mean.delta), aggregate.num_clients)
        return new_state, metrics

    return Algorithm(server_init, client_init, broadcast, client_update, server_update, local)

