"""Models, losses, metrics, datasets and partitioners shared by the simulator and the runtime."""

from nordfl.tasks import partition as partition
from nordfl.tasks.data import ClientSplit as ClientSplit
from nordfl.tasks.data import Examples as Examples
from nordfl.tasks.data import FederatedDataset as FederatedDataset
from nordfl.tasks.data import build_federated as build_federated
from nordfl.tasks.data import stratified_split as stratified_split
from nordfl.tasks.heart import heart as heart
from nordfl.tasks.metrics import accuracy as accuracy
from nordfl.tasks.metrics import mean_absolute_error as mean_absolute_error
from nordfl.tasks.metrics import mean_squared_error as mean_squared_error
from nordfl.tasks.metrics import r_squared as r_squared
from nordfl.tasks.metrics import roc_auc as roc_auc
from nordfl.tasks.metrics import root_mean_squared_error as root_mean_squared_error
from nordfl.tasks.metrics import softmax_cross_entropy as softmax_cross_entropy
from nordfl.tasks.models import Model as Model
from nordfl.tasks.models import cnn as cnn
from nordfl.tasks.models import logistic_regression as logistic_regression
from nordfl.tasks.models import mlp as mlp
from nordfl.tasks.models import split_model as split_model
from nordfl.tasks.synthetic import synthetic as synthetic
from nordfl.tasks.task import EvalMetrics as EvalMetrics
from nordfl.tasks.task import RegressionMetrics as RegressionMetrics
from nordfl.tasks.task import Task as Task
from nordfl.tasks.task import classification_task as classification_task
from nordfl.tasks.task import TaskFns as TaskFns
from nordfl.tasks.task import classification_fns as classification_fns
from nordfl.tasks.task import make_model as make_model
from nordfl.tasks.task import make_task as make_task
from nordfl.tasks.task import metrics_type as metrics_type
from nordfl.tasks.task import regression_fns as regression_fns
from nordfl.tasks.task import regression_task as regression_task
from nordfl.tasks.task import task_fns as task_fns
from nordfl.tasks.task import task_kind as task_kind

__all__ = [
    "ClientSplit", "EvalMetrics", "Examples", "FederatedDataset", "Model", "Task", "accuracy",
    "TaskFns", "build_federated", "classification_fns", "classification_task", "make_model", "cnn", "heart", "logistic_regression", "make_task",
    "mlp", "partition", "roc_auc", "softmax_cross_entropy", "split_model", "stratified_split",
    "synthetic", "RegressionMetrics", "mean_absolute_error", "mean_squared_error", "r_squared", "regression_fns",
    "regression_task", "root_mean_squared_error", "task_fns", "task_kind", "metrics_type",
]
