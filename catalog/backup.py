"""The catalog can be lost: a witness outside it, backups, restore, and a full integrity check.

Every fact the DICOM objects do not hold (grants, consents, patient links,
the audit history, locations) lives only in the catalog, so the catalog is
copied to a second location (`center.catalog_backup_url`):

    <backup>/witness.json                 the last commit any writer made (seq, commit id, audit head)
    <backup>/catalog/_log/...             copies of the log entries (never overwritten)
    <backup>/catalog/_checkpoints/...
    <backup>/catalog/data/<table>/...     copies of the data files (immutable names)
    <backup>/catalog/BACKUP.json          what the last complete backup holds (seq, files, checksums)

- The **witness** is written by every writer after each commit it wins (one
  small overwrite; it may lag behind the log, never run ahead of it). It is
  the anchor outside the catalog: a catalog whose log ends before the
  witness, or whose entry at the witness's number has another commit id (a
  deleted last entry whose number was used again), or whose audit chain has
  fewer events, is damaged, and `load`, `audit verify` and `check` say so.
- A **backup** is incremental: files are immutable under unique names, so it
  copies the entries and live data files it does not have yet, each checked
  against the checksum its log entry recorded (a damaged file is never backed
  up over a good copy), then writes BACKUP.json last.
- **restore** repairs the catalog from the backup: missing or altered entries
  and data files are copied back; later entries the backup does not have are
  kept when they and their files are intact, and set aside otherwise (the
  studies they registered come back with `renkei catalog rebuild`).
- **check** reads everything: each entry (valid, numbered, chained), each live
  data file against its SHA-256, the checkpoints, and the witness.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import fsspec

from renkei.catalog import audit as audit_mod
from renkei.catalog import fs as cfs
from renkei.catalog.log import BUCKET, REPAIR_HINT, CommitLog, State, checkpoint_path, entry_path
from renkei.errors import CatalogDamaged, CatalogError

_log = logging.getLogger(__name__)


class CatalogFiles(Protocol):
    """What backup and check read of a catalog (a Catalog or its TableEngine): its storage and state."""

    @property
    def url(self) -> str: ...

    @property
    def fs(self) -> fsspec.AbstractFileSystem: ...

    @property
    def root(self) -> str: ...

    def refresh(self) -> State: ...


WITNESS = "witness.json"
MIRROR = "catalog"
MANIFEST = "BACKUP.json"


@dataclass
class BackupResult:
    """What one backup copied, and what it holds now."""

    seq: int
    entries_copied: int = 0
    files_copied: int = 0
    bytes_copied: int = 0
    files_pruned: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RestoreResult:
    """What a restore repaired and what it could not keep."""

    seq: int
    backup_seq: int
    entries_restored: int = 0
    files_restored: int = 0
    entries_set_aside: list[int] = field(default_factory=list)
    events_lost: int = 0
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class CheckResult:
    """The catalog read end to end: entries, data files, checkpoints, witness."""

    ok: bool
    entries: int
    files: int
    bytes: int
    problems: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BackupLocation:
    """The catalog's second location: a folder or s3://bucket/prefix (another bucket, ideally)."""

    def __init__(self, url: str, s3_options: Any = None) -> None:
        self.url = url
        self.fs, self.root = cfs.open_filesystem(url, s3_options)
        self.mirror_root = cfs.join(self.root, MIRROR)
        self.log = CommitLog(self.fs, self.mirror_root)

    # ------------------------------------------------------------ witness
    def read_witness(self) -> dict[str, Any] | None:
        try:
            data = json.loads(cfs.read_bytes(self.fs, cfs.join(self.root, WITNESS)))
        except FileNotFoundError:
            return None
        except ValueError:
            raise CatalogDamaged(f"the catalog's witness at {self.url} is not valid JSON") from None
        return data if isinstance(data, dict) else None

    def write_witness(self, state: State, catalog_url: str, restored: dict[str, Any] | None = None) -> None:
        previous = None
        if restored is not None:
            try:
                previous = self.read_witness()
            except CatalogDamaged:
                previous = None
        data: dict[str, Any] = {
            "seq": state.seq,
            "commit_id": state.last_commit,
            "audit_count": state.audit_count,
            "audit_head": state.audit_head,
            "time": time.time(),
            "catalog": catalog_url,
        }
        history = list((previous or {}).get("restores", []))
        if restored is not None:
            history.append(restored)
            data["restores"] = history[-20:]
        cfs.atomic_write(
            self.fs,
            cfs.join(self.root, WITNESS),
            json.dumps(data, separators=(",", ":")).encode(),
            fsync=restored is not None,
        )

    def manifest(self) -> dict[str, Any] | None:
        try:
            data = json.loads(cfs.read_bytes(self.fs, cfs.join(self.mirror_root, MANIFEST)))
        except FileNotFoundError:
            return None
        except ValueError:
            raise CatalogDamaged(f"the backup's manifest at {self.url} is not valid JSON: take a new backup") from None
        return data if isinstance(data, dict) else None

    def _listed_entries(self) -> set[int]:
        found: set[int] = set()
        for bucket in cfs.listdir_names(self.fs, f"{self.mirror_root}/_log"):
            if not bucket.isdigit():
                continue
            for name in cfs.listdir_names(self.fs, f"{self.mirror_root}/_log/{bucket}"):
                if name.endswith(".json") and name[:-5].isdigit():
                    found.add(int(name[:-5]))
        return found


