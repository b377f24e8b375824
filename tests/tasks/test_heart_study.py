"""The heart task as a shipped study (tasks/studies/heart/): each hospital's mapping reads the one
UCI file through a row selector, checks clean, and gives the heart task's rows, split and labels.
The one documented difference: the study standardises only the numeric variables, with SD ddof 1."""

import importlib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from nordfl.runtime.cli import main
from nordfl.tasks.data import stratified_split
from nordfl.tasks.study import load_study
from nordfl.tasks.study_data import feature_names, load_sites, study_dataset

heart_task = importlib.import_module("nordfl.tasks.heart")  # the module (nordfl.tasks.heart is also the function)
FOLDER = Path(str(resources.files("nordfl.tasks").joinpath("studies", "heart")))
CSV = Path(str(resources.files("nordfl.tasks").joinpath("data", heart_task.VENDORED_CSV)))
MAPPINGS = {"Cleveland": "cleveland.yaml", "Hungary": "hungary.yaml", "Switzerland": "switzerland.yaml",
            "VA Long Beach": "va_long_beach.yaml"}
NUMERIC = [heart_task.FEATURES.index(name) for name in heart_task.NUMERIC]


@pytest.fixture(scope="module")
def study():
    return load_study(FOLDER / "study.yaml")


def test_the_study_gives_the_heart_tasks_sites_rows_split_and_labels(study):
    assert feature_names(study) == heart_task.FEATURES
    sites = load_sites(study, FOLDER)
    assert list(sites) == list(heart_task.SITES)
    assert sites["Hungary"]["age"][0] == 28.0  # id 304, Hungary's first patient, labelled Cleveland in the file
    ours = study_dataset(study, sites, seed=0, test_fraction=0.34)
    theirs = heart_task.heart(seed=0)
    raw = heart_task.load_sites()
    for a, b in zip(ours.clients, theirs.clients):
        assert a.name == b.name
        np.testing.assert_array_equal(a.train.y, b.train.y)
        np.testing.assert_array_equal(a.test.y, b.test.y)
        # The documented difference: binary and one-hot columns stay 0/1 (heart standardises them too) ...
        train, test = stratified_split(raw[a.name].y, 0.34, np.random.default_rng(0))
        binary = [j for j in range(len(heart_task.FEATURES)) if j not in NUMERIC]
        np.testing.assert_array_equal(a.train.x[:, binary], raw[a.name].x[train][:, binary])
        np.testing.assert_array_equal(a.test.x[:, binary], raw[a.name].x[test][:, binary])
        # ... and numeric columns use the SD with ddof 1 (heart: np.std, ddof 0): the same up to sqrt((n-1)/n).
        n = len(a.train.y)
        for x, y in ((a.train.x, b.train.x), (a.test.x, b.test.x)):
            np.testing.assert_allclose(x[:, NUMERIC], y[:, NUMERIC] * np.sqrt((n - 1) / n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("site", list(MAPPINGS))
def test_each_hospitals_mapping_passes_site_check(study, site, capsys):
    code = main(["site", "check", "--study", str(FOLDER / "study.yaml"), "--mapping", str(FOLDER / MAPPINGS[site]),
                 "--data", str(CSV)])
    out = capsys.readouterr().out
    assert code == 0, out
    kept = {"Cleveland": 303, "Hungary": 261, "Switzerland": 46, "VA Long Beach": 130}[site]
    assert f"{site}: " in out and "selected from 920 by rows: " in out and f", {kept} kept" in out
