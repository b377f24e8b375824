"""The plain sequential baseline: a Python loop over clients and batches, NumPy maths.

It is also the reference the smoke test compares NordFL against: every line of the
workload's maths (``benchmarks.peers.common``) is written out here by hand.
"""

from __future__ import annotations

from benchmarks.peers import common  # first: starts the set-up clock

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


def client_update(w: common.Workload, global_params: dict, x, y, rng, c=None, c_i=None):
    """One client's local SGD; returns its model (and, with SCAFFOLD, its new control variate)."""
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
                    g = g + c[k] - c_i[k]
                params[k] -= np.float32(w.lr) * g.astype(np.float32)
            steps += 1
    if w.algorithm != "scaffold":
        return params, None
    new_c_i = {k: c_i[k] - c[k] + (global_params[k] - params[k]) / (steps * w.lr) for k in params}
    return params, new_c_i


def main() -> None:
    w, out = common.parse_args(__doc__.splitlines()[0])
    recorder = common.Recorder("numpy_loop", w, out)
    data = common.Data(w.data)
    params = {k: v.astype(np.float32) for k, v in data.init.items()}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    c, c_clients = zeros, {}
    rng = np.random.default_rng(w.seed)
    recorder.ready()
    for r in range(w.rounds):
        models, sizes, control_deltas = [], [], []
        for k in data.cohorts[r]:
            x, y = data.client(int(k))
            c_i = c_clients.get(int(k), zeros)
            model, new_c_i = client_update(w, params, x, y, rng, c, c_i)
            models.append(model)
            sizes.append(len(y))
            if new_c_i is not None:
                control_deltas.append({key: new_c_i[key] - c_i[key] for key in params})
                c_clients[int(k)] = new_c_i
        weights = np.ones(len(sizes)) if w.algorithm == "scaffold" else np.asarray(sizes, np.float64)
        weights = (weights / weights.sum()).astype(np.float32)
        params = {key: sum(wt * m[key] for wt, m in zip(weights, models)) for key in params}
        if control_deltas:
            scale = np.float32(len(control_deltas) / w.num_clients / len(control_deltas))
            c = {key: c[key] + scale * sum(d[key] for d in control_deltas) for key in params}
        recorder.round_done(r)
    recorder.finish(params)


if __name__ == "__main__":
    main()