def witness_problems(log: CommitLog, state: State, witness: dict[str, Any] | None) -> list[str]:
    """What the witness says is missing from the catalog whose log gives `state`."""
    if not witness:
        return []
    problems = []
    w_seq = int(witness.get("seq", 0))
    when = dt.datetime.fromtimestamp(float(witness.get("time", 0)), dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if w_seq > state.seq:
        problems.append(
            f"the catalog's log ends at entry {state.seq}, but entry {w_seq} had been committed "
            f"(witness of {when}): entries {state.seq + 1}..{w_seq} are missing"
        )
    elif w_seq and witness.get("commit_id"):
        entry = log.read(w_seq)
        if entry is None:
            problems.append(f"catalog log entry {w_seq} is missing (the witness of {when} records it)")
        elif entry.get("commit_id") != witness["commit_id"]:
            problems.append(
                f"catalog log entry {w_seq} is not the one committed as {w_seq} (witness of {when}): "
                "the log was cut back and its numbers used again"
            )
    if int(witness.get("audit_count", 0)) > state.audit_count:
        problems.append(
            f"the audit chain holds {state.audit_count} events, but {witness['audit_count']} had been "
            f"committed (witness of {when}): events were lost"
        )
    return problems


# ---------------------------------------------------------------- backup
def backup(catalog: CatalogFiles, location: BackupLocation, prune: bool = True) -> BackupResult:
    """Copy what the backup lacks: log entries, checkpoints, live data files (each checked). Incremental."""
    started = time.monotonic()
    state = catalog.refresh()
    result = BackupResult(seq=state.seq)
    have = location._listed_entries()
    for seq in range(1, state.seq + 1):
        if seq in have:
            continue
        src = entry_path(catalog.root, seq)
        if not cfs.exists(catalog.fs, src):
            continue  # before a checkpoint and gone: the checkpoint covers it (check reports it)
        raw = cfs.read_bytes(catalog.fs, src)
        cfs.atomic_write(location.fs, entry_path(location.mirror_root, seq), raw, fsync=False)
        result.entries_copied += 1
    for name in cfs.listdir_names(catalog.fs, f"{catalog.root}/_checkpoints"):
        if not (name.endswith(".json") and name[:-5].isdigit()):
            continue
        dst = checkpoint_path(location.mirror_root, int(name[:-5]))
        if not cfs.exists(location.fs, dst):
            cfs.copy_file(catalog.fs, f"{catalog.root}/_checkpoints/{name}", location.fs, dst)
    old = location.manifest() or {}
    backed: dict[str, list[Any]] = dict(old.get("files", {}))
    live = {f.path: (t, f) for t, files in state.files.items() for f in files.values()}
    for rel, (table, entry) in sorted(live.items()):
        if rel in backed and (not entry.sha256 or backed[rel][0] == entry.sha256):
            continue
        dst = cfs.join(location.mirror_root, rel)
        digest, size = cfs.copy_file(catalog.fs, cfs.join(catalog.root, rel), location.fs, dst)
        if entry.sha256 and digest != entry.sha256:
            _remove(location.fs, dst)
            raise CatalogDamaged(
                f"catalog data file {rel} (table {table}) is altered, so it was not backed up: {REPAIR_HINT}"
            )
        backed[rel] = [digest, size]
        result.files_copied += 1
        result.bytes_copied += size
    if prune:  # files that are no longer live in the backed-up state
        for rel in [r for r in backed if r not in live]:
            _remove(location.fs, cfs.join(location.mirror_root, rel))
            del backed[rel]
            result.files_pruned += 1
    manifest = {
        "seq": state.seq,
        "commit_id": state.last_commit,
        "audit_count": state.audit_count,
        "audit_head": state.audit_head,
        "time": time.time(),
        "catalog": catalog.url,
        "files": backed,
    }
    cfs.atomic_write(
        location.fs, cfs.join(location.mirror_root, MANIFEST), json.dumps(manifest, separators=(",", ":")).encode()
    )
    result.seconds = round(time.monotonic() - started, 3)
    return result


def _remove(fs: Any, path: str) -> None:
    try:
        if cfs.is_local(fs):
            os.unlink(path)
        else:
            fs.rm_file(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- restore
def restore(catalog_fs: Any, catalog_root: str, catalog_url: str, location: BackupLocation) -> RestoreResult:
    """Repair the catalog at `catalog_root` from the backup (see the module's docstring)."""
    manifest = location.manifest()
    if manifest is None:
        raise CatalogError(
            f"there is no catalog backup at {location.url}: nothing to restore from "
            "(`renkei catalog rebuild` rebuilds from the objects alone)"
        )
    b_seq = int(manifest["seq"])
    result = RestoreResult(seq=b_seq, backup_seq=b_seq)
    clog = CommitLog(catalog_fs, catalog_root)
    # 1. entries 1..b_seq: the backup's copies where the catalog's are missing or differ
    have = location._listed_entries()
    for seq in range(1, b_seq + 1):
        if seq not in have:
            continue
        good = cfs.read_bytes(location.fs, entry_path(location.mirror_root, seq))
        dst = entry_path(catalog_root, seq)
        try:
            current = cfs.read_bytes(catalog_fs, dst)
        except FileNotFoundError:
            current = None
        if current != good:
            cfs.atomic_write(catalog_fs, dst, good)
            result.entries_restored += 1
    # 2. checkpoints: drop unreadable ones, bring back the backup's
    for name in cfs.listdir_names(catalog_fs, f"{catalog_root}/_checkpoints"):
        if not (name.endswith(".json") and name[:-5].isdigit()):
            continue
        path = f"{catalog_root}/_checkpoints/{name}"
        try:
            State.from_json(json.loads(cfs.read_bytes(catalog_fs, path)))
        except (ValueError, KeyError, TypeError):
            _remove(catalog_fs, path)
    for name in cfs.listdir_names(location.fs, f"{location.mirror_root}/_checkpoints"):
        if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) <= b_seq:
            dst = checkpoint_path(catalog_root, int(name[:-5]))
            if not cfs.exists(catalog_fs, dst):
                cfs.copy_file(location.fs, f"{location.mirror_root}/_checkpoints/{name}", catalog_fs, dst)
    # 3. the state at the backup, then the catalog's later entries while they and their files hold
    state = location.log.load_until(b_seq)
    backed: dict[str, list[Any]] = manifest.get("files", {})
    state = _restore_files(catalog_fs, catalog_root, location, state, backed, result)
    later = _later_entries(clog, catalog_fs, catalog_root)
    for seq in later:
        try:
            entry = clog.read(seq)
            if entry is None:
                raise CatalogDamaged(f"entry {seq} is missing")
            trial = state.copy()
            trial.apply(seq, entry)
            for table, added in entry.get("add", {}).items():
                for item in added:
                    _check_remote(catalog_fs, catalog_root, table, item)
        except (CatalogDamaged, CatalogError, ValueError, KeyError) as exc:
            result.problems.append(f"entry {seq} and after were set aside: {exc}")
            break
        state = trial
    kept_until = state.seq
    for seq in [s for s in later if s > kept_until]:
        src = entry_path(catalog_root, seq)
        try:
            raw = cfs.read_bytes(catalog_fs, src)
        except FileNotFoundError:
            continue
        cfs.atomic_write(catalog_fs, f"{catalog_root}/_damaged/{int(time.time())}/{seq:012d}.json", raw)
        _remove(catalog_fs, src)
        result.entries_set_aside.append(seq)
    for name in cfs.listdir_names(catalog_fs, f"{catalog_root}/_checkpoints"):
        if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) > kept_until:
            _remove(catalog_fs, f"{catalog_root}/_checkpoints/{name}")
    result.seq = kept_until
    # 4. the anchors: in the catalog, and the witness (recording what was lost, if anything)
    witness = location.read_witness() or {}
    result.events_lost = max(0, int(witness.get("audit_count", 0)) - state.audit_count)
    cfs.atomic_write(
        catalog_fs,
        cfs.join(catalog_root, audit_mod.ANCHOR),
        json.dumps({"count": state.audit_count, "head": state.audit_head, "seq": state.seq}).encode(),
    )
    lost = int(witness.get("seq", 0)) > state.seq or result.events_lost
    location.write_witness(
        state,
        catalog_url,
        restored={
            "at": time.time(),
            "from_seq": int(witness.get("seq", state.seq)),
            "to_seq": state.seq,
            "events_lost": result.events_lost,
            "entries_restored": result.entries_restored,
            "files_restored": result.files_restored,
        }
        if (lost or result.entries_restored or result.files_restored)
        else None,
    )
    return result


