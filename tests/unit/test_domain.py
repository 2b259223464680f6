"""Domain rules (daemons/core/domain.py): field validation and the LevelDB key layout."""

from __future__ import annotations

import decimal
import json

import pytest

from daemons.core import domain
from daemons.core.errors import InvalidArgument


def refused(fn, value, field: str) -> str:
    """Call a validator that must refuse `value`; return its message (which names `field`)."""
    with pytest.raises(InvalidArgument) as info:
        fn(value)
    assert info.value.code == "INVALID_ARGUMENT"
    assert info.value.message.startswith(f"{field}:"), info.value.message
    return info.value.message


# ---- cid --------------------------------------------------------------------


@pytest.mark.parametrize("cid", ["1", "9", "10", "42", "18446744073709551616", "9" * 64])
def test_cid_accepts_positive_decimal_integers(cid):
    assert domain.validate_cid(cid) == cid


@pytest.mark.parametrize("cid", [
    "",            # empty
    "0",           # not positive
    "00",
    "01",          # leading zero
    "007",
    "-1",          # sign
    "+1",
    " 1",
    "1 ",
    "1.0",
    "1e3",
    "0x10",
    "١",           # ARABIC-INDIC DIGIT ONE (str.isdigit() says True)
    "1٣",          # trailing ARABIC-INDIC DIGIT THREE
    "٣",
    "²",           # SUPERSCRIPT TWO
    "1²",
    "１２",        # FULLWIDTH digits
    "1\n",
    "1\0",
])
def test_cid_refuses_anything_but_ascii_digits_without_leading_zero(cid):
    refused(domain.validate_cid, cid, "cid")


@pytest.mark.parametrize("cid", [None, 1, 12, 1.0, b"1", ["1"]])
def test_cid_must_be_text(cid):
    refused(domain.validate_cid, cid, "cid")


def test_cid_of_1000_digits_is_accepted():
    cid = "1" + "0" * 999
    assert len(cid) == domain.CID_MAX_DIGITS == 1000
    assert domain.validate_cid(cid) == cid


def test_cid_of_1001_digits_is_refused_with_the_limit_in_the_message():
    message = refused(domain.validate_cid, "1" * 1001, "cid")
    assert "1000" in message and "1001" in message


def test_cid_field_name_is_used_in_the_message():
    with pytest.raises(InvalidArgument, match=r"^owner: "):
        domain.validate_cid("-3", field="owner")


# ---- title ------------------------------------------------------------------


@pytest.mark.parametrize("title", [
    "x",
    "buy milk",
    " leading and trailing spaces ",
    "a/b",
    "/",
    "//",
    "a+b",
    "#1",
    "+/#",                 # MQTT wildcard characters are ordinary title text
    "café",
    "cafe\u0301",          # decomposed accent (combining mark)
    "Ärger über Öl",
    "日本語のタスク",
    "🚀 launch",
    "🇧🇷",                 # flag (regional indicators)
    "👍🏽",                 # skin-tone modifier
    "x" * 256,
    "é" * 256,             # 256 characters, 512 UTF-8 bytes
    "🚀" * 256,            # 256 characters, 1024 UTF-8 bytes
])
def test_title_accepts_printable_text_up_to_256_characters(title):
    assert domain.validate_title(title) == title


def test_title_accepts_emoji_zwj_sequences():
    # "woman technologist" and "family" are single emoji built with ZERO WIDTH
    # JOINER (U+200D); users type them like any other emoji.
    for title in ("👩\u200d💻 code review", "👨\u200d👩\u200d👧 dinner"):
        assert domain.validate_title(title) == title


def test_title_accepts_every_kind_of_space():
    # str.isprintable() is False for all of these (found by review: refused
    # with "only printable characters", which they are).
    for title in ("Réunion\u00a0: 10\u202fh", "会議\u3000資料", "em\u2003space",
                  "thin\u2009space", "\u00a0"):
        assert domain.validate_title(title) == title


def test_title_of_257_characters_is_refused():
    message = refused(domain.validate_title, "x" * 257, "title")
    assert "256" in message and "257" in message
    refused(domain.validate_title, "🚀" * 257, "title")


