"""The coordinator: runs the rounds of a federation; sites dial in, the coordinator never dials out.

A round: pick the cohort, publish the server's broadcast, collect the sites' updates (each
checked: identity, run, round, cohort, duplicate, shape/dtype against the algorithm's
template, SHA-256, NaN/Inf, norm and weight bounds; a bad one is rejected and logged and
the round goes on), aggregate, ``server_update``, write the state atomically, log it. A
round closes when every cohort site answered, or at ``round_timeout`` if at least
``min_sites`` did; otherwise it is retried. An aggregate of fewer than ``min_cohort`` sites
is never applied (``round_refused_min_cohort``; the round is retried). After a restart the
coordinator resumes at the last completed round with the same run id, so nothing completed
is lost.

With ``runtime.secure_aggregation`` a round runs the four steps of ``secagg`` (keys, shares,
masked inputs, unmasking; ``secure_round.CoordinatorRound``), each closed when all its sites
answered or at ``round_timeout``; the coordinator receives masked inputs only and applies the
unmasked SUM (weighted update, weight, count) through the algorithm's ``server_update``. Fewer
than the threshold at any step aborts the attempt, which is retried with fresh keys.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData
from nordfl.runtime import tls, wire
from nordfl.runtime.audit import AuditError, AuditLog
from nordfl.runtime.bounds import RejectionLimiter, StreamGate, bounded_text
from nordfl.runtime.policy import uses_dp
from nordfl.runtime.config import Job, build_job, check_runtime, compose_config, job_from_config
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc
from nordfl.runtime.secagg import SecAggAborted, SecAggError
from nordfl.runtime.secure_round import STEP_NAMES, CoordinatorRound, aggregate_of, message_limit
from nordfl.runtime.store import atomic_write_text, load_tree, save_tree
from nordfl.tasks import Examples

STATE_FILE = "coordinator_state.npz"
MAX_METRICS = 32
ROWS_FILE = "declared_rows.json"
JOINS_PER_MINUTE = 30  # a site rejoins after each lost connection, with backoff: more is a loop or an attack


class Limits(NamedTuple):
    """The runtime group of the config, as plain numbers."""

    min_sites: int
    min_cohort: int
    round_timeout: float
    max_round_attempts: int
    cohort_size: Optional[int]
    max_update_norm: float
    max_weight: float
    norm_clip_multiple: Optional[float]
    upload_timeout: float
    max_uploads_per_site: int
    chunk_size: int
    max_message_bytes: int
    wait_seconds: int


class Rejected(Exception):
    """An update or request refused, with the reason given back to the site and logged."""


class Stale(Rejected):
    """A message for an earlier attempt of the open round: refused, but the site stays in this attempt."""


class Stopped(Exception):
    """The run stopped before its last round (too few sites); sites are told why instead of "finished"."""


class OpenRound(NamedTuple):
    """The round being collected; its broadcast is encoded and hashed once, then streamed to each site."""

    index: int
    attempt: int
    cohort: tuple[str, ...]
    payload: bytes
    manifest: pb.Manifest


class JobServer:
    """What every job's coordinator does, whatever the job: admits sites by certificate, answers Join
    with the job, and streams task headers and payloads. Subclasses (``Coordinator`` for training,
    ``runtime.table_one.TableOneJob`` for a study's Table 1) give ``poll``, ``submit``, ``tick`` and ``finished``."""

    def __init__(self, job: Job, limits: Limits, state_dir: Path, admitted: Callable[[Optional[str]], tuple[bool, str]],
                 log: Callable[[str], None] = logging.getLogger("nordfl.coordinator").info, insecure: bool = False, signing_key=None):
        self.job, self.limits, self.admitted, self.log, self.insecure = job, limits, admitted, log, insecure
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.state_dir / "audit.jsonl", actor="coordinator", signing_key=signing_key)
        self.site_index = {site: i for i, site in enumerate(job.sites)}
        self.final_metrics: dict[str, dict] = {}
        self.lock = threading.Condition()
        self.rows_lock = threading.Lock()
        self.stopped: Optional[str] = None
        self.run_id = ""
        self.last_contribution: dict[str, int] = {}  # site -> last round whose aggregate used its update
        rows_file = self.state_dir / ROWS_FILE  # kept across restarts: a site does not join again to resume
        self.declared_rows: dict[str, int] = json.loads(rows_file.read_text()) if rows_file.exists() else {}
        self.site_epsilon: dict[str, float] = {}  # site -> the epsilon it last reported spent (DP runs)
        self.last_seen: dict[str, float] = {}  # site -> time of its last admitted request (the status board's "online")
        self.rejections = RejectionLimiter(self._summarise_rejections)
        self.join_rate = RejectionLimiter(self._summarise_rejections, burst=JOINS_PER_MINUTE, window=60.0)
        self.uploads = StreamGate(limits.max_uploads_per_site, limits.max_uploads_per_site * len(job.sites) + 4)

    def stop(self, reason: str) -> None:
        """Ends the job now (an abort): polling sites hear ``reason``; its state stays as it is."""
        with self.lock:
            if self.stopped is None:
                self.stopped = reason
                self.audit.record("stopped", round=getattr(self, "round", 0), reason=reason)
                self.log(f"coordinator: {reason}")
            self.lock.notify_all()

    def _summarise_rejections(self, kind: str, caller: str, count: int) -> None:
        self.audit.record("rejections_suppressed", durable=False, kind=kind, site=caller, count=count)
        self.log(f"coordinator: {count} more {kind} from {caller} not logged one by one")

    def refuse(self, kind: str, caller: Optional[str], reason: str, **fields) -> None:
        """Logs one refusal (audit ``kind`` and console), peer-supplied text capped, repeats rate-limited."""
        if not self.rejections.allow(kind, caller):
            return
        fields = {k: bounded_text(v) if isinstance(v, str) else v for k, v in fields.items()}
        self.audit.record(kind, durable=False, site=bounded_text(caller), reason=bounded_text(reason, 1024), **fields)
        self.log(f"coordinator: {kind} ({bounded_text(caller)}): {bounded_text(reason, 1024)}")

    def admit_stream(self, identity: Optional[str]) -> None:
        """Admission before anything is read: a stream from a certificate outside the membership (or revoked)
        is refused when it opens (``Rejected``). Without mTLS (``insecure``) the name comes with the first message."""
        if not self.insecure:
            ok, reason = self.admitted(identity)
            if not ok:
                raise Rejected(reason)

    def _identify(self, identity: Optional[str], claimed: str) -> str:
        if self.insecure:
            identity = claimed
        ok, reason = self.admitted(identity)
        if not ok:
            raise Rejected(reason)
        if claimed and claimed != identity:
            raise Rejected(f"request names site {bounded_text(claimed)!r} but the certificate is {identity!r}")
        self.last_seen[str(identity)] = time.time()
        return identity

    def join(self, identity: Optional[str], request: pb.JoinRequest) -> pb.JoinReply:
        try:
            site = self._identify(identity, request.site)
            if not self.join_rate.allow("join", site):
                raise Rejected(f"more than {JOINS_PER_MINUTE} Joins from {site} in a minute; wait and join again")
            refusal = wire.protocol_refusal(bounded_text(request.protocol_version, 64))
            if refusal:
                raise Rejected(f"site {site}: {refusal}")
        except Rejected as e:
            self.refuse("join_refused", identity or request.site, str(e))
            return pb.JoinReply(accepted=False, reason=str(e))
        rows = int(request.rows)
        with self.rows_lock:  # Joins arrive on several server threads at once
            declared = self.declared_rows.get(site) != rows
            if declared:  # a new declaration is always on file; a repeated one is rate-limited
                self.audit.record("join", site=site, rows=rows)
                self.declared_rows[site] = rows
                atomic_write_text(self.state_dir / ROWS_FILE, json.dumps(self.declared_rows, sort_keys=True))
        if not declared and self.rejections.allow("join", site):
            self.audit.record("join", durable=False, site=site, rows=rows)
        job = json.loads(self.job.to_json()) | {"site_index": self.site_index[site], "chunk_size": self.limits.chunk_size}
        return pb.JoinReply(accepted=True, run_id=self.run_id, job_json=json.dumps(job))

    def _header(self, site: str, kind: int, round_index: int, **fields) -> pb.TaskHeader:
        """Every task header names the run and the last round whose aggregate used ``site``'s update."""
        return pb.TaskHeader(kind=kind, run_id=self.run_id, round=round_index,
                             last_contribution=self.last_contribution.get(site, -1), **fields)

    def _stream(self, header: pb.TaskHeader, payload: bytes) -> Iterator[pb.TaskChunk]:
        yield pb.TaskChunk(header=header)
        for part in wire.chunks(payload, self.limits.chunk_size):
            yield pb.TaskChunk(data=bytes(part))

    def awaiting_final_metrics(self) -> bool:
        """Whether sites may still send their scores of the final model (``run_until_done`` waits for them)."""
        return False

    def _upload_header(self, identity: Optional[str], first: Optional[pb.UpdateChunk]) -> tuple[str, pb.UpdateHeader]:
        """An upload's first chunk: its header, from an admitted site, for this run (else ``Rejected``)."""
        if first is None or not first.HasField("header"):
            raise Rejected("malformed stream: the first chunk must be the header")
        site = self._identify(identity, first.header.site)
        if first.header.run_id != self.run_id:
            raise Rejected(f"update for run {bounded_text(first.header.run_id)!r}; this run is {self.run_id!r}")
        return site, first.header


