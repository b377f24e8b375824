"""A federation that outlives its jobs: a queue on the hub, one coordinator service, sites that stay."""

import json
import threading

import pytest

from nordfl.conf.schema import ConfigError
from nordfl.runtime import enrol, tls
from nordfl.runtime.jobs import JobQueue, format_jobs, serve_jobs
from nordfl.runtime.site import SiteAgent

from .helpers import SITES, provisioned, site_agent, wait_until


def test_the_queue_submits_lists_and_aborts(tmp_path):
    queue = JobQueue(tmp_path / "jobs")
    first = queue.submit(["algorithm=fedprox", "runtime.rounds=3"], by="lead")
    second = queue.submit(["runtime.rounds=1"])
    assert [e["id"] for e in queue.list()] == sorted([first, second]) and all(e["state"] == "queued" for e in queue.list())
    assert queue.abort(second) == "aborted"
    states = {e["id"]: e["state"] for e in queue.list()}
    assert states == {first: "queued", second: "aborted"}
    assert queue.take()["id"] == first and queue.take() is None  # the aborted one never runs
    assert queue.abort(first) == "stopping" and queue.abort_requested(first)
    with pytest.raises(ValueError, match="no job 'nope'"):
        queue.abort("nope")
    with pytest.raises(ConfigError):
        queue.submit(["algorithm=no_such_algorithm"])  # refused at submission, not when its turn comes
    assert "fedprox" in format_jobs(queue.list())


@pytest.mark.slow
def test_two_jobs_in_a_row_with_the_sites_staying_and_a_site_added_between(tmp_path):
    """One coordinator service runs two submitted jobs; the four sites stay connected from one to the next, and
    a fifth site, enrolled the site-issued way between the jobs, joins the second without anyone else re-provisioned."""
    federation, files = provisioned(tmp_path)
    queue = JobQueue(tmp_path / "jobs")
    ports = []
    service = threading.Thread(target=serve_jobs, args=(federation, queue, "localhost:0"),
                               kwargs=dict(log=lambda m: None, max_jobs=2, idle_poll=0.2, final_metrics_grace=10,
                                           on_listening=ports.append), daemon=True)
    service.start()
    wait_until(lambda: ports, timeout=60)
    before = {s: (federation / "sites" / s / "cert.pem").read_bytes() for s in SITES}
    agents = [site_agent(tmp_path, federation, files, s, ports[0], stay=True, max_backoff=1.0) for s in SITES]
    results = {}

    def work(agent):
        results[agent.name] = agent.run(jobs=2)

    threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    first = queue.submit(["runtime.rounds=1"])
    wait_until(lambda: {e["id"]: e["state"] for e in queue.list()}.get(first) == "finished", timeout=300)

    request = enrol.request_certificate(tmp_path / "Tartu", "Tartu")  # a new hospital, its key made there
    approval = tls.approve(federation, request.path.read_bytes(), request.fingerprint)
    enrol.install_certificate(tmp_path / "Tartu", (approval.folder / "cert.pem").read_bytes(), (approval.folder / "ca.pem").read_bytes())
    tartu = SiteAgent("Tartu", f"localhost:{ports[0]}", [files["Cleveland"]], tmp_path / "sites" / "Tartu",
                      tls.channel_credentials(tmp_path / "Tartu"), log=lambda m: None, stay=True, max_backoff=1.0,
                      signing_key=tmp_path / "Tartu" / "key.pem")
    late = threading.Thread(target=lambda: results.update(Tartu=tartu.run(jobs=1)), daemon=True)
    late.start()
    second = queue.submit(["algorithm=fedprox", "runtime.rounds=1"])
    for t in threads:
        t.join(timeout=300)
    service.join(timeout=120)
    late.join(timeout=60)
    assert not service.is_alive() and set(results) == {*SITES, "Tartu"}
    jobs = {e["id"]: e for e in queue.list()}
    assert jobs[first]["state"] == jobs[second]["state"] == "finished"
    assert jobs[first]["sites"] == sorted(SITES) and jobs[second]["sites"] == sorted([*SITES, "Tartu"])
    for site in SITES:  # the same agent joined both runs
        log = [json.loads(line) for line in (tmp_path / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert [e["run_id"] for e in log if e["event"] == "joined"] == [jobs[first]["run_id"], jobs[second]["run_id"]]
        assert (federation / "sites" / site / "cert.pem").read_bytes() == before[site]
    for job in (first, second):  # each job its own state and audit log
        entries = [json.loads(line) for line in (queue.runs / job / "audit.jsonl").read_text().splitlines()]
        assert entries[0]["event"] == "start" and "finished" in [e["event"] for e in entries]
    tartu_log = [json.loads(line) for line in (tmp_path / "sites" / "Tartu" / "audit.jsonl").read_text().splitlines()]
    assert [e["run_id"] for e in tartu_log if e["event"] == "joined"] == [jobs[second]["run_id"]]
