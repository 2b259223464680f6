"""A Raft entry's commands with a CRC-32: what the journal and the wire carry.

PySyncObj's journal has no checksums, and a command is a pickle: a lost page
inside a long string field (a description) still decodes, as other text. A
journal torn by a power cut, or a flipped bit in it, could then be applied as
a different write on one member than on the others, silently. Every entry
proposed since this module exists is `apply_sealed(seal(commands))`: a magic,
the CRC-32 of the body, and the pickled commands. A member applies an entry
only after its CRC matched; the start check (journal_file.py) verifies every
sealed record too. Entries journalled before it (`apply_batch(commands)`)
are still applied as they are.

The cost is a CRC over a few kilobytes per entry, about a microsecond: the
commands are pickled once either way (before, PySyncObj pickled the list).

Three magics, one layout: `TS3:` (since 2026-11-28, its CRC covering the
magic too) and `TS2:` (the same day's interim version, the CRC over the body)
tell every member to store each result of the entry with the entry's Raft
index (EntryApplier), `TS1:` (entries journalled before) to store it
without. The entry, not the code of the member applying it, decides, so
that members upgraded at different indexes still store the same bytes
(found by review: a member that had stored results the old way pruned them
by another rule and diverged). A member of an earlier version refuses a
TS3 entry as not sealed, and stops.
"""

from __future__ import annotations

import pickle
import struct
import zlib

MAGIC = b"TS3:"
INDEXED_MAGIC = b"TS2:"  # results with their index, the CRC over the body only
LEGACY_MAGIC = b"TS1:"  # results stored without their index (see the module doc)
_MAGICS = (MAGIC, INDEXED_MAGIC, LEGACY_MAGIC)
_HEAD = len(MAGIC) + 4


class CorruptEntry(ValueError):
    """A sealed entry whose bytes are not those that were sealed."""


def seal(commands: list) -> bytes:
    body = pickle.dumps(commands, protocol=pickle.HIGHEST_PROTOCOL)
    return MAGIC + struct.pack("<I", _crc(MAGIC, body)) + body


def _crc(magic: bytes, body: bytes | memoryview) -> int:
    # TS3's CRC covers its magic too: two flipped bits turned "TS2:" into "TS1:"
    # (found by review), which still verified and was stored the other way.
    return zlib.crc32(body, zlib.crc32(magic)) if magic == MAGIC else zlib.crc32(body)


def is_sealed(blob: object) -> bool:
    return isinstance(blob, bytes) and blob[:len(MAGIC)] in _MAGICS


def results_indexed(blob: bytes) -> bool:
    """Whether the entry's results are stored with its Raft index (module doc)."""
    return not blob.startswith(LEGACY_MAGIC)


def verify(blob: bytes) -> memoryview:
    """The body of a sealed entry whose CRC matches (CorruptEntry otherwise)."""
    if not is_sealed(blob) or len(blob) < _HEAD:
        raise CorruptEntry("not a sealed entry")
    (crc,) = struct.unpack_from("<I", blob, len(MAGIC))
    body = memoryview(blob)[_HEAD:]
    if _crc(blob[:len(MAGIC)], body) != crc:
        raise CorruptEntry("its CRC-32 does not match its bytes")
    return body


def unseal(blob: bytes) -> list:
    body = verify(blob)
    try:
        commands = pickle.loads(body)
    except Exception as exc:  # noqa: BLE001 - a matching CRC over bytes that do not load
        raise CorruptEntry(f"it does not decode ({type(exc).__name__})") from None
    if not isinstance(commands, list):
        raise CorruptEntry(f"it holds a {type(commands).__name__}, not a list of commands")
    return commands
