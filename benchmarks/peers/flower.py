"""Flower peer: the workload in Flower's Simulation Engine (Ray backend), NumPy clients.

Flower API: flwr 1.42's Message API, the one its docs teach (``NumPyClient``, ``client_fn``
and ``start_simulation`` survive only in ``flwr.compat``):

- ``ClientApp`` with a ``@train()`` handler: reads the global ``ArrayRecord`` and the train
  ``ConfigRecord``, runs the reference NumPy SGD (``numpy_loop.client_update``, so the maths
  is the same line for line) and replies with its model and ``num-examples``.
- ``ServerApp`` whose ``@main()`` runs Flower's own ``FedAvg``/``FedProx`` strategy
  (``strategy.start``): Flower does the row-weighted averaging, and ``FedProx`` puts its
  ``proximal-mu`` in the train config, which the client uses as its ``mu``.
  ``configure_train`` is overridden so round r trains exactly ``cohorts[r]``: client k is
  the k-th registered SuperNode (sorted node ids) and the message names partition k.
  Client-side evaluation is off (``fraction_evaluate=0``), as in the NumPy loop.
- ``run_simulation`` runs both in this process (the ServerApp in a thread, the ClientApps
  in Ray actors, 1 CPU each). Flower 1.42 marks it deprecated in favour of ``flwr run``,
  which needs a FAB project, a SuperLink and a separate ServerApp process, so it cannot
  keep the contract's in-process clock; ``run_simulation`` is the same Simulation Engine.

Timing: the strategy's ``evaluate_fn`` is called before round 1 (``recorder.ready``) and
after every round (``round_done``). The ServerApp thread starts before Ray does, so round
1 includes ``ray.init`` and the actor pool's start-up. Telemetry, Ray usage stats and the
dashboard are off; Ray binds to loopback. SCAFFOLD is not shipped by Flower: reported n/a.
"""

from __future__ import annotations

from benchmarks.peers import common  # first: starts the set-up clock

import dataclasses
import functools
import json
import logging
import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no calls home (set before importing flwr)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning; no GPUs used

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx
from flwr.simulation import run_simulation

from benchmarks.peers.numpy_loop import client_update

PACKAGES = ("flwr", "ray")


# ---- client side (runs in the Ray actors) ----------------------------------------------

@functools.cache
def _workload(text: str) -> common.Workload:
    return common.Workload(**json.loads(text))


@functools.cache
def _data(path: str) -> common.Data:
    """The data file, read once per Ray worker process."""
    return common.Data(path)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    w = _workload(config["workload"])
    if "proximal-mu" in config:  # sent by Flower's FedProx
        w = dataclasses.replace(w, mu=float(config["proximal-mu"]))
    k, server_round = int(config["partition-id"]), int(config["server-round"])
    x, y = _data(w.data).client(k)
    global_params = {name: a.numpy() for name, a in msg.content["arrays"].items()}
    rng = np.random.default_rng([w.seed, server_round, k])
    params, _ = client_update(w, global_params, x, y, rng)
    reply = RecordDict({"arrays": ArrayRecord({name: Array(v) for name, v in params.items()}),
                        "metrics": MetricRecord({"num-examples": len(y)})})
    return Message(reply, reply_to=msg)


# ---- server side -------------------------------------------------------------------------

class CohortFedAvg(FedAvg):
    """FedAvg whose round r trains exactly ``cohorts[r - 1]``; set ``cohorts`` and ``num_nodes``
    after construction (so Flower's ``FedProx.__init__`` can stay above it in the MRO)."""

    cohorts: np.ndarray
    num_nodes: int

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        while len(nodes := sorted(grid.get_node_ids())) < self.num_nodes:  # registered at start-up
            time.sleep(0.01)
        config["server-round"] = server_round
        messages = []
        for k in self.cohorts[server_round - 1]:
            record = RecordDict({self.arrayrecord_key: arrays,
                                 self.configrecord_key: ConfigRecord({**config, "partition-id": int(k)})})
            messages.append(Message(record, dst_node_id=nodes[int(k)], message_type=MessageType.TRAIN))
        return messages


class CohortFedProx(FedProx, CohortFedAvg):
    """Flower's FedProx (adds ``proximal-mu`` to the train config) over the fixed cohorts."""


def main() -> None:
    w, out = common.parse_args(__doc__.splitlines()[0])
    recorder = common.Recorder("flower", w, out)
    if w.algorithm not in ("fedavg", "fedprox"):
        recorder.not_applicable(f"Flower ships no {w.algorithm} strategy", packages=PACKAGES)
        return
    data = common.Data(w.data)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # no per-round INFO lines

    strategy = CohortFedProx(fraction_evaluate=0.0, proximal_mu=w.mu) if w.algorithm == "fedprox" \
        else CohortFedAvg(fraction_evaluate=0.0)
    strategy.cohorts, strategy.num_nodes = data.cohorts, w.num_clients
    result = {}

    def on_round(server_round: int, arrays: ArrayRecord) -> None:  # Flower's centralised-evaluation hook
        if server_round == 0:
            recorder.ready()
        else:
            recorder.round_done(server_round - 1)

    server_app = ServerApp()

    @server_app.main()
    def server_main(grid: Grid, context: Context) -> None:
        initial = ArrayRecord({k: Array(v.astype(np.float32)) for k, v in data.init.items()})
        train_config = ConfigRecord({"workload": json.dumps(dataclasses.asdict(w))})
        result["final"] = strategy.start(grid, initial, num_rounds=w.rounds, train_config=train_config,
                                         evaluate_fn=on_round)

    run_simulation(
        server_app=server_app, client_app=client_app, num_supernodes=w.num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": os.cpu_count(), "include_dashboard": False, "log_to_driver": False,
                          "logging_level": "ERROR", "_node_ip_address": "127.0.0.1"},
        },
    )
    final = result["final"].arrays
    recorder.finish({k: a.numpy() for k, a in final.items()}, packages=PACKAGES)


if __name__ == "__main__":
    # Run as the importable module, so Ray pickles the ClientApp by reference (and each
    # worker keeps its data cache) rather than by value from ``__main__``.
    from benchmarks.peers import flower  # noqa: PLW0406

    flower.main()
