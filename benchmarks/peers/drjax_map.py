"""DrJAX peer: one ``jax.jit`` per round, clients vectorised by ``drjax.map_fn``.

What it shows: the fastest way to write FedAvg / FedProx / SCAFFOLD in JAX without a
federated runtime, the way DrJAX's own tests and examples do it -- ``drjax.broadcast`` the
model to the cohort, ``drjax.map_fn`` the local training over clients (``vmap`` underneath),
reduce with ``drjax.reduce_weighted_mean`` / ``reduce_mean``, the whole round compiled once.
Local training is a ``lax.scan`` over epochs of a ``lax.scan`` over batches, each epoch
shuffled by ``jax.random.permutation``. It is the simulation-speed ceiling NordFL's
simulator is compared against (no processes, no network, no per-client state beyond
SCAFFOLD's control variates).

Choices: the cohort's rows are gathered on the host (``data.x[cohort]``) and fed to the
jitted round, as a data pipeline would feed a datacenter round; SCAFFOLD's per-client
control variates live on the device as [num_clients, ...] arrays (donated to the round)
and the round gathers and updates the cohort's rows. A last partial batch, if any, is a
padded batch with a row mask (same gradient as the smaller batch). Maths: ``common``.
"""

from __future__ import annotations

from benchmarks.peers import common  # first: starts the set-up clock

import functools

import drjax
import jax
import jax.numpy as jnp
import numpy as np


def forward(params, x):
    return common.forward(params, x, relu=jax.nn.relu)


def batch_loss(params, x, y, mask):
    """Mean cross-entropy over the batch's real rows (``mask`` is 0 on padding)."""
    log_probs = jax.nn.log_softmax(forward(params, x))
    nll = -jnp.take_along_axis(log_probs, y[:, None], axis=1)[:, 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


def make_round(w: common.Workload, rows: int):
    """The jitted round ``(params, c, c_all, ids, x, y, r) -> (params, c, c_all)``."""
    bs, algo = w.batch_size, w.algorithm
    num_batches = -(-rows // bs)
    steps = w.epochs * num_batches  # K in SCAFFOLD's control-variate update
    mask = (np.arange(num_batches * bs) < rows).reshape(num_batches, bs).astype(np.float32)

    def local_train(global_params, x, y, key, c=None, c_i=None):
        """One client's local SGD (``lax.scan`` over epochs and batches)."""
        def loss(p, xb, yb, mb):
            value = batch_loss(p, xb, yb, mb)
            if algo == "fedprox":
                value += w.mu / 2 * sum(jnp.sum((p[k] - global_params[k]) ** 2) for k in p)
            return value

        def step(p, batch):
            idx, mb = batch
            g = jax.grad(loss)(p, x[idx], y[idx], mb)
            if algo == "scaffold":
                g = jax.tree.map(lambda g, c, ci: g + c - ci, g, c, c_i)
            return jax.tree.map(lambda p, g: p - w.lr * g, p, g), None

        def epoch(p, key):
            order = jnp.pad(jax.random.permutation(key, rows), (0, num_batches * bs - rows))
            return jax.lax.scan(step, p, (order.reshape(num_batches, bs), mask))[0], None

        p = jax.lax.scan(epoch, global_params, jax.random.split(key, w.epochs))[0]
        if algo != "scaffold":
            return p
        new_c_i = jax.tree.map(lambda ci, c, g, p: ci - c + (g - p) / (steps * w.lr), c_i, c, global_params, p)
        return p, new_c_i

    @functools.partial(jax.jit, donate_argnums=(2,))
    @drjax.program(placements={"clients": w.cohort_size})
    def fed_round(params, c, c_all, ids, x, y, r):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(w.seed), r), w.cohort_size)
        at_clients = drjax.broadcast(params)
        if algo != "scaffold":
            models = drjax.map_fn(local_train, (at_clients, x, y, keys))
            sizes = jnp.full((w.cohort_size,), rows, jnp.float32)  # rows per client (equal here)
            weights = jax.tree.map(lambda _: sizes, params)  # reduce_weighted_mean wants a matching tree
            return drjax.reduce_weighted_mean(models, weights), c, c_all
        c_i = jax.tree.map(lambda a: a[ids], c_all)
        models, new_c_i = drjax.map_fn(local_train, (at_clients, x, y, keys, drjax.broadcast(c), c_i))
        delta_c = drjax.reduce_mean(jax.tree.map(jnp.subtract, new_c_i, c_i))
        c = jax.tree.map(lambda c, d: c + (w.cohort_size / w.num_clients) * d, c, delta_c)
        c_all = jax.tree.map(lambda a, n: a.at[ids].set(n), c_all, new_c_i)
        return drjax.reduce_mean(models), c, c_all

    return fed_round


def main() -> None:
    w, out = common.parse_args(__doc__.splitlines()[0])
    recorder = common.Recorder("drjax_map", w, out)
    data = common.Data(w.data)
    params = jax.device_put({k: v.astype(np.float32) for k, v in data.init.items()})
    c = c_all = None
    if w.algorithm == "scaffold":
        c = jax.tree.map(jnp.zeros_like, params)
        c_all = jax.tree.map(lambda v: jnp.zeros((w.num_clients, *v.shape), v.dtype), params)
    fed_round = make_round(w, rows=data.x.shape[1])
    recorder.ready()
    for r in range(w.rounds):
        ids = data.cohorts[r]
        params, c, c_all = fed_round(params, c, c_all, ids, data.x[ids], data.y[ids], r)
        jax.block_until_ready((params, c, c_all))
        recorder.round_done(r)
    recorder.finish({k: np.asarray(v) for k, v in params.items()}, packages=("jax", "jaxlib", "drjax"))


if __name__ == "__main__":
    main()
