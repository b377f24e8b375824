"""Differential privacy in the simulator: over-budget runs refuse to start, epsilon per round is
dp-accounting's for the steps each site ran, and a run stops checkpointed at the budget."""

import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from hydra import compose, initialize_config_module
from rich.console import Console

from nordfl.sim.app import run
from nordfl.sim.config import ConfigError, build, register

register()

DP_SGD = ["algorithm.dp.mode=sgd", "algorithm.dp.clip=1.0", "sim.eval_every=1", "logger.progress=false"]


def _compose(*overrides):
    with initialize_config_module("nordfl.conf", version_base=None):
        return compose("config", overrides=list(overrides))


def _inclusion_probability(batch_size, n):
    """P(u < float32(B / n)) for float32 uniforms u, multiples of 2^-23: the rate the loop implements."""
    if n <= batch_size:
        return 1.0
    return math.ceil(float(np.float32(batch_size) / np.float32(n)) * 2**23) / 2**23


def _direct_epsilon(cfg, task, rounds, z):
    """Max over the 4 hospitals (all in every round) of the RDP epsilon of their Poisson-sampled steps."""
    a = cfg.algorithm
    worst = 0.0
    for client in task.data.clients:
        n = len(client.train.y)
        steps = rounds * a.num_epochs * -(-n // a.batch_size)
        accountant = rdp.RdpAccountant()
        event = dp_accounting.PoissonSampledDpEvent(_inclusion_probability(a.batch_size, n), dp_accounting.GaussianDpEvent(z))
        accountant.compose(event, steps)
        worst = max(worst, accountant.get_epsilon(a.dp.delta))
    return worst


def test_a_run_whose_planned_epsilon_exceeds_the_budget_refuses_to_start():
    cfg = _compose(*DP_SGD, "algorithm.dp.noise_multiplier=1.0", "algorithm.dp.epsilon_budget=2", "sim.rounds=30")
    with pytest.raises(ConfigError, match=r"algorithm.dp.epsilon_budget: is below the planned epsilon [0-9.]+ of 30 rounds.*got 2.0"):
        build(cfg)


def test_a_null_noise_multiplier_is_calibrated_to_spend_the_budget():
    cfg = _compose(*DP_SGD, "algorithm.dp.epsilon_budget=4", "sim.rounds=5")
    experiment = build(cfg)
    z = cfg.algorithm.dp.noise_multiplier
    assert experiment.privacy.spec.noise_multiplier == z > 0
    planned = _direct_epsilon(cfg, experiment.task, 5, z)
    assert experiment.privacy.epsilon(5) == pytest.approx(planned, rel=1e-12)
    assert 0.99 * 4 <= planned <= 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.dp.mode=laplace"], "algorithm.dp.mode: must be one of none, sgd, update, got 'laplace'"),
        (["algorithm.dp.mode=sgd", "algorithm.dp.clip=0", "algorithm.dp.noise_multiplier=1"], "algorithm.dp.clip: must be > 0"),
        (["algorithm.dp.mode=sgd", "algorithm.dp.delta=1.5", "algorithm.dp.noise_multiplier=1"], r"algorithm.dp.delta: must be in \(0, 1\)"),
        (["algorithm.dp.mode=sgd"], "algorithm.dp.noise_multiplier: needs a value, or algorithm.dp.epsilon_budget"),
        (["algorithm.dp.mode=update", "algorithm.dp.noise=local", "algorithm.dp.noise_multiplier=1"],
         "algorithm.dp.noise: must be one of central, distributed, got 'local'"),
        (["algorithm.dp.mode=update", "algorithm.dp.noise_multiplier=1", "algorithm.aggregator.name=median"],
         r"algorithm.aggregator.name: must be a linear aggregator \(weighted_mean\) with algorithm.dp.mode=update"),
        (["algorithm.dp.mode=update", "algorithm.dp.noise=distributed", "algorithm.dp.noise_multiplier=1", "sim.dropout_fraction=0.3"],
         "algorithm.dp.noise: cannot be distributed with dropped sites"),
    ],
)
def test_bad_dp_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(_compose(*overrides))


@pytest.mark.slow  # two short runs of the heart task (~15 s)
def test_epsilon_per_round_is_dp_accountings_and_the_run_stops_checkpointed_at_the_budget(tmp_path):
    z = 2.0
    common = [*DP_SGD, f"algorithm.dp.noise_multiplier={z}", "sim.rounds=6", "sim.checkpoint_every=100"]
    probe = _compose(*common)
    task = build(probe).task
    after = [_direct_epsilon(probe, task, r, z) for r in (1, 2, 3)]
    budget = (after[1] + after[2]) / 2  # room for two rounds, not three
    overrides = [*common, f"algorithm.dp.epsilon_budget={budget}", "algorithm.dp.stop_at_budget=true"]
    console = Console(file=open(tmp_path / "console.txt", "w"))
    result = run(_compose(*overrides), tmp_path, console)
    assert result.stopped_at_budget and result.rounds == 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    np.testing.assert_allclose([r["epsilon"] for r in rows], after[:2], rtol=1e-12)
    summary = json.loads((tmp_path / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["stopped_at_budget"] and privacy["rounds_done"] == 2 and privacy["sampling"] == "poisson"
    assert privacy["epsilon"] == pytest.approx(after[1], rel=1e-12) and privacy["epsilon"] <= budget
    assert set(privacy["epsilon_per_site"]) == {"Cleveland", "Hungary", "Switzerland", "VA Long Beach"}
    with np.load(tmp_path / "checkpoint" / "checkpoint.npz") as archive:
        assert json.loads(str(archive["__meta__"]))["round"] == 2  # nothing done is lost
    # Resuming cannot spend more: it stops again at once, the work of rounds 1-2 intact.
    again = run(_compose(*overrides, "resume=true"), tmp_path, console)
    assert again.stopped_at_budget and again.rounds == 2
    assert [json.loads(line)["round"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow  # one short run (~8 s)
def test_dp_fedavg_run_reports_site_level_epsilon(tmp_path):
    z = 1.5
    overrides = ["algorithm.dp.mode=update", "algorithm.dp.clip=0.5", f"algorithm.dp.noise_multiplier={z}",
                 "algorithm.dp.noise=distributed", "sim.rounds=2", "sim.eval_every=1", "logger.progress=false"]
    result = run(_compose(*overrides), tmp_path, Console(file=open(tmp_path / "console.txt", "w")))
    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(4, 4, dp_accounting.GaussianDpEvent(z / 2)), 2)
    assert result.epsilon == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    privacy = json.loads((tmp_path / "summary.json").read_text())["privacy"]
    assert privacy["unit"].startswith("one site") and privacy["noise"] == "distributed"
    assert np.isfinite(result.evaluation.pooled.accuracy)
