"""Mutual TLS for a NordFL federation: who may talk to the coordinator, and how that is checked.

Every hospital ("site") dials out to one coordinator. Both ends prove who they are with
certificates issued by the federation's own certificate authority (CA), so no public CA and
no inbound firewall opening at the hospital are needed.

- ``provision`` creates the CA, the coordinator's certificate and one certificate per site.
  Ship ``sites/<site>/`` to that hospital and ``coordinator/`` to the coordinator; keep
  ``ca/ca.key`` offline, since whoever holds it can mint new site identities.
- The coordinator accepts only clients whose certificate the federation CA signed
  (``server_credentials``); sites accept only a coordinator the same CA signed
  (``channel_credentials``).
- A site's identity is its certificate's common name (CN). ``admit`` checks it against
  ``federation.json``, so ``revoke`` shuts a site out from its next call, without reissuing
  certificates or restarting the coordinator (``FederationWatcher``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import threading
from pathlib import Path
from typing import Iterable, NamedTuple, Optional

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nordfl.runtime.store import atomic_write_text

__all__ = [
    "Federation",
    "FederationWatcher",
    "admit",
    "channel_credentials",
    "load_federation",
    "peer_identity",
    "provision",
    "revoke",
    "server_credentials",
]

FEDERATION_FILE = "federation.json"
_SITE_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Spaces keep these out of the site-name alphabet, so no site can share the CN of the CA or coordinator.
_CA_NAME = "NordFL federation CA"
_COORDINATOR_NAME = "NordFL coordinator"
# Backdate certificates a little so a hospital clock that runs slow does not reject a fresh one.
_CLOCK_SKEW = datetime.timedelta(hours=1)


class Federation(NamedTuple):
    """Who belongs to the federation (``sites``) and who has been shut out (``revoked``)."""

    sites: frozenset[str]
    revoked: frozenset[str]


# ---------------------------------------------------------------------------------------------
# Provisioning


def provision(
    directory: str | os.PathLike,
    sites: Iterable[str],
    *,
    coordinator_hosts: Iterable[str] = ("localhost", "127.0.0.1"),
    valid_days: int = 825,
) -> Path:
    """Create a new federation under ``directory``: CA, coordinator and one identity per site.

    Layout: ``ca/{ca.pem,ca.key}``, ``coordinator/{cert.pem,key.pem,ca.pem}``,
    ``sites/<site>/{cert.pem,key.pem,ca.pem}`` and ``federation.json``. Private keys are
    created mode 0600 and directories 0700. ``coordinator_hosts`` are the DNS names or IP
    addresses sites will dial; the coordinator certificate is valid for exactly those.
    An existing federation is never overwritten: reissuing keys would lock every site out.
    """
    root = Path(directory)
    names = _check_site_names(sites)
    hosts = _check_hosts(coordinator_hosts)
    clash = sorted(set(names) & set(hosts))
    if clash:
        raise ValueError(
            f"site name {clash[0]!r} is also a coordinator host name; a site certificate must "
            "never match the address sites dial, pick another site name"
        )
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"valid_days must be a positive integer, got {valid_days!r}")
    for entry in ("ca", "coordinator", "sites", FEDERATION_FILE):
        if (root / entry).exists():
            raise FileExistsError(
                f"refusing to overwrite the existing federation at {root}: {root / entry} already exists "
                "(new keys would lock every site out; provision into an empty directory instead)"
            )

    # Build everything in memory first so a bad argument cannot leave half a federation on disk.
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + datetime.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca_certificate(ca_key, not_before, not_after)
    coord_key = ec.generate_private_key(ec.SECP256R1())
    coord_cert = _leaf_certificate(
        _COORDINATOR_NAME, coord_key, ca_key, ca_cert, not_before, not_after,
        usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=hosts,
    )
    site_identities = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf_certificate(
            name, key, ca_key, ca_cert, not_before, not_after, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        )
        site_identities[name] = (key, cert)

    ca_pem = _cert_pem(ca_cert)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _mkdir(root / "ca")
    _write(root / "ca" / "ca.pem", ca_pem)
    _write(root / "ca" / "ca.key", _key_pem(ca_key), private=True)
    _mkdir(root / "coordinator")
    _write(root / "coordinator" / "cert.pem", _cert_pem(coord_cert))
    _write(root / "coordinator" / "key.pem", _key_pem(coord_key), private=True)
    _write(root / "coordinator" / "ca.pem", ca_pem)
    _mkdir(root / "sites")
    for name, (key, cert) in site_identities.items():
        _mkdir(root / "sites" / name)
        _write(root / "sites" / name / "cert.pem", _cert_pem(cert))
        _write(root / "sites" / name / "key.pem", _key_pem(key), private=True)
        _write(root / "sites" / name / "ca.pem", ca_pem)
    _write_json_atomic(root / FEDERATION_FILE, {"sites": sorted(names), "revoked": []})
    return root


def _check_site_names(sites: Iterable[str]) -> list[str]:
    """Site names become certificate CNs and directory names, so only a safe alphabet is allowed."""
    if isinstance(sites, (str, bytes)):
        raise TypeError(f"sites must be a list of site names, got the single string {sites!r}")
    names = list(sites)
    if not names:
        raise ValueError("sites is empty: a federation needs at least one site")
    seen: dict[str, str] = {}
    for name in names:
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                f"invalid site name {name!r}: expected 1-64 characters from A-Z a-z 0-9 . _ - "
                "(and not '.' or '..')"
            )
        # Compare case-insensitively: on Windows and macOS disks "A" and "a" are the same folder.
        if name.lower() in seen:
            raise ValueError(f"duplicate site name {name!r} (clashes with {seen[name.lower()]!r})")
        seen[name.lower()] = name
    return names


def _check_hosts(hosts: Iterable[str]) -> list[str]:
    if isinstance(hosts, (str, bytes)):
        raise TypeError(f"coordinator_hosts must be a list of host names, got the single string {hosts!r}")
    hosts = list(hosts)
    if not hosts:
        raise ValueError("coordinator_hosts is empty: sites need at least one name to reach the coordinator")
    for host in hosts:
        if not isinstance(host, str) or not host or any(c.isspace() for c in host):
            raise ValueError(f"invalid coordinator host {host!r}: expected a DNS name or IP address")
    return hosts


def _ca_certificate(key, not_before, not_after) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CA_NAME)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _leaf_certificate(common_name, key, ca_key, ca_cert, not_before, not_after, *, usage, hosts=()):
    """A certificate for the coordinator (serverAuth) or one site (clientAuth), never both."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False
        )
    return builder.sign(ca_key, hashes.SHA256())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _mkdir(path: Path) -> None:
    os.mkdir(path, 0o700)  # fails if it exists: provisioning never reuses a directory


