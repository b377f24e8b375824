"""nordfl.runtime.tls: provisioning on disk, membership, and real mutual-TLS gRPC calls on loopback."""

import contextlib
import ipaddress
import json
import os
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from nordfl.runtime import tls

SITES = ["hospital-a", "hospital_b.2", "C"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """One federation shared by the read-only tests (tests that revoke provision their own)."""
    return tls.provision(tmp_path_factory.mktemp("fed") / "federation", SITES)


@pytest.fixture(scope="module")
def other_fed(tmp_path_factory):
    """A second, separately provisioned federation: same site names, different CA."""
    return tls.provision(tmp_path_factory.mktemp("other") / "federation", SITES)


def _cert(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert):
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# ---------------------------------------------------------------------------------------------
# provision


def test_provision_layout_and_permissions(fed):
    expected = {"federation.json", "ca/ca.pem", "ca/ca.key",
                "coordinator/cert.pem", "coordinator/key.pem", "coordinator/ca.pem"}
    for site in SITES:
        expected |= {f"sites/{site}/cert.pem", f"sites/{site}/key.pem", f"sites/{site}/ca.pem"}
    written = {str(p.relative_to(fed)) for p in fed.rglob("*") if p.is_file()}
    assert written == expected

    keys = [fed / "ca/ca.key", fed / "coordinator/key.pem"] + [fed / "sites" / s / "key.pem" for s in SITES]
    for key in keys:
        assert _mode(key) == 0o600, key
    dirs = [fed, fed / "ca", fed / "coordinator", fed / "sites"] + [fed / "sites" / s for s in SITES]
    for d in dirs:
        assert _mode(d) == 0o700, d

    pins = {s: tls.certificate_sha256(_cert(fed / "sites" / s / "cert.pem")) for s in SITES}
    assert json.loads((fed / "federation.json").read_text()) == {"sites": sorted(SITES), "revoked": [], "certificates": pins}
    assert tls.load_federation(fed) == tls.Federation(frozenset(SITES), frozenset(), pins)


def test_every_certificate_is_signed_by_the_federation_ca(fed):
    ca = _cert(fed / "ca/ca.pem")
    assert ca.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign is True
    ca.verify_directly_issued_by(ca)

    ca_copies = [fed / "coordinator/ca.pem"] + [fed / "sites" / s / "ca.pem" for s in SITES]
    for copy in ca_copies:
        assert _cert(copy) == ca

    for path in [fed / "coordinator/cert.pem"] + [fed / "sites" / s / "cert.pem" for s in SITES]:
        cert = _cert(path)
        assert cert.issuer == ca.subject, path
        cert.verify_directly_issued_by(ca)  # issuer name matches and the CA key made the signature
        assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    # A certificate from another CA must not pass the same check.
    with pytest.raises(Exception):
        _cert(fed / "coordinator/cert.pem").verify_directly_issued_by(_cert(fed / "sites/C/cert.pem"))


def test_private_keys_match_their_certificates(fed):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    pairs = [(fed / "ca/ca.key", fed / "ca/ca.pem"), (fed / "coordinator/key.pem", fed / "coordinator/cert.pem")]
    pairs += [(fed / "sites" / s / "key.pem", fed / "sites" / s / "cert.pem") for s in SITES]
    for key_path, cert_path in pairs:
        key = load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == _cert(cert_path).public_key(), key_path


def test_site_and_coordinator_certificate_contents(fed):
    for site in SITES:
        cert = _cert(fed / "sites" / site / "cert.pem")
        assert _cn(cert) == site
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]

    coord = _cert(fed / "coordinator/cert.pem")
    san = coord.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    eku = coord.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert _cn(coord) not in SITES
    # Full path validation as a TLS client would do it (web PKI profile, hostname check).
    from cryptography.x509.verification import PolicyBuilder, Store

    verifier = PolicyBuilder().store(Store([_cert(fed / "ca/ca.pem")])).build_server_verifier(x509.DNSName("localhost"))
    assert verifier.verify(coord, [])[-1] == _cert(fed / "ca/ca.pem")


