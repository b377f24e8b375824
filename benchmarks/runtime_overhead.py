"""Runtime coordination overhead per round: the 4 heart-disease hospitals and the coordinator
in one process on loopback over mTLS (gRPC), FedAvg on an MLP of about 10k, 1M and 100M
parameters, with one short local epoch so that what is left of a round is mostly coordination.

    python -m benchmarks.runtime_overhead                     # all sizes, writes benchmarks/results/runtime_overhead.{md,json}
    python -m benchmarks.runtime_overhead --sizes 10k 1M      # some sizes only (printed, not written)
    python -m benchmarks.runtime_overhead --rounds 5          # runtime.rounds (the first is a warm-up, untimed)

Each size runs in a fresh child process (so its peak memory is its own and a failure, e.g.
out of memory at 100M, does not take the others down). The product code is used unchanged;
the benchmark only subclasses it to take timestamps and count bytes:

* round time: from the start of the coordinator's ``_open_round`` (before the broadcast is
  encoded) to its ``round_closed`` audit entry (after aggregation, ``server_update`` and the
  atomic state write);
* a site's local training: wall time around its jitted ``client_update`` call, blocked until
  the result is ready;
* wire bytes: every gRPC message of the round's TRAIN task streams (coordinator to site) and
  update streams (site to coordinator), as serialised protobuf plus gRPC's 5-byte message
  prefix; and, as a cross-check, the TCP payload bytes on the coordinator's sockets (``ss``:
  TLS records, HTTP/2 frames, long polls and replies included) over the timed rounds.

All sites and the coordinator share the machine's cores, so the sites' local training runs
concurrently and slows each other down. Coordination overhead is therefore reported as the
part of the round during which *no* site was training (round time minus the union of the
sites' training intervals); round time minus the slowest site's training is reported too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax

from nordfl.runtime import tls
from nordfl.runtime.coordinator import Coordinator, coordinator_for, run_until_done, serve
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.site import SiteAgent
from nordfl.runtime.site_data import write_site_files

RESULTS = Path(__file__).parent / "results"
SITES = ("Cleveland", "Hungary", "Switzerland", "VA_Long_Beach")
NUM_FEATURES, NUM_CLASSES = 13, 2  # the heart task
SIZES = {"10k": [700], "1M": [1000, 1000], "100M": [10000, 10000]}
GRPC_PREFIX = 5  # bytes before every gRPC message: compressed flag + 4-byte length
MB = 1e6


def mlp_parameters(hidden) -> int:
    sizes = [NUM_FEATURES, *hidden, NUM_CLASSES]
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


class Clock:
    """Thread-safe record of the round boundaries, the sites' training intervals and the bytes sent."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open_start: dict[int, float] = {}
        self.closed: dict[int, float] = {}
        self.close_start: dict[int, float] = {}
        self.audit_s: dict[int, float] = {}  # coordinator time in audit.record (each entry is fsynced), by round
        self.train: dict[int, dict[str, tuple[float, float]]] = {}
        self.site_work: dict[int, dict[str, float]] = {}
        self.down: dict[int, int] = {}
        self.up: dict[int, int] = {}
        self.tcp: dict[str, tuple[int, int]] = {}

    def add(self, table: dict, key: int, n: int) -> None:
        with self.lock:
            table[key] = table.get(key, 0) + n


def tcp_bytes(port: int):
    """(sent, received) TCP payload bytes summed over the coordinator's established sockets, or None without ``ss``."""
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                             check=False, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sent = sum(int(v) for v in re.findall(r"\bbytes_sent:(\d+)", out))
    received = sum(int(v) for v in re.findall(r"\bbytes_received:(\d+)", out))
    return (sent, received) if sent or received else None


class TimedCoordinator(Coordinator):
    """The product coordinator, plus timestamps at round boundaries and byte counts of the task streams."""

    def __init__(self, *args, clock: Clock, timed: tuple[int, int], **kw):
        self.clock, self.timed, self.port = clock, timed, None  # set before __init__ opens round 0
        super().__init__(*args, **kw)
        record = self.audit.record

        def timed_record(event, **fields):
            start = time.perf_counter()
            out = record(event, **fields)
            self.clock.add(self.clock.audit_s, self.round if event != "round_closed" else fields["round"],
                           time.perf_counter() - start)
            if event == "round_closed":
                r = fields["round"]
                self.clock.closed[r] = time.perf_counter()
                if r == self.timed[1] and self.port is not None:  # after the last timed round: outside the timing
                    self.clock.tcp["end"] = tcp_bytes(self.port)
            return out

        self.audit.record = timed_record

    def _open_round(self, attempt):
        if self.round == self.timed[0] and self.port is not None:  # before the first timed round starts
            self.clock.tcp["start"] = tcp_bytes(self.port)
        self.clock.open_start.setdefault(self.round, time.perf_counter())
        return super()._open_round(attempt)

    def _close_round(self, reason):
        self.clock.close_start.setdefault(self.round, time.perf_counter())
        return super()._close_round(reason)

    def _stream(self, header, payload):
        count = header.kind == pb.TaskHeader.TRAIN
        for message in super()._stream(header, payload):
            if count:
                self.clock.add(self.clock.down, int(header.round), message.ByteSize() + GRPC_PREFIX)
            yield message


