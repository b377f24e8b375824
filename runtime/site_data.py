"""A hospital's own data for a task: read its CSV or Parquet file(s) and check them against
the task's ``site_data`` columns (heart: ``nordfl.tasks.heart.SCHEMA``) before the site agent
connects to anyone.

Every problem raises ``SiteDataError`` naming the file, and where it applies the row, the
column, the value and what was expected. Empty cells (CSV) and nulls (Parquet) are missing
values: a row with one is dropped, as the heart preprocessing does, but a file with no
complete row is an error. The result is encoded but not standardised; the caller then runs
``nordfl.tasks.heart.prepare_site`` (the site's split and standardisation)::

    from nordfl.runtime.site_data import load_site_table
    from nordfl.tasks.heart import prepare_site

    split = prepare_site("Cleveland", load_site_table(["data/heart.csv"]), seed=0)

Parquet needs ``pyarrow`` (imported only when a ``.parquet`` file is read).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from nordfl import registry
from nordfl.tasks.data import ClientSplit, Column, Examples, SiteData, min_split_rows
from nordfl.tasks.describe import summarise, summary_arrays
from nordfl.tasks.mapping import MappingError, SiteMapping, SiteReport, data_paths, load_mapping, map_site_files
from nordfl.tasks.study import Study, load_study
from nordfl.tasks.study_data import Scaling, StudyConfig, site_client, split_site
from nordfl.tasks.tables import SUFFIXES, TableError, csv_text, pyarrow_modules, read_table  # noqa: F401  (read_table: the site check reads it here)
from nordfl.tasks.heart import read_site_rows

PathLike = Union[str, Path]


SiteDataError = TableError
"""A site's data file is missing, unreadable, empty or does not match the task's schema."""


def site_data_of(task: str) -> SiteData:
    """The registered task's ``site_data`` (how a site reads its files), or an error saying it has none."""
    try:
        spec = registry.lookup("task", task, field="task").properties.get("site_data")
    except ValueError as e:
        raise SiteDataError(f"{e} (a plugin's task must be installed at the site, in the nordfl.plugins entry points)") from None
    if spec is None:
        with_it = [n for n in registry.names("task") if registry.lookup("task", n).properties.get("site_data") is not None]
        raise SiteDataError(f"task: {task!r} declares no site_data (how a site reads its own files); "
                            f"tasks with one: {', '.join(with_it)}")
    return spec


