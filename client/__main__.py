"""`tarefa`: the thin CLI. Parse, call one RPC, print, exit with a named code.

Exit codes: 0 ok; 1 the operation was refused (not found, already exists,
missing or wrong credentials, a limit reached, ...); 2 bad usage (arguments,
a credentials file others can read, or a value the portal rejects as
invalid); 3 the cluster or portal is unavailable; 130 interrupted (Ctrl-C,
except for `task watch`, which it ends normally); 141 the output was closed
by its reader (e.g. `| head`).

Writes carry a request id (random, or --request-id ID): after "outcome
unknown" the same command with the same --request-id is applied at most once.

Credentials (client/credentials.py) travel as `authorization: Bearer ...`
metadata: the admin token for `client` verbs, the client's secret for `task`
verbs; they are never taken from the command line unless the user insists
(--insecure-token / --insecure-secret).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import uuid
from typing import Any, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.credentials import Credentials, CredentialsError
from client.output import Printer, client_dict, event_dict, task_dict
from client.status import connect_failure
from daemons.core.config import Cluster, load_cluster
from daemons.core.domain import validate_request_id
from daemons.core.errors import ConfigError, InvalidArgument
from daemons.core.security import CLI_CERT, TlsMaterial, load_tls, open_channel
from daemons.core.terminal import terminal_safe
from proto import portal_pb2 as pb
from proto import portal_pb2_grpc

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE
MAX_TIMEOUT = 86400.0
MAX_LIMIT = 1000

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "config", "cluster.yaml")

USAGE_CODES = {grpc.StatusCode.INVALID_ARGUMENT}
UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
CREDENTIAL_HINTS = {
    "admin": "give the admin token in TAREFA_TOKEN, or a credentials file (--credentials FILE "
             "or TAREFA_CREDENTIALS, mode 0600) with a line token=...",
    "client": "give the client's secret in TAREFA_SECRET, or a credentials file (--credentials "
              "FILE or TAREFA_CREDENTIALS, mode 0600) with a line secret=...",
}


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


CONNECT_WAIT = 3.0  # seconds for each portal to accept a connection (at most --timeout)


class Session:
    """Which portal to call and how; one RPC per verb."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.printer = Printer(args.json)
        self.timeout = args.timeout
        self._cluster: Cluster | ConfigError | None = None  # None: not read yet
        self._tls: TlsMaterial | None | bool = False  # False: not loaded yet
        self.credentials = Credentials(args.credentials, args.insecure_token,
                                       args.insecure_secret)
        # One per run: a verb makes at most one write.
        self.request_id = args.request_id or uuid.uuid4().hex

    def cluster(self, required: bool = True) -> Cluster | None:
        """The cluster file, read once; unusable -> CliError, or None if not `required`."""
        if self._cluster is None:
            try:
                self._cluster = load_cluster(self.args.config)
            except ConfigError as exc:
                self._cluster = exc
        if isinstance(self._cluster, ConfigError):
            if required:
                raise CliError("\n".join(self._cluster.problems), EXIT_USAGE)
            return None
        return self._cluster

    def secrets_issued(self) -> bool | None:
        """Whether the portals check client secrets (auth: token); None: no usable
        cluster file says (e.g. --portal alone)."""
        cluster = self.cluster(required=False)
        return None if cluster is None else cluster.security.auth == "token"

    def metadata(self, service: str) -> tuple[tuple[str, str], ...]:
        """The credential for `service` as call metadata; none found -> send none
        (fine with `auth: cid-only`; otherwise the portal answers UNAUTHENTICATED)."""
        try:
            if service == "admin":
                credential = self.credentials.admin_token(self.cluster(required=False))
            else:
                credential = self.credentials.client_secret()
        except CredentialsError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        return (("authorization", f"Bearer {credential}"),) if credential else ()

    def channel(self, address: str) -> grpc.Channel:
        """A channel to a portal: TLS against the cluster file's CA when it names one."""
        if self._tls is False:
            # --portal without a usable cluster file: plaintext
            cluster = self.cluster(required=not self.args.portal)
            tls = cluster.security.tls if cluster is not None else None
            try:
                self._tls = load_tls(tls, None, check_expiry=False)
            except ConfigError as exc:
                raise CliError("\n".join(exc.problems), EXIT_USAGE) from None
        # What the portal may send: a page is sized to the cluster's
        # limits.max_message_bytes, which may exceed gRPC's 4 MiB receive
        # default (found by review: `client ls` failed once it was raised).
        # Without the cluster file (--portal) its limit is unknown: any size.
        cluster = self.cluster(required=False)
        limit = max(cluster.limits.max_message_bytes, 4 << 20) if cluster is not None else -1
        return open_channel(address, self._tls or None,
                            options=[("grpc.max_receive_message_length", limit)])

    def addresses(self, service: str) -> list[str]:
        if self.args.portal:
            return [self.args.portal]
        cluster = self.cluster()
        assert cluster is not None
        found = [p.address for p in cluster.portals if service in p.services]
        if not found:
            raise CliError(f"{self.args.config}: no portal serves {service}", EXIT_USAGE)
        return found

    def _connect(self, service: str) -> tuple[str, grpc.Channel]:
        """The address and open channel of the first reachable portal serving `service`."""
        down = []
        causes = []
        wait = min(self.timeout, CONNECT_WAIT)
        for address in self.addresses(service):
            channel = self.channel(address)
            try:
                grpc.channel_ready_future(channel).result(timeout=wait)
            except grpc.FutureTimeoutError:
                cause = _why_not_connected(channel, min(self.timeout, 1.0))
                channel.close()
                down.append(address)
                if cause is not None and cause not in causes:
                    causes.append(cause)
                continue
            return address, channel
        which = f"portal {down[0]} is" if len(down) == 1 else f"portals {', '.join(down)} are"
        hint = f"; --timeout {self.timeout:g} may be too short to connect" \
            if wait < CONNECT_WAIT else ""
        why = "".join(f"; {cause}" for cause in causes)  # one line, as promised
        raise CliError(f"{which} not reachable within {wait:g}s ({service} service){hint}{why}",
                       EXIT_UNAVAILABLE)

    def call(self, service: str, method: str, request: Any) -> Any:
        """Call `method` on the first reachable portal serving `service`."""
        stub_class = {"admin": portal_pb2_grpc.AdminPortalStub,
                      "client": portal_pb2_grpc.ClientPortalStub}[service]
        metadata = self.metadata(service)
        address, channel = self._connect(service)
        with channel:
            try:
                return getattr(stub_class(channel), method)(request, timeout=self.timeout,
                                                            metadata=metadata)
            except grpc.RpcError as exc:
                error = _rpc_error(exc, address, service)
                if error.code == EXIT_UNAVAILABLE and getattr(request, "request_id", ""):
                    error = CliError(f"{error}\nHint: retry soon with --request-id "
                                     f"{request.request_id}: it is then applied at most once",
                                     error.code)
                raise error from None
            except KeyboardInterrupt:
                if getattr(request, "request_id", ""):
                    raise CliError("interrupted: the change may or may not be applied; to "
                                   f"retry safely, give --request-id {request.request_id}",
                                   EXIT_INTERRUPTED) from None
                raise

    def stream(self, method: str, request: Any) -> Any:
        """Open the server stream `method` on the first reachable client portal."""
        metadata = self.metadata("client")
        address, channel = self._connect("client")
        return address, getattr(portal_pb2_grpc.ClientPortalStub(channel), method)(
            request, metadata=metadata)


