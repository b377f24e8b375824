"""Privacy accounting: the epsilon a site has spent, from Google's ``dp-accounting`` library.

Two mechanisms, two units of privacy (see docs/privacy.md):

- **DP-SGD at the site** (``dp.mode=sgd``, unit: one example row, i.e. one patient, per site,
  per run). Every local step includes each real row independently with probability
  ``q = min(1, batch_size / n)`` (Poisson sampling, as ``algorithms.local.local_sgd`` under DP-SGD
  implements it) and adds Gaussian noise of std ``noise_multiplier * clip`` to the sum of
  clipped per-example gradients. One step is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``;
  a site's ledger composes its steps with the RDP accountant (add-or-remove-one neighbours).
  Each site has its own ``q`` (its own ``n``), so epsilon is per site; a run's is the max.
- **DP-FedAvg** (``dp.mode=update``, unit: one site, user-level). Each round samples the
  cohort uniformly WITHOUT replacement (``C`` of ``N`` sites, as ``sim.cohort.plan_round``
  does) and adds Gaussian noise of std ``z * clip`` to the sum of clipped updates. Under
  replace-one-site neighbours the sum moves by up to ``2 * clip``, so one round is
  ``SampledWithoutReplacementDpEvent(N, C, GaussianDpEvent(z / 2))`` (RDP, replace-one).

Everything here is a pure function of numbers (no JAX, no I/O); the runtime's site ledger
and the simulator call the same functions:

    >>> eps = epsilon_spent(noise_multiplier=1.1, sampling_rate=0.05, steps=600, delta=1e-5)
    >>> ledger = PrivacyLedger(noise_multiplier=1.1, sampling_rate=0.05, delta=1e-5, budget=3.0)
    >>> ledger.can_run(40)          # would 40 more steps stay within the budget?
    >>> ledger.record(40)           # after the site ran them
    >>> ledger.epsilon              # spent so far
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
from typing import Optional

import dp_accounting
import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant as rdp
from scipy import optimize

ACCOUNTANT = "rdp"
"""The accountant used: Renyi DP (Mironov 2017; Abadi et al. 2016), default orders of dp-accounting."""


def _check(field: str, value, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"accounting: {field} {expected}, got {value!r}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_common(noise_multiplier, delta) -> None:
    _check("noise_multiplier", noise_multiplier, _real(noise_multiplier) and noise_multiplier >= 0, "must be a number >= 0")
    _check("delta", delta, _real(delta) and 0 < delta < 1, "must be a number in (0, 1)")


@contextlib.contextmanager
def _quiet():
    """dp-accounting logs a warning for every fractional RDP order it skips; they are not ours to show."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def dp_sgd_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    """The DpEvent of ``steps`` Poisson-sampled Gaussian steps (what one site's DP-SGD ran)."""
    step = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sampling_rate: float) -> np.ndarray:
    # One step's RDP curve, computed once per (z, q): composing k steps is k times it,
    # exactly what RdpAccountant.compose(event, k) adds to its (zero) ledger.
    accountant = rdp.RdpAccountant()
    with _quiet():
        accountant.compose(dp_sgd_event(noise_multiplier, sampling_rate, 1))
    return np.array(accountant._rdp)  # noqa: SLF001 (no public getter; tests check against compose(event, k))


