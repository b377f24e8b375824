"""A study's mapped records as model inputs: the study's preprocessing, the same at every site.

``study_dataset`` turns each site's mapped records (``tasks.mapping``) into a client. Each
site splits its rows into train and test, seeded by the seed alone, as the heart sites do. The
training rows' sufficient statistics (``tasks.describe.summarise``) are what a Table 1 job
collects. From them come the federated mean and SD for standardisation, and the mean or mode
for imputation. Every site then encodes with the same numbers: ``preprocessing.standardise:
federated``. ``site`` uses each site's own statistics; ``none`` leaves values as they are.

Encoding, in the study's variable order:
- numeric and date: one column, clipped to the range (``clip``), then standardised;
- binary: 0 / 1;
- categorical: indicators of every code but the first (``one_hot``), else the code's index.

With ``missing: impute``, a missing value takes the federated mean (numeric) or most common
code, and the variable gets an indicator column ``<name>_missing``. Classification outcomes
become integer labels; a regression outcome stays the number it is, in its unit (float32, not
clipped nor standardised), and trains with mean squared error (``tasks.task.regression_fns``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import numpy as np
import yaml

from nordfl import registry
from nordfl.tasks.data import ClientSplit, Examples, FederatedDataset, min_split_rows, stratified_split
from nordfl.tasks.describe import NumericSummary, summarise
from nordfl.tasks.mapping import MappingError, data_paths, map_site_files, parse_mapping
from nordfl.tasks.study import Study, load_study
from nordfl.tasks.task import TaskConfig


def feature_names(study: Study) -> tuple[str, ...]:
    names = []
    for v in study.features:
        if v.kind == "categorical" and study.preprocessing.one_hot:
            names += [f"{v.name}={code}" for code in v.codes[1:]]
        else:
            names.append(v.name)
        if study.missing == "impute":
            names.append(f"{v.name}_missing")
    return tuple(names)


def pooled_summary(study: Study, summaries) -> dict:
    """The sites' summaries added up (exact: sums of sufficient statistics)."""
    pooled = {}
    for v in study.variables:
        parts = [s[v.name] for s in summaries]
        if v.kind in ("categorical", "binary"):
            pooled[v.name] = {key: sum(p[key] for p in parts) for key in parts[0]}
        else:
            pooled[v.name] = NumericSummary(sum(p.count for p in parts), sum(p.total for p in parts), sum(p.squares for p in parts),
                                            min(p.minimum for p in parts), max(p.maximum for p in parts), sum(p.missing for p in parts))
    return pooled


class Scaling(NamedTuple):
    """What encoding needs of the training rows: each numeric variable's mean and SD (standardisation and
    imputation) and each categorical or binary variable's most common code index (imputation).

    Only these pooled figures travel to the sites in a runtime job (``as_json``), not the counts behind them."""

    means: dict  # variable -> float
    sds: dict  # variable -> float
    modes: dict  # variable -> int (index into the variable's codes)

    def as_json(self) -> dict:
        return {"means": self.means, "sds": self.sds, "modes": self.modes}

    @classmethod
    def from_json(cls, raw: dict, study: Study) -> "Scaling":
        """Checks a received scaling against the study: every feature present, finite numbers, valid code indices."""
        try:
            means, sds, modes = ({str(k): v for k, v in raw[key].items()} for key in ("means", "sds", "modes"))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"scaling: expected {{means, sds, modes}} mappings, got {raw!r:.200} ({e})") from None
        for v in study.features:
            if v.kind in ("categorical", "binary"):
                if not isinstance(modes.get(v.name), int) or not 0 <= modes[v.name] < len(v.codes):
                    raise ValueError(f"scaling.modes.{v.name}: expected a code index in [0, {len(v.codes)}), got {modes.get(v.name)!r}")
            else:
                for key, table in (("means", means), ("sds", sds)):
                    if not isinstance(table.get(v.name), (int, float)) or isinstance(table.get(v.name), bool):
                        raise ValueError(f"scaling.{key}.{v.name}: expected a number, got {table.get(v.name)!r}")
        return cls({k: float(v) for k, v in means.items()}, {k: float(v) for k, v in sds.items()}, dict(modes))


def scaling(study: Study, summary: dict) -> Scaling:
    """The ``Scaling`` of a summary (``summarise`` of one site's training rows, or ``pooled_summary``)."""
    means, sds, modes = {}, {}, {}
    for v in study.features:
        stats = summary[v.name]
        if v.kind in ("categorical", "binary"):
            modes[v.name] = max(range(len(v.codes)), key=lambda i: stats[v.codes[i]])
        else:
            means[v.name], sds[v.name] = stats.mean, stats.sd
    return Scaling(means, sds, modes)


def encode(study: Study, values: Mapping[str, np.ndarray], stats: Scaling) -> Examples:
    """One site's mapped rows as ``Examples(x float32 [n, features], y int32 [n])`` (y float32, the outcome in its
    unit, for regression) with the given scaling (the pooled training rows' for federated preprocessing, the site's
    own for per-site)."""
    columns = []
    for v in study.features:
        column = np.asarray(values[v.name])
        if v.kind in ("categorical", "binary"):
            missing = column < 0
            codes = np.where(missing, stats.modes[v.name], column)
            if v.kind == "categorical" and study.preprocessing.one_hot:
                columns += [(codes == i).astype(np.float64) for i in range(1, len(v.codes))]
            else:
                columns.append(codes.astype(np.float64))
        else:
            missing = np.isnan(column)
            mean = stats.means[v.name]
            filled = np.where(missing, mean, column)
            if study.preprocessing.clip and v.range is not None:
                filled = np.clip(filled, *v.range)
            if study.preprocessing.standardise != "none":
                sd = stats.sds[v.name]
                filled = (filled - mean) / (sd if sd > 0 and math.isfinite(sd) else 1.0)
            columns.append(filled)
        if study.missing == "impute":
            columns.append(missing.astype(np.float64))
    x = np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((0, 0), np.float32)
    return Examples(x, np.asarray(values[study.outcome], np.float32 if study.task == "regression" else np.int32))