class Coordinator(JobServer):
    """The round state machine of a training job, independent of gRPC (the servicer below only translates).

    Args:
      job: what every site runs.
      limits: the runtime group.
      state_dir: where the state (after every completed round) and the audit log live.
      admitted: ``identity -> (ok, reason)``; reread on every call so revocations apply at once.
      log: progress lines for the operator.
      insecure: trust the site name a request claims (local development only: no mTLS identity).
      signing_key: the coordinator's private key (PEM path): every audit entry is signed with it.
    """

    def __init__(self, job: Job, limits: Limits, state_dir: Path, admitted: Callable[[Optional[str]], tuple[bool, str]],
                 log: Callable[[str], None] = logging.getLogger("nordfl.coordinator").info, insecure: bool = False, signing_key=None):
        super().__init__(job, limits, state_dir, admitted, log, insecure, signing_key)
        built = build_job(job)
        self.algorithm, self.aggregate = built.algorithm, built.aggregate
        params = built.model.init_params
        self.server = self.algorithm.server_init(params)
        self.update_template = self._update_template(built)
        self._server_update = jax.jit(lambda state, updates, weights: self.algorithm.server_update(
            state, self.aggregate(updates, weights)))
        self._server_update_from = jax.jit(self.algorithm.server_update)  # secure aggregation: from the unmasked sum
        state_path = self.state_dir / STATE_FILE
        self.job_sha256 = wire.sha256_hex(job.to_json().encode())
        if state_path.exists():
            self.server, meta = load_tree(state_path, self.server)
            if meta.get("job_sha256") != self.job_sha256:
                raise ValueError(f"coordinator: the state in {state_path} belongs to another job (algorithm, task, "
                                 "sites or rounds differ); use a fresh --state folder or the original settings")
            self.run_id, self.round = meta["run_id"], int(meta["round"])
            self.last_contribution = dict(meta.get("last_contribution", {}))
            self.audit.record("restart", run_id=self.run_id, round=self.round)
            self.log(f"coordinator: resuming run {self.run_id} at round {self.round}")
        else:
            self.run_id = uuid.uuid4().hex
            self.round = 0
            self._save_state()
            self.audit.record("start", run_id=self.run_id, job=json.loads(job.to_json()))
        self._final: Optional[tuple[bytes, pb.Manifest]] = None
        self.updates: dict[str, tuple] = {}
        self.refused: set[str] = set()  # sites whose update this attempt was rejected: not sent the task again
        self.deadline: Optional[float] = None
        self.secure: Optional[CoordinatorRound] = None  # the open attempt's secure aggregation, if on
        self.open = self._open_round(attempt=1) if self.round < job.rounds else None

    # ------------------------------------------------------------------ round life cycle
    def _update_template(self, built):
        message = self.algorithm.broadcast(self.server)
        client_state = self.algorithm.client_init(built.model.init_params)
        data = ClientData(Examples(jnp.zeros((1, *built.feature_shape), jnp.float32), jnp.zeros(1, built.label_dtype)), jnp.int32(1))
        out = jax.eval_shape(self.algorithm.client_update, message, client_state, data, jax.random.key(0))
        return out.update

    def _cohort(self) -> tuple[str, ...]:
        eligible = [s for s in self.job.sites if self.admitted(s)[0]]
        size = self.limits.cohort_size
        if size is None or size >= len(eligible):
            return tuple(eligible)
        rng = np.random.default_rng([self.job.seed, self.round])
        return tuple(sorted(rng.choice(eligible, size=size, replace=False).tolist()))

    def _open_round(self, attempt: int) -> OpenRound:
        specs, payload = wire.encode(self.algorithm.broadcast(self.server))
        opened = OpenRound(self.round, attempt, self._cohort(), payload, wire.manifest_to_proto(specs, payload))
        self.updates, self.refused, self.deadline = {}, set(), None
        if self.job.secure_aggregation:
            self.secure = CoordinatorRound(self.job, self.run_id, opened.index, attempt, opened.cohort, self.update_template)
        self.audit.record("round_open", durable=False, round=opened.index, attempt=attempt, cohort=list(opened.cohort),
                          broadcast_sha256=opened.manifest.sha256, secure_aggregation=self.job.secure_aggregation)
        return opened

    def tick(self) -> None:
        """Closes or retries the open round when its deadline has passed (called periodically)."""
        with self.lock:
            if self.open is None or self.deadline is None or time.monotonic() < self.deadline:
                return
            if self.secure is not None:
                self._secure_timeout()
            elif len(self.updates) < self.limits.min_sites:
                self._retry_or_stop(f"only {len(self.updates)} of min_sites={self.limits.min_sites} sites answered")
            else:
                self._close_round(reason="timeout")

    def _retry_or_stop(self, why: str) -> None:
        """The open attempt failed (``why``): open the next attempt, or stop after max_round_attempts."""
        if self.open.attempt >= self.limits.max_round_attempts:
            self.stopped = (f"round {self.round}: {why} in {self.open.attempt} attempts; "
                            f"state kept at round {self.round}, restart to retry")
            self.audit.record("stopped", round=self.round, reason=self.stopped)
            self.log(f"coordinator: {self.stopped}")
            self.open = self.secure = None
        else:
            self.audit.record("round_retry", durable=False, round=self.round, attempt=self.open.attempt,
                              answered=sorted(self.updates), reason=why)
            self.log(f"coordinator: round {self.round} retried: {why}")
            self.open = self._open_round(self.open.attempt + 1)
        self.lock.notify_all()

    def _cohort_too_small(self, sites: Sequence[str]) -> bool:
        """The minimum-cohort guard: an aggregate of fewer than ``min_cohort`` sites is never applied
        or released (a small sum can single out one site's update); the attempt is retried instead."""
        if len(sites) >= self.limits.min_cohort:
            return False
        self.audit.record("round_refused_min_cohort", round=self.round, attempt=self.open.attempt, sites=len(sites),
                          min_cohort=self.limits.min_cohort, contributors=sorted(sites))
        self._retry_or_stop(f"refused an aggregate of {len(sites)} site(s): runtime.min_cohort={self.limits.min_cohort}")
        return True

    def _close_round(self, reason: str) -> None:
        sites = sorted(self.updates, key=self.site_index.__getitem__)
        if self._cohort_too_small(sites):
            return
        updates = self._clipped(sites)
        # Stacked on the host (the updates are NumPy arrays): one transfer, not one per site and leaf.
        stacked = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *[updates[s] for s in sites])
        weights = jnp.asarray([self.updates[s][1] for s in sites], jnp.float32)
        self.server, metrics = self._server_update(self.server, stacked, weights)
        losses = [self.updates[s][2]["train_loss"] for s in sites if "train_loss" in self.updates[s][2]]
        self._finish_round(sites, float(np.mean(losses)) if losses else float("nan"), float(metrics.update_norm), reason)

    def _clipped(self, sites: list[str]) -> dict:
        """Each update scaled down to at most ``norm_clip_multiple`` times the round's median norm (logged), so one
        member cannot drag the model within the absolute limit; the others pass unchanged."""
        multiple = self.limits.norm_clip_multiple
        updates = {s: self.updates[s][0] for s in sites}
        if multiple is None or len(sites) < 2:
            return updates
        norms = {s: self.updates[s][3] for s in sites}
        limit = multiple * float(np.median(list(norms.values())))
        for site, norm in norms.items():
            if norm > limit:
                scale = limit / norm
                updates[site] = jax.tree_util.tree_map(lambda leaf: (leaf * scale).astype(leaf.dtype), updates[site])
                self.audit.record("update_clipped", durable=False, site=site, round=self.round, norm=norm, clipped_to=limit,
                                  median_norm=limit / multiple)
                self.log(f"coordinator: round {self.round}: {site}'s update norm {norm:.4g} clipped to {limit:.4g} "
                         f"({multiple:g} x the median)")
        return updates

    def _finish_round(self, sites: list[str], mean_loss: float, update_norm: float, reason: str, **audit_fields) -> None:
        """Bookkeeping once the aggregate of ``sites`` has been applied: save, log, open the next round."""
        self.last_contribution |= {site: self.round for site in sites}
        self.round += 1
        self._save_state()
        self.audit.record("round_closed", round=self.round - 1, reason=reason, contributors=sites,
                          update_norm=update_norm, **audit_fields)
        secure = " (secure aggregation)" if self.job.secure_aggregation else ""
        loss = f"{mean_loss:.4f}" if np.isfinite(mean_loss) else "not sent (DP)"
        self.log(f"round {self.round}/{self.job.rounds}: {len(sites)} sites ({', '.join(sites)}){secure}, "
                 f"mean train loss {loss}, update norm {update_norm:.4f}")
        self.open = self._open_round(attempt=1) if self.round < self.job.rounds else None
        if self.open is None:
            self.secure = None
            self.audit.record("finished", round=self.round)
        self.lock.notify_all()

    # ------------------------------------------------------------------ secure aggregation
    def _secure_timeout(self) -> None:
        """The deadline of a secure-aggregation step passed: close it with whoever answered, or retry."""
        secure = self.secure
        if secure.step == 0 and len(secure.answered) < self.limits.min_sites:
            self._retry_or_stop(f"only {len(secure.answered)} of min_sites={self.limits.min_sites} sites answered")
            return
        self._advance_secure("timeout")

    def _advance_secure(self, reason: str) -> None:
        secure = self.secure
        step = STEP_NAMES[secure.step]
        answered, missing = sorted(secure.answered), sorted(secure.expected - secure.answered)
        try:
            result = secure.advance()
        except SecAggAborted as e:
            self.audit.record("secagg_aborted", round=self.round, attempt=self.open.attempt, step=step, reason=str(e))
            self._retry_or_stop(f"secure aggregation aborted at step {step!r}: {e}")
            return
        self.audit.record("secagg_step_closed", durable=False, round=self.round, attempt=self.open.attempt, step=step,
                          reason=reason, answered=answered, missing=missing)
        if result is None:
            self.deadline = time.monotonic() + self.limits.round_timeout
            self.lock.notify_all()
            return
        sites = sorted((secure.names[i] for i in result.sites), key=self.site_index.__getitem__)
        if self._cohort_too_small(sites):
            return
        aggregate, mean_loss = aggregate_of(result.total, self.update_template)
        if uses_dp(self.job):
            mean_loss = float("nan")  # the sites put 0 there: a loss is not noised, so it is not sent under DP
        self.server, metrics = self._server_update_from(self.server, aggregate)
        bound = result.error_bound / float(aggregate.total_weight) if float(aggregate.total_weight) > 0 else None
        self._finish_round(sites, mean_loss, float(metrics.update_norm), reason, secure_aggregation=True,
                           total_weight=float(aggregate.total_weight), mean_error_bound=bound,
                           step_seconds=[round(t, 4) for t in secure.step_seconds])

    def _submit_secure(self, site: str, header: pb.UpdateHeader, chunks) -> pb.SubmitReply:
        """One site's secure-aggregation message: checked against the open round, attempt and step, then fed to the protocol."""
        step = int(header.secagg_step)
        with self.lock:
            self._check_secure(site, header)
        if header.refusal:  # the site cannot take this step (e.g. it restarted and lost its keys): leave it out
            with self.lock:
                self.refused.add(site)
            self.audit.record("secagg_site_refused", durable=False, site=site, round=int(header.round),
                              attempt=int(header.attempt), step=pb.SecAggStep.Name(step), reason=header.refusal)
            return pb.SubmitReply(accepted=True)
        _, total, sha = wire.manifest_from_proto(header.manifest)
        # The size bound comes from the job (its update's size and its sites), never from the sender.
        limit = min(message_limit(self.update_template, len(self.job.sites)), self.limits.max_message_bytes)
        if total > limit:
            raise Rejected(f"secure-aggregation message announces {total} bytes; this job's are at most {limit} bytes")
        payload = wire.join_chunks((c.data for c in chunks), expected_total=total, max_total=limit)
        wire.check_payload(payload, total, sha)
        with self.lock:
            self._check_secure(site, header)
            try:
                step_name = self.secure.add(site, step, payload)
            except (SecAggError, ValueError) as e:
                raise Rejected(f"secure aggregation: {e}") from None
            if self.deadline is None:
                self.deadline = time.monotonic() + self.limits.round_timeout
            self.audit.record("secagg_received", durable=False, site=site, round=int(header.round), attempt=int(header.attempt),
                              step=step_name, sha256=sha, bytes=total)
            if self.secure.complete():
                self._advance_secure("all answered")
        return pb.SubmitReply(accepted=True)

    def _check_secure(self, site: str, header: pb.UpdateHeader) -> None:
        if self.secure is None or self.open is None:
            raise Rejected("a secure-aggregation message, but no securely aggregated round is open")
        if header.round != self.open.index or header.attempt != self.open.attempt:
            raise Stale(f"late or replayed secure-aggregation message for round {header.round} attempt {header.attempt}; "
                           f"the open round is {self.open.index} attempt {self.open.attempt}")
        if not self.secure.waiting_for(site):
            raise Rejected(f"site {site} is not expected in step {STEP_NAMES[self.secure.step]!r} of round {header.round} "
                           "(not in it, or already answered)")

    def _save_state(self) -> None:
        save_tree(self.state_dir / STATE_FILE, self.server, run_id=self.run_id, round=self.round,
                  job_sha256=self.job_sha256, last_contribution=self.last_contribution)

    @property
    def finished(self) -> bool:
        return self.round >= self.job.rounds

    # ------------------------------------------------------------------ requests
    def poll(self, identity: Optional[str], request: pb.PollRequest) -> Iterator[pb.TaskChunk]:
        site = self._identify(identity, request.site)
        if request.run_id != self.run_id:
            raise Rejected(f"run {bounded_text(request.run_id)!r} is not this coordinator's run {self.run_id!r}; join again")
        wait = min(request.wait_seconds or self.limits.wait_seconds, self.limits.wait_seconds)
        end = time.monotonic() + wait
        with self.lock:
            while True:
                if self.stopped:
                    raise Stopped(f"run stopped: {self.stopped}")
                ok, reason = self.admitted(site)  # again after every wait: a long poll can outlast a revocation
                if not ok:
                    raise Rejected(reason)
                if self.finished:
                    return self._finished(site)
                task = self.open
                if task is not None and site not in self.refused and (
                        self.secure.waiting_for(site) if self.secure is not None
                        else site in task.cohort and site not in self.updates):
                    if self.deadline is None:  # the clock starts when the first site fetches the round
                        self.deadline = time.monotonic() + self.limits.round_timeout
                    break
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return iter([pb.TaskChunk(header=self._header(site, pb.TaskHeader.WAIT, self.round))])
                self.lock.wait(timeout=remaining)
            if self.secure is not None and self.secure.step > 0:
                kind, payload = self.secure.task(site)
                manifest = wire.manifest_to_proto([], payload)
                self.audit.record("task_sent", durable=False, site=site, round=task.index, attempt=task.attempt,
                                  kind=pb.TaskHeader.Kind.Name(kind), sha256=manifest.sha256)
                return self._stream(self._header(site, kind, task.index, manifest=manifest, attempt=task.attempt), payload)
        self.audit.record("task_sent", durable=False, site=site, round=task.index, attempt=task.attempt, sha256=task.manifest.sha256)
        header = self._header(site, pb.TaskHeader.TRAIN, task.index, manifest=task.manifest, attempt=task.attempt,
                              num_epochs=int(self.algorithm.local.num_epochs),
                              secure_aggregation=self.job.secure_aggregation)
        return self._stream(header, task.payload)

    def _finished(self, site: str) -> Iterator[pb.TaskChunk]:
        if self._final is None:  # the final model, encoded and hashed once for every site
            specs, payload = wire.encode(self.algorithm.broadcast(self.server))
            self._final = (payload, wire.manifest_to_proto(specs, payload))
        payload, manifest = self._final
        return self._stream(self._header(site, pb.TaskHeader.FINISHED, self.round, manifest=manifest), payload)

    def awaiting_final_metrics(self) -> bool:
        return len(self.final_metrics) < len(self._cohort())

    def submit(self, identity: Optional[str], chunks: Iterator[pb.UpdateChunk]) -> pb.SubmitReply:
        """Checks and stores one update; the reply says why a rejected one was refused."""
        header = None
        try:
            first = next(chunks, None)  # inside: a stream cut at upload_timeout is a refusal like any other
            header = first.header if first is not None and first.HasField("header") else None
            site, _ = self._upload_header(identity, first)
            identity = site
            specs, total, sha = wire.manifest_from_proto(header.manifest)
            if header.round == self.job.rounds and self.finished and not specs:
                if total:
                    raise Rejected(f"final metrics carry no tensors, but announce {total} bytes")
                metrics = check_metrics(header.metrics)
                test_rows = metrics.pop("test_rows", None)  # protocol v1.5; a v1.4 site does not send it
                if test_rows is not None and not (test_rows >= 0 and float(test_rows).is_integer()):
                    raise Rejected(f"test_rows {test_rows!r}: expected a whole number of rows")
                self.final_metrics[site] = metrics
                self.audit.record("final_metrics", durable=False, site=site, metrics=metrics,
                                  **({} if test_rows is None else {"test_rows": int(test_rows)}))
                with self.lock:
                    self.lock.notify_all()
                return pb.SubmitReply(accepted=True)
            if header.secagg_step != pb.PLAIN:
                if not self.job.secure_aggregation:
                    raise Rejected("a secure-aggregation message in a run without runtime.secure_aggregation")
                return self._submit_secure(site, header, chunks)
            if self.job.secure_aggregation:
                raise Rejected("this run uses secure aggregation: a plain update is refused (the coordinator must only "
                               "see masked inputs)")
            with self.lock:
                self._check_open(site, header)
            # The size comes from the job's tensor specs, never from the sender's announcement.
            expected = wire.check_specs(specs, wire.template_of(self.update_template))
            if total != expected or expected > self.limits.max_message_bytes:
                raise Rejected(f"update announces {total} bytes; the job's tensors are {expected} bytes"
                               + (f" (above max_message_bytes={self.limits.max_message_bytes})"
                                  if expected > self.limits.max_message_bytes else ""))
            metrics = check_metrics(header.metrics)
            payload = wire.join_chunks((c.data for c in chunks), expected_total=expected, max_total=expected)
            wire.check_payload(payload, total, sha)
            update = wire.decode(specs, payload, self.update_template, copy=True)
            wire.check_finite(update)
            norm = wire.global_norm(update)
            if not norm <= self.limits.max_update_norm:
                raise Rejected(f"update norm {norm:.4g} exceeds max_update_norm={self.limits.max_update_norm}")
            weight = float(header.weight)
            bound = min(self.limits.max_weight, max(self.declared_rows.get(site, 0), 1))
            if not 0 <= weight <= bound:
                raise Rejected(f"weight {weight!r} outside [0, {bound:g}] (the {self.declared_rows.get(site, 0)} rows "
                               f"{site} declared at Join, capped by max_weight={self.limits.max_weight:g})")
            with self.lock:
                self._check_open(site, header)  # the round may have closed while the bytes arrived
                # Audit first: an update counts only once its entry is on disk.
                try:
                    entry = self.audit.record("update_accepted", site=site, round=int(header.round), sha256=sha,
                                              weight=weight, norm=norm, metrics=metrics,
                                              site_audit_head=bounded_text(header.audit_head, 64))
                except (AuditError, TypeError, ValueError) as e:
                    raise Rejected(f"the coordinator could not write this update's audit entry ({e}); not accepted") from None
                self.updates[site] = (update, weight, metrics, norm)
                if "epsilon" in metrics:  # a DP site's spend so far, for the status board
                    self.site_epsilon[site] = metrics["epsilon"]
                if self.deadline is None:  # an update computed in an earlier attempt of this round starts the clock too
                    self.deadline = time.monotonic() + self.limits.round_timeout
                if set(self.updates) >= set(self.open.cohort):
                    self._close_round(reason="all answered")
            return pb.SubmitReply(accepted=True, audit_head=entry["hash"])
        except (Rejected, wire.WireError) as e:
            with self.lock:  # a deterministic site would send the same bad update again: not this attempt
                if header is not None and self.open is not None and header.round == self.open.index and identity \
                        and not isinstance(e, Stale):
                    self.refused.add(identity)
            self.refuse("update_rejected", identity, str(e), round=int(header.round) if header else None,
                        sha256=header.manifest.sha256 if header else None)
            return pb.SubmitReply(accepted=False, reason=bounded_text(str(e), 1024))

    def _check_open(self, site: str, header: pb.UpdateHeader) -> None:
        if self.open is None or header.round != self.open.index:
            now = "none" if self.open is None else str(self.open.index)
            raise Rejected(f"late or replayed update for round {header.round}; the open round is {now}")
        if site not in self.open.cohort:
            raise Rejected(f"site {site} is not in round {header.round}'s cohort")
        if site in self.updates:
            raise Rejected(f"duplicate update from {site} for round {header.round}")


