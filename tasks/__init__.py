"""Models, losses, metrics, datasets and partitioners shared by the simulator and the runtime."""

from nordfl.tasks import partition as partition
from nordfl.tasks.data import ClientSplit as ClientSplit
from nordfl.tasks.data import Examples as Examples
from nordfl.tasks.data import FederatedDataset as FederatedDataset
from nordfl.tasks.data import build_federated as build_federated
from nordfl.tasks.data import stratified_split as stratified_split
from nordfl.tasks.heart import heart as heart
from nordfl.tasks.metrics import accuracy as accuracy
from nordfl.tasks.metrics import roc_auc as roc_auc
from nordfl.tasks.metrics import softmax_cross_entropy as softmax_cross_entropy
from nordfl.tasks.models import Model as Model
from nordfl.tasks.models import cnn as cnn
from nordfl.tasks.models import logistic_regression as logistic_regression
from nordfl.tasks.models import mlp as mlp
from nordfl.tasks.models import split_model as split_model
from nordfl.tasks.synthetic import synthetic as synthetic
from nordfl.tasks.task import EvalMetrics as EvalMetrics
from nordfl.tasks.task import Task as Task
from nordfl.tasks.task import classification_task as classification_task
from nordfl.tasks.task import TaskFns as TaskFns
from nordfl.tasks.task import classification_fns as classification_fns
from nordfl.tasks.task import make_model as make_model
from nordfl.tasks.task import make_task as make_task

__all__ = [
    "ClientSplit", "EvalMetrics", "Examples", "FederatedDataset", "Model", "Task", "accuracy",
    "TaskFns", "build_federated", "classification_fns", "classification_task", "make_model", "cnn", "heart", "logistic_regression", "make_task",
    "mlp", "partition", "roc_auc", "softmax_cross_entropy", "split_model", "stratified_split",
    "synthetic",
]
