"""The same run on 1 and 2 devices, and chunked or not, gives the same result; cost follows the cohort."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, name, devices, chunk=None):
    out = tmp_path / f"{name}.npz"
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    args = [sys.executable, "-m", "tests.sim.run_uneven", str(out)] + ([str(chunk)] if chunk else [])
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with np.load(out) as archive:
        return int(archive["devices"]), [archive[f"arr_{i}"] for i in range(len(archive.files) - 1)]


@pytest.mark.slow
def test_one_and_two_devices_and_chunks_agree(tmp_path):
    n1, one = _run(tmp_path, "one", devices=1)
    n2, two = _run(tmp_path, "two", devices=2)
    n2c, chunked = _run(tmp_path, "two_chunked", devices=2, chunk=2)
    assert (n1, n2, n2c) == (1, 2, 2)
    for a, b, c in zip(one, two, chunked):  # float sums in another order: equal to ~1 ulp of the inputs
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-6)


def test_chunked_equals_unchunked_in_process():
    import jax

    from nordfl.algorithms import make_algorithm
    from nordfl.sim.engine import Simulator, SimulatorOptions
    from tests.sim.helpers import uneven_task

    task = uneven_task()
    alg = make_algorithm("fedprox", task.loss_fn, client_lr=0.05, num_epochs=2, batch_size=8, mu=0.1)
    results = []
    for chunk, on_host in ((None, False), (1, False), (3, True)):
        options = SimulatorOptions(cohort_size=5, chunk_size=chunk, data_on_host=on_host)
        sim = Simulator(alg, task, options, seed=2)
        state = sim.init(task.model.init_params)
        for _ in range(3):
            state, _ = sim.run_round(state)
        results.append(state.server.params)
    for other in results[1:]:
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7), results[0], other)


def test_round_cost_follows_the_cohort_not_the_registered_clients():
    from nordfl.sim.packing import plan_buckets

    sizes = np.random.default_rng(0).integers(50, 60, 10_000)
    for cohort in (10, 100):
        plan = plan_buckets(sizes, batch_size=10, cohort_size=cohort)
        slots = sum(min(cohort, len(ids)) for ids in plan)
        assert slots == cohort * len(plan) and len(plan) == 1  # one bucket of `cohort` slots, whatever N is


def test_auto_chunk_size_fills_the_cpu_budget_with_whole_clients():
    from nordfl.sim.engine import CPU_CHUNK_BYTES, auto_chunk_size

    big = {"w": np.zeros((1000, 1000), np.float32), "b": np.zeros(1000, np.float32)}  # 4,004,000 bytes
    per_client = 3 * 4_004_000 + 100 * 400  # params, gradients, updated params; 100 rows of 100 float32
    assert auto_chunk_size(big, 400, 100, 2, "cpu") == 2 * (CPU_CHUNK_BYTES // per_client) == 4
    tiny = {"w": np.zeros((60, 10), np.float32)}
    assert auto_chunk_size(tiny, 244, 200, 2, "cpu") == 2 * (CPU_CHUNK_BYTES // (3 * 2400 + 200 * 244))
    huge = {"w": np.zeros((8000, 8000), np.float32)}  # 256 MB: still one client per device
    assert auto_chunk_size(huge, 4, 1, 4, "cpu") == 4
    assert auto_chunk_size(big, 400, 100, 1, "gpu") is None  # off the CPU: the whole cohort


def test_weighted_mean_is_summed_chunk_by_chunk_not_stacked():
    """With ``weighted_mean`` the round holds one chunk's updates, not the cohort's: the compiled
    program's scratch memory falls by about the stacked updates, and the model is the one the
    stacked mean gives (the same aggregator behind another name takes the stacked path)."""
    import jax

    from nordfl.algorithms import make_algorithm, weighted_mean
    from nordfl.sim.engine import Simulator, SimulatorOptions
    from nordfl.tasks import classification_task, mlp
    from tests.sim.helpers import uneven_task

    base = uneven_task(sizes=(9, 30, 12, 0, 25, 16, 20, 11, 14, 18, 7, 22))
    task = classification_task("uneven-mlp", base.data, mlp(5, 3, hidden=(256, 256)))
    alg = make_algorithm("fedavg", task.loss_fn, client_lr=0.05, num_epochs=1, batch_size=8)
    options = SimulatorOptions(cohort_size=10, chunk_size=2, max_buckets=1, dropout_fraction=0.2)
    stacked_bytes = 10 * sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(task.model.init_params))
    results, scratch = [], []
    for aggregate in (weighted_mean, lambda updates, weights: weighted_mean(updates, weights)):
        sim = Simulator(alg, task, options, seed=4, aggregate=aggregate)
        state = sim.init(task.model.init_params)
        slots = tuple(sim._slots(sim.plan(0)))
        compiled = sim._round.lower(state.server, state.clients, sim._train_pool, slots, sim._base_key, np.int32(0),
                                    gather_on_device=True).compile()
        scratch.append(compiled.memory_analysis().temp_size_in_bytes)
        for _ in range(2):
            state, _ = sim.run_round(state)
        results.append(state.server.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *results)
    assert scratch[1] - scratch[0] > 0.7 * stacked_bytes, (scratch, stacked_bytes)


@pytest.mark.parametrize("slots, max_chunk, devices, expected", [
    (1000, 894, 2, (2, 500)),  # evened out: 1,000 slots, not 2 x 894 = 1,788
    (100, 4, 2, (25, 4)),  # W3: 2 clients per core
    (5, 1, 2, (3, 2)),  # a chunk is at least one client per device
    (7, 100, 2, (1, 8)),  # the whole cohort, rounded up to the devices
    (10, 3, 1, (4, 3)),
])
def test_chunk_layout_is_the_fewest_even_chunks(slots, max_chunk, devices, expected):
    from nordfl.sim.engine import chunk_layout

    num_chunks, chunk = chunk_layout(slots, max_chunk, devices)
    assert (num_chunks, chunk) == expected
    assert chunk % devices == 0 and num_chunks * chunk >= slots
    assert num_chunks * chunk - slots < num_chunks * devices  # padding under one device-width per chunk
