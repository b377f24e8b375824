"""The peer benchmark suite: the same federated workloads in NordFL and in peer frameworks,
side by side, each peer in its own virtual environment.

    python -m benchmarks.run --suite peers     # W1-W4 in every system; ~20 min on 2 cores, plus installs
    python -m benchmarks.run --suite scale     # NordFL on W1 with 10k and 100k registered clients
    python -m benchmarks.run --suite smoke     # NordFL and the NumPy loop, 3 small rounds (CI)
    python -m benchmarks.run --suite peers --peers nordfl flower --workloads W1

Peers are installed once under the cache folder (``--cache``, default
``$NORDFL_BENCH_CACHE`` or ``~/.cache/nordfl-bench``): ``venvs/<peer>`` with pinned
versions, so they never touch NordFL's environment. Each (peer, workload) runs in a fresh
process; the runner times it, samples the memory of its whole process tree, and scores the
final model it wrote with one NumPy function, so "the same loss" is checked independently of
each framework's own metrics. A system whose loss is off the NumPy loop's by more than
``LOSS_TOLERANCE`` is flagged, not ranked. Writes ``<out>/<suite>.json`` and ``<suite>.md``
(and ``<suite>_updates.png`` for the peers suite).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks import workloads
from benchmarks.peers import common
from benchmarks.proctree import PeakMemory

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
LOSS_TOLERANCE = 0.02  # relative difference of final training loss to the reference (different shuffles)
# A row is also flagged if its final loss is not below the initial model's: it did not train.
TORCH_CPU = "torch==2.13.0+cpu"  # the CPU build; a bare "torch" resolves to the CUDA build and ~20 nvidia packages


@dataclasses.dataclass(frozen=True)
class Peer:
    """A system under test: its module in ``benchmarks.peers`` and how to install it.

    ``installs`` are pip argument lists run in order in the peer's own venv; ``None`` runs
    the peer in this interpreter (NordFL itself, and the NumPy loop, which needs only NumPy).
    """

    name: str
    module: str
    label: str
    installs: Optional[tuple[tuple[str, ...], ...]] = None
    packages: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def _jax_pin() -> str:
    from importlib import metadata

    return f"jax=={metadata.version('jax')}"


PEERS = {
    "nordfl": Peer("nordfl", "benchmarks.peers.nordfl", "NordFL (vmap simulator)"),
    # One BLAS thread: the loop is sequential, and two threads on batch-10 matmuls were slower.
    "numpy_loop": Peer("numpy_loop", "benchmarks.peers.numpy_loop", "NumPy loop (sequential)",
                       env=(("OPENBLAS_NUM_THREADS", "1"), ("OMP_NUM_THREADS", "1"), ("MKL_NUM_THREADS", "1"))),
    "jax_jit_loop": Peer("jax_jit_loop", "benchmarks.peers.jax_jit_loop", "per-client jax.jit loop (FedJAX-style)",
                         ((_jax_pin(), "numpy"),), ("jax", "jaxlib")),
    "drjax": Peer("drjax", "benchmarks.peers.drjax_map", "DrJAX (map over clients)",
                  (("drjax==0.2.1", _jax_pin(), "numpy"),), ("drjax", "jax", "jaxlib")),
    "flower": Peer("flower", "benchmarks.peers.flower", "Flower (simulation engine)",
                   (("flwr[simulation]==1.42.0", "numpy"),), ("flwr", "ray")),
    "pfl": Peer("pfl", "benchmarks.peers.pfl_research", "pfl-research (simulated backend)",
                ((TORCH_CPU,), ("pfl==0.6.0", "numpy")), ("pfl", "torch")),
}
SUITE_PEERS = {
    "peers": list(PEERS),
    "scale": ["nordfl"],
    "smoke": ["nordfl", "numpy_loop"],
}


DEFAULT_CACHE = Path(os.environ.get("NORDFL_BENCH_CACHE", "~/.cache/nordfl-bench"))
"""Where peers' virtual environments and workload data live (``--cache`` of every benchmark script)."""


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------- environments
def python_for(peer: Peer, cache: Path) -> str:
    """The interpreter that runs ``peer``; creates and fills its venv on first use."""
    if peer.installs is None:
        return sys.executable
    venv = cache / "venvs" / peer.name
    stamp = venv / "nordfl-bench-installed.json"
    wanted = json.dumps(peer.installs)
    python = venv / "bin" / "python"
    if stamp.exists() and stamp.read_text() == wanted and python.exists():
        return str(python)
    log(f"  installing {peer.name} into {venv} (once) ...")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    for args in peer.installs:
        log(f"    pip install {' '.join(args)}")
        subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True)
    stamp.write_text(wanted)
    log(f"  {peer.name} installed in {time.perf_counter() - start:.0f} s")
    return str(python)


