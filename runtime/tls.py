"""Mutual TLS for a NordFL federation: who may talk to the coordinator, and how that is checked.

Every hospital ("site") dials out to one coordinator. Both ends prove who they are with
certificates issued by the federation's own certificate authority (CA), so no public CA and
no inbound firewall opening at the hospital are needed.

- ``provision`` creates the CA, the coordinator's certificate and one certificate per site.
  Ship ``sites/<site>/`` to that hospital and ``coordinator/`` to the coordinator; keep
  ``ca/ca.key`` offline, since whoever holds it can mint new site identities.
- The coordinator accepts only clients presenting a current member's own pinned certificate (each one
  the federation CA signed; ``server_credentials``, ``MemberTrust``), so a revoked or superseded key
  fails the handshake; sites accept only a coordinator the same CA signed (``channel_credentials``).
- A site's identity is its certificate's common name (CN). ``admit`` checks it against
  ``federation.json``, so ``revoke`` shuts a site out from its next call, without reissuing
  certificates or restarting the coordinator (``FederationWatcher``). ``federation.json`` also pins
  each site's current certificate (its SHA-256), so a certificate replaced by a renewal is refused.
- ``approve`` issues a certificate for a request a site made itself (``nordfl.runtime.enrol``), so a
  site's private key never leaves the hospital; it adds a site or renews one without touching the others.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import json
import os
import re
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Iterable, Mapping, NamedTuple, Optional

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nordfl.runtime.store import atomic_write_text

__all__ = [
    "Federation",
    "FederationWatcher",
    "Peer",
    "admit",
    "approve",
    "certificate_sha256",
    "channel_credentials",
    "key_fingerprint",
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
    """Who belongs to the federation (``sites``), who has been shut out (``revoked``), and each site's
    current certificate (``certificates``: site -> SHA-256 of the certificate; a site without a pin is
    admitted on its CN alone, as federations made before pinning were)."""

    sites: frozenset[str]
    revoked: frozenset[str]
    certificates: Mapping[str, str] = MappingProxyType({})
    admins: Mapping[str, str] = MappingProxyType({})  # admin -> its certificate's SHA-256: who may submit jobs


class Peer(str):
    """A verified caller's site name (its certificate's CN) that remembers which certificate proved it."""

    certificate_sha256: Optional[str] = None

    def __new__(cls, name: str, certificate_sha256: Optional[str]):
        peer = super().__new__(cls, name)
        peer.certificate_sha256 = certificate_sha256
        return peer


# ---------------------------------------------------------------------------------------------
# Provisioning


def provision(
    directory: str | os.PathLike,
    sites: Iterable[str],
    *,
    coordinator_hosts: Iterable[str] = ("localhost", "127.0.0.1"),
    valid_days: int = 825,
) -> Path:
    """Create a new federation under ``directory``: CA, coordinator and one identity per site (none: the
    sites then enrol themselves with their own keys, ``approve``).

    Layout: ``ca/{ca.pem,ca.key}``, ``coordinator/{cert.pem,key.pem,ca.pem}``,
    ``sites/<site>/{cert.pem,key.pem,ca.pem}`` and ``federation.json``. Private keys are
    created mode 0600 and directories 0700. ``coordinator_hosts`` are the DNS names or IP
    addresses sites will dial; the coordinator certificate is valid for exactly those.
    An existing federation is never overwritten: reissuing keys would lock every site out.
    """
    root = Path(directory)
    names = check_site_names(sites, allow_empty=True)
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
    pins = {name: certificate_sha256(cert) for name, (key, cert) in site_identities.items()}

    ca_pem = _cert_pem(ca_cert)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _mkdir(root / "ca")
    create_file(root / "ca" / "ca.pem", ca_pem)
    create_file(root / "ca" / "ca.key", private_key_pem(ca_key), private=True)
    _mkdir(root / "coordinator")
    create_file(root / "coordinator" / "cert.pem", _cert_pem(coord_cert))
    create_file(root / "coordinator" / "key.pem", private_key_pem(coord_key), private=True)
    create_file(root / "coordinator" / "ca.pem", ca_pem)
    _mkdir(root / "sites")
    for name, (key, cert) in site_identities.items():
        _mkdir(root / "sites" / name)
        create_file(root / "sites" / name / "cert.pem", _cert_pem(cert))
        create_file(root / "sites" / name / "key.pem", private_key_pem(key), private=True)
        create_file(root / "sites" / name / "ca.pem", ca_pem)
    _write_json_atomic(root / FEDERATION_FILE, {"sites": sorted(names), "revoked": [], "certificates": pins})
    return root


def check_site_names(sites: Iterable[str], *, allow_empty: bool = False) -> list[str]:
    """Site names become certificate CNs and directory names, so only a safe alphabet is allowed."""
    if isinstance(sites, (str, bytes)):
        raise TypeError(f"sites must be a list of site names, got the single string {sites!r}")
    names = list(sites)
    if not names and not allow_empty:
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
    """A certificate for the coordinator (serverAuth) or one site (clientAuth), never both.
    ``key`` is the holder's private key or, for a site's own request, its public key."""
    public_key = key.public_key() if hasattr(key, "public_key") else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
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


def certificate_sha256(cert: x509.Certificate) -> str:
    """The certificate's SHA-256 (of its DER form), as lower-case hex: what federation.json pins."""
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_der(key) -> bytes:
    """A public key (or a private key's public half) as DER SubjectPublicKeyInfo: what "the same key" compares."""
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``ca`` signed ``cert`` (issuer name and signature)."""
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # cryptography raises ValueError, TypeError or InvalidSignature: not this CA's either way
        return False
    return True


def key_fingerprint(public_key) -> str:
    """A public key's SHA-256 (of its DER SubjectPublicKeyInfo), in groups of four hex digits, to read out
    over the phone: the site and the admin compare it before a request is approved."""
    digest = hashlib.sha256(public_key_der(public_key)).hexdigest().upper()
    return " ".join(digest[i:i + 4] for i in range(0, len(digest), 4))


def normalise_fingerprint(text: str) -> str:
    """Spaces, colons and letter case do not matter when a fingerprint is typed back in."""
    return re.sub(r"[\s:]", "", str(text)).upper()


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _mkdir(path: Path) -> None:
    os.mkdir(path, 0o700)  # fails if it exists: provisioning never reuses a directory


def create_file(path: Path, data: bytes, *, private: bool = False) -> None:
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
        certificates=MappingProxyType(_pins(path, data, "certificates")),
        admins=MappingProxyType(_pins(path, data, "admins")),
    )


def _pins(path: Path, data: dict, field: str) -> dict[str, str]:
    pins = data.get(field, {})
    if not isinstance(pins, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in pins.items()):
        raise ValueError(f"{path}: field {field!r} must map names to certificate SHA-256s "
                         f"(64 lower-case hex digits), got {str(pins)[:200]}")
    return dict(pins)


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

    Enforced twice: a coordinator's TLS (``MemberTrust``) stops trusting the site's certificate for new
    handshakes, and ``admit``, checked on every call, refuses a connection the site opened before.
    """
    path = Path(directory) / FEDERATION_FILE
    data, federation = _read_federation(Path(directory))
    if site in federation.admins:  # an admin is unpinned: its signature no longer counts
        data["admins"] = {name: pin for name, pin in federation.admins.items() if name != site}
        _write_json_atomic(path, data)
        return
    if site not in federation.sites:
        known = ", ".join(sorted(federation.sites)) or "(none)"
        raise ValueError(f"unknown site {site!r} in {path}; known sites: {known}")
    if site in federation.revoked:
        return
    data["revoked"] = sorted(federation.revoked | {site})  # any other fields stay as they were
    _write_json_atomic(path, data)


