"""Config schema shared by the simulator and the runtime: the ``algorithm``, ``task`` and
``partition`` groups, and the builders that turn them into checked NordFL objects.

Both apps compose these groups from the same YAML files, so what is validated in the
simulator is what is deployed. Types are enforced by OmegaConf when Hydra composes the
config; values are checked by the builders, and every error names the key and the value.
"""

from __future__ import annotations

import dataclasses
import secrets
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nordfl import registry
from nordfl.algorithms import Algorithm, aggregator, make_algorithm
from nordfl.algorithms.aggregators import Aggregator, linear_aggregators
from nordfl.algorithms.config import SHARED_KEYS, AggregatorConfig, AlgorithmConfig, DPConfig, ServerConfig
from nordfl.algorithms.dp import DP_MODES, NOISE_PLACEMENTS
from nordfl.tasks import Task, make_model, make_task
from nordfl.tasks.partition import PartitionConfig, repartition
from nordfl.tasks.task import TASK_KEYS, TaskConfig

__all__ = ["AggregatorConfig", "AlgorithmConfig", "ConfigError", "DPConfig", "PartitionConfig", "ServerConfig", "TaskConfig",
           "build_algorithm", "build_task", "check_dp", "fail", "initial_params", "model_kwargs", "present", "schema_of", "store_schemas", "typed"]


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""


GROUPS = {"algorithm": ("algorithm", AlgorithmConfig), "task": ("task", TaskConfig), "partition": ("partitioner", PartitionConfig)}
"""Config group -> (registry kind whose entries are its options, the base class of their schemas)."""


def schema_of(group: str, name: str) -> type:
    """The config dataclass of option ``name`` of ``group`` (``algorithm``, ``task``, ``partition``)."""
    kind, base = GROUPS[group]
    try:
        entry = registry.lookup(kind, name, field=f"{group}.name")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    config = entry.config or base
    if not (isinstance(config, type) and issubclass(config, base)):
        raise ConfigError(f"{group}.name: {name} (registered by {entry.module}) declares config={config!r}, "
                          f"which must be a dataclass subclassing {base.__module__}.{base.__name__}")
    return config


def store_schemas() -> None:
    """Stores every registered option's schema in Hydra's ConfigStore as ``<group>/<name>_schema``
    (Hydra's pattern for typed config-group options: an option's YAML lists it in its defaults).

    Run after the plugins are loaded, before Hydra composes: their options get schemas too."""
    store = ConfigStore.instance()
    for group, (kind, _) in GROUPS.items():
        for name in registry.names(kind):
            store.store(group=group, name=f"{name}_schema", node=schema_of(group, name))


def typed(group: str, raw: Any) -> DictConfig:
    """``raw`` (a mapping with a ``name``) checked against its option's schema: the types, and no
    key the option does not have (the error names the key, the option and its keys)."""
    raw = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
    config = schema_of(group, raw.get("name"))
    node = OmegaConf.structured(config)
    keys = [f.name for f in dataclasses.fields(config)]  # ``in node`` is False for a key still ??? (missing)
    for key in raw:
        if key not in keys:
            fail(f"{group}.{key}", raw[key], f"is not a key of {group}={raw['name']} ({config.__name__}); "
                 f"expected one of {', '.join(keys)}")
    try:
        return OmegaConf.merge(node, raw)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{group}: {' '.join(str(e).split())}") from None


def present(node: Any) -> dict:
    """The non-None fields of a config node, as a plain dict."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}


def fail(key: str, value, expected: str):
    raise ConfigError(f"{key}: {expected}, got {value!r}")


def model_kwargs(task: Any) -> dict:
    """The model's extra arguments (``task.model_options``) from a task config (a config node or a plain dict)."""
    options = task.get("model_options") or {}
    return dict(OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else options)


def initial_params(cfg: DictConfig, seed: int):
    """The initial parameters of ``cfg.task``'s model for ``seed``, without loading the data (a study's shape
    comes from its file, named in the task's data options)."""
    t = typed("task", cfg.task)
    options = {k: v for k, v in present(t).items() if k not in TASK_KEYS}
    return make_model(t.name, t.model, seed=seed, model_kwargs=model_kwargs(t), task_options=options).init_params


