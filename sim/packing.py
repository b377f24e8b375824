"""Client data as padded arrays: ``[clients, n_max, ...]`` plus per-client counts."""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData
from nordfl.tasks import Examples


def pack_clients(clients: Sequence[Examples], n_max: Optional[int] = None) -> ClientData:
    """Stacks clients' examples, zero-padded to ``n_max`` rows (default: the largest client).

    Returns:
      ``ClientData(Examples(x [C, n_max, ...], y [C, n_max]), num_examples int32 [C])``.
    """
    sizes = [len(c.y) for c in clients]
    n_max = max(sizes + [1]) if n_max is None else n_max
    if n_max < max(sizes, default=0):
        raise ValueError(f"pack_clients: n_max={n_max} is smaller than the largest client ({max(sizes)} rows)")
    feature_shape = clients[0].x.shape[1:]
    x = np.zeros((len(clients), n_max, *feature_shape), np.float32)
    y = np.zeros((len(clients), n_max), np.int32)
    for i, c in enumerate(clients):
        x[i, : len(c.y)] = c.x
        y[i, : len(c.y)] = c.y
    return ClientData(Examples(jnp.asarray(x), jnp.asarray(y)), jnp.asarray(sizes, jnp.int32))


def padding_overhead(num_examples: Sequence[int], n_max: int) -> float:
    """Fraction of packed rows that are padding."""
    total = n_max * len(num_examples)
    return 1.0 - float(np.sum(num_examples)) / total if total else 0.0
