"""Where the `tarefa` CLI finds credentials, never on its command line by default.

The admin token, first found of:
  1. `--insecure-token VALUE` (visible to `ps`: only if the user insists);
  2. the environment variable TAREFA_TOKEN;
  3. the credentials file (`--credentials FILE` or TAREFA_CREDENTIALS), line `token=...`;
  4. the cluster file's `security.admin_token`, or its `security.admin_token_file`
     when this user can read it (the operator on a portal machine).
A client secret: `--insecure-secret VALUE`, TAREFA_SECRET, or the credentials
file's `secret=...` line (which may also give the default CID: `cid=...`).

A credentials file holds `key=value` lines (keys `token`, `secret`, `cid`;
blank lines and `#` comments allowed) and is refused unless only its owner can
read it (mode 0600 or stricter). Values never appear in error messages.
"""

from __future__ import annotations

import os
import stat
from typing import Mapping

from daemons.core.config import Cluster, printable_ascii
from daemons.core.errors import ConfigError
from daemons.core.security import read_secret_file

KEYS = ("token", "secret", "cid")


class CredentialsError(Exception):
    """A credentials file that cannot be used (the message names the file, not its content)."""


def read_credentials_file(path: str) -> dict[str, str]:
    try:
        info = os.stat(path)
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise CredentialsError(f"{path}: credentials file is readable by group or others "
                                   f"(mode {mode:04o}); chmod 600 it")
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise CredentialsError(f"{path}: cannot read the credentials file: "
                               f"{exc.strerror}") from None
    except UnicodeDecodeError:
        raise CredentialsError(f"{path}: the credentials file is not UTF-8 text") from None
    values: dict[str, str] = {}
    where: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise CredentialsError(f"{path}:{number}: expected one of "
                                   f"{', '.join(k + '=...' for k in KEYS)}")
        if not value.strip():
            raise CredentialsError(f"{path}:{number}: {key}: empty value")
        if key in values:  # which one is meant? (the cluster file refuses a key twice too)
            raise CredentialsError(f"{path}:{number}: {key}: given again (first on line "
                                   f"{where[key]}); keep one")
        values[key], where[key] = value.strip(), number
    return values


def _sendable(value: str, source: str) -> str:
    if not printable_ascii(value):
        raise CredentialsError(f"{source}: not a usable token or secret: it must be printable "
                               "ASCII (no accents, tabs, line breaks or control characters)")
    return value


class Credentials:
    """Resolves the admin token and the client secret lazily (a verb needs one of them)."""

    def __init__(self, file: str | None, insecure_token: str | None = None,
                 insecure_secret: str | None = None,
                 env: Mapping[str, str] = os.environ) -> None:
        self.file = file or env.get("TAREFA_CREDENTIALS") or None
        self.insecure_token = insecure_token
        self.insecure_secret = insecure_secret
        self.env = env
        self._values: dict[str, str] | None = None

    def _from_file(self, key: str) -> str | None:
        if self.file is None:
            return None
        if self._values is None:
            self._values = read_credentials_file(self.file)
        return self._values.get(key)

    def _given(self, option: str | None, option_name: str, env_name: str, key: str
               ) -> str | None:
        """The first of option, environment variable and file key that is set;
        CredentialsError naming it if it cannot travel as gRPC metadata."""
        for value, source in ((option, option_name), (self.env.get(env_name), env_name)):
            if value:
                return _sendable(value, source)
        value = self._from_file(key)
        return _sendable(value, f"{self.file}: {key}") if value else None

    def admin_token(self, cluster: Cluster | None) -> str | None:
        found = self._given(self.insecure_token, "--insecure-token", "TAREFA_TOKEN", "token")
        if found or cluster is None:
            return found or None
        security = cluster.security
        if security.admin_token:
            return security.admin_token
        if security.admin_token_file and os.access(security.admin_token_file, os.R_OK):
            try:
                token = read_secret_file(security.admin_token_file, "admin token")
            except ConfigError:
                return None  # the portal's answer (UNAUTHENTICATED) and its hint follow
            return _sendable(token, security.admin_token_file)
        return None

    def client_secret(self) -> str | None:
        return self._given(self.insecure_secret, "--insecure-secret", "TAREFA_SECRET", "secret")

    def cid(self) -> str | None:
        return self._from_file("cid")
