"""Algorithms by name, and the errors a user sees for bad names and values."""

import pytest

from nordfl.algorithms import DPSGD, Algorithm, LocalSchedule, algorithm_names, make_algorithm

LOSS = lambda params, batch, mask: 0.0  # noqa: E731 (never called: construction only)


@pytest.mark.parametrize("name", algorithm_names())
def test_every_name_builds(name):
    extra = {"scaffold": {"num_clients": 4}, "fedprox": {"mu": 0.01}, "ditto": {"lam": 0.1}}.get(name, {})
    assert isinstance(make_algorithm(name, LOSS, client_lr=0.1, **extra), Algorithm)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("fedsgd", {"client_lr": 0.1}, "algorithm.name: unknown name 'fedsgd'; expected one of ditto, fedadagrad, fedadam, fedavg"),
        ("fedprox", {"client_lr": 0.1, "mu": -0.5}, "fedprox: mu must be a number >= 0, got -0.5"),
        ("fedavg", {"client_lr": -0.1}, "fedavg: client_lr must be a number > 0, got -0.1"),
        ("fedavg", {"client_lr": 0.1, "num_epochs": 0}, "fedavg: num_epochs must be an integer >= 1, got 0"),
        ("fedavg", {"client_lr": 0.1, "mu": 0.1}, "fedavg: unknown hyperparameter 'mu'; expected one of server_optimizer, weighting"),
        ("scaffold", {"client_lr": 0.1, "num_clients": 0}, "scaffold: num_clients must be an integer >= 1, got 0"),
        ("fedprox", {"client_lr": 0.1, "mu": 0.1, "beta": 1}, "fedprox: unknown hyperparameter 'beta'; expected one of server_optimizer, weighting"),
        ("fedavg", {"client_lr": 0.1, "weighting": "size"}, "fedavg: unknown weighting 'size'; expected one of num_examples, uniform"),
        ("fedadam", {"client_lr": 0.1, "server": {"lr": 0.1}}, "fedadam.server: unknown hyperparameter 'lr'; expected one of learning_rate"),
        ("fedadam", {"client_lr": 0.1, "server": {"name": "fedyogi"}}, "fedadam: server.name must be 'fedadam' or absent"),
    ],
)
def test_bad_input_names_the_field_and_value(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make_algorithm(name, LOSS, **kwargs)


def test_fedopt_errors_name_the_algorithm_and_required_fields_are_named():
    with pytest.raises(ValueError, match="fedadam: client_lr must be a number > 0, got -1"):
        make_algorithm("fedadam", LOSS, client_lr=-1)
    with pytest.raises(ValueError, match="scaffold: missing hyperparameter 'num_clients'"):
        make_algorithm("scaffold", LOSS, client_lr=0.1)
    with pytest.raises(ValueError, match="fedavg: missing hyperparameter 'client_lr'"):
        make_algorithm("fedavg", LOSS)


def test_the_algorithm_carries_its_local_schedule_and_dp_sgd_samples_poisson_batches():
    plain = make_algorithm("fedprox", LOSS, client_lr=0.1, mu=0.01, num_epochs=3, batch_size=8, drop_remainder=True)
    assert plain.local == LocalSchedule(0.1, 3, 8, True, "shuffle", None)
    private = make_algorithm("scaffold", LOSS, client_lr=0.1, num_clients=2, dp={"mode": "sgd", "clip": 0.5, "noise_multiplier": 1.1})
    assert private.local.sampling == "poisson" and private.local.dp == DPSGD(0.5, 1.1)
    # DP-FedAvg wraps the algorithm; the local schedule (what the simulator and accountant read) stays.
    wrapped = make_algorithm("fedavg", LOSS, client_lr=0.1, batch_size=4,
                             dp={"mode": "update", "clip": 1.0, "noise_multiplier": 1.0, "noise": "central", "expected_clients": 3})
    assert wrapped.local == LocalSchedule(0.1, 1, 4)
