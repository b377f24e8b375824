"""The wire fuzzer: mutated upload streams fed to the coordinator's ``submit`` (no gRPC, so thousands a second).

Each input starts from a valid update and mutates the header (run, round, site, weight, manifest, metrics)
or the data chunks (cut, extended, bit-flipped, reordered, a second header). Whatever arrives, ``submit``
answers with a reply (no exception escapes), and an accepted update is exactly a well-formed one: its bytes
hash to the manifest, its tensors match the job's and are finite, its weight within the declared rows.

20,000 inputs by default (about 20 s here); ``NORDFL_FUZZ_INPUTS=400000 pytest tests/runtime/test_wire_fuzz.py`` for more.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from nordfl.runtime import wire
from nordfl.runtime.coordinator import coordinator_for
from nordfl.runtime.proto import federation_pb2 as pb

from .helpers import SITES, provisioned

INPUTS = int(os.environ.get("NORDFL_FUZZ_INPUTS", "20000"))
ROWS = 200


def _mutate_header(header: pb.UpdateHeader, rng: np.random.Generator) -> None:
    choice = rng.integers(12)
    m = header.manifest
    if choice == 0:
        header.run_id = rng.bytes(int(rng.integers(0, 64))).hex()
    elif choice == 1:
        header.round = int(rng.integers(0, 2**63))
    elif choice == 2:
        header.site = rng.choice(["", "Hungary", "Cleveland\x00", "x" * 10_000])
    elif choice == 3:
        header.weight = float(rng.choice([np.nan, np.inf, -1.0, 1e300, ROWS + 1, 0.0, 5e-324]))
    elif choice == 4:
        m.total_bytes = int(rng.integers(0, 2**64, dtype=np.uint64))
    elif choice == 5:
        m.sha256 = rng.bytes(32).hex() if rng.random() < 0.5 else "zz"
    elif choice == 6 and len(m.tensors):
        t = m.tensors[int(rng.integers(len(m.tensors)))]
        t.dtype = str(rng.choice(["float64", "int32", "bool", "bfloat16", "object", "", "float32"]))
    elif choice == 7 and len(m.tensors):
        t = m.tensors[int(rng.integers(len(m.tensors)))]
        del t.shape[:]
        t.shape.extend(int(d) for d in rng.integers(-2, 40, size=int(rng.integers(0, 4))))
    elif choice == 8 and len(m.tensors):
        m.tensors[int(rng.integers(len(m.tensors)))].name = str(rng.choice(["", "delta", "../x", "delta/linear/kernel"]))
    elif choice == 9:
        m.tensors.add(name="extra", dtype="float32", shape=[1])
    elif choice == 10:
        header.metrics[str(rng.choice(["train_loss", "x" * 100, ""]))] = float(rng.choice([np.nan, -np.inf, 1.0, 1e308]))
    else:
        header.secagg_step = int(rng.integers(0, 6))


def _mutate_data(data: list[bytes], rng: np.random.Generator) -> list:
    choice = rng.integers(6)
    joined = bytearray(b"".join(data))
    if choice == 0 and joined:
        joined = joined[: int(rng.integers(0, len(joined)))]
    elif choice == 1:
        joined += rng.bytes(int(rng.integers(1, 64)))
    elif choice == 2 and joined:
        i = int(rng.integers(len(joined)))
        joined[i] ^= 1 << int(rng.integers(8))
    elif choice == 3 and joined:  # NaN bytes in a float32
        i = 4 * int(rng.integers(len(joined) // 4))
        joined[i:i + 4] = np.float32(np.nan).tobytes()
    chunks = [pb.UpdateChunk(data=bytes(joined[i:i + 17])) for i in range(0, len(joined), 17)]
    if choice == 4 and len(chunks) > 1:
        rng.shuffle(chunks)
    if choice == 5:
        chunks.insert(int(rng.integers(len(chunks) + 1)), pb.UpdateChunk(header=pb.UpdateHeader(site="Cleveland")))
    return chunks


@pytest.mark.slow
def test_no_mutated_upload_crashes_the_coordinator_or_is_accepted_malformed(tmp_path):
    federation, _ = provisioned(tmp_path)
    coordinator = coordinator_for(["runtime.rounds=1"], federation, tmp_path / "state", log=lambda m: None)
    for name in SITES:
        coordinator.join(name, pb.JoinRequest(site=name, protocol_version=wire.PROTOCOL_VERSION, rows=ROWS))
    coordinator.rejections.burst = 10**9  # the fuzzer checks replies, not the log's rate limit
    template = wire.template_of(coordinator.update_template)
    rng = np.random.default_rng(15)
    update = jax.tree_util.tree_map(lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), coordinator.update_template)
    specs, payload = wire.encode(update)
    accepted = mutated = 0
    for i in range(INPUTS):
        header = pb.UpdateHeader(run_id=coordinator.run_id, round=0, site="Cleveland", weight=float(ROWS),
                                 manifest=wire.manifest_to_proto(specs, payload), metrics={"train_loss": 0.5})
        data = [payload]
        if rng.random() < 0.9:
            mutated += 1
            for _ in range(int(rng.integers(1, 3))):
                _mutate_header(header, rng)
        chunks = _mutate_data(data, rng) if rng.random() < 0.5 else [pb.UpdateChunk(data=payload)]
        sent = b"".join(c.data for c in chunks if c.WhichOneof("part") == "data")
        reply = coordinator.submit("Cleveland", iter([pb.UpdateChunk(header=header)] + chunks))
        assert isinstance(reply, pb.SubmitReply)
        if reply.accepted:
            accepted += 1
            stored, weight, metrics, norm = coordinator.updates.pop("Cleveland")
            assert wire.sha256_hex(sent) == header.manifest.sha256 and len(sent) == sum(t.nbytes for t in template)
            assert wire.template_of(stored) == template
            assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(stored))
            assert 0 <= weight <= ROWS and all(np.isfinite(v) for v in metrics.values())
        assert coordinator.round == 0 and "Cleveland" not in coordinator.updates
    assert mutated > 0.85 * INPUTS and 0 < accepted < INPUTS - mutated + 0.2 * INPUTS  # most mutations are refused
