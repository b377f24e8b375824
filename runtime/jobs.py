"""A federation that outlives its jobs: a queue of jobs on the hub, run one after another by one coordinator
service while the sites stay connected.

    JOBS/queue/<id>.json     submitted, waiting (``nordfl job submit``)
    JOBS/runs/<id>/          a job's own state, audit log and results (its coordinator's --state folder)
    JOBS/runs/<id>/job.json  the submission, with what became of it: running, finished, stopped or aborted
    JOBS/runs/<id>/ABORT     asks the service to stop that job (``nordfl job abort``)

Who may submit: a job, and an abort, must be signed with a federation admin's key (``nordfl admin init``, then
``nordfl admin approve --role admin``): the service runs only entries whose certificate the federation CA
issued, whose certificate is the one federation.json pins under ``admins``, and whose signature covers the
entry as written. Anything else is recorded as failed (or the abort ignored), with the reason. Between jobs
every site call is answered UNAVAILABLE, and sites run with ``--stay`` retry with backoff until the next job
starts.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

from nordfl.runtime import tls
from nordfl.runtime.store import atomic_write_text

__all__ = ["JobQueue", "format_jobs", "serve_jobs", "sign", "signature_problem"]

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _digest(entry: dict) -> bytes:
    """What an admin signs: the entry's canonical JSON, without its signature and the service's own fields."""
    signed = {k: v for k, v in entry.items() if k in SIGNED_FIELDS}
    return hashlib.sha256(json.dumps(signed, sort_keys=True, separators=(",", ":")).encode()).digest()


SIGNED_FIELDS = ("id", "overrides", "submitted", "by", "abort")


def sign(entry: dict, certs: str | os.PathLike) -> dict:
    """``entry`` with an admin's signature: its certificate and an ECDSA signature of ``_digest(entry)``."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    folder = Path(certs)
    key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), password=None)
    signature = key.sign(_digest(entry), ec.ECDSA(Prehashed(hashes.SHA256())))
    return entry | {"signature": {"certificate": (folder / "cert.pem").read_text(), "sig": signature.hex()}}


