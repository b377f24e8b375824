"""``nordfl-bench mode=tune`` with each algorithm's grid as one program (``tune_grid=true``, the default) against
its cells one by one (``tune_grid=false``, one SeedBatch program per grid point): the heart suite's tuning for
FedAvg (5 client learning rates) and FedProx (5 learning rates × 4 mu), 2 seeds, its full 50 rounds. Same
process, side by side; wall time includes compilation and evaluation, as a tuning run pays them.

    python -m benchmarks.tune_suite     # writes benchmarks/results/tune_suite.{md,json}
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_module

from nordfl.sim.suite import choose_hyperparameters, run_suite

RESULTS = Path(__file__).parent / "results"
ONLY = "only=[fedavg,fedprox]"


def _bench(tune_grid: bool):
    with initialize_config_module("nordfl.conf", version_base=None):
        return compose("bench", overrides=["logger.progress=false", "suite=heart", "mode=tune", ONLY, f"tune_grid={tune_grid}"])


def _timed_run(tune_grid: bool, folder: Path) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = run_suite(_bench(tune_grid), folder)
    return time.perf_counter() - start, manifest


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cells_s, manifest = _timed_run(False, Path(tmp) / "cells")
        grid_s, _ = _timed_run(True, Path(tmp) / "grid")
        same = choose_hyperparameters(Path(tmp) / "cells") == choose_hyperparameters(Path(tmp) / "grid")
    runs = len(manifest["cells"]) * len(manifest["seeds"])
    result = {"cells": len(manifest["cells"]), "seeds": manifest["seeds"], "runs": runs, "cells_one_by_one_s": cells_s,
              "grid_programs_s": grid_s, "speed_up": cells_s / grid_s, "same_choice": same, "machine": manifest["machine"]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tune_suite.json").write_text(json.dumps(result, indent=2))
    lines = ["| tuning | cells × seeds | cells one by one (tune_grid=false) | each algorithm's grid as one program | "
             "speed-up | same choice |", "|---|---:|---:|---:|---:|---|",
             f"| heart, FedAvg (5 lr) + FedProx (5 lr × 4 mu), 50 rounds | {result['cells']} × {len(result['seeds'])} | "
             f"{cells_s:.1f} s | {grid_s:.1f} s | {cells_s / grid_s:.1f}× | {'yes' if same else 'NO'} |"]
    (RESULTS / "tune_suite.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
