"""The committed gRPC stubs match the .proto (regenerating them changes nothing), and the
service and message numbering are the protocol's (a renumbered field breaks deployed sites)."""

import subprocess
import sys
from importlib.metadata import version

import pytest

from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc
from nordfl.runtime.proto import generate


def test_committed_stubs_are_fresh(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (pip install grpcio-tools): cannot regenerate the stubs")
    out = subprocess.run([sys.executable, "-m", "nordfl.runtime.proto.generate", "--out", str(tmp_path)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for name in generate.GENERATED:
        committed = (generate.PROTO_ROOT / name).read_bytes()
        fresh = (tmp_path / name).read_bytes()
        assert fresh == committed, (
            f"runtime/proto/{name} is stale (or was made by another grpcio-tools than the installed "
            f"{version('grpcio-tools')}): run python -m nordfl.runtime.proto.generate and commit the result"
        )


def test_generated_grpc_module_imports_the_package_module():
    source = (generate.PROTO_ROOT / "federation_pb2_grpc.py").read_text()
    assert "from nordfl.runtime.proto import federation_pb2 as" in source
    assert "\nimport federation_pb2" not in source and "nordfl.runtime.v1 import" not in source
    assert pb.TaskChunk.__module__ == "nordfl.runtime.proto.federation_pb2"
    assert pb_grpc.nordfl_dot_runtime_dot_v1_dot_federation__pb2 is pb


def test_service_and_messages_are_the_protocol():
    assert pb.DESCRIPTOR.package == "nordfl.runtime.v1"
    assert pb.DESCRIPTOR.name == "nordfl/runtime/v1/federation.proto"
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    methods = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Join": ("JoinRequest", "JoinReply", False, False),
        "PollTask": ("PollRequest", "TaskChunk", False, True),
        "SubmitUpdate": ("UpdateChunk", "SubmitReply", True, False),
    }
    expected = {
        "TensorSpec": {"name": 1, "dtype": 2, "shape": 3},
        "Manifest": {"tensors": 1, "total_bytes": 2, "sha256": 3},
        "JoinRequest": {"site": 1, "protocol_version": 2},
        "JoinReply": {"accepted": 1, "reason": 2, "run_id": 3, "job_json": 4},
        "PollRequest": {"run_id": 1, "site": 2, "wait_seconds": 3},
        "TaskHeader": {"kind": 1, "run_id": 2, "round": 3, "num_epochs": 4, "manifest": 5, "last_contribution": 6,
                       "attempt": 7, "secure_aggregation": 8},
        "TaskChunk": {"header": 1, "data": 2},
        "UpdateHeader": {"run_id": 1, "round": 2, "site": 3, "weight": 4, "manifest": 5, "metrics": 6, "attempt": 7,
                         "secagg_step": 8, "refusal": 9},
        "UpdateChunk": {"header": 1, "data": 2},
        "SubmitReply": {"accepted": 1, "reason": 2},
    }
    for message, fields in expected.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        got = {f.name: f.number for f in descriptor.fields}
        assert {k: got.get(k) for k in fields} == fields, message
    assert dict(pb.TaskHeader.Kind.items()) == {"WAIT": 0, "TRAIN": 1, "FINISHED": 2, "SECAGG_SHARE_KEYS": 3,
                                                 "SECAGG_MASKED_INPUT": 4, "SECAGG_UNMASK": 5, "DESCRIBE": 6}
    assert dict(pb.SecAggStep.items()) == {"PLAIN": 0, "ADVERTISE": 1, "SHARE_KEYS": 2, "MASKED_INPUT": 3, "UNMASK_SHARES": 4}
    for chunk in ("TaskChunk", "UpdateChunk"):
        oneof = pb.DESCRIPTOR.message_types_by_name[chunk].oneofs_by_name["part"]
        assert [f.name for f in oneof.fields] == ["header", "data"]
