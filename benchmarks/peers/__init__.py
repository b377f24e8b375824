"""Peer implementations of the benchmark workloads, one module per system.

Each runs as ``python -m benchmarks.peers.<name> --workload W.json --out DIR`` inside that
peer's own virtual environment, imports nothing of NordFL (only ``benchmarks.peers.common``,
which needs NumPy alone), and writes ``DIR/result.json`` and ``DIR/params.npz``.
"""
