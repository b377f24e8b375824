"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedAvg whose clients minimise the task loss plus a proximal term
``mu/2 ||w - w_global||^2``, and whose cohort tolerates partial local work: a straggler
that runs fewer epochs (``client_update(..., num_epochs_to_run=k)``) still contributes.
With ``mu = 0`` it is FedAvg exactly.
"""

from __future__ import annotations

from typing import Optional

import jax
import optax
import optax.tree_utils as otu

from nordfl.algorithms import _checks
from nordfl.algorithms.base import Algorithm, LossFn, Params
from nordfl.algorithms.dp import DPSGD
from nordfl.algorithms.fedavg import fedavg


def proximal_objective(mu: float):
    """``(loss_fn, global_params) -> loss + mu/2 ||params - global_params||^2``."""

    def objective(loss_fn: LossFn, global_params: Params) -> LossFn:
        anchor = jax.lax.stop_gradient(global_params)

        def loss(params, batch, mask):
            drift = otu.tree_sub(params, anchor)
            return loss_fn(params, batch, mask) + 0.5 * mu * otu.tree_vdot(drift, drift)

        return loss

    return objective


def fedprox(
    loss_fn: LossFn,
    *,
    client_lr: float,
    mu: float,
    num_epochs: int = 1,
    batch_size: int = 32,
    server_optimizer: Optional[optax.GradientTransformation] = None,
    drop_remainder: bool = False,
    weighting: str = "num_examples",
    dp_sgd: Optional[DPSGD] = None,
) -> Algorithm:
    """Builds FedProx: ``fedavg`` with the proximal local objective.

    Args:
      mu: proximal coefficient, >= 0 (the paper tunes it over {0.001, 0.01, 0.1, 1}).
      Others: as ``fedavg``. With ``dp_sgd`` the proximal term is part of each example's
        loss, so its gradient is clipped with the example's (it carries no data).
    """
    _checks.check_nonnegative("fedprox", "mu", mu)
    return fedavg(
        loss_fn,
        client_lr=client_lr,
        num_epochs=num_epochs,
        batch_size=batch_size,
        server_optimizer=server_optimizer,
        drop_remainder=drop_remainder,
        weighting=weighting,
        local_objective=proximal_objective(mu),
        dp_sgd=dp_sgd,
        name="fedprox",
    )
