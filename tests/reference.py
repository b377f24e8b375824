"""Plain NumPy (float64) reference implementations the JAX code is checked against."""

import numpy as np

from nordfl.algorithms import epoch_orders as client_epoch_orders
from nordfl.tasks import Examples

NUM_FEATURES = 5
NUM_CLASSES = 3


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_and_grad(w, b, x, y):
    """Mean softmax cross-entropy of logits x @ w + b, and its gradient."""
    p = softmax(x @ w + b)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    delta = p.copy()
    delta[np.arange(len(y)), y] -= 1.0
    delta /= len(y)
    return loss, x.T @ delta, delta.sum(axis=0)


def batches(n, batch_size, perm, drop_remainder=False):
    """Index batches of one epoch in the order ``perm``."""
    steps = n // batch_size if drop_remainder else -(-n // batch_size)
    return [perm[s * batch_size : min((s + 1) * batch_size, n)] for s in range(steps)]


def local_sgd(w, b, x, y, perms, lr, batch_size, *, mu=0.0, anchor=None, correction=None, freeze=None):
    """Minibatch SGD over the epochs whose row orders are ``perms``.

    ``mu``/``anchor`` add FedProx's proximal gradient mu (w - anchor); ``correction``
    (a (cw, cb) pair) is added to every gradient, as SCAFFOLD does with c - c_i;
    ``freeze`` (``"w"`` or ``"b"``) leaves that parameter as it is (FedRep's phases).
    Returns (w, b, number of steps).
    """
    w, b = w.astype(np.float64).copy(), b.astype(np.float64).copy()
    steps = 0
    for perm in perms:
        for rows in batches(len(y), batch_size, perm):
            _, gw, gb = loss_and_grad(w, b, x[rows], y[rows])
            if mu:
                gw, gb = gw + mu * (w - anchor[0]), gb + mu * (b - anchor[1])
            if correction is not None:
                gw, gb = gw + correction[0], gb + correction[1]
            w = w if freeze == "w" else w - lr * gw
            b = b if freeze == "b" else b - lr * gb
            steps += 1
    return w, b, steps


def make_clients(sizes, seed=0):
    """Uneven clients of a linearly separable-ish 3-class problem, as ``Examples`` (NumPy)."""
    rng = np.random.default_rng(seed)
    true_w = rng.normal(size=(NUM_FEATURES, NUM_CLASSES))
    clients = []
    for i, n in enumerate(sizes):
        x = (rng.normal(size=(n, NUM_FEATURES)) + 0.3 * i).astype(np.float32)
        y = np.argmax(x @ true_w + rng.normal(0, 0.5, (n, NUM_CLASSES)), axis=1).astype(np.int32)
        clients.append(Examples(x, y))
    return clients


def epoch_orders(key, n, epochs):
    """The row order of each epoch, as the client draws it (the shuffle is an input here)."""
    return list(np.asarray(client_epoch_orders(key, epochs, n, n)))


def params_to_np(params):
    return np.asarray(params["linear"]["kernel"], np.float64), np.asarray(params["linear"]["bias"], np.float64)
