"""The runtime's final global model equals the simulator's for the same config and seed."""

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from nordfl.sim.config import build, register
from nordfl.sim.engine import Simulator
from tests.runtime.helpers import SITES, provisioned, run_sites, site_agent, start_federation

ROUNDS = 3


def _simulate(overrides, rounds=ROUNDS):
    """The simulator's server state after ``rounds`` rounds of the same config."""
    register()
    with initialize_config_module("nordfl.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    experiment = build(cfg)
    sim = Simulator(experiment.algorithm, experiment.task, experiment.options, seed=cfg.seed, aggregate=experiment.aggregate)
    state = sim.init(experiment.task.model.init_params)
    for _ in range(rounds):
        state, _ = sim.run_round(state)
    return state.server


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "scaffold"])
def test_runtime_equals_simulator(tmp_path, algorithm):
    overrides = [f"algorithm={algorithm}", "seed=3"]
    federation, files = provisioned(tmp_path)
    coordinator, port, driver = start_federation(tmp_path, federation, overrides + [f"runtime.rounds={ROUNDS}"])
    results, errors = run_sites([site_agent(tmp_path, federation, files, name, port) for name in SITES])
    driver.join(timeout=60)
    assert not errors and set(results) == set(SITES)
    assert coordinator.round == ROUNDS

    simulated = _simulate(overrides)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
        coordinator.server, simulated,
    )
    # Every site's final metrics reached the coordinator, computed on its own test rows.
    assert set(coordinator.final_metrics) == set(SITES)
    assert all(0 <= m["accuracy"] <= 1 for m in coordinator.final_metrics.values())
