"""The edge's journal: local index of every stored instance, and the outbox.

SQLite in WAL mode, one file beside the instances (`<store>/journal.sqlite`).
Why SQLite and not DuckDB: the edge writes one small transaction per received
instance (fsynced before the C-STORE is answered) while other processes (the
Prefect flows of later issues, `renkei edge status`) read it and mark upload
states. SQLite's WAL gives one writer plus any number of concurrent readers
across processes, with row-sized durable commits in well under a millisecond;
DuckDB holds an exclusive file lock for a writer, so those other processes
could not even open it while the edge runs, and it is built for analytics, not
thousands of tiny transactions.

Text attributes are stored decoded (unicode) with the dataset's Specific
Character Set beside them, so queries compare unicode and answers can be
encoded back in the data's own character set.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from renkei.edge.clock import QuietClock, wall_time
from renkei.edge.parsing import ParsedInstance
from renkei.errors import RenkeiError, StorageError
from renkei.records import InstanceInfo, StudyInfo, names

JOURNAL_NAME = "journal.sqlite"
UPLOAD_STATES: tuple[str, ...] = ("pending", "uploaded", "verified")
# 4: the quarantine table; 5: studies' quiet-clock readings (last_clock, announced_clock).
# An older journal is migrated when opened writable; opened read-only it is read as it is.
SCHEMA_VERSION = "5"
HEARTBEAT_CLOCK = "edge_clock"  # meta: the running edge's quiet clock (see edge.clock), every few seconds
HEARTBEAT_WALL = "edge_heartbeat"  # meta: the edge's wall clock at that heartbeat (liveness, for people)
QUARANTINE_REASON_MAX = 500  # characters kept of a reason (it is shown and audited)

# keyword -> column, per table (the table of attributes: renkei.records.ATTRIBUTES)
STUDY_COLUMNS: dict[str, str] = {"StudyInstanceUID": "study_uid", **names("PATIENT"), **names("STUDY")}
SERIES_COLUMNS: dict[str, str] = names("SERIES")
INSTANCE_COLUMNS: dict[str, str] = names("IMAGE")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS studies (
    {", ".join(f"{c} TEXT NOT NULL DEFAULT ''" for c in STUDY_COLUMNS.values() if c != "study_uid")},
    study_uid TEXT PRIMARY KEY,
    specific_character_set TEXT NOT NULL DEFAULT '',
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    completed_at REAL,
    last_clock REAL,
    announced_clock REAL
);
CREATE INDEX IF NOT EXISTS studies_patient ON studies (patient_id);
CREATE INDEX IF NOT EXISTS studies_last_received ON studies (last_received);
CREATE TABLE IF NOT EXISTS series (
    {", ".join(f"{c} TEXT NOT NULL DEFAULT ''" for c in SERIES_COLUMNS.values() if c != "series_uid")},
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    specific_character_set TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS series_study ON series (study_uid);
CREATE TABLE IF NOT EXISTS instances (
    {", ".join(f"{c} TEXT NOT NULL DEFAULT ''" for c in INSTANCE_COLUMNS.values() if c != "sop_instance_uid")},
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    specific_character_set TEXT NOT NULL DEFAULT '',
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    upload_state TEXT NOT NULL DEFAULT 'pending'
        CHECK (upload_state IN ('pending', 'uploaded', 'verified')),
    object_key TEXT,
    local INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS instances_study ON instances (study_uid);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_uid);
CREATE INDEX IF NOT EXISTS instances_state ON instances (upload_state);
CREATE TABLE IF NOT EXISTS conflicts (
    id INTEGER PRIMARY KEY,
    sop_instance_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    existing_sha256 TEXT NOT NULL,
    received_sha256 TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    UNIQUE (sop_instance_uid, received_sha256)
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    reason TEXT NOT NULL,
    step TEXT NOT NULL DEFAULT '',
    sop_instance_uids TEXT NOT NULL DEFAULT '[]',
    quarantined_at REAL NOT NULL,
    audited_at REAL,
    released_at REAL,
    released_by TEXT NOT NULL DEFAULT '',
    release_audited_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS quarantine_active ON quarantine (study_uid) WHERE released_at IS NULL;
"""


# The statements of `record_instance`, written once (sqlite3 then finds each prepared in its cache).
_INSERT_INSTANCE = (
    f"INSERT INTO instances ({', '.join(INSTANCE_COLUMNS.values())}, study_uid, series_uid, "
    "transfer_syntax_uid, specific_character_set, path, size, sha256, "
    f"calling_ae, received_at) VALUES ({', '.join('?' * (len(INSTANCE_COLUMNS) + 9))})"
)
_INSERT_SERIES = (
    f"INSERT INTO series ({', '.join(SERIES_COLUMNS.values())}, study_uid, specific_character_set) "
    f"VALUES ({', '.join('?' * (len(SERIES_COLUMNS) + 2))}) ON CONFLICT (series_uid) DO NOTHING"
)
_UPSERT_STUDY = (
    f"INSERT INTO studies ({', '.join(STUDY_COLUMNS.values())}, specific_character_set, "
    f"first_received, last_received, last_clock) VALUES ({', '.join('?' * (len(STUDY_COLUMNS) + 4))}) "
    "ON CONFLICT (study_uid) DO UPDATE SET last_received = "
    "max(studies.last_received, excluded.last_received), last_clock = "
    "coalesce(max(studies.last_clock, excluded.last_clock), excluded.last_clock, studies.last_clock)"
)


