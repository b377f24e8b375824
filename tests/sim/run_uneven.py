"""Runs the uneven test task for 3 rounds and saves the final server params (used by test_scale
in subprocesses with different device counts)."""

import sys

import jax
import numpy as np

from nordfl.algorithms import make_algorithm
from nordfl.sim.engine import Simulator, SimulatorOptions
from tests.sim.helpers import uneven_task

if __name__ == "__main__":
    out_path, chunk = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else None)
    task = uneven_task()
    alg = make_algorithm("scaffold", task.loss_fn, client_lr=0.05, num_epochs=2, batch_size=8, num_clients=7)
    options = SimulatorOptions(cohort_size=6, straggler_fraction=0.3, max_buckets=2, chunk_size=chunk)
    sim = Simulator(alg, task, options, seed=1)
    state = sim.init(task.model.init_params)
    for _ in range(3):
        state, _ = sim.run_round(state)
    leaves = jax.tree_util.tree_leaves((state.server, state.clients))
    np.savez(out_path, devices=len(sim.devices), *[np.asarray(x) for x in leaves])
