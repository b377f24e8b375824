"""Partitioners: turn a centralised dataset into heterogeneous clients.

Each returns one index array per client; together they hold every row exactly once
(``feature_shift`` keeps a given partition and perturbs features instead). All are seeded
through a ``numpy.random.Generator``. A client left with no rows is an error (an empty
site is usually a configuration mistake) unless asked for: ``allow_empty=True`` for
``iid`` and ``dirichlet_label_skew``, ``min_size=0`` for ``quantity_skew``;
``k_classes_per_client`` never leaves a client empty.

References: Dirichlet label skew (Hsu et al. 2019), k classes per client (McMahan et al.
2017, "pathological non-IID"), quantity and feature skew (Li et al., "Federated Learning
on Non-IID Data Silos: An Experimental Study", ICDE 2022).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from nordfl import registry
from nordfl.tasks.data import FederatedDataset, build_federated


def _check_clients(owner: str, num_clients: int, num_rows: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"{owner}: num_clients must be an integer >= 1, got {num_clients!r}")
    if num_rows < 1:
        raise ValueError(f"{owner}: the dataset has no rows to partition")


def _check_nonempty(owner: str, parts: list[np.ndarray], allow_empty: bool) -> list[np.ndarray]:
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty and not allow_empty:
        raise ValueError(
            f"{owner}: clients {empty[:10]} got no rows ({len(empty)} of {len(parts)} empty); "
            "use fewer clients or allow empty clients"
        )
    return [np.sort(p).astype(np.int64) for p in parts]


def iid(num_rows: int, num_clients: int, rng: np.random.Generator, *, allow_empty: bool = False) -> list[np.ndarray]:
    """Uniformly shuffled rows in near-equal shares (sizes differ by at most one)."""
    _check_clients("iid", num_clients, num_rows)
    return _check_nonempty("iid", list(np.array_split(rng.permutation(num_rows), num_clients)), allow_empty)


def dirichlet_label_skew(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 100,
    allow_empty: bool = False,
) -> list[np.ndarray]:
    """Each class's rows are spread over clients by proportions drawn from Dir(alpha).

    Small alpha gives each client few classes; large alpha approaches IID. Draws are
    repeated (up to ``max_tries``) until every client has ``min_size`` rows (any number,
    zero included, with ``allow_empty``).
    """
    _check_clients("dirichlet_label_skew", num_clients, len(labels))
    if not alpha > 0:
        raise ValueError(f"dirichlet_label_skew: alpha must be > 0, got {alpha!r}")
    if not min_size >= 0 or not max_tries >= 1:
        raise ValueError(f"dirichlet_label_skew: need min_size >= 0 and max_tries >= 1, got {min_size!r}, {max_tries!r}")
    classes = np.unique(labels)
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            rows = rng.permutation(np.flatnonzero(labels == cls))
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(int)
            for client, share in enumerate(np.split(rows, cuts)):
                parts[client].append(share)
        merged = [np.concatenate(p) for p in parts]
        smallest = min(len(p) for p in merged)
        if smallest >= (0 if allow_empty else max(min_size, 1)):
            return _check_nonempty("dirichlet_label_skew", merged, allow_empty)
    raise ValueError(
        f"dirichlet_label_skew: no draw in {max_tries} tries gave every client min_size={min_size} rows "
        f"(alpha={alpha}, num_clients={num_clients}, rows={len(labels)}; the last draw's smallest client had "
        f"{smallest}); raise alpha, lower num_clients or min_size"
    )


def k_classes_per_client(labels: np.ndarray, num_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every client holds rows of exactly ``k`` distinct classes.

    Classes are dealt round-robin in a shuffled order, so every class has a holder when
    ``num_clients * k >= num_classes``; each class's rows are split evenly among its holders.
    """
    _check_clients("k_classes_per_client", num_clients, len(labels))
    classes = np.unique(labels)
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(classes):
        raise ValueError(f"k_classes_per_client: k must be an integer in [1, {len(classes)}], got {k!r}")
    if num_clients * k < len(classes):
        raise ValueError(
            f"k_classes_per_client: num_clients * k = {num_clients * k} < {len(classes)} classes, "
            "so some rows would have no client"
        )
    order = rng.permutation(classes)
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for client in range(num_clients):
        for j in range(k):
            holders[int(order[(client * k + j) % len(classes)])].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls, clients in holders.items():
        rows = rng.permutation(np.flatnonzero(labels == cls))
        if len(rows) < len(clients):
            raise ValueError(
                f"k_classes_per_client: class {cls} has {len(rows)} rows for {len(clients)} clients holding it; "
                "lower num_clients or k"
            )
        for client, share in zip(clients, np.array_split(rows, len(clients))):
            parts[client].append(share)
    return _check_nonempty("k_classes_per_client", [np.concatenate(p) for p in parts], False)


