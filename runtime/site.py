"""The site agent: runs next to a hospital's data, dials out to the coordinator, trains.

It checks its local files against the task's schema before connecting; then joins, pulls
work by long-polling, runs the algorithm's ``client_update`` on its own rows, and sends
back only the update (named raw tensors) and a few numbers. Its client state (SCAFFOLD's
c_i) stays on its disk: a round's new state is kept aside (``pending_state.npz``) until a
later task header says the coordinator aggregated that round's update
(``last_contribution``), and dropped otherwise (the round was retried, the update rejected
or left out at the deadline). The coordinator's record decides, not the reply to the
upload, which a crash can lose; so a site's state follows the global model. Lost
connections are retried with exponential backoff; every task received and update sent is
in the site's audit log.

Privacy (docs/privacy.md): a site may run under its own policy file (``nordfl.runtime.policy``),
checked against the job before any training; the hash of the policy and every epsilon spent
(a ledger, ``privacy_spent``, written before the update leaves) are in the audit log.
``dry_run`` trains one round locally and shows what would leave, sending nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData
from nordfl.algorithms.personal import personal_key, personal_model
from nordfl.runtime import plugins as job_plugins
from nordfl.runtime import secagg, secure_round, wire
from nordfl.runtime.audit import AuditLog
from nordfl.runtime.config import Job, build_job
from nordfl.runtime.policy import (PolicyViolation, PrivacyCost, SitePolicy, check_job, check_job_budget, check_spend,
                                   privacy_cost, uses_dp)
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc
from nordfl.runtime.site_data import StudyRecords, TaskFiles, load_site_table
from nordfl.runtime.store import atomic_write_text, load_tree, save_tree
from nordfl.tasks import Examples

LEDGER_FILE = "privacy_ledger.json"
RPC_TIMEOUT = 60.0  # seconds for a Join, and beyond the long-poll's wait for a PollTask: a frozen coordinator is noticed
UPLOAD_TIMEOUT = 600.0  # seconds for one upload
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def _json_number(x: float):
    """inf is not JSON: the audit log writes it as the string "inf"."""
    return x if math.isfinite(x) else str(x)


class _NotYet(Exception):
    """The coordinator still serves the job this site has finished: try again shortly."""


class SiteRefused(Exception):
    """The coordinator (or this site's own checks) refused to work together; retrying will not help."""


class JobRefused(SiteRefused):
    """This site refused one job (its policy forbids it); a site that stays for the next job goes on waiting."""


def metrics_row(metrics) -> dict:
    """A task's metrics tuple as plain floats, the non-finite ones (e.g. AUC of one class) left out."""
    return {k: float(v) for k, v in zip(metrics._fields, metrics) if np.isfinite(float(v))}


SECAGG_TASKS = {pb.TaskHeader.SECAGG_SHARE_KEYS: pb.SHARE_KEYS, pb.TaskHeader.SECAGG_MASKED_INPUT: pb.MASKED_INPUT,
                pb.TaskHeader.SECAGG_UNMASK: pb.UNMASK_SHARES}
"""The coordinator's secure-aggregation tasks and the step each is answered with."""


class _HeldRound(NamedTuple):
    """A securely aggregated round in progress at this site: its protocol client and the vector it will mask."""

    round: int
    attempt: int
    client: Any
    vector: np.ndarray
    specs: list


class LocalSetup(NamedTuple):
    """What a site builds from a job and its own rows: the same objects at every site and in a dry run."""

    algorithm: Any
    fns: Any
    train: ClientData
    test: Examples
    init_params: Any


def local_setup(name: str, data, job: Job) -> LocalSetup:
    """``data``: the site's ``TaskFiles`` or ``StudyRecords`` (``runtime.site_data``)."""
    built = build_job(job)
    split = data.split(name, job)
    train = ClientData(Examples(jnp.asarray(split.train.x), jnp.asarray(split.train.y)), jnp.int32(len(split.train.y)))
    test = Examples(jnp.asarray(split.test.x), jnp.asarray(split.test.y))
    return LocalSetup(built.algorithm, built.fns, train, test, built.model.init_params)


def round_key(job: Job, round_index: int, site_index: int) -> jax.Array:
    """The PRNG key of a site's local training in a round (the simulator derives the same one).

    With DP the key is fresh secret randomness instead: the DP noise (and DP-SGD's sampling)
    must be unknown to the coordinator, which knows the job's seed and could otherwise
    recompute, and subtract, the noise."""
    if uses_dp(job):
        return jax.random.wrap_key_data(np.frombuffer(os.urandom(8), np.uint32))
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(job.seed), round_index), site_index)


