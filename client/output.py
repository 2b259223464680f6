"""How the CLI prints: tables and lines for people, JSON for programs."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from daemons.core.terminal import terminal_safe
from proto import portal_pb2 as pb


def client_dict(msg: pb.Client) -> dict[str, Any]:
    return {"cid": msg.cid, "data": json.loads(msg.data) if msg.data else None,
            "revision": msg.revision, "created_at": msg.created_at,
            "updated_at": msg.updated_at}


def task_dict(msg: pb.Task) -> dict[str, Any]:
    return {"cid": msg.cid, "title": msg.title, "description": msg.description,
            "status": msg.status, "revision": msg.revision, "created_at": msg.created_at,
            "updated_at": msg.updated_at}


def event_dict(msg: pb.TaskEvent) -> dict[str, Any]:
    out: dict[str, Any] = {"event": msg.event, "cid": msg.cid, "revision": msg.revision,
                           "origin": msg.origin, "at": msg.at}
    if msg.title:
        out["title"] = msg.title
    if msg.HasField("task"):
        out["task"] = task_dict(msg.task)
    return out


class Printer:
    def __init__(self, as_json: bool, out: TextIO | None = None) -> None:
        self.as_json = as_json
        self.out = out if out is not None else sys.stdout  # the current one, not the first
        # Output that is not UTF-8 (a terminal or PYTHONIOENCODING in another
        # encoding) gets JSON's own \u escapes; tables and lines get Python's
        # backslash escapes for what it cannot encode (see client.__main__.main).
        encoding = (getattr(self.out, "encoding", None) or "utf-8").lower().replace("-", "")
        self._ascii_json = encoding not in ("utf8", "utf8sig")

    def document(self, value: Any) -> None:
        """One JSON document on a line."""
        print(json.dumps(value, ensure_ascii=self._ascii_json), file=self.out, flush=True)

    def record(self, value: dict[str, Any]) -> None:
        if self.as_json:
            self.document(value)
            return
        width = max(len(k) for k in value)
        for key, item in value.items():
            shown = json.dumps(item, ensure_ascii=False) if isinstance(item, (dict, list)) else item
            safe = terminal_safe(str(shown), keep="\n")  # a multi-line description stays so
            print(f"{key.ljust(width)}  {safe}", file=self.out)

    def line(self, text: str, value: dict[str, Any]) -> None:
        if self.as_json:
            self.document(value)
        else:
            print(text, file=self.out)

    def listing(self, name: str, rows: list[dict[str, Any]], columns: list[str],
                next_token: str) -> None:
        if self.as_json:
            self.document({name: rows, "next": next_token or None})
            return
        if not rows:
            print(f"(no {name})", file=self.out)
        else:
            # The first column names the row (CID, title): shown whole, so it can
            # be copied into the next command; the others are cut at 60 characters.
            cells = [[_cell(row[c], None if i == 0 else 60) for i, c in enumerate(columns)]
                     for row in rows]
            widths = [max(len(c.upper()), *(len(r[i]) for r in cells))
                      for i, c in enumerate(columns)]
            print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(),
                  file=self.out)
            for r in cells:
                print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip(), file=self.out)
        if next_token:
            print(f"(more: --page {next_token})", file=self.out)

    def event(self, value: dict[str, Any]) -> None:
        if self.as_json:
            self.document(value)
            return
        parts = [f"rev {value['revision']}", value["event"], f"cid={value['cid']}"]
        if "title" in value:
            parts.append(f"title={json.dumps(value['title'], ensure_ascii=False)}")
        if "task" in value:
            parts.append(f"status={value['task']['status']}")
        parts.append(f"by {value['origin']}")
        # Every field may come from a forged event: no escape reaches the terminal.
        print(terminal_safe("  ".join(parts)), file=self.out, flush=True)


def _cell(value: Any, limit: int | None) -> str:
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    text = terminal_safe(text)
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"
