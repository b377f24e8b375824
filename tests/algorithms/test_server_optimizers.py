"""FedOpt server steps against hand-computed steps (Reddi et al. 2021, Algorithm 2)."""

import jax.numpy as jnp
import numpy as np
import pytest

from nordfl.algorithms import fedadagrad, fedadam, fedavgm, fedyogi, server_optimizer
from nordfl.algorithms.server_optimizers import server_step

X0 = np.array([0.5, -1.0, 2.0])
DELTAS = [np.array([0.1, -0.2, 0.0]), np.array([-0.3, 0.05, 0.4])]  # mean client updates, rounds 1 and 2
LR, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3


def _run(optimizer):
    params = {"w": jnp.asarray(X0, jnp.float32)}
    state = optimizer.init(params)
    trajectory = []
    for d in DELTAS:
        params, state = server_step(optimizer, params, state, {"w": jnp.asarray(d, jnp.float32)})
        trajectory.append(np.asarray(params["w"]))
    return trajectory


def _by_hand(second_moment, b1=B1):
    x, m, v = X0.copy(), np.zeros(3), np.full(3, TAU**2)
    out = []
    for d in DELTAS:
        m = b1 * m + (1 - b1) * d
        v = second_moment(v, d * d)
        x = x + LR * m / (np.sqrt(v) + TAU)
        out.append(x.copy())
    return out


@pytest.mark.parametrize(
    "optimizer, second_moment, b1",
    [
        (fedadam(LR, B1, B2, TAU), lambda v, d2: B2 * v + (1 - B2) * d2, B1),
        (fedyogi(LR, B1, B2, TAU), lambda v, d2: v - (1 - B2) * d2 * np.sign(v - d2), B1),
        (fedadagrad(LR, 0.0, TAU), lambda v, d2: v + d2, 0.0),
    ],
    ids=["fedadam", "fedyogi", "fedadagrad"],
)
def test_adaptive_server_steps_match_hand_computation(optimizer, second_moment, b1):
    for got, want in zip(_run(optimizer), _by_hand(second_moment, b1)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_fedadam_first_step_in_closed_form():
    # m1 = (1-b1) d, v1 = b2 tau^2 + (1-b2) d^2: one step checked without any loop.
    d = DELTAS[0]
    want = X0 + LR * (1 - B1) * d / (np.sqrt(B2 * TAU**2 + (1 - B2) * d**2) + TAU)
    np.testing.assert_allclose(_run(fedadam(LR, B1, B2, TAU))[0], want, rtol=1e-5, atol=1e-6)


def test_fedavgm_is_heavy_ball_on_the_mean_update():
    x, velocity, out = X0.copy(), np.zeros(3), []
    for d in DELTAS:
        velocity = 0.9 * velocity + d
        x = x + 1.0 * velocity
        out.append(x.copy())
    for got, want in zip(_run(fedavgm(1.0, 0.9)), out):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_plain_fedavg_server_adds_the_mean_update():
    got = _run(server_optimizer("sgd"))
    np.testing.assert_allclose(got[-1], X0 + DELTAS[0] + DELTAS[1], rtol=1e-6)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("fedadam", {"learning_rate": -1.0}, "fedadam: learning_rate must be a number > 0, got -1.0"),
        ("fedyogi", {"b2": 1.0}, "fedyogi: b2 must be a number with 0 <= b2 < 1, got 1.0"),
        ("adamw", {}, "server_optimizer: unknown name 'adamw'; expected one of"),
    ],
)
def test_bad_server_optimizer_settings_are_named(name, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        server_optimizer(name, **kwargs)
