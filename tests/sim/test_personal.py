"""Each site's own model in the simulator equals the same function run per site, alone and unpadded."""

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import ClientData, make_algorithm
from nordfl.algorithms.personal import personal_key, personal_model
from nordfl.sim.engine import Simulator, SimulatorOptions
from nordfl.sim.personal import PersonalEvaluator
from tests.sim.helpers import uneven_task


def _alone(examples):
    """One site's rows as ``ClientData`` (an empty site gets one padding row to index)."""
    n = len(examples.y)
    x = np.zeros((max(n, 1), *examples.x.shape[1:]), np.float32)
    y = np.zeros(max(n, 1), np.int32)
    x[:n], y[:n] = examples.x, examples.y
    return ClientData(type(examples)(jnp.asarray(x), jnp.asarray(y)), jnp.int32(n))


def test_fine_tuned_ditto_models_scored_per_site_match_a_per_site_loop():
    task = uneven_task(sizes=(3, 40, 0, 15, 7))
    alg = make_algorithm("ditto", task.loss_fn, client_lr=0.1, num_epochs=1, batch_size=8, lam=0.3,
                         fine_tune={"epochs": 2})
    sim = Simulator(alg, task, SimulatorOptions(cohort_size=4, max_buckets=2), seed=5)
    state = sim.init(task.model.init_params)
    for _ in range(2):
        state, _ = sim.run_round(state)
    scores = PersonalEvaluator(sim, alg).evaluate(state.server, state.clients, seed=5)

    message = alg.broadcast(state.server)
    for i, client in enumerate(task.data.clients):
        own_state = jax.tree_util.tree_map(lambda a: a[i], state.clients)
        own = personal_model(alg, message, own_state, _alone(client.train), personal_key(5, i))
        test = client.test
        expected = task.evaluate(own, type(test)(jnp.asarray(test.x), jnp.asarray(test.y)), jnp.ones(len(test.y), bool))
        np.testing.assert_allclose(scores.accuracy[i], expected.accuracy, atol=1e-6, err_msg=client.name)
        np.testing.assert_allclose(scores.loss[i], expected.loss, rtol=1e-5, err_msg=client.name)
    # Sites that were sampled hold personal models that score differently from the global one.
    assert not np.allclose(scores.loss, sim.evaluate(state.server.params).sites.loss)
