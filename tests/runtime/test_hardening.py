"""Issue 15's red-team findings, one test each: a revoked or idle stream cannot stall the coordinator, sizes come
from the job, what a peer sends is bounded in the logs, audit first, weights a site cannot inflate, and a site
notices a frozen coordinator. (Site data checks: test_site_data.py; audit heads and signatures: test_audit.py.)"""

from __future__ import annotations

import json
import threading
import time
from concurrent import futures

import grpc
import jax
import numpy as np
import pytest

from nordfl.runtime import site as site_module
from nordfl.runtime import tls, wire
from nordfl.runtime.audit import AuditError
from nordfl.runtime.bounds import RejectionLimiter, StreamGate, bounded_text
from nordfl.runtime.coordinator import coordinator_for
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc

from .helpers import SITES, provisioned, site_agent, start_coordinator, wait_until

pytestmark = pytest.mark.timeout(300)


def _entries(state_dir):
    return [json.loads(line) for line in (state_dir / "audit.jsonl").read_text().splitlines()]


def _chunks(coordinator, site, update, *, weight=10.0, metrics=None, round_index=0, extra=b""):
    specs, payload = wire.encode(update)
    header = pb.UpdateHeader(run_id=coordinator.run_id, round=round_index, site=site, weight=weight,
                             manifest=wire.manifest_to_proto(specs, payload), metrics=metrics or {"train_loss": 0.5})
    return [pb.UpdateChunk(header=header), pb.UpdateChunk(data=payload + extra)]


def _filled(coordinator, value):
    return jax.tree_util.tree_map(lambda s: np.full(s.shape, value, s.dtype), coordinator.update_template)


@pytest.fixture
def hub(tmp_path):
    """An in-process coordinator over the provisioned federation (no gRPC), every site joined with 200 rows."""
    federation, _ = provisioned(tmp_path)
    coordinator = coordinator_for(["runtime.rounds=2", "runtime.min_cohort=2"], federation, tmp_path / "state", log=lambda m: None)
    for name in SITES:
        assert coordinator.join(name, pb.JoinRequest(site=name, protocol_version=wire.PROTOCOL_VERSION, rows=200)).accepted
    return coordinator, tmp_path / "state", federation


def test_the_size_comes_from_the_job_not_the_announcement(hub):
    """Failure 2: a header announcing 1.6 GB was buffered; now it is refused before a data chunk is read."""
    coordinator, _, _ = hub
    chunks = _chunks(coordinator, "Cleveland", _filled(coordinator, 0.0))
    chunks[0].header.manifest.total_bytes = 800_000_000
    read = []

    def stream():
        yield chunks[0]
        for _ in range(10):
            read.append(1)
            yield pb.UpdateChunk(data=b"\0" * (1 << 20))

    reply = coordinator.submit("Cleveland", stream())
    expected = sum(s.nbytes for s in wire.template_of(coordinator.update_template))
    assert not reply.accepted and f"the job's tensors are {expected} bytes" in reply.reason
    assert read == []  # not one data chunk was pulled
    # A stream that announces the right size but sends more is cut at the first byte past it.
    reply = coordinator.submit("Cleveland", iter(_chunks(coordinator, "Hungary", _filled(coordinator, 0.0), extra=b"x")))
    assert not reply.accepted


def test_a_secure_aggregation_message_is_bounded_by_the_job_too(tmp_path):
    """A member of a securely aggregated round announcing 800 MB is refused before a data chunk is read;
    the bound (the masked vector and a share per site) comes from the job."""
    federation, _ = provisioned(tmp_path)
    coordinator = coordinator_for(["runtime.rounds=1", "runtime.min_cohort=2", "runtime.secure_aggregation=true"], federation,
                                  tmp_path / "state", log=lambda m: None)
    for name in SITES:
        assert coordinator.join(name, pb.JoinRequest(site=name, protocol_version=wire.PROTOCOL_VERSION, rows=200)).accepted
    assert coordinator.secure is not None  # the first round is open, securely aggregated
    head = pb.UpdateHeader(run_id=coordinator.run_id, round=coordinator.open.index, attempt=coordinator.open.attempt,
                           site="Cleveland", secagg_step=pb.ADVERTISE, manifest=wire.manifest_to_proto([], b""))
    head.manifest.total_bytes = 800_000_000
    read = []

    def stream():
        yield pb.UpdateChunk(header=head)
        for _ in range(10):
            read.append(1)
            yield pb.UpdateChunk(data=b"\0" * (1 << 20))

    reply = coordinator.submit("Cleveland", stream())
    values = sum(int(np.prod(s.shape)) for s in wire.template_of(coordinator.update_template)) + 3
    assert not reply.accepted and "announces 800000000 bytes" in reply.reason
    assert f"at most {8 * values + 4096 * len(SITES) + 65536} bytes" in reply.reason
    assert read == []


