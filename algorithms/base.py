"""The algorithm interface every NordFL algorithm implements, and the types it speaks.

An algorithm is a bundle of pure functions over pytrees (the optax style). The simulator
calls ``jax.vmap(client_update)`` over a cohort with client state stacked on axis 0; the
runtime calls the same ``client_update`` once per site on that site's own data. Between
``client_update`` and ``server_update`` sits a swappable aggregator (see ``aggregators``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

Params = Any
"""A pytree of model parameters."""
PyTree = Any
ServerState = Any
"""An algorithm's server-side state: a NamedTuple pytree."""
ClientState = Any
"""A site's persistent state (e.g. SCAFFOLD's c_i), kept by the site, never by the server."""
ServerMessage = Any
"""What the coordinator broadcasts to the cohort each round (a NamedTuple pytree)."""
Update = Any
"""What a client sends back, before weighting (a NamedTuple pytree)."""
PRNGKey = jax.Array

LossFn = Callable[[Params, PyTree, jax.Array], jax.Array]
"""``loss_fn(params, batch, mask) -> scalar``: mean loss over the rows where ``mask`` is True.

``batch`` is a pytree of arrays with leading axis B; ``mask`` is bool [B]."""


class ClientData(NamedTuple):
    """A client's local training examples.

    ``examples`` is a pytree of arrays with leading axis ``n`` (e.g. ``Examples(x [n, d], y [n])``);
    only the first ``num_examples`` rows are real, the rest is padding. An unpadded site simply
    has ``num_examples == n``.
    """

    examples: PyTree
    num_examples: jax.Array  # int32 scalar


class EmptyState(NamedTuple):
    """Client state of algorithms that keep none (FedAvg, FedProx)."""


class ClientMetrics(NamedTuple):
    """Per-client training metrics: mean minibatch loss over the local steps taken, and their count."""

    train_loss: jax.Array  # float32 scalar
    num_steps: jax.Array  # int32 scalar


class ClientOutput(NamedTuple):
    """What ``client_update`` returns.

    ``update`` is averaged across the cohort with ``weight`` (0 for a client that trained on
    nothing); ``client_state`` stays at the site.
    """

    update: Update
    weight: jax.Array  # float32 scalar
    client_state: ClientState
    metrics: ClientMetrics


class Aggregate(NamedTuple):
    """The cohort's combined update, as the server sees it.

    ``mean`` has the structure of one client's update; ``total_weight`` is the sum of the
    weights and ``num_clients`` the number of clients with non-zero weight (float32 scalars).
    """

    mean: Update
    total_weight: jax.Array
    num_clients: jax.Array


class ServerMetrics(NamedTuple):
    """Per-round server metrics: L2 norm of the aggregated model delta and how many clients made it."""

    update_norm: jax.Array
    num_clients: jax.Array


class Algorithm(NamedTuple):
    """A federated algorithm as five pure functions.

    Attributes:
      server_init: ``(params) -> server_state``, on the coordinator.
      client_init: ``(params) -> client_state``, once per site.
      broadcast: ``(server_state) -> message`` sent to the cohort.
      client_update: ``(message, client_state, data, key, num_epochs_to_run=None) -> ClientOutput``.
        ``num_epochs_to_run`` (int scalar, optional) asks for partial work: fewer local epochs than
        the algorithm was configured with (a straggler); ``None`` runs all of them.
      server_update: ``(server_state, aggregate) -> (server_state, ServerMetrics)``.
      local: the ``local.LocalSchedule`` its clients train with (epochs, batch size, sampling,
        DP-SGD), which the simulator, the privacy accountant and the runtime read; ``None``
        for an algorithm without local SGD.
      personalise: ``(message, client_state, data, key) -> params``, the model a site uses
        itself (Ditto's personal model, FedPer's local head on the shared body, a fine-tuned
        copy); ``None``: the global model. Read through ``personal.personal_model``.
    """

    server_init: Callable[[Params], ServerState]
    client_init: Callable[[Params], ClientState]
    broadcast: Callable[[ServerState], ServerMessage]
    client_update: Callable[
        [ServerMessage, ClientState, ClientData, PRNGKey, Optional[jax.Array]], ClientOutput
    ]
    server_update: Callable[[ServerState, Aggregate], tuple[ServerState, ServerMetrics]]
    local: Any = None
    personalise: Optional[Callable[..., Params]] = None
