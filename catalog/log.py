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

Unambiguous commits: every entry carries a unique `commit_id` and the id of
the entry before it (`prev`). A reply lost on the way back (the PUT reached
S3, its answer did not) makes the client retry and get 412 for the writer's
*own* entry, or an error with no answer at all; either way the writer reads
entry N back and compares ids before it believes it lost, so a commit that
succeeded is never undone. `prev` chains the entries, so a replaced or
re-numbered entry is seen by the next reader, and `load` compares the
entries it could apply with the highest one listed, so a missing entry is
named instead of silently ending the log there.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import fsspec

from renkei.catalog import fs as cfs
from renkei.errors import CatalogDamaged, CatalogError, CommitOutcomeUnknown

_log = logging.getLogger(__name__)

BUCKET = 1000  # entries per log folder, to keep listings short
REPAIR_HINT = (
    "restore it from the backup (`renkei catalog restore`) or rebuild it "
    "(`renkei catalog rebuild`); `renkei catalog check` lists what is damaged"
)


def new_commit_id() -> str:
    return uuid.uuid4().hex


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
    sha256: str = ""  # of the file's bytes ("" for files written before checksums were recorded)
    size: int = -1

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "rows": self.rows, "level": self.level, "seq": self.seq}
        if self.sha256:
            data["sha256"] = self.sha256
            data["size"] = self.size
        return data

    @classmethod
    def from_record(cls, item: dict[str, Any], seq: int) -> FileEntry:
        return cls(
            str(item["path"]),
            int(item["rows"]),
            int(item.get("level", 0)),
            seq,
            str(item.get("sha256", "")),
            int(item.get("size", -1)),
        )


@dataclass
class State:
    """The catalog as of commit `seq`: live files per table and the audit chain's head."""

    seq: int = 0
    files: dict[str, dict[str, FileEntry]] = field(default_factory=dict)
    audit_count: int = 0
    audit_head: str = ""
    # files removed by compaction, with when, until vacuum deletes them
    removed: list[tuple[str, float]] = field(default_factory=list)
    last_commit: str = ""  # commit_id of entry `seq` ("" before commit ids existed)

    def copy(self) -> State:
        return State(
            self.seq,
            {t: dict(f) for t, f in self.files.items()},
            self.audit_count,
            self.audit_head,
            list(self.removed),
            self.last_commit,
        )

    def apply(self, seq: int, entry: dict[str, Any]) -> None:
        if seq != self.seq + 1:
            raise CatalogError(f"catalog log entry {seq} applied after {self.seq}: the log is damaged")
        if int(entry.get("seq", seq)) != seq:
            raise CatalogDamaged(
                f"catalog log entry {seq} says it is entry {entry.get('seq')}: the log is damaged; {REPAIR_HINT}"
            )
        prev = entry.get("prev")
        if prev is not None and self.last_commit and prev != self.last_commit:
            raise CatalogDamaged(
                f"catalog log entry {seq} does not follow entry {self.seq} "
                f"(it was written after another entry {self.seq}): the log is damaged; "
                f"{REPAIR_HINT}"
            )
        for table, added in entry.get("add", {}).items():
            live = self.files.setdefault(table, {})
            for item in added:
                live[item["path"]] = FileEntry.from_record(item, seq)
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
        self.last_commit = str(entry.get("commit_id", ""))

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "files": {t: [f.to_json() for f in files.values()] for t, files in self.files.items()},
            "audit_count": self.audit_count,
            "audit_head": self.audit_head,
            "removed": [list(r) for r in self.removed],
            "last_commit": self.last_commit,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        files = {
            t: {f["path"]: FileEntry.from_record(f, int(f["seq"])) for f in items}
            for t, items in data.get("files", {}).items()
        }
        return cls(
            int(data["seq"]),
            files,
            int(data.get("audit_count", 0)),
            str(data.get("audit_head", "")),
            [(str(p), float(t)) for p, t in data.get("removed", [])],
            str(data.get("last_commit", "")),
        )


