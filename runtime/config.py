"""The coordinator's configuration: the shared ``algorithm`` and ``task`` groups (the
simulator's, from ``nordfl.conf.schema``) plus the ``runtime`` group; and the job a site
receives, as plain JSON data checked against the same schema (no code, no instantiate)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nordfl.algorithms import Algorithm
from nordfl.algorithms.aggregators import Aggregator
from nordfl.conf.schema import AlgorithmConfig, ConfigError, TaskConfig, build_algorithm, fail, model_kwargs
from nordfl.tasks import Model, TaskFns, classification_fns, make_model
from nordfl.tasks.task import SHAPES


@dataclass
class RuntimeConfig:
    rounds: int = 20
    min_sites: int = 2
    round_timeout: float = 120.0
    max_round_attempts: int = 5
    cohort_size: Optional[int] = None
    max_update_norm: float = 1e6
    max_weight: float = 1e7
    chunk_size: int = 1 << 20
    max_message_bytes: int = 1 << 31
    wait_seconds: int = 5


@dataclass
class RuntimeRootConfig:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seed: int = 0


ConfigStore.instance().store(name="base_runtime", node=RuntimeRootConfig)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The coordinator's config from ``conf/runtime_app.yaml`` plus Hydra-style overrides."""
    try:
        with initialize_config_module("nordfl.conf", version_base=None):
            return compose("runtime_app", overrides=list(overrides))
    except (OmegaConfBaseException, HydraException) as e:
        raise ConfigError(" ".join(str(e).split())) from None


def check_runtime(cfg: DictConfig, num_sites: int) -> None:
    r = cfg.runtime
    if r.rounds < 1:
        fail("runtime.rounds", r.rounds, "must be >= 1")
    if not 1 <= r.min_sites <= num_sites:
        fail("runtime.min_sites", r.min_sites, f"must be in [1, {num_sites}] (the federation's sites)")
    if r.cohort_size is not None and not r.min_sites <= r.cohort_size <= num_sites:
        fail("runtime.cohort_size", r.cohort_size, f"must be in [runtime.min_sites, {num_sites}] or null for all")
    for key in ("round_timeout", "max_update_norm", "max_weight"):
        if not r[key] > 0:
            fail(f"runtime.{key}", r[key], "must be > 0")
    for key in ("max_round_attempts", "chunk_size", "max_message_bytes", "wait_seconds"):
        if r[key] < 1:
            fail(f"runtime.{key}", r[key], "must be >= 1")


class Job(NamedTuple):
    """What every site runs: built identically from the same JSON at the coordinator and at each site."""

    seed: int
    sites: tuple[str, ...]  # registered sites, sorted: a site's index seeds its PRNG key
    rounds: int
    algorithm_config: dict
    task_config: dict

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "sites": list(self.sites), "rounds": self.rounds,
                           "algorithm": self.algorithm_config, "task": self.task_config}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        """Parses a job received over the network, checking every field against the schema."""
        try:
            raw = json.loads(text)
            algorithm = OmegaConf.merge(OmegaConf.structured(AlgorithmConfig), raw["algorithm"])
            task = OmegaConf.merge(OmegaConf.structured(TaskConfig), raw["task"])
            return cls(int(raw["seed"]), tuple(str(s) for s in raw["sites"]), int(raw["rounds"]),
                       OmegaConf.to_container(algorithm), OmegaConf.to_container(task))
        except (ValueError, KeyError, TypeError, OmegaConfBaseException) as e:
            raise ConfigError(f"job: malformed job description from the coordinator ({e})") from None


def job_from_config(cfg: DictConfig, sites: Sequence[str]) -> Job:
    container = OmegaConf.to_container(cfg, resolve=True)
    return Job(int(cfg.seed), tuple(sorted(sites)), int(cfg.runtime.rounds), container["algorithm"], container["task"])


class Built(NamedTuple):
    """The job's model, loss/eval functions, algorithm and aggregator."""

    model: Model
    fns: TaskFns
    algorithm: Algorithm
    aggregate: Aggregator


def build_job(job: Job) -> Built:
    """The same objects the simulator builds for this algorithm and task config."""
    task = job.task_config
    if task["name"] not in SHAPES:
        fail("task.name", task["name"], f"must be one of {', '.join(sorted(SHAPES))}")
    try:
        model = make_model(task["name"], task["model"], seed=job.seed, model_kwargs=model_kwargs(task))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fns = classification_fns(model, SHAPES[task["name"]][1])
    cfg = OmegaConf.create({"algorithm": job.algorithm_config})
    algorithm, aggregate = build_algorithm(cfg, fns.loss_fn, num_clients=len(job.sites))
    return Built(model, fns, algorithm, aggregate)
