"""The minimum-cohort guard: no aggregate of fewer than runtime.min_cohort sites is ever applied."""

import json

import jax
import numpy as np
import pytest

from nordfl.conf.schema import ConfigError
from nordfl.runtime import tls, wire
from nordfl.runtime.coordinator import coordinator_for
from nordfl.runtime.proto import federation_pb2 as pb

SITES = ("Cleveland", "Hungary", "Switzerland", "VA_Long_Beach")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    return tls.provision(tmp_path_factory.mktemp("fed") / "federation", SITES)


def _submit(coordinator, site, round_index=0):
    coordinator.join(site, pb.JoinRequest(site=site, protocol_version=wire.PROTOCOL_VERSION, rows=100))  # declares its rows
    zeros = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.01, s.dtype), coordinator.update_template)
    specs, payload = wire.encode(zeros)
    header = pb.UpdateHeader(run_id=coordinator.run_id, round=round_index, site=site, weight=10.0,
                             manifest=wire.manifest_to_proto(specs, payload), metrics={"train_loss": 0.5})
    return coordinator.submit(site, iter([pb.UpdateChunk(header=header), pb.UpdateChunk(data=payload)]))


def _audit(path):
    return [json.loads(line) for line in (path / "audit.jsonl").read_text().splitlines()]


def test_an_aggregate_below_min_cohort_is_retried_then_the_run_stops(tmp_path, federation):
    """Two of four sites answer (min_sites=2 is met) but min_cohort=3 is not: the round is retried, never closed."""
    coordinator = coordinator_for(["runtime.rounds=2", "runtime.min_sites=2", "runtime.min_cohort=3",
                                   "runtime.round_timeout=0.01", "runtime.max_round_attempts=2"],
                                  federation, tmp_path / "c", log=lambda m: None)
    before = jax.tree_util.tree_map(np.asarray, coordinator.server)
    for attempt in (1, 2):
        assert coordinator.open.attempt == attempt
        assert _submit(coordinator, "Cleveland").accepted and _submit(coordinator, "Hungary").accepted
        coordinator.deadline = 0  # the round's timeout has passed
        coordinator.tick()
    assert coordinator.round == 0 and coordinator.open is None
    assert coordinator.stopped.startswith("round 0: refused an aggregate of 2 site(s): runtime.min_cohort=3 in 2 attempts")
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.tree_util.tree_map(np.asarray, coordinator.server))
    events = _audit(tmp_path / "c")
    refused = [e for e in events if e["event"] == "round_refused_min_cohort"]
    assert [(e["attempt"], e["sites"], e["min_cohort"]) for e in refused] == [(1, 2, 3), (2, 2, 3)]
    assert refused[0]["contributors"] == ["Cleveland", "Hungary"]
    assert "round_closed" not in {e["event"] for e in events} and events[-1]["event"] == "stopped"


def test_a_cohort_shrunk_by_revocation_is_refused_even_when_all_answered(tmp_path, federation):
    import shutil

    fed = tmp_path / "federation"
    shutil.copytree(federation, fed)
    tls.revoke(fed, "Switzerland")
    tls.revoke(fed, "VA_Long_Beach")
    coordinator = coordinator_for(["runtime.rounds=1", "runtime.max_round_attempts=3"], fed, tmp_path / "c", log=lambda m: None)
    assert coordinator.open.cohort == ("Cleveland", "Hungary")
    _submit(coordinator, "Cleveland")
    _submit(coordinator, "Hungary")  # every cohort site answered: the round would close, but 2 < 3 (the default)
    assert coordinator.round == 0 and coordinator.open.attempt == 2
    retry = [e for e in _audit(tmp_path / "c") if e["event"] == "round_retry"]
    assert retry and "runtime.min_cohort=3" in retry[0]["reason"]


def test_enough_sites_close_the_round(tmp_path, federation):
    coordinator = coordinator_for(["runtime.rounds=1", "runtime.min_cohort=3", "runtime.round_timeout=0.01"],
                                  federation, tmp_path / "c", log=lambda m: None)
    for site in SITES[:3]:
        _submit(coordinator, site)
    coordinator.deadline = 0
    coordinator.tick()
    assert coordinator.round == 1


@pytest.mark.parametrize("overrides, expected", [
    (["runtime.min_cohort=5"], "runtime.min_cohort: must be in [1, 4] (the federation's sites)"),
    (["runtime.min_cohort=0"], "runtime.min_cohort: must be in [1, 4]"),
    (["runtime.cohort_size=2"], "runtime.cohort_size: must be in [max(runtime.min_sites, runtime.min_cohort) = 3, 4]"),
    (["runtime.secure_aggregation=true", "runtime.secagg_threshold=5"], "runtime.secagg_threshold: secure aggregation needs threshold <= cohort: threshold in [max(runtime.min_cohort, runtime.min_sites, a majority of the 4 sites) = 3, cohort 4]"),
    (["runtime.secagg_threshold=3"], "runtime.secagg_threshold: is only used with runtime.secure_aggregation=true"),
    (["runtime.secure_aggregation=true", "algorithm.aggregator.name=median"], "algorithm.aggregator.name: must be a linear aggregator (weighted_mean)"),
])
def test_bad_privacy_settings_fail_before_anything_starts(tmp_path, federation, overrides, expected):
    with pytest.raises(ConfigError) as info:
        coordinator_for(overrides, federation, tmp_path / "c")
    assert expected in str(info.value) and "got" in str(info.value)
    assert not (tmp_path / "c").exists()  # nothing written
