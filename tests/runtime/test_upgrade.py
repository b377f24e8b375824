"""Rolling upgrades: a coordinator serves sites one protocol minor version behind, and says who must upgrade."""

import json

import pytest

from nordfl.runtime import wire
from nordfl.runtime.coordinator import coordinator_for
from nordfl.runtime.proto import federation_pb2 as pb

from .helpers import SITES, provisioned


def _minor(version, step):
    major, minor = version.rsplit("v", 1)[1].split(".")
    return f"nordfl.runtime.v{major}.{int(minor) + step}"


def test_the_accepted_range_is_the_current_minor_and_the_one_before():
    assert wire.OLDEST_SITE_PROTOCOL == _minor(wire.PROTOCOL_VERSION, -1)
    assert wire.protocol_refusal(wire.PROTOCOL_VERSION) is None
    assert wire.protocol_refusal(wire.OLDEST_SITE_PROTOCOL) is None
    assert "upgrade NordFL at this site" in wire.protocol_refusal(_minor(wire.PROTOCOL_VERSION, -2))
    assert "upgrade the coordinator first" in wire.protocol_refusal(_minor(wire.PROTOCOL_VERSION, 1))
    assert "not a NordFL runtime protocol" in wire.protocol_refusal("grpc/1.0")
    assert wire.protocol_refusal("nordfl.runtime.v0.9") is not None  # another major version


def test_join_names_the_site_that_must_upgrade(tmp_path):
    federation, _ = provisioned(tmp_path)
    coordinator = coordinator_for(["runtime.rounds=1"], federation, tmp_path / "state", log=lambda m: None)
    behind, too_old = _minor(wire.PROTOCOL_VERSION, -1), _minor(wire.PROTOCOL_VERSION, -2)
    assert coordinator.join(SITES[0], pb.JoinRequest(site=SITES[0], protocol_version=behind, rows=50)).accepted
    reply = coordinator.join(SITES[1], pb.JoinRequest(site=SITES[1], protocol_version=too_old, rows=50))
    assert not reply.accepted
    assert f"site {SITES[1]}" in reply.reason and "upgrade NordFL at this site" in reply.reason and too_old in reply.reason


@pytest.mark.parametrize("rows, ok", [(120.0, True), (None, True), (-1.0, False), (2.5, False)])
def test_a_final_report_with_or_without_test_rows(tmp_path, rows, ok):
    """Protocol v1.5 sites report their test rows with their final scores; a v1.4 site's report has none."""
    federation, _ = provisioned(tmp_path)
    coordinator = coordinator_for(["runtime.rounds=1"], federation, tmp_path / "state", log=lambda m: None)
    coordinator.round = 1  # the run is over: what comes now is a site's final report
    metrics = {"accuracy": 0.75} | ({} if rows is None else {"test_rows": rows})
    header = pb.UpdateHeader(run_id=coordinator.run_id, round=1, site=SITES[0], weight=0.0,
                             manifest=wire.manifest_to_proto([], b""), metrics=metrics)
    reply = coordinator.submit(SITES[0], iter([pb.UpdateChunk(header=header)]))
    assert reply.accepted == ok, reply.reason
    if ok:
        assert coordinator.final_metrics[SITES[0]] == {"accuracy": 0.75}
        entry = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()][-1]
        assert entry["event"] == "final_metrics" and entry.get("test_rows") == (None if rows is None else int(rows))
    else:
        assert "test_rows" in reply.reason