def _why_not_connected(channel: grpc.Channel, timeout: float) -> str | None:
    """Why a channel did not connect, in an operator's words, if gRPC tells
    (one health check: its error carries the last connection error)."""
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                  timeout=timeout)
    except grpc.RpcError as exc:
        return connect_failure(exc.details() or "")
    return None  # it connected after all: no cause to give


def _rpc_error(exc: grpc.RpcError, address: str, service: str = "client") -> CliError:
    code = exc.code()
    message = exc.details() or code.name
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return CliError(f"{message}\nHint: {CREDENTIAL_HINTS[service]}", EXIT_REFUSED)
    if code in USAGE_CODES:
        return CliError(message, EXIT_USAGE)
    if code in UNAVAILABLE_CODES:
        return CliError(f"{message} (portal {address})", EXIT_UNAVAILABLE)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return CliError(f"portal {address} does not serve the {service} service (see --portal "
                        "and the services of the cluster file)", EXIT_USAGE)
    return CliError(message, EXIT_REFUSED)


def _consistency(args: argparse.Namespace) -> int:
    return pb.LINEARIZABLE if args.consistency == "linearizable" else pb.CACHED


def _cid(args: argparse.Namespace, s: Session | None = None) -> str:
    if args.cid is not None and not args.cid.strip():
        raise CliError("--cid: empty (give the client's CID, or leave --cid out to use "
                       "TAREFA_CID)", EXIT_USAGE)
    cid = args.cid or os.environ.get("TAREFA_CID", "")
    if not cid and s is not None:
        try:
            cid = s.credentials.cid() or ""
        except CredentialsError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
    if not cid:
        raise CliError("--cid is required (or set TAREFA_CID, or cid=... in the credentials "
                       "file)", EXIT_USAGE)
    return cid


