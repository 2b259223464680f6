"""`tarefa-replica --config FILE --id ID`: one Raft member of the replica tier."""

from __future__ import annotations

import sys

from daemons.core.lifecycle import daemon_main
from daemons.replica.daemon import ReplicaDaemon, repair_journal

REPAIR_HELP = ("with the replica stopped: cut a Raft journal torn by a power cut back to its "
               "last whole record (the original is kept as raft/journal.torn-TIME), and exit")


def main(argv: list[str] | None = None) -> int:
    return daemon_main("tarefa-replica", "Run one Tarefa replica (Raft member on LevelDB).",
                       ReplicaDaemon, argv,
                       actions=[("--repair-journal", REPAIR_HELP, repair_journal)])


if __name__ == "__main__":
    sys.exit(main())
