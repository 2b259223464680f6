"""Who may call a portal: the admin token, client secrets and their hashes.

Credentials travel in gRPC metadata as `authorization: Bearer <value>`. With
`security.auth: token` (the default):

- every AdminPortal call needs the admin token (read once at start from
  `security.admin_token_file`, or `security.admin_token`), compared with
  hmac.compare_digest;
- every ClientPortal call needs the secret of the client its request names.
  The replicas keep only a salted scrypt hash of it (`SecretHash`); the portal
  reads that record through its coherent cache (a `client.secret_rotated`
  event at revision R makes every older read of it unusable, as for any
  record) and memoizes "scrypt(secret, salt) == hash" per (CID, record
  revision, record hash, SHA-256 of the presented secret), so scrypt runs once
  per client and secret, not once per call. When a secret does not match a
cached record the record is read again from the replicas (linearizable), so a
freshly rotated secret works at once on every portal, before the rotation's
event arrives.

No credential → UNAUTHENTICATED; a wrong one → PERMISSION_DENIED. An unknown
CID gets the same answer, message and scrypt work as a wrong secret, so the
answer does not tell which CIDs exist. Each refusal is one WARNING line with
the method, the peer and the CID, never the credential.

`security.auth: cid-only` is the original course setup's compatibility mode:
nothing is checked (a call only names its CID); it is never the default.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

from daemons.core import domain
from daemons.core.clock import left
from daemons.core.config import Security, printable_ascii
from daemons.core.errors import ConfigError, TarefaError
from daemons.core.security import new_credential, read_secret_file
from proto import replica_pb2

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
SECRET_BYTES = 32  # secrets.token_urlsafe(32): 43 characters, 256 random bits
MEMO_SIZE = 10_000
HASH_THREADS = 2  # scrypt is CPU- and memory-bound (16 MiB each): bound how many run at once
DENIED = "client credentials refused (unknown CID or wrong secret)"
# A check that took longer than this waited for scrypt (a memo hit takes
# microseconds): the secret record is read again after it.
RECHECK_AFTER = 0.005


class Unauthenticated(TarefaError):
    code = "UNAUTHENTICATED"


class PermissionDenied(TarefaError):
    code = "PERMISSION_DENIED"


def new_secret() -> str:
    return new_credential(SECRET_BYTES)


def scrypt(secret: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=129 * n * r * p + (1 << 20), dklen=HASH_BYTES)


def hash_secret(secret: str, salt: bytes | None = None) -> replica_pb2.SecretHash:
    """The record the replicas store for `secret`: a random salt, our scrypt parameters."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    return replica_pb2.SecretHash(salt=salt, hash=scrypt(secret, salt, SCRYPT_N, SCRYPT_R,
                                                         SCRYPT_P),
                                  n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)


def bearer(metadata: Any) -> str | None:
    """The credential of `authorization: Bearer <value>`; None if absent or malformed."""
    for key, value in metadata or ():
        if key == AUTH_HEADER:
            scheme, _, credential = str(value).partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
            return None
    return None


def admin_token(security: Security) -> str | None:
    """The admin token (token mode): ConfigError naming the file if it cannot be used."""
    if security.auth != "token":
        return None
    if security.admin_token_file is not None:
        token = read_secret_file(security.admin_token_file, "admin token")
        if not printable_ascii(token):  # no client could send it (gRPC metadata)
            raise ConfigError([f"{security.admin_token_file}: the admin token must be "
                               "printable ASCII (no accents or control characters)"])
        return token
    return security.admin_token


