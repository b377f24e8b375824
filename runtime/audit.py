"""Append-only, hash-chained audit log (JSONL) for the coordinator and every site.

Data-protection officers need to know exactly what left each site: connections, rounds,
the SHA-256 of every update sent or received, and each accept/reject with its reason.
Every line is one JSON object that carries the hash of the line before it, so editing,
removing or reordering an entry breaks the chain at that point and `verify` names the
first broken line. The chain alone cannot stop someone who rewrites the whole file from
the edited line on, so two more things pin it: each entry may be signed with the writer's own
key (``signing_key``: its TLS key, ECDSA P-256 over the entry's hash, in ``sig``), and the
parties exchange heads (a site's update header carries the hash of its ``update_sent`` entry,
which the coordinator records in ``update_accepted``; the reply carries that entry's hash,
which the site records in ``update_result``). ``cross_check`` then finds a log cut short or
rewritten after an exchange, and ``verify`` with the writer's certificate finds an appended or
re-hashed entry, which no one without the key can sign. An empty log is an error, not "OK".

Line format, keys in this order: seq (1-based), time (UTC, ms, 'Z'), actor, event, the
caller's fields, prev (previous hash, 64 zeros for the first), hash = SHA-256 hex of
json.dumps(entry_without_hash, sort_keys=True, separators=(",", ":"), ensure_ascii=False).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory lock, so one writer per file is up to the deployment
    fcntl = None

__all__ = ["GENESIS", "RESERVED", "AuditError", "AuditLog", "VerifyReport", "sha256_hex", "verify", "verify_main"]

GENESIS = "0" * 64
RESERVED = ("seq", "time", "actor", "event", "prev", "hash", "sig")
_CHAIN = RESERVED[:-1]  # every entry has these; "sig" only in a signed log


class AuditError(ValueError):
    """The log cannot be appended to safely (damaged tail, second writer, failed write)."""


class VerifyReport(NamedTuple):
    """Result of `verify`. On failure `entries` counts the intact entries before the bad line."""

    ok: bool
    entries: int
    first_bad_line: Optional[int]
    reason: str


def sha256_hex(data: bytes) -> str:
    """Digest of an update's bytes, to record what was sent or received without the data itself."""
    return hashlib.sha256(data).hexdigest()


def _entry_hash(entry: dict) -> str:
    """Hash of the canonical form, so key order and whitespace in the file do not matter."""
    canonical = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return sha256_hex(canonical.encode("utf-8"))


class _BadJSON(ValueError):
    pass


def _no_duplicates(pairs):
    # A duplicate key would let a reader see one value while the hash covers another.
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _BadJSON(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _no_constant(name):
    raise _BadJSON(f"{name} is not valid JSON")


def _parse_line(raw: bytes) -> tuple[Optional[dict], str]:
    """Parse and self-check one line: (entry, "") or (None, why). Chain links are checked by the caller."""
    if not raw.endswith(b"\n"):
        return None, "truncated entry (no newline at end; interrupted write?)"
    try:
        entry = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _BadJSON as e:
        return None, f"not valid JSON ({e})"
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None, "not valid JSON"
    if not isinstance(entry, dict):
        return None, "not a JSON object"
    missing = [key for key in _CHAIN if key not in entry]
    if missing:
        return None, f"missing key(s): {', '.join(missing)}"
    if type(entry["seq"]) is not int:
        return None, f"seq must be an integer, got {entry['seq']!r}"
    for key in ("time", "actor", "event", "prev", "hash"):
        if not isinstance(entry[key], str):
            return None, f"{key} must be a string, got {entry[key]!r}"
    stored, sig = entry.pop("hash"), entry.pop("sig", None)
    if _entry_hash(entry) != stored:
        return None, "hash mismatch (entry edited)"
    entry["hash"] = stored
    if sig is not None:
        entry["sig"] = sig
    return entry, ""


def _load_key(signing_key):
    """A private key object from itself or a PEM file's path."""
    if signing_key is None or hasattr(signing_key, "sign"):
        return signing_key
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(Path(signing_key).read_bytes(), password=None)


def _sign(key, entry_hash: str) -> str:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    return key.sign(bytes.fromhex(entry_hash), ec.ECDSA(hashes.SHA256())).hex()


def _public_key(certificate):
    """The public key of a PEM certificate (a path) or of a key object."""
    if hasattr(certificate, "verify"):
        return certificate
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(certificate).read_bytes()).public_key()


