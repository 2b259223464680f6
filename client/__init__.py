"""The `tarefa` CLI (client/__main__.py)."""

import os
import sys

# gRPC's own log lines ("Handshake failed with error SSL_ERROR_SSL ...", three
# per try) are not for the CLI's user: its message says what failed. Set here,
# before the package imports grpc, and only in the CLI's own process (`tarefa`,
# or `python -m client`, whose argv[0] is "-m" while this package is imported):
# set in a test run that imports the package, it would reach every daemon the
# tests start and hide the gRPC lines some tests look for. An explicit
# GRPC_VERBOSITY wins.
if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "tarefa"):
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
