"""One registry for every extension point: algorithms, aggregators, server optimisers,
models, tasks, partitioners and (simulated) attacks.

Shipped components and a user's plugins register the same way, so nothing built in is a
special case::

    from nordfl import registry

    @registry.register("model", "tiny_mlp", input="flat")
    def tiny_mlp(num_features, num_classes, seed=0): ...

    registry.lookup("model", "tiny_mlp").builder(13, 2)

An entry's ``properties`` say what callers may rely on without knowing its name (a model's
``input`` is ``"flat"`` or ``"image"``; an aggregator's ``is_linear``). Plugins are modules
found through the ``nordfl.plugins`` entry-point group, or named explicitly
(``load_plugins(["my_study.algorithms"])``); importing one runs its ``register`` calls.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

KINDS = ("algorithm", "aggregator", "server_optimizer", "model", "task", "partitioner", "attack")
ENTRY_POINT_GROUP = "nordfl.plugins"


class Entry(NamedTuple):
    """One registered component: what builds it and what it declares (``properties``)."""

    kind: str
    name: str
    builder: Callable[..., Any]
    properties: Mapping[str, Any]
    module: str
    config: Optional[type] = None  # the dataclass of its config node (Hydra's ConfigStore schema), if it has one


_ENTRIES: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
# Modules whose import registers the shipped components; imported on first lookup so that
# importing the registry itself stays cheap and free of cycles.
_BUILTIN_MODULES = ("nordfl.algorithms.aggregators", "nordfl.algorithms.attacks", "nordfl.algorithms.server_optimizers", "nordfl.algorithms.fedavg",
                    "nordfl.algorithms.fedprox", "nordfl.algorithms.personal", "nordfl.algorithms.scaffold", "nordfl.tasks.models", "nordfl.tasks.heart",
                    "nordfl.tasks.synthetic", "nordfl.tasks.digits", "nordfl.tasks.partition", "nordfl.tasks.study_data")
_builtins_loaded = False


def _check_kind(kind: str) -> None:
    if kind not in _ENTRIES:
        raise ValueError(f"registry: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def register(kind: str, name: str, /, *, config: Optional[type] = None, **properties) -> Callable:
    """A decorator that registers ``builder`` as the ``kind`` called ``name``.

    ``config`` is the dataclass of the option's config node (its fields are exactly the
    keys ``algorithm=name`` accepts); ``properties`` are what callers may rely on (``kind`` and
    ``name`` are positional only, so a task may declare the property ``kind=``).

    Registering a second, different builder under a taken name is an error naming both
    modules (a plugin cannot silently replace a shipped component); re-importing the same
    module is harmless.
    """
    _check_kind(kind)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"registry: {kind} name must be an identifier such as 'fedavg', got {name!r}")

    def decorate(builder: Callable) -> Callable:
        module = getattr(builder, "__module__", "?")
        taken = _ENTRIES[kind].get(name)
        if taken is not None and (taken.module, taken.builder.__qualname__) != (module, builder.__qualname__):
            raise ValueError(
                f"registry: {kind} {name!r} is already registered by {taken.module}; {module} cannot register it again"
            )
        _ENTRIES[kind][name] = Entry(kind, name, builder, MappingProxyType(dict(properties)), module, config)
        return builder

    return decorate


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def lookup(kind: str, name: str, *, field: Optional[str] = None) -> Entry:
    """The entry ``name`` of ``kind``; an unknown name is an error listing the known ones.

    ``field`` is the config field the name came from (``"task.model"``), for the error.
    """
    _check_kind(kind)
    _load_builtins()
    try:
        return _ENTRIES[kind][name]
    except (KeyError, TypeError):
        raise ValueError(f"{field or kind}: unknown name {name!r}; expected one of {', '.join(names(kind))}") from None


def names(kind: str) -> tuple[str, ...]:
    """The registered names of ``kind``, sorted."""
    _check_kind(kind)
    _load_builtins()
    return tuple(sorted(_ENTRIES[kind]))


def entries() -> tuple[Entry, ...]:
    """Every registered entry, by kind then name (what ``nordfl-sim --list`` style tools show)."""
    _load_builtins()
    return tuple(_ENTRIES[kind][name] for kind in KINDS for name in sorted(_ENTRIES[kind]))


def check_keywords(owner: str, factory: Callable, given: Mapping[str, Any], *, supplied: Iterable[str] = ()) -> None:
    """Unknown or missing keyword arguments of ``factory`` as ValueErrors naming them (not Python's TypeError).

    ``supplied`` are parameters the caller fills itself (``loss_fn``), neither given nor expected.
    """
    parameters = {name: p for name, p in inspect.signature(factory).parameters.items() if name not in supplied}
    forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())  # it checks what it passes on
    parameters = {name: p for name, p in parameters.items() if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    for key in given:
        if key not in parameters and not forwards:
            raise ValueError(f"{owner}: unknown hyperparameter {key!r}; expected one of {', '.join(parameters) or 'none'}")
    for name, p in parameters.items():
        if p.default is inspect.Parameter.empty and name not in given:
            raise ValueError(f"{owner}: missing hyperparameter {name!r}")


class PluginIdentity(NamedTuple):
    """What a job says about a plugin it needs, so that a site can check it has the same code.

    ``distribution`` and ``version`` are the installed distribution's (None for a module in a
    plain folder); ``sha256`` hashes the plugin's Python source (every ``.py`` file of its
    top-level package, by relative path and content), so an edited copy is told apart from a
    released version."""

    module: str
    distribution: Optional[str]
    version: Optional[str]
    sha256: str

    def describe(self) -> str:
        where = f"{self.distribution} {self.version}" if self.distribution else "not from an installed distribution"
        return f"plugin {self.module} ({where}, sha256 {self.sha256[:16]}...)"


def _source_files(module: str) -> tuple[Path, list[Path]]:
    """The root and the ``.py`` files of ``module``'s top-level package (or the lone module file),
    found without importing (running) any of it; ``ModuleNotFoundError`` if it is not installed."""
    top = module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise ModuleNotFoundError(f"no module named {top!r}", name=top)
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
        return root, sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    path = Path(spec.origin)
    return path.parent, [path]


def plugin_identity(module: str) -> PluginIdentity:
    """The identity of an installed plugin module (its distribution, version and code hash), read
    from its files: nothing of it runs, so a site can check a job's plugin before importing it."""
    root, files = _source_files(module)
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    top = module.split(".")[0]
    distributions = importlib.metadata.packages_distributions().get(top, [])
    distribution = distributions[0] if distributions else None
    version = importlib.metadata.version(distribution) if distribution else None
    return PluginIdentity(module, distribution, version, digest.hexdigest())


def is_builtin(module: str) -> bool:
    """Whether ``module`` is part of NordFL itself (not a plugin)."""
    return module == "nordfl" or module.startswith("nordfl.")


def load_plugins(modules: Iterable[str] = (), *, entry_points: bool = True) -> tuple[str, ...]:
    """Imports plugin modules so that their ``register`` calls run; returns their names.

    Args:
      modules: module names given by the user (the ``plugins`` config key), importable from
        ``sys.path`` (an installed package or a folder on ``PYTHONPATH``).
      entry_points: also import every module advertised in the ``nordfl.plugins`` group by
        installed distributions.
    """
    _load_builtins()
    found = []
    if entry_points:
        for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            found.append(point.value.split(":")[0])
    for module in modules:
        if not isinstance(module, str) or not module:
            raise ValueError(f"plugins: each entry must be a module name such as 'my_study.algorithms', got {module!r}")
        found.append(module)
    for module in found:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name is not None and module.startswith(error.name):
                raise ValueError(f"plugins: cannot import {module!r}: no module named {error.name!r} on sys.path") from None
            raise
    return tuple(dict.fromkeys(found))
