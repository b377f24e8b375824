"""SCAFFOLD against a plain NumPy implementation of option II over 3 rounds."""

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData, local_schedule, scaffold, weighted_mean
from nordfl.tasks import Examples
from tests import reference as ref

SIZES = [4, 9, 17, 6]
COHORTS = [[0, 1, 2, 3], [0, 2], [1, 2, 3]]  # partial cohorts, so |S|/N matters
LR, SERVER_LR, EPOCHS, BATCH = 0.1, 0.8, 2, 4


def _stack(trees):
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def test_scaffold_matches_numpy_over_three_rounds(softmax_model):
    _, params, loss_fn = softmax_model
    clients = ref.make_clients(SIZES)
    alg = scaffold(loss_fn, local_schedule(client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH), num_clients=len(SIZES), server_lr=SERVER_LR)
    update = jax.jit(alg.client_update)
    state = alg.server_init(params)
    client_states = [alg.client_init(params) for _ in SIZES]
    for r, cohort in enumerate(COHORTS):
        outputs = []
        for i in cohort:
            data = ClientData(Examples(jnp.asarray(clients[i].x), jnp.asarray(clients[i].y)), jnp.int32(SIZES[i]))
            out = update(alg.broadcast(state), client_states[i], data, jax.random.fold_in(jax.random.key(r), i))
            client_states[i] = out.client_state
            outputs.append(out)
        stacked = _stack(outputs)
        state, _ = alg.server_update(state, weighted_mean(stacked.update, stacked.weight))

    # NumPy, straight from the paper.
    x = ref.params_to_np(params)
    c = (np.zeros_like(x[0]), np.zeros_like(x[1]))
    ci = [(np.zeros_like(x[0]), np.zeros_like(x[1])) for _ in SIZES]
    for r, cohort in enumerate(COHORTS):
        dy, dc = [], []
        for i in cohort:
            cl = clients[i]
            key = jax.random.fold_in(jax.random.key(r), i)
            corr = (c[0] - ci[i][0], c[1] - ci[i][1])
            yw, yb, k = ref.local_sgd(*x, cl.x, cl.y, ref.epoch_orders(key, SIZES[i], EPOCHS), LR, BATCH, correction=corr)
            new_ci = tuple(ci[i][j] - c[j] + (x[j] - (yw, yb)[j]) / (k * LR) for j in range(2))
            dy.append((yw - x[0], yb - x[1]))
            dc.append((new_ci[0] - ci[i][0], new_ci[1] - ci[i][1]))
            ci[i] = new_ci
        x = tuple(x[j] + SERVER_LR * np.mean([d[j] for d in dy], axis=0) for j in range(2))
        c = tuple(c[j] + np.sum([d[j] for d in dc], axis=0) / len(SIZES) for j in range(2))

    tol = dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.params["linear"]["kernel"], x[0], **tol)
    np.testing.assert_allclose(state.params["linear"]["bias"], x[1], **tol)
    np.testing.assert_allclose(state.control["linear"]["kernel"], c[0], **tol)
    for i in range(len(SIZES)):
        np.testing.assert_allclose(client_states[i].control["linear"]["kernel"], ci[i][0], **tol)
        np.testing.assert_allclose(client_states[i].control["linear"]["bias"], ci[i][1], **tol)
    # c stays the mean of the c_i (the invariant the |S|/N scaling keeps).
    np.testing.assert_allclose(c[0], np.mean([v[0] for v in ci], axis=0), atol=1e-10)


def test_empty_client_keeps_its_control_variate(softmax_model):
    _, params, loss_fn = softmax_model
    (client,) = ref.make_clients([5])
    alg = scaffold(loss_fn, local_schedule(client_lr=LR, num_epochs=1, batch_size=2), num_clients=2)
    mine = alg.client_init(params)._replace(control=jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params))
    data = ClientData(Examples(jnp.asarray(client.x), jnp.asarray(client.y)), jnp.int32(0))
    out = alg.client_update(alg.broadcast(alg.server_init(params)), mine, data, jax.random.key(0))
    assert float(out.weight) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, out.client_state, mine)
    jax.tree_util.tree_map(lambda d: np.testing.assert_array_equal(d, 0.0), out.update)