def epsilon_spent(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """Epsilon (at ``delta``) of ``steps`` DP-SGD steps with Poisson sampling rate ``sampling_rate``.

    Args:
      noise_multiplier: z, noise std over the clip bound (0 means no privacy: inf).
      sampling_rate: q in [0, 1], each row's probability of being in a step's batch.
      steps: DP-SGD steps the site ran (int >= 0; 0 costs nothing).
      delta: the delta of the (epsilon, delta) guarantee.

    Returns:
      epsilon as a float (0.0 for no steps or q = 0, inf without noise).
    """
    _check_common(noise_multiplier, delta)
    _check("sampling_rate", sampling_rate, _real(sampling_rate) and 0 <= sampling_rate <= 1, "must be a number in [0, 1]")
    _check("steps", steps, isinstance(steps, numbers.Integral) and steps >= 0, "must be an integer >= 0")
    if steps == 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    curve = int(steps) * _rdp_per_step(float(noise_multiplier), float(sampling_rate))
    epsilon, _ = rdp.compute_epsilon(rdp.DEFAULT_RDP_ORDERS, curve, delta)
    return float(epsilon)


def site_level_epsilon(noise_multiplier: float, num_sites: int, cohort_size: int, rounds: int, delta: float) -> float:
    """Epsilon of DP-FedAvg for one SITE: ``rounds`` rounds, cohorts of ``cohort_size`` of ``num_sites``
    drawn uniformly without replacement, noise std ``z * clip`` on the sum (replace-one-site: z / 2)."""
    _check_common(noise_multiplier, delta)
    _check("cohort_size", cohort_size, isinstance(num_sites, numbers.Integral) and isinstance(cohort_size, numbers.Integral)
           and 1 <= cohort_size <= num_sites, f"must be an integer in [1, num_sites={num_sites!r}]")
    _check("rounds", rounds, isinstance(rounds, numbers.Integral) and rounds >= 0, "must be an integer >= 0")
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SampledWithoutReplacementDpEvent(
        int(num_sites), int(cohort_size), dp_accounting.GaussianDpEvent(noise_multiplier / 2.0)
    )
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    with _quiet():
        accountant.compose(event, int(rounds))
    return float(accountant.get_epsilon(delta))


def _calibrate(epsilon_of, target_epsilon: float) -> float:
    """The smallest noise multiplier z (to 1e-5 relative) with ``epsilon_of(z) <= target_epsilon``.

    Brent's method on a doubling/halving bracket (each evaluation is an RDP curve, ~0.1 s), then
    the root nudged to the side that meets the target.
    """
    _check("target_epsilon", target_epsilon, _real(target_epsilon) and target_epsilon > 0, "must be a number > 0")
    gap = lambda z: epsilon_of(z) - target_epsilon  # noqa: E731 (decreasing in z)
    low, high = 0.5, 1.0
    while gap(high) > 0:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"accounting: no noise multiplier up to 1e6 reaches epsilon {target_epsilon!r}")
    while gap(low) <= 0:
        low, high = low / 2, low
        if low < 1e-4:
            return high
    root = optimize.brentq(gap, low, high, xtol=1e-5 * high)
    for z in (root, root + 1e-5 * high):
        if gap(z) <= 0:
            return float(z)
    return high


def noise_for_epsilon(target_epsilon: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The DP-SGD noise multiplier whose ``epsilon_spent`` over ``steps`` is at most ``target_epsilon``."""
    return _calibrate(lambda z: epsilon_spent(z, sampling_rate, steps, delta), target_epsilon)


def site_level_noise_for_epsilon(target_epsilon: float, num_sites: int, cohort_size: int, rounds: int, delta: float) -> float:
    """The DP-FedAvg noise multiplier whose ``site_level_epsilon`` is at most ``target_epsilon``."""
    return _calibrate(lambda z: site_level_epsilon(z, num_sites, cohort_size, rounds, delta), target_epsilon)


class PrivacyLedger:
    """One site's DP-SGD privacy ledger: the steps it ran and the epsilon they cost.

    The runtime's site keeps one per run (persist ``steps`` with its checkpoint); the
    simulator keeps one per client. Steps are counted where they were run: a site not
    sampled in a round, or one that did partial work, spends only what it ran.

    Args:
      noise_multiplier: z of the site's DP-SGD.
      sampling_rate: q = min(1, batch_size / num_examples) of this site.
      delta: the guarantee's delta.
      budget: epsilon the site allows per run; None for no limit.
      steps: steps already spent (restoring a ledger).
    """

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float,
                 budget: Optional[float] = None, steps: int = 0):
        _check("budget", budget, budget is None or (_real(budget) and budget > 0), "must be a number > 0 or None")
        epsilon_spent(noise_multiplier, sampling_rate, 0, delta)  # validates the numbers
        self.noise_multiplier, self.sampling_rate, self.delta, self.budget = noise_multiplier, sampling_rate, delta, budget
        self.steps = int(steps)

    def epsilon_after(self, more_steps: int) -> float:
        """Epsilon the site would have spent after ``more_steps`` more steps."""
        return epsilon_spent(self.noise_multiplier, self.sampling_rate, self.steps + int(more_steps), self.delta)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far."""
        return self.epsilon_after(0)

    def can_run(self, more_steps: int) -> bool:
        """True if ``more_steps`` more steps keep the site within its budget (always, without one)."""
        return self.budget is None or self.epsilon_after(more_steps) <= self.budget

    def record(self, steps: int) -> float:
        """Adds ``steps`` the site ran; returns epsilon spent so far."""
        _check("steps", steps, isinstance(steps, numbers.Integral) and steps >= 0, "must be an integer >= 0")
        self.steps += int(steps)
        return self.epsilon
