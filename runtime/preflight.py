"""``nordfl preflight``: what a hospital's IT checks before a site goes live, each in plain words.

The software (Python, NordFL, JAX computing here), the certificates (present, this site's, matching its
key, signed by the federation CA, valid by this machine's clock and not about to expire), the data (read
and checked under the site's mapping, exactly as the agent will), the privacy policy, and the coordinator
(reachable outbound and completing the mutual-TLS handshake). Nothing is sent to the coordinator: the
handshake proves the network path and both certificates, not membership (revocation is checked at Join).
"""

from __future__ import annotations

import datetime
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Callable, NamedTuple, Optional

__all__ = ["Check", "preflight"]

FAIL, WARN, OK = "FAIL", "WARN", "OK"


class Check(NamedTuple):
    """One line of the report: ``status`` is OK, WARN or FAIL."""

    status: str
    what: str
    detail: str


def preflight(name: str, certs: Optional[Path], coordinator: Optional[str], load_data: Callable[[], str],
              policy: Optional[Path] = None, timeout: float = 10.0) -> list[Check]:
    """Runs every check (none stops the others) and returns them in order. ``load_data`` reads and checks
    the site's data and returns a one-line summary (it raises on bad data)."""
    checks = [_software()]
    checks += _certificates(name, certs) if certs is not None else [Check(WARN, "certificates", "no --certs given: not checked")]
    checks.append(_data(load_data))
    if policy is not None:
        checks.append(_policy(policy))
    if coordinator is not None:
        checks += _coordinator(coordinator, certs, timeout)
    return checks


def _software() -> Check:
    try:
        import jax
        import jax.numpy as jnp

        value = float(jnp.sum(jnp.arange(4.0)))  # XLA compiles and runs here
        backend = jax.default_backend()
    except Exception as e:  # any failure to compute is the finding
        return Check(FAIL, "software", f"JAX cannot compute here: {e}")
    if value != 6.0:
        return Check(FAIL, "software", f"JAX computed {value} for 0+1+2+3")
    return Check(OK, "software", f"Python {platform.python_version()}, NordFL {metadata.version('nordfl')}, "
                                 f"JAX {jax.__version__} on {backend}")


def _certificates(name: str, folder: Path) -> list[Check]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.x509.oid import NameOID

    from nordfl.runtime import tls
    from nordfl.runtime.enrol import WARN_DAYS

    try:
        cert = x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())
        ca = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "key.pem").read_bytes(), password=None)
    except FileNotFoundError as e:
        return [Check(FAIL, "certificates", f"{e.filename} is missing (run `nordfl site init`, then install the "
                                            "certificate the admin sends back with `nordfl site install`)")]
    except ValueError as e:
        return [Check(FAIL, "certificates", f"a file in {folder} is not a PEM certificate or key: {e}")]
    checks = []
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cn[0].value if cn else None
    same_key = tls.public_key_der(cert.public_key()) == tls.public_key_der(key)
    signed = tls.issued_by(cert, ca)
    if cn != name:
        checks.append(Check(FAIL, "certificates", f"the certificate is for {cn!r}, not {name!r}: the coordinator would "
                                                  "refuse this site's requests"))
    if not same_key:
        checks.append(Check(FAIL, "certificates", "key.pem does not belong to cert.pem (a renewal half installed?)"))
    if not signed:
        checks.append(Check(FAIL, "certificates", "cert.pem was not signed by ca.pem: not this federation's certificate"))
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if now < start:
        checks.append(Check(FAIL, "clock", f"this machine's clock ({now:%Y-%m-%d %H:%M} UTC) is before the certificate's "
                                           f"start ({start:%Y-%m-%d %H:%M} UTC): set the clock (NTP)"))
    elif now > end:
        checks.append(Check(FAIL, "certificates", f"the certificate expired on {end:%Y-%m-%d}: renew it"))
    elif end - now < datetime.timedelta(days=WARN_DAYS):
        checks.append(Check(WARN, "certificates", f"the certificate expires on {end:%Y-%m-%d}, in {(end - now).days} "
                                                  "day(s): renew it now (`nordfl site init --renew`)"))
    if not checks:
        checks.append(Check(OK, "certificates", f"{name}'s certificate matches its key, is signed by the federation CA "
                                                f"and is valid until {end:%Y-%m-%d} by this machine's clock"))
    return checks


def _data(load_data: Callable[[], str]) -> Check:
    try:
        return Check(OK, "data", load_data())
    except Exception as e:  # the site-data, study and mapping errors name the file, column and row
        return Check(FAIL, "data", str(e))


def _policy(path: Path) -> Check:
    from nordfl.runtime.policy import PolicyError, load_policy

    try:
        policy = load_policy(path)
    except (PolicyError, FileNotFoundError) as e:
        return Check(FAIL, "policy", str(e))
    return Check(OK, "policy", f"{path} (sha256 {policy.sha256[:16]}...): {len(policy.rules())} rule(s)")


def _coordinator(address: str, certs: Optional[Path], timeout: float) -> list[Check]:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as e:
        return [Check(FAIL, "network", f"cannot open a TCP connection to {address} ({e}): check the address, DNS, "
                                       "and that the hospital's firewall lets this machine dial out to it")]
    checks = [Check(OK, "network", f"{address} accepts TCP connections from here")]
    if certs is None:
        return checks
    import grpc

    from nordfl.runtime import tls

    channel = grpc.secure_channel(address, tls.channel_credentials(certs))
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
        checks.append(Check(OK, "coordinator", f"mutual TLS with {address} works: it presented the federation's "
                                               "coordinator certificate and accepted this site's"))
    except grpc.FutureTimeoutError:
        checks.append(Check(FAIL, "coordinator", f"the TLS handshake with {address} did not complete in {timeout:g} s: "
                                                 "the name dialled must be in the coordinator's certificate, and a proxy "
                                                 "must not inspect the TLS traffic"))
    finally:
        channel.close()
    return checks
