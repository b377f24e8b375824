"""What every peer shares: the workload, the data file, the maths, and the result format.

Needs only NumPy and the standard library, because it runs inside each peer's own virtual
environment. The runner (``benchmarks.run``) writes a workload JSON and a data ``.npz``;
a peer trains and writes ``result.json`` (timings, versions) and ``params.npz`` (the final
global model); the runner scores every peer's ``params.npz`` with the same NumPy code.

The maths every peer implements (so the same workload gives the same loss within noise):

- Model: ``logreg`` is ``logits = x @ w + b``; ``mlp`` is ReLU layers ``h = relu(h @ w_i + b_i)``
  then a linear output. Parameters are named ``w0, b0, w1, b1, ...`` (``w0, b0`` for logreg),
  ``w_i`` shaped [in, out]; every peer starts from the ``init_*`` arrays in the data file.
- Loss: mean softmax cross-entropy over the batch.
- Local work: ``epochs`` passes over the client's rows, each in a fresh random order, in
  batches of ``batch_size`` (a last partial batch is a smaller step), plain SGD with ``lr``.
- ``fedavg``: the new global model is the mean of the clients' models weighted by their
  number of rows. ``fedprox``: the local loss adds ``mu / 2 * ||w - w_global||^2``.
  ``scaffold`` (Karimireddy et al. 2020, option II, uniform weights, global lr 1): local
  gradient ``g + c - c_i``; after K steps ``c_i' = c_i - c + (w_global - w) / (K * lr)``;
  the server adds the mean of ``w - w_global`` and ``|S| / N`` times the mean of ``c_i' - c_i``.
- Round r trains the clients in ``cohorts[r]`` (sorted ids, the same for every peer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

import numpy as np

STARTED = time.perf_counter()  # module import time: a peer imports this first, before its framework


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    algorithm: str  # fedavg | fedprox | scaffold
    model: str  # logreg | mlp
    data: str  # path of the .npz
    num_clients: int
    cohort_size: int
    rounds: int
    epochs: int
    batch_size: int
    lr: float
    mu: float = 0.0
    seed: int = 0

    @classmethod
    def load(cls, path) -> "Workload":
        return cls(**json.loads(Path(path).read_text()))


class Data:
    """The workload's arrays: ``x`` [N, n, d] float32, ``y`` [N, n] int32, ``cohorts`` [R, C], init params."""

    def __init__(self, path):
        with np.load(path) as f:
            self.x, self.y, self.cohorts = f["x"], f["y"], f["cohorts"]
            self.init = {k[len("init_"):]: f[k] for k in f.files if k.startswith("init_")}

    def client(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[k], self.y[k]


def param_names(params: dict) -> list[str]:
    """``w0, b0, w1, b1, ...`` in layer order."""
    layers = len(params) // 2
    return [f"{kind}{i}" for i in range(layers) for kind in ("w", "b")]


def forward(params: dict, x, relu=lambda h: np.maximum(h, 0)):
    """Logits of the workload's model (logreg or ReLU MLP); JAX peers pass ``jax.nn.relu``."""
    layers = len(params) // 2
    h = x
    for i in range(layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            h = relu(h)
    return h


def loss_and_accuracy(params: dict, x: np.ndarray, y: np.ndarray, chunk: int = 65536) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all rows (float64, in chunks): the one score for every peer."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1)
    params = {k: v.astype(np.float64) for k, v in params.items()}
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), chunk):
        logits = forward(params, x[start:start + chunk].astype(np.float64))
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        labels = y[start:start + chunk]
        total_loss -= log_probs[np.arange(len(labels)), labels].sum()
        correct += int((logits.argmax(axis=1) == labels).sum())
    return total_loss / len(y), correct / len(y)


def versions(*packages: str) -> dict:
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