def signature_problem(entry: dict, federation: str | os.PathLike) -> Optional[str]:
    """Why ``entry`` is not signed by a federation admin (None: it is)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
    from cryptography.x509.oid import NameOID

    signature = entry.get("signature")
    if not isinstance(signature, dict):
        return "not signed (submit with --certs, an admin's certificate folder)"
    try:
        cert = x509.load_pem_x509_certificate(str(signature.get("certificate", "")).encode())
        ca = x509.load_pem_x509_certificate((Path(federation) / "coordinator" / "ca.pem").read_bytes())
    except (OSError, ValueError):
        cert = ca = None
    if cert is None or not tls.issued_by(cert, ca):  # not PEM, or not this CA's: not an admin of this federation
        return "signed with a certificate the federation CA did not issue"
    name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    if tls.load_federation(federation).admins.get(name) != tls.certificate_sha256(cert):
        return f"signed by {name!r}, which is not a federation admin (or not with its current certificate)"
    try:
        cert.public_key().verify(bytes.fromhex(str(signature.get("sig", ""))), _digest(entry), ec.ECDSA(Prehashed(hashes.SHA256())))
    except (InvalidSignature, ValueError):
        return f"the signature of {name!r} does not match the entry (changed after signing)"
    return None


class JobQueue:
    """The jobs folder: submit, list, abort, and (for the service) take the next job."""

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)
        self.queue, self.runs = self.root / "queue", self.root / "runs"

    def submit(self, overrides: Sequence[str], by: str = "", certs: Optional[str | os.PathLike] = None) -> str:
        """Queues a job (Hydra overrides, as ``nordfl coordinator`` takes them), checked to compose first and
        signed with the admin key in ``certs`` (unsigned jobs run only on an ``--insecure`` service)."""
        from nordfl.runtime.config import compose_config

        compose_config(list(overrides))  # a ConfigError names a bad key or value now, not when the job starts
        self.queue.mkdir(parents=True, exist_ok=True, mode=0o700)
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        entry = {"id": job_id, "overrides": list(overrides), "submitted": _now(), "by": by}
        entry = (sign(entry, certs) if certs is not None else entry) | {"state": "queued"}
        atomic_write_text(self.queue / f"{job_id}.json", json.dumps(entry, indent=2))
        return job_id

    def list(self) -> list[dict]:
        """Every job, oldest first: the queued ones and those the service has taken."""
        entries = [json.loads(p.read_text()) for p in self.queue.glob("*.json")] if self.queue.exists() else []
        entries += [json.loads(p.read_text()) for p in self.runs.glob("*/job.json")] if self.runs.exists() else []
        return sorted(entries, key=lambda e: e["id"])

    def abort(self, job_id: str, certs: Optional[str | os.PathLike] = None) -> str:
        """A queued job is removed (its entry kept as aborted); a running one is asked to stop (the request signed
        with the admin key in ``certs``). Returns its state."""
        queued = self.queue / f"{job_id}.json"
        if queued.exists():
            self.record(json.loads(queued.read_text()) | {"state": "aborted", "ended": _now()})
            queued.unlink()
            return "aborted"
        record = self.runs / job_id / "job.json"
        if not record.exists():
            known = ", ".join(e["id"] for e in self.list()) or "none"
            raise ValueError(f"no job {job_id!r} in {self.root}; jobs: {known}")
        state = json.loads(record.read_text())["state"]
        if state == "running":
            request = {"id": job_id, "abort": _now()}
            atomic_write_text(self.runs / job_id / "ABORT", json.dumps(sign(request, certs) if certs is not None else request))
            return "stopping"
        return state

    def take(self) -> Optional[dict]:
        """The oldest queued job, moved to its run folder as running; None when the queue is empty."""
        waiting = sorted(self.queue.glob("*.json")) if self.queue.exists() else []
        if not waiting:
            return None
        entry = json.loads(waiting[0].read_text()) | {"state": "running", "started": _now()}
        self.record(entry)
        waiting[0].unlink()
        return entry

    def record(self, entry: dict) -> None:
        """Writes what became of a job to its run folder (made if new)."""
        (self.runs / entry["id"]).mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.runs / entry["id"] / "job.json", json.dumps(entry, indent=2))

    def abort_requested(self, job_id: str, federation: Optional[Path] = None) -> Optional[str]:
        """Why the running job should stop, if an abort was asked for (and, given ``federation``, signed by an admin)."""
        path = self.runs / job_id / "ABORT"
        if not path.exists():
            return None
        try:
            request = json.loads(path.read_text())
        except ValueError:
            return None
        if federation is not None and (request.get("id") != job_id or signature_problem(request, federation)):
            return None
        return "aborted by the study lead (nordfl job abort)"


def serve_jobs(federation: Path, jobs: JobQueue, address: str, *, insecure: bool = False,
               log: Callable[[str], None] = print, idle_poll: float = 1.0, max_jobs: Optional[int] = None,
               final_metrics_grace: float = 30.0, on_job: Callable[[object], None] = lambda c: None,
               on_listening: Callable[[int], None] = lambda port: None) -> None:
    """The coordinator as a service: one gRPC server for its lifetime, and the queued jobs run one after
    another, each through its own coordinator (its own state folder). Returns after ``max_jobs`` (None: never).
    ``on_job`` sees each job's coordinator when it starts (the status board follows it); ``on_listening``
    gets the port once the server listens."""
    from nordfl.conf.schema import ConfigError
    from nordfl.runtime.audit import AuditError
    from nordfl.runtime.coordinator import Servicer, coordinator_for, drive, identity_for, serve_servicer

    credentials = None if insecure else tls.server_credentials(federation / "coordinator")
    sites = max(len(tls.load_federation(federation).sites), 1)
    server, port, servicer = serve_servicer(Servicer(None, identity_for(credentials)), sites, address, credentials)
    log(f"coordinator service: listening on port {port}; jobs from {jobs.root}")
    on_listening(port)
    done = 0
    try:
        while max_jobs is None or done < max_jobs:
            entry = jobs.take()
            if entry is None:
                time.sleep(idle_poll)
                continue
            problem = None if insecure else signature_problem(entry, federation)
            if problem:
                jobs.record(entry | {"state": "failed", "reason": f"refused: {problem}", "ended": _now()})
                log(f"coordinator service: job {entry['id']} refused: {problem}")
                done += 1
                continue
            try:
                coordinator = coordinator_for(entry["overrides"], federation, jobs.runs / entry["id"], insecure=insecure, log=log)
            except (ConfigError, ValueError, FileNotFoundError, AuditError) as e:
                jobs.record(entry | {"state": "failed", "reason": str(e), "ended": _now()})
                log(f"coordinator service: job {entry['id']} failed to start: {e}")
                done += 1
                continue
            jobs.record(entry | {"run_id": coordinator.run_id, "sites": list(coordinator.job.sites)})
            log(f"coordinator service: job {entry['id']} (run {coordinator.run_id}) started with sites "
                f"{', '.join(coordinator.job.sites)}")
            servicer.coordinator = coordinator
            on_job(coordinator)
            signed_by = None if insecure else federation
            drive(coordinator, final_metrics_grace, stop_requested=lambda: jobs.abort_requested(entry["id"], signed_by))
            servicer.coordinator = None  # between jobs: sites hear UNAVAILABLE and retry
            aborted = jobs.abort_requested(entry["id"], signed_by)
            state = "aborted" if aborted else "stopped" if coordinator.stopped else "finished"
            jobs.record(entry | {"run_id": coordinator.run_id, "sites": list(coordinator.job.sites), "state": state,
                                 "ended": _now(), **({"reason": coordinator.stopped} if coordinator.stopped else {})})
            log(f"coordinator service: job {entry['id']} {state}")
            done += 1
    finally:
        server.stop(grace=2).wait()


def format_jobs(entries: list[dict]) -> str:
    """``nordfl job list``: one line per job."""
    if not entries:
        return "no jobs"
    lines = []
    for e in entries:
        when = e.get("ended") or e.get("started") or e["submitted"]
        extra = f", run {e['run_id']}" if e.get("run_id") else ""
        reason = f": {e['reason']}" if e.get("reason") else ""
        lines.append(f"{e['id']}  {e['state']:<8}  {when}  {' '.join(e['overrides'])}{extra}{reason}")
    return "\n".join(lines)

