"""Federated algorithms as pure JAX functions: one ``Algorithm`` serves simulator and runtime."""

from nordfl.algorithms import accounting as accounting
from nordfl.algorithms import dp as dp
from nordfl.algorithms.aggregators import Aggregator as Aggregator
from nordfl.algorithms.aggregators import aggregator as aggregator
from nordfl.algorithms.aggregators import coordinate_median as coordinate_median
from nordfl.algorithms.aggregators import trimmed_mean as trimmed_mean
from nordfl.algorithms.aggregators import weighted_mean as weighted_mean
from nordfl.algorithms.base import Aggregate as Aggregate
from nordfl.algorithms.base import Algorithm as Algorithm
from nordfl.algorithms.base import ClientData as ClientData
from nordfl.algorithms.base import ClientMetrics as ClientMetrics
from nordfl.algorithms.base import ClientOutput as ClientOutput
from nordfl.algorithms.base import EmptyState as EmptyState
from nordfl.algorithms.base import LossFn as LossFn
from nordfl.algorithms.base import Params as Params
from nordfl.algorithms.base import ServerMetrics as ServerMetrics
from nordfl.algorithms.dp import DPSGD as DPSGD
from nordfl.algorithms.dp import UpdateDP as UpdateDP
from nordfl.algorithms.dp import with_update_dp as with_update_dp
from nordfl.algorithms.fedavg import ModelDelta as ModelDelta
from nordfl.algorithms.fedavg import ModelMessage as ModelMessage
from nordfl.algorithms.fedavg import ServerState as ServerState
from nordfl.algorithms.fedavg import fedavg as fedavg
from nordfl.algorithms.fedprox import fedprox as fedprox
from nordfl.algorithms.local import epoch_orders as epoch_orders
from nordfl.algorithms.local import shuffle_order as shuffle_order
from nordfl.algorithms.local import LocalSchedule as LocalSchedule
from nordfl.algorithms.local import local_schedule as local_schedule
from nordfl.algorithms.local import local_sgd as local_sgd
from nordfl.algorithms.local import steps_per_epoch as steps_per_epoch
from nordfl.algorithms.make import algorithm_names as algorithm_names
from nordfl.algorithms.make import make_algorithm as make_algorithm
from nordfl.algorithms.scaffold import ScaffoldClientState as ScaffoldClientState
from nordfl.algorithms.scaffold import ScaffoldMessage as ScaffoldMessage
from nordfl.algorithms.scaffold import ScaffoldServerState as ScaffoldServerState
from nordfl.algorithms.scaffold import ScaffoldUpdate as ScaffoldUpdate
from nordfl.algorithms.scaffold import scaffold as scaffold
from nordfl.algorithms.server_optimizers import fedadagrad as fedadagrad
from nordfl.algorithms.server_optimizers import fedadam as fedadam
from nordfl.algorithms.server_optimizers import fedavg_server as fedavg_server
from nordfl.algorithms.server_optimizers import fedavgm as fedavgm
from nordfl.algorithms.server_optimizers import fedyogi as fedyogi
from nordfl.algorithms.server_optimizers import server_optimizer as server_optimizer

__all__ = [
    "Aggregate", "Aggregator", "Algorithm", "ClientData",
    "ClientMetrics", "ClientOutput", "DPSGD", "EmptyState", "LocalSchedule", "UpdateDP", "accounting", "dp", "with_update_dp", "LossFn", "ModelDelta", "ModelMessage",
    "Params", "ScaffoldClientState", "ScaffoldMessage", "ScaffoldServerState",
    "ScaffoldUpdate", "ServerMetrics", "ServerState", "aggregator", "algorithm_names", "coordinate_median",
    "epoch_orders", "fedadagrad", "fedadam", "fedavg", "fedavg_server", "fedavgm",
    "fedprox", "fedyogi", "local_schedule", "local_sgd", "make_algorithm", "scaffold", "server_optimizer", "shuffle_order",
    "steps_per_epoch", "trimmed_mean", "weighted_mean",
]