# ---- verbs: one small function each ------------------------------------------

def client_add(s: Session, a: argparse.Namespace) -> None:
    if a.cid is not None and not a.cid.strip():
        # e.g. --cid "$CID" with CID unset: a generated CID would be a surprise.
        raise CliError("--cid: empty (omit --cid to have the portal generate a CID)",
                       EXIT_USAGE)
    c = s.call("admin", "CreateClient", pb.CreateClientRequest(cid=a.cid or "", data=a.data,
                                                               request_id=s.request_id))
    if not c.secret:  # auth: cid-only, or a retry of a request id already applied
        retried = bool(a.request_id) and s.secrets_issued() is not False
        # With auth: token, --json has a `secret` field always (null here, as
        # for rotate-secret; found by review: it was missing).
        s.printer.line(c.cid, {**client_dict(c), "secret": None} if retried else client_dict(c))
        if retried:
            print("Note: no secret in this answer; with auth: token that means this request "
                  "id was applied before and its secret was shown then (`tarefa client "
                  f"rotate-secret {c.cid}` issues a new one)", file=sys.stderr)
        return
    s.printer.line(f"{c.cid}\nsecret: {c.secret}", {**client_dict(c), "secret": c.secret})
    print("Note: the secret is shown only this once; give it to the client (TAREFA_SECRET, "
          "or secret=... in a mode-0600 credentials file)", file=sys.stderr)


def client_rotate_secret(s: Session, a: argparse.Namespace) -> None:
    r = s.call("admin", "RotateSecret", pb.RotateSecretRequest(cid=a.cid, request_id=s.request_id))
    if not r.secret:
        # A retry of a request id already applied: its secret was shown then.
        s.printer.line(f"client {r.cid}: secret rotated (revision {r.revision})",
                       {"cid": r.cid, "secret": None, "revision": r.revision})
        print(f"Note: no secret in this answer: request id {s.request_id} was applied before "
              "and its secret was shown then (rotate again without --request-id for a new "
              "one)", file=sys.stderr)
        return
    s.printer.line(r.secret, {"cid": r.cid, "secret": r.secret, "revision": r.revision})
    if s.secrets_issued() is False:
        print("Note: the cluster file says auth: cid-only, where portals check no secret",
              file=sys.stderr)
        return
    print(f"Note: client {r.cid}'s previous secret no longer works on any portal",
          file=sys.stderr)


def client_get(s: Session, a: argparse.Namespace) -> None:
    s.printer.record(client_dict(s.call("admin", "GetClient",
                                        pb.ClientRef(cid=a.cid, consistency=_consistency(a)))))


