"""The simulator's configuration: typed dataclasses (Hydra's ConfigStore schema) and the
checks and builders that turn a config into a task, an algorithm and simulator options.

Types are enforced by OmegaConf when Hydra composes the config (``algorithm.client_lr=abc``
fails there); values are checked here, before any training, and every error names the
key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from nordfl.algorithms import Algorithm, aggregator, make_algorithm
from nordfl.algorithms.aggregators import Aggregator
from nordfl.sim.engine import SimulatorOptions
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


@dataclass
class SimConfig:
    rounds: int = 30
    cohort_size: Optional[int] = None  # None: every client, every round
    eval_every: int = 10
    straggler_fraction: float = 0.0
    stragglers: str = "keep"  # keep (FedProx) | drop (FedAvg in the FedProx paper)
    dropout_fraction: float = 0.0
    chunk_size: Optional[int] = None
    max_buckets: int = 4
    data_on_host: bool = False
    checkpoint_every: int = 10  # 0: never


@dataclass
class LoggerConfig:
    """metrics.jsonl is always written (nordfl-report reads it); W&B is optional."""

    wandb: bool = False
    project: str = "nordfl"
    mode: Optional[str] = None  # online | offline | disabled; None: online when logged in, else offline
    progress: bool = True


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    resume: bool = False


def register() -> None:
    """Registers the schema that ``conf/config.yaml`` builds on."""
    ConfigStore.instance().store(name="base_config", node=Config)


class Experiment(NamedTuple):
    """Everything a run needs, built and checked from a config."""

    task: Task
    algorithm: Algorithm
    aggregate: Aggregator
    options: SimulatorOptions


def _present(node: Any) -> dict:
    """The non-None fields of a config node, as a plain dict."""
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if v is not None}


def _fail(key: str, value, expected: str):
    raise ConfigError(f"{key}: {expected}, got {value!r}")


def build_task(cfg: DictConfig) -> Task:
    t, p = cfg.task, cfg.partition
    data_kwargs: dict[str, Any] = {"seed": t.data_seed}
    if t.name.startswith("synthetic"):
        data_kwargs["num_devices"] = t.num_devices
        if t.name == "synthetic":
            data_kwargs |= {"alpha": t.alpha, "beta": t.beta}
    model_kwargs = {"hidden": tuple(t.hidden)} if t.model == "mlp" else None
    try:
        task = make_task(t.name, model=t.model, model_seed=cfg.seed, model_kwargs=model_kwargs, **data_kwargs)
        options = {k: v for k, v in _present(p).items() if k != "name"}
        data = repartition(task.data, p.name, seed=t.data_seed, **options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return task if data is task.data else classification_task(task.name, data, task.model)


def build_algorithm(cfg: DictConfig, loss_fn, num_clients: int) -> tuple[Algorithm, Aggregator]:
    a = cfg.algorithm
    hyper = {k: v for k, v in _present(a).items() if k not in ("name", "server", "aggregator")}
    if a.name == "scaffold":
        hyper["num_clients"] = num_clients
    try:
        algorithm = make_algorithm(a.name, loss_fn, server=_present(a.server), **hyper)
    except ValueError as e:
        raise ConfigError(f"algorithm: {e}") from None
    agg = _present(a.aggregator)
    try:
        aggregate = aggregator(agg.pop("name"), **agg)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"algorithm.aggregator: {e}") from None
    return algorithm, aggregate


def build_options(cfg: DictConfig, num_clients: int) -> SimulatorOptions:
    s, a = cfg.sim, cfg.algorithm
    if s.rounds < 1:
        _fail("sim.rounds", s.rounds, "must be >= 1")
    if s.eval_every < 1:
        _fail("sim.eval_every", s.eval_every, "must be >= 1")
    if s.cohort_size is not None and not 1 <= s.cohort_size <= num_clients:
        _fail("sim.cohort_size", s.cohort_size, f"must be in [1, {num_clients}] (the number of clients) or null for all")
    for key in ("straggler_fraction", "dropout_fraction"):
        if not 0 <= s[key] < 1:
            _fail(f"sim.{key}", s[key], "must be in [0, 1)")
    if s.stragglers not in ("keep", "drop"):
        _fail("sim.stragglers", s.stragglers, "must be keep or drop")
    if s.straggler_fraction > 0 and a.num_epochs < 2:
        _fail("sim.straggler_fraction", s.straggler_fraction, "needs algorithm.num_epochs >= 2 (stragglers run 1..E-1 epochs)")
    if s.chunk_size is not None and s.chunk_size < 1:
        _fail("sim.chunk_size", s.chunk_size, "must be >= 1 or null")
    if s.max_buckets < 1:
        _fail("sim.max_buckets", s.max_buckets, "must be >= 1")
    if s.checkpoint_every < 0:
        _fail("sim.checkpoint_every", s.checkpoint_every, "must be >= 0 (0 disables checkpoints)")
    if cfg.logger.mode not in (None, "online", "offline", "disabled"):
        _fail("logger.mode", cfg.logger.mode, "must be online, offline, disabled or null")
    return SimulatorOptions(
        num_epochs=a.num_epochs, batch_size=a.batch_size, drop_remainder=a.drop_remainder,
        cohort_size=s.cohort_size, straggler_fraction=s.straggler_fraction,
        keep_stragglers=s.stragglers == "keep", dropout_fraction=s.dropout_fraction,
        chunk_size=s.chunk_size, max_buckets=s.max_buckets, data_on_host=s.data_on_host,
    )


def build(cfg: DictConfig) -> Experiment:
    """Checks the whole config and builds the run's parts; raises ``ConfigError`` before any training."""
    task = build_task(cfg)
    num_clients = len(task.data.clients)
    options = build_options(cfg, num_clients)
    algorithm, aggregate = build_algorithm(cfg, task.loss_fn, num_clients)
    return Experiment(task, algorithm, aggregate, options)


def fingerprint_config(cfg: DictConfig) -> dict:
    """The part of the config that determines results (what a checkpoint must match)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "logger"):
        container.pop(key, None)
    for key in ("rounds", "eval_every", "checkpoint_every", "chunk_size", "max_buckets", "data_on_host"):
        container["sim"].pop(key, None)
    return container
