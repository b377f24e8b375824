"""Plugins before Hydra composes: import the user's modules, store their options' schemas and
put their config folders on Hydra's search path.

A plugin is a module that calls ``nordfl.registry.register``. NordFL imports every module of
the ``nordfl.plugins`` entry-point group (an installed package) and those named by the
``plugins`` key (``nordfl-sim plugins=[my_study.fednova] algorithm=fednova``; a plain folder
must be on ``PYTHONPATH``). A folder ``conf/`` beside a plugin module holds its YAML options
(``conf/algorithm/fednova.yaml``), found like NordFL's own.

The key has to be read before composition (the options it brings are what composition
needs), so the apps read it from the command line with ``prepare``, which also turns
``study=NAME_OR_FILE`` into the study task's overrides (``nordfl.conf.studies``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from nordfl import registry
from nordfl.conf.schema import ConfigError, store_schemas
from nordfl.conf.studies import study_overrides

KEY = "plugins"


def _items(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    return [item.strip().strip("'\"") for item in value.split(",") if item.strip()]


def named_plugins(overrides: Sequence[str]) -> list[str]:
    """The modules a ``plugins=[a.b,c]`` (or ``plugins=a.b``) override names."""
    names: list[str] = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == KEY:
            names = _items(value)
    return names


def config_dirs(modules: Sequence[str]) -> list[Path]:
    """The ``conf/`` folders beside the given (imported) modules, where they exist."""
    found = []
    for name in modules:
        path = getattr(sys.modules.get(name), "__file__", None)
        if path is not None and (Path(path).parent / "conf").is_dir():
            found.append((Path(path).parent / "conf").resolve())
    return list(dict.fromkeys(found))


def search_path_override(dirs: Sequence[Path], overrides: Sequence[str]) -> list[str]:
    """``overrides`` with the plugin folders added to ``hydra.searchpath`` (after any the user gave)."""
    if not dirs:
        return list(overrides)
    is_search_path = lambda o: o.partition("=")[0].lstrip("+") == "hydra.searchpath"  # noqa: E731
    given = [p for o in overrides if is_search_path(o) for p in _items(o.partition("=")[2])]
    paths = list(dict.fromkeys([*given, *(f"file://{d}" for d in dirs)]))
    return [*(o for o in overrides if not is_search_path(o)), f"hydra.searchpath=[{','.join(paths)}]"]


def prepare(overrides: Sequence[str], *, studies: bool = True) -> list[str]:
    """Loads the plugins (entry points and ``plugins=``), stores every option's schema, and
    returns ``overrides`` with the plugins' config folders on Hydra's search path and, with
    ``studies``, ``study=`` as the study task's overrides (a run config's key; ``studies=False``
    refuses it, for an app whose config has no task)."""
    try:
        loaded = registry.load_plugins(named_plugins(overrides))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    store_schemas()
    if studies:
        overrides = study_overrides(overrides)
    elif any(o.partition("=")[0].lstrip("+") == "study" for o in overrides if "=" in o):
        raise ConfigError("study: is a simulator run's key; give it in the suite's overrides instead, e.g. "
                          "common: [study=heart, ...] in conf/suite/<name>.yaml")
    return search_path_override(config_dirs(loaded), overrides)


def cli_main(main, app: str, *, studies: bool = True) -> None:
    """Runs a ``hydra.main`` function after ``prepare`` on the command line; a bad plugin or study exits 2."""
    try:
        sys.argv[1:] = prepare(sys.argv[1:], studies=studies)
    except ConfigError as e:
        print(f"{app}: config error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
