"""Aggregators against NumPy, including a client of weight 0 that must not count."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from nordfl import registry
from nordfl.algorithms import aggregator, coordinate_median, trimmed_mean, weighted_mean
from nordfl.algorithms.aggregators import is_linear, linear_aggregators

RNG = np.random.default_rng(0)
UPDATES = {"a": RNG.normal(size=(7, 3, 2)).astype(np.float32), "b": RNG.normal(size=(7,)).astype(np.float32)}
WEIGHTS = np.array([3.0, 0.0, 1.0, 5.0, 2.0, 0.5, 4.0], np.float32)  # client 1 has weight 0
UPDATES["a"][1] = 1e6  # garbage from the zero-weight client must not leak in
VALID = WEIGHTS > 0


def _jax(tree):
    return {k: jnp.asarray(v) for k, v in tree.items()}


def test_weighted_mean():
    agg = weighted_mean(_jax(UPDATES), jnp.asarray(WEIGHTS))
    for k, u in UPDATES.items():
        want = np.tensordot(WEIGHTS[VALID], u[VALID].astype(np.float64), axes=1) / WEIGHTS.sum()
        np.testing.assert_allclose(agg.mean[k], want, rtol=1e-5)
    assert float(agg.total_weight) == pytest.approx(WEIGHTS.sum())
    assert float(agg.num_clients) == 6


@pytest.mark.parametrize("garbage", [np.nan, np.inf])
def test_weighted_mean_ignores_non_finite_updates_of_weight_zero(garbage):
    updates = {k: v.copy() for k, v in UPDATES.items()}
    updates["a"][1], updates["b"][1] = garbage, garbage
    clean = weighted_mean(_jax(UPDATES), jnp.asarray(WEIGHTS))
    agg = weighted_mean(_jax(updates), jnp.asarray(WEIGHTS))
    for k in updates:
        np.testing.assert_allclose(agg.mean[k], clean.mean[k], rtol=1e-6)
    updates["a"][0, 0, 0] = np.nan  # a counted client's NaN is a real divergence: it must show
    assert np.isnan(np.asarray(weighted_mean(_jax(updates), jnp.asarray(WEIGHTS)).mean["a"][0, 0]))


@pytest.mark.parametrize("num_valid", [6, 5])  # even and odd number of participating clients
def test_coordinate_median(num_valid):
    weights = WEIGHTS.copy()
    if num_valid == 5:
        weights[4] = 0.0
    valid = weights > 0
    agg = coordinate_median(_jax(UPDATES), jnp.asarray(weights))
    for k, u in UPDATES.items():
        np.testing.assert_allclose(agg.mean[k], np.median(u[valid], axis=0), rtol=1e-6)
    assert float(agg.num_clients) == num_valid


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.34, 0.49])
def test_trimmed_mean(beta):
    agg = trimmed_mean(beta)(_jax(UPDATES), jnp.asarray(WEIGHTS))
    for k, u in UPDATES.items():
        np.testing.assert_allclose(agg.mean[k], stats.trim_mean(u[VALID], beta, axis=0), rtol=1e-5, atol=1e-6)


def test_no_participant_gives_zero():
    zero = jnp.zeros(7, jnp.float32)
    for agg in (weighted_mean, coordinate_median, trimmed_mean(0.2)):
        out = agg(_jax(UPDATES), zero)
        np.testing.assert_array_equal(out.mean["a"], 0.0)
        assert float(out.num_clients) == 0


def test_bad_aggregator_settings():
    with pytest.raises(ValueError, match="trimmed_mean: beta must be < 0.5"):
        trimmed_mean(0.5)
    with pytest.raises(ValueError, match="aggregator: unknown name 'mean'; expected one of bulyan, centered_clipping, krum, median, trimmed_mean, weighted_mean"):
        aggregator("mean")
    with pytest.raises(ValueError, match="aggregator.median: unknown hyperparameter 'beta'; expected one of none"):
        aggregator("median", beta=0.1)
    with pytest.raises(ValueError, match="aggregator.trimmed_mean: unknown hyperparameter 'gamma'; expected one of beta"):
        aggregator("trimmed_mean", gamma=0.1)
    assert aggregator("trimmed_mean", beta=0.2) is not None


def test_every_shipped_aggregator_is_registered_and_declares_linearity():
    """Streaming, DP-FedAvg and secure aggregation read is_linear, never the name."""
    assert registry.names("aggregator") == ("bulyan", "centered_clipping", "krum", "median", "trimmed_mean", "weighted_mean")
    assert linear_aggregators() == ("weighted_mean",)
    assert is_linear(aggregator("weighted_mean")) and is_linear(weighted_mean)
    assert not is_linear(aggregator("median")) and not is_linear(aggregator("trimmed_mean", beta=0.1))


def _rows():
    """Each valid client's update as one float64 row, in the leaves' flattening order (a, then b)."""
    return {i: np.concatenate([UPDATES["a"][i].ravel(), UPDATES["b"][i].ravel()]).astype(np.float64)
            for i in range(len(WEIGHTS)) if VALID[i]}


def _split(row):
    return {"a": row[:6].reshape(3, 2), "b": row[6]}


@pytest.mark.parametrize("byzantine,selected", [(1, 1), (2, 1), (1, 3)])
def test_krum_against_a_plain_loop(byzantine, selected):
    rows = _rows()
    m = len(rows)
    scores = {}
    for i, x in rows.items():
        distances = sorted(float(np.sum((x - y) ** 2)) for j, y in rows.items() if j != i)
        scores[i] = sum(distances[: m - byzantine - 2])
    best = sorted(scores, key=scores.get)[:selected]
    want = _split(np.mean([rows[i] for i in best], axis=0))
    agg = aggregator("krum", byzantine=byzantine, selected=selected)(_jax(UPDATES), jnp.asarray(WEIGHTS))
    for k in want:
        np.testing.assert_allclose(agg.mean[k], want[k], rtol=1e-4, atol=1e-5)
    assert float(agg.num_clients) == 6


def _krum_scores_loop(rows: dict, byzantine: int) -> dict:
    scores = {}
    for i, x in rows.items():
        distances = sorted(float(np.sum((x - y) ** 2)) for j, y in rows.items() if j != i)
        scores[i] = sum(distances[: max(len(rows) - byzantine - 2, 1)])
    return scores


@pytest.mark.parametrize("byzantine", [0, 1, 2])
def test_bulyan_against_a_plain_loop(byzantine):
    rows = _rows()
    pool, picked = dict(rows), []
    for _ in range(max(len(rows) - 2 * byzantine, 1)):  # Krum, one pick at a time
        scores = _krum_scores_loop(pool, byzantine)
        lowest = min(scores.values())
        best = min(i for i, v in scores.items() if v <= lowest * (1 + 1e-5))  # ties (mutual neighbours): lowest index
        picked.append(pool.pop(best))
    picked = np.stack(picked)
    beta = max(len(picked) - 2 * byzantine, 1)
    median = np.median(picked, axis=0)
    want = np.empty(picked.shape[1])
    for c in range(picked.shape[1]):  # per coordinate: the beta picked values nearest the median
        nearest = sorted(picked[:, c], key=lambda v: abs(v - median[c]))[:beta]
        want[c] = np.mean(nearest)
    want = _split(want)
    agg = aggregator("bulyan", byzantine=byzantine)(_jax(UPDATES), jnp.asarray(WEIGHTS))
    for k in want:
        np.testing.assert_allclose(agg.mean[k], want[k], rtol=1e-4, atol=1e-5)
    assert float(agg.num_clients) == 6


def test_bulyan_ignores_a_hostile_minority():
    updates = {"a": RNG.normal(0, 0.01, (11, 2)).astype(np.float32), "b": np.zeros((11,), np.float32)}
    updates["a"][:2] = -1e3  # two colluding attackers (11 >= 4f + 3 for f = 2)
    agg = aggregator("bulyan", byzantine=2)(_jax(updates), jnp.ones(11, jnp.float32))
    assert np.abs(np.asarray(agg.mean["a"])).max() < 0.05


def test_krum_ignores_one_far_outlier():
    updates = {"a": np.zeros((5, 2), np.float32), "b": np.zeros((5,), np.float32)}
    updates["a"][:4] = RNG.normal(0, 0.01, (4, 2))
    updates["a"][4] = 1e4  # the attacker
    agg = aggregator("krum", byzantine=1, selected=3)(_jax(updates), jnp.ones(5, jnp.float32))
    assert np.abs(np.asarray(agg.mean["a"])).max() < 0.1


def test_centered_clipping_against_a_plain_loop():
    rows = _rows()
    x = np.stack(list(rows.values()))
    v = np.median(x, axis=0)
    for _ in range(3):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        v = v + np.mean(diff * np.minimum(1.0, 0.5 / norms)[:, None], axis=0)
    want = _split(v)
    agg = aggregator("centered_clipping", tau=0.5, iterations=3)(_jax(UPDATES), jnp.asarray(WEIGHTS))
    for k in want:
        np.testing.assert_allclose(agg.mean[k], want[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,options,field,value", [
    ("krum", {"byzantine": -1}, "byzantine", "-1"), ("krum", {"selected": 0}, "selected", "0"), ("bulyan", {"byzantine": 1.5}, "byzantine", "1.5"),
    ("centered_clipping", {"tau": 0.0}, "tau", "0.0"), ("centered_clipping", {"iterations": 0}, "iterations", "0")])
def test_robust_aggregator_options_are_checked(name, options, field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        aggregator(name, **options)
