"""How far NordFL's simulator is from the bare XLA program for the same maths, side by side.

    python -m benchmarks.floors                      # W1 and W3; writes benchmarks/results/floors.{md,json}
    python -m benchmarks.floors --workloads W1 --rounds 20

The "bare" round is the least a JAX program can do for a FedAvg round of the workload: the
batches arrive already shuffled and gathered (made on the host, not timed), every client has
exactly its own steps (no padding, masks or partial work), no metrics, the same devices,
chunks and sharding. NordFL's round is the simulator as the peers suite runs it, drawing its
shuffles inside the program. Both are timed in alternate rounds in one process, so the
machine's noise falls on both alike; the ratio is NordFL's cost over the floor the compiler
gives. Both compile with the simulator's XLA options. The dense matmul peak is measured in the
same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from nordfl.sim.devices import use_cpu_cores

use_cpu_cores()  # before JAX starts, as nordfl-sim does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from benchmarks import workloads  # noqa: E402
from benchmarks.peers import common  # noqa: E402
from benchmarks.peers import nordfl as nordfl_peer  # noqa: E402
from benchmarks.run import DEFAULT_CACHE, matmul_gflops  # noqa: E402
from nordfl.sim.engine import ROUND_COMPILER_OPTIONS  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def host_batches(w: common.Workload, data: common.Data, cohort: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Every cohort client's batches for the round, shuffled per epoch: x [C, steps, B, ...], y [C, steps, B]."""
    n = data.y.shape[1]
    if n % w.batch_size:
        raise ValueError(f"the bare round needs whole batches: {n} rows per client, batch {w.batch_size}")
    orders = np.stack([np.concatenate([rng.permutation(n) for _ in range(w.epochs)]) for _ in cohort])
    x = np.take_along_axis(data.x[cohort], orders[..., None], axis=1)
    y = np.take_along_axis(data.y[cohort], orders, axis=1)
    steps = orders.shape[1] // w.batch_size
    return x.reshape(len(cohort), steps, w.batch_size, -1), y.reshape(len(cohort), steps, w.batch_size)


def bare_round_program(w: common.Workload, mesh: Mesh, chunk: int):
    """FedAvg over pre-made batches: ``vmap`` over a chunk, ``lax.map`` over chunks, mean of the models."""
    sharded = NamedSharding(mesh, PartitionSpec("clients"))

    def loss(params, x, y):
        with jax.numpy_rank_promotion("allow"):  # common.forward adds biases by broadcasting
            logits = common.forward(params, x, relu=jax.nn.relu)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def client(params, xs, ys):
        def step(p, batch):
            g = jax.grad(loss)(p, *batch)
            return jax.tree_util.tree_map(lambda a, b: a - w.lr * b, p, g), None

        return jax.lax.scan(step, params, (xs, ys))[0]

    def round_(params, xs, ys):
        clients = xs.shape[0]
        chunks = clients // chunk
        to_chunks = lambda a: jnp.swapaxes(a.reshape(chunk, chunks, *a.shape[1:]), 0, 1)  # noqa: E731
        one_chunk = lambda xy: jax.vmap(client, in_axes=(None, 0, 0))(params, *jax.lax.with_sharding_constraint(xy, sharded))  # noqa: E731
        models = jax.lax.map(one_chunk, (to_chunks(xs), to_chunks(ys)))
        return jax.tree_util.tree_map(lambda m: jnp.mean(m, axis=(0, 1)), models)

    return jax.jit(round_, compiler_options=ROUND_COMPILER_OPTIONS.get(mesh.devices.flat[0].platform))


def measure(name: str, rounds: int, cache: Path, log=print) -> dict:
    spec = workloads.find(name)
    w = spec.workload(workloads.write_data(spec, cache.expanduser(), log))
    data = common.Data(w.data)
    sim, params, _ = nordfl_peer.build(w, data)
    state = sim.init(params)
    _, chunk = sim._chunks[0]
    mesh = sim.mesh
    bare = bare_round_program(w, mesh, chunk)
    rng = np.random.default_rng(0)
    inputs = [host_batches(w, data, data.cohorts[r % len(data.cohorts)], rng) for r in range(2)]
    placed = [jax.device_put(xy, NamedSharding(mesh, PartitionSpec("clients"))) for xy in inputs]
    log(f"{name}: compiling (chunk {chunk}, {len(sim.devices)} devices)")
    state, _ = sim.run_round(state)
    jax.block_until_ready(state.server)
    model = jax.block_until_ready(bare(data.init, *placed[0]))  # the workload's initial model, as NordFL's
    times = {"nordfl": [], "bare": []}
    for r in range(rounds):
        start = time.perf_counter()
        state, _ = sim.run_round(state)
        jax.block_until_ready(state.server)
        times["nordfl"].append(time.perf_counter() - start)
        start = time.perf_counter()
        model = jax.block_until_ready(bare(model, *placed[r % 2]))
        times["bare"].append(time.perf_counter() - start)
        log(f"  round {r + 1}/{rounds}: NordFL {times['nordfl'][-1]:.4f} s, bare {times['bare'][-1]:.4f} s")
    flops = spec.flops_per_round()
    row = {"workload": name, "clients_per_round": w.cohort_size, "chunk": chunk, "devices": len(sim.devices), "gflop_per_round": flops / 1e9}
    for system, ts in times.items():
        median = statistics.median(ts)
        row[system] = {"s_per_round": median, "gflops": flops / median / 1e9}
    row["ratio"] = row["nordfl"]["s_per_round"] / row["bare"]["s_per_round"]
    return row


def markdown(summary: dict) -> str:
    peak = summary["matmul_gflops"]["peak"]
    lines = [
        f"Machine: {summary['machine']}; dense float32 matmul peak {peak:.0f} GFLOP/s, measured in the same run.",
        "",
        "| workload | clients per round | chunk | devices | NordFL s/round | bare XLA s/round | NordFL / bare | NordFL % of peak | bare % of peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        n, b = r["nordfl"], r["bare"]
        lines.append(
            f"| {r['workload']} | {r['clients_per_round']} | {r['chunk']} | {r['devices']} | {n['s_per_round']:.4f} | "
            f"{b['s_per_round']:.4f} | {r['ratio']:.2f}x | {100 * n['gflops'] / peak:.1f}% | {100 * b['gflops'] / peak:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", default=["W1", "W3"], choices=["W1", "W2", "W3"])
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per workload (default: 20 for W1/W2, 4 for W3)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="workload data folder, shared with benchmarks.run")
    args = parser.parse_args(argv)
    peak = matmul_gflops()
    rows = [measure(name, args.rounds or (4 if name == "W3" else 20), args.cache) for name in args.workloads]
    devices = jax.devices()
    summary = {"machine": f"{devices[0].platform}, {len(devices)} device(s), jax {jax.__version__}", "matmul_gflops": peak, "rows": rows}
    text = markdown(summary)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "floors.json").write_text(json.dumps(summary, indent=2))
    (args.out / "floors.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
