"""The runtime's wire format: pytrees as named raw tensors, checked against a template, streamed
in chunks; and a real gRPC round trip on loopback, including a model far above gRPC's 4 MB
message limit."""

import hashlib
import time
from concurrent import futures
from typing import NamedTuple

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nordfl.algorithms import ClientData, fedavg, local_schedule
from nordfl.runtime import wire
from nordfl.runtime.proto import federation_pb2 as pb
from nordfl.runtime.proto import federation_pb2_grpc as pb_grpc
from nordfl.runtime.wire import TensorSpec, WireError
from nordfl.tasks import Examples
from tests import reference as ref


class Model(NamedTuple):
    params: dict
    opt_state: tuple
    step: object


def _nested_tree():
    """A NamedTuple of dicts and tuples with every wire dtype, scalar and empty leaves, and
    floats whose bits matter (-0.0, NaN with a payload, Inf, subnormals)."""
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, 3.4e38], np.float32)
    nan_payload = np.array([0x7FC00001, 0xFFC12345], np.uint32).view(np.float32)
    return Model(
        params={
            "linear": {
                "kernel": rng.normal(size=(5, 3)).astype(np.float32),
                "bias": jnp.asarray(rng.normal(size=3), jnp.bfloat16),
            },
            "embed": {"table": rng.normal(size=(4, 2, 3)).astype(np.float16), "scale": np.float64(np.pi)},
            "special": np.concatenate([special, nan_payload]),
            "empty": np.zeros((0, 7), np.float32),
        },
        opt_state=(
            {"count": np.int32(7), "mask": np.array([True, False, True])},
            {"i8": np.array([-128, 127], np.int8), "i16": np.array([-3], np.int16), "i64": np.array([2**62], np.int64)},
            {"u8": np.array([255], np.uint8), "u16": np.array([65535], np.uint16),
             "u32": np.array([2**32 - 1], np.uint32), "u64": np.array([2**64 - 1], np.uint64)},
        ),
        step=jnp.asarray(3, jnp.int32),
    )


def _bits(a):
    a = np.asarray(a)
    return a.dtype.name, a.shape, a.tobytes()


# ------------------------------------------------------------------------------- encode / decode


def test_round_trip_is_bitwise_exact_and_keeps_structure():
    tree = _nested_tree()
    specs, payload = wire.encode(tree)
    assert isinstance(payload, bytes) and len(payload) == sum(s.nbytes for s in specs)
    out = wire.decode(specs, payload, tree)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)
    assert isinstance(out, Model) and isinstance(out.opt_state, tuple)
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(out)):
        assert isinstance(b, np.ndarray)
        assert _bits(a) == _bits(b)
    assert out.step.shape == () and out.params["embed"]["scale"].shape == ()
    # Default: zero-copy read-only views of the payload; copy=True gives writable arrays.
    assert not out.params["linear"]["kernel"].flags.writeable
    copied = wire.decode(specs, payload, tree, copy=True)
    copied.params["linear"]["kernel"][0, 0] = 99.0
    assert out.params["linear"]["kernel"][0, 0] != 99.0


def test_payload_is_little_endian_c_order_concatenation():
    big_endian = np.arange(6, dtype=">f4").reshape(2, 3)
    fortran = np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))
    strided = np.arange(10, dtype=np.uint32)[::3]
    specs, payload = wire.encode({"a": big_endian, "b": fortran, "c": strided})
    expected = b"".join(np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()
                        for x in (big_endian, fortran, strided))
    assert payload == expected
    assert specs == [TensorSpec("a", "float32", (2, 3)), TensorSpec("b", "int16", (2, 3)), TensorSpec("c", "uint32", (4,))]
    out = wire.decode(specs, payload, {"a": big_endian, "b": fortran, "c": strided})
    np.testing.assert_array_equal(out["a"], big_endian)
    np.testing.assert_array_equal(out["b"], fortran)
    np.testing.assert_array_equal(out["c"], strided)


