"""Simulated adversaries: which clients are malicious, and what they send.

An ``Attack`` changes what its malicious clients send (``update``: a function of the round's
stacked updates, applied after local training and before aggregation, so it sees the honest
updates as a colluding adversary would) or what they train on (``data``: their training
examples, e.g. flipped labels; their test rows stay clean). An ``Adversary`` is an attack
plus the fixed set of malicious clients. The simulator applies both inside its compiled round
(``Simulator(..., adversary=...)``); attacks are registry entries (kind ``attack``), so a
plugin adds one the way it adds an aggregator.

Every update attack is ``(updates, malicious, weights, key) -> updates``: ``updates`` is a
pytree whose leaves are stacked over clients on axis 0, ``malicious`` is bool [clients] (true
for malicious clients that take part this round), ``weights`` float32 [clients] (0: the
client does not count). Only malicious rows may change.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nordfl import registry
from nordfl.algorithms import _checks
from nordfl.algorithms.aggregators import _per_client
from nordfl.algorithms.base import Update

UpdateAttack = Callable[[Update, jax.Array, jax.Array, jax.Array], Update]
DataAttack = Callable[[Any, int], Any]  # (a client's training ``Examples``, num_classes) -> poisoned ``Examples``


class Attack(NamedTuple):
    """What malicious clients do: replace their updates (``update``), poison their training data (``data``), or both."""

    update: Optional[UpdateAttack] = None
    data: Optional[DataAttack] = None


class Adversary(NamedTuple):
    """An attack and the clients that carry it out (bool [num_clients], fixed for the whole run)."""

    attack: Attack
    malicious: np.ndarray


def _where_malicious(malicious: jax.Array, updates: Update, replacement: Update) -> Update:
    return jax.tree_util.tree_map(lambda u, r: jnp.where(_per_client(malicious, u), r.astype(u.dtype), u), updates, replacement)


def sign_flip(scale: float = 1.0) -> Attack:
    """Each malicious client sends ``-scale`` times its honest update (scale 1: the plain sign flip)."""
    _checks.check_positive("attack.sign_flip", "scale", scale)
    return Attack(update=lambda u, malicious, w, key: _where_malicious(malicious, u, jax.tree_util.tree_map(lambda x: -scale * x, u)))


def scaled(factor: float = 10.0) -> Attack:
    """Each malicious client boosts its honest update ``factor`` times (model replacement, Bagdasaryan et al. 2020)."""
    _checks.check_positive("attack.scaled", "factor", factor)
    return Attack(update=lambda u, malicious, w, key: _where_malicious(malicious, u, jax.tree_util.tree_map(lambda x: factor * x, u)))


def gaussian(sigma: float = 1.0) -> Attack:
    """Each malicious client sends pure noise, N(0, sigma^2) in every coordinate."""
    _checks.check_positive("attack.gaussian", "sigma", sigma)

    def attack(updates, malicious, weights, key):
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        keys = jax.random.split(key, len(leaves))
        noise = [sigma * jax.random.normal(k, leaf.shape, jnp.float32) for k, leaf in zip(keys, leaves)]
        return _where_malicious(malicious, updates, treedef.unflatten(noise))

    return Attack(update=attack)


def little_is_enough_z(counted: jax.Array, malicious: jax.Array) -> jax.Array:
    """Baruch et al.'s ``z_max = Phi^-1((n - s) / n)`` with ``s = floor(n / 2 + 1) - m`` (n clients, m malicious):
    the largest shift that enough honest clients still look further from the mean than."""
    n = counted.astype(jnp.float32)
    s = jnp.floor(n / 2 + 1) - malicious.astype(jnp.float32)
    return jax.scipy.special.ndtri(jnp.clip((n - s) / jnp.maximum(n, 1.0), 1e-6, 1 - 1e-6))


def little_is_enough(z: Optional[float] = None) -> Attack:
    """"A little is enough" (Baruch, Baruch & Goldberg, NeurIPS 2019): every malicious client sends
    ``mean - z * std`` of the honest updates, coordinate-wise; ``z`` defaults to their ``z_max``."""
    if z is not None:
        _checks.check_positive("attack.little_is_enough", "z", z)

    def attack(updates, malicious, weights, key):
        counted = weights > 0
        honest = counted & ~malicious
        k = jnp.maximum(jnp.sum(honest), 1).astype(jnp.float32)
        shift = little_is_enough_z(jnp.sum(counted), jnp.sum(counted & malicious)) if z is None else jnp.float32(z)

        def forged(u):
            mask = _per_client(honest, u)
            mean = jnp.sum(jnp.where(mask, u, 0.0), axis=0, keepdims=True) / k
            std = jnp.sqrt(jnp.sum(jnp.where(mask, (u - mean) ** 2, 0.0), axis=0, keepdims=True) / k)
            return jnp.broadcast_to(mean - shift * std, u.shape)

        return _where_malicious(malicious, updates, jax.tree_util.tree_map(forged, updates))

    return Attack(update=attack)


def label_flip() -> Attack:
    """Each malicious client trains on labels ``C - 1 - y`` (C classes) instead of its own: a data attack."""

    def flip(examples, num_classes: int):
        if num_classes < 2:
            raise ValueError(f"attack.label_flip: needs a classification task, got {num_classes} output(s) (a regression outcome)")
        return examples._replace(y=(num_classes - 1 - examples.y).astype(examples.y.dtype))

    return Attack(data=flip)


registry.register("attack", "sign_flip")(sign_flip)
registry.register("attack", "scaled")(scaled)
registry.register("attack", "gaussian")(gaussian)
registry.register("attack", "little_is_enough")(little_is_enough)
registry.register("attack", "label_flip")(label_flip)


def attack(name: str, **hyperparameters) -> Attack:
    """Builds a registered attack by name (``sign_flip(scale=...)``, ``label_flip``, ... or a plugin's)."""
    entry = registry.lookup("attack", name, field="attack.name")
    _checks.check_keywords(f"attack.{name}", entry.builder, hyperparameters)
    built = entry.builder(**hyperparameters)
    if not isinstance(built, Attack) or (built.update is None and built.data is None):
        raise ValueError(f"attack.{name}: its builder must return an Attack with update and/or data set, got {built!r}")
    return built


def choose_malicious(client_names: Sequence[str], *, fraction: float = 0.0, sites: Sequence[str] = (), seed: int = 0) -> np.ndarray:
    """The malicious clients: the named ``sites``, or else ``round(fraction * N)`` of the N clients drawn with ``seed``."""
    n = len(client_names)
    if sites:
        unknown = sorted(set(sites) - set(client_names))
        if unknown:
            raise ValueError(f"attack.sites: unknown client(s) {', '.join(map(repr, unknown))}; the clients are "
                             f"{', '.join(client_names[:20])}{' ...' if n > 20 else ''}")
        return np.isin(np.asarray(client_names), list(sites))
    _checks.check_fraction("attack", "fraction", fraction)
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng(seed).permutation(n)[:int(math.floor(fraction * n + 0.5))]] = True
    return chosen


def poison(dataset, adversary: Adversary):
    """``dataset`` (a ``FederatedDataset``) with the malicious clients' training examples passed through the data attack."""
    if adversary.attack.data is None:
        return dataset
    clients = tuple(
        dataclasses.replace(c, train=adversary.attack.data(c.train, dataset.num_classes)) if bad else c
        for c, bad in zip(dataset.clients, adversary.malicious)
    )
    return dataclasses.replace(dataset, clients=clients)
