"""The simulator's privacy ledger: epsilon per site after each round, from the seeded round plans.

A round's plan (cohort, epochs per member) is known before it runs, so the simulator knows
each site's DP-SGD steps exactly: ``epochs * steps_per_epoch(n, B)`` for every cohort member
(dropouts too: they trained, even if their update is discarded), nothing for the others.
The epsilon of a site is ``algorithms.accounting.epsilon_spent`` of its accumulated steps at
its own Poisson rate ``q = min(1, B / n)``; a run's epsilon is the max over sites. With
DP-FedAvg every site has the same ``site_level_epsilon`` of the rounds done.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np

from nordfl.algorithms import accounting
from nordfl.algorithms.dp import sampling_rate
from nordfl.algorithms.local import steps_per_epoch
from nordfl.sim.cohort import RoundPlan


class PrivacySpec(NamedTuple):
    """What the accountant needs to know of a run's DP configuration."""

    mode: str  # sgd | update
    noise_multiplier: float
    delta: float
    budget: Optional[float]
    clip: float
    noise: str


class SimPrivacy:
    """Per-site epsilon of a simulated run, round by round (replays the plans, so resuming is free).

    Args:
      spec: the run's DP settings (``noise_multiplier`` resolved).
      sizes: training rows per client [N].
      batch_size, drop_remainder, num_epochs: the local schedule.
      cohort_size: sites per round.
      plan: ``round_index -> RoundPlan`` (the simulator's ``plan``).
    """

    def __init__(self, spec: PrivacySpec, sizes, *, batch_size: int, drop_remainder: bool, cohort_size: int,
                 plan: Callable[[int], RoundPlan]):
        self.spec = spec
        self.sizes = np.asarray(sizes, np.int64)
        self.rates = np.array([sampling_rate(int(n), batch_size) for n in self.sizes])
        self.steps_per_epoch = steps_per_epoch(self.sizes, batch_size, drop_remainder)
        self.cohort_size = cohort_size
        self._plan = plan
        self._steps = [np.zeros(len(self.sizes), np.int64)]  # cumulative DP-SGD steps after r rounds

    @property
    def num_sites(self) -> int:
        return len(self.sizes)

    def round_steps(self, round_index: int) -> np.ndarray:
        """DP-SGD steps each site runs in round ``round_index`` (0 outside the cohort): int [N]."""
        plan = self._plan(round_index)
        steps = np.zeros(self.num_sites, np.int64)
        steps[plan.cohort] = plan.epochs.astype(np.int64) * self.steps_per_epoch[plan.cohort]
        return steps

    def steps(self, rounds: int) -> np.ndarray:
        """Cumulative DP-SGD steps per site after ``rounds`` rounds: int [N]."""
        while len(self._steps) <= rounds:
            self._steps.append(self._steps[-1] + self.round_steps(len(self._steps) - 1))
        return self._steps[rounds]

    def epsilons(self, rounds: int, noise_multiplier: Optional[float] = None) -> np.ndarray:
        """Epsilon of every site after ``rounds`` rounds: float [N]."""
        z = self.spec.noise_multiplier if noise_multiplier is None else noise_multiplier
        if self.spec.mode == "update":
            eps = accounting.site_level_epsilon(z, self.num_sites, self.cohort_size, rounds, self.spec.delta)
            return np.full(self.num_sites, eps)
        steps = self.steps(rounds)
        return np.array([accounting.epsilon_spent(z, float(q), int(k), self.spec.delta) for q, k in zip(self.rates, steps)])

    def epsilon(self, rounds: int) -> float:
        """The run's epsilon after ``rounds`` rounds: the max over sites."""
        return float(np.max(self.epsilons(rounds))) if self.num_sites else 0.0

    def exceeds_budget(self, rounds: int) -> bool:
        """True if some site would be over the budget after ``rounds`` rounds."""
        return self.spec.budget is not None and self.epsilon(rounds) > self.spec.budget


def calibrate_noise(spec: PrivacySpec, privacy: SimPrivacy, rounds: int) -> float:
    """The smallest noise multiplier with which the run's planned epsilon is within ``spec.budget``.

    DP-SGD: the max over sites of each site's own calibration (epsilon falls as z grows, site
    by site); DP-FedAvg: one calibration for all.
    """
    if spec.mode == "update":
        return accounting.site_level_noise_for_epsilon(spec.budget, privacy.num_sites, privacy.cohort_size, rounds, spec.delta)
    pairs = {(float(q), int(k)) for q, k in zip(privacy.rates, privacy.steps(rounds)) if k > 0 and q > 0}
    return max((accounting.noise_for_epsilon(spec.budget, q, k, spec.delta) for q, k in sorted(pairs)), default=0.0)
