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