def test_names_are_stable_and_readable():
    tree = _nested_tree()
    assert wire.leaf_names(tree) == [
        "params/embed/scale", "params/embed/table", "params/empty",
        "params/linear/bias", "params/linear/kernel", "params/special",
        "opt_state/0/count", "opt_state/0/mask",
        "opt_state/1/i16", "opt_state/1/i64", "opt_state/1/i8",
        "opt_state/2/u16", "opt_state/2/u32", "opt_state/2/u64", "opt_state/2/u8",
        "step",
    ]
    # Dict insertion order does not matter; names match the specs and the template.
    a = {"linear": {"kernel": 1.0, "bias": 2.0}, "head": [3.0, 4.0]}
    b = {"head": [5.0, 6.0], "linear": {"bias": 7.0, "kernel": 8.0}}
    assert wire.leaf_names(a) == wire.leaf_names(b) == ["head/0", "head/1", "linear/bias", "linear/kernel"]
    assert [s.name for s in wire.encode(tree)[0]] == wire.leaf_names(tree) == [s.name for s in wire.template_of(tree)]
    assert wire.leaf_names(np.float32(1.0)) == ["<root>"]


def test_colliding_names_are_refused():
    with pytest.raises(WireError, match="'a/b'"):
        wire.leaf_names({"a/b": 1.0, "a": {"b": 2.0}})


@pytest.mark.parametrize("bad", [np.array([1 + 2j], np.complex64), np.array(["x"]), np.array([None], object),
                                 np.array(["2024-01-01"], "datetime64[D]")])
def test_encode_refuses_non_numeric_dtypes(bad):
    with pytest.raises(WireError, match=r"tensor 'w/bad'.*not allowed"):
        wire.encode({"w": {"ok": np.zeros(2, np.float32), "bad": bad}})


def _simple():
    return {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 3), np.int32), "c": np.float32(2.5)}


def _spec_cases():
    template = wire.template_of(_simple())  # a:(4,) f32, b:(2,3) i32, c:() f32
    a, b, c = template
    return {
        "renamed": ([a, b._replace(name="bb"), c], "'bb'"),
        "dtype": ([a, b._replace(dtype="int64"), c], r"tensor 'b': expected dtype int32, got int64"),
        "shape": ([a, b._replace(shape=(3, 2)), c], r"tensor 'b': expected shape \(2, 3\), got \(3, 2\)"),
        "rank": ([a, b._replace(shape=(6,)), c], r"tensor 'b': expected shape"),
        "missing_middle": ([a, c], r"missing tensor 'b'"),
        "missing_last": ([a, b], r"missing tensor 'c'"),
        "extra_middle": ([a, TensorSpec("evil", "float32", (1,)), b, c], r"unexpected tensor 'evil'"),
        "extra_last": ([a, b, c, TensorSpec("evil", "float32", (1,))], r"unexpected extra tensor 'evil'"),
        "order": ([b, a, c], r"expected 'a', got 'b'"),
    }


@pytest.mark.parametrize("case", list(_spec_cases()))
def test_decode_rejects_specs_that_differ_from_the_template(case):
    specs, match = _spec_cases()[case]
    payload = bytes(sum(s.nbytes for s in specs))  # the length the (bad) specs imply
    with pytest.raises(WireError, match=match):
        wire.decode(specs, payload, _simple())


@pytest.mark.parametrize("delta", [-1, 1, -4, 100])
def test_decode_rejects_a_payload_of_the_wrong_length(delta):
    specs, payload = wire.encode(_simple())
    bad = payload[:delta] if delta < 0 else payload + bytes(delta)
    with pytest.raises(WireError, match=rf"{abs(delta)} byte\(s\) (short|too long).*tensor 'c'"):
        wire.decode(specs, bad, _simple())


