"""Wire format for model updates: pytrees as named raw tensors, no pickle, no code.

A pytree travels as a manifest and a payload. The manifest lists every leaf as a
``TensorSpec(name, dtype, shape)`` in flattening order; the payload is the leaves' raw bytes,
little-endian and C order, concatenated in the same order. The receiver never trusts the
manifest: ``decode`` checks it against the template the algorithm defines (a pytree of arrays
or of ``jax.ShapeDtypeStruct``, e.g. ``jax.eval_shape(algorithm.broadcast, ...)``) and rebuilds
the pytree with the *template's* structure, so a peer cannot choose what gets constructed.
Anything unexpected raises ``WireError`` saying what and where.

Large payloads are streamed: ``chunks`` slices a payload without copying it, ``join_chunks``
reassembles a stream while refusing one that runs past the expected length or a limit.
``manifest_to_proto`` / ``manifest_from_proto`` convert to and from the protobuf ``Manifest``
(which also carries the payload's length and SHA-256).

Typical receive path::

    specs, total, digest = manifest_from_proto(header.manifest)
    expected = check_specs(specs, template_of(template))      # before reading any data
    payload = join_chunks(data_chunks, expected, max_total=limit)
    check_payload(payload, total, digest)
    tree = decode(specs, payload, template)
    check_finite(tree)
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DTYPES",
    "OLDEST_SITE_PROTOCOL",
    "PROTOCOL_VERSION",
    "TensorSpec",
    "WireError",
    "check_finite",
    "check_payload",
    "check_specs",
    "chunks",
    "decode",
    "encode",
    "global_norm",
    "join_chunks",
    "leaf_names",
    "manifest_from_proto",
    "manifest_to_proto",
    "protocol_refusal",
    "sha256_hex",
    "template_of",
]

PROTOCOL_VERSION = "nordfl.runtime.v1.5"
"""Sent in ``JoinRequest.protocol_version``: the proto package and a revision of its meaning (v1.1: sites
keep client state by ``TaskHeader.last_contribution``; v1.2: secure-aggregation steps, the round's
attempt in the headers, privacy settings in the job; v1.3: a study's Table 1 job, DESCRIBE tasks, the study
and its scaling in the job; v1.4: a site declares its rows at Join, which bound its weight, and the two
audit logs' heads travel with each upload and its reply; v1.5: a site's final report also gives its number
of test rows, ``test_rows``, so its scores can be pooled)."""

OLDEST_SITE_PROTOCOL = "nordfl.runtime.v1.4"
"""The oldest site protocol this coordinator still serves: one minor version behind, so hospitals can
upgrade one by one after the coordinator (a v1.4 site's final report simply has no ``test_rows``)."""


def _protocol_minor(version: str) -> Optional[tuple[int, int]]:
    match = re.fullmatch(r"nordfl\.runtime\.v(\d+)\.(\d+)", version)
    return None if match is None else (int(match[1]), int(match[2]))


def protocol_refusal(site_version: str) -> Optional[str]:
    """Why a site speaking ``site_version`` cannot join this coordinator, naming who must upgrade; None if it can."""
    site, oldest, ours = (_protocol_minor(v) for v in (site_version, OLDEST_SITE_PROTOCOL, PROTOCOL_VERSION))
    accepted = f"this coordinator speaks {PROTOCOL_VERSION} and accepts sites from {OLDEST_SITE_PROTOCOL}"
    if site is None:
        return f"protocol {site_version[:64]!r} is not a NordFL runtime protocol; {accepted}"
    if site > ours:
        return f"the site speaks {site_version}, newer than the coordinator: upgrade the coordinator first ({accepted})"
    if site < oldest:
        return f"the site speaks {site_version}: upgrade NordFL at this site ({accepted})"
    return None


DEFAULT_CHUNK_SIZE = 1 << 20
"""Bytes per streamed data chunk (1 MiB): well under gRPC's default 4 MB message limit."""

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "bool",
        "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64",
    )
}
DTYPES["bfloat16"] = np.dtype(jnp.bfloat16)
"""The dtypes allowed on the wire, by name (numpy's ``dtype.name``)."""

