"""A federation that outlives its jobs: a queue on the hub, one coordinator service, sites that stay."""

import json
import threading

import pytest

from nordfl.conf.schema import ConfigError
from nordfl.runtime import enrol, tls
from nordfl.runtime.jobs import JobQueue, format_jobs, serve_jobs, sign, signature_problem
from nordfl.runtime.site import SiteAgent

from .helpers import SITES, provisioned, wait_until


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
    assert queue.abort_requested(first, tmp_path) is None  # unsigned: a service checking signatures ignores it
    with pytest.raises(ValueError, match="no job 'nope'"):
        queue.abort("nope")
    with pytest.raises(ConfigError):
        queue.submit(["algorithm=no_such_algorithm"])  # refused at submission, not when its turn comes
    assert "fedprox" in format_jobs(queue.list())


def _enrol(federation, certs, name, *, renew=False, role="site"):
    """A site's (or an admin's) key made where it stays, its request approved, the certificate installed back."""
    request = enrol.request_certificate(certs, name, renew=renew)
    approval = tls.approve(federation, request.path.read_bytes(), request.fingerprint, role=role)
    enrol.install_certificate(certs, (approval.folder / "cert.pem").read_bytes(), (approval.folder / "ca.pem").read_bytes())


def test_only_a_federation_admin_can_sign_a_job(tmp_path):
    federation = tls.provision(tmp_path / "federation", ["Oslo"])
    _enrol(federation, tmp_path / "lead", "lead", role="admin")
    assert set(tls.load_federation(federation).admins) == {"lead"} and "lead" not in tls.load_federation(federation).sites
    queue = JobQueue(tmp_path / "jobs")
    signed = json.loads((queue.queue / f"{queue.submit(['runtime.rounds=1'], certs=tmp_path / 'lead')}.json").read_text())
    assert signature_problem(signed, federation) is None
    unsigned = json.loads((queue.queue / f"{queue.submit(['runtime.rounds=1'])}.json").read_text())
    assert "not signed" in signature_problem(unsigned, federation)
    by_a_site = sign({k: signed[k] for k in ("id", "overrides", "submitted", "by")}, federation / "sites" / "Oslo")
    assert "'Oslo', which is not a federation admin" in signature_problem(by_a_site, federation)
    assert "does not match" in signature_problem(signed | {"overrides": ["runtime.rounds=500"]}, federation)
    foreign = tls.provision(tmp_path / "other", ["lead"])
    assert "did not issue" in signature_problem(sign(unsigned, foreign / "sites" / "lead"), federation)
    with pytest.raises(ValueError, match="already a site's name"):
        _enrol(federation, tmp_path / "oslo-admin", "Oslo", role="admin")
    tls.revoke(federation, "lead")  # an admin revoked: its signatures stop counting
    assert "not a federation admin" in signature_problem(signed, federation)


@pytest.mark.slow
def test_two_jobs_on_one_service_with_site_issued_certificates_a_renewal_and_a_new_site_between(tmp_path):
    """Five sites enrol the site-issued way (no key ever made centrally). One coordinator service runs two
    submitted jobs; four sites stay connected from the first to the second. Between the jobs one site renews its
    certificate (its agent restarted with the new key) and a sixth site joins; no other site's files change."""
    federation = tls.provision(tmp_path / "federation", [])
    _, files = provisioned(tmp_path / "data")  # the four hospitals' files (its own federation is not used)
    data = {**files, "Tartu": files["Cleveland"], "Turku": files["Hungary"]}
    certs = tmp_path / "certs"
    for name in [*SITES, "Tartu"]:
        _enrol(federation, certs / name, name)
    _enrol(federation, tmp_path / "lead", "lead", role="admin")  # the study lead, who signs the jobs
    assert not list((federation / "sites").rglob("key.pem"))
    queue, ports, results = JobQueue(tmp_path / "jobs"), [], {}
    unsigned = queue.submit(["runtime.rounds=1"])  # refused by the service: nobody may run jobs but an admin
    service = threading.Thread(target=serve_jobs, args=(federation, queue, "localhost:0"),
                               kwargs=dict(log=lambda m: None, max_jobs=3, idle_poll=0.2, final_metrics_grace=10,
                                           on_listening=ports.append), daemon=True)
    service.start()
    wait_until(lambda: ports, timeout=60)

    def agent(name, jobs):
        site = SiteAgent(name, f"localhost:{ports[0]}", [data[name]], tmp_path / "sites" / name,
                         tls.channel_credentials(certs / name), log=lambda m: None, stay=True, max_backoff=1.0,
                         signing_key=certs / name / "key.pem")
        def work():
            results.setdefault(name, []).append(site.run(jobs=jobs))
            site.audit.close()  # as a restarted agent's process would: the next one opens the log

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread

    threads = [agent(name, 2) for name in SITES] + [agent("Tartu", 1)]
    first = queue.submit(["runtime.rounds=1"], certs=tmp_path / "lead")
    wait_until(lambda: {e["id"]: e["state"] for e in queue.list()}.get(first) == "finished", timeout=300)
    threads[-1].join(timeout=60)

    untouched = {name: _files(certs / name) for name in SITES}
    _enrol(federation, certs / "Tartu", "Tartu", renew=True)  # a new key; the old certificate is refused from now on
    _enrol(federation, certs / "Turku", "Turku")  # a sixth hospital
    threads += [agent("Tartu", 1), agent("Turku", 1)]
    second = queue.submit(["algorithm=fedprox", "runtime.rounds=1"], certs=tmp_path / "lead")
    for thread in threads:
        thread.join(timeout=300)
    service.join(timeout=120)
    assert not service.is_alive()
    jobs = {e["id"]: e for e in queue.list()}
    assert jobs[first]["state"] == jobs[second]["state"] == "finished"
    assert jobs[unsigned]["state"] == "failed" and "not signed" in jobs[unsigned]["reason"]
    assert jobs[first]["sites"] == sorted([*SITES, "Tartu"]) and jobs[second]["sites"] == sorted([*SITES, "Tartu", "Turku"])
    assert {name: len(runs) for name, runs in results.items()} == {**{s: 1 for s in SITES}, "Tartu": 2, "Turku": 1}
    for site in SITES:  # one agent, both runs; nobody else's certificate or key changed
        log = [json.loads(line) for line in (tmp_path / "sites" / site / "audit.jsonl").read_text().splitlines()]
        assert [e["run_id"] for e in log if e["event"] == "joined"] == [jobs[first]["run_id"], jobs[second]["run_id"]]
        assert _files(certs / site) == untouched[site]
    for job in (first, second):  # each job its own state and audit log
        entries = [json.loads(line) for line in (queue.runs / job / "audit.jsonl").read_text().splitlines()]
        assert entries[0]["event"] == "start" and "finished" in [e["event"] for e in entries]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
