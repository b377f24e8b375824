"""Algorithms by name, for entry points (Hydra configs, the runtime's job description).

Every algorithm, shipped or a plugin's, is an entry of ``nordfl.registry`` of kind
``"algorithm"``: a builder ``(loss_fn, local: LocalSchedule, **hyperparameters) -> Algorithm``
with its config dataclass. ``make_algorithm`` turns the keys every option shares (the local
schedule, ``server``, ``dp``) into the builder's arguments and checks the rest against its
signature. Differential privacy is an option of every algorithm, given as ``dp``.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

from nordfl import registry
from nordfl.algorithms import _checks
from nordfl.algorithms import dp as dp_lib
from nordfl.algorithms.base import Algorithm, LossFn
from nordfl.algorithms.config import LOCAL_KEYS
from nordfl.algorithms.local import local_schedule
from nordfl.algorithms.personal import with_fine_tuning
from nordfl.algorithms.server_optimizers import server_optimizer

DP_KEYS = {"none": (), "sgd": ("clip", "noise_multiplier"),
           "update": ("clip", "noise_multiplier", "noise", "expected_clients", "noise_seed")}
"""The ``dp`` keys each mode takes (``noise_seed`` optional)."""


def algorithm_names() -> tuple[str, ...]:
    """Every registered algorithm (plugins' included, once loaded)."""
    return registry.names("algorithm")


def _private_options(name: str, dp: Mapping[str, Any]) -> tuple[str, dict]:
    dp = dict(dp)
    mode = dp.pop("mode", "none")
    _checks.check_choice(f"{name}.dp", "mode", mode, dp_lib.DP_MODES)
    allowed = DP_KEYS[mode]
    for key in dp:
        if key not in allowed:
            raise ValueError(f"{name}.dp: {key!r} is not an option of mode {mode!r}; expected one of {', '.join(allowed) or 'none'}")
    for key in allowed:
        if key not in dp and key != "noise_seed":
            raise ValueError(f"{name}.dp: mode {mode!r} needs {key!r}")
    return mode, dp


def make_algorithm(
    name: str,
    loss_fn: LossFn,
    *,
    server: Optional[Mapping[str, Any]] = None,
    dp: Optional[Mapping[str, Any]] = None,
    fine_tune: Optional[Mapping[str, Any]] = None,
    **hyperparameters,
) -> Algorithm:
    """Builds a registered algorithm by name.

    Args:
      name: a registered algorithm (``algorithm_names()``).
      loss_fn: the task's masked mean loss.
      server: hyperparameters of the server optimiser (e.g. ``{"learning_rate": 0.03}``
        for ``fedadam``); ``{"name": ..., ...}`` picks one for an algorithm without its own.
      dp: differential privacy, ``{"mode": "none" | "sgd" | "update", ...}``:
        ``sgd`` (DP-SGD at the site) takes ``clip`` and ``noise_multiplier``; ``update``
        (DP-FedAvg) also ``noise`` (``central`` | ``distributed``), ``expected_clients`` (the
        planned cohort size m) and ``noise_seed`` (central noise; secret at the coordinator).
      fine_tune: ``{"epochs": k, "client_lr": ..., "batch_size": ...}``: each site's model is
        fine-tuned k epochs on its own data before it is scored (``personal.with_fine_tuning``;
        FedAvg+FT); learning rate and batch size default to the local schedule's.
      **hyperparameters: the local schedule (``client_lr``, ``num_epochs``, ``batch_size``,
        ``drop_remainder``) and the builder's own keyword arguments (``mu``, ``num_clients``, ...).

    Example:
      >>> alg = make_algorithm("fedadam", loss_fn, client_lr=0.1, server={"learning_rate": 0.01})
      >>> private = make_algorithm("fedavg", loss_fn, client_lr=0.1, dp={"mode": "sgd", "clip": 1.0, "noise_multiplier": 1.1})
    """
    entry = registry.lookup("algorithm", name, field="algorithm.name")
    builder = entry.builder
    mode, dp = _private_options(name, dp or {})
    if "client_lr" not in hyperparameters:
        raise ValueError(f"{name}: missing hyperparameter 'client_lr'")
    schedule = {key: hyperparameters.pop(key) for key in LOCAL_KEYS if key in hyperparameters}
    private_sgd = dp_lib.dp_sgd(dp["clip"], dp["noise_multiplier"], owner=f"{name}.dp") if mode == "sgd" else None
    local = local_schedule(**schedule, dp=private_sgd, owner=name)

    server = dict(server or {})
    if server and "server_optimizer" in hyperparameters:
        raise ValueError(f"{name}: give the server optimiser either as server_optimizer or as server, not both")
    own = entry.properties.get("server_optimizer")  # fedadam & co: FedAvg with their own optimiser
    if own is not None:
        server.setdefault("name", own)
        if server["name"] != own:
            raise ValueError(f"{name}: server.name must be {own!r} or absent, got {server['name']!r}")
    if server:
        opt_name = server.pop("name", "sgd")
        opt_builder = registry.lookup("server_optimizer", opt_name, field=f"{name}.server").builder
        _checks.check_keywords(f"{name}.server", opt_builder, server)
        hyperparameters["server_optimizer"] = server_optimizer(opt_name, **server)
    takes_name = "name" in inspect.signature(builder).parameters
    _checks.check_keywords(name, builder, hyperparameters, supplied=("loss_fn", "local", "local_objective", "name"))
    if takes_name:
        hyperparameters["name"] = name  # errors say "fedadam: ...", not "fedavg: ..."
    algorithm = builder(loss_fn, local, **hyperparameters)
    if mode == "update":
        options = dp_lib.update_dp(dp["clip"], dp["noise_multiplier"], dp["noise"], dp["expected_clients"], owner=f"{name}.dp")
        algorithm = dp_lib.with_update_dp(algorithm, options, noise_seed=int(dp.get("noise_seed", 0)))
    return _fine_tuned(name, algorithm, loss_fn, dict(fine_tune or {}))


def _fine_tuned(name: str, algorithm: Algorithm, loss_fn: LossFn, fine_tune: dict) -> Algorithm:
    """``algorithm`` with FedAvg+FT's post-training step when ``fine_tune["epochs"]`` > 0."""
    owner = f"{name}.fine_tune"
    unknown = set(fine_tune) - {"epochs", "client_lr", "batch_size"}
    if unknown:
        raise ValueError(f"{owner}: unknown option(s) {', '.join(sorted(unknown))}; expected epochs, client_lr, batch_size")
    epochs = fine_tune.get("epochs", 0)
    if epochs == 0:
        return algorithm
    _checks.check_positive_int(owner, "epochs", epochs)
    local = algorithm.local
    schedule = local_schedule(client_lr=fine_tune.get("client_lr") or local.learning_rate, num_epochs=epochs,
                              batch_size=fine_tune.get("batch_size") or local.batch_size, owner=owner)
    return with_fine_tuning(algorithm, schedule, loss_fn)
