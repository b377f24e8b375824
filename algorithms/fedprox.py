"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedAvg whose clients minimise the task loss plus a proximal term
``mu/2 ||w - w_global||^2``, and whose cohort tolerates partial local work: a straggler
that runs fewer epochs (``client_update(..., num_epochs_to_run=k)``) still contributes.
With ``mu = 0`` it is FedAvg exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax.tree_utils as otu

from nordfl import registry
from nordfl.algorithms import _checks
from nordfl.algorithms.base import Algorithm, LossFn, Params
from nordfl.algorithms.config import AlgorithmConfig
from nordfl.algorithms.fedavg import fedavg
from nordfl.algorithms.local import LocalSchedule


def proximal_objective(mu: float):
    """``(loss_fn, global_params) -> loss + mu/2 ||params - global_params||^2``."""

    def objective(loss_fn: LossFn, global_params: Params) -> LossFn:
        anchor = jax.lax.stop_gradient(global_params)

        def loss(params, batch, mask):
            drift = otu.tree_sub(params, anchor)
            return loss_fn(params, batch, mask) + 0.5 * mu * otu.tree_vdot(drift, drift)

        return loss

    return objective


@dataclass
class FedProxConfig(AlgorithmConfig):
    name: str = "fedprox"
    mu: float = 0.01  # proximal coefficient


@registry.register("algorithm", "fedprox", config=FedProxConfig)
def fedprox(loss_fn: LossFn, local: LocalSchedule, *, mu: float, **options) -> Algorithm:
    """Builds FedProx: ``fedavg`` with the proximal local objective.

    Args:
      mu: proximal coefficient, >= 0 (the paper tunes it over {0.001, 0.01, 0.1, 1}).
      **options: ``fedavg``'s (``server_optimizer``, ``weighting``). Under DP-SGD the
        proximal term is part of each example's loss, so its gradient is clipped with the
        example's (it carries no data).
    """
    _checks.check_nonnegative("fedprox", "mu", mu)
    _checks.check_keywords("fedprox", fedavg, options, supplied=("loss_fn", "local", "local_objective", "name"))
    return fedavg(loss_fn, local, local_objective=proximal_objective(mu), name="fedprox", **options)
