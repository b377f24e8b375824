"""Local SGD: the schedule is the client's own, padded or not, and matches a NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nordfl.algorithms import ClientData, epoch_permutation, local_sgd, steps_per_epoch
from nordfl.algorithms.local import LocalSchedule
from nordfl.sim.packing import pack_clients
from nordfl.tasks import Examples
from tests import reference as ref


def test_steps_per_epoch_counts_partial_batches_unless_dropped():
    assert [steps_per_epoch(n, 4, False) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert [steps_per_epoch(n, 4, True) for n in (0, 1, 4, 5, 8, 9)] == [0, 0, 1, 1, 2, 2]


def test_epoch_permutation_puts_real_rows_first_and_ignores_padding():
    key = jax.random.key(3)
    alone = np.asarray(epoch_permutation(key, jnp.int32(7), 7))
    padded = np.asarray(epoch_permutation(key, jnp.int32(7), 20))
    assert sorted(alone) == list(range(7))
    np.testing.assert_array_equal(padded[:7], alone)
    np.testing.assert_array_equal(np.sort(padded[7:]), np.arange(7, 20))
    other_epoch = np.asarray(epoch_permutation(jax.random.fold_in(key, 1), jnp.int32(7), 7))
    assert not np.array_equal(alone, other_epoch)


def _sgd(loss_fn, params, data, key, num_epochs, batch_size, epochs_to_run=None):
    grad_fn = jax.value_and_grad(loss_fn)
    schedule = LocalSchedule(0.1, num_epochs, batch_size)
    return jax.jit(lambda p, d, k: local_sgd(grad_fn, p, d, k, schedule, epochs_to_run))(params, data, key)


@pytest.mark.parametrize("batch_size", [3, 32])
def test_local_sgd_matches_numpy_loop(softmax_model, batch_size):
    _, params, loss_fn = softmax_model
    (client,) = ref.make_clients([10])
    key = jax.random.key(11)
    data = ClientData(Examples(jnp.asarray(client.x), jnp.asarray(client.y)), jnp.int32(10))
    out, metrics = _sgd(loss_fn, params, data, key, num_epochs=3, batch_size=batch_size)
    w0, b0 = ref.params_to_np(params)
    w, b, steps = ref.local_sgd(w0, b0, client.x, client.y, ref.epoch_orders(key, 10, 3), 0.1, batch_size)
    assert int(metrics.num_steps) == steps == 3 * -(-10 // batch_size)
    np.testing.assert_allclose(out["linear"]["kernel"], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["linear"]["bias"], b, rtol=1e-5, atol=1e-6)


def test_padded_client_trains_exactly_as_alone(softmax_model):
    _, params, loss_fn = softmax_model
    client, big = ref.make_clients([7, 23])
    key = jax.random.key(5)
    alone = ClientData(Examples(jnp.asarray(client.x), jnp.asarray(client.y)), jnp.int32(7))
    packed = pack_clients([client, big])
    padded = jax.tree_util.tree_map(lambda a: a[0], packed)
    kw = dict(num_epochs=2, batch_size=3)
    p_alone, m_alone = _sgd(loss_fn, params, alone, key, **kw)
    p_padded, m_padded = _sgd(loss_fn, params, padded, key, **kw)
    assert int(m_alone.num_steps) == int(m_padded.num_steps) == 2 * 3
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p_alone, p_padded)
    np.testing.assert_allclose(m_alone.train_loss, m_padded.train_loss, rtol=1e-6)


def test_partial_work_and_empty_client(softmax_model):
    _, params, loss_fn = softmax_model
    (client,) = ref.make_clients([9])
    key = jax.random.key(2)
    data = ClientData(Examples(jnp.asarray(client.x), jnp.asarray(client.y)), jnp.int32(9))
    one_epoch, m1 = _sgd(loss_fn, params, data, key, num_epochs=1, batch_size=4)
    partial, mp = _sgd(loss_fn, params, data, key, num_epochs=4, batch_size=4, epochs_to_run=jnp.int32(1))
    assert int(m1.num_steps) == int(mp.num_steps) == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, one_epoch, partial)
    empty = data._replace(num_examples=jnp.int32(0))
    unchanged, m0 = _sgd(loss_fn, params, empty, key, num_epochs=2, batch_size=4)
    assert int(m0.num_steps) == 0 and float(m0.train_loss) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, unchanged, params)
