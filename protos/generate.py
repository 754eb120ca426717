"""Generate the Python gRPC code for protos/ into client/fusion_client/_proto.

The generated files are committed (the client install needs no grpcio-tools);
tests/unit/test_proto_fresh.py fails when they are stale. Run `make proto`.
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
OUT_DIR = ROOT / "client" / "fusion_client" / "_proto"
PROTOS = ["fusion/v1/fusion.proto", "fusion/v1/engine.proto"]


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc for every proto into out_dir; return the files written."""
    from grpc_tools import protoc  # dev-only dependency

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        text = path.read_text()
        # Absolute "from fusion.v1 import x_pb2" -> package-relative imports.
        text = re.sub(r"^from fusion\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
        path.write_text(text)
        written.append(path)
    for pkg in {p.parent for p in written} | {out_dir, out_dir / "fusion"}:
        init = pkg / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated code; see protos/generate.py."""\n')
            written.append(init)
    return written


def main() -> int:
    if "--check" in sys.argv:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = pathlib.Path(tmp)
            generate(fresh)
            stale = [
                str(p.relative_to(fresh))
                for p in fresh.rglob("*.py*")
                if not (OUT_DIR / p.relative_to(fresh)).exists()
                or (OUT_DIR / p.relative_to(fresh)).read_text() != p.read_text()
            ]
        if stale:
            print("stale generated files (run `make proto`):", *stale, sep="\n  ")
            return 1
        return 0
    generate(OUT_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