def quantity_skew(
    num_rows: int,
    num_clients: int,
    rng: np.random.Generator,
    *,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    min_size: int = 1,
) -> list[np.ndarray]:
    """IID rows in skewed amounts.

    Client shares are drawn log-normal(0, ``sigma``) (``distribution="lognormal"``), or
    follow a power law ``share_r ~ r**-exponent`` over a random ranking of clients
    (``"power_law"``); each client gets ``min_size`` rows plus its share of the rest.
    """
    _check_clients("quantity_skew", num_clients, num_rows)
    if distribution == "lognormal":
        if not sigma > 0:
            raise ValueError(f"quantity_skew: sigma must be > 0, got {sigma!r}")
        shares = rng.lognormal(0.0, sigma, num_clients)
    elif distribution == "power_law":
        if not exponent > 0:
            raise ValueError(f"quantity_skew: exponent must be > 0, got {exponent!r}")
        shares = rng.permutation(np.arange(1, num_clients + 1, dtype=float) ** -exponent)
    else:
        raise ValueError(f"quantity_skew: unknown distribution {distribution!r}; expected lognormal or power_law")
    if min_size * num_clients > num_rows:
        raise ValueError(f"quantity_skew: {num_clients} clients x min_size={min_size} needs more than the {num_rows} rows")
    spare = num_rows - min_size * num_clients
    exact = shares / shares.sum() * spare
    sizes = np.floor(exact).astype(int)
    sizes[np.argsort(-(exact - sizes), kind="stable")[: spare - sizes.sum()]] += 1
    sizes += min_size
    cuts = np.cumsum(sizes)[:-1]
    return _check_nonempty("quantity_skew", list(np.split(rng.permutation(num_rows), cuts)), min_size == 0)


