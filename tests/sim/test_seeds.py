"""Several seeds in one vmapped program compute exactly what one simulator per seed computes."""

import jax
import numpy as np
import pytest

from nordfl.algorithms import make_algorithm
from nordfl.algorithms.aggregators import coordinate_median as median
from nordfl.algorithms.attacks import Adversary, attack
from nordfl.sim import Simulator, SimulatorOptions
from nordfl.sim.packing import padded_steps, plan_buckets
from nordfl.sim.seeds import SeedBatch, seed_slice, split_lanes
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


def _split_tasks():
    """One task per seed: the same seven clients with other rows (other sizes too), as a data split per seed draws them."""
    return [uneven_task(sizes=(3, 40, 7, 0, 120, 15, 60), seed=0), uneven_task(sizes=(9, 31, 2, 5, 90, 44, 17), seed=4)]


def _assert_lanes_equal_separate_runs(batch, state, losses, make_alone, tasks):
    evaluations = batch.evaluate(state.server.params)
    for i, (seed, task) in enumerate(zip(SEEDS, tasks)):
        sim = make_alone(task, seed)
        alone = sim.init(logistic_regression(5, 3, seed=seed).init_params)
        for r in range(len(losses)):
            alone, metrics = sim.run_round(alone)
            np.testing.assert_allclose(losses[r][i], metrics.client_loss, rtol=1e-5)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), seed_slice(state.server, i), alone.server)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), seed_slice(state.clients, i), alone.clients)
        expected = sim.evaluate(alone.server.params)
        np.testing.assert_allclose(evaluations[i].pooled.accuracy, expected.pooled.accuracy)
        np.testing.assert_allclose(evaluations[i].sites.loss, expected.sites.loss, rtol=1e-5)


def _run(batch, rounds=3):
    state = batch.init([logistic_regression(5, 3, seed=s).init_params for s in SEEDS])
    losses = []
    for _ in range(rounds):
        state, metrics = batch.run_round(state)
        losses.append(np.asarray(metrics.client_loss))
    return state, losses


def test_a_data_split_per_seed_in_one_program_equals_each_seed_on_its_own_split():
    # SCAFFOLD with a sampled cohort and stragglers: each seed's lane trains on its own rows, keeps its own control
    # variates, and scores on its own test rows, exactly as a simulator on that seed's split alone.
    tasks = _split_tasks()
    algorithm = make_algorithm("scaffold", tasks[0].loss_fn, client_lr=0.1, num_epochs=2, batch_size=8, num_clients=7)
    options = SimulatorOptions(cohort_size=4, straggler_fraction=0.5, max_buckets=2)
    batch = SeedBatch(algorithm, tasks, options, SEEDS)
    assert batch.sim.num_clients == 7 and len(batch.sim.task.data.clients) == 14
    state, losses = _run(batch)
    _assert_lanes_equal_separate_runs(batch, state, losses, lambda task, seed: Simulator(algorithm, task, options, seed=seed), tasks)
    # The splits really differ: the same seed on the first split gives another model.
    same_split = SeedBatch(algorithm, tasks[0], options, SEEDS)
    other, _ = _run(same_split)
    flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(tree)])  # noqa: E731
    assert not np.allclose(flat(seed_slice(other.server, 1).params), flat(seed_slice(state.server, 1).params), atol=1e-3)


def test_a_data_split_per_seed_with_an_attack_and_a_robust_aggregator():
    # The held-updates path: the attack and the median see each lane's cohort only, with the lane's malicious clients.
    tasks = _split_tasks()
    algorithm = make_algorithm("fedavg", tasks[0].loss_fn, client_lr=0.1, num_epochs=1, batch_size=8)
    options = SimulatorOptions(cohort_size=5, max_buckets=2)
    adversary = Adversary(attack("sign_flip", scale=4.0), np.array([False, True, False, False, True, False, False]))
    batch = SeedBatch(algorithm, tasks, options, SEEDS, aggregate=median, adversary=adversary)
    state, losses = _run(batch, rounds=2)
    _assert_lanes_equal_separate_runs(
        batch, state, losses, lambda task, seed: Simulator(algorithm, task, options, seed=seed, aggregate=median, adversary=adversary), tasks)


def test_a_data_split_per_seed_refuses_tasks_that_do_not_match():
    tasks = _split_tasks()
    algorithm = make_algorithm("fedavg", tasks[0].loss_fn, client_lr=0.1)
    with pytest.raises(ValueError, match=r"task: expected one task per seed \(2\), got 1"):
        SeedBatch(algorithm, tasks[:1], SimulatorOptions(), SEEDS)
    renamed = uneven_task(sizes=(1, 2, 3))
    with pytest.raises(ValueError, match=r"task \(seed 0\): expected the clients \['site_0'"):
        SeedBatch(algorithm, [tasks[0], renamed], SimulatorOptions(), SEEDS)
    with pytest.raises(ValueError, match=r"evaluator: expected one simulator per seed \(2\)"):
        SeedBatch(algorithm, tasks, SimulatorOptions(), SEEDS, evaluator=Simulator(algorithm, tasks[0]))


def test_seeds_share_one_program_unless_one_split_would_pad_every_lane_far_beyond_its_own():
    options, local = SimulatorOptions(cohort_size=4), make_algorithm("fedavg", _split_tasks()[0].loss_fn, client_lr=0.1, batch_size=8).local
    assert split_lanes(_split_tasks(), options, local) == [[0, 1]]  # similar sizes: one program
    huge = uneven_task(sizes=(3, 40, 7, 0, 12000, 15, 60), seed=4)  # one seed's split holds a 12,000-row client
    assert split_lanes([*_split_tasks(), huge], options, local) == [[0], [1], [2]]  # 3 lanes would all train it


def test_planning_buckets_for_several_runs_counts_the_slots_of_one_runs_cohort():
    # Two runs of 3 clients: a bucket holding one client of each run needs 1 slot a round, not 2.
    sizes = [8, 8, 64, 8, 8, 64]
    plan = plan_buckets(sizes, batch_size=8, cohort_size=3, clients_per_run=3)
    assert [list(ids) for ids in plan] == [[0, 1, 3, 4], [2, 5]]
    assert padded_steps(sizes, plan, batch_size=8, cohort_size=3, clients_per_run=3) == 2 * 1 + 1 * 8
    assert padded_steps(sizes[:3], plan_buckets(sizes[:3], batch_size=8), batch_size=8) == 2 * 1 + 1 * 8