def split_site(study: Study, values: Mapping[str, np.ndarray], *, seed: int, test_fraction: float) -> tuple[dict, dict]:
    """A site's mapped rows split into (train, test), stratified on a classification outcome and
    seeded by the seed alone: a hospital needs only its own rows and the job's seed to reproduce it."""
    y = np.asarray(values[study.outcome])
    if len(y) < min_split_rows(test_fraction):
        raise ValueError(f"study {study.name}: {len(y)} row(s) cannot be split with test_fraction={test_fraction:g} into "
                         f"a training and a test set of at least one row each; at least {min_split_rows(test_fraction)} are needed")
    train, test = stratified_split(y, test_fraction, np.random.default_rng(seed))
    return {k: np.asarray(v)[train] for k, v in values.items()}, {k: np.asarray(v)[test] for k, v in values.items()}


def site_client(study: Study, name: str, train: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                shared: Optional[Scaling]) -> ClientSplit:
    """One site's split, encoded with the shared scaling, or its own training rows' when the study says
    ``standardise: site`` (``shared`` may then be None): what a site computes locally in the runtime."""
    stats = scaling(study, summarise(study, train)) if study.preprocessing.standardise == "site" else shared
    if stats is None:
        raise ValueError(f"study {study.name}: preprocessing.standardise={study.preprocessing.standardise} needs the federated "
                         "scaling from the study's Table 1 job")
    return ClientSplit(name, encode(study, train, stats), encode(study, test, stats))


def study_dataset(study: Study, sites: Mapping[str, Mapping[str, np.ndarray]], *, seed: int = 0,
                  test_fraction: float = 0.25) -> FederatedDataset:
    """Every site's mapped records as a client (see the module docstring), in the given site order."""
    splits = {name: split_site(study, values, seed=seed, test_fraction=test_fraction) for name, values in sites.items()}
    shared = scaling(study, pooled_summary(study, [summarise(study, train) for train, _ in splits.values()]))
    clients = tuple(site_client(study, name, train, test, shared) for name, (train, test) in splits.items())
    num_classes = _num_outputs(study)
    return FederatedDataset(study.name, clients, num_classes=num_classes, feature_names=feature_names(study))


# ----------------------------------------------------------------------------- a study as a task


@dataclass
class StudyConfig(TaskConfig):
    """``task=study``: the study file and the folder of site mappings (each naming its data files)."""

    name: str = "study"
    study: str = "???"  # the study file (YAML)
    sites: str = "???"  # a folder of <site>.yaml mapping files, each with `data: [files]` beside it
    test_fraction: float = 0.25


def _study_file(study) -> Study:
    if isinstance(study, Study):  # the runtime passes the study the job carries, not a path
        return study
    if study in ("???", "", None):
        raise ValueError("task.study: the study file is needed, e.g. task.study=study.yaml task.sites=FOLDER")
    return load_study(study)


def _num_outputs(study: Study) -> int:
    """The model's outputs: one per outcome code (binary, multiclass), one prediction (regression)."""
    return 1 if study.task == "regression" else len(study.variable(study.outcome).codes)


def _study_shape(*, study: str, **_) -> tuple[tuple[int, ...], int]:
    spec = _study_file(study)
    return (len(feature_names(spec)),), _num_outputs(spec)


def _study_kind(*, study: str, **_) -> str:
    return "regression" if _study_file(study).task == "regression" else "classification"


def mapping_files(study: Study, folder) -> dict:
    """The site mapping files in ``folder`` (``*.yaml`` naming this study), checked, by site name."""
    folder = Path(folder)
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("study") != study.name or "columns" not in raw:
            continue  # the study file itself, or another study's mapping
        mapping = parse_mapping(raw, study, str(path))
        if mapping.site in found:
            raise MappingError(f"mapping {path}: site: {mapping.site!r} is mapped twice in {folder} (also in {found[mapping.site].source})")
        found[mapping.site] = mapping
    if not found:
        raise MappingError(f"task.sites: {folder} holds no mapping file for study {study.name} (YAML with study: {study.name})")
    return found


def load_sites(study: Study, folder) -> dict:
    """Every site in ``folder``: each mapping file (``*.yaml`` naming this study) applied to its data files, by site name."""
    sites = {}
    for site, mapping in mapping_files(study, folder).items():
        if not mapping.data:
            raise MappingError(f"mapping {mapping.source}: data: the simulator needs the site's files, e.g. data: [{site}.csv]")
        sites[site] = map_site_files(study, mapping, data_paths(mapping))[0]
    return sites


@registry.register("task", "study", config=StudyConfig, shape=_study_shape, kind=_study_kind)
def study_task(*, study: str, sites: str, seed: int = 0, test_fraction: float = 0.25) -> FederatedDataset:
    """A study's sites as a federated dataset: ``nordfl-sim task=study task.study=FILE task.sites=FOLDER``."""
    spec = _study_file(study)
    return study_dataset(spec, load_sites(spec, sites), seed=seed, test_fraction=test_fraction)
