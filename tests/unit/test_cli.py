"""client/__main__.py and client/output.py: argument checks, exit codes and
messages that need no portal (a fake channel stands in for gRPC where a
status code is needed; tests/integration/test_portal_stack.py runs the CLI
against real portals)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import grpc
import pytest
import yaml

import client.__main__ as cli
from client.output import Printer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = cli.main(["--portal", "127.0.0.1:9", *argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv, word", [
    (["--timeout", "0", "client", "ls"], "--timeout"),
    (["--timeout", "-1", "client", "ls"], "--timeout"),
    (["--timeout", "nan", "client", "ls"], "--timeout"),
    (["--timeout", "inf", "client", "ls"], "--timeout"),
    (["--timeout", "1e10", "client", "ls"], "--timeout"),
    (["client", "ls", "--limit", "-1"], "--limit"),
    (["client", "ls", "--limit", "0"], "--limit"),
    (["task", "ls", "--cid", "7", "--limit", "5000000000"], "--limit"),
    (["--request-id", "", "client", "rm", "7"], "--request-id"),
    (["--request-id", "x" * 129, "client", "rm", "7"], "--request-id"),
])
def test_bad_option_values_are_usage_errors(capsys, argv, word):
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE and word in err and "Traceback" not in err


@pytest.mark.parametrize("address", ["abc", ":99", "127.0.0.1", "127.0.0.1:0",
                                     "127.0.0.1:99999", "http://127.0.0.1:80", ""])
def test_a_malformed_portal_address_is_a_usage_error(capsys, address):
    try:
        cli.main(["--portal", address, "client", "ls"])
    except SystemExit as exc:
        assert exc.code == cli.EXIT_USAGE
    assert "HOST:PORT" in capsys.readouterr().err


def test_well_formed_portal_addresses_parse():
    for address in ("127.0.0.1:7201", "localhost:1", "[::1]:65535", "portal-1.example:443"):
        assert cli.build_parser().parse_args(["--portal", address, "client", "ls"]).portal \
            == address


@pytest.mark.parametrize("argv, field", [
    (["task", "add", "--cid", "7", "bad\udcffbyte"], "title"),
    (["task", "add", "--cid", "7", "t", "bad\udcff"], "description"),
    (["client", "add", '{"a": "\udcff"}'], "data"),
])
def test_arguments_that_are_not_utf8_are_refused_by_name(capsys, argv, field):
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE and f"{field}: not valid UTF-8" in err


def test_a_cid_from_the_environment_that_is_not_utf8(capsys, monkeypatch):
    monkeypatch.setenv("TAREFA_CID", "7\udcff")
    code, _, err = run(capsys, "task", "ls")
    assert code == cli.EXIT_USAGE and "TAREFA_CID: not valid UTF-8" in err


class _Failure(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Channel:
    """Answers every unary call with `outcome` (an exception is raised)."""

    def __init__(self, outcome: BaseException) -> None:
        self.outcome = outcome
        self.requests: list = []

    def __enter__(self) -> "_Channel":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def unary_unary(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        def call(request, timeout=None, metadata=None):  # type: ignore[no-untyped-def]
            self.requests.append(request)
            raise self.outcome
        return call

    unary_stream = unary_unary


def _answering(monkeypatch, outcome: BaseException) -> _Channel:
    channel = _Channel(outcome)
    monkeypatch.setattr(cli.Session, "_connect",
                        lambda self, service: ("127.0.0.1:9", channel))
    monkeypatch.setattr(cli.Session, "metadata", lambda self, service: ())
    return channel


def test_an_unknown_outcome_names_the_request_id_to_retry_with(capsys, monkeypatch):
    channel = _answering(monkeypatch, _Failure(grpc.StatusCode.UNAVAILABLE, "no quorum"))
    code, _, err = run(capsys, "task", "add", "--cid", "7", "t")
    rid = channel.requests[0].request_id
    assert code == cli.EXIT_UNAVAILABLE and f"--request-id {rid}" in err
    # ... and the retry sends exactly that id.
    code, _, _ = run(capsys, "--request-id", rid, "task", "add", "--cid", "7", "t")
    assert channel.requests[1].request_id == rid
    # A read has no request id and gets no such hint.
    code, _, err = run(capsys, "task", "get", "--cid", "7", "t")
    assert code == cli.EXIT_UNAVAILABLE and "--request-id" not in err


def test_ctrl_c_during_a_write_exits_130_and_says_how_to_retry(capsys, monkeypatch):
    channel = _answering(monkeypatch, KeyboardInterrupt())
    code, _, err = run(capsys, "client", "rm", "7")
    assert code == cli.EXIT_INTERRUPTED
    assert f"--request-id {channel.requests[0].request_id}" in err
    code, _, err = run(capsys, "client", "ls")
    assert code == cli.EXIT_INTERRUPTED and "interrupted" in err


def test_ctrl_c_ends_a_watch_normally(capsys, monkeypatch):
    class Stream:
        cancelled = False

        def __iter__(self):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt

        def cancel(self) -> None:
            Stream.cancelled = True

    monkeypatch.setattr(cli.Session, "stream", lambda self, method, request: ("a:1", Stream()))
    code, _, _ = run(capsys, "task", "watch", "--cid", "7")
    assert code == cli.EXIT_OK and Stream.cancelled


def test_a_portal_without_the_service_is_named(capsys, monkeypatch):
    _answering(monkeypatch, _Failure(grpc.StatusCode.UNIMPLEMENTED, "Method not found!"))
    code, _, err = run(capsys, "task", "ls", "--cid", "7")
    assert code == cli.EXIT_USAGE and "does not serve the client service" in err


def test_a_closed_output_pipe_exits_141_quietly():
    """`tarefa ... | head`: a real process whose reader closes the pipe early."""
    code = ("import client.__main__ as c\n"
            "c.client_ls = lambda s, a: [print('x' * 99) for _ in range(100000)]\n"
            "raise SystemExit(c.main(['--portal', '127.0.0.1:9', 'client', 'ls']))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(10) == b"x" * 10
        proc.stdout.close()
        assert proc.wait(30) == cli.EXIT_BROKEN_PIPE
        assert proc.stderr.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_tables_show_the_identifier_whole_and_cut_the_rest():
    out = io.StringIO()
    title, description = "t" * 200, "d" * 200
    Printer(False, out).listing("tasks", [{"title": title, "description": description}],
                                ["title", "description"], "")
    row = out.getvalue().splitlines()[1]
    assert title in row and description not in row and "d" * 59 + "…" in row


def test_control_characters_in_user_data_cannot_drive_the_terminal():
    out = io.StringIO()
    printer = Printer(False, out)
    printer.record({"title": "t", "description": "two\nlines \x1b]0;pwned\x07\r\u202eX"})
    printer.listing("tasks", [{"title": "t", "description": "a\nb\x1b[2J"}],
                    ["title", "description"], "")
    shown = out.getvalue()
    assert "\x1b" not in shown and "\x07" not in shown and "\r" not in shown
    assert "\u202e" not in shown
    assert "two\nlines \\x1b]0;pwned\\x07\\r\\u202eX" in shown  # a record keeps its lines
    assert "a\\nb\\x1b[2J" in shown  # a table row stays one line


def test_an_empty_cid_option_is_not_silently_replaced(capsys, monkeypatch):
    monkeypatch.setenv("TAREFA_CID", "7")
    code, _, err = run(capsys, "task", "ls", "--cid", "")
    assert code == cli.EXIT_USAGE and "--cid: empty" in err



def test_client_add_with_an_empty_cid_is_refused_not_generated(capsys):
    # e.g. --cid "$CID" with CID unset: the portal would generate one.
    code, _, err = run(capsys, "client", "add", "--cid", "", "{}")
    assert code == cli.EXIT_USAGE and "--cid: empty" in err


@pytest.mark.parametrize("name, value", [
    ("TAREFA_TOKEN", "\udcff\udcfe"), ("TAREFA_TOKEN", "t\u00e9"),
    ("TAREFA_SECRET", "abc\r"), ("TAREFA_SECRET", "abc\ndef"), ("TAREFA_SECRET", "s\u00e9cret"),
])
def test_a_credential_that_cannot_travel_is_a_usage_error_naming_its_source(
        capsys, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    verb = ["client", "get", "7"] if name == "TAREFA_TOKEN" else ["task", "get", "--cid", "7", "t"]
    code, _, err = run(capsys, *verb)
    assert code == cli.EXIT_USAGE, err
    assert f"{name}: not a usable token or secret" in err and "Traceback" not in err
    assert value not in err


def test_a_forged_event_cannot_drive_the_terminal():
    out = io.StringIO()
    Printer(False, out).event({"revision": 5, "event": "task.updated", "cid": "7",
                               "title": "t\u202e", "task": {"status": "done\x9b2J"},
                               "origin": "evil\x1b]0;pwned\x07"})
    shown = out.getvalue()
    assert not any(ch in shown for ch in "\x1b\x07\x9b\u202e")
    assert "by evil\\x1b]0;pwned\\x07" in shown


def test_an_error_message_cannot_drive_the_terminal(capsys, monkeypatch):
    _answering(monkeypatch, _Failure(grpc.StatusCode.NOT_FOUND, "no such \x1b[2J task"))
    code, _, err = run(capsys, "task", "get", "--cid", "7", "t")
    assert code == cli.EXIT_REFUSED and "\x1b" not in err and "\\x1b[2J" in err


def test_the_status_line_of_a_portal_shows_dropped_events_only_when_there_are_some():
    row = {"kind": "portal", "reachable": True, "cache_entries": 2, "cache_hit_rate": 0.5,
           "broker_connected": True, "watch_streams": 0, "auth_refused": 0, "limited": 0,
           "events_dropped": 0}
    assert "DROPPED" not in cli._status_detail(row)
    assert cli._status_detail({**row, "events_dropped": 7}).endswith("limited=0 DROPPED=7")


# ---- found by review (2026-11-28) -------------------------------------------------------


@pytest.mark.parametrize("argv, word", [
    (["--timeout", "abc", "client", "get", "7"], "--timeout"),
    (["client", "ls", "--limit", "abc"], "--limit"),
    (["client", "ls", "--limit", "1.5"], "--limit"),
])
def test_option_values_that_are_not_numbers_are_refused_in_words(capsys, argv, word):
    # They said "invalid _timeout value: 'abc'" (the parser's function name).
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_USAGE and f"argument {word}: must be" in err
    assert "invalid _" not in err


class _Answer(_Channel):
    """Answers every unary call with `response`."""

    def __init__(self, response: object) -> None:
        super().__init__(RuntimeError("unused"))
        self.response = response

    def unary_unary(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        def call(request, timeout=None, metadata=None):  # type: ignore[no-untyped-def]
            self.requests.append(request)
            return self.response
        return call


def _answered(monkeypatch, response: object) -> _Answer:
    channel = _Answer(response)
    monkeypatch.setattr(cli.Session, "_connect", lambda self, service: ("127.0.0.1:9", channel))
    monkeypatch.setattr(cli.Session, "metadata", lambda self, service: ())
    return channel


def test_a_retried_rotation_says_its_secret_was_shown_before(capsys, monkeypatch):
    # A retry of an applied request id has no secret: it printed an empty line
    # and "the previous secret no longer works".
    from proto import portal_pb2 as pb
    _answered(monkeypatch, pb.RotateSecretResponse(cid="7", secret="", revision=5))
    code, out, err = run(capsys, "--request-id", "rr1", "client", "rotate-secret", "7")
    assert code == 0 and out == "client 7: secret rotated (revision 5)\n"
    assert "request id rr1 was applied before" in err and "no longer works" not in err
    code, out, _ = run(capsys, "--json", "--request-id", "rr1", "client", "rotate-secret", "7")
    assert code == 0 and json.loads(out) == {"cid": "7", "secret": None, "revision": 5}


def _cid_only_config(tmp_path) -> str:  # type: ignore[no-untyped-def]
    with open(os.path.join(ROOT, "config", "cluster.yaml"), encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    doc["security"] = {"auth": "cid-only"}
    doc["broker"].pop("password_dir", None)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_cid_only_clients_get_no_note_about_secrets(capsys, monkeypatch, tmp_path):
    # With auth: cid-only no answer carries a secret; the note said a fresh
    # request id "was applied before".
    from proto import portal_pb2 as pb
    _answered(monkeypatch, pb.Client(cid="100", data="{}", revision=1))
    config = _cid_only_config(tmp_path)
    code, out, err = run(capsys, "--config", config, "--request-id", "rid-1",
                         "client", "add", "--cid", "100", "{}")
    assert code == 0 and out == "100\n" and err == ""
    _answered(monkeypatch, pb.RotateSecretResponse(cid="100", secret="s3", revision=2))
    code, out, err = run(capsys, "--config", config, "client", "rotate-secret", "100")
    assert code == 0 and out == "s3\n" and "no longer works" not in err
    assert "auth: cid-only" in err


_LIST_ON_ASCII = """
import sys
import client.__main__ as cli
from proto import portal_pb2 as pb

