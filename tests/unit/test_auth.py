"""daemons/portal/auth.py: bearer metadata, the admin token, client secrets
checked against their scrypt records (memoized), refusals logged without the
credential; and how the cache keeps a client's secret record coherent."""

from __future__ import annotations

import asyncio
import logging

import pytest

from daemons.core import events
from daemons.core.config import Security
from daemons.core.errors import ConfigError, InvalidArgument
from daemons.portal import auth
from daemons.portal.auth import Authenticator, PermissionDenied, SecretHasher, Unauthenticated
from daemons.portal.cache import PortalCache, secret_key
from daemons.portal.coherence import Coherence

TOKEN = "admin-token-0123456789abcdef"
AT = "2026-01-01T00:00:00.000Z"


class Context:
    def __init__(self, credential: str | None = None, raw: str | None = None) -> None:
        value = raw if raw is not None else (f"Bearer {credential}" if credential else None)
        self.metadata = (("user-agent", "x"),) + ((("authorization", value),) if value else ())

    def invocation_metadata(self):
        return self.metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"


def record_for(secret: str, revision: int, cid: str = "7") -> dict:
    hashed = auth.hash_secret(secret)
    return {"cid": cid, "salt": hashed.salt.hex(), "hash": hashed.hash.hex(), "n": hashed.n,
            "r": hashed.r, "p": hashed.p, "revision": revision}


class Store:
    """Stands in for PortalOperations.secret_record: a cached and a replica view."""

    def __init__(self) -> None:
        self.cached: dict[str, dict] = {}
        self.replicas: dict[str, dict] = {}
        self.reads: list[bool] = []

    async def read(self, cid: str, timeout: float, linearizable: bool) -> dict | None:
        self.reads.append(linearizable)
        if not linearizable and cid in self.cached:
            return self.cached[cid]
        return self.replicas.get(cid)


def authenticator(mode: str = "token", store: Store | None = None) -> Authenticator:
    store = store or Store()
    return Authenticator("portal-1", mode, TOKEN, SecretHasher(), store.read)


def run(coro):
    return asyncio.run(coro)


def test_bearer_parsing():
    assert auth.bearer((("authorization", "Bearer abc"),)) == "abc"
    assert auth.bearer((("authorization", "bearer  abc "),)) == "abc"
    assert auth.bearer((("authorization", "Basic abc"),)) is None
    assert auth.bearer((("authorization", "Bearer "),)) is None
    assert auth.bearer((("x-other", "Bearer abc"),)) is None
    assert auth.bearer(None) is None


def test_admin_token_missing_wrong_right(caplog):
    a = authenticator()
    caplog.set_level(logging.WARNING)
    with pytest.raises(Unauthenticated):
        a.admin(Context(), "ListClients")
    with pytest.raises(PermissionDenied):
        a.admin(Context("not-the-token"), "ListClients")
    with pytest.raises(Unauthenticated):
        a.admin(Context(raw=TOKEN), "ListClients")  # no scheme
    a.admin(Context(TOKEN), "ListClients")
    assert a.refused == 3
    assert "not-the-token" not in caplog.text and TOKEN not in caplog.text
    assert "refused ListClients from ipv4:127.0.0.1:5555" in caplog.text


def test_cid_only_checks_nothing():
    a = authenticator("cid-only")
    a.admin(Context(), "ListClients")
    run(a.client(Context(), "GetTask", "7", 1.0))
    assert a.refused == 0


def test_client_secret_memoized_and_unknown_cid_answers_like_a_wrong_secret(caplog):
    store = Store()
    secret = auth.new_secret()
    store.replicas["7"] = store.cached["7"] = record_for(secret, 3)
    a = authenticator(store=store)
    caplog.set_level(logging.WARNING)

    async def scenario() -> list[str]:
        messages = []
        await a.client(Context(secret), "GetTask", "7", 1.0)
        runs = a.hasher.scrypt_runs
        for _ in range(5):
            await a.client(Context(secret), "GetTask", "7", 1.0)
        assert a.hasher.scrypt_runs == runs  # memoized
        with pytest.raises(Unauthenticated):
            await a.client(Context(), "GetTask", "7", 1.0)
        for cid, credential in (("7", "wrong"), ("8", secret)):
            with pytest.raises(PermissionDenied) as info:
                await a.client(Context(credential), "GetTask", cid, 1.0)
            messages.append(info.value.message)
        with pytest.raises(InvalidArgument):
            await a.client(Context(secret), "GetTask", "07", 1.0)
        return messages

    wrong, unknown = run(scenario())
    assert wrong == unknown == auth.DENIED
    assert secret not in caplog.text and "wrong" not in caplog.text
    assert "cid='8'" in caplog.text and "GetTask" in caplog.text


def test_a_new_secret_works_before_the_rotation_event_arrives():
    store = Store()
    old, new = auth.new_secret(), auth.new_secret()
    store.cached["7"] = record_for(old, 3)
    store.replicas["7"] = record_for(new, 9)  # rotated; this portal's cache is behind
    a = authenticator(store=store)
    run(a.client(Context(new), "GetTask", "7", 1.0))
    assert store.reads == [False, True]


