"""The 8×8 handwritten digits (UCI, as bundled with scikit-learn), shipped inside NordFL.

1,797 images of 64 pixel counts (0..16) in 10 classes, read from the vendored
``data/digits.csv.gz`` and checked against its SHA-256, so label-skew experiments need no
download. The data comes as one client; ``partition=dirichlet`` or ``k_classes`` deals
it out to many.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
import hashlib
import io
from importlib import resources

import numpy as np

from nordfl import registry
from nordfl.tasks.data import FederatedDataset, build_federated
from nordfl.tasks.task import TaskConfig

VENDORED_CSV = "digits.csv.gz"
VENDORED_SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"
NUM_FEATURES = 64
NUM_CLASSES = 10
NUM_ROWS = 1797


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """The vendored images as float32 [1797, 64] scaled to [0, 1] and int32 labels."""
    raw = resources.files("nordfl.tasks").joinpath("data", VENDORED_CSV).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != VENDORED_SHA256:
        raise ValueError(f"digits: {VENDORED_CSV} has SHA-256 {digest}, expected {VENDORED_SHA256} (a damaged install?)")
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",", dtype=np.float32)
    return table[:, :NUM_FEATURES] / 16.0, table[:, NUM_FEATURES].astype(np.int32)


@dataclass
class DigitsConfig(TaskConfig):
    name: str = "digits"


@registry.register("task", "digits", config=DigitsConfig, feature_shape=(NUM_FEATURES,), num_classes=NUM_CLASSES)
def digits(*, seed: int = 0, test_fraction: float = 0.2) -> FederatedDataset:
    """All digits as one client, split train/test (stratified, seeded); repartition to federate."""
    x, y = load_digits()
    return build_federated(
        "digits", x, y, [np.arange(len(y))], num_classes=NUM_CLASSES, test_fraction=test_fraction, seed=seed,
        client_names=["digits"],
    )
