"""A study as data: the protocol a consortium agrees on, read from a YAML file.

A study names its variables (their kind, unit, plausible range or allowed codes), the
outcome and the task kind, the missing-value policy, the preprocessing and the model. Each
hospital then maps its own records to it (``tasks.mapping``). Nothing here is specific to
one study: heart is one study file among others.

    name: nordic5
    task: binary                 # binary | multiclass | regression
    outcome: event
    missing: drop                # drop | impute (federated mean / mode, plus an indicator)
    min_cell: 5                  # released counts below this are suppressed
    min_rows: 20                 # a site with fewer usable rows is refused
    preprocessing: {standardise: federated, one_hot: true, clip: true}
    model: {name: logistic_regression, options: {}}
    variables:
      - {name: age, kind: numeric, unit: years, range: [18, 110]}
      - {name: sex, kind: categorical, codes: [female, male]}
      - {name: smoker, kind: binary}
      - {name: chol, kind: numeric, unit: mmol/L, range: [1, 20]}
      - {name: event, kind: binary}

Every error names the file, the field (``variables[3].range``), the value and what was
expected. ``Study.sha256`` is the hash of the study's canonical JSON (key order and YAML
layout do not change it): it goes into the job and the audit log.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from pathlib import Path
from typing import Any, NamedTuple, Optional

VARIABLE_KINDS = ("numeric", "categorical", "binary", "date")
TASK_KINDS = ("binary", "multiclass", "regression")
MISSING_POLICIES = ("drop", "impute")
STANDARDISE = ("federated", "site", "none")
BINARY_CODES = ("no", "yes")  # a binary variable's codes (0, 1), unless it lists its own two


class StudyError(ValueError):
    """A study file that cannot be used; the message names the file, the field and the value."""


class Variable(NamedTuple):
    """One study variable.

    ``range`` (numeric: plausible [low, high] in ``unit``) rejects impossible values, such as an
    age of -400; ``codes`` are a categorical's allowed values (a binary's two, "no" then "yes").
    A date is read as days since 1970-01-01.
    """

    name: str
    kind: str
    unit: Optional[str] = None
    range: Optional[tuple[float, float]] = None
    codes: tuple[str, ...] = ()
    description: str = ""


class Preprocessing(NamedTuple):
    standardise: str = "federated"  # federated (shared mean/SD from the Table 1 job) | site (each site's own) | none
    one_hot: bool = True  # categoricals as indicator columns (the first code is the reference)
    clip: bool = True  # numeric values clipped to the variable's range


class Study(NamedTuple):
    name: str
    task: str
    outcome: str
    variables: tuple[Variable, ...]
    missing: str = "drop"
    min_cell: int = 5
    min_rows: int = 10
    preprocessing: Preprocessing = Preprocessing()
    model: str = "logistic_regression"
    model_options: dict = {}

    def variable(self, name: str) -> Variable:
        for v in self.variables:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def features(self) -> tuple[Variable, ...]:
        """Every variable but the outcome, in the file's order."""
        return tuple(v for v in self.variables if v.name != self.outcome)

    def canonical(self) -> dict:
        """The study as plain data with every default filled in: what the hash covers."""
        return {
            "name": self.name, "task": self.task, "outcome": self.outcome, "missing": self.missing,
            "min_cell": self.min_cell, "min_rows": self.min_rows, "preprocessing": self.preprocessing._asdict(),
            "model": {"name": self.model, "options": dict(self.model_options)},
            "variables": [{**v._asdict(), "range": None if v.range is None else list(v.range), "codes": list(v.codes)}
                          for v in self.variables],
        }

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _fail(source: str, field: str, value: Any, expected: str):
    raise StudyError(f"study {source}: {field}: {expected}, got {value!r}")


def _choice(source, field, value, choices):
    if value not in choices:
        _fail(source, field, value, f"expected one of {', '.join(choices)}")
    return value