# ---------------------------------------------------------------------------- measurement
def matmul_gflops(size: int = 2048, repeats: int = 5) -> dict:
    """The machine's dense float32 matmul rate: NumPy (BLAS) and XLA, best of ``repeats``."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, size, size), dtype=np.float32)
    flops = 2 * size ** 3

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9

    ja, jb = jnp.asarray(a), jnp.asarray(b)
    matmul = jax.jit(jnp.matmul)
    rates = {"numpy": best(lambda: a @ b), "xla": best(lambda: matmul(ja, jb).block_until_ready())}
    return rates | {"peak": max(rates.values()), "size": size}


def run_peer(peer: Peer, python: str, workload_path: Path, out: Path, timeout: float) -> dict:
    """One (peer, workload) in a fresh process: wall time, peak tree memory, its result.json."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    env = os.environ | {"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"} | dict(peer.env)
    start = time.perf_counter()
    with open(out / "log.txt", "w") as logfile:
        process = subprocess.Popen([python, "-m", peer.module, "--workload", str(workload_path), "--out", str(out)],
                                   cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT, start_new_session=True)
        with PeakMemory(process.pid) as peak:
            try:
                code = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                code = process.wait()
    wall = time.perf_counter() - start
    try:
        os.killpg(process.pid, 9)  # helpers a framework left behind (e.g. Ray's daemons)
    except ProcessLookupError:
        pass
    result = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else None
    if result is None:
        tail = (out / "log.txt").read_text()[-2000:]
        return {"status": "failed", "reason": f"exit code {code} after {wall:.0f} s; log tail:\n{tail}", "wall_s": wall}
    return result | {"wall_s": wall, "peak_mb": peak.bytes / 2**20, "exit_code": code}


def score(result: dict, data_path: Path, spec: workloads.Spec, out: Path) -> dict:
    """Adds the derived numbers: steady s/round, updates/s, final loss/accuracy by the one NumPy scorer.

    The data is loaded here and dropped after, so the runner holds no copy while a peer runs
    (100,000 clients are 4.8 GB)."""
    if result.get("status") != "ok":
        return result
    rounds = result["round_s"]
    steady = statistics.median(rounds[1:]) if len(rounds) > 1 else rounds[0]
    data = common.Data(data_path)
    with np.load(out / "params.npz") as f:
        loss, accuracy = common.loss_and_accuracy(dict(f), data.x, data.y)
    return result | {
        "first_round_s": rounds[0], "s_per_round": steady, "train_s": sum(rounds),
        "updates_per_s": spec.cohort_size / steady, "loss": float(loss), "accuracy": float(accuracy),
        "gflops": spec.flops_per_round() / steady / 1e9,
    }


def check_losses(rows: list[dict], reference: str) -> None:
    """Flags rows whose loss is off the reference peer's (same workload) by more than LOSS_TOLERANCE."""
    for row in rows:
        ref = next((r for r in rows if r["peer"] == reference and r["workload"] == row["workload"] and "loss" in r), None)
        if "loss" in row and ref is not None:
            row["loss_gap"] = float(abs(row["loss"] - ref["loss"]) / ref["loss"])
            row["flagged"] = bool(row["loss_gap"] > LOSS_TOLERANCE or not row["loss"] < row["initial_loss"])


