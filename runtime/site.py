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
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData
from nordfl.runtime import wire
from nordfl.runtime.audit import AuditLog
from nordfl.runtime.config import Job, build_job
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc
from nordfl.runtime.site_data import load_site_table
from nordfl.runtime.store import load_tree, save_tree
from nordfl.tasks import Examples
from nordfl.tasks.heart import prepare_site

SUPPORTED_TASKS = ("heart",)
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


class SiteRefused(Exception):
    """The coordinator (or this site's own checks) refused to work together; retrying will not help."""


def _metrics_row(metrics) -> dict:
    return {k: float(v) for k, v in zip(metrics._fields, metrics) if np.isfinite(float(v))}


class SiteAgent:
    """One hospital's agent.

    Args:
      name: the site's name; must equal its certificate's identity.
      address: the coordinator, ``host:port``.
      data_paths: the site's CSV/Parquet files.
      state_dir: where the client state and the audit log live.
      credentials: mTLS channel credentials, or None for insecure local development.
      task: the task these files serve; a job for another task is refused.
    """

    def __init__(self, name: str, address: str, data_paths: Sequence[Path], state_dir: Path,
                 credentials: Optional[grpc.ChannelCredentials], *, task: str = "heart",
                 log: Callable[[str], None] = print, max_backoff: float = 30.0, wait_seconds: int = 5):
        if task not in SUPPORTED_TASKS:
            raise SiteRefused(f"task: {task!r} has no site data schema; expected one of {', '.join(SUPPORTED_TASKS)}")
        self.name, self.address, self.credentials, self.task, self.log = name, address, credentials, task, log
        self.max_backoff, self.wait_seconds = max_backoff, wait_seconds
        self.examples = load_site_table(data_paths)  # checked before anything connects
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(self.state_dir / "audit.jsonl", actor=f"site:{name}")
        self.final_metrics: Optional[dict] = None

    # ------------------------------------------------------------------ connection
    def _channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def run(self) -> dict:
        """Works until the run finishes; returns this site's metrics of the final model."""
        self.failures = 0  # consecutive failed connections; reset by every successful join
        while True:
            try:
                with self._channel() as channel:
                    return self._session(pb_grpc.FederationStub(channel))
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    self.audit.record("refused", code=e.code().name, reason=e.details())
                    raise SiteRefused(f"coordinator refused {self.name}: {e.code().name}: {e.details()}") from None
                self.failures += 1
                delay = min(self.max_backoff, 0.5 * 2 ** min(self.failures, 10)) * random.uniform(0.5, 1.0)
                self.audit.record("connection_lost", durable=False, code=e.code().name, reason=e.details(), retry_in_s=round(delay, 2))
                # The details carry TLS hints (e.g. CERTIFICATE_VERIFY_FAILED) that UNAVAILABLE alone hides.
                self.log(f"{self.name}: coordinator unreachable ({e.code().name}: {e.details()}); retrying in {delay:.1f}s")
                time.sleep(delay)

    # ------------------------------------------------------------------ one connected session
    def _session(self, stub: pb_grpc.FederationStub) -> dict:
        reply = stub.Join(pb.JoinRequest(site=self.name, protocol_version=wire.PROTOCOL_VERSION))
        if not reply.accepted:
            self.audit.record("join_refused", reason=reply.reason)
            raise SiteRefused(f"coordinator refused {self.name}: {reply.reason}")
        raw = json.loads(reply.job_json)
        job = Job.from_json(reply.job_json)
        if job.task_config["name"] != self.task:
            raise SiteRefused(f"the coordinator's job is task {job.task_config['name']!r}; this site serves {self.task!r}")
        self.audit.record("joined", durable=False, run_id=reply.run_id, job=raw)
        self.failures = 0
        self.run_id = reply.run_id
        self._prepare(job, raw)
        while True:
            stream = stub.PollTask(pb.PollRequest(run_id=reply.run_id, site=self.name, wait_seconds=self.wait_seconds))
            header, payload = self._receive(stream)
            if header.round > self.pending_round >= 0:  # the coordinator moved past our pending round
                self._commit() if header.last_contribution == self.pending_round else self._discard()
            if header.kind == pb.TaskHeader.WAIT:
                continue
            message = self._decode(header, payload)
            if header.kind == pb.TaskHeader.FINISHED:
                return self._finish(stub, reply.run_id, header, message)
            if header.round == self.pending_round:  # the round is being retried: start again from committed state
                self._discard()
            self._train(stub, reply.run_id, header, message)

    def _prepare(self, job: Job, raw: dict) -> None:
        built = build_job(job)
        self.algorithm, self.fns, self.job = built.algorithm, built.fns, job
        self.site_index, self.chunk_size = int(raw["site_index"]), int(raw["chunk_size"])
        split = prepare_site(self.name, self.examples, seed=int(job.task_config["data_seed"]))
        self.train = ClientData(Examples(jnp.asarray(split.train.x), jnp.asarray(split.train.y)), jnp.int32(len(split.train.y)))
        self.test = Examples(jnp.asarray(split.test.x), jnp.asarray(split.test.y))
        params = built.model.init_params
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
        self._update = jax.jit(self.algorithm.client_update)
        self._evaluate = jax.jit(self.fns.evaluate)

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
        if specs:
            wire.check_payload(payload, total, sha)
        return header, payload

    def _decode(self, header: pb.TaskHeader, payload: bytes):
        specs, _, sha = wire.manifest_from_proto(header.manifest)
        message = wire.decode(specs, payload, self.message_template, copy=True)
        self.audit.record("task_received", durable=False, kind=pb.TaskHeader.Kind.Name(header.kind), round=int(header.round), sha256=sha)
        return message

    def _train(self, stub, run_id: str, header: pb.TaskHeader, message) -> None:
        r = int(header.round)
        test_metrics = self._evaluate(message.params, self.test, jnp.ones(len(self.test.y), bool))
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.job.seed), r), self.site_index)
        out = self._update(message, self.state, self.train, key, jnp.int32(header.num_epochs))
        self.pending_round, self.pending_state = r, out.client_state
        save_tree(self.state_dir / "pending_state.npz", out.client_state, round=r, run_id=self.run_id)
        specs, payload = wire.encode(out.update)
        manifest = wire.manifest_to_proto(specs, payload)  # hashes the payload once, for the header and the log
        metrics = {"train_loss": float(out.metrics.train_loss), "num_steps": float(out.metrics.num_steps)}
        metrics |= {f"test_{k}": v for k, v in _metrics_row(test_metrics).items()}
        head = pb.UpdateHeader(run_id=run_id, round=r, site=self.name, weight=float(out.weight),
                               manifest=manifest, metrics=metrics)
        chunks = [pb.UpdateChunk(header=head)] + [pb.UpdateChunk(data=bytes(c)) for c in wire.chunks(payload, self.chunk_size)]
        # Durable before the bytes leave: what left the site is on its disk first.
        self.audit.record("update_sent", round=r, sha256=manifest.sha256, weight=float(out.weight),
                          tensors=[[s.name, s.dtype, list(s.shape)] for s in specs], bytes=len(payload), metrics=metrics)
        result = stub.SubmitUpdate(iter(chunks))
        self.audit.record("update_result", durable=False, round=r, accepted=result.accepted, reason=result.reason)
        # An accepted update's state stays pending: it is committed once a task header's
        # last_contribution says round r's aggregate used it (the reply alone can be lost).
        if not result.accepted:
            self.log(f"{self.name}: round {r} update rejected: {result.reason}")
            self._discard()

    def _finish(self, stub, run_id: str, header: pb.TaskHeader, message) -> dict:
        metrics = _metrics_row(self._evaluate(message.params, self.test, jnp.ones(len(self.test.y), bool)))
        head = pb.UpdateHeader(run_id=run_id, round=header.round, site=self.name, weight=0.0,
                               manifest=wire.manifest_to_proto([], b""), metrics=metrics)
        try:
            stub.SubmitUpdate(iter([pb.UpdateChunk(header=head)]))
        except grpc.RpcError as e:  # the run is over either way; the coordinator may already have left
            self.audit.record("final_metrics_not_delivered", code=e.code().name)
        self.audit.record("finished", round=int(header.round), metrics=metrics)
        self.final_metrics = metrics
        return metrics
