"""The simulator's configuration: the ``sim`` and ``logger`` groups on top of the shared
``algorithm``/``task``/``partition`` schema (``nordfl.conf.schema``), registered in Hydra's
ConfigStore, and the checks that turn a config into a runnable experiment.

Types are enforced by OmegaConf when Hydra composes the config (``algorithm.client_lr=abc``
fails there); values are checked here, before any training, and every error names the
key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from nordfl.algorithms import Algorithm, LocalSchedule
from nordfl.algorithms.aggregators import Aggregator
from nordfl.algorithms.attacks import Adversary, attack, choose_malicious
from nordfl.conf.schema import (
    AlgorithmConfig,
    ConfigError,
    PartitionConfig,
    TaskConfig,
    build_algorithm,
    build_task,
    check_dp,
    fail,
    store_schemas,
)
from nordfl.sim.cohort import plan_round
from nordfl.sim.engine import SimulatorOptions
from nordfl.sim.privacy import PrivacySpec, SimPrivacy, calibrate_noise
from nordfl.tasks import Task

__all__ = ["Config", "ConfigError", "Experiment", "build", "build_adversary", "build_options", "fingerprint_config", "register"]


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
    cpu_devices: Optional[int] = None  # JAX CPU devices; None: one per core (CPU backend only)


@dataclass
class LoggerConfig:
    """metrics.jsonl is always written (nordfl-report reads it); W&B is optional."""

    wandb: bool = False
    project: str = "nordfl"
    mode: Optional[str] = None  # online | offline | disabled; None: online when logged in, else offline
    progress: bool = True


@dataclass
class AttackConfig:
    """Simulated malicious clients (``nordfl.algorithms.attacks``, docs/simulator.md): ``name`` is none or a
    registered attack; the malicious clients are ``sites`` by name, or else ``fraction`` of all clients drawn
    with ``seed`` (null: the run's seed). ``None`` hyperparameters take the attack's defaults."""

    name: str = "none"
    fraction: float = 0.0
    sites: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    scale: Optional[float] = None  # sign_flip: send -scale x the honest update (default 1)
    factor: Optional[float] = None  # scaled: send factor x the honest update (default 10)
    sigma: Optional[float] = None  # gaussian: the noise's standard deviation (default 1)
    z: Optional[float] = None  # little_is_enough: the shift in standard deviations (default: Baruch et al.'s z_max)


ATTACK_PLACEMENT = ("name", "fraction", "sites", "seed")
"""The keys of ``AttackConfig`` that say who attacks; the others are the attack's hyperparameters."""


@dataclass
class Config:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    sim: SimConfig = field(default_factory=SimConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    resume: bool = False
    plugins: list[str] = field(default_factory=list)  # modules to import first: their algorithms, models, tasks... (conf.plugins)


def register() -> None:
    """Registers the schema that ``conf/config.yaml`` builds on, and every registered option's."""
    ConfigStore.instance().store(name="base_config", node=Config)
    store_schemas()


class Experiment(NamedTuple):
    """Everything a run needs, built and checked from a config."""

    task: Task
    algorithm: Algorithm
    aggregate: Aggregator
    options: SimulatorOptions
    privacy: Optional[SimPrivacy] = None  # None without differential privacy
    adversary: Optional[Adversary] = None  # None without simulated malicious clients


def build_adversary(cfg: DictConfig, task: Task) -> Optional[Adversary]:
    """The run's simulated malicious clients (``attack.*``), or None for ``attack.name=none``."""
    a = cfg.get("attack")
    if a is None or a.name == "none":
        return None
    hyper = {k: v for k, v in a.items() if k not in ATTACK_PLACEMENT and v is not None}
    names = [c.name for c in task.data.clients]
    try:
        built = attack(a.name, **hyper)
        malicious = choose_malicious(names, fraction=a.fraction, sites=list(a.sites), seed=cfg.seed if a.seed is None else a.seed)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e) if str(e).startswith("attack") else f"attack: {e}") from None
    if not malicious.any():
        fail("attack.fraction", a.fraction, f"selects no client of {len(names)}; raise it (or name attack.sites) or use attack=none")
    if built.data is not None and task.data.num_classes < 2:
        fail("attack.name", a.name, f"needs a classification task; {task.data.name} has a regression outcome")
    return Adversary(built, malicious)


def build_options(cfg: DictConfig, num_clients: int) -> SimulatorOptions:
    s = cfg.sim
    if s.rounds < 1:
        fail("sim.rounds", s.rounds, "must be >= 1")
    if s.eval_every < 1:
        fail("sim.eval_every", s.eval_every, "must be >= 1")
    if s.cohort_size is not None and not 1 <= s.cohort_size <= num_clients:
        fail("sim.cohort_size", s.cohort_size, f"must be in [1, {num_clients}] (the number of clients) or null for all")
    for key in ("straggler_fraction", "dropout_fraction"):
        if not 0 <= s[key] < 1:
            fail(f"sim.{key}", s[key], "must be in [0, 1)")
    if s.stragglers not in ("keep", "drop"):
        fail("sim.stragglers", s.stragglers, "must be keep or drop")
    if s.chunk_size is not None and s.chunk_size < 1:
        fail("sim.chunk_size", s.chunk_size, "must be >= 1 or null")
    if s.max_buckets < 1:
        fail("sim.max_buckets", s.max_buckets, "must be >= 1")
    if s.cpu_devices is not None and s.cpu_devices < 1:
        fail("sim.cpu_devices", s.cpu_devices, "must be >= 1 or null")
    if s.checkpoint_every < 0:
        fail("sim.checkpoint_every", s.checkpoint_every, "must be >= 0 (0 disables checkpoints)")
    if cfg.logger.mode not in (None, "online", "offline", "disabled"):
        fail("logger.mode", cfg.logger.mode, "must be online, offline, disabled or null")
    return SimulatorOptions(
        cohort_size=s.cohort_size, straggler_fraction=s.straggler_fraction,
        keep_stragglers=s.stragglers == "keep", dropout_fraction=s.dropout_fraction,
        chunk_size=s.chunk_size, max_buckets=s.max_buckets, data_on_host=s.data_on_host,
    )