def coordinator_for(overrides: Sequence[str], federation_dir: Path, state_dir: Path, *, factory=None, **kwargs) -> JobServer:
    """The coordinator of a provisioned federation, from Hydra-style overrides: a ``Coordinator`` for a
    training job, a ``TableOneJob`` for a study's Table 1 (``runtime.job=describe``).

    The config is checked against the federation's sites before anything starts, and
    ``federation.json`` is re-read on every request so revocations apply at once.
    ``factory`` (default ``Coordinator``) and ``kwargs`` pass through to the constructor.
    """
    cfg = compose_config(list(overrides))
    watcher = tls.FederationWatcher(federation_dir)
    sites = sorted(watcher.current().sites)
    check_runtime(cfg, len(sites))
    limits = Limits(**{k: cfg.runtime[k] for k in Limits._fields})
    job = job_from_config(cfg, sites)
    if factory is None:
        from nordfl.runtime.table_one import TableOneJob

        factory = TableOneJob if job.kind == "describe" else Coordinator
    key = Path(federation_dir) / "coordinator" / "key.pem"  # the audit log is signed with the coordinator's own key
    kwargs.setdefault("signing_key", key if key.exists() else None)
    return factory(job, limits, Path(state_dir), admitted=lambda identity: tls.admit(watcher.current(), identity), **kwargs)


