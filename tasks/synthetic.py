"""FedProx's Synthetic(alpha, beta) and Synthetic-IID federated datasets.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020, section 5.1.
Device k draws u_k ~ N(0, alpha), B_k ~ N(0, beta) (alpha, beta are standard deviations),
W_k ~ N(u_k, 1) [60, 10], b_k ~ N(u_k, 1) [10], v_k ~ N(B_k, 1) [60], features
x ~ N(v_k, Sigma) with Sigma = diag(j^-1.2), and labels argmax(W_k x + b_k). alpha controls
how much the local models differ, beta how much the local data differ. Synthetic-IID
shares one W, b ~ N(0, 1) and x ~ N(0, Sigma) across devices. Device sizes are
int(lognormal(4, 2)) + 50, as in the paper's generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from nordfl import registry
from nordfl.tasks.data import FederatedDataset, build_federated
from nordfl.tasks.task import TaskConfig

NUM_FEATURES = 60
NUM_CLASSES = 10


def _feature_std() -> np.ndarray:
    return np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** (-1.2 / 2)


def _check(num_devices, alpha, beta) -> None:
    if not isinstance(num_devices, (int, np.integer)) or num_devices < 1:
        raise ValueError(f"synthetic: num_devices must be an integer >= 1, got {num_devices!r}")
    for field, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"synthetic: {field} must be >= 0, got {value!r}")


@dataclass
class SyntheticIIDConfig(TaskConfig):
    name: str = "synthetic_iid"
    num_devices: int = 30
    split_seed: Optional[int] = None  # seeds each device's train/test split alone; null: data_seed (which also draws the data)


@dataclass
class SyntheticConfig(SyntheticIIDConfig):
    name: str = "synthetic"
    alpha: float = 1.0  # model heterogeneity
    beta: float = 1.0  # data heterogeneity


@registry.register("task", "synthetic", config=SyntheticConfig, feature_shape=(NUM_FEATURES,), num_classes=NUM_CLASSES)
def synthetic(
    alpha: float = 1.0,
    beta: float = 1.0,
    *,
    num_devices: int = 30,
    samples_per_device: Optional[int] = None,
    iid: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
    split_seed: Optional[int] = None,
) -> FederatedDataset:
    """Generates Synthetic(alpha, beta) (or Synthetic-IID with ``iid=True``; alpha, beta unused).

    Args:
      alpha: std of the per-device model means u_k.
      beta: std of the per-device feature means B_k.
      num_devices: number of devices (clients).
      samples_per_device: give every device exactly this many rows (train + test) instead of
        the paper's heavy-tailed sizes (``lognormal(4, 2) + 50``); benchmarks use equal sizes.
      iid: generate Synthetic-IID instead.
      test_fraction: per-device stratified test share.
      seed: the generator's seed; the same seed gives the same dataset.
      split_seed: seeds the train/test split alone (default ``seed``): other test rows of the same devices.
    """
    _check(num_devices, alpha, beta)
    if samples_per_device is not None and (not isinstance(samples_per_device, (int, np.integer)) or samples_per_device < 2):
        raise ValueError(f"synthetic: samples_per_device must be an integer >= 2 or None, got {samples_per_device!r}")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(4, 2, num_devices).astype(int) + 50
    if samples_per_device is not None:
        sizes = np.full(num_devices, samples_per_device)
    std = _feature_std()
    if iid:
        shared_w = rng.normal(0, 1, (NUM_FEATURES, NUM_CLASSES))
        shared_b = rng.normal(0, 1, NUM_CLASSES)
    else:
        u = rng.normal(0, alpha, num_devices)
        big_b = rng.normal(0, beta, num_devices)
    xs, ys = [], []
    for k, n in enumerate(sizes):
        if iid:
            w, b, v = shared_w, shared_b, np.zeros(NUM_FEATURES)
        else:
            w = rng.normal(u[k], 1, (NUM_FEATURES, NUM_CLASSES))
            b = rng.normal(u[k], 1, NUM_CLASSES)
            v = rng.normal(big_b[k], 1, NUM_FEATURES)
        x = v + std * rng.standard_normal((n, NUM_FEATURES))
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1).astype(np.int32))
    offsets = np.cumsum([0, *sizes])
    parts = [np.arange(offsets[i], offsets[i + 1]) for i in range(num_devices)]
    name = "synthetic_iid" if iid else f"synthetic({alpha},{beta})"
    return build_federated(
        name,
        np.concatenate(xs),
        np.concatenate(ys),
        parts,
        num_classes=NUM_CLASSES,
        test_fraction=test_fraction,
        seed=seed if split_seed is None else split_seed,
        client_names=[f"device_{k}" for k in range(num_devices)],
    )


@registry.register("task", "synthetic_iid", config=SyntheticIIDConfig, feature_shape=(NUM_FEATURES,), num_classes=NUM_CLASSES)
def synthetic_iid(**kwargs) -> FederatedDataset:
    """FedProx's Synthetic(IID): every device draws from the same model and features."""
    return synthetic(iid=True, **kwargs)
