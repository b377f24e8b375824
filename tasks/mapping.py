"""A hospital's own records, mapped to a study (``tasks.study``): its column names, its codes,
its units and its date formats, declared in a small YAML file kept at the site.

    site: Oslo
    study: nordic5                                   # the study's name, checked
    missing: ["", "NA", "."]                         # cells that mean "missing" (default: empty)
    columns:
      age:    {column: fodselsdato, date_format: "%d.%m.%Y", age_at: "2024-01-01"}  # a date of birth, as an age
      sex:    {column: kjonn, codes: {K: female, M: male}}
      smoker: {column: royker, codes: {ja: "yes", nei: "no"}}
      chol:   {column: kolesterol, unit: mg/dL, analyte: cholesterol}  # converted to the study's mmol/L
      weight: {column: vekt, scale: 1.0, offset: 0.0}                   # any linear conversion

A file that holds several sites' rows, with a column naming the site, is read through a row
selector, ``rows``: one condition, or a list of conditions that must all hold. A condition names
a column and one of ``equals`` (a text), ``in`` (a list of texts) or ``between`` (numbers
``[low, high]``, both included); a missing cell never matches::

    data: [../../data/heart_disease_uci.csv]
    rows: {column: dataset, equals: Cleveland}
    rows: [{column: dataset, in: [Cleveland, Hungary]}, {column: id, between: [304, 597]}]

The selector applies before any row is checked: rows it leaves out are neither mapped nor
counted as read (the report says how many the files had), and row numbers in errors stay the
file's own.

``apply_mapping`` turns the rows (text, as read from CSV or Parquet) into the study's
variables: numeric and date variables as float64 (NaN when missing), categorical and binary
ones as the index of their study code (-1 when missing). What cannot be a value at all (an
unknown code, text in a numeric column, a number beyond float32) is an error naming the file,
the row, the column, the value and what was expected. What is a value but not a plausible one
(outside the variable's range) or is missing drops the row under ``missing: drop``, and is
counted in the report, per variable and per reason.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from nordfl.tasks.study import Study, read_yaml

FLOAT32_MAX = float(np.finfo(np.float32).max)

CONVERSIONS: dict[tuple[Optional[str], str, str], tuple[float, float]] = {
    # (analyte or None, from unit, to unit): value_to = scale * value_from + offset
    ("cholesterol", "mg/dL", "mmol/L"): (1 / 38.67, 0.0),
    ("hdl", "mg/dL", "mmol/L"): (1 / 38.67, 0.0),
    ("ldl", "mg/dL", "mmol/L"): (1 / 38.67, 0.0),
    ("triglycerides", "mg/dL", "mmol/L"): (1 / 88.57, 0.0),
    ("glucose", "mg/dL", "mmol/L"): (1 / 18.016, 0.0),
    ("creatinine", "mg/dL", "umol/L"): (88.42, 0.0),
    ("bilirubin", "mg/dL", "umol/L"): (17.10, 0.0),
    ("haemoglobin", "g/dL", "g/L"): (10.0, 0.0),
    (None, "lb", "kg"): (0.45359237, 0.0),
    (None, "in", "cm"): (2.54, 0.0),
    (None, "degF", "degC"): (5 / 9, -160 / 9),
    (None, "months", "years"): (1 / 12, 0.0),
}
"""Common clinical unit conversions; mg/dL to mmol/L depends on the analyte (its molar mass).
Each also works the other way round (``convert`` inverts it)."""


class MappingError(ValueError):
    """A mapping file, or a site's records under it, that cannot be used; the message says where and why."""


class ColumnMap(NamedTuple):
    """How one study variable is read from the site's records."""

    column: str
    codes: Optional[dict] = None  # local code -> study code
    unit: Optional[str] = None  # the site's unit (converted to the study's)
    analyte: Optional[str] = None  # for conversions that depend on it (mg/dL -> mmol/L)
    scale: float = 1.0
    offset: float = 0.0
    date_format: Optional[str] = None  # strptime format of a date column
    age_at: Optional[str] = None  # with date_format: years from the date to this ISO date (an age from a birth date)


