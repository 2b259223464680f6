"""`tarefa-listener --config FILE [--follow]`: append every change event to the audit log."""

from __future__ import annotations

import argparse
import sys

from daemons.core.config import Cluster
from daemons.core.lifecycle import daemon_main
from daemons.listener.daemon import ListenerDaemon, listener_spec

DESCRIPTION = "Run the Tarefa listener: append every change event to the audit log."
FOLLOW_HELP = "also print each event as a readable line on stdout"


class _Builder:
    """daemon_main's `build`; its `check` also runs for --check-config."""

    # The section and every secret the listener reads (TLS, MQTT login), as a
    # start would: --check-config said OK while a start then exited 2.
    check = staticmethod(ListenerDaemon.check)

    def __init__(self, follow: bool) -> None:
        self.follow = follow

    @staticmethod
    def id_of(cluster: Cluster) -> str:
        """The id that tags log lines (also a fatal error's): the cluster file's."""
        return listener_spec(cluster).id

    def __call__(self, cluster: Cluster, _daemon_id: str) -> ListenerDaemon:
        out = None
        if self.follow:
            sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[attr-defined]
            out = sys.stdout
        return ListenerDaemon(cluster, follow=out)


def main(argv: list[str] | None = None) -> int:
    # daemon_main knows --config and --check-config only; take --follow first.
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--follow", action="store_true")
    known, rest = pre.parse_known_args(argv)
    return daemon_main("tarefa-listener", DESCRIPTION, _Builder(known.follow), rest,
                       needs_id=False, shown=[("--follow", FOLLOW_HELP)])


if __name__ == "__main__":
    sys.exit(main())
