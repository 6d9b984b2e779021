"""The catalog's commit log: one numbered JSON entry per commit, created exclusively.

Why: several processes on several machines write the catalog at once. Each
commit first writes its Parquet files under unique names (invisible: nothing
refers to them yet), then creates log entry N+1 with an exclusive create
(local: hard link, fails if present; S3: PUT with `If-None-Match: *`). Exactly
one writer wins each number; a loser re-reads, re-checks and retries with the
next one. Readers see the files listed by entries 1..N: a commit is visible
whole or not at all, and never half.

Entries are dense (N+1 is only created by someone who has read N), so a
reader catches up by probing N+1, N+2... A checkpoint (the whole state at some
N, written after each compaction) spares cold readers from replaying the log.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec

from catalog import fs as cfs
from renkei.errors import CatalogError

BUCKET = 1000  # entries per log folder, to keep listings short


def entry_path(root: str, seq: int) -> str:
    return f"{root}/_log/{seq // BUCKET:08d}/{seq:012d}.json"


def checkpoint_path(root: str, seq: int) -> str:
    return f"{root}/_checkpoints/{seq:012d}.json"


@dataclass
class FileEntry:
    path: str  # relative to the catalog root
    rows: int
    level: int
    seq: int  # commit that added it

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "level": self.level, "seq": self.seq}


@dataclass
class State:
    """The catalog as of commit `seq`: live files per table and the audit chain's head."""

    seq: int = 0
    files: dict[str, dict[str, FileEntry]] = field(default_factory=dict)
    audit_count: int = 0
    audit_head: str = ""
    # files removed by compaction, with when, until vacuum deletes them
    removed: list[tuple[str, float]] = field(default_factory=list)

    def copy(self) -> "State":
        return State(self.seq, {t: dict(f) for t, f in self.files.items()}, self.audit_count,
                     self.audit_head, list(self.removed))

    def apply(self, seq: int, entry: dict[str, Any]) -> None:
        if seq != self.seq + 1:
            raise CatalogError(f"catalog log entry {seq} applied after {self.seq}: the log is damaged")
        for table, added in entry.get("add", {}).items():
            live = self.files.setdefault(table, {})
            for item in added:
                live[item["path"]] = FileEntry(item["path"], int(item["rows"]), int(item.get("level", 0)), seq)
        at = float(entry.get("time", time.time()))
        for table, gone in entry.get("remove", {}).items():
            live = self.files.setdefault(table, {})
            for path in gone:
                live.pop(path, None)
                self.removed.append((path, at))
        vacuumed = set(entry.get("vacuumed", ()))
        if vacuumed:
            self.removed = [r for r in self.removed if r[0] not in vacuumed]
        audit = entry.get("audit")
        if audit:
            if int(audit["prev_count"]) != self.audit_count:
                raise CatalogError(
                    f"catalog log entry {seq} continues the audit chain at event "
                    f"{audit['prev_count']}, but the chain had {self.audit_count} events"
                )
            self.audit_count = int(audit["count"])
            self.audit_head = str(audit["head"])
        self.seq = seq

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "files": {t: [f.to_json() for f in files.values()] for t, files in self.files.items()},
            "audit_count": self.audit_count,
            "audit_head": self.audit_head,
            "removed": [list(r) for r in self.removed],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "State":
        files = {
            t: {f["path"]: FileEntry(f["path"], int(f["rows"]), int(f["level"]), int(f["seq"])) for f in items}
            for t, items in data.get("files", {}).items()
        }
        return cls(int(data["seq"]), files, int(data.get("audit_count", 0)), str(data.get("audit_head", "")),
                   [(str(p), float(t)) for p, t in data.get("removed", [])])


class CommitLog:
    """Numbered entries under `<root>/_log/`, checkpoints under `<root>/_checkpoints/`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root

    def read(self, seq: int) -> dict[str, Any] | None:
        try:
            return json.loads(cfs.read_bytes(self.fs, entry_path(self.root, seq)))
        except FileNotFoundError:
            return None

    def try_create(self, seq: int, entry: dict[str, Any]) -> bool:
        """Create entry `seq`; False when another writer created it first."""
        data = json.dumps({**entry, "seq": seq}, separators=(",", ":"), sort_keys=True).encode()
        try:
            cfs.exclusive_write(self.fs, entry_path(self.root, seq), data)
        except FileExistsError:
            return False
        return True

    def latest_listed(self) -> int:
        """The highest entry number a listing shows (0 for an empty log)."""
        buckets = sorted(n for n in cfs.listdir_names(self.fs, f"{self.root}/_log") if n.isdigit())
        for bucket in reversed(buckets):
            names = [n for n in cfs.listdir_names(self.fs, f"{self.root}/_log/{bucket}")
                     if n.endswith(".json") and n[:-5].isdigit()]
            if names:
                return max(int(n[:-5]) for n in names)
        return 0

    def write_checkpoint(self, state: State) -> None:
        data = json.dumps(state.to_json(), separators=(",", ":")).encode()
        cfs.atomic_write(self.fs, checkpoint_path(self.root, state.seq), data)

    def latest_checkpoint(self) -> State | None:
        names = sorted((n for n in cfs.listdir_names(self.fs, f"{self.root}/_checkpoints")
                        if n.endswith(".json") and n[:-5].isdigit()), reverse=True)
        for name in names:
            try:
                return State.from_json(json.loads(cfs.read_bytes(self.fs, f"{self.root}/_checkpoints/{name}")))
            except (FileNotFoundError, ValueError, KeyError):
                continue
        return None

    def catch_up(self, state: State) -> State:
        """Apply every entry after `state.seq` (returns a new State when anything changed)."""
        new = None
        while True:
            entry = self.read((new or state).seq + 1)
            if entry is None:
                return new or state
            if new is None:
                new = state.copy()
            new.apply(new.seq + 1, entry)

    def load(self) -> State:
        """The latest state, from the newest checkpoint plus the entries after it."""
        state = self.latest_checkpoint() or State()
        return self.catch_up(state)
