"""Algorithms by name, for entry points (Hydra configs, the runtime's job description).

``fedavgm``, ``fedadam``, ``fedyogi`` and ``fedadagrad`` are FedAvg with that server
optimiser (Reddi et al., ICLR 2021); their server hyperparameters go in ``server``.
Differential privacy is an option of every one of them, given as ``dp`` (see ``algorithms.dp``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from nordfl.algorithms import _checks
from nordfl.algorithms import dp as dp_lib
from nordfl.algorithms.base import Algorithm, LossFn
from nordfl.algorithms.fedavg import fedavg
from nordfl.algorithms.fedprox import fedprox
from nordfl.algorithms.scaffold import scaffold
from nordfl import registry
from nordfl.algorithms.server_optimizers import server_optimizer

ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "fedavg": fedavg,
    "fedprox": fedprox,
    "scaffold": scaffold,
}
FEDOPT_ALGORITHMS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
ALGORITHM_NAMES = tuple(ALGORITHMS) + FEDOPT_ALGORITHMS


def make_algorithm(
    name: str,
    loss_fn: LossFn,
    *,
    server: Optional[Mapping[str, Any]] = None,
    dp: Optional[Mapping[str, Any]] = None,
    **hyperparameters,
) -> Algorithm:
    """Builds an algorithm by name.

    Args:
      name: one of ``ALGORITHM_NAMES``.
      loss_fn: the task's masked mean loss.
      server: hyperparameters of the server optimiser (e.g. ``{"learning_rate": 0.03}``
        for ``fedadam``); for fedavg, fedprox and scaffold, ``{"name": ..., ...}`` picks one.
      dp: differential privacy, ``{"mode": "none" | "sgd" | "update", ...}``:
        ``sgd`` (DP-SGD at the site) takes ``clip`` and ``noise_multiplier``; ``update``
        (DP-FedAvg) also ``noise`` (``central`` | ``distributed``), ``expected_clients`` (the
        planned cohort size m) and ``noise_seed`` (central noise; secret at the coordinator).
      **hyperparameters: the algorithm factory's keyword arguments (``client_lr``, ``mu``, ...).

    Example:
      >>> alg = make_algorithm("fedadam", loss_fn, client_lr=0.1, server={"learning_rate": 0.01})
      >>> private = make_algorithm("fedavg", loss_fn, client_lr=0.1, dp={"mode": "sgd", "clip": 1.0, "noise_multiplier": 1.1})
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
        builder = registry.lookup("server_optimizer", opt_name, field=f"{name}.server").builder
        _checks.check_keywords(f"{name}.server", builder, server)
        hyperparameters["server_optimizer"] = server_optimizer(opt_name, **server)
    _checks.check_keywords(name, factory, hyperparameters, supplied=("loss_fn", "local_objective", "name", "dp_sgd"))
    if factory is fedavg:
        hyperparameters["name"] = name  # errors say "fedadam: ...", not "fedavg: ..."
    dp = dict(dp or {})
    mode = dp.pop("mode", "none")
    _checks.check_choice(f"{name}.dp", "mode", mode, dp_lib.DP_MODES)
    allowed = {"none": (), "sgd": ("clip", "noise_multiplier"),
               "update": ("clip", "noise_multiplier", "noise", "expected_clients", "noise_seed")}[mode]
    for key in dp:
        if key not in allowed:
            raise ValueError(f"{name}.dp: {key!r} is not an option of mode {mode!r}; expected one of {', '.join(allowed) or 'none'}")
    for key in allowed:
        if key not in dp and key != "noise_seed":
            raise ValueError(f"{name}.dp: mode {mode!r} needs {key!r}")
    if mode == "sgd":
        hyperparameters["dp_sgd"] = dp_lib.dp_sgd(dp["clip"], dp["noise_multiplier"], owner=f"{name}.dp")
    algorithm = factory(loss_fn, **hyperparameters)
    if mode == "update":
        options = dp_lib.update_dp(dp["clip"], dp["noise_multiplier"], dp["noise"], dp["expected_clients"], owner=f"{name}.dp")
        algorithm = dp_lib.with_update_dp(algorithm, options, noise_seed=int(dp.get("noise_seed", 0)))
    return algorithm