def test_decode_rejects_invalid_bool_bytes():
    tree = {"mask": np.array([True, False])}
    specs, _ = wire.encode(tree)
    with pytest.raises(WireError, match="'mask'.*0 or 1"):
        wire.decode(specs, b"\x01\x07", tree)


def test_decode_against_an_eval_shape_template_of_a_real_algorithm(softmax_model):
    """The receiver's template is jax.eval_shape of the algorithm's broadcast / client_update:
    no real arrays are needed to check and rebuild a message."""
    _, params, loss_fn = softmax_model
    alg = fedavg(loss_fn, local_schedule(client_lr=0.1, num_epochs=1, batch_size=4))
    (client,) = ref.make_clients([6])
    data = ClientData(Examples(jnp.asarray(client.x), jnp.asarray(client.y)), jnp.int32(6))
    key = jax.random.key(0)
    state = alg.server_init(params)

    message = alg.broadcast(state)
    message_template = jax.eval_shape(alg.broadcast, jax.eval_shape(alg.server_init, params))
    specs, payload = wire.encode(message)
    assert [s.name for s in specs] == ["params/linear/bias", "params/linear/kernel"]
    got = wire.decode(specs, payload, message_template)
    assert type(got) is type(message)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, message)

    output = alg.client_update(message, alg.client_init(params), data, key)
    update_template = jax.eval_shape(alg.client_update, message_template, alg.client_init(params), data, key).update
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree_util.tree_leaves(update_template))
    specs, payload = wire.encode(output.update)
    assert wire.template_of(update_template) == specs
    assert [s.name for s in specs] == ["delta/linear/bias", "delta/linear/kernel"]
    got = wire.decode(specs, payload, update_template)
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, output.update)
    # A broadcast is not an update: the names differ, so it is refused.
    with pytest.raises(WireError, match="'delta/linear/bias'"):
        wire.decode(wire.encode(message)[0], wire.encode(message)[1], update_template)


# ------------------------------------------------------------------------------- manifest


def test_manifest_proto_round_trip_and_payload_check():
    specs, payload = wire.encode(_nested_tree())
    manifest = pb.Manifest.FromString(wire.manifest_to_proto(specs, payload).SerializeToString())
    got_specs, total, digest = wire.manifest_from_proto(manifest)
    assert got_specs == specs and total == len(payload) and digest == hashlib.sha256(payload).hexdigest()
    assert all(isinstance(s.shape, tuple) for s in got_specs)
    wire.check_payload(payload, total, digest)
    tampered = bytearray(payload)
    tampered[5] ^= 1
    with pytest.raises(WireError, match="SHA-256 mismatch"):
        wire.check_payload(bytes(tampered), total, digest)
    with pytest.raises(WireError, match="manifest says"):
        wire.check_payload(payload[:-1], total, digest)


# ------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 1000, 1 << 20])
def test_chunks_and_join_chunks_round_trip(chunk_size):
    payload = bytes(range(256)) * 4  # 1024 bytes: 1, 16, 64 divide it; 7 and 1000 do not
    parts = list(wire.chunks(payload, chunk_size))
    assert all(isinstance(p, memoryview) and p.obj is payload for p in parts)  # slices, not copies
    assert all(len(p) == chunk_size for p in parts[:-1]) and 0 < len(parts[-1]) <= chunk_size
    assert len(parts) == -(-len(payload) // chunk_size)
    assert wire.join_chunks(parts, len(payload), max_total=len(payload)) == payload
    assert wire.join_chunks((bytes(p) for p in parts), len(payload), max_total=10**9) == payload
    assert list(wire.chunks(b"", chunk_size)) == [] and wire.join_chunks([], 0, 0) == b""


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError):
        list(wire.chunks(b"abc", 0))


class _Counting:
    """An iterable of chunks that counts how many were consumed."""

    def __init__(self, parts):
        self.parts, self.taken = list(parts), 0

    def __iter__(self):
        for p in self.parts:
            self.taken += 1
            yield p


