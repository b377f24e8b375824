"""Algorithm comparison suites: algorithms × settings × seeds, run with one command.

A suite (``conf/suite/<name>.yaml``, read by ``suite_config``) fixes everything a
comparison needs so that every algorithm gets the same tasks, partitions, budgets and seeds:

- ``common``: simulator overrides every run shares (task, partition, rounds, local budget);
- ``axes``: named axes of settings, each value a list of overrides; the settings are the
  product of the axes (``alpha=0.5,stragglers=0.9``);
- ``algorithms``: name -> overrides (``[algorithm=fedprox, sim.stragglers=keep]``);
- ``baselines``: the non-federated references, ``pooled`` (all training data at one
  site: the ceiling) and ``local`` (each site alone);
- ``tuned``: setting -> algorithm -> overrides chosen by the tuning protocol
  (``mode=tune``: a grid on a validation split carved out of each site's training rows);
- ``seeds``, ``target_accuracy`` (for rounds-to-target) and ``tuning`` (grid, seeds,
  validation fraction, and ``fix``: axes tuned at one value only, e.g. stragglers at 0, the
  choice then holding for every value of that axis).

This module runs the cells. Each (setting, algorithm) cell runs all its seeds as one
compiled program (``SeedBatch``). Every seed writes an ordinary run folder (``metrics.jsonl``,
``summary.json``, ``config.yaml``), so ``nordfl-report`` reads them too; ``suite.json`` at the
top records the command, the suite, package versions, the machine and wall times, and the
leaderboard (``sim.leaderboard``) is written from these files. A cell whose runs all finished
with the same config is skipped on a rerun, so an interrupted suite continues where it stopped.

``part=i/n`` trains only every n-th of the suite's programs, starting at the i-th, into the same
folder, so n jobs (Hydra launcher jobs on a cluster, ``nordfl-bench -m part=0/4,1/4,2/4,3/4``)
share a suite; each part records its cells in its own ``suite.part-i-of-n.json``, and a run
without ``part`` (after the parts, or by itself) finds their cells finished, takes their
records into ``suite.json`` and writes the leaderboard.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from nordfl.conf.schema import ConfigError, build_algorithm, build_task, fail, initial_params
from nordfl.conf.plugins import prepare as load_plugins
from nordfl.sim.config import Experiment, build_adversary, build_options, fingerprint_config, register
from nordfl.sim.engine import Simulator
from nordfl.sim.grid import GridBatch
from nordfl.sim.leaderboard import own_site_accuracy
from nordfl.sim.metrics_log import MetricsLog, evaluation_row, site_rows, upload_to_wandb, write_summary
from nordfl.sim.personal import PersonalEvaluator
from nordfl.sim.seeds import SeedBatch, seed_slice, split_lanes
from nordfl.sim.suite_config import MODES, Cell, Suite, setting_pairs, load_suite, plan_cells, split_key
from nordfl.tasks import Task, classification_task, metrics_type
from nordfl.tasks.data import pooled_dataset, single_client, validation_split

register()

MANIFEST = "suite.json"
PACKAGES = ("nordfl", "jax", "jaxlib", "flax", "optax", "numpy", "hydra-core", "omegaconf")


# ---------------------------------------------------------------------------- one cell


@contextmanager
def _hydra():
    """Hydra's compose API, inside ``nordfl-bench`` (already initialised) or from plain Python."""
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_module("nordfl.conf", version_base=None):
            yield


def compose_run(overrides: Sequence[str]) -> DictConfig:
    """A simulator run config (``conf/config.yaml``) with the cell's overrides."""
    overrides = load_plugins(overrides)  # a cell's plugins= (and the installed ones) with their config folders
    try:
        with _hydra():
            return compose("config", overrides=[*overrides, "logger.progress=false"])
    except Exception as error:  # Hydra raises several types for a bad override; all are config errors here
        raise ConfigError(f"suite overrides {list(overrides)}: {' '.join(str(error).split())}") from None