class Channel:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def unary_unary(self, *args, **kwargs):
        return lambda request, timeout=None, metadata=None: pb.ListTasksResponse(
            tasks=[pb.Task(cid="7", title="caf\u00e9 " * 30, status="pending")])

    unary_stream = unary_unary

cli.Session._connect = lambda self, service: ("127.0.0.1:9", Channel())
cli.Session.metadata = lambda self, service: ()
sys.exit(cli.main(["--portal", "127.0.0.1:9", *sys.argv[1:], "task", "ls", "--cid", "7"]))
"""


@pytest.mark.parametrize("as_json", [False, True])
def test_output_that_is_not_utf8_is_escaped_not_a_traceback(as_json):
    # It was a UnicodeEncodeError traceback halfway through the table (an
    # accent, or the … of a cut cell, on a terminal in another encoding).
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-c", _LIST_ON_ASCII, *(["--json"] if as_json else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    if as_json:  # JSON's own escapes: still the same document
        assert json.loads(done.stdout)["tasks"][0]["title"] == "caf\u00e9 " * 30
        assert "\\u00e9" in done.stdout
    else:
        assert "caf\\xe9" in done.stdout.splitlines()[1]


def test_a_timeout_too_short_to_connect_says_so(capsys):
    # `--timeout 0.001` called a healthy portal "not reachable", nothing more.
    # (127.0.0.1:9: nothing listens there, so no connection in 0.2 s either.)
    code, _, err = run(capsys, "--timeout", "0.2", "client", "get", "7")
    assert code == cli.EXIT_UNAVAILABLE
    assert "portal 127.0.0.1:9 is not reachable within 0.2s (admin service); --timeout 0.2 " \
           "may be too short to connect" in err


@pytest.mark.parametrize("argv, as_json", [
    (["cluster", "status"], False),
    (["--json", "cluster", "status"], True),
    (["cluster", "status", "--json"], True),  # refused: "unrecognized arguments"
    (["task", "ls", "--cid", "7", "--json"], True),
    (["--json", "task", "ls", "--json", "--cid", "7"], True),
])
def test_json_is_accepted_before_and_after_the_verb(argv, as_json):
    assert cli.build_parser().parse_args(argv).json is as_json


@pytest.mark.parametrize("argv, timeout, request_id", [
    (["--timeout", "3", "--request-id", "r0", "task", "add", "--cid", "7", "t"], 3.0, "r0"),
    # Found by review: after the verb these were refused ("unrecognized
    # arguments"), or the id was taken as the title.
    (["task", "add", "--cid", "7", "--request-id", "abc", "buy milk"], 10.0, "abc"),
    (["client", "add", "--cid", "7", "{}", "--request-id", "abc", "--timeout", "5"], 5.0, "abc"),
    (["--timeout", "3", "task", "ls", "--cid", "7"], 3.0, None),
])
def test_timeout_and_request_id_are_accepted_before_and_after_the_verb(argv, timeout,
                                                                       request_id):
    args = cli.build_parser().parse_args(argv)
    assert (args.timeout, args.request_id) == (timeout, request_id)
    if args.kind == "task" and "add" in argv:
        assert args.title in ("t", "buy milk")


def test_options_after_the_verb_are_checked_too(capsys):
    code, _, err = run(capsys, "task", "ls", "--cid", "7", "--timeout", "-1")
    assert code == cli.EXIT_USAGE and "--timeout" in err
    code, _, err = run(capsys, "client", "rm", "7", "--request-id", "")
    assert code == cli.EXIT_USAGE and "--request-id" in err


def test_grpc_is_quieted_in_the_cli_process_only():
    """The CLI sets GRPC_VERBOSITY=NONE for itself; set by any process that
    imports the package (a test run), it reached every daemon the tests
    start and hid the gRPC lines tests look for (add_port.cc)."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    probe = "import os, client; print(os.environ.get('GRPC_VERBOSITY'))"
    for argv0, expected in (("-m", "NONE"), ("/usr/local/bin/tarefa", "NONE"),
                            ("/x/.venv/bin/pytest", "None")):
        done = subprocess.run([sys.executable, "-c", f"import sys; sys.argv[0] = {argv0!r}; "
                               + probe], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.stdout.strip() == expected, (argv0, done.stdout, done.stderr)


@contextlib.contextmanager
def fake_admin_portal(servicer):  # type: ignore[no-untyped-def]
    """A real gRPC server on loopback serving `servicer` as the AdminPortal; its port."""
    from concurrent import futures

    from proto import portal_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2),
                         options=[("grpc.max_send_message_length", -1)])
    portal_pb2_grpc.add_AdminPortalServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(None)


