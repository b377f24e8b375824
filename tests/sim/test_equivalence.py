"""The simulator gives the same global model and client states as a plain per-site loop."""

import jax
import numpy as np
import pytest

from nordfl.algorithms import make_algorithm
from nordfl.sim.engine import Simulator, SimulatorOptions
from tests.sim.helpers import per_site_reference, uneven_task

ROUNDS, SEED = 5, 3
ALGORITHMS = {"fedavg": {}, "fedprox": {"mu": 0.1}, "scaffold": {"num_clients": 7}}


@pytest.mark.parametrize(
    "name, keep_stragglers",
    [("fedavg", True), ("fedavg", False), ("fedprox", True), ("scaffold", True)],
    ids=["fedavg-keep", "fedavg-drop", "fedprox-keep", "scaffold-keep"],
)
def test_simulator_equals_per_site_loop(name, keep_stragglers):
    task = uneven_task()
    alg = make_algorithm(name, task.loss_fn, client_lr=0.05, num_epochs=3, batch_size=8, **ALGORITHMS[name])
    options = SimulatorOptions(
        cohort_size=5, straggler_fraction=0.4, keep_stragglers=keep_stragglers,
        dropout_fraction=0.2, max_buckets=3, chunk_size=2,
    )
    sim = Simulator(alg, task, options, seed=SEED)
    assert len(sim.buckets) > 1  # the uneven sizes really are bucketed
    state = sim.init(task.model.init_params)
    plans = []
    for _ in range(ROUNDS):
        plans.append(sim.plan(state.round))
        state, _ = sim.run_round(state)
    assert any(len(p.cohort) == 5 and (~p.contributes).any() for p in plans)
    assert any((p.epochs < 3).any() for p in plans)

    server, clients = per_site_reference(alg, task, plans, SEED, task.model.init_params)
    tol = dict(rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **tol), state.server, server)
    for i, client in enumerate(clients):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a[i], b, **tol), state.clients, client)