def dp_update_metrics(num_steps: float, epsilon: float) -> dict:
    """What a DP site's plain update reports: its local steps and, when finite, the epsilon it has spent so far
    (for the coordinator's status board). Losses and scores are not noised, so they stay at the site."""
    return {"num_steps": num_steps} | ({"epsilon": float(epsilon)} if math.isfinite(epsilon) else {})


def site_records(data, task: str):
    """A site's local data: its ``StudyRecords`` as given, or its files for ``task`` read and checked (``TaskFiles``)."""
    if isinstance(data, StudyRecords):
        return data
    return TaskFiles(task, load_site_table(data, task))


def summary_egress(arrays: dict) -> dict:
    """A site's summary as plain lists, for its own audit log: exactly the numbers that left."""
    return {part: {name: [None if np.isnan(v) else float(v) for v in values] for name, values in tree.items()}
            for part, tree in arrays.items()}


class SiteAgent:
    """One hospital's agent.

    Args:
      name: the site's name; must equal its certificate's identity.
      address: the coordinator, ``host:port``.
      data: the site's CSV/Parquet files for ``task``, or its ``StudyRecords`` (a study's records under the
        site's mapping, already checked: ``site_data.load_study_records``).
      state_dir: where the client state and the audit log live.
      credentials: mTLS channel credentials, or None for insecure local development.
      task: the task the files serve (not used with ``StudyRecords``); a job for another task is refused.
      policy: this site's privacy policy (``policy.load_policy``); a job breaking it is refused before training.
      stay_after_describe: after a study's Table 1 job, wait for its training job instead of returning.
      signing_key: the site's private key (PEM path, its TLS key): every audit entry is signed with it.
    """

    def __init__(self, name: str, address: str, data: Union[Sequence[Path], StudyRecords], state_dir: Path,
                 credentials: Optional[grpc.ChannelCredentials], *, task: str = "heart",
                 log: Callable[[str], None] = logging.getLogger("nordfl.site").info, max_backoff: float = 30.0, wait_seconds: int = 5,
                 policy: Optional[SitePolicy] = None, stay_after_describe: bool = False, signing_key=None, stay: bool = False):
        self.name, self.address, self.credentials, self.task, self.log = name, address, credentials, task, log
        self.stay_after_describe, self.stay = stay_after_describe, stay
        self.run_id: Optional[str] = None
        self.last_round: Optional[int] = None  # the last round this site trained (its metrics endpoint shows it)
        self.last_contact: Optional[float] = None  # when the coordinator last answered (time.time())
        self.spent_epsilon = float("nan")
        self.max_backoff, self.wait_seconds = max_backoff, wait_seconds
        self.data = site_records(data, task)  # read and checked before anything connects
        self.task = self.data.task
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.state_dir / "audit.jsonl", actor=f"site:{name}", signing_key=signing_key)
        self.policy = policy
        self.secure: Optional[_HeldRound] = None  # this site's part of a securely aggregated round, in memory only
        if policy is not None:
            self.audit.record("policy_loaded", path=policy.path, sha256=policy.sha256, rules=policy.rules())
        if isinstance(self.data, StudyRecords):
            self.audit.record("site_checked", study=self.data.study.name, study_sha256=self.data.study.sha256,
                              mapping=self.data.mapping.source, reports=[r.format() for r in self.data.reports])
        self.final_metrics: Optional[dict] = None
        self.job_kind: Optional[str] = None  # the kind of the last job joined: train, or describe (a study's Table 1)

    # ------------------------------------------------------------------ connection
    def _channel(self) -> grpc.Channel:
        from nordfl.runtime.coordinator import KEEPALIVE

        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=KEEPALIVE)
        return grpc.secure_channel(self.address, self.credentials, options=KEEPALIVE)

    @property
    def rows(self) -> int:
        """The complete rows this site holds, declared at Join: no update's weight may exceed it."""
        if isinstance(self.data, StudyRecords):
            return len(next(iter(self.data.values.values()), ()))
        return len(self.data.examples.y)

    def run(self, jobs: Optional[int] = None) -> dict:
        """Works until the run finishes; returns this site's metrics of the final model.

        With ``stay_after_describe``, a finished Table 1 job is not the end: the site waits for the
        study's training job (the next run at the same address) and returns when that one finishes.
        With ``stay`` (a federation that outlives its jobs) the site waits for the next job after each one,
        finished, stopped or refused by its policy, and returns only after ``jobs`` jobs (None: never)."""
        self.failures = 0  # consecutive failed connections; reset by every successful join
        done_run, result, handled = None, {}, 0  # handled: jobs ended (finished, refused, stopped) while staying
        while jobs is None or handled < jobs:
            try:
                with self._channel() as channel:
                    result = self._session(pb_grpc.FederationStub(channel), done_run)
                if not self.stay and not (self.job_kind == "describe" and self.stay_after_describe):
                    return result
                handled += self.stay
                what = "Table 1 job" if self.job_kind == "describe" else "job"
                self.log(f"{self.name}: {what} {self.run_id} finished; waiting for the next job at {self.address}")
            except JobRefused as e:
                if not self.stay:
                    raise
                handled, result = handled + 1, {}
                self.log(f"{e}; waiting for the next job")
            except _NotYet:
                time.sleep(3.0)  # Joins stay under the coordinator's rate limit while it closes the finished job
                continue
            except grpc.RpcError as e:
                if self.stay and e.code() == grpc.StatusCode.FAILED_PRECONDITION and self.run_id != done_run:
                    self.audit.record("job_stopped", run_id=self.run_id, reason=e.details())
                    self.log(f"{self.name}: job {self.run_id} stopped at the coordinator ({e.details()}); waiting for the next job")
                    handled, result = handled + 1, {}
                else:
                    if e.code() not in RETRYABLE:
                        self.audit.record("refused", code=e.code().name, reason=e.details())
                        raise SiteRefused(f"coordinator refused {self.name}: {e.code().name}: {e.details()}") from None
                    self.failures += 1
                    delay = min(self.max_backoff, 0.5 * 2 ** min(self.failures, 10)) * random.uniform(0.5, 1.0)
                    self.audit.record("connection_lost", durable=False, code=e.code().name, reason=e.details(),
                                      retry_in_s=round(delay, 2))
                    # The details carry TLS hints (e.g. CERTIFICATE_VERIFY_FAILED) that UNAVAILABLE alone hides.
                    self.log(f"{self.name}: coordinator unreachable ({e.code().name}: {e.details()}); retrying in {delay:.1f}s")
                    time.sleep(delay)
                    continue
            done_run = self.run_id  # this run has ended here: a Join that finds it still open waits (_NotYet)
        return result

    # ------------------------------------------------------------------ one connected session
    def _session(self, stub: pb_grpc.FederationStub, done_run: Optional[str] = None) -> dict:
        reply = stub.Join(pb.JoinRequest(site=self.name, protocol_version=wire.PROTOCOL_VERSION, rows=self.rows),
                          timeout=RPC_TIMEOUT)
        if reply.accepted and reply.run_id == done_run:  # the finished Table 1 job's coordinator is still closing
            raise _NotYet()
        if not reply.accepted:
            self.audit.record("join_refused", reason=reply.reason)
            raise SiteRefused(f"coordinator refused {self.name}: {reply.reason}")
        raw = json.loads(reply.job_json)
        self._check_plugins(reply.run_id, raw.get("plugins", []))  # before the job is parsed: its options may be theirs
        job = Job.from_json(reply.job_json)
        if job.task_config["name"] != self.task:
            raise SiteRefused(f"the coordinator's job is task {job.task_config['name']!r}; this site serves {self.task!r}")
        self._check_study(reply.run_id, job)
        self.audit.record("joined", run_id=reply.run_id, job=raw, rows=self.rows)
        self.failures, self.last_contact = 0, time.time()
        self.run_id = reply.run_id
        self.site_index, self.chunk_size = int(raw["site_index"]), int(raw["chunk_size"])
        self.job_kind = job.kind
        if job.kind == "describe":
            return self._describe(stub, job)
        self._prepare(job, raw)
        while True:
            stream = stub.PollTask(pb.PollRequest(run_id=reply.run_id, site=self.name, wait_seconds=self.wait_seconds),
                                   timeout=self.wait_seconds + RPC_TIMEOUT)
            header, payload = self._receive(stream)
            if header.round > self.pending_round >= 0:  # the coordinator moved past our pending round
                self._commit() if header.last_contribution == self.pending_round else self._discard()
            if header.kind == pb.TaskHeader.WAIT:
                continue
            if header.kind in SECAGG_TASKS:
                self._secure_step(stub, reply.run_id, header, payload)
                continue
            message = self._decode(header, payload)
            if header.kind == pb.TaskHeader.FINISHED:
                return self._finish(stub, reply.run_id, header, message)
            if header.round == self.pending_round:  # the round is being retried: start again from committed state
                self._discard()
            self._train(stub, reply.run_id, header, message)

    def _prepare(self, job: Job, raw: dict) -> None:
        setup = local_setup(self.name, self.data, job)
        self.algorithm, self.fns, self.job, self.train, self.test = setup.algorithm, setup.fns, job, setup.train, setup.test
        self.planned = self._check_policy(job)
        params = setup.init_params
        self.message_template = jax.eval_shape(self.algorithm.broadcast, self.algorithm.server_init(params))
        self.state = self.algorithm.client_init(params)
        self.pending_round, self.pending_state = -1, None
        committed, pending = self.state_dir / "client_state.npz", self.state_dir / "pending_state.npz"
        if committed.exists():
            state, meta = load_tree(committed, self.state)
            if meta.get("run_id") == self.run_id:
                self.state = state
            else:  # another run's state (e.g. SCAFFOLD's c_i) must not leak into this one
                self.audit.record("state_reset", previous_run=meta.get("run_id"))
                committed.unlink()
                pending.unlink(missing_ok=True)
        if pending.exists():
            self.pending_state, meta = load_tree(pending, self.state)
            self.pending_round = int(meta["round"])
        self.ledger = self._load_ledger()
        self.spent_epsilon = float("nan")  # set by the first update's spend (DP runs)
        self._update = jax.jit(self.algorithm.client_update)
        self._evaluate = jax.jit(self.fns.evaluate)

    def _check_study(self, run_id: str, job: Job) -> None:
        """A study job must carry exactly this site's study (same canonical hash), or the site refuses it."""
        if not isinstance(self.data, StudyRecords):
            return
        mine = self.data.study
        theirs = job.study_spec
        if theirs is None or theirs.sha256 != mine.sha256:
            got = "no study" if theirs is None else f"study {theirs.name} sha256 {theirs.sha256}"
            self.audit.record("study_refused", run_id=run_id, expected=mine.sha256, got=None if theirs is None else theirs.sha256)
            raise SiteRefused(f"{self.name}: refused the job of run {run_id}: it carries {got}; this site's study file is "
                              f"{mine.name} sha256 {mine.sha256}")
        self.audit.record("study_accepted", durable=False, run_id=run_id, study=mine.name, study_sha256=mine.sha256)

    def _describe(self, stub, job: Job) -> dict:
        """A study's Table 1 job: sends this site's summaries once (their numbers in the audit log first); waits for the end."""
        while True:
            stream = stub.PollTask(pb.PollRequest(run_id=self.run_id, site=self.name, wait_seconds=self.wait_seconds),
                                   timeout=self.wait_seconds + RPC_TIMEOUT)
            header, _ = self._receive(stream)
            if header.kind == pb.TaskHeader.FINISHED:
                self.audit.record("finished", round=int(header.round), job="describe")
                self.final_metrics = {}
                return {}
            if header.kind != pb.TaskHeader.DESCRIBE:
                continue
            arrays = self.data.describe(job)
            specs, payload = wire.encode(arrays)
            manifest = wire.manifest_to_proto(specs, payload)
            self.audit.record("summary_sent", round=int(header.round), sha256=manifest.sha256, bytes=len(payload),
                              summary=summary_egress(arrays))
            head = pb.UpdateHeader(run_id=self.run_id, round=header.round, site=self.name, weight=0.0, manifest=manifest)
            chunks = [pb.UpdateChunk(header=head)] + [pb.UpdateChunk(data=bytes(c)) for c in wire.chunks(payload, self.chunk_size)]
            result = stub.SubmitUpdate(iter(chunks), timeout=UPLOAD_TIMEOUT)
            self.audit.record("update_result", durable=False, round=int(header.round), accepted=result.accepted, reason=result.reason)
            if not result.accepted:
                raise SiteRefused(f"{self.name}: the coordinator rejected this site's summary: {result.reason}")

    def _check_plugins(self, run_id: str, raw_plugins) -> None:
        """Refuses, before anything of it runs, a job whose plugins this site lacks, has in another
        version or code, or may not run (policy ``allowed_plugins``); else imports them."""
        try:
            admitted = job_plugins.check_and_load(job_plugins.parse(raw_plugins),
                                                  self.policy.allowed_plugins if self.policy else None)
        except (job_plugins.PluginRefused, ValueError) as e:
            self.audit.record("plugin_refused", run_id=run_id, reason=str(e))
            raise SiteRefused(f"{self.name}: refused the job of run {run_id}: {e}") from None
        if admitted:
            self.audit.record("plugins_admitted", run_id=run_id, plugins=[p._asdict() for p in admitted])

    # ------------------------------------------------------------------ privacy
    def _check_policy(self, job: Job) -> PrivacyCost:
        """The site's policy against the job, before any training; returns the job's planned privacy cost."""
        num_examples = int(self.train.num_examples)
        try:
            planned = privacy_cost(job, num_examples) if self.policy is None else check_job(self.policy, job, num_examples)
            check_job_budget(job, planned)
        except PolicyViolation as e:
            self.audit.record("policy_refused", run_id=self.run_id, rule=e.rule, job_value=str(e.job_value),
                              limit=str(e.limit), policy_sha256=self.policy.sha256 if self.policy else None)
            raise JobRefused(f"{self.name}: refused the job of run {self.run_id}: {e}") from None
        if self.policy is None:
            return planned
        self.audit.record("policy_accepted", run_id=self.run_id, policy_sha256=self.policy.sha256,
                          planned_epsilon=_json_number(planned.epsilon), delta=planned.delta, mechanism=planned.mechanism)
        return planned

    def _load_ledger(self) -> dict:
        """Steps and updates this site has sent in this run (kept across restarts: privacy spent is never unspent)."""
        path = self.state_dir / LEDGER_FILE
        if path.exists():
            ledger = json.loads(path.read_text())
            if ledger.get("run_id") == self.run_id:
                return ledger
        return {"run_id": self.run_id, "steps": 0, "updates": 0}

    def _spend(self, round_index: int, steps: int) -> None:
        """Records what this update spends, durably, before it leaves; refuses to exceed the policy's epsilon."""
        ledger = {"run_id": self.run_id, "steps": self.ledger["steps"] + steps, "updates": self.ledger["updates"] + 1}
        # DP-FedAvg is charged per round of the run (cohort sampling amplifies it), and per update
        # sent when retries made those more: never less than what left this site.
        charged = max(round_index + 1, ledger["updates"])
        spent = privacy_cost(self.job, int(self.train.num_examples), steps=ledger["steps"], updates=charged)
        if spent.mechanism == "none":
            self.ledger = ledger
            return
        try:
            check_spend(self.policy, spent, self.job)
        except PolicyViolation as e:
            self.audit.record("policy_refused", run_id=self.run_id, round=round_index, rule=e.rule,
                              job_value=str(e.job_value), limit=str(e.limit), policy_sha256=self.policy.sha256 if self.policy else None)
            raise SiteRefused(f"{self.name}: stopped before round {round_index}'s update left: {e}") from None
        atomic_write_text(self.state_dir / LEDGER_FILE, json.dumps(ledger))
        self.ledger, self.spent_epsilon = ledger, float(spent.epsilon)
        self.audit.record("privacy_spent", round=round_index, mechanism=spent.mechanism, epsilon=_json_number(spent.epsilon),
                          delta=spent.delta, steps=ledger["steps"], updates=ledger["updates"],
                          policy_sha256=self.policy.sha256 if self.policy else None)

    def _commit(self) -> None:
        self.state = self.pending_state
        save_tree(self.state_dir / "client_state.npz", self.state, round=self.pending_round, run_id=self.run_id)
        (self.state_dir / "pending_state.npz").unlink(missing_ok=True)
        self.audit.record("state_committed", round=self.pending_round)
        self.pending_round, self.pending_state = -1, None

    def _discard(self) -> None:
        (self.state_dir / "pending_state.npz").unlink(missing_ok=True)
        self.audit.record("state_discarded", round=self.pending_round)
        self.pending_round, self.pending_state = -1, None

    def _receive(self, stream) -> tuple[pb.TaskHeader, bytes]:
        first = next(stream)
        if not first.HasField("header"):
            raise SiteRefused("malformed task stream from the coordinator: no header first")
        header = first.header
        specs, total, sha = wire.manifest_from_proto(header.manifest)
        payload = wire.join_chunks((c.data for c in stream), expected_total=total, max_total=max(total, 0))
        if specs or total:
            wire.check_payload(payload, total, sha)
        return header, payload

    def _decode(self, header: pb.TaskHeader, payload: bytes):
        specs, _, sha = wire.manifest_from_proto(header.manifest)
        message = wire.decode(specs, payload, self.message_template, copy=True)
        self.audit.record("task_received", durable=False, kind=pb.TaskHeader.Kind.Name(header.kind), round=int(header.round), sha256=sha)
        return message

    def _train(self, stub, run_id: str, header: pb.TaskHeader, message) -> None:
        r = int(header.round)
        self.last_round, self.last_contact = r, time.time()
        test_metrics = self._evaluate(message.params, self.test, jnp.ones(len(self.test.y), bool))
        out = self._update(message, self.state, self.train, round_key(self.job, r, self.site_index), jnp.int32(header.num_epochs))
        self._spend(r, int(out.metrics.num_steps))
        self.pending_round, self.pending_state = r, out.client_state
        save_tree(self.state_dir / "pending_state.npz", out.client_state, round=r, run_id=self.run_id)
        if header.secure_aggregation:
            return self._secure_start(stub, run_id, header, out)
        specs, payload = wire.encode(out.update)
        manifest = wire.manifest_to_proto(specs, payload)  # hashes the payload once, for the header and the log
        metrics = {"train_loss": float(out.metrics.train_loss), "num_steps": float(out.metrics.num_steps)}
        metrics |= {f"test_{k}": v for k, v in metrics_row(test_metrics).items()}
        if uses_dp(self.job):
            metrics = dp_update_metrics(metrics["num_steps"], self.spent_epsilon)
        # Durable before the bytes leave: what left the site is on its disk first; its hash travels in the header.
        sent = self.audit.record("update_sent", round=r, sha256=manifest.sha256, weight=float(out.weight),
                                 tensors=[[s.name, s.dtype, list(s.shape)] for s in specs], bytes=len(payload), metrics=metrics)
        head = pb.UpdateHeader(run_id=run_id, round=r, site=self.name, weight=float(out.weight),
                               manifest=manifest, metrics=metrics, audit_head=sent["hash"])
        chunks = [pb.UpdateChunk(header=head)] + [pb.UpdateChunk(data=bytes(c)) for c in wire.chunks(payload, self.chunk_size)]
        result = stub.SubmitUpdate(iter(chunks), timeout=UPLOAD_TIMEOUT)
        self.audit.record("update_result", durable=False, round=r, accepted=result.accepted, reason=result.reason,
                          coordinator_audit_head=result.audit_head or None)
        # An accepted update's state stays pending: it is committed once a task header's
        # last_contribution says round r's aggregate used it (the reply alone can be lost).
        if not result.accepted:
            self.log(f"{self.name}: round {r} update rejected: {result.reason}")
            self._discard()

    # ------------------------------------------------------------------ secure aggregation
    def _secure_start(self, stub, run_id: str, header: pb.TaskHeader, out) -> None:
        """Keeps the trained update in memory as the round's vector and advertises fresh keys (step 0)."""
        r, attempt = int(header.round), int(header.attempt)
        if not self.job.secure_aggregation:
            raise SiteRefused("the coordinator asked for secure aggregation, which the job it sent does not have")
        loss = 0.0 if uses_dp(self.job) else float(out.metrics.train_loss)  # not noised: not sent under DP
        vector = secure_round.vector_of(out.update, float(out.weight), loss)
        client = secagg.SecAggClient(secure_round.config_of(self.job), run_id, secure_round.protocol_round(r, attempt),
                                     secure_round.site_id(self.job, self.name))
        specs = wire.template_of(out.update)
        self.secure = _HeldRound(r, attempt, client, vector, specs)
        self._secure_send(stub, run_id, header, pb.ADVERTISE, client.advertise().to_bytes())

    def _secure_step(self, stub, run_id: str, header: pb.TaskHeader, payload: bytes) -> None:
        """Steps 1-3: answers the coordinator's protocol message; a step this site cannot take is refused, with why."""
        r, attempt = int(header.round), int(header.attempt)
        step = SECAGG_TASKS[header.kind]
        self.audit.record("task_received", durable=False, kind=pb.TaskHeader.Kind.Name(header.kind), round=r, attempt=attempt,
                          sha256=header.manifest.sha256)
        held = self.secure
        try:
            if held is None or (held.round, held.attempt) != (r, attempt):
                raise secagg.SecAggError(f"no secure-aggregation state for round {r} attempt {attempt} (restarted?)")
            if step == pb.SHARE_KEYS:
                message = held.client.share_keys(secagg.Roster.from_bytes(payload))
            elif step == pb.MASKED_INPUT:
                message = held.client.masked_input(held.vector, secagg.ForwardedShares.from_bytes(payload))
            else:
                request = secagg.UnmaskRequest.from_bytes(payload)
                limit = max(self.job.min_cohort, self.policy.min_cohort or 0) if self.policy else self.job.min_cohort
                if len(request.survivors) < limit:  # this site's own check of the minimum cohort
                    raise secagg.UnmaskRefused(f"only {len(request.survivors)} survivors; the minimum cohort is {limit}")
                message = held.client.unmask(request)
        except (secagg.SecAggError, secagg.SecAggAborted) as e:
            self.audit.record("secagg_refused", round=r, attempt=attempt, step=pb.SecAggStep.Name(step), reason=str(e))
            self.log(f"{self.name}: round {r}: secure aggregation step {pb.SecAggStep.Name(step)} refused: {e}")
            self._secure_send(stub, run_id, header, step, b"", refusal=str(e))
            return
        data = message.to_bytes()
        if step == pb.MASKED_INPUT:
            # Durable before it leaves: the masked vector's contents (names, shapes), never its values.
            self.audit.record("update_sent", round=r, attempt=attempt, secure_aggregation=True, sha256=wire.sha256_hex(data),
                              tensors=[[s.name, s.dtype, list(s.shape)] for s in held.specs] + [["weight", "float64", []],
                                                                                                  ["count", "float64", []],
                                                                                                  ["train_loss", "float64", []]],
                              masked_values=int(len(held.vector)), bytes=len(data), clipped=held.client.clipped)
            if held.client.clipped:
                self.log(f"{self.name}: round {r}: {held.client.clipped} value(s) clipped to runtime.secagg_clip_range="
                         f"{self.job.secagg_clip_range:g} before masking")
        self._secure_send(stub, run_id, header, step, data)

    def _secure_send(self, stub, run_id: str, header: pb.TaskHeader, step: int, data: bytes, refusal: str = "") -> None:
        head = pb.UpdateHeader(run_id=run_id, round=header.round, site=self.name, attempt=header.attempt, secagg_step=step,
                               manifest=wire.manifest_to_proto([], data), refusal=refusal)
        chunks = [pb.UpdateChunk(header=head)] + [pb.UpdateChunk(data=bytes(c)) for c in wire.chunks(data, self.chunk_size)]
        result = stub.SubmitUpdate(iter(chunks), timeout=UPLOAD_TIMEOUT)
        self.audit.record("update_result", durable=False, round=int(header.round), attempt=int(header.attempt),
                          step=pb.SecAggStep.Name(step), accepted=result.accepted, reason=result.reason)
        if not result.accepted:
            self.log(f"{self.name}: round {header.round} {pb.SecAggStep.Name(step)} rejected: {result.reason}")

    def _finish(self, stub, run_id: str, header: pb.TaskHeader, message) -> dict:
        everything = jnp.ones(len(self.test.y), bool)
        metrics = metrics_row(self._evaluate(message.params, self.test, everything))
        if self.algorithm.personalise is not None:  # the site's own model (Ditto, FedPer, fine-tuned): scored here too
            own = personal_model(self.algorithm, message, self.state, self.train, personal_key(self.job.seed, self.site_index))
            metrics |= {f"personal_{k}": v for k, v in metrics_row(self._evaluate(own, self.test, everything)).items()}
        # Under DP the test scores (of patients too) are not sent: an empty report only says "done".
        report = {} if uses_dp(self.job) else metrics | {"test_rows": float(len(self.test.y))}  # rows: to pool scores
        head = pb.UpdateHeader(run_id=run_id, round=header.round, site=self.name, weight=0.0,
                               manifest=wire.manifest_to_proto([], b""), metrics=report)
        try:
            stub.SubmitUpdate(iter([pb.UpdateChunk(header=head)]), timeout=RPC_TIMEOUT)
        except grpc.RpcError as e:  # the run is over either way; the coordinator may already have left
            self.audit.record("final_metrics_not_delivered", code=e.code().name)
        self.audit.record("finished", round=int(header.round), metrics=metrics)
        self.final_metrics = metrics
        return metrics