class RowCondition(NamedTuple):
    """One condition of a mapping's row selector: the column's text is one of ``values``, or its number lies in ``between``."""

    column: str
    values: Optional[tuple[str, ...]] = None  # equals / in
    between: Optional[tuple[float, float]] = None  # inclusive

    def describe(self) -> str:
        if self.between is not None:
            return f"{self.between[0]:g} <= {self.column} <= {self.between[1]:g}"
        if len(self.values) == 1:
            return f"{self.column} = {self.values[0]}"
        return f"{self.column} in {', '.join(self.values)}"


class SiteMapping(NamedTuple):
    site: str
    study: str
    columns: dict  # variable name -> ColumnMap
    missing: tuple[str, ...] = ("",)
    source: str = "<mapping>"
    data: tuple[str, ...] = ()  # the site's files, relative to the mapping file (optional: the simulator reads them)
    rows: tuple[RowCondition, ...] = ()  # the row selector: every condition must hold (none: every row)

    def describe_rows(self) -> str:
        return " and ".join(c.describe() for c in self.rows)


def conversion(analyte: Optional[str], from_unit: str, to_unit: str) -> tuple[float, float]:
    """(scale, offset) from ``from_unit`` to ``to_unit``, from ``CONVERSIONS`` (either direction)."""
    if from_unit == to_unit:
        return 1.0, 0.0
    for key in ((analyte, from_unit, to_unit), (None, from_unit, to_unit)):
        if key in CONVERSIONS:
            return CONVERSIONS[key]
    for key in ((analyte, to_unit, from_unit), (None, to_unit, from_unit)):
        if key in CONVERSIONS:
            scale, offset = CONVERSIONS[key]
            return 1 / scale, -offset / scale
    known = ", ".join(f"{a + ' ' if a else ''}{f} -> {t}" for a, f, t in CONVERSIONS)
    raise KeyError(f"no conversion from {from_unit} to {to_unit}{f' for {analyte}' if analyte else ''}; known: {known}; "
                   "or give scale and offset")


def _fail(source: str, field: str, value: Any, expected: str):
    raise MappingError(f"mapping {source}: {field}: {expected}, got {value!r}")


def _cell_text(value: Any) -> Optional[str]:
    """A YAML scalar as the cell text it matches: text, or a whole number (YAML reads ``id: 304`` as one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_rows(raw: Any, source: str) -> tuple[RowCondition, ...]:
    """The ``rows`` selector: a condition or a list of them (see the module docstring)."""
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        _fail(source, "rows", raw, "expected a condition {column, equals | in | between}, or a list of them")
    conditions = []
    for index, item in enumerate(items):
        where = f"rows[{index}]" if isinstance(raw, list) else "rows"
        tests = sorted(set(item) & {"equals", "in", "between"}) if isinstance(item, dict) else []
        if (not isinstance(item, dict) or set(item) - {"column", "equals", "in", "between"} or len(tests) != 1
                or not isinstance(item.get("column"), str) or not item["column"]):
            _fail(source, where, item, "expected {column: NAME} with exactly one of equals: TEXT, in: [TEXTS], between: [LOW, HIGH]")
        test, value = tests[0], item[tests[0]]
        if test == "between":
            ok = (isinstance(value, list) and len(value) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value) and value[0] <= value[1])
            if not ok:
                _fail(source, f"{where}.between", value, "expected [low, high], two numbers with low <= high")
            conditions.append(RowCondition(item["column"], between=(float(value[0]), float(value[1]))))
            continue
        texts = [value] if test == "equals" else value
        cells = [_cell_text(t) for t in texts] if isinstance(texts, list) and texts else [None]
        if None in cells:
            expected = "a cell's text" if test == "equals" else "a non-empty list of cells' texts"
            _fail(source, f"{where}.{test}", value, f"expected {expected} (quote a text YAML would read otherwise, e.g. 'TRUE')")
        conditions.append(RowCondition(item["column"], values=tuple(cells)))
    return tuple(conditions)


def select_rows(header: Sequence[str], rows: Sequence[Mapping[str, str]], mapping: SiteMapping,
                source: str = "<records>") -> list[int]:
    """The indices of the rows the mapping's selector keeps (every row without one)."""
    for condition in mapping.rows:
        if condition.column not in header:
            raise MappingError(f"site data {source}: lacks column {condition.column!r} (the rows selector of {mapping.source}); "
                               f"the file has columns {', '.join(header)}")
    kept = []
    for i, row in enumerate(rows):
        for condition in mapping.rows:
            text = str(row[condition.column]).strip()
            if text in mapping.missing:
                break
            if condition.values is not None:
                if text not in condition.values:
                    break
                continue
            try:
                number = float(text)
            except ValueError:
                raise MappingError(f"site data {source}, row {i + 1}, column {condition.column}: {text!r} is not a number; "
                                   f"the rows selector of {mapping.source} expects one between {condition.between[0]:g} "
                                   f"and {condition.between[1]:g}") from None
            if not condition.between[0] <= number <= condition.between[1]:
                break
        else:
            kept.append(i)
    return kept


