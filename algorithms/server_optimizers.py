"""Server optimisers for FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).

The server treats the negated cohort-mean update as a pseudo-gradient and applies an optax
``GradientTransformation`` to it, so FedAvg (SGD, lr 1), FedAvgM (SGD with momentum),
FedAdam, FedYogi and FedAdagrad share one code path. The adaptive ones follow Algorithm 2
of the paper exactly: no bias correction, ``tau`` added outside the square root, and the
second moment starting at ``tau**2``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
import optax.tree_utils as otu

from nordfl import registry
from nordfl.algorithms._checks import check_fraction, check_positive
from nordfl.algorithms.base import Params


class FedOptState(NamedTuple):
    """First and second moments of the pseudo-gradient, each shaped like the params."""

    m: Params
    v: Params


SecondMomentFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``(v, g_squared) -> new v`` for one leaf."""


def _scale_by_fedopt(second_moment: SecondMomentFn, b1: float, tau: float) -> optax.GradientTransformation:
    """``m = b1 m + (1 - b1) g``; ``v = second_moment(v, g^2)``; direction ``m / (sqrt(v) + tau)``."""

    def init(params):
        v0 = jax.tree_util.tree_map(lambda p: jnp.full_like(p, tau**2), params)
        return FedOptState(m=otu.tree_zeros_like(params), v=v0)

    def update(grads, state, params=None):
        del params
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.m, grads)
        v = jax.tree_util.tree_map(lambda v, g: second_moment(v, g * g), state.v, grads)
        direction = jax.tree_util.tree_map(lambda m, v: m / (jnp.sqrt(v) + tau), m, v)
        return direction, FedOptState(m=m, v=v)

    return optax.GradientTransformation(init, update)


@registry.register("server_optimizer", "sgd")
def fedavg_server(learning_rate: float = 1.0) -> optax.GradientTransformation:
    """Plain FedAvg: ``x += lr * mean_delta`` (lr 1 replaces the model by the cohort mean)."""
    check_positive("fedavg_server", "learning_rate", learning_rate)
    return optax.sgd(learning_rate)


@registry.register("server_optimizer", "fedavgm")
def fedavgm(learning_rate: float = 1.0, momentum: float = 0.9) -> optax.GradientTransformation:
    """FedAvgM (Hsu et al. 2019): server SGD with heavy-ball momentum on the pseudo-gradient."""
    check_positive("fedavgm", "learning_rate", learning_rate)
    check_fraction("fedavgm", "momentum", momentum)
    return optax.sgd(learning_rate, momentum=momentum)


@registry.register("server_optimizer", "fedadam")
def fedadam(learning_rate: float = 0.01, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> optax.GradientTransformation:
    """FedAdam: ``v = b2 v + (1 - b2) g^2``."""
    _check_adaptive("fedadam", learning_rate, b1, tau)
    check_fraction("fedadam", "b2", b2)
    second = lambda v, g2: b2 * v + (1 - b2) * g2
    return optax.chain(_scale_by_fedopt(second, b1, tau), optax.scale(-learning_rate))


@registry.register("server_optimizer", "fedyogi")
def fedyogi(learning_rate: float = 0.01, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> optax.GradientTransformation:
    """FedYogi: ``v = v - (1 - b2) g^2 sign(v - g^2)``."""
    _check_adaptive("fedyogi", learning_rate, b1, tau)
    check_fraction("fedyogi", "b2", b2)
    second = lambda v, g2: v - (1 - b2) * g2 * jnp.sign(v - g2)
    return optax.chain(_scale_by_fedopt(second, b1, tau), optax.scale(-learning_rate))


@registry.register("server_optimizer", "fedadagrad")
def fedadagrad(learning_rate: float = 0.01, b1: float = 0.0, tau: float = 1e-3) -> optax.GradientTransformation:
    """FedAdagrad: ``v = v + g^2`` (the paper's default keeps no momentum, ``b1 = 0``)."""
    _check_adaptive("fedadagrad", learning_rate, b1, tau)
    second = lambda v, g2: v + g2
    return optax.chain(_scale_by_fedopt(second, b1, tau), optax.scale(-learning_rate))


def _check_adaptive(owner: str, learning_rate: float, b1: float, tau: float) -> None:
    check_positive(owner, "learning_rate", learning_rate)
    check_fraction(owner, "b1", b1)
    check_positive(owner, "tau", tau)


def server_optimizer(name: str, **hyperparameters) -> optax.GradientTransformation:
    """Builds a server optimiser by name, e.g. ``server_optimizer("fedadam", learning_rate=0.03)``."""
    return registry.lookup("server_optimizer", name, field="server_optimizer").builder(**hyperparameters)


def server_step(optimizer: optax.GradientTransformation, params: Params, opt_state, mean_delta: Params):
    """Applies ``optimizer`` to the pseudo-gradient ``-mean_delta``; returns (params, opt_state)."""
    pseudo_grad = otu.tree_scale(-1.0, mean_delta)
    updates, opt_state = optimizer.update(pseudo_grad, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
