"""Differential privacy in the algorithms: per-example clipping against a NumPy loop, DP-SGD's
Poisson-sampled local loop against a NumPy loop over the same draws, DP-SGD with q = 1, no noise
and no clipping equal to the non-private algorithm, DP-FedAvg's clipping and noise scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nordfl.algorithms import ClientData, ModelDelta, fedavg, fedprox, local_schedule, make_algorithm, scaffold, weighted_mean
from nordfl.algorithms.base import Aggregate
from nordfl.algorithms import dp
from nordfl.sim.packing import pack_clients
from nordfl.tasks import Examples
from tests import reference as ref
from tests.algorithms.driver import run_rounds

SIZES = [6, 15, 9]


def _np_example_grads(params, x, y):
    """Per-example gradients (w, b) of the NumPy reference, each flattened into one vector."""
    w, b = ref.params_to_np(params)
    rows = []
    for i in range(len(y)):
        _, gw, gb = ref.loss_and_grad(w, b, x[i : i + 1].astype(np.float64), y[i : i + 1])
        rows.append((gw, gb))
    return rows


def _np_clipped_sum(params, x, y, rows, clip):
    grads = _np_example_grads(params, x, y)
    sw, sb, clipped = 0.0, 0.0, 0
    for i in rows:
        gw, gb = grads[i]
        norm = np.sqrt(np.sum(gw**2) + np.sum(gb**2))
        factor = min(1.0, clip / norm)
        clipped += factor < 1.0
        sw, sb = sw + factor * gw, sb + factor * gb
    return sw, sb, clipped


def test_per_example_clipping_matches_a_numpy_loop(softmax_model):
    _, params, loss_fn = softmax_model
    c = ref.make_clients([8])[0]
    valid = np.array([True] * 7 + [False])
    norms = [np.sqrt(np.sum(gw**2) + np.sum(gb**2)) for gw, gb in _np_example_grads(params, c.x, c.y)]
    clip = float(np.median(norms))  # some rows clipped, some not
    loss_sum, grads, got_norms = dp.clipped_gradient_sum(loss_fn, params, Examples(jnp.asarray(c.x), jnp.asarray(c.y)), jnp.asarray(valid), clip)
    sw, sb, clipped = _np_clipped_sum(params, c.x, c.y, range(7), clip)
    assert 0 < clipped < 7
    np.testing.assert_allclose(got_norms, norms, rtol=1e-5)
    np.testing.assert_allclose(grads["linear"]["kernel"], sw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["linear"]["bias"], sb, rtol=1e-5, atol=1e-6)
    w, b = ref.params_to_np(params)
    np.testing.assert_allclose(loss_sum, ref.loss_and_grad(w, b, c.x[:7], c.y[:7])[0] * 7, rtol=1e-5)


@pytest.mark.parametrize("physical", [2, 3, 16])
def test_private_gradient_sums_exactly_the_selected_rows_in_any_chunking(softmax_model, physical):
    _, params, loss_fn = softmax_model
    c = ref.make_clients([11])[0]
    selected = np.array([1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], bool)
    grad_fn = dp.private_value_and_grad(loss_fn, dp.DPSGD(0.4, 0.0), jnp.float32(4.0), physical)
    _, grads = jax.jit(grad_fn)(params, Examples(jnp.asarray(c.x), jnp.asarray(c.y)), jnp.asarray(selected), jax.random.key(0))
    sw, sb, _ = _np_clipped_sum(params, c.x, c.y, np.flatnonzero(selected), 0.4)
    np.testing.assert_allclose(grads["linear"]["kernel"], sw / 4.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads["linear"]["bias"], sb / 4.0, rtol=1e-5, atol=1e-6)


def test_gaussian_noise_has_the_requested_std_on_every_leaf():
    tree = {"a": jnp.zeros((100, 100)), "b": jnp.zeros(10_000)}
    noisy = dp.add_gaussian_noise(tree, 0.7, jax.random.key(3))
    for leaf in jax.tree_util.tree_leaves(noisy):
        assert abs(float(jnp.std(leaf)) - 0.7) < 0.03 and abs(float(jnp.mean(leaf))) < 0.03
    assert abs(np.corrcoef(np.asarray(noisy["a"]).ravel(), np.asarray(noisy["b"]))[0, 1]) < 0.05


def _run(alg, params, data, rounds=2, seed=0):
    state, _, out = run_rounds(alg, params, data, rounds, seed)
    return state, out


FACTORIES = {
    "fedavg": lambda loss_fn, **kw: fedavg(loss_fn, local_schedule(**kw)),
    "fedprox": lambda loss_fn, **kw: fedprox(loss_fn, local_schedule(**kw), mu=0.3),
    "scaffold": lambda loss_fn, **kw: scaffold(loss_fn, local_schedule(**kw), num_clients=3),
}


@pytest.mark.parametrize("name", ["fedavg", pytest.param("fedprox", marks=pytest.mark.slow), pytest.param("scaffold", marks=pytest.mark.slow)])
def test_full_batch_dp_sgd_without_noise_or_clipping_is_the_non_private_algorithm(softmax_model, name):
    # batch_size >= every n: q = 1, Poisson sampling takes every row, and both loops take
    # one full-batch step per epoch. Clip 1e30 never scales, noise 0 adds nothing.
    _, params, loss_fn = softmax_model
    data = pack_clients(ref.make_clients(SIZES))
    kw = dict(client_lr=0.3, num_epochs=2, batch_size=16)
    plain, _ = _run(FACTORIES[name](loss_fn, **kw), params, data)
    private, out = _run(FACTORIES[name](loss_fn, dp=dp.DPSGD(1e30, 0.0), **kw), params, data)
    np.testing.assert_array_equal(out.metrics.num_steps, [2, 2, 2])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), plain.params, private.params)
    if name == "fedavg":  # the comparison can fail: a binding clip bound moves the model
        clipped, _ = _run(FACTORIES[name](loss_fn, dp=dp.DPSGD(0.05, 0.0), **kw), params, data)
        assert not np.allclose(clipped.params["linear"]["kernel"], plain.params["linear"]["kernel"], atol=1e-3)


def test_poisson_local_sgd_matches_a_numpy_loop_over_the_same_draws(softmax_model):
    _, params, loss_fn = softmax_model
    clients = ref.make_clients(SIZES)
    lr, epochs, batch, clip = 0.3, 2, 4, 0.5
    alg = fedavg(loss_fn, local_schedule(client_lr=lr, num_epochs=epochs, batch_size=batch, dp=dp.DPSGD(clip, 0.0)))
    _, out = _run(alg, params, pack_clients(clients), rounds=1)
    w0, b0 = ref.params_to_np(params)
    for i, c in enumerate(clients):
        n = len(c.y)
        key = jax.random.fold_in(jax.random.key(0), i)
        q = np.float32(batch) / np.float32(n)
        w, b = w0.copy(), b0.copy()
        for e in range(epochs):
            for s in range(-(-n // batch)):
                sample_key, _ = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, e), s))
                draws = np.asarray(jax.vmap(lambda r: jax.random.uniform(jax.random.fold_in(sample_key, r)))(np.arange(n)))
                rows = np.flatnonzero(draws < q)
                p = {"linear": {"kernel": w, "bias": b}}
                sw, sb, _ = _np_clipped_sum(p, c.x, c.y, rows, clip)
                w, b = w - lr * sw / (float(q) * n), b - lr * sb / (float(q) * n)
        np.testing.assert_allclose(out.update.delta["linear"]["kernel"][i], w - w0, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out.update.delta["linear"]["bias"][i], b - b0, rtol=1e-4, atol=1e-5)
        assert int(out.metrics.num_steps[i]) == epochs * -(-n // batch)


def test_a_padded_client_samples_and_noises_exactly_as_alone(softmax_model):
    _, params, loss_fn = softmax_model
    c = ref.make_clients([9])[0]
    alg = fedprox(loss_fn, local_schedule(client_lr=0.3, num_epochs=2, batch_size=4, dp=dp.DPSGD(0.5, 1.3)), mu=0.1)
    update = jax.jit(alg.client_update)
    message, state, key = alg.broadcast(alg.server_init(params)), alg.client_init(params), jax.random.key(5)
    alone = update(message, state, ClientData(Examples(jnp.asarray(c.x), jnp.asarray(c.y)), jnp.int32(9)), key)
    x = np.zeros((23, c.x.shape[1]), np.float32)
    y = np.zeros(23, np.int32)
    x[:9], y[:9] = c.x, c.y
    padded = update(message, state, ClientData(Examples(jnp.asarray(x), jnp.asarray(y)), jnp.int32(9)), key)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), alone.update, padded.update)
    assert int(alone.metrics.num_steps) == int(padded.metrics.num_steps) == 6
    # And the noise is there: another key, another update.
    other = update(message, state, ClientData(Examples(jnp.asarray(c.x), jnp.asarray(c.y)), jnp.int32(9)), jax.random.key(6))
    assert not np.allclose(other.update.delta["linear"]["kernel"], alone.update.delta["linear"]["kernel"])


def test_update_dp_clips_each_update_and_divides_by_the_planned_cohort(softmax_model):
    _, params, loss_fn = softmax_model
    data = pack_clients(ref.make_clients(SIZES))
    kw = dict(client_lr=0.3, num_epochs=2, batch_size=4)
    _, plain = _run(fedavg(loss_fn, local_schedule(**kw)), params, data, rounds=1)
    clip, m = 0.2, 5
    options = dp.update_dp(clip, 0.0, "central", m)
    state, out = _run(dp.with_update_dp(fedavg(loss_fn, local_schedule(**kw)), options), params, data, rounds=1)
    np.testing.assert_array_equal(out.weight, [1.0, 1.0, 1.0])
    expected = []
    for i in range(3):
        d = [np.asarray(plain.update.delta["linear"][k][i], np.float64) for k in ("kernel", "bias")]
        norm = np.sqrt(sum(np.sum(x**2) for x in d))
        assert norm > clip
        expected.append([x * clip / norm for x in d])
    w, b = ref.params_to_np(params)
    np.testing.assert_allclose(state.params["linear"]["kernel"], w + sum(e[0] for e in expected) / m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state.params["linear"]["bias"], b + sum(e[1] for e in expected) / m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("placement", ["central", pytest.param("distributed", marks=pytest.mark.slow)])
def test_update_dp_noise_on_the_mean_has_std_z_clip_over_m(placement):
    # A model of 8 000 zeros whose loss is constant: every update is 0, the mean is pure noise.
    params = {"w": jnp.zeros(8_000)}
    loss_fn = lambda p, batch, mask: 0.0 * jnp.sum(p["w"]) + 0.0 * jnp.sum(batch.x)  # noqa: E731
    z, clip, m = 1.5, 0.4, 4
    alg = dp.with_update_dp(fedavg(loss_fn, local_schedule(client_lr=0.1, batch_size=2)), dp.update_dp(clip, z, placement, m), noise_seed=1)
    examples = Examples(jnp.ones((m, 3, 1)), jnp.zeros((m, 3), jnp.int32))
    data = ClientData(examples, jnp.full(m, 3, jnp.int32))
    state = alg.server_init(params)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(m))
    states = jax.vmap(alg.client_init)(jax.tree_util.tree_map(lambda p: jnp.stack([p] * m), params))
    out = jax.vmap(alg.client_update, in_axes=(None, 0, 0, 0))(alg.broadcast(state), states, data, keys)
    new, _ = alg.server_update(state, weighted_mean(out.update, out.weight))
    assert abs(float(jnp.std(new.params["w"])) - z * clip / m) < 0.05 * z * clip / m
    sent = np.asarray(out.update.delta["w"])
    if placement == "central":
        assert not sent.any()  # sites send clipped updates; the server adds the noise
    else:
        assert abs(float(np.std(sent)) - z * clip / np.sqrt(m)) < 0.05 * z * clip / np.sqrt(m)


@pytest.mark.parametrize(
    "dp_options, message",
    [
        ({"mode": "laplace"}, "fedavg.dp: unknown mode 'laplace'; expected one of none, sgd, update"),
        ({"mode": "sgd", "clip": -1.0, "noise_multiplier": 1.0}, r"fedavg.dp: clip must be a number > 0, got -1.0"),
        ({"mode": "sgd", "clip": 1.0}, "fedavg.dp: mode 'sgd' needs 'noise_multiplier'"),
        ({"mode": "sgd", "clip": 1.0, "noise_multiplier": 1.0, "noise": "central"}, "'noise' is not an option of mode 'sgd'"),
        ({"mode": "update", "clip": 1.0, "noise_multiplier": 1.0, "noise": "local", "expected_clients": 3},
         "fedavg.dp: unknown noise 'local'; expected one of central, distributed"),
    ],
)
def test_bad_dp_options_are_named(softmax_model, dp_options, message):
    _, _, loss_fn = softmax_model
    with pytest.raises(ValueError, match=message):
        make_algorithm("fedavg", loss_fn, client_lr=0.1, dp=dp_options)


@pytest.mark.parametrize("mode", ["sgd", "update"])
def test_every_algorithm_takes_dp_through_the_registry(softmax_model, mode):
    _, params, loss_fn = softmax_model
    c = ref.make_clients([5])[0]
    data = ClientData(Examples(jnp.asarray(c.x), jnp.asarray(c.y)), jnp.int32(5))
    options = {"mode": mode, "clip": 1.0, "noise_multiplier": 1.0}
    if mode == "update":
        options |= {"noise": "distributed", "expected_clients": 3}
    for name in ("fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        hyper = {"mu": 0.1} if name == "fedprox" else {"num_clients": 3} if name == "scaffold" else {}
        alg = make_algorithm(name, loss_fn, client_lr=0.1, batch_size=4, dp=options, **hyper)
        message, state = alg.broadcast(alg.server_init(params)), alg.client_init(params)
        out = jax.eval_shape(alg.client_update, message, state, data, jax.random.key(0))  # traces the DP path
        assert out.update.delta["linear"]["kernel"].shape == params["linear"]["kernel"].shape


def test_central_noise_uses_all_64_bits_of_its_seed():
    # jax.random.key(seed) keeps only the low 32 bits of a Python int without x64: 2**40 and
    # 2**41 would give the same noise, and a 32-bit secret can be searched exhaustively.
    params = {"w": jnp.zeros(64)}
    loss_fn = lambda p, batch, mask: 0.0 * jnp.sum(p["w"])  # noqa: E731
    aggregate = Aggregate({"w": jnp.zeros(64)}, jnp.float32(3.0), jnp.float32(3.0))
    noise = []
    for seed in (2**40, 2**41, 2**40):
        alg = dp.with_update_dp(fedavg(loss_fn, local_schedule(client_lr=0.1)), dp.update_dp(1.0, 1.0, "central", 3), noise_seed=seed)
        state, _ = alg.server_update(alg.server_init(params), aggregate._replace(mean=ModelDelta(aggregate.mean)))
        noise.append(np.asarray(state.params["w"]))
    assert not np.allclose(noise[0], noise[1]) and np.array_equal(noise[0], noise[2])
    with pytest.raises(ValueError, match=r"noise_seed must be an integer in \[0, 2\*\*64\), got -1"):
        dp.with_update_dp(fedavg(loss_fn, local_schedule(client_lr=0.1)), dp.update_dp(1.0, 1.0, "central", 3), noise_seed=-1)
