"""The vectorised simulator: a whole round, every sampled client and every local step, as
ONE jitted XLA program.

A round gathers the cohort's data and client state, runs ``jax.vmap(client_update)``
(``lax.scan`` over local steps inside), aggregates, applies ``server_update`` and scatters
client state back. Clients are grouped into size buckets (see ``packing``), each bucket's
share of the cohort padded to a fixed capacity so shapes never change and the program
compiles once. The client axis is sharded over the given devices and runs in chunks of at
most ``chunk_size`` clients, one after another: on a CPU, by default, as many clients per
device as keep their models in cache (``auto_chunk_size``); with a linear aggregator each
chunk's updates are summed as it finishes, never stacked for the cohort. Cost per round
follows the cohort, not the number of registered clients: only client states, a few bytes
each for FedAvg, scale with the latter.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nordfl.algorithms import Algorithm, weighted_mean
from nordfl.algorithms.aggregators import Aggregator, is_linear, mean_of_sum, weighted_sum
from nordfl.algorithms.attacks import Adversary, poison
from nordfl.sim.cohort import RoundPlan, plan_round
from nordfl.sim.packing import BucketSpec, ClientPool, bucket_slots, bucket_specs, gather_clients, plan_buckets, pool_clients
from nordfl.tasks import EvalMetrics, Examples, Task, metrics_type


class SimState(NamedTuple):
    """Everything a run needs to continue: server state, every client's state stacked [N, ...], rounds done."""

    server: Any
    clients: Any
    round: int


class RoundMetrics(NamedTuple):
    """A round's training loss (mean over contributing clients, weighted by examples), contributors, update norm."""

    client_loss: jax.Array
    num_clients: jax.Array
    update_norm: jax.Array


class Slots(NamedTuple):
    """A bucket's share of the cohort, padded to the bucket's capacity with invalid slots."""

    client_ids: np.ndarray  # int32 [capacity]
    valid: np.ndarray  # bool
    epochs: np.ndarray  # int32
    contributes: np.ndarray  # bool


class Evaluation(NamedTuple):
    """The global model scored: train loss over all clients (weighted by examples), pooled and per-site test.

    ``pooled`` and ``sites`` are the task's own metrics type, what ``task.evaluate`` returns:
    ``EvalMetrics`` for classification, ``RegressionMetrics`` for regression."""

    train_loss: float
    pooled: EvalMetrics
    sites: EvalMetrics  # each field [num_clients]; NaN for a site without test rows


class SimulatorOptions(NamedTuple):
    """How the simulator runs (not what it computes: results do not depend on these except the seeded plan).

    The local schedule (epochs, batch size) is the algorithm's own (``Algorithm.local``)."""

    cohort_size: Optional[int] = None
    straggler_fraction: float = 0.0
    keep_stragglers: bool = True
    dropout_fraction: float = 0.0
    chunk_size: Optional[int] = None  # None: ``auto_chunk_size``
    max_buckets: int = 4
    data_on_host: bool = False
    eval_chunk_size: int = 256


ROUND_COMPILER_OPTIONS = {"cpu": {"xla_cpu_copy_insertion_use_region_analysis": True}}
"""XLA options for the round program, by platform. Without region analysis XLA's CPU backend
copied two of the MLP's weight matrices at every local step (a loop-carried buffer read by
the forward and backward dots and overwritten by the SGD update): W3 6.3 -> 5.4 s a round."""

CPU_CHUNK_BYTES = 24 * 2**20
"""Working set per CPU device that ``auto_chunk_size`` fills. Each SGD step of a client reads
and writes its whole model, so a chunk whose models stay in cache runs near the arithmetic
rate, and a larger one streams them from memory: W3 (a 2.7 MB MLP, 2 cores) ran at 52, 82,
74, 72 and 40 GFLOP/s with 1, 2, 3, 5 and 50 clients per device (docs/benchmarks.md)."""


