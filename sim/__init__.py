"""The vectorised simulator: thousands of clients per round in one compiled XLA program."""

from nordfl.sim.cohort import RoundPlan as RoundPlan
from nordfl.sim.cohort import plan_round as plan_round
from nordfl.sim.engine import Evaluation as Evaluation
from nordfl.sim.engine import RoundMetrics as RoundMetrics
from nordfl.sim.engine import Simulator as Simulator
from nordfl.sim.engine import SimulatorOptions as SimulatorOptions
from nordfl.sim.engine import SimState as SimState
from nordfl.sim.packing import pack_clients as pack_clients

__all__ = ["Evaluation", "RoundMetrics", "RoundPlan", "SimState", "Simulator", "SimulatorOptions", "pack_clients", "plan_round"]