def _write(path: Path, data: bytes, *, private: bool = False) -> None:
    """Create ``path`` (never overwrite); a private key is 0600 from its first byte, not chmod-ed later."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_json_atomic(path: Path, obj) -> None:
    """A reader sees the old list or the new one, never half."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Membership: federation.json


def load_federation(directory: str | os.PathLike) -> Federation:
    """Read ``<directory>/federation.json``; a missing or malformed file is an error, never "no sites"."""
    return _read_federation(Path(directory))[1]


def _read_federation(directory: Path) -> tuple[dict, Federation]:
    path = directory / FEDERATION_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no federation at {directory}: {path} is missing (create one with provision())"
        ) from None
    data = _parse_json(path, raw)
    return data, _federation_from(path, data)


def _federation_from(path: Path, data: dict) -> Federation:
    return Federation(
        sites=frozenset(_name_list(path, data, "sites")),
        revoked=frozenset(_name_list(path, data, "revoked")),
    )


def _parse_json(path: Path, raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f'{path}: expected an object {{"sites": [...], "revoked": [...]}}, got {type(data).__name__}')
    return data


def _name_list(path: Path, data: dict, field: str) -> list[str]:
    if field not in data:
        raise ValueError(f"{path}: missing field {field!r} (expected a list of site names)")
    value = data[field]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: field {field!r} must be a list of site names (strings), got {value!r}")
    return value


