"""A job's plugins: the coordinator names each one (distribution, version, code hash), and a
site checks that it has exactly that code, and that its policy allows it, before importing
any of it or training.

A plugin is any module outside NordFL whose registry entries the job uses (its algorithm,
aggregator, server optimiser, task or model). Sites run the code they have installed, never
code sent to them: a job only names the plugin, and a site without the same version and hash
refuses the job, naming the plugin, the version and the hash.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from nordfl import registry

FIELDS = ("module", "distribution", "version", "sha256")


class PluginRefused(Exception):
    """This site does not have, or may not run, a plugin the job needs (the message says which and why)."""


def used_modules(algorithm: Mapping[str, Any], task: Mapping[str, Any]) -> list[str]:
    """The modules that registered the components a job's configs name, NordFL's own left out."""
    algorithm_entry = registry.lookup("algorithm", algorithm["name"], field="algorithm.name")
    used = [algorithm_entry,
            registry.lookup("aggregator", algorithm["aggregator"]["name"], field="algorithm.aggregator.name"),
            registry.lookup("task", task["name"], field="task.name"),
            registry.lookup("model", task["model"], field="task.model")]
    server = (algorithm.get("server") or {}).get("name") or algorithm_entry.properties.get("server_optimizer")
    if server:
        used.append(registry.lookup("server_optimizer", server, field="algorithm.server.name"))
    return sorted({entry.module for entry in used if not registry.is_builtin(entry.module)})


def job_plugins(algorithm: Mapping[str, Any], task: Mapping[str, Any]) -> tuple[dict, ...]:
    """The identities (``registry.PluginIdentity`` as dicts) of the plugins a job needs, for the job description."""
    return tuple(registry.plugin_identity(module)._asdict() for module in used_modules(algorithm, task))


def parse(raw: Any) -> tuple[dict, ...]:
    """A job's ``plugins`` list from the network, checked field by field."""
    if not isinstance(raw, list):
        raise ValueError(f"plugins must be a list, got {type(raw).__name__}")
    parsed = []
    for ref in raw:
        if not isinstance(ref, dict) or set(ref) != set(FIELDS):
            raise ValueError(f"each plugin must have exactly the fields {', '.join(FIELDS)}, got {ref!r}")
        if not isinstance(ref["module"], str) or not all(part.isidentifier() for part in ref["module"].split(".")):
            raise ValueError(f"plugin module must be a dotted module name, got {ref['module']!r}")
        for key in ("distribution", "version"):
            if ref[key] is not None and not isinstance(ref[key], str):
                raise ValueError(f"plugin {key} must be a string or null, got {ref[key]!r}")
        if not isinstance(ref["sha256"], str) or len(ref["sha256"]) != 64:
            raise ValueError(f"plugin sha256 must be 64 hex digits, got {ref['sha256']!r}")
        parsed.append({key: ref[key] for key in FIELDS})
    return tuple(parsed)


def _allowed(ref: dict, allowed: Sequence[Mapping[str, Optional[str]]]) -> bool:
    """Whether a policy's ``allowed_plugins`` admit ``ref``: an entry names the plugin by
    ``module`` or ``distribution`` and may pin its ``version`` and ``sha256``."""
    for entry in allowed:
        named = entry["module"] == ref["module"] if entry.get("module") else entry.get("distribution") == ref["distribution"]
        if named and all(entry.get(key) in (None, ref[key]) for key in ("version", "sha256")):
            return True
    return False


def check_and_load(refs: Sequence[dict], allowed: Optional[Sequence[Mapping[str, Optional[str]]]] = None) -> tuple[registry.PluginIdentity, ...]:
    """Checks every plugin the job names against this site's installed code and ``allowed`` (the
    policy's ``allowed_plugins``; None: any), then imports them. Raises ``PluginRefused`` first."""
    found = []
    for ref in refs:
        wanted = registry.PluginIdentity(**ref)
        if allowed is not None and not _allowed(ref, allowed):
            raise PluginRefused(f"the job needs {wanted.describe()}, which this site's policy (allowed_plugins) does not allow")
        try:
            have = registry.plugin_identity(ref["module"])
        except ModuleNotFoundError as e:
            raise PluginRefused(f"the job needs {wanted.describe()}; this site does not have it installed ({e})") from None
        if (have.distribution, have.version, have.sha256) != (wanted.distribution, wanted.version, wanted.sha256):
            raise PluginRefused(f"the job needs {wanted.describe()} (full sha256 {wanted.sha256}); this site has "
                                f"{have.describe()} (full sha256 {have.sha256}): install the same version and code")
        found.append(have)
    registry.load_plugins([ref["module"] for ref in refs], entry_points=False)
    return tuple(found)