def test_join_chunks_refuses_oversize_without_reading_on():
    stream = _Counting([b"a" * 10, b"b" * 10, b"c", b"d" * 10**6])
    with pytest.raises(WireError, match="too long: chunk #2 brings it to 21 bytes, expected 20"):
        wire.join_chunks(stream, 20, max_total=100)
    assert stream.taken == 3  # stopped at the offending chunk; the 1 MB one was never pulled


def test_join_chunks_refuses_a_message_above_the_limit_before_reading():
    stream = _Counting([b"x" * 10])
    with pytest.raises(WireError, match="exceeds the limit of 5 bytes"):
        wire.join_chunks(stream, 10, max_total=5)
    assert stream.taken == 0


def test_join_chunks_refuses_undersize_and_non_bytes():
    with pytest.raises(WireError, match="too short: got 15 bytes, expected 16"):
        wire.join_chunks([b"a" * 10, b"b" * 5], 16, max_total=16)
    with pytest.raises(WireError, match="chunk #1 is str"):
        wire.join_chunks([b"a", "b"], 2, max_total=2)


# ------------------------------------------------------------------------------- checks


@pytest.mark.parametrize("bad, kind", [(np.nan, "1 NaN and 0 Inf"), (np.inf, "0 NaN and 1 Inf"), (-np.inf, "0 NaN and 1 Inf")])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, jnp.bfloat16])
def test_check_finite_names_the_first_bad_leaf(bad, kind, dtype):
    tree = {"a": np.ones(3, dtype), "b": {"w": np.ones((2, 2), dtype)}, "c": np.full(2, np.nan, np.float32), "n": np.int32(1)}
    tree["b"]["w"][1, 0] = bad
    with pytest.raises(WireError, match=rf"tensor 'b/w' is not finite: {kind} value\(s\), the first at index \(1, 0\)"):
        wire.check_finite(tree)
    tree["b"]["w"][1, 0] = 0
    with pytest.raises(WireError, match="tensor 'c'.*2 NaN"):
        wire.check_finite(tree)
    tree["c"][:] = 0
    wire.check_finite(tree)  # integers are never flagged


def test_global_norm():
    tree = _simple()
    expected = np.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree_util.tree_leaves(tree)))
    assert wire.global_norm(tree) == pytest.approx(expected, rel=1e-12)
    assert wire.global_norm({"a": np.full(3 * (1 << 20) + 5, 1e30, np.float32)}) == pytest.approx(1e30 * np.sqrt(3 * (1 << 20) + 5))
    assert np.isnan(wire.global_norm({"a": np.array([1.0, np.nan])}))
    assert wire.global_norm({}) == 0.0


# ------------------------------------------------------------------------------- gRPC loopback


def _data(stream, kind):
    """The raw bytes of the chunks after a header; a second header is a protocol error."""
    for i, chunk in enumerate(stream, start=1):
        if chunk.WhichOneof("part") != "data":
            raise WireError(f"{kind} chunk #{i}: expected data, got {chunk.WhichOneof('part')}")
        yield chunk.data


