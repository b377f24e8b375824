"""Personalisation (Ditto, fine-tuning, FedPer/FedRep/FedBN partial sharing) against NumPy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nordfl.algorithms import local_schedule, make_algorithm
from nordfl.algorithms.personal import ditto, fedrep, local_mask, partial_sharing, personal_key, personal_model
from nordfl.sim.packing import pack_clients
from nordfl.tasks import mlp
from tests import reference as ref
from tests.algorithms.driver import run_rounds

SIZES = [6, 15, 9]
LR, EPOCHS, BATCH = 0.2, 2, 4


def _run(alg, params, data, rounds):
    state, states, _ = run_rounds(alg, params, data, rounds)
    return state, states


def _orders(r, i, n, epochs, salt=None):
    key = jax.random.fold_in(jax.random.key(r), i)
    return ref.epoch_orders(key if salt is None else jax.random.fold_in(key, salt), n, epochs)


def _mean(deltas, weights):
    weights = np.asarray(weights, float)
    return sum(w * d for w, d in zip(weights, deltas)) / weights.sum()


def _client(states, i):
    return jax.tree_util.tree_map(lambda a: a[i], states)


def test_ditto_matches_numpy(softmax_model):
    _, params, loss_fn = softmax_model
    clients = ref.make_clients(SIZES)
    lam, personal_epochs = 0.5, 3
    alg = ditto(loss_fn, local_schedule(client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH), lam=lam, personal_epochs=personal_epochs)
    server, states = _run(alg, params, pack_clients(clients), rounds=2)

    w, b = ref.params_to_np(params)
    personal = [(w, b) for _ in clients]
    for r in range(2):
        deltas_w, deltas_b = [], []
        for i, c in enumerate(clients):
            wi, bi, _ = ref.local_sgd(w, b, c.x, c.y, _orders(r, i, len(c.y), EPOCHS), LR, BATCH)
            deltas_w.append(wi - w)
            deltas_b.append(bi - b)
            vw, vb, _ = ref.local_sgd(*personal[i], c.x, c.y, _orders(r, i, len(c.y), personal_epochs, salt=1), LR, BATCH,
                                      mu=lam, anchor=(w, b))
            personal[i] = (vw, vb)
        w, b = w + _mean(deltas_w, SIZES), b + _mean(deltas_b, SIZES)
    np.testing.assert_allclose(server.params["linear"]["kernel"], w, rtol=1e-4, atol=1e-5)
    for i in range(len(clients)):
        own = personal_model(alg, alg.broadcast(server), _client(states, i), None, None)
        np.testing.assert_allclose(own["linear"]["kernel"], personal[i][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(own["linear"]["bias"], personal[i][1], rtol=1e-4, atol=1e-5)
    # The personal models are each site's own: they differ from the global model and from each other.
    assert not np.allclose(personal[0][0], w, atol=1e-3) and not np.allclose(personal[0][0], personal[1][0], atol=1e-3)


def test_fine_tuning_matches_numpy(softmax_model):
    _, params, loss_fn = softmax_model
    clients = ref.make_clients(SIZES)
    data = pack_clients(clients)
    alg = make_algorithm("fedavg", loss_fn, client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH,
                         fine_tune={"epochs": 3, "client_lr": 0.05, "batch_size": 5})
    server, states = _run(alg, params, data, rounds=1)
    message = alg.broadcast(server)
    w, b = ref.params_to_np(server.params)
    for i, c in enumerate(clients):
        rows = jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), data)
        tuned = personal_model(alg, message, _client(states, i), rows, personal_key(7, i))
        orders = ref.epoch_orders(personal_key(7, i), len(c.y), 3)
        tw, tb, _ = ref.local_sgd(w, b, c.x, c.y, orders, 0.05, 5)
        np.testing.assert_allclose(tuned["linear"]["kernel"], tw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(tuned["linear"]["bias"], tb, rtol=1e-4, atol=1e-5)
    # Without fine-tuning a site's model is the global one.
    plain = make_algorithm("fedavg", loss_fn, client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH)
    assert personal_model(plain, message, _client(states, 0), None, None) is message.params


@pytest.mark.parametrize("head_epochs", [0, 2])
def test_partial_sharing_matches_numpy(softmax_model, head_epochs):
    """The bias stays at each site (FedPer with head_epochs 0, FedRep's alternation with 2); the kernel is averaged."""
    _, params, loss_fn = softmax_model
    clients = ref.make_clients(SIZES)
    alg = partial_sharing(loss_fn, local_schedule(client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH), local_layers=["bias"],
                          head_epochs=head_epochs)
    server, states = _run(alg, params, pack_clients(clients), rounds=2)

    w, b0 = ref.params_to_np(params)
    own_bias = [b0 for _ in clients]
    for r in range(2):
        deltas = []
        for i, c in enumerate(clients):
            bi = own_bias[i]
            if head_epochs:  # the site's bias first, the kernel frozen; then the kernel, the bias frozen
                _, bi, _ = ref.local_sgd(w, bi, c.x, c.y, _orders(r, i, len(c.y), head_epochs, salt=1), LR, BATCH, freeze="w")
            wi, bi, _ = ref.local_sgd(w, bi, c.x, c.y, _orders(r, i, len(c.y), EPOCHS), LR, BATCH,
                                      freeze="b" if head_epochs else None)
            deltas.append(wi - w)
            own_bias[i] = bi
        w = w + _mean(deltas, SIZES)
    np.testing.assert_allclose(server.params["linear"]["kernel"], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(server.params["linear"]["bias"], params["linear"]["bias"])  # never averaged
    message = alg.broadcast(server)
    for i in range(len(clients)):
        own = personal_model(alg, message, _client(states, i), None, None)
        np.testing.assert_allclose(own["linear"]["kernel"], w, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(own["linear"]["bias"], own_bias[i], rtol=1e-4, atol=1e-5)


def test_local_mask_picks_the_named_layers_and_refuses_rules_that_share_nothing_or_everything():
    params = mlp(5, 2, hidden=(4,), norm=True).init_params
    mask = local_mask(params, ["norm"], "fedbn")
    assert mask["norms"][0] == {"scale": True, "bias": True}
    assert not any(jax.tree_util.tree_leaves(mask["hidden"])) and not any(jax.tree_util.tree_leaves(mask["out"]))
    plain = mlp(5, 2, hidden=(4,)).init_params
    with pytest.raises(ValueError, match=r"fedbn: local_layers \['norm'\] match no parameter.*hidden/0/bias"):
        local_mask(plain, ["norm"], "fedbn")
    with pytest.raises(ValueError, match="match every parameter"):
        local_mask(plain, ["hidden", "out"], "fedper")


def test_bad_options_are_refused_with_their_values(softmax_model):
    _, params, loss_fn = softmax_model
    schedule = local_schedule(client_lr=LR, num_epochs=EPOCHS, batch_size=BATCH)
    with pytest.raises(ValueError, match="ditto: lam must be a number >= 0, got -1"):
        ditto(loss_fn, schedule, lam=-1)
    with pytest.raises(ValueError, match="fedrep: head_epochs must be an integer >= 1, got 0"):
        fedrep(loss_fn, schedule, head_epochs=0)
    with pytest.raises(ValueError, match="local_layers must be a non-empty list of layer names, got 'out'"):
        partial_sharing(loss_fn, schedule, local_layers="out")
    with pytest.raises(ValueError, match="fedavg.fine_tune: epochs must be an integer >= 1, got -2"):
        make_algorithm("fedavg", loss_fn, client_lr=LR, fine_tune={"epochs": -2})
    with pytest.raises(ValueError, match="fedavg.fine_tune: unknown option.*lr"):
        make_algorithm("fedavg", loss_fn, client_lr=LR, fine_tune={"epochs": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="fedper: local_layers \\['out'\\] match no parameter"):
        make_algorithm("fedper", loss_fn, client_lr=LR).client_init(params)  # a logistic regression has no "out" layer
