"""The decision journal's hash chain, the same in every backend.

Each entry's ``hash`` is SHA-256 over the previous entry's hash and the entry's canonical JSON,
starting from :data:`GENESIS`, so :func:`verify_entries` finds any edit, deletion or reordering.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from coalmine.store.records import JournalEntry, Verification

GENESIS = "0" * 64


def canonical(value: Any) -> str:
    """JSON with sorted keys and no spaces: the form that is hashed and stored."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(
    prev_hash: str,
    seq: int,
    t: str,
    recorded_at: str,
    script: str,
    actor: str,
    action: str,
    body: dict[str, Any],
) -> str:
    """The chain hash of one entry."""
    content = canonical(
        {
            "seq": seq,
            "t": t,
            "recorded_at": recorded_at,
            "script": script,
            "actor": actor,
            "action": action,
            "body": body,
        }
    )
    return hashlib.sha256((prev_hash + content).encode()).hexdigest()


def verify_entries(entries: Iterable[JournalEntry]) -> Verification:
    """Recompute a journal's hash chain; report the first entry that does not match."""
    prev, count = GENESIS, 0
    for entry in entries:
        count += 1
        if entry.seq != count:
            return Verification(
                False, count - 1, prev, f"entry {count} is missing (found seq {entry.seq})"
            )
        if entry.prev_hash != prev:
            return Verification(
                False,
                count - 1,
                prev,
                f"entry {entry.seq}: prev_hash does not match entry {entry.seq - 1}",
            )
        expected = entry_hash(
            prev,
            entry.seq,
            entry.t,
            entry.recorded_at,
            entry.script,
            entry.actor,
            entry.action,
            entry.body,
        )
        if entry.hash != expected:
            return Verification(
                False, count - 1, prev, f"entry {entry.seq}: content does not match its hash"
            )
        prev = entry.hash
    return Verification(True, count, prev)