def client_update(s: Session, a: argparse.Namespace) -> None:
    s.printer.record(client_dict(s.call("admin", "UpdateClient", pb.UpdateClientRequest(
        cid=a.cid, data=a.data, request_id=s.request_id))))


def client_rm(s: Session, a: argparse.Namespace) -> None:
    r = s.call("admin", "DeleteClient", pb.DeleteClientRequest(cid=a.cid, request_id=s.request_id))
    s.printer.line(f"deleted client {a.cid} and {r.deleted_tasks} task(s) (revision {r.revision})",
                   {"cid": a.cid, "deleted_tasks": r.deleted_tasks, "revision": r.revision})


def client_ls(s: Session, a: argparse.Namespace) -> None:
    r = s.call("admin", "ListClients", pb.ListClientsRequest(page_token=a.page, limit=a.limit))
    s.printer.listing("clients", [client_dict(c) for c in r.clients],
                      ["cid", "revision", "updated_at", "data"], r.next)


def task_add(s: Session, a: argparse.Namespace) -> None:
    s.printer.record(task_dict(s.call("client", "CreateTask", pb.CreateTaskRequest(
        cid=_cid(a, s), title=a.title, description=a.description or "", request_id=s.request_id))))


def task_get(s: Session, a: argparse.Namespace) -> None:
    s.printer.record(task_dict(s.call("client", "GetTask", pb.TaskRef(
        cid=_cid(a, s), title=a.title, consistency=_consistency(a)))))


def task_ls(s: Session, a: argparse.Namespace) -> None:
    r = s.call("client", "ListTasks", pb.ListTasksRequest(
        cid=_cid(a, s), status=a.status or "", page_token=a.page, limit=a.limit))
    s.printer.listing("tasks", [task_dict(t) for t in r.tasks],
                      ["title", "status", "revision", "updated_at", "description"], r.next)


def task_update(s: Session, a: argparse.Namespace) -> None:
    if a.description is None and a.status is None:
        raise CliError("give --description and/or --status", EXIT_USAGE)
    s.printer.record(task_dict(s.call("client", "UpdateTask", pb.UpdateTaskRequest(
        cid=_cid(a, s), title=a.title, description=a.description, status=a.status,
        request_id=s.request_id))))


def task_done(s: Session, a: argparse.Namespace) -> None:
    s.printer.record(task_dict(s.call("client", "UpdateTask", pb.UpdateTaskRequest(
        cid=_cid(a, s), title=a.title, status="done", request_id=s.request_id))))


def task_rm(s: Session, a: argparse.Namespace) -> None:
    r = s.call("client", "DeleteTask", pb.DeleteTaskRequest(cid=_cid(a, s), title=a.title,
                                                            request_id=s.request_id))
    s.printer.line(f"deleted task {a.title!r} (revision {r.revision})",
                   {"cid": _cid(a, s), "title": a.title, "revision": r.revision})


def task_clear(s: Session, a: argparse.Namespace) -> None:
    r = s.call("client", "DeleteAllTasks", pb.DeleteAllTasksRequest(cid=_cid(a, s),
                                                                    request_id=s.request_id))
    s.printer.line(f"deleted {r.deleted_tasks} task(s) (revision {r.revision})",
                   {"cid": _cid(a, s), "deleted_tasks": r.deleted_tasks, "revision": r.revision})


def task_watch(s: Session, a: argparse.Namespace) -> None:
    address, events = s.stream("WatchTasks", pb.WatchTasksRequest(cid=_cid(a, s)))
    try:
        for event in events:
            s.printer.event(event_dict(event))
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise _rpc_error(exc, address) from None
    except KeyboardInterrupt:
        events.cancel()  # Ctrl-C is how a watch ends: exit 0


