"""Text that reaches an operator's terminal: user data and event fields shown
with their control characters escaped."""

from __future__ import annotations

import re

# C0 and C1 controls (escape sequences, carriage returns, ...), DEL and the
# bidirectional overrides and isolates, which could rewrite what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: str, keep: str = "") -> str:
    """`text` with every control character shown as an escape (`\\n`, `\\x1b`),
    except those in `keep`: descriptions are user data and reach the operator's
    terminal. JSON output is escaped already."""
    def escape(found: re.Match) -> str:
        ch = found.group()
        if ch in keep:
            return ch
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch) or \
            (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
    return _UNSAFE.sub(escape, text)
