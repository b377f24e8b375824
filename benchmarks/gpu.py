"""NordFL on a GPU: W1 with 100, 1,000 and 10,000 clients per round, and W3, in one script.

    python -m benchmarks.gpu                        # writes benchmarks/results/gpu.{json,md}
    python -m benchmarks.gpu --out "$OUT"           # on a lent device machine

Reports s/round (median of the rounds after the first), client updates/s, the first
round's time (compilation), the fraction of the GPU's measured dense matmul peak, and the
per-client cost against Flower's on W1 from the CPU peers suite (``results/peers.json``, or
the 1.06 s/round the benchmark issue measured if that file is absent). Nothing here needs a
peer environment: only NordFL and JAX.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import workloads
from benchmarks.peers import common
from benchmarks.peers.nordfl import build, timed_rounds
from benchmarks.run import DEFAULT_CACHE, RESULTS

FLOWER_W1_S_PER_ROUND = 1.06  # the measurement on the 2-core CPU machine, 100 clients per round
CASES = [
    dataclasses.replace(workloads.W1, name="W1-gpu-100", rounds=6),
    dataclasses.replace(workloads.W1, name="W1-gpu-1k", num_clients=1_000, cohort_size=1_000, rounds=6),
    dataclasses.replace(workloads.W1, name="W1-gpu-10k", num_clients=10_000, cohort_size=10_000, rounds=6),
    dataclasses.replace(workloads.SUITES["peers"][2], name="W3-gpu", rounds=4),
]


def matmul_peak(size: int = 8192, repeats: int = 10) -> float:
    """Dense float32 matmul GFLOP/s on the default device (TF32 off: the workloads run in float32)."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    matmul(a, a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(a, a)
    out.block_until_ready()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def flower_per_client_s() -> tuple[float, str]:
    path = RESULTS / "peers.json"
    if path.exists():
        rows = json.loads(path.read_text())["rows"]
        flower = next((r for r in rows if r["peer"] == "flower" and r["workload"] == "W1" and "s_per_round" in r), None)
        if flower:
            return flower["s_per_round"] / workloads.W1.cohort_size, "results/peers.json"
    return FLOWER_W1_S_PER_ROUND / workloads.W1.cohort_size, "the benchmark issue's CPU measurement"


def run_case(spec: workloads.Spec, cache: Path) -> dict:
    data_path = workloads.write_data(spec, cache, print)
    w = spec.workload(data_path)
    data = common.Data(data_path)
    sim, params, _ = build(w, data)
    _, times = timed_rounds(sim, sim.init(params), w.rounds,
                            lambda r, seconds: print(f"[{spec.name}] round {r + 1}/{w.rounds}: {seconds:.4f} s", flush=True))
    steady = statistics.median(times[1:])
    return {"workload": spec.name, "model": spec.model, "clients_per_round": spec.cohort_size,
            "first_round_s": times[0], "s_per_round": steady, "updates_per_s": spec.cohort_size / steady,
            "gflops": spec.flops_per_round() / steady / 1e9, "padding": sim.padding_overhead(sim.plan(0))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--workloads", nargs="+", choices=[c.name for c in CASES], help="default: all")
    parser.add_argument("--matmul-size", type=int, default=8192, help="side of the square matmul that measures the peak")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    peak = matmul_peak(args.matmul_size)
    print(f"matmul peak: {peak:,.0f} GFLOP/s (float32, highest precision)", flush=True)
    flower_client_s, flower_source = flower_per_client_s()
    rows = []
    for spec in [c for c in CASES if not args.workloads or c.name in args.workloads]:
        row = run_case(spec, args.cache.expanduser())
        row["fraction_of_peak"] = row["gflops"] / peak
        row["x_flower_per_client"] = flower_client_s / (row["s_per_round"] / spec.cohort_size) if spec.model == "logreg" else None
        rows.append(row)
    lines = [f"Device: {device.device_kind}; measured float32 matmul peak {peak:,.0f} GFLOP/s. Flower's per-client cost "
             f"on W1: {flower_client_s * 1e3:.1f} ms ({flower_source}).", "",
             "| workload | clients/round | round 1 s | s/round | client updates/s | GFLOP/s | % of peak | per-client cost vs Flower |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        versus = f"{r['x_flower_per_client']:,.0f}x" if r["x_flower_per_client"] else "—"
        lines.append(f"| {r['workload']} | {r['clients_per_round']:,} | {r['first_round_s']:.2f} | {r['s_per_round']:.4f} "
                     f"| {r['updates_per_s']:,.0f} | {r['gflops']:,.0f} | {100 * r['fraction_of_peak']:.1f}% | {versus} |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps({"device": device.device_kind, "matmul_gflops": peak, "rows": rows}, indent=2))
    (args.out / "gpu.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
