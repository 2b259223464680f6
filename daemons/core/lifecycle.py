"""What every daemon shares: argument parsing, signals, the run loop, readiness.

A daemon subclasses `Daemon` and implements `start` (bind and serve) and
`stop` (drain, close). Signal handlers only set flags; the run loop acts on
them. Readiness is sent to systemd (`READY=1`) only after `start` returned,
i.e. once the daemon really serves.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import threading
from typing import Callable, Sequence

from daemons.core.config import Cluster, load_cluster
from daemons.core.errors import ConfigError, TarefaError
from daemons.core.log import setup_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logging.getLogger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop a daemon's gRPC runs on (replica and portal)."""
    if os.environ.get("TAREFA_EVENT_LOOP", "uvloop") == "asyncio":
        return asyncio.new_event_loop()
    import uvloop

    return uvloop.new_event_loop()


def sd_notify(message: str) -> bool:
    """Send a state line to systemd's notify socket, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], exc)
        return False


class Daemon:
    """Lifecycle base: run() blocks until SIGTERM/SIGINT, then drains and stops."""

    def __init__(self, daemon_id: str, cluster: Cluster) -> None:
        self.daemon_id = daemon_id
        self.cluster = cluster
        self._stop_requested = threading.Event()
        self._reload_requested = threading.Event()

    # subclasses implement these
    def start(self) -> None:
        raise NotImplementedError

    def stop(self, grace: float) -> None:
        raise NotImplementedError

    def reload(self) -> None:
        log.info("%s: SIGHUP: nothing can be reloaded at run time yet", self.daemon_id)

    def tick(self) -> None:
        """Called from the run loop about twice a second."""

    def request_stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *_: self._stop_requested.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop_requested.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload_requested.set())
        self.start()
        # Everything built so far (modules, protobuf descriptors, gRPC, the
        # daemon's own wiring) lives as long as the process: move it out of the
        # cyclic GC's reach, so full collections scan only what serving creates.
        gc.freeze()
        sd_notify("READY=1\nSTATUS=serving")
        log.info("%s: ready", self.daemon_id)
        while not self._stop_requested.wait(0.5):
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.reload()
            self.tick()
        log.info("%s: stopping (grace %.1fs)", self.daemon_id, self.cluster.grace_seconds)
        sd_notify("STOPPING=1")
        self.stop(self.cluster.grace_seconds)
        log.info("%s: stopped", self.daemon_id)
        return EXIT_OK


# An offline action a daemon's command offers instead of running (e.g. the
# replica's --repair-journal): (flag, help, run(cluster, daemon_id) -> exit code).
# It runs after the cluster file was validated; TarefaError is reported and exits 1.
Action = tuple[str, str, Callable[[Cluster, str], int]]


def daemon_main(prog: str, description: str, build: Callable[[Cluster, str], Daemon],
                argv: Sequence[str] | None = None, needs_id: bool = True,
                actions: Sequence[Action] = (), shown: Sequence[tuple[str, str]] = ()) -> int:
    """The whole of a daemon's __main__: parse, validate, build, run, map exit codes.

    `shown`: (flag, help) of switches the caller took from argv itself, listed
    in --help (and accepted) here too."""
    # Nothing a daemon writes (LevelDB, the Raft journal, the audit log) is for
    # other users; a stricter umask of the caller stays (systemd: 0027).
    os.umask(os.umask(0o027) | 0o027)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="cluster file (YAML)")
    if needs_id:
        parser.add_argument("--id", required=True, help="this daemon's id in the cluster file")
    for flag, text in shown:
        parser.add_argument(flag, action="store_true", help=text)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--check-config", action="store_true",
                       help="validate the cluster file, the id and the secret files this "
                            "daemon reads, and exit")
    for flag, text, _ in actions:
        modes.add_argument(flag, action="store_true", help=text)
    args = parser.parse_args(argv)
    if needs_id and not args.id.strip():
        parser.error("--id: must name a daemon of the cluster file (got an empty string)")
    daemon_id = getattr(args, "id", None) or prog
    try:
        cluster = load_cluster(args.config)
        if args.check_config:
            build_check = getattr(build, "check", None)
            if build_check is not None:
                build_check(cluster, daemon_id)
            print(f"{args.config}: OK")
            return EXIT_OK
        for flag, _, run in actions:
            if getattr(args, flag.lstrip("-").replace("-", "_")):
                try:
                    return run(cluster, daemon_id)
                except ConfigError:
                    raise
                except TarefaError as exc:
                    print(f"Error: {exc}", file=sys.stderr)
                    return EXIT_FAILURE
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"Error: {problem}", file=sys.stderr)
        id_arg = " --id ID" if needs_id else ""
        print(f"Hint: fix the cluster file; `{prog} --config FILE{id_arg} --check-config` "
              "validates it without starting", file=sys.stderr)
        return EXIT_CONFIG
    id_of = getattr(build, "id_of", None)  # a daemon whose id comes from the cluster file
    if id_of is not None:
        try:
            daemon_id = id_of(cluster)
        except ConfigError:
            pass  # build() reports it
    setup_logging(daemon_id, cluster.log_level)
    try:
        daemon = build(cluster, daemon_id)
        return daemon.run()
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"Error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except TarefaError as exc:
        log.critical("%s: fatal: %s", daemon_id, exc)
        return EXIT_FAILURE