def feature_shift(
    x: np.ndarray, parts: Sequence[np.ndarray], sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Returns a copy of ``x`` where client i's rows carry Gaussian noise of std ``sigma * i / N``.

    Client 0 sees clean features and the last one the noisiest, so the sites differ in
    their feature distribution while labels stay put (Li et al. 2022, "noise-based
    feature imbalance").
    """
    if not sigma >= 0:
        raise ValueError(f"feature_shift: sigma must be >= 0, got {sigma!r}")
    shifted = np.array(x, dtype=np.float32, copy=True)
    for i, rows in enumerate(parts):
        scale = sigma * i / len(parts)
        shifted[rows] += rng.normal(0.0, scale, size=shifted[rows].shape).astype(np.float32)
    return shifted


def natural(site_column: Sequence) -> tuple[list[str], list[np.ndarray]]:
    """One client per distinct value of ``site_column`` (e.g. the hospital), in sorted order.

    Returns:
      (site names, index arrays).
    """
    values = np.asarray(site_column)
    if len(values) == 0:
        raise ValueError("natural: the site column is empty")
    names = sorted(set(values.tolist()))
    return [str(n) for n in names], [np.flatnonzero(values == n) for n in names]


# ----------------------------------------------------------------------------- registered partitioners
# A registered partitioner is ``builder(dataset, *, seed, **options) -> FederatedDataset``; its
# config dataclass lists the options. Most pool the rows and deal them out (``pooled_partition``).


@dataclass
class PartitionConfig:
    """``natural``'s keys (it has none but its name); the base of every partitioner's config."""

    name: str = "natural"


@dataclass
class PooledConfig(PartitionConfig):
    """Keys of every partitioner that pools the rows and deals them to new clients."""

    num_clients: int = 100
    test_fraction: float = 0.2  # each new client's rows held out for its test set (stratified)


def pooled_partition(
    dataset: FederatedDataset,
    name: str,
    split: Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, list[np.ndarray]]],
    *,
    num_clients: int,
    seed: int = 0,
    test_fraction: float = 0.2,
) -> FederatedDataset:
    """Pools every row (train and test) of ``dataset``, deals them out with ``split`` and splits each
    new client's rows into train and test (stratified, ``test_fraction``), so a client's test set
    follows its own distribution.

    ``split(x, y, rng) -> (x, parts)``: one index array per client (every row once), and the
    features (``x`` itself, or transformed: feature shift).
    """
    if not isinstance(num_clients, (int, np.integer)) or isinstance(num_clients, bool) or num_clients < 1:
        raise ValueError(f"partition.num_clients: must be an integer >= 1 for partitioner {name!r}, got {num_clients!r}")
    x = np.concatenate([c.train.x for c in dataset.clients] + [c.test.x for c in dataset.clients])
    y = np.concatenate([c.train.y for c in dataset.clients] + [c.test.y for c in dataset.clients])
    x, parts = split(x, y, np.random.default_rng(seed))
    federated = build_federated(
        f"{dataset.name}/{name}", x, y, parts, num_classes=dataset.num_classes, test_fraction=test_fraction, seed=seed
    )
    return dataclasses.replace(federated, feature_names=dataset.feature_names)


def _needs_class_labels(name: str, dataset: FederatedDataset) -> None:
    """Refuses a label-skew partitioner on a continuous (regression) outcome: it has no classes to skew."""
    if any(np.issubdtype(np.asarray(c.train.y).dtype, np.floating) for c in dataset.clients):
        raise ValueError(f"partition.name: {name} deals out class labels, but task {dataset.name} has a continuous "
                         "(regression) outcome; expected natural, iid, quantity_skew or feature_shift")


@registry.register("partitioner", "natural", config=PartitionConfig)
def natural_partition(dataset: FederatedDataset, *, seed: int = 0) -> FederatedDataset:
    """Keeps the dataset's own clients (hospitals, devices)."""
    del seed
    return dataset


@dataclass
class IIDConfig(PooledConfig):
    name: str = "iid"
    allow_empty: bool = False


@registry.register("partitioner", "iid", config=IIDConfig)
def iid_partition(dataset: FederatedDataset, *, num_clients: int, seed: int = 0, test_fraction: float = 0.2,
                  allow_empty: bool = False) -> FederatedDataset:
    """Pooled rows dealt out uniformly (``iid``)."""
    return pooled_partition(dataset, "iid", lambda x, y, rng: (x, iid(len(y), num_clients, rng, allow_empty=allow_empty)),
                            num_clients=num_clients, seed=seed, test_fraction=test_fraction)


@dataclass
class FeatureShiftConfig(IIDConfig):
    name: str = "feature_shift"
    noise: float = 0.5  # client i's features get N(0, (noise * i / num_clients)^2)


@registry.register("partitioner", "feature_shift", config=FeatureShiftConfig)
def feature_shift_partition(dataset: FederatedDataset, *, num_clients: int, seed: int = 0, test_fraction: float = 0.2,
                            allow_empty: bool = False, noise: float = 0.5) -> FederatedDataset:
    """IID rows, then client-dependent feature noise (``feature_shift``)."""

    def split(x, y, rng):
        parts = iid(len(y), num_clients, rng, allow_empty=allow_empty)
        return feature_shift(x, parts, noise, rng), parts

    return pooled_partition(dataset, "feature_shift", split, num_clients=num_clients, seed=seed, test_fraction=test_fraction)


@dataclass
class DirichletConfig(PooledConfig):
    name: str = "dirichlet"
    alpha: float = 0.5  # small: few classes per client
    min_size: int = 1
    allow_empty: bool = False


@registry.register("partitioner", "dirichlet", config=DirichletConfig)
def dirichlet_partition(dataset: FederatedDataset, *, num_clients: int, seed: int = 0, test_fraction: float = 0.2,
                        alpha: float = 0.5, min_size: int = 1, allow_empty: bool = False) -> FederatedDataset:
    """Dirichlet label skew (``dirichlet_label_skew``)."""
    _needs_class_labels("dirichlet", dataset)
    return pooled_partition(
        dataset, "dirichlet",
        lambda x, y, rng: (x, dirichlet_label_skew(y, num_clients, alpha, rng, min_size=min_size, allow_empty=allow_empty)),
        num_clients=num_clients, seed=seed, test_fraction=test_fraction)


@dataclass
class KClassesConfig(PooledConfig):
    name: str = "k_classes"
    k: int = 2


@registry.register("partitioner", "k_classes", config=KClassesConfig)
def k_classes_partition(dataset: FederatedDataset, *, num_clients: int, seed: int = 0, test_fraction: float = 0.2,
                        k: int = 2) -> FederatedDataset:
    """Every client holds exactly ``k`` classes (``k_classes_per_client``)."""
    _needs_class_labels("k_classes", dataset)
    return pooled_partition(dataset, "k_classes", lambda x, y, rng: (x, k_classes_per_client(y, num_clients, k, rng)),
                            num_clients=num_clients, seed=seed, test_fraction=test_fraction)


@dataclass
class QuantitySkewConfig(PooledConfig):
    name: str = "quantity_skew"
    distribution: str = "lognormal"  # lognormal | power_law
    sigma: float = 1.0
    exponent: float = 1.5
    min_size: int = 1
    allow_empty: bool = False


@registry.register("partitioner", "quantity_skew", config=QuantitySkewConfig)
def quantity_skew_partition(dataset: FederatedDataset, *, num_clients: int, seed: int = 0, test_fraction: float = 0.2,
                            distribution: str = "lognormal", sigma: float = 1.0, exponent: float = 1.5, min_size: int = 1,
                            allow_empty: bool = False) -> FederatedDataset:
    """IID rows in skewed amounts (``quantity_skew``)."""

    def split(x, y, rng):
        return x, quantity_skew(len(y), num_clients, rng, distribution=distribution, sigma=sigma, exponent=exponent,
                                min_size=0 if allow_empty else min_size)

    return pooled_partition(dataset, "quantity_skew", split, num_clients=num_clients, seed=seed, test_fraction=test_fraction)


def repartition(dataset: FederatedDataset, name: str, *, seed: int = 0, **options) -> FederatedDataset:
    """Re-splits a federated dataset with the registered partitioner ``name`` and its ``options``.

    ``natural`` keeps the dataset's own clients; the shipped others pool every row and deal
    them out (``pooled_partition``). An unknown name or option is an error naming it.
    """
    entry = registry.lookup("partitioner", name, field="partition.name")
    registry.check_keywords(f"partition.{name}", entry.builder, options, supplied=("dataset", "seed"))
    return entry.builder(dataset, seed=seed, **options)
