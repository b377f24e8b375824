"""The runtime's wire protocol: ``nordfl/runtime/v1/federation.proto`` and its generated stubs.

``federation_pb2`` (messages) and ``federation_pb2_grpc`` (the ``Federation`` service) are
generated and committed; regenerate them after editing the .proto with
``python -m nordfl.runtime.proto.generate`` (needs ``grpcio-tools``).
``tests/runtime/test_proto_fresh.py`` fails when the committed stubs are stale.
"""
