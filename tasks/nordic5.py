"""nordic5: a SYNTHETIC cohort at five hospitals in Norway, Sweden, Denmark, Finland and
Estonia, each exporting its records in its own local format. It shows harmonisation end to
end. No row is a real patient. The data come from a seeded generator with a known
ground-truth model (``TRUE_LOGIT``), so what training recovers can be checked.

Every site draws from the same patient model: age, sex, smoking, total cholesterol and
systolic blood pressure. The outcome is a cardiovascular event (binary), plus the length of
stay in days, a continuous outcome for regression. Sites differ in case mix (age, smoking) and
baseline risk, so class balance differs. Each exports in its own way:

| site | language | differences |
|---|---|---|
| Oslo | Norwegian | codes K/M, ja/nei; "NA" for missing |
| Uppsala | Swedish | cholesterol in **mg/dL**; event as 1/0 |
| Aarhus | Danish | a **date of birth** (DD-MM-YYYY) instead of an age |
| Turku | Finnish | codes N/M, kyllä/ei; smoking often missing |
| Tartu | Estonian | codes N/M, jah/ei; blank for missing |

``write_nordic5(folder)`` writes ``study.yaml``, one ``<site>.yaml`` mapping and one
``<site>.csv`` per hospital. ``nordfl site check --study study.yaml --mapping Oslo.yaml --data
Oslo.csv`` checks a site. A second study, ``nordic5_los`` (``LOS_STUDY``), is a regression of
the length of stay on the same features: its study file and each site's mapping of the same CSV
files go to ``los/`` (``task.study=FOLDER/los/study.yaml task.sites=FOLDER/los``).
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import yaml

STUDY = {
    "name": "nordic5",
    "description": "SYNTHETIC five-country cohort (nordfl.tasks.nordic5); not patient data",
    "task": "binary",
    "outcome": "event",
    "missing": "impute",
    "min_cell": 5,
    "min_rows": 50,
    "preprocessing": {"standardise": "federated", "one_hot": True, "clip": True},
    "model": {"name": "logistic_regression"},
    "variables": [
        {"name": "age", "kind": "numeric", "unit": "years", "range": [18, 105]},
        {"name": "sex", "kind": "categorical", "codes": ["female", "male"]},
        {"name": "smoker", "kind": "binary"},
        {"name": "chol", "kind": "numeric", "unit": "mmol/L", "range": [1.5, 15]},
        {"name": "sbp", "kind": "numeric", "unit": "mmHg", "range": [70, 250]},
        {"name": "event", "kind": "binary"},
    ],
}
LOS_STUDY = {
    **{key: value for key, value in STUDY.items() if key != "variables"},
    "name": "nordic5_los",
    "description": "SYNTHETIC five-country cohort (nordfl.tasks.nordic5), length of stay; not patient data",
    "task": "regression",
    "outcome": "los",
    "variables": [*STUDY["variables"][:-1], {"name": "los", "kind": "numeric", "unit": "days", "range": [0, 365]}],
}
"""The regression study: length of stay in days from the same features, a linear model on them."""
LOS_FOLDER = "los"  # beside the CSV files: the regression study's file and mappings
EXPORT_DATE = "2025-01-01"  # the day the sites exported; Aarhus's ages are computed at it


def TRUE_LOGIT(age, male, smoker, chol, sbp, baseline):
    """The ground-truth risk model every site's outcomes come from."""
    return baseline + 0.05 * (age - 60) + 0.6 * male + 0.8 * smoker + 0.45 * (chol - 5.5) + 0.025 * (sbp - 135)


# site: (rows, mean age, smoking share, baseline log-odds, missing share of cholesterol, of smoking)
SITES = {
    "Oslo": (420, 62, 0.18, -1.2, 0.03, 0.02),
    "Uppsala": (360, 65, 0.14, -1.0, 0.05, 0.03),
    "Aarhus": (300, 60, 0.22, -0.8, 0.02, 0.05),
    "Turku": (260, 66, 0.20, -0.6, 0.04, 0.15),
    "Tartu": (200, 58, 0.30, -0.3, 0.08, 0.04),
}

FORMATS = {  # site: (column names in study order + length of stay, codes, missing text, mapping extras)
    "Oslo": (["alder", "kjonn", "royker", "kolesterol", "blodtrykk", "hendelse", "liggetid"],
             {"sex": ("K", "M"), "smoker": ("nei", "ja"), "event": ("nei", "ja")}, "NA"),
    "Uppsala": (["alder", "kon", "rokare", "kolesterol_mgdl", "blodtryck", "handelse", "vardtid"],
                {"sex": ("kvinna", "man"), "smoker": ("nej", "ja"), "event": ("0", "1")}, ""),
    "Aarhus": (["foedselsdato", "koen", "ryger", "kolesterol", "blodtryk", "haendelse", "indlaeggelse"],
               {"sex": ("k", "m"), "smoker": ("nej", "ja"), "event": ("nej", "ja")}, ""),
    "Turku": (["ika", "sukupuoli", "tupakoi", "kolesteroli", "verenpaine", "tapahtuma", "hoitoaika"],
              {"sex": ("N", "M"), "smoker": ("ei", "kyllä"), "event": ("0", "1")}, ""),
    "Tartu": (["vanus", "sugu", "suitsetaja", "kolesterool", "vererohk", "sundmus", "ravipaevad"],
              {"sex": ("N", "M"), "smoker": ("ei", "jah"), "event": ("0", "1")}, ""),
}


