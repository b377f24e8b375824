"""A task: federated data, a model, and the masked loss and metrics algorithms train on."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import math

import jax
import jax.numpy as jnp

from nordfl.tasks import metrics as M
from nordfl.tasks.data import Examples, FederatedDataset
from nordfl.tasks.heart import heart
from nordfl.tasks.models import MODELS, Model
from nordfl.tasks.synthetic import synthetic

Params = Any


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


def classification_task(name: str, data: FederatedDataset, model: Model) -> Task:
    """Cross-entropy training and loss/accuracy/AUC evaluation for ``model`` on ``data``."""

    def loss_fn(params, batch: Examples, mask):
        return M.softmax_cross_entropy(model.apply(params, batch.x), batch.y, mask)

    def evaluate(params, examples: Examples, mask) -> EvalMetrics:
        logits = model.apply(params, examples.x)
        if data.num_classes == 2:
            auc = M.roc_auc(logits[:, 1] - logits[:, 0], examples.y, mask)
        else:
            auc = jnp.full((), jnp.nan, jnp.float32)
        return EvalMetrics(
            M.softmax_cross_entropy(logits, examples.y, mask), M.accuracy(logits, examples.y, mask), auc
        )

    return Task(name, data, model, loss_fn, evaluate)


DATASETS: dict[str, Callable[..., FederatedDataset]] = {
    "heart": heart,
    "synthetic": synthetic,
    "synthetic_iid": lambda **kw: synthetic(iid=True, **kw),
}


def make_task(name: str, *, model: str = "logistic_regression", model_seed: int = 0, model_kwargs=None, **data_kwargs) -> Task:
    """Builds a task by name (``heart``, ``synthetic``, ``synthetic_iid``) and model name.

    Example:
      >>> task = make_task("synthetic", alpha=1.0, beta=1.0, num_devices=30, seed=0)
    """
    if name not in DATASETS:
        raise ValueError(f"task: unknown name {name!r}; expected one of {', '.join(sorted(DATASETS))}")
    if model not in MODELS:
        raise ValueError(f"task.model: unknown name {model!r}; expected one of {', '.join(sorted(MODELS))}")
    data = DATASETS[name](**data_kwargs)
    shape = data.feature_shape
    if model == "cnn":
        if len(shape) != 3:
            raise ValueError(f"task.model: cnn needs image features [H, W, C]; task {name} has feature shape {shape}")
        built = MODELS[model](shape, data.num_classes, seed=model_seed, **(model_kwargs or {}))
    else:
        built = MODELS[model](math.prod(shape), data.num_classes, seed=model_seed, **(model_kwargs or {}))
    return classification_task(name, data, built)
