"""Two processes with one CPU device each (``jax.distributed``, the local launcher) against one process
with two CPU devices, on W1 and W3: time per round and the final model.

Both sides run the same workload through NordFL's simulator (``benchmarks.peers.nordfl.build``)
in fresh interpreters, one after the other, on this machine. Two processes exchange the
round's aggregate over gloo (loopback TCP); one process sums on shared memory. The ratio is
what a second process costs, and the model difference shows the two compute the same thing.

    python -m benchmarks.processes     # writes benchmarks/results/processes.{md,json}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.workloads import W1, Spec, write_data

RESULTS = Path(__file__).parent / "results"
WORKLOADS = [W1, Spec("W3", model="mlp", rounds=5)]

CHILD = """
import json, statistics, sys
from nordfl.sim import distributed
from benchmarks.peers import common, nordfl as peer
processes = distributed.initialize()  # before any JAX computation
import numpy as np
w = common.Workload(**json.loads(sys.argv[1]))
sim, params, names = peer.build(w, common.Data(w.data))
state, times = peer.timed_rounds(sim, sim.init(params), w.rounds)
if processes.writes:
    final = peer.workload_params(state.server.params, names)
    np.savez(sys.argv[2], **final)
    print(json.dumps({"processes": processes.count, "devices": len(sim.devices),
                      "first_round_s": times[0], "ms_per_round": 1000 * statistics.median(times[1:])}))
"""


def _environment(devices: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NORDFL_CPU_DEVICES")}
    return env | {"NORDFL_CPU_DEVICES": devices, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def run(spec: Spec, data: Path, out: Path, processes: int) -> dict:
    """One side: ``processes`` = 1 (two devices in it) or 2 (one device each, through the launcher)."""
    workload = json.dumps(spec.workload(data).__dict__)
    child = [sys.executable, "-c", CHILD, workload, str(out)]
    if processes == 1:
        command, env = child, _environment("2")
    else:
        command, env = [sys.executable, "-m", "nordfl.sim.launch", "-n", str(processes), "--devices", "1", "--", *child], \
            _environment("1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for spec in WORKLOADS:
            data = write_data(spec, Path(cache))
            one, two = (run(spec, data, Path(cache) / f"{spec.name}-{n}.npz", n) for n in (1, 2))
            with np.load(Path(cache) / f"{spec.name}-1.npz") as a, np.load(Path(cache) / f"{spec.name}-2.npz") as b:
                difference = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)
            rows.append({"workload": spec.name, "rounds": spec.rounds, "one_process": one, "two_processes": two,
                         "ratio": two["ms_per_round"] / one["ms_per_round"], "max_param_difference": difference})
            print(f"{spec.name}: {one['ms_per_round']:.1f} ms/round in 1 process, {two['ms_per_round']:.1f} in 2 "
                  f"({rows[-1]['ratio']:.2f}x); models differ by at most {difference:.2g}", flush=True)
    lines = ["| workload | 1 process × 2 devices, ms/round | 2 processes × 1 device, ms/round | ratio | "
             "first round (compile) 1 / 2 processes, s | largest parameter difference |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['workload']} ({r['rounds']} rounds) | {r['one_process']['ms_per_round']:.1f} | "
                     f"{r['two_processes']['ms_per_round']:.1f} | {r['ratio']:.2f} | "
                     f"{r['one_process']['first_round_s']:.1f} / {r['two_processes']['first_round_s']:.1f} | "
                     f"{r['max_param_difference']:.2g} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "processes.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / "processes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
