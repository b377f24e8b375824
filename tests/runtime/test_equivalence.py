"""The runtime's final global model equals the simulator's for the same config and seed, and so do
the sites' own (personalised) models' scores."""

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from nordfl.sim.config import build, register
from nordfl.sim.engine import Simulator
from nordfl.sim.personal import PersonalEvaluator
from tests.runtime.helpers import SITES, provisioned, run_sites, site_agent, start_federation

ROUNDS = 3


def _simulate(overrides, rounds=ROUNDS):
    """The simulator's server state after ``rounds`` rounds of the same config."""
    return _simulate_with_own_site(overrides, rounds)[0]


def _simulate_with_own_site(overrides, rounds=ROUNDS):
    """``_simulate``'s server state, and each site's own model's test accuracy (in site order)."""
    register()
    with initialize_config_module("nordfl.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    experiment = build(cfg)
    sim = Simulator(experiment.algorithm, experiment.task, experiment.options, seed=cfg.seed, aggregate=experiment.aggregate)
    state = sim.init(experiment.task.model.init_params)
    for _ in range(rounds):
        state, _ = sim.run_round(state)
    own = PersonalEvaluator(sim, experiment.algorithm).evaluate(state.server, state.clients, seed=cfg.seed)
    return state.server, [float(a) for a in own.accuracy]  # in site order


@pytest.mark.slow
# FedProx is FedAvg with another local objective, pure algorithm code the two share; Ditto's personal
# models train on that same proximal objective, and CI time is short. Multi-Krum stands for the robust
# aggregators (whole updates held, not a weighted sum): the runtime aggregates with the same function.
@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold", "ditto", "fedavg+krum"])
def test_runtime_equals_simulator(tmp_path, algorithm):
    algorithm, _, aggregator = algorithm.partition("+")
    overrides = [f"algorithm={algorithm}", "seed=3"]
    if aggregator:  # 4 sites: each scored against its 2 nearest others, the mean of the best 2 kept
        overrides += [f"algorithm.aggregator.name={aggregator}", "algorithm.aggregator.byzantine=0",
                      "algorithm.aggregator.selected=2"]
    if algorithm == "ditto":  # personalised, then fine-tuned: both hooks on the same path as the simulator's
        overrides.append("algorithm.fine_tune.epochs=1")
    federation, files = provisioned(tmp_path)
    coordinator, port, driver = start_federation(tmp_path, federation, overrides + [f"runtime.rounds={ROUNDS}"])
    results, errors = run_sites([site_agent(tmp_path, federation, files, name, port) for name in SITES])
    driver.join(timeout=60)
    assert not errors and set(results) == set(SITES)
    assert coordinator.round == ROUNDS

    simulated, own_accuracy = _simulate_with_own_site(overrides)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
        coordinator.server, simulated,
    )
    # Every site's final metrics reached the coordinator, computed on its own test rows.
    assert set(coordinator.final_metrics) == set(SITES)
    assert all(0 <= m["accuracy"] <= 1 for m in coordinator.final_metrics.values())
    if algorithm == "ditto":  # each site scored its own fine-tuned Ditto model as the simulator does
        for site, accuracy in zip(SITES, own_accuracy):
            assert coordinator.final_metrics[site]["personal_accuracy"] == pytest.approx(accuracy, abs=1e-6), site
    else:
        assert not any("personal_accuracy" in m for m in coordinator.final_metrics.values())