class JournalError(StorageError):
    """The edge's journal could not be read or written."""


@dataclass(frozen=True)
class JournalEntry:
    """One journaled instance: what it is, where its file is, and its upload state."""

    instance: InstanceInfo
    path: Path
    upload_state: str
    received_at: float
    calling_ae: str
    object_key: str | None = None
    local: bool = True


@dataclass(frozen=True)
class StoredInstance:
    """What the journal knows of an instance already stored (for duplicate checks)."""

    sop_instance_uid: str
    sha256: str  # of the stored file (File Meta + the dataset as received)
    path: str
    local: bool


@dataclass(frozen=True)
class Conflict:
    """A different instance received under a SOP Instance UID already stored.

    The digests are the SHA-256 of the two stored files.
    """

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    existing_sha256: str
    received_sha256: str
    path: Path
    size: int
    calling_ae: str
    received_at: float


@dataclass(frozen=True)
class Quarantine:
    """A study held out of the sync until an operator releases it: why, since when, which instances.

    `step` is where it was stopped ('upload', 'register'); `sop_instance_uids`
    the instances found at fault (empty when the whole study was refused).
    """

    id: int
    study_uid: str
    reason: str
    step: str
    sop_instance_uids: tuple[str, ...]
    quarantined_at: float
    audited_at: float | None = None
    released_at: float | None = None
    released_by: str = ""
    release_audited_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass(frozen=True)
class JournalSummary:
    studies: int
    instances: int
    bytes: int
    upload_states: dict[str, int]
    conflicts: int
    quarantined: int = 0  # studies held in quarantine now


def _int_or_none(value: str) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


