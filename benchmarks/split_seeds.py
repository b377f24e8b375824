"""Five seeds, each on its own data split (a suite's ``vary_split``): one ``SeedBatch`` program with the
seeds' splits back to back against one program per seed (each compiling its own round, what vary_split
ran before the splits shared a program). The tasks, algorithm and options are the suite cell's own
(``build_group``); the padded work of each is ``split_lanes``' estimate.

Wall time includes compilation and the evaluations a suite makes: that is what a suite run pays. Same
process, side by side.

    python -m benchmarks.split_seeds     # writes benchmarks/results/split_seeds.{md,json}
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from hydra import compose, initialize_config_module

from benchmarks.grid import _timed
from nordfl.sim.seeds import SeedBatch, padded_work, split_lanes
from nordfl.conf.schema import initial_params
from nordfl.sim.suite import build_group, prepare

RESULTS = Path(__file__).parent / "results"
WORKLOADS = {  # (suite, setting, algorithm, the option each seed sets): every seed of one cell, a data split per seed
    "heart, FedAvg (4 hospitals, test rows drawn per seed; 50 rounds)": ("heart", "split=natural", "fedavg", "true"),
    "label_skew, FedAvg (digits, Dirichlet(0.5) over 10 clients drawn per seed; 50 rounds)":
        ("label_skew", "partition=dirichlet_0.5,clients=10", "fedavg", "true"),
    "synthetic, FedAvg (Synthetic(1,1), test rows drawn per seed; 40 rounds)":
        ("synthetic", "data=(1,1),stragglers=0", "fedavg", "task.split_seed"),
}


def _cell(suite: str, setting: str, algorithm: str, split: str):
    with initialize_config_module("nordfl.conf", version_base=None):
        bench = compose("bench", overrides=["logger.progress=false", f"suite={suite}", f"settings=['{setting}']",
                                            f"only=[{algorithm}]", f"++suite.vary_split={split}"])
    run = prepare(bench)
    cfg, tasks, experiment = build_group(run.cells[0], run, {})
    return run.seeds, cfg, tasks, experiment


def _train(batch, inits, rounds: int, eval_every: int):
    state = batch.init(inits)
    for r in range(1, rounds + 1):
        state, _ = batch.run_round(state)
        if r % eval_every == 0 or r == rounds:
            batch.evaluate(state.server.params)
    return state.server.params


def measure(workload) -> dict:
    seeds, cfg, tasks, experiment = _cell(*workload)
    algorithm, options = experiment.algorithm, experiment.options
    inits = [initial_params(cfg, s) for s in seeds]
    rounds, every = cfg.sim.rounds, cfg.sim.eval_every

    def batch(lane_tasks, lane_seeds):
        return SeedBatch(algorithm, lane_tasks, options, lane_seeds, aggregate=experiment.aggregate)

    shared_s, shared = _timed(lambda: _train(batch(tasks, seeds), inits, rounds, every))
    apart_s, apart = _timed(lambda: [_train(batch([t], (s,)), [p], rounds, every) for t, s, p in zip(tasks, seeds, inits)])
    largest = max(float(np.max(np.abs(np.asarray(a[i]) - np.asarray(b[0]))))
                  for i, alone in enumerate(apart) for a, b in zip(jax.tree_util.tree_leaves(shared), jax.tree_util.tree_leaves(alone)))
    together, alone = padded_work(tasks, options, algorithm.local)
    return {"seeds": len(seeds), "rounds": rounds, "shared_s": shared_s, "apart_s": apart_s, "max_param_difference": largest,
            "padded_steps_shared": together, "padded_steps_apart": alone,
            "split_lanes_shares": len(split_lanes(tasks, options, algorithm.local)) == 1}


def main() -> None:
    results = {name: measure(workload) for name, workload in WORKLOADS.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "split_seeds.json").write_text(json.dumps(results, indent=2))
    lines = ["| workload | one program per seed | one program, splits side by side | speed-up | padded local steps a round "
             "(shared / apart) | split_lanes shares | largest parameter difference |",
             "|---|---:|---:|---:|---:|---|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['apart_s']:.1f} s | {r['shared_s']:.1f} s | {r['apart_s'] / r['shared_s']:.1f}× | "
                     f"{r['padded_steps_shared']} / {r['padded_steps_apart']} | {'yes' if r['split_lanes_shares'] else 'no'} | "
                     f"{r['max_param_difference']:.1e} |")
    (RESULTS / "split_seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
