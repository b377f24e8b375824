"""Several seeds of one experiment as ONE compiled program: the seed is a vmapped axis.

A comparison suite runs every (algorithm, setting) under five or more seeds. The seeds
differ only in the model's initial params, the cohort plans and the PRNG keys; data,
buckets and shapes are the same. So ``jax.vmap`` over the simulator's round program, with
server and client state stacked on a leading seed axis, compiles once per cell instead of
once per seed, and runs the seeds side by side. Each seed computes exactly what
``Simulator(seed=s)`` computes (a test checks it).

With a data split per seed (a suite's ``vary_split``), each seed's task has the same clients
with other rows. The seeds' clients then sit back to back in one training pool, bucketed
together, and each seed's lane of the program trains on its own block (``client_offset``):
still one compilation per cell, not one per seed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence, Union

import jax
import numpy as np

from nordfl.algorithms import Algorithm, weighted_mean
from nordfl.algorithms.aggregators import Aggregator
from nordfl.algorithms.attacks import Adversary
from nordfl.sim.engine import ROUND_COMPILER_OPTIONS, Evaluation, RoundMetrics, Simulator, SimulatorOptions, SimState, Slots
from nordfl.sim.packing import padded_steps, plan_buckets
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


SHARED_PADDING_LIMIT = 2.0
"""How much more padded work one program for every seed's data split may do than a program per seed: each
program compiles for seconds, and a suite's small models train a few seconds a program (label_skew's Dirichlet
splits need 1.3-1.6 times the work together, Synthetic(1, 1)'s heavy-tailed device sizes 3.5 times)."""


def padded_work(tasks: Sequence[Task], options: SimulatorOptions, local) -> tuple[int, int]:
    """Padded local steps a round of every seed's split (one task each): (in one shared program, in one program
    per seed together)."""
    per_run = len(tasks[0].data.clients)
    cohort = per_run if options.cohort_size is None else options.cohort_size
    schedule = {"batch_size": local.batch_size, "drop_remainder": local.drop_remainder, "cohort_size": cohort}

    def steps(sizes):
        plan = plan_buckets(sizes, max_buckets=options.max_buckets, clients_per_run=per_run, **schedule)
        return padded_steps(sizes, plan, clients_per_run=per_run, **schedule)

    sizes = [t.data.train_sizes() for t in tasks]
    return len(tasks) * steps([n for s in sizes for n in s]), sum(steps(s) for s in sizes)


def split_lanes(tasks: Sequence[Task], options: SimulatorOptions, local) -> list[list[int]]:
    """Which seeds (indices into ``tasks``, one data split each) share one program: all of them, or each alone.

    Every lane of a shared program computes every bucket, sized for the largest client any seed put there:
    with heavy-tailed client sizes (Synthetic(1, 1)) one seed's 30,000-row device would make all five lanes
    train it each round. Sharing pays when its padded local steps stay within ``SHARED_PADDING_LIMIT`` of
    the seeds' own programs together; else each seed compiles its own."""
    together, apart = padded_work(tasks, options, local)
    return [list(range(len(tasks)))] if together <= SHARED_PADDING_LIMIT * apart else [[i] for i in range(len(tasks))]


