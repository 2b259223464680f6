"""The committed proto/*_pb2*.py are exactly what proto/generate.sh makes from proto/*.proto."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HINT = "generated protobuf code is stale: run proto/generate.sh and commit proto/*_pb2*.py"


def committed() -> dict[str, bytes]:
    out = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "proto", "*_pb2*.py"))):
        with open(path, "rb") as f:
            out[os.path.basename(path)] = f.read()
    return out


def test_every_proto_has_committed_generated_code():
    protos = sorted(os.path.basename(p)[:-len(".proto")]
                    for p in glob.glob(os.path.join(ROOT, "proto", "*.proto")))
    assert protos, "no proto/*.proto found"
    expected = sorted(f"{name}{suffix}" for name in protos for suffix in ("_pb2.py", "_pb2_grpc.py"))
    assert sorted(committed()) == expected, HINT


def test_generated_code_is_current(tmp_path):
    done = subprocess.run(["bash", os.path.join("proto", "generate.sh"), str(tmp_path)],
                          cwd=ROOT, env={**os.environ, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"proto/generate.sh failed:\n{done.stdout}\n{done.stderr}"
    generated = {}
    for path in sorted(glob.glob(os.path.join(str(tmp_path), "proto", "*_pb2*.py"))):
        with open(path, "rb") as f:
            generated[os.path.basename(path)] = f.read()
    assert generated, f"proto/generate.sh wrote nothing under {tmp_path}/proto"
    ours = committed()
    assert sorted(generated) == sorted(ours), (
        f"{HINT} (generated {sorted(generated)}, committed {sorted(ours)})")
    stale = [name for name in generated if generated[name] != ours[name]]
    assert stale == [], f"{HINT} (differs: {', '.join(stale)})"


def test_generated_grpc_module_imports_from_the_package():
    # A bare `import replica_pb2` breaks inside the package; generate.sh runs
    # from the repo root so the import reads `from proto import replica_pb2`.
    for name, text in committed().items():
        if name.endswith("_pb2_grpc.py"):
            base = name[:-len("_grpc.py")]
            assert f"from proto import {base} as " in text.decode(), HINT
