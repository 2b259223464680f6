"""Client secret records in the replica: create_client with a secret hash,
rotate_secret, delete_client removing it, and what the commands refuse."""

from __future__ import annotations

import json

import pytest

from daemons.core import domain
from daemons.replica.service import command_from_proto
from daemons.replica.storage import Storage
from proto import replica_pb2
from tests.unit.test_commands import AT, Harness, failed


def secret(salt: bytes = b"s" * 16, digest: bytes = b"h" * 32, n: int = 2**14) -> dict:
    return {"salt": salt.hex(), "hash": digest.hex(), "n": n, "r": 8, "p": 1}


@pytest.fixture
def h(tmp_path):
    store = Storage(str(tmp_path / "db"))
    yield Harness(store)
    store.close()


def stored_secret(h: Harness, cid: str) -> dict | None:
    raw = h.storage.get(domain.secret_key(cid))
    return None if raw is None else json.loads(raw)


def test_create_client_stores_the_hash_apart_from_the_client_record(h):
    out = h.one(h.cmd("create_client", cid="7", data="{}", at=AT, secret=secret()))
    assert out.ok and out.revision == 1
    assert "salt" not in out.record and "hash" not in out.record
    assert h.client("7") == json.loads(out.record)
    assert stored_secret(h, "7") == {"cid": "7", **secret(), "revision": 1}


def test_create_client_without_secret_stores_none(h):  # auth: cid-only
    assert h.one(h.create_client("7")).ok
    assert stored_secret(h, "7") is None


def test_rotate_secret_replaces_the_record_and_leaves_the_client_alone(h):
    h.one(h.cmd("create_client", cid="7", data="{}", at=AT, secret=secret()))
    before = h.client("7")
    out = h.one(h.cmd("rotate_secret", cid="7", at=AT, secret=secret(b"t" * 16, b"g" * 32)))
    assert out.ok and out.revision == 2 and out.record == ""
    assert stored_secret(h, "7") == {"cid": "7", **secret(b"t" * 16, b"g" * 32), "revision": 2}
    assert h.client("7") == before
    assert h.revision() == 2


def test_rotate_secret_gives_a_cid_only_client_its_first_secret(h):
    h.one(h.create_client("7"))
    assert h.one(h.cmd("rotate_secret", cid="7", at=AT, secret=secret())).ok
    assert stored_secret(h, "7")["revision"] == 2


def test_rotate_secret_refusals_change_nothing(h):
    failed(h.one(h.cmd("rotate_secret", cid="8", at=AT, secret=secret())), "NOT_FOUND", "8")
    h.one(h.create_client("7"))
    failed(h.one(h.cmd("rotate_secret", cid="7", at=AT)), "INVALID_ARGUMENT", "secret")
    for bad, word in ((secret(salt=b"x"), "salt"), (secret(digest=b"x" * 8), "hash"),
                      (secret(n=3000), "power of 2"), (secret(n=2**30), "secret.n"),
                      ({**secret(), "salt": "zz"}, "hexadecimal"),
                      ({**secret(), "r": True}, "secret.r"), ("nope", "mapping")):
        failed(h.one(h.cmd("rotate_secret", cid="7", at=AT, secret=bad)), "INVALID_ARGUMENT",
               word)
        failed(h.one(h.cmd("create_client", cid="9", data="{}", at=AT, secret=bad)),
               "INVALID_ARGUMENT", word)
    assert stored_secret(h, "7") is None and h.client("9") is None
    assert h.revision() == 1


def test_delete_client_removes_the_secret_in_the_same_batch(h):
    h.one(h.cmd("create_client", cid="7", data="{}", at=AT, secret=secret()))
    h.one(h.cmd("create_client", cid="70", data="{}", at=AT, secret=secret()))
    assert h.one(h.cmd("delete_client", cid="7")).ok
    assert stored_secret(h, "7") is None and stored_secret(h, "70") is not None


def test_a_retry_with_another_secret_gets_the_first_answer_and_keeps_the_first_hash(h):
    first = h.cmd("rotate_secret", cid="7", at=AT, secret=secret())
    h.one(h.cmd("create_client", cid="7", data="{}", at=AT))
    assert h.one(first).ok
    retry = {**first, "secret": secret(b"t" * 16)}
    out = h.one(retry)
    assert out.ok and out.duplicate and out.revision == 2
    assert stored_secret(h, "7")["salt"] == (b"s" * 16).hex()


def test_command_from_proto_carries_the_secret_hash_as_hex():
    msg = replica_pb2.Command(request_id="r", op=replica_pb2.ROTATE_SECRET, cid="7", at=AT,
                              secret=replica_pb2.SecretHash(salt=b"s" * 16, hash=b"h" * 32,
                                                            n=2**14, r=8, p=1))
    assert command_from_proto(msg)["secret"] == secret()
    create = replica_pb2.Command(request_id="r", op=replica_pb2.CREATE_CLIENT, cid="7", data="{}")
    assert "secret" not in command_from_proto(create)
