"""A comparison suite's config: checked, expanded into its settings and its grid of cells.

See ``nordfl.sim.suite`` for what a suite is and how it runs; this module only reads
``conf/suite/<name>.yaml`` (every error names the key, the value and what was expected) and
plans the (setting, algorithm) cells of a run or of the tuning protocol.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

from omegaconf import DictConfig, OmegaConf

from nordfl.conf.schema import fail

BASELINES = ("pooled", "local")
MODES = ("run", "tune")
SCORES = ("global", "own_site")
"""What a suite ranks by: the global model's pooled test accuracy, or the mean over sites of each
site's accuracy with the model it would use (personalisation suites)."""


class Suite(NamedTuple):
    """A suite config, checked."""

    name: str
    description: str
    seeds: tuple[int, ...]
    target_accuracy: float
    common: tuple[str, ...]
    axes: dict[str, dict[str, tuple[str, ...]]]
    algorithms: dict[str, tuple[str, ...]]
    baselines: dict[str, tuple[str, ...]]
    tuned: dict[str, dict[str, tuple[str, ...]]]
    tuning_seeds: tuple[int, ...]
    validation_fraction: float
    grid: dict[str, dict[str, tuple]]  # algorithm or "all" -> override key -> values
    tuning_fix: dict[str, str]  # axis -> value: tune only there; the choice holds for every value of that axis
    score: str = "global"  # one of SCORES
    vary_split: Union[bool, str] = False  # each seed also draws the data split: true sets task.data_seed = seed, a key sets that key


class Cell(NamedTuple):
    """One (setting, algorithm) of the grid: its overrides and how it trains."""

    setting: str
    algorithm: str  # in tuning, "name@key=value,..." for one grid point
    kind: str  # federated | pooled | local
    overrides: tuple[str, ...]
    point: tuple[str, ...] = ()  # in tuning, the grid point's own overrides

    @property
    def folder(self) -> Path:
        return Path(self.setting) / self.algorithm

# ---------------------------------------------------------------------------- the suite config


