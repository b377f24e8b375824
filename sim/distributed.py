"""One simulator run over several processes (and hosts) with JAX's own distributed runtime.

Every process runs the same program; ``jax.distributed`` joins them, and the simulator's mesh
then spans every process's devices, so a round's cohort is sharded over all of them and
the aggregate is reduced across processes inside the one compiled round (XLA's collectives:
gloo between CPU processes, NCCL/RCCL between GPUs). Server and client states stay
replicated, so each process holds the whole state and any one of them can write it: process
0 writes the metrics, the summary and the checkpoints, once. A checkpoint holds plain
arrays, so a run resumes on another process count.

A process learns that it is part of a multi-process run from its environment:

* the local launcher (``python -m nordfl.sim.launch -n 2 -- nordfl-sim ...``) sets
  ``NORDFL_COORDINATOR`` (host:port of process 0), ``NORDFL_NUM_PROCESSES`` and
  ``NORDFL_PROCESS_ID``;
* under SLURM, ``srun`` with more than one task (``SLURM_NTASKS`` > 1): JAX reads the
  coordinator, count and rank from SLURM's own variables.

Without either, nothing happens and the run is the usual single process.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import jax

COORDINATOR, NUM_PROCESSES, PROCESS_ID = "NORDFL_COORDINATOR", "NORDFL_NUM_PROCESSES", "NORDFL_PROCESS_ID"


class LaunchError(ValueError):
    """The environment's multi-process variables are incomplete or not numbers."""


class Processes(NamedTuple):
    """Where this process stands in its run: its index and the number of processes."""

    index: int
    count: int

    @property
    def writes(self) -> bool:
        """Whether this process writes the run's files (process 0 does, once for all)."""
        return self.index == 0


def _integer(name: str, low: int, high: Optional[int] = None) -> int:
    value = os.environ.get(name, "").strip()
    if not value.isdigit() or int(value) < low or (high is not None and int(value) > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise LaunchError(f"{name}: must be an integer {bound}, got {value!r}")
    return int(value)


def requested() -> Optional[dict]:
    """The ``jax.distributed.initialize`` arguments this environment asks for, or None for a single process.

    Raises:
      LaunchError: the launcher's variables are incomplete or not numbers (naming the variable).
    """
    named = [name for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if os.environ.get(name)]
    if named:
        missing = sorted({COORDINATOR, NUM_PROCESSES, PROCESS_ID} - set(named))
        if missing:
            raise LaunchError(f"{', '.join(missing)}: must be set together with {', '.join(named)} for a multi-process run")
        count = _integer(NUM_PROCESSES, 1)
        return {"coordinator_address": os.environ[COORDINATOR].strip(), "num_processes": count,
                "process_id": _integer(PROCESS_ID, 0, count - 1)}
    if os.environ.get("SLURM_JOB_ID") and os.environ.get("SLURM_NTASKS", "1").strip() not in ("", "1"):
        return {}  # JAX's SLURM detection fills in the coordinator, the count and the rank
    return None


def initialize() -> Processes:
    """Joins this process to its run when the environment names one (see the module docstring).

    Must run before any JAX computation. On the CPU backend the processes exchange data with gloo.
    """
    arguments = requested()
    if arguments is None:
        return Processes(0, 1)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)
    return Processes(jax.process_index(), jax.process_count())
