"""Checker 3: every replica ends with identical contents (same digest)."""

from __future__ import annotations

from typing import Any, Mapping

from tests.fault.checkers.verdict import Verdict

NAME = "converged"
_MAX_KEYS_SHOWN = 10


def check_converged(digests: Mapping[str, str],
                    contents: Mapping[str, Mapping[str, Any]] | None = None) -> Verdict:
    """Pass when all replicas report the same digest.

    `digests` maps replica id -> digest of its contents. Optional `contents`
    (replica id -> {key: record}) lets the report name the keys on which the
    dissenting replicas differ from the largest group. An empty mapping fails:
    a check that saw nothing must not pass.
    """
    if not digests:
        return Verdict(False, NAME, "no replica digests given")
    groups: dict[str, list[str]] = {}
    for replica, digest in sorted(digests.items()):
        groups.setdefault(digest, []).append(replica)
    if len(groups) == 1:
        digest = next(iter(groups))
        return Verdict(True, NAME, f"{len(digests)} replicas agree (digest {_short(digest)})")
    ordered = sorted(groups.items(), key=lambda item: (-len(item[1]), item[1]))
    majority = ordered[0][1]
    details = [f"digest {_short(d)}: {', '.join(rs)}" for d, rs in ordered]
    if contents is not None and majority[0] in contents:
        reference = contents[majority[0]]
        for _, replicas in ordered[1:]:
            for replica in replicas:
                if replica in contents:
                    details += _differences(majority[0], reference, replica, contents[replica])
    dissenters = [r for _, rs in ordered[1:] for r in rs]
    return Verdict(False, NAME, f"{len(groups)} different digests among {len(digests)} replicas; "
                   f"{', '.join(dissenters)} differ from {', '.join(majority)}", details)


def _short(digest: str) -> str:
    return digest[:12]


def _differences(ref_id: str, ref: Mapping[str, Any], other_id: str,
                 other: Mapping[str, Any]) -> list[str]:
    keys = sorted(k for k in set(ref) | set(other)
                  if ref.get(k, _MISSING) != other.get(k, _MISSING))
    lines = [f"{other_id} vs {ref_id}: {len(keys)} keys differ"]
    for key in keys[:_MAX_KEYS_SHOWN]:
        lines.append(f"  {key}: {ref_id}={_show(ref.get(key, _MISSING))} "
                     f"{other_id}={_show(other.get(key, _MISSING))}")
    if len(keys) > _MAX_KEYS_SHOWN:
        lines.append(f"  ... and {len(keys) - _MAX_KEYS_SHOWN} more")
    return lines


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def _show(value: Any) -> str:
    return repr(value)
