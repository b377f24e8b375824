"""The config schema of an algorithm option: plain dataclasses (no Hydra here), one per
registered algorithm, each holding exactly the keys that algorithm accepts.

``AlgorithmConfig`` holds what every algorithm built on local SGD shares (the local
schedule, the server optimiser, the aggregator, differential privacy); an algorithm with
hyperparameters of its own subclasses it (``FedProxConfig`` adds ``mu``) and registers the
subclass with ``registry.register("algorithm", name, config=...)``. The apps store each in
Hydra's ConfigStore as ``<name>_schema`` (``nordfl.conf.schema.store_schemas``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    byzantine: Optional[int] = None  # krum, bulyan: the hostile clients it must tolerate (default 1)
    selected: Optional[int] = None  # krum: updates averaged (1: Krum, more: multi-Krum)
    tau: Optional[float] = None  # centered_clipping: the clipping radius (default 1.0)
    iterations: Optional[int] = None  # centered_clipping: clipping iterations (default 3)


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
class FineTuneConfig:
    """Personalisation after training (FedAvg+FT): each site trains its model ``epochs`` more epochs on its
    own data before it is scored. 0: off. ``None`` fields take the algorithm's own local schedule."""

    epochs: int = 0
    client_lr: Optional[float] = None
    batch_size: Optional[int] = None


LOCAL_KEYS = ("client_lr", "num_epochs", "batch_size", "drop_remainder")
"""The keys of ``AlgorithmConfig`` that make the ``LocalSchedule`` (not factory arguments)."""
SHARED_KEYS = ("name", "server", "aggregator", "dp", "fine_tune")
"""The keys every option has that ``make_algorithm`` reads itself."""


@dataclass
class AlgorithmConfig:
    """FedAvg's keys, shared by every algorithm built on local SGD (the FedOpt family has no others)."""

    name: str = "fedavg"
    client_lr: float = 0.05
    num_epochs: int = 2
    batch_size: int = 16
    drop_remainder: bool = False
    weighting: Optional[str] = None  # num_examples | uniform; None: the algorithm's default
    server: ServerConfig = field(default_factory=ServerConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    fine_tune: FineTuneConfig = field(default_factory=FineTuneConfig)
