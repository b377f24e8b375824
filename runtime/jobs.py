"""A federation that outlives its jobs: a queue of jobs on the hub, run one after another by one coordinator
service while the sites stay connected.

    JOBS/queue/<id>.json     submitted, waiting (``nordfl job submit``)
    JOBS/runs/<id>/          a job's own state, audit log and results (its coordinator's --state folder)
    JOBS/runs/<id>/job.json  the submission, with what became of it: running, finished, stopped or aborted
    JOBS/runs/<id>/ABORT     asks the service to stop that job (``nordfl job abort``)

Who may submit is who may write the jobs folder on the hub (make it the study lead's, mode 0700); the
service only reads it. Between jobs every site call is answered UNAVAILABLE, and sites run with ``--stay``
retry with backoff until the next job starts.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Optional, Sequence

from nordfl.runtime import tls
from nordfl.runtime.store import atomic_write_text

__all__ = ["JobQueue", "format_jobs", "serve_jobs"]

STATES = ("queued", "running", "finished", "stopped", "aborted", "failed")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class JobQueue:
    """The jobs folder: submit, list, abort, and (for the service) take the next job."""

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)
        self.queue, self.runs = self.root / "queue", self.root / "runs"

    def submit(self, overrides: Sequence[str], by: str = "") -> str:
        """Queues a job (Hydra overrides, as ``nordfl coordinator`` takes them), checked to compose first."""
        from nordfl.runtime.config import compose_config

        compose_config(list(overrides))  # a ConfigError names a bad key or value now, not when the job starts
        self.queue.mkdir(parents=True, exist_ok=True, mode=0o700)
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        entry = {"id": job_id, "overrides": list(overrides), "submitted": _now(), "by": by, "state": "queued"}
        atomic_write_text(self.queue / f"{job_id}.json", json.dumps(entry, indent=2))
        return job_id

    def list(self) -> list[dict]:
        """Every job, oldest first: the queued ones and those the service has taken."""
        entries = [json.loads(p.read_text()) for p in self.queue.glob("*.json")] if self.queue.exists() else []
        entries += [json.loads(p.read_text()) for p in self.runs.glob("*/job.json")] if self.runs.exists() else []
        return sorted(entries, key=lambda e: e["id"])

    def abort(self, job_id: str) -> str:
        """A queued job is removed (its entry kept as aborted); a running one is asked to stop. Returns its state."""
        queued = self.queue / f"{job_id}.json"
        if queued.exists():
            entry = json.loads(queued.read_text()) | {"state": "aborted", "ended": _now()}
            (self.runs / job_id).mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.runs / job_id / "job.json", json.dumps(entry, indent=2))
            queued.unlink()
            return "aborted"
        record = self.runs / job_id / "job.json"
        if not record.exists():
            known = ", ".join(e["id"] for e in self.list()) or "none"
            raise ValueError(f"no job {job_id!r} in {self.root}; jobs: {known}")
        state = json.loads(record.read_text())["state"]
        if state == "running":
            atomic_write_text(self.runs / job_id / "ABORT", _now())
            return "stopping"
        return state

    def take(self) -> Optional[dict]:
        """The oldest queued job, moved to its run folder as running; None when the queue is empty."""
        waiting = sorted(self.queue.glob("*.json")) if self.queue.exists() else []
        if not waiting:
            return None
        entry = json.loads(waiting[0].read_text()) | {"state": "running", "started": _now()}
        folder = self.runs / entry["id"]
        folder.mkdir(parents=True, exist_ok=True)
        self.record(entry)
        waiting[0].unlink()
        return entry

    def record(self, entry: dict) -> None:
        atomic_write_text(self.runs / entry["id"] / "job.json", json.dumps(entry, indent=2))

    def abort_requested(self, job_id: str) -> Optional[str]:
        return "aborted by the study lead (nordfl job abort)" if (self.runs / job_id / "ABORT").exists() else None


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
            drive(coordinator, final_metrics_grace, stop_requested=lambda: jobs.abort_requested(entry["id"]))
            servicer.coordinator = None  # between jobs: sites hear UNAVAILABLE and retry
            aborted = jobs.abort_requested(entry["id"])
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

