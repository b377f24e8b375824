"""A task: federated data, a model, and the masked loss and metrics algorithms train on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from nordfl.tasks import metrics as M
from nordfl.tasks.data import Examples, FederatedDataset
from nordfl import registry
from nordfl.tasks.models import Model

Params = Any


@dataclass
class TaskConfig:
    """The keys every task option has; a task with data options of its own subclasses it
    (``SyntheticConfig`` adds ``alpha``, ``beta``, ``num_devices``) and registers the subclass."""

    name: str = "heart"
    model: str = "logistic_regression"
    model_options: dict[str, Any] = field(default_factory=dict)  # the model's own arguments, e.g. {hidden: [32]} for mlp
    data_seed: int = 0  # seeds the task's split (and the partitioner)


TASK_KEYS = ("name", "model", "model_options", "data_seed")
"""``TaskConfig``'s keys, read by ``make_task`` itself; an option's other keys go to its builder."""


class EvalMetrics(NamedTuple):
    """Loss, accuracy and (binary tasks only, else NaN) ROC AUC over the masked rows."""

    loss: jax.Array
    accuracy: jax.Array
    auc: jax.Array


class RegressionMetrics(NamedTuple):
    """Mean squared error (the training loss), its root, mean absolute error and R² over the masked rows."""

    loss: jax.Array
    rmse: jax.Array
    mae: jax.Array
    r2: jax.Array


TASK_KINDS = ("classification", "regression")
"""What a registered task may declare as its ``kind`` (``task_kind``)."""


class Task(NamedTuple):
    """A classification or regression problem as plain data and pure functions.

    ``loss_fn(params, batch: Examples, mask) -> scalar`` is what algorithms minimise;
    ``evaluate(params, examples, mask) -> EvalMetrics`` (``RegressionMetrics`` for a regression
    task) is jittable and honours the mask.
    """

    name: str
    data: FederatedDataset
    model: Model
    loss_fn: Callable[[Params, Examples, jax.Array], jax.Array]
    evaluate: Callable[[Params, Examples, jax.Array], EvalMetrics]


class TaskFns(NamedTuple):
    """A model's training loss and evaluation, without any data: all a site or coordinator needs."""

    loss_fn: Callable[[Params, Examples, jax.Array], jax.Array]
    evaluate: Callable[[Params, Examples, jax.Array], EvalMetrics]  # or RegressionMetrics


def classification_fns(model: Model, num_classes: int) -> TaskFns:
    """Cross-entropy training and loss/accuracy/AUC (binary only) evaluation for ``model``."""

    def loss_fn(params, batch: Examples, mask):
        return M.softmax_cross_entropy(model.apply(params, batch.x), batch.y, mask)

    def evaluate(params, examples: Examples, mask) -> EvalMetrics:
        logits = model.apply(params, examples.x)
        if num_classes == 2:
            auc = M.roc_auc(logits[:, 1] - logits[:, 0], examples.y, mask)
        else:
            auc = jnp.full((), jnp.nan, jnp.float32)
        return EvalMetrics(
            M.softmax_cross_entropy(logits, examples.y, mask), M.accuracy(logits, examples.y, mask), auc
        )

    return TaskFns(loss_fn, evaluate)


def regression_fns(model: Model) -> TaskFns:
    """Mean-squared-error training and MSE/RMSE/MAE/R² evaluation for a ``model`` with one output.

    The prediction is ``model.apply(params, x)[:, 0]``, in the unit of ``Examples.y`` (float32).

    Example:
      >>> fns = regression_fns(logistic_regression(5, 1))  # one dense layer: linear regression
      >>> fns.evaluate(params, Examples(x, y), mask).rmse
    """

    def predict(params, x):
        return model.apply(params, x)[:, 0]

    def loss_fn(params, batch: Examples, mask):
        return M.mean_squared_error(predict(params, batch.x), batch.y, mask)

    def evaluate(params, examples: Examples, mask) -> RegressionMetrics:
        predictions = predict(params, examples.x)
        mse = M.mean_squared_error(predictions, examples.y, mask)
        return RegressionMetrics(mse, jnp.sqrt(mse), M.mean_absolute_error(predictions, examples.y, mask),
                                 M.r_squared(predictions, examples.y, mask))

    return TaskFns(loss_fn, evaluate)


def task_fns(model: Model, kind: str, num_outputs: int) -> TaskFns:
    """The loss and evaluation of a task of ``kind`` (``task_kind``) for ``model`` with ``num_outputs`` outputs:
    ``classification_fns`` (one output per class) or ``regression_fns`` (one output)."""
    if kind == "classification":
        return classification_fns(model, num_outputs)
    if kind == "regression":
        if num_outputs != 1:
            raise ValueError(f"task kind regression: the model needs 1 output (the prediction), got num_outputs={num_outputs}")
        return regression_fns(model)
    raise ValueError(f"task kind: expected one of {', '.join(TASK_KINDS)}, got {kind!r}")