# ---------------------------------------------------------------------------- report
def _fmt(value, spec: str = ".3f", missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    rows, peak = summary["rows"], summary["matmul_gflops"]["peak"]
    lines = [f"Machine: {summary['machine']}. Measured dense float32 matmul peak: {peak:.0f} GFLOP/s "
             f"(NumPy {summary['matmul_gflops']['numpy']:.0f}, XLA {summary['matmul_gflops']['xla']:.0f}).", ""]
    for name in dict.fromkeys(r["workload"] for r in rows):
        spec = workloads.find(name)
        mine = [r for r in rows if r["workload"] == name]
        base = next((r for r in mine if r["peer"] == "nordfl" and "s_per_round" in r), None)
        lines += [f"### {name}: {spec.algorithm}, {spec.model}, {spec.num_clients:,} clients, {spec.cohort_size} per round, "
                  f"{spec.rounds} rounds, {spec.epochs} epochs, batch {spec.batch_size} "
                  f"({spec.flops_per_round() / 1e9:.2f} GFLOP/round); loss of the initial model {mine[0]['initial_loss']:.4f}", "",
                  "| system | set-up s | round 1 s | s/round | wall s | client updates/s | GFLOP/s (% of peak) "
                  "| peak memory MB | final loss | accuracy | NordFL speed-up |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mine:
            label = PEERS[r["peer"]].label
            if r.get("status") != "ok":
                why = r.get("reason", "").splitlines()[0] if r.get("reason") else ""
                lines.append(f"| {label} | {r.get('status')}: {why} |" + " |" * 10)
                continue
            if r.get("flagged"):
                speedup = f"not ranked: loss off by {100 * r['loss_gap']:.1f}%"
            elif base is None or r["peer"] == "nordfl":
                speedup = "1x" if r["peer"] == "nordfl" else "—"
            else:
                speedup = f"{r['s_per_round'] / base['s_per_round']:.1f}x"
            lines.append(
                f"| {label} | {r['setup_s']:.1f} | {r['first_round_s']:.3f} | {r['s_per_round']:.4f} | {r['wall_s']:.1f} "
                f"| {r['updates_per_s']:,.0f} | {r['gflops']:.1f} ({100 * r['gflops'] / peak:.1f}%) | {r['peak_mb']:,.0f} "
                f"| {r['loss']:.4f} | {r['accuracy']:.3f} | {speedup} |")
        lines.append("")
    lines.append("s/round: median of rounds 2..end (round 1 includes compilation and lazy start-up); set-up: process "
                 "start to the first round (imports, data, framework start); wall: the whole process as the runner saw "
                 "it. Speed-up: the system's s/round over NordFL's. Peak memory: the process tree (helpers included).")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Client updates/s per system and workload, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["rows"] if r.get("status") == "ok" and not r.get("flagged")]
    names = list(dict.fromkeys(r["workload"] for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(peers), 1)
    for i, peer in enumerate(peers):
        values = [next((r["updates_per_s"] for r in rows if r["peer"] == peer and r["workload"] == n), 0) for n in names]
        ax.bar(np.arange(len(names)) + i * width, values, width, label=PEERS[peer].label)
    ax.set_xticks(np.arange(len(names)) + width * (len(peers) - 1) / 2, names)
    ax.set_yscale("log")
    ax.set_ylabel("client updates / s (log)")
    ax.set_title(summary["machine"], fontsize=8)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> str:
    import jax

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {memory:.0f} GiB RAM, "
            f"Python {platform.python_version()}, jax {jax.__version__} ({jax.default_backend()})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=list(workloads.SUITES), default="peers")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), help="default: the suite's systems")
    parser.add_argument("--workloads", nargs="+", help="default: the suite's workloads")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where <suite>.json and <suite>.md go")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one (peer, workload) may take")
    args = parser.parse_args(argv)
    cache = args.cache.expanduser()
    specs = workloads.SUITES[args.suite]
    if args.workloads:
        unknown = sorted(set(args.workloads) - {s.name for s in specs})
        if unknown:
            parser.error(f"--workloads: {', '.join(unknown)} not in suite {args.suite!r} "
                         f"(it has {', '.join(s.name for s in specs)})")
        specs = [s for s in specs if s.name in args.workloads]
    peers = [PEERS[p] for p in (args.peers or SUITE_PEERS[args.suite])]

    log(f"[{args.suite}] {machine()}")
    log("[limits] measuring the dense matmul peak ...")
    peak = matmul_gflops()
    log(f"[limits] {peak['peak']:.0f} GFLOP/s (NumPy {peak['numpy']:.0f}, XLA {peak['xla']:.0f})")
    pythons = {}
    for peer in peers:
        log(f"[env] {peer.name}")
        try:
            pythons[peer.name] = python_for(peer, cache)
        except subprocess.CalledProcessError as e:
            log(f"[env] {peer.name}: install failed ({e}); its rows are marked failed")
    rows = []
    for spec in specs:
        data_path = workloads.write_data(spec, cache, log)
        data = common.Data(data_path)
        initial_loss = float(common.loss_and_accuracy(data.init, data.x, data.y)[0])
        del data
        for peer in peers:
            folder = cache / "runs" / args.suite / spec.name / peer.name
            workload_path = workloads.write_workload(spec, data_path, folder)
            log(f"[{spec.name}] {peer.name} ...")
            if peer.name not in pythons:
                result = {"status": "failed", "reason": "install failed"}
            else:
                result = score(run_peer(peer, pythons[peer.name], workload_path, folder, args.timeout), data_path, spec, folder)
            result |= {"peer": peer.name, "workload": spec.name, "initial_loss": initial_loss}
            rows.append(result)
            if result.get("status") == "ok":
                log(f"[{spec.name}] {peer.name}: {result['s_per_round']:.4f} s/round (round 1 {result['first_round_s']:.2f} s), "
                    f"{result['updates_per_s']:,.0f} client updates/s, loss {result['loss']:.4f}, "
                    f"peak {result['peak_mb']:,.0f} MB")
            else:
                log(f"[{spec.name}] {peer.name}: {result.get('status')}: {result.get('reason', '')}")
    reference = "numpy_loop" if any(r["peer"] == "numpy_loop" for r in rows) else "nordfl"
    check_losses(rows, reference)
    summary = {"suite": args.suite, "machine": machine(), "matmul_gflops": peak, "loss_reference": reference,
               "loss_tolerance": LOSS_TOLERANCE, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.suite}.json").write_text(json.dumps(summary, indent=2))
    text = markdown(summary)
    (args.out / f"{args.suite}.md").write_text(text)
    if args.suite == "peers":
        plot(summary, args.out / f"{args.suite}_updates.png")
    log("\n" + text)
    flagged = [f"{r['peer']}/{r['workload']}" for r in rows if r.get("flagged")]
    if flagged:
        log(f"flagged (loss differs from {reference} by > {100 * LOSS_TOLERANCE:.0f}%): {', '.join(flagged)}")
    return 1 if any(r.get("status") == "failed" for r in rows) or (args.suite == "smoke" and flagged) else 0


if __name__ == "__main__":
    raise SystemExit(main())