class CommitLog:
    """Numbered entries under `<root>/_log/`, checkpoints under `<root>/_checkpoints/`."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root

    def read(self, seq: int) -> dict[str, Any] | None:
        """Entry `seq`, or None when it does not exist; CatalogDamaged when it is not a valid entry."""
        path = entry_path(self.root, seq)
        try:
            raw = cfs.read_bytes(self.fs, path)
        except FileNotFoundError:
            return None
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            raise CatalogDamaged(
                f"catalog log entry {seq} ({path}) is truncated or altered "
                f"({len(raw)} bytes, not a valid entry): {REPAIR_HINT}"
            ) from None
        return entry

    def encode(self, seq: int, entry: dict[str, Any]) -> bytes:
        return json.dumps({**entry, "seq": seq}, separators=(",", ":"), sort_keys=True).encode()

    def try_create(self, seq: int, entry: dict[str, Any], attempts: int = 5) -> bool:
        """Create entry `seq` (holding `entry["commit_id"]`); False only when another writer's entry is there.

        When the create fails without an answer, or answers "exists" (which
        is what a retried PUT whose first reply was lost gets), the entry is
        read back and its commit id decides. Raises CommitOutcomeUnknown when
        that cannot be learned: the caller must then keep its files (the
        entry may exist and refer to them).
        """
        commit_id = entry["commit_id"]
        data = self.encode(seq, entry)
        path = entry_path(self.root, seq)
        error: BaseException | None = None
        for attempt in range(attempts):
            try:
                cfs.exclusive_write(self.fs, path, data)
                return True
            except FileExistsError:
                pass
            except Exception as exc:  # storage clients raise many types; the entry may have landed
                error = exc
            try:
                found = self.read(seq)
            except CatalogDamaged:
                raise
            except Exception as exc:
                error = exc
                time.sleep(min(2.0, 0.1 * 2**attempt))
                continue
            if found is not None:
                ours = bool(found.get("commit_id") == commit_id)
                if ours and error is not None:
                    _log.info("catalog commit %d landed although its reply was lost", seq)
                return ours
            # neither created nor there: nothing landed, try again
            time.sleep(min(2.0, 0.1 * 2**attempt))
        raise CommitOutcomeUnknown(
            f"catalog commit {seq} at {self.root}: no answer from the storage and the entry could not "
            f"be read back ({error}); nothing was removed, retry later"
        )

    def latest_listed(self) -> int:
        """The highest entry number a listing shows (0 for an empty log)."""
        buckets = sorted(n for n in cfs.listdir_names(self.fs, f"{self.root}/_log") if n.isdigit())
        for bucket in reversed(buckets):
            names = [
                n
                for n in cfs.listdir_names(self.fs, f"{self.root}/_log/{bucket}")
                if n.endswith(".json") and n[:-5].isdigit()
            ]
            if names:
                return max(int(n[:-5]) for n in names)
        return 0

    def write_checkpoint(self, state: State) -> None:
        data = json.dumps(state.to_json(), separators=(",", ":")).encode()
        cfs.atomic_write(self.fs, checkpoint_path(self.root, state.seq), data)

    def latest_checkpoint(self) -> State | None:
        return self.latest_checkpoint_at_most(None)

    def latest_checkpoint_at_most(self, seq: int | None) -> State | None:
        """The newest readable checkpoint (at or before entry `seq` when given)."""
        names = sorted(
            (
                n
                for n in cfs.listdir_names(self.fs, f"{self.root}/_checkpoints")
                if n.endswith(".json") and n[:-5].isdigit() and (seq is None or int(n[:-5]) <= seq)
            ),
            reverse=True,
        )
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

    def load_until(self, seq: int) -> State:
        """The state as of entry `seq` (from the newest checkpoint before it)."""
        state = self.latest_checkpoint_at_most(seq) or State()
        while state.seq < seq:
            entry = self.read(state.seq + 1)
            if entry is None:
                raise CatalogDamaged(f"log entry {state.seq + 1} is missing at {self.root}")
            state.apply(state.seq + 1, entry)
        return state

    def load(self) -> State:
        """The latest state, from the newest checkpoint plus the entries after it.

        CatalogDamaged when an entry is missing although later ones exist
        (the log would otherwise silently end before it).
        """
        state = self.latest_checkpoint() or State()
        state = self.catch_up(state)
        listed = self.latest_listed()
        if listed > state.seq:  # a writer may have added entries meanwhile: catch up once more
            state = self.catch_up(state)
        if listed > state.seq:
            raise CatalogDamaged(
                f"catalog log entry {state.seq + 1} at {self.root} is missing, but entries up to {listed} "
                f"exist: the log is damaged; {REPAIR_HINT}"
            )
        return state
