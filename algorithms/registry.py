"""Algorithms by name, for entry points (Hydra configs, the runtime's job description).

``fedavgm``, ``fedadam``, ``fedyogi`` and ``fedadagrad`` are FedAvg with that server
optimiser (Reddi et al., ICLR 2021); their server hyperparameters go in ``server``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Optional

from nordfl.algorithms import _checks
from nordfl.algorithms.base import Algorithm, LossFn
from nordfl.algorithms.fedavg import fedavg
from nordfl.algorithms.fedprox import fedprox
from nordfl.algorithms.scaffold import scaffold
from nordfl.algorithms.server_optimizers import SERVER_OPTIMIZERS, server_optimizer

ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "scaffold": scaffold,
}
FEDOPT_ALGORITHMS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
ALGORITHM_NAMES = tuple(ALGORITHMS) + FEDOPT_ALGORITHMS


def _check_keywords(owner: str, factory: Callable, given: Mapping[str, Any]) -> None:
    """Unknown or missing keyword arguments as ValueErrors naming them (not Python's TypeError)."""
    parameters = {
        name: p for name, p in inspect.signature(factory).parameters.items()
        if name not in ("loss_fn", "local_objective", "name")
    }
    for key in given:
        if key not in parameters:
            raise ValueError(f"{owner}: unknown hyperparameter {key!r}; expected one of {', '.join(parameters)}")
    for name, p in parameters.items():
        if p.default is inspect.Parameter.empty and name not in given:
            raise ValueError(f"{owner}: missing hyperparameter {name!r}")


def make_algorithm(
    name: str,
    loss_fn: LossFn,
    *,
    server: Optional[Mapping[str, Any]] = None,
    **hyperparameters,
) -> Algorithm:
    """Builds an algorithm by name.

    Args:
      name: one of ``ALGORITHM_NAMES``.
      loss_fn: the task's masked mean loss.
      server: hyperparameters of the server optimiser (e.g. ``{"learning_rate": 0.03}``
        for ``fedadam``); for fedavg, fedprox and scaffold, ``{"name": ..., ...}`` picks one.
      **hyperparameters: the algorithm factory's keyword arguments (``client_lr``, ``mu``, ...).

    Example:
      >>> alg = make_algorithm("fedadam", loss_fn, client_lr=0.1, server={"learning_rate": 0.01})
    """
    _checks.check_choice("algorithm", "name", name, ALGORITHM_NAMES)
    server = dict(server or {})
    if server and "server_optimizer" in hyperparameters:
        raise ValueError(f"{name}: give the server optimiser either as server_optimizer or as server, not both")
    if name in FEDOPT_ALGORITHMS:
        server.setdefault("name", name)
        if server["name"] != name:
            raise ValueError(f"{name}: server.name must be {name!r} or absent, got {server['name']!r}")
        factory = fedavg
    else:
        factory = ALGORITHMS[name]
    if server:
        opt_name = server.pop("name", "sgd")
        _checks.check_choice(f"{name}.server", "name", opt_name, SERVER_OPTIMIZERS)
        _check_keywords(f"{name}.server", SERVER_OPTIMIZERS[opt_name], server)
        hyperparameters["server_optimizer"] = server_optimizer(opt_name, **server)
    _check_keywords(name, factory, hyperparameters)
    if factory is fedavg:
        hyperparameters["name"] = name  # errors say "fedadam: ...", not "fedavg: ..."
    return factory(loss_fn, **hyperparameters)
