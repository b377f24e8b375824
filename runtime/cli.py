"""``nordfl``: the deployment command line.

    nordfl provision DIR [SITE ...]          create a federation: CA, coordinator (and, for demos, site) certificates
    nordfl revoke DIR SITE                   refuse SITE from its next request on
    nordfl site init --name SITE --certs DIR [--renew]
                                             make this site's key (it stays here) and a certificate request
    nordfl admin approve DIR REQUEST --fingerprint FP [--days N] [--role admin]
                                             sign a site's request with the federation CA: add or renew a site
    nordfl admin init --name NAME --certs DIR    a study lead's key and request (approved with --role admin)
    nordfl site install --certs DIR CERT [--ca CA]
                                             install the certificate the admin sent back
    nordfl coordinator --federation DIR --state DIR [--address HOST:PORT] [OVERRIDES ...]
    nordfl coordinator --federation DIR --jobs DIR [--address HOST:PORT]
                                             a service: the queued jobs one after another, sites staying connected
    nordfl job submit|list|abort --jobs DIR [--certs ADMIN_DIR] ...   queue a job (signed by an admin), list, abort
    nordfl site --name SITE --coordinator HOST:PORT --certs DIR --data FILE [--data FILE] --state DIR [--policy FILE]
    nordfl site --name SITE --coordinator HOST:PORT --certs DIR --study FILE --mapping FILE [--data FILE] --state DIR
                                             a site serving a study: its own records through its mapping
    nordfl site --dry-run --name SITE --data FILE [--policy FILE] [--job FILE | OVERRIDES ...]
                                             train one round locally, show what would leave; send nothing
    nordfl site check --study FILE --mapping FILE --data FILE [--data FILE]
                                             a site's own records under its mapping, checked against a study
    nordfl audit verify LOG [--cert PEM] [--peer LOG]   check an audit log's chain, signatures and the other party's log
    nordfl preflight --name SITE --certs DIR --coordinator HOST:PORT --data FILE [--policy FILE]
                                             a site's checks before it goes live, each OK, WARN or FAIL
    nordfl status [--admin HOST:PORT] [--json]    a running coordinator's job, sites online, epsilon, certificates
    nordfl export --state DIR --out DIR [--site-log SITE=LOG ...]
                                             the trained model (.npz and Flax msgpack) and its model card
    nordfl demo [--rounds N] [--algorithm NAME] [--private] [--study NAME_OR_FILE]
                                             a whole federation of the 4 heart-disease hospitals on localhost
                                             (--private: secure aggregation and DP on, each site under a policy;
                                             --study nordic5: five hospitals' own exports, Table 1 job, training)

OVERRIDES are the simulator's Hydra overrides for the shared groups (``algorithm=scaffold``,
``algorithm.client_lr=0.1``) and the runtime group (``runtime.rounds=50``, ``runtime.min_sites=3``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

INSECURE_WARNING = ("WARNING: --insecure: no TLS, no site authentication; anyone who can reach this port can "
                    "join. For local development only, never with patient data.")


def _err(message: str) -> int:
    print(f"nordfl: {message}", file=sys.stderr)
    return 2


def cmd_provision(args) -> int:
    from nordfl.runtime import tls

    try:
        path = tls.provision(Path(args.dir), args.sites, coordinator_hosts=tuple(args.host))
    except (ValueError, FileExistsError) as e:
        return _err(str(e))
    if not args.sites:
        print(f"federation in {path} with no sites yet: each site runs `nordfl site init` and sends its request; approve "
              "it with `nordfl admin approve`. Keep ca/ca.key offline between approvals")
        return 0
    print(f"federation of {len(args.sites)} site(s) in {path}: give each site its folder sites/<name>/ over a "
          "secure channel, then delete the central copy of its key.pem; keep ca/ca.key offline")
    return 0


def cmd_revoke(args) -> int:
    from nordfl.runtime import tls

    try:
        tls.revoke(Path(args.dir), args.site)
    except (ValueError, FileNotFoundError) as e:
        return _err(str(e))
    print(f"revoked {args.site}: the coordinator refuses it from its next request on")
    return 0


def cmd_site_init(args) -> int:
    from nordfl.runtime.enrol import request_certificate

    try:
        request = request_certificate(Path(args.certs), args.name, renew=args.renew)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        return _err(str(e))
    print(f"{request.site}: new key {request.path.parent / 'key.pem'} (it never leaves this folder) and request "
          f"{request.path}.\nSend the request to the federation admin, then read this fingerprint out to them over "
          f"another channel (phone, video call):\n  {request.fingerprint}")
    return 0


def cmd_admin_approve(args) -> int:
    from nordfl.runtime import tls

    try:
        approval = tls.approve(Path(args.dir), Path(args.request).read_bytes(), args.fingerprint, valid_days=args.days,
                               role=args.role)
    except (ValueError, FileNotFoundError) as e:
        return _err(str(e))
    what = "renewed (its previous certificate is refused from now on)" if approval.renewed else (
        "added to the federation" if approval.role == "site" else "added as an admin: it may sign jobs")
    print(f"{approval.site}: {what}; certificate valid until {approval.not_after:%Y-%m-%d}. Send "
          f"{approval.folder / 'cert.pem'} and {approval.folder / 'ca.pem'} back to the {approval.role}. No other site changes.")
    return 0


def cmd_site_install(args) -> int:
    from nordfl.runtime.enrol import install_certificate

    try:
        cert = install_certificate(Path(args.certs), Path(args.cert).read_bytes(),
                                   Path(args.ca).read_bytes() if args.ca else None)
    except (ValueError, FileNotFoundError) as e:
        return _err(str(e))
    print(f"installed the certificate in {args.certs}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def _warn_expiry(cert_path: Path) -> None:
    """Start-up: a certificate that expires within a month is said so, before it stops a run."""
    from nordfl.runtime.enrol import expiry_warning

    if cert_path.exists():
        warning = expiry_warning(cert_path)
        if warning:
            print(warning, file=sys.stderr, flush=True)


def cmd_preflight(args) -> int:
    """``nordfl preflight``: the site's software, certificates, clock, data, policy and coordinator, each OK or not."""
    from nordfl import registry
    from nordfl.runtime.preflight import FAIL, preflight
    from nordfl.runtime.site import site_records
    from nordfl.runtime.site_data import load_study_records

    registry.load_plugins()

    def load_data() -> str:
        data = _site_data(args, load_study_records)
        if isinstance(data, list):
            records = site_records(data, args.task)
            return f"{len(records.examples.y)} rows of task {args.task} in {', '.join(map(str, data))}, every row checked"
        return (f"study {data.study.name} (sha256 {data.study.sha256[:16]}...): {sum(r.rows_kept for r in data.reports)} "
                f"rows checked and kept under the mapping")

    checks = preflight(args.name, Path(args.certs) if args.certs else None, args.coordinator, load_data,
                       Path(args.policy) if args.policy else None, timeout=args.timeout)
    for check in checks:
        print(f"{check.status:<4} {check.what}: {check.detail}")
    failed = sum(c.status == FAIL for c in checks)
    print(f"preflight: {'ready' if not failed else f'{failed} problem(s) to fix before this site goes live'}")
    return 2 if failed else 0


