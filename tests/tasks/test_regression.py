"""Regression tasks: mean-squared-error training and RMSE / MAE / R² against NumPy, how a task
declares its kind, and every algorithm training a float outcome in the simulator (padded,
bucketed, with stragglers), per site and pooled."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nordfl import registry
from nordfl.conf.schema import build_algorithm
from nordfl.sim import Simulator, SimulatorOptions
from nordfl.sim.metrics_log import evaluation_row
from nordfl.sim.suite import compose_run
from nordfl.tasks import (ClientSplit, EvalMetrics, Examples, FederatedDataset, RegressionMetrics, logistic_regression,
                          metrics_type, regression_fns, regression_task, task_fns, task_kind)
from nordfl.tasks.data import stratified_split
from nordfl.tasks.partition import repartition
from nordfl.tasks.task import TaskConfig, make_task, task_shape

NUM_FEATURES = 3
TRUE_W, TRUE_B = np.array([1.5, -2.0, 0.5]), 4.0


def _linear(kernel, bias):
    model = logistic_regression(NUM_FEATURES, 1)  # one dense layer with one output: linear regression
    params = {"linear": {"kernel": jnp.asarray(kernel, jnp.float32).reshape(NUM_FEATURES, 1),
                         "bias": jnp.asarray([bias], jnp.float32)}}
    return model, params


def test_regression_loss_and_metrics_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, NUM_FEATURES)).astype(np.float32)
    y = (x @ TRUE_W + TRUE_B + rng.normal(0, 0.5, 9)).astype(np.float32)
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 0, 0], bool)
    x[~mask] = 1e3  # padding rows would dominate if they counted
    kernel, bias = np.array([1.0, -1.0, 0.0]), 3.0
    model, params = _linear(kernel, bias)
    fns = regression_fns(model)
    xr, yr = x[mask].astype(np.float64), y[mask].astype(np.float64)
    residual = xr @ kernel + bias - yr
    mse = np.mean(residual**2)
    examples = Examples(jnp.asarray(x), jnp.asarray(y))
    np.testing.assert_allclose(fns.loss_fn(params, examples, jnp.asarray(mask)), mse, rtol=1e-5)
    got = jax.jit(fns.evaluate)(params, examples, jnp.asarray(mask))
    assert isinstance(got, RegressionMetrics)
    np.testing.assert_allclose(got.loss, mse, rtol=1e-5)
    np.testing.assert_allclose(got.rmse, np.sqrt(mse), rtol=1e-5)
    np.testing.assert_allclose(got.mae, np.mean(np.abs(residual)), rtol=1e-5)
    np.testing.assert_allclose(got.r2, 1 - np.sum(residual**2) / np.sum((yr - yr.mean()) ** 2), rtol=1e-5)
    # The gradient algorithms follow: d MSE / d(w, b) = 2/n [X 1]^T r.
    grads = jax.grad(fns.loss_fn)(params, examples, jnp.asarray(mask))
    np.testing.assert_allclose(grads["linear"]["kernel"][:, 0], 2 * xr.T @ residual / len(yr), rtol=1e-4)
    np.testing.assert_allclose(grads["linear"]["bias"][0], 2 * residual.mean(), rtol=1e-4)


def test_task_fns_picks_the_kinds_loss_and_metrics():
    model, params = _linear(np.zeros(3), 0.0)
    examples = Examples(jnp.ones((2, NUM_FEATURES)), jnp.asarray([1.0, 2.0]))
    assert isinstance(task_fns(model, "regression", 1).evaluate(params, examples, jnp.ones(2, bool)), RegressionMetrics)
    two = logistic_regression(NUM_FEATURES, 2)
    labels = Examples(examples.x, jnp.asarray([0, 1], jnp.int32))
    assert isinstance(task_fns(two, "classification", 2).evaluate(two.init_params, labels, jnp.ones(2, bool)), EvalMetrics)
    with pytest.raises(ValueError, match="regression: the model needs 1 output"):
        task_fns(two, "regression", 2)
    with pytest.raises(ValueError, match="task kind: expected one of classification, regression, got 'survival'"):
        task_fns(model, "survival", 1)


def _dataset(sizes=(30, 50, 80, 12), seed=0) -> FederatedDataset:
    """Clients of uneven size (several size buckets), y = x w + b + noise as float32."""
    rng = np.random.default_rng(seed)
    clients = []
    for i, n in enumerate(sizes):
        x = rng.normal(0.3 * i, 1, (n, NUM_FEATURES)).astype(np.float32)
        y = (x @ TRUE_W + TRUE_B + rng.normal(0, 0.3, n)).astype(np.float32)
        cut = (3 * n) // 4
        clients.append(ClientSplit(f"site{i}", Examples(x[:cut], y[:cut]), Examples(x[cut:], y[cut:])))
    return FederatedDataset("linear", tuple(clients), num_classes=1)


def test_a_registered_task_declares_its_kind(clean_registry):
    assert task_kind("heart") == "classification"  # no kind declared

    @registry.register("task", "linear_fixture", config=TaskConfig, feature_shape=(NUM_FEATURES,), num_classes=1, kind="regression")
    def linear_fixture(*, seed: int = 0) -> FederatedDataset:
        return _dataset(seed=seed)

    @registry.register("task", "either_fixture", config=TaskConfig, shape=lambda *, target: ((NUM_FEATURES,), 1 if target == "y" else 2),
                       kind=lambda *, target: "regression" if target == "y" else "classification")
    def either_fixture(*, target: str, seed: int = 0) -> FederatedDataset:
        return _dataset(seed=seed)

    @registry.register("task", "odd_fixture", config=TaskConfig, feature_shape=(1,), num_classes=1, kind="ranking")
    def odd_fixture(*, seed: int = 0) -> FederatedDataset:
        return _dataset(seed=seed)

    assert task_kind("linear_fixture") == "regression"
    assert task_kind("either_fixture", {"target": "y"}) == "regression"
    assert task_kind("either_fixture", {"target": "label"}) == "classification"
    assert task_shape("either_fixture", {"target": "y"}) == ((NUM_FEATURES,), 1)
    with pytest.raises(ValueError, match="task odd_fixture: kind must be one of classification, regression, got 'ranking'"):
        task_kind("odd_fixture")
    task = make_task("linear_fixture")
    assert metrics_type(task) is RegressionMetrics
    assert isinstance(task.evaluate(task.model.init_params, task.data.clients[0].test, np.ones(len(task.data.clients[0].test.y), bool)),
                      RegressionMetrics)


def test_partitioners_split_a_continuous_outcome_at_random_and_label_skew_is_refused():
    data = _dataset()
    train, test = stratified_split(np.linspace(0, 1, 40), 0.25, np.random.default_rng(0))
    assert len(test) == 10 and np.array_equal(np.sort(np.concatenate([train, test])), np.arange(40))
    assert not np.array_equal(test, np.arange(10))  # not the smallest outcomes, as "one class per value" would pick
    iid = repartition(data, "iid", num_clients=5, seed=0)
    assert sum(iid.train_sizes()) + sum(iid.test_sizes()) == 172 and iid.clients[0].train.y.dtype == np.float32
    assert repartition(data, "quantity_skew", num_clients=3, seed=0).num_classes == 1
    for name, options in (("dirichlet", {"alpha": 0.5}), ("k_classes", {"k": 2})):
        with pytest.raises(ValueError, match=f"partition.name: {name} deals out class labels, but task linear has a continuous"):
            repartition(data, name, num_clients=3, seed=0, **options)


@pytest.mark.parametrize("algorithm", ["fedavg", *(pytest.param(name, marks=pytest.mark.slow) for name in
                                                    ("fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"))])
def test_every_algorithm_trains_a_regression_task_with_padding_and_stragglers(algorithm):
    data = _dataset()
    task = regression_task("linear", data, logistic_regression(NUM_FEATURES, 1))
    cfg = compose_run([f"algorithm={algorithm}", "algorithm.client_lr=0.05", "algorithm.num_epochs=2", "algorithm.batch_size=8"])
    alg, _ = build_algorithm(cfg, task.loss_fn, len(data.clients))  # the shipped defaults of each algorithm
    options = SimulatorOptions(cohort_size=3, straggler_fraction=0.5, data_on_host=algorithm == "fedavg")
    sim = Simulator(alg, task, options, seed=0)
    state = sim.init(task.model.init_params)
    before = sim.evaluate(state.server.params)
    for _ in range(4):
        state, metrics = sim.run_round(state)
    after = sim.evaluate(state.server.params)
    assert isinstance(after.pooled, RegressionMetrics) and after.sites.rmse.shape == (4,)
    assert math.isfinite(float(metrics.client_loss)) and after.pooled.rmse < before.pooled.rmse, (before.pooled, after.pooled)
    row = evaluation_row(after, [c.name for c in data.clients])
    assert [k for k in row if k != "sites"] == ["train_loss", "test_loss", "test_rmse", "test_mae", "test_r2"]
    assert set(row["sites"]["site3"]) == {"loss", "rmse", "mae", "r2"}
