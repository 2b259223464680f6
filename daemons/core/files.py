"""Small file-system helpers shared by the daemons that persist data."""

from __future__ import annotations

import contextlib
import os


def fsync_parent(path: str) -> None:
    """Make `path`'s entry (a creation or a rename) durable: fsync its directory."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_if_present(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