def generate(seed: int = 0) -> dict:
    """Each site's patients in study terms: a dict of arrays (NaN / -1 where missing) plus ``los``."""
    rng = np.random.default_rng(seed)
    out = {}
    for site, (n, mean_age, smoking, baseline, chol_missing, smoker_missing) in SITES.items():
        age = np.clip(rng.normal(mean_age, 11, n), 20, 100)
        male = (rng.random(n) < 0.5).astype(np.int32)
        smoker = (rng.random(n) < smoking).astype(np.int32)
        chol = np.clip(rng.normal(5.4 + 0.1 * male, 1.0, n), 2.0, 12.0)
        sbp = np.clip(rng.normal(128 + 0.5 * (age - 60), 16, n), 85, 220)
        p = 1 / (1 + np.exp(-TRUE_LOGIT(age, male, smoker, chol, sbp, baseline)))
        event = (rng.random(n) < p).astype(np.int32)
        los = np.clip(2 + 0.08 * (age - 60) + 3.0 * event + 0.8 * smoker + rng.normal(0, 1.5, n), 0.5, None)
        chol = np.where(rng.random(n) < chol_missing, np.nan, chol)
        smoker = np.where(rng.random(n) < smoker_missing, -1, smoker)
        out[site] = {"age": age, "sex": male, "smoker": smoker, "chol": chol, "sbp": sbp, "event": event, "los": los}
    return out


def _birth_date(age: float) -> str:
    return (dt.date.fromisoformat(EXPORT_DATE) - dt.timedelta(days=round(age * 365.25))).strftime("%d-%m-%Y")


def mapping(site: str) -> dict:
    """The site's mapping file as data (what its data manager would write)."""
    columns, codes, missing = FORMATS[site]
    study_names = ["age", "sex", "smoker", "chol", "sbp", "event"]
    entry = {name: {"column": column} for name, column in zip(study_names, columns)}
    entry["sex"]["codes"] = dict(zip(codes["sex"], ("female", "male")))
    entry["smoker"]["codes"] = dict(zip(codes["smoker"], ("no", "yes")))
    entry["event"]["codes"] = dict(zip(codes["event"], ("no", "yes")))
    if site == "Uppsala":
        entry["chol"] |= {"unit": "mg/dL", "analyte": "cholesterol"}
    if site == "Aarhus":
        entry["age"] |= {"date_format": "%d-%m-%Y", "age_at": EXPORT_DATE}
    return {"site": site, "study": "nordic5", "data": [f"{site}.csv"], "missing": [missing] if missing else [""], "columns": entry}


def los_mapping(site: str) -> dict:
    """The site's mapping for ``nordic5_los``: the same columns without the event, plus the length of stay,
    reading the CSV one folder up (the mapping lives in ``los/``)."""
    binary = mapping(site)
    columns = {name: entry for name, entry in binary["columns"].items() if name != "event"}
    columns["los"] = {"column": FORMATS[site][0][6]}
    return {**binary, "study": LOS_STUDY["name"], "data": [f"../{site}.csv"], "columns": columns}


def export_rows(site: str, patients: dict) -> tuple[list[str], list[list[str]]]:
    """The site's records as its own system exports them: its columns, codes, units and formats."""
    columns, codes, missing = FORMATS[site]
    rows = []
    for i in range(len(patients["age"])):
        age = patients["age"][i]
        chol = patients["chol"][i]
        smoker = patients["smoker"][i]
        rows.append([
            _birth_date(age) if site == "Aarhus" else f"{age:.0f}",
            codes["sex"][patients["sex"][i]],
            missing if smoker < 0 else codes["smoker"][smoker],
            missing if np.isnan(chol) else (f"{chol * 38.67:.0f}" if site == "Uppsala" else f"{chol:.2f}"),
            f"{patients['sbp'][i]:.0f}",
            codes["event"][patients["event"][i]],
            f"{patients['los'][i]:.1f}",
        ])
    return columns, rows


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def write_nordic5(folder, seed: int = 0) -> dict[str, tuple[Path, Path]]:
    """Writes study.yaml and each site's mapping and CSV export, and the regression study ``nordic5_los``
    with its mappings in ``los/``; returns site -> (mapping, csv) of the binary study."""
    folder = Path(folder)
    (folder / LOS_FOLDER).mkdir(parents=True, exist_ok=True)
    _write_yaml(folder / "study.yaml", STUDY)
    _write_yaml(folder / LOS_FOLDER / "study.yaml", LOS_STUDY)
    written = {}
    for site, patients in generate(seed).items():
        header, rows = export_rows(site, patients)
        data = folder / f"{site}.csv"
        with open(data, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
        _write_yaml(folder / f"{site}.yaml", mapping(site))
        _write_yaml(folder / LOS_FOLDER / f"{site}.yaml", los_mapping(site))
        written[site] = (folder / f"{site}.yaml", data)
    return written
