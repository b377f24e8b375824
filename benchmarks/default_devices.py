"""What importing ``nordfl.sim`` gives a Python-API user: one JAX CPU device per core by default.

W1 (FedAvg, logistic regression 60 -> 10 on Synthetic(1,1), 100 clients x 200 training rows,
all clients every round, 5 local epochs, batch 10, lr 0.01) through the public API, in two
fresh interpreters run one after the other by this script: ``NORDFL_CPU_DEVICES=1`` (JAX's own
default, what the API gave before) and unset (the new default, one device per core).

    python -m benchmarks.default_devices     # writes benchmarks/results/default_devices.{md,json}
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROUNDS = 20

CHILD = """
import json, statistics, time
import jax
from nordfl.algorithms import make_algorithm
from nordfl.sim import Simulator
from nordfl.tasks import make_task

task = make_task("synthetic", alpha=1.0, beta=1.0, num_devices=100, samples_per_device=250, seed=0)
alg = make_algorithm("fedavg", task.loss_fn, client_lr=0.01, num_epochs=5, batch_size=10)
sim = Simulator(alg, task, seed=0)
state = sim.init(task.model.init_params)
state, _ = sim.run_round(state)
jax.block_until_ready(state.server.params)
times = []
for _ in range({rounds}):
    start = time.perf_counter()
    state, _ = sim.run_round(state)
    jax.block_until_ready(state.server.params)
    times.append(time.perf_counter() - start)
print(json.dumps({{"devices": len(sim.devices), "ms_per_round": 1000 * statistics.median(times),
                   "accuracy": float(sim.evaluate(state.server.params).pooled.accuracy)}}))
"""


def run(devices: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NORDFL_CPU_DEVICES")}
    if devices is not None:
        env["NORDFL_CPU_DEVICES"] = devices
    out = subprocess.run([sys.executable, "-c", CHILD.format(rounds=ROUNDS)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    before, after = run("1"), run(None)
    rows = [("NORDFL_CPU_DEVICES=1 (JAX's default)", before), ("import nordfl.sim (default)", after)]
    lines = ["| setting | CPU devices | ms per round (median of 20) | ratio to 1 device | final pooled accuracy |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['devices']} | {r['ms_per_round']:.1f} | {r['ms_per_round'] / before['ms_per_round']:.2f} "
                     f"| {r['accuracy']:.4f} |")
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "default_devices.md").write_text(__doc__.split("\n\n")[0] + "\n\n" + table + "\n")
    (RESULTS / "default_devices.json").write_text(json.dumps(dict(rows), indent=2))


if __name__ == "__main__":
    main()
