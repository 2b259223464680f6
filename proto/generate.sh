#!/usr/bin/env bash
# The only way proto/*_pb2*.py are made. Run from anywhere; generates from the
# repo root so the imports read `from proto import replica_pb2`.
# tests/unit/test_proto_current.py fails when the committed code is stale.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-.}
"$PY" -m grpc_tools.protoc -I. --python_out="$OUT" --grpc_python_out="$OUT" proto/*.proto
