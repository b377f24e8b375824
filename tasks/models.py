"""Flax models, split once into a graph definition and a plain params pytree.

Algorithms see only params (a nested dict of arrays, e.g. ``{"linear": {"kernel", "bias"}}``)
and the pure function ``apply(params, x) -> logits``; the Flax module itself never crosses
into algorithm code, jit or vmap.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from nordfl import registry

Params = Any


class Model(NamedTuple):
    """A model as data: ``apply(params, x [B, ...]) -> logits [B, num_classes]`` and initial params."""

    apply: Callable[[Params, jax.Array], jax.Array]
    init_params: Params
    graphdef: nnx.GraphDef


def split_model(module: nnx.Module) -> Model:
    """Splits an nnx module into ``Model(apply, init_params, graphdef)``."""
    graphdef, template = nnx.split(module, nnx.Param)
    init_params = nnx.to_pure_dict(template)

    def apply(params: Params, x: jax.Array) -> jax.Array:
        state = jax.tree_util.tree_map(lambda leaf: leaf, template)  # a fresh copy to fill in
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(x)

    return Model(apply, init_params, graphdef)


class LogisticRegression(nnx.Module):
    """Multinomial logistic regression: one dense layer to the class logits."""

    def __init__(self, num_features: int, num_classes: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(num_features, num_classes, rngs=rngs)

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
    """Fully connected ReLU network; with ``norm``, a LayerNorm after each hidden layer (before the
    ReLU). LayerNorm, not BatchNorm: it keeps no running statistics, so the model stays a pure
    function of its params (FedBN keeps these ``norms`` at each site)."""

    def __init__(self, num_features: int, hidden: Sequence[int], num_classes: int, *, norm: bool = False, rngs: nnx.Rngs):
        sizes = [num_features, *hidden]
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.norms = nnx.List([nnx.LayerNorm(b, rngs=rngs) for b in hidden]) if norm else None
        self.out = nnx.Linear(sizes[-1], num_classes, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, layer in enumerate(self.hidden):
            x = layer(x)
            x = jax.nn.relu(x if self.norms is None else self.norms[i](x))
        return self.out(x)


class CNN(nnx.Module):
    """Small CNN for [H, W, C] images: two 3x3 conv + 2x2 max-pool blocks, a dense layer, logits."""

    def __init__(self, image_shape: Sequence[int], num_classes: int, *, channels=(16, 32), dense: int = 64, rngs: nnx.Rngs):
        height, width, in_channels = image_shape
        self.conv1 = nnx.Conv(in_channels, channels[0], (3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(channels[0], channels[1], (3, 3), rngs=rngs)
        flat = (height // 4) * (width // 4) * channels[1]
        self.dense = nnx.Linear(flat, dense, rngs=rngs)
        self.out = nnx.Linear(dense, num_classes, rngs=rngs)

    def __call__(self, x):
        pool = lambda h: nnx.max_pool(h, (2, 2), strides=(2, 2))
        x = pool(jax.nn.relu(self.conv1(x)))
        x = pool(jax.nn.relu(self.conv2(x)))
        x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        return self.out(x)


@registry.register("model", "logistic_regression", input="flat")
def logistic_regression(num_features: int, num_classes: int, seed: int = 0) -> Model:
    return split_model(LogisticRegression(num_features, num_classes, rngs=nnx.Rngs(seed)))


@registry.register("model", "mlp", input="flat")
def mlp(num_features: int, num_classes: int, hidden: Sequence[int] = (64, 64), norm: bool = False, seed: int = 0) -> Model:
    return split_model(MLP(num_features, tuple(hidden), num_classes, norm=bool(norm), rngs=nnx.Rngs(seed)))


@registry.register("model", "cnn", input="image")
def cnn(image_shape: Sequence[int], num_classes: int, seed: int = 0) -> Model:
    return split_model(CNN(tuple(image_shape), num_classes, rngs=nnx.Rngs(seed)))


def num_params(params: Params) -> int:
    """Total number of scalars in a params pytree."""
    return int(sum(jnp.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))