def _later_entries(clog: CommitLog, fs: Any, root: str) -> list[int]:
    found = []
    for bucket in cfs.listdir_names(fs, f"{root}/_log"):
        if bucket.isdigit():
            for name in cfs.listdir_names(fs, f"{root}/_log/{bucket}"):
                if name.endswith(".json") and name[:-5].isdigit():
                    found.append(int(name[:-5]))
    return sorted(found)


def _check_remote(fs: Any, root: str, table: str, item: dict[str, Any]) -> None:
    path = cfs.join(root, item["path"])
    try:
        digest, size = cfs.sha256_of(fs, path)
    except FileNotFoundError:
        raise CatalogDamaged(f"its data file {item['path']} (table {table}) is missing") from None
    if item.get("sha256") and digest != item["sha256"]:
        raise CatalogDamaged(f"its data file {item['path']} (table {table}) is altered")


def _restore_files(
    fs: Any, root: str, location: BackupLocation, state: State, backed: dict[str, list[Any]], result: RestoreResult
) -> State:
    for table, files in state.files.items():
        for rel, fe in files.items():
            path = cfs.join(root, rel)
            expected = fe.sha256 or (backed.get(rel) or [""])[0]
            try:
                digest, _size = cfs.sha256_of(fs, path)
                if not expected or digest == expected:
                    continue
            except FileNotFoundError:
                pass
            if rel not in backed:
                raise CatalogDamaged(
                    f"catalog data file {rel} (table {table}) is damaged and not in the backup at "
                    f"{location.url}: rebuild the catalog (`renkei catalog rebuild`)"
                )
            digest, _size = cfs.copy_file(location.fs, cfs.join(location.mirror_root, rel), fs, path)
            if expected and digest != expected:
                _remove(fs, path)
                raise CatalogDamaged(
                    f"the backup's copy of {rel} (table {table}) is damaged too: rebuild the "
                    "catalog (`renkei catalog rebuild`)"
                )
            result.files_restored += 1
    return state


