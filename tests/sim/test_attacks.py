"""Attacks inside the compiled round give what a plain per-site loop with the same tampering gives."""

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest
from hydra import compose, initialize_config_module

from nordfl.algorithms import make_algorithm
from nordfl.algorithms.attacks import Adversary, label_flip, sign_flip
from nordfl.sim.config import ConfigError, build, register
from nordfl.sim.engine import Simulator, SimulatorOptions
from tests.sim.helpers import per_site_reference, uneven_task

register()
ROUNDS, SEED = 2, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def _malicious(task, *clients):
    flags = np.zeros(len(task.data.clients), bool)
    flags[list(clients)] = True
    return flags


def test_sign_flip_in_the_simulator_equals_a_per_site_loop_that_flips_by_hand():
    task = uneven_task(sizes=(10, 10, 10, 25, 25, 10))  # two sizes: the per-site loop compiles twice, not per client
    alg = make_algorithm("fedavg", task.loss_fn, client_lr=0.05, num_epochs=2, batch_size=8)
    malicious = _malicious(task, 1, 4)
    options = SimulatorOptions(cohort_size=4, max_buckets=2, chunk_size=2)
    sim = Simulator(alg, task, options, seed=SEED, adversary=Adversary(sign_flip(scale=3.0), malicious))
    state = sim.init(task.model.init_params)
    plans = []
    for _ in range(ROUNDS):
        plans.append(sim.plan(state.round))
        state, _ = sim.run_round(state)
    assert any(malicious[p.cohort].any() for p in plans)
    tamper = lambda client, update: jax.tree_util.tree_map(lambda u: -3.0 * u, update) if malicious[client] else update  # noqa: E731
    server, _ = per_site_reference(alg, task, plans, SEED, task.model.init_params, tamper=tamper)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), state.server, server)


def test_label_flip_in_the_simulator_equals_training_on_flipped_data():
    task = uneven_task()
    alg = make_algorithm("fedavg", task.loss_fn, client_lr=0.05, num_epochs=2, batch_size=8)
    malicious = _malicious(task, 2, 4)
    flipped = tuple(dataclasses.replace(c, train=c.train._replace(y=(2 - c.train.y).astype(c.train.y.dtype))) if bad else c
                    for c, bad in zip(task.data.clients, malicious))
    by_hand = task._replace(data=dataclasses.replace(task.data, clients=flipped))
    options = SimulatorOptions(max_buckets=2)
    results = []
    for t, adversary in ((task, Adversary(label_flip(), malicious)), (by_hand, None)):
        sim = Simulator(alg, t, options, seed=SEED, adversary=adversary)
        state = sim.init(task.model.init_params)
        for _ in range(ROUNDS):
            state, _ = sim.run_round(state)
        results.append(state.server)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), *results)


def _compose(*overrides):
    with initialize_config_module("nordfl.conf", version_base=None):
        return compose("config", overrides=list(overrides))


def test_attack_config_builds_the_adversary_and_names_bad_values():
    assert build(_compose()).adversary is None
    experiment = build(_compose("task=synthetic", "attack=sign_flip", "attack.scale=2"))
    assert experiment.adversary.malicious.sum() == 6  # 20 % of 30
    named = build(_compose("attack=label_flip", "attack.sites=[Hungary]")).adversary
    assert list(named.malicious) == [False, True, False, False]
    for overrides, message in (
        (("attack=sign_flip", "attack.fraction=1.5"), r"attack: fraction must be a number with 0 <= fraction < 1, got 1.5"),
        (("attack=sign_flip", "attack.sites=[Oslo]"), r"attack.sites: unknown client\(s\) 'Oslo'; the clients are Cleveland"),
        (("attack=sign_flip", "attack.fraction=0.05"), r"attack.fraction: selects no client of 4"),
        (("attack=sign_flip", "attack.scale=-1"), r"attack.sign_flip: scale must be a number > 0, got -1.0"),
        (("attack.name=flip",), r"attack.name: unknown name 'flip'; expected one of gaussian"),
        (("attack=sign_flip", "attack.sigma=2"), r"attack.sign_flip.*sigma"),
    ):
        with pytest.raises(ConfigError, match=message):
            build(_compose(*overrides))


def test_nordfl_sim_says_who_attacks(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.app", "attack=label_flip", "attack.sites=[Hungary]", "sim.rounds=1",
         "logger.progress=false", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "attack: label_flip by 1 malicious client(s): Hungary" in out.stdout
    assert (tmp_path / "metrics.jsonl").exists()