def test_custom_coordinator_hosts_and_validity(tmp_path):
    root = tls.provision(tmp_path / "f", ["a"], coordinator_hosts=["fl.example.org", "::1"], valid_days=30)
    coord = _cert(root / "coordinator/cert.pem")
    san = coord.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("::1")]
    lifetime = coord.not_valid_after_utc - coord.not_valid_before_utc
    assert 30 <= lifetime.days <= 31


def test_reprovisioning_is_refused(fed):
    before = (fed / "ca/ca.pem").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite") as err:
        tls.provision(fed, ["someone-else"])
    assert str(fed) in str(err.value)
    assert (fed / "ca/ca.pem").read_bytes() == before


def test_provision_into_existing_empty_directory(tmp_path):
    tls.provision(tmp_path, ["a"])
    assert tls.load_federation(tmp_path).sites == {"a"}


@pytest.mark.parametrize("bad", ["", "has space", "x" * 65, "a/b", "..", ".", "ümlaut", "new\nline", "semi;colon"])
def test_bad_site_names_are_refused(tmp_path, bad):
    with pytest.raises(ValueError) as err:
        tls.provision(tmp_path / "f", ["good", bad])
    assert repr(bad) in str(err.value)
    assert not (tmp_path / "f").exists()  # nothing half-written


def test_site_list_errors(tmp_path):
    assert tls.load_federation(tls.provision(tmp_path / "empty", [])).sites == frozenset()  # sites enrol later
    with pytest.raises(ValueError, match="duplicate site name 'a'"):
        tls.provision(tmp_path / "f", ["a", "b", "a"])
    with pytest.raises(ValueError, match="duplicate site name 'A'"):
        tls.provision(tmp_path / "f", ["a", "A"])
    with pytest.raises(TypeError, match="single string"):
        tls.provision(tmp_path / "f", "hospital-a")
    with pytest.raises(ValueError, match="'localhost'"):
        tls.provision(tmp_path / "f", ["localhost"])
    with pytest.raises(ValueError, match="valid_days"):
        tls.provision(tmp_path / "f", ["a"], valid_days=0)
    assert tls.provision(tmp_path / "f", ["x" * 64]).exists()


# ---------------------------------------------------------------------------------------------
# membership


def test_revoke_updates_federation_json(tmp_path):
    root = tls.provision(tmp_path / "f", ["a", "b", "c"])
    tls.revoke(root, "b")
    written = json.loads((root / "federation.json").read_text())
    assert (written["sites"], written["revoked"]) == (["a", "b", "c"], ["b"])
    tls.revoke(root, "b")  # no-op
    tls.revoke(root, "a")
    assert tls.load_federation(root) == tls.Federation(frozenset("abc"), frozenset("ab"), written["certificates"])
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []


def test_revoke_unknown_site(tmp_path):
    root = tls.provision(tmp_path / "f", ["a", "b"])
    with pytest.raises(ValueError, match=r"unknown site 'zz'.*known sites: a, b"):
        tls.revoke(root, "zz")
    assert tls.load_federation(root).revoked == frozenset()


def test_load_federation_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="federation.json"):
        tls.load_federation(tmp_path)
    path = tmp_path / "federation.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        tls.load_federation(tmp_path)
    path.write_text('{"sites": ["a"]}')
    with pytest.raises(ValueError, match="missing field 'revoked'"):
        tls.load_federation(tmp_path)
    path.write_text('{"sites": "a", "revoked": []}')
    with pytest.raises(ValueError, match="field 'sites' must be a list"):
        tls.load_federation(tmp_path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="expected an object"):
        tls.load_federation(tmp_path)
    path.write_text('{"sites": ["a"], "revoked": [], "certificates": {"a": "not-a-sha256"}}')
    with pytest.raises(ValueError, match="field 'certificates' must map names to certificate SHA-256s"):
        tls.load_federation(tmp_path)


