"""Bad configs fail before training, naming the key, the value and what is allowed."""

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from nordfl.sim.config import ConfigError, build, register

register()


def _compose(*overrides):
    with initialize_config_module("nordfl.conf", version_base=None):
        return compose("config", overrides=list(overrides))


def test_default_config_is_fedavg_on_the_four_hospitals():
    experiment = build(_compose())
    assert [c.name for c in experiment.task.data.clients] == ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]
    assert experiment.options.cohort_size is None and experiment.algorithm.local.num_epochs == 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.client_lr=-0.1"], "algorithm: fedavg: client_lr must be a number > 0, got -0.1"),
        (["algorithm=fedprox", "algorithm.mu=-1"], "algorithm: fedprox: mu must be a number >= 0, got -1.0"),
        (["algorithm.name=fedsgd"], "algorithm.name: unknown name 'fedsgd'; expected one of"),
        (["sim.cohort_size=10"], r"sim.cohort_size: must be in \[1, 4\] \(the number of clients\) or null for all, got 10"),
        (["sim.straggler_fraction=1.5"], r"sim.straggler_fraction: must be in \[0, 1\), got 1.5"),
        (["sim.stragglers=ignore"], "sim.stragglers: must be keep or drop, got 'ignore'"),
        (["algorithm.num_epochs=1", "sim.straggler_fraction=0.5"], "needs algorithm.num_epochs >= 2"),
        (["partition=dirichlet", "partition.num_clients=0"], "partition.num_clients: must be an integer >= 1"),
        (["algorithm.aggregator.name=trimmed_mean", "algorithm.aggregator.beta=0.7"], "trimmed_mean: beta must be < 0.5"),
        (["task.name=mnist"], "task.name: unknown name 'mnist'"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(_compose(*overrides))


def test_every_algorithm_and_partition_group_composes_and_builds():
    for algorithm in ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert build(_compose(f"algorithm={algorithm}")).algorithm is not None
    for partition in ("iid", "dirichlet", "k_classes", "quantity_skew", "feature_shift"):
        experiment = build(_compose("task=synthetic", f"partition={partition}", "partition.num_clients=20"))
        assert len(experiment.task.data.clients) == 20


def test_cli_config_error_exits_2_with_the_message(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.app", "sim.cohort_size=99", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "config error" in out.stderr and "sim.cohort_size" in out.stderr and "got 99" in out.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before training


def test_unknown_group_option_lists_the_choices(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "nordfl.sim.app", "algorithm=fedsgd", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert out.returncode != 0
    assert "fedsgd" in out.stderr and "fedprox" in out.stderr and "scaffold" in out.stderr


def test_each_option_has_only_its_own_keys():
    # Per-option schemas: fedprox has mu, fedavg does not; synthetic has alpha, heart does not.
    assert _compose("algorithm=fedprox").algorithm.mu == 0.01
    assert "mu" not in _compose("algorithm=fedavg").algorithm
    assert "alpha" not in _compose("task=heart").task and _compose("task=synthetic").task.alpha == 1.0
    for overrides, detail in ((("algorithm=fedavg", "algorithm.mu=0.1"), "Key 'mu' not in 'AlgorithmConfig'"),
                              (("partition=iid", "partition.k=3"), "Key 'k' not in 'IIDConfig'")):
        with pytest.raises(Exception, match=f"Could not override '{overrides[1].split('=')[0]}'") as info:
            _compose(*overrides)
        assert detail in str(info.value.__cause__)  # what Hydra prints under its message
    # Appended past Hydra's check, the key still fails before training, naming the key and the option.
    with pytest.raises(ConfigError, match=r"algorithm.mu: is not a key of algorithm=fedavg \(AlgorithmConfig\); expected one of name, client_lr"):
        build(_compose("algorithm=fedavg", "+algorithm.mu=0.1"))
    with pytest.raises(ConfigError, match=r"task.alpha: is not a key of task=heart \(TaskConfig\)"):
        build(_compose("+task.alpha=2"))
