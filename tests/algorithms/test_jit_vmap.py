"""Every algorithm gives the same result jitted per client on its own unpadded data and
vmapped over a padded cohort that includes a zero-data padding client."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nordfl.algorithms import ClientData, make_algorithm
from nordfl.sim.packing import pack_clients
from nordfl.tasks import Examples
from tests import reference as ref

SIZES = [5, 12, 0]
ALGORITHMS = {
    "fedavg": {},
    "fedprox": {"mu": 0.1},
    "scaffold": {"num_clients": 3},
    "fedadam": {"server": {"learning_rate": 0.05}},
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_jitted_per_client_equals_vmapped(softmax_model, name):
    _, params, loss_fn = softmax_model
    alg = make_algorithm(name, loss_fn, client_lr=0.1, num_epochs=2, batch_size=4, **ALGORITHMS[name])
    clients = ref.make_clients(SIZES)
    keys = [jax.random.key(10 + i) for i in range(len(SIZES))]
    server = alg.server_init(params)
    message = alg.broadcast(server)
    # A non-zero client state, so SCAFFOLD's correction is exercised.
    state0 = jax.tree_util.tree_map(lambda a: 0.01 * jnp.ones_like(a), alg.client_init(params))

    jitted = jax.jit(alg.client_update)
    singles = []
    for c, key in zip(clients, keys):
        rows = max(len(c.y), 1)  # the empty client still needs one (padding) row
        x = np.zeros((rows, c.x.shape[1]), np.float32)
        y = np.zeros(rows, np.int32)
        x[: len(c.y)], y[: len(c.y)] = c.x, c.y
        singles.append(jitted(message, state0, ClientData(Examples(jnp.asarray(x), jnp.asarray(y)), jnp.int32(len(c.y))), key))

    stacked_state = jax.tree_util.tree_map(lambda a: jnp.stack([a] * len(SIZES)), state0)
    vmapped = jax.jit(jax.vmap(alg.client_update, in_axes=(None, 0, 0, 0)))(
        message, stacked_state, pack_clients(clients), jnp.stack(keys)
    )
    for i, single in enumerate(singles):
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b[i], rtol=1e-6, atol=1e-7), single, vmapped
        )
    assert float(vmapped.weight[2]) == 0.0
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b[2]), state0, vmapped.client_state)
