"""FedAvg against closed forms: one full-batch local step per client is one step of
gradient descent on the pooled data."""

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData, ModelDelta, fedadam, fedavg, local_schedule, weighted_mean
from nordfl.sim.packing import pack_clients
from nordfl.tasks import Examples
from tests import reference as ref


def test_one_full_batch_step_equals_pooled_gradient_descent(softmax_model):
    _, params, loss_fn = softmax_model
    sizes = [3, 11, 26]
    clients = ref.make_clients(sizes)
    lr = 0.3
    alg = fedavg(loss_fn, local_schedule(client_lr=lr, num_epochs=1, batch_size=max(sizes)))
    data = pack_clients(clients)
    state = alg.server_init(params)
    keys = jax.random.split(jax.random.key(0), len(sizes))
    states = jax.vmap(alg.client_init)(jax.tree_util.tree_map(lambda p: jnp.stack([p] * 3), params))
    out = jax.vmap(alg.client_update, in_axes=(None, 0, 0, 0))(alg.broadcast(state), states, data, keys)
    np.testing.assert_array_equal(out.weight, np.asarray(sizes, np.float32))
    new_state, metrics = alg.server_update(state, weighted_mean(out.update, out.weight))

    w, b = ref.params_to_np(params)
    x = np.concatenate([c.x for c in clients]).astype(np.float64)
    y = np.concatenate([c.y for c in clients])
    _, gw, gb = ref.loss_and_grad(w, b, x, y)  # mean over all 40 pooled examples
    np.testing.assert_allclose(new_state.params["linear"]["kernel"], w - lr * gw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_state.params["linear"]["bias"], b - lr * gb, rtol=1e-5, atol=1e-6)
    assert int(new_state.round) == 1 and float(metrics.num_clients) == 3


def test_empty_client_sends_zero_weight_and_keeps_state(softmax_model):
    _, params, loss_fn = softmax_model
    (client,) = ref.make_clients([5])
    alg = fedavg(loss_fn, local_schedule(client_lr=0.1, num_epochs=2, batch_size=2))
    data = ClientData(Examples(jnp.asarray(client.x), jnp.asarray(client.y)), jnp.int32(0))
    out = alg.client_update(alg.broadcast(alg.server_init(params)), alg.client_init(params), data, jax.random.key(0))
    assert float(out.weight) == 0.0 and int(out.metrics.num_steps) == 0
    jax.tree_util.tree_map(lambda d: np.testing.assert_array_equal(d, 0.0), out.update.delta)


def test_round_without_clients_leaves_model_unchanged(softmax_model):
    _, params, loss_fn = softmax_model
    alg = fedavg(loss_fn, local_schedule(client_lr=0.1), server_optimizer=fedadam(learning_rate=0.1))
    state = alg.server_init(params)
    stacked = ModelDelta(jax.tree_util.tree_map(lambda p: jnp.ones((2, *p.shape), p.dtype), params))
    new_state, metrics = alg.server_update(state, weighted_mean(stacked, jnp.zeros(2, jnp.float32)))
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.params, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, new_state.opt_state, state.opt_state)
    assert int(new_state.round) == 1 and float(metrics.num_clients) == 0
