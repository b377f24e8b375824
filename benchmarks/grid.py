"""A tuning grid of 4 client learning rates × 5 seeds: one compiled program (``GridBatch``) against
the same 20 runs one after another (``Simulator``, each compiling its own round, as separate
``nordfl-sim`` runs or the suites' per-cell tuning do), and against 4 ``SeedBatch`` cells (the seeds
vmapped, one program per learning rate: what ``nordfl-bench mode=tune`` runs today).

Wall time includes compilation: that is what a tuning sweep pays. Same process, side by side.

    python -m benchmarks.grid     # writes benchmarks/results/grid.{md,json}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from nordfl.algorithms import make_algorithm
from nordfl.sim.engine import Simulator, SimulatorOptions
from nordfl.sim.grid import GridBatch
from nordfl.sim.seeds import SeedBatch
from nordfl.tasks import make_model, make_task

RESULTS = Path(__file__).parent / "results"
SEEDS = (0, 1, 2, 3, 4)
# Each workload's 4 learning rates, where its training is stable: on Synthetic(1,1) client lr 0.1 and above
# diverge (loss 2 to 7), and there a 1e-8 rounding difference flips saturated softmax outputs and grows to
# 0.05 in one round, so no two programs agree. The table reports the largest difference it finds: the
# equality itself is tests/sim/test_grid.py's (3 rounds, 2e-6).
WORKLOADS = {
    "heart (4 sites, logistic regression, 50 rounds × 2 epochs)": dict(
        task=lambda: make_task("heart"), model=("heart", "logistic_regression", {}), rounds=50, epochs=2, batch=16,
        learning_rates=(0.01, 0.03, 0.1, 0.3)),
    "synthetic(1,1) (30 clients, 40 rounds × 2 epochs)": dict(
        task=lambda: make_task("synthetic", alpha=1.0, beta=1.0, num_devices=30, seed=0),
        model=("synthetic", "logistic_regression", {}), rounds=40, epochs=2, batch=10,
        learning_rates=(0.001, 0.003, 0.01, 0.03)),
}


def _params(model, seed):
    name, kind, kwargs = model
    return make_model(name, kind, seed=seed, model_kwargs=kwargs).init_params


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def _train(runner, init, rounds: int):
    """``rounds`` rounds of a ``Simulator``, ``SeedBatch`` or ``GridBatch`` from ``init``; the final global params."""
    state = runner.init(init)
    for _ in range(rounds):
        state, _ = runner.run_round(state)
    return state.server.params


def measure(spec) -> dict:
    task = spec["task"]()
    build = lambda h: make_algorithm("fedavg", task.loss_fn, client_lr=h["client_lr"], num_epochs=spec["epochs"],  # noqa: E731
                                     batch_size=spec["batch"])
    options, rounds, learning_rates = SimulatorOptions(), spec["rounds"], spec["learning_rates"]
    inits = [_params(spec["model"], s) for s in SEEDS]

    def separate():
        return [_train(Simulator(build({"client_lr": lr}), task, options, seed=seed), params, rounds)
                for lr in learning_rates for seed, params in zip(SEEDS, inits)]

    def seed_batches():
        return [_train(SeedBatch(build({"client_lr": lr}), task, options, SEEDS), inits, rounds) for lr in learning_rates]

    def one_grid():
        return _train(GridBatch(build, task, options, [{"client_lr": lr} for lr in learning_rates], SEEDS), inits, rounds)

    grid_s, grid_params = _timed(one_grid)
    batches_s, batch_params = _timed(seed_batches)
    separate_s, separate_params = _timed(separate)
    # The same models (the grid's runs are (lr, seed) in the loops' order), to float32 rounding: a vmapped
    # program may sum in another order, and SGD carries the last bits along for every round.
    flat_grid = jax.tree_util.tree_leaves(grid_params)
    largest = 0.0
    for i, alone in enumerate(separate_params):
        for a, b in zip(flat_grid, jax.tree_util.tree_leaves(alone)):
            largest = max(largest, float(np.max(np.abs(np.asarray(a[i]) - np.asarray(b)))))
    return {"runs": len(learning_rates) * len(SEEDS), "rounds": rounds, "separate_s": separate_s,
            "seed_batches_s": batches_s, "grid_s": grid_s, "max_param_difference": largest}


def main() -> None:
    results = {name: measure(spec) for name, spec in WORKLOADS.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "grid.json").write_text(json.dumps(results, indent=2))
    lines = ["| workload | runs | 20 runs one after another | 4 SeedBatch cells (seeds vmapped) | one GridBatch program | "
             "speed-up vs one after another | vs SeedBatch cells | largest parameter difference |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['runs']} | {r['separate_s']:.1f} s | {r['seed_batches_s']:.1f} s | {r['grid_s']:.1f} s | "
                     f"{r['separate_s'] / r['grid_s']:.1f}× | {r['seed_batches_s'] / r['grid_s']:.1f}× | "
                     f"{r['max_param_difference']:.1e} |")
    (RESULTS / "grid.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
