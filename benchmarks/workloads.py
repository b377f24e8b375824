"""The benchmark workloads and their data files, written once and shared by every peer.

W1: FedAvg, logistic regression 60 -> 10 on Synthetic(1,1), 100 clients x 200 training
rows, all clients every round, 20 rounds, 5 local epochs, batch 10, lr 0.01.
W2: W1 with 1,000 registered clients and 100 per round.
W3: a 784-512-512-10 ReLU MLP on image-sized synthetic inputs, 100 clients per round.
W4: FedProx (mu 0.1) and SCAFFOLD on W1.
Scale: W1 with 10,000 and 100,000 registered clients, cohorts of 100 and 1,000.

A data file holds every client's rows (equal sizes, so no peer pays for padding or
bucketing it lacks), the cohort of every round (from NordFL's seeded ``plan_round``, so
every peer trains the same clients) and the initial parameters (from NordFL's models).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.peers.common import Workload

ROWS = 200  # training rows per client
SEED = 0


@dataclasses.dataclass(frozen=True)
class Spec:
    """A workload as the runner knows it; ``workload()`` is what a peer reads."""

    name: str
    algorithm: str = "fedavg"
    model: str = "logreg"
    num_clients: int = 100
    cohort_size: int = 100
    rounds: int = 20
    epochs: int = 5
    batch_size: int = 10
    lr: float = 0.01
    mu: float = 0.0
    rows: int = ROWS

    @property
    def data_key(self) -> str:
        """Workloads that share data (W1 and W4) share one file."""
        return f"{self.model}-{self.num_clients}x{self.rows}-c{self.cohort_size}-r{self.rounds}-s{SEED}"

    def workload(self, data_path: Path) -> Workload:
        return Workload(self.name, self.algorithm, self.model, str(data_path), self.num_clients, self.cohort_size,
                        self.rounds, self.epochs, self.batch_size, self.lr, self.mu, SEED)

    def flops_per_round(self) -> float:
        """Multiply-adds x 2 of one round: each example's forward (1x) and backward (2x) pass,
        plus the SGD update of every parameter at every step."""
        sizes = layer_sizes(self.model)
        weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        params = weights + sum(sizes[1:])
        examples = self.cohort_size * self.epochs * self.rows
        steps = self.cohort_size * self.epochs * -(-self.rows // self.batch_size)
        return 3 * 2 * weights * examples + 2 * params * steps


W1 = Spec("W1")
SUITES: dict[str, list[Spec]] = {
    "peers": [
        W1,
        Spec("W2", num_clients=1_000, cohort_size=100),
        Spec("W3", model="mlp", rounds=3),
        Spec("W4-fedprox", algorithm="fedprox", mu=0.1),
        Spec("W4-scaffold", algorithm="scaffold"),
    ],
    "scale": [
        W1,
        Spec("W1-10k", num_clients=10_000, cohort_size=100, rounds=5),
        Spec("W1-10k-c1000", num_clients=10_000, cohort_size=1_000, rounds=5),
        Spec("W1-100k", num_clients=100_000, cohort_size=100, rounds=5),
        Spec("W1-100k-c1000", num_clients=100_000, cohort_size=1_000, rounds=5),
    ],
    "smoke": [Spec("W1-smoke", num_clients=20, cohort_size=10, rounds=3, epochs=2)],
}


def layer_sizes(model: str) -> list[int]:
    return {"logreg": [60, 10], "mlp": [784, 512, 512, 10]}[model]


def init_params(model: str) -> dict[str, np.ndarray]:
    """NordFL's initial model (Flax nnx, seed 0), renamed to the peers' ``w0, b0, ...``."""
    from nordfl.tasks.models import logistic_regression, mlp

    sizes = layer_sizes(model)
    if model == "logreg":
        p = logistic_regression(sizes[0], sizes[-1]).init_params
        layers = [p["linear"]]
    else:
        p = mlp(sizes[0], sizes[-1], tuple(sizes[1:-1])).init_params
        layers = [p["hidden"][i] for i in range(len(sizes) - 2)] + [p["out"]]
    out = {}
    for i, layer in enumerate(layers):
        out[f"w{i}"], out[f"b{i}"] = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    return out


def _rows(spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """x [N, rows, d] float32 and y [N, rows] int32."""
    if spec.model == "logreg":
        from nordfl.tasks.synthetic import synthetic

        data = synthetic(1.0, 1.0, num_devices=spec.num_clients, samples_per_device=spec.rows, seed=SEED)
        # All of a device's rows train (its train and test splits together): no peer evaluates per client.
        x = np.stack([np.concatenate([c.train.x, c.test.x]) for c in data.clients])
        y = np.stack([np.concatenate([c.train.y, c.test.y]) for c in data.clients])
        return x, y
    # Image-sized inputs: class means in [0, 1]^784 plus noise; each client skews its label mix.
    rng = np.random.default_rng(SEED)
    d, classes = layer_sizes(spec.model)[0], layer_sizes(spec.model)[-1]
    means = rng.uniform(0, 1, (classes, d)).astype(np.float32)
    mixes = rng.dirichlet(np.full(classes, 1.0), spec.num_clients)
    y = np.stack([rng.choice(classes, spec.rows, p=m) for m in mixes]).astype(np.int32)
    x = (means[y] + rng.normal(0, 1.0, (*y.shape, d)).astype(np.float32)).astype(np.float32)
    return x, y


def cohorts(spec: Spec) -> np.ndarray:
    """Every round's cohort from NordFL's own sampler (the simulator draws the same ones)."""
    from nordfl.sim.cohort import plan_round

    return np.stack([
        plan_round(SEED, r, num_clients=spec.num_clients, cohort_size=spec.cohort_size, num_epochs=spec.epochs).cohort
        for r in range(spec.rounds)
    ]).astype(np.int32)


def write_data(spec: Spec, cache: Path, log=print) -> Path:
    """The data file for ``spec`` under ``cache`` (written once, reused after)."""
    path = Path(cache) / "data" / f"{spec.data_key}.npz"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"  writing data {path.name} ({spec.num_clients:,} clients x {spec.rows} rows) ...")
    x, y = _rows(spec)
    arrays = {"x": x, "y": y, "cohorts": cohorts(spec)} | {f"init_{k}": v for k, v in init_params(spec.model).items()}
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, **arrays)
    temporary.replace(path)
    return path


def write_workload(spec: Spec, data_path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "workload.json"
    path.write_text(json.dumps(dataclasses.asdict(spec.workload(data_path)), indent=2))
    return path


def fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def find(name: str) -> Optional[Spec]:
    return next((s for specs in SUITES.values() for s in specs if s.name == name), None)