def test_peer_text_is_capped_and_repeated_refusals_are_summarised(hub):
    """Failure 3: a 3.9 MB site name went verbatim into the audit log; 2,000 Joins wrote 2,000 entries."""
    coordinator, state, federation = hub
    tls.revoke(federation, "Hungary")
    before = (state / "audit.jsonl").stat().st_size
    huge = "\x1b[2J" + "A" * 3_900_000
    for _ in range(50):
        reply = coordinator.join("Hungary", pb.JoinRequest(site=huge, protocol_version=huge))
        assert not reply.accepted
    replies = [coordinator.join("Cleveland", pb.JoinRequest(site="Cleveland", protocol_version=wire.PROTOCOL_VERSION,
                                                            rows=200)) for _ in range(2000)]
    assert sum(r.accepted for r in replies) == 30 - 1  # the fixture's Join was the first of the minute's 30
    assert "more than 30 Joins from Cleveland in a minute" in replies[-1].reason
    coordinator.rejections.flush()
    grown = (state / "audit.jsonl").stat().st_size - before
    new = _entries(state)[-80:]
    refused = [e for e in new if e["event"] == "join_refused" and e["site"] == "Hungary"]
    joins = [e for e in _entries(state) if e["event"] == "join" and e["site"] == "Cleveland"]
    summaries = [e for e in new if e["event"] == "rejections_suppressed"]
    assert grown < 60_000, grown  # 2,050 calls, 4 MB names: the log grew by a few entries of bounded size
    assert len(refused) == 20 and len(joins) <= 21
    assert len([e for e in _entries(state) if e["event"] == "join_refused" and e["site"] == "Cleveland"]) <= 20
    assert {(s["kind"], s["site"], s["count"]) for s in summaries} >= {("join_refused", "Hungary", 30),
                                                                       ("join_refused", "Cleveland", 2000 - 29 - 20)}
    assert all(len(json.dumps(e)) < 3000 for e in refused)
    assert "\x1b" not in (state / "audit.jsonl").read_text()  # control characters are escaped


def test_bounded_text_and_the_limiter_window():
    assert bounded_text("ab\ncd") == "ab\\ncd"
    assert bounded_text("x" * 1000, 10) == "x" * 10 + "...[990 more characters]"
    clock = [0.0]
    summaries = []
    limiter = RejectionLimiter(lambda *a: summaries.append(a), burst=3, window=10.0, clock=lambda: clock[0])
    assert [limiter.allow("k", "s") for _ in range(5)] == [True, True, True, False, False]
    clock[0] = 10.0
    assert limiter.allow("k", "s") and summaries == [("k", "s", 2)]
    gate = StreamGate(per_site=2, total=3)
    assert gate.enter("a") is None and gate.enter("a") is None and "limit 2" in gate.enter("a")
    assert gate.enter("b") is None and "its limit" in gate.enter("c")
    gate.leave("a")
    assert gate.enter("c") is None


def test_non_finite_metrics_are_refused_and_an_update_counts_only_once_audited(hub, monkeypatch):
    """Failure 4: an update with NaN metrics was aggregated without an update_accepted entry."""
    coordinator, state, _ = hub
    reply = coordinator.submit("Cleveland", iter(_chunks(coordinator, "Cleveland", _filled(coordinator, 0.01),
                                                         metrics={"train_loss": float("nan")})))
    assert not reply.accepted and "must be finite" in reply.reason and "Cleveland" not in coordinator.updates
    assert any(e["event"] == "update_rejected" and "must be finite" in e["reason"] for e in _entries(state))

    record = coordinator.audit.record

    def failing(event, **fields):
        if event == "update_accepted":
            raise AuditError("disk full")
        return record(event, **fields)

    monkeypatch.setattr(coordinator.audit, "record", failing)
    reply = coordinator.submit("Hungary", iter(_chunks(coordinator, "Hungary", _filled(coordinator, 0.01))))
    assert not reply.accepted and "could not write this update's audit entry" in reply.reason
    assert "Hungary" not in coordinator.updates
    monkeypatch.undo()
    reply = coordinator.submit("Switzerland", iter(_chunks(coordinator, "Switzerland", _filled(coordinator, 0.01))))
    accepted = [e for e in _entries(state) if e["event"] == "update_accepted"]
    assert reply.accepted and reply.audit_head == accepted[-1]["hash"] and accepted[-1]["site"] == "Switzerland"


