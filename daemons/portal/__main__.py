"""`tarefa-portal --config FILE --id ID`: serve AdminPortal and/or ClientPortal."""

from __future__ import annotations

import sys

from daemons.core.lifecycle import daemon_main
from daemons.portal.daemon import PortalDaemon


def main(argv: list[str] | None = None) -> int:
    return daemon_main("tarefa-portal", "Run one Tarefa portal (gRPC API, coherent cache).",
                       PortalDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
