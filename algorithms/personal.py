"""Personalised federated learning: each site ends with a model of its own.

Hospitals differ, so the one global model can serve some of them badly. Every algorithm
answers "which model would site i use?" through ``Algorithm.personalise(message,
client_state, data, key) -> params`` (``personal_model``; ``None`` means the global model).
The simulator scores that model on each site's own test rows; the runtime's site agent
scores the same function's result on its own test split. Four methods:

- **fine-tuning** (FedAvg+FT; ``with_fine_tuning``): any algorithm's personal model,
  trained a few more epochs on the site's own data. A post-training step: nothing of it
  travels, the federation's training is unchanged.
- **Ditto** (Li et al., "Ditto: Fair and Robust Federated Learning Through
  Personalization", ICML 2021): FedAvg for the global model, and at each site a personal
  model ``v_i`` trained on ``F_i(v) + lam/2 ||v - w||^2`` towards the global ``w`` it
  received, kept as client state.
- **Partial sharing**: some layers never leave the site, the rest is averaged.
  ``fedper`` (Arivazhagan et al. 2019: the output layer stays local, trained with the
  body), ``fedrep`` (Collins et al., ICML 2021: the local head trained first with the
  body frozen, then the body with the head frozen) and ``fedbn`` (Li et al., ICLR 2021:
  normalisation layers stay local; needs a model with them, e.g. ``mlp`` with
  ``norm: true``).

A partially shared update still has the full model's shape, its local layers zero, so it
goes through every aggregator, the wire format and secure aggregation unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence

import jax
import optax.tree_utils as otu

from nordfl import registry
from nordfl.algorithms import _checks
from nordfl.algorithms.base import Algorithm, ClientData, ClientOutput, LossFn, Params, PRNGKey
from nordfl.algorithms.config import AlgorithmConfig
from nordfl.algorithms.fedavg import ModelDelta, fedavg
from nordfl.algorithms.fedprox import proximal_objective
from nordfl.algorithms.local import LocalSchedule, client_weight, local_sgd

Personalise = Callable[..., Params]
"""``(message, client_state, data, key) -> params``: the model a site uses."""

PERSONAL_KEY_SALT = 0x7E250
"""Folded into the run's key for the personalisation step, apart from every round's keys."""


def personal_key(seed: int, site_index) -> PRNGKey:
    """The key of site ``site_index``'s personalisation step (fine-tuning's shuffles) in a run
    seeded ``seed``; the simulator and the runtime's site agent derive the same one."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), PERSONAL_KEY_SALT), site_index)


def personal_model(algorithm: Algorithm, message, client_state, data: ClientData, key: PRNGKey) -> Params:
    """The model site ``data``'s owner uses: ``algorithm.personalise``'s, or the broadcast's global params."""
    if algorithm.personalise is None:
        return message.params
    return algorithm.personalise(message, client_state, data, key)


def with_fine_tuning(algorithm: Algorithm, schedule: LocalSchedule, loss_fn: LossFn) -> Algorithm:
    """``algorithm`` whose personal model is fine-tuned on the site's data with ``schedule``
    (plain SGD on the task loss, from the model it would otherwise use)."""
    base = algorithm

    def personalise(message, client_state, data: ClientData, key: PRNGKey) -> Params:
        start = personal_model(base, message, client_state, data, key)
        params, _ = local_sgd(loss_fn, start, data, key, schedule)
        return params

    return algorithm._replace(personalise=personalise)


# ---------------------------------------------------------------------------- Ditto


class PersonalState(NamedTuple):
    """A site's own model (Ditto's ``v_i``; partial sharing's local layers, with the rest stale)."""

    params: Params


def _personal_init(params: Params) -> PersonalState:
    return PersonalState(params)


@dataclass
class DittoConfig(AlgorithmConfig):
    name: str = "ditto"
    lam: float = 0.1  # pull of the personal model towards the global one
    personal_epochs: Optional[int] = None  # epochs on the personal model per round; None: num_epochs


