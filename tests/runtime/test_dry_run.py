"""``nordfl site --dry-run``: one local round, shown to the DPO; nothing is sent (no coordinator exists at all)."""

import json
import re

import grpc
import pytest

from nordfl.runtime import cli
from nordfl.runtime.site_data import write_site_files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_site_files(tmp_path_factory.mktemp("data"))["Cleveland"]


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run opened a gRPC channel")

    monkeypatch.setattr(grpc, "insecure_channel", refuse)
    monkeypatch.setattr(grpc, "secure_channel", refuse)


def test_dry_run_shows_the_update_and_sends_nothing(tmp_path, data, capsys, no_network):
    code = cli.main(["site", "--dry-run", "--name", "Cleveland", "--data", str(data), "--state", str(tmp_path / "s"),
                     "algorithm=scaffold"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "NOTHING was sent" in out
    for name, shape in [("delta/linear/bias", "[2]"), ("delta/linear/kernel", "[13, 2]"),
                        ("control_delta/linear/bias", "[2]"), ("control_delta/linear/kernel", "[13, 2]")]:
        assert re.search(rf"{re.escape(name)}\s+float32{re.escape(shape)}\s+L2 norm \d", out), name
    assert "224 bytes" in out and "weight 1" in out and "epsilon unbounded" in out
    entry = [json.loads(line) for line in (tmp_path / "s" / "audit.jsonl").read_text().splitlines()][-1]
    assert entry["event"] == "dry_run" and [t[0] for t in entry["tensors"]][:2] == ["delta/linear/bias", "delta/linear/kernel"]
    assert all(t[3] > 0 for t in entry["tensors"])  # the norms


def test_dry_run_applies_the_site_policy(tmp_path, data, capsys, no_network):
    (tmp_path / "policy.yaml").write_text("min_cohort: 5\n")
    code = cli.main(["site", "--dry-run", "--name", "Cleveland", "--data", str(data), "--policy", str(tmp_path / "policy.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert "site policy rule min_cohort: the job's value is runtime.min_cohort=3, the policy's limit is at least 5" in err


def test_dry_run_shows_the_epsilon_one_round_would_spend(tmp_path, data, capsys, no_network):
    from nordfl.algorithms import accounting

    code = cli.main(["site", "--dry-run", "--name", "Cleveland", "--data", str(data), "runtime.secure_aggregation=true",
                     "algorithm.dp.mode=sgd", "algorithm.dp.noise_multiplier=1.5", "algorithm.num_epochs=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    steps = 13  # ceil(199 training rows / 16) DP-SGD steps in one epoch
    epsilon = accounting.epsilon_spent(1.5, 16 / 199, steps, 1e-5)
    assert f"differential privacy: dp_sgd, this round would spend epsilon {epsilon:.4g} at delta 1e-05 ({steps} step(s))" in out
    assert "secure aggregation is on" in out and "train_loss" not in out  # under DP the loss is not sent
