"""The plain sequential baseline: a Python loop over clients and batches, NumPy maths.

It is also the reference the smoke test compares NordFL against: every line of the
workload's maths (``benchmarks.peers.common``) is written out here by hand.
"""

from __future__ import annotations

from benchmarks.peers import common  # first: starts the set-up clock

import functools

import numpy as np


def loss_grads(params: dict, x: np.ndarray, y: np.ndarray) -> tuple[float, dict]:
    """Mean cross-entropy of a batch and its gradients, by hand-written backprop."""
    layers = len(params) // 2
    activations = [x]
    h = x
    for i in range(layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < layers - 1:
            h = np.maximum(h, 0)
            activations.append(h)
    shifted = h - h.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(probs[rows, y]).mean())
    delta = probs
    delta[rows, y] -= 1
    delta /= len(y)
    grads = {}
    for i in reversed(range(layers)):
        grads[f"w{i}"] = activations[i].T @ delta
        grads[f"b{i}"] = delta.sum(axis=0)
        if i:
            delta = (delta @ params[f"w{i}"].T) * (activations[i] > 0)
    return loss, grads


def client_update(w: common.Workload, global_params: dict, x, y, rng, correction=None) -> tuple[dict, int]:
    """One client's local SGD; returns its model and the number of steps it took.

    ``correction`` is SCAFFOLD's ``c - c_i``, added to every gradient (``None`` otherwise)."""
    params = {k: v.copy() for k, v in global_params.items()}
    steps = 0
    for _ in range(w.epochs):
        for rows in common.batches(rng.permutation(len(y)), w.batch_size):
            _, grads = loss_grads(params, x[rows], y[rows])
            for k in params:
                g = grads[k]
                if w.algorithm == "fedprox":
                    g = g + w.mu * (params[k] - global_params[k])
                elif w.algorithm == "scaffold":
                    g = g + correction[k]
                params[k] -= np.float32(w.lr) * g.astype(np.float32)
            steps += 1
    return params, steps


def main() -> None:
    w, out = common.parse_args(__doc__.splitlines()[0])
    recorder = common.Recorder("numpy_loop", w, out)
    data = common.Data(w.data)
    recorder.finish(common.sequential_rounds(w, data, recorder, functools.partial(client_update, w)))


if __name__ == "__main__":
    main()
