"""A small heterogeneous task and a plain per-site reference driver for simulator tests."""

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData, weighted_mean
from nordfl.tasks import ClientSplit, FederatedDataset, classification_task, logistic_regression
from tests.reference import make_clients


def uneven_task(sizes=(3, 40, 7, 0, 120, 15, 60), seed=0):
    """Clients of very different sizes, one with no data, each with a small test set."""
    trains = make_clients(sizes, seed=seed)
    tests = make_clients([max(n // 4, 1) for n in sizes], seed=seed + 1)
    clients = tuple(ClientSplit(f"site_{i}", tr, te) for i, (tr, te) in enumerate(zip(trains, tests)))
    data = FederatedDataset("uneven", clients, num_classes=3)
    return classification_task("uneven", data, logistic_regression(5, 3, seed=seed))


def per_site_reference(algorithm, task, plans, seed, params, tamper=None):
    """Each cohort member jitted alone on its unpadded data; updates stacked and averaged as the runtime will.
    ``tamper(client, update) -> update`` (NumPy leaves), if given, replaces each counted client's update first.

    Returns (server_state, list of client states).
    """
    update = jax.jit(algorithm.client_update)
    server = algorithm.server_init(params)
    states = [algorithm.client_init(params) for _ in task.data.clients]
    for r, plan in enumerate(plans):
        key = jax.random.fold_in(jax.random.key(seed), r)
        message = algorithm.broadcast(server)
        updates, weights = [], []
        for client, epochs, counts in zip(plan.cohort, plan.epochs, plan.contributes):
            train = task.data.clients[client].train
            n = len(train.y)
            rows = max(n, 1)  # an empty site still needs an array to index
            x = np.zeros((rows, *train.x.shape[1:]), np.float32)
            y = np.zeros(rows, np.int32)
            x[:n], y[:n] = train.x, train.y
            data = ClientData(type(train)(jnp.asarray(x), jnp.asarray(y)), jnp.int32(n))
            out = update(message, states[client], data, jax.random.fold_in(key, int(client)), jnp.int32(epochs))
            if counts:
                updates.append(out.update if tamper is None else tamper(int(client), jax.tree_util.tree_map(np.asarray, out.update)))
                weights.append(out.weight)
                states[client] = out.client_state
        if updates:
            stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *updates)
            aggregate = weighted_mean(stacked, jnp.stack(weights))
        else:
            zero = jax.tree_util.tree_map(lambda a: jnp.zeros((1, *a.shape), a.dtype), message)
            aggregate = weighted_mean(zero, jnp.zeros(1, jnp.float32))
        server, _ = algorithm.server_update(server, aggregate)
    return server, states