class CellResult(NamedTuple):
    wall_s: float
    first_round_s: float
    final_accuracy: list[float]
    own_site_accuracy: list[float]  # per seed: mean over sites of each site's own-model accuracy


def _fingerprint(cell: Cell, cfg: DictConfig, mode: str, fraction: float, split_key: Optional[str] = None) -> str:
    text = json.dumps([cell.kind, mode, fraction if mode == "tune" else None, fingerprint_config(cfg)]
                      + ([f"a data split per seed: {split_key}"] if split_key else []), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _every_client_fully(options):
    """Options with every client in every round and no stragglers or dropouts: for the baselines and for scoring."""
    return options._replace(cohort_size=None, straggler_fraction=0.0, dropout_fraction=0.0)


def evaluator_for(task: Task, experiment) -> Simulator:
    """A simulator used only to score models on ``task``'s clients (every site, all its rows)."""
    return Simulator(experiment.algorithm, task, _every_client_fully(experiment.options), aggregate=experiment.aggregate)


def _seed_folder(suite_dir: Path, cell: Cell, seed: int) -> Path:
    return suite_dir / cell.folder / f"seed_{seed}"


def cell_done(suite_dir: Path, cell: Cell, seeds: Sequence[int], fingerprint: str) -> bool:
    """Every seed of the cell finished with this exact config (so a rerun may skip it)."""
    for seed in seeds:
        path = _seed_folder(suite_dir, cell, seed) / "summary.json"
        if not path.exists() or json.loads(path.read_text()).get("fingerprint") != fingerprint:
            return False
    return True


def _combine_local(rows: list[dict], site_names) -> dict:
    """The local baseline's row: every site's model scored on every site's test set, averaged
    over the models (FLamby's convention), so it answers "what would one hospital's model
    alone give the federation's patients", comparable with the pooled and federated rows."""
    def mean(values):
        defined = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(defined)) if defined else None

    sites = {n: {k: mean([r["sites"][n][k] for r in rows]) for k in ("loss", "accuracy", "auc")} for n in site_names}
    return {k: mean([r[k] for r in rows]) for k in ("train_loss", "test_loss", "test_accuracy", "test_auc")} | {"sites": sites}


def _own_site(cell: Cell, evaluations, states, personal: Optional[Sequence[PersonalEvaluator]], i: int, seed: int, site_names) -> dict:
    """What each site gets, scored on its own test rows: the model it would use. The global model
    (pooled, and algorithms without personalisation), its personal model, or, for the local
    baseline, the model it trained alone."""
    if cell.kind == "local":
        return {n: site_rows(evaluations[j][i].sites, site_names)[n] for j, n in enumerate(site_names)}
    if personal is None:
        return site_rows(evaluations[0][i].sites, site_names)
    return site_rows(personal[i].evaluate(seed_slice(states[0].server, i), seed_slice(states[0].clients, i), seed), site_names)


GRID_KEYS = frozenset({"algorithm.client_lr", "algorithm.mu", "algorithm.lam", "algorithm.server.learning_rate",
                       "algorithm.server.momentum"})
"""Tuning-grid options that set no shape and no loop count, only arithmetic: in tune mode the grid points of
one algorithm that differ only in these train together as one ``GridBatch`` program (one compilation)."""


def grid_values(cell: Cell) -> Optional[dict[str, float]]:
    """The cell's grid point as ``{option under algorithm: value}`` when every key may be traced, else None."""
    values = {}
    for override in cell.point:
        key, _, value = override.partition("=")
        try:
            number = float(value)
        except ValueError:
            return None
        if key not in GRID_KEYS:
            return None
        values[key.removeprefix("algorithm.")] = number
    return values or None


def run_cell(cell: Cell, cfg: DictConfig, task: Union[Task, list[Task]], experiment, seeds: Sequence[int], suite_dir: Path,
             fingerprint: str, logger: DictConfig, evaluator: Union[Simulator, list[Simulator], None] = None,
             on_round: Callable[[int], None] = lambda r: None) -> CellResult:
    """Trains every seed of one cell together and writes one run folder per seed.

    ``evaluator`` scores the models on ``task``'s clients (shared by the cells of a setting).
    """
    return run_cells([cell], [cfg], task, experiment, seeds, suite_dir, [fingerprint], logger, evaluator, on_round)[0]