class Recorder:
    """Times the set-up and each round, and writes the result files."""

    def __init__(self, peer: str, workload: Workload, out: Path):
        self.peer, self.workload, self.out = peer, workload, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.setup_s: Optional[float] = None
        self.round_s: list[float] = []
        self._last = None

    def ready(self) -> None:
        """Call when imports, data loading and framework start-up are done, just before round 0."""
        self.setup_s = time.perf_counter() - STARTED
        self._last = time.perf_counter()

    def round_done(self, r: int) -> None:
        now = time.perf_counter()
        self.round_s.append(now - self._last)
        self._last = now
        print(f"[{self.peer}/{self.workload.name}] round {r + 1}/{self.workload.rounds}: {self.round_s[-1]:.3f} s", flush=True)

    def finish(self, params: dict, packages: tuple[str, ...] = (), notes: str = "") -> None:
        np.savez(self.out / "params.npz", **{k: np.asarray(v, np.float32) for k, v in params.items()})
        self._write({"status": "ok", "setup_s": self.setup_s, "round_s": self.round_s,
                     "versions": versions("numpy", *packages), "notes": notes})

    def not_applicable(self, reason: str, packages: tuple[str, ...] = ()) -> None:
        """The peer lacks this algorithm (e.g. SCAFFOLD in Flower): reported as n/a, not as a failure."""
        self._write({"status": "n/a", "reason": reason, "versions": versions("numpy", *packages)})

    def _write(self, fields: dict) -> None:
        result = {"peer": self.peer, "workload": self.workload.name, "pid": os.getpid()} | fields
        (self.out / "result.json").write_text(json.dumps(result, indent=2))


def parse_args(description: str) -> tuple[Workload, Path]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--workload", required=True, help="workload JSON written by benchmarks.run")
    parser.add_argument("--out", required=True, help="folder for result.json and params.npz")
    args = parser.parse_args()
    return Workload.load(args.workload), Path(args.out)


def sequential_rounds(w: Workload, data: Data, recorder: Recorder, train) -> dict:
    """The server side both sequential baselines share; returns the final global model.

    Each round trains the cohort one client after another with
    ``train(global_params, x, y, rng, correction) -> (params, steps)``, where ``correction``
    is SCAFFOLD's ``c - c_i`` (``None`` otherwise), then averages the models weighted by
    rows (equally for SCAFFOLD) and, with SCAFFOLD, updates each ``c_i`` (option II) and ``c``.
    All shuffles come from one ``default_rng(seed)`` stream, in cohort order.
    """
    params = {k: v.astype(np.float32) for k, v in data.init.items()}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    c, c_clients = zeros, {}
    rng = np.random.default_rng(w.seed)
    scaffold = w.algorithm == "scaffold"
    recorder.ready()
    for r in range(w.rounds):
        models, sizes, control_deltas = [], [], []
        for k in map(int, data.cohorts[r]):
            x, y = data.client(k)
            c_i = c_clients.get(k, zeros)
            correction = {key: c[key] - c_i[key] for key in params} if scaffold else None
            model, steps = train(params, x, y, rng, correction)
            models.append(model)
            sizes.append(len(y))
            if scaffold:
                new_c_i = {key: c_i[key] - c[key] + (params[key] - model[key]) / np.float32(steps * w.lr) for key in params}
                control_deltas.append({key: new_c_i[key] - c_i[key] for key in params})
                c_clients[k] = new_c_i
        weights = np.ones(len(sizes)) if scaffold else np.asarray(sizes, np.float64)
        weights = (weights / weights.sum()).astype(np.float32)
        params = {key: sum(wt * m[key] for wt, m in zip(weights, models)) for key in params}
        if scaffold:  # c += |S|/N * mean(delta c_i) = sum(delta c_i) / N
            c = {key: c[key] + sum(d[key] for d in control_deltas) / np.float32(w.num_clients) for key in params}
        recorder.round_done(r)
    return params


def batches(order: np.ndarray, batch_size: int):
    """Row indices of each batch of one epoch (the last one may be smaller)."""
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
