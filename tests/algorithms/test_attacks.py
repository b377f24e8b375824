"""Simulated attacks against NumPy references: only malicious rows change, and each into what its paper says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nordfl.algorithms.attacks import (
    Adversary, attack, choose_malicious, gaussian, label_flip, little_is_enough, little_is_enough_z, poison, scaled, sign_flip,
)
from nordfl.tasks import Examples
from tests.sim.helpers import uneven_task

RNG = np.random.default_rng(3)
UPDATES = {"a": RNG.normal(size=(8, 3, 2)).astype(np.float32), "b": RNG.normal(size=(8,)).astype(np.float32)}
WEIGHTS = np.array([2.0, 1.0, 0.0, 3.0, 1.0, 4.0, 0.5, 1.0], np.float32)  # client 2 does not count
MALICIOUS = np.array([False, True, False, False, True, False, False, False])
KEY = jax.random.key(0)


def _apply(built, malicious=MALICIOUS, weights=WEIGHTS):
    out = built.update({k: jnp.asarray(v) for k, v in UPDATES.items()}, jnp.asarray(malicious), jnp.asarray(weights), KEY)
    return {k: np.asarray(v) for k, v in out.items()}


def _honest_rows_unchanged(out):
    for k, u in UPDATES.items():
        np.testing.assert_array_equal(out[k][~MALICIOUS], u[~MALICIOUS])


@pytest.mark.parametrize("built, factor", [(sign_flip(), -1.0), (sign_flip(scale=4.0), -4.0), (scaled(), 10.0), (scaled(2.5), 2.5)])
def test_sign_flip_and_scaled(built, factor):
    out = _apply(built)
    _honest_rows_unchanged(out)
    for k, u in UPDATES.items():
        np.testing.assert_allclose(out[k][MALICIOUS], factor * u[MALICIOUS], rtol=1e-6)


def test_gaussian_replaces_malicious_rows_with_noise_of_the_stated_scale():
    big = {"w": np.zeros((4, 20_000), np.float32)}
    malicious = np.array([True, False, True, False])
    out = gaussian(sigma=3.0).update({"w": jnp.asarray(big["w"])}, jnp.asarray(malicious), jnp.ones(4, jnp.float32), KEY)
    w = np.asarray(out["w"])
    assert np.all(w[~malicious] == 0)
    for row in w[malicious]:
        assert abs(row.std() - 3.0) < 0.06 and abs(row.mean()) < 0.06  # 20,000 draws: std error ~0.02
    assert not np.allclose(w[0], w[2])  # every malicious client draws its own noise


@pytest.mark.parametrize("n, m", [(10, 2), (50, 10), (7, 3), (100, 20)])
def test_little_is_enough_z_max_matches_the_paper(n, m):
    s = np.floor(n / 2 + 1) - m
    want = stats.norm.ppf((n - s) / n)
    assert float(little_is_enough_z(jnp.int32(n), jnp.int32(m))) == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("z", [None, 1.5])
def test_little_is_enough_against_a_numpy_loop(z):
    out = _apply(little_is_enough(z))
    _honest_rows_unchanged(out)
    counted = WEIGHTS > 0
    honest = counted & ~MALICIOUS
    shift = z if z is not None else stats.norm.ppf((counted.sum() - (np.floor(counted.sum() / 2 + 1) - (counted & MALICIOUS).sum()))
                                                   / counted.sum())
    for k, u in UPDATES.items():
        rows = u[honest].astype(np.float64)
        want = rows.mean(axis=0) - shift * rows.std(axis=0)  # population std over the honest, counted clients
        for i in np.flatnonzero(MALICIOUS):
            np.testing.assert_allclose(out[k][i], want, rtol=1e-4, atol=1e-6)


def test_label_flip_poisons_only_the_malicious_clients_training_rows():
    task = uneven_task()
    malicious = np.zeros(len(task.data.clients), bool)
    malicious[[1, 4]] = True
    poisoned = poison(task.data, Adversary(label_flip(), malicious))
    for i, (before, after) in enumerate(zip(task.data.clients, poisoned.clients)):
        np.testing.assert_array_equal(after.test.y, before.test.y)
        np.testing.assert_array_equal(after.train.x, before.train.x)
        want = 2 - before.train.y if malicious[i] else before.train.y  # 3 classes
        np.testing.assert_array_equal(after.train.y, want)
    with pytest.raises(ValueError, match="label_flip: needs a classification task"):
        label_flip().data(Examples(np.zeros((2, 1), np.float32), np.zeros(2, np.float32)), 1)


def test_choose_malicious():
    names = [f"c{i}" for i in range(30)]
    chosen = choose_malicious(names, fraction=0.2, seed=1)
    assert chosen.sum() == 6
    assert np.array_equal(chosen, choose_malicious(names, fraction=0.2, seed=1))
    assert not np.array_equal(chosen, choose_malicious(names, fraction=0.2, seed=2))
    assert list(np.flatnonzero(choose_malicious(names, sites=["c3", "c7"]))) == [3, 7]
    with pytest.raises(ValueError, match=r"attack.sites: unknown client\(s\) 'Oslo'"):
        choose_malicious(names, sites=["Oslo"])
    with pytest.raises(ValueError, match=r"attack: fraction must be .* got 1.5"):
        choose_malicious(names, fraction=1.5)


def test_attack_by_name_checks_its_hyperparameters():
    assert isinstance(attack("sign_flip", scale=2.0).update, type(lambda: 0))
    with pytest.raises(ValueError, match="attack.name: unknown name 'flip'.*sign_flip"):
        attack("flip")
    with pytest.raises(ValueError, match="scale must be a number > 0, got -1"):
        attack("sign_flip", scale=-1.0)
    with pytest.raises((ValueError, TypeError), match="sigma"):
        attack("sign_flip", sigma=1.0)
