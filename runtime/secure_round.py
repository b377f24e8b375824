"""Secure aggregation in the runtime: what the masked vector holds, and one round at the coordinator.

The protocol itself is ``nordfl.runtime.secagg`` (Bonawitz et al. 2017, transport-free); this
module only fits it to the runtime. A site's contribution to a round is ONE vector::

    [ weight * leaf_1.ravel(), ..., weight * leaf_k.ravel(), weight, 1, train_loss ]   (0 for the last
                                                                                        three with weight 0)

so that its sum over the survivors gives the weighted mean the ``weighted_mean`` aggregator would
(``sum w u / sum w``), the number of contributing sites and their mean training loss, while the
coordinator sees none of the terms. The leaves are the update pytree's, in flattening order (for
SCAFFOLD its control-variate delta too); the coordinator unflattens with the algorithm's own
update template. Site ids in the protocol are the federation's (1-based index in ``Job.sites``),
and the protocol round number binds the run's round AND attempt, so keys and shares of a retried
attempt never mix with the failed one's.
"""

from __future__ import annotations

import time
from typing import Any, Optional

import jax
import numpy as np

from nordfl.algorithms.base import Aggregate
from nordfl.runtime.config import Job
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.secagg import Advertise, MaskedInput, SecAggConfig, SecAggResult, SecAggServer, ShareKeys, UnmaskShares

__all__ = ["EXTRA", "STEP_NAMES", "CoordinatorRound", "aggregate_of", "config_of", "message_limit", "protocol_round", "site_id",
           "vector_of"]

EXTRA = 3
"""Values after the update in the vector: weight, contributor count, training loss."""

_MESSAGES = {pb.ADVERTISE: Advertise, pb.SHARE_KEYS: ShareKeys, pb.MASKED_INPUT: MaskedInput, pb.UNMASK_SHARES: UnmaskShares}
_NEXT_TASK = (pb.TaskHeader.SECAGG_SHARE_KEYS, pb.TaskHeader.SECAGG_MASKED_INPUT, pb.TaskHeader.SECAGG_UNMASK)
STEP_NAMES = ("advertise keys", "share keys", "masked input", "unmask")


def config_of(job: Job) -> SecAggConfig:
    """The protocol's parameters, from the job every party received."""
    return SecAggConfig(len(job.sites), job.secagg_threshold, job.secagg_clip_range, job.secagg_bits)


PER_SITE_BYTES = 4096
"""Room per federation site in a message (a share ciphertext or two secret shares, JSON-encoded: about
0.5 KB today), with margin."""
HEADER_BYTES = 65536
"""Room for a message's fixed part: magic, header JSON, ids, keys."""


def message_limit(template: Any, num_sites: int) -> int:
    """The largest secure-aggregation message a site of this job can legitimately send, in bytes: the
    masked vector at 8 bytes a value (the update's values plus ``EXTRA``), or a share per other site,
    plus the fixed part. The coordinator refuses a larger announcement before reading any data."""
    values = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(template)) + EXTRA
    return 8 * values + PER_SITE_BYTES * num_sites + HEADER_BYTES


def protocol_round(round_index: int, attempt: int) -> int:
    """The protocol's round number: the run's round and the attempt (each attempt has fresh keys)."""
    return (int(round_index) << 16) | int(attempt)


def site_id(job: Job, site: str) -> int:
    return job.sites.index(site) + 1


def vector_of(update: Any, weight: float, train_loss: float) -> np.ndarray:
    """The one float64 vector a site masks: the weighted update, its weight, 1 and its loss (see module doc)."""
    leaves = [np.asarray(leaf, np.float64).ravel() for leaf in jax.tree_util.tree_leaves(update)]
    w = float(weight)
    present = 1.0 if w > 0 else 0.0
    loss = float(train_loss) if present and np.isfinite(train_loss) else 0.0
    return np.concatenate([w * leaf for leaf in leaves] + [np.asarray([w, present, loss])])


