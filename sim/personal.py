"""Each site's own model, scored on its own test rows: what personalisation is judged by.

``personal_models`` runs ``algorithm.personalise`` (``nordfl.algorithms.personal``) for
every client at once, vmapped over each size bucket of training data like a round, and
``own_site_metrics`` scores client i's model on client i's test rows only. For an algorithm
without personalisation every site's model is the global one, so its own-site metrics are
its per-site metrics.

The models of all N clients are held together ([N, ...] per leaf): fine for the hundreds
of sites a personalisation study has, not meant for a 10,000-client cohort of a large model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import Algorithm
from nordfl.algorithms.personal import personal_key, personal_model
from nordfl.sim.packing import gather_clients

class PersonalEvaluator:
    """Scores per-site models on a simulator's clients; one per (simulator, algorithm), so its programs compile once.

    Example:
      >>> scorer = PersonalEvaluator(sim, alg)
      >>> scorer.evaluate(state.server, state.clients, seed=0).accuracy  # [num_clients]
    """

    def __init__(self, sim, algorithm: Algorithm):
        self.sim, self.algorithm = sim, algorithm
        self._personalise = jax.jit(self._personalise_program, static_argnames=("n_max",))
        self._score = jax.jit(self._score_program, static_argnames=("n_max",))

    def _personalise_program(self, server, states, data, keys, *, n_max: int):
        del n_max  # part of the cache key only: ``data``'s shape
        message = self.algorithm.broadcast(server)
        return jax.vmap(lambda s, d, k: personal_model(self.algorithm, message, s, d, k))(states, data, keys)

    def _score_program(self, params, data, *, n_max: int):
        def one(inputs):
            p, d = inputs
            return self.sim.task.evaluate(p, d.examples, jnp.arange(n_max) < d.num_examples)

        return jax.lax.map(one, (params, data), batch_size=self.sim.options.eval_chunk_size)

    def personal_models(self, server, clients, seed: int):
        """Every client's own model, stacked [num_clients, ...] in client order."""
        sim = self.sim
        pool = sim._host_pool if sim._train_pool is None else sim._train_pool
        parts, order = [], []
        for spec in sim._train_eval_buckets:
            ids = np.asarray(spec.client_ids)
            data = gather_clients(pool, ids, np.ones(len(ids), bool), spec.n_max)
            states = jax.tree_util.tree_map(lambda a: a[ids], clients)
            keys = jax.vmap(lambda i: personal_key(seed, i))(jnp.asarray(ids))
            parts.append(self._personalise(server, states, data, keys, n_max=spec.n_max))
            order.append(ids)
        inverse = np.argsort(np.concatenate(order))
        return jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves)[inverse], *parts)

    def evaluate(self, server, clients, seed: int):
        """The task's metrics of each client's own model on its own test rows (NaN without test rows)."""
        return self.own_site_metrics(self.personal_models(server, clients, seed))

    def own_site_metrics(self, params):
        """Metrics of client i's params (``params`` stacked [N, ...]) on client i's test rows, in client order."""
        sim = self.sim
        fields = sim.metrics_type._fields
        out = [np.full(sim.num_clients, np.nan, np.float32) for _ in fields]
        for spec in sim._test_buckets:
            ids = np.asarray(spec.client_ids)
            data = gather_clients(sim._test_pool, ids, np.ones(len(ids), bool), spec.n_max)
            own = jax.tree_util.tree_map(lambda a: a[ids], params)
            for field, values in zip(out, self._score(own, data, n_max=spec.n_max)):
                field[ids] = np.asarray(values)
        sizes = sim._test_pool.sizes
        return sim.metrics_type(*(np.where(sizes > 0, field, np.nan) for field in out))