def revoke(directory: str | os.PathLike, site: str) -> None:
    """Shut ``site`` out: the coordinator refuses it from its next call. Revoking twice is harmless.

    Revocation is enforced by the coordinator via ``admit``, not by TLS: the site's certificate
    stays valid for the handshake, so the coordinator must check ``admit`` on every call.
    """
    path = Path(directory) / FEDERATION_FILE
    data, federation = _read_federation(Path(directory))
    if site not in federation.sites:
        known = ", ".join(sorted(federation.sites)) or "(none)"
        raise ValueError(f"unknown site {site!r} in {path}; known sites: {known}")
    if site in federation.revoked:
        return
    data["revoked"] = sorted(federation.revoked | {site})  # any other fields stay as they were
    _write_json_atomic(path, data)


def admit(federation: Federation, identity: Optional[str]) -> tuple[bool, str]:
    """Decide whether a verified peer may use the coordinator: ``(True, "")`` or ``(False, reason)``."""
    if identity is None:
        return False, "no verified client certificate"
    if identity not in federation.sites:
        return False, f"site {identity!r} is not a member of this federation"
    if identity in federation.revoked:
        return False, f"site {identity!r} has been revoked"
    return True, ""


class FederationWatcher:
    """The coordinator's view of ``federation.json``, reloaded when the file changes.

    ``current()`` costs one ``stat`` when nothing changed, so it can run on every call; that is
    what makes ``nordfl revoke SITE`` effective without a restart. If the file becomes missing
    or malformed, ``current()`` raises rather than keep admitting sites from a stale list.
    """

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / FEDERATION_FILE
        self._lock = threading.Lock()
        self._stamp: Optional[tuple[int, int, int]] = None
        self._federation: Optional[Federation] = None
        self.current()  # a wrong path fails at start-up, not at the first site's call

    def current(self) -> Federation:
        with self._lock:
            stat = os.stat(self.path)  # raises FileNotFoundError naming the path
            # revoke() replaces the file, so the inode changes even when mtime's resolution is coarse.
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp or self._federation is None:
                # Read and stat the same open file, so the stamp always matches what was parsed.
                with open(self.path, "rb") as f:
                    stat = os.fstat(f.fileno())
                    federation = _federation_from(self.path, _parse_json(self.path, f.read()))
                self._federation = federation
                self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            return self._federation


# ---------------------------------------------------------------------------------------------
# gRPC


def _read(directory: Path, name: str, role: str) -> bytes:
    path = directory / name
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"missing {path}: expected a {role} directory created by provision() "
            "(with cert.pem, key.pem and ca.pem)"
        ) from None


def server_credentials(coordinator_dir: str | os.PathLike) -> grpc.ServerCredentials:
    """TLS for the coordinator: present its certificate and require a client certificate from the federation CA."""
    d = Path(coordinator_dir)
    return grpc.ssl_server_credentials(
        [(_read(d, "key.pem", "coordinator"), _read(d, "cert.pem", "coordinator"))],
        root_certificates=_read(d, "ca.pem", "coordinator"),
        require_client_auth=True,
    )


def channel_credentials(site_dir: str | os.PathLike) -> grpc.ChannelCredentials:
    """TLS for a site: present the site's certificate and trust only a coordinator from the federation CA."""
    d = Path(site_dir)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(d, "ca.pem", "site"),
        private_key=_read(d, "key.pem", "site"),
        certificate_chain=_read(d, "cert.pem", "site"),
    )


def peer_identity(context: grpc.ServicerContext) -> Optional[str]:
    """The site name (certificate CN) of the caller, or None without exactly one verified CN.

    Only meaningful on a server built with ``server_credentials``, where gRPC has already
    checked the certificate against the federation CA before the call reaches us.
    """
    names = context.auth_context().get("x509_common_name") or []
    if len(names) != 1:
        return None
    try:
        return names[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
