"""A grid of hyperparameters × seeds in one program computes what each run computes alone."""

import jax
import numpy as np
import pytest

from nordfl.algorithms import make_algorithm
from nordfl.sim.engine import Simulator, SimulatorOptions
from nordfl.sim.grid import GridBatch
from tests.sim.helpers import uneven_task

SEEDS = (0, 3)


def _build(loss_fn):
    return lambda h: make_algorithm("fedprox", loss_fn, client_lr=h["client_lr"], mu=h["mu"], num_epochs=2, batch_size=8,
                                    server={"name": "fedadam", "learning_rate": h["server_lr"]})


def test_every_point_and_seed_of_the_grid_equals_its_own_run():
    task = uneven_task(sizes=(3, 40, 0, 15, 7))
    options = SimulatorOptions(cohort_size=3, max_buckets=2)
    points = [{"client_lr": 0.03, "mu": 0.0, "server_lr": 0.05}, {"client_lr": 0.3, "mu": 0.5, "server_lr": 0.05},
              {"client_lr": 0.1, "mu": 0.1, "server_lr": 0.2}]
    build = _build(task.loss_fn)
    inits = [task.model.init_params, jax.tree_util.tree_map(lambda a: a * 0.5, task.model.init_params)]
    grid = GridBatch(build, task, options, points, SEEDS)
    state = grid.init(inits)
    for _ in range(3):
        state, metrics = grid.run_round(state)
    assert metrics.client_loss.shape == (len(points) * len(SEEDS),)
    for i in (0, 3, 5):  # every point and both seeds, each against its own run (fewer compilations than all six)
        point, seed = grid.runs[i]
        sim = Simulator(build(point), task, options, seed=seed)
        alone = sim.init(inits[SEEDS.index(seed)])
        for _ in range(3):
            alone, alone_metrics = sim.run_round(alone)
        mine = jax.tree_util.tree_map(lambda a: a[i], state.server.params)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7), mine, alone.server.params)
        np.testing.assert_allclose(metrics.client_loss[i], alone_metrics.client_loss, rtol=2e-6)
    # The hyperparameters matter: no two points land on the same model.
    kernels = np.asarray(state.server.params["linear"]["kernel"])[::len(SEEDS)]
    assert len({k.tobytes() for k in kernels}) == len(points)


def test_a_grid_refuses_points_that_disagree_or_change_shapes():
    task = uneven_task(sizes=(3, 9))
    build = _build(task.loss_fn)
    with pytest.raises(ValueError, match=r"points\[1\]: expected the hyperparameters \['client_lr', 'mu', 'server_lr'\]"):
        GridBatch(build, task, SimulatorOptions(), [{"client_lr": 0.1, "mu": 0.0, "server_lr": 0.1}, {"client_lr": 0.1}], SEEDS)
    with pytest.raises(ValueError, match="fedprox: mu must be a number >= 0, got -1"):
        GridBatch(build, task, SimulatorOptions(), [{"client_lr": 0.1, "mu": -1, "server_lr": 0.1}], SEEDS)
    epochs = lambda h: make_algorithm("fedavg", task.loss_fn, client_lr=0.1, num_epochs=int(h["epochs"]))  # noqa: E731
    with pytest.raises(ValueError, match="epochs and batch size must not vary"):
        GridBatch(epochs, task, SimulatorOptions(), [{"epochs": 1}, {"epochs": 2}], SEEDS)