def build_privacy(cfg: DictConfig, task: Task, options: SimulatorOptions, local: LocalSchedule) -> Optional[SimPrivacy]:
    """The run's privacy ledger; calibrates ``algorithm.dp.noise_multiplier`` when null (written back
    into ``cfg``) and refuses a run whose planned epsilon exceeds ``algorithm.dp.epsilon_budget``."""
    d, s = cfg.algorithm.dp, cfg.sim
    check_dp(cfg.algorithm)
    if d.mode == "none":
        return None
    num_clients = len(task.data.clients)
    if d.mode == "update" and d.noise == "distributed" and (s.dropout_fraction > 0 or (s.straggler_fraction > 0 and s.stragglers == "drop")):
        fail("algorithm.dp.noise", d.noise, "cannot be distributed with dropped sites (sim.dropout_fraction, sim.stragglers=drop): "
             "the sum would carry less noise than accounted; use central noise")
    spec = PrivacySpec(d.mode, d.noise_multiplier if d.noise_multiplier is not None else 0.0, d.delta, d.epsilon_budget, d.clip, d.noise)
    cohort = options.cohort_size or num_clients

    def plan(r: int):
        return plan_round(cfg.seed, r, num_clients=num_clients, cohort_size=options.cohort_size, num_epochs=local.num_epochs,
                          straggler_fraction=options.straggler_fraction, keep_stragglers=options.keep_stragglers,
                          dropout_fraction=options.dropout_fraction)

    privacy = SimPrivacy(spec, [len(c.train.y) for c in task.data.clients], batch_size=local.batch_size,
                         drop_remainder=local.drop_remainder, cohort_size=cohort, plan=plan)
    if d.noise_multiplier is None:
        z = calibrate_noise(spec, privacy, s.rounds)
        privacy.spec = spec._replace(noise_multiplier=z)
        d.noise_multiplier = z
    planned = privacy.epsilon(s.rounds)
    if d.epsilon_budget is not None and planned > d.epsilon_budget and not d.stop_at_budget:
        fail("algorithm.dp.epsilon_budget", d.epsilon_budget,
             f"is below the planned epsilon {planned:.3f} of {s.rounds} rounds (delta {d.delta:g}, noise multiplier "
             f"{privacy.spec.noise_multiplier:.4g}); raise the noise, lower sim.rounds, or set algorithm.dp.stop_at_budget=true "
             "to stop (checkpointed) when a site reaches it")
    return privacy


def build(cfg: DictConfig) -> Experiment:
    """Checks the whole config and builds the run's parts; raises ``ConfigError`` before any training."""
    task = build_task(cfg)
    num_clients = len(task.data.clients)
    options = build_options(cfg, num_clients)
    check_dp(cfg.algorithm)

    def algorithm_of(config: DictConfig) -> tuple[Algorithm, Aggregator]:
        return build_algorithm(config, task.loss_fn, num_clients, expected_clients=options.cohort_size or num_clients,
                               noise_seed=int(cfg.seed) % 2**64)

    dp = cfg.algorithm.get("dp")
    calibrate = dp is not None and dp.mode != "none" and dp.noise_multiplier is None
    provisional = cfg
    if calibrate:  # the noise does not change the local schedule the accountant reads
        provisional = cfg.copy()
        provisional.algorithm.dp.noise_multiplier = 1.0
    algorithm, aggregate = algorithm_of(provisional)
    if cfg.sim.straggler_fraction > 0 and algorithm.local.num_epochs < 2:
        fail("sim.straggler_fraction", cfg.sim.straggler_fraction, "needs algorithm.num_epochs >= 2 (stragglers run 1..E-1 epochs)")
    privacy = build_privacy(cfg, task, options, algorithm.local)
    if calibrate:
        algorithm, aggregate = algorithm_of(cfg)
    return Experiment(task, algorithm, aggregate, options, privacy, build_adversary(cfg, task))


def fingerprint_config(cfg: DictConfig) -> dict:
    """The part of the config that determines results (what a checkpoint must match)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in ("resume", "logger", "plugins"):
        container.pop(key, None)
    if container.get("attack", {}).get("name") == "none":  # so runs from before attacks existed keep their fingerprint
        container.pop("attack")
    if container.get("algorithm", {}).get("fine_tune", {}).get("epochs") == 0:  # likewise for runs from before fine-tuning
        container["algorithm"].pop("fine_tune")
    for key in ("rounds", "eval_every", "checkpoint_every", "chunk_size", "max_buckets", "data_on_host", "cpu_devices"):
        container["sim"].pop(key, None)
    return container
