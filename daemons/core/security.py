"""Secrets and TLS material named by the cluster file, and gRPC over them.

Every daemon and the CLI read secret files and build gRPC credentials here,
so the rules live in one place: a secret file must not be readable by group
or others, is read once at start, and its content never reaches a log line
or an error message (only its path does). With `security.tls` null the same
calls give plaintext servers and channels.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Any

import grpc

from daemons.core.claims import check_port_free
from daemons.core.config import Broker, Limits, TlsSettings
from daemons.core.errors import ConfigError, TarefaError

# Names of the certificate pairs that are not a daemon id.
CLI_CERT = "tarefa"


def _refuse_if_shared(path: str, what: str) -> None:
    """ConfigError if group or others may read `path` (OSError if it is missing)."""
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ConfigError([f"{path}: {what} is readable by group or others "
                           f"(mode {mode:04o}); chmod 600 it"])


def new_credential(nbytes: int = 32) -> str:
    """A random URL-safe credential (`nbytes` of randomness) that does not start
    with "-": `secrets.token_urlsafe` gives one in 64 that does, and the CLI's
    parser takes `--insecure-secret -abc…` for an option (seen in CI)."""
    while True:
        credential = secrets.token_urlsafe(nbytes)
        if not credential.startswith("-"):
            return credential


def read_secret_file(path: str, what: str) -> str:
    """The first line of a secret file; refuse files others can read."""
    try:
        _refuse_if_shared(path, f"{what} file")
        with open(path, encoding="utf-8") as handle:
            value = handle.readline().strip()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the {what} file: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: the {what} file is not UTF-8 text"]) from None
    if not value:
        raise ConfigError([f"{path}: the {what} file is empty"])
    return value


def mqtt_login(broker: Broker, daemon_id: str) -> tuple[str, str] | None:
    """(username, password) this daemon gives the broker; None = anonymous."""
    if broker.password_dir is not None:
        path = os.path.join(broker.password_dir, daemon_id)
        return daemon_id, read_secret_file(path, f"MQTT password of {daemon_id}")
    if broker.username is not None:
        return broker.username, broker.password or ""
    return None


def _read_bytes(path: str, what: str, private: bool = False) -> bytes:
    try:
        if private:
            _refuse_if_shared(path, what)
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the {what}: {exc.strerror}"]) from None


class TlsMaterial:
    """The CA plus one certificate pair, read once (a daemon's or the CLI's);
    with name None only the CA (enough to call a portal, which needs no
    client certificate)."""

    def __init__(self, tls: TlsSettings, name: str | None, check_expiry: bool = True) -> None:
        self.ca = _read_bytes(tls.ca_file, "TLS CA certificate")
        if check_expiry:
            _refuse_expired(tls.ca_file, self.ca, "the TLS CA certificate")
        self.cert = self.key = b""
        if name is None:
            return
        cert_path, key_path = tls.cert_pair(name)
        self.cert = _read_bytes(cert_path, f"TLS certificate of {name}")
        if check_expiry:
            _refuse_expired(cert_path, self.cert, f"the TLS certificate of {name}")
        self.key = _read_bytes(key_path, f"TLS key of {name}", private=True)

    def server_credentials(self, require_client_auth: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_auth)

    def channel_credentials(self, present_certificate: bool) -> grpc.ChannelCredentials:
        if present_certificate:
            return grpc.ssl_channel_credentials(root_certificates=self.ca,
                                                private_key=self.key, certificate_chain=self.cert)
        return grpc.ssl_channel_credentials(root_certificates=self.ca)


def _refuse_expired(path: str, pem: bytes, what: str) -> None:
    """ConfigError if the certificate has expired: every handshake would fail
    with a message that names nothing (and --check-config would say OK)."""
    import datetime

    from cryptography import x509  # only where TLS is configured

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError([f"{path}: {what} is not a PEM certificate ({exc})"]) from None
    if cert.not_valid_after_utc <= datetime.datetime.now(datetime.timezone.utc):
        raise ConfigError([f"{path}: {what} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                           "run tarefa-secrets (install.sh does) to issue new certificates"])


def load_tls(tls: TlsSettings | None, name: str | None,
             check_expiry: bool = True) -> TlsMaterial | None:
    """The TLS material of `name` (None: the CA only). `check_expiry` parses the
    certificates (~0.1 s of imports): the daemons and --check-config do; the
    CLI, which starts for every command, does not."""
    return None if tls is None else TlsMaterial(tls, name, check_expiry)


def message_options(limits: Limits) -> list[tuple[str, Any]]:
    """gRPC options bounding message size (larger ones get RESOURCE_EXHAUSTED)."""
    return [("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes)]


# A server pings a client connection that has been quiet this long, and drops it
# (cancelling its calls: a WatchTasks stream frees its slot) if the client does
# not answer within KEEPALIVE_TIMEOUT_MS. gRPC's default is 2 hours, so a watcher
# whose host vanished without a TCP reset held its stream that long.
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000


def server_options(limits: Limits, keepalive_ms: int = KEEPALIVE_TIME_MS,
                   keepalive_timeout_ms: int = KEEPALIVE_TIMEOUT_MS) -> list[tuple[str, Any]]:
    """Options of every daemon's gRPC server: the message bounds, keepalive
    pings (see KEEPALIVE_TIME_MS), and no SO_REUSEPORT. gRPC sets it by default
    on Linux, so a second daemon started on a port in use (the same portal
    twice, a port typo) would bind without an error and silently take a share
    of the first one's connections."""
    return [*message_options(limits), ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
            # grpcio 1.85 waits for a ping's answer this long, whatever the above
            # says (default 60 s): measured, tests/integration/test_keepalive.py
            ("grpc.http2.ping_timeout_ms", keepalive_timeout_ms),
            # keep pinging an idle stream: by default only 2 pings go without data
            ("grpc.http2.max_pings_without_data", 0)]


def add_port(server: Any, address: str, material: TlsMaterial | None,
             require_client_auth: bool = False) -> int:
    """Bind `server` to `address`, with TLS when the cluster file names certificates.

    TarefaError (the daemon exits 1 with one clear line) when it cannot. The
    port is probed first: gRPC's C core prints its own raw error line
    (add_port.cc) before it fails, ahead of the daemon's CRITICAL line.
    grpcio raises RuntimeError("Failed to bind ...") when the probe passed and
    the bind still failed (a race), older versions returned 0."""
    host, _, port_text = address.rpartition(":")
    check_port_free(host.strip("[]"), int(port_text), "gRPC")
    try:
        if material is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address,
                                          material.server_credentials(require_client_auth))
    except RuntimeError:
        port = 0
    if port == 0:
        raise TarefaError(f"cannot listen on {address}: the port is in use (another daemon "
                          "running?) or the host is not an address of this machine")
    return port


def open_channel(address: str, material: TlsMaterial | None, aio: bool = False,
                 present_certificate: bool = False,
                 options: list[tuple[str, Any]] | None = None) -> Any:
    """A channel to `address`: TLS verified against the cluster CA when configured."""
    module = grpc.aio if aio else grpc
    if material is None:
        return module.insecure_channel(address, options=options)
    return module.secure_channel(address, material.channel_credentials(present_certificate),
                                 options=options)
