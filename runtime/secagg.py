"""Secure aggregation (Bonawitz et al., CCS 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning"), as transport-free protocol objects.

One ``SecAggClient`` per site per training round and one ``SecAggServer`` per round exchange
small serialisable messages (``to_bytes`` / ``from_bytes``, no pickle); the runtime carries them
in its task and update messages. The coordinator learns only the sum of the quantised updates of
at least ``threshold`` sites, and which sites are in it.

Steps (``U1 ⊇ U2 ⊇ U3 ⊇ U4`` are the sites still present after each step)::

    0  site -> server  Advertise       two fresh X25519 public keys (c_pk: encryption, s_pk: masks)
       server -> all   Roster          the keys of U1
    1  site -> server  ShareKeys       Shamir shares (threshold t) of the site's mask key s_sk and
                                       of a fresh self-mask seed b, one AEAD ciphertext per site of U1
       server -> site  ForwardedShares the ciphertexts addressed to that site, from U2
    2  site -> server  MaskedInput     y_i = q(x_i) + PRG(b_i) + sum_{j>i} PRG(s_ij) - sum_{j<i} PRG(s_ij)
       server -> all   UnmaskRequest   survivors U3 (sent y) and dropped U2 \\ U3
    3  site -> server  UnmaskShares    shares of b_j for each survivor j, of s_sk_j for each dropped j
       server          result()        reconstructs, removes the masks, returns the dequantised sum

A site that drops after step 2 is recovered (its b is rebuilt from the others' shares, its input is
in the sum); one that drops after step 1 is excluded (its s_sk is rebuilt and its pairwise masks are
removed); fewer than t sites at any step abort the round with ``SecAggAborted`` before anything is
revealed. A site answers at most one of "b share" and "s_sk share" for any site, ever.

Arithmetic: updates are clipped to ``[-R, R]`` and rounded to integers in ``[-L, L]`` with
``L = 2**(bits-1) - 1``, stored two's-complement in ``Z_{2**m}``, ``m = bits + ceil(log2 n)``, so
the sum of n inputs never wraps. Per coordinate, ``|dequantised sum - sum of clipped inputs| <=
k * R / (2 L)`` for k summed sites (``SecAggConfig.error_bound``). Masks are ChaCha20 keystreams
viewed as uint64. Shamir sharing is over the prime field ``2**521 - 1`` (one share per 32-byte
secret). Pairwise seeds are HKDF(X25519) with the run id, round and both site ids in ``info``;
share ciphertexts are ChaCha20-Poly1305 under HKDF(X25519) keys with run id, round, sender and
recipient in both ``info`` and the associated data, so a message replayed from another run or
round fails.

Threat model: honest-but-curious coordinator and sites, as in the paper's semi-honest setting.
There are no signatures and no consistency check of the survivor lists (the paper's step 3 for
an active adversary); a coordinator that sends different survivor lists to different sites can
collect both kinds of shares for one site and unmask its input. Against that, run over the
runtime's mutual TLS with an honest coordinator process; SecAgg+ style checks are future work.
Sites are numbered ``1..num_sites`` (the Shamir x-coordinates); the runtime maps names to ids.

Example (in-process, site 3 drops after sending its masked input)::

    cfg = SecAggConfig(num_sites=3, threshold=2, clip_range=1.0, bits=16)
    server = SecAggServer(cfg, "run", 0, length=4)
    clients = {i: SecAggClient(cfg, "run", 0, i) for i in (1, 2, 3)}
    for c in clients.values(): server.add_advertise(c.advertise())
    roster = server.roster()
    for c in clients.values(): server.add_shares(c.share_keys(roster))
    fwd = server.forward_shares()
    for i, c in clients.items(): server.add_masked_input(c.masked_input(x[i], fwd[i]))
    request = server.unmask_request()
    for i in (1, 2): server.add_unmask_shares(clients[i].unmask(request))
    result = server.result()      # result.total ~ x[1] + x[2] + x[3], result.sites == (1, 2, 3)
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "PRIME",
    "Advertise",
    "ForwardedShares",
    "MaskedInput",
    "Roster",
    "SecAggAborted",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggResult",
    "SecAggServer",
    "ShareKeys",
    "UnmaskRefused",
    "UnmaskRequest",
    "UnmaskShares",
    "dequantise_sum",
    "flatten_arrays",
    "prg",
    "quantise",
    "shamir_reconstruct",
    "shamir_share",
    "unflatten_arrays",
]

PRIME = 2**521 - 1
"""Shamir field: a Mersenne prime above any 32-byte secret."""

_VERSION = b"nordfl-secagg-v1"
_SHARE_BYTES = 66  # ceil(521 / 8)
_CIPHERTEXT_BYTES = 12 + 2 * _SHARE_BYTES + 16  # nonce, two shares, Poly1305 tag
_MAX_SITES = 2**16


class SecAggError(ValueError):
    """A bad config, message or call order. A rejected message does not end the round."""


class SecAggAborted(RuntimeError):
    """Fewer than ``threshold`` sites remain: the round ends and no input is revealed."""


class UnmaskRefused(SecAggError):
    """A site refuses an unmask request that could reveal an individual input."""


# ---------------------------------------------------------------------------------------------
# Configuration and quantisation


@dataclass(frozen=True)
class SecAggConfig:
    """Protocol parameters, shared by the coordinator and all sites of a run.

    Args:
      num_sites: n, sites in the federation (ids ``1..n``); at least 2.
      threshold: t, the fewest sites whose sum may be revealed; ``n/2 < t <= n``.
      clip_range: R > 0; inputs are clipped to ``[-R, R]`` per coordinate.
      bits: quantisation bits per value (sign included), ``2 <= bits <= 64 - ceil(log2 n)``.
    """

    num_sites: int
    threshold: int
    clip_range: float
    bits: int = 24

    def __post_init__(self):
        n, t, r, b = self.num_sites, self.threshold, self.clip_range, self.bits
        if not isinstance(n, int) or isinstance(n, bool) or not 2 <= n <= _MAX_SITES:
            raise SecAggError(f"num_sites={n!r}: expected an integer in [2, {_MAX_SITES}]")
        if not isinstance(t, int) or isinstance(t, bool) or not n / 2 < t <= n:
            raise SecAggError(
                f"threshold={t!r}: expected an integer with num_sites/2 < threshold <= num_sites "
                f"({n // 2 + 1}..{n} for num_sites={n}), so that a majority must take part")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0 < r < math.inf):
            raise SecAggError(f"clip_range={r!r}: expected a finite number > 0")
        headroom = math.ceil(math.log2(n))
        if not isinstance(b, int) or isinstance(b, bool) or not 2 <= b <= 64 - headroom:
            raise SecAggError(
                f"bits={b!r}: expected an integer in [2, {64 - headroom}]: the field Z_2^(bits+"
                f"ceil(log2 num_sites)) must hold the sum of {n} values and fit in 64 bits")

    @property
    def levels(self) -> int:
        """L: a clipped value x becomes the integer round(x * L / R) in [-L, L]."""
        return 2 ** (self.bits - 1) - 1

    @property
    def field_bits(self) -> int:
        """m: masked values live in Z_{2^m}; n * L <= 2^(m-1) - 1, so sums never wrap."""
        return self.bits + math.ceil(math.log2(self.num_sites))

    @property
    def step(self) -> float:
        """The quantisation step R / L."""
        return float(self.clip_range) / self.levels

    @classmethod
    def for_round(cls, num_sites: int, min_sites: int, clip_range: float, bits: int = 24) -> SecAggConfig:
        """The config for a round of ``num_sites`` (the cohort) that needs ``min_sites`` updates:
        threshold ``max(min_sites, num_sites // 2 + 1)``, the fewest that are both allowed and safe."""
        if not _is_int(min_sites) or not 1 <= min_sites <= num_sites:
            raise SecAggError(f"min_sites={min_sites!r}: expected an integer in [1, num_sites={num_sites}]")
        return cls(num_sites, max(min_sites, num_sites // 2 + 1), clip_range, bits)

    def error_bound(self, num_summed: int) -> float:
        """Largest per-coordinate error of a dequantised sum of ``num_summed`` clipped inputs:
        ``num_summed * R / (2 L)`` (round-to-nearest, exact integer sums)."""
        return num_summed * self.step / 2


def _field_mask(cfg: SecAggConfig) -> np.uint64:
    return np.uint64((1 << cfg.field_bits) - 1)


def quantise(vector: np.ndarray, cfg: SecAggConfig) -> np.ndarray:
    """Clip a float vector to [-R, R] and round it to ``Z_{2^m}`` (two's complement), uint64 [d].

    Raises SecAggError on a non-finite value or a non-1-D input."""
    x = np.asarray(vector)
    if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
        raise SecAggError(f"vector: expected a 1-D float array, got {x.dtype} of shape {x.shape}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise SecAggError(f"vector: {int((~np.isfinite(x)).sum())} non-finite values; expected finite")
    q = np.rint(np.clip(x, -cfg.clip_range, cfg.clip_range) * (cfg.levels / cfg.clip_range))
    q = np.clip(q, -cfg.levels, cfg.levels).astype(np.int64)
    return q.astype(np.uint64) & _field_mask(cfg)


def dequantise_sum(total: np.ndarray, cfg: SecAggConfig) -> np.ndarray:
    """Map a sum in ``Z_{2^m}`` (uint64 [d]) back to floats (float64 [d])."""
    m = cfg.field_bits
    s = np.asarray(total, np.uint64) & _field_mask(cfg)
    if m == 64:
        signed = s.view(np.int64)
    else:
        signed = s.astype(np.int64)
        signed = np.where(signed >= 1 << (m - 1), signed - (1 << m), signed)
    return signed.astype(np.float64) * cfg.step


def prg(seed: bytes, length: int) -> np.ndarray:
    """A pseudorandom uint64 [length] vector: the ChaCha20 keystream of a 32-byte seed."""
    if len(seed) != 32:
        raise SecAggError(f"seed: expected 32 bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64, copy=False)


def flatten_arrays(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Concatenate arrays into one float32 vector; returns it and the shapes for ``unflatten``."""
    shapes = [tuple(np.shape(a)) for a in arrays]
    flat = [np.asarray(a, np.float32).ravel() for a in arrays]
    return (np.concatenate(flat) if flat else np.zeros(0, np.float32)), shapes


def unflatten_arrays(vector: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Split a vector made by ``flatten_arrays`` back into arrays of the given shapes."""
    sizes = [math.prod(s) for s in shapes]
    if sum(sizes) != len(vector):
        raise SecAggError(f"vector: length {len(vector)}, expected {sum(sizes)} for shapes {list(shapes)}")
    parts = np.split(np.asarray(vector), np.cumsum(sizes)[:-1]) if shapes else []
    return [p.reshape(s) for p, s in zip(parts, shapes)]


# ---------------------------------------------------------------------------------------------
# Shamir secret sharing over GF(PRIME)


def shamir_share(secret: int, holders: Iterable[int], threshold: int,
                 random_bytes: Callable[[int], bytes] = os.urandom) -> dict[int, int]:
    """Split ``secret`` (< PRIME) into shares ``{holder: f(holder)}`` of a random polynomial of
    degree threshold-1 with f(0) = secret; any ``threshold`` shares rebuild it, fewer tell nothing."""
    if not 0 <= secret < PRIME:
        raise SecAggError("secret: expected an integer in [0, PRIME)")
    coeffs = [secret] + [int.from_bytes(random_bytes(80), "big") % PRIME for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        if not 0 < x < PRIME:
            raise SecAggError(f"holder {x!r}: expected a positive integer")
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares[x] = y
    return shares


def shamir_reconstruct(shares: dict[int, int]) -> int:
    """f(0) by Lagrange interpolation from ``{x: f(x)}``; the caller passes exactly t shares."""
    secret = 0
    for xi, yi in shares.items():
        num, den = 1, 1
        for xj in shares:
            if xj != xi:
                num = num * -xj % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# ---------------------------------------------------------------------------------------------
# Messages: frozen dataclasses, JSON header plus an optional raw payload, no pickle


_MAGIC = b"NFSA1"


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise SecAggError(what)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _encode(kind: str, v):
    if kind in ("str", "int"):
        return v
    if kind == "bytes":
        return base64.b64encode(v).decode()
    if kind == "ids":
        return list(v)
    if kind == "map_bytes":
        return {str(k): base64.b64encode(x).decode() for k, x in v.items()}
    if kind == "map_int":
        return {str(k): str(x) for k, x in v.items()}
    raise AssertionError(kind)


def _decode(kind: str, v, name: str):
    bad = f"field {name!r}: expected {kind}"
    try:
        if kind == "str":
            _check(isinstance(v, str), bad)
            return v
        if kind == "int":
            _check(_is_int(v), bad)
            return v
        if kind == "bytes":
            _check(isinstance(v, str), bad)
            return base64.b64decode(v, validate=True)
        if kind == "ids":
            _check(isinstance(v, list) and all(_is_int(x) for x in v), bad)
            return tuple(v)
        if kind in ("map_bytes", "map_int"):
            _check(isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), bad)
            if kind == "map_bytes":
                return {int(k): base64.b64decode(x, validate=True) for k, x in v.items()}
            return {int(k): int(x) for k, x in v.items()}
    except (ValueError, TypeError) as e:
        raise SecAggError(f"{bad}: {e}") from None
    raise AssertionError(kind)


class _Message:
    """Serialisation shared by all messages: ``MAGIC | u32 header length | JSON | payload``."""

    _kinds: ClassVar[dict[str, str]]

    def to_bytes(self) -> bytes:
        header = {"type": type(self).__name__}
        payload = b""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if self._kinds[f.name] == "u64":
                # 4 bytes a value when they fit (fields of up to 32 bits), so the upload is no
                # larger than the float32 update it hides.
                width = 4 if len(v) == 0 or int(v.max()) < 2**32 else 8
                header[f.name] = [len(v), width]
                payload = np.ascontiguousarray(v, f"<u{width}").tobytes()
            else:
                header[f.name] = _encode(self._kinds[f.name], v)
        head = json.dumps(header, separators=(",", ":")).encode()
        return _MAGIC + struct.pack("<I", len(head)) + head + payload

    @classmethod
    def from_bytes(cls, data: bytes):
        _check(data[:5] == _MAGIC and len(data) >= 9, f"{cls.__name__}: not a secure-aggregation message")
        (n,) = struct.unpack("<I", data[5:9])
        try:
            header = json.loads(data[9:9 + n])
        except ValueError as e:
            raise SecAggError(f"{cls.__name__}: unreadable header: {e}") from None
        _check(isinstance(header, dict) and header.get("type") == cls.__name__,
               f"expected a {cls.__name__} message, got {header.get('type') if isinstance(header, dict) else header!r}")
        names = [f.name for f in dataclasses.fields(cls)]
        _check(set(header) == {"type", *names},
               f"{cls.__name__}: fields {sorted(set(header) - {'type'})}, expected {sorted(names)}")
        payload = data[9 + n:]
        values = {}
        for name in names:
            if cls._kinds[name] == "u64":
                spec = header[name]
                _check(isinstance(spec, list) and len(spec) == 2 and _is_int(spec[0]) and spec[1] in (4, 8)
                       and len(payload) == spec[0] * spec[1],
                       f"{cls.__name__}: payload of {len(payload)} bytes, header says {spec!r} "
                       f"([values, bytes per value] with 4 or 8 bytes)")
                values[name] = np.frombuffer(payload, f"<u{spec[1]}").astype(np.uint64)
            else:
                values[name] = _decode(cls._kinds[name], header[name], name)
        return cls(**values)


@dataclass(frozen=True)
class Advertise(_Message):
    """Step 0, site -> server: the site's two fresh X25519 public keys (32 bytes each)."""
    run_id: str
    round: int
    site: int
    c_pk: bytes
    s_pk: bytes
    _kinds: ClassVar = {"run_id": "str", "round": "int", "site": "int", "c_pk": "bytes", "s_pk": "bytes"}


@dataclass(frozen=True)
class Roster(_Message):
    """Step 0, server -> every site of U1: everyone's public keys, by site id."""
    run_id: str
    round: int
    c_pks: dict
    s_pks: dict
    _kinds: ClassVar = {"run_id": "str", "round": "int", "c_pks": "map_bytes", "s_pks": "map_bytes"}


@dataclass(frozen=True)
class ShareKeys(_Message):
    """Step 1, site -> server: one AEAD ciphertext of shares per other site of U1, by recipient."""
    run_id: str
    round: int
    site: int
    ciphertexts: dict
    _kinds: ClassVar = {"run_id": "str", "round": "int", "site": "int", "ciphertexts": "map_bytes"}


@dataclass(frozen=True)
class ForwardedShares(_Message):
    """Step 1, server -> one site of U2: the ciphertexts addressed to it, by sender (U2 minus it)."""
    run_id: str
    round: int
    recipient: int
    ciphertexts: dict
    _kinds: ClassVar = {"run_id": "str", "round": "int", "recipient": "int", "ciphertexts": "map_bytes"}


@dataclass(frozen=True)
class MaskedInput(_Message):
    """Step 2, site -> server: the masked quantised input y, uint64 [d], values < 2^m (sent as 4
    bytes a value when m <= 32)."""
    run_id: str
    round: int
    site: int
    y: np.ndarray
    _kinds: ClassVar = {"run_id": "str", "round": "int", "site": "int", "y": "u64"}


@dataclass(frozen=True)
class UnmaskRequest(_Message):
    """Step 2, server -> every site of U3: who sent a masked input (U3) and who did not (U2 \\ U3)."""
    run_id: str
    round: int
    survivors: tuple
    dropped: tuple
    _kinds: ClassVar = {"run_id": "str", "round": "int", "survivors": "ids", "dropped": "ids"}


@dataclass(frozen=True)
class UnmaskShares(_Message):
    """Step 3, site -> server: its shares of b_j (j in U3) and of s_sk_j (j dropped), by j."""
    run_id: str
    round: int
    site: int
    b_shares: dict
    s_shares: dict
    _kinds: ClassVar = {"run_id": "str", "round": "int", "site": "int", "b_shares": "map_int",
                        "s_shares": "map_int"}


@dataclass(frozen=True)
class SecAggResult:
    """The round's outcome: ``total`` float64 [d] is the dequantised sum of the inputs of
    ``sites``; each coordinate is within ``error_bound`` of the sum of their clipped inputs."""
    total: np.ndarray
    sites: tuple
    error_bound: float


# ---------------------------------------------------------------------------------------------
# Key derivation


def _context(run_id: str, round_index: int) -> bytes:
    rid = run_id.encode()
    return _VERSION + struct.pack("<I", len(rid)) + rid + struct.pack("<Q", round_index)


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _exchange(sk: X25519PrivateKey, pk: bytes) -> bytes:
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(pk))
    except ValueError as e:  # wrong length, or a low-order point giving an all-zero secret
        raise SecAggError(f"unusable X25519 public key {pk.hex()[:16]}...: {e}") from None


def _pair_seed(sk: X25519PrivateKey, pk: bytes, ctx: bytes, i: int, j: int) -> bytes:
    a, b = min(i, j), max(i, j)
    return _hkdf(_exchange(sk, pk), ctx + b"|mask|" + struct.pack("<II", a, b))


def _share_key_and_ad(sk: X25519PrivateKey, pk: bytes, ctx: bytes, sender: int, recipient: int):
    ad = ctx + b"|share|" + struct.pack("<II", sender, recipient)
    return ChaCha20Poly1305(_hkdf(_exchange(sk, pk), ad)), ad


def _pairwise_mask(sk: X25519PrivateKey, s_pks: dict[int, bytes], ctx: bytes, me: int,
                   others: Iterable[int], length: int) -> np.ndarray:
    """sum_{j>me} PRG(s_mj) - sum_{j<me} PRG(s_mj), mod 2^64, where ``sk`` is site me's mask key."""
    total = np.zeros(length, np.uint64)
    for j in others:
        if j > me:
            total += prg(_pair_seed(sk, s_pks[j], ctx, me, j), length)
        elif j < me:
            total -= prg(_pair_seed(sk, s_pks[j], ctx, me, j), length)
    return total


def _check_header(msg, run_id: str, round_index: int) -> None:
    if msg.run_id != run_id or msg.round != round_index:
        raise SecAggError(f"{type(msg).__name__} for run {msg.run_id!r} round {msg.round}; "
                          f"this is run {run_id!r} round {round_index} (late or replayed)")


# ---------------------------------------------------------------------------------------------
# Site


class SecAggClient:
    """One site's side of one secure-aggregation round; call the four steps in order.

    Args:
      cfg, run_id, round_index: shared by all parties of the round.
      site: this site's id in ``1..num_sites``.
      random_bytes: source of randomness; ``os.urandom`` except in reproducible tests.
    """

    def __init__(self, cfg: SecAggConfig, run_id: str, round_index: int, site: int, *,
                 random_bytes: Callable[[int], bytes] = os.urandom):
        _check(_is_int(site) and 1 <= site <= cfg.num_sites, f"site={site!r}: expected an id in 1..{cfg.num_sites}")
        self.cfg, self.run_id, self.round, self.site = cfg, run_id, round_index, site
        self._random = random_bytes
        self._ctx = _context(run_id, round_index)
        self._c_sk = X25519PrivateKey.from_private_bytes(random_bytes(32))
        self._s_sk = X25519PrivateKey.from_private_bytes(random_bytes(32))
        self._b = random_bytes(32)
        self._step = 0
        self._roster: Roster | None = None
        self._u2: tuple[int, ...] = ()
        self._held_b: dict[int, int] = {}  # my shares of each site's b, by site
        self._held_s: dict[int, int] = {}  # my shares of each site's s_sk, by site
        self._revealed_b: set[int] = set()
        self._revealed_s: set[int] = set()
        self.clipped = 0
        """Coordinates of the last input that were clipped to [-R, R] (local diagnostics)."""

    def _advance(self, step: int, name: str) -> None:
        _check(self._step == step, f"site {self.site}: {name} called at step {self._step}, expected step {step}")
        self._step = step + 1

    def advertise(self) -> Advertise:
        """Step 0: this site's public keys."""
        self._advance(0, "advertise")
        return Advertise(self.run_id, self.round, self.site, self._c_sk.public_key().public_bytes_raw(),
                         self._s_sk.public_key().public_bytes_raw())

    def share_keys(self, roster: Roster) -> ShareKeys:
        """Step 1: share s_sk and b among U1, one ciphertext per other site."""
        _check_header(roster, self.run_id, self.round)
        u1 = sorted(roster.c_pks)
        _check(sorted(roster.s_pks) == u1, "roster: c_pks and s_pks name different sites")
        _check(all(_is_int(j) and 1 <= j <= self.cfg.num_sites for j in u1),
               f"roster: site ids {u1}, expected ids in 1..{self.cfg.num_sites}")
        mine = self._c_sk.public_key().public_bytes_raw(), self._s_sk.public_key().public_bytes_raw()
        _check((roster.c_pks.get(self.site), roster.s_pks.get(self.site)) == mine,
               f"roster: site {self.site}'s keys are missing or not its own")
        keys = [k for j in u1 for k in (roster.c_pks[j], roster.s_pks[j])]
        _check(len(set(keys)) == len(keys) and all(len(k) == 32 for k in keys),
               "roster: public keys must be 32 bytes and all different")
        if len(u1) < self.cfg.threshold:
            raise SecAggAborted(f"only {len(u1)} of the needed {self.cfg.threshold} sites advertised keys")
        self._advance(1, "share_keys")
        self._roster = roster
        s_raw = int.from_bytes(self._s_sk.private_bytes_raw(), "big")
        s_shares = shamir_share(s_raw, u1, self.cfg.threshold, self._random)
        b_shares = shamir_share(int.from_bytes(self._b, "big"), u1, self.cfg.threshold, self._random)
        self._held_s[self.site], self._held_b[self.site] = s_shares[self.site], b_shares[self.site]
        ciphertexts = {}
        for j in u1:
            if j == self.site:
                continue
            aead, ad = _share_key_and_ad(self._c_sk, roster.c_pks[j], self._ctx, self.site, j)
            plain = (s_shares[j].to_bytes(_SHARE_BYTES, "big") + b_shares[j].to_bytes(_SHARE_BYTES, "big"))
            nonce = self._random(12)
            ciphertexts[j] = nonce + aead.encrypt(nonce, plain, ad)
        return ShareKeys(self.run_id, self.round, self.site, ciphertexts)

    def masked_input(self, vector: np.ndarray, shares: ForwardedShares) -> MaskedInput:
        """Step 2: keep the shares sent to this site, return y = q(x) + masks over U2."""
        _check_header(shares, self.run_id, self.round)
        _check(shares.recipient == self.site, f"forwarded shares for site {shares.recipient}, this is site {self.site}")
        _check(self._step == 2, f"site {self.site}: masked_input called at step {self._step}, expected step 2")
        roster = self._roster
        received_s, received_b = {}, {}
        for j, ct in shares.ciphertexts.items():
            _check(j in roster.c_pks and j != self.site, f"forwarded shares: sender {j} is not another site of U1")
            aead, ad = _share_key_and_ad(self._c_sk, roster.c_pks[j], self._ctx, j, self.site)
            try:
                plain = aead.decrypt(ct[:12], ct[12:], ad)
            except InvalidTag:
                raise SecAggError(f"shares from site {j} fail authentication: wrong run id, round, "
                                  f"sender or recipient, or tampered") from None
            _check(len(plain) == 2 * _SHARE_BYTES, f"shares from site {j}: bad length")
            received_s[j] = int.from_bytes(plain[:_SHARE_BYTES], "big")
            received_b[j] = int.from_bytes(plain[_SHARE_BYTES:], "big")
        u2 = tuple(sorted({*shares.ciphertexts, self.site}))
        if len(u2) < self.cfg.threshold:
            raise SecAggAborted(f"only {len(u2)} of the needed {self.cfg.threshold} sites shared keys")
        q = quantise(vector, self.cfg)
        x = np.asarray(vector, np.float64)
        self.clipped = int((np.abs(x) > self.cfg.clip_range).sum())
        self._advance(2, "masked_input")
        self._held_s.update(received_s)
        self._held_b.update(received_b)
        self._u2 = u2
        y = q + prg(self._b, len(q)) + _pairwise_mask(self._s_sk, roster.s_pks, self._ctx, self.site, u2, len(q))
        return MaskedInput(self.run_id, self.round, self.site, y & _field_mask(self.cfg))

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Step 3: shares of b for survivors and of s_sk for dropped sites. Refuses (raises
        ``UnmaskRefused``) anything that would ever reveal both for one site, a survivor list
        shorter than the threshold, or lists that do not split this site's U2. Repeating the
        same request is allowed (a lost reply)."""
        _check_header(request, self.run_id, self.round)
        _check(self._step >= 3, f"site {self.site}: unmask called at step {self._step}, expected step 3")
        survivors, dropped = set(request.survivors), set(request.dropped)
        both = survivors & dropped | survivors & self._revealed_s | dropped & self._revealed_b
        if both:
            raise UnmaskRefused(f"site {self.site} refuses: sites {sorted(both)} would have both their "
                                f"self-mask and mask-key shares revealed, which unmasks their inputs")
        if len(survivors) < self.cfg.threshold:
            raise UnmaskRefused(f"site {self.site} refuses: only {len(survivors)} survivors, "
                                f"fewer than the threshold {self.cfg.threshold}")
        if survivors | dropped != set(self._u2) or len(request.survivors) + len(request.dropped) != len(self._u2):
            raise UnmaskRefused(f"site {self.site} refuses: survivors {sorted(survivors)} and dropped "
                                f"{sorted(dropped)} do not split the sites that shared keys, {list(self._u2)}")
        if self.site not in survivors:
            raise UnmaskRefused(f"site {self.site} refuses: it sent its masked input but is listed as dropped")
        self._revealed_b |= survivors
        self._revealed_s |= dropped
        return UnmaskShares(self.run_id, self.round, self.site,
                            {j: self._held_b[j] for j in sorted(survivors)},
                            {j: self._held_s[j] for j in sorted(dropped)})


# ---------------------------------------------------------------------------------------------
# Coordinator


class SecAggServer:
    """The coordinator's side of one round. Feed each step's messages with ``add_*`` (a bad one
    raises ``SecAggError`` and is not kept), then close the step (at the round timeout or when all
    expected sites answered) with ``roster``, ``forward_shares``, ``unmask_request``, ``result``.
    Closing a step with fewer than ``threshold`` sites raises ``SecAggAborted``.

    Attributes ``u1``..``u4`` are the sorted site ids present after each step.
    """

    def __init__(self, cfg: SecAggConfig, run_id: str, round_index: int, length: int):
        _check(_is_int(length) and length >= 0, f"length={length!r}: expected an integer >= 0")
        self.cfg, self.run_id, self.round, self.length = cfg, run_id, round_index, length
        self._ctx = _context(run_id, round_index)
        self._step = 0
        self._adverts: dict[int, Advertise] = {}
        self._shares: dict[int, ShareKeys] = {}
        self._inputs: dict[int, np.ndarray] = {}
        self._unmask: dict[int, UnmaskShares] = {}
        self.u1 = self.u2 = self.u3 = self.u4 = ()
        self.aborted: str | None = None

    def _accept(self, msg, step: int, allowed: Sequence[int], store: dict) -> None:
        _check_header(msg, self.run_id, self.round)
        name = type(msg).__name__
        _check(self._step == step, f"{name} from site {msg.site} arrived at step {self._step}; expected step {step}")
        _check(msg.site in allowed, f"{name} from site {msg.site}, which is not one of {list(allowed)}")
        _check(msg.site not in store, f"a second {name} from site {msg.site}")

    def _close(self, step: int, present: dict, what: str) -> tuple[int, ...]:
        _check(self.aborted is None, f"the round was aborted: {self.aborted}")
        _check(self._step == step, f"closing step {step} at step {self._step}")
        if len(present) < self.cfg.threshold:
            self.aborted = (f"only {len(present)} of the needed {self.cfg.threshold} sites {what} "
                            f"(sites {sorted(present)})")
            raise SecAggAborted(self.aborted)
        self._step = step + 1
        return tuple(sorted(present))

    def add_advertise(self, msg: Advertise) -> None:
        self._accept(msg, 0, range(1, self.cfg.num_sites + 1), self._adverts)
        _check(len(msg.c_pk) == len(msg.s_pk) == 32, f"site {msg.site}: public keys must be 32 bytes")
        self._adverts[msg.site] = msg

    def roster(self) -> Roster:
        """Close step 0: the roster of U1, broadcast to every site in it."""
        self.u1 = self._close(0, self._adverts, "advertised keys")
        a = self._adverts
        return Roster(self.run_id, self.round, {i: a[i].c_pk for i in self.u1}, {i: a[i].s_pk for i in self.u1})

    def add_shares(self, msg: ShareKeys) -> None:
        self._accept(msg, 1, self.u1, self._shares)
        expected = set(self.u1) - {msg.site}
        _check(set(msg.ciphertexts) == expected,
               f"site {msg.site} sent shares for {sorted(msg.ciphertexts)}, expected {sorted(expected)}")
        _check(all(len(ct) == _CIPHERTEXT_BYTES for ct in msg.ciphertexts.values()),
               f"site {msg.site}: share ciphertexts must be {_CIPHERTEXT_BYTES} bytes")
        self._shares[msg.site] = msg

    def forward_shares(self) -> dict[int, ForwardedShares]:
        """Close step 1: ``{site: ForwardedShares}`` to send to each site of U2."""
        self.u2 = self._close(1, self._shares, "shared keys")
        return {j: ForwardedShares(self.run_id, self.round, j,
                                   {i: self._shares[i].ciphertexts[j] for i in self.u2 if i != j})
                for j in self.u2}

    def add_masked_input(self, msg: MaskedInput) -> None:
        self._accept(msg, 2, self.u2, self._inputs)
        y = np.asarray(msg.y)
        _check(y.dtype == np.uint64 and y.shape == (self.length,),
               f"masked input from site {msg.site}: {y.dtype} {y.shape}, expected uint64 ({self.length},)")
        _check(not (y & ~_field_mask(self.cfg)).any(),
               f"masked input from site {msg.site}: values >= 2^{self.cfg.field_bits}")
        self._inputs[msg.site] = y

    def unmask_request(self) -> UnmaskRequest:
        """Close step 2: the request to broadcast to every site of U3."""
        self.u3 = self._close(2, self._inputs, "sent masked inputs")
        dropped = tuple(j for j in self.u2 if j not in self.u3)
        return UnmaskRequest(self.run_id, self.round, self.u3, dropped)

    def add_unmask_shares(self, msg: UnmaskShares) -> None:
        self._accept(msg, 3, self.u3, self._unmask)
        dropped = set(self.u2) - set(self.u3)
        _check(set(msg.b_shares) == set(self.u3) and set(msg.s_shares) == dropped,
               f"site {msg.site} sent b shares for {sorted(msg.b_shares)} and key shares for "
               f"{sorted(msg.s_shares)}; expected {list(self.u3)} and {sorted(dropped)}")
        _check(all(0 <= v < PRIME for v in (*msg.b_shares.values(), *msg.s_shares.values())),
               f"site {msg.site}: a share outside the field")
        self._unmask[msg.site] = msg

    def result(self) -> SecAggResult:
        """Close step 3: rebuild the survivors' b and the dropped sites' s_sk, remove all masks and
        return the dequantised sum of U3's inputs."""
        self.u4 = self._close(3, self._unmask, "sent unmask shares")
        t, d = self.cfg.threshold, self.length
        holders = self.u4[:t]

        def rebuild(field: str, j: int) -> bytes:
            return shamir_reconstruct({h: getattr(self._unmask[h], field)[j] for h in holders}).to_bytes(32, "big")

        total = np.zeros(d, np.uint64)
        for i in self.u3:
            total += self._inputs[i]
            total -= prg(rebuild("b_shares", i), d)
        s_pks = {i: self._adverts[i].s_pk for i in self.u2}
        for j in self.u2:
            if j in self.u3:
                continue
            sk = X25519PrivateKey.from_private_bytes(rebuild("s_shares", j))
            if sk.public_key().public_bytes_raw() != s_pks[j]:
                raise SecAggAborted(f"site {j}'s rebuilt mask key does not match its advertised key: "
                                    f"a share is corrupt")
            # The survivors' inputs carry minus j's pairwise masks with them; add those back.
            total += _pairwise_mask(sk, s_pks, self._ctx, j, self.u3, d)
        self._step = 4
        return SecAggResult(dequantise_sum(total, self.cfg), self.u3, self.cfg.error_bound(len(self.u3)))
