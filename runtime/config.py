"""The coordinator's configuration: the shared ``algorithm`` and ``task`` groups (the
simulator's, from ``nordfl.conf.schema``) plus the ``runtime`` group; and the job a site
receives, as plain JSON data checked against the same schema (no code, no instantiate)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nordfl.algorithms import Algorithm
from nordfl.algorithms.aggregators import Aggregator, linear_aggregators
from nordfl.conf.schema import AlgorithmConfig, ConfigError, TaskConfig, build_algorithm, fail, model_kwargs, typed
from nordfl.tasks import Model, TaskFns, make_model, task_fns
from nordfl import registry
from nordfl.runtime import plugins as job_plugins
from nordfl.tasks.study import Study, StudyError, load_study, parse_study
from nordfl.tasks.study_data import Scaling
from nordfl.tasks.task import task_kind, task_shape


@dataclass
class RuntimeConfig:
    rounds: int = 20
    min_sites: int = 2
    min_cohort: int = 3
    round_timeout: float = 120.0
    max_round_attempts: int = 5
    cohort_size: Optional[int] = None
    max_update_norm: float = 1e6
    max_weight: float = 1e7
    norm_clip_multiple: Optional[float] = 10.0  # an update's norm is clipped to this multiple of the round's median norm
    upload_timeout: float = 300.0  # seconds an upload may take from its opening to its last byte (server-side deadline)
    max_uploads_per_site: int = 2  # uploads one site may have open at once
    chunk_size: int = 1 << 20
    max_message_bytes: int = 1 << 31
    wait_seconds: int = 5
    secure_aggregation: bool = False
    secagg_threshold: Optional[int] = None
    secagg_clip_range: float = 1.0e4
    secagg_bits: Optional[int] = None
    job: str = "train"  # train | describe: a study's Table 1 job (its statistics feed the training job's scaling)
    statistics: Optional[str] = None  # a study's training job: the statistics.json its Table 1 job wrote


JOB_KINDS = ("train", "describe")


@dataclass
class RuntimeRootConfig:
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seed: int = 0
    plugins: list[str] = field(default_factory=list)  # modules to import first (conf.plugins); named in the job


ConfigStore.instance().store(name="base_runtime", node=RuntimeRootConfig)


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The coordinator's config from ``conf/runtime_app.yaml`` plus Hydra-style overrides."""
    from nordfl.conf.plugins import prepare

    overrides = prepare(overrides)
    try:
        with initialize_config_module("nordfl.conf", version_base=None):
            return compose("runtime_app", overrides=overrides)
    except (OmegaConfBaseException, HydraException) as e:
        raise ConfigError(" ".join(str(e).split())) from None