NO_JOB = "no job is running; the next starts when one is submitted (nordfl job submit)"


class Servicer(pb_grpc.FederationServicer):
    """gRPC front: finds the caller's mTLS identity and delegates to the coordinator. A coordinator service
    swaps ``coordinator`` from job to job; while it is None (between jobs) every call is UNAVAILABLE, which
    sites treat as "retry later"."""

    def __init__(self, coordinator: Optional[JobServer], identity: Callable[[grpc.ServicerContext], Optional[str]]):
        self.coordinator, self.identity = coordinator, identity

    def _current(self, context) -> JobServer:
        coordinator = self.coordinator
        if coordinator is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, NO_JOB)
        return coordinator

    def Join(self, request, context):
        return self._current(context).join(self.identity(context), request)

    def PollTask(self, request, context):
        coordinator = self._current(context)
        try:
            yield from coordinator.poll(self.identity(context), request)
        except Rejected as e:
            coordinator.refuse("poll_refused", self.identity(context) or request.site, str(e))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, bounded_text(str(e), 1024))
        except Stopped as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    def SubmitUpdate(self, request_iterator, context):
        """Admission when the stream opens, before a byte is read; a cap on open uploads; a server-side deadline."""
        coordinator, identity = self._current(context), self.identity(context)
        try:
            coordinator.admit_stream(identity)
        except Rejected as e:
            coordinator.refuse("upload_refused", identity, str(e))
            context.abort(grpc.StatusCode.PERMISSION_DENIED, bounded_text(str(e), 1024))
        caller = identity or context.peer()
        busy = coordinator.uploads.enter(caller)
        if busy is not None:
            coordinator.refuse("upload_refused", caller, busy)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, busy)
        expired = threading.Event()
        deadline = threading.Timer(coordinator.limits.upload_timeout, lambda: (expired.set(), context.cancel()))
        deadline.daemon = True  # a stalled stream is cut
        deadline.start()
        try:
            return coordinator.submit(identity, _cancellable(request_iterator, coordinator.limits.upload_timeout, expired))
        finally:
            deadline.cancel()
            coordinator.uploads.leave(caller)