def cmd_status(args) -> int:
    import json
    import urllib.error
    import urllib.request

    from nordfl.runtime.status import format_status

    url = f"http://{args.admin}/status.json"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            snap = json.loads(reply.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        return _err(f"status: no coordinator status at {url} ({e}); is the coordinator running with --admin-address {args.admin}?")
    print(json.dumps(snap, indent=2) if args.json else format_status(snap))
    return 0


def cmd_export(args) -> int:
    from nordfl.runtime.export import export_model

    logs = {}
    for item in args.site_log or []:
        site, sep, path = item.partition("=")
        if not sep or not site or not path:
            return _err(f"--site-log {item!r}: expected SITE=PATH (a site's audit log, for its epsilon)")
        logs[site] = path
    try:
        card = export_model(Path(args.state), Path(args.out), site_logs=logs)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        return _err(str(e))
    rounds = card["rounds"]
    print(f"exported {card['algorithm']['name']} after {rounds['completed']}/{rounds['planned']} rounds to {args.out}: "
          f"model.npz, model.msgpack, model_card.md, model_card.json (job sha256 {card['job_sha256'][:16]}...)")
    return 0


def cmd_audit(args) -> int:
    from nordfl.runtime.audit import verify_main

    return verify_main(Path(args.log), getattr(args, "cert", None), getattr(args, "peer", None))


def cmd_coordinator(args) -> int:
    from nordfl.conf.schema import ConfigError
    from nordfl.runtime import tls
    from nordfl.runtime.audit import AuditError
    from nordfl.runtime.coordinator import coordinator_for, run_until_done, serve

    from nordfl.runtime.logs import console

    log = console("coordinator", args.log_format)
    federation = Path(args.federation)
    if (args.jobs is None) == (args.state is None):
        return _err("coordinator: give --state DIR (one job, from OVERRIDES) or --jobs DIR (a service running the "
                    "submitted jobs one after another), not both")
    if args.jobs is not None:
        return _serve_jobs(args, federation, log)
    try:
        coordinator = coordinator_for(args.overrides, federation, Path(args.state), insecure=args.insecure, log=log)
    except (ConfigError, ValueError, FileNotFoundError, AuditError) as e:
        return _err(str(e))
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    credentials = None if args.insecure else tls.server_credentials(federation / "coordinator")
    if not args.insecure:
        _warn_expiry(federation / "coordinator" / "cert.pem")
    server, port = serve(coordinator, args.address, credentials)
    if args.admin_address:
        from nordfl.runtime.status import StatusBoard

        _serve_board(StatusBoard(coordinator, federation), args.admin_address, log, "coordinator")
    job = coordinator.job
    log(f"coordinator: run {coordinator.run_id}, {job.what()}, sites {', '.join(job.sites)}; listening on port {port}, "
        f"round {coordinator.round}/{job.rounds}")
    run_until_done(coordinator, server)
    if coordinator.stopped:
        return _err(coordinator.stopped)
    if job.kind == "describe":
        log(coordinator.table_markdown())
        log(f"coordinator: Table 1 and statistics.json in {args.state}; train with runtime.statistics="
            f"{Path(args.state) / 'statistics.json'}")
        return 0
    for site, metrics in sorted(coordinator.final_metrics.items()):
        shown = "  ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items())) or "scores kept at the site (DP)"
        log(f"final model at {site}: {shown}")
    log(f"coordinator: finished {coordinator.round} rounds; audit log {Path(args.state) / 'audit.jsonl'}")
    return 0


def _serve_board(board, address: str, log, who: str):
    """Serves a status board (the coordinator's or a site's) read-only on ``address`` and says where; returns it."""
    from nordfl.runtime.status import serve_admin

    server, _ = serve_admin(board, address)
    host, port = server.server_address[:2]
    log(f"{who}: status page, /status.json and Prometheus /metrics on {host}:{port} (read-only)")
    return board


def _serve_jobs(args, federation: Path, log) -> int:
    """``nordfl coordinator --jobs DIR``: the coordinator as a service, one job after another."""
    from nordfl.runtime.jobs import JobQueue, serve_jobs

    if args.overrides:
        return _err("coordinator --jobs: the jobs come from `nordfl job submit`, not from OVERRIDES")
    on_job = lambda coordinator: None  # noqa: E731
    if args.admin_address:
        from nordfl.runtime.status import StatusBoard

        board = _serve_board(StatusBoard(None, federation), args.admin_address, log, "coordinator")
        on_job = lambda coordinator: setattr(board, "coordinator", coordinator)  # noqa: E731
    if not args.insecure:
        _warn_expiry(federation / "coordinator" / "cert.pem")
    try:
        serve_jobs(federation, JobQueue(args.jobs), args.address, insecure=args.insecure, log=log, on_job=on_job)
    except KeyboardInterrupt:
        log("coordinator service: stopped")
    return 0


def cmd_job(args) -> int:
    from nordfl.conf.schema import ConfigError
    from nordfl.runtime.jobs import JobQueue, format_jobs

    queue = JobQueue(args.jobs)
    try:
        if args.job_command == "submit":
            job_id = queue.submit(args.overrides, by=args.by or os.environ.get("USER", ""), certs=args.certs)
            print(f"queued job {job_id}{'' if args.certs else ' (unsigned: only an --insecure service runs it)'}: "
                  f"{' '.join(args.overrides) or '(the defaults)'}")
        elif args.job_command == "list":
            print(format_jobs(queue.list()))
        else:
            print(f"job {args.id}: {queue.abort(args.id, certs=args.certs)}")
    except (ConfigError, ValueError, FileNotFoundError) as e:
        return _err(str(e))
    return 0


def cmd_site(args) -> int:
    from nordfl.runtime import tls
    from nordfl.runtime.audit import AuditError
    from nordfl.runtime.policy import PolicyError, load_policy
    from nordfl.runtime.site import SiteAgent, SiteRefused
    from nordfl.runtime.site_data import SiteDataError, load_study_records
    from nordfl.tasks.mapping import MappingError
    from nordfl.tasks.study import StudyError

    from nordfl import registry

    registry.load_plugins()  # this site's installed plugins (entry points): a plugin's task and its site_data
    if args.dry_run:
        return _dry_run(args)
    if args.overrides or args.job:
        return _err("site: OVERRIDES and --job are for --dry-run only; a running site takes its job from the coordinator")
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    from nordfl.runtime.logs import console

    log = console("site", args.log_format)
    try:
        data = _site_data(args, load_study_records)  # every row checked here, before anything connects
        if not isinstance(data, list):
            log(f"{args.name}: study {data.study.name} (sha256 {data.study.sha256[:16]}...): "
                f"{sum(r.rows_kept for r in data.reports)} rows checked and kept")
        policy = load_policy(args.policy) if args.policy else None
        credentials = None if args.insecure else tls.channel_credentials(Path(args.certs))
        if not args.insecure:
            _warn_expiry(Path(args.certs) / "cert.pem")
        agent = SiteAgent(args.name, args.coordinator, data, Path(args.state), credentials, task=args.task,
                          log=log, policy=policy, stay_after_describe=not isinstance(data, list), stay=args.stay,
                          signing_key=None if args.insecure else Path(args.certs) / "key.pem")
        if args.metrics_address:
            from nordfl.runtime.status import SiteBoard

            _serve_board(SiteBoard(agent), args.metrics_address, log, args.name)
        metrics = agent.run()
    except (SiteDataError, SiteRefused, AuditError, FileNotFoundError, PolicyError, StudyError, MappingError) as e:
        return _err(str(e))
    shown = "  ".join(f"{k} {v:.3f}" for k, v in sorted(metrics.items()))
    log(f"{args.name}: run finished; final model on this site's test rows: {shown}")
    return 0


def _site_data(args, load_study_records):
    """The site's data as the agent takes it: its study records (``--study --mapping``) or its task files."""
    if args.study or args.mapping:
        if not (args.study and args.mapping):
            raise FileNotFoundError("site: --study and --mapping go together (the study file and this site's mapping)")
        return load_study_records(args.study, args.mapping, args.data)
    if not args.data:
        raise FileNotFoundError("site: --data FILE is required (or --study and --mapping for a study)")
    return [Path(p) for p in args.data]


def _dry_run(args) -> int:
    """``nordfl site --dry-run``: one local round, the egress preview printed; no connection is made."""
    import json

    from nordfl.conf.schema import ConfigError
    from nordfl.runtime.audit import AuditError, AuditLog
    from nordfl.runtime.config import Job, check_runtime, compose_config, job_from_config
    from nordfl.runtime.plugins import PluginRefused, check_and_load, parse
    from nordfl.runtime.policy import PolicyError, PolicyViolation, load_policy
    from nordfl.runtime.site import dry_run, summary_preview
    from nordfl.runtime.site_data import SiteDataError, load_study_records
    from nordfl.tasks.mapping import MappingError
    from nordfl.tasks.study import StudyError

    audit = None
    try:
        policy = load_policy(args.policy) if args.policy else None
        if args.job:
            if args.overrides:
                return _err("site --dry-run: give --job FILE or OVERRIDES, not both")
            text = Path(args.job).read_text()
            raw = json.loads(text)
            raw = raw.get("job", raw)  # a job, or an audit entry that holds one
            check_and_load(parse(raw.get("plugins", [])), policy.allowed_plugins if policy else None)  # before parsing it
            job = Job.from_json(json.dumps(raw))
        else:
            cfg = compose_config(args.overrides)
            check_runtime(cfg, max(cfg.runtime.min_cohort, cfg.runtime.min_sites, 2))
            job = job_from_config(cfg, [args.name])
        data = _site_data(args, load_study_records)
        task = args.task if isinstance(data, list) else data.task
        if job.task_config["name"] != task:
            return _err(f"site --dry-run: the job is task {job.task_config['name']!r}; this site serves {task!r}")
        if job.kind == "describe":  # a study's Table 1 job: the numbers themselves are what would leave
            print(summary_preview(args.name, data, job), flush=True)
            return 0
        audit = AuditLog(Path(args.state) / "audit.jsonl", actor=f"site:{args.name}") if args.state else None
        if audit is not None and policy is not None:
            audit.record("policy_loaded", path=policy.path, sha256=policy.sha256, rules=policy.rules())
        preview = dry_run(args.name, data, job, policy=policy, audit=audit)
    except PolicyViolation as e:
        if audit is not None:
            audit.record("policy_refused", rule=e.rule, job_value=str(e.job_value), limit=str(e.limit), dry_run=True)
        return _err(f"{args.name}: the job would be refused: {e}")
    except PluginRefused as e:
        return _err(f"{args.name}: the job would be refused: {e}")
    except (SiteDataError, AuditError, FileNotFoundError, PolicyError, ConfigError, StudyError, MappingError, ValueError) as e:
        return _err(str(e))
    finally:
        if audit is not None:
            audit.close()
    print(preview.format(), flush=True)
    return 0


PRIVATE_DEMO = {
    # DP-SGD at every site (patient-level) and secure aggregation: nothing un-noised leaves a site,
    # and the coordinator sees only the sum of the masked updates.
    "sgd": ["runtime.secure_aggregation=true", "algorithm.dp.mode=sgd", "algorithm.dp.clip=1.0",
            "algorithm.dp.noise_multiplier=1.5", "algorithm.dp.delta=1e-5"],
    # DP-FedAvg with distributed noise (site-level): each site adds its share of the noise before masking.
    "update": ["runtime.secure_aggregation=true", "algorithm.dp.mode=update", "algorithm.dp.noise=distributed",
               "algorithm.dp.clip=1.0", "algorithm.dp.noise_multiplier=5.0", "algorithm.dp.delta=1e-5"],
}
PRIVATE_DEMO_POLICY = ("# a DPO's policy for the demo: every rule on\nmax_epsilon: 15.0\nmax_delta: 1.0e-5\nmin_cohort: 3\n"
                       "require_secure_aggregation: true\nrequire_dp: true\n")


CLI = [sys.executable, "-m", "nordfl.runtime.cli"]


def _coordinator(root: Path, port: int, state: str, overrides: Sequence[str]) -> subprocess.Popen:
    """A demo federation's coordinator as its own process, on loopback over mTLS."""
    return subprocess.Popen(CLI + ["coordinator", "--federation", str(root / "federation"), "--state", str(root / "coordinator" / state),
                                   "--address", f"localhost:{port}", *overrides])


def _sites(root: Path, port: int, sites: dict) -> list[subprocess.Popen]:
    """A demo federation's sites, each its own process; ``sites``: name -> its own arguments (data, or study and mapping)."""
    return [subprocess.Popen(CLI + ["site", "--name", name, "--coordinator", f"localhost:{port}", "--certs",
                                    str(root / "federation" / "sites" / name), "--state", str(root / "sites" / name), *own],
                             stdout=subprocess.DEVNULL)
            for name, own in sorted(sites.items())]


def cmd_demo_study(args, root: Path) -> int:
    """``nordfl demo --study NAME_OR_FILE``: the study's Table 1 job, then a training job scaled with its statistics."""
    from nordfl.runtime import tls
    from nordfl.tasks.catalogue import locate
    from nordfl.tasks.study import load_study
    from nordfl.tasks.study_data import mapping_files

    try:
        files = locate(args.study)
        study = load_study(files.study)
        # A certificate identity has no spaces: "VA Long Beach" joins as VA_Long_Beach.
        mappings = {name.replace(" ", "_"): m for name, m in mapping_files(study, files.sites).items()}
        tls.provision(root / "federation", sorted(mappings))
    except (ValueError, OSError) as e:
        return _err(f"demo --study: {e}")
    print(f"demo: study {study.name} (sha256 {study.sha256[:16]}...) at {', '.join(sorted(mappings))}, each site reading its "
          f"own export through its mapping file in {files.sites}; federation in {root}", flush=True)
    sites = {name: ["--study", str(files.study), "--mapping", m.source] for name, m in mappings.items()}
    task = [f"study={files.study}", f"study_sites={files.sites}"]
    if files.test_fraction is not None:
        task.append(f"task.test_fraction={files.test_fraction}")
    print("demo: 1/2 the Table 1 job (descriptive statistics, small cells suppressed; its pooled means and SDs "
          "scale the training job)", flush=True)
    port = args.port or _free_port()
    # Each site runs once for both jobs: after the Table 1 job it waits for the training job at the same address.
    agents = _sites(root, port, sites)
    if _coordinator(root, port, "table1", [*task, "runtime.job=describe"]).wait() != 0:
        for agent in agents:
            agent.kill()
        return 1
    statistics = root / "coordinator" / "table1" / "statistics.json"
    print(f"demo: 2/2 training {args.algorithm} for {args.rounds} rounds with the federated scaling", flush=True)
    coordinator = _coordinator(root, port, "train", [*task, f"algorithm={args.algorithm}", f"runtime.rounds={args.rounds}",
                                                     f"runtime.statistics={statistics}"])
    codes = [p.wait() for p in agents] + [coordinator.wait()]
    for log in sorted((root / "coordinator").glob("*/audit.jsonl")) + sorted((root / "sites").glob("*/audit.jsonl")):
        cmd_audit(argparse.Namespace(log=str(log)))
    return 0 if all(c == 0 for c in codes) else 1


def cmd_demo(args) -> int:
    """Provisions 4 hospitals, writes each its data, runs coordinator and sites as separate processes."""
    from nordfl.runtime import tls
    from nordfl.runtime.audit import read_entries

    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="nordfl-demo-"))
    if args.study:
        if args.private:
            return _err("demo: --private is for the heart demo; a study's jobs take the same runtime overrides by hand")
        code = cmd_demo_study(args, root)
        if not args.dir and code == 0 and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return code
    from nordfl.runtime.site_data import write_site_files

    files = {name.replace(" ", "_"): path for name, path in write_site_files(root / "data").items()}
    tls.provision(root / "federation", sorted(files))
    private = PRIVATE_DEMO[args.dp] if args.private else []
    print(f"demo: federation of {', '.join(sorted(files))} in {root}"
          + (f"; private: secure aggregation, DP ({args.dp}), a site policy at each site" if args.private else ""), flush=True)
    port = args.port or _free_port()
    coordinator = _coordinator(root, port, "", [f"algorithm={args.algorithm}", f"runtime.rounds={args.rounds}", *private])
    policy = []
    if args.private:
        (root / "policy.yaml").write_text(PRIVATE_DEMO_POLICY)
        policy = ["--policy", str(root / "policy.yaml")]
    sites = _sites(root, port, {name: ["--data", str(path), *policy] for name, path in files.items()})
    codes = [p.wait() for p in sites] + [coordinator.wait()]
    for log in [root / "coordinator" / "audit.jsonl"] + [root / "sites" / n / "audit.jsonl" for n in sorted(files)]:
        cmd_audit(argparse.Namespace(log=str(log)))
    if args.private:  # each site's epsilon ledger: the last privacy_spent entry of its audit log
        for name in sorted(files):
            log = root / "sites" / name / "audit.jsonl"
            spent = read_entries(log) if log.exists() else []
            final = [e["metrics"] for e in spent if e["event"] == "finished"]
            spent = [e for e in spent if e["event"] == "privacy_spent"]
            if spent:
                e = spent[-1]
                scores = "  ".join(f"{k} {v:.3f}" for k, v in sorted(final[-1].items())) if final else "none"
                print(f"{name}: spent epsilon {float(e['epsilon']):.3g} at delta {e['delta']:g} ({e['mechanism']}, "
                      f"{e['steps']} local steps, {e['updates']} updates); policy sha256 {e['policy_sha256'][:16]}...; "
                      f"final model on its test rows (kept at the site): {scores}")
    if not args.dir and all(c == 0 for c in codes) and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(c == 0 for c in codes) else 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _site_arguments(p: argparse.ArgumentParser) -> None:
    """What a site is given, the same for `nordfl site` and `nordfl preflight`."""
    p.add_argument("--name", required=True)
    p.add_argument("--coordinator", help="HOST:PORT (required unless --dry-run)")
    p.add_argument("--certs", help="this site's certificate folder (key.pem, cert.pem, ca.pem)")
    p.add_argument("--data", action="append", help="CSV or Parquet file (repeatable; with --mapping, default: its data files)")
    p.add_argument("--task", default="heart")
    p.add_argument("--study", help="a study file (YAML): this site serves that study, with --mapping")
    p.add_argument("--mapping", help="this site's mapping of its own records to the study (YAML)")
    p.add_argument("--policy", help="this site's privacy policy (YAML or JSON); a job breaking it is refused")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nordfl", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("provision", help="create a federation's CA and certificates")
    p.add_argument("dir")
    p.add_argument("sites", nargs="*", metavar="SITE",
                   help="sites whose keys are made here (demos); none: sites enrol with `nordfl site init`")
    p.add_argument("--host", action="append", default=None, help="coordinator host name or IP (repeatable)")
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("revoke", help="refuse a site from its next request on")
    p.add_argument("dir")
    p.add_argument("site")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("coordinator", help="run the coordinator")
    p.add_argument("--federation", required=True, help="the folder `nordfl provision` wrote")
    p.add_argument("--state", help="one job: where its state and audit log are kept (resumes from it)")
    p.add_argument("--jobs", help="a service: run the jobs `nordfl job submit` queues in this folder, one after another")
    p.add_argument("--address", default="localhost:50051")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="console lines as text (default) or JSON lines, one flushed line per event")
    p.add_argument("--admin-address", metavar="HOST:PORT",
                   help="serve a read-only status page, /status.json and Prometheus /metrics here (e.g. 127.0.0.1:9464; "
                        "keep it on loopback or an admin network)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local development only)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides: algorithm=..., task=..., runtime.rounds=...")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("site", help="run a hospital's site agent")
    _site_arguments(p)
    p.add_argument("--state", help="where this site keeps its state and audit log (required unless --dry-run)")
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="console lines as text (default) or JSON lines, one flushed line per event")
    p.add_argument("--metrics-address", metavar="HOST:PORT",
                   help="serve this site's Prometheus /metrics and /status.json here (loopback or an admin network)")
    p.add_argument("--stay", action="store_true",
                   help="stay connected after a job and serve the next one (a coordinator service's site)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local development only)")
    p.add_argument("--dry-run", action="store_true",
                   help="train one round locally and show what would leave the site; connect to nothing")
    p.add_argument("--job", help="--dry-run: the job as JSON (e.g. the `job` of a coordinator's `start` audit entry)")
    p.add_argument("overrides", nargs="*", help="--dry-run: Hydra overrides of the job, as the coordinator takes them")
    p.set_defaults(func=cmd_site)

    p = sub.add_parser("job", help="the jobs of a coordinator service: submit, list, abort")
    job = p.add_subparsers(dest="job_command", required=True)
    j = job.add_parser("submit", help="queue a job (Hydra overrides, as `nordfl coordinator` takes them)")
    j.add_argument("--jobs", required=True, help="the service's --jobs folder")
    j.add_argument("--by", help="who submits (default: $USER), kept with the job")
    j.add_argument("--certs", help="the admin's certificate folder (key.pem, cert.pem): the job is signed with it")
    j.add_argument("overrides", nargs="*")
    j = job.add_parser("list", help="every job and its state")
    j.add_argument("--jobs", required=True)
    j = job.add_parser("abort", help="remove a queued job, or stop a running one")
    j.add_argument("--jobs", required=True)
    j.add_argument("--certs", help="the admin's certificate folder: a running job stops only for a signed request")
    j.add_argument("id")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("audit", help="audit log tools")
    audit = p.add_subparsers(dest="audit_command", required=True)
    v = audit.add_parser("verify", help="check a log's hash chain; reports the first broken entry")
    v.add_argument("log")
    v.add_argument("--cert", help="the writer's certificate (cert.pem): every entry must carry its signature")
    v.add_argument("--peer", help="the other party's log (the coordinator's for a site's, or a site's): cross-checks the "
                                  "heads each recorded of the other, so a log cut or rewritten after an exchange is found")
    v.set_defaults(func=cmd_audit)

    p = sub.add_parser("preflight", help="check a site before it goes live: software, certificates, clock, data, coordinator")
    _site_arguments(p)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the coordinator (default 10)")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("status", help="the running coordinator's job, round, sites online, epsilon and certificates")
    p.add_argument("--admin", default="127.0.0.1:9464", help="the coordinator's --admin-address (default 127.0.0.1:9464)")
    p.add_argument("--json", action="store_true", help="the raw status document")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("export", help="write the trained model and its model card")
    p.add_argument("--state", required=True, help="the coordinator's --state folder")
    p.add_argument("--out", required=True, help="a new folder for the model and its card")
    p.add_argument("--site-log", action="append", metavar="SITE=LOG",
                   help="a site's audit log, for the epsilon it spent (repeatable)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="a federation of the 4 heart-disease hospitals on localhost, over mTLS")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--algorithm", default="fedavg")
    p.add_argument("--dir", help="keep everything in this folder (default: a temporary one, removed after)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--private", action="store_true",
                   help="secure aggregation and differential privacy on, every site under a privacy policy")
    p.add_argument("--dp", choices=sorted(PRIVATE_DEMO), default="sgd",
                   help="--private: DP-SGD at the sites (sgd, default) or DP-FedAvg with distributed noise (update)")
    p.add_argument("--study", help="run a study instead (a shipped one, e.g. nordic5, or a study file with its sites' "
                                   "mapping files beside it): its Table 1 job, then training")
    p.set_defaults(func=cmd_demo)
    return parser


