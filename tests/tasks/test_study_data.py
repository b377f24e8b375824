"""A study's mapped records as model inputs: every site preprocesses with the federated statistics."""

import numpy as np

from nordfl.tasks import classification_task
from nordfl.tasks.data import stratified_split
from nordfl.tasks.models import logistic_regression
from nordfl.tasks.study import parse_study
from nordfl.tasks.study_data import Scaling, encode, feature_names, study_dataset

RAW = {
    "name": "s", "task": "binary", "outcome": "event", "missing": "impute",
    "variables": [
        {"name": "age", "kind": "numeric", "range": [0, 120]},
        {"name": "sex", "kind": "categorical", "codes": ["female", "male", "other"]},
        {"name": "event", "kind": "binary"},
    ],
}


def _values(rng, n):
    age = rng.normal(60, 10, n)
    age[rng.random(n) < 0.1] = np.nan
    sex = rng.integers(0, 3, n).astype(np.int32)
    sex[rng.random(n) < 0.1] = -1
    return {"age": age, "sex": sex, "event": rng.integers(0, 2, n).astype(np.int32)}


def test_every_site_standardises_and_imputes_with_the_pooled_training_statistics():
    study = parse_study(RAW)
    rng = np.random.default_rng(1)
    sites = {"Oslo": _values(rng, 50), "Tartu": _values(rng, 30)}
    data = study_dataset(study, sites, seed=0, test_fraction=0.2)
    assert data.feature_names == feature_names(study) == ("age", "age_missing", "sex=male", "sex=other", "sex_missing")
    # The reference: pool the training rows the clients kept, in NumPy.
    train_rows = []
    for client, values in zip(data.clients, sites.values()):
        train, _ = stratified_split(values["event"], 0.2, np.random.default_rng(0))
        train_rows.append({k: v[train] for k, v in values.items()})
        assert len(client.train.y) == len(train)
    ages = np.concatenate([r["age"] for r in train_rows])
    mean, sd = np.nanmean(ages), np.nanstd(ages, ddof=1)
    sexes = np.concatenate([r["sex"] for r in train_rows])
    mode = np.bincount(sexes[sexes >= 0]).argmax()
    for client, rows in zip(data.clients, train_rows):
        expected_age = (np.where(np.isnan(rows["age"]), mean, rows["age"]) - mean) / sd
        np.testing.assert_allclose(client.train.x[:, 0], expected_age, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(client.train.x[:, 1], np.isnan(rows["age"]))
        sex = np.where(rows["sex"] < 0, mode, rows["sex"])
        np.testing.assert_array_equal(client.train.x[:, 2], sex == 1)
        np.testing.assert_array_equal(client.train.x[:, 4], rows["sex"] < 0)
        np.testing.assert_array_equal(client.train.y, rows["event"])
    # A registered model sized from the study trains on it like any task.
    task = classification_task("s", data, logistic_regression(len(data.feature_names), data.num_classes))
    assert np.isfinite(float(task.loss_fn(task.model.init_params, data.clients[0].train, np.ones(len(data.clients[0].train.y), bool))))


def test_per_site_standardisation_uses_each_sites_own_statistics():
    study = parse_study({**RAW, "missing": "drop", "preprocessing": {"standardise": "site"}})
    rng = np.random.default_rng(2)
    values = _values(rng, 40)
    values["age"] = np.nan_to_num(values["age"], nan=55.0)
    values["sex"] = np.abs(values["sex"])
    data = study_dataset(study, {"Oslo": values}, seed=0)
    assert abs(float(data.clients[0].train.x[:, 0].mean())) < 1e-5  # standardised on its own training rows
    # A regression outcome is the number itself, in its unit: float32, neither clipped nor standardised.
    encoded = encode(parse_study({**RAW, "task": "regression", "outcome": "age"}), values, Scaling({}, {}, {"sex": 0, "event": 0}))
    assert encoded.y.dtype == np.float32
    np.testing.assert_array_equal(encoded.y, values["age"].astype(np.float32))