class _CountingStub:
    """Passes calls to the real stub; counts the serialised size of every update chunk sent."""

    def __init__(self, stub, clock: Clock, round_index: int):
        self.stub, self.clock, self.round = stub, clock, round_index

    def SubmitUpdate(self, chunks, **options):  # options: the site's deadline
        def counted():
            for chunk in chunks:
                self.clock.add(self.clock.up, self.round, chunk.ByteSize() + GRPC_PREFIX)
                yield chunk

        return self.stub.SubmitUpdate(counted(), **options)

    def __getattr__(self, name):
        return getattr(self.stub, name)


class TimedSite(SiteAgent):
    """The product site agent, plus the wall time of its ``client_update`` and the bytes of its updates."""

    def __init__(self, *args, clock: Clock, **kw):
        super().__init__(*args, **kw)
        self.clock, self.round_now = clock, -1

    def _prepare(self, job, raw):
        super()._prepare(job, raw)
        update = self._update

        def timed_update(*args):
            start = time.perf_counter()
            out = jax.block_until_ready(update(*args))
            end = time.perf_counter()
            with self.clock.lock:
                self.clock.train.setdefault(self.round_now, {})[self.name] = (start, end)
            return out

        self._update = timed_update

    def _train(self, stub, run_id, header, message):
        self.round_now = int(header.round)
        start = time.perf_counter()
        super()._train(_CountingStub(stub, self.clock, self.round_now), run_id, header, message)
        with self.clock.lock:  # evaluation, training, encoding, hashing and sending, until the reply
            self.clock.site_work.setdefault(self.round_now, {})[self.name] = time.perf_counter() - start