class _Coordinator(pb_grpc.FederationServicer):
    """A minimal coordinator: PollTask streams one broadcast, SubmitUpdate checks an update
    against the template and keeps it."""

    def __init__(self, broadcast, update_template, *, chunk_size=wire.DEFAULT_CHUNK_SIZE, max_total=1 << 31):
        self.specs, self.payload = wire.encode(broadcast)
        self.manifest = wire.manifest_to_proto(self.specs, self.payload)
        self.update_template = update_template
        self.chunk_size, self.max_total = chunk_size, max_total
        self.received = None

    def PollTask(self, request, context):
        header = pb.TaskHeader(kind=pb.TaskHeader.TRAIN, run_id=request.run_id, round=1, num_epochs=1, manifest=self.manifest)
        yield pb.TaskChunk(header=header)
        for part in wire.chunks(self.payload, self.chunk_size):
            yield pb.TaskChunk(data=bytes(part))

    def SubmitUpdate(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            return pb.SubmitReply(accepted=False, reason="the first chunk must be the header")
        try:
            specs, total, digest = wire.manifest_from_proto(first.header.manifest)
            expected = wire.check_specs(specs, wire.template_of(self.update_template))  # before any data
            payload = wire.join_chunks(_data(request_iterator, "update"), expected, self.max_total)
            wire.check_payload(payload, total, digest)
            tree = wire.decode(specs, payload, self.update_template)
            wire.check_finite(tree)
        except WireError as e:
            return pb.SubmitReply(accepted=False, reason=str(e))
        self.received = (first.header, digest, tree)
        return pb.SubmitReply(accepted=True, reason=digest)


def _poll(stub, template, max_total=1 << 31):
    stream = stub.PollTask(pb.PollRequest(run_id="run-1", site="site-a", wait_seconds=1))
    first = next(stream)
    assert first.WhichOneof("part") == "header"
    specs, total, digest = wire.manifest_from_proto(first.header.manifest)
    expected = wire.check_specs(specs, wire.template_of(template))
    payload = wire.join_chunks(_data(stream, "task"), expected, max_total)
    wire.check_payload(payload, total, digest)
    return first.header, digest, wire.decode(specs, payload, template)


def _update_chunks(tree, chunk_size=wire.DEFAULT_CHUNK_SIZE, *, extra=b"", manifest_tree=None):
    specs, payload = wire.encode(tree)
    manifest = wire.manifest_to_proto(specs, payload) if manifest_tree is None else wire.manifest_to_proto(*wire.encode(manifest_tree))
    yield pb.UpdateChunk(header=pb.UpdateHeader(run_id="run-1", round=1, site="site-a", weight=3.0,
                                                manifest=manifest, metrics={"train_loss": 0.5}))
    for part in wire.chunks(payload, chunk_size):
        yield pb.UpdateChunk(data=bytes(part))
    if extra:
        yield pb.UpdateChunk(data=extra)


@pytest.fixture
def serve():
    """serve(servicer) -> stub on 127.0.0.1 (insecure, ephemeral port, gRPC's default 4 MB limit)."""
    servers, channels = [], []

    def start(servicer):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_FederationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
        servers.append(server)
        channels.append(channel)
        return pb_grpc.FederationStub(channel)

    yield start
    for channel in channels:
        channel.close()
    for server in servers:
        server.stop(None)


def _negate(tree):
    return jax.tree_util.tree_map(np.negative, tree)


def test_grpc_round_trip_small_and_rejections(serve):
    broadcast = {"params": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "bias": np.ones(4, np.float32)}}
    update_template = jax.eval_shape(lambda t: jax.tree_util.tree_map(jnp.negative, t), broadcast)
    coordinator = _Coordinator(broadcast, update_template, chunk_size=5)
    stub = serve(coordinator)

    header, _, got = _poll(stub, broadcast)
    assert header.kind == pb.TaskHeader.TRAIN and header.round == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, broadcast)

    update = _negate(got)
    reply = stub.SubmitUpdate(_update_chunks(update, chunk_size=7))
    assert reply.accepted, reply.reason
    assert reply.reason == hashlib.sha256(wire.encode(update)[1]).hexdigest()
    sent_header, _, received = coordinator.received
    assert sent_header.site == "site-a" and dict(sent_header.metrics) == {"train_loss": 0.5}
    jax.tree_util.tree_map(np.testing.assert_array_equal, received, update)

    coordinator.received = None
    wrong_shape = {"params": {"kernel": np.zeros((4, 3), np.float32), "bias": np.zeros(4, np.float32)}}
    reply = stub.SubmitUpdate(_update_chunks(wrong_shape))
    assert not reply.accepted and "tensor 'params/kernel': expected shape (3, 4), got (4, 3)" in reply.reason
    reply = stub.SubmitUpdate(_update_chunks(update, extra=b"\x00"))
    assert not reply.accepted and "stream too long" in reply.reason
    nan_update = {"params": {"kernel": np.full((3, 4), np.nan, np.float32), "bias": np.zeros(4, np.float32)}}
    reply = stub.SubmitUpdate(_update_chunks(nan_update))
    assert not reply.accepted and "'params/kernel' is not finite" in reply.reason
    # The manifest's SHA-256 covers the payload: bytes other than the ones announced are refused.
    reply = stub.SubmitUpdate(_update_chunks(update, manifest_tree=_negate(update)))
    assert not reply.accepted and "SHA-256 mismatch" in reply.reason
    assert coordinator.received is None