def plaintext_config(tmp_path, security: dict,  # type: ignore[no-untyped-def]
                     **limits: int) -> str:
    """The shipped cluster file without TLS, with `security` (and `limits`)."""
    with open(os.path.join(ROOT, "config", "cluster.yaml"), encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    raw["security"] = security
    raw["limits"].update(limits)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_page_larger_than_grpcs_default_receive_limit_is_read(capsys, tmp_path):
    """Pages are sized to the cluster's limits.max_message_bytes, which may be
    raised past gRPC's 4 MiB receive default: found by review, `client ls`
    then failed with 'Received message larger than max'. A real gRPC server
    stands in for the admin portal here and answers a 5 MiB page."""
    from proto import portal_pb2 as pb
    from proto import portal_pb2_grpc

    data = json.dumps({"blob": "x" * 60_000})

    class Portal(portal_pb2_grpc.AdminPortalServicer):
        def ListClients(self, request, context):  # noqa: N802
            return pb.ListClientsResponse(clients=[
                pb.Client(cid=str(i + 1), data=data, revision=i + 1) for i in range(90)])

    raised = plaintext_config(tmp_path, {"auth": "cid-only"}, max_message_bytes=16 << 20)
    with fake_admin_portal(Portal()) as port:
        # The cluster file's limit, or none known (no usable file): any size.
        for config in (raised, str(tmp_path / "absent.yaml")):
            code = cli.main(["--config", config, "--portal", f"127.0.0.1:{port}",
                             "--timeout", "20", "--json", "client", "ls"])
            out, err = capsys.readouterr()
            assert len(out) > 5 * 1024 * 1024 and code == 0, err
            assert len(json.loads(out)["clients"]) == 90


def test_a_retried_client_add_has_a_null_secret_in_json(capsys, tmp_path):
    """With auth: token, --json has a `secret` field; a retry of an applied
    request id has no secret to give (null, as rotate-secret says): found by
    review, the field was missing."""
    from proto import portal_pb2 as pb
    from proto import portal_pb2_grpc

    class Portal(portal_pb2_grpc.AdminPortalServicer):
        def CreateClient(self, request, context):  # noqa: N802
            return pb.Client(cid=request.cid, data=request.data, revision=3)  # no secret

    config = plaintext_config(tmp_path, {"auth": "token", "admin_token": "t0ken-for-tests"})
    with fake_admin_portal(Portal()) as port:
        code = cli.main(["--config", config, "--portal", f"127.0.0.1:{port}", "--json",
                         "--request-id", "r1", "client", "add", "--cid", "30", '{"a": 1}'])
        out, err = capsys.readouterr()
    assert code == 0, err
    shown = json.loads(out)
    assert shown["cid"] == "30" and "secret" in shown and shown["secret"] is None, shown
    assert "applied before" in err