class Approval(NamedTuple):
    """What ``approve`` issued: to send back to the site are ``folder``'s ``cert.pem`` and ``ca.pem``."""

    site: str
    folder: Path
    renewed: bool
    not_after: datetime.datetime
    certificate_sha256: str
    role: str = "site"


ROLES = ("site", "admin")


def approve(directory: str | os.PathLike, request_pem: bytes, fingerprint: str, *, valid_days: int = 825,
            role: str = "site") -> Approval:
    """Sign a site's own certificate request with the federation CA: adds the site, or renews it. With
    ``role="admin"`` the request is a study lead's: the certificate goes to ``admins/<name>/`` and is pinned
    under ``admins`` (it may sign jobs for a coordinator service; it is not a site and cannot join a job).

    ``fingerprint`` is the request's key fingerprint as the site read it out over another channel
    (phone, video call); a request whose key does not match it is refused, so a request swapped in
    transit is never signed. The certificate goes to ``sites/<site>/`` (``cert.pem``, ``ca.pem``; no
    key, which stays at the site), and federation.json gains the site and pins the new certificate,
    which also retires a renewed site's old one. No other site's files change. Needs ``ca/ca.key``.
    """
    root = Path(directory)
    try:
        ca_key = serialization.load_pem_private_key((root / "ca" / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((root / "ca" / "ca.pem").read_bytes())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"approve needs the federation CA: {e.filename} is missing (run it where ca/ca.key "
                                "is kept, on the folder `nordfl provision` made)") from None
    try:
        request = x509.load_pem_x509_csr(request_pem)
    except ValueError:
        raise ValueError("request: not a PEM certificate request (expected the request.pem `nordfl site init` "
                         "wrote)") from None
    if not request.is_signature_valid:
        raise ValueError("request: its signature does not match its key; it was altered, refuse it")
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ValueError(f"request: expected exactly one common name (the site name), got {len(names)}")
    site = check_site_names([names[0].value])[0]
    actual = key_fingerprint(request.public_key())
    if normalise_fingerprint(fingerprint) != normalise_fingerprint(actual):
        raise ValueError(f"fingerprint mismatch for {site!r}: the request's key is {actual}, but the site read out "
                         f"{fingerprint!r}; do not approve it, ask the site to check its request")
    if isinstance(valid_days, bool) or not isinstance(valid_days, int) or valid_days < 1:
        raise ValueError(f"valid_days must be a positive integer, got {valid_days!r}")
    if role not in ROLES:
        raise ValueError(f"role {role!r}: expected one of {', '.join(ROLES)}")
    data, federation = _read_federation(root)
    others = federation.sites if role == "admin" else federation.admins
    if any(name.lower() == site.lower() for name in others):
        raise ValueError(f"{role} name {site!r} is already {'a site' if role == 'admin' else 'an admin'}'s name: "
                         "sites and admins need names of their own")
    if site in federation.revoked:
        raise ValueError(f"site {site!r} has been revoked; a revoked name is never admitted again, enrol the "
                         "hospital under a new name")
    clash = [s for s in (federation.sites if role == "site" else federation.admins) if s.lower() == site.lower() and s != site]
    if clash:
        raise ValueError(f"site name {site!r} clashes with the existing site {clash[0]!r} (names are compared "
                         "regardless of letter case)")
    coordinator = root / "coordinator" / "cert.pem"
    if coordinator.exists():
        san = x509.load_pem_x509_certificate(coordinator.read_bytes()).extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        hosts = {str(h.value) for h in san}
        if site in hosts:
            raise ValueError(f"site name {site!r} is also a coordinator host name; pick another site name")

    now = datetime.datetime.now(datetime.timezone.utc)
    cert = _leaf_certificate(site, request.public_key(), ca_key, ca_cert, now - _CLOCK_SKEW,
                             now + datetime.timedelta(days=valid_days), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    folder = root / ("sites" if role == "site" else "admins") / site
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_text(folder / "cert.pem", _cert_pem(cert).decode())
    atomic_write_text(folder / "ca.pem", _cert_pem(ca_cert).decode())
    stale_key = folder / "key.pem"  # a central copy from `provision` no longer matches the site's certificate
    if stale_key.exists():
        stale_key.unlink()
    sha256 = certificate_sha256(cert)
    if role == "site":
        renewed = site in federation.sites
        data["sites"] = sorted(federation.sites | {site})
        data["certificates"] = dict(federation.certificates) | {site: sha256}
    else:
        renewed = site in federation.admins
        data["admins"] = dict(federation.admins) | {site: sha256}
    _write_json_atomic(root / FEDERATION_FILE, data)
    with open(root / "issued.jsonl", "a") as log:  # the admin's own record of what was signed, and when
        log.write(json.dumps({"time": now.isoformat(), "site": site, "role": role, "renewed": renewed,
                              "key_fingerprint": actual, "certificate_sha256": sha256,
                              "not_after": cert.not_valid_after_utc.isoformat()}) + "\n")
    return Approval(site, folder, renewed, cert.not_valid_after_utc, sha256, role)


def admit(federation: Federation, identity: Optional[str]) -> tuple[bool, str]:
    """Decide whether a verified peer may use the coordinator: ``(True, "")`` or ``(False, reason)``.

    A caller known by its TLS certificate (a ``Peer``, as ``peer_identity`` gives) whose site has a pinned
    certificate in federation.json must present exactly that one: a certificate replaced by a renewal is
    refused. A plain name (``--insecure``, where there is no certificate) is checked by name only.
    """
    if identity is None:
        return False, "no verified client certificate"
    if identity not in federation.sites:
        return False, f"site {identity!r} is not a member of this federation"
    if identity in federation.revoked:
        return False, f"site {identity!r} has been revoked"
    pin = federation.certificates.get(identity)
    if isinstance(identity, Peer) and pin is not None and identity.certificate_sha256 != pin:
        return False, (f"site {identity!r} presented a certificate that is no longer its current one "
                       f"(sha256 {str(identity.certificate_sha256)[:16]}..., current {pin[:16]}...): it was renewed "
                       "or replaced; install the new certificate at the site")
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


def member_certificates(directory: str | os.PathLike) -> Optional[bytes]:
    """The PEM certificates of every member the coordinator admits now: each site not revoked and each admin,
    with exactly its pinned certificate, from the federation folder (``sites/<name>/cert.pem``,
    ``admins/<name>/cert.pem``), each issued by the federation CA.

    None when a member has no such certificate here (a folder that holds only federation.json and the CA,
    a member without a pin, or a pin the file does not match): its key could not be trusted by name.
    """
    directory = Path(directory)
    federation = load_federation(directory)
    ca = x509.load_pem_x509_certificate(_read(directory / "coordinator", "ca.pem", "coordinator"))
    members = [("sites", name, federation.certificates.get(name)) for name in sorted(federation.sites - federation.revoked)]
    members += [("admins", name, pin) for name, pin in sorted(federation.admins.items())]
    pems = []
    for folder, name, pin in members:
        try:
            pem = (directory / folder / name / "cert.pem").read_bytes()
            cert = x509.load_pem_x509_certificate(pem)
        except (OSError, ValueError):
            return None
        if pin is None or certificate_sha256(cert) != pin or not issued_by(cert, ca):
            return None
        pems.append(pem)
    return b"".join(pems) or None


class MemberTrust:
    """The coordinator's TLS trust anchors: the members' own pinned certificates (``member_certificates``), so a
    revoked member's or a superseded key fails the handshake itself and never holds a connection. Rebuilt when
    federation.json changes (a revocation, a renewal, a new site), without a restart. Where the members'
    certificates are not all here, the CA is the anchor and the per-call ``admit`` alone refuses them."""

    def __init__(self, coordinator_dir: Path):
        self.coordinator_dir = coordinator_dir
        self.federation_dir = coordinator_dir.parent
        self._lock = threading.Lock()
        self._stamp: Optional[tuple] = None

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        d = self.coordinator_dir
        members = member_certificates(self.federation_dir)
        return grpc.ssl_server_certificate_configuration(
            [(_read(d, "key.pem", "coordinator"), _read(d, "cert.pem", "coordinator"))],
            root_certificates=members if members is not None else _read(d, "ca.pem", "coordinator"))

    def _current_stamp(self) -> tuple:
        stat = os.stat(self.federation_dir / FEDERATION_FILE)
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def initial(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            self._stamp = self._current_stamp()
            return self._configuration()

    def fetch(self) -> Optional[grpc.ServerCertificateConfiguration]:
        """gRPC calls this before each handshake: a new configuration when federation.json changed, else None."""
        with self._lock:
            try:
                stamp = self._current_stamp()
                if stamp == self._stamp:
                    return None
                configuration = self._configuration()
            except (OSError, ValueError):
                return None  # a missing or half-written file: keep the last good trust list; admit() still checks
            self._stamp = stamp
            return configuration


def server_credentials(coordinator_dir: str | os.PathLike) -> grpc.ServerCredentials:
    """TLS for the coordinator: present its certificate and require a client certificate of a current member
    (``MemberTrust``; where the folder does not hold the members' certificates, any from the federation CA)."""
    d = Path(coordinator_dir)
    if not (d.parent / FEDERATION_FILE).exists():  # a coordinator folder on its own: the CA is the anchor
        return grpc.ssl_server_credentials(
            [(_read(d, "key.pem", "coordinator"), _read(d, "cert.pem", "coordinator"))],
            root_certificates=_read(d, "ca.pem", "coordinator"),
            require_client_auth=True,
        )
    trust = MemberTrust(d)
    return grpc.dynamic_ssl_server_credentials(trust.initial(), trust.fetch, require_client_authentication=True)


def channel_credentials(site_dir: str | os.PathLike) -> grpc.ChannelCredentials:
    """TLS for a site: present the site's certificate and trust only a coordinator from the federation CA."""
    d = Path(site_dir)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(d, "ca.pem", "site"),
        private_key=_read(d, "key.pem", "site"),
        certificate_chain=_read(d, "cert.pem", "site"),
    )


def peer_identity(context: grpc.ServicerContext) -> Optional[Peer]:
    """The site name (certificate CN) of the caller with its certificate's SHA-256, or None without
    exactly one verified CN.

    Only meaningful on a server built with ``server_credentials``, where gRPC has already
    checked the certificate against the federation CA before the call reaches us.
    """
    auth = context.auth_context()
    names = auth.get("x509_common_name") or []
    certs = auth.get("x509_pem_cert") or []
    if len(names) != 1:
        return None
    try:
        name = names[0].decode("utf-8")
    except UnicodeDecodeError:
        return None
    sha256 = certificate_sha256(x509.load_pem_x509_certificate(certs[0])) if len(certs) == 1 else None
    return Peer(name, sha256)
