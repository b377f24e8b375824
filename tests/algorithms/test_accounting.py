"""Privacy accounting: the epsilon NordFL reports is dp-accounting's, computed directly."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from nordfl.algorithms import accounting


def _direct_dp_sgd(z, q, steps, delta):
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("z, q, steps, delta", [(1.1, 0.05, 600, 1e-5), (0.8, 0.2, 37, 1e-6), (4.0, 1.0, 10, 1e-5), (2.5, 0.0667, 900, 1e-5)])
def test_epsilon_is_dp_accountings_rdp_epsilon_for_the_same_event(z, q, steps, delta):
    assert accounting.epsilon_spent(z, q, steps, delta) == pytest.approx(_direct_dp_sgd(z, q, steps, delta), rel=1e-12)


def test_rdp_epsilon_is_an_upper_bound_close_to_the_pld_accountant():
    z, q, steps, delta = 1.1, 0.05, 200, 1e-5
    accountant = pld.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    tight = accountant.get_epsilon(delta)
    ours = accounting.epsilon_spent(z, q, steps, delta)
    assert tight <= ours <= 1.6 * tight


def test_site_level_epsilon_is_the_sampled_without_replacement_gaussian_of_half_the_multiplier():
    z, num_sites, cohort, rounds, delta = 1.2, 40, 10, 50, 1e-5
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(num_sites, cohort, dp_accounting.GaussianDpEvent(z / 2))
    accountant.compose(event, rounds)
    assert accounting.site_level_epsilon(z, num_sites, cohort, rounds, delta) == pytest.approx(accountant.get_epsilon(delta), rel=1e-12)


def test_edges_no_steps_cost_nothing_and_no_noise_is_no_privacy():
    assert accounting.epsilon_spent(1.0, 0.1, 0, 1e-5) == 0.0
    assert accounting.epsilon_spent(1.0, 0.0, 100, 1e-5) == 0.0
    assert accounting.epsilon_spent(0.0, 0.1, 1, 1e-5) == math.inf
    assert accounting.epsilon_spent(1.0, 0.1, 20, 1e-5) < accounting.epsilon_spent(1.0, 0.1, 40, 1e-5)


def test_noise_for_epsilon_inverts_epsilon_spent():
    q, steps, delta, target = 0.06, 500, 1e-5, 3.0
    z = accounting.noise_for_epsilon(target, q, steps, delta)
    assert accounting.epsilon_spent(z, q, steps, delta) <= target
    assert accounting.epsilon_spent(z * 0.995, q, steps, delta) > target


@pytest.mark.slow  # each evaluation of the sampled-without-replacement RDP curve takes ~0.5 s
def test_site_level_noise_for_epsilon_inverts_site_level_epsilon():
    target, delta = 3.0, 1e-5
    zs = accounting.site_level_noise_for_epsilon(target, 20, 5, 30, delta)
    assert accounting.site_level_epsilon(zs, 20, 5, 30, delta) <= target < accounting.site_level_epsilon(zs * 0.995, 20, 5, 30, delta)


def test_ledger_accumulates_steps_and_guards_its_budget():
    ledger = accounting.PrivacyLedger(noise_multiplier=1.5, sampling_rate=0.1, delta=1e-5, budget=3.0)
    assert ledger.epsilon == 0.0 and ledger.can_run(10)
    ledger.record(10)
    ledger.record(15)
    assert ledger.steps == 25
    assert ledger.epsilon == pytest.approx(_direct_dp_sgd(1.5, 0.1, 25, 1e-5), rel=1e-12)
    assert ledger.can_run(10) and not ledger.can_run(1000)  # epsilon 13.6 after 1025 steps
    restored = accounting.PrivacyLedger(1.5, 0.1, 1e-5, budget=3.0, steps=ledger.steps)
    assert restored.epsilon == ledger.epsilon


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: accounting.epsilon_spent(1.0, 1.5, 10, 1e-5), r"sampling_rate must be a number in \[0, 1\], got 1.5"),
        (lambda: accounting.epsilon_spent(1.0, 0.1, 10, 0.0), r"delta must be a number in \(0, 1\), got 0.0"),
        (lambda: accounting.epsilon_spent(-1.0, 0.1, 10, 1e-5), "noise_multiplier must be a number >= 0, got -1.0"),
        (lambda: accounting.epsilon_spent(1.0, 0.1, 2.5, 1e-5), "steps must be an integer >= 0, got 2.5"),
        (lambda: accounting.PrivacyLedger(1.0, 0.1, 1e-5, budget=-3), "budget must be a number > 0 or None, got -3"),
        (lambda: accounting.site_level_epsilon(1.0, 4, 5, 10, 1e-5), r"cohort_size must be an integer in \[1, num_sites=4\], got 5"),
    ],
)
def test_bad_numbers_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
