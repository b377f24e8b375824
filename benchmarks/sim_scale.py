"""Simulator throughput on logistic regression (Synthetic(1,1), 60 -> 10) for 100, 1,000 and
10,000 clients, against a per-client jit loop (one ``jax.jit(client_update)`` call per
client, the way FedJAX-style simulators run) measured side by side in the same process.

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
from nordfl.sim.packing import gather_clients
from nordfl.tasks import make_task

RESULTS = Path(__file__).parent / "results"
EPOCHS, BATCH, LR = 1, 10, 0.01


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def bench_simulator(task, rounds: int):
    alg = make_algorithm("fedavg", task.loss_fn, client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH)
    sim = Simulator(alg, task, SimulatorOptions(num_epochs=EPOCHS, batch_size=BATCH), seed=0)
    state = sim.init(task.model.init_params)
    (state, _), first = _timed(lambda: sim.run_round(state))
    times = []
    for _ in range(rounds):
        (state, _), seconds = _timed(lambda: sim.run_round(state))
        times.append(seconds)
    steady = statistics.median(times)
    return sim, alg, {"compile_s": first - steady, "s_per_round": steady, "padding": sim.padding_overhead(sim.plan(1))}


def bench_loop(sim, alg, sample: int):
    """One jitted client_update call per client, on the same padded shapes (at most one compile per bucket)."""
    update = jax.jit(alg.client_update)
    server = alg.server_init(sim.task.model.init_params)
    message = alg.broadcast(server)
    client_state = alg.client_init(sim.task.model.init_params)
    pool = sim._host_pool
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(sim.num_clients, size=min(sample, sim.num_clients), replace=False))
    per_client = []
    for spec in sim.buckets:  # warm up (compile) each bucket's shape once, untimed
        data = gather_clients(pool, spec.client_ids[:1], np.ones(1, bool), spec.n_max)
        one = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), data)
        jax.block_until_ready(update(message, client_state, one, jax.random.key(0)))
    for client in chosen:
        spec = sim.buckets[sim._bucket_of[client]]
        data = gather_clients(pool, np.asarray([client]), np.ones(1, bool), spec.n_max)
        one = jax.tree_util.tree_map(lambda a: jnp.asarray(a[0]), data)
        out, seconds = _timed(lambda: update(message, client_state, one, jax.random.key(int(client))))
        per_client.append(seconds)
    # Aggregation and the server step are negligible next to the clients; count them once.
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 8), out.update)
    _, agg_s = _timed(lambda: weighted_mean(stacked, jnp.ones(8, jnp.float32)))
    return float(np.mean(per_client)) * sim.num_clients + agg_s


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after the first")
    parser.add_argument("--loop-sample", type=int, default=200, help="clients timed in the per-client loop")
    args = parser.parse_args(argv)
    rows = []
    for n in args.clients:
        print(f"[{n} clients] generating Synthetic(1,1) ...", flush=True)
        task = make_task("synthetic", alpha=1.0, beta=1.0, num_devices=n, seed=0)
        rows_total = sum(task.data.train_sizes())
        print(f"[{n} clients] {rows_total} training rows; simulator ...", flush=True)
        sim, alg, result = bench_simulator(task, args.rounds)
        print(f"[{n} clients] per-client jit loop on {min(args.loop_sample, n)} clients ...", flush=True)
        loop_s = bench_loop(sim, alg, args.loop_sample)
        result |= {
            "clients": n, "rows": rows_total, "buckets": len(sim.buckets),
            "updates_per_s": n / result["s_per_round"], "loop_s_per_round": loop_s,
            "speedup": loop_s / result["s_per_round"],
        }
        rows.append(result)
        print(f"[{n} clients] {result['s_per_round']:.3f} s/round, loop {loop_s:.3f} s/round", flush=True)
    header = ("| clients | training rows | buckets | padding | compile (s) | s/round | client updates/s "
              "| per-client jit loop s/round | speed-up |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header] + [
        f"| {r['clients']:,} | {r['rows']:,} | {r['buckets']} | {100 * r['padding']:.0f}% | {r['compile_s']:.1f} "
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
