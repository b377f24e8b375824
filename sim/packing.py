"""Client data: stored unpadded, trained padded, bucketed by size.

A ``ClientPool`` keeps every client's rows back to back (no padding in storage). Each
round, ``gather_clients`` cuts the cohort's clients out of it as ``[slots, n_max, ...]``
arrays plus counts, where ``n_max`` is the largest size of the client's bucket: a client
with 60 rows is not padded to the 20,000 of the largest one. The bucket plan minimises
the padded compute of a round: bucket b costs ``min(cohort, clients_b) * steps(n_max_b)``,
and splitting into more buckets only pays when clients' step counts really differ.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData, steps_per_epoch
from nordfl.tasks import Examples


def label_dtype(clients: Sequence[Examples]) -> type:
    """int32 for class labels, float32 for a continuous (regression) outcome."""
    floating = any(np.issubdtype(np.asarray(c.y).dtype, np.floating) for c in clients)
    return np.float32 if floating else np.int32


def pack_clients(clients: Sequence[Examples], n_max: Optional[int] = None) -> ClientData:
    """Stacks clients' examples, zero-padded to ``n_max`` rows (default: the largest, at least 1).

    Returns:
      ``ClientData(Examples(x [C, n_max, ...], y [C, n_max]), num_examples int32 [C])`` in NumPy
      (``y`` int32, or float32 for a regression outcome: ``label_dtype``).
    """
    sizes = [len(c.y) for c in clients]
    n_max = max(sizes + [1]) if n_max is None else n_max
    if n_max < max(sizes, default=0):
        raise ValueError(f"pack_clients: n_max={n_max} is smaller than the largest client ({max(sizes)} rows)")
    feature_shape = clients[0].x.shape[1:]
    x = np.zeros((len(clients), n_max, *feature_shape), np.float32)
    y = np.zeros((len(clients), n_max), label_dtype(clients))
    for i, c in enumerate(clients):
        x[i, : len(c.y)] = c.x
        y[i, : len(c.y)] = c.y
    return ClientData(Examples(x, y), np.asarray(sizes, np.int32))


class ClientPool(NamedTuple):
    """Every client's rows back to back: ``examples`` [rows, ...], ``offsets`` and ``sizes`` int32 [clients]."""

    examples: Examples
    offsets: np.ndarray
    sizes: np.ndarray


def pool_clients(clients: Sequence[Examples]) -> ClientPool:
    """Concatenates clients' examples without padding."""
    sizes = np.asarray([len(c.y) for c in clients], np.int32)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    x = np.concatenate([np.asarray(c.x, np.float32) for c in clients])
    dtype = label_dtype(clients)
    y = np.concatenate([np.asarray(c.y, dtype) for c in clients])
    if len(y) == 0:  # keep one row so gathers have something to index
        x, y = np.zeros((1, *clients[0].x.shape[1:]), np.float32), np.zeros(1, dtype)
    return ClientPool(Examples(x, y), offsets, sizes)


def gather_clients(pool: ClientPool, client_ids, valid, n_max: int) -> ClientData:
    """Cuts clients out of the pool as padded ``ClientData`` [slots, n_max, ...].

    Works on NumPy (host) and JAX (device, inside jit) pools alike. A slot with
    ``valid == False`` gets ``num_examples == 0``, so it trains on nothing. Padding rows hold
    some other real row: never read, since training and metrics mask by ``num_examples``.
    """
    xp = jnp if isinstance(pool.sizes, jax.Array) else np
    sizes = pool.sizes[client_ids]
    positions = xp.arange(n_max, dtype=xp.int32)
    rows = pool.offsets[client_ids][:, None] + positions[None, :]
    rows = xp.where(positions[None, :] < sizes[:, None], rows, 0)
    examples = jax.tree_util.tree_map(lambda a: a[rows], pool.examples)
    return ClientData(examples, xp.where(valid, sizes, 0).astype(xp.int32))


class BucketSpec(NamedTuple):
    """Clients of similar size: their global ids (sorted) and the rows every one is padded to."""

    client_ids: np.ndarray  # int32 [clients_b]
    n_max: int


