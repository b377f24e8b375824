"""``nordfl-sim``: the simulator's Hydra app.

``nordfl-sim`` with no arguments trains FedAvg on the 4 heart-disease hospitals and prints
each hospital's test metrics. Everything is a Hydra override:
``nordfl-sim algorithm=scaffold task=synthetic sim.cohort_size=10``; sweeps with ``-m``:
``nordfl-sim -m algorithm=fedavg,fedprox,scaffold seed=0,1,2``; a study with ``study=heart``
(or ``study=path/to/study.yaml``, see ``nordfl.conf.studies``). Each run writes
``metrics.jsonl``, ``summary.json`` and a checkpoint into its Hydra run folder (a study's run
also its Table 1, ``table1.md`` and ``table1.csv``);
``nordfl-report`` turns run and sweep folders into tables and plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

import hydra
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from nordfl.algorithms import accounting
from nordfl.sim import checkpoint, distributed
from nordfl.sim.config import ConfigError, build, fingerprint_config, register
from nordfl.conf.plugins import cli_main
from nordfl.sim.devices import cpu_devices_from_env, use_cpu_cores
from nordfl.sim.engine import Evaluation, Simulator
from nordfl.sim.metrics_log import MetricsLog, evaluation_row, site_rows, write_summary
from nordfl.sim.personal import PersonalEvaluator
from nordfl.tasks.describe import summarise, table_one
from nordfl.tasks.study import load_study
from nordfl.tasks.study_data import load_sites

register()


class RunResult(NamedTuple):
    """What a finished run reports: the final evaluation, rounds done, timings and padding overhead."""

    evaluation: Evaluation
    site_names: list[str]
    rounds: int
    first_round_s: float
    train_s: float
    padding_overhead: float
    epsilon: Optional[float] = None  # the run's epsilon (max over sites); None without DP
    stopped_at_budget: bool = False
    own_site: Optional[Any] = None  # each site's own (personalised) model on its test rows; None: the global model


def _privacy_summary(cfg: DictConfig, privacy, rounds_done: int, site_names: list[str], stopped: bool) -> dict:
    """summary.json's privacy block: the guarantee's unit, its accounting, and epsilon per site."""
    d = cfg.algorithm.dp
    eps = privacy.epsilons(rounds_done)
    block = {
        "mode": d.mode, "clip": d.clip, "noise_multiplier": privacy.spec.noise_multiplier, "delta": d.delta,
        "epsilon_budget": d.epsilon_budget, "epsilon": float(np.max(eps)) if len(eps) else 0.0,
        "epsilon_per_site": dict(zip(site_names, (float(e) for e in eps))), "accountant": accounting.ACCOUNTANT,
        "stopped_at_budget": stopped, "rounds_done": rounds_done,
    }
    if d.mode == "sgd":
        block |= {"unit": "one example row (patient), per site, per run", "sampling": "poisson",
                  "sampling_rate_per_site": dict(zip(site_names, (float(q) for q in privacy.rates))),
                  "steps_per_site": dict(zip(site_names, (int(k) for k in privacy.steps(rounds_done))))}
    else:
        block |= {"unit": "one site (all its rows), per run", "sampling": "cohort without replacement", "noise": d.noise}
    return block


def _fingerprint(cfg: DictConfig) -> str:
    text = json.dumps(fingerprint_config(cfg), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console, disable=not enabled,
    )


def write_table_one(study_file: str, sites_folder: str, run_dir: Path) -> tuple[Path, Path]:
    """The study's Table 1 (``tasks.describe.table_one``, from each site's summary of all its mapped rows)
    as ``table1.md`` and ``table1.csv`` in ``run_dir``; returns their paths."""
    study = load_study(study_file)
    sites = load_sites(study, sites_folder)
    table = table_one(study, {name: summarise(study, values) for name, values in sites.items()})
    run_dir.mkdir(parents=True, exist_ok=True)
    markdown, csv = run_dir / "table1.md", run_dir / "table1.csv"
    markdown.write_text(f"# {study.name}: Table 1 (counts below {study.min_cell} withheld)\n\n{table.markdown()}\n", encoding="utf-8")
    csv.write_text(table.csv(), encoding="utf-8")
    return markdown, csv


def run(cfg: DictConfig, run_dir: Path, console: Optional[Console] = None,
        processes: distributed.Processes = distributed.Processes(0, 1)) -> RunResult:
    """Runs (or resumes) the experiment ``cfg`` in ``run_dir``; raises ConfigError before training on bad values.
    A study task's Table 1 is written first (``write_table_one``). In a multi-process run (``processes``) every
    process trains and only process 0 prints and writes files."""
    console = console or Console()
    if not processes.writes:
        console = Console(quiet=True)
    experiment = build(cfg)
    if cfg.task.name == "study" and processes.writes:
        markdown, csv = write_table_one(cfg.task.study, cfg.task.sites, run_dir)
        console.print(f"Table 1 of study {experiment.task.data.name}: {markdown} and {csv}", highlight=False)
    task = experiment.task
    site_names = [c.name for c in task.data.clients]
    sim = Simulator(experiment.algorithm, task, experiment.options, seed=cfg.seed, aggregate=experiment.aggregate,
                    adversary=experiment.adversary)
    state = sim.init(task.model.init_params)
    fingerprint = _fingerprint(cfg)
    checkpoint_dir = run_dir / "checkpoint"
    if cfg.resume:
        restored = checkpoint.load(checkpoint_dir, state, fingerprint)
        if restored is None:
            console.print(f"resume: no checkpoint in {checkpoint_dir}; starting from round 0")
        else:
            state = restored
            console.print(f"resume: continuing from round {state.round}")
    log = MetricsLog(
        run_dir, config=OmegaConf.to_container(cfg, resolve=True), use_wandb=cfg.logger.wandb,
        project=cfg.logger.project, mode=cfg.logger.mode, run_name=run_dir.name, resume_round=state.round,
    ) if processes.writes else None
    rounds, start_round = cfg.sim.rounds, state.round
    overheads = [sim.padding_overhead(sim.plan(r)) for r in range(rounds)]
    console.print(
        f"[bold]NordFL[/bold] {cfg.algorithm.name} on {task.data.name}: {len(site_names)} clients, "
        f"cohort {sim.cohort_size}, {rounds} rounds, {len(sim.buckets)} size bucket(s), "
        f"padding {100 * float(np.mean(overheads)):.0f}% of rows, {len(sim.devices)} device(s)"
        f"{f' in {processes.count} processes' if processes.count > 1 else ''} -> {run_dir}"
    )
    if experiment.adversary is not None:
        bad = [name for name, flag in zip(site_names, experiment.adversary.malicious) if flag]
        console.print(f"attack: {cfg.attack.name} by {len(bad)} malicious client(s): {', '.join(bad[:10])}"
                      f"{' ...' if len(bad) > 10 else ''}", highlight=False)
    privacy, stopped = experiment.privacy, False
    if privacy is not None:
        console.print(
            f"privacy: {cfg.algorithm.dp.mode} DP, noise multiplier {privacy.spec.noise_multiplier:.4g}, clip "
            f"{cfg.algorithm.dp.clip:g}, delta {cfg.algorithm.dp.delta:g}: planned epsilon {privacy.epsilon(rounds):.3f} "
            f"(budget {cfg.algorithm.dp.epsilon_budget})"
        )
    evaluation: Optional[Evaluation] = None
    own_site = None
    first_round_s, start = 0.0, time.perf_counter()
    with _progress(console, cfg.logger.progress) as progress:
        bar = progress.add_task(cfg.algorithm.name, total=rounds, completed=state.round, status="")
        while state.round < rounds:
            if privacy is not None and privacy.exceeds_budget(state.round + 1):
                stopped = True  # the next round would take a site past its budget: keep what is done
                if processes.writes:
                    checkpoint.save(checkpoint_dir, state, fingerprint)
                console.print(
                    f"privacy: stopping before round {state.round + 1}: a site would exceed epsilon "
                    f"{cfg.algorithm.dp.epsilon_budget} (now {privacy.epsilon(state.round):.3f}); checkpoint in {checkpoint_dir}"
                )
                break
            tick = time.perf_counter()
            state, metrics = sim.run_round(state)
            row = {"round": state.round, "client_loss": float(metrics.client_loss),
                   "num_clients": int(metrics.num_clients), "update_norm": float(metrics.update_norm)}
            if privacy is not None:
                row["epsilon"] = privacy.epsilon(state.round)
            if first_round_s == 0.0:
                first_round_s = time.perf_counter() - tick
            evaluation = None
            if state.round % cfg.sim.eval_every == 0 or state.round == rounds:
                evaluation = sim.evaluate(state.server.params)
                row |= evaluation_row(evaluation, site_names)
            if state.round == rounds:
                own_site = _own_site(sim, experiment.algorithm, state, evaluation, cfg.seed)
                if "accuracy" in own_site._fields:
                    row["own_site_accuracy"] = float(np.nanmean(own_site.accuracy))
            row["elapsed_s"] = time.perf_counter() - start
            if log is not None:
                log.log(row)
            done = state.round - start_round
            status = f"loss {row['client_loss']:.4f}"
            if "test_accuracy" in row:
                status += f"  test acc {row['test_accuracy']:.3f}"
            elif "test_rmse" in row:
                status += f"  test rmse {row['test_rmse']:.3f}"
            progress.update(bar, completed=state.round, status=f"{status}  {done / row['elapsed_s']:.1f} rounds/s")
            if evaluation is not None and not console.is_terminal:  # no live bar in logs: one line per evaluation
                console.print(f"round {state.round}/{rounds}  {status}")
            if processes.writes and cfg.sim.checkpoint_every and (state.round % cfg.sim.checkpoint_every == 0
                                                                  or state.round == rounds):
                checkpoint.save(checkpoint_dir, state, fingerprint)
    train_s = time.perf_counter() - start
    evaluation = evaluation or sim.evaluate(state.server.params)  # a resumed, already finished run
    epsilon = None if privacy is None else privacy.epsilon(state.round)
    if own_site is None:  # a resumed run that had already finished, or one stopped at its privacy budget
        own_site = _own_site(sim, experiment.algorithm, state, evaluation, cfg.seed)
    personal = own_site if experiment.algorithm.personalise is not None else None
    result = RunResult(evaluation, site_names, state.round, first_round_s, train_s, float(np.mean(overheads)), epsilon, stopped,
                       personal)
    final = evaluation_row(evaluation, site_names)
    final["own_site"] = site_rows(own_site, site_names)
    summary = {
        "algorithm": cfg.algorithm.name, "task": task.data.name, "seed": cfg.seed, "rounds": rounds,
        "final": final, "padding_overhead": result.padding_overhead,
        "first_round_s": first_round_s, "train_s": train_s, "num_clients": len(site_names), "cohort_size": sim.cohort_size,
    }
    if privacy is not None:
        summary["privacy"] = _privacy_summary(cfg, privacy, state.round, site_names, stopped)
    if log is None:
        return result
    log.close(summary)
    summary_path = run_dir / "summary.json"
    if state.round > start_round or not summary_path.exists():  # resuming a finished run keeps its real timings
        write_summary(summary_path, summary)
    return result


def _own_site(sim: Simulator, algorithm, state, evaluation: Evaluation, seed: int):
    """Each site's own model scored on its own test rows: the personalised one, or the global model's per-site scores."""
    if algorithm.personalise is None:
        return evaluation.sites
    return PersonalEvaluator(sim, algorithm).evaluate(state.server, state.clients, seed)


def _number(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


COLUMN_TITLES = {"auc": "ROC AUC", "rmse": "RMSE", "mae": "MAE", "r2": "R²"}


def final_table(result: RunResult, max_sites: int = 20) -> Table:
    """Per-site and pooled test metrics of the final global model, one column per metric of the task
    (loss, accuracy, ROC AUC; or loss, RMSE, MAE, R² for regression), the worst sites first when there are many."""
    e, own = result.evaluation, result.own_site
    fields = e.pooled._fields
    table = Table(title=f"Global model after {result.rounds} rounds (train loss {e.train_loss:.4f})"
                  + ("; own model: each site's personalised one" if own is not None else ""))
    own_columns = [f"own model {COLUMN_TITLES.get(f, f)}" for f in fields] if own is not None else []
    for column in ("site", *(COLUMN_TITLES.get(f, f) for f in fields), *own_columns):
        table.add_column(column, justify="left" if column == "site" else "right")
    order = list(range(len(result.site_names)))
    if len(order) > max_sites:
        if "accuracy" in fields:
            order = sorted(order, key=lambda i: np.nan_to_num(e.sites.accuracy[i], nan=np.inf))[:max_sites]
            table.caption = f"the {max_sites} sites with the lowest test accuracy, of {len(result.site_names)}"
        elif "rmse" in fields:
            order = sorted(order, key=lambda i: -np.nan_to_num(e.sites.rmse[i], nan=-np.inf))[:max_sites]
            table.caption = f"the {max_sites} sites with the highest test RMSE, of {len(result.site_names)}"
        else:
            order = order[:max_sites]
    for i in order:
        mine = [_number(getattr(own, f)[i]) for f in fields] if own is not None else []
        table.add_row(result.site_names[i], *(_number(getattr(e.sites, f)[i]) for f in fields), *mine)
    table.add_row("[bold]pooled[/bold]", *(_number(v) for v in e.pooled), *([""] * len(own_columns)))
    return table


@hydra.main(version_base=None, config_path="pkg://nordfl.conf", config_name="config")
def main(cfg: DictConfig) -> float:
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # not "no TPU found" on every run
    use_cpu_cores(cfg.sim.get("cpu_devices") or cpu_devices_from_env())  # before any JAX operation
    console = Console()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        processes = distributed.initialize()  # before any JAX operation too
        result = run(cfg, run_dir, console, processes)
    except (ConfigError, checkpoint.CheckpointMismatch, distributed.LaunchError) as e:
        Console(stderr=True).print(f"[red]nordfl-sim: config error:[/red] {e}", highlight=False)
        sys.exit(2)
    if not processes.writes:
        return float(result.evaluation.pooled.loss)
    console.print(final_table(result))
    console.print(
        f"first round (with compile) {result.first_round_s:.1f}s, {result.rounds} rounds in {result.train_s:.1f}s; "
        f"metrics in {run_dir / 'metrics.jsonl'}"
    )
    if result.epsilon is not None:
        stop = " (stopped at the budget)" if result.stopped_at_budget else ""
        console.print(f"privacy: epsilon {result.epsilon:.3f} at delta {cfg.algorithm.dp.delta:g}, max over sites{stop}")
    return float(result.evaluation.pooled.loss)


def cli() -> None:
    """``nordfl-sim``: loads the plugins the command line names, then runs ``main``."""
    cli_main(main, "nordfl-sim")


if __name__ == "__main__":
    cli()
