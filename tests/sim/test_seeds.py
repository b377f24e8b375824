"""Several seeds in one vmapped program compute exactly what one simulator per seed computes."""

import jax
import numpy as np
import pytest

from nordfl.algorithms import make_algorithm
from nordfl.sim import Simulator, SimulatorOptions
from nordfl.sim.seeds import SeedBatch, seed_slice
from nordfl.tasks import logistic_regression
from tests.sim.helpers import uneven_task

SEEDS = (3, 0)


def test_seed_batch_equals_one_simulator_per_seed():
    # SCAFFOLD (client state scattered back per seed) with a sampled cohort and stragglers.
    task = uneven_task()
    algorithm = make_algorithm("scaffold", task.loss_fn, client_lr=0.1, num_epochs=2, batch_size=8, num_clients=len(task.data.clients))
    options = SimulatorOptions(cohort_size=4, straggler_fraction=0.5, max_buckets=2)
    inits = [logistic_regression(5, 3, seed=s).init_params for s in SEEDS]
    batch = SeedBatch(algorithm, task, options, SEEDS)
    state = batch.init(inits)
    losses = []
    for _ in range(3):
        state, metrics = batch.run_round(state)
        losses.append(np.asarray(metrics.client_loss))
    evaluations = batch.evaluate(state.server.params)
    for i, seed in enumerate(SEEDS):
        sim = Simulator(algorithm, task, options, seed=seed)
        alone = sim.init(inits[i])
        for r in range(3):
            alone, metrics = sim.run_round(alone)
            np.testing.assert_allclose(losses[r][i], metrics.client_loss, rtol=1e-5)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), seed_slice(state.server, i), alone.server
        )
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), seed_slice(state.clients, i), alone.clients
        )
        np.testing.assert_allclose(evaluations[i].pooled.accuracy, sim.evaluate(alone.server.params).pooled.accuracy)
    # The seeds really differ (a batch that ran seed 3 three times would pass the loop above only by luck).
    assert len({round(float(losses[-1][i]), 6) for i in range(len(SEEDS))}) == len(SEEDS)


def test_seed_batch_refuses_mismatched_inputs():
    task = uneven_task()
    algorithm = make_algorithm("fedavg", task.loss_fn, client_lr=0.1)
    options = SimulatorOptions()
    with pytest.raises(ValueError, match="seeds: expected at least one"):
        SeedBatch(algorithm, task, options, ())
    with pytest.raises(ValueError, match="sim.data_on_host"):
        SeedBatch(algorithm, task, options._replace(data_on_host=True), (0, 1))
    batch = SeedBatch(algorithm, task, options, (0, 1))
    with pytest.raises(ValueError, match=r"params_per_seed: expected one pytree per seed \(2\), got 1"):
        batch.init([logistic_regression(5, 3).init_params])