def test_a_rotation_or_deletion_during_the_check_refuses_the_old_secret():
    """The check of a secret can wait seconds for scrypt (its pool busy with
    other callers'): a rotation or deletion whose event arrived meanwhile wins.
    Found by review: a write with the old secret committed 2.3 s after the
    rotation had returned."""
    old, new = auth.new_secret(), auth.new_secret()
    for after in (record_for(new, 9), None):  # rotated, deleted
        store = Store()
        store.cached["7"] = record_for(old, 3)
        reads = 0

        async def read(cid: str, timeout: float, linearizable: bool) -> dict | None:
            nonlocal reads
            reads += 1
            # The event arrives while the first check runs: the cache moves on.
            return store.cached["7"] if reads == 1 else after

        a = Authenticator("portal-1", "token", TOKEN, SecretHasher(), read)
        with pytest.raises(auth.PermissionDenied):
            run(a.client(Context(old), "CreateTask", "7", 1.0))
    # A memo hit waited for nothing: one read, as before (a re-read can be a
    # Raft barrier when the record is not cached).
    store = Store()
    store.cached["7"] = record_for(old, 3)
    a = authenticator(store=store)
    run(a.client(Context(old), "GetTask", "7", 1.0))  # scrypt: read, re-read
    store.reads.clear()
    run(a.client(Context(old), "GetTask", "7", 1.0))
    assert store.reads == [False]
    # The new secret, checked across the same rotation, is accepted.
    reads = 0
    a = Authenticator("portal-1", "token", TOKEN, SecretHasher(), read)
    after = record_for(new, 9)
    assert run(a.client(Context(new), "CreateTask", "7", 1.0)) == 9


def test_concurrent_checks_share_one_scrypt_run():
    store = Store()
    secret = auth.new_secret()
    store.replicas["7"] = record_for(secret, 3)
    a = authenticator(store=store)

    async def scenario() -> None:
        await asyncio.gather(*(a.client(Context(secret), "GetTask", "7", 1.0)
                               for _ in range(10)))

    run(scenario())
    assert a.hasher.scrypt_runs == 1


def test_admin_token_from_config(tmp_path):
    assert auth.admin_token(Security(auth="cid-only")) is None
    assert auth.admin_token(Security(auth="token", admin_token=TOKEN)) == TOKEN
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    assert auth.admin_token(Security(auth="token", admin_token_file=str(path))) == TOKEN
    path.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        auth.admin_token(Security(auth="token", admin_token_file=str(path)))
    assert str(path) in info.value.message and TOKEN not in info.value.message
    path.write_text("t\u00e9" * 10 + "\n")  # no client could send it as gRPC metadata
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="must be printable ASCII"):
        auth.admin_token(Security(auth="token", admin_token_file=str(path)))


def test_reserved_ids_follow_the_names_they_protect():
    from daemons.core.config import RESERVED_IDS
    from daemons.core.provision import MOSQUITTO_ACL, MOSQUITTO_PASSWD
    from daemons.core.security import CLI_CERT

    assert {CLI_CERT, MOSQUITTO_ACL, MOSQUITTO_PASSWD, "ca", "broker"} <= set(RESERVED_IDS)


# ---- the cached secret record under rotation events ---------------------------------


def _coherence() -> Coherence:
    coherence = Coherence("portal-1", "test", PortalCache(100, 60))
    coherence.on_connection(True)
    return coherence


def test_rotation_event_drops_the_record_and_refuses_an_older_slow_read():
    coherence = _coherence()
    key = secret_key("7")
    old = {"salt": "00", "hash": "11", "revision": 3}
    token = coherence.cache.read_token()
    assert coherence.settle_read(key, old, 5, token)
    assert coherence.cache.get(key).value == old
    slow = coherence.cache.read_token()  # a read that started before the rotation...
    rotation = events.make_event("client.secret_rotated", "7", 9, "portal-admin", AT)
    assert events.decode(events.encode(rotation), events.event_topic("test", rotation), "test")
    coherence.apply_event(rotation)
    assert coherence.cache.get(key) is None
    # ...and answers after its event, with the old record: not fresh, not cached.
    assert not coherence.settle_read(key, old, 8, slow)
    assert coherence.cache.get(key) is None
    new = {"salt": "22", "hash": "33", "revision": 9}
    assert coherence.settle_read(key, new, 9, coherence.cache.read_token())
    assert coherence.cache.get(key).value == new


@pytest.mark.parametrize("kind", ["client.created", "client.deleted"])
def test_client_created_or_deleted_drops_the_cached_secret_record(kind):
    coherence = _coherence()
    key = secret_key("7")
    coherence.settle_read(key, {"revision": 3}, 5, coherence.cache.read_token())
    record = None if kind == "client.deleted" else {
        "cid": "7", "data": {}, "created_at": AT, "updated_at": AT, "revision": 9}
    coherence.apply_event(events.make_event(kind, "7", 9, "other", AT, record=record))
    assert coherence.cache.get(key) is None


def test_no_cached_secret_record_is_served_while_disconnected():
    coherence = _coherence()
    key = secret_key("7")
    coherence.settle_read(key, {"revision": 3}, 5, coherence.cache.read_token())
    coherence.on_connection(False)
    assert not coherence.serving_cache and coherence.cache.get(key) is None


def test_a_rotation_event_with_a_record_is_refused():
    event = events.make_event("client.secret_rotated", "7", 9, "x", AT,
                              record={"salt": "00", "hash": "11"})
    with pytest.raises(InvalidArgument, match="absent"):
        events.decode(events.encode(event))


def test_a_new_secret_never_starts_with_a_dash(monkeypatch):
    """token_urlsafe starts one secret in 64 with "-", which the CLI's parser
    took for an option (`--insecure-secret -abc…`: seen in CI)."""
    from daemons.core import security

    answers = iter(["-starts-with-a-dash", "-again", "fine-one"])
    monkeypatch.setattr(security.secrets, "token_urlsafe", lambda n: next(answers))
    assert auth.new_secret() == "fine-one"
