"""Label shards (McMahan et al. 2017's pathological non-IID split) as a partitioner plugin:
rows sorted by label are cut into ``num_clients * shards_per_client`` shards, dealt at random."""

from dataclasses import dataclass

import numpy as np

from nordfl import registry
from nordfl.tasks.partition import PooledConfig, pooled_partition


@dataclass
class ShardsConfig(PooledConfig):
    name: str = "shards"
    shards_per_client: int = 2


@registry.register("partitioner", "shards", config=ShardsConfig)
def shards(dataset, *, num_clients: int, seed: int = 0, test_fraction: float = 0.2, shards_per_client: int = 2):
    if not isinstance(shards_per_client, int) or shards_per_client < 1:
        raise ValueError(f"partition.shards_per_client: must be an integer >= 1, got {shards_per_client!r}")

    def split(x, y, rng):
        pieces = np.array_split(np.argsort(y, kind="stable"), num_clients * shards_per_client)
        dealt = rng.permutation(len(pieces))
        return x, [np.concatenate([pieces[j] for j in dealt[i::num_clients]]) for i in range(num_clients)]

    return pooled_partition(dataset, "shards", split, num_clients=num_clients, seed=seed, test_fraction=test_fraction)
