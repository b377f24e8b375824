"""``study=NAME_OR_FILE`` on the command line, as the ``task=study`` overrides Hydra composes.

``nordfl-sim study=heart`` (a shipped study, ``nordfl.tasks.catalogue``) or ``study=path/to/
study.yaml`` (its sites' mapping files beside it, or in ``study_sites=FOLDER``) becomes
``task=study task.study=FILE task.sites=FOLDER``, plus the split a shipped study comes with
(``task.test_fraction``) and the study's model (``task.model``, ``task.model_options``) unless the
command gives its own. It is rewritten
before composition because the files are found (and nordic5's written) in Python, not in YAML.
``prepare`` applies it for ``nordfl-sim``, its ``-m`` sweeps and every run of a ``nordfl-bench``
suite (``common: [study=heart, ...]``).
"""

from __future__ import annotations

from typing import Sequence

from nordfl.conf.schema import ConfigError

KEYS = ("study", "study_sites")


def _value(override: str) -> tuple[str, str]:
    """(key without +/++, value without surrounding quotes) of ``key=value``."""
    key, _, value = override.partition("=")
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return key.lstrip("+"), value[1:-1]
    if "," in value:
        raise ConfigError(f"{key.lstrip('+')}: {value!r} names several; a command runs one study (sweep other keys with -m, "
                          "or run one nordfl-sim -m per study)")
    return key.lstrip("+"), value


def _quoted(path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _study_model(path, *, options: bool) -> list[str]:
    """``task.model`` (and its options) as the study file names them (``model: {name, options}``)."""
    import json

    from nordfl.tasks.study import StudyError, load_study

    try:
        study = load_study(path)
    except StudyError as e:
        raise ConfigError(str(e)) from None
    chosen = [f"task.model={study.model}"]
    if options:  # the options dict starts empty: each key is added (+)
        chosen += [f"+task.model_options.{k}={json.dumps(v)}" for k, v in study.model_options.items()]
    return chosen


def study_overrides(overrides: Sequence[str]) -> list[str]:
    """``overrides`` with ``study=`` and ``study_sites=`` rewritten (unchanged without ``study=``).

    Raises:
      ConfigError: an unknown study (listing the shipped ones), ``study_sites`` without ``study``, or
        ``study=`` together with ``task=`` or ``task.study`` / ``task.sites``.
    """
    from nordfl.tasks.catalogue import locate

    given, at, rest = {}, 0, []
    for override in overrides:
        key = override.partition("=")[0].lstrip("+")
        if "=" in override and key in KEYS:
            given[key] = _value(override)[1]
            at = len(rest) if key == "study" else at
        else:
            rest.append(override)
    if not given:
        return list(overrides)
    if "study" not in given:
        raise ConfigError(f"study_sites: {given['study_sites']!r} needs study=FILE (the study whose sites' mappings it holds)")
    keys = [o.partition("=")[0].lstrip("+~") for o in rest]
    clashes = [o for o, k in zip(rest, keys) if k in ("task", "task.study", "task.sites")]
    if clashes:
        raise ConfigError(f"study: {given['study']!r} sets task=study with its files; drop {clashes[0]!r}")
    try:
        files = locate(given["study"], given.get("study_sites"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    task = ["task=study", f"task.study={_quoted(files.study)}", f"task.sites={_quoted(files.sites)}"]
    if files.test_fraction is not None and "task.test_fraction" not in keys:  # the user's own wins
        task.append(f"task.test_fraction={files.test_fraction}")
    if "task.model" not in keys:  # the study's own model, unless the command names one
        task += _study_model(files.study, options="task.model_options" not in keys)
    return [*rest[:at], *task, *rest[at:]]  # in study='s place: argparse wants the overrides together