def _cancellable(chunks, timeout: float, expired: threading.Event):
    """The request stream; when it breaks (the deadline cancelled it, or the connection was lost) reading stops
    with ``Rejected`` saying which."""
    timed_out = Rejected(f"upload not complete within runtime.upload_timeout={timeout:g}s; cancelled")
    try:
        yield from chunks
    except grpc.RpcError:
        if expired.is_set():
            raise timed_out from None
        raise Rejected("upload stream broke before its end (connection lost or cancelled by the site)") from None
    if expired.is_set():  # a cancelled stream may also just end, with no error
        raise timed_out


def check_metrics(metrics) -> dict:
    """A header's metrics as a dict, if few, short-named and finite (else ``Rejected``): they go to the audit log."""
    if len(metrics) > MAX_METRICS:
        raise Rejected(f"{len(metrics)} metrics; at most {MAX_METRICS} are accepted")
    for name, value in metrics.items():
        if len(name) > 64:
            raise Rejected(f"metric name {bounded_text(name, 64)!r} is longer than 64 characters")
        if not np.isfinite(value):
            raise Rejected(f"metric {bounded_text(name, 64)!r} is {value!r}: metrics must be finite numbers")
    return dict(metrics)


KEEPALIVE = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
             ("grpc.http2.min_ping_interval_without_data_ms", 10_000), ("grpc.keepalive_permit_without_calls", 1)]
