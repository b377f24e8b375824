"""The transport floor under the runtime's overhead: the same bytes through gRPC over mTLS, nothing else.

    python -m benchmarks.grpc_floor                 # 10k, 1M and 100M-parameter payloads (float32)
    python -m benchmarks.grpc_floor --sizes 1M

One "round" here is what a runtime round moves for 4 sites, with none of the runtime's
work: each site thread long-polls and receives the broadcast (the model's bytes in 1 MiB
chunks, as the coordinator streams them) and then streams an update of the same size back;
no hashing, no checks, no decoding, no audit, no training, no state. Everything runs in one
process on loopback with the federation's own certificates, as ``runtime_overhead`` does.
The median round time is the least a runtime round of that size can cost on this machine,
so the runtime's overhead target (50 ms at 1M parameters) is judged against it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from nordfl.runtime import tls, wire
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc

SITES = ("Cleveland", "Hungary", "Switzerland", "VA_Long_Beach")
PARAMETERS = {"10k": 11_202, "1M": 1_017_002, "100M": 100_170_002}  # the runtime_overhead models


class BareServicer(pb_grpc.FederationServicer):
    def __init__(self, payload: bytes):
        self.payload = payload

    def PollTask(self, request, context):
        yield pb.TaskChunk(header=pb.TaskHeader(kind=pb.TaskHeader.TRAIN, round=0))
        for part in wire.chunks(self.payload):
            yield pb.TaskChunk(data=bytes(part))

    def SubmitUpdate(self, request_iterator, context):
        total = sum(len(c.data) for c in request_iterator)
        return pb.SubmitReply(accepted=total == len(self.payload))


def measure(parameters: int, rounds: int, federation: Path) -> dict:
    payload = bytes(4 * parameters)
    server = grpc.server(ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_FederationServicer_to_server(BareServicer(payload), server)
    port = server.add_secure_port("localhost:0", tls.server_credentials(federation / "coordinator"))
    server.start()
    options = [("grpc.max_receive_message_length", 8 << 20)]
    channels = [grpc.secure_channel(f"localhost:{port}", tls.channel_credentials(federation / "sites" / s), options=options)
                for s in SITES]
    stubs = [pb_grpc.FederationStub(c) for c in channels]

    def site(stub):
        received = sum(len(c.data) for c in stub.PollTask(pb.PollRequest(site="x")))
        chunks = [pb.UpdateChunk(header=pb.UpdateHeader(round=0))] + [pb.UpdateChunk(data=bytes(p)) for p in wire.chunks(payload)]
        assert received == len(payload) and stub.SubmitUpdate(iter(chunks)).accepted

    times = []
    for _ in range(rounds + 1):  # the first round sets up the TLS connections: untimed
        threads = [threading.Thread(target=site, args=(s,)) for s in stubs]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        times.append(time.perf_counter() - start)
    for channel in channels:
        channel.close()
    server.stop(grace=None)
    return {"parameters": parameters, "bytes_per_round": 2 * len(SITES) * len(payload),
            "round_s": statistics.median(times[1:]), "min_s": min(times[1:])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["10k", "1M"], choices=list(PARAMETERS))
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        federation = tls.provision(Path(tmp) / "federation", SITES)
        print("| payload | parameters | bytes moved per round | bare gRPC + mTLS round (median) | fastest |")
        print("|---|---:|---:|---:|---:|")
        for name in args.sizes:
            r = measure(PARAMETERS[name], args.rounds if name != "100M" else 3, federation)
            print(f"| {name} | {r['parameters']:,} | {r['bytes_per_round'] / 1e6:,.1f} MB | {1000 * r['round_s']:,.1f} ms "
                  f"| {1000 * r['min_s']:,.1f} ms |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