@registry.register("algorithm", "ditto", config=DittoConfig)
def ditto(loss_fn: LossFn, local: LocalSchedule, *, lam: float, personal_epochs: Optional[int] = None,
          name: str = "ditto", **options) -> Algorithm:
    """Builds Ditto: FedAvg's global model plus a personal model per site.

    Each round a site runs FedAvg's local epochs from the global ``w`` (the update it sends)
    and, from its own ``v_i``, ``personal_epochs`` epochs of SGD on
    ``F_i(v) + lam/2 ||v - w||^2`` (kept at the site). ``lam = 0`` is local training alone;
    large ``lam`` pulls ``v_i`` onto the global model.

    Args:
      lam: the proximal coefficient, >= 0 (the paper tunes it over {0.01, 0.1, 1, 2}).
      personal_epochs: epochs on ``v_i`` per round (default: ``local.num_epochs``).
      **options: ``fedavg``'s (``server_optimizer``, ``weighting``).
    """
    _checks.check_nonnegative(name, "lam", lam)
    if personal_epochs is not None:
        _checks.check_positive_int(name, "personal_epochs", personal_epochs)
    _checks.check_keywords(name, fedavg, options, supplied=("loss_fn", "local", "local_objective", "name"))
    personal_schedule = local._replace(num_epochs=personal_epochs or local.num_epochs)
    anchored = proximal_objective(lam)
    base = fedavg(loss_fn, local, name=name, **options)

    def client_update(message, client_state: PersonalState, data: ClientData, key: PRNGKey,
                      num_epochs_to_run: Optional[jax.Array] = None) -> ClientOutput:
        out = base.client_update(message, client_state, data, key, num_epochs_to_run)
        personal, _ = local_sgd(anchored(loss_fn, message.params), client_state.params, data,
                                jax.random.fold_in(key, 1), personal_schedule, num_epochs_to_run)
        return out._replace(client_state=PersonalState(personal))

    def personalise(message, client_state: PersonalState, data: ClientData, key: PRNGKey) -> Params:
        del message, data, key
        return client_state.params

    return base._replace(client_init=_personal_init, client_update=client_update, personalise=personalise)


# ---------------------------------------------------------------------------- partial sharing


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]


def local_mask(params: Params, layers: Sequence[str], owner: str) -> Params:
    """A bool per leaf of ``params``: True for the leaves that stay at the site, those whose
    path has a component matching one of ``layers`` (case-insensitive; ``"norm"`` matches
    ``norms``, ``LayerNorm_0``, ...). Refuses a rule that keeps nothing or everything local."""
    wanted = [layer.lower() for layer in layers]
    paths = [_path_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    flags = [any(w in name.lower() for name in names for w in wanted) for names in paths]
    names = ", ".join("/".join(p) for p in paths)
    if not any(flags):
        raise ValueError(f"{owner}: local_layers {list(layers)} match no parameter of the model; its parameters are {names}")
    if all(flags):
        raise ValueError(f"{owner}: local_layers {list(layers)} match every parameter of the model ({names}), so nothing would "
                         f"be shared; name fewer layers or use a model with more")
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)


def _select(mask: Params, local: Params, shared: Params) -> Params:
    """Leafwise ``local`` where ``mask`` else ``shared`` (``mask`` is static Python bools)."""
    return jax.tree_util.tree_map(lambda m, a, b: a if m else b, mask, local, shared)


def _frozen(loss_fn: LossFn, trainable: Params) -> LossFn:
    """``loss_fn`` whose gradient is zero for the leaves not ``trainable`` (static bools)."""
    def loss(params, batch, mask):
        return loss_fn(jax.tree_util.tree_map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params), batch, mask)
    return loss


