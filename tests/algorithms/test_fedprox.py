"""FedProx: mu = 0 is FedAvg exactly; mu > 0 against a NumPy loop."""

import jax
import numpy as np
import pytest

from nordfl.algorithms import fedavg, fedprox, local_schedule
from nordfl.sim.packing import pack_clients
from tests import reference as ref
from tests.algorithms.driver import run_rounds


def _run(alg, params, data, rounds):
    return run_rounds(alg, params, data, rounds)[0]


def test_mu_zero_equals_fedavg_exactly(softmax_model):
    _, params, loss_fn = softmax_model
    data = pack_clients(ref.make_clients([6, 15, 9]))
    kw = dict(client_lr=0.2, num_epochs=2, batch_size=4)
    prox = _run(fedprox(loss_fn, local_schedule(**kw), mu=0.0), params, data, rounds=3)
    avg = _run(fedavg(loss_fn, local_schedule(**kw)), params, data, rounds=3)
    jax.tree_util.tree_map(np.testing.assert_array_equal, prox.params, avg.params)


def test_proximal_term_matches_numpy(softmax_model):
    _, params, loss_fn = softmax_model
    sizes = [6, 15, 9]
    clients = ref.make_clients(sizes)
    mu, lr, epochs, batch = 0.5, 0.2, 2, 4
    state = _run(fedprox(loss_fn, local_schedule(client_lr=lr, num_epochs=epochs, batch_size=batch), mu=mu), params, pack_clients(clients), rounds=2)

    w, b = ref.params_to_np(params)
    for r in range(2):
        deltas = []
        for i, c in enumerate(clients):
            key = jax.random.fold_in(jax.random.key(r), i)
            wi, bi, _ = ref.local_sgd(w, b, c.x, c.y, ref.epoch_orders(key, len(c.y), epochs), lr, batch, mu=mu, anchor=(w, b))
            deltas.append((wi - w, bi - b))
        n = np.asarray(sizes, float)
        w = w + sum(ni * d[0] for ni, d in zip(n, deltas)) / n.sum()
        b = b + sum(ni * d[1] for ni, d in zip(n, deltas)) / n.sum()
    np.testing.assert_allclose(state.params["linear"]["kernel"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.params["linear"]["bias"], b, rtol=1e-4, atol=1e-5)
    # The proximal pull matters: the same run with mu = 0 lands elsewhere.
    plain = _run(fedavg(loss_fn, local_schedule(client_lr=lr, num_epochs=epochs, batch_size=batch)), params, pack_clients(clients), rounds=2)
    assert not np.allclose(plain.params["linear"]["kernel"], w, atol=1e-3)


@pytest.mark.parametrize("mu", [-0.1, float("nan"), "0.1"])
def test_bad_mu_is_rejected_with_its_value(softmax_model, mu):
    _, _, loss_fn = softmax_model
    with pytest.raises(ValueError, match=r"fedprox: mu must be a number >= 0, got"):
        fedprox(loss_fn, local_schedule(client_lr=0.1), mu=mu)