def _strings(key: str, value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not all(isinstance(item, str) for item in value):
        fail(key, value, "must be a list of override strings like 'algorithm.client_lr=0.1'")
    return tuple(value)


def _mapping(key: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail(key, value, "must be a mapping")
    return value


def load_suite(node: DictConfig) -> Suite:
    """Checks a suite config node; every error names the key, the value and what was expected."""
    raw = OmegaConf.to_container(node, resolve=True)
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        fail("suite.name", name, "must be a non-empty string")
    seeds = raw.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        fail("suite.seeds", seeds, "must be a non-empty list of distinct integers")
    target = raw.get("target_accuracy", 0.5)
    if not isinstance(target, (int, float)) or not 0 < target <= 1:
        fail("suite.target_accuracy", target, "must be in (0, 1]")
    axes = {
        axis: {str(value): _strings(f"suite.axes.{axis}.{value}", overrides) for value, overrides in _mapping(f"suite.axes.{axis}", values).items()}
        for axis, values in _mapping("suite.axes", raw.get("axes")).items()
    }
    if not axes or any(not values for values in axes.values()):
        fail("suite.axes", raw.get("axes"), "must name at least one axis, each with at least one value")
    algorithms = {a: _strings(f"suite.algorithms.{a}", o) for a, o in _mapping("suite.algorithms", raw.get("algorithms")).items()}
    if not algorithms:
        fail("suite.algorithms", raw.get("algorithms"), "must name at least one algorithm")
    baselines = {b: _strings(f"suite.baselines.{b}", o) for b, o in _mapping("suite.baselines", raw.get("baselines")).items()}
    for baseline in baselines:
        if baseline not in BASELINES:
            fail("suite.baselines", baseline, f"must be one of {', '.join(BASELINES)}")
        if baseline in algorithms:
            fail(f"suite.algorithms.{baseline}", baseline, "is a baseline's name; rename the algorithm")
    tuned = {
        setting: {a: _strings(f"suite.tuned.{setting}.{a}", o) for a, o in _mapping(f"suite.tuned.{setting}", per).items()}
        for setting, per in _mapping("suite.tuned", raw.get("tuned")).items()
    }
    tuning = _mapping("suite.tuning", raw.get("tuning"))
    tuning_seeds = tuning.get("seeds", seeds[:2])
    if not isinstance(tuning_seeds, list) or not tuning_seeds or not all(isinstance(t, int) for t in tuning_seeds):
        fail("suite.tuning.seeds", tuning_seeds, "must be a non-empty list of integers")
    fraction = tuning.get("validation_fraction", 0.2)
    if not isinstance(fraction, float) or not 0 < fraction < 1:
        fail("suite.tuning.validation_fraction", fraction, "must be a number in (0, 1)")
    grid = {}
    for owner, keys in _mapping("suite.tuning.grid", tuning.get("grid")).items():
        if owner != "all" and owner not in algorithms and owner not in baselines:
            fail("suite.tuning.grid", owner, f"must be 'all' or one of the suite's algorithms/baselines ({', '.join([*algorithms, *baselines])})")
        grid[owner] = {}
        for key, values in _mapping(f"suite.tuning.grid.{owner}", keys).items():
            if not isinstance(values, list) or not values:
                fail(f"suite.tuning.grid.{owner}.{key}", values, "must be a non-empty list of values")
            grid[owner][key] = tuple(values)
    fix = {str(k): str(v) for k, v in _mapping("suite.tuning.fix", tuning.get("fix")).items()}
    for axis, value in fix.items():
        if value not in axes.get(axis, {}):
            fail(f"suite.tuning.fix.{axis}", value, f"must name an axis and one of its values ({', '.join(f'{a}: {list(v)}' for a, v in axes.items())})")
    score = raw.get("score", "global")
    if score not in SCORES:
        fail("suite.score", score, f"must be one of {', '.join(SCORES)}")
    vary_split = raw.get("vary_split", False)
    if not (isinstance(vary_split, bool) or (isinstance(vary_split, str) and vary_split.startswith(("task.", "partition.")))):
        fail("suite.vary_split", vary_split, "must be true, false or the task or partition option the seed sets (e.g. task.split_seed)")
    suite = Suite(name, str(raw.get("description", "")), tuple(seeds), float(target), _strings("suite.common", raw.get("common")),
                  axes, algorithms, baselines, tuned, tuple(tuning_seeds), fraction, grid, fix, score, vary_split)
    for key, per_algorithm in tuned.items():
        pairs = setting_pairs(key)
        if not pairs or any(value not in axes.get(axis, {}) for axis, value in pairs.items()):
            fail("suite.tuned", key, "must name settings as axis=value pairs of the suite's axes, e.g. " + next(iter(settings(suite))))
        for name in per_algorithm:
            if name not in algorithms and name not in baselines:
                fail(f"suite.tuned.{key}", name, f"must be one of the suite's algorithms/baselines ({', '.join([*algorithms, *baselines])})")
    return suite


def split_key(suite) -> Optional[str]:
    """The option each seed sets to itself under ``vary_split`` (``task.data_seed`` for ``true``), or None.
    ``suite`` is a ``Suite`` or a manifest's dict of one."""
    value = suite.vary_split if isinstance(suite, Suite) else suite.get("vary_split", False)
    return "task.data_seed" if value is True else (value or None)


def setting_pairs(setting: str) -> dict[str, str]:
    """``"data=(1,1),stragglers=0.5"`` -> ``{"data": "(1,1)", "stragglers": "0.5"}`` (values may hold commas)."""
    pairs, axis = {}, None
    for part in setting.split(","):
        if "=" in part:
            axis, value = part.split("=", 1)
            pairs[axis] = value
        elif axis is not None:
            pairs[axis] += "," + part
    return pairs


def tuned_overrides(suite: Suite, setting: str, algorithm: str) -> tuple[str, ...]:
    """The tuned overrides that apply to ``setting``: every ``tuned`` key whose axis=value pairs it
    contains (a key naming fewer axes holds for all values of the others), fewer axes first."""
    return chosen_overrides(suite.tuned, setting, algorithm)


def chosen_overrides(tuned: dict, setting: str, algorithm: str) -> tuple[str, ...]:
    """``tuned_overrides`` from a suite's ``tuned`` mapping alone (as ``suite.json`` records it)."""
    pairs = setting_pairs(setting)
    keys = [k for k in tuned if setting_pairs(k).items() <= pairs.items()]
    return tuple(o for k in sorted(keys, key=lambda k: len(setting_pairs(k))) for o in tuned[k].get(algorithm, ()))


def grid_edges(suite: dict, setting: str, algorithm: str) -> list[str]:
    """The tuned values of ``algorithm`` in ``setting`` that sit at the smallest or largest value of their
    tuning grid (numeric grids of 2+ values): the best may lie beyond the grid. A smallest value of 0 is no
    edge: the grid's options (learning rates, mu, lam, momentum) are never negative. ``suite`` is ``Suite._asdict()``."""
    grid = {**suite.get("grid", {}).get("all", {}), **suite.get("grid", {}).get(algorithm, {})}
    edges = []
    for override in chosen_overrides(suite.get("tuned", {}), setting, algorithm):
        key, value = override.split("=", 1)
        values = grid.get(key, ())
        try:
            numbers, chosen = sorted(float(v) for v in values), float(value)
        except (TypeError, ValueError):
            continue
        if len(numbers) >= 2 and chosen in (numbers[0], numbers[-1]) and not chosen == numbers[0] == 0:
            side = "smallest" if chosen == numbers[0] else "largest"
            edges.append(f"{key.split('.')[-1]}={value} ({side} of {', '.join(f'{v:g}' for v in numbers)})")
    return edges


def settings(suite: Suite) -> dict[str, tuple[str, ...]]:
    """Every setting of the suite (the product of its axes), name -> overrides, in config order."""
    names = list(suite.axes)
    out = {}
    for values in itertools.product(*(suite.axes[axis].items() for axis in names)):
        label = ",".join(f"{axis}={value}" for axis, (value, _) in zip(names, values))
        out[label] = tuple(o for _, overrides in values for o in overrides)
    return out


def _grid_points(grid: dict[str, tuple]) -> list[tuple[str, tuple[str, ...]]]:
    """(label, overrides) for each point of a grid; one empty point for no grid."""
    keys = sorted(grid)
    points = []
    for values in itertools.product(*(grid[k] for k in keys)):
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, values))
        points.append((label, tuple(f"{k}={v}" for k, v in zip(keys, values))))
    return points


