"""A hyperparameter grid × seeds as ONE compiled program: the grid point is a vmapped axis.

Tuning runs the same experiment at many values of a few numbers (the client learning rate,
FedProx's mu, a server learning rate) and several seeds. Those numbers change no shape, so,
as ``SeedBatch`` does for seeds, ``GridBatch`` stacks every (point, seed) pair on a leading
axis and vmaps the simulator's round program over it, with the hyperparameters as traced
float32 arrays: the algorithm is rebuilt inside the program from each pair's values. One
compilation serves the whole grid, and each pair computes what ``Simulator`` computes for it
alone, to float32 rounding: a test checks 3 rounds to 2e-6; a vmapped program may sum in another
order, and over 50 rounds of SGD the last bits grow to about 1e-4 in the parameters.

What may vary: any hyperparameter the algorithm only uses in arithmetic (learning rates,
mu, Ditto's lam). Not: anything that sets a shape or a loop count (epochs, batch size),
which the builder must keep fixed.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.algorithms import Algorithm, weighted_mean
from nordfl.algorithms.aggregators import Aggregator
from nordfl.sim.engine import ROUND_COMPILER_OPTIONS, Evaluation, RoundMetrics, Simulator, SimulatorOptions, SimState, stack_clients
from nordfl.sim.seeds import seed_slice, stack_runs, stack_slots
from nordfl.tasks import Task

Build = Callable[[Mapping[str, object]], Algorithm]
"""``hyperparameters -> Algorithm``; called with Python floats and with traced float32 scalars."""


class GridBatch:
    """Runs ``build(point)`` on ``task`` for every grid point and seed at once.

    Args:
      build: makes the algorithm from one point's hyperparameters, e.g.
        ``lambda h: make_algorithm("fedprox", loss_fn, client_lr=h["client_lr"], mu=h["mu"], num_epochs=2)``.
      task, options, aggregate: as for ``Simulator``.
      points: the grid, each a mapping of the same names to numbers.
      seeds: every point runs with each of them.

    ``runs`` lists the (point, seed) pairs in the order of the leading axis of states and metrics.

    Example:
      >>> grid = GridBatch(build, task, options, [{"client_lr": lr} for lr in (0.01, 0.1)], seeds=(0, 1))
      >>> state = grid.init([make_model(..., seed=s).init_params for s in (0, 1)])
      >>> state, metrics = grid.run_round(state)  # metrics fields have shape [4]
    """

    def __init__(self, build: Build, task: Task, options: SimulatorOptions, points: Sequence[Mapping[str, float]],
                 seeds: Sequence[int], *, aggregate: Aggregator = weighted_mean):
        if not points or not seeds:
            raise ValueError(f"points, seeds: expected at least one of each, got {len(points)} point(s), {len(seeds)} seed(s)")
        names = sorted(points[0])
        for i, point in enumerate(points):
            if sorted(point) != names:
                raise ValueError(f"points[{i}]: expected the hyperparameters {names} like points[0], got {sorted(point)}")
        if options.data_on_host:
            raise ValueError("sim.data_on_host: must be false when a grid shares one program (the data is shared)")
        self.build, self.points, self.seeds = build, [dict(p) for p in points], tuple(int(s) for s in seeds)
        self.runs = [(point, seed) for point in self.points for seed in self.seeds]
        self.algorithms = [build(point) for point in self.points]  # concrete: checks every value, and inits
        shapes = {(a.local.num_epochs, a.local.batch_size, a.local.drop_remainder) for a in self.algorithms}
        if len(shapes) > 1:
            raise ValueError(f"points: the local schedule's epochs and batch size must not vary over the grid, got {sorted(shapes)}")
        self.sim = Simulator(self.algorithms[0], task, options, seed=self.seeds[0], aggregate=aggregate)
        self._hyper = {name: jnp.asarray([point[name] for point, _ in self.runs], jnp.float32) for name in names}

        def program(server, clients, source, slots, base_key, round_index, hyper):
            return self.sim._round_program(server, clients, source, slots, base_key, round_index, gather_on_device=True,
                                           algorithm=build(hyper))

        self._round = jax.jit(
            jax.vmap(program, in_axes=(0, 0, None, 0, 0, None, 0)), donate_argnums=(1,),
            compiler_options=ROUND_COMPILER_OPTIONS.get(self.sim.devices[0].platform),
        )
        self._base_keys = self.sim.replicate(jnp.stack([jax.random.key(seed) for _, seed in self.runs]))

    def init(self, params_per_seed: Sequence) -> SimState:
        """Round-0 state of every run, from each seed's initial params, stacked in ``runs`` order."""
        if len(params_per_seed) != len(self.seeds):
            raise ValueError(f"params_per_seed: expected one pytree per seed ({len(self.seeds)}), got {len(params_per_seed)}")
        by_seed = dict(zip(self.seeds, params_per_seed))
        states = []
        for point_index in range(len(self.points)):
            algorithm = self.algorithms[point_index]
            for seed in self.seeds:
                params = by_seed[seed]
                states.append((algorithm.server_init(params), stack_clients(algorithm.client_init(params), self.sim.num_clients)))
        stacked = self.sim.replicate(stack_runs(states))
        return SimState(stacked[0], stacked[1], 0)

    def run_round(self, state: SimState) -> tuple[SimState, RoundMetrics]:
        """Runs round ``state.round`` for every run; metrics have a leading axis in ``runs`` order."""
        slots = [self.sim._slots(self.sim.plan(state.round, seed)) for _, seed in self.runs]
        stacked_slots = stack_slots(slots)
        server, clients, metrics = self._round(state.server, state.clients, self.sim._train_pool, stacked_slots, self._base_keys,
                                               np.int32(state.round), self._hyper)
        return SimState(server, clients, state.round + 1), metrics

    def evaluate(self, params) -> list[Evaluation]:
        """Each run's global model scored on the task (in ``runs`` order)."""
        return [self.sim.evaluate(seed_slice(params, i)) for i in range(len(self.runs))]