def partial_sharing(loss_fn: LossFn, local: LocalSchedule, *, local_layers: Sequence[str], head_epochs: int = 0,
                    name: str = "fedper", **options) -> Algorithm:
    """FedAvg in which the layers named by ``local_layers`` (``local_mask``) never leave the site.

    With ``head_epochs = 0`` a round trains the whole model (the site's own local layers, the
    global shared ones) for ``local.num_epochs`` epochs (FedPer, FedBN). With
    ``head_epochs > 0`` it first trains only the local layers for ``head_epochs`` epochs,
    then only the shared ones for ``local.num_epochs`` (FedRep). The update's local layers
    are zero, and the server's copy of them is never used.

    Args:
      local_layers: path components naming the local layers (``["out"]``, ``["norm"]``).
      head_epochs: FedRep's epochs on the local layers alone; 0 trains everything together.
      **options: ``fedavg``'s (``server_optimizer``, ``weighting``).
    """
    if isinstance(local_layers, str) or not local_layers or not all(isinstance(x, str) for x in local_layers):
        raise ValueError(f"{name}: local_layers must be a non-empty list of layer names, got {local_layers!r}")
    if head_epochs:
        _checks.check_positive_int(name, "head_epochs", head_epochs)
    _checks.check_keywords(name, fedavg, options, supplied=("loss_fn", "local", "local_objective", "name"))
    weighting = options.get("weighting", "num_examples")
    base = fedavg(loss_fn, local, name=name, **options)
    head_schedule = local._replace(num_epochs=head_epochs or 1)

    def client_init(params: Params) -> PersonalState:
        local_mask(params, local_layers, name)  # a rule that matches nothing fails here, before training
        return PersonalState(params)

    def personalise(message, client_state: PersonalState, data: ClientData, key: PRNGKey) -> Params:
        del data, key
        return _select(local_mask(message.params, local_layers, name), client_state.params, message.params)

    def client_update(message, client_state: PersonalState, data: ClientData, key: PRNGKey,
                      num_epochs_to_run: Optional[jax.Array] = None) -> ClientOutput:
        mask = local_mask(message.params, local_layers, name)
        start = _select(mask, client_state.params, message.params)
        objective = loss_fn
        if head_epochs:
            headed, _ = local_sgd(_frozen(loss_fn, mask), start, data, jax.random.fold_in(key, 1), head_schedule, num_epochs_to_run)
            start = _select(mask, headed, start)
            objective = _frozen(loss_fn, jax.tree_util.tree_map(lambda m: not m, mask))
        trained, metrics = local_sgd(objective, start, data, key, local, num_epochs_to_run)
        if head_epochs:  # the head stays as its own epochs left it (DP-SGD noise would move frozen leaves too)
            trained = _select(mask, start, trained)
        delta = _select(mask, otu.tree_zeros_like(trained), otu.tree_sub(trained, message.params))
        weight = client_weight(data.num_examples, metrics.num_steps, weighting)
        return ClientOutput(ModelDelta(delta), weight, PersonalState(trained), metrics)

    return base._replace(client_init=client_init, client_update=client_update, personalise=personalise)


@dataclass
class FedPerConfig(AlgorithmConfig):
    name: str = "fedper"
    local_layers: List[str] = field(default_factory=lambda: ["out"])  # path components of the layers that stay at the site


@dataclass
class FedRepConfig(FedPerConfig):
    name: str = "fedrep"
    head_epochs: int = 1  # epochs on the local head (body frozen) before the body's num_epochs (head frozen)


@dataclass
class FedBNConfig(AlgorithmConfig):
    name: str = "fedbn"
    local_layers: List[str] = field(default_factory=lambda: ["norm"])  # the normalisation layers stay at the site


@registry.register("algorithm", "fedper", config=FedPerConfig)
def fedper(loss_fn: LossFn, local: LocalSchedule, *, local_layers: Sequence[str] = ("out",), name: str = "fedper",
           **options) -> Algorithm:
    """FedPer: the output layer (``local_layers``) stays at the site, trained with the shared body."""
    return partial_sharing(loss_fn, local, local_layers=local_layers, name=name, **options)


@registry.register("algorithm", "fedrep", config=FedRepConfig)
def fedrep(loss_fn: LossFn, local: LocalSchedule, *, local_layers: Sequence[str] = ("out",), head_epochs: int = 1,
           name: str = "fedrep", **options) -> Algorithm:
    """FedRep: the local head trained ``head_epochs`` epochs first, then the shared body with the head frozen."""
    _checks.check_positive_int(name, "head_epochs", head_epochs)
    return partial_sharing(loss_fn, local, local_layers=local_layers, head_epochs=head_epochs, name=name, **options)


@registry.register("algorithm", "fedbn", config=FedBNConfig)
def fedbn(loss_fn: LossFn, local: LocalSchedule, *, local_layers: Sequence[str] = ("norm",), name: str = "fedbn",
          **options) -> Algorithm:
    """FedBN: the normalisation layers' parameters stay at the site (needs a model with some, e.g. ``mlp`` with ``norm``)."""
    return partial_sharing(loss_fn, local, local_layers=local_layers, name=name, **options)
