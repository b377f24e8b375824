"""Studies as data: the study file, a site's mapping of its own records, and the check's faults."""

import numpy as np
import pytest
import yaml

from nordfl.tasks.mapping import MappingError, apply_mapping, conversion, load_mapping, parse_mapping
from nordfl.tasks.study import StudyError, load_study, parse_study

STUDY = {
    "name": "nordic5", "task": "binary", "outcome": "event", "min_rows": 2,
    "variables": [
        {"name": "age", "kind": "numeric", "unit": "years", "range": [18, 110]},
        {"name": "sex", "kind": "categorical", "codes": ["female", "male"]},
        {"name": "chol", "kind": "numeric", "unit": "mmol/L", "range": [1, 20]},
        {"name": "event", "kind": "binary"},
    ],
}
OSLO = {
    "site": "Oslo", "study": "nordic5", "missing": ["", "NA"],
    "columns": {
        "age": {"column": "fodselsdato", "date_format": "%d.%m.%Y", "age_at": "2024-01-01"},
        "sex": {"column": "kjonn", "codes": {"K": "female", "M": "male"}},
        "chol": {"column": "kolesterol", "unit": "mg/dL", "analyte": "cholesterol"},
        "event": {"column": "hendelse", "codes": {"ja": "yes", "nei": "no"}},
    },
}
HEADER = ["id", "fodselsdato", "kjonn", "kolesterol", "hendelse"]


def _rows(*cells):
    return [dict(zip(HEADER, c)) for c in cells]


def test_a_study_file_is_checked_and_its_hash_ignores_layout(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    study = load_study(path)
    assert [v.name for v in study.features] == ["age", "sex", "chol"] and study.variable("event").codes == ("no", "yes")
    reordered = {k: STUDY[k] for k in reversed(list(STUDY))}
    assert parse_study(reordered).sha256 == study.sha256
    assert parse_study({**STUDY, "min_cell": 10}).sha256 != study.sha256  # what the study says is hashed
    bad = [
        ({**STUDY, "task": "survival"}, "task: expected one of binary, multiclass, regression, got 'survival'"),
        ({**STUDY, "outcome": "age"}, "outcome: must be a binary variable for task binary; it is numeric"),
        ({**STUDY, "variables": STUDY["variables"][:3] + [{"name": "event", "kind": "numeric", "range": [5, 1]}]},
         r"variables\[3\].range: expected \[low, high\] with low < high"),
        ({**STUDY, "variables": [*STUDY["variables"], {"name": "age", "kind": "numeric"}]}, "this name is repeated, got 'age'"),
        ({**STUDY, "colour": 1}, "colour: is not a study key"),
    ]
    for raw, message in bad:
        with pytest.raises(StudyError, match=message):
            parse_study(raw, "s.yaml")


def test_clinical_unit_conversions_match_published_factors_both_ways():
    scale, offset = conversion("cholesterol", "mg/dL", "mmol/L")
    assert scale * 200 + offset == pytest.approx(5.172, abs=1e-3)  # 200 mg/dL total cholesterol = 5.17 mmol/L
    scale, offset = conversion("glucose", "mg/dL", "mmol/L")
    assert scale * 90 == pytest.approx(4.995, abs=1e-3)
    scale, offset = conversion(None, "degF", "degC")
    assert scale * 98.6 + offset == pytest.approx(37.0)
    back = conversion(None, "degC", "degF")
    assert back[0] * 37.0 + back[1] == pytest.approx(98.6)
    with pytest.raises(KeyError, match="no conversion from mg/dL to mmol/L; known"):
        conversion(None, "mg/dL", "mmol/L")  # the factor depends on the analyte


def test_a_site_mapping_turns_local_columns_codes_units_and_dates_into_the_study(tmp_path):
    study = parse_study(STUDY)
    path = tmp_path / "oslo.yaml"
    path.write_text(yaml.safe_dump(OSLO))
    mapping = load_mapping(path, study)
    rows = _rows(("1", "01.01.1964", "K", "200", "ja"), ("2", "01.07.1980", "M", "NA", "nei"),
                 ("3", "01.01.1934", "M", "150", "nei"), ("4", "01.01.2020", "K", "190", "ja"))
    mapped = apply_mapping(HEADER, rows, mapping, study, "oslo.csv")
    # Row 2: missing cholesterol (dropped under missing: drop); row 4: age 4, outside [18, 110].
    np.testing.assert_allclose(mapped.values["age"], [60.0, 90.0], atol=0.01)
    np.testing.assert_allclose(mapped.values["chol"], [200 / 38.67, 150 / 38.67])
    np.testing.assert_array_equal(mapped.values["sex"], [0, 1])
    np.testing.assert_array_equal(mapped.values["event"], [1, 0])
    report = mapped.report
    assert (report.rows_read, report.rows_kept) == (4, 2)
    assert report.dropped == {"a value out of its study range": 1, "a missing value": 1}
    assert report.variables["chol"].missing == 1 and report.variables["age"].out_of_range == 1
    assert "Oslo: 4 rows read, 2 kept" in report.format()
    imputing = parse_study({**STUDY, "missing": "impute"})
    kept = apply_mapping(HEADER, rows, parse_mapping(OSLO, imputing), imputing, "oslo.csv")
    assert kept.report.rows_kept == 3 and np.isnan(kept.values["chol"][1])  # kept, to be imputed


@pytest.mark.parametrize("change, rows, message", [
    ({}, _rows(("1", "01.01.1964", "F", "200", "ja")) * 3, r"row 1, column kjonn: 'F' is not a code of sex; expected one of K, M"),
    ({"chol": {"column": "kolesterol", "unit": "mg/dL"}}, None, "no conversion from mg/dL to mmol/L"),
    ({}, [{k: v for k, v in r.items() if k != "kolesterol"} for r in _rows(("1", "01.01.1964", "K", "200", "ja"))],
     "lacks column 'kolesterol' \\(study variable chol"),
    ({}, "duplicate", "column 'kjonn' appears more than once"),
    ({}, _rows(("1", "01.01.1964", "K", "1e300", "ja")), "row 1, column kolesterol: '1e300' is beyond what float32 holds"),
    ({}, _rows(("1", "01.01.1964", "K", "high", "ja")), "row 1, column kolesterol: 'high' is not a number \\(chol\\)"),
    ({}, _rows(("1", "1964-01-01", "K", "200", "ja")), "row 1, column fodselsdato: '1964-01-01' is not a date like %d.%m.%Y"),
    ({}, _rows(("1", "01.01.1964", "K", "200", "ja")), "1 usable rows of 1 .*needs at least min_rows=2"),
    ({"weight": {"column": "vekt"}}, None, "columns.weight: is not a variable of study nordic5"),
])
def test_each_mapping_fault_has_its_own_error(change, rows, message):
    study = parse_study(STUDY)
    with pytest.raises(MappingError, match=message):
        mapping = parse_mapping({**OSLO, "columns": {**OSLO["columns"], **change}}, study, "oslo.yaml")
        header = HEADER + ["kjonn"] if rows == "duplicate" else list(rows[0]) if rows else HEADER
        apply_mapping(header, _rows(("1", "01.01.1964", "K", "200", "ja")) if rows == "duplicate" else rows, mapping, study, "oslo.csv")


def test_a_studys_canonical_form_parses_back_to_the_same_study():
    """A job carries the canonical study; a site re-parses it and compares hashes."""
    study = parse_study(STUDY)
    again = parse_study(study.canonical(), "the job's study")
    assert again == study and again.sha256 == study.sha256
