"""A pytree and a little metadata in one ``.npz`` file, replaced atomically.

The coordinator keeps its server state this way (after every completed round), and a site
its own client state (e.g. SCAFFOLD's c_i), which never leaves the site. The arrays go in
the wire format (named raw tensors), so loading checks them against the expected template.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from nordfl.runtime import wire


def _replace_atomically(path: Path, write) -> None:
    """Calls ``write(file)`` on a temporary file of its own, fsyncs it and renames it over ``path``: a reader sees
    the old file or the new one, and concurrent writers never share a temporary file."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_tree(path: Path, tree: Any, **meta) -> None:
    """Writes ``tree`` and ``meta`` (JSON-serialisable) to ``path`` atomically."""
    specs, payload = wire.encode(tree)
    header = json.dumps({"meta": meta, "specs": [[s.name, s.dtype, list(s.shape)] for s in specs]})
    _replace_atomically(path, lambda f: np.savez(f, header=np.asarray(header), payload=np.frombuffer(payload, np.uint8)))


def atomic_write_text(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` atomically."""
    _replace_atomically(path, lambda f: f.write(text.encode("utf-8")))


def load_tree(path: Path, template: Any) -> tuple[Any, dict]:
    """Reads ``(tree, meta)`` from ``path``; the arrays must match ``template``'s names, dtypes and shapes."""
    with np.load(path) as archive:
        header = json.loads(str(archive["header"]))
        payload = archive["payload"].tobytes()
    specs = [wire.TensorSpec(n, d, tuple(s)) for n, d, s in header["specs"]]
    try:
        return wire.decode(specs, payload, template, copy=True), header["meta"]
    except wire.WireError as e:
        raise wire.WireError(f"{path}: {e}") from None