class SeedBatch:
    """Runs ``algorithm`` on ``task`` for every seed in ``seeds`` at once.

    Args:
      algorithm, options, aggregate, adversary: as for ``Simulator`` (one adversary for every seed: the
        same clients are malicious in each).
      task: the task, or one task per seed: the same clients (names, order) with each seed's own rows.
      seeds: the seeds, one run each.
      evaluator: a simulator to score with, on its task's clients (default: ``task``'s), or one per seed
        with a task per seed. The pooled and local baselines train on other data than they are scored
        on; cells of a suite share one, so its evaluation programs compile once per data set rather
        than once per cell.

    Example:
      >>> batch = SeedBatch(alg, task, options, seeds=(0, 1, 2))
      >>> state = batch.init([make_model(..., seed=s).init_params for s in (0, 1, 2)])
      >>> state, metrics = batch.run_round(state)  # metrics fields have shape [3]
      >>> [e.pooled.accuracy for e in batch.evaluate(state.server.params)]
    """

    def __init__(
        self,
        algorithm: Algorithm,
        task: Union[Task, Sequence[Task]],
        options: SimulatorOptions,
        seeds: Sequence[int],
        *,
        aggregate: Aggregator = weighted_mean,
        evaluator: Union[Simulator, Sequence[Simulator], None] = None,
        adversary: Optional[Adversary] = None,
    ):
        if not seeds:
            raise ValueError("seeds: expected at least one seed, got none")
        if options.data_on_host:
            raise ValueError("sim.data_on_host: must be false when several seeds share one program (the data is shared)")
        self.seeds = tuple(int(s) for s in seeds)
        tasks = None if isinstance(task, Task) else list(task)
        if tasks is None:
            self.sim = Simulator(algorithm, task, options, seed=self.seeds[0], aggregate=aggregate, adversary=adversary)
            self._offsets = np.zeros(len(self.seeds), np.int32)
            self.evaluators = [evaluator or self.sim] * len(self.seeds)
        else:
            self.sim = self._split_simulator(algorithm, tasks, options, aggregate, adversary)
            self._offsets = np.arange(len(self.seeds), dtype=np.int32) * self.sim.num_clients
            if evaluator is None:
                evaluator = [Simulator(algorithm, t, options, seed=seed, aggregate=aggregate) for t, seed in zip(tasks, self.seeds)]
            if not isinstance(evaluator, (list, tuple)) or len(evaluator) != len(self.seeds):
                raise ValueError(f"evaluator: expected one simulator per seed ({len(self.seeds)}) with a task per seed, got {evaluator!r}")
            self.evaluators = list(evaluator)
        program = functools.partial(self.sim._round_program, gather_on_device=True)
        self._round = jax.jit(
            jax.vmap(lambda *args: program(*args[:-1], client_offset=args[-1]), in_axes=(0, 0, None, 0, 0, None, 0)),
            donate_argnums=(1,), compiler_options=ROUND_COMPILER_OPTIONS.get(self.sim.devices[0].platform),
        )
        self._base_keys = self.sim.replicate(jax.numpy.stack([jax.random.key(seed) for seed in self.seeds]))

    def _split_simulator(self, algorithm, tasks: list[Task], options, aggregate, adversary) -> Simulator:
        """One simulator over every seed's clients back to back (``clients_per_run``)."""
        if len(tasks) != len(self.seeds):
            raise ValueError(f"task: expected one task per seed ({len(self.seeds)}), got {len(tasks)}")
        names = [c.name for c in tasks[0].data.clients]
        for seed, t in zip(self.seeds, tasks):
            if [c.name for c in t.data.clients] != names:
                raise ValueError(f"task (seed {seed}): expected the clients {names} of the first seed's task, "
                                 f"got {[c.name for c in t.data.clients]}")
        clients = tuple(c for t in tasks for c in t.data.clients)
        union = tasks[0]._replace(data=dataclasses.replace(tasks[0].data, clients=clients))
        if adversary is not None:
            adversary = adversary._replace(malicious=np.tile(np.asarray(adversary.malicious), len(tasks)))
        return Simulator(algorithm, union, options, seed=self.seeds[0], aggregate=aggregate, adversary=adversary,
                         clients_per_run=len(names))

    def init(self, params_per_seed: Sequence) -> SimState:
        """Round-0 state of every seed, each from its own initial params, stacked on axis 0."""
        if len(params_per_seed) != len(self.seeds):
            raise ValueError(f"params_per_seed: expected one pytree per seed ({len(self.seeds)}), got {len(params_per_seed)}")
        states = [self.sim.init(params) for params in params_per_seed]
        stacked = self.sim.replicate(stack_runs([(s.server, s.clients) for s in states]))
        return SimState(stacked[0], stacked[1], 0)

    def run_round(self, state: SimState) -> tuple[SimState, RoundMetrics]:
        """Runs round ``state.round`` for every seed; metrics have a leading seed axis."""
        runs = self._offsets // self.sim.num_clients  # each seed's block of the training pool (all 0 with one task)
        slots = [self.sim._slots(self.sim.plan(state.round, seed), int(run)) for run, seed in zip(runs, self.seeds)]
        stacked_slots = stack_slots(slots)
        server, clients, metrics = self._round(
            state.server, state.clients, self.sim._train_pool, stacked_slots, self._base_keys, np.int32(state.round),
            self._offsets,
        )
        return SimState(server, clients, state.round + 1), metrics

    def evaluate(self, params) -> list[Evaluation]:
        """Each seed's global model scored on the evaluation task (one compiled program for all seeds)."""
        return [evaluator.evaluate(seed_slice(params, i)) for i, evaluator in enumerate(self.evaluators)]