def test_admit():
    fed = tls.Federation(sites=frozenset({"a", "b"}), revoked=frozenset({"b"}))
    assert tls.admit(fed, "a") == (True, "")
    ok, reason = tls.admit(fed, None)
    assert not ok and "no verified client certificate" in reason
    ok, reason = tls.admit(fed, "zz")
    assert not ok and "'zz'" in reason and "not a member" in reason
    ok, reason = tls.admit(fed, "b")
    assert not ok and "'b'" in reason and "revoked" in reason
    pinned = fed._replace(certificates={"a": "1" * 64})
    assert tls.admit(pinned, tls.Peer("a", "1" * 64)) == (True, "")
    ok, reason = tls.admit(pinned, tls.Peer("a", "2" * 64))
    assert not ok and "no longer its current one" in reason
    assert not tls.admit(pinned, tls.Peer("a", None))[0]  # a TLS caller whose certificate could not be read
    assert tls.admit(pinned, "a") == (True, "")  # --insecure: a name, no certificate to compare


def test_watcher_reloads_on_change(tmp_path):
    root = tls.provision(tmp_path / "f", ["a", "b"])
    watcher = tls.FederationWatcher(root)
    first = watcher.current()
    assert first.revoked == frozenset()
    assert watcher.current() is first  # unchanged file: cached
    tls.revoke(root, "a")
    assert watcher.current().revoked == {"a"}
    (root / "federation.json").write_text("garbage")
    with pytest.raises(ValueError, match="not valid JSON"):
        watcher.current()  # fail closed, not a stale list
    with pytest.raises(FileNotFoundError):
        tls.FederationWatcher(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# gRPC over loopback


@contextlib.contextmanager
def _coordinator(root):
    """A real coordinator on 127.0.0.1 with two methods: Who (echo identity) and Admit (check membership)."""
    watcher = tls.FederationWatcher(root)

    def who(request, context):
        return (tls.peer_identity(context) or "").encode()

    def admitted(request, context):
        ok, reason = tls.admit(watcher.current(), tls.peer_identity(context))
        if not ok:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, reason)
        return b"welcome"

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Echo", {
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Admit": grpc.unary_unary_rpc_method_handler(admitted),
    })])
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(root / "coordinator"))
    assert port > 0
    server.start()
    try:
        yield f"localhost:{port}"
    finally:
        server.stop(grace=None)


def _call(target, credentials, method="Who"):
    with grpc.secure_channel(target, credentials) as channel:
        return channel.unary_unary(f"/test.Echo/{method}")(b"", timeout=5)


@pytest.fixture(scope="module")
def coordinator(fed):
    with _coordinator(fed) as target:
        yield target


def test_site_gets_its_own_name_back(fed, coordinator):
    for site in SITES:
        assert _call(coordinator, tls.channel_credentials(fed / "sites" / site)) == site.encode()