class Journal:
    """The journal of one edge store. Safe to open from several processes at once."""

    def __init__(
        self,
        store_dir: Path,
        readonly: bool = False,
        synchronous: str = "FULL",
        on_full: Callable[[], bool] | None = None,
    ) -> None:
        """Open the journal of the store at `store_dir`.

        `on_full` is called when SQLite finds the disk full (while opening,
        migrating, writing or checkpointing); when it returns True (it freed
        space: the edge releases its journal reserve) the operation is tried once more.
        """
        self.store_dir = Path(store_dir)
        self.path = self.store_dir / JOURNAL_NAME
        self.readonly = readonly
        self.on_full = on_full
        self.quiet_clock: QuietClock | None = None  # set by the running edge (EdgeServer.start)
        self._lock = threading.RLock()
        self._clock_columns = False
        if not readonly:
            self.store_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._connect(synchronous)
        except sqlite3.Error as exc:
            if not self._make_room(exc):
                raise JournalError(f"{self.path}: cannot open the journal: {exc}") from None
            try:
                self._conn.close()
            except (AttributeError, sqlite3.Error):
                pass
            try:
                self._connect(synchronous)
            except sqlite3.Error as again:
                raise JournalError(f"{self.path}: cannot open the journal: {again}") from None

    def _connect(self, synchronous: str) -> None:
        """Connect, set WAL mode and synchronous, create or migrate the schema (writable)."""
        readonly = self.readonly
        if readonly:
            uri = f"file:{self.path}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30)
        else:
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA busy_timeout = 30000")
        self._refuse_newer_schema()
        if not readonly:
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"{self.path}: cannot switch the journal to WAL mode")
            # FULL fsyncs every commit. The edge's own connection uses NORMAL: a
            # commit survives a crash of the process (kill -9), and after a power
            # loss the last commits are rebuilt from the fsynced files (see
            # Ingestor.recover), so an acknowledged instance is never lost.
            if synchronous.upper() not in ("FULL", "NORMAL"):
                raise JournalError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
            self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._conn.executescript(_SCHEMA)
            # schema 5: an older journal's studies gain their quiet-clock columns (NULL: judged by
            # wall time until an edge adopts them, see adopt_unclocked)
            columns = {r[1] for r in self._conn.execute("PRAGMA table_info(studies)")}
            for column in ("last_clock", "announced_clock"):
                if column not in columns:
                    try:
                        self._conn.execute(f"ALTER TABLE studies ADD COLUMN {column} REAL")
                    except sqlite3.OperationalError as exc:
                        if "duplicate column" not in str(exc):  # another process migrated it meanwhile
                            raise
            self._conn.execute("CREATE INDEX IF NOT EXISTS studies_last_clock ON studies (last_clock)")
            self._conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (SCHEMA_VERSION,),
            )
            # an older journal got the new tables from _SCHEMA (CREATE ... IF NOT EXISTS)
            self._conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
                (SCHEMA_VERSION, int(SCHEMA_VERSION)),
            )
        self._clock_columns = self._has_clock_columns()

    def _refuse_newer_schema(self) -> None:
        """A journal written by a newer renkei is refused, not misread (after a downgrade)."""
        assert self._conn is not None
        has_meta = self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        if not has_meta:
            return
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is not None and str(row[0]).isdigit() and int(row[0]) > int(SCHEMA_VERSION):
            self._conn.close()
            raise JournalError(
                f"{self.path}: this journal was written by a newer renkei (schema {row[0]}; this "
                f"one knows {SCHEMA_VERSION}): install that version again (git checkout, make venv)"
            )

    # -- opening -------------------------------------------------------------
    @classmethod
    def open(cls, store_dir: Path | str, readonly: bool = False) -> Journal:
        """Open (creating if needed) the journal of the edge store at `store_dir`."""
        return cls(Path(store_dir), readonly=readonly)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level -----------------------------------------------------------
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: query failed: {exc}") from None

    def _write(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        """Run the statements in one transaction; a full disk is retried once after `on_full` made room."""
        statements = list(statements)
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                    try:
                        for sql, params in statements:
                            self._conn.execute(sql, params)
                        self._conn.execute("COMMIT")
                    except BaseException:
                        self._rollback()  # also after a failed COMMIT (SQLITE_FULL may leave it open)
                        raise
                    return
                except sqlite3.IntegrityError:
                    raise
                except sqlite3.Error as exc:
                    if attempt == 1 and self._make_room(exc):
                        continue
                    raise JournalError(f"{self.path}: write failed: {exc}") from None

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _make_room(self, exc: sqlite3.Error) -> bool:
        """On a full disk, ask `on_full` to free space; True when the operation should be tried again."""
        if self.on_full is None:
            return False
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # the primary result code
        full = code == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
        if not full and (code == sqlite3.SQLITE_IOERR or "disk I/O error" in str(exc)):
            # a -shm or -wal file that could not be extended is reported as an I/O error
            try:
                stat = os.statvfs(self.store_dir)
                full = stat.f_bavail * stat.f_frsize < 1 << 20
            except OSError:
                full = False
        if not full:
            return False
        try:
            return bool(self.on_full())
        except Exception:
            return False

    # -- bookkeeping -----------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def set_meta(self, key: str, value: str, durable: bool = True) -> None:
        """Set a bookkeeping value; `durable` checkpoints the WAL into the fsynced database."""
        self._write(
            [
                (
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) "
                    "DO UPDATE SET value = excluded.value",
                    (key, value),
                )
            ]
        )
        if durable:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and fsync it."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(FULL)")
                    return
                except sqlite3.Error as exc:
                    if attempt == 1 and self._make_room(exc):
                        continue
                    raise JournalError(f"{self.path}: checkpoint failed: {exc}") from None

    # -- the edge's quiet clock (see edge.clock) -----------------------------------
    def _has_clock_columns(self) -> bool:
        # a journal from before schema 5 opened read-only has no clock columns (a writable open adds them)
        return any(r[1] == "last_clock" for r in self._conn.execute("PRAGMA table_info(studies)"))

    def heartbeat(self, clock: float, wall: float | None = None) -> None:
        """The running edge's quiet clock (and its wall clock, for liveness), every few seconds."""
        wall = wall_time() if wall is None else wall
        upsert = "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        self._write([(upsert, (HEARTBEAT_CLOCK, repr(float(clock)))), (upsert, (HEARTBEAT_WALL, repr(float(wall))))])

    def stored_clock(self) -> float | None:
        """The edge's quiet clock at its last heartbeat; None if no edge ever kept one here."""
        value = self.get_meta(HEARTBEAT_CLOCK)
        return float(value) if value is not None else None

    def last_heartbeat(self) -> float | None:
        """The edge's wall clock at its last heartbeat (on the edge's clock: compare with care)."""
        value = self.get_meta(HEARTBEAT_WALL)
        return float(value) if value is not None else None

    def clock_now(self) -> float | None:
        """The edge's quiet clock: live in the edge's own process, else its last heartbeat."""
        if self.quiet_clock is not None:
            return self.quiet_clock.now()
        return self.stored_clock() if self._clock_columns else None

    def resume_clock(self) -> float:
        """Where the quiet clock goes on at an edge's start: past its last heartbeat and past every
        reading journaled (instances received after the last heartbeat, before a crash)."""
        stored = self.stored_clock() or 0.0
        rows = self._query("SELECT max(last_clock) AS m FROM studies")
        latest = rows[0]["m"] if rows and rows[0]["m"] is not None else 0.0
        return max(stored, float(latest))

    def adopt_unclocked(self, clock: float) -> int:
        """Give studies journaled without a quiet-clock reading (before schema 5, or by a tool) this one.

        They count as received now: they complete `stable_age` later on the edge's clock. One
        already announced stays announced. Returns how many.
        """
        with self._lock:
            before = self._conn.total_changes
            self._write(
                [
                    (
                        "UPDATE studies SET last_clock = ?, announced_clock = CASE WHEN completed_at IS NOT NULL "
                        "AND completed_at >= last_received THEN ? ELSE NULL END WHERE last_clock IS NULL",
                        (clock, clock),
                    )
                ]
            )
            return self._conn.total_changes - before

    # -- ingest (the edge's own writes) ----------------------------------------
    def lookup(self, sop_instance_uid: str) -> StoredInstance | None:
        rows = self._query(
            "SELECT sop_instance_uid, sha256, path, local FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        if not rows:
            return None
        r = rows[0]
        return StoredInstance(r["sop_instance_uid"], r["sha256"], r["path"], bool(r["local"]))

    def record_instance(
        self,
        parsed: ParsedInstance,
        transfer_syntax_uid: str,
        path: str,
        size: int,
        sha256: str,
        calling_ae: str,
        received_at: float | None = None,
        clock: float | None = None,
    ) -> None:
        """Commit one stored instance (and its series and study) in one durable transaction.

        `sha256` is the stored file's: what identifies the instance and what the
        center verifies end to end. `received_at` is the edge's wall clock,
        `clock` its quiet clock (default: the running edge's; none without one).

        Raises sqlite3.IntegrityError when the SOP Instance UID is already journaled.
        """
        now = wall_time() if received_at is None else received_at
        if clock is None and self.quiet_clock is not None:
            clock = self.quiet_clock.now()
        attrs = parsed.attributes
        get = attrs.get
        charset = parsed.specific_character_set
        self._write(
            (
                (
                    _INSERT_INSTANCE,
                    [
                        *[get(k, "") for k in INSTANCE_COLUMNS],
                        parsed.study_uid,
                        parsed.series_uid,
                        transfer_syntax_uid,
                        charset,
                        path,
                        size,
                        sha256,
                        calling_ae,
                        now,
                    ],
                ),
                (_INSERT_SERIES, [*[get(k, "") for k in SERIES_COLUMNS], parsed.study_uid, charset]),
                (_UPSERT_STUDY, [*[get(k, "") for k in STUDY_COLUMNS], charset, now, now, clock]),
            )
        )

    def has_study(self, study_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)))

    def has_series(self, series_uid: str) -> bool:
        return bool(self._query("SELECT 1 FROM series WHERE series_uid = ?", (series_uid,)))

    def restore_local(self, sop_instance_uid: str, path: str) -> None:
        """An identical instance came back after its local copy was removed: keep it again."""
        self._write(
            [
                (
                    "UPDATE instances SET local = 1, path = ? WHERE sop_instance_uid = ?",
                    (path, sop_instance_uid),
                )
            ]
        )

    def record_conflict(
        self,
        parsed: ParsedInstance,
        existing_sha256: str,
        received_sha256: str,
        path: str,
        size: int,
        calling_ae: str,
        received_at: float | None = None,
    ) -> bool:
        """Record a conflicting instance; False when that exact conflict was recorded before."""
        now = wall_time() if received_at is None else received_at
        try:
            self._write(
                [
                    (
                        "INSERT INTO conflicts (sop_instance_uid, study_uid, series_uid, existing_sha256, "
                        "received_sha256, path, size, calling_ae, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                        (
                            parsed.sop_instance_uid,
                            parsed.study_uid,
                            parsed.series_uid,
                            existing_sha256,
                            received_sha256,
                            path,
                            size,
                            calling_ae,
                            now,
                        ),
                    )
                ]
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def known_paths(self) -> set[str]:
        return {r["path"] for r in self._query("SELECT path FROM instances")} | {
            r["path"] for r in self._query("SELECT path FROM conflicts")
        }

    # -- API for the flows -----------------------------------------------------
    def completed_studies(
        self, stable_age: float, now: float | None = None, state: str | None = "pending"
    ) -> list[str]:
        """Study UIDs with no instance received for `stable_age` seconds, oldest first.

        Quiet is judged on the edge's own quiet clock (see edge.clock): a study
        is complete when its last instance's reading is at least `stable_age`
        below the edge's clock (live in the edge's process, else its last
        heartbeat: a stopped edge's studies are judged as of its stop). Never
        against this process's clock, which may be another machine's. Studies
        journaled with no reading (by a tool, or before schema 5, until an edge
        adopts them) are judged by wall time, as they always were.

        With `now` (seconds on the edge's wall clock; for tools and tests), every
        study is judged by `last_received <= now - stable_age` instead.

        With `state`, only studies having at least one instance in that upload
        state. A late instance moves a study's last-received time, so a study
        already completed (and uploaded) comes back with its new instance pending.
        """
        quiet, params = self._quiet("s", stable_age, now)
        if state is not None:
            _check_state(state)
            rows = self._query(
                f"SELECT s.study_uid FROM studies s WHERE {quiet} AND EXISTS "
                "(SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid AND i.upload_state = ?) "
                "ORDER BY s.last_received, s.study_uid",
                (*params, state),
            )
        else:
            rows = self._query(
                f"SELECT s.study_uid FROM studies s WHERE {quiet} ORDER BY s.last_received, s.study_uid",
                params,
            )
        return [r["study_uid"] for r in rows]

    def _quiet(self, alias: str, stable_age: float, now: float | None) -> tuple[str, tuple[float, ...]]:
        """SQL condition (and parameters) for 'no instance for stable_age seconds' (see completed_studies)."""
        if now is not None or not self._clock_columns:
            wall = wall_time() if now is None else now
            return f"{alias}.last_received <= ?", (wall - stable_age,)
        clock = self.clock_now()
        clock_cutoff = clock - stable_age if clock is not None else float("-inf")
        return (
            f"(({alias}.last_clock IS NOT NULL AND {alias}.last_clock <= ?) OR "
            f"({alias}.last_clock IS NULL AND {alias}.last_received <= ?))",
            (clock_cutoff, wall_time() - stable_age),
        )

    def newly_completed(self, stable_age: float, clock: float | None = None) -> list[str]:
        """Studies complete since their last instance and not yet announced (see mark_announced).

        `clock` is a reading of the edge's quiet clock (default: `clock_now()`);
        without any, wall time and `completed_at` decide, as before schema 5.
        """
        clock = self.clock_now() if clock is None else clock
        if clock is None or not self._clock_columns:
            rows = self._query(
                "SELECT study_uid FROM studies WHERE last_received <= ? AND "
                "(completed_at IS NULL OR completed_at < last_received) ORDER BY last_received",
                (wall_time() - stable_age,),
            )
        else:  # a study journaled meanwhile with no reading (by a tool) is judged by wall time
            rows = self._query(
                "SELECT study_uid FROM studies WHERE (last_clock <= ? AND "
                "(announced_clock IS NULL OR announced_clock < last_clock)) OR (last_clock IS NULL AND "
                "last_received <= ? AND (completed_at IS NULL OR completed_at < last_received)) "
                "ORDER BY last_clock, last_received",
                (clock - stable_age, wall_time() - stable_age),
            )
        return [r["study_uid"] for r in rows]

    def mark_announced(self, study_uid: str, when: float | None = None, cutoff: float | None = None) -> bool:
        """The study's completion was announced. With `cutoff` (the quiet-clock reading below which it was
        found complete), only if no instance arrived since: a late one leaves it to be announced again."""
        when = wall_time() if when is None else when
        with self._lock:
            before = self._conn.total_changes
            if cutoff is None or not self._clock_columns:
                self._write(
                    [
                        (
                            "UPDATE studies SET completed_at = ?, announced_clock = last_clock WHERE study_uid = ?"
                            if self._clock_columns
                            else "UPDATE studies SET completed_at = ? WHERE study_uid = ?",
                            (when, study_uid),
                        )
                    ]
                )
            else:
                self._write(
                    [
                        (
                            "UPDATE studies SET completed_at = ?, announced_clock = last_clock "
                            "WHERE study_uid = ? AND (last_clock <= ? OR last_clock IS NULL)",
                            (when, study_uid, cutoff),
                        )
                    ]
                )
            return self._conn.total_changes > before

    def study_info(self, study_uid: str, origin_site: str) -> StudyInfo:
        """The study's patient/study attributes (decoded text) and the modalities of its series."""
        rows = self._query("SELECT * FROM studies WHERE study_uid = ?", (study_uid,))
        if not rows:
            raise JournalError(f"study {study_uid} is not in the journal of {self.store_dir}")
        r = rows[0]
        modalities = tuple(
            m["modality"]
            for m in self._query(
                "SELECT DISTINCT modality FROM series WHERE study_uid = ? AND modality != '' ORDER BY modality",
                (study_uid,),
            )
        )
        return StudyInfo(
            study_uid=study_uid,
            origin_site=origin_site,
            patient_id=r["patient_id"],
            issuer_of_patient_id=r["issuer_of_patient_id"],
            patient_name=r["patient_name"],
            patient_birth_date=r["patient_birth_date"],
            patient_sex=r["patient_sex"],
            study_date=r["study_date"],
            study_time=r["study_time"],
            accession_number=r["accession_number"],
            study_description=r["study_description"],
            modalities=modalities,
            referring_physician=r["referring_physician"],
            requesting_service=r["requesting_service"],
            institution_name=r["institution_name"],
            study_id=r["study_id"],
            specific_character_set=r["specific_character_set"],
        )

    def instances(self, study_uid: str, upload_state: str | None = None) -> list[JournalEntry]:
        """The study's instances (optionally only those in `upload_state`), by series and number."""
        sql = (
            "SELECT i.*, s.modality, s.series_number, s.series_description FROM instances i "
            "LEFT JOIN series s ON s.series_uid = i.series_uid WHERE i.study_uid = ?"
        )
        params: list[Any] = [study_uid]
        if upload_state is not None:
            _check_state(upload_state)
            # "+": the study's index, never the state's (which would scan every instance in that state)
            sql += " AND +i.upload_state = ?"
            params.append(upload_state)
        rows = self._query(sql, params)
        entries = [self._entry(r) for r in rows]
        entries.sort(
            key=lambda e: (
                e.instance.series_number if e.instance.series_number is not None else 1 << 30,
                e.instance.series_uid,
                e.instance.instance_number if e.instance.instance_number is not None else 1 << 30,
                e.instance.sop_instance_uid,
            )
        )
        return entries

    def entry(self, sop_instance_uid: str) -> JournalEntry | None:
        rows = self._query(
            "SELECT i.*, s.modality, s.series_number, s.series_description FROM instances i "
            "LEFT JOIN series s ON s.series_uid = i.series_uid WHERE i.sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        return self._entry(rows[0]) if rows else None

    def _entry(self, r: sqlite3.Row) -> JournalEntry:
        info = InstanceInfo(
            study_uid=r["study_uid"],
            series_uid=r["series_uid"],
            sop_instance_uid=r["sop_instance_uid"],
            sop_class_uid=r["sop_class_uid"],
            transfer_syntax_uid=r["transfer_syntax_uid"],
            size=int(r["size"]),
            sha256=r["sha256"],
            modality=r["modality"] or "",
            series_number=_int_or_none(r["series_number"]),
            instance_number=_int_or_none(r["instance_number"]),
            series_description=r["series_description"] or "",
        )
        return JournalEntry(
            instance=info,
            path=self.store_dir / r["path"],
            upload_state=r["upload_state"],
            received_at=float(r["received_at"]),
            calling_ae=r["calling_ae"],
            object_key=r["object_key"],
            local=bool(r["local"]),
        )

    def set_upload_state(self, sop_instance_uids: Iterable[str], state: str, object_key: str | None = None) -> int:
        """Set the upload state (and the object key, when given) of instances; returns how many."""
        _check_state(state)
        uids = list(sop_instance_uids)
        if not uids:
            return 0
        with self._lock:
            before = self._conn.total_changes
            statements: list[tuple[str, Sequence[Any]]] = []
            for uid in uids:
                if object_key is None:
                    statements.append(
                        ("UPDATE instances SET upload_state = ? WHERE sop_instance_uid = ?", (state, uid))
                    )
                else:
                    statements.append(
                        (
                            "UPDATE instances SET upload_state = ?, object_key = ? WHERE sop_instance_uid = ?",
                            (state, object_key, uid),
                        )
                    )
            self._write(statements)
            return self._conn.total_changes - before

    def remove_local_copy(self, study_uid: str) -> list[Path]:
        """Delete the local files of a study whose every instance is 'verified'; returns them.

        The journal keeps the rows (local = 0): Q/R no longer offers them, and an
        identical resend is stored again. Raises JournalError when any instance
        is not verified yet: the edge copy is kept until the center's is verified.
        """
        # one transaction: an instance journaled meanwhile either stops the removal or is untouched
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    rows = self._conn.execute(
                        "SELECT upload_state, count(*) AS n FROM instances WHERE study_uid = ? GROUP BY upload_state",
                        (study_uid,),
                    ).fetchall()
                    if not rows:
                        raise JournalError(f"study {study_uid} is not in the journal of {self.store_dir}")
                    pending = {r[0]: r[1] for r in rows if r[0] != "verified"}
                    if pending:
                        raise JournalError(
                            f"refusing to remove the local copy of study {study_uid}: "
                            f"{sum(pending.values())} instance(s) not verified yet ({pending}); "
                            "verify the center's copy first"
                        )
                    chosen = self._conn.execute(
                        "SELECT sop_instance_uid, path FROM instances WHERE study_uid = ? AND local = 1 "
                        "AND upload_state = 'verified'",
                        (study_uid,),
                    ).fetchall()
                    self._conn.executemany(
                        "UPDATE instances SET local = 0 WHERE sop_instance_uid = ? AND upload_state = 'verified'",
                        [(r[0],) for r in chosen],
                    )
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: write failed: {exc}") from None
        paths = [self.store_dir / r[1] for r in chosen]
        folders: set[Path] = set()
        for path in paths:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            folders.add(path.parent)
        for folder in folders:  # the removals are durable before this returns
            try:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return paths

    def conflicts(self) -> list[Conflict]:
        """Every recorded conflict, oldest first."""
        return [
            Conflict(
                sop_instance_uid=r["sop_instance_uid"],
                study_uid=r["study_uid"],
                series_uid=r["series_uid"],
                existing_sha256=r["existing_sha256"],
                received_sha256=r["received_sha256"],
                path=self.store_dir / r["path"],
                size=int(r["size"]),
                calling_ae=r["calling_ae"],
                received_at=float(r["received_at"]),
            )
            for r in self._query("SELECT * FROM conflicts ORDER BY received_at, id")
        ]

    # -- quarantine: one bad study never blocks the others ----------------------
    def _has_quarantine_table(self) -> bool:
        # a journal from before schema 4 opened read-only has no such table (a writable open adds it)
        return bool(self._query("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quarantine'"))

    def quarantine(
        self,
        study_uid: str,
        reason: str,
        sop_instance_uids: Iterable[str] | None = None,
        step: str = "",
        when: float | None = None,
    ) -> Quarantine:
        """Hold a study out of the sync until `release_quarantine`; returns its quarantine.

        Idempotent: a study already quarantined keeps its first reason. The
        reason is shown to operators and audited: it must name no patient.
        """
        reason = " ".join(str(reason).split())[:QUARANTINE_REASON_MAX] or "no reason given"
        uids = json.dumps(list(dict.fromkeys(sop_instance_uids or ())))
        now = time.time() if when is None else when
        self._write(
            [
                (
                    "INSERT OR IGNORE INTO quarantine (study_uid, reason, step, sop_instance_uids, quarantined_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (study_uid, reason, step, uids, now),
                )
            ]
        )
        active = self._quarantines("study_uid = ? AND released_at IS NULL", (study_uid,))
        if not active:  # cannot happen: the row was inserted or an active one existed
            raise JournalError(f"{self.path}: the quarantine of study {study_uid} was not recorded")
        return active[0]

    def sample_uids(self, state: str, n_random: int, n_recent: int, rng: random.Random) -> list[str]:
        """SOP Instance UIDs of up to n_recent + n_random instances in upload `state`: the latest ones,
        then random ones; each lookup is one probe of the upload_state index, whatever the journal's size."""
        uids: dict[str, None] = {}
        recent = self._query(
            "SELECT sop_instance_uid FROM instances WHERE upload_state = ? ORDER BY rowid DESC LIMIT ?",
            (state, int(n_recent)),
        )
        uids.update((r["sop_instance_uid"], None) for r in recent)
        top = self._query("SELECT max(rowid) AS m FROM instances")[0]["m"] or 0
        if top and n_random > 0:
            for _ in range(int(n_random)):
                start = rng.randint(1, top)
                rows = self._query(
                    "SELECT sop_instance_uid FROM instances WHERE upload_state = ? AND rowid >= ? "
                    "ORDER BY rowid LIMIT 1",
                    (state, start),
                ) or self._query(
                    "SELECT sop_instance_uid FROM instances WHERE upload_state = ? ORDER BY rowid LIMIT 1", (state,)
                )
                if not rows:
                    break  # none in that state at all
                uids[rows[0]["sop_instance_uid"]] = None
        return list(uids)

    def quarantined(self) -> list[Quarantine]:
        """The studies held in quarantine now (not released), oldest first."""
        return self._quarantines("released_at IS NULL")

    def quarantined_study_uids(self) -> set[str]:
        if not self._has_quarantine_table():
            return set()
        return {r["study_uid"] for r in self._query("SELECT study_uid FROM quarantine WHERE released_at IS NULL")}

    def is_quarantined(self, study_uid: str) -> bool:
        return bool(
            self._has_quarantine_table()
            and self._query("SELECT 1 FROM quarantine WHERE study_uid = ? AND released_at IS NULL", (study_uid,))
        )

    def release_quarantine(self, study_uid: str, by: str = "", when: float | None = None) -> Quarantine | None:
        """End a study's quarantine (the next sync run takes it again); returns it, None if it had none."""
        active = self._quarantines("study_uid = ? AND released_at IS NULL", (study_uid,))
        if not active:
            return None
        now = time.time() if when is None else when
        self._write(
            [
                (
                    "UPDATE quarantine SET released_at = ?, released_by = ? WHERE id = ? AND released_at IS NULL",
                    (now, by, active[0].id),
                )
            ]
        )
        return self._quarantines("id = ?", (active[0].id,))[0]

    def quarantines_to_audit(self) -> list[Quarantine]:
        """Quarantines (and releases) not yet recorded in the center's audit chain, oldest first."""
        return self._quarantines("audited_at IS NULL OR (released_at IS NOT NULL AND release_audited_at IS NULL)")

    def mark_quarantine_audited(self, quarantine_ids: Iterable[int], when: float | None = None) -> None:
        """The audit events of these quarantines (and of their releases, if released) are committed."""
        now = time.time() if when is None else when
        statements: list[tuple[str, Sequence[Any]]] = []
        for qid in quarantine_ids:
            statements.append(("UPDATE quarantine SET audited_at = coalesce(audited_at, ?) WHERE id = ?", (now, qid)))
            statements.append(
                (
                    "UPDATE quarantine SET release_audited_at = coalesce(release_audited_at, ?) "
                    "WHERE id = ? AND released_at IS NOT NULL",
                    (now, qid),
                )
            )
        if statements:
            self._write(statements)

    def _quarantines(self, where: str, params: Sequence[Any] = ()) -> list[Quarantine]:
        if not self._has_quarantine_table():
            return []
        return [
            Quarantine(
                id=int(r["id"]),
                study_uid=r["study_uid"],
                reason=r["reason"],
                step=r["step"],
                sop_instance_uids=tuple(json.loads(r["sop_instance_uids"] or "[]")),
                quarantined_at=float(r["quarantined_at"]),
                audited_at=r["audited_at"],
                released_at=r["released_at"],
                released_by=r["released_by"] or "",
                release_audited_at=r["release_audited_at"],
            )
            for r in self._query(f"SELECT * FROM quarantine WHERE {where} ORDER BY quarantined_at, id", params)
        ]

    def summary(self) -> JournalSummary:
        """Counts for `renkei edge status`."""
        totals = self._query("SELECT count(*) AS n, coalesce(sum(size), 0) AS b FROM instances")[0]
        states = {s: 0 for s in UPLOAD_STATES}
        for r in self._query("SELECT upload_state, count(*) AS n FROM instances GROUP BY upload_state"):
            states[r["upload_state"]] = r["n"]
        return JournalSummary(
            studies=self._query("SELECT count(*) AS n FROM studies")[0]["n"],
            instances=totals["n"],
            bytes=totals["b"],
            upload_states=states,
            conflicts=self._query("SELECT count(*) AS n FROM conflicts")[0]["n"],
            quarantined=len(self.quarantined_study_uids()),
        )

    # -- query/retrieve rows ---------------------------------------------------
    def study_rows(
        self, study_uids: Sequence[str] | None = None, patient_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Study-level records (keyword -> text) with the computed Q/R attributes."""
        where: list[str] = []
        params: list[Any] = []
        if study_uids:
            where.append(f"s.study_uid IN ({', '.join('?' * len(study_uids))})")
            params.extend(study_uids)
        if patient_id is not None:
            where.append("s.patient_id = ?")
            params.append(patient_id)
        sql = (
            "SELECT s.*, (SELECT count(*) FROM series x WHERE x.study_uid = s.study_uid) AS n_series, "
            "(SELECT count(*) FROM instances i WHERE i.study_uid = s.study_uid AND i.local = 1) AS n_inst, "
            "(SELECT group_concat(DISTINCT x.modality) FROM series x WHERE x.study_uid = s.study_uid "
            "AND x.modality != '') AS modalities FROM studies s"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        out = []
        for r in self._query(sql, params):
            record = {k: r[c] for k, c in STUDY_COLUMNS.items()}
            record["SpecificCharacterSet"] = r["specific_character_set"]
            modalities = sorted(r["modalities"].split(",")) if r["modalities"] else []
            record["ModalitiesInStudy"] = "\\".join(modalities)
            record["NumberOfStudyRelatedSeries"] = str(r["n_series"])
            record["NumberOfStudyRelatedInstances"] = str(r["n_inst"])
            record["_last_received"] = r["last_received"]
            out.append(record)
        return out

    def series_rows(
        self, study_uids: Sequence[str] | None = None, series_uids: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        if study_uids:
            where.append(f"x.study_uid IN ({', '.join('?' * len(study_uids))})")
            params.extend(study_uids)
        if series_uids:
            where.append(f"x.series_uid IN ({', '.join('?' * len(series_uids))})")
            params.extend(series_uids)
        sql = (
            "SELECT x.*, (SELECT count(*) FROM instances i WHERE i.series_uid = x.series_uid "
            "AND i.local = 1) AS n_inst FROM series x"
        )
        if where:
            sql += " WHERE " + " AND ".join(where)
        out = []
        for r in self._query(sql, params):
            record = {k: r[c] for k, c in SERIES_COLUMNS.items()}
            record["StudyInstanceUID"] = r["study_uid"]
            record["SpecificCharacterSet"] = r["specific_character_set"]
            record["NumberOfSeriesRelatedInstances"] = str(r["n_inst"])
            out.append(record)
        return out

    def instance_rows(
        self,
        study_uids: Sequence[str] | None = None,
        series_uids: Sequence[str] | None = None,
        sop_instance_uids: Sequence[str] | None = None,
        local_only: bool = True,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        if local_only:
            where.append("i.local = 1")
        for column, values in (
            ("study_uid", study_uids),
            ("series_uid", series_uids),
            ("sop_instance_uid", sop_instance_uids),
        ):
            if values:
                where.append(f"i.{column} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        sql = "SELECT i.* FROM instances i"
        if where:
            sql += " WHERE " + " AND ".join(where)
        out = []
        for r in self._query(sql, params):
            record = {k: r[c] for k, c in INSTANCE_COLUMNS.items()}
            record["StudyInstanceUID"] = r["study_uid"]
            record["SeriesInstanceUID"] = r["series_uid"]
            record["SpecificCharacterSet"] = r["specific_character_set"]
            record["_path"] = r["path"]
            record["_transfer_syntax_uid"] = r["transfer_syntax_uid"]
            out.append(record)
        return out

    def patient_rows(self, patient_id: str | None = None) -> list[dict[str, Any]]:
        """Patient-level records: one per Patient ID, attributes from its latest study."""
        studies = self.study_rows(patient_id=patient_id)
        by_patient: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for s in studies:
            by_patient.setdefault((s["PatientID"], s["IssuerOfPatientID"]), []).append(s)
        out = []
        for (_pid, _issuer), group in by_patient.items():
            latest = max(group, key=lambda s: s["_last_received"])
            record = {
                k: latest[k]
                for k in (
                    "PatientName",
                    "PatientID",
                    "IssuerOfPatientID",
                    "PatientBirthDate",
                    "PatientSex",
                    "SpecificCharacterSet",
                )
            }
            record["NumberOfPatientRelatedStudies"] = str(len(group))
            record["NumberOfPatientRelatedSeries"] = str(sum(int(s["NumberOfStudyRelatedSeries"]) for s in group))
            record["NumberOfPatientRelatedInstances"] = str(sum(int(s["NumberOfStudyRelatedInstances"]) for s in group))
            record["_study_uids"] = [s["StudyInstanceUID"] for s in group]
            out.append(record)
        return out

    def iter_study_uids(self) -> Iterator[str]:
        for r in self._query("SELECT study_uid FROM studies ORDER BY first_received"):
            yield r["study_uid"]


def _check_state(state: str) -> None:
    if state not in UPLOAD_STATES:
        raise RenkeiError(f"unknown upload state {state!r}; use one of {', '.join(UPLOAD_STATES)}")
