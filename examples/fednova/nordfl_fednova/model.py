"""A residual MLP: a custom Flax NNX model registered for any task with flat features."""

from flax import nnx

from nordfl import registry
from nordfl.tasks.models import split_model


class ResidualMLP(nnx.Module):
    """x -> dense(width) -> [LayerNorm -> ReLU -> dense(width)] + skip -> dense(classes)."""

    def __init__(self, num_features: int, num_classes: int, width: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(num_features, width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.block = nnx.Linear(width, width, rngs=rngs)
        self.out = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x.reshape(x.shape[0], -1))
        h = h + self.block(nnx.relu(self.norm(h)))
        return self.out(h)


@registry.register("model", "residual_mlp", input="flat")
def residual_mlp(num_features: int, num_classes: int, width: int = 16, seed: int = 0):
    """``task.model=residual_mlp``; ``task.model_options.width`` sets the hidden width."""
    return split_model(ResidualMLP(num_features, num_classes, int(width), rngs=nnx.Rngs(seed)))
