"""``nordfl-sim``: federated training on the 4 heart-disease hospitals.

The built-in default experiment: each hospital trains locally, only model deltas are
averaged, and the final global model is scored on every hospital's own test set.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from nordfl.algorithms import ALGORITHM_NAMES, make_algorithm
from nordfl.sim.packing import pack_clients
from nordfl.sim.rounds import make_round
from nordfl.tasks import EvalMetrics, Task, make_task

ALGORITHM_DEFAULTS = {"fedprox": {"mu": 0.01}, "fedadam": {"server": {"learning_rate": 0.03}}}


class SiteResult(NamedTuple):
    name: str
    test_size: int
    metrics: EvalMetrics


class QuickstartResult(NamedTuple):
    """Pooled test metrics of the initial and final global model, and per-site results."""

    initial: EvalMetrics
    final: EvalMetrics
    sites: list[SiteResult]


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nordfl-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--algorithm", default="fedavg", choices=ALGORITHM_NAMES)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--client-lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def _evaluate_all(task: Task, params) -> tuple[EvalMetrics, list[SiteResult]]:
    evaluate = jax.jit(task.evaluate)
    full = lambda ex: evaluate(params, ex, jnp.ones(len(ex.y), bool))  # noqa: E731
    sites = [SiteResult(s.name, len(s.test.y), full(s.test)) for s in task.data.clients]
    return full(task.data.pooled_test()), sites


def run(args: argparse.Namespace, console: Optional[Console] = None) -> QuickstartResult:
    """Trains ``args.algorithm`` on the heart task for ``args.rounds`` full-participation rounds."""
    console = console or Console()
    task = make_task("heart", seed=args.seed)
    sites = task.data.clients
    extra = dict(ALGORITHM_DEFAULTS.get(args.algorithm, {}))
    if args.algorithm == "scaffold":
        extra["num_clients"] = len(sites)
    algorithm = make_algorithm(
        args.algorithm, task.loss_fn, client_lr=args.client_lr, num_epochs=args.epochs, batch_size=args.batch_size, **extra
    )
    data = pack_clients([s.train for s in sites])
    params = task.model.init_params
    server = algorithm.server_init(params)
    clients = jax.vmap(algorithm.client_init)(jax.tree_util.tree_map(lambda p: jnp.stack([p] * len(sites)), params))
    run_round = make_round(algorithm)
    key = jax.random.key(args.seed)
    initial, _ = _evaluate_all(task, params)
    console.print(
        f"[bold]NordFL[/bold] {args.algorithm} on {len(sites)} heart-disease hospitals: "
        + ", ".join(f"{s.name} ({len(s.train.y)} train)" for s in sites)
    )
    weights = np.asarray(data.num_examples, float)
    start = time.perf_counter()
    for r in range(args.rounds):
        server, clients, metrics = run_round(server, clients, data, jax.random.fold_in(key, r))
        if r == 0 or (r + 1) % 10 == 0 or r + 1 == args.rounds:
            loss = float(np.sum(np.asarray(metrics.clients.train_loss) * weights) / weights.sum())
            console.print(f"round {r + 1:3d}/{args.rounds}  train loss {loss:.4f}  ({time.perf_counter() - start:.1f}s)")
    final, site_results = _evaluate_all(task, server.params)
    return QuickstartResult(initial, final, site_results)


def _auc_text(auc: float) -> str:
    return "n/a (one class)" if np.isnan(auc) else f"{auc:.3f}"


def print_table(result: QuickstartResult, rounds: int, console: Console) -> None:
    table = Table(title=f"Global model after {rounds} rounds, on each hospital's test set")
    for column in ("site", "test n", "loss", "accuracy", "ROC AUC"):
        table.add_column(column, justify="left" if column == "site" else "right")
    pooled = SiteResult("pooled", sum(s.test_size for s in result.sites), result.final)
    for site in [*result.sites, pooled]:
        m = site.metrics
        table.add_row(site.name, str(site.test_size), f"{float(m.loss):.3f}", f"{float(m.accuracy):.3f}", _auc_text(float(m.auc)))
    console.print(table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    console = Console()
    result = run(args, console)
    print_table(result, args.rounds, console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
