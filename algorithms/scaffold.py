"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020), option II.

The server keeps x and a control variate c; site i keeps its own c_i (client state, never
sent, never stored on the server). Each local step corrects the gradient by the drift
estimate: ``y <- y - lr (g_i(y) - c_i + c)``. After K local steps the site sets
``c_i+ = c_i - c + (x - y) / (K lr)`` (option II) and sends ``(y - x, c_i+ - c_i)``. The
server does ``x <- x + eta_g mean(y - x)`` (through its optimiser, SGD(eta_g)) and
``c <- c + |S|/N mean(c_i+ - c_i)``, where |S| is the number of sites that contributed and
N the number of registered sites, so that c stays the mean of all c_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

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
    LossFn,
    Params,
    PRNGKey,
    ServerMetrics,
)
from nordfl.algorithms.local import WEIGHTINGS, LocalSchedule, client_weight, local_sgd
from nordfl.algorithms.server_optimizers import server_step


class ScaffoldServerState(NamedTuple):
    """Global params x, server control variate c (shaped like x), optimiser state, rounds done."""

    params: Params
    control: Params
    opt_state: optax.OptState
    round: jax.Array


class ScaffoldMessage(NamedTuple):
    """The broadcast: x and c."""

    params: Params
    control: Params


class ScaffoldClientState(NamedTuple):
    """The site's control variate c_i (shaped like x)."""

    control: Params


class ScaffoldUpdate(NamedTuple):
    """A site's update: model delta y - x and control delta c_i+ - c_i."""

    delta: Params
    control_delta: Params


@dataclass
class ScaffoldConfig(AlgorithmConfig):
    name: str = "scaffold"
    server_lr: float = 1.0  # the global step size eta_g


@registry.register("algorithm", "scaffold", config=ScaffoldConfig, needs=("num_clients",))
def scaffold(
    loss_fn: LossFn,
    local: LocalSchedule,
    *,
    num_clients: int,
    server_lr: float = 1.0,
    server_optimizer: Optional[optax.GradientTransformation] = None,
    weighting: str = "uniform",
) -> Algorithm:
    """Builds SCAFFOLD.

    Args:
      loss_fn: ``(params, batch, mask) -> scalar`` masked mean loss.
      local: the local schedule, as in ``fedavg`` (option II needs plain SGD). Under DP-SGD
        the control correction c - c_i is added after the noisy gradient (it depends on no
        example of this round), and c_i+ is computed from the private local model, so it
        is post-processing.
      num_clients: N, the number of registered sites (for the |S|/N control update).
      server_lr: the global step size eta_g (used when ``server_optimizer`` is None).
      server_optimizer: optax transformation on the negated mean model delta.
      weighting: ``"uniform"`` (the paper's mean over sites, default) or ``"num_examples"``.

    Returns:
      An ``Algorithm``; ``client_init`` gives c_i = 0.
    """
    _checks.check_choice("scaffold", "weighting", weighting, WEIGHTINGS)
    _checks.check_positive_int("scaffold", "num_clients", num_clients)
    _checks.check_positive("scaffold", "server_lr", server_lr)
    server_optimizer = optax.sgd(server_lr) if server_optimizer is None else server_optimizer

    def server_init(params: Params) -> ScaffoldServerState:
        zeros = otu.tree_zeros_like(params)
        return ScaffoldServerState(params, zeros, server_optimizer.init(params), jnp.zeros((), jnp.int32))

    def client_init(params: Params) -> ScaffoldClientState:
        return ScaffoldClientState(otu.tree_zeros_like(params))

    def broadcast(state: ScaffoldServerState) -> ScaffoldMessage:
        return ScaffoldMessage(state.params, state.control)

    def client_update(
        message: ScaffoldMessage,
        client_state: ScaffoldClientState,
        data: ClientData,
        key: PRNGKey,
        num_epochs_to_run: Optional[jax.Array] = None,
    ) -> ClientOutput:
        correction = otu.tree_sub(message.control, client_state.control)  # c - c_i

        params, metrics = local_sgd(loss_fn, message.params, data, key, local, num_epochs_to_run,
                                    correction=lambda grads: otu.tree_add(grads, correction))
        trained = metrics.num_steps > 0
        scale = 1.0 / (jnp.maximum(metrics.num_steps, 1).astype(jnp.float32) * local.learning_rate)
        drift = otu.tree_scale(scale, otu.tree_sub(message.params, params))  # (x - y) / (K lr)
        new_control = otu.tree_add(otu.tree_sub(client_state.control, message.control), drift)
        new_control = otu.tree_where(trained, new_control, client_state.control)
        update = ScaffoldUpdate(
            delta=otu.tree_sub(params, message.params),
            control_delta=otu.tree_sub(new_control, client_state.control),
        )
        weight = client_weight(data.num_examples, metrics.num_steps, weighting)
        return ClientOutput(update, weight, ScaffoldClientState(new_control), metrics)

    def server_update(state: ScaffoldServerState, aggregate: Aggregate) -> tuple[ScaffoldServerState, ServerMetrics]:
        params, opt_state = server_step(server_optimizer, state.params, state.opt_state, aggregate.mean.delta)
        fraction = aggregate.num_clients / num_clients  # |S| / N
        control = otu.tree_add_scale(state.control, fraction, aggregate.mean.control_delta)
        stepped = ScaffoldServerState(params, control, opt_state, state.round + 1)
        new_state = otu.tree_where(aggregate.num_clients > 0, stepped, state._replace(round=state.round + 1))
        return new_state, ServerMetrics(otu.tree_norm(aggregate.mean.delta), aggregate.num_clients)

    return Algorithm(server_init, client_init, broadcast, client_update, server_update, local)