@pytest.mark.parametrize("title", [
    "",
    "\0",
    "a\0b",
    "a\nb",
    "\n",
    "line\r",
    "tab\there",
    "bell\x07",
    "esc\x1b[31m",
    "del\x7f",
    "c1\x85",
    "sep\u2028",
    "para\u2029",
])
def test_title_refuses_empty_and_control_characters(title):
    refused(domain.validate_title, title, "title")


@pytest.mark.parametrize("title", ["\ud800", "a\udfffb", "\udc80"])
def test_title_refuses_lone_surrogates(title):
    message = refused(domain.validate_title, title, "title")
    assert "UTF-8" in message


@pytest.mark.parametrize("title", [None, 5, b"x", ["x"]])
def test_title_must_be_text(title):
    refused(domain.validate_title, title, "title")


# ---- description -----------------------------------------------------------


@pytest.mark.parametrize("description", [
    "",
    "multi\nline\ttext",
    "a" * 65536,
    "é" * 32768,           # 65536 bytes in UTF-8
    "🚀" * 16384,          # 65536 bytes in UTF-8
])
def test_description_accepts_up_to_64_kib_of_utf8(description):
    assert len(description.encode("utf-8")) <= 64 * 1024
    assert domain.validate_description(description) == description


@pytest.mark.parametrize("description", [
    "a" * 65537,
    "é" * 32769,           # only 32769 characters but 65538 bytes
    "🚀" * 16384 + "a",
])
def test_description_over_64_kib_of_utf8_is_refused(description):
    message = refused(domain.validate_description, description, "description")
    assert str(len(description.encode("utf-8"))) in message
    assert "65536" in message


@pytest.mark.parametrize("description", [None, 3, b"x", "bad \ud800"])
def test_description_must_be_valid_text(description):
    refused(domain.validate_description, description, "description")


# ---- status -------------------------------------------------------------------


@pytest.mark.parametrize("status", ["pending", "done"])
def test_status_accepts_pending_and_done(status):
    assert domain.validate_status(status) == status


@pytest.mark.parametrize("status", ["", "Done", "PENDING", "pending ", "finished", None, 1, []])
def test_status_refuses_anything_else(status):
    message = refused(domain.validate_status, status, "status")
    assert "pending" in message and "done" in message


# ---- client data --------------------------------------------------------------


@pytest.mark.parametrize("text,value", [
    ("{}", {}),
    ('{"name": "Ana", "email": "ana@example.com"}', {"name": "Ana", "email": "ana@example.com"}),
    ('{"nested": {"list": [1, 2.5, null, true]}}', {"nested": {"list": [1, 2.5, None, True]}}),
    ('  {"ünï": "çødé 🚀"}  ', {"ünï": "çødé 🚀"}),
])
def test_client_data_accepts_json_objects(text, value):
    assert domain.parse_client_data(text) == value


@pytest.mark.parametrize("text,kind", [
    ("[]", "an array"), ("[1, 2]", "an array"), ('[{"a": 1}]', "an array"), ("1", "a number"),
    ("1.5", "a number"), ('"text"', "a string"), ("null", "null"), ("true", "true"),
    ("false", "false")])
def test_client_data_must_be_a_json_object(text, kind):
    # In JSON's words (it said "got NoneType", "got list").
    message = refused(domain.parse_client_data, text, "data")
    assert message == f"data: must be a JSON object (got {kind})"


@pytest.mark.parametrize("text", ["", " ", "{", "{'a': 1}", '{"a": 1,}', "{a: 1}", '{"a": 1} x',
                                  '{"a": undefined}'])
def test_client_data_refuses_invalid_json(text):
    message = refused(domain.parse_client_data, text, "data")
    assert "not valid JSON" in message


@pytest.mark.parametrize("text", ["NaN", '{"a": NaN}', '{"a": Infinity}', '{"a": -Infinity}',
                                  '{"a": [1, NaN]}'])
def test_client_data_refuses_nan_and_infinity(text):
    refused(domain.parse_client_data, text, "data")