"""gRPC keepalive on both ends: a dead peer or a cut link is noticed within about 30 s, not at the TCP timeout."""


def serve(coordinator: JobServer, address: str, credentials: Optional[grpc.ServerCredentials]) -> tuple[grpc.Server, int]:
    """Starts the gRPC server on ``address`` (``host:port``, port 0 picks one); returns it and its port."""
    server, port, _ = serve_servicer(Servicer(coordinator, identity_for(credentials)), len(coordinator.job.sites), address,
                                     credentials)
    return server, port


def identity_for(credentials: Optional[grpc.ServerCredentials]):
    """How the servicer learns who calls: the verified certificate with TLS, nobody without (``--insecure``)."""
    return (lambda context: None) if credentials is None else tls.peer_identity


def serve_servicer(servicer: Servicer, sites: int, address: str,
                   credentials: Optional[grpc.ServerCredentials]) -> tuple[grpc.Server, int, Servicer]:
    """Starts a gRPC server for ``servicer``, sized for ``sites`` (long polls hold a worker each)."""
    from concurrent.futures import ThreadPoolExecutor

    workers = 4 * sites + 8
    server = grpc.server(ThreadPoolExecutor(max_workers=workers), options=KEEPALIVE,
                         maximum_concurrent_rpcs=workers - 2)  # beyond it: RESOURCE_EXHAUSTED, not a queue
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"coordinator: cannot listen on {address}")
    server.start()
    return server, port, servicer


def drive(coordinator: JobServer, final_metrics_grace: float = 30.0, stop_requested: Callable[[], Optional[str]] = lambda: None) -> None:
    """Drives round timeouts until the run finishes (or stops), then waits briefly for the sites' final metrics
    (or, when stopped, for polling sites to hear why). ``stop_requested`` returns a reason to stop the job now."""
    while not coordinator.finished and coordinator.stopped is None:
        reason = stop_requested()
        if reason:
            coordinator.stop(reason)
            break
        coordinator.tick()
        time.sleep(0.1)
    if coordinator.stopped:
        time.sleep(min(final_metrics_grace, coordinator.limits.wait_seconds + 1))
        return
    end = time.monotonic() + final_metrics_grace
    while coordinator.awaiting_final_metrics() and time.monotonic() < end:
        time.sleep(0.1)


def run_until_done(coordinator: JobServer, server: grpc.Server, final_metrics_grace: float = 30.0) -> None:
    """``drive`` one job, then stop the server."""
    drive(coordinator, final_metrics_grace)
    server.stop(grace=2).wait()
