"""Several seeds of one experiment as ONE compiled program: the seed is a vmapped axis.

A comparison suite runs every (algorithm, setting) under five or more seeds. The seeds
differ only in the model's initial params, the cohort plans and the PRNG keys; data,
buckets and shapes are the same. So ``jax.vmap`` over the simulator's round program, with
server and client state stacked on a leading seed axis, compiles once per cell instead of
once per seed, and runs the seeds side by side. Each seed computes exactly what
``Simulator(seed=s)`` computes (a test checks it).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import numpy as np

from nordfl.algorithms import Algorithm, weighted_mean
from nordfl.algorithms.aggregators import Aggregator
from nordfl.algorithms.attacks import Adversary
from nordfl.sim.engine import ROUND_COMPILER_OPTIONS, Evaluation, RoundMetrics, Simulator, SimulatorOptions, SimState, Slots
from nordfl.tasks import Task


def stack_runs(trees):
    """Pytrees of several runs stacked leafwise on a new leading axis (NumPy, on the host)."""
    return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(a) for a in leaves]), *trees)


def stack_slots(slots_per_run) -> tuple[Slots, ...]:
    """Each run's per-bucket ``Slots`` stacked into one ``Slots`` per bucket with a leading run axis."""
    return tuple(Slots(*(np.stack(field) for field in zip(*per_bucket))) for per_bucket in zip(*slots_per_run))


def seed_slice(tree, index: int):
    """One seed's part of a seed-stacked pytree."""
    return jax.tree_util.tree_map(lambda a: a[index], tree)


class SeedBatch:
    """Runs ``algorithm`` on ``task`` for every seed in ``seeds`` at once.

    Args:
      algorithm, task, options, aggregate, adversary: as for ``Simulator`` (one adversary for every seed).
      seeds: the seeds, one run each.
      evaluator: a simulator to score with, on its task's clients (default: ``task``'s). The pooled
        and local baselines train on other data than they are scored on; cells of a suite share
        one, so its evaluation programs compile once per data set rather than once per cell.

    Example:
      >>> batch = SeedBatch(alg, task, options, seeds=(0, 1, 2))
      >>> state = batch.init([make_model(..., seed=s).init_params for s in (0, 1, 2)])
      >>> state, metrics = batch.run_round(state)  # metrics fields have shape [3]
      >>> [e.pooled.accuracy for e in batch.evaluate(state.server.params)]
    """

    def __init__(
        self,
        algorithm: Algorithm,
        task: Task,
        options: SimulatorOptions,
        seeds: Sequence[int],
        *,
        aggregate: Aggregator = weighted_mean,
        evaluator: Optional[Simulator] = None,
        adversary: Optional[Adversary] = None,
    ):
        if not seeds:
            raise ValueError("seeds: expected at least one seed, got none")
        if options.data_on_host:
            raise ValueError("sim.data_on_host: must be false when several seeds share one program (the data is shared)")
        self.seeds = tuple(int(s) for s in seeds)
        self.sim = Simulator(algorithm, task, options, seed=self.seeds[0], aggregate=aggregate, adversary=adversary)
        self.evaluator = evaluator or self.sim
        program = functools.partial(self.sim._round_program, gather_on_device=True)
        self._round = jax.jit(
            jax.vmap(program, in_axes=(0, 0, None, 0, 0, None)), donate_argnums=(1,),
            compiler_options=ROUND_COMPILER_OPTIONS.get(self.sim.devices[0].platform),
        )
        self._base_keys = self.sim.replicate(jax.numpy.stack([jax.random.key(seed) for seed in self.seeds]))

    def init(self, params_per_seed: Sequence) -> SimState:
        """Round-0 state of every seed, each from its own initial params, stacked on axis 0."""
        if len(params_per_seed) != len(self.seeds):
            raise ValueError(f"params_per_seed: expected one pytree per seed ({len(self.seeds)}), got {len(params_per_seed)}")
        states = [self.sim.init(params) for params in params_per_seed]
        stacked = self.sim.replicate(stack_runs([(s.server, s.clients) for s in states]))
        return SimState(stacked[0], stacked[1], 0)

    def run_round(self, state: SimState) -> tuple[SimState, RoundMetrics]:
        """Runs round ``state.round`` for every seed; metrics have a leading seed axis."""
        slots = [self.sim._slots(self.sim.plan(state.round, seed)) for seed in self.seeds]
        stacked_slots = stack_slots(slots)
        server, clients, metrics = self._round(
            state.server, state.clients, self.sim._train_pool, stacked_slots, self._base_keys, np.int32(state.round)
        )
        return SimState(server, clients, state.round + 1), metrics

    def evaluate(self, params) -> list[Evaluation]:
        """Each seed's global model scored on the evaluation task (one compiled program for all seeds)."""
        return [self.evaluator.evaluate(seed_slice(params, i)) for i in range(len(self.seeds))]
