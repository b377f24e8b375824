"""Config schema shared by the simulator and the runtime: the ``algorithm``, ``task`` and
``partition`` groups, and the builders that turn them into checked NordFL objects.

Both apps compose these groups from the same YAML files, so what is validated in the
simulator is what is deployed. Types are enforced by OmegaConf when Hydra composes the
config; values are checked by the builders, and every error names the key and the value.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from nordfl.algorithms import Algorithm, aggregator, make_algorithm
from nordfl.algorithms.aggregators import Aggregator, linear_aggregators
from nordfl.algorithms.dp import DP_MODES, NOISE_PLACEMENTS
from nordfl.tasks import Task, classification_task, make_task
from nordfl.tasks.partition import repartition


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""


@dataclass
class ServerConfig:
    """Server optimiser; ``None`` fields take the optimiser's defaults (see algorithms.server_optimizers)."""

    name: Optional[str] = None
    learning_rate: Optional[float] = None
    momentum: Optional[float] = None
    b1: Optional[float] = None
    b2: Optional[float] = None
    tau: Optional[float] = None


@dataclass
class AggregatorConfig:
    name: str = "weighted_mean"
    beta: Optional[float] = None  # trimmed_mean only


@dataclass
class DPConfig:
    """Differential privacy (docs/privacy.md): ``sgd`` is DP-SGD at the site (unit: one example row),
    ``update`` is DP-FedAvg (unit: one site). ``noise_multiplier: null`` (simulator only) calibrates it so
    the planned run spends exactly ``epsilon_budget``."""

    mode: str = "none"  # none | sgd | update
    clip: float = 1.0  # L2 bound: per example (sgd) or per site update (update)
    noise_multiplier: Optional[float] = None  # noise std / clip
    delta: float = 1e-5
    epsilon_budget: Optional[float] = None  # per site, per run; null: no limit (epsilon is still reported)
    stop_at_budget: bool = False  # false: refuse to start when the planned epsilon exceeds the budget
    noise: str = "central"  # update mode: central (server adds it) | distributed (each site adds its share)


@dataclass
class AlgorithmConfig:
    name: str = "fedavg"
    client_lr: float = 0.05
    num_epochs: int = 2
    batch_size: int = 16
    drop_remainder: bool = False
    weighting: Optional[str] = None
    mu: Optional[float] = None  # fedprox
    server_lr: Optional[float] = None  # scaffold's global step size
    server: ServerConfig = field(default_factory=ServerConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    dp: DPConfig = field(default_factory=DPConfig)


@dataclass
class TaskConfig:
    name: str = "heart"
    model: str = "logistic_regression"
    hidden: list[int] = field(default_factory=lambda: [64, 64])  # mlp only
    data_seed: int = 0
    alpha: float = 1.0  # synthetic only
    beta: float = 1.0  # synthetic only
    num_devices: int = 30  # synthetic only


@dataclass
class PartitionConfig:
    name: str = "natural"
    num_clients: Optional[int] = None
    alpha: float = 0.5
    k: int = 2
    distribution: str = "lognormal"
    sigma: float = 1.0
    exponent: float = 1.5
    noise: float = 0.5
    min_size: int = 1
    allow_empty: bool = False
    test_fraction: float = 0.2


def present(node: Any) -> dict:
    """The non-None fields of a config node, as a plain dict."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}


def fail(key: str, value, expected: str):
    raise ConfigError(f"{key}: {expected}, got {value!r}")


def model_kwargs(task: Any) -> Optional[dict]:
    """The model's extra arguments from a task config (a config node or a plain dict)."""
    return {"hidden": tuple(task["hidden"])} if task["model"] == "mlp" else None


def build_task(cfg: DictConfig) -> Task:
    t, p = cfg.task, cfg.partition
    data_kwargs: dict[str, Any] = {"seed": t.data_seed}
    if t.name.startswith("synthetic"):
        data_kwargs["num_devices"] = t.num_devices
        if t.name == "synthetic":
            data_kwargs |= {"alpha": t.alpha, "beta": t.beta}
    try:
        task = make_task(t.name, model=t.model, model_seed=cfg.seed, model_kwargs=model_kwargs(t), **data_kwargs)
        options = {k: v for k, v in present(p).items() if k != "name"}
        data = repartition(task.data, p.name, seed=t.data_seed, **options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return task if data is task.data else classification_task(task.name, data, task.model)


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
) -> tuple[Algorithm, Aggregator]:
    """The algorithm and aggregator of ``cfg.algorithm``.

    ``expected_clients`` is the planned cohort size (DP-FedAvg's fixed denominator; default
    all ``num_clients``); ``noise_seed`` keys DP-FedAvg's central noise (default: drawn from
    the OS, secret; the simulator passes its seed so runs repeat).
    """
    a = cfg.algorithm
    hyper = {k: v for k, v in present(a).items() if k not in ("name", "server", "aggregator", "dp")}
    if a.name == "scaffold":
        hyper["num_clients"] = num_clients
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
        algorithm = make_algorithm(a.name, loss_fn, server=present(a.server), dp=dp, **hyper)
    except ValueError as e:
        raise ConfigError(f"algorithm: {e}") from None
    agg = present(a.aggregator)
    try:
        aggregate = aggregator(agg.pop("name"), **agg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"algorithm.aggregator: {e}") from None
    return algorithm, aggregate
