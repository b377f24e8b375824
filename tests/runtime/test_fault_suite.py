"""Fault suite: real `nordfl` processes, the five country sites of the nordic5 study each in its own network namespace.

The coordinator runs in a hub namespace on its loopback; each site's namespace is joined to the hub's bridge
by a veth pair and reaches the coordinator through its own :class:`tests.faultnet.FaultProxy` (in the hub),
which injects the faults. Scenarios: (a) 80 ms one-way latency and "1% loss" (1% of chunks stalled 200 ms)
on every link; (b) one site's link capped at 10 Mbit/s by the kernel's tbf; (c) one site partitioned for
PARTITION_S seconds, then healed; (d) hostile members, a frozen coordinator and a killed site. Each checks that every round closed exactly once, that no rejected update
was accepted, and that every audit log verifies (signatures, and each site's log against the coordinator's);
and that the coordinator's peak memory stayed under PEAK_RSS_LIMIT_MIB; a results row (rounds, rejected updates,
time per round, coordinator peak RSS) goes to results.md.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from nordfl.runtime import tls
from nordfl.tasks.catalogue import locate
from tests.faultnet import HUB_ADDRESS, FaultProxy, Topology, netns_unavailable_reason

SITES = ("Aarhus", "Oslo", "Tartu", "Turku", "Uppsala")  # Denmark, Norway, Estonia, Finland, Sweden
ROUNDS = 3
ROUND_TIMEOUT = 8.0
PARTITION_S = 60.0
# Rounds of the partition scenario: about PARTITION_S / ROUND_TIMEOUT rounds close without the victim, then
# it may wait up to its 30 s backoff before it calls again: the run must still be going when it does.
PARTITION_ROUNDS = 16
FREEZE_S = 5.0
PEAK_RSS_LIMIT_MIB = 1024  # the coordinator's peak resident set (about 400 MiB here; a 1 GB announcement buffered would pass it)
SLOW_LINK = 200  # bytes a second: the killed site's link, so that its upload is in flight for seconds
ROOT = Path(__file__).resolve().parents[2]  # so the hostile member runs as ``python -m tests.runtime.hostile``
COORDINATOR_PORT = 50051  # inside the hub namespace, which is fresh: nothing else listens there
PROXY_PORT = 6000  # site i's proxy listens on HUB_ADDRESS:PROXY_PORT+i
CLI = [sys.executable, "-m", "nordfl.runtime.cli"]
OVERRIDES = [f"runtime.rounds={ROUNDS}", f"runtime.round_timeout={ROUND_TIMEOUT}", "runtime.min_cohort=2",
             "runtime.min_sites=2"]

HEADER = ("| scenario | rounds completed | updates rejected | time per round | coordinator peak RSS |\n"
          "|---|---|---|---|---|\n")
RESULTS = []

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The nordic5 study's files, each site reading its own export through its own mapping, and the job's task
    overrides. The copy standardises each site on its own rows, so a training job needs no Table 1 job first."""
    folder = tmp_path_factory.mktemp("nordic5")
    files = locate("nordic5")
    for path in files.sites.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    text = (folder / "study.yaml").read_text()
    assert "standardise: federated" in text
    (folder / "study.yaml").write_text(text.replace("standardise: federated", "standardise: site"))
    mappings = {site: folder / f"{site}.yaml" for site in SITES}
    assert all(path.exists() for path in mappings.values()), sorted(folder.iterdir())
    return mappings, [f"study={folder / 'study.yaml'}", f"study_sites={folder}"]


@pytest.fixture
def topology():
    reason = netns_unavailable_reason()
    if reason:
        pytest.skip(f"fault suite needs Linux network namespaces: {reason}")
    with Topology(len(SITES)) as topo:
        yield topo


@pytest.fixture
def proxies(topology):
    made = []
    try:
        for i in range(len(SITES)):
            made.append(FaultProxy((HUB_ADDRESS, PROXY_PORT + i), ("127.0.0.1", COORDINATOR_PORT), netns=topology.hub))
        yield made
    finally:
        for p in made:
            p.close()