def cluster_status(s: Session, a: argparse.Namespace) -> None:
    """One row per daemon of the cluster file; unreachable ones are rows too."""
    from client.status import collect_status

    cluster = s.cluster()
    assert cluster is not None
    try:
        # Replicas take only mutual TLS: the operator's certificate pair is `tarefa`.
        tls = load_tls(cluster.security.tls, CLI_CERT, check_expiry=False)
    except ConfigError as exc:
        raise CliError("\n".join(exc.problems), EXIT_USAGE) from None
    rows = collect_status(cluster, timeout=min(s.timeout, 2.0), tls=tls)
    if s.printer.as_json:
        s.printer.document({"daemons": rows})
    else:
        s.printer.listing("daemons", [{**r, "detail": _status_detail(r)} for r in rows],
                          ["id", "kind", "address", "reachable", "role", "detail"], "")
    if not all(r["reachable"] for r in rows):
        raise CliError("some daemons are unreachable", EXIT_UNAVAILABLE)


def _status_detail(row: dict[str, Any]) -> str:
    if row["kind"] == "replica" and row["reachable"]:
        return (f"term={row['term']} commit={row['commit_index']} "
                f"applied={row['applied_index']} rev={row['revision']}")
    if row["kind"] == "portal" and row["reachable"]:
        return (f"cache={row['cache_entries']} hits={row['cache_hit_rate']:.2f} "
                f"broker={'up' if row['broker_connected'] else 'DOWN'} "
                f"watch={row['watch_streams']} denied={row['auth_refused']} "
                f"limited={row['limited']}"
                + (f" DROPPED={row['events_dropped']}" if row["events_dropped"] else ""))
    if row["kind"] == "listener" and row["reachable"]:
        return (f"events={row['events_written']} rejects={row['rejects']} "
                f"broker={'up' if row['broker_connected'] else 'DOWN'}"
                + (f" SESSIONS_LOST={row['sessions_lost']}" if row["sessions_lost"] else "")
                + (f" MISSING={row['missing_revisions']}" if row["missing_revisions"] else ""))
    return row.get("error", "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tarefa", description="Tarefa command-line client.")
    p.add_argument("--config", default=os.environ.get("TAREFA_CONFIG", DEFAULT_CONFIG),
                   help="cluster file naming the portals (default $TAREFA_CONFIG, else "
                        "config/cluster.yaml)")
    p.add_argument("--portal", type=_portal_address,
                   help="HOST:PORT of the portal to call (overrides --config)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=_timeout, default=10.0,
                   help="seconds per call (default 10)")
    p.add_argument("--request-id", type=_request_id, metavar="ID",
                   help="request id of a write (default: random); give the one an "
                        "'outcome unknown' error named to retry it without a second effect")
    p.add_argument("--credentials", metavar="FILE",
                   help="file with token=... (admin) and/or secret=..., cid=... lines, mode "
                        "0600 (default $TAREFA_CREDENTIALS)")
    p.add_argument("--insecure-token", metavar="TOKEN",
                   help="the admin token on the command line, where `ps` shows it to every "
                        "user: prefer TAREFA_TOKEN or --credentials")
    p.add_argument("--insecure-secret", metavar="SECRET",
                   help="the client's secret on the command line, where `ps` shows it to "
                        "every user: prefer TAREFA_SECRET or --credentials")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="{client,task,cluster}")

    def verb(group: Any, name: str, fn: Callable, help_text: str) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text)
        sub.set_defaults(fn=fn)
        # Also after the verb (`tarefa cluster status --json`); SUPPRESS keeps
        # the value given before it when not repeated here.
        sub.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print JSON (also accepted before the verb)")
        # Likewise the options a retry hint or a slow cluster make people append
        # (found by review: `... --request-id ID` after the verb was refused).
        sub.add_argument("--timeout", type=_timeout, default=argparse.SUPPRESS,
                         help="seconds per call (also accepted before the verb)")
        sub.add_argument("--request-id", type=_request_id, metavar="ID",
                         default=argparse.SUPPRESS,
                         help="request id of a write (also accepted before the verb)")
        return sub

    def consistency(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--consistency", choices=["cached", "linearizable"], default="cached",
                         help="linearizable bypasses the portal cache")

    def paging(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--limit", type=_limit, default=100,
                         help=f"page size, 1 to {MAX_LIMIT} (default 100)")
        sub.add_argument("--page", default="", help="page token from a previous listing")

    clients = kinds.add_parser("client", help="administer clients").add_subparsers(
        dest="verb", required=True)
    v = verb(clients, "add", client_add, "register a client; prints its CID (and its secret, "
             "shown only this once)")
    v.add_argument("--cid", help="the CID (default: generated)")
    v.add_argument("data", help="client data, a JSON object")
    v = verb(clients, "get", client_get, "show a client")
    v.add_argument("cid")
    consistency(v)
    v = verb(clients, "update", client_update, "replace a client's data")
    v.add_argument("cid")
    v.add_argument("data")
    v = verb(clients, "rm", client_rm, "delete a client and all its tasks")
    v.add_argument("cid")
    v = verb(clients, "rotate-secret", client_rotate_secret,
             "issue a new secret for a client (prints it); the old one stops working")
    v.add_argument("cid")
    paging(verb(clients, "ls", client_ls, "list clients"))

    cluster = kinds.add_parser("cluster", help="the daemons of the cluster file").add_subparsers(
        dest="verb", required=True)
    verb(cluster, "status", cluster_status, "reachability and state of every daemon")

    tasks = kinds.add_parser("task", help="a client's tasks").add_subparsers(
        dest="verb", required=True)

    def task_verb(name: str, fn: Callable, help_text: str, title: bool = True):  # type: ignore[no-untyped-def]
        sub = verb(tasks, name, fn, help_text)
        sub.add_argument("--cid", help="the client's CID (default: $TAREFA_CID)")
        if title:
            sub.add_argument("title")
        return sub

    v = task_verb("add", task_add, "add a task")
    v.add_argument("description", nargs="?", default="")
    consistency(task_verb("get", task_get, "show a task"))
    v = task_verb("ls", task_ls, "list tasks", title=False)
    v.add_argument("--status", choices=["pending", "done"])
    paging(v)
    v = task_verb("update", task_update, "change a task's description and/or status")
    v.add_argument("--description")
    v.add_argument("--status", choices=["pending", "done"])
    task_verb("done", task_done, "mark a task done")
    task_verb("rm", task_rm, "delete a task")
    task_verb("clear", task_clear, "delete all of a client's tasks", title=False)
    task_verb("watch", task_watch, "stream a client's task changes", title=False)
    return p


