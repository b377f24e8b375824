"""What an operator sees of a running coordinator, on its admin port (loopback unless told otherwise), and of a
site agent on its metrics port (``SiteBoard``: the same paths):

- ``/metrics``: Prometheus metrics (round, rounds planned, sites online, each site's last contact, epsilon
  spent as the sites report it, days left on each certificate);
- ``/status.json``: the same as one JSON document, which ``nordfl status`` prints;
- ``/``: a small read-only status page that refreshes itself.

Nothing here can change the federation: the server answers GET only.
"""

from __future__ import annotations

import datetime
import html
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ONLINE_SECONDS", "SiteBoard", "StatusBoard", "format_status", "serve_admin"]

ONLINE_SECONDS = 60.0
"""A site heard from within this long is online (sites long-poll every few seconds while connected)."""


class StatusBoard:
    """Reads the coordinator (never changes it) and renders its state as JSON, metrics and a page. A coordinator
    service points ``coordinator`` at each job's coordinator in turn."""

    def __init__(self, coordinator=None, federation_dir: Optional[Path] = None):
        self.coordinator, self.federation_dir = coordinator, None if federation_dir is None else Path(federation_dir)

    def snapshot(self) -> dict:
        c, now = self.coordinator, time.time()
        stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds")
        expiry = self._certificate_days()
        if c is None:  # a coordinator service before its first job
            return {"time": stamp,
                    "job": {"run_id": "", "what": "no job yet", "round": 0, "rounds": 0, "finished": False, "stopped": None},
                    "sites_online": 0, "sites": [], "coordinator_certificate_days_left": expiry.get(None)}
        job = c.job
        seen, epsilon = dict(c.last_seen), dict(c.site_epsilon)
        sites = [{"name": site, "online": site in seen and now - seen[site] <= ONLINE_SECONDS,
                  "last_seen_seconds_ago": None if site not in seen else round(now - seen[site], 1),
                  "epsilon": epsilon.get(site), "certificate_days_left": expiry.get(site)} for site in job.sites]
        return {
            "time": stamp,
            "job": {"run_id": c.run_id, "what": job.what(), "round": getattr(c, "round", 0), "rounds": job.rounds,
                    "finished": bool(c.finished), "stopped": c.stopped},
            "sites_online": sum(s["online"] for s in sites),
            "sites": sites,
            "coordinator_certificate_days_left": expiry.get(None),
        }

    def _certificate_days(self) -> dict[Optional[str], int]:
        """Days left on each site's certificate the federation folder holds, and on the coordinator's (key None)."""
        if self.federation_dir is None:
            return {}
        now = datetime.datetime.now(datetime.timezone.utc)
        days = {}
        paths = [(None, self.federation_dir / "coordinator" / "cert.pem")]
        paths += [(p.parent.name, p) for p in sorted((self.federation_dir / "sites").glob("*/cert.pem"))]
        for site, path in paths:
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            if site is not None and cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != site:
                continue
            days[site] = (cert.not_valid_after_utc - now).days
        return days

    def metrics(self) -> bytes:
        """The snapshot in Prometheus' text format (a fresh registry each time: no stale site labels)."""
        snap = self.snapshot()
        registry = CollectorRegistry()
        Gauge("nordfl_round", "Rounds completed in the current job", registry=registry).set(snap["job"]["round"])
        Gauge("nordfl_rounds_planned", "Rounds the current job runs", registry=registry).set(snap["job"]["rounds"])
        Gauge("nordfl_job_finished", "1 once the current job has finished", registry=registry).set(int(snap["job"]["finished"]))
        Gauge("nordfl_sites_online", f"Sites heard from in the last {ONLINE_SECONDS:.0f} s", registry=registry).set(snap["sites_online"])
        seen = Gauge("nordfl_site_last_seen_seconds", "Seconds since the site's last request", ["site"], registry=registry)
        spent = Gauge("nordfl_site_epsilon", "Epsilon the site reports having spent (DP runs)", ["site"], registry=registry)
        days = Gauge("nordfl_certificate_days_left", "Days until the certificate expires", ["holder"], registry=registry)
        for site in snap["sites"]:
            if site["last_seen_seconds_ago"] is not None:
                seen.labels(site["name"]).set(site["last_seen_seconds_ago"])
            if site["epsilon"] is not None:
                spent.labels(site["name"]).set(site["epsilon"])
            if site["certificate_days_left"] is not None:
                days.labels(site["name"]).set(site["certificate_days_left"])
        if snap["coordinator_certificate_days_left"] is not None:
            days.labels("coordinator").set(snap["coordinator_certificate_days_left"])
        return generate_latest(registry)

    def page(self) -> str:
        snap = self.snapshot()
        job = snap["job"]
        state = "finished" if job["finished"] else f"stopped: {job['stopped']}" if job["stopped"] else "running"
        rows = "".join(
            f"<tr class=\"{'online' if s['online'] else 'offline'}\"><td>{html.escape(s['name'])}</td>"
            f"<td>{'online' if s['online'] else 'offline'}</td><td>{_shown(s['last_seen_seconds_ago'], '{:.0f} s ago', 'never')}</td>"
            f"<td>{_shown(s['epsilon'], '{:.3g}')}</td><td>{_shown(s['certificate_days_left'], '{}')}</td></tr>"
            for s in snap["sites"])
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>NordFL coordinator</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{padding:.3em .8em;border:1px solid #ccc}}
.online td:nth-child(2){{color:#070}}.offline td:nth-child(2){{color:#a00}}</style></head>
<body><h1>NordFL coordinator</h1>
<p id="job">{html.escape(job['what'])}, run <code>{html.escape(job['run_id'])}</code>: round <b id="round">{job['round']}</b>
of {job['rounds']}, {html.escape(state)}. Sites online: <b id="online">{snap['sites_online']}</b> of {len(snap['sites'])}.</p>
<table><tr><th>site</th><th>status</th><th>last seen</th><th>epsilon spent</th><th>certificate days left</th></tr>
{rows}</table><p>Updated {html.escape(snap['time'])}; read-only.</p></body></html>
"""


class SiteBoard:
    """A site agent's own view, for its metrics endpoint: the job it serves, the last round it trained, the
    epsilon it has spent, and whether the coordinator answers."""

    def __init__(self, agent):
        self.agent = agent

    def snapshot(self) -> dict:
        a, now = self.agent, time.time()
        epsilon = a.spent_epsilon if a.spent_epsilon == a.spent_epsilon else None  # NaN: nothing spent (no DP)
        return {"site": a.name, "run_id": a.run_id, "job_kind": a.job_kind, "last_round": a.last_round, "epsilon": epsilon,
                "connected": a.last_contact is not None and a.failures == 0,
                "last_contact_seconds_ago": None if a.last_contact is None else round(now - a.last_contact, 1)}

    def metrics(self) -> bytes:
        snap = self.snapshot()
        registry = CollectorRegistry()
        Gauge("nordfl_site_connected", "1 while the coordinator answers this site", registry=registry).set(int(snap["connected"]))
        if snap["last_round"] is not None:
            Gauge("nordfl_site_round", "The last round this site trained", registry=registry).set(snap["last_round"])
        if snap["epsilon"] is not None:
            Gauge("nordfl_site_epsilon", "Epsilon this site has spent in the current job", registry=registry).set(snap["epsilon"])
        if snap["last_contact_seconds_ago"] is not None:
            Gauge("nordfl_site_last_contact_seconds", "Seconds since the coordinator last answered",
                  registry=registry).set(snap["last_contact_seconds_ago"])
        return generate_latest(registry)

    def page(self) -> str:
        return f"<!doctype html><title>NordFL site</title><pre>{html.escape(json.dumps(self.snapshot(), indent=2))}</pre>"


def _shown(value, fmt: str, missing: str = "") -> str:
    return missing if value is None else fmt.format(value)


def format_status(snap: dict) -> str:
    """``nordfl status``: the snapshot for a terminal."""
    job = snap["job"]
    state = "finished" if job["finished"] else f"stopped ({job['stopped']})" if job["stopped"] else "running"
    lines = [f"job: {job['what']}, run {job['run_id']}, round {job['round']}/{job['rounds']}, {state}",
             f"sites online: {snap['sites_online']} of {len(snap['sites'])}"]
    for s in snap["sites"]:
        seen = "never" if s["last_seen_seconds_ago"] is None else f"{s['last_seen_seconds_ago']:.0f} s ago"
        extra = "" if s["epsilon"] is None else f", epsilon {s['epsilon']:.3g}"
        cert = "" if s["certificate_days_left"] is None else f", certificate {s['certificate_days_left']} days left"
        lines.append(f"  {s['name']}: {'online' if s['online'] else 'offline'}, last seen {seen}{extra}{cert}")
    if snap.get("coordinator_certificate_days_left") is not None:
        lines.append(f"coordinator certificate: {snap['coordinator_certificate_days_left']} days left")
    return "\n".join(lines)


def serve_admin(board, address: str) -> tuple[ThreadingHTTPServer, int]:
    """Serves the board on ``address`` (``host:port``; port 0 picks one) in a daemon thread; GET only."""
    host, _, port = address.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the standard library's name)
            routes = {"/metrics": (CONTENT_TYPE_LATEST, board.metrics),
                      "/status.json": ("application/json", lambda: json.dumps(board.snapshot()).encode()),
                      "/": ("text/html; charset=utf-8", lambda: board.page().encode())}
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                self.send_error(404, "not found: try /, /status.json or /metrics")
                return
            body = route[1]()
            self.send_response(200)
            self.send_header("Content-Type", route[0])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # the coordinator's console is for the federation, not page views
            pass

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="nordfl-admin").start()
    return server, server.server_address[1]
