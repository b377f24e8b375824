"""A hostile member for the fault suite, run as its own process next to a real coordinator.

    python -m tests.runtime.hostile --federation F --state S --address HOST:PORT --out R.json --ready F1 --go F2 [override ...]

It builds the job's update template, creates ``--ready``, waits for ``--go``, then acts in the first open
round (read from the coordinator's audit log) in which ``--members`` have no accepted update yet, with
certificates the federation issued:

* ``revoked``: the revoked member (``--revoked``) Joins and opens 20 uploads that never send a message;
* ``slow_loris``: a member opens one upload and sends a byte a second after its header;
* ``oversized``: a member announces a 1 GB update;
* ``poisoned``: a member sends a NaN update of the job's exact size for the open round.

It never Joins as a real member (that would re-declare its rows). Each outcome (the status code or the
reply's reason) goes to ``--out`` as JSON, for the test to check.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import grpc
import jax
import numpy as np

from nordfl.runtime import tls, wire
from nordfl.runtime.coordinator import coordinator_for
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc


def _audit(state: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def _outcome(call) -> str:
    try:
        reply = call.result()
        return "accepted" if reply.accepted else f"refused: {reply.reason}"
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--federation", type=Path, required=True)
    parser.add_argument("--state", type=Path, required=True, help="the coordinator's state folder (its audit log)")
    parser.add_argument("--address", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True, help="created once the job's template is built")
    parser.add_argument("--go", type=Path, required=True, help="acts once this file exists, in the round then open")
    parser.add_argument("--revoked", default="Mallory")
    parser.add_argument("--members", nargs=3, required=True, metavar=("LORIS", "OVERSIZED", "POISONED"),
                        help="whose certificates the three uploads use: members with no update in the open round yet")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:  # only for the job's update template
        template = coordinator_for(args.overrides, args.federation, Path(scratch), log=lambda m: None).update_template
    args.ready.touch()
    while not args.go.exists():
        time.sleep(0.05)
    loris_site, big_site, poison_site = args.members
    while True:  # a round the three members have no accepted update in yet (else theirs would just be duplicates)
        entries = _audit(args.state)
        round_index = max(e["round"] for e in entries if e["event"] == "round_open")
        if not any(e["event"] == "update_accepted" and e["round"] == round_index and e["site"] in args.members
                   for e in entries):
            break
        time.sleep(0.05)
    run_id = [e["run_id"] for e in entries if e["event"] in ("start", "restart")][-1]

    def stub(name):
        channel = grpc.secure_channel(args.address, tls.channel_credentials(args.federation / "sites" / name))
        return pb_grpc.FederationStub(channel)

    def header(site, update, **manifest_fields):
        specs, payload = wire.encode(update)
        h = pb.UpdateHeader(run_id=run_id, round=round_index, site=site, weight=1.0,
                            manifest=wire.manifest_to_proto(specs, payload), metrics={"train_loss": 0.5})
        for k, v in manifest_fields.items():
            setattr(h.manifest, k, v)
        return h, payload

    result = {}
    stop = threading.Event()

    def silent():
        stop.wait(60)
        yield from ()

    revoked = stub(args.revoked)
    try:
        reply = revoked.Join(pb.JoinRequest(site=args.revoked, protocol_version=wire.PROTOCOL_VERSION, rows=10), timeout=10)
        result["revoked_join"] = "accepted" if reply.accepted else f"refused: {reply.reason}"
    except grpc.RpcError as e:
        result["revoked_join"] = f"{e.code().name}: {e.details()}"
    streams = [revoked.SubmitUpdate.future(silent(), timeout=30) for _ in range(20)]
    result["revoked_uploads"] = [_outcome(c).split(":")[0] for c in streams]

    nan = jax.tree_util.tree_map(lambda s: np.full(s.shape, np.nan, s.dtype), template)
    h, _ = header(loris_site, nan)

    def slowly():
        yield pb.UpdateChunk(header=h)
        for _ in range(120):  # far longer than the scenario's upload_timeout
            if stop.wait(1.0):
                return
            yield pb.UpdateChunk(data=b"\0")

    started = time.monotonic()
    loris = stub(loris_site).SubmitUpdate.future(slowly(), timeout=180)

    h, payload = header(big_site, nan, total_bytes=10**9)
    result["oversized"] = _outcome(stub(big_site).SubmitUpdate.future(iter([pb.UpdateChunk(header=h), pb.UpdateChunk(data=payload)]),
                                                                        timeout=30))
    h, payload = header(poison_site, nan)
    h.weight = 1.0
    result["poisoned"] = _outcome(stub(poison_site).SubmitUpdate.future(iter([pb.UpdateChunk(header=h), pb.UpdateChunk(data=payload)]),
                                                                         timeout=30))
    result["slow_loris"] = _outcome(loris)
    result["slow_loris_s"] = round(time.monotonic() - started, 1)
    stop.set()
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