# ---------------------------------------------------------------------- dry run


class TensorPreview(NamedTuple):
    """One tensor that would leave the site: wire name, dtype, shape and L2 norm."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    norm: float


class EgressPreview(NamedTuple):
    """Exactly what one round's upload would carry (``dry_run``), and what it would spend."""

    site: str
    tensors: list[TensorPreview]
    weight: float
    metrics: dict
    bytes: int
    sha256: str
    privacy: PrivacyCost
    secure_aggregation: bool
    policy_sha256: Optional[str]
    plugins: tuple = ()  # the job's plugins (registry.PluginIdentity), checked against this site's installed code

    def format(self) -> str:
        """The preview as text for a DPO."""
        lines = [f"{self.site}: dry run: one local round trained; NOTHING was sent. An update would carry:"]
        width = max(len(t.name) for t in self.tensors) if self.tensors else 0
        for t in self.tensors:
            lines.append(f"  {t.name:<{width}}  {t.dtype}{list(t.shape)}  L2 norm {t.norm:.6g}")
        lines.append(f"  {len(self.tensors)} tensor(s), {self.bytes} bytes, sha256 {self.sha256}")
        lines.append(f"  weight {self.weight:g}")
        for plugin in self.plugins:
            lines.append(f"  runs {plugin.describe()}: installed here at that version and hash")
        lines.append("  metrics " + ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items()))
        if self.secure_aggregation:
            lines.append("  secure aggregation is on: these tensors, times the weight, and the weight leave only masked "
                         "(quantised); the coordinator sees their sum over the cohort, not this site's values; "
                         "the per-round test metrics are not sent")
        if self.privacy.mechanism == "none":
            lines.append("  differential privacy: none (epsilon unbounded)")
        else:
            lines.append(f"  differential privacy: {self.privacy.mechanism}, this round would spend epsilon "
                         f"{self.privacy.epsilon:.4g} at delta {self.privacy.delta:.3g} ({self.privacy.steps} step(s))")
        if self.policy_sha256:
            lines.append(f"  site policy sha256 {self.policy_sha256}: the job passes it")
        return "\n".join(lines)