def aggregate_of(total: np.ndarray, template: Any) -> tuple[Aggregate, float]:
    """The ``Aggregate`` (weighted mean, total weight, contributors) and mean training loss from the sum."""
    specs = jax.tree_util.tree_leaves(template)
    sizes = [int(np.prod(s.shape)) for s in specs]
    if total.shape != (sum(sizes) + EXTRA,):
        raise ValueError(f"secure sum of length {total.shape}, expected {sum(sizes) + EXTRA}")
    total_weight, count, loss_sum = (float(v) for v in total[-EXTRA:])
    count = float(round(count))  # a sum of 0s and 1s; the quantisation error is far below 0.5
    scale = 1.0 / total_weight if total_weight > 0 else 0.0
    leaves, start = [], 0
    for spec, size in zip(specs, sizes):
        leaves.append(np.asarray(total[start:start + size] * scale, spec.dtype).reshape(spec.shape))
        start += size
    mean = jax.tree_util.tree_structure(template).unflatten(leaves)
    aggregate = Aggregate(mean, np.float32(total_weight), np.float32(count))
    return aggregate, (loss_sum / count if count else float("nan"))


class CoordinatorRound:
    """One attempt of a securely aggregated round at the coordinator.

    ``step`` is what is being collected: 0 the sites' keys (answering their TRAIN task), 1 their
    encrypted shares, 2 their masked inputs, 3 their unmask shares. ``expected`` are the sites
    asked in this step, ``answered`` those that answered; ``task(site)`` is the (kind, payload) a
    site is sent for steps 1-3. ``advance()`` closes the step (raising ``SecAggAborted`` below the
    threshold) and returns the ``SecAggResult`` after the last one.
    """

    def __init__(self, job: Job, run_id: str, round_index: int, attempt: int, cohort, template):
        self.job = job
        self.length = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(template)) + EXTRA
        self.server = SecAggServer(config_of(job), run_id, protocol_round(round_index, attempt), self.length)
        self.names = {site_id(job, s): s for s in job.sites}
        self.step = 0
        self.expected: set[str] = set(cohort)
        self.answered: set[str] = set()
        self._tasks: dict[str, bytes] = {}
        self.started = time.monotonic()
        self.step_seconds: list[float] = []

    @property
    def threshold(self) -> int:
        return self.server.cfg.threshold

    def waiting_for(self, site: str) -> bool:
        return site in self.expected and site not in self.answered

    def task(self, site: str) -> tuple[int, bytes]:
        return _NEXT_TASK[self.step - 1], self._tasks[site]

    def add(self, site: str, step: int, payload: bytes) -> str:
        """Feeds one site's message for ``step`` (a ``SecAggStep``); raises ``SecAggError`` (or ValueError) if bad."""
        if step != self.step + 1:
            raise ValueError(f"a {pb.SecAggStep.Name(step)} message during step {STEP_NAMES[self.step]!r}")
        message = _MESSAGES[step].from_bytes(payload)
        if message.site != site_id(self.job, site):
            raise ValueError(f"message names protocol site {message.site}; {site} is {site_id(self.job, site)}")
        add = (self.server.add_advertise, self.server.add_shares, self.server.add_masked_input, self.server.add_unmask_shares)
        add[self.step](message)
        self.answered.add(site)
        return STEP_NAMES[self.step]

    def complete(self) -> bool:
        return self.answered >= self.expected

    def advance(self) -> Optional[SecAggResult]:
        """Closes the current step; the result after the last (raises ``SecAggAborted`` below the threshold)."""
        self.step_seconds.append(time.monotonic() - self.started)
        if self.step == 3:
            return self.server.result()
        if self.step == 0:
            roster = self.server.roster().to_bytes()
            self._tasks = {self.names[i]: roster for i in self.server.u1}
        elif self.step == 1:
            self._tasks = {self.names[i]: m.to_bytes() for i, m in self.server.forward_shares().items()}
        else:
            request = self.server.unmask_request().to_bytes()
            self._tasks = {self.names[i]: request for i in self.server.u3}
        self.step += 1
        self.expected, self.answered = set(self._tasks), set()
        return None
