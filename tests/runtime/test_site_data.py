"""A hospital's own heart files: the demo split round-trips exactly, Parquet equals CSV, and
every schema problem stops the site with a message naming the file, column and expectation."""

import csv
import sys

import numpy as np
import pytest

from nordfl.runtime.site_data import SiteDataError, load_site_table, write_site_files
from nordfl.tasks.heart import SCHEMA, SITES, heart, prepare_site

pa = pytest.importorskip("pyarrow")
pa_csv = pytest.importorskip("pyarrow.csv")
pq = pytest.importorskip("pyarrow.parquet")

CP_LEVELS = "one of asymptomatic, atypical angina, non-anginal, typical angina"


@pytest.fixture(scope="module")
def site_files(tmp_path_factory):
    return write_site_files(tmp_path_factory.mktemp("sites"))


@pytest.fixture
def cleveland_rows(site_files):
    with open(site_files["Cleveland"], newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path, rows, fieldnames=None):
    fieldnames = fieldnames or list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def assert_same_examples(a, b):
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert a.x.dtype == b.x.dtype == np.float32 and a.y.dtype == b.y.dtype == np.int32


def test_demo_files_round_trip_to_the_simulator_clients_exactly(site_files):
    assert list(site_files) == list(SITES)
    assert site_files["VA Long Beach"].parent.name == "VA_Long_Beach" and site_files["VA Long Beach"].name == "heart.csv"
    for seed in (0, 3):
        clients = {c.name: c for c in heart(seed=seed).clients}
        for name, path in site_files.items():
            split = prepare_site(name, load_site_table([path]), seed=seed)
            for ours, theirs in ((split.train, clients[name].train), (split.test, clients[name].test)):
                np.testing.assert_array_equal(ours.x, theirs.x)
                np.testing.assert_array_equal(ours.y, theirs.y)
    with open(site_files["Hungary"], newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert "dataset" not in reader.fieldnames and {"slope", "ca", "thal"} <= set(reader.fieldnames)
    assert rows[0]["id"] == "304"  # the mislabelled row goes with Hungary
    assert len(rows) == 294 and len(load_site_table(site_files["Hungary"]).y) == 261  # incomplete rows kept in the file


def as_parquet_inferred(csv_path, out):
    pq.write_table(pa_csv.read_csv(csv_path), out)  # pyarrow's own types: int64, double, bool, string, nulls
    return out


def as_parquet_all_floats(csv_path, out):
    """Every number as float64 (pandas' type for an integer column with gaps), cp as a
    dictionary (pandas' categorical), restecg as large_string."""
    table = pa_csv.read_csv(csv_path)
    as_stored = {c.name: pa.float64() for c in SCHEMA if c.kind != "category"}
    as_stored.update(cp=pa.dictionary(pa.int32(), pa.string()), restecg=pa.large_string())
    columns = [table.column(name).cast(kind) for name, kind in as_stored.items()]
    pq.write_table(pa.table(columns + [table.column(n) for n in ("sex", "fbs", "exang")], names=[*as_stored, "sex", "fbs", "exang"]), out)
    assert pq.read_schema(out).field("id").type == pa.float64()
    return out


@pytest.mark.parametrize("convert", [as_parquet_inferred, as_parquet_all_floats])
def test_parquet_gives_the_same_examples_as_csv(site_files, tmp_path, convert):
    for path in site_files.values():
        parquet = convert(path, tmp_path / f"{path.parent.name}.parquet")
        types = pq.read_schema(parquet)
        assert types.field("fbs").type == pa.bool_() and types.field("oldpeak").type == pa.float64()
        assert_same_examples(load_site_table([parquet]), load_site_table([path]))


def test_files_are_concatenated_in_the_given_order(site_files, cleveland_rows, tmp_path):
    first = write_csv(tmp_path / "first.csv", cleveland_rows[:100])
    second = as_parquet_inferred(write_csv(tmp_path / "second.csv", cleveland_rows[100:]), tmp_path / "second.parquet")
    whole = load_site_table([site_files["Cleveland"]])
    assert_same_examples(load_site_table([first, second]), whole)
    swapped = load_site_table([second, first])
    assert not np.array_equal(swapped.x, whole.x)
    n_first = len(load_site_table(first).y)
    np.testing.assert_array_equal(swapped.x[-n_first:], whole.x[:n_first])


def test_incomplete_rows_are_dropped_not_refused(cleveland_rows, tmp_path):
    cleveland_rows[0]["chol"] = ""
    cleveland_rows[1]["cp"] = "  "
    path = write_csv(tmp_path / "gaps.csv", cleveland_rows[:10])
    assert len(load_site_table(path).y) == 8


def refused(paths, *fragments):
    with pytest.raises(SiteDataError) as caught:
        load_site_table(paths)
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_missing_column_is_named_with_what_it_holds(cleveland_rows, tmp_path):
    fields = [f for f in cleveland_rows[0] if f != "chol"]
    path = write_csv(tmp_path / "no_chol.csv", cleveland_rows, fields)
    refused(path, "no_chol.csv", "'chol'", "serum cholesterol", "expected a number")
    parquet = tmp_path / "no_cp.parquet"
    pq.write_table(pa_csv.read_csv(write_csv(tmp_path / "no_cp.csv", cleveland_rows)).drop_columns(["cp"]), parquet)
    refused(parquet, "no_cp.parquet", "'cp'", "chest pain", CP_LEVELS)


def test_non_numeric_age_names_file_row_id_column_value(cleveland_rows, tmp_path):
    cleveland_rows[2]["age"] = "sixty"
    path = write_csv(tmp_path / "bad_age.csv", cleveland_rows)
    refused(path, "bad_age.csv, row 3 (id=3): column age has 'sixty'; expected a number")


def test_unknown_cp_level_is_refused(cleveland_rows, tmp_path):
    cleveland_rows[4]["cp"] = "sharp pain"
    path = write_csv(tmp_path / "bad_cp.csv", cleveland_rows)
    refused(path, "bad_cp.csv, row 5 (id=5): column cp has 'sharp pain'; expected " + CP_LEVELS)


def test_label_outside_0_to_4_is_refused(cleveland_rows, tmp_path):
    cleveland_rows[0]["num"] = "-9"  # the original UCI files' code for "missing"
    refused(write_csv(tmp_path / "bad_num.csv", cleveland_rows), "bad_num.csv, row 1", "column num has '-9'; expected an integer 0-4")


def test_parquet_column_of_the_wrong_type_is_refused(cleveland_rows, tmp_path):
    table = pa_csv.read_csv(write_csv(tmp_path / "c.csv", cleveland_rows))
    coded = table.set_column(table.column_names.index("sex"), "sex", pa.array([1] * table.num_rows))
    pq.write_table(coded, tmp_path / "coded_sex.parquet")
    refused(tmp_path / "coded_sex.parquet", "coded_sex.parquet", "column sex is stored as int64; expected one of Female, Male")


def test_empty_files_are_refused(cleveland_rows, tmp_path):
    (tmp_path / "zero.csv").write_text("")
    refused(tmp_path / "zero.csv", "zero.csv is empty", "expected a header row with columns id, age, sex")
    header_only = write_csv(tmp_path / "header_only.csv", cleveland_rows[:0], list(cleveland_rows[0]))
    refused(header_only, "header_only.csv has no data rows", "columns id, age, sex")
    pq.write_table(pa_csv.read_csv(write_csv(tmp_path / "c.csv", cleveland_rows)).slice(0, 0), tmp_path / "none.parquet")
    refused(tmp_path / "none.parquet", "none.parquet has no data rows")


def test_file_with_only_incomplete_rows_is_refused(cleveland_rows, tmp_path):
    for row in cleveland_rows:
        row["chol"] = ""
    path = write_csv(tmp_path / "no_chol_values.csv", cleveland_rows)
    refused(path, "no_chol_values.csv has no complete row", f"chol in {len(cleveland_rows)}", "a value in every one of the columns")


def test_missing_unreadable_or_unsupported_file_is_refused(site_files, tmp_path):
    refused([site_files["Cleveland"], tmp_path / "absent.csv"], "absent.csv does not exist", "expected a .csv file with columns id, age")
    (tmp_path / "latin1.csv").write_bytes("id,age\n1,é\n".encode("latin-1"))
    refused(tmp_path / "latin1.csv", "latin1.csv is not UTF-8", "expected a UTF-8 CSV")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    refused(tmp_path / "junk.parquet", "junk.parquet cannot be read as Parquet")
    refused(tmp_path / "heart.xlsx", "heart.xlsx is not a .csv or .parquet file")
    refused([], "no files given")


def test_ragged_csv_row_is_refused(cleveland_rows, tmp_path):
    path = write_csv(tmp_path / "ragged.csv", cleveland_rows)
    lines = path.read_text().splitlines()
    lines[3] += ",extra"
    path.write_text("\n".join(lines) + "\n")
    refused(path, "ragged.csv, row 3 has 16 fields; expected 15")


def test_parquet_without_pyarrow_says_what_to_install(site_files, tmp_path, monkeypatch):
    parquet = as_parquet_inferred(site_files["Switzerland"], tmp_path / "s.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    refused(parquet, "s.parquet needs pyarrow (pip install pyarrow)")


def test_a_task_not_registered_at_the_site_is_named(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("id\n1\n")
    with pytest.raises(SiteDataError, match=r"task: unknown name 'blobs'; expected one of digits, heart.*must be installed at the site"):
        load_site_table([path], "blobs")


# Issue 15: bad data that used to pass the checks, and was caught only after connecting (or never).


def test_a_number_beyond_float32_is_refused(cleveland_rows, tmp_path):
    cleveland_rows[0]["chol"] = "1e300"  # finite as float64, inf as the float32 features
    path = write_csv(tmp_path / "huge_chol.csv", cleveland_rows)
    refused(path, "huge_chol.csv, row 1 (id=1): column chol has '1e300'; expected a number within float32 range, |x| <= 3.4e38")


def test_too_few_complete_rows_to_split_are_refused(cleveland_rows, tmp_path):
    for row in cleveland_rows[1:4]:
        row["age"] = ""
    path = write_csv(tmp_path / "one_row.csv", cleveland_rows[:4])
    refused(path, "one_row.csv has 1 complete row(s); task heart needs at least 2", "training and its test split")
    other = write_csv(tmp_path / "other_row.csv", cleveland_rows[4:5])
    assert len(load_site_table([path, other]).y) == 2  # the minimum is on the site's files together
    assert len(prepare_site("Cleveland", load_site_table([path, other])).test.y) == 1


def test_a_column_named_twice_in_the_header_is_refused(cleveland_rows, tmp_path):
    fields = list(cleveland_rows[0])
    path = tmp_path / "twice.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(fields + ["chol"])
        writer.writerows([list(row.values()) + ["9999"] for row in cleveland_rows])
    refused(path, "twice.csv: column 'chol' appears more than once in the header")


@pytest.mark.parametrize("column, value, expected", [
    ("age", "-400", "a number from 0 to 120"),
    ("chol", "5000", "a number from 0 to 2000"),
    ("oldpeak", "-55", "a number from -10 to 10"),
])
def test_an_implausible_number_is_refused_with_its_range(cleveland_rows, tmp_path, column, value, expected):
    cleveland_rows[6][column] = value
    path = write_csv(tmp_path / "implausible.csv", cleveland_rows)
    refused(path, f"implausible.csv, row 7 (id=7): column {column} has {value!r}; expected {expected}")


def test_every_shipped_row_is_within_the_schema_ranges(site_files):
    for site in SITES:
        assert len(load_site_table(site_files[site]).y) > 0


def test_the_site_command_exits_2_without_a_traceback_before_connecting(cleveland_rows, tmp_path):
    import subprocess
    from pathlib import Path

    cleveland_rows[0]["chol"] = "1e300"
    path = write_csv(tmp_path / "huge_chol.csv", cleveland_rows)
    command = [str(Path(sys.executable).parent / "nordfl"), "site", "--name", "Cleveland", "--coordinator", "localhost:9",
               "--insecure", "--state", str(tmp_path / "state"), "--data", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the site went on to connect instead of refusing its data")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "huge_chol.csv, row 1 (id=1): column chol has '1e300'" in done.stderr
