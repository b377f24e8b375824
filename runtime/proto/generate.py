"""Regenerate the committed gRPC stubs from ``nordfl/runtime/v1/federation.proto``.

    python -m nordfl.runtime.proto.generate            # rewrite the stubs next to this file
    python -m nordfl.runtime.proto.generate --out DIR  # write them to DIR instead

protoc is run with this directory as the include root, so the descriptor is registered under
its full, unique name ``nordfl/runtime/v1/federation.proto``. protoc then places the Python
module at ``nordfl.runtime.v1.federation_pb2``; the stubs live in ``nordfl.runtime.proto``
instead, so two lines are rewritten: the message module's own name and the gRPC module's
import of it. Each rewrite must match exactly once, so a protoc that emits something else
fails loudly instead of producing a broken stub.

Needs ``grpcio-tools`` (a dev dependency), imported only when generating, so this module
imports fine in a plain install. Output is byte-for-byte deterministic for a given
grpcio-tools version; ``tests/runtime/test_proto_fresh.py`` compares it with the committed
files.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

__all__ = ["GENERATED", "PROTO_FILE", "PROTO_ROOT", "generate", "main"]

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILE = "nordfl/runtime/v1/federation.proto"
GENERATED = ("federation_pb2.py", "federation_pb2.pyi", "federation_pb2_grpc.py")

_PROTOC_MODULE = "nordfl.runtime.v1"  # where protoc thinks the module lives (from the .proto path)
_PACKAGE = "nordfl.runtime.proto"  # where it actually lives

_REWRITES = {
    "federation_pb2.py": [
        (f"'{_PROTOC_MODULE}.federation_pb2'", f"'{_PACKAGE}.federation_pb2'"),
    ],
    "federation_pb2_grpc.py": [
        (f"from {_PROTOC_MODULE} import federation_pb2 as", f"from {_PACKAGE} import federation_pb2 as"),
        (f"{_PROTOC_MODULE.replace('.', '/')}/federation_pb2_grpc.py", f"{_PACKAGE.replace('.', '/')}/federation_pb2_grpc.py"),
    ],
    "federation_pb2.pyi": [],
}


def _is_bare_import(line: str) -> bool:
    return line.startswith(("import federation_pb2", f"from {_PROTOC_MODULE} import"))


def _rewrite(name: str, text: str) -> str:
    for old, new in _REWRITES[name]:
        count = text.count(old)
        if count != 1:
            raise RuntimeError(f"{name}: expected exactly one {old!r} in protoc's output, found {count}")
        text = text.replace(old, new)
    stale = [line for line in text.splitlines() if _PROTOC_MODULE + ".federation_pb2" in line or _is_bare_import(line)]
    if stale:
        raise RuntimeError(f"{name}: still refers to protoc's module path after the rewrite: {stale[0]!r}")
    return text


def generate(out_dir: str | Path | None = None) -> list[Path]:
    """Run protoc on the .proto and write the fixed-up stubs into ``out_dir`` (default: this
    package's directory). Returns the written paths."""
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("generating the stubs needs grpcio-tools: pip install grpcio-tools") from e

    out = Path(out_dir) if out_dir is not None else PROTO_ROOT
    out.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory(prefix="nordfl-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_ROOT}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            str(PROTO_ROOT / PROTO_FILE),
        ]
        rc = protoc.main(args)
        if rc != 0:
            raise RuntimeError(f"protoc failed with exit status {rc}: {' '.join(args[1:])}")
        produced = Path(tmp) / Path(PROTO_FILE).parent
        written = []
        for name in GENERATED:
            text = (produced / name).read_bytes().decode("utf-8")
            target = out / name
            target.write_bytes(_rewrite(name, text).encode("utf-8"))
            written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nordfl.runtime.proto.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: next to the .proto's package)")
    args = parser.parse_args(argv)
    try:
        for path in generate(args.out):
            print(f"wrote {path}")
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
