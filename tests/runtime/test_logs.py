"""The operator's console: text or JSON lines through `logging`, each flushed when written."""

import io
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from nordfl.runtime import tls
from nordfl.runtime.logs import console


def test_json_lines_carry_time_level_component_and_message():
    stream = io.StringIO()
    log = console("coordinator", "json", stream)
    log("round 1/3: 4 sites")
    console("coordinator", "json", stream)("again")  # configuring twice does not double the lines
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(e["level"], e["component"], e["message"]) for e in lines] == [
        ("info", "coordinator", "round 1/3: 4 sites"), ("info", "coordinator", "again")]
    assert lines[0]["time"].endswith("+00:00")
    text = io.StringIO()
    console("site", "text", text)("Oslo: round 2")
    assert text.getvalue() == "Oslo: round 2\n"
    with pytest.raises(ValueError, match="log format 'xml'"):
        console("site", "xml")


def _next_line(process, timeout: float) -> str:
    """The next console line, read while the process runs: a line still in a buffer never arrives."""
    end = time.monotonic() + timeout
    while not select.select([process.stdout], [], [], 0.5)[0]:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < end, f"no console line within {timeout} s"
    return process.stdout.readline().decode()


def test_a_coordinator_under_a_pipe_writes_each_line_at_once(tmp_path):
    """Under a pipe (as under journald) every console line, the coordinator's own refusals included, reaches
    the reader while the process still runs, so a SIGTERM cannot lose one waiting in a buffer."""
    import grpc

    from nordfl.runtime.proto import federation_pb2 as pb
    from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc

    federation = tls.provision(tmp_path / "fed", ["a", "b", "c", "d"])
    process = subprocess.Popen([sys.executable, "-m", "nordfl.runtime.cli", "coordinator", "--federation", str(federation),
                                "--state", str(tmp_path / "state"), "--address", "localhost:0", "--log-format", "json",
                                "runtime.min_sites=3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})  # as under systemd
    try:
        first = json.loads(_next_line(process, 120))
        assert first["component"] == "coordinator" and "listening on port" in first["message"]
        port = int(first["message"].split("listening on port ")[1].split(",")[0])
        with grpc.secure_channel(f"localhost:{port}", tls.channel_credentials(federation / "sites" / "d")) as channel:
            reply = pb_grpc.FederationStub(channel).Join(pb.JoinRequest(site="d", protocol_version="0.1", rows=10), timeout=30)
        assert not reply.accepted
        refused = json.loads(_next_line(process, 30))
        assert "join_refused" in refused["message"] and "0.1" in refused["message"], refused
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