def _positive_int(source, field, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(source, field, value, "expected an integer >= 1")
    return value


def _variable(source: str, index: int, raw: Any) -> Variable:
    where = f"variables[{index}]"
    if not isinstance(raw, dict):
        _fail(source, where, raw, "expected a mapping with name and kind")
    unknown = sorted(set(raw) - set(Variable._fields))
    if unknown:
        _fail(source, f"{where}.{unknown[0]}", raw[unknown[0]], f"is not a variable key; expected one of {', '.join(Variable._fields)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        _fail(source, f"{where}.name", name, "expected an identifier such as 'age'")
    kind = _choice(source, f"{where}.kind", raw.get("kind"), VARIABLE_KINDS)
    range_ = raw.get("range")
    if range_ is not None:
        ok = (kind == "numeric" and isinstance(range_, list) and len(range_) == 2
              and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in range_)
              and range_[0] < range_[1])
        if not ok:
            _fail(source, f"{where}.range", range_, "expected [low, high] with low < high, for a numeric variable")
        range_ = (float(range_[0]), float(range_[1]))
    codes = raw.get("codes")
    if kind == "categorical":
        if not isinstance(codes, list) or len(codes) < 2 or len(set(map(str, codes))) != len(codes):
            _fail(source, f"{where}.codes", codes, "expected a list of at least 2 distinct codes for a categorical variable")
    elif kind == "binary":
        codes = BINARY_CODES if codes is None else codes
        if not isinstance(codes, (list, tuple)) or len(codes) != 2 or len(set(map(str, codes))) != 2:
            _fail(source, f"{where}.codes", codes, "expected two distinct codes (the 'no' one first) for a binary variable")
    elif codes not in (None, []):  # [] is what ``Study.canonical`` writes for a variable without codes
        _fail(source, f"{where}.codes", codes, f"is only for categorical and binary variables, not {kind}")
    unit = raw.get("unit")
    if unit is not None and not isinstance(unit, str):
        _fail(source, f"{where}.unit", unit, "expected a unit such as 'mmol/L'")
    return Variable(name, kind, unit, range_, tuple(str(c) for c in codes or ()), str(raw.get("description", "")))


STUDY_KEYS = ("name", "task", "outcome", "variables", "missing", "min_cell", "min_rows", "preprocessing", "model", "description")


def parse_study(raw: Any, source: str = "<study>") -> Study:
    """Checks a study given as plain data (a parsed YAML file); see the module docstring."""
    if not isinstance(raw, dict):
        _fail(source, "study", type(raw).__name__, "expected a mapping")
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        _fail(source, unknown[0], raw[unknown[0]], f"is not a study key; expected one of {', '.join(STUDY_KEYS)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        _fail(source, "name", name, "expected an identifier such as 'nordic5'")
    task = _choice(source, "task", raw.get("task"), TASK_KINDS)
    raw_variables = raw.get("variables")
    if not isinstance(raw_variables, list) or len(raw_variables) < 2:
        _fail(source, "variables", raw_variables, "expected a list of at least two variables (features and the outcome)")
    variables = tuple(_variable(source, i, v) for i, v in enumerate(raw_variables))
    names = [v.name for v in variables]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        _fail(source, "variables", duplicated[0], "names each variable once; this name is repeated")
    outcome = raw.get("outcome")
    if outcome not in names:
        _fail(source, "outcome", outcome, f"expected one of the variables: {', '.join(names)}")
    kind = variables[names.index(outcome)].kind
    needed = {"binary": ("binary",), "multiclass": ("categorical",), "regression": ("numeric",)}[task]
    if kind not in needed:
        _fail(source, "outcome", outcome, f"must be a {' or '.join(needed)} variable for task {task}; it is {kind}")
    missing = _choice(source, "missing", raw.get("missing", "drop"), MISSING_POLICIES)
    prep = raw.get("preprocessing") or {}
    if not isinstance(prep, dict) or set(prep) - set(Preprocessing._fields):
        _fail(source, "preprocessing", prep, f"expected a mapping of {', '.join(Preprocessing._fields)}")
    standardise = _choice(source, "preprocessing.standardise", prep.get("standardise", "federated"), STANDARDISE)
    flags = {}
    for key in ("one_hot", "clip"):
        flags[key] = prep.get(key, True)
        if not isinstance(flags[key], bool):
            _fail(source, f"preprocessing.{key}", flags[key], "expected true or false")
    model = raw.get("model", {"name": "logistic_regression"})
    model = {"name": model} if isinstance(model, str) else model
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or set(model) - {"name", "options"}:
        _fail(source, "model", model, "expected a model name, or {name, options}")
    options = model.get("options") or {}
    if not isinstance(options, dict):
        _fail(source, "model.options", options, "expected a mapping of the model's arguments")
    return Study(name, task, outcome, variables, missing, _positive_int(source, "min_cell", raw.get("min_cell", 5)),
                 _positive_int(source, "min_rows", raw.get("min_rows", 10)),
                 Preprocessing(standardise, flags["one_hot"], flags["clip"]), model["name"], dict(options))


def read_yaml(path, what: str, error: type) -> Any:
    """A YAML file's content; an unreadable or invalid file raises ``error`` naming ``what`` and the path."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path}: not valid YAML ({' '.join(str(e).split())})") from None


def load_study(path) -> Study:
    """Reads and checks a study file (YAML)."""
    return parse_study(read_yaml(path, "study", StudyError), str(path))