@pytest.mark.parametrize("depth", [65, 900, 1200, 30_000])  # 30,000: 60 KB, within the limit
def test_client_data_refuses_deep_nesting_without_crashing(depth):
    # One message whether the parser or the depth check gives up: where the
    # parser does depends on the thread's stack, and replicas store the answer.
    text = '{"a": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    message = refused(domain.parse_client_data, text, "data")
    assert message == "data: nested deeper than 64 levels"


@pytest.mark.parametrize("inner", ["1e-400", '{"k": 1, "k": 2}', "1] x [", '"]]]["'])
def test_deep_data_gets_one_answer_whatever_the_stack(inner):
    """Deep text with another fault inside got that fault's message on a
    shallow stack and "nested deeper" on a deep one (found by review: replicas
    store the refusal, and their call stacks differ)."""
    text = '{"a": ' + "[" * 900 + inner + "]" * 900 + "}"

    def at_depth(frames: int) -> str:
        if frames:
            return at_depth(frames - 1)
        return refused(domain.parse_client_data, text, "data")

    messages = {at_depth(0), at_depth(150), at_depth(400)}
    assert messages == {"data: nested deeper than 64 levels"}, messages


@pytest.mark.parametrize("text, depth", [('{"a": "[[[[{{{"}', 1), ('{"a": "\\"}', 1),
                                         ('{"a": "\\\"[["}', 1), ('[[["]"]]]', 3)])
def test_text_depth_skips_strings(text, depth):
    assert domain._text_depth(text) == depth


@pytest.mark.parametrize("text, stored", [
    ('{"a": 12345678901234567890.5}', "1.2345678901234567e+19"), ('{"a": 1e-400}', "0.0"),
    # An exponent beyond what decimal.Decimal takes raised InvalidOperation (not a
    # ValueError) out of the apply, on every replica, for good (found by review).
    ('{"a": 1E-99999999999999999999999}', "0.0"),
    ('{"a": [0.10000000000000000555]}', "0.1"), ('{"a": {"b": 1.0000000000000001}}', "1.0")])
def test_client_data_refuses_numbers_a_float_cannot_keep(text, stored):
    # They were stored rounded, without a word (found by review).
    message = refused(domain.parse_client_data, text, "data")
    assert "cannot be kept exactly as a 64-bit float" in message
    assert f"(it would be stored as {stored})" in message and "as a string" in message


@pytest.mark.parametrize("text", ['{"a": 100.0e-2}',
                                  '{"a": 0.1}', '{"a": 1E2}', '{"a": -0.0}', '{"a": 5e-324}',
                                  '{"a": 1.7976931348623157e308}', '{"a": 3.14159}',
                                  '{"a": 2.5E-3}', '{"a": 123456789012345678901234567890}'])
def test_client_data_keeps_numbers_a_float_holds(text):
    value = domain.parse_client_data(text)["a"]
    assert decimal.Decimal(json.dumps(value)) == decimal.Decimal(text[6:-1])


def test_zero_with_an_extreme_exponent_is_zero():
    assert domain.parse_client_data('{"a": 0e999999999999999999999}') == {"a": 0.0}
    assert domain.parse_client_data('{"a": -0.000e-999999999999999999999}') == {"a": -0.0}


def test_an_extreme_exponent_is_refused_by_the_apply_not_raised():
    from daemons.replica.commands import execute

    class View:
        def get(self, key):  # type: ignore[no-untyped-def]
            return None

        def put(self, key, value):  # type: ignore[no-untyped-def]
            raise AssertionError("nothing may be staged")

    for text in ('{"a": 1E-99999999999999999999999}', '{"a": [1e999999999999999999999]}'):
        outcome = execute(View(), {"op": "create_client", "cid": "7", "data": text,
                                   "request_id": "r", "at": "t"}, 5, "")
        assert not outcome.ok and outcome.code == "INVALID_ARGUMENT", outcome