def union_length(intervals) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def run_size(name: str, hidden: list, rounds: int, log=print) -> dict:
    """One federation run for one model size; returns the per-round measurements and their medians."""
    params = mlp_parameters(hidden)
    clock = Clock()
    timed = (1, rounds - 1)
    with tempfile.TemporaryDirectory(prefix="nordfl-overhead-") as tmp:
        tmp = Path(tmp)
        federation = tls.provision(tmp / "federation", SITES)
        files = {site.replace(" ", "_"): path for site, path in write_site_files(tmp / "data").items()}
        overrides = ["task.model=mlp", f"+task.model_options.hidden=[{','.join(map(str, hidden))}]", "algorithm=fedavg",
                     "algorithm.num_epochs=1", "algorithm.batch_size=256", f"runtime.rounds={rounds}",
                     "runtime.round_timeout=3600"]
        log(f"[{name}] {params:,} parameters; coordinator starting (model init, round 0 opens) ...")
        start = time.perf_counter()
        coordinator = coordinator_for(overrides, federation, tmp / "coordinator", factory=TimedCoordinator,
                                      log=lambda m: log(f"[{name}] {m}"), clock=clock, timed=timed)
        server, port = serve(coordinator, "localhost:0", tls.server_credentials(federation / "coordinator"))
        coordinator.port = port
        agents = [TimedSite(site, f"localhost:{port}", [files[site]], tmp / "sites" / site,
                            tls.channel_credentials(federation / "sites" / site), log=lambda m: log(f"[{name}] {m}"),
                            clock=clock) for site in SITES]
        results, errors = {}, {}

        def work(agent):
            try:
                results[agent.name] = agent.run()
            except Exception as e:  # noqa: BLE001 -- any failure is reported below
                errors[agent.name] = repr(e)

        threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in agents]
        for t in threads:
            t.start()
        run_until_done(coordinator, server)
        wall = time.perf_counter() - start
        # The timed rounds are over. A site whose final-metrics report missed run_until_done's grace period
        # keeps retrying the stopped coordinator (the product's behaviour); it is noted, not waited for.
        for t in threads:
            t.join(timeout=5)
        late = sorted(set(SITES) - set(coordinator.final_metrics))
        if late:
            log(f"[{name}] no final metrics from {', '.join(late)} before the coordinator stopped")
        if errors or not coordinator.finished:
            raise RuntimeError(f"run did not finish: stopped={coordinator.stopped!r}, site errors={errors}")
        audit = [json.loads(line) for line in (tmp / "coordinator" / "audit.jsonl").read_text().splitlines()]
    accepted = sum(1 for e in audit if e["event"] == "update_accepted")
    rejected = [e for e in audit if e["event"] in ("update_rejected", "round_retry")]
    per_round = []
    raw = params * 4 * 2 * len(SITES)
    for r in range(timed[0], timed[1] + 1):
        round_s = clock.closed[r] - clock.open_start[r]
        train = clock.train[r]
        durations = {s: b - a for s, (a, b) in train.items()}
        union = union_length(train.values())
        first_start, last_end = min(a for a, _ in train.values()), max(b for _, b in train.values())
        before, after = first_start - clock.open_start[r], clock.closed[r] - last_end
        wire = clock.down.get(r, 0) + clock.up.get(r, 0)
        per_round.append({
            "round": r, "round_s": round_s, "train_s": durations, "max_train_s": max(durations.values()),
            "sum_train_s": sum(durations.values()), "union_train_s": union, "overhead_s": round_s - union,
            "round_minus_max_train_s": round_s - max(durations.values()),
            # where the overhead lies: before the first site starts training (encode, hash and stream the
            # broadcast, decode and evaluate it at the site), after the last one finishes (encode, hash and
            # stream the updates, check them, aggregate, server_update, write the state), and in between
            "before_first_train_s": before, "after_last_train_s": after,
            "between_trains_s": round_s - union - before - after,
            "close_s": clock.closed[r] - clock.close_start[r], "coordinator_audit_s": clock.audit_s.get(r, 0.0),
            "site_work_s": clock.site_work.get(r, {}),
            "down_bytes": clock.down.get(r, 0), "up_bytes": clock.up.get(r, 0), "wire_bytes": wire,
        })
    med = {k: statistics.median(p[k] for p in per_round)
           for k in ("round_s", "max_train_s", "sum_train_s", "union_train_s", "overhead_s", "round_minus_max_train_s",
                     "wire_bytes", "down_bytes", "up_bytes", "before_first_train_s", "after_last_train_s",
                     "between_trains_s", "close_s", "coordinator_audit_s")}
    tcp = None
    if clock.tcp.get("start") and clock.tcp.get("end"):
        n = timed[1] - timed[0] + 1
        sent, received = (b - a for a, b in zip(clock.tcp["start"], clock.tcp["end"]))
        tcp = {"sent_per_round": sent / n, "received_per_round": received / n, "per_round": (sent + received) / n}
    return {
        "size": name, "hidden": hidden, "parameters": params, "rounds": rounds, "timed_rounds": list(range(timed[0], timed[1] + 1)),
        "raw_bytes": raw, "median": med, "per_round": per_round, "tcp": tcp,
        "warmup_round_s": clock.closed[0] - clock.open_start[0], "wall_s": wall,
        "accepted_updates": accepted, "rejected_or_retried": len(rejected),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "final_test_accuracy": {s: m.get("accuracy") for s, m in results.items()},
        "sites_without_final_metrics": late,
    }


def _child(args) -> int:
    """Runs one size and writes its result (or its error) as JSON to ``args.result``."""
    name = args.child
    try:
        out = {"ok": True} | run_size(name, SIZES[name], args.rounds, log=lambda m: print(m, flush=True))
    except Exception as e:  # noqa: BLE001 -- the parent reports it in the table
        out = {"ok": False, "size": name, "error": repr(e)}
    Path(args.result).write_text(json.dumps(out))
    return 0 if out["ok"] else 1


def _fmt_bytes(n: float) -> str:
    return f"{n / MB:,.3f} MB" if n < 10 * MB else f"{n / MB:,.1f} MB"