_ROOT_NAME = "<root>"  # the name of a pytree that is a single leaf
_NORM_BLOCK = 1 << 20  # elements per block in global_norm (bounds the float64 temporaries)


class WireError(ValueError):
    """A malformed or unexpected message (the text says what and where)."""


class TensorSpec(NamedTuple):
    """One leaf on the wire: key-path name, dtype name (e.g. ``"float32"``) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


# ----------------------------------------------------------------------------- names


def _key_str(key: Any) -> str:
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key).strip(".[]'\"")  # a custom key type: its printed form, without punctuation


def _paths_and_leaves(tree: Any) -> tuple[list[str], list[Any], Any]:
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = ["/".join(_key_str(k) for k in path) or _ROOT_NAME for path, _ in path_leaves]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise WireError(f"two leaves share the name {dup!r} (a dict key containing '/' or keys like 1 and '1'?)")
    return names, [leaf for _, leaf in path_leaves], treedef


def leaf_names(tree: Any) -> list[str]:
    """Stable, human-readable leaf names from jax key paths, in flattening order: dict keys,
    NamedTuple / dataclass fields by name and sequence indices joined by ``/``, e.g.
    ``params/linear/kernel`` or ``opt_state/0/mu/bias``. A bare leaf is named ``<root>``.
    Raises ``WireError`` if two leaves would get the same name."""
    return _paths_and_leaves(tree)[0]


# ----------------------------------------------------------------------------- specs


def _dtype_name(dtype: Any, where: str) -> str:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise WireError(f"tensor {where!r}: {dtype!r} is not a dtype") from e
    if dt.name not in DTYPES or DTYPES[dt.name] != dt.newbyteorder("="):
        allowed = ", ".join(DTYPES)
        raise WireError(f"tensor {where!r}: dtype {dt} is not allowed on the wire (allowed: {allowed})")
    return dt.name


def template_of(tree_or_shapes: Any) -> list[TensorSpec]:
    """The specs of a pytree whose leaves are arrays (numpy or jax), scalars or
    ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``)."""
    names, leaves, _ = _paths_and_leaves(tree_or_shapes)
    specs = []
    for name, leaf in zip(names, leaves):
        if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            leaf = np.asarray(leaf)
        specs.append(TensorSpec(name, _dtype_name(leaf.dtype, name), tuple(int(d) for d in leaf.shape)))
    return specs


def _normalise(spec: Any, index: int) -> TensorSpec:
    try:
        name, dtype, shape = spec
        return TensorSpec(str(name), str(dtype), tuple(int(d) for d in shape))
    except (TypeError, ValueError) as e:
        raise WireError(f"tensor #{index}: malformed spec {spec!r}") from e


def check_specs(specs: Sequence[Any], template: Sequence[TensorSpec]) -> int:
    """Check received ``specs`` against the ``template`` specs (see ``template_of``): the same
    names in the same order with the same dtypes and shapes. Raises ``WireError`` naming the
    first difference; returns the payload length in bytes the specs imply."""
    got = [_normalise(s, i) for i, s in enumerate(specs)]
    expected_names = {t.name for t in template}
    got_names = {g.name for g in got}
    for i, (exp, rec) in enumerate(zip(template, got)):
        if rec.name != exp.name:
            if exp.name not in got_names:
                raise WireError(f"tensor #{i}: missing tensor {exp.name!r} (got {rec.name!r} in its place)")
            if rec.name not in expected_names:
                raise WireError(f"tensor #{i}: unexpected tensor {rec.name!r} (expected {exp.name!r})")
            raise WireError(f"tensor #{i}: expected {exp.name!r}, got {rec.name!r} (tensors out of order)")
        if rec.dtype != exp.dtype:
            raise WireError(f"tensor {exp.name!r}: expected dtype {exp.dtype}, got {rec.dtype}")
        if rec.shape != exp.shape:
            raise WireError(f"tensor {exp.name!r}: expected shape {exp.shape}, got {rec.shape}")
    if len(got) < len(template):
        missing = [t.name for t in template[len(got):]]
        raise WireError(f"missing tensor {missing[0]!r}: expected {len(template)} tensors, got {len(got)} (missing {missing})")
    if len(got) > len(template):
        extra = [g.name for g in got[len(template):]]
        raise WireError(f"unexpected extra tensor {extra[0]!r}: expected {len(template)} tensors, got {len(got)} (extra {extra})")
    return sum(t.nbytes for t in template)


# ----------------------------------------------------------------------------- encode / decode


def _little_endian_bytes(leaf: Any, name: str) -> tuple[TensorSpec, memoryview]:
    a = np.asarray(leaf)
    dtype = _dtype_name(a.dtype, name)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder == "big" and a.dtype.itemsize > 1):
        a = a.astype(a.dtype.newbyteorder("<"))
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return TensorSpec(name, dtype, tuple(int(d) for d in a.shape)), memoryview(a.reshape(-1).view(np.uint8))


def encode(tree: Any) -> tuple[list[TensorSpec], bytes]:
    """The specs of every leaf and the payload: each leaf's little-endian C-order bytes,
    concatenated in flattening order (one copy of the data). Only the dtypes in ``DTYPES``
    are allowed; anything else raises ``WireError``."""
    names, leaves, _ = _paths_and_leaves(tree)
    specs, views = [], []
    for name, leaf in zip(names, leaves):
        spec, view = _little_endian_bytes(leaf, name)
        specs.append(spec)
        views.append(view)
    return specs, b"".join(views)


def decode(specs: Sequence[Any], payload: bytes | bytearray | memoryview, template_tree: Any, *, copy: bool = False) -> Any:
    """Rebuild a pytree with ``template_tree``'s structure from received ``specs`` and
    ``payload``, after checking the specs equal the template's (``check_specs``) and that the
    payload has exactly the length they imply. Leaves are numpy arrays: read-only views into
    ``payload`` (if it is ``bytes``), or independent writable copies with ``copy=True``."""
    template = template_of(template_tree)
    expected = check_specs(specs, template)
    size = memoryview(payload).nbytes
    if size != expected and template:
        last = template[-1]
        start = expected - last.nbytes
        if size < expected:
            raise WireError(
                f"payload is {expected - size} byte(s) short: expected {expected} bytes, got {size}; "
                f"tensor {last.name!r} (bytes {start}..{expected}) is truncated"
            )
        raise WireError(
            f"payload is {size - expected} byte(s) too long: expected {expected} bytes, got {size}; "
            f"extra bytes after the last tensor {last.name!r}"
        )
    if size != expected:
        raise WireError(f"payload of {size} bytes for a template without tensors")
    leaves, offset = [], 0
    for spec in template:
        dt = DTYPES[spec.dtype]
        count = math.prod(spec.shape)
        a = np.frombuffer(payload, dtype=dt.newbyteorder("<"), count=count, offset=offset).reshape(spec.shape)
        if spec.dtype == "bool" and count and a.view(np.uint8).max() > 1:
            raise WireError(f"tensor {spec.name!r}: bool bytes must be 0 or 1")
        if a.dtype != dt:  # a big-endian host: convert to native order
            a = a.astype(dt)
        leaves.append(a.copy() if copy else a)
        offset += spec.nbytes
    return jax.tree_util.tree_structure(template_tree).unflatten(leaves)


# ----------------------------------------------------------------------------- manifest


def sha256_hex(payload: bytes | bytearray | memoryview) -> str:
    """SHA-256 of the payload, lowercase hex (the ``Manifest.sha256`` field)."""
    return hashlib.sha256(payload).hexdigest()


def manifest_to_proto(specs: Sequence[TensorSpec], payload: bytes | bytearray | memoryview):
    """A ``federation_pb2.Manifest`` for ``payload``: its specs, length and SHA-256."""
    from nordfl.runtime.proto import federation_pb2

    return federation_pb2.Manifest(
        tensors=[federation_pb2.TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape)) for s in specs],
        total_bytes=memoryview(payload).nbytes,
        sha256=sha256_hex(payload),
    )


def manifest_from_proto(pb) -> tuple[list[TensorSpec], int, str]:
    """``(specs, total_bytes, sha256)`` from a ``federation_pb2.Manifest``. The specs are not
    checked here (``check_specs`` / ``decode`` do that against the template)."""
    specs = [TensorSpec(t.name, t.dtype, tuple(int(d) for d in t.shape)) for t in pb.tensors]
    return specs, int(pb.total_bytes), str(pb.sha256)


def check_payload(payload: bytes | bytearray | memoryview, total_bytes: int, sha256: str) -> None:
    """Check a reassembled payload against the manifest's length and SHA-256."""
    size = memoryview(payload).nbytes
    if size != total_bytes:
        raise WireError(f"payload is {size} bytes, the manifest says {total_bytes}")
    digest = sha256_hex(payload)
    if digest != sha256.lower():
        raise WireError(f"payload SHA-256 mismatch: manifest says {sha256!r}, payload has {digest!r}")


