"""A study's Table 1 job (``runtime.job=describe``): the federated descriptive statistics, and the
scaling every site then preprocesses with.

One task per site (``DESCRIBE``): the site answers with the sufficient statistics of its mapped
rows (``tasks.describe.summary_arrays``: per numeric variable count, sum, sum of squares, minimum
and maximum, missing count; per categorical or binary variable the count of each code and of
missing), once over all its rows (for the table) and once over its training rows (for the
scaling), as named float64 tensors checked against the study's template. A site's minimum and
maximum are withheld at the site when its count is below the study's ``min_cell``.

When every site answered (or at ``round_timeout`` with at least ``min_sites``), the coordinator
writes to its state folder only what may be released:

- ``table1.md`` and ``table1.csv``: ``tasks.describe.table_one``, small cells suppressed so that
  none can be recovered from the released margins;
- ``statistics.json``: the pooled training rows' means, SDs and modes (``Scaling``), with the
  study's hash, data seed and test fraction; the training job reads it (``runtime.statistics``)
  and sends these figures, and nothing else of the summaries, to every site.

The per-site counts behind them stay in the coordinator's memory and are not written anywhere;
the audit log records each summary's SHA-256 and the released files' hashes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional

from nordfl.runtime import wire
from nordfl.runtime.config import STATISTICS_FILE
from nordfl.runtime.bounds import bounded_text
from nordfl.runtime.coordinator import JobServer, Rejected, Stopped
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.store import atomic_write_text
from nordfl.tasks.describe import summary_from_arrays, summary_template, table_one
from nordfl.tasks.study_data import pooled_summary, scaling


class TableOneJob(JobServer):
    """Collects every site's summary once and releases the suppressed Table 1 and the pooled scaling."""

    def __init__(self, job, limits, state_dir, admitted, log=logging.getLogger("nordfl.coordinator").info, insecure: bool = False, signing_key=None):
        super().__init__(job, limits, state_dir, admitted, log, insecure, signing_key)
        self.study = job.study_spec
        self.template = {"all": summary_template(self.study), "train": summary_template(self.study)}
        self.summaries: dict[str, dict] = {}  # site -> {"all": summary, "train": summary}
        self.deadline: Optional[float] = None
        self.round = 0
        self.released: dict[str, Path] = {}
        self.told_finished: set[str] = set()  # sites that heard the job is over (the server waits for them)
        self.run_id = uuid.uuid4().hex
        self.audit.record("start", run_id=self.run_id, job=json.loads(job.to_json()))

    @property
    def finished(self) -> bool:
        return self.round >= 1

    def awaiting_final_metrics(self) -> bool:
        """Until every site that sent a summary has heard that the job is over (else it would retry a closed server)."""
        with self.lock:
            return not set(self.summaries) <= self.told_finished

    def tick(self) -> None:
        with self.lock:
            if self.finished or self.stopped or self.deadline is None or time.monotonic() < self.deadline:
                return
            if len(self.summaries) >= self.limits.min_sites:
                self._release(reason="timeout")
            else:
                self.stopped = (f"Table 1 job: only {len(self.summaries)} of min_sites={self.limits.min_sites} sites sent "
                                "their summary before runtime.round_timeout")
                self.audit.record("stopped", round=0, reason=self.stopped)
                self.log(f"coordinator: {self.stopped}")
            self.lock.notify_all()

    def poll(self, identity: Optional[str], request: pb.PollRequest) -> Iterator[pb.TaskChunk]:
        site = self._identify(identity, request.site)
        if request.run_id != self.run_id:
            raise Rejected(f"run {bounded_text(request.run_id)!r} is not this coordinator's run {self.run_id!r}; join again")
        end = time.monotonic() + min(request.wait_seconds or self.limits.wait_seconds, self.limits.wait_seconds)
        with self.lock:
            while True:
                if self.stopped:
                    raise Stopped(f"run stopped: {self.stopped}")
                if self.finished:
                    self.told_finished.add(site)
                    return self._stream(self._header(site, pb.TaskHeader.FINISHED, 1), b"")
                if site not in self.summaries:
                    if self.deadline is None:
                        self.deadline = time.monotonic() + self.limits.round_timeout
                    self.audit.record("task_sent", durable=False, site=site, round=0, kind="DESCRIBE")
                    return self._stream(self._header(site, pb.TaskHeader.DESCRIBE, 0), b"")
                remaining = end - time.monotonic()
                if remaining <= 0:
                    return self._stream(self._header(site, pb.TaskHeader.WAIT, 0), b"")
                self.lock.wait(timeout=remaining)

    def submit(self, identity: Optional[str], chunks: Iterator[pb.UpdateChunk]) -> pb.SubmitReply:
        """Checks one site's summary against the study's template and keeps it; releases when all have answered."""
        site = identity
        try:
            site, header = self._upload_header(identity, next(chunks, None))
            specs, total, sha = wire.manifest_from_proto(header.manifest)
            expected = wire.check_specs(specs, wire.template_of(self.template))  # the size is the study's, not the sender's
            if total != expected:
                raise Rejected(f"summary announces {total} bytes; the study's tensors are {expected} bytes")
            payload = wire.join_chunks((c.data for c in chunks), expected_total=expected, max_total=expected)
            wire.check_payload(payload, total, sha)
            arrays = wire.decode(specs, payload, self.template, copy=True)
            try:
                summary = {part: summary_from_arrays(self.study, arrays[part], f"{site}'s summary ({part} rows)")
                           for part in ("all", "train")}
            except ValueError as e:
                raise Rejected(str(e)) from None
            with self.lock:
                if self.finished or self.stopped:
                    raise Rejected("the Table 1 job is over")
                if site in self.summaries:
                    raise Rejected(f"duplicate summary from {site}")
                self.summaries[site] = summary
                self.audit.record("summary_accepted", site=site, sha256=sha, rows=self._rows(summary["all"]))
                self.log(f"coordinator: {site} sent its summary ({len(self.summaries)}/{len(self.job.sites)} sites)")
                if set(self.summaries) >= set(self.job.sites):
                    self._release(reason="all answered")
            return pb.SubmitReply(accepted=True)
        except (Rejected, wire.WireError) as e:
            self.refuse("update_rejected", site, str(e))
            return pb.SubmitReply(accepted=False, reason=bounded_text(str(e), 1024))

    def _rows(self, summary: dict) -> int:
        outcome = summary[self.study.outcome]
        return int(sum(outcome.values())) if isinstance(outcome, dict) else int(outcome.count + outcome.missing)

    def _release(self, reason: str) -> None:
        """Writes the suppressed Table 1 and the pooled scaling; the per-site counts are written nowhere."""
        sites = [s for s in self.job.sites if s in self.summaries]
        table = table_one(self.study, {s: self.summaries[s]["all"] for s in sites})
        shared = scaling(self.study, pooled_summary(self.study, [self.summaries[s]["train"] for s in sites]))
        task = self.job.task_config
        statistics = {"study": self.study.name, "study_sha256": self.study.sha256, "data_seed": int(task["data_seed"]),
                      "test_fraction": float(task["test_fraction"]), "sites": sites, "scaling": shared.as_json()}
        files = {"table1.md": table.markdown() + "\n", "table1.csv": table.csv(),
                 STATISTICS_FILE: json.dumps(statistics, indent=2, sort_keys=True) + "\n"}
        for name, text in files.items():
            atomic_write_text(self.state_dir / name, text)
            self.released[name] = self.state_dir / name
        self.audit.record("table_one_released", reason=reason, sites=sites, study_sha256=self.study.sha256, min_cell=table.min_cell,
                          files={name: wire.sha256_hex(text.encode()) for name, text in files.items()})
        self.round = 1
        self.audit.record("finished", round=1)
        self.log(f"coordinator: Table 1 of study {self.study.name} over {len(sites)} sites released in {self.state_dir} "
                 f"(table1.md, table1.csv; {STATISTICS_FILE} for the training job)")
        self.lock.notify_all()

    def table_markdown(self) -> str:
        return self.released["table1.md"].read_text() if "table1.md" in self.released else ""
