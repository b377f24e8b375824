"""The vectorised simulator: thousands of clients per round in one compiled XLA program.

Importing it asks JAX for one CPU device per core (``devices.use_cpu_cores``), so the client
axis runs on every core from the Python API too (W1 on 2 cores: 37.9 -> 33.3 ms a round,
``benchmarks/default_devices.py``). It
does nothing once JAX has started, or when ``XLA_FLAGS`` sets a host device count; set
``NORDFL_CPU_DEVICES`` to choose the count (``1`` keeps JAX's default of one device).
"""

from nordfl.sim.devices import cpu_devices_from_env as _cpu_devices_from_env
from nordfl.sim.devices import use_cpu_cores as _use_cpu_cores

_use_cpu_cores(_cpu_devices_from_env())

from nordfl.sim.cohort import RoundPlan as RoundPlan
from nordfl.sim.cohort import plan_round as plan_round
from nordfl.sim.engine import Evaluation as Evaluation
from nordfl.sim.engine import RoundMetrics as RoundMetrics
from nordfl.sim.engine import Simulator as Simulator
from nordfl.sim.engine import SimulatorOptions as SimulatorOptions
from nordfl.sim.engine import SimState as SimState
from nordfl.sim.packing import pack_clients as pack_clients

__all__ = ["Evaluation", "RoundMetrics", "RoundPlan", "SimState", "Simulator", "SimulatorOptions", "pack_clients", "plan_round"]
