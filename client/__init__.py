"""The `tarefa` CLI (client/__main__.py)."""

import os

# gRPC's own log lines ("Handshake failed with error SSL_ERROR_SSL ...", three
# per try) are not for the CLI's user: its message says what failed. Set here,
# before any module of the package imports grpc; an explicit GRPC_VERBOSITY wins.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")