class SecretHasher:
    """Makes secret records and checks secrets against them, off the event loop.

    Checks are memoized (both answers, bounded LRU): a wrong secret tried again
    costs no second scrypt either. Concurrent checks of the same key share one
    scrypt run.
    """

    def __init__(self, memo_size: int = MEMO_SIZE, threads: int = HASH_THREADS) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="scrypt")
        self._memo: collections.OrderedDict[tuple, bool] = collections.OrderedDict()
        self._inflight: dict[tuple, asyncio.Future] = {}
        self.memo_size = memo_size
        # An unknown CID costs the same scrypt as a known one with a wrong secret.
        self._decoy = {"salt": secrets.token_bytes(SALT_BYTES).hex(), "hash": "00" * HASH_BYTES,
                       "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "revision": 0}
        self.scrypt_runs = 0

    async def make(self, secret: str) -> replica_pb2.SecretHash:
        return await asyncio.get_running_loop().run_in_executor(self._pool, hash_secret, secret)

    async def verify(self, cid: str, record: dict | None, presented: str) -> bool:
        """Does `presented` match the client's secret `record` (None: no such client)?"""
        known = record is not None
        record = record if known else self._decoy
        key = (cid, record["revision"], record["hash"],
               hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest())
        answer = self._memo.get(key)
        if answer is not None:
            self._memo.move_to_end(key)
            return answer and known
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().run_in_executor(
                self._pool, _matches, record, presented)
            self._inflight[key] = pending
            self.scrypt_runs += 1
            try:
                answer = await pending
            finally:
                self._inflight.pop(key, None)
            self._memo[key] = answer
            while len(self._memo) > self.memo_size:
                self._memo.popitem(last=False)
        else:
            answer = await asyncio.shield(pending)
        return answer and known

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _matches(record: dict, presented: str) -> bool:
    try:
        digest = scrypt(presented, bytes.fromhex(record["salt"]), record["n"], record["r"],
                        record["p"])
        return hmac.compare_digest(digest, bytes.fromhex(record["hash"]))
    except (ValueError, TypeError, KeyError, MemoryError, UnicodeEncodeError):
        return False


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # noqa: BLE001 - only for the log line
        return "?"


def _short(cid: str) -> str:
    return cid if len(cid) <= 40 else cid[:40] + "…"


class Authenticator:
    """Checks each call's credential before the call does anything else."""

    def __init__(self, portal_id: str, mode: str, token: str | None, hasher: SecretHasher,
                 read_secret: Callable[[str, float, bool], Awaitable[dict | None]]) -> None:
        self.portal_id = portal_id
        self.mode = mode
        self._token = token.encode("utf-8") if token is not None else None
        self.hasher = hasher
        self.read_secret = read_secret
        self.refused = 0

    @property
    def enforcing(self) -> bool:
        return self.mode == "token"

    def admin(self, context: Any, method: str) -> None:
        """Raise unless the call carries the admin token (token mode)."""
        if not self.enforcing:
            return
        presented = bearer(context.invocation_metadata())
        if presented is None:
            self._refuse(Unauthenticated("admin token required: send metadata "
                                         "'authorization: Bearer <token>'"), method, context)
        given = (presented or "").encode("utf-8", "surrogatepass")
        if self._token is None or not hmac.compare_digest(given, self._token):
            self._refuse(PermissionDenied("admin token refused"), method, context)

    async def client(self, context: Any, method: str, cid: str, timeout: float) -> int:
        """Raise unless the call carries the secret of client `cid` (token mode).

        Returns the revision of the secret record that matched (0 when not
        enforcing): a rotation at or below it is the one that made that secret.
        """
        if not self.enforcing:
            return 0
        presented = bearer(context.invocation_metadata())
        if presented is None:
            self._refuse(Unauthenticated("client secret required: send metadata "
                                         "'authorization: Bearer <secret>'"), method, context,
                         cid)
        domain.validate_cid(cid)  # INVALID_ARGUMENT tells nothing about which CIDs exist
        deadline = time.monotonic() + timeout  # both reads below share the timeout
        record = await self.read_secret(cid, timeout, False)
        checking = time.monotonic()
        if await self.hasher.verify(cid, record, presented):  # type: ignore[arg-type]
            if time.monotonic() - checking < RECHECK_AFTER:
                return record["revision"]  # type: ignore[index]  # the memo answered
            # The check waited for scrypt (seconds when its pool is busy): a
            # rotation or deletion whose event came meanwhile wins (found by
            # review: a write with the old secret committed 2.3 s after the
            # rotation had returned). A cache hit, as a rule.
            now = await self.read_secret(cid, left(deadline), False)
            if now == record:
                return record["revision"]  # type: ignore[index]
            if now is not None and await self.hasher.verify(cid, now, presented):
                return now["revision"]
            self._refuse(PermissionDenied(DENIED), method, context, cid)
        if record is not None:
            # A cached record may predate a rotation whose event is still on its
            # way here: a new secret must work at once, so ask the replicas.
            fresh = await self.read_secret(cid, left(deadline), True)
            if fresh is not None and fresh != record \
                    and await self.hasher.verify(cid, fresh, presented):  # type: ignore[arg-type]
                return fresh["revision"]
        self._refuse(PermissionDenied(DENIED), method, context, cid)
        return 0  # not reached: _refuse raises

    def _refuse(self, error: TarefaError, method: str, context: Any,
                cid: str | None = None) -> None:
        self.refused += 1
        who = f" cid={_short(cid)!r}" if cid is not None else ""
        log.warning("%s: refused %s from %s%s: %s", self.portal_id, method, _peer(context), who,
                    error.code)
        raise error