def test_a_site_cannot_inflate_its_weight_or_drag_the_model(hub):
    """Failure 5: norm 9.9e5 with weight 1e7 was accepted and wrecked the model."""
    coordinator, state, _ = hub
    reply = coordinator.submit("Cleveland", iter(_chunks(coordinator, "Cleveland", _filled(coordinator, 0.01), weight=1e7)))
    assert not reply.accepted and "the 200 rows Cleveland declared at Join" in reply.reason
    coordinator.refused.clear()

    rng = np.random.default_rng(0)
    sent = {}
    for name in SITES:
        update = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.01, s.shape).astype(s.dtype), coordinator.update_template)
        if name == "VA_Long_Beach":  # the attacker: just under max_update_norm, at the most weight it may claim
            norm = wire.global_norm(update)
            update = jax.tree_util.tree_map(lambda a: (a * (9.9e5 / norm)).astype(a.dtype), update)
        weight = 200.0 if name == "VA_Long_Beach" else 100.0 + 10 * len(sent)
        sent[name] = (update, weight)
        assert coordinator.submit(name, iter(_chunks(coordinator, name, update, weight=weight))).accepted
    assert coordinator.round == 1
    # The reference: each update clipped to 10 x the median norm, then the weighted mean, in plain NumPy.
    norms = {n: np.sqrt(sum(float(np.sum(np.square(leaf.astype(np.float64)))) for leaf in jax.tree_util.tree_leaves(u)))
             for n, (u, _) in sent.items()}
    limit = 10 * np.median(list(norms.values()))
    total = sum(w for _, w in sent.values())
    flat = {n: np.concatenate([leaf.ravel().astype(np.float64) for leaf in jax.tree_util.tree_leaves(u)]) for n, (u, _) in sent.items()}
    mean = sum(sent[n][1] * flat[n] * min(1.0, limit / norms[n]) for n in sent) / total
    closed = [e for e in _entries(state) if e["event"] == "round_closed"][-1]
    clipped = [e for e in _entries(state) if e["event"] == "update_clipped"]
    assert [e["site"] for e in clipped] == ["VA_Long_Beach"] and clipped[0]["clipped_to"] == pytest.approx(limit, rel=1e-6)
    assert closed["update_norm"] == pytest.approx(np.linalg.norm(mean), rel=1e-4)
    assert closed["update_norm"] < limit  # the aggregate moved no further than 10 x a typical site's update


def test_revoked_and_idle_upload_streams_cannot_stall_the_coordinator(tmp_path):
    """Failure 1: 30 SubmitUpdate streams that never sent a message made a legitimate Join time out."""
    federation, _ = provisioned(tmp_path)
    tls.revoke(federation, "Hungary")
    coordinator, server, port = start_coordinator(tmp_path, federation, ["runtime.upload_timeout=3", "runtime.min_cohort=2"])
    release = threading.Event()

    def silent():
        release.wait(60)
        yield from ()

    def stub(name):
        channel = grpc.secure_channel(f"localhost:{port}", tls.channel_credentials(federation / "sites" / name))
        return channel, pb_grpc.FederationStub(channel)

    try:
        revoked_channel, revoked = stub("Hungary")
        calls = [revoked.SubmitUpdate.future(silent(), timeout=30) for _ in range(30)]
        codes = [c.exception().code() for c in calls]
        # The revoked key fails the TLS handshake itself: it never holds a connection (the coordinator trusts the
        # members' own pinned certificates). A connection opened before a revocation is refused per call (test_tls).
        assert set(codes) == {grpc.StatusCode.UNAVAILABLE}

        idle_channel, idle = stub("Cleveland")
        started = time.monotonic()
        held = [idle.SubmitUpdate.future(silent(), timeout=30) for _ in range(30)]
        _, legit = stub("Switzerland")
        reply = legit.Join(pb.JoinRequest(site="Switzerland", protocol_version=wire.PROTOCOL_VERSION, rows=10), timeout=5)
        assert reply.accepted
        outcomes = [c.exception().code() if c.exception() else "reply" for c in held]
        exhausted = outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert exhausted >= 28  # two uploads per site at once
        assert time.monotonic() - started < 20  # the two held streams were cut at upload_timeout
        # The client sees its stream cut before the coordinator's handler has written why; on a loaded machine that
        # entry can lag by seconds.
        def reasons():
            return " | ".join(e.get("reason", "") for e in _entries(tmp_path / "coordinator"))

        wait_until(lambda: "runtime.upload_timeout=3" in reasons(), timeout=30)
        reasons = reasons()
        assert "runtime.upload_timeout=3" in reasons and "Hungary" not in reasons  # never got as far as a call
        revoked_channel.close()
        idle_channel.close()
    finally:
        release.set()
        server.stop(0)


class _Frozen(pb_grpc.FederationServicer):
    """A coordinator that accepts connections and never answers."""

    def Join(self, request, context):
        time.sleep(30)


def test_a_site_notices_a_frozen_coordinator_and_retries(tmp_path, monkeypatch):
    """Failure 7: with the coordinator frozen for 45 s, sites logged nothing (no RPC deadlines)."""
    monkeypatch.setattr(site_module, "RPC_TIMEOUT", 1.0)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_FederationServicer_to_server(_Frozen(), server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    federation, files = provisioned(tmp_path)
    lines = []
    agent = site_agent(tmp_path, federation, files, "Cleveland", port, max_backoff=0.5)
    agent.credentials, agent.log = None, lines.append
    threading.Thread(target=agent.run, daemon=True).start()
    try:
        end = time.monotonic() + 20
        while time.monotonic() < end and sum("DEADLINE_EXCEEDED" in line for line in lines) < 2:
            time.sleep(0.1)
        assert sum("DEADLINE_EXCEEDED" in line for line in lines) >= 2, lines  # noticed, and retried
        assert "coordinator unreachable" in lines[0]
    finally:
        server.stop(0)