def test_certificate_from_another_federation_is_refused(fed, other_fed, coordinator):
    # Trusts the right coordinator, but presents a "hospital-a" certificate from another CA.
    creds = grpc.ssl_channel_credentials(
        root_certificates=(fed / "ca/ca.pem").read_bytes(),
        private_key=(other_fed / "sites/hospital-a/key.pem").read_bytes(),
        certificate_chain=(other_fed / "sites/hospital-a/cert.pem").read_bytes(),
    )
    with pytest.raises(grpc.RpcError) as err:
        _call(coordinator, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(fed, coordinator):
    creds = grpc.ssl_channel_credentials(root_certificates=(fed / "ca/ca.pem").read_bytes())
    with pytest.raises(grpc.RpcError) as err:
        _call(coordinator, creds)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_site_refuses_a_coordinator_from_another_federation(other_fed, coordinator):
    # The site of the other federation does not trust this coordinator's CA.
    with pytest.raises(grpc.RpcError) as err:
        _call(coordinator, tls.channel_credentials(other_fed / "sites/hospital-a"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificates_only_work_in_their_own_role(tmp_path):
    """A stolen site key cannot pose as the coordinator, nor the coordinator key as a site (ExtendedKeyUsage)."""
    root = tls.provision(tmp_path / "f", ["localhost", "b"], coordinator_hosts=["coordinator.test"])
    site = root / "sites/localhost"  # its CN matches the name the other site dials below
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(lambda request, context: b"impostor")})])
    creds = grpc.ssl_server_credentials([((site / "key.pem").read_bytes(), (site / "cert.pem").read_bytes())],
                                        root_certificates=(site / "ca.pem").read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        with pytest.raises(grpc.RpcError) as err:
            _call(f"localhost:{port}", tls.channel_credentials(root / "sites/b"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        as_client = grpc.ssl_channel_credentials((root / "coordinator/ca.pem").read_bytes(),
                                                 (root / "coordinator/key.pem").read_bytes(),
                                                 (root / "coordinator/cert.pem").read_bytes())
        with pytest.raises(grpc.RpcError) as err:
            _call(f"localhost:{port}", as_client)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


def test_revoke_takes_effect_without_restart_at_the_handshake_and_on_an_open_connection(tmp_path):
    """Two layers: a revoked key fails the TLS handshake itself (the coordinator trusts the members' own pinned
    certificates, rebuilt when federation.json changes), and a connection it opened before the revocation is
    refused at its next call (``admit``)."""
    root = tls.provision(tmp_path / "f", ["a", "b"])
    with _coordinator(root) as target:
        with grpc.secure_channel(target, tls.channel_credentials(root / "sites/a")) as open_before:
            admit = open_before.unary_unary("/test.Echo/Admit")
            assert admit(b"", timeout=5) == b"welcome"
            tls.revoke(root, "a")
            with pytest.raises(grpc.RpcError) as err:
                admit(b"", timeout=5)  # the same connection: its handshake happened before
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            _call(target, tls.channel_credentials(root / "sites/a"), "Who")  # a new connection: no handshake
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert _call(target, tls.channel_credentials(root / "sites/b"), "Admit") == b"welcome"


def test_the_trust_list_is_the_members_pinned_certificates(tmp_path):
    root = tls.provision(tmp_path / "f", ["a", "b", "c"])
    pems = tls.member_certificates(root)
    assert pems == b"".join((root / "sites" / s / "cert.pem").read_bytes() for s in ("a", "b", "c"))
    tls.revoke(root, "b")
    assert tls.member_certificates(root) == b"".join((root / "sites" / s / "cert.pem").read_bytes() for s in ("a", "c"))
    # A member whose pinned certificate is not here cannot be named: the CA stays the anchor (admit still checks).
    (root / "sites" / "c" / "cert.pem").write_bytes((root / "sites" / "a" / "cert.pem").read_bytes())
    assert tls.member_certificates(root) is None


def test_missing_credential_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="ca.pem"):
        tls.channel_credentials(tmp_path)
    with pytest.raises(FileNotFoundError, match="key.pem"):
        tls.server_credentials(tmp_path)


# ---------------------------------------------------------------------------------------------
# certificates issued at the site: init -> request -> approve -> install, renewal, a new site


def _enrol(cli_main, capsys, federation, certs, name, *extra):
    """One site's enrolment through the `nordfl` commands, the fingerprint read from the site's console."""
    assert cli_main(["site", "init", "--name", name, "--certs", str(certs), *extra]) == 0
    fingerprint = capsys.readouterr().out.strip().splitlines()[-1].strip()
    request = certs / ("renew" if extra else "") / "request.pem"
    assert cli_main(["admin", "approve", str(federation), str(request), "--fingerprint", fingerprint]) == 0
    issued = federation / "sites" / name
    assert cli_main(["site", "install", "--certs", str(certs), str(issued / "cert.pem"), "--ca", str(issued / "ca.pem")]) == 0
    capsys.readouterr()


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sites_enrol_with_their_own_keys_renew_and_join_without_touching_the_others(tmp_path, capsys):
    from nordfl.runtime.cli import main

    federation = tls.provision(tmp_path / "fed", [])
    first = ["Oslo", "Tartu", "Turku", "Lund", "Aarhus"]
    for name in first:
        _enrol(main, capsys, federation, tmp_path / name, name)
    assert not list((federation / "sites").rglob("key.pem"))  # no site key ever existed centrally
    for name in first:
        assert _mode(tmp_path / name / "key.pem") == 0o600
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    before = {name: _files(tmp_path / name) for name in first if name != "Tartu"}
    old_tartu = tls.channel_credentials(tmp_path / "Tartu")

    with _coordinator(federation) as target:
        for name in first:
            assert _call(target, tls.channel_credentials(tmp_path / name)) == name.encode()
            assert _call(target, tls.channel_credentials(tmp_path / name), "Admit") == b"welcome"
        _enrol(main, capsys, federation, tmp_path / "Tartu", "Tartu", "--renew")  # renewal: a new key
        _enrol(main, capsys, federation, tmp_path / "Helsinki", "Helsinki")  # a sixth site joins
        with pytest.raises(grpc.RpcError) as err:
            _call(target, old_tartu, "Admit")  # the certificate the renewal replaced fails the handshake
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for name in first + ["Helsinki"]:
            assert _call(target, tls.channel_credentials(tmp_path / name), "Admit") == b"welcome"
    assert {name: _files(tmp_path / name) for name in before} == before  # nobody else re-provisioned
    assert tls.load_federation(federation).sites == frozenset(first + ["Helsinki"])
    issued = [json.loads(line) for line in (federation / "issued.jsonl").read_text().splitlines()]
    assert [(e["site"], e["renewed"]) for e in issued] == [(n, False) for n in first] + [("Tartu", True), ("Helsinki", False)]


def test_enrolment_refuses_what_it_must(tmp_path):
    from nordfl.runtime import enrol

    federation = tls.provision(tmp_path / "fed", [])
    request = enrol.request_certificate(tmp_path / "a", "Oslo")
    with pytest.raises(FileExistsError, match="already has a key"):
        enrol.request_certificate(tmp_path / "a", "Oslo")
    with pytest.raises(FileNotFoundError, match="nothing to renew"):
        enrol.request_certificate(tmp_path / "a", "Oslo", renew=True)
    with pytest.raises(ValueError, match="fingerprint mismatch for 'Oslo'"):
        tls.approve(federation, request.path.read_bytes(), "AAAA " * 16)
    with pytest.raises(ValueError, match="not a PEM certificate request"):
        tls.approve(federation, b"hello", request.fingerprint)
    with pytest.raises(ValueError, match="invalid site name"):
        enrol.request_certificate(tmp_path / "b", "St Olavs")
    assert tls.load_federation(federation).sites == frozenset()  # nothing was signed
    approval = tls.approve(federation, request.path.read_bytes(), request.fingerprint.lower().replace(" ", ":"))
    cert = (approval.folder / "cert.pem").read_bytes()
    other = enrol.request_certificate(tmp_path / "c", "Lund")
    with pytest.raises(ValueError, match="issued for another key"):
        enrol.install_certificate(tmp_path / "c", cert, (approval.folder / "ca.pem").read_bytes())
    foreign = tls.provision(tmp_path / "other", ["Lund"])
    with pytest.raises(ValueError, match="not signed by the federation CA"):
        enrol.install_certificate(tmp_path / "c", (foreign / "sites/Lund/cert.pem").read_bytes(),
                                  (approval.folder / "ca.pem").read_bytes())
    tls.approve(federation, other.path.read_bytes(), other.fingerprint)
    tls.revoke(federation, "Lund")
    again = enrol.request_certificate(tmp_path / "d", "Lund")
    with pytest.raises(ValueError, match="'Lund' has been revoked"):
        tls.approve(federation, again.path.read_bytes(), again.fingerprint)


def test_expiry_warning(tmp_path):
    import datetime

    from nordfl.runtime import enrol

    root = tls.provision(tmp_path / "f", ["a"], valid_days=40)
    cert = root / "sites/a/cert.pem"
    now = datetime.datetime.now(datetime.timezone.utc)
    assert enrol.expiry_warning(cert, now=now) is None
    soon = enrol.expiry_warning(cert, now=now + datetime.timedelta(days=20))
    assert "expires on" in soon and "in 19 day(s)" in soon and "--renew" in soon
    assert "expired on" in enrol.expiry_warning(cert, now=now + datetime.timedelta(days=41))
