"""The 4-hospital heart-disease task: sizes, the id-304 fix, per-site preprocessing, errors."""

import csv
import io
from importlib import resources

import numpy as np
import pytest

from nordfl.tasks import heart
from nordfl.tasks.heart import FEATURES, VENDORED_CSV, load_sites


@pytest.fixture(scope="module")
def raw_csv() -> bytes:
    return resources.files("nordfl.tasks").joinpath("data", VENDORED_CSV).read_bytes()


@pytest.fixture(scope="module")
def data():
    return heart(seed=0)


def test_per_site_train_test_sizes(data):
    assert [c.name for c in data.clients] == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    assert data.train_sizes() == [199, 172, 30, 85]
    assert data.test_sizes() == [104, 89, 16, 45]
    assert data.feature_shape == (13,) and len(FEATURES) == 13 and data.num_classes == 2


def test_row_304_moves_to_hungary(raw_csv):
    rows = list(csv.DictReader(io.StringIO(raw_csv.decode())))
    assert sum(r["dataset"] == "Cleveland" for r in rows) == 304  # as shipped
    row_304 = next(r for r in rows if r["id"] == "304")
    assert row_304["dataset"] == "Cleveland"
    sites = load_sites()
    assert len(sites["Cleveland"].y) == 303  # the real Cleveland cohort
    age_304 = float(row_304["age"])
    assert age_304 in sites["Hungary"].x[:, FEATURES.index("age")]
    assert age_304 not in sites["Cleveland"].x[:, FEATURES.index("age")]  # Cleveland's youngest is 29


def test_each_site_is_standardised_with_its_own_training_statistics(data):
    for site in data.clients:
        x = site.train.x
        varying = x.std(axis=0) > 0
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
        np.testing.assert_allclose(x.std(axis=0)[varying], 1.0, atol=1e-5)
        assert not np.allclose(site.test.x.mean(axis=0), 0.0, atol=1e-3)  # test uses train stats


def test_split_is_stratified_and_seeded(data):
    for site in data.clients:
        all_y = np.concatenate([site.train.y, site.test.y])
        expected_test_pos = all_y.mean() * len(site.test.y)
        assert abs(site.test.y.sum() - expected_test_pos) <= 1
        assert set(np.unique(all_y)) <= {0, 1}
    again, other = heart(seed=0), heart(seed=1)
    np.testing.assert_array_equal(again.clients[0].train.x, data.clients[0].train.x)
    assert not np.array_equal(other.clients[0].train.x, data.clients[0].train.x)


def test_wrong_checksum_is_refused(tmp_path, raw_csv):
    edited = tmp_path / "heart.csv"
    edited.write_bytes(raw_csv.replace(b"Cleveland", b"Clevelend", 1))
    with pytest.raises(ValueError, match=r"heart\.csv has sha256 [0-9a-f]{64}, expected 574f2fa2"):
        heart(path=edited)


def test_missing_column_is_named(tmp_path, raw_csv):
    rows = list(csv.reader(io.StringIO(raw_csv.decode())))
    drop = rows[0].index("chol")
    out = io.StringIO()
    csv.writer(out).writerows([r[:drop] + r[drop + 1 :] for r in rows])
    path = tmp_path / "no_chol.csv"
    path.write_text(out.getvalue())
    with pytest.raises(ValueError, match=r"no_chol\.csv lacks columns \['chol'\]"):
        heart(path=path, sha256=None)


def test_bad_value_is_named_with_row_and_column(tmp_path, raw_csv):
    path = tmp_path / "bad.csv"
    path.write_bytes(raw_csv.replace(b"typical angina", b"sharp pain", 1))
    with pytest.raises(ValueError, match=r"bad\.csv, row id=1: column cp has 'sharp pain'; expected one of"):
        heart(path=path, sha256=None)


def test_licence_note_ships_with_the_data():
    note = resources.files("nordfl.tasks").joinpath("data", "heart_disease_uci.LICENSE.md").read_text()
    assert "CC BY 4.0" in note and "Janosi" in note
