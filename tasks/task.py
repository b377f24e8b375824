"""A task: federated data, a model, and the masked loss and metrics algorithms train on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import inspect
import math

import jax
import jax.numpy as jnp

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


class Task(NamedTuple):
    """A classification problem as plain data and pure functions.

    ``loss_fn(params, batch: Examples, mask) -> scalar`` is what algorithms minimise;
    ``evaluate(params, examples, mask) -> EvalMetrics`` is jittable and honours the mask.
    """

    name: str
    data: FederatedDataset
    model: Model
    loss_fn: Callable[[Params, Examples, jax.Array], jax.Array]
    evaluate: Callable[[Params, Examples, jax.Array], EvalMetrics]


class TaskFns(NamedTuple):
    """A model's training loss and evaluation, without any data: all a site or coordinator needs."""

    loss_fn: Callable[[Params, Examples, jax.Array], jax.Array]
    evaluate: Callable[[Params, Examples, jax.Array], EvalMetrics]


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


def classification_task(name: str, data: FederatedDataset, model: Model) -> Task:
    """Cross-entropy training and loss/accuracy/AUC evaluation for ``model`` on ``data``."""
    fns = classification_fns(model, data.num_classes)
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
    built = make_model(name, model, seed=model_seed, model_kwargs=model_kwargs,
                       task_options={k: v for k, v in data_kwargs.items() if k != "seed"})
    return classification_task(name, builder(**data_kwargs), built)
