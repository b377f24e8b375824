"""A plain local launcher for multi-process runs: ``python -m nordfl.sim.launch -n 2 -- nordfl-sim ...``.

It starts the command ``-n`` times on this machine with the variables ``nordfl.sim.distributed``
reads (process 0 listens on a free loopback port), each process with ``--devices`` CPU devices
and, where there are enough, its own share of this machine's cores (processes that share cores
slow each other's XLA thread pools: W1 ran 69 ms a round unpinned, 53 ms pinned), and waits. When one process fails, the others are stopped (a process left alone would wait
for its peers forever) and the launcher exits with the failed one's status; Ctrl-C or SIGTERM
stops them all. On a cluster use ``srun`` instead: it plays the same part.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

from nordfl.sim.distributed import COORDINATOR, NUM_PROCESSES, PROCESS_ID


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environments(count: int, devices: int, port: int, base: Optional[dict] = None) -> list[dict]:
    """Each process's environment: ``base`` (default: this one) plus the run's coordinates."""
    base = dict(os.environ if base is None else base)
    return [base | {COORDINATOR: f"127.0.0.1:{port}", NUM_PROCESSES: str(count), PROCESS_ID: str(i),
                    "NORDFL_CPU_DEVICES": str(devices)} for i in range(count)]


def core_shares(count: int, cores: Optional[Sequence[int]] = None) -> list[Optional[set[int]]]:
    """The cores each of ``count`` processes is pinned to: equal contiguous shares of ``cores`` (default: the
    ones this process may use), or None for every process when there are fewer cores than processes."""
    cores = sorted(os.sched_getaffinity(0) if cores is None else cores)
    if len(cores) < count:
        return [None] * count
    share = len(cores) // count
    return [set(cores[i * share:(i + 1) * share]) for i in range(count)]


def _pinned(cores: Optional[set[int]]):
    return None if cores is None else (lambda: os.sched_setaffinity(0, cores))


def _stop(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(command: Sequence[str], count: int, devices: int = 1, pin: bool = True) -> int:
    """Runs ``command`` as ``count`` processes of one run (each pinned to its share of the cores, with ``pin``);
    returns the first failure's exit status (128 + the signal's number for a process killed by one), or 0."""
    shares = core_shares(count) if pin else [None] * count
    processes = [subprocess.Popen(list(command), env=env, preexec_fn=_pinned(cores))
                 for env, cores in zip(environments(count, devices, free_port()), shares)]

    def on_signal(signum, _frame):
        _stop(processes)
        sys.exit(128 + signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            codes = [p.poll() for p in processes]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                code = code if code > 0 else 128 - code  # killed by a signal: the shell's 128 + signal number
                print(f"nordfl.sim.launch: process {i} exited with status {code}; stopping the others", file=sys.stderr)
                _stop(processes)
                return code
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nordfl.sim.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--processes", type=int, default=2, help="number of processes (default 2)")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices per process (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="let the processes share every core (default: each its own)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command each process runs, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("command: give the command to run after --, e.g. -- nordfl-sim algorithm=scaffold")
    if args.processes < 1:
        parser.error(f"--processes: must be >= 1, got {args.processes}")
    if args.devices < 1:
        parser.error(f"--devices: must be >= 1, got {args.devices}")
    sys.exit(launch(command, args.processes, args.devices, pin=not args.no_pin))


if __name__ == "__main__":
    main()