def build_task(cfg: DictConfig) -> Task:
    """The task of ``cfg.task`` (its data options are its schema's own keys), repartitioned by ``cfg.partition``."""
    t, p = typed("task", cfg.task), typed("partition", cfg.partition)
    data_kwargs = {k: v for k, v in present(t).items() if k not in TASK_KEYS}
    try:
        task = make_task(t.name, model=t.model, model_seed=cfg.seed, model_kwargs=model_kwargs(t), seed=t.data_seed, **data_kwargs)
        options = {k: v for k, v in present(p).items() if k != "name"}
        data = repartition(task.data, p.name, seed=t.data_seed, **options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return task if data is task.data else task._replace(data=data)  # the same loss and metrics on the new clients


def check_dp(a: DictConfig) -> None:
    """Checks ``algorithm.dp`` (the values; OmegaConf checked the types)."""
    d = a.get("dp")
    if d is None or d.mode == "none":
        return
    if d.mode not in DP_MODES:
        fail("algorithm.dp.mode", d.mode, f"must be one of {', '.join(DP_MODES)}")
    if not d.clip > 0:
        fail("algorithm.dp.clip", d.clip, "must be > 0 (the L2 clip bound)")
    if d.noise_multiplier is not None and not d.noise_multiplier >= 0:
        fail("algorithm.dp.noise_multiplier", d.noise_multiplier, "must be >= 0 or null (calibrated to dp.epsilon_budget)")
    if not 0 < d.delta < 1:
        fail("algorithm.dp.delta", d.delta, "must be in (0, 1) (well below 1 / the rows of the smallest site)")
    if d.epsilon_budget is not None and not d.epsilon_budget > 0:
        fail("algorithm.dp.epsilon_budget", d.epsilon_budget, "must be > 0 or null for no limit")
    if d.noise_multiplier is None and d.epsilon_budget is None:
        fail("algorithm.dp.noise_multiplier", None, "needs a value, or algorithm.dp.epsilon_budget to calibrate it from")
    if d.noise not in NOISE_PLACEMENTS:
        fail("algorithm.dp.noise", d.noise, f"must be one of {', '.join(NOISE_PLACEMENTS)}")
    if d.mode == "update" and a.aggregator.name not in linear_aggregators():
        fail("algorithm.aggregator.name", a.aggregator.name,
             f"must be a linear aggregator ({', '.join(linear_aggregators())}) with algorithm.dp.mode=update (DP-FedAvg noises the sum)")


def build_algorithm(
    cfg: DictConfig, loss_fn, num_clients: int, *, expected_clients: Optional[int] = None, noise_seed: Optional[int] = None,
    values: Optional[dict[str, Any]] = None,
) -> tuple[Algorithm, Aggregator]:
    """The algorithm and aggregator of ``cfg.algorithm``.

    ``expected_clients`` is the planned cohort size (DP-FedAvg's fixed denominator; default
    all ``num_clients``); ``noise_seed`` keys DP-FedAvg's central noise (default: drawn from
    the OS, secret; the simulator passes its seed so runs repeat). ``values`` replace options of
    ``cfg.algorithm`` by key (``client_lr``, ``mu``, ``server.learning_rate``) with values a config
    cannot hold: a tuning grid passes traced arrays (``nordfl.sim.grid``).
    """
    a = typed("algorithm", cfg.algorithm)
    hyper = {k: v for k, v in present(a).items() if k not in SHARED_KEYS}
    context = {"num_clients": num_clients}  # what a builder may declare it needs (``needs=``), beyond its config
    for key in registry.lookup("algorithm", a.name).properties.get("needs", ()):
        if key not in context:
            raise ConfigError(f"algorithm.name: {a.name} needs {key!r}, which NordFL does not provide; "
                              f"it provides {', '.join(context)}")
        hyper[key] = context[key]
    check_dp(a)
    dp = {}
    d = a.get("dp")
    if d is not None and d.mode != "none":
        if d.noise_multiplier is None:
            fail("algorithm.dp.noise_multiplier", None, "must be set here (only the simulator calibrates it from the budget)")
        dp = {"mode": d.mode, "clip": d.clip, "noise_multiplier": d.noise_multiplier}
        if d.mode == "update":
            dp |= {"noise": d.noise, "expected_clients": expected_clients or num_clients,
                   "noise_seed": secrets.randbits(64) if noise_seed is None else noise_seed}
    try:
        fine_tune = present(a.fine_tune) if a.get("fine_tune") is not None else {}
        server = present(a.server)
        for key, value in (values or {}).items():
            group, _, name = key.rpartition(".")
            if group not in ("", "server"):
                fail(f"algorithm.{key}", value, "a grid may replace algorithm.* and algorithm.server.* options only")
            (server if group else hyper)[name] = value
        algorithm = make_algorithm(a.name, loss_fn, server=server, dp=dp, fine_tune=fine_tune, **hyper)
    except ValueError as e:
        raise ConfigError(f"algorithm: {e}") from None
    agg = present(a.aggregator)
    try:
        aggregate = aggregator(agg.pop("name"), **agg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"algorithm.aggregator: {e}") from None
    return algorithm, aggregate
