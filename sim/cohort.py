"""Who trains in a round, and how much: cohort sampling and systems heterogeneity.

Decided on the host from ``numpy.random.default_rng([seed, round])``, so a round's plan
depends only on the seed and the round number: chunking, bucketing, device count and
resuming from a checkpoint cannot change it.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np


class RoundPlan(NamedTuple):
    """One round's cohort (sorted client ids) and, per member, epochs to run and whether its update counts."""

    cohort: np.ndarray  # int32 [C]
    epochs: np.ndarray  # int32 [C]
    contributes: np.ndarray  # bool [C]: False for dropouts and for stragglers when they are dropped


def plan_round(
    seed: int,
    round_index: int,
    *,
    num_clients: int,
    cohort_size: Optional[int],
    num_epochs: int,
    straggler_fraction: float = 0.0,
    keep_stragglers: bool = True,
    dropout_fraction: float = 0.0,
) -> RoundPlan:
    """Samples a cohort uniformly without replacement, then its stragglers and dropouts.

    Stragglers (``floor(straggler_fraction * C)`` members) run a uniform number of epochs in
    1..num_epochs-1, the FedProx paper's systems heterogeneity; with ``keep_stragglers`` their
    partial work counts (FedProx), otherwise it is dropped (FedAvg in that paper). Dropouts
    (``floor(dropout_fraction * C)`` members, drawn independently) return nothing.
    """
    rng = np.random.default_rng([seed, round_index])
    size = num_clients if cohort_size is None else cohort_size
    cohort = np.sort(rng.choice(num_clients, size=size, replace=False)) if size < num_clients else np.arange(num_clients)
    epochs = np.full(size, num_epochs, np.int32)
    contributes = np.ones(size, bool)
    stragglers = rng.choice(size, size=int(np.floor(straggler_fraction * size)), replace=False)
    if len(stragglers):
        epochs[stragglers] = rng.integers(1, max(num_epochs, 2), size=len(stragglers))
        if not keep_stragglers:
            contributes[stragglers] = False
    dropouts = rng.choice(size, size=int(np.floor(dropout_fraction * size)), replace=False)
    contributes[dropouts] = False
    return RoundPlan(cohort.astype(np.int32), epochs, contributes)