def dry_run(name: str, data: Union[Sequence[Path], StudyRecords], job: Job, *, policy: Optional[SitePolicy] = None,
            audit: Optional[AuditLog] = None) -> EgressPreview:
    """Trains one round locally from the job's initial model and returns what its update would carry.

    Connects to nothing. The site's policy is checked first (``PolicyViolation`` if the job breaks
    it). With ``audit`` the preview is recorded (``dry_run``), so the DPO's look is on file too.
    """
    admitted = job_plugins.check_and_load(job.plugins, policy.allowed_plugins if policy else None)
    setup = local_setup(name, site_records(data, job.task_config["name"]), job)
    num_examples = int(setup.train.num_examples)
    if policy is not None:
        check_job(policy, job, num_examples)
    site_index = job.sites.index(name) if name in job.sites else 0
    message = setup.algorithm.broadcast(setup.algorithm.server_init(setup.init_params))
    out = jax.jit(setup.algorithm.client_update)(message, setup.algorithm.client_init(setup.init_params), setup.train,
                                                 round_key(job, 0, site_index), jnp.int32(setup.algorithm.local.num_epochs))
    update = jax.tree_util.tree_map(np.asarray, out.update)
    specs, payload = wire.encode(update)
    leaves = jax.tree_util.tree_leaves(update)
    tensors = [TensorPreview(s.name, s.dtype, s.shape, wire.global_norm(leaf)) for s, leaf in zip(specs, leaves)]
    steps = int(out.metrics.num_steps)
    spent = privacy_cost(job, num_examples, steps=steps, updates=1)
    metrics = {"train_loss": float(out.metrics.train_loss), "num_steps": float(steps)}
    if not job.secure_aggregation:  # the received model's scores on the test rows travel with a plain update
        scores = setup.fns.evaluate(message.params, setup.test, jnp.ones(len(setup.test.y), bool))
        metrics |= {f"test_{k}": v for k, v in metrics_row(scores).items()}
    if uses_dp(job):
        metrics = {"num_steps": float(steps)} if job.secure_aggregation else dp_update_metrics(float(steps), spent.epsilon)
    elif job.secure_aggregation:
        metrics = {"train_loss (inside the masked vector)": metrics["train_loss"]}
    preview = EgressPreview(name, tensors, float(out.weight), metrics, len(payload), wire.sha256_hex(payload),
                            spent._replace(steps=steps), job.secure_aggregation, policy.sha256 if policy else None, admitted)
    if audit is not None:
        audit.record("dry_run", tensors=[[t.name, t.dtype, list(t.shape), t.norm] for t in tensors], weight=preview.weight,
                     bytes=preview.bytes, sha256=preview.sha256, epsilon=_json_number(spent.epsilon), delta=spent.delta,
                     mechanism=spent.mechanism, policy_sha256=preview.policy_sha256)
    return preview


def summary_preview(name: str, records: StudyRecords, job: Job) -> str:
    """What this site would send in a study's Table 1 job, every number of it, for a DPO; nothing is sent."""
    from nordfl.tasks.describe import NUMERIC_FIELDS

    lines = [f"{name}: dry run of the Table 1 job of study {records.study.name}: NOTHING was sent. The summary would carry:"]
    for part, tree in summary_egress(records.describe(job)).items():
        lines.append(f"  {'all rows' if part == 'all' else 'training rows'}:")
        for variable, values in tree.items():
            v = records.study.variable(variable)
            labels = [*v.codes, "missing"] if v.kind in ("categorical", "binary") else NUMERIC_FIELDS
            shown = ", ".join(f"{label} {'withheld' if x is None else f'{x:.12g}'}" for label, x in zip(labels, values))
            lines.append(f"    {variable}: {shown}")
    return "\n".join(lines)