def auto_chunk_size(params, row_bytes: int, rows: int, num_devices: int, platform: str) -> Optional[int]:
    """Clients per chunk when ``chunk_size`` is not set: ``None`` (the whole cohort) off the CPU,
    else as many clients per device as fit ``CPU_CHUNK_BYTES`` with their params, gradients,
    updated params and ``rows`` padded data rows (at least one per device)."""
    if platform != "cpu":
        return None
    param_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(params))
    per_client = 3 * param_bytes + rows * row_bytes
    return max(1, CPU_CHUNK_BYTES // max(per_client, 1)) * num_devices


def chunk_layout(slots_needed: int, max_chunk: int, num_devices: int) -> tuple[int, int]:
    """(number of chunks, chunk size): the fewest chunks of at most about ``max_chunk`` slots,
    evened out, each a multiple of ``num_devices``, together holding ``slots_needed``.

    Evening out keeps the padding below one device-width per chunk: 1,000 slots with room for
    894 run as 2 chunks of 500, not 2 of 894 (1,788 slots, of which 788 padding).
    """
    limit = math.ceil(min(max_chunk, slots_needed) / num_devices) * num_devices
    num_chunks = math.ceil(slots_needed / limit)
    chunk = math.ceil(slots_needed / num_chunks / num_devices) * num_devices
    return num_chunks, chunk


def stack_clients(tree, num_clients: int):
    """Every client's state from one client's initial state, on a leading client axis (a real copy each:
    the round donates these buffers)."""
    return jax.tree_util.tree_map(lambda leaf: jnp.broadcast_to(leaf, (num_clients, *leaf.shape)).copy(), tree)


class Simulator:
    """Runs an ``Algorithm`` over many simulated clients.

    With an ``adversary`` (``nordfl.algorithms.attacks``) its malicious clients train on
    poisoned data and/or have their updates replaced inside the compiled round, before the
    aggregator sees them.

    Example:
      >>> sim = Simulator(alg, task, SimulatorOptions(), seed=0)
      >>> state = sim.init(task.model.init_params)
      >>> state, metrics = sim.run_round(state)
      >>> sim.evaluate(state.server.params).pooled.accuracy
    """

    def __init__(
        self,
        algorithm: Algorithm,
        task: Task,
        options: SimulatorOptions = SimulatorOptions(),
        *,
        seed: int = 0,
        aggregate: Aggregator = weighted_mean,
        devices: Optional[Sequence[jax.Device]] = None,
        adversary: Optional[Adversary] = None,
        clients_per_run: Optional[int] = None,
    ):
        if adversary is not None:
            if np.shape(adversary.malicious) != (len(task.data.clients),):
                raise ValueError(f"adversary.malicious: expected one flag per client ({len(task.data.clients)}), "
                                 f"got shape {np.shape(adversary.malicious)}")
            task = task._replace(data=poison(task.data, adversary))
        self.algorithm, self.task, self.options, self.seed = algorithm, task, options, seed
        self.aggregate = aggregate
        self.adversary = adversary
        self._update_attack = adversary.attack.update if adversary is not None else None
        # The updates are held together (not summed chunk by chunk) when the aggregator or an attack needs them all.
        self._hold_updates = not is_linear(aggregate) or self._update_attack is not None
        if algorithm.local is None:
            raise ValueError("algorithm.local: the simulator plans buckets and stragglers from the algorithm's local schedule; "
                             "build the Algorithm with local=local_schedule(...)")
        self.local = algorithm.local
        clients = task.data.clients
        # Several runs' clients back to back (``SeedBatch`` with a data split per seed): states, cohorts and PRNG
        # keys count one run's clients, ``client_offset`` in the round program says which run's rows to train on.
        self.num_clients = len(clients) if clients_per_run is None else clients_per_run
        if len(clients) % self.num_clients:
            raise ValueError(f"clients_per_run: must divide the task's {len(clients)} clients, got {clients_per_run}")
        cohort = self.num_clients if options.cohort_size is None else options.cohort_size
        if not 1 <= cohort <= self.num_clients:
            raise ValueError(f"sim.cohort_size: must be in [1, {self.num_clients}] (the number of clients), got {cohort}")
        self.cohort_size = cohort
        self.devices = list(devices or jax.devices())
        self.mesh = Mesh(np.asarray(self.devices), ("clients",))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._base_key = self.replicate(jax.random.key(seed))  # each round's key is folded in the program

        train_sizes = [len(c.train.y) for c in clients]
        plan = plan_buckets(
            train_sizes, batch_size=self.local.batch_size, drop_remainder=self.local.drop_remainder,
            cohort_size=cohort, max_buckets=options.max_buckets, clients_per_run=self.num_clients,
        )
        self.buckets: list[BucketSpec] = bucket_specs(train_sizes, plan)
        self._bucket_of = np.empty(len(clients), np.int32)
        for b, spec in enumerate(self.buckets):
            self._bucket_of[spec.client_ids] = b
        self._host_pool = pool_clients([c.train for c in clients])
        self._chunks = [self._chunking(bucket_slots(spec.client_ids, cohort, self.num_clients), spec.n_max) for spec in self.buckets]

        self._train_pool = None if options.data_on_host else self.replicate(self._host_pool)
        test_sizes = [len(c.test.y) for c in clients]
        self._test_pool = pool_clients([c.test for c in clients])
        self._test_buckets = bucket_specs(test_sizes, plan_buckets(test_sizes, batch_size=1, max_buckets=options.max_buckets))
        self._train_eval_buckets = bucket_specs(train_sizes, plan_buckets(train_sizes, batch_size=1, max_buckets=options.max_buckets))
        self._pooled_test = task.data.pooled_test()

        self._round = jax.jit(
            self._round_program, static_argnames=("gather_on_device",), donate_argnums=(1,),
            compiler_options=ROUND_COMPILER_OPTIONS.get(self.devices[0].platform),
        )
        self._evaluate_bucket = jax.jit(self._evaluate_bucket_program, static_argnames=("n_max",))
        self._evaluate_pooled = jax.jit(task.evaluate)
        self.metrics_type = metrics_type(task)  # EvalMetrics, RegressionMetrics or a plugin's own

    # ----------------------------------------------------------------- set-up helpers
    def _chunking(self, slots_needed: int, rows: int) -> tuple[int, int]:
        """(number of chunks, chunk size) for a bucket of ``rows`` padded rows (``chunk_layout``),
        chunks of at most ``sim.chunk_size`` or the automatic size."""
        width = len(self.devices)
        row_bytes = sum(leaf[0].nbytes for leaf in jax.tree_util.tree_leaves(self._host_pool.examples))
        auto = auto_chunk_size(self.task.model.init_params, row_bytes, rows, width, self.devices[0].platform)
        return chunk_layout(slots_needed, self.options.chunk_size or auto or slots_needed, width)

    def init(self, params) -> SimState:
        """Round-0 state: the server's and every client's initial state."""
        server = self.algorithm.server_init(params)
        clients = stack_clients(self.algorithm.client_init(params), self.num_clients)
        return SimState(self.replicate(server), self.replicate(clients), 0)

    def replicate(self, tree):
        """``tree`` on every device of the mesh, from host copies of its leaves: a process can place a host
        array on devices of other processes (a multi-process run, ``nordfl.sim.distributed``), not one of its
        own device arrays. PRNG keys travel as their key data."""
        def put(leaf):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(put(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
            return jax.device_put(np.asarray(leaf), self._replicated)

        return jax.tree_util.tree_map(put, tree)

    # ----------------------------------------------------------------- one round
    def plan(self, round_index: int, seed: Optional[int] = None) -> RoundPlan:
        """The seeded cohort, epochs and contributions of round ``round_index`` (0-based), for ``seed``
        (default: the simulator's own)."""
        o = self.options
        return plan_round(
            self.seed if seed is None else seed, round_index, num_clients=self.num_clients, cohort_size=self.cohort_size,
            num_epochs=self.local.num_epochs, straggler_fraction=o.straggler_fraction,
            keep_stragglers=o.keep_stragglers, dropout_fraction=o.dropout_fraction,
        )

    def _slots(self, plan: RoundPlan, run: int = 0) -> list[Slots]:
        """Splits the cohort by bucket, each padded to the bucket's fixed capacity; ``client_ids`` index the
        task's clients, those of run ``run`` when it holds several runs' clients (``clients_per_run``)."""
        slots = []
        cohort = plan.cohort + run * self.num_clients
        member_bucket = self._bucket_of[cohort]
        for b, (num_chunks, chunk) in enumerate(self._chunks):
            mine = np.flatnonzero(member_bucket == b)
            capacity = num_chunks * chunk
            pad = capacity - len(mine)
            slots.append(Slots(
                client_ids=np.concatenate([cohort[mine], np.full(pad, run * self.num_clients, np.int32)]).astype(np.int32),
                valid=np.concatenate([np.ones(len(mine), bool), np.zeros(pad, bool)]),
                epochs=np.concatenate([plan.epochs[mine], np.ones(pad, np.int32)]).astype(np.int32),
                contributes=np.concatenate([plan.contributes[mine], np.zeros(pad, bool)]),
            ))
        return slots

    def padding_overhead(self, plan: RoundPlan) -> float:
        """Fraction of the rows a round processes that are padding (bucketing keeps it low)."""
        real = int(self._host_pool.sizes[plan.cohort].sum())
        padded = sum(n * c * spec.n_max for (n, c), spec in zip(self._chunks, self.buckets))
        return 1.0 - real / padded

    def run_round(self, state: SimState) -> tuple[SimState, RoundMetrics]:
        """Runs round ``state.round`` and returns the next state and the round's metrics."""
        slots = self._slots(self.plan(state.round))
        if self.options.data_on_host:
            source = tuple(
                gather_clients(self._host_pool, s.client_ids, s.valid, spec.n_max) for s, spec in zip(slots, self.buckets)
            )
        else:
            source = self._train_pool
        server, clients, metrics = self._round(
            state.server, state.clients, source, tuple(slots), self._base_key, np.int32(state.round),
            gather_on_device=not self.options.data_on_host,
        )
        return SimState(server, clients, state.round + 1), metrics

    def _run_clients(self, algorithm: Algorithm, message, states, data, keys, epochs, counts, num_chunks: int, chunk: int):
        """``vmap(client_update)`` over a chunk, a loop over chunks, the chunk axis sharded over devices.

        Returns the stacked ``ClientOutput``s, each weight zeroed where its slot does not count,
        and, with a linear aggregator (``is_linear``: ``weighted_mean``), the ``weighted_sum`` of the updates added
        up chunk by chunk in their place (``update`` is then None): only a chunk's updates are
        ever held at once, not the cohort's (W3: 100 x 2.7 MB). Other aggregators need every
        update together; the sum is then None.

        Slot ``i`` runs in chunk ``i % num_chunks``, so each device's contiguous block of
        slots stays on that device in every chunk and the outputs come back sharded as the
        slots are. (With slot ``i`` in chunk ``i // chunk`` the outputs' sharding sat on an
        inner axis, and XLA gathered every client's update onto every device before the
        mean: W3 spent a fifth of its round there.)
        """
        sharded = NamedSharding(self.mesh, PartitionSpec("clients"))
        update = jax.vmap(algorithm.client_update, in_axes=(None, 0, 0, 0, 0))

        def one_chunk(inputs):
            *inputs, counts = jax.lax.with_sharding_constraint(inputs, sharded)
            out = update(message, *inputs)
            return out._replace(weight=jnp.where(counts, out.weight, 0.0))

        def to_chunks(a):
            return jnp.swapaxes(a.reshape(chunk, num_chunks, *a.shape[1:]), 0, 1)

        def from_chunks(a):
            return jax.lax.with_sharding_constraint(jnp.swapaxes(a, 0, 1).reshape(num_chunks * chunk, *a.shape[2:]), sharded)

        chunks = jax.tree_util.tree_map(to_chunks, (states, data, keys, epochs, counts))
        if self._hold_updates:
            return jax.tree_util.tree_map(from_chunks, jax.lax.map(one_chunk, chunks)), None

        def add_chunk(update_sum, inputs):
            out = one_chunk(inputs)
            update_sum = jax.tree_util.tree_map(jnp.add, update_sum, weighted_sum(out.update, out.weight))
            return update_sum, out._replace(update=None)

        shapes = jax.eval_shape(one_chunk, jax.tree_util.tree_map(lambda a: a[0], chunks)).update
        zeros = jax.tree_util.tree_map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), shapes)
        update_sum, outputs = jax.lax.scan(add_chunk, zeros, chunks)
        return jax.tree_util.tree_map(from_chunks, outputs), update_sum

    def _round_program(self, server, clients, source, slots: tuple[Slots, ...], base_key, round_index, *, gather_on_device: bool,
                       algorithm: Optional[Algorithm] = None, client_offset=0):
        """One round as a traceable function; ``algorithm`` (default: the simulator's) may be one built
        from traced hyperparameters (``sim.grid``), with the same local schedule shape. ``client_offset``: the
        first task client of this run (``clients_per_run``); states and keys use ids within the run."""
        algorithm = self.algorithm if algorithm is None else algorithm
        message = algorithm.broadcast(server)
        key = jax.random.fold_in(base_key, round_index)
        updates, update_sums, weights, losses, sizes, malicious = [], [], [], [], [], []
        for b, (spec, s, (num_chunks, chunk)) in enumerate(zip(self.buckets, slots, self._chunks)):
            data = gather_clients(source, s.client_ids, s.valid, spec.n_max) if gather_on_device else source[b]
            ids = s.client_ids - client_offset
            states = jax.tree_util.tree_map(lambda a: a[ids], clients)
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
            counts = s.valid & s.contributes
            out, update_sum = self._run_clients(algorithm, message, states, data, keys, s.epochs, counts, num_chunks, chunk)
            new_states = jax.vmap(otu.tree_where)(counts, out.client_state, states)
            scatter_to = jnp.where(s.valid, ids, self.num_clients)  # invalid slots fall off the end
            clients = jax.tree_util.tree_map(lambda a, new: a.at[scatter_to].set(new, mode="drop"), clients, new_states)
            if update_sum is None:
                updates.append(out.update)
            else:
                update_sums.append(update_sum)
            weights.append(out.weight)
            if self._update_attack is not None:
                malicious.append(jnp.asarray(self.adversary.malicious)[s.client_ids] & counts)
            losses.append(out.metrics.train_loss)
            sizes.append(jnp.where(counts & (out.metrics.num_steps > 0), data.num_examples, 0).astype(jnp.float32))
        concat = lambda *parts: jnp.concatenate(parts, axis=0)  # noqa: E731
        weight, loss, size = concat(*weights), concat(*losses), concat(*sizes)
        if update_sums:
            aggregate = mean_of_sum(jax.tree_util.tree_map(lambda *parts: sum(parts), *update_sums), weight)
        else:
            stacked = jax.tree_util.tree_map(concat, *updates)
            if self._update_attack is not None:  # the key of a client id that does not exist
                stacked = self._update_attack(stacked, concat(*malicious), weight, jax.random.fold_in(key, self.num_clients))
            aggregate = self.aggregate(stacked, weight)
        server, server_metrics = algorithm.server_update(server, aggregate)
        client_loss = jnp.sum(loss * size) / jnp.maximum(jnp.sum(size), 1.0)
        return server, clients, RoundMetrics(client_loss, server_metrics.num_clients, server_metrics.update_norm)

    # ----------------------------------------------------------------- evaluation
    def _evaluate_bucket_program(self, params, data, *, n_max: int) -> EvalMetrics:
        def one(client_data):
            mask = jnp.arange(n_max) < client_data.num_examples
            return self.task.evaluate(params, client_data.examples, mask)

        return jax.lax.map(one, data, batch_size=self.options.eval_chunk_size)

    def _per_client(self, params, pool: ClientPool, buckets: list[BucketSpec]) -> EvalMetrics:
        """Metrics of ``params`` on every client's rows of ``pool``, in client order."""
        fields = self.metrics_type._fields
        out = [np.full(len(pool.sizes), np.nan, np.float32) for _ in fields]
        for spec in buckets:
            data = gather_clients(pool, spec.client_ids, np.ones(len(spec.client_ids), bool), spec.n_max)
            metrics = self._evaluate_bucket(params, data, n_max=spec.n_max)
            for field, values in zip(out, metrics):
                field[spec.client_ids] = np.asarray(values)
        sizes = pool.sizes
        result = self.metrics_type(*out)
        return result._replace(**{f: np.where(sizes > 0, getattr(result, f), np.nan) for f in fields})

    def evaluate(self, params) -> Evaluation:
        """Scores ``params`` on every client's training data and on the pooled and per-site test sets."""
        # Training rows already on the device are scored there, not sent again at every evaluation.
        pool = self._host_pool if self._train_pool is None else self._train_pool
        train = self._per_client(params, pool, self._train_eval_buckets)
        sizes = self._host_pool.sizes.astype(np.float64)
        train_loss = float(np.nansum(train.loss * sizes) / max(sizes.sum(), 1.0))
        sites = self._per_client(params, self._test_pool, self._test_buckets)
        pooled_test: Examples = self._pooled_test
        pooled = self._evaluate_pooled(params, pooled_test, np.ones(len(pooled_test.y), bool))
        return Evaluation(train_loss, self.metrics_type(*(float(v) for v in pooled)), sites)
