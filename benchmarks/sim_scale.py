"""Simulator throughput on logistic regression (Synthetic(1,1), 60 -> 10) for 100, 1,000 and
10,000 clients, with the paper's heavy-tailed client sizes and with the same rows dealt out
in equal shares (IID re-partition), against a FedJAX-style loop (Python over clients and
minibatches, one jitted SGD step per batch) measured side by side in the same process.

    python -m benchmarks.sim_scale                 # all sizes, writes benchmarks/results/sim_scale.{md,json}
    python -m benchmarks.sim_scale --clients 100   # one size

Reports compile time (first round minus a steady round), seconds per round (median of the
timed rounds), client updates per second, padding overhead, and the speed-up over the loop.
The loop is timed on a sample of the cohort and scaled, so 10,000 clients stay affordable.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import make_algorithm, weighted_mean
from nordfl.sim.engine import Simulator, SimulatorOptions
from nordfl.tasks import Examples, classification_task, make_task
from nordfl.tasks.partition import repartition

RESULTS = Path(__file__).parent / "results"
EPOCHS, BATCH, LR = 1, 10, 0.01


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def bench_simulator(task, rounds: int):
    alg = make_algorithm("fedavg", task.loss_fn, client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH)
    sim = Simulator(alg, task, SimulatorOptions(), seed=0)
    state = sim.init(task.model.init_params)
    (state, _), first = _timed(lambda: sim.run_round(state))
    times = []
    for _ in range(rounds):
        (state, _), seconds = _timed(lambda: sim.run_round(state))
        times.append(seconds)
    steady = statistics.median(times)
    return sim, alg, {"compile_s": first - steady, "s_per_round": steady, "padding": sim.padding_overhead(sim.plan(1))}


def bench_loop(task, sample: int) -> float:
    """FedJAX-style: a Python loop over clients and their minibatches, one jitted SGD step per batch.

    Same maths as the simulator's FedAvg client (per-epoch shuffle, batches of BATCH, the
    last one partial and masked), compiled once for the fixed batch shape. Returns seconds
    per round for all clients, from a timed sample of them.
    """
    grad = jax.grad(task.loss_fn)

    @jax.jit
    def step(params, x, y, mask):
        return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grad(params, Examples(x, y), mask))

    params = task.model.init_params
    clients = task.data.clients
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(clients), size=min(sample, len(clients)), replace=False)
    x0 = np.zeros((BATCH, *task.data.feature_shape), np.float32)
    jax.block_until_ready(step(params, x0, np.zeros(BATCH, np.int32), np.ones(BATCH, bool)))  # compile, untimed
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 8), params)
    jax.block_until_ready(weighted_mean(stacked, jnp.ones(8, jnp.float32)))  # compile the aggregation, untimed
    start = time.perf_counter()
    for client in chosen:
        train = clients[client].train
        local = params
        for _ in range(EPOCHS):
            order = rng.permutation(len(train.y))
            for first in range(0, len(order), BATCH):
                rows = order[first:first + BATCH]
                x, y, mask = x0.copy(), np.zeros(BATCH, np.int32), np.zeros(BATCH, bool)
                x[: len(rows)], y[: len(rows)], mask[: len(rows)] = train.x[rows], train.y[rows], True
                local = step(local, x, y, mask)
        jax.block_until_ready(local)
    clients_s = time.perf_counter() - start
    # Aggregation and the server step are negligible next to the clients; count them once.
    _, agg_s = _timed(lambda: weighted_mean(stacked, jnp.ones(8, jnp.float32)))
    return clients_s / len(chosen) * len(clients) + agg_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the first")
    parser.add_argument("--loop-sample", type=int, default=200, help="clients timed in the per-client loop")
    args = parser.parse_args(argv)
    rows = []
    for n in args.clients:
        print(f"[{n} clients] generating Synthetic(1,1) ...", flush=True)
        natural = make_task("synthetic", alpha=1.0, beta=1.0, num_devices=n, seed=0)
        equal = classification_task("synthetic", repartition(natural.data, "iid", num_clients=n, seed=0), natural.model)
        for sizes, task in (("heavy-tailed", natural), ("equal", equal)):
            rows_total = sum(task.data.train_sizes())
            print(f"[{n} clients, {sizes} sizes] {rows_total} training rows; simulator ...", flush=True)
            sim, alg, result = bench_simulator(task, args.rounds)
            print(f"[{n} clients, {sizes} sizes] per-client jit loop on {min(args.loop_sample, n)} clients ...", flush=True)
            loop_s = bench_loop(task, args.loop_sample)
            result |= {
                "clients": n, "sizes": sizes, "rows": rows_total, "buckets": len(sim.buckets),
                "updates_per_s": n / result["s_per_round"], "loop_s_per_round": loop_s,
                "speedup": loop_s / result["s_per_round"],
            }
            rows.append(result)
            print(f"[{n} clients, {sizes} sizes] {result['s_per_round']:.3f} s/round, loop {loop_s:.3f} s/round", flush=True)
    header = ("| clients | client sizes | training rows | buckets | padding | compile (s) | s/round | client updates/s "
              "| FedJAX-style loop s/round | speed-up |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['clients']:,} | {r['sizes']} | {r['rows']:,} | {r['buckets']} | {100 * r['padding']:.0f}% | {r['compile_s']:.1f} "
        f"| {r['s_per_round']:.3f} | {r['updates_per_s']:,.0f} | {r['loop_s_per_round']:.2f} | {r['speedup']:.0f}x |"
        for r in rows
    ]
    machine = f"{platform.processor() or platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}"
    table = "\n".join(lines)
    note = (f"FedAvg, all clients every round, {EPOCHS} local epoch, batch {BATCH}; {machine}.\n")
    print("\n" + note + "\n" + table)
    if set(args.clients) == {100, 1_000, 10_000}:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "sim_scale.md").write_text(note + "\n" + table + "\n")
        (RESULTS / "sim_scale.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