def _signed_by(public_key, entry: dict) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        public_key.verify(bytes.fromhex(entry.get("sig") or ""), bytes.fromhex(entry["hash"]), ec.ECDSA(hashes.SHA256()))
        return True
    except (InvalidSignature, ValueError, TypeError):
        return False


def _last_line(path: Path) -> tuple[int, bytes]:
    """(number of lines, last line) without holding the whole file in memory."""
    count, last = 0, b""
    with open(path, "rb") as f:
        for count, last in enumerate(f, 1):
            pass
    return count, last


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Appends hash-chained entries to `path`, continuing an existing chain.

    Opening refuses a file whose last line is damaged: appending after it would fork the
    chain and hide where it broke. Each entry is one ``write`` of the whole line, so a
    crashed process leaves the whole entry or none (a torn tail is then refused, not
    papered over). A ``durable`` entry (the default) is also fsynced, which makes every
    entry before it durable too: callers fsync at the points that matter (data about to
    leave, a round closed) rather than on every line, since fsync costs milliseconds.
    Thread-safe; on POSIX an exclusive lock also keeps a second writer (process or
    AuditLog) off the same file.
    """

    def __init__(self, path, actor: str, signing_key=None):
        self._key = _load_key(signing_key)
        if not isinstance(actor, str) or not actor:
            raise ValueError(f"actor must be a non-empty string, got {actor!r}")
        self.path = Path(path)
        self.actor = actor
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise AuditError(f"{self.path}: already open for writing by another AuditLog or process") from None
            lines, last = _last_line(self.path)
            if lines:
                entry, why = _parse_line(last)
                if entry is None:
                    raise AuditError(
                        f"{self.path}: line {lines}: {why}; refusing to append (it would fork the chain). "
                        f"Run `nordfl audit verify {self.path}` and repair or archive the file."
                    )
                self._seq, self._prev = entry["seq"], entry["hash"]
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    @property
    def seq(self) -> int:
        """Seq of the last entry in the file (0 if none)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        """Hash of the last entry (64 zeros if none): countersign or ship it to pin the log."""
        return self._prev

    def record(self, event: str, *, durable: bool = True, **fields) -> dict:
        """Append one entry and return it (with its hash) once it is written; with ``durable``
        once it (and all before it) is on disk. Without, a process crash still keeps it; a
        power loss may drop it, with the entries after the last durable one."""
        if not isinstance(event, str) or not event:
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise ValueError(f"field name(s) {', '.join(clash)} are reserved by the audit log: {', '.join(RESERVED)}")
        try:
            # Round-trip so the hash is over exactly what `verify` will read back (tuples, int keys...).
            fields = json.loads(json.dumps(fields, ensure_ascii=False, allow_nan=False))
        except (TypeError, ValueError) as e:
            raise TypeError(f"audit fields must be JSON-serialisable (use sha256_hex for bytes): {e}") from None
        with self._lock:
            if self._fd is None:
                raise AuditError(f"{self.path}: audit log is closed")
            entry = {"seq": self._seq + 1, "time": _now(), "actor": self.actor, "event": event, **fields, "prev": self._prev}
            entry["hash"] = _entry_hash(entry)
            if self._key is not None:
                entry["sig"] = _sign(self._key, entry["hash"])
            line = (json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            try:
                written = os.write(self._fd, line)
                if written != len(line):
                    raise OSError(f"short write ({written} of {len(line)} bytes)")
                if durable:
                    os.fsync(self._fd)
            except OSError as e:
                # The tail may now be torn; further appends would build on it. Stop here.
                os.close(self._fd)
                self._fd = None
                raise AuditError(f"{self.path}: write failed, log closed: {e}") from e
            self._seq, self._prev = entry["seq"], entry["hash"]
        return entry

    def close(self) -> None:
        """Release the file (and its lock). Safe to call twice."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "AuditLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _verify(path, certificate=None) -> tuple[VerifyReport, str]:
    """`verify` plus the last hash, which `verify_main` prints."""
    path = Path(path)
    public_key = None if certificate is None else _public_key(certificate)
    prev, entries = GENESIS, 0
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                entry, why = _parse_line(raw)
                if entry is None:
                    return VerifyReport(False, entries, line_no, why), prev
                if entry["prev"] != prev:
                    if line_no == 1:
                        why = "prev is not 64 zeros (earlier entries removed?)"
                    else:
                        why = f"prev does not match line {line_no - 1}'s hash (entry removed or reordered)"
                    return VerifyReport(False, entries, line_no, why), prev
                if entry["seq"] != line_no:
                    return VerifyReport(False, entries, line_no, f"seq {entry['seq']}, expected {line_no}"), prev
                if public_key is not None and not _signed_by(public_key, entry):
                    why = "unsigned" if "sig" not in entry else "signature does not verify with the writer's certificate"
                    return VerifyReport(False, entries, line_no, f"{why} (entry forged or re-hashed)"), prev
                prev, entries = entry["hash"], line_no
    except OSError as e:
        return VerifyReport(False, 0, None, f"cannot read {path}: {e.strerror or e}"), prev
    if not entries:
        return VerifyReport(False, 0, None, f"{path} is empty: no entries (emptied or truncated?)"), prev
    return VerifyReport(True, entries, None, "chain intact" + (", every entry signed" if public_key else "")), prev


def verify(path, certificate=None) -> VerifyReport:
    """Check every hash, prev link and seq from line 1 (and, given the writer's ``certificate``, every
    signature); report the first broken line and why. An empty file is not intact."""
    return _verify(path, certificate)[0]


def read_entries(path) -> list[dict]:
    """A log's entries as written (no checks: ``verify`` is for that)."""
    with open(path, "rb") as f:
        return [json.loads(raw) for raw in f if raw.strip()]


def cross_check(site_log, coordinator_log) -> list[str]:
    """What the two logs say of each other that does not hold (empty: they agree).

    Every site head the coordinator recorded (``update_accepted.site_audit_head``) must be an entry
    in the site's log, and every coordinator head the site recorded (``update_result.coordinator_audit_head``)
    one in the coordinator's: a log cut after an exchange, or rewritten before it, loses that entry."""
    site, coordinator = read_entries(site_log), read_entries(coordinator_log)
    name = site[0]["actor"].removeprefix("site:") if site else None
    site_hashes = {e["hash"] for e in site}
    coordinator_hashes = {e["hash"] for e in coordinator}
    problems = []
    for e in coordinator:
        if e.get("event") == "update_accepted" and e.get("site") == name and e.get("site_audit_head") \
                and e["site_audit_head"] not in site_hashes:
            problems.append(f"coordinator entry {e['seq']} (round {e.get('round')}) holds site head {e['site_audit_head'][:16]}..., "
                            f"which is not in {site_log}: the site log was cut or rewritten")
    for e in site:
        head = e.get("coordinator_audit_head")
        if e.get("event") == "update_result" and head and head not in coordinator_hashes:
            problems.append(f"site entry {e['seq']} (round {e.get('round')}) holds coordinator head {head[:16]}..., "
                            f"which is not in {coordinator_log}: the coordinator log was cut or rewritten")
    return problems


def verify_main(path, certificate=None, peer=None) -> int:
    """One-line result for `nordfl audit verify LOG [--cert PEM] [--peer LOG]`; exit code 0 if intact, else 1.

    ``peer``: the other party's log (the coordinator's for a site's, or a site's for the coordinator's),
    cross-checked with ``cross_check``."""
    report, last_hash = _verify(path, certificate)
    if report.ok and peer is not None:
        first = read_entries(path)[0]
        pair = (path, peer) if first["actor"].startswith("site:") else (peer, path)
        problems = cross_check(*pair)
        if problems:
            for problem in problems:
                print(f"MISMATCH: {problem}")
            return 1
    if report.ok:
        crossed = f"; agrees with {peer}" if peer is not None else ""
        print(f"OK: {report.entries} entries, {report.reason}{crossed}, last hash {last_hash}")
        return 0
    if report.first_bad_line is None:
        print(f"ERROR: {report.reason}")
    else:
        print(f"BROKEN at line {report.first_bad_line}: {report.reason}")
    return 1
