"""The per-client ``jax.jit`` loop: a Python loop over clients and batches, one jitted SGD step each.

What it shows: the way FedJAX runs a round's clients (and how most JAX FL code is first
written) -- a Python loop over the cohort and over each client's batches, calling one
``jax.jit``-compiled SGD step per batch (compiled once for the batch shape, again for a
last partial batch if any), shuffling on the host with NumPy. Each step pays JAX's
dispatch and a host-to-device copy of the batch, so it sits between the NumPy loop and a
whole-round ``jit`` (``drjax_map``). The aggregation is NumPy, as in ``numpy_loop``.
Maths: ``common``.
"""

from __future__ import annotations

from benchmarks.peers import common  # first: starts the set-up clock

import jax
import jax.numpy as jnp
import numpy as np


def forward(params, x):
    return common.forward(params, x, relu=jax.nn.relu)


def make_step(w: common.Workload):
    """The jitted SGD step ``(params, x, y, extra) -> params``; ``extra`` is the global model
    (FedProx), ``c - c_i`` (SCAFFOLD) or ``None`` (FedAvg)."""

    def loss(params, x, y, extra):
        log_probs = jax.nn.log_softmax(forward(params, x))
        value = -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))
        if w.algorithm == "fedprox":
            value += w.mu / 2 * sum(jnp.sum((params[k] - extra[k]) ** 2) for k in params)
        return value

    @jax.jit
    def step(params, x, y, extra):
        g = jax.grad(loss)(params, x, y, extra)
        if w.algorithm == "scaffold":
            g = jax.tree.map(jnp.add, g, extra)
        return jax.tree.map(lambda p, g: p - w.lr * g, params, g)

    return step


def main() -> None:
    w, out = common.parse_args(__doc__.splitlines()[0])
    recorder = common.Recorder("jax_jit_loop", w, out)
    data = common.Data(w.data)
    params = {k: v.astype(np.float32) for k, v in data.init.items()}
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    c, c_clients = zeros, {}
    rng = np.random.default_rng(w.seed)
    step = make_step(w)
    jax.device_put(zeros)  # start the backend during set-up
    recorder.ready()
    for r in range(w.rounds):
        global_params = jax.device_put(params)
        total = {k: np.zeros_like(v) for k, v in params.items()}
        weight_sum, control_delta_sum = 0.0, {k: np.zeros_like(v) for k, v in params.items()}
        for k in data.cohorts[r]:
            x, y = data.client(int(k))
            c_i = c_clients.get(int(k), zeros)
            extra = global_params if w.algorithm == "fedprox" else None
            if w.algorithm == "scaffold":
                extra = jax.device_put({key: c[key] - c_i[key] for key in params})
            model, steps = global_params, 0
            for _ in range(w.epochs):
                for rows in common.batches(rng.permutation(len(y)), w.batch_size):
                    model = step(model, x[rows], y[rows], extra)
                    steps += 1
            model = {key: np.asarray(v) for key, v in model.items()}  # blocks on the client's result
            weight = 1.0 if w.algorithm == "scaffold" else float(len(y))
            weight_sum += weight
            for key in params:
                total[key] += np.float32(weight) * model[key]
            if w.algorithm == "scaffold":
                new_c_i = {key: c_i[key] - c[key] + (params[key] - model[key]) / np.float32(steps * w.lr)
                           for key in params}
                for key in params:
                    control_delta_sum[key] += new_c_i[key] - c_i[key]
                c_clients[int(k)] = new_c_i
        params = {key: (v / np.float32(weight_sum)).astype(np.float32) for key, v in total.items()}
        if w.algorithm == "scaffold":
            c = {key: c[key] + np.float32(1 / w.num_clients) * control_delta_sum[key] for key in params}
        recorder.round_done(r)
    recorder.finish(params, packages=("jax", "jaxlib"))


if __name__ == "__main__":
    main()