def table(rows: list) -> str:
    header = ("| model | parameters | round (s) | slowest site training (s) | any site training (s) | overhead (s) "
              "| round − slowest (s) | overhead per MB moved (ms) | wire bytes/round | raw bytes/round | wire/raw "
              "| TCP bytes/round (TLS) |\n"
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['size']} | {mlp_parameters(SIZES[r['size']]):,} | failed: {r['error'][:120]} "
                         "| | | | | | | | | |")
            continue
        m = r["median"]
        tcp = f"{_fmt_bytes(r['tcp']['per_round'])} ({r['tcp']['per_round'] / r['raw_bytes']:.4f}x)" if r["tcp"] else "n/a"
        lines.append(
            f"| {r['size']} MLP {r['hidden']} | {r['parameters']:,} | {m['round_s']:.3f} | {m['max_train_s']:.3f} "
            f"| {m['union_train_s']:.3f} | {m['overhead_s']:.3f} | {m['round_minus_max_train_s']:.3f} "
            f"| {1e3 * m['overhead_s'] / (r['raw_bytes'] / MB):.2f} | {_fmt_bytes(m['wire_bytes'])} "
            f"| {_fmt_bytes(r['raw_bytes'])} | {m['wire_bytes'] / r['raw_bytes']:.4f} | {tcp} |"
        )
    return "\n".join(lines)


def breakdown(rows: list) -> str:
    header = ("| model | overhead (s) | before the first site trains (s) | after the last site trains (s) "
              "| between (s) | close: aggregate, server_update, state write (s) | coordinator audit entries (s) |\n"
              "|---|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['size']} | {r['median']['overhead_s']:.3f} | {r['median']['before_first_train_s']:.3f} "
        f"| {r['median']['after_last_train_s']:.3f} | {r['median']['between_trains_s']:.3f} | {r['median']['close_s']:.3f} "
        f"| {r['median']['coordinator_audit_s']:.3f} |"
        for r in rows if r["ok"]
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=3, help="runtime.rounds; the first is an untimed warm-up (>= 3)")
    parser.add_argument("--child", choices=list(SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be >= 3: one warm-up round and at least 2 timed rounds")
    if args.child:
        return _child(args)
    rows = []
    for name in args.sizes:
        load = os.getloadavg()
        print(f"[{name}] MLP {SIZES[name]}: {mlp_parameters(SIZES[name]):,} parameters, {args.rounds} rounds "
              f"(load average {load[0]:.2f}) ...", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            proc = subprocess.run([sys.executable, "-m", "benchmarks.runtime_overhead", "--child", name,
                                   "--rounds", str(args.rounds), "--result", f.name], check=False,
                                  cwd=Path(__file__).parent.parent)
            text = Path(f.name).read_text()
        row = json.loads(text) if text else {"ok": False, "size": name,
                                             "error": f"child process exited with code {proc.returncode} and no result "
                                                      f"(a negative code is the signal that killed it, e.g. -9: out of memory)"}
        row["load_average_before"] = load
        rows.append(row)
        if row["ok"]:
            m = row["median"]
            print(f"[{name}] round {m['round_s']:.3f} s, slowest site training {m['max_train_s']:.3f} s, "
                  f"overhead {m['overhead_s']:.3f} s, wire {m['wire_bytes'] / MB:.3f} MB/round, "
                  f"peak RSS {row['peak_rss_mb']:,.0f} MB", flush=True)
        else:
            print(f"[{name}] FAILED: {row['error']}", flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
               f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM, jax {jax.__version__}, "
               f"{jax.default_backend()}")
    note = (f"FedAvg, 4 heart-disease sites + coordinator in one process on loopback over mTLS; 1 local epoch, "
            f"batch 256; runtime.rounds={args.rounds} (round 0 is a warm-up and untimed; medians of the other "
            f"{args.rounds - 1}); {machine}.\n\n"
            "The coordinator and the 4 sites share the machine's cores with each other and with whatever else runs "
            "(load average before each size: "
            + ", ".join(f"{r['size']} {r['load_average_before'][0]:.1f}" for r in rows) + "), so the sites' local "
            "training runs concurrently and slows each other down. Overhead is the round time minus the union of the "
            "sites' training intervals (the time when no site was training); round minus the slowest site's training "
            "is given too. Bytes are counted as gRPC messages (protobuf + 5-byte prefix) of the task and update streams; "
            "TCP bytes come from `ss` on the coordinator's sockets. Peak resident memory of the one process: "
            + ", ".join(f"{r['size']} {r['peak_rss_mb'] / 1024:.2f} GiB" for r in rows if r["ok"]) + ".\n")
    text = note + "\n" + table(rows) + "\n\nWhere the overhead lies (medians):\n\n" + breakdown(rows) + "\n"
    print("\n" + text)
    if set(args.sizes) == set(SIZES):
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "runtime_overhead.md").write_text(text)
        (RESULTS / "runtime_overhead.json").write_text(json.dumps({"machine": machine, "rounds": args.rounds, "rows": rows},
                                                                  indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