def cmd_site_check(args) -> int:
    """``nordfl site check``: the site's files under its mapping, checked against the study; nothing connects."""
    from nordfl.runtime.site_data import SiteDataError, load_study_records
    from nordfl.tasks.mapping import MappingError
    from nordfl.tasks.study import StudyError

    try:
        records = load_study_records(args.study, args.mapping, args.data)
    except (StudyError, MappingError, SiteDataError) as e:
        return _err(str(e))
    study, mapping = records.study, records.mapping
    print(f"study {study.name} (sha256 {study.sha256[:16]}...), site {mapping.site}: every row checked; nothing was sent")
    for path, report in zip(records.paths, records.reports):
        print(f"{path}:\n{report.format()}")
    return 0


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nordfl site check",
                                description="check this site's files against a study under its mapping, before any connection")
    p.add_argument("--study", required=True, help="the study file (YAML)")
    p.add_argument("--mapping", required=True, help="this site's mapping of its records to the study (YAML)")
    p.add_argument("--data", action="append", help="CSV or Parquet file (repeatable; default: the mapping's data files)")
    return p


def _key_request_parser(prog: str, holder: str, name_help: str) -> argparse.ArgumentParser:
    """``nordfl site init`` and ``nordfl admin init``: the same key and request, for a site or a study lead."""
    p = argparse.ArgumentParser(prog=prog, description=f"make {holder} private key (it stays here) and a certificate request")
    p.add_argument("--name", required=True, help=name_help)
    p.add_argument("--certs", required=True, help="the certificate folder (key.pem is created here)")
    p.add_argument("--renew", action="store_true", help="a new key and request under renew/ for a renewal")
    p.set_defaults(func=cmd_site_init)
    return p