def classification_task(name: str, data: FederatedDataset, model: Model) -> Task:
    """Cross-entropy training and loss/accuracy/AUC evaluation for ``model`` on ``data``."""
    fns = classification_fns(model, data.num_classes)
    return Task(name, data, model, fns.loss_fn, fns.evaluate)


def metrics_type(task: Task) -> type:
    """The NamedTuple ``task.evaluate`` returns (``EvalMetrics``, ``RegressionMetrics``, a plugin's own),
    found by tracing it on the pooled test rows' shapes, without running it."""
    test = task.data.pooled_test()
    # One row of the right shapes and dtypes: a task may have no test rows (e.g. a benchmark's), and a
    # reshape of zero rows to (0, -1) cannot be traced.
    row = Examples(np.zeros((1, *test.x.shape[1:]), test.x.dtype), np.zeros(1, test.y.dtype))
    return type(jax.eval_shape(task.evaluate, task.model.init_params, row, np.ones(1, bool)))


def regression_task(name: str, data: FederatedDataset, model: Model) -> Task:
    """Mean-squared-error training and MSE/RMSE/MAE/R² evaluation for ``model`` (one output) on ``data`` (float32 ``y``)."""
    fns = task_fns(model, "regression", data.num_classes)
    return Task(name, data, model, fns.loss_fn, fns.evaluate)


def task_shape(name: str, options=None) -> tuple[tuple[int, ...], int]:
    """A registered task's feature shape and number of classes, known without loading its data.

    A task whose shape depends on its options (a study: its file's variables) declares
    ``shape=callable(**options) -> (feature_shape, num_classes)`` instead of fixed numbers."""
    properties = registry.lookup("task", name, field="task").properties
    if "shape" in properties:
        shape, num_classes = properties["shape"](**(options or {}))
        return tuple(shape), int(num_classes)
    return tuple(properties["feature_shape"]), int(properties["num_classes"])


def task_kind(name: str, options=None) -> str:
    """A registered task's kind, ``"classification"`` or ``"regression"``, known without loading its data.

    A task declares ``kind="regression"`` when it registers (none: classification), or
    ``kind=callable(**options) -> str`` when its options decide (a study: its file's ``task``).
    A regression task's ``num_classes`` is its model's number of outputs, 1."""
    properties = registry.lookup("task", name, field="task").properties
    kind = properties.get("kind", "classification")
    if callable(kind):
        kind = kind(**(options or {}))
    if kind not in TASK_KINDS:
        raise ValueError(f"task {name}: kind must be one of {', '.join(TASK_KINDS)}, got {kind!r}")
    return kind


def make_model(task_name: str, model: str = "logistic_regression", *, seed: int = 0, model_kwargs=None, task_options=None) -> Model:
    """The named model sized for the named task (no data is read); ``task_options`` for a task whose shape depends on them."""
    shape, num_classes = task_shape(task_name, task_options)
    entry = registry.lookup("model", model, field="task.model")
    sized = tuple(inspect.signature(entry.builder).parameters)[:2]  # (num_features or image_shape, num_classes)
    registry.check_keywords(f"task.model_options ({model})", entry.builder, model_kwargs or {}, supplied=(*sized, "seed"))
    # A model declares what it reads: "image" models get the [H, W, C] shape, "flat" ones
    # the number of features.
    if entry.properties.get("input") == "image":
        if len(shape) != 3:
            raise ValueError(f"task.model: {model} needs image features [H, W, C]; task {task_name} has feature shape {shape}")
        return entry.builder(shape, num_classes, seed=seed, **(model_kwargs or {}))
    return entry.builder(math.prod(shape), num_classes, seed=seed, **(model_kwargs or {}))


def make_task(name: str, *, model: str = "logistic_regression", model_seed: int = 0, model_kwargs=None, **data_kwargs) -> Task:
    """Builds a registered task (``heart``, ``synthetic``, ``synthetic_iid``, ``digits``, a plugin's) and model by name.

    Example:
      >>> task = make_task("synthetic", alpha=1.0, beta=1.0, num_devices=30, seed=0)
    """
    builder = registry.lookup("task", name, field="task.name").builder
    registry.check_keywords(f"task ({name})", builder, data_kwargs)
    options = {k: v for k, v in data_kwargs.items() if k != "seed"}
    built = make_model(name, model, seed=model_seed, model_kwargs=model_kwargs, task_options=options)
    data = builder(**data_kwargs)
    fns = task_fns(built, task_kind(name, options), data.num_classes)
    return Task(name, data, built, fns.loss_fn, fns.evaluate)