def _bucket_cost(ids: np.ndarray, sizes: np.ndarray, cohort_size: int, batch_size: int, drop_remainder: bool,
                 clients_per_run: int) -> int:
    """Padded local steps of one bucket per round: its slots (the most of any one run's cohort it may hold) times
    the steps of its largest client."""
    steps = max(steps_per_epoch(int(sizes[ids].max(initial=0)), batch_size, drop_remainder), 1)
    return bucket_slots(ids, cohort_size, clients_per_run) * steps


def bucket_slots(ids: np.ndarray, cohort_size: int, clients_per_run: int) -> int:
    """Slots a bucket of client ``ids`` needs a round: the most clients of any one run it holds (ids are several
    runs' clients back to back, ``clients_per_run`` each), at most the cohort."""
    return min(cohort_size, int(np.bincount(np.asarray(ids) // clients_per_run).max(initial=0)))


def plan_buckets(
    sizes: Sequence[int], *, batch_size: int, drop_remainder: bool = False, cohort_size: Optional[int] = None, max_buckets: int = 4,
    clients_per_run: Optional[int] = None,
) -> list[np.ndarray]:
    """Groups client ids into at most ``max_buckets`` buckets of contiguous sizes, at least padded cost.

    Candidate boundaries are the powers of two of the clients' step counts; an exact
    dynamic programme picks the best contiguous grouping of those levels. With ``clients_per_run``,
    ``sizes`` are several runs' clients back to back, and a bucket holds the most of one run's cohort.

    Returns:
      One sorted int32 array of client ids per bucket, smallest clients first.
    """
    sizes = np.asarray(sizes, np.int64)
    clients_per_run = len(sizes) if clients_per_run is None else clients_per_run
    cohort_size = clients_per_run if cohort_size is None else cohort_size
    if len(sizes) == 0:
        return []
    steps = np.asarray([steps_per_epoch(int(n), batch_size, drop_remainder) for n in sizes])
    level = np.ceil(np.log2(np.maximum(steps, 1))).astype(int)
    levels = np.unique(level)
    groups = [np.flatnonzero(level == lv) for lv in levels]
    num_levels = len(levels)
    cost = lambda i, j: _bucket_cost(np.concatenate(groups[i:j]), sizes, cohort_size, batch_size, drop_remainder,  # noqa: E731
                                     clients_per_run)
    # best[k][j]: least cost of levels[:j] in k buckets.
    inf = float("inf")
    best = [[inf] * (num_levels + 1) for _ in range(max_buckets + 1)]
    cut = [[0] * (num_levels + 1) for _ in range(max_buckets + 1)]
    best[0][0] = 0
    for k in range(1, max_buckets + 1):
        for j in range(1, num_levels + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] + cost(i, j) < best[k][j]:
                    best[k][j], cut[k][j] = best[k - 1][i] + cost(i, j), i
    k = min(range(1, max_buckets + 1), key=lambda kk: (best[kk][num_levels], kk))
    bounds, j = [], num_levels
    while j > 0:
        i = cut[k][j]
        bounds.append((i, j))
        j, k = i, k - 1
    return [np.sort(np.concatenate(groups[i:j])).astype(np.int32) for i, j in reversed(bounds)]


def padded_steps(sizes: Sequence[int], plan: Sequence[np.ndarray], *, batch_size: int, drop_remainder: bool = False,
                 cohort_size: Optional[int] = None, clients_per_run: Optional[int] = None) -> int:
    """Local steps a round of ``plan`` runs per run, padding included (before rounding slots to devices)."""
    sizes = np.asarray(sizes, np.int64)
    clients_per_run = len(sizes) if clients_per_run is None else clients_per_run
    cohort_size = clients_per_run if cohort_size is None else cohort_size
    return sum(_bucket_cost(ids, sizes, cohort_size, batch_size, drop_remainder, clients_per_run) for ids in plan)


def bucket_specs(sizes: Sequence[int], plan: Sequence[np.ndarray]) -> list[BucketSpec]:
    """The padded row count of each planned bucket: its largest client (at least 1)."""
    sizes = np.asarray(sizes)
    return [BucketSpec(ids, max(int(sizes[ids].max(initial=0)), 1)) for ids in plan]