@pytest.mark.parametrize("text, key", [('{"k": 1, "k": 2}', '"k"'),
                                       ('{"a": [{"x": 1, "y": 2, "x": 1}]}', '"x"'),
                                       ('{"\u00e9": 1, "\u00e9": 1}', '"\\u00e9"')])
def test_client_data_refuses_a_key_given_twice(text, key):
    # Only the last value was kept, without a word (found by review).
    message = refused(domain.parse_client_data, text, "data")
    assert message == f"data: the key {key} is given twice in one object (only one value " \
                      "could be kept)"


@pytest.mark.parametrize("text", ['{"a": 1e400}', '{"a": -1e400}', '{"a": [1E999]}'])
def test_client_data_never_yields_a_value_that_is_not_strict_json(text):
    # 1e400 overflows to float('inf'); stored with json.dumps it becomes the
    # non-JSON token `Infinity`. Either refuse it or keep it strict JSON.
    try:
        value = domain.parse_client_data(text)
    except InvalidArgument:
        return
    json.dumps(value, allow_nan=False)  # raises ValueError if inf/nan slipped through


@pytest.mark.parametrize("text", ['{"a": "\\ud800"}', '{"\\udfff": 1}', '{"a": ["x\\udc80"]}'])
def test_client_data_refuses_escaped_lone_surrogates(text):
    # The text is plain ASCII, but the escapes decode to lone surrogates, which
    # cannot be stored as UTF-8 (same rule as titles and descriptions).
    refused(domain.parse_client_data, text, "data")