def plan_cells(suite: Suite, mode: str, only: Optional[Sequence[str]] = None, only_settings: Optional[Sequence[str]] = None) -> list[Cell]:
    """The grid's cells in run order: per setting, the algorithms then the baselines.

    ``run`` uses each algorithm's tuned overrides for the setting; ``tune`` expands each
    algorithm into the points of its tuning grid (``all`` plus its own keys).
    """
    if mode not in MODES:
        fail("mode", mode, f"must be one of {', '.join(MODES)}")
    entries = {**{a: ("federated", o) for a, o in suite.algorithms.items()}, **{b: (b, o) for b, o in suite.baselines.items()}}
    for key, chosen, known in (("only", only, entries), ("settings", only_settings, settings(suite))):
        unknown = [c for c in chosen or () if c not in known]
        if unknown:
            fail(key, unknown, f"must be a subset of {', '.join(known)}")
    cells = []
    for setting, setting_overrides in settings(suite).items():
        if only_settings and setting not in only_settings:
            continue
        for name, (kind, overrides) in entries.items():
            if only and name not in only:
                continue
            base = (*suite.common, *setting_overrides, *overrides)
            if mode == "run":
                cells.append(Cell(setting, name, kind, (*base, *tuned_overrides(suite, setting, name))))
                continue
            if any(setting_pairs(setting).get(axis) != value for axis, value in suite.tuning_fix.items()):
                continue
            grid = {**suite.grid.get("all", {}), **suite.grid.get(name, {})}
            for label, point in _grid_points(grid):
                # Only the final validation score counts in tuning: evaluate once, at the end.
                overrides = (*base, *point, "sim.eval_every=${sim.rounds}")
                cells.append(Cell(setting, f"{name}@{label}" if label else name, kind, overrides, point))
    return cells