# ---------------------------------------------------------------- check
def check(catalog: CatalogFiles, location: BackupLocation | None = None) -> CheckResult:
    """Read the whole catalog: every log entry, every live data file, the checkpoints and the witness."""
    started = time.monotonic()
    fs, root = catalog.fs, catalog.root
    log = CommitLog(fs, root)
    problems: list[str] = []
    listed = _later_entries(log, fs, root)
    last = max(listed) if listed else 0
    checkpoints = sorted(
        int(n[:-5]) for n in cfs.listdir_names(fs, f"{root}/_checkpoints") if n.endswith(".json") and n[:-5].isdigit()
    )
    state = State()
    entries = 0
    present = set(listed)
    for seq in range(1, last + 1):
        if seq not in present:
            covered = any(c >= seq for c in checkpoints)
            problems.append(
                f"log entry {seq} is missing"
                + (" (a checkpoint covers it)" if covered else f" and entries up to {last} exist")
            )
            if covered:
                cp = log.latest_checkpoint_at_most(max(c for c in checkpoints if c >= seq))
                if cp is not None and cp.seq >= seq:
                    state = cp
                    continue
            break
        if seq <= state.seq:
            continue
        try:
            entry = log.read(seq)
            assert entry is not None
            state.apply(seq, entry)
            entries += 1
        except (CatalogError, ValueError, KeyError) as exc:
            problems.append(f"log entry {seq}: {exc}")
            break
    for n in checkpoints:
        try:
            State.from_json(json.loads(cfs.read_bytes(fs, checkpoint_path(root, n))))
        except (ValueError, KeyError, TypeError, FileNotFoundError):
            problems.append(f"checkpoint {n} is unreadable (readers skip it)")
    n_files = 0
    n_bytes = 0
    for table, files in state.files.items():
        for rel, fe in files.items():
            n_files += 1
            try:
                digest, size = cfs.sha256_of(fs, cfs.join(root, rel))
            except FileNotFoundError:
                problems.append(f"data file {rel} (table {table}, commit {fe.seq}) is missing")
                continue
            n_bytes += size
            if fe.sha256 and (digest != fe.sha256 or size != fe.size):
                problems.append(
                    f"data file {rel} (table {table}, commit {fe.seq}) is "
                    + ("truncated" if size < fe.size else "altered")
                    + f" ({size} bytes, recorded {fe.size}; SHA-256 differs)"
                )
    if location is not None:
        try:
            problems.extend(witness_problems(log, state, location.read_witness()))
        except CatalogError as exc:
            problems.append(str(exc))
    return CheckResult(not problems, entries, n_files, n_bytes, problems, round(time.monotonic() - started, 3))


__all__ = [
    "BUCKET",
    "BackupLocation",
    "BackupResult",
    "CheckResult",
    "RestoreResult",
    "backup",
    "check",
    "restore",
    "witness_problems",
]
