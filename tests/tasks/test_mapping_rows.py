"""A mapping's row selector (``rows``): one file holding several sites' rows, each site reading its own."""

import numpy as np
import pytest

from nordfl.tasks.mapping import MappingError, apply_mapping, parse_mapping
from nordfl.tasks.study import parse_study

STUDY = parse_study({"name": "s", "task": "binary", "outcome": "event", "min_rows": 1, "variables": [
    {"name": "age", "kind": "numeric", "range": [0, 120]}, {"name": "event", "kind": "binary"}]})
HEADER = ["id", "hospital", "age", "event"]
ROWS = [dict(zip(HEADER, r)) for r in (("1", "A", "50", "yes"), ("2", "B", "60", "no"), ("3", "A", "", "no"),
                                        ("4", "C", "70", "yes"), ("5", "", "80", "no"), ("6", "A", "90", "no"))]


def _mapping(rows, source="m.yaml"):
    return parse_mapping({"site": "A", "study": "s", "columns": {"age": "age", "event": "event"}, "rows": rows}, STUDY, source)


@pytest.mark.parametrize("rows, ages", [
    ({"column": "hospital", "equals": "A"}, [50, 90]),  # row 3 is A's too, dropped for its missing age
    ({"column": "hospital", "in": ["B", "C"]}, [60, 70]),
    ({"column": "id", "between": [2, 4]}, [60, 70]),
    ({"column": "id", "equals": 4}, [70]),  # YAML reads an unquoted 4 as a number; it matches the cell "4"
    ([{"column": "hospital", "in": ["A", "C"]}, {"column": "id", "between": [3, 6]}], [70, 90]),  # all must hold
])
def test_the_selector_keeps_only_its_rows_before_they_are_checked(rows, ages):
    mapped = apply_mapping(HEADER, ROWS, _mapping(rows), STUDY, "all.csv")
    np.testing.assert_array_equal(mapped.values["age"], ages)
    report = mapped.report
    assert report.rows_in_file == 6 and report.rows_kept == len(ages)
    assert f"rows read (selected from 6 by rows: {_mapping(rows).describe_rows()})" in report.format()


def test_rows_the_selector_leaves_out_are_not_checked_and_errors_keep_the_files_row_numbers():
    rows = [*ROWS, dict(zip(HEADER, ("7", "B", "old", "no"))), dict(zip(HEADER, ("8", "A", "old", "no")))]
    with pytest.raises(MappingError, match="site data all.csv, row 8, column age: 'old' is not a number"):
        apply_mapping(HEADER, rows, _mapping({"column": "hospital", "equals": "A"}), STUDY, "all.csv")
    with pytest.raises(MappingError, match=r"lacks column 'site' \(the rows selector of m.yaml\)"):
        apply_mapping(HEADER, ROWS, _mapping({"column": "site", "equals": "A"}), STUDY, "all.csv")
    with pytest.raises(MappingError, match="row 1, column hospital: 'A' is not a number; the rows selector of m.yaml expects one between 1 and 2"):
        apply_mapping(HEADER, ROWS, _mapping({"column": "hospital", "between": [1, 2]}), STUDY, "all.csv")
    with pytest.raises(MappingError, match="0 usable rows of 0 selected by rows: hospital = D"):
        apply_mapping(HEADER, ROWS, _mapping({"column": "hospital", "equals": "D"}), STUDY, "all.csv")


@pytest.mark.parametrize("rows, message", [
    ({"column": "hospital"}, "rows: expected {column: NAME} with exactly one of equals"),
    ({"column": "hospital", "equals": "A", "in": ["B"]}, "rows: expected {column: NAME} with exactly one of equals"),
    ({"equals": "A"}, "rows: expected {column: NAME}"),
    ([], r"rows: expected a condition \{column, equals \| in \| between\}, or a list of them, got \[\]"),
    ({"column": "hospital", "equals": True}, "rows.equals: expected a cell's text \\(quote a text YAML would read otherwise"),
    ({"column": "hospital", "in": []}, "rows.in: expected a non-empty list of cells' texts"),
    ([{"column": "id", "equals": "1"}, {"column": "id", "between": [5, 1]}],
     r"rows\[1\].between: expected \[low, high\], two numbers with low <= high, got \[5, 1\]"),
])
def test_a_bad_selector_is_named_with_file_field_and_value(rows, message):
    with pytest.raises(MappingError, match=f"mapping m.yaml: {message}"):
        _mapping(rows)
