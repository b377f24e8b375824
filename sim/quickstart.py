"""``nordfl-sim``: federated training on the 4 heart-disease hospitals with FedAvg.

The built-in default experiment: each hospital trains locally, only model deltas are
averaged, and the final global model is scored on every hospital's own test set.
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

from nordfl.algorithms import ALGORITHM_NAMES, make_algorithm
from nordfl.sim.packing import pack_clients
from nordfl.sim.rounds import make_round
from nordfl.tasks import make_task


def _parse(argv):
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


def _auc_text(auc: float) -> str:
    return "n/a (one class)" if np.isnan(auc) else f"{auc:.3f}"


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    console = Console()
    task = make_task("heart", seed=args.seed)
    sites = task.data.clients
    extra = {"num_clients": len(sites)} if args.algorithm == "scaffold" else {}
    extra |= {"mu": 0.01} if args.algorithm == "fedprox" else {}
    algorithm = make_algorithm(
        args.algorithm, task.loss_fn, client_lr=args.client_lr, num_epochs=args.epochs,
        batch_size=args.batch_size, **extra,
    )
    data = pack_clients([s.train for s in sites])
    params = task.model.init_params
    server = algorithm.server_init(params)
    clients = jax.vmap(algorithm.client_init)(jax.tree_util.tree_map(lambda p: jnp.stack([p] * len(sites)), params))
    run_round = make_round(algorithm)
    key = jax.random.key(args.seed)
    console.print(f"[bold]NordFL[/bold] {args.algorithm} on {len(sites)} heart-disease hospitals: "
                  + ", ".join(f"{s.name} ({len(s.train.y)})" for s in sites))
    start = time.perf_counter()
    for r in range(args.rounds):
        server, clients, metrics = run_round(server, clients, data, jax.random.fold_in(key, r))
        if (r + 1) % 10 == 0 or r == 0 or r + 1 == args.rounds:
            w = np.asarray(data.num_examples, float)
            loss = float(np.sum(np.asarray(metrics.clients.train_loss) * w) / w.sum())
            console.print(f"round {r + 1:3d}/{args.rounds}  train loss {loss:.4f}  ({time.perf_counter() - start:.1f}s)")
    table = Table(title=f"Global model after {args.rounds} rounds, on each hospital's test set")
    for column in ("site", "test n", "loss", "accuracy", "ROC AUC"):
        table.add_column(column, justify="left" if column == "site" else "right")
    evaluate = jax.jit(task.evaluate)
    for site in [*sites, None]:
        test = task.data.pooled_test() if site is None else site.test
        m = evaluate(server.params, test, jnp.ones(len(test.y), bool))
        table.add_row("pooled" if site is None else site.name, str(len(test.y)),
                      f"{float(m.loss):.3f}", f"{float(m.accuracy):.3f}", _auc_text(float(m.auc)))
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
