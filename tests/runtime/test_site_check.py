"""``nordfl site check``: a site's own files, under its mapping, checked against a study file."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from nordfl.runtime.cli import main
from tests.tasks.test_study import OSLO, STUDY

CSV = "id,fodselsdato,kjonn,kolesterol,hendelse\n1,01.01.1964,K,200,ja\n2,01.07.1980,M,NA,nei\n3,01.01.1934,M,150,nei\n"


@pytest.fixture
def site(tmp_path):
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(STUDY))
    (tmp_path / "oslo.yaml").write_text(yaml.safe_dump(OSLO))
    (tmp_path / "oslo.csv").write_text(CSV)
    return tmp_path


def _check(site, *data):
    return main(["site", "check", "--study", str(site / "study.yaml"), "--mapping", str(site / "oslo.yaml"),
                 *(a for d in data for a in ("--data", str(site / d)))])


def test_the_check_reports_rows_kept_and_dropped_for_csv_and_parquet(site, capsys):
    table = pa.table({"id": [4, 5], "fodselsdato": ["01.01.1950", "01.01.1990"], "kjonn": ["K", None],
                      "kolesterol": [5.0 * 38.67, 180.0], "hendelse": ["ja", "nei"]})
    pq.write_table(table, site / "oslo.parquet")
    assert _check(site, "oslo.csv", "oslo.parquet") == 0
    out = capsys.readouterr().out
    assert "site Oslo: every row checked; nothing was sent" in out
    assert "Oslo: 3 rows read, 2 kept\n  dropped 1 row(s): a missing value" in out  # the CSV: row 2 lacks cholesterol
    assert "Oslo: 2 rows read, 1 kept" in out and "sex: 1 missing, 0 out of range" in out  # the Parquet: a null sex


@pytest.mark.parametrize("csv, message", [
    (CSV.replace("1,01.01.1964,K", "1,01.01.1964,X"), "oslo.csv, row 1, column kjonn: 'X' is not a code of sex; expected one of K, M"),
    (CSV.replace("hendelse\n", "kjonn\n", 1).replace(",ja\n", ",K\n").replace(",nei\n", ",M\n"),
     "column 'kjonn' appears more than once"),
    (CSV.replace(",200,", ",abc,"), "row 1, column kolesterol: 'abc' is not a number (chol)"),
])
def test_a_fault_exits_2_naming_file_row_column_and_value(site, capsys, csv, message):
    (site / "oslo.csv").write_text(csv)
    assert _check(site, "oslo.csv") == 2
    assert message in capsys.readouterr().err


def test_a_mapping_for_another_study_is_refused(site, capsys):
    (site / "oslo.yaml").write_text(yaml.safe_dump({**OSLO, "study": "heart"}))
    assert _check(site, "oslo.csv") == 2
    assert "study: expected 'nordic5', the study this mapping is for, got 'heart'" in capsys.readouterr().err


def test_too_few_rows_for_a_train_test_split_are_refused_at_load(site):
    from nordfl.runtime.site_data import load_study_records
    from nordfl.tasks.mapping import MappingError

    (site / "study.yaml").write_text(yaml.safe_dump({**STUDY, "min_rows": 1}))
    (site / "oslo.csv").write_text(CSV.replace(",150,", ",NA,"))  # one usable row left (row 1)
    with pytest.raises(MappingError, match=r"oslo.csv: 1 usable row\(s\) of site Oslo; a train/test split with "
                                           r"test_fraction=0.25 needs at least 2"):
        load_study_records(site / "study.yaml", site / "oslo.yaml", [site / "oslo.csv"])
    (site / "oslo.csv").write_text(CSV)
    assert load_study_records(site / "study.yaml", site / "oslo.yaml", [site / "oslo.csv"]).reports[0].rows_kept == 2


def test_a_study_split_with_an_empty_side_is_refused():
    import numpy as np

    from nordfl.tasks.study import parse_study
    from nordfl.tasks.study_data import split_site

    study = parse_study({**STUDY, "min_rows": 1})
    values = {"age": np.array([50.0, 60.0]), "sex": np.array([0, 1]), "chol": np.array([5.0, 6.0]), "event": np.array([0, 1])}
    train, test = split_site(study, values, seed=0, test_fraction=0.25)
    assert len(train["event"]) == len(test["event"]) == 1
    with pytest.raises(ValueError, match=r"2 row\(s\) cannot be split with test_fraction=0.75.*at least 4"):
        split_site(study, values, seed=0, test_fraction=0.75)
