"""The qualitative findings of the SCAFFOLD and FedProx papers, on seeded Synthetic(1,1) curves.

Settings follow the FedProx paper (Synthetic(1,1), batch 10, lr 0.01, 10 of 30 devices per
round, 20 local epochs) cut to 20 rounds; SCAFFOLD's client drift shows most clearly with
full participation, so that comparison uses 20 devices, all in every round.
"""

import numpy as np
import pytest

from nordfl.algorithms import make_algorithm
from nordfl.sim.engine import Simulator, SimulatorOptions
from nordfl.tasks import make_task


def _curve(task, name, *, rounds, num_epochs, cohort, stragglers=0.0, keep=True, seed=0, **hyper):
    alg = make_algorithm(name, task.loss_fn, client_lr=0.01, num_epochs=num_epochs, batch_size=10, **hyper)
    options = SimulatorOptions(cohort_size=cohort, straggler_fraction=stragglers,
                               keep_stragglers=keep, max_buckets=2)
    sim = Simulator(alg, task, options, seed=seed)
    state = sim.init(task.model.init_params)
    curve = []
    for r in range(rounds):
        state, _ = sim.run_round(state)
        if (r + 1) % 5 == 0:
            curve.append(sim.evaluate(state.server.params).train_loss)
    return np.asarray(curve)


@pytest.mark.slow
def test_scaffold_beats_fedavg_under_strong_heterogeneity():
    task = make_task("synthetic", alpha=1.0, beta=1.0, num_devices=20, seed=0)
    kw = dict(rounds=15, num_epochs=10, cohort=20)
    fedavg = _curve(task, "fedavg", **kw)
    scaffold = _curve(task, "scaffold", num_clients=20, **kw)
    assert scaffold[-1] < 0.75 * fedavg[-1], (scaffold, fedavg)


@pytest.fixture(scope="module")
def straggler_curves():
    """FedProx-paper systems heterogeneity: 90% stragglers, kept or dropped, mu = 0 or 1."""
    task = make_task("synthetic", alpha=1.0, beta=1.0, num_devices=30, seed=0)
    kw = dict(rounds=20, num_epochs=20, cohort=10, stragglers=0.9)
    return {
        "keep_mu0": _curve(task, "fedprox", mu=0.0, keep=True, **kw),
        "drop_mu0": _curve(task, "fedprox", mu=0.0, keep=False, **kw),
        "keep_mu1": _curve(task, "fedprox", mu=1.0, keep=True, **kw),
    }


@pytest.mark.slow
def test_keeping_stragglers_partial_work_beats_dropping_it(straggler_curves):
    keep, drop = straggler_curves["keep_mu0"], straggler_curves["drop_mu0"]
    assert np.all(keep < drop), (keep, drop)
    assert keep[-1] < 0.75 * drop[-1]


@pytest.mark.slow
def test_proximal_term_lowers_the_loss_with_stragglers(straggler_curves):
    mu1, mu0 = straggler_curves["keep_mu1"], straggler_curves["keep_mu0"]
    assert mu1[-1] < mu0[-1], (mu1, mu0)
    assert mu1.mean() < mu0.mean()