def check_runtime(cfg: DictConfig, num_sites: int) -> None:
    r = cfg.runtime
    if r.rounds < 1:
        fail("runtime.rounds", r.rounds, "must be >= 1")
    if not 1 <= r.min_sites <= num_sites:
        fail("runtime.min_sites", r.min_sites, f"must be in [1, {num_sites}] (the federation's sites)")
    if not 1 <= r.min_cohort <= num_sites:
        fail("runtime.min_cohort", r.min_cohort, f"must be in [1, {num_sites}] (the federation's sites): no aggregate "
             f"may be built from fewer sites than this, so a larger value could never complete a round")
    if r.cohort_size is not None and not max(r.min_sites, r.min_cohort) <= r.cohort_size <= num_sites:
        fail("runtime.cohort_size", r.cohort_size,
             f"must be in [max(runtime.min_sites, runtime.min_cohort) = {max(r.min_sites, r.min_cohort)}, {num_sites}] or null for all")
    if r.norm_clip_multiple is not None and not r.norm_clip_multiple >= 1:
        fail("runtime.norm_clip_multiple", r.norm_clip_multiple, "must be >= 1 (a multiple of the round's median update norm) or null for none")
    for key in ("round_timeout", "max_update_norm", "max_weight", "upload_timeout"):
        if not r[key] > 0:
            fail(f"runtime.{key}", r[key], "must be > 0")
    for key in ("max_round_attempts", "chunk_size", "max_message_bytes", "wait_seconds", "max_uploads_per_site"):
        if r[key] < 1:
            fail(f"runtime.{key}", r[key], "must be >= 1")
    if r.job not in JOB_KINDS:
        fail("runtime.job", r.job, f"must be one of {', '.join(JOB_KINDS)}")
    if r.job == "describe" and cfg.task.get("study") is None:
        fail("runtime.job", r.job, f"describes a study's sites; task={cfg.task.name} is not a study (use task=study task.study=FILE)")
    if r.job == "describe" and r.secure_aggregation:
        fail("runtime.secure_aggregation", True, "is for training jobs; a Table 1 job releases only suppressed per-site tables")
    if r.secure_aggregation:
        cohort = r.cohort_size or num_sites
        if num_sites < 2:
            fail("runtime.secure_aggregation", True, f"needs a federation of at least 2 sites, got {num_sites}")
        low = max(r.min_cohort, r.min_sites, num_sites // 2 + 1)
        threshold = secagg_threshold(cfg, num_sites)
        if not low <= threshold <= cohort:
            key = "runtime.secagg_threshold" if r.secagg_threshold is not None else "runtime.cohort_size"
            fail(key, r.secagg_threshold if r.secagg_threshold is not None else r.cohort_size,
                 f"secure aggregation needs threshold <= cohort: threshold in [max(runtime.min_cohort, runtime.min_sites, "
                 f"a majority of the {num_sites} sites) = {low}, cohort {cohort}]")
        if not r.secagg_clip_range > 0:
            fail("runtime.secagg_clip_range", r.secagg_clip_range, "must be > 0")
        if r.secagg_bits is not None and not 8 <= r.secagg_bits <= 64 - math.ceil(math.log2(num_sites)):
            fail("runtime.secagg_bits", r.secagg_bits, f"must be in [8, {64 - math.ceil(math.log2(num_sites))}] or null")
        if cfg.algorithm.aggregator.name not in linear_aggregators():
            fail("algorithm.aggregator.name", cfg.algorithm.aggregator.name,
                 f"must be a linear aggregator ({', '.join(linear_aggregators())}) with runtime.secure_aggregation=true "
                 "(the coordinator only sees the sum)")
    dp = cfg.algorithm.get("dp")
    if dp is not None and dp.mode == "update" and dp.noise == "distributed" and not r.secure_aggregation:
        fail("algorithm.dp.noise", dp.noise, "needs runtime.secure_aggregation=true: without it the coordinator sees each "
             "site's update with only 1/m of the noise; use central noise or turn secure aggregation on")
    else:
        for key in ("secagg_threshold", "secagg_bits"):
            if r[key] is not None:
                fail(f"runtime.{key}", r[key], "is only used with runtime.secure_aggregation=true; leave it null")


class Job(NamedTuple):
    """What every site runs: built identically from the same JSON at the coordinator and at each site.

    ``min_cohort`` and ``secure_aggregation`` travel with the job so that a site can check them
    against its own policy before it trains (``nordfl.runtime.policy``)."""

    seed: int
    sites: tuple[str, ...]  # registered sites, sorted: a site's index seeds its PRNG key
    rounds: int
    algorithm_config: dict
    task_config: dict
    min_cohort: int = 3
    cohort_size: Optional[int] = None  # sites per round; None: all (DP-FedAvg's accounting and denominator)
    secure_aggregation: bool = False
    secagg_threshold: int = 0  # sites needed to finish a securely aggregated round (0: no secure aggregation)
    secagg_clip_range: float = 1.0e4  # R: each masked value is clipped to [-R, R] ...
    secagg_bits: int = 0  # ... and quantised to this many bits
    plugins: tuple[dict, ...] = ()  # the plugins it needs: module, distribution, version, sha256 (runtime.plugins)
    kind: str = "train"  # train | describe (a study's Table 1 job)
    study: Optional[dict] = None  # a study task: the study itself (canonical), which each site checks against its own file
    scaling: Optional[dict] = None  # a study's federated scaling (tasks.study_data.Scaling), from its Table 1 job

    @property
    def study_spec(self) -> Optional[Study]:
        return None if self.study is None else parse_study(self.study, "the job's study")

    @property
    def local(self):
        """The ``LocalSchedule`` the job's algorithm trains with, read from the algorithm itself
        (what a site plans its privacy spend from)."""
        cfg = OmegaConf.create({"algorithm": self.algorithm_config})
        algorithm, _ = build_algorithm(cfg, None, num_clients=len(self.sites), expected_clients=self.cohort_size or len(self.sites),
                                       noise_seed=0)
        return algorithm.local

    def what(self) -> str:
        """The job in a few words, for the operator's console and status page."""
        return (f"the Table 1 job of study {self.study_spec.name}" if self.kind == "describe"
                else f"{self.algorithm_config['name']} on {self.task_config['name']}")

    def privacy(self) -> dict:
        return {"min_cohort": self.min_cohort, "cohort_size": self.cohort_size, "secure_aggregation": self.secure_aggregation,
                "secagg_threshold": self.secagg_threshold, "secagg_clip_range": self.secagg_clip_range,
                "secagg_bits": self.secagg_bits}

    def to_json(self) -> str:
        return json.dumps({"seed": self.seed, "sites": list(self.sites), "rounds": self.rounds,
                           "algorithm": self.algorithm_config, "task": self.task_config, "privacy": self.privacy(),
                           "plugins": list(self.plugins), "kind": self.kind, "study": self.study, "scaling": self.scaling},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        """Parses a job received over the network, checking every field against the schema."""
        try:
            raw = json.loads(text)
            plugins = job_plugins.parse(raw.get("plugins", []))
            algorithm, task = typed("algorithm", raw["algorithm"]), typed("task", raw["task"])
            privacy = raw["privacy"]
            if not isinstance(privacy["secure_aggregation"], bool):
                raise TypeError(f"privacy.secure_aggregation must be true or false, got {privacy['secure_aggregation']!r}")
            cohort = privacy["cohort_size"]
            kind = raw.get("kind", "train")
            if kind not in JOB_KINDS:
                raise ValueError(f"kind must be one of {', '.join(JOB_KINDS)}, got {kind!r}")
            study = raw.get("study")
            if study is not None:
                spec = parse_study(study, "the job's study")
                study = spec.canonical()
                if raw.get("scaling") is not None:
                    Scaling.from_json(raw["scaling"], spec)
            elif raw.get("scaling") is not None:
                raise ValueError("scaling without a study")
            return cls(int(raw["seed"]), tuple(str(s) for s in raw["sites"]), int(raw["rounds"]),
                       OmegaConf.to_container(algorithm), OmegaConf.to_container(task),
                       int(privacy["min_cohort"]), None if cohort is None else int(cohort), privacy["secure_aggregation"],
                       int(privacy["secagg_threshold"]), float(privacy["secagg_clip_range"]), int(privacy["secagg_bits"]),
                       plugins, kind, study, raw.get("scaling"))
        except (ValueError, KeyError, TypeError, AttributeError, OmegaConfBaseException) as e:
            raise ConfigError(f"job: malformed job description from the coordinator ({e})") from None


def secagg_threshold(cfg: DictConfig, num_sites: int) -> int:
    """Sites that must survive every step of a securely aggregated round (0 when it is off).

    Default: ``max(runtime.min_cohort, runtime.min_sites, a strict majority of the federation's
    sites)``: the protocol needs a majority (site ids are the federation's), and no sum of fewer
    than min_cohort sites may be revealed."""
    r = cfg.runtime
    if not r.secure_aggregation:
        return 0
    if r.secagg_threshold is not None:
        return int(r.secagg_threshold)
    return max(r.min_cohort, r.min_sites, num_sites // 2 + 1)


def secagg_bits(cfg: DictConfig, num_sites: int) -> int:
    """Quantisation bits: by default the most that keep the field within 32 bits (4 bytes a value)."""
    r = cfg.runtime
    if not r.secure_aggregation:
        return 0
    return int(r.secagg_bits) if r.secagg_bits is not None else max(8, 32 - math.ceil(math.log2(num_sites)))


def job_from_config(cfg: DictConfig, sites: Sequence[str]) -> Job:
    container = OmegaConf.to_container(cfg, resolve=True)
    r = cfg.runtime
    task, study, scaling = container["task"], None, None
    if task.get("study") is not None:  # a study task: the study travels in the job, not its path here
        spec = _study_of(task["study"])
        study = spec.canonical()
        task["study"], task["sites"] = f"{spec.name} (sha256 {spec.sha256})", "the federation's sites"
        if r.job == "train" and spec.preprocessing.standardise != "site":
            scaling = read_statistics(r.statistics, spec, task)
    return Job(int(cfg.seed), tuple(sorted(sites)), 1 if r.job == "describe" else int(r.rounds), container["algorithm"], task,
               int(r.min_cohort), None if r.cohort_size is None else int(r.cohort_size), bool(r.secure_aggregation),
               secagg_threshold(cfg, len(sites)), float(r.secagg_clip_range), secagg_bits(cfg, len(sites)),
               job_plugins.job_plugins(container["algorithm"], container["task"]), str(r.job), study, scaling)


def _study_of(path: str) -> Study:
    try:
        return load_study(path)
    except StudyError as e:
        raise ConfigError(f"task.study: {e}") from None


STATISTICS_FILE = "statistics.json"


def read_statistics(path: Optional[str], study: Study, task: dict) -> dict:
    """The federated scaling a study's Table 1 job wrote (``statistics.json``), checked against this job:
    the same study (hash), data seed and test fraction, so every site's split and scaling match it."""
    if path is None:
        fail("runtime.statistics", None, f"study {study.name} standardises with federated statistics "
             f"(preprocessing.standardise={study.preprocessing.standardise}): run its Table 1 job first "
             f"(runtime.job=describe) and give the {STATISTICS_FILE} it wrote")
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail("runtime.statistics", path, f"must be a readable {STATISTICS_FILE} ({e})")
    for key, expected in (("study_sha256", study.sha256), ("data_seed", int(task["data_seed"])),
                          ("test_fraction", float(task["test_fraction"]))):
        if raw.get(key) != expected:
            fail("runtime.statistics", path, f"was computed for {key}={raw.get(key)!r}; this job has {key}={expected!r} "
                 "(rerun the Table 1 job with this study and task)")
    try:
        Scaling.from_json(raw["scaling"], study)
    except (KeyError, ValueError) as e:
        fail("runtime.statistics", path, f"holds no valid scaling ({e})")
    return raw["scaling"]


class Built(NamedTuple):
    """The job's model, loss/eval functions, algorithm and aggregator, and the shape of its examples."""

    model: Model
    fns: TaskFns
    algorithm: Algorithm
    aggregate: Aggregator
    feature_shape: tuple[int, ...]
    label_dtype: Any  # int32 class labels, or float32 targets for a regression task


def build_job(job: Job) -> Built:
    """The same objects the simulator builds for this algorithm and task config."""
    task = job.task_config
    if task["name"] not in registry.names("task"):
        fail("task.name", task["name"], f"must be one of {', '.join(registry.names('task'))}")
    options = None if job.study is None else {"study": job.study_spec}  # a study sizes its model from its variables
    try:
        model = make_model(task["name"], task["model"], seed=job.seed, model_kwargs=model_kwargs(task), task_options=options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shape, outputs = task_shape(task["name"], options)
    kind = task_kind(task["name"], options)
    fns = task_fns(model, kind, outputs)
    cfg = OmegaConf.create({"algorithm": job.algorithm_config})
    algorithm, aggregate = build_algorithm(cfg, fns.loss_fn, num_clients=len(job.sites),
                                           expected_clients=job.cohort_size or len(job.sites))
    return Built(model, fns, algorithm, aggregate, shape, np.float32 if kind == "regression" else np.int32)