def parse_mapping(raw: Any, study: Study, source: str = "<mapping>") -> SiteMapping:
    """Checks a mapping (a parsed YAML file) against ``study``: every variable mapped, codes into the
    study's codes, units convertible. Returns it with each unit turned into scale and offset."""
    if not isinstance(raw, dict) or set(raw) - {"site", "study", "columns", "missing", "data", "rows"}:
        _fail(source, "mapping", raw if not isinstance(raw, dict) else sorted(raw),
              "expected a mapping of site, study, columns, missing, data, rows")
    data = raw.get("data", [])
    data = [data] if isinstance(data, str) else data
    if not isinstance(data, list) or not all(isinstance(d, str) and d for d in data):
        _fail(source, "data", data, "expected the site's CSV or Parquet file names, relative to this file")
    site = raw.get("site")
    if not isinstance(site, str) or not site:
        _fail(source, "site", site, "expected the site's name")
    if raw.get("study") != study.name:
        _fail(source, "study", raw.get("study"), f"expected {study.name!r}, the study this mapping is for")
    missing = raw.get("missing", [""])
    if not isinstance(missing, list) or not all(isinstance(m, str) for m in missing):
        _fail(source, "missing", missing, "expected a list of the texts that mean missing, e.g. ['', 'NA']")
    columns = raw.get("columns")
    if not isinstance(columns, dict):
        _fail(source, "columns", columns, "expected a mapping of study variable -> {column, ...}")
    for name in columns:
        try:
            study.variable(name)
        except KeyError:
            _fail(source, f"columns.{name}", name, f"is not a variable of study {study.name}; expected one of "
                  f"{', '.join(v.name for v in study.variables)}")
    mapped = {}
    for variable in study.variables:
        spec = columns.get(variable.name)
        where = f"columns.{variable.name}"
        if spec is None:
            _fail(source, where, None, f"every study variable needs a column; map {variable.name} ({variable.kind})")
        spec = {"column": spec} if isinstance(spec, str) else spec
        if not isinstance(spec, dict) or set(spec) - set(ColumnMap._fields) or not isinstance(spec.get("column"), str):
            _fail(source, where, spec, f"expected a column name, or {{column, {', '.join(ColumnMap._fields[1:])}}}")
        entry = ColumnMap(**spec)
        if entry.codes is not None:
            if variable.kind not in ("categorical", "binary"):
                _fail(source, f"{where}.codes", entry.codes, f"is only for categorical and binary variables; {variable.name} is {variable.kind}")
            bad = [c for c in entry.codes.values() if str(c) not in variable.codes]
            if bad:
                _fail(source, f"{where}.codes", bad[0], f"maps to a code study {study.name} does not have; expected one of "
                      f"{', '.join(variable.codes)}")
            entry = entry._replace(codes={str(k): str(v) for k, v in entry.codes.items()})
        if entry.unit is not None:
            if variable.kind != "numeric" or variable.unit is None:
                _fail(source, f"{where}.unit", entry.unit, f"needs a numeric study variable with a unit; {variable.name} has none")
            try:
                scale, offset = conversion(entry.analyte, entry.unit, variable.unit)
            except KeyError as e:
                _fail(source, f"{where}.unit", entry.unit, str(e.args[0]))
            entry = entry._replace(scale=scale * entry.scale, offset=offset * entry.scale + entry.offset)
        if entry.age_at is not None:
            if entry.date_format is None or variable.kind != "numeric":
                _fail(source, f"{where}.age_at", entry.age_at, "needs date_format and a numeric study variable")
            try:
                dt.date.fromisoformat(entry.age_at)
            except ValueError:
                _fail(source, f"{where}.age_at", entry.age_at, "expected an ISO date such as 2024-01-01")
        elif entry.date_format is not None and variable.kind != "date":
            _fail(source, f"{where}.date_format", entry.date_format, f"needs a date study variable (or age_at); {variable.name} is {variable.kind}")
        mapped[variable.name] = entry
    local = [m.column for m in mapped.values()]
    twice = sorted({c for c in local if local.count(c) > 1})
    if twice:
        _fail(source, "columns", twice[0], "maps one local column to two study variables")
    rows = parse_rows(raw["rows"], source) if "rows" in raw else ()
    return SiteMapping(site, study.name, mapped, tuple(missing), source, tuple(data), rows)


