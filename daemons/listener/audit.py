"""AuditLog: the listener's append-only JSON-lines writer (no MQTT in here).

One line per change event: the event object as published, plus `topic`,
`received_at` and, when its revision is below the highest already seen from
the same origin, `"out_of_order": true`. Payloads that are not valid events
go to a separate reject file (`<audit_log>.rejects`) with the topic, the
reason and the raw bytes (UTF-8 text when they are valid UTF-8, base64
otherwise).

Guarantees, given a caller that acknowledges an event only after `append`
returned (the listener's MQTT callback does):

- every line is written with one write() and flushed; with `fsync=always`
  it is on disk before `append` returns, with `interval` at most
  `fsync_interval` seconds later, with `never` when the OS decides;
- an event is written at most once (same origin, revision and content: a
  broker redelivery) among the latest `dedupe_window` ones, across restarts;
  a different event under a revision already seen (e.g. after the cluster
  was wiped) is never taken for a redelivery: `open()` rebuilds that window from
  the tail of the current and rotated files, newest first;
- a line torn by a crash mid-write is repaired at `open()`: kept if it is a
  whole event that only lacks its newline, else moved to the reject file and
  cut off (its event was never acknowledged, so the broker sends it again);
- files rotate by size, `audit.jsonl` -> `audit.jsonl.1` -> ... ->
  `audit.jsonl.<keep_files>`, the oldest being deleted; the reject file
  rotates the same way;
- one process at a time: `open()` takes an exclusive lock on
  `<audit_log>.lock`.
"""

from __future__ import annotations

import base64
import collections
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from daemons.core.claims import lock_file
from daemons.core.config import FSYNC_POLICIES
from daemons.core.errors import TarefaError
from daemons.core.files import fsync_parent
from daemons.listener.gaps import trusted

log = logging.getLogger(__name__)