# ---- argument types (argparse turns their ValueError/ArgumentTypeError into exit 2) ----

def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # refused below, by the same message
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most "
                                         f"{MAX_TIMEOUT:g} (got {text!r})")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0  # refused below, by the same message
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_LIMIT} (got {text!r})")
    return value


_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


def _portal_address(text: str) -> str:
    found = _ADDRESS.fullmatch(text)
    if found is None or not 1 <= int(found.group(1)) <= 65535:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT with a port 1..65535 "
                                         f"(got {text!r})")
    return text


def _request_id(text: str) -> str:
    try:
        return validate_request_id(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("request_id: ")) from None


def _check_text_arguments(args: argparse.Namespace) -> None:
    """Arguments that are not valid UTF-8 (a terminal in another encoding) arrive
    as lone surrogates: refuse them by name instead of failing inside gRPC."""
    named = dict(vars(args))
    named["TAREFA_CID"] = os.environ.get("TAREFA_CID")
    for name, value in named.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise CliError(f"{name}: not valid UTF-8 (check the terminal's encoding, "
                               "e.g. LANG=C.UTF-8)", EXIT_USAGE) from None


def main(argv: list[str] | None = None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        # A non-UTF-8 terminal: escape what it cannot show instead of a
        # UnicodeEncodeError traceback halfway through a table.
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    try:
        _check_text_arguments(args)
        args.fn(Session(args), args)
    except CliError as exc:
        # Messages may quote a portal's words (or a stranger's, with --portal).
        print(f"Error: {terminal_safe(str(exc), keep=chr(10))}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): say nothing more, and keep Python's
        # final flush of stdout from failing again (as the Python docs advise).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
