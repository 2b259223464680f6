"""Domain rules shared by portal and replica: validation and the key layout.

Validation messages name the field, because they reach users verbatim as
INVALID_ARGUMENT. The replica validates every command again before applying
it (it never trusts its caller), so these functions must be deterministic.

LevelDB key layout (all keys are bytes):

    c/<cidkey>                 client record (JSON)
    t/<cidkey>/<title utf-8>   task record (JSON)
    s/<cidkey>                 the client's secret record (JSON: salted scrypt
                               hash and parameters, never the secret); apart
                               from c/ so that no read of clients carries it
    m/applied                  last applied Raft index (decimal)
    m/revision                 global revision (decimal)
    m/log/<index:020d>         request ids applied at that Raft index (JSON list)
    m/req/<request id>         first result for that request id (JSON)

<cidkey> is the CID's digit count as four digits followed by the digits, so
keys sort clients numerically, a client's tasks are contiguous under
`t/<cidkey>/`, and since <cidkey> decodes without a delimiter no title byte
(`/` included) can make one key look like another.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import unicodedata
from typing import Any

from daemons.core.errors import InvalidArgument

CID_MAX_DIGITS = 1000
TITLE_MAX_CHARS = 256
DATA_MAX_BYTES = 64 * 1024
DATA_MAX_DEPTH = 64
# Integers in client data: PYTHONINTMAXSTRDIGITS can lower Python's int<->str bound
# (default 4300) to 640 at the least, per process: above 640 digits two replicas
# could disagree on the same command, so larger integers are refused.
JSON_INT_MAX_DIGITS = 640
DESCRIPTION_MAX_BYTES = 64 * 1024
REQUEST_ID_MAX_CHARS = 128
STATUSES = ("pending", "done")

_CID_RE = re.compile(r"[1-9][0-9]*")

CLIENT_PREFIX = b"c/"
TASK_PREFIX = b"t/"
SECRET_PREFIX = b"s/"
META_APPLIED = b"m/applied"
META_REVISION = b"m/revision"
META_LOG_PREFIX = b"m/log/"
META_REQ_PREFIX = b"m/req/"


def validate_cid(cid: object, field: str = "cid") -> str:
    if not isinstance(cid, str) or not cid:
        raise InvalidArgument(f"{field}: required (decimal digits of a positive integer)")
    if len(cid) > CID_MAX_DIGITS:
        raise InvalidArgument(f"{field}: at most {CID_MAX_DIGITS} digits (got {len(cid)})")
    if not _CID_RE.fullmatch(cid):
        raise InvalidArgument(
            f"{field}: must be the decimal digits of a positive integer, "
            f"no sign and no leading zeros (got {_shorten(cid)!r})"
        )
    return cid


def _check_text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}: must be text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field}: must be valid UTF-8 (lone surrogate)") from None
    return value


def validate_title(title: object) -> str:
    title = _check_text(title, "title")
    if not title:
        raise InvalidArgument("title: required (1 to 256 characters)")
    if len(title) > TITLE_MAX_CHARS:
        raise InvalidArgument(f"title: at most {TITLE_MAX_CHARS} characters (got {len(title)})")
    if not title.isprintable() and not all(_title_char_ok(ch) for ch in title):
        raise InvalidArgument("title: only printable characters (no control characters, "
                              "line separators or bidirectional overrides)")
    return title


_BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _title_char_ok(ch: str) -> bool:
    if ch.isprintable():
        return True
    category = unicodedata.category(ch)
    # str.isprintable() refuses every space but U+0020: the no-break spaces of
    # French ("Réunion : 10 h") and the ideographic space are spaces too (Zs).
    # Line and paragraph separators (Zl, Zp) stay refused.
    if category == "Zs":
        return True
    # Format characters (Cf) such as the zero-width joiner of emoji sequences are
    # fine; bidirectional overrides would let a title display as another.
    return category == "Cf" and ch not in _BIDI_CONTROLS


def validate_description(description: object) -> str:
    description = _check_text(description, "description")
    size = len(description.encode("utf-8"))
    if size > DESCRIPTION_MAX_BYTES:
        raise InvalidArgument(f"description: at most {DESCRIPTION_MAX_BYTES} bytes (got {size})")
    return description


def validate_status(status: object) -> str:
    if status not in STATUSES:
        raise InvalidArgument(f"status: must be one of {', '.join(STATUSES)} (got {status!r})")
    return status  # type: ignore[return-value]


def validate_task_update(description: object, status: object) -> None:
    """An update names a new description and/or status (None = unchanged)."""
    if description is None and status is None:
        raise InvalidArgument("description, status: give at least one to update")
    if description is not None:
        validate_description(description)
    if status is not None:
        validate_status(status)


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    """A JSON integer, the same on every replica whatever its PYTHONINTMAXSTRDIGITS."""
    if len(text) - text.startswith("-") > JSON_INT_MAX_DIGITS:
        raise ValueError(f"integer with more than {JSON_INT_MAX_DIGITS} digits")
    return int(text)


class _Unstorable(ValueError):
    """Valid JSON that the stored record could not hold as written."""


_NUMBER = re.compile(r"(-?)(\d+)(?:\.(\d+))?(?:[eE]([+-]?\d+))?")
_EXPONENT_DIGITS = 18  # beyond any float's (10**308) by far; int() of it is always allowed


def _decimal_value(text: str) -> tuple[bool, str, int] | None:
    """A JSON number's exact value as (negative, digits, exponent) with no
    leading or trailing zero digit (every zero is (False, "", 0)); None when
    its exponent is too long to matter (then it is not zero). Integer
    arithmetic only, no decimal context: the same on every replica."""
    found = _NUMBER.fullmatch(text)
    if found is None:
        return None
    sign, whole, fraction, exponent = found.groups()
    fraction = fraction or ""
    digits = (whole + fraction).lstrip("0")
    if not digits.rstrip("0"):
        return False, "", 0
    exponent = exponent or "0"
    if len(exponent.lstrip("+-").lstrip("0")) > _EXPONENT_DIGITS:
        return None
    stripped = digits.rstrip("0")
    return sign == "-", stripped, int(exponent) - len(fraction) + len(digits) - len(stripped)


def _exact_float(text: str) -> float:
    """A JSON number with a fraction or exponent, refused unless the stored
    record (Python's float, written back by json.dumps as its repr) denotes
    the same number: 12345678901234567890.5 or 1e-400 would change silently."""
    value = _finite_float(text)
    exact = _decimal_value(text)
    if exact is None or exact != _decimal_value(repr(value)):
        raise _Unstorable(f"the number {text[:40]} cannot be kept exactly as a 64-bit float "
                          f"(it would be stored as {value!r}); send it as a string")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object, refused when a key repeats (only one value would be kept)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Unstorable(f"the key {json.dumps(key)[:80]} is given twice in one object "
                                  "(only one value could be kept)")
            seen.add(key)
    return value


def parse_client_data(data: object) -> dict:
    """Client data: the text of a JSON object, at most 64 KiB."""
    data = _check_text(data, "data")
    size = len(data.encode("utf-8"))
    if size > DATA_MAX_BYTES:
        raise InvalidArgument(f"data: at most {DATA_MAX_BYTES} bytes of JSON (got {size})")
    too_deep = f"data: nested deeper than {DATA_MAX_DEPTH} levels"
    if _text_depth(data) > DATA_MAX_DEPTH:
        # Measured on the text, before the parser: whether json.loads runs out
        # of stack first depends on the thread, and replicas store the answer.
        raise InvalidArgument(too_deep)
    try:
        value = json.loads(data, parse_constant=_refuse_constant, parse_float=_exact_float,
                           parse_int=_bounded_int, object_pairs_hook=_unique_keys)
    except _Unstorable as exc:
        raise InvalidArgument(f"data: {exc}") from None
    except RecursionError:
        # Where the parser gives up depends on the thread's stack, so a replica
        # must not say so: the same text deep enough for the check below gets
        # the check's words on every member (the outcome is stored).
        raise InvalidArgument(too_deep) from None
    except ValueError as exc:
        raise InvalidArgument(f"data: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"data: must be a JSON object (got {_json_kind(value)})")
    try:  # escapes such as "\ud800" decode to text that is not valid UTF-8
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise InvalidArgument("data: strings must be valid UTF-8 (lone surrogate escape)") \
            from None
    return value


# A JSON string (unrolled: one regex step per run of plain characters), and
# what is not a bracket.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__


def _text_depth(text: str) -> int:
    """How deep brackets nest in JSON text, strings skipped (any text: a
    malformed one gets some number, the same every time)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP, brackets)), default=0)