def run_cells(cells: Sequence[Cell], cfgs: Sequence[DictConfig], task: Union[Task, list[Task]], experiment, seeds: Sequence[int],
              suite_dir: Path, fingerprints: Sequence[str], logger: DictConfig, evaluator: Union[Simulator, list[Simulator], None] = None,
              on_round: Callable[[int], None] = lambda r: None, points: Optional[Sequence[dict]] = None,
              split_key: str = "task.data_seed") -> list[CellResult]:
    """Trains one cell's seeds (a ``SeedBatch``), or with ``points`` the grid points of one algorithm (``cells[k]``
    at ``points[k]``) times the seeds as one ``GridBatch`` program; writes one run folder per cell and seed.
    The cells of a grid share the wall time: each is given its share. ``task`` (and ``evaluator``) may be a
    list, one per seed: each seed's own data split (``split_key`` = the seed), still one program."""
    options = experiment.options
    split = isinstance(task, list)
    per_seed = task if split else [task] * len(seeds)
    if split and points is not None:
        raise ValueError("points: a tuning grid runs on one data split, got a task per seed")
    site_names = [c.name for c in per_seed[0].data.clients]
    alone = _every_client_fully(options)
    if evaluator is None:
        evaluator = [evaluator_for(t, experiment) for t in task] if split else evaluator_for(task, experiment)
    evaluators = evaluator if split else [evaluator] * len(seeds)
    cell = cells[0]
    runs = [(k, seed) for k in range(len(cells)) for seed in seeds]  # GridBatch's order: point-major

    def batch(make_task: Callable[[Task], Task], batch_options, adversary=None) -> SeedBatch:
        """A batch of the seeds on ``make_task`` of their data (one program even with a split per seed)."""
        train = [make_task(t) for t in task] if split else make_task(task)
        return SeedBatch(experiment.algorithm, train, batch_options, seeds, aggregate=experiment.aggregate, evaluator=evaluator,
                         adversary=adversary)

    if points is not None:
        def build(values):
            return build_algorithm(cfgs[0], task.loss_fn, len(site_names), values=values)[0]

        batches = [GridBatch(build, task, options, points, seeds, aggregate=experiment.aggregate)]
    elif cell.kind == "federated":  # only federated cells are attacked: the baselines are the attack-free references
        batches = [batch(lambda t: t, options, experiment.adversary)]
    elif cell.kind == "pooled":
        batches = [batch(lambda t: classification_task(t.name, pooled_dataset(t.data), t.model), alone)]
    else:  # local: one model per site, each trained on its own rows only
        batches = [batch(lambda t, i=i: classification_task(t.name, single_client(t.data, i), t.model), alone)
                   for i in range(len(site_names))]
    inits = [initial_params(cfgs[0], s) for s in seeds]
    states = [batch.init(inits) for batch in batches]
    logs, configs = [], []
    for k, seed in runs:
        run_cfg = cfgs[k].copy()
        run_cfg.seed = seed
        if split:
            OmegaConf.update(run_cfg, split_key, seed)
        configs.append(OmegaConf.to_container(run_cfg, resolve=True))
        folder = _seed_folder(suite_dir, cells[k], seed)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.yaml").write_text(OmegaConf.to_yaml(run_cfg))
        logs.append(MetricsLog(folder, config={}, use_wandb=False, project=logger.project, mode=None, run_name=folder.name))
    personal = None
    if cell.kind == "federated" and experiment.algorithm.personalise is not None:
        if points is None:
            scorers = {id(e): PersonalEvaluator(e, experiment.algorithm) for e in evaluators}  # one per data set: compiled once
            personal = [scorers[id(e)] for e in evaluators]
        else:  # each grid point personalises with its own hyperparameters (Ditto's lam, the fine-tuning lr)
            scorers = [PersonalEvaluator(evaluator, algorithm) for algorithm in batches[0].algorithms]
            personal = [scorers[k] for k, _ in runs]
    rounds, eval_every = cfgs[0].sim.rounds, cfgs[0].sim.eval_every
    train_sizes = [np.array(t.data.train_sizes(), np.float64) for t in per_seed]
    start = time.perf_counter()
    first_round_s = 0.0
    finals: list[dict] = [{} for _ in runs]
    for r in range(1, rounds + 1):
        stepped = [batch.run_round(state) for batch, state in zip(batches, states)]
        states = [state for state, _ in stepped]
        metrics = [jax.device_get(m) for _, m in stepped]
        if r == 1:
            first_round_s = time.perf_counter() - start
        evaluations = None
        if r % eval_every == 0 or r == rounds:
            evaluations = [batch.evaluate(state.server.params) for batch, state in zip(batches, states)]
        for i, (k, seed) in enumerate(runs):
            if cell.kind == "local":
                sizes = train_sizes[i]  # a local cell runs no grid: run i is seed i
                client_loss = float(np.sum([m.client_loss[i] for m in metrics] * sizes) / max(sizes.sum(), 1))
                row = {"round": r, "client_loss": client_loss, "num_clients": len(site_names), "update_norm": None}
            else:
                m = metrics[0]
                row = {"round": r, "client_loss": float(m.client_loss[i]), "num_clients": int(m.num_clients[i]),
                       "update_norm": float(m.update_norm[i])}
            if evaluations is not None:
                if cell.kind == "local":
                    finals[i] = _combine_local([evaluation_row(e[i], site_names) for e in evaluations], site_names)
                else:
                    finals[i] = evaluation_row(evaluations[0][i], site_names)
                if r == rounds:
                    finals[i]["own_site"] = _own_site(cells[k], evaluations, states, personal, i, seed, site_names)
                row |= finals[i]
            row["elapsed_s"] = time.perf_counter() - start
            logs[i].log(row)
        on_round(r)
    wall_s = time.perf_counter() - start
    for i, (k, seed) in enumerate(runs):
        summary = {
            "algorithm": cells[k].algorithm, "kind": cells[k].kind, "setting": cells[k].setting, "task": per_seed[0].data.name,
            "seed": seed, "rounds": rounds, "final": finals[i], "first_round_s": first_round_s, "train_s": wall_s / len(cells),
            "num_clients": len(site_names), "fingerprint": fingerprints[k],
        }
        folder = _seed_folder(suite_dir, cells[k], seed)
        if logger.wandb:
            upload_to_wandb(folder, config=configs[i], project=logger.project, mode=logger.mode,
                            run_name=f"{cells[k].setting}/{cells[k].algorithm}/seed_{seed}",
                            group=f"{cells[k].setting}/{cells[k].algorithm}", summary=summary)
        write_summary(folder / "summary.json", summary)
    own = [np.nanmean([site["accuracy"] for site in f["own_site"].values()]) if f.get("own_site") else float("nan")
           for f in finals]
    results = []
    for k in range(len(cells)):
        mine = range(k * len(seeds), (k + 1) * len(seeds))  # the runs are point-major
        results.append(CellResult(wall_s / len(cells), first_round_s, [finals[i].get("test_accuracy", float("nan")) for i in mine],
                                  [float(own[i]) for i in mine]))
    return results