def _enrol_parsers() -> dict[tuple[str, str], argparse.ArgumentParser]:
    """``nordfl site init``, ``nordfl admin init``, ``nordfl admin approve``, ``nordfl site install``: certificates
    issued where their keys stay."""
    init = _key_request_parser("nordfl site init", "this site's", "the site name the federation knows this hospital by")
    admin = _key_request_parser("nordfl admin init", "a study lead's", "the admin's name (not a site's)")
    approve = argparse.ArgumentParser(prog="nordfl admin approve",
                                      description="sign a site's certificate request with the federation CA")
    approve.add_argument("dir", help="the federation folder (with ca/ca.key and federation.json)")
    approve.add_argument("request", help="the request.pem the site sent")
    approve.add_argument("--fingerprint", required=True, help="the fingerprint the site read out to you")
    approve.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    approve.add_argument("--role", choices=("site", "admin"), default="site",
                         help="site (default), or admin: a study lead who may sign jobs for the coordinator service")
    approve.set_defaults(func=cmd_admin_approve)
    install = argparse.ArgumentParser(prog="nordfl site install",
                                      description="install the certificate the federation admin sent back")
    install.add_argument("--certs", required=True, help="this site's certificate folder")
    install.add_argument("cert", help="the cert.pem from the admin")
    install.add_argument("--ca", help="the federation's ca.pem (needed the first time)")
    install.set_defaults(func=cmd_site_install)
    return {("site", "init"): init, ("admin", "approve"): approve, ("site", "install"): install, ("admin", "init"): admin}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["site", "check"]:
        return cmd_site_check(_check_parser().parse_args(argv[2:]))
    parsers = _enrol_parsers()
    enrol = parsers.get(tuple(argv[:2]))
    if enrol is not None:
        args = enrol.parse_args(argv[2:])
        return args.func(args)
    if argv[:1] == ["admin"]:
        parsers[("admin", "approve")].print_usage(sys.stderr)
        return _err(f"admin: expected `nordfl admin init ...` or `nordfl admin approve ...`, got {' '.join(argv[1:2]) or 'nothing'}")
    args = _parser().parse_args(argv)
    if args.command == "site" and not args.dry_run:
        missing = [f"--{k}" for k in ("coordinator", "state") if not getattr(args, k)]
        if missing:
            return _err(f"site: {' and '.join(missing)} required unless --dry-run")
        if not args.insecure and not args.certs:
            return _err("site: --certs is required unless --insecure")
    if args.command == "provision" and args.host is None:
        args.host = ["localhost", "127.0.0.1"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
