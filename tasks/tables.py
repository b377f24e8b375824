"""Any site's table (CSV or Parquet) as text cells, the way a CSV gives them: what a site's
checks read, whatever its columns are."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Union

SUFFIXES = (".csv", ".parquet")


class TableError(ValueError):
    """A table that is missing, unreadable or malformed; the message names the file (and row)."""


def csv_text(path: Path, expected: str, on_header=lambda header: None) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV file's header and rows as text; ``on_header`` checks the header before any row is read."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise TableError(f"site data: {path} is empty; expected a header row{expected} and data rows")
            on_header(header)
            rows = []
            for number, values in enumerate((v for v in reader if v), start=1):
                if len(values) != len(header):
                    raise TableError(
                        f"site data: {path}, row {number} has {len(values)} fields; expected {len(header)}, one per header column"
                    )
                rows.append(dict(zip(header, values)))
    except UnicodeDecodeError as e:
        raise TableError(f"site data: {path} is not UTF-8 text ({e}); expected a UTF-8 CSV file") from None
    except (OSError, csv.Error) as e:
        raise TableError(f"site data: {path} cannot be read as CSV: {e}") from None
    return header, rows


def read_table(path: Union[str, Path]) -> tuple[list[str], list[dict[str, str]]]:
    """Any ``.csv`` or ``.parquet`` file's header (duplicates kept, for the caller to refuse) and rows
    as text, as CSV gives them: null is "", a whole float 3.0 is "3", booleans are TRUE / FALSE."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise TableError(f"site data: {path} is not a {' or '.join(SUFFIXES)} file")
    if not path.is_file():
        raise TableError(f"site data: {path} does not exist")
    if path.suffix.lower() == ".csv":
        return csv_text(path, "")
    pa, pq = pyarrow_modules(path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise TableError(f"site data: {path} cannot be read as Parquet: {e}") from None
    header = list(table.column_names)
    columns = [[_plain_text(v) for v in table.column(i).to_pylist()] for i in range(len(header))]
    return header, [dict(zip(header, row)) for row in zip(*columns)]


def _plain_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def pyarrow_modules(path: Path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"site data: reading {path} needs pyarrow (pip install pyarrow), or give the data as CSV") from None
    return pa, pq