def _json_kind(value: object) -> str:
    """A parsed JSON value's kind, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


def json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


# Client secret hashes: what a replica accepts (the portal chooses within it).
SALT_BYTES = (16, 64)
HASH_BYTES = (32, 64)
SCRYPT_N = (2**10, 2**20)
SCRYPT_R = (1, 32)
SCRYPT_P = (1, 16)


def validate_secret_hash(salt: object, digest: object, n: object, r: object,
                         p: object) -> None:
    """A client secret record's fields (bytes and scrypt parameters), never the secret."""
    for name, value, (low, high) in (("secret.salt", salt, SALT_BYTES),
                                     ("secret.hash", digest, HASH_BYTES)):
        if not isinstance(value, bytes) or not low <= len(value) <= high:
            raise InvalidArgument(f"{name}: {low} to {high} bytes")
    for name, value, (low, high) in (("secret.n", n, SCRYPT_N), ("secret.r", r, SCRYPT_R),
                                     ("secret.p", p, SCRYPT_P)):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise InvalidArgument(f"{name}: an integer from {low} to {high}")
    if n & (n - 1):  # type: ignore[operator]
        raise InvalidArgument("secret.n: must be a power of 2")


def validate_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not request_id:
        raise InvalidArgument("request_id: required")
    if len(request_id) > REQUEST_ID_MAX_CHARS or not request_id.isprintable():
        raise InvalidArgument(
            f"request_id: 1 to {REQUEST_ID_MAX_CHARS} printable characters"
        )
    return request_id


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


# ---- keys -----------------------------------------------------------------


def cid_key(cid: str) -> bytes:
    return f"{len(cid):04d}{cid}".encode("ascii")


def client_key(cid: str) -> bytes:
    return CLIENT_PREFIX + cid_key(cid)


def task_prefix(cid: str) -> bytes:
    return TASK_PREFIX + cid_key(cid) + b"/"


def task_key(cid: str, title: str) -> bytes:
    return task_prefix(cid) + title.encode("utf-8")


def secret_key(cid: str) -> bytes:
    return SECRET_PREFIX + cid_key(cid)


def cid_from_client_key(key: bytes) -> str:
    return key[len(CLIENT_PREFIX) + 4 :].decode("ascii")


def title_from_task_key(cid: str, key: bytes) -> str:
    return key[len(task_prefix(cid)) :].decode("utf-8")


def log_key(index: int) -> bytes:
    return META_LOG_PREFIX + b"%020d" % index


def log_index(key: bytes) -> int:
    """The Raft index of a log_key."""
    return int(key[len(META_LOG_PREFIX):])


def request_key(request_id: str) -> bytes:
    return META_REQ_PREFIX + request_id.encode("utf-8")