def test_client_data_limit_is_64_kib_of_utf8():
    def sized(n: int, filler: str = "a") -> str:
        head = '{"k": "'
        tail = '"}'
        body_bytes = n - len(head) - len(tail)
        return head + filler * (body_bytes // len(filler.encode("utf-8"))) + tail

    ok = sized(65536)
    assert len(ok.encode("utf-8")) == 65536
    assert domain.parse_client_data(ok) == json.loads(ok)
    too_big = sized(65537)
    assert len(too_big.encode("utf-8")) == 65537
    message = refused(domain.parse_client_data, too_big, "data")
    assert "65537" in message
    multibyte = sized(65538, "é")  # fewer than 64 Ki characters, more than 64 KiB
    assert len(multibyte) < 65536 < len(multibyte.encode("utf-8"))
    refused(domain.parse_client_data, multibyte, "data")


@pytest.mark.parametrize("data", [None, {}, {"a": 1}, 1, b"{}"])
def test_client_data_must_be_text(data):
    refused(domain.parse_client_data, data, "data")


# ---- request id ---------------------------------------------------------------


def test_request_id_rules():
    assert domain.validate_request_id("r-1") == "r-1"
    assert domain.validate_request_id("x" * 128) == "x" * 128
    for bad in (None, "", "x" * 129, "a\nb", "\ud800", 7):
        refused(domain.validate_request_id, bad, "request_id")


# ---- keys -----------------------------------------------------------------------

CIDS = ["1", "2", "9", "10", "11", "12", "100", "101", "110", "123", "1000", "9" * 20,
        "1" + "0" * 999, "9" * 1000]
TITLES = ["x", "2/x", "/x", "x/", "/", "//", "0002/x", "00011/x", "a/b/c", "café", "🚀",
          "2", "12", "0001", "t/0001/1/x", "ÿ", "日本/語"]


def test_titles_with_slash_never_collide_across_clients():
    # cid '1' + title '2/x' must not be cid '12' + title 'x' (nor any other pair).
    assert domain.task_key("1", "2/x") != domain.task_key("12", "x")
    assert domain.task_key("1", "0/x") != domain.task_key("10", "x")
    owner: dict[bytes, tuple[str, str]] = {}
    for cid in CIDS:
        for title in TITLES:
            key = domain.task_key(cid, title)
            assert key not in owner, f"{(cid, title)} collides with {owner.get(key)}"
            owner[key] = (cid, title)
    assert len(owner) == len(CIDS) * len(TITLES)


def test_each_clients_task_keys_are_exactly_those_under_its_prefix():
    keys = {(cid, title): domain.task_key(cid, title) for cid in CIDS for title in TITLES}
    for cid in CIDS:
        prefix = domain.task_prefix(cid)
        under = {pair for pair, key in keys.items() if key.startswith(prefix)}
        assert under == {(cid, title) for title in TITLES}, cid


def test_prefix_of_1_does_not_cover_10_or_11():
    p1, p10, p11 = (domain.task_prefix(c) for c in ("1", "10", "11"))
    for title in TITLES:
        assert not domain.task_key("10", title).startswith(p1)
        assert not domain.task_key("11", title).startswith(p1)
        assert not domain.task_key("1", title).startswith(p10)
        assert not domain.task_key("1", title).startswith(p11)
        assert not domain.task_key("11", title).startswith(p10)


def test_tasks_are_contiguous_in_key_order():
    keys = sorted((domain.task_key(cid, title), cid) for cid in CIDS for title in TITLES)
    owners = [cid for _, cid in keys]
    runs = [owners[0]] + [b for a, b in zip(owners, owners[1:]) if a != b]
    assert len(runs) == len(CIDS), "some client's tasks are interleaved with another's"


def test_record_keys_never_collide_with_other_kinds():
    tasks = {domain.task_key(cid, title) for cid in CIDS for title in TITLES}
    clients = {domain.client_key(cid) for cid in CIDS}
    meta = {domain.META_APPLIED, domain.META_REVISION, domain.log_key(1),
            domain.request_key("r")}
    assert not tasks & clients and not tasks & meta and not clients & meta
    assert all(k.startswith(domain.TASK_PREFIX) for k in tasks)
    assert all(k.startswith(domain.CLIENT_PREFIX) for k in clients)


def test_client_keys_sort_numerically():
    cids = ["1", "2", "9", "10", "11", "99", "100", "101", "999", "1000", "12345678901234567890",
            "1" + "0" * 999, "9" * 1000]
    shuffled = sorted(cids, key=str)  # lexicographic order differs from numeric order
    assert shuffled != cids
    by_key = sorted(shuffled, key=domain.client_key)
    assert by_key == sorted(cids, key=int)


@pytest.mark.parametrize("cid", ["1", "10", "12345678901234567890123", "7" * 1000])
def test_cid_from_client_key_round_trips(cid):
    assert domain.cid_from_client_key(domain.client_key(cid)) == cid


@pytest.mark.parametrize("title", ["x", "/", "//", "///", "a/b", "2/x", "café", "日本語",
                                   "🚀 launch", "👍🏽", "+#", " spaced "])
def test_title_from_task_key_round_trips(title):
    for cid in ("1", "12", "9" * 1000):
        assert domain.title_from_task_key(cid, domain.task_key(cid, title)) == title


def test_log_keys_sort_by_index():
    indexes = [1, 2, 9, 10, 11, 100, 10**12, 10**19]
    assert sorted(indexes, key=domain.log_key) == indexes
    assert all(domain.log_key(i).startswith(domain.META_LOG_PREFIX) for i in indexes)


def test_client_data_integers_are_bounded_the_same_in_every_process():
    """int(str) obeys PYTHONINTMAXSTRDIGITS: two replicas started with different
    settings accepted different data from one Raft log. The bound is ours now."""
    import os
    import subprocess
    import sys
    assert domain.parse_client_data('{"n": ' + "9" * 640 + "}")["n"] == int("9" * 640)
    assert domain.parse_client_data('{"n": -' + "9" * 640 + "}")["n"] < 0
    refused(domain.parse_client_data, '{"n": ' + "9" * 641 + "}", "data")
    refused(domain.parse_client_data, '{"n": ' + "9" * 5000 + "}", "data")
    code = ("from daemons.core import domain; "
            "print(domain.parse_client_data('{\"n\": ' + '9' * 640 + '}')['n'] % 997)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for setting in ("0", "640"):
        done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                              text=True, timeout=60,
                              env={**os.environ, "PYTHONINTMAXSTRDIGITS": setting})
        assert done.returncode == 0 and done.stdout.strip() == str(int("9" * 640) % 997), \
            done.stderr