def load_site_table(paths: Union[PathLike, Sequence[PathLike]], task: str = "heart") -> Examples:
    """Reads, checks and encodes one or several ``.csv`` / ``.parquet`` files, concatenated
    in the given order, against the task's ``site_data`` columns: the complete rows as the
    task's features and label (not standardised; heart: 13 features).

    Raises:
      SiteDataError: for the first file that is missing, unreadable or empty, lacks a column or
        names one twice, holds a value of the wrong type, an unknown category, a number beyond
        float32 or outside its column's plausible range, or has no complete row; or when all
        files together have fewer complete rows than the task's split needs (``min_rows``).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise SiteDataError(f"site data: no files given; expected one or more {' or '.join(SUFFIXES)} files")
    spec = site_data_of(task)
    parts = [_load_file(Path(p), spec) for p in paths]
    complete = sum(len(p.y) for p in parts)
    if complete < spec.min_rows:
        files = ", ".join(str(p) for p in paths)
        raise SiteDataError(
            f"site data: {files} {'has' if len(paths) == 1 else 'have'} {complete} complete row(s); task {task} needs at "
            f"least {spec.min_rows}, so that both its training and its test split get a row"
        )
    return Examples(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def _load_file(path: Path, spec: SiteData) -> Examples:
    columns = ", ".join(c.name for c in spec.columns)
    if path.suffix.lower() not in SUFFIXES:
        raise SiteDataError(f"site data: {path} is not a {' or '.join(SUFFIXES)} file; expected a table with columns {columns}")
    if not path.is_file():
        raise SiteDataError(f"site data: {path} does not exist; expected a {path.suffix} file with columns {columns}")
    rows = _read_parquet(path, spec) if path.suffix.lower() == ".parquet" else _read_csv(path, spec)
    if not rows:
        raise SiteDataError(f"site data: {path} has no data rows; expected a header and rows with columns {columns}")
    try:
        examples = spec.encode(rows, where=lambda i, row: f"site data: {path}, row {i + 1}" + (f" (id={row['id']})" if "id" in row else ""))
    except ValueError as e:
        raise SiteDataError(str(e)) from None
    if len(examples.y) == 0:
        empty = {c.name: sum(row[c.name].strip() == "" for row in rows) for c in spec.columns}
        counts = ", ".join(f"{name} in {n}" for name, n in empty.items() if n)
        raise SiteDataError(
            f"site data: {path} has no complete row: all {len(rows)} rows have an empty value (empty cells: {counts}); "
            f"expected at least one row with a value in every one of the columns {columns}"
        )
    return examples


def _check_header(path: Path, header: Sequence[str], spec: SiteData) -> None:
    twice = sorted({c for c in header if list(header).count(c) > 1})
    if twice:
        raise SiteDataError(f"site data: {path}: column {twice[0]!r} appears more than once in the header; expected each once")
    missing = [c for c in spec.columns if c.name not in header]
    if missing:
        wanted = "; ".join(f"{c.name!r} ({c.description}): expected {c.expected}" for c in missing)
        raise SiteDataError(f"site data: {path} lacks column(s) {wanted}. The file has columns: {', '.join(header)}")


def _read_csv(path: Path, spec: SiteData) -> list[dict[str, str]]:
    columns = ", ".join(c.name for c in spec.columns)
    return csv_text(path, f" with columns {columns}", lambda header: _check_header(path, header, spec))[1]


def _read_parquet(path: Path, spec: SiteData) -> list[dict[str, str]]:
    """The table as text, as CSV would give it: null is "", a float integer column's 3.0 is "3"."""
    pa, pq = pyarrow_modules(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise SiteDataError(f"site data: {path} cannot be read as Parquet: {e}") from None
    _check_header(path, table.column_names, spec)
    columns = {}
    for column in spec.columns:
        values = table.column(column.name)
        if not _type_fits(pa, column, values.type):
            raise SiteDataError(
                f"site data: {path}: column {column.name} is stored as {values.type}; expected {column.expected}"
                f"{' (text)' if column.kind == 'category' else ''}"
            )
        columns[column.name] = [_as_text(column, v) for v in values.to_pylist()]
    return [dict(zip(columns, row)) for row in zip(*columns.values())]


def _type_fits(pa, column: Column, arrow_type) -> bool:
    t = pa.types
    text = t.is_string(arrow_type) or t.is_large_string(arrow_type) or getattr(t, "is_string_view", lambda _: False)(arrow_type)
    if t.is_dictionary(arrow_type):
        return _type_fits(pa, column, arrow_type.value_type)
    if text or t.is_null(arrow_type):
        return True  # text is checked value by value, as in a CSV
    if column.kind == "category":
        return t.is_boolean(arrow_type) and column.levels == ("FALSE", "TRUE")
    return t.is_integer(arrow_type) or t.is_floating(arrow_type) or (column.kind == "number" and t.is_decimal(arrow_type))


def _as_text(column: Column, value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        return str(int(value)) if column.kind == "integer" and value.is_integer() else repr(value)
    return str(value)


class TaskFiles(NamedTuple):
    """A registered task's own files at a site (heart), read with the task's ``site_data``."""

    task: str
    examples: Examples

    def split(self, name: str, job) -> ClientSplit:
        return site_data_of(self.task).prepare(name, self.examples, seed=int(job.task_config["data_seed"]))


class StudyRecords(NamedTuple):
    """A site's own records under its mapping to a study: checked and mapped when read, before any connection."""

    study: Study
    mapping: SiteMapping
    values: dict  # variable -> np.ndarray, the kept rows (tasks.mapping.apply_mapping)
    reports: tuple[SiteReport, ...]
    paths: tuple[Path, ...]

    task = "study"

    def split(self, name: str, job) -> ClientSplit:
        """The site's train/test split, encoded with the job's federated scaling (or its own, ``standardise: site``)."""
        train, test = split_site(self.study, self.values, seed=int(job.task_config["data_seed"]),
                                 test_fraction=float(job.task_config["test_fraction"]))
        shared = None if job.scaling is None else Scaling.from_json(job.scaling, self.study)
        return site_client(self.study, name, train, test, shared)

    def describe(self, job) -> dict:
        """What this site sends in the study's Table 1 job: the sufficient statistics of all its rows (for the
        table) and of its training rows (for the federated scaling), minimum and maximum withheld below min_cell."""
        train, _ = split_site(self.study, self.values, seed=int(job.task_config["data_seed"]),
                              test_fraction=float(job.task_config["test_fraction"]))
        k = self.study.min_cell
        return {"all": summary_arrays(self.study, summarise(self.study, self.values), min_cell=k),
                "train": summary_arrays(self.study, summarise(self.study, train), min_cell=k)}


def load_study_records(study_path: PathLike, mapping_path: PathLike, paths: Optional[Sequence[PathLike]] = None,
                       test_fraction: float = StudyConfig.test_fraction) -> StudyRecords:
    """Reads the study file, the site's mapping and its files (``paths``, or the mapping's ``data:``), and checks
    every row: errors name file, row, column and value (``StudyError``, ``MappingError``, ``SiteDataError``).
    Beyond the study's ``min_rows``, the kept rows must be enough for a split with ``test_fraction`` (the study
    task's default) to give both the training and the test set a row."""
    study = load_study(study_path)
    mapping = load_mapping(mapping_path, study)
    files = tuple(Path(p) for p in (paths or data_paths(mapping)))
    values, reports = map_site_files(study, mapping, files)
    kept, need = len(values[study.outcome]), min_split_rows(test_fraction)
    if kept < need:
        raise MappingError(f"site data: {', '.join(map(str, files))}: {kept} usable row(s) of site {mapping.site}; a train/test "
                           f"split with test_fraction={test_fraction:g} needs at least {need}, so that both get a row "
                           f"(study {study.name} has min_rows={study.min_rows})")
    return StudyRecords(study, mapping, values, tuple(reports), files)


def write_site_files(directory: PathLike) -> dict[str, Path]:
    """Splits the vendored UCI CSV by hospital (row id 304 to Hungary) and writes each
    hospital's rows, incomplete ones included, to ``<directory>/<Site_Name>/heart.csv`` with
    every original column but ``dataset``: the demo's per-site files.

    ``prepare_site(name, load_site_table(path), seed=s)`` then equals ``heart(seed=s)``'s
    client ``name`` exactly.

    Returns:
      Each site's name to its file.
    """
    _, header, grouped = read_site_rows()
    fieldnames = [c for c in header if c != "dataset"]
    written = {}
    for site, rows in grouped.items():
        path = Path(directory) / site.replace(" ", "_") / "heart.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore", lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        written[site] = path
    return written
