"""NordFL's simulator on a benchmark workload: one compiled program per round for the whole cohort.

Runs in NordFL's own environment. The cohorts are not read from the data file: the
simulator draws them with its own seeded ``plan_round``, and the peer checks that they are
the ones every other peer trains, so all systems do the same work.
"""

from __future__ import annotations

from benchmarks.peers import common  # first: starts the set-up clock

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import make_algorithm
from nordfl.sim.devices import use_cpu_cores
from nordfl.sim.engine import Simulator, SimulatorOptions
from nordfl.tasks import Examples, classification_task
from nordfl.tasks.data import ClientSplit, FederatedDataset
from nordfl.tasks.models import logistic_regression, mlp


def nordfl_params(model, init: dict):
    """The workload's ``w0, b0, ...`` as the Flax model's params pytree."""
    names = ["linear"] if "linear" in model.init_params else [("hidden", i) for i in range(len(init) // 2 - 1)] + ["out"]
    params = jax.tree_util.tree_map(np.asarray, model.init_params)
    for i, name in enumerate(names):
        layer = params[name[0]][name[1]] if isinstance(name, tuple) else params[name]
        layer["kernel"], layer["bias"] = jnp.asarray(init[f"w{i}"]), jnp.asarray(init[f"b{i}"])
    return params, names


def workload_params(params, names) -> dict:
    out = {}
    for i, name in enumerate(names):
        layer = params[name[0]][name[1]] if isinstance(name, tuple) else params[name]
        out[f"w{i}"], out[f"b{i}"] = np.asarray(layer["kernel"]), np.asarray(layer["bias"])
    return out


def build(w: common.Workload, data: common.Data):
    d, classes = data.init["w0"].shape[0], data.init[f"w{len(data.init) // 2 - 1}"].shape[1]
    model = logistic_regression(d, classes) if w.model == "logreg" else mlp(
        d, classes, tuple(data.init[f"w{i}"].shape[1] for i in range(len(data.init) // 2 - 1)))
    empty = Examples(np.zeros((0, d), np.float32), np.zeros(0, np.int32))
    clients = tuple(ClientSplit(f"client_{k}", Examples(data.x[k], data.y[k]), empty) for k in range(w.num_clients))
    task = classification_task(w.name, FederatedDataset(w.name, clients, classes), model)
    hyper = dict(client_lr=w.lr, num_epochs=w.epochs, batch_size=w.batch_size)
    if w.algorithm == "fedprox":
        hyper["mu"] = w.mu
    if w.algorithm == "scaffold":
        hyper["num_clients"] = w.num_clients
    algorithm = make_algorithm(w.algorithm, task.loss_fn, **hyper)
    # A pool over 1 GiB stays in host memory and each cohort is gathered there (sim.data_on_host):
    # on a CPU the "device" copy would be a second copy in the same RAM.
    options = SimulatorOptions(cohort_size=w.cohort_size,
                               data_on_host=data.x.nbytes > 2**30)
    sim = Simulator(algorithm, task, options, seed=w.seed)
    for r in range(w.rounds):
        if not np.array_equal(sim.plan(r).cohort, data.cohorts[r]):
            raise RuntimeError(f"round {r}: the simulator's cohort differs from the workload's")
    params, names = nordfl_params(model, data.init)
    return sim, params, names


def timed_rounds(sim, state, rounds: int, on_round=lambda r, seconds: None):
    """Runs ``rounds`` rounds, each timed to the end of its computation; returns the state and each round's seconds."""
    import time

    times = []
    for r in range(rounds):
        start = time.perf_counter()
        state, _ = sim.run_round(state)
        jax.block_until_ready(state.server)
        times.append(time.perf_counter() - start)
        on_round(r, times[-1])
    return state, times


def main() -> None:
    use_cpu_cores()  # as nordfl-sim does: one JAX CPU device per core (no effect on a GPU)
    w, out = common.parse_args(__doc__.splitlines()[0])
    recorder = common.Recorder("nordfl", w, out)
    data = common.Data(w.data)
    sim, params, names = build(w, data)
    state = sim.init(params)
    recorder.ready()
    for r in range(w.rounds):
        state, _ = sim.run_round(state)
        jax.block_until_ready(state.server)
        recorder.round_done(r)
    recorder.finish(workload_params(state.server.params, names), packages=("nordfl", "jax", "jaxlib", "flax", "optax"))


if __name__ == "__main__":
    main()
