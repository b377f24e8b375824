"""Checkpoints of a simulator run: every array of the ``SimState`` in one ``.npz`` file,
replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.

The round plan is a function of (seed, round) and every random key derives from the seed,
so the state's arrays and its round number are all a resumed run needs to continue
exactly as an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from nordfl.sim.engine import SimState

FILENAME = "checkpoint.npz"


class CheckpointMismatch(ValueError):
    """The checkpoint on disk cannot continue this run (another configuration or model shape)."""


def _leaves(state: SimState) -> list:
    return jax.tree_util.tree_leaves((state.server, state.clients))


def save(directory: Path, state: SimState, fingerprint: str) -> Path:
    """Writes ``state`` to ``directory/checkpoint.npz`` (atomically: a temporary file, then a rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"round": state.round, "fingerprint": fingerprint, "num_leaves": len(_leaves(state))}
    arrays = {f"leaf_{i:05d}": np.asarray(leaf) for i, leaf in enumerate(_leaves(state))}
    target = directory / FILENAME
    temporary = directory / (FILENAME + ".tmp")
    with open(temporary, "wb") as f:
        np.savez(f, __meta__=np.asarray(json.dumps(meta)), **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, target)
    return target


def load(directory: Path, template: SimState, fingerprint: str) -> Optional[SimState]:
    """Reads the checkpoint in ``directory`` into the structure of ``template``; None if there is none.

    Raises:
      CheckpointMismatch: the checkpoint belongs to another configuration or another model shape.
    """
    path = Path(directory) / FILENAME
    if not path.exists():
        return None
    with np.load(path) as archive:
        meta = json.loads(str(archive["__meta__"]))
        if meta["fingerprint"] != fingerprint:
            raise CheckpointMismatch(
                f"resume: {path} was written by a different configuration (fingerprint {meta['fingerprint']}, "
                f"this run {fingerprint}); resume in a fresh folder or with the original overrides"
            )
        leaves = [archive[f"leaf_{i:05d}"] for i in range(meta["num_leaves"])]
    reference = _leaves(template)
    for i, (got, want) in enumerate(zip(leaves, reference)):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise CheckpointMismatch(f"resume: {path} array {i} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}")
    if len(leaves) != len(reference):
        raise CheckpointMismatch(f"resume: {path} holds {len(leaves)} arrays, expected {len(reference)}")
    treedef = jax.tree_util.tree_structure((template.server, template.clients))
    placed = [jax.device_put(leaf, ref.sharding) for leaf, ref in zip(leaves, reference)]
    server, clients = jax.tree_util.tree_unflatten(treedef, placed)
    return SimState(server, clients, int(meta["round"]))