REJECT_PAYLOAD_MAX = 64 * 1024
# Origins whose highest revision is tracked (for out_of_order); the least recent go first.
MAX_ORIGINS = 10_000
_BLOCK = 64 * 1024


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode_line(obj: dict[str, Any]) -> bytes:
    """One JSON line; UTF-8 as is, or all-ASCII escapes if the text holds a lone surrogate."""
    try:
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def rotated_paths(path: str) -> list[str]:
    """`path.1`, `path.2`, ... that exist, newest (lowest number) first."""
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.([1-9][0-9]*)")
    found = []
    for name in os.listdir(directory or "."):
        match = pattern.fullmatch(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return [p for _, p in sorted(found)]


def lines_backwards(path: str) -> Iterator[bytes]:
    """The non-empty lines of a file, last first, reading it in blocks from the end."""
    with open(path, "rb") as handle:
        pos = handle.seek(0, os.SEEK_END)
        rest = b""
        while pos > 0:
            size = min(_BLOCK, pos)
            pos -= size
            handle.seek(pos)
            chunk = handle.read(size) + rest
            lines = chunk.split(b"\n")
            rest = lines.pop(0)
            for line in reversed(lines):
                if line:
                    yield line
        if rest:
            yield rest


# (origin, revision, digest of the whole event): what makes two lines the same
# event. The broker redelivers an event byte for byte; a different event under
# a revision already seen (a wiped cluster counting again with the same
# changes, a forged event that came first) differs at least in its `at`.
EventKey = tuple[str, int, bytes]
_LINE_FIELDS = ("topic", "received_at", "out_of_order")  # what append adds to an event


def event_key(event: dict[str, Any]) -> EventKey:
    # Without the fields a line adds (an event may carry them too: they are
    # replaced in the line, so they cannot count on either side).
    content = {k: v for k, v in event.items() if k not in _LINE_FIELDS}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return (event["origin"], event["revision"],
            hashlib.blake2b(canonical.encode("ascii"), digest_size=16).digest())


def _line_event(line: bytes) -> tuple[EventKey, bool] | None:
    """(the event's key, whether it is a replay) of an audit line; None if it is no event."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    origin, revision = obj.get("origin"), obj.get("revision")
    if not isinstance(origin, str) or not isinstance(revision, int) or isinstance(revision, bool):
        return None
    try:
        return event_key(obj), obj.get("replay") is True
    except (TypeError, ValueError):  # e.g. a hand-edited line: never a redelivery
        return None


class _RotatingFile:
    """An append-only file that rotates by size: path -> path.1 -> ... -> path.<keep>."""

    def __init__(self, path: str, rotate_bytes: int, keep_files: int, sync_dir: bool) -> None:
        self.path = path
        self.rotate_bytes = rotate_bytes
        self.keep_files = keep_files
        self.sync_dir = sync_dir
        self._fd: int | None = None
        self.size = 0

    def open(self) -> None:
        created = not os.path.exists(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.size = os.fstat(self._fd).st_size
        if created and self.sync_dir:
            fsync_parent(self.path)  # the new file's name is durable before its lines are
        elif self.size and self._ends_torn():
            # A line cut by a crash mid-write: end it, so the next one is whole.
            self.write(b"\n")

    def _ends_torn(self) -> bool:
        with open(self.path, "rb") as handle:
            handle.seek(self.size - 1)
            return handle.read(1) != b"\n"

    def write(self, data: bytes) -> None:
        if self._fd is None:
            self.open()  # a rotation that failed half-way left no file open
        if self.size > 0 and self.size + len(data) > self.rotate_bytes:
            self.rotate()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            self.size += written
            view = view[written:]

    def fsync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def rotate(self) -> None:
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        for old in rotated_paths(self.path):
            if int(old.rsplit(".", 1)[1]) >= self.keep_files:
                os.remove(old)
        # Only the files that exist, oldest first (keep_files may be large).
        for old in reversed(rotated_paths(self.path)):
            n = int(old.rsplit(".", 1)[1])
            if n < self.keep_files:
                os.rename(old, f"{self.path}.{n + 1}")
        os.rename(self.path, f"{self.path}.1")
        self.open()  # creates the file, and with sync_dir fsyncs the directory
        log.info("rotated %s (kept %d older files at most)", self.path, self.keep_files)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class AuditLog:
    """Thread-safe: `append`/`reject` come from the MQTT thread, `sync_if_due` from the run loop."""

    def __init__(self, path: str, *, fsync: str = "always", fsync_interval: float = 1.0,
                 rotate_bytes: int = 64 * 1024 * 1024, keep_files: int = 10,
                 dedupe_window: int = 100_000,
                 now: Callable[[], str] = utc_now,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync: must be one of {', '.join(FSYNC_POLICIES)}")
        self.path = os.path.abspath(path)
        self.reject_path = self.path + ".rejects"
        self.fsync_policy = fsync
        self.fsync_interval = fsync_interval
        self.dedupe_window = dedupe_window
        self._now = now
        self._clock = clock
        sync_dir = fsync != "never"
        self._audit = _RotatingFile(self.path, rotate_bytes, keep_files, sync_dir)
        self._rejects = _RotatingFile(self.reject_path, rotate_bytes, keep_files, sync_dir)
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        # key -> whether the event is a replay (events.py: an old change announced again)
        self._seen: collections.OrderedDict[EventKey, bool] = collections.OrderedDict()
        self._highest: dict[str, int] = {}
        self._dirty = False
        self._last_sync = 0.0
        self.written = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.rejects = 0
        self.unreadable_lines = 0

    # -- lifecycle ---------------------------------------------------------------

    def open(self) -> None:
        """Lock, repair a torn last line, rebuild the dedupe window, open both files.

        TarefaError (naming the path and the reason) if the files cannot be
        opened, e.g. `audit_log` names a directory or lies under a file.
        """
        try:
            directory = os.path.dirname(self.path)
            if os.path.exists(directory) and not os.path.isdir(directory):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", directory)
            if not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                if self.fsync_policy != "never":
                    fsync_parent(directory)  # the directory's own entry in its parent
            if os.path.isdir(self.path):
                # Refused before the lock and rejects files are made beside it.
                raise IsADirectoryError(errno.EISDIR, "is a directory", self.path)
            self._take_lock()
            self._rejects.open()
            self._repair_tail()
            self._rebuild()
            self._audit.open()
        except OSError as exc:
            self._audit.close()
            self._rejects.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            where = exc.filename or self.path
            raise TarefaError(f"audit log {self.path}: cannot open it: {where}: "
                              f"{exc.strerror or exc}") from None
        self._last_sync = self._clock()
        log.info("audit log %s: %d bytes, %d rotated files, remembering %d events from %d "
                 "origins", self.path, self._audit.size, len(rotated_paths(self.path)),
                 len(self._seen), len(self._highest))

    def close(self) -> None:
        with self._lock:
            if self.fsync_policy != "never":
                self._audit.fsync()
                self._rejects.fsync()
            self._audit.close()
            self._rejects.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _take_lock(self) -> None:
        self._lock_fd = lock_file(self.path + ".lock",
                                  f"{self.path}: another listener is writing this audit log")

    def _repair_tail(self) -> None:
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            return
        if size == 0:
            return
        with open(self.path, "rb+") as handle:
            handle.seek(size - 1)
            if handle.read(1) == b"\n":
                return
            # Find the start of the unterminated last line.
            start, pos = 0, size
            while pos > 0:
                step = min(_BLOCK, pos)
                pos -= step
                handle.seek(pos)
                nl = handle.read(step).rfind(b"\n")
                if nl >= 0:
                    start = pos + nl + 1
                    break
            handle.seek(start)
            fragment = handle.read()
            if _line_event(fragment) is not None:
                handle.seek(size)
                handle.write(b"\n")
                log.warning("%s: the last line lacked its newline (the listener stopped "
                            "mid-write); kept it", self.path)
            else:
                self._write_reject(None, fragment,
                                   f"torn write: incomplete last line of {self.path} at byte "
                                   f"{start} (the listener stopped mid-write); the broker "
                                   "redelivers that event")
                self.rejects += 1  # in ListenerStatus.rejects, like any other reject
                handle.truncate(start)
                log.warning("%s: moved an incomplete last line (%d bytes) to %s", self.path,
                            len(fragment), self.reject_path)
            handle.flush()
            os.fsync(handle.fileno())
        self._rejects.fsync()

    def _rebuild(self) -> None:
        keys: list[EventKey] = []
        files = [self.path, *rotated_paths(self.path)]
        for path in files:
            if len(keys) >= self.dedupe_window:
                break
            try:
                for line in lines_backwards(path):
                    found = _line_event(line)
                    if found is None:
                        self.unreadable_lines += 1
                        continue
                    keys.append(found)
                    if len(keys) >= self.dedupe_window:
                        break
            except FileNotFoundError:
                continue
        for key, replay in reversed(keys):
            self._remember(key, replay)
        self._recount_highest(require_trusted=False)
        if self.unreadable_lines:
            log.warning("audit log %s: skipped %d lines that are not events while rebuilding "
                        "the dedupe window", self.path, self.unreadable_lines)

    def _note_highest(self, origin: str, revision: int) -> None:
        """The highest revision seen per origin (for out_of_order), for at most
        MAX_ORIGINS origins: any login allowed to publish could invent new ones."""
        self._highest.pop(origin, None)
        self._highest[origin] = revision  # most recently seen last
        while len(self._highest) > MAX_ORIGINS:
            del self._highest[next(iter(self._highest))]

    def _recount_highest(self, require_trusted: bool) -> None:
        """Each origin's highest revision, from the remembered events whose
        revisions are trusted (gaps.py): a forged one far above them must not
        outlive a restart either. Replays never count (found by review: one
        counted after a restart, not before). With too little history to tell
        every revision counts, unless `require_trusted` (then nothing changes)."""
        group = trusted(key[1] for key, replay in self._seen.items() if not replay)
        if not group and require_trusted:
            return
        ceiling = group[-1] if group else float("inf")
        self._highest.clear()
        for key, replay in self._seen.items():
            origin, revision = key[0], key[1]
            if not replay and revision <= ceiling and revision > self._highest.get(origin, 0):
                self._note_highest(origin, revision)

    def _remember(self, key: EventKey, replay: bool = False) -> None:
        self._seen[key] = replay
        self._seen.move_to_end(key)
        while len(self._seen) > self.dedupe_window:
            self._seen.popitem(last=False)

    # -- writing -----------------------------------------------------------------

    def append(self, event: dict[str, Any], topic: str,
               plausible: bool = True) -> dict[str, Any] | None:
        """Write a validated event; return the line written, or None for a duplicate.

        `plausible` False (a revision far above the others, see gaps.py): it is
        written but does not raise its origin's highest revision, so one forged
        event cannot mark every later real one out of order.

        Raises OSError if the line could not be written: the caller must then
        not acknowledge the event.
        """
        key = event_key(event)
        with self._lock:
            if key in self._seen:
                self.duplicates += 1
                return None
            entry = {**event, "topic": topic, "received_at": self._now()}
            # The listener's own verdict only: an event carrying the field (a
            # forged one) kept it, and --follow printed "(out of order)".
            entry.pop("out_of_order", None)
            # A replay (events.py) is an old change announced again, and says so:
            # neither flagged nor counted towards its origin's highest revision.
            replay = event.get("replay") is True
            out_of_order = not replay and \
                event["revision"] < self._highest.get(event["origin"], 0)
            if out_of_order:
                entry["out_of_order"] = True
            self._audit.write(encode_line(entry))
            self._after_write(self._audit)
            self._remember(key, replay)
            if out_of_order:
                self.out_of_order += 1
            elif plausible and not replay:
                self._note_highest(event["origin"], event["revision"])
            self.written += 1
            return entry

    def reject(self, topic: str | None, payload: bytes, reason: str) -> None:
        """Keep a payload that is not a valid event, with why."""
        with self._lock:
            self._write_reject(topic, payload, reason)
            self._after_write(self._rejects)
            self.rejects += 1

    def _write_reject(self, topic: str | None, payload: bytes, reason: str) -> None:
        kept = payload[:REJECT_PAYLOAD_MAX]
        entry: dict[str, Any] = {"received_at": self._now(), "topic": topic, "reason": reason}
        try:
            entry.update(payload=kept.decode("utf-8"), payload_encoding="utf-8")
        except UnicodeDecodeError:
            entry.update(payload=base64.b64encode(kept).decode("ascii"),
                         payload_encoding="base64")
        entry["payload_bytes"] = len(payload)
        if len(kept) < len(payload):
            entry["truncated"] = True
        self._rejects.write(encode_line(entry))

    def _after_write(self, target: _RotatingFile) -> None:
        if self.fsync_policy == "always":
            target.fsync()
            return
        self._dirty = True
        due = self._clock() - self._last_sync >= self.fsync_interval
        if self.fsync_policy == "interval" and due:
            self._sync()

    def sync_if_due(self) -> None:
        """With fsync=interval, make the last writes durable once the interval passed."""
        with self._lock:
            if self.fsync_policy == "interval" and self._dirty \
                    and self._clock() - self._last_sync >= self.fsync_interval:
                self._sync()

    def _sync(self) -> None:
        self._audit.fsync()
        self._rejects.fsync()
        self._dirty = False
        self._last_sync = self._clock()

    # -- reading -----------------------------------------------------------------

    def retrust_highest(self) -> None:
        """Recompute each origin's highest revision from the trusted revisions
        remembered (as a restart does): called when gap tracking starts on an
        empty log, so that a forged first event far above the real ones stops
        making them look late (found by review: every real event was flagged
        until a restart)."""
        with self._lock:
            self._recount_highest(require_trusted=True)

    def remembered_revisions(self) -> tuple[list[int], list[int]]:
        """The revisions of the events remembered (the dedupe window): those of
        changes as published, and those held only as replays (an old change
        announced again fills a hole but must not anchor gap tracking)."""
        with self._lock:
            live = [key[1] for key, replay in self._seen.items() if not replay]
            replayed = [key[1] for key, replay in self._seen.items() if replay]
            return live, replayed

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"events_written": self.written, "duplicates": self.duplicates,
                    "out_of_order": self.out_of_order, "rejects": self.rejects,
                    "audit_log": self.path, "reject_log": self.reject_path}
