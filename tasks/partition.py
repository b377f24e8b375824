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
from typing import Optional, Sequence

import numpy as np

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



PARTITIONERS = ("natural", "iid", "dirichlet", "k_classes", "quantity_skew", "feature_shift")


def repartition(
    dataset: FederatedDataset,
    name: str,
    *,
    num_clients: Optional[int] = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    alpha: float = 0.5,
    k: int = 2,
    distribution: str = "lognormal",
    sigma: float = 1.0,
    exponent: float = 1.5,
    noise: float = 0.5,
    min_size: int = 1,
    allow_empty: bool = False,
) -> FederatedDataset:
    """Re-splits a federated dataset's pooled rows (train and test) into new clients.

    ``natural`` keeps the dataset's own clients (hospitals, devices). The others pool every
    row, partition them with the named partitioner, and split each new client's rows into
    train and test (stratified, ``test_fraction``), so a client's test set follows its own
    distribution. ``feature_shift`` partitions IID, then adds client-dependent noise.
    """
    if name not in PARTITIONERS:
        raise ValueError(f"partition.name: unknown partitioner {name!r}; expected one of {', '.join(PARTITIONERS)}")
    if name == "natural":
        return dataset
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"partition.num_clients: must be an integer >= 1 for partitioner {name!r}, got {num_clients!r}")
    x = np.concatenate([c.train.x for c in dataset.clients] + [c.test.x for c in dataset.clients])
    y = np.concatenate([c.train.y for c in dataset.clients] + [c.test.y for c in dataset.clients])
    rng = np.random.default_rng(seed)
    if name == "iid" or name == "feature_shift":
        parts = iid(len(y), num_clients, rng, allow_empty=allow_empty)
        if name == "feature_shift":
            x = feature_shift(x, parts, noise, rng)
    elif name == "dirichlet":
        parts = dirichlet_label_skew(y, num_clients, alpha, rng, min_size=min_size, allow_empty=allow_empty)
    elif name == "k_classes":
        parts = k_classes_per_client(y, num_clients, k, rng)
    else:
        parts = quantity_skew(
            len(y), num_clients, rng, distribution=distribution, sigma=sigma, exponent=exponent,
            min_size=0 if allow_empty else min_size,
        )
    federated = build_federated(
        f"{dataset.name}/{name}", x, y, parts, num_classes=dataset.num_classes, test_fraction=test_fraction, seed=seed
    )
    return dataclasses.replace(federated, feature_names=dataset.feature_names)