# ---------------------------------------------------------------------------- the whole suite


def provenance() -> dict:
    """What a number in a paper needs to be traced back: versions and the machine."""
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    devices = jax.devices()
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
               "jax_devices": [str(d) for d in devices]}
    return {"versions": versions, "machine": machine}


class SuiteRun(NamedTuple):
    suite: Suite
    cells: list[Cell]
    seeds: tuple[int, ...]
    mode: str
    plugins: tuple[str, ...] = ()  # bench's plugins=: every cell's run loads them too


def prepare(bench: DictConfig) -> SuiteRun:
    """Checks the bench config and plans the cells, before anything runs."""
    suite = load_suite(bench.suite)
    mode = bench.get("mode", "run")
    if mode not in MODES:
        fail("mode", mode, f"must be one of {', '.join(MODES)}")
    seeds = bench.get("seeds")
    if seeds is None:
        seeds = suite.tuning_seeds if mode == "tune" else suite.seeds
    seeds = tuple(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        fail("seeds", list(seeds), "must be a non-empty list of distinct integers")
    only, only_settings = bench.get("only"), bench.get("settings")
    cells = plan_cells(suite, mode, list(only) if only else None, list(only_settings) if only_settings else None)
    return SuiteRun(suite, cells, seeds, mode, tuple(bench.get("plugins") or ()))


def _data_key(cfg: DictConfig) -> str:
    return json.dumps([OmegaConf.to_container(cfg[k], resolve=True) for k in ("task", "partition")], sort_keys=True)


def splits_per_seed(run: SuiteRun) -> Optional[str]:
    """With the suite's ``vary_split`` each seed trains on its own data split: the option this returns
    (``task.data_seed`` by default: the train/test split and the partition follow it) is set to the seed.
    Tuning keeps the suite's one split: it chooses on validation rows carved from its training rows."""
    return split_key(run.suite) if run.mode == "run" else None


def build_group(cell: Cell, run: SuiteRun, tasks: dict[str, Task]):
    """The cell's config (its first seed's), data and experiment for all its seeds: one task, or with
    ``splits_per_seed`` a list of one task per seed (each built once in ``tasks`` and shared by the cells)."""
    key = splits_per_seed(run)
    if not key:
        return build_cell(cell, run, tasks, compose_cell(cell, run))
    first = compose_cell(cell, run, (f"{key}={run.seeds[0]}",))  # checks that the suite's key exists
    per_seed = [build_cell(cell, run, tasks, with_values(first, {"seed": seed, key: seed})) for seed in run.seeds]
    return per_seed[0][0], [task for _, task, _ in per_seed], per_seed[0][2]


def compose_cell(cell: Cell, run: SuiteRun, extra: Sequence[str] = ()) -> DictConfig:
    """The cell's run config for the first seed (with ``extra`` overrides)."""
    plugins = [f"plugins=[{','.join(run.plugins)}]"] if run.plugins else []
    return compose_run((*cell.overrides, *extra, f"seed={run.seeds[0]}", *plugins))


def with_values(cfg: DictConfig, values: dict) -> DictConfig:
    """A copy of ``cfg`` with the given keys (dotted, already in it) set: the same config composing them as
    overrides gives, without a second Hydra composition (about a second each; a suite has hundreds)."""
    cfg = copy.deepcopy(cfg)  # DictConfig.copy is shallow: nested nodes would be shared
    for key, value in values.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def build_cell(cell: Cell, run: SuiteRun, tasks: dict[str, Task], cfg: DictConfig):
    """The cell's task and experiment for the run config ``cfg`` (a ConfigError names a bad value before
    training), returned with ``cfg``.

    Cells with the same task and partition share one ``Task`` from ``tasks`` (built once).
    """
    if cfg.algorithm.dp.mode != "none":  # suites neither account nor cap epsilon: a private result needs its ledger
        fail(f"suite {run.suite.name}, {cell.setting}/{cell.algorithm}: algorithm.dp.mode", cfg.algorithm.dp.mode,
             "must be none in a comparison suite (its runs do not account epsilon); compare private runs with nordfl-sim")
    key = _data_key(cfg)
    if key not in tasks:
        task = build_task(cfg)
        fields = metrics_type(task)._fields
        if "accuracy" not in fields:  # e.g. a regression study
            fail(f"suite {run.suite.name}, {cell.setting}/{cell.algorithm}: task.name", cfg.task.name,
                 f"must be a classification task: suites rank by test accuracy, and {task.data.name} is scored by "
                 f"{', '.join(fields)}; compare its runs with nordfl-sim -m and nordfl-report")
        if run.mode == "tune":
            data = validation_split(task.data, run.suite.validation_fraction, cfg.task.data_seed)
            task = classification_task(task.name, data, task.model)
        tasks[key] = task
    task = tasks[key]
    algorithm, aggregate = build_algorithm(cfg, task.loss_fn, len(task.data.clients))
    return cfg, task, Experiment(task, algorithm, aggregate, build_options(cfg, len(task.data.clients)),
                                 adversary=build_adversary(cfg, task))


def _command() -> Optional[str]:
    """The command line that ran the suite, without where its output went (a local path)."""
    if Path(sys.argv[0]).name != "nordfl-bench":
        return None
    return " ".join(["nordfl-bench", *(a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir=", "hydra.searchpath=", "logger.progress=")))])


def parse_part(value) -> Optional[tuple[int, int]]:
    """``part=i/n`` as (i, n); None when not set."""
    if value is None:
        return None
    text = str(value).strip()
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        fail("part", value, "must be i/n with 0 <= i < n (this job's share of the suite's programs), e.g. part=0/4")
    return int(index), int(count)


def part_manifest(part: tuple[int, int]) -> str:
    return f"suite.part-{part[0]}-of-{part[1]}.json"


def _with_parts(suite_dir: Path, previous: dict) -> dict:
    """``previous`` (the suite's manifest so far) with the cells, training time and start of the parts run into
    ``suite_dir`` (``part=i/n``) that it does not hold yet."""
    parts = [json.loads(path.read_text()) for path in sorted(suite_dir.glob("suite.part-*-of-*.json"))]
    if not parts:
        return previous
    cells = previous.get("cells", {})
    new = {k: v for part in parts for k, v in part.get("cells", {}).items() if k not in cells}
    return previous | {"cells": cells | new, "wall_s": previous.get("wall_s", 0.0) + sum(v["wall_s"] for v in new.values()),
                       "started": previous.get("started", min(part["started"] for part in parts))}


def _write_manifest(suite_dir: Path, manifest: dict, name: str = MANIFEST) -> None:
    path = suite_dir / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(path)


def run_suite(bench: DictConfig, suite_dir: Path, reporter=None) -> dict:
    """Runs (or continues) every cell of the suite into ``suite_dir`` and returns the manifest.

    All cells are built and checked first, so a bad override fails before any training.
    """
    run = prepare(bench)
    part = parse_part(bench.get("part"))
    manifest_name = MANIFEST if part is None else part_manifest(part)
    suite_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, Task] = {}
    built = [(cell, run.seeds, *build_group(cell, run, tasks)) for cell in run.cells]
    previous = json.loads((suite_dir / manifest_name).read_text()) if (suite_dir / manifest_name).exists() else {}
    if previous and previous.get("suite", {}).get("name") != run.suite.name:
        fail("suite", run.suite.name, f"must match the suite already in {suite_dir} ({previous['suite'].get('name')}); use a new folder")
    if part is None:
        previous = _with_parts(suite_dir, previous)
    manifest = {
        "suite": run.suite._asdict(), "mode": run.mode, "seeds": list(run.seeds),
        "command": _command(),
        "settings": list(dict.fromkeys(c.setting for c in run.cells)),
        "cells": previous.get("cells", {}), **provenance(),
        "started": previous.get("started", time.strftime("%Y-%m-%dT%H:%M:%S%z")), "wall_s": previous.get("wall_s", 0.0),
    }
    manifest["cell_order"] = [str(c.folder) for c in run.cells]
    manifest["kinds"] = {c.algorithm: c.kind for c in run.cells}
    manifest["grid_points"] = {c.algorithm: list(c.point) for c in run.cells if c.point}
    _write_manifest(suite_dir, manifest, manifest_name)
    start = time.perf_counter()
    reporter = reporter or (lambda event, **fields: None)
    fingerprints = [_fingerprint(cell, cfg, run.mode, run.suite.validation_fraction, splits_per_seed(run)) for cell, _, cfg, _, _ in built]
    finished = [cell_done(suite_dir, cell, seeds, f) for (cell, seeds, *_), f in zip(built, fingerprints)]
    tune_grid = bench.get("tune_grid", True)
    mine = range(len(built)) if part is None else part_members(run, built, part, tune_grid)
    reporter("start", total=sum(len(built[j][1]) for j in mine), cells=len(mine),
             finished=sum(len(built[j][1]) for j in mine if finished[j]))
    evaluators: dict[int, Simulator] = {}  # one per evaluation data set (a shared Task): its programs compile once
    grids = tuning_grids(run, built, finished) if tune_grid else {}
    in_a_grid = {j for members in grids.values() for j in members[1:]}
    for index, ((cell, seeds, cfg, task, experiment), fingerprint, done) in enumerate(zip(built, fingerprints, finished)):
        if index not in mine:
            continue  # another part's
        if done:
            reporter("skip", cell=cell, runs=len(seeds))
            continue
        if index in in_a_grid:
            continue  # trained with the first cell of its grid
        members = grids.get(index, [index])
        reporter("cell", cell=cell, rounds=cfg.sim.rounds)
        for t in (task if isinstance(task, list) else [task]):
            if id(t) not in evaluators:
                evaluators[id(t)] = evaluator_for(t, experiment)
        if isinstance(task, list):  # a data split per seed: one program for the seeds, or one each (``split_lanes``)
            lanes = [([seeds[i] for i in lane], [task[i] for i in lane], [evaluators[id(task[i])] for i in lane])
                     for lane in split_lanes(task, experiment.options, experiment.algorithm.local)]
        else:
            lanes = [(seeds, task, evaluators[id(task)])]
        for lane_seeds, lane_task, lane_evaluator in lanes:
            results = run_cells([built[j][0] for j in members], [built[j][2] for j in members], lane_task, experiment, lane_seeds,
                                suite_dir, [fingerprints[j] for j in members], bench.logger, lane_evaluator,
                                on_round=lambda r, cell=cell: reporter("round", cell=cell, round=r, rounds=cfg.sim.rounds),
                                points=[grid_values(built[j][0]) for j in members] if len(members) > 1 else None,
                                split_key=splits_per_seed(run) or "task.data_seed")
            _record(manifest, [built[j][0] for j in members], lane_seeds, [fingerprints[j] for j in members], results)
            _write_manifest(suite_dir, manifest, manifest_name)  # once per program: its cells finished together
            for j, result in zip(members, results):
                reporter("done", cell=built[j][0], runs=len(lane_seeds), result=result)
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    manifest["last_invocation_s"] = time.perf_counter() - start
    _write_manifest(suite_dir, manifest, manifest_name)
    return manifest


def _record(manifest: dict, cells: Sequence[Cell], seeds: Sequence[int], fingerprints: Sequence[str], results: Sequence[CellResult]):
    """Adds a program's cells (a grid's points, or one cell) trained with ``seeds`` to the manifest."""
    for cell, fingerprint, result in zip(cells, fingerprints, results):
        record = manifest["cells"].get(str(cell.folder))
        if record is None or set(seeds) & set(record.get("seeds", [])):  # a new cell, or one being run again
            record = {"wall_s": 0.0, "first_round_s": result.first_round_s, "seeds": [], "fingerprint": fingerprint}
        record["wall_s"] += result.wall_s
        record["seeds"] += list(seeds)
        if len(cells) > 1:
            record["grid_program"] = len(cells)  # trained with the other points of its grid in one program
        manifest["cells"][str(cell.folder)] = record
        manifest["wall_s"] = manifest.get("wall_s", 0.0) + result.wall_s


def part_members(run: SuiteRun, built: list, part: tuple[int, int], tune_grid: bool) -> set[int]:
    """The indices into ``built`` that part (i, n) trains: every n-th program from the i-th, a tuning grid's
    points one program. Programs are counted as if nothing had finished, so every part agrees on the split
    whatever the others have done."""
    grids = tuning_grids(run, built, [False] * len(built)) if tune_grid else {}
    leader = {j: first for first, members in grids.items() for j in members}
    programs = list(dict.fromkeys(leader.get(j, j) for j in range(len(built))))
    ours = {first for k, first in enumerate(programs) if k % part[1] == part[0]}
    return {j for j in range(len(built)) if leader.get(j, j) in ours}


def tuning_grids(run: SuiteRun, built: list, finished: list[bool]) -> dict[int, list[int]]:
    """In tune mode, the unfinished grid points of one algorithm in one setting that can share one program:
    ``{index of the first: indices of all}`` into ``built``. A point joins only if its grid keys may be traced
    (``GRID_KEYS``) and the cell is plain federated training (no attack, data on device); a personal model is
    made after training, by each point's own algorithm."""
    if run.mode != "tune":
        return {}
    groups: dict[tuple, list[int]] = {}
    for index, ((cell, seeds, cfg, task, experiment), done) in enumerate(zip(built, finished)):
        values = grid_values(cell)
        if (done or values is None or cell.kind != "federated" or experiment.adversary is not None
                or experiment.options.data_on_host):
            continue
        key = (cell.setting, cell.algorithm.split("@", 1)[0], tuple(seeds), tuple(sorted(values)))
        groups.setdefault(key, []).append(index)
    return {members[0]: members for members in groups.values() if len(members) > 1}


def _mean_or(values: Sequence, worst: float) -> float:
    """The mean, or ``worst`` when a value is undefined: a diverged run (NaN, written as null) loses."""
    numbers = [np.nan if v is None else float(v) for v in values]
    return float(np.mean(numbers)) if numbers and np.all(np.isfinite(numbers)) else worst


def choose_hyperparameters(suite_dir: Path) -> dict[str, dict[str, list[str]]]:
    """The tuning protocol's choice: per setting and algorithm, the grid point with the best mean
    final validation accuracy over the tuning seeds (ties: the lower validation loss). With the suite's
    ``score: own_site`` the accuracy is each site's, of the model it would use, averaged over sites.

    Returns ``{setting: {algorithm: [overrides]}}``, the ``tuned`` section of a suite config.
    """
    manifest = json.loads((suite_dir / MANIFEST).read_text())
    if manifest.get("mode") != "tune":
        fail("mode", manifest.get("mode"), f"must be tune in {suite_dir / MANIFEST} to choose hyperparameters")
    best: dict[tuple[str, str], tuple[float, float, list[str]]] = {}
    for folder in manifest["cell_order"]:
        setting, algorithm = folder.split("/", 1)
        finals = []
        for seed in manifest["seeds"]:
            path = suite_dir / folder / f"seed_{seed}" / "summary.json"
            if path.exists():
                finals.append(json.loads(path.read_text())["final"])
        if len(finals) < len(manifest["seeds"]):
            continue  # an unfinished grid point is not chosen
        name = algorithm.split("@", 1)[0]
        if manifest["suite"].get("score") == "own_site":
            kind = manifest["kinds"].get(algorithm, "federated")
            accuracy = _mean_or([_mean_or(list(own_site_accuracy(f, kind).values()), -np.inf) for f in finals], -np.inf)
        else:
            accuracy = _mean_or([f["test_accuracy"] for f in finals], -np.inf)
        loss = _mean_or([f["test_loss"] for f in finals], np.inf)
        fixed = manifest["suite"].get("tuning_fix", {})
        setting = ",".join(f"{a}={v}" for a, v in setting_pairs(setting).items() if a not in fixed)
        score = (accuracy, -loss)
        if (setting, name) not in best or score > best[(setting, name)][:2]:
            best[(setting, name)] = (*score, manifest["grid_points"].get(algorithm, []))
    chosen: dict[str, dict[str, list[str]]] = {}
    for (setting, name), (_, _, overrides) in best.items():
        chosen.setdefault(setting, {})[name] = list(overrides)  # a copy: no YAML anchors when dumped
    return chosen