def test_grpc_refuses_a_single_message_above_4mb_so_chunking_is_needed(serve):
    tree = {"w": np.zeros(2 << 20, np.float32)}  # 8 MiB
    stub = serve(_Coordinator(tree, tree))
    with pytest.raises(grpc.RpcError) as info:
        stub.SubmitUpdate(_update_chunks(tree, chunk_size=8 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.SubmitUpdate(_update_chunks(tree)).accepted  # 1 MiB chunks: fine


@pytest.mark.slow
def test_grpc_moves_a_300mb_model_both_ways_intact(serve):
    """A >= 300 MB float32 pytree travels coordinator -> site (PollTask) and back
    (SubmitUpdate) in 1 MiB chunks, bit for bit."""
    rng = np.random.default_rng(0)
    broadcast = Model(
        params={
            "encoder": {"kernel": rng.standard_normal((8192, 8192), dtype=np.float32),
                        "bias": rng.standard_normal(8192, dtype=np.float32)},
            "head": [rng.standard_normal((4096, 3072), dtype=np.float32), np.float32(0.25)],
        },
        opt_state=(),
        step=np.int32(12),
    )
    template = jax.eval_shape(lambda t: t, broadcast)
    update_template = jax.eval_shape(lambda t: jax.tree_util.tree_map(jnp.negative, t), template)
    probes = {
        "first_row": broadcast.params["encoder"]["kernel"][0].copy(),
        "last_col": broadcast.params["encoder"]["kernel"][:, -1].copy(),
        "corner": broadcast.params["head"][0][-5:, -7:].copy(),
    }
    coordinator = _Coordinator(broadcast, update_template)
    assert len(coordinator.payload) >= 300_000_000
    del broadcast
    stub = serve(coordinator)

    t0 = time.perf_counter()
    _, digest, got = _poll(stub, template)
    t_down = time.perf_counter() - t0
    assert digest == hashlib.sha256(coordinator.payload).hexdigest()
    np.testing.assert_array_equal(got.params["encoder"]["kernel"][0], probes["first_row"])
    np.testing.assert_array_equal(got.params["encoder"]["kernel"][:, -1], probes["last_col"])
    np.testing.assert_array_equal(got.params["head"][0][-5:, -7:], probes["corner"])
    assert float(got.params["head"][1]) == 0.25 and int(got.step) == 12

    update = _negate(got)
    del got
    sent_digest = hashlib.sha256(wire.encode(update)[1]).hexdigest()
    t0 = time.perf_counter()
    reply = stub.SubmitUpdate(_update_chunks(update))
    t_up = time.perf_counter() - t0
    assert reply.accepted, reply.reason
    assert reply.reason == sent_digest
    _, received_digest, received = coordinator.received
    assert received_digest == sent_digest
    np.testing.assert_array_equal(received.params["encoder"]["kernel"][0], -probes["first_row"])
    np.testing.assert_array_equal(received.params["encoder"]["kernel"][:, -1], -probes["last_col"])
    np.testing.assert_array_equal(received.params["head"][0][-5:, -7:], -probes["corner"])
    assert float(received.params["head"][1]) == -0.25 and int(received.step) == -12
    print(f"300 MB: down {t_down:.1f}s, up {t_up:.1f}s")