def load_mapping(path, study: Study) -> SiteMapping:
    """Reads and checks a site's mapping file (YAML) against ``study``."""
    return parse_mapping(read_yaml(path, "mapping", MappingError), study, str(path))


class VariableReport(NamedTuple):
    missing: int
    out_of_range: int


class SiteReport(NamedTuple):
    """What the check found: rows read and kept, why rows were dropped, and per variable counts."""

    site: str
    rows_read: int
    rows_kept: int
    dropped: dict  # reason -> rows
    variables: dict  # name -> VariableReport
    selected: str = ""  # the mapping's row selector, described ("" without one)
    rows_in_file: Optional[int] = None  # with a selector: the file's rows, before it

    def format(self) -> str:
        read = f"{self.rows_read} rows read"
        if self.selected:
            read += f" (selected from {self.rows_in_file} by rows: {self.selected})"
        lines = [f"{self.site}: {read}, {self.rows_kept} kept"]
        lines += [f"  dropped {n} row(s): {why}" for why, n in self.dropped.items() if n]
        for name, r in self.variables.items():
            lines.append(f"  {name}: {r.missing} missing, {r.out_of_range} out of range")
        return "\n".join(lines)


class MappedRecords(NamedTuple):
    """The site's kept rows as study variables (see the module docstring for the encoding)."""

    values: dict  # variable name -> np.ndarray [rows]
    report: SiteReport


def _days(text: str, fmt: str) -> float:
    return float((dt.datetime.strptime(text, fmt).date() - dt.date(1970, 1, 1)).days)


