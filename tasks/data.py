"""Federated datasets as plain NumPy: what each client holds, split into train and test."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np


class Column(NamedTuple):
    """One input column that a site's file must have, and what its values must be."""

    name: str
    kind: str  # "number" (any finite number), "integer", or "category" (text, one of ``levels``)
    levels: tuple[str, ...] = ()  # a category's levels (the first is one-hot's reference); an integer's range
    description: str = ""
    bounds: Optional[tuple[float, float]] = None  # a number's plausible [low, high], both included

    @property
    def expected(self) -> str:
        """What a value must be, for error messages: "a number", "a number from 0 to 120", "an integer 0-4", "one of ..."."""
        if self.kind == "number":
            return f"a number from {self.bounds[0]:g} to {self.bounds[1]:g}" if self.bounds else "a number"
        if self.kind == "integer":
            return f"an integer {self.levels[0]}-{self.levels[-1]}" if self.levels else "an integer"
        return f"one of {', '.join(self.levels)}"


class Examples(NamedTuple):
    """Labelled examples: ``x`` float32 [n, ...features], ``y`` int32 [n] (class labels; float32 for a regression outcome)."""

    x: np.ndarray
    y: np.ndarray


@dataclasses.dataclass(frozen=True)
class ClientSplit:
    """One client's (site's) data."""

    name: str
    train: Examples
    test: Examples


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
    """Clients' data plus what a model needs to know about it."""

    name: str
    clients: tuple[ClientSplit, ...]
    num_classes: int  # the model's outputs: one per class, 1 for a regression outcome
    feature_names: Optional[tuple[str, ...]] = None

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.clients[0].train.x.shape[1:]

    def train_sizes(self) -> list[int]:
        return [len(c.train.y) for c in self.clients]

    def test_sizes(self) -> list[int]:
        return [len(c.test.y) for c in self.clients]

    def pooled_test(self) -> Examples:
        """All clients' test sets concatenated."""
        return Examples(
            np.concatenate([c.test.x for c in self.clients]),
            np.concatenate([c.test.y for c in self.clients]),
        )


def stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test split of row indices.

    The test set has ``ceil(test_fraction * n)`` rows, shared among classes in proportion
    to their counts (largest remainders get the leftover rows), as scikit-learn does.
    Floating labels are a continuous (regression) outcome, with no classes to stratify on:
    the test rows are then a plain seeded random draw.

    Returns:
      (train_indices, test_indices), each sorted.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"stratified_split: test_fraction must be in (0, 1), got {test_fraction!r}")
    n = len(labels)
    n_test = math.ceil(test_fraction * n)
    if np.issubdtype(np.asarray(labels).dtype, np.floating):
        test = np.sort(rng.permutation(n)[:n_test])
        return np.setdiff1d(np.arange(n), test), test
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / n
    per_class = np.floor(exact).astype(int)
    leftover = n_test - per_class.sum()
    order = np.argsort(-(exact - per_class), kind="stable")
    per_class[order[:leftover]] += 1
    test = []
    for cls, k in zip(classes, per_class):
        rows = np.flatnonzero(labels == cls)
        test.append(rng.permutation(rows)[:k])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(n), test)
    return train, test


def min_split_rows(test_fraction: float) -> int:
    """The fewest rows that ``stratified_split`` with ``test_fraction`` gives at least one training and
    one test row: the smallest n with ``1 <= ceil(test_fraction * n) <= n - 1``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"min_split_rows: test_fraction must be in (0, 1), got {test_fraction!r}")
    n = 2
    while n - math.ceil(test_fraction * n) < 1:
        n += 1
    return n


def build_federated(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    parts: Sequence[np.ndarray],
    *,
    num_classes: int,
    test_fraction: float,
    seed: int,
    client_names: Optional[Sequence[str]] = None,
) -> FederatedDataset:
    """Turns a partition (one index array per client) into a ``FederatedDataset``.

    Each client's rows are split train/test with ``stratified_split`` (a client whose
    rows are too few to split keeps them all for training).
    """
    rng = np.random.default_rng(seed)
    names = client_names or [f"client_{i}" for i in range(len(parts))]
    clients = []
    for client_name, rows in zip(names, parts):
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) >= 2:
            train, test = stratified_split(y[rows], test_fraction, rng)
        else:
            train, test = np.arange(len(rows)), np.arange(0)
        clients.append(
            ClientSplit(client_name, Examples(x[rows[train]], y[rows[train]]), Examples(x[rows[test]], y[rows[test]]))
        )
    return FederatedDataset(name, tuple(clients), num_classes)


def _take(examples: Examples, rows: np.ndarray) -> Examples:
    return Examples(examples.x[rows], examples.y[rows])


def validation_split(dataset: FederatedDataset, fraction: float, seed: int) -> FederatedDataset:
    """Each client's training rows split again, stratified, into train and validation.

    The validation rows take the test set's place, so hyperparameters tuned on the result
    are chosen without ever seeing a test row. A client with fewer than 2 training rows
    keeps them all for training.
    """
    rng = np.random.default_rng(seed)
    clients = []
    for client in dataset.clients:
        if len(client.train.y) >= 2:
            train, val = stratified_split(client.train.y, fraction, rng)
        else:
            train, val = np.arange(len(client.train.y)), np.arange(0)
        clients.append(ClientSplit(client.name, _take(client.train, train), _take(client.train, val)))
    return dataclasses.replace(dataset, name=f"{dataset.name}/validation", clients=tuple(clients))


def pooled_dataset(dataset: FederatedDataset) -> FederatedDataset:
    """Every client's training and test rows in one place: the centralised baseline's data."""
    pooled = ClientSplit(
        "pooled",
        Examples(*(np.concatenate([getattr(c.train, f) for c in dataset.clients]) for f in Examples._fields)),
        dataset.pooled_test(),
    )
    return dataclasses.replace(dataset, name=f"{dataset.name}/pooled", clients=(pooled,))


def single_client(dataset: FederatedDataset, index: int) -> FederatedDataset:
    """Client ``index`` alone: the data of the local-training baseline for that site."""
    return dataclasses.replace(dataset, name=f"{dataset.name}/{dataset.clients[index].name}", clients=(dataset.clients[index],))


class SiteData(NamedTuple):
    """How a site reads its own records for a task (a task entry's ``site_data`` property):
    the columns its files must have, how checked text rows become examples, and the site's
    own split and preprocessing, which must equal the simulator's client for the same rows.

    ``encode(rows, where=...) -> Examples`` raises ValueError naming ``where(i, row)``, the
    column, the value and what was expected; ``prepare(site, examples, seed=...) -> ClientSplit``.
    ``min_rows``: the fewest complete rows ``prepare`` can split into a training and a test set
    (checked when the files are read, before any connection).
    """

    columns: tuple[Column, ...]
    encode: Callable[..., Any]
    prepare: Callable[..., Any]
    min_rows: int = 1