# ----------------------------------------------------------------------------- streaming


def chunks(payload: bytes | bytearray | memoryview, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Iterator[memoryview]:
    """Consecutive slices of at most ``chunk_size`` bytes (memoryviews, no copies). An empty
    payload yields nothing. (protobuf ``bytes`` fields need ``bytes(chunk)``.)"""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    view = memoryview(payload).cast("B")
    for start in range(0, view.nbytes, chunk_size):
        yield view[start:start + chunk_size]


def join_chunks(parts: Iterable[bytes | bytearray | memoryview], expected_total: int, max_total: int) -> bytes:
    """Reassemble a stream of byte chunks into exactly ``expected_total`` bytes.

    Refuses (``WireError``) an ``expected_total`` above ``max_total`` before reading anything,
    a stream that runs past ``expected_total`` as soon as the offending chunk arrives (nothing
    past the limit is kept), and a stream that ends short."""
    if expected_total < 0:
        raise WireError(f"negative expected length {expected_total}")
    if expected_total > max_total:
        raise WireError(f"message of {expected_total} bytes exceeds the limit of {max_total} bytes")
    kept: list[bytes | bytearray | memoryview] = []
    received = 0
    for i, part in enumerate(parts):
        try:
            size = memoryview(part).nbytes
        except TypeError as e:
            raise WireError(f"chunk #{i} is {type(part).__name__}, not bytes") from e
        if received + size > expected_total:
            raise WireError(
                f"stream too long: chunk #{i} brings it to {received + size} bytes, expected {expected_total}"
                + (f" (limit {max_total})" if received + size > max_total else "")
            )
        kept.append(part)
        received += size
    if received < expected_total:
        raise WireError(f"stream too short: got {received} bytes, expected {expected_total}")
    if len(kept) == 1 and isinstance(kept[0], bytes):
        return kept[0]
    return b"".join(kept)


# ----------------------------------------------------------------------------- checks


def check_finite(tree: Any) -> None:
    """Raise ``WireError`` naming the first floating-point leaf that holds NaN or Inf."""
    names, leaves, _ = _paths_and_leaves(tree)
    for name, leaf in zip(names, leaves):
        a = np.asarray(leaf)
        if not np.issubdtype(a.dtype, np.inexact) and a.dtype != DTYPES["bfloat16"]:
            continue
        finite = np.isfinite(a)
        if not finite.all():
            nan = int(np.isnan(a).sum())
            inf = int(a.size - finite.sum()) - nan
            first = np.unravel_index(int(np.argmin(finite.reshape(-1))), a.shape) if a.ndim else ()
            raise WireError(f"tensor {name!r} is not finite: {nan} NaN and {inf} Inf value(s), the first at index {tuple(map(int, first))}")


def global_norm(tree: Any) -> float:
    """The L2 norm of all leaves together, accumulated in float64 (NaN if any leaf is NaN)."""
    total = 0.0
    for leaf in jax.tree_util.tree_leaves(tree):
        flat = np.asarray(leaf).reshape(-1)
        for start in range(0, flat.size, _NORM_BLOCK):
            block = flat[start:start + _NORM_BLOCK].astype(np.float64)
            total += float(np.dot(block, block))
    return math.sqrt(total)