def apply_mapping(header: Sequence[str], rows: Sequence[Mapping[str, str]], mapping: SiteMapping, study: Study,
                  source: str = "<records>", *, check_min_rows: bool = True) -> MappedRecords:
    """The site's rows (text cells by column) as the study's variables, checked; see the module docstring.

    ``check_min_rows=False`` leaves the study's ``min_rows`` to the caller (a site with several files
    checks their total). The mapping's row selector (``rows``) applies first."""
    twice = sorted({c for c in header if list(header).count(c) > 1})
    if twice:
        raise MappingError(f"site data {source}: column {twice[0]!r} appears more than once in the header; expected each once")
    for variable in study.variables:
        column = mapping.columns[variable.name].column
        if column not in header:
            raise MappingError(f"site data {source}: lacks column {column!r} (study variable {variable.name}, mapped in "
                               f"{mapping.source}); the file has columns {', '.join(header)}")
    rows_in_file = len(rows)
    numbers = select_rows(header, rows, mapping, source) if mapping.rows else range(rows_in_file)
    rows = [rows[i] for i in numbers]
    n = len(rows)
    values: dict[str, np.ndarray] = {}
    missing_rows = np.zeros(n, bool)
    implausible_rows = np.zeros(n, bool)
    per_variable = {}
    for variable in study.variables:
        entry = mapping.columns[variable.name]
        categorical = variable.kind in ("categorical", "binary")
        out = np.full(n, -1, np.int32) if categorical else np.full(n, np.nan, np.float64)
        missing = np.zeros(n, bool)
        out_of_range = np.zeros(n, bool)
        for i, row in enumerate(rows):
            text = str(row[entry.column]).strip()
            where = f"site data {source}, row {numbers[i] + 1}, column {entry.column}"
            if text in mapping.missing:
                missing[i] = True
                continue
            if categorical:
                code = entry.codes.get(text) if entry.codes is not None else text
                if code not in variable.codes:
                    known = ", ".join(entry.codes) if entry.codes is not None else ", ".join(variable.codes)
                    raise MappingError(f"{where}: {text!r} is not a code of {variable.name}; expected one of {known} "
                                       f"(add it to columns.{variable.name}.codes in {mapping.source})")
                out[i] = variable.codes.index(code)
                continue
            try:
                if entry.date_format is not None:
                    number = _days(text, entry.date_format)
                    if entry.age_at is not None:
                        number = (_days(entry.age_at, "%Y-%m-%d") - number) / 365.25
                else:
                    number = float(text)
            except ValueError:
                expected = f"a date like {entry.date_format}" if entry.date_format else "a number"
                raise MappingError(f"{where}: {text!r} is not {expected} ({variable.name})") from None
            number = entry.scale * number + entry.offset
            if not math.isfinite(number) or abs(number) > FLOAT32_MAX:
                raise MappingError(f"{where}: {text!r} is beyond what float32 holds ({variable.name}); expected a finite "
                                   f"number of magnitude at most {FLOAT32_MAX:.3g}")
            out[i] = number
            if variable.range is not None and not variable.range[0] <= number <= variable.range[1]:
                out_of_range[i] = True
        values[variable.name] = out
        per_variable[variable.name] = VariableReport(int(missing.sum()), int(out_of_range.sum()))
        implausible_rows |= out_of_range
        missing_rows |= missing if (study.missing == "drop" or variable.name == study.outcome) else False
    dropped_range = implausible_rows
    dropped_missing = missing_rows & ~implausible_rows
    keep = ~(dropped_range | dropped_missing)
    selected = mapping.describe_rows()
    if check_min_rows and int(keep.sum()) < study.min_rows:
        raise MappingError(f"site data {source}: {int(keep.sum())} usable rows of {n}"
                           f"{f' selected by rows: {selected}' if selected else ''} (dropped: {int(dropped_range.sum())} with a "
                           f"value out of range, {int(dropped_missing.sum())} with a missing value); study {study.name} needs "
                           f"at least min_rows={study.min_rows}")
    report = SiteReport(mapping.site, n, int(keep.sum()),
                        {"a value out of its study range": int(dropped_range.sum()), "a missing value": int(dropped_missing.sum())},
                        per_variable, selected, rows_in_file if selected else None)
    return MappedRecords({k: v[keep] for k, v in values.items()}, report)


def map_site_files(study: Study, mapping: SiteMapping, paths: Sequence) -> tuple[dict, list[SiteReport]]:
    """A site's files (CSV or Parquet), each read and mapped to the study, concatenated in order:
    ``(variable -> values, one report per file)``. The study's ``min_rows`` applies to the total.

    Raises ``MappingError`` (or ``tables.TableError`` for an unreadable file) naming file, row, column and value."""
    from nordfl.tasks.tables import read_table

    if not paths:
        raise MappingError(f"mapping {mapping.source}: data: no files given for site {mapping.site}; expected its CSV or "
                           "Parquet files (data: [...] in the mapping, or --data)")
    parts = [apply_mapping(*read_table(path), mapping, study, str(path), check_min_rows=False) for path in paths]
    kept = sum(p.report.rows_kept for p in parts)
    if kept < study.min_rows:
        raise MappingError(f"site data: {kept} usable rows in {len(parts)} file(s) of site {mapping.site}; study {study.name} "
                           f"needs at least min_rows={study.min_rows}")
    values = {k: np.concatenate([p.values[k] for p in parts]) for k in parts[0].values}
    return values, [p.report for p in parts]


def data_paths(mapping: SiteMapping) -> list:
    """The files a mapping names (``data:``), resolved against the mapping file's folder."""
    from pathlib import Path

    return [Path(mapping.source).parent / name for name in mapping.data]
