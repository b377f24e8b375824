"""A site's side of its certificate: the key made and kept at the hospital, a request for the federation
admin, installing the certificate that comes back, and warnings before it expires.

    nordfl site init --name Oslo --certs certs/          key.pem (never leaves) + request.pem (to the admin)
    nordfl admin approve FED certs/request.pem --fingerprint '...'   (the admin, with the CA key; ``tls.approve``)
    nordfl site install --certs certs/ cert.pem --ca ca.pem           the signed certificate, checked against the key

Renewal is the same with ``site init --renew``: a new key and request under ``renew/``, which replace the
current pair only when the new certificate is installed, so the site keeps working until then.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import NamedTuple, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nordfl.runtime import tls
from nordfl.runtime.store import atomic_write_text

__all__ = ["Request", "expiry_warning", "install_certificate", "request_certificate"]

RENEW_DIR = "renew"
WARN_DAYS = 30
"""Start-up warns when a certificate has fewer days left than this."""


class Request(NamedTuple):
    """A certificate request made at a site: send ``path`` to the admin, read ``fingerprint`` out to them."""

    site: str
    path: Path
    fingerprint: str


def request_certificate(certs_dir: str | os.PathLike, site: str, *, renew: bool = False) -> Request:
    """Makes the site's private key (mode 0600, in ``certs_dir``) and a certificate request for it.

    With ``renew`` the new pair goes to ``certs_dir/renew/`` and the current key and certificate stay in
    use until ``install_certificate`` swaps them. An existing key is never overwritten.
    """
    site = tls.check_site_names([site])[0]
    folder = Path(certs_dir)
    target = folder / RENEW_DIR if renew else folder
    if renew and not (folder / "cert.pem").exists():
        raise FileNotFoundError(f"nothing to renew: {folder / 'cert.pem'} is missing (run `nordfl site init` "
                                "without --renew for a first certificate)")
    if (target / "key.pem").exists():
        what = "a renewal is already pending" if renew else "this site already has a key"
        raise FileExistsError(f"{what}: {target / 'key.pem'} exists and is never overwritten (install the "
                              f"certificate for it, or {'delete ' + str(target) if renew else 'use --renew'})")
    key = ec.generate_private_key(ec.SECP256R1())
    request = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site)]))
               .sign(key, hashes.SHA256()))
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls.create_file(target / "key.pem", tls.private_key_pem(key), private=True)
    atomic_write_text(target / "request.pem", request.public_bytes(serialization.Encoding.PEM).decode())
    return Request(site, target / "request.pem", tls.key_fingerprint(key.public_key()))


def install_certificate(certs_dir: str | os.PathLike, cert_pem: bytes, ca_pem: Optional[bytes] = None) -> x509.Certificate:
    """Installs the certificate the admin sent back, after checking it belongs to this site's key (the
    current one, or a pending renewal's) and was signed by the federation CA (``ca_pem``, or the
    ``ca.pem`` already installed). A renewal's key then replaces the old one."""
    folder = Path(certs_dir)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise ValueError("certificate: not a PEM certificate (expected the cert.pem the admin sent)") from None
    installed_ca = folder / "ca.pem"
    if ca_pem is None:
        if not installed_ca.exists():
            raise FileNotFoundError(f"no CA certificate: give the federation's ca.pem (--ca); {installed_ca} is missing")
        ca_pem = installed_ca.read_bytes()
    elif installed_ca.exists() and installed_ca.read_bytes() != ca_pem:
        raise ValueError(f"the CA certificate given differs from {installed_ca}: this certificate is from another "
                         "federation; refusing to replace the federation this site trusts")
    if not tls.issued_by(cert, x509.load_pem_x509_certificate(ca_pem)):
        raise ValueError("certificate: not signed by the federation CA (ca.pem); refusing it")
    pending = folder / RENEW_DIR / "key.pem"
    for key_path in (pending, folder / "key.pem"):
        if key_path.exists() and tls.public_key_der(_private_key(key_path)) == tls.public_key_der(cert.public_key()):
            break
    else:
        raise ValueError(f"certificate: issued for another key than this site's ({folder / 'key.pem'}"
                         f"{' or ' + str(pending) if pending.exists() else ''}); was it meant for another site?")
    atomic_write_text(installed_ca, ca_pem.decode())
    if key_path == pending:
        os.replace(pending, folder / "key.pem")  # the new key first: a crash here leaves a request to re-approve
        (folder / RENEW_DIR / "request.pem").unlink(missing_ok=True)
        (folder / RENEW_DIR).rmdir()
    atomic_write_text(folder / "cert.pem", cert_pem.decode())
    (folder / "request.pem").unlink(missing_ok=True)  # answered
    return cert


def _private_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def expiry_warning(cert_path: str | os.PathLike, *, now: Optional[datetime.datetime] = None,
                   warn_days: int = WARN_DAYS) -> Optional[str]:
    """A line for the console when the certificate expires within ``warn_days`` (or has), else None."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    now = now or datetime.datetime.now(datetime.timezone.utc)
    left = cert.not_valid_after_utc - now
    if left > datetime.timedelta(days=warn_days):
        return None
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    when = cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC")
    if left <= datetime.timedelta(0):
        return f"WARNING: the certificate of {cn} ({cert_path}) expired on {when}; TLS will refuse it. Renew it."
    return (f"WARNING: the certificate of {cn} ({cert_path}) expires on {when}, in {left.days} day(s); renew it "
            "now (`nordfl site init --renew`, then `nordfl admin approve` and `nordfl site install`)")