def _events(path):
    try:
        return [json.loads(line) for line in path.read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _time(entry):
    return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()


class PeakRss:
    """Polls a process's VmHWM (its peak resident set) until it exits."""

    def __init__(self, pid):
        self.kib = 0
        self._thread = threading.Thread(target=self._poll, args=(pid,), daemon=True)
        self._thread.start()

    def _poll(self, pid):
        while True:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            self.kib = max(self.kib, int(line.split()[1]))
            except (FileNotFoundError, ProcessLookupError):
                return
            if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                return
            time.sleep(0.2)


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _merged(*override_lists):
    """Hydra overrides, a later value of a key replacing an earlier one."""
    return list({o.split("=", 1)[0]: o for overrides in override_lists for o in overrides}.values())


class Running:
    """What a scenario's ``during`` may act on while the federation runs."""

    def __init__(self, tmp, topology, federation, coordinator, sites, start_site, logs):
        self.tmp, self.topology, self.federation = tmp, topology, federation
        self.coordinator, self.sites, self.start_site, self.logs = coordinator, sites, start_site, logs


def _run(tmp, topology, study, during=lambda running: None, *, revoked=(), overrides=(), before_sites=lambda federation: None):
    """Runs the federation to its end; ``during(running)`` runs in the test's thread while it does.
    ``revoked`` members are provisioned, then revoked before the coordinator starts; ``before_sites(federation)``
    runs once the coordinator has started, before any site does."""
    federation = tls.provision(tmp / "federation", [*SITES, *revoked], coordinator_hosts=("localhost", "127.0.0.1", HUB_ADDRESS))
    for name in revoked:
        tls.revoke(federation, name)
    mappings, task = study
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
    out = {}
    coordinator = subprocess.Popen(
        ["ip", "netns", "exec", topology.hub, *CLI, "coordinator", "--federation", str(federation), "--state",
         str(tmp / "coordinator"), "--address", f"127.0.0.1:{COORDINATOR_PORT}", *_merged(OVERRIDES, task, overrides)],
        stdout=open(tmp / "coordinator.out", "w"), stderr=subprocess.STDOUT, env=env)
    peak = PeakRss(coordinator.pid)  # `ip netns exec` execs the command: same pid
    sites = {}

    def start_site(i):
        name = SITES[i]
        sites[name] = subprocess.Popen(
            ["ip", "netns", "exec", topology.site_ns[i], *CLI, "site", "--name", name, "--coordinator",
             f"{HUB_ADDRESS}:{PROXY_PORT + i}", "--certs", str(federation / "sites" / name), "--study",
             task[0].split("=", 1)[1], "--mapping", str(mappings[name]), "--state", str(tmp / "sites" / name)],
            stdout=open(tmp / f"{name}.out", "a"), stderr=subprocess.STDOUT, env=env)

    try:
        before_sites(federation)
        for i in range(len(SITES)):
            start_site(i)
        logs = {"coordinator": tmp / "coordinator" / "audit.jsonl",
                **{n: tmp / "sites" / n / "audit.jsonl" for n in SITES}}
        during(Running(tmp, topology, federation, coordinator, sites, start_site, logs))
        out["coordinator"] = coordinator.wait(timeout=400)
        for name, p in sites.items():
            try:
                out[name] = p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                out[name] = None
    finally:
        for p in [coordinator, *sites.values()]:
            if p.poll() is None:
                p.kill()
                p.wait()
    peak._thread.join(5)
    return federation, logs, out, peak.kib


def _check(tmp, scenario, federation, logs, codes, peak_kib, rounds=ROUNDS):
    text = lambda name: (tmp / f"{name}.out").read_text()[-3000:]
    assert codes["coordinator"] == 0, text("coordinator")
    events = _events(logs["coordinator"])
    closed = [e for e in events if e["event"] == "round_closed"]
    assert sorted(e["round"] for e in closed) == list(range(rounds)), closed  # each round closed once, none lost
    rejected = {e.get("sha256") for e in events if e["event"] == "update_rejected"} - {None}
    accepted = {e["sha256"] for e in events if e["event"] == "update_accepted"}
    assert not rejected & accepted
    for name, log in logs.items():
        cert = federation / ("coordinator" if name == "coordinator" else f"sites/{name}") / "cert.pem"
        args = CLI + ["audit", "verify", str(log), "--cert", str(cert)]
        if name != "coordinator":
            args += ["--peer", str(logs["coordinator"])]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
    assert peak_kib < PEAK_RSS_LIMIT_MIB * 1024, peak_kib  # memory bounded: nothing buffered what a sender announced
    times = [_time(events[0])] + [_time(e) for e in sorted(closed, key=lambda e: e["round"])]
    first, later = times[1] - times[0], [b - a for a, b in zip(times[1:], times[2:])]
    per_round = sum(later) / len(later)  # round 0 also holds the sites' start-up (JAX import, Join), shown apart
    n_rejected = sum(e["event"] == "update_rejected" for e in events)
    row = (f"| {scenario} | {len(closed)}/{rounds} | {n_rejected} | {per_round:.2f} s (round 0 with start-up: "
           f"{first:.1f} s) | {peak_kib / 1024:.0f} MiB |")
    (tmp / "results.md").write_text(HEADER + row + "\n")
    RESULTS.append(row)
    print(f"\n{HEADER}{row}")
    return closed


@pytest.fixture(scope="module", autouse=True)
def results_table(tmp_path_factory):
    """Every scenario's row in one table at the end (printed, and written to results.md in a module tmp dir)."""
    yield
    if RESULTS:
        path = tmp_path_factory.mktemp("fault_suite") / "results.md"
        path.write_text(HEADER + "\n".join(RESULTS) + "\n")
        print(f"\nfault suite results ({path}):\n{HEADER}" + "\n".join(RESULTS))


def test_latency_80ms_and_1pct_loss_on_every_link(tmp_path, topology, proxies, study):
    for p in proxies:
        p.set_faults(latency_ms=80, loss=0.01, loss_delay_ms=200)
    federation, logs, codes, peak = _run(tmp_path, topology, study)
    assert all(codes[n] == 0 for n in SITES), codes
    closed = _check(tmp_path, "80 ms latency, 1% loss (200 ms stalls), all links", federation, logs, codes, peak)
    assert all(len(e["contributors"]) == len(SITES) for e in closed[1:])  # slow, but nobody left out


def test_one_site_capped_at_10mbit_by_tbf(tmp_path, topology, proxies, study):
    topology.cap(0, "10mbit")
    federation, logs, codes, peak = _run(tmp_path, topology, study)
    assert all(codes[n] == 0 for n in SITES), codes
    _check(tmp_path, f"{SITES[0]} capped at 10 Mbit/s (tbf)", federation, logs, codes, peak)


def test_one_site_partitioned_then_healed(tmp_path, topology, proxies, study):
    victim = SITES[0]
    healed = []

    def partition(running):
        _wait_for(running.logs[victim], "task_received", 1)
        proxies[0].partition()
        time.sleep(PARTITION_S)
        proxies[0].heal()
        healed.append(time.time())

    federation, logs, codes, peak = _run(tmp_path, topology, study, partition, overrides=[f"runtime.rounds={PARTITION_ROUNDS}"])
    assert all(codes[n] == 0 for n in SITES), codes  # the victim too: it came back
    closed = _check(tmp_path, f"{victim} partitioned {PARTITION_S:.0f} s, healed", federation, logs, codes, peak,
                    rounds=PARTITION_ROUNDS)
    assert any(victim not in e["contributors"] for e in closed)  # the partition was felt
    assert any(victim in e["contributors"] and _time(e) > healed[0] for e in closed)  # and it contributed again
    assert proxies[0].stats["refused"] > 0
    # A partition that cuts an upload mid-stream leaves an update_rejected entry (the cancelled upload); the
    # check above already makes sure no such update was accepted.


def _wait_for(log, event, round_index, timeout=300):
    deadline = time.monotonic() + timeout
    while not any(e["event"] == event and e.get("round", -1) >= round_index for e in _events(log)):
        assert time.monotonic() < deadline, f"no {event} for round {round_index} in {log}"
        time.sleep(0.05)


def test_hostile_members_a_frozen_coordinator_and_a_killed_site(tmp_path, topology, proxies, study):
    """In one run: a site killed (SIGKILL) mid-upload in round 1 (its link slowed to SLOW_LINK bytes a second
    so the upload takes seconds; killed once its log says the update left, before any reply); then a revoked
    member still connecting, a slow-loris upload, an oversized announcement and a poisoned update
    (tests/runtime/hostile.py, next to the coordinator), all three with the killed site's certificate, in the
    round then open; then the coordinator frozen (SIGSTOP) for FREEZE_S seconds and resumed, and the killed
    site restarted."""
    victim = SITES[0]
    killed = {}
    hostile_out, ready, go = tmp_path / "hostile.json", tmp_path / "hostile.ready", tmp_path / "hostile.go"
    overrides = ["runtime.upload_timeout=10", "runtime.round_timeout=10"]  # a round without the victim waits 10 s
    hostile = []

    def prepare(federation):  # the hostile member builds the job's template (JAX) before any round opens
        hostile.append(subprocess.Popen(
            ["ip", "netns", "exec", topology.hub, sys.executable, "-m", "tests.runtime.hostile", "--federation",
             str(federation), "--state", str(tmp_path / "coordinator"), "--address", f"127.0.0.1:{COORDINATOR_PORT}",
             "--out", str(hostile_out), "--ready", str(ready), "--go", str(go), "--members", victim, victim, victim,
             *_merged(OVERRIDES, study[1], overrides)],
            stdout=open(tmp_path / "hostile.out", "w"), stderr=subprocess.STDOUT, cwd=ROOT))
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert hostile[0].poll() is None and time.monotonic() < deadline, (tmp_path / "hostile.out").read_text()[-3000:]
            time.sleep(0.1)

    def attack(running):
        _wait_for(running.logs[victim], "update_result", 0)
        proxies[0].set_faults(bandwidth=SLOW_LINK)  # round 1's task and update each take seconds on this link
        _wait_for(running.logs[victim], "update_sent", 1)
        running.sites[victim].kill()
        running.sites[victim].wait()
        killed["at"] = time.time()
        # The kill closed the site's sockets; on a real link its connection ends there. The proxy was still holding
        # bytes of the upload: it drops that connection too, and the coordinator's half of the stream breaks.
        proxies[0].reset_all()
        proxies[0].set_faults(bandwidth=None)
        time.sleep(1.0)  # the coordinator notices the broken stream (its per-site upload slots free up)
        mine = [e for e in _events(running.logs[victim]) if e.get("round") == 1]
        killed["mid_upload"] = any(e["event"] == "update_sent" for e in mine) and not any(e["event"] == "update_result" for e in mine)
        go.touch()
        assert hostile[0].wait(timeout=120) == 0, (tmp_path / "hostile.out").read_text()[-3000:]
        os.kill(running.coordinator.pid, signal.SIGSTOP)
        time.sleep(FREEZE_S)
        os.kill(running.coordinator.pid, signal.SIGCONT)
        running.start_site(0)

    try:
        federation, logs, codes, peak = _run(tmp_path, topology, study, attack, revoked=("Mallory",), overrides=overrides,
                                             before_sites=prepare)
    finally:
        for p in hostile:
            if p.poll() is None:
                p.kill()
    assert all(codes[n] == 0 for n in SITES), codes  # the killed site too, once restarted
    _check(tmp_path, f"hostile members, coordinator frozen {FREEZE_S:.0f} s, {victim} killed mid-upload and restarted",
           federation, logs, codes, peak)
    assert killed["mid_upload"]  # its update had left, and no reply had come back
    # The cut upload was never accepted: any round-1 update from the victim came from the restarted process.
    assert not [e for e in _events(logs["coordinator"]) if e["event"] == "update_accepted" and e["site"] == victim
                and e["round"] == 1 and _time(e) < killed["at"]]
    reasons = " | ".join(e.get("reason", "") for e in _events(logs["coordinator"]))
    assert "runtime.upload_timeout=10" in reasons  # the slow-loris upload was cut at the deadline
    joined = [e for e in _events(logs[victim]) if e["event"] == "joined"]
    assert len(joined) == 2 and len({e.get("run_id") for e in joined}) == 1  # killed, restarted, the same run
    result = json.loads(hostile_out.read_text())
    # The revoked member never completes the TLS handshake (the coordinator trusts its members' own certificates).
    assert result["revoked_join"].startswith("UNAVAILABLE"), result
    assert set(result["revoked_uploads"]) == {"UNAVAILABLE"}, result
    assert "announces 1000000000 bytes" in result["oversized"], result
    assert "not finite" in result["poisoned"], result
    assert result["slow_loris"] != "accepted" and result["slow_loris_s"] < 10 + 20, result


def test_fault_proxy_on_loopback():
    """The proxy alone, no namespaces: latency per chunk, a partition refuses, heal lets through again."""
    import socket

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def echo():
        while True:
            try:
                c, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=lambda c=c: [c.sendall(d) for d in iter(lambda: c.recv(4096), b"")],
                             daemon=True).start()

    threading.Thread(target=echo, daemon=True).start()

    def round_trip(address):
        with socket.create_connection(address, timeout=5) as s:
            t = time.monotonic()
            s.sendall(b"ping")
            data = s.recv(16)
            return data, time.monotonic() - t

    try:
        with FaultProxy(("127.0.0.1", 0), ("127.0.0.1", port), max_connections=2) as proxy:
            assert round_trip(proxy.address)[0] == b"ping"
            proxy.set_faults(latency_ms=50)
            data, took = round_trip(proxy.address)
            assert data == b"ping" and took >= 0.1  # 50 ms each way
            proxy.partition()
            assert round_trip(proxy.address)[0] == b""  # accepted and closed
            proxy.heal()
            proxy.set_faults(latency_ms=0, bandwidth=1000)  # 1 kB/s, bucket starts empty: 2 kB takes about 2 s each way
            with socket.create_connection(proxy.address, timeout=10) as s:
                t = time.monotonic()
                s.sendall(b"x" * 2000)
                got = b""
                while len(got) < 2000:
                    got += s.recv(4096)
                assert time.monotonic() - t >= 0.5
            assert proxy.stats["refused"] == 1
    finally:
        server.close()
