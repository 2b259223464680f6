"""`tarefa-replica --config FILE --id ID`: one Raft member of the replica tier."""

from __future__ import annotations

import sys

from daemons.core.lifecycle import daemon_main
from daemons.replica.daemon import ReplicaDaemon


def main(argv: list[str] | None = None) -> int:
    return daemon_main("tarefa-replica", "Run one Tarefa replica (Raft member on LevelDB).",
                       ReplicaDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
