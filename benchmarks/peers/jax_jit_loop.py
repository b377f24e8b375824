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
    step = make_step(w)
    jax.device_put(data.init)  # start the backend during set-up

    def train(global_params, x, y, rng, correction):
        model = jax.device_put(global_params)
        extra = model if w.algorithm == "fedprox" else (None if correction is None else jax.device_put(correction))
        steps = 0
        for _ in range(w.epochs):
            for rows in common.batches(rng.permutation(len(y)), w.batch_size):
                model = step(model, x[rows], y[rows], extra)
                steps += 1
        return {key: np.asarray(v) for key, v in model.items()}, steps  # blocks on the client's result

    recorder.finish(common.sequential_rounds(w, data, recorder, train), packages=("jax", "jaxlib"))


if __name__ == "__main__":
    main()
