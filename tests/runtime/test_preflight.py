"""`nordfl preflight` at a site: every check reports in plain words, and any failure gives exit status 2."""

import pytest

from nordfl.runtime import tls
from nordfl.runtime.cli import main as nordfl

from .helpers import provisioned, start_coordinator


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    federation, files = provisioned(tmp)
    coordinator, server, port = start_coordinator(tmp, federation, ["runtime.rounds=1"])
    yield federation, files, port
    server.stop(grace=None)


def _preflight(capsys, *args):
    code = nordfl(["preflight", *map(str, args)])
    return code, capsys.readouterr().out


def test_a_ready_site_passes_every_check(hub, capsys):
    federation, files, port = hub
    code, out = _preflight(capsys, "--name", "Hungary", "--certs", federation / "sites" / "Hungary",
                           "--coordinator", f"localhost:{port}", "--data", files["Hungary"])
    assert code == 0, out
    lines = out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines[:-1]] == ["OK"] * 5 and lines[-1] == "preflight: ready"
    assert "261 rows of task heart" in out and "mutual TLS with localhost" in out


def test_each_problem_is_named(hub, capsys, tmp_path):
    federation, files, port = hub
    bad = tmp_path / "heart.csv"
    bad.write_text("age,sex\n1,2\n")
    code, out = _preflight(capsys, "--name", "Hungary", "--certs", federation / "sites" / "Cleveland",
                           "--coordinator", f"localhost:{port}", "--data", bad)
    assert code == 2 and out.splitlines()[-1] == "preflight: 2 problem(s) to fix before this site goes live"
    assert "FAIL certificates: the certificate is for 'Cleveland', not 'Hungary'" in out
    assert "FAIL data:" in out and "heart.csv" in out
    foreign = tls.provision(tmp_path / "other", ["Hungary"])  # consistent in itself, but another federation's
    code, out = _preflight(capsys, "--name", "Hungary", "--certs", foreign / "sites" / "Hungary",
                           "--coordinator", f"localhost:{port}", "--data", files["Hungary"], "--timeout", "2")
    assert code == 2 and "OK   certificates" in out and "OK   network" in out
    assert "FAIL coordinator: the TLS handshake with localhost" in out
    code, out = _preflight(capsys, "--name", "Hungary", "--coordinator", "localhost:9", "--data", files["Hungary"])
    assert code == 2 and "FAIL network: cannot open a TCP connection to localhost:9" in out
    assert "WARN certificates: no --certs given" in out
