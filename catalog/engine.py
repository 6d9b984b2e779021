"""The catalog's table engine: storage, the local file cache, DuckDB's views and the commit.

The data are immutable Parquet files listed by a commit log (catalog.log), so
the same code runs on a local folder and on S3 and several processes can write
at once: each commit writes new files, then wins a log number with an
exclusive create, or re-checks and retries. Readers see a whole commit or
nothing. Every read goes through one query path (`rows`, `batches`), which
catches up with other writers first and retries when compaction removed a file
meanwhile. The repositories (catalog.studies, catalog.grants, ...) and
compaction use only the public methods here. See docs/catalog.md.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from renkei.catalog import audit as audit_mod
from renkei.catalog import fs as cfs
from renkei.catalog import tables
from renkei.catalog.backup import BackupLocation, witness_problems
from renkei.catalog.log import REPAIR_HINT, CommitLog, FileEntry, State, new_commit_id
from renkei.catalog.records import CommitPlan
from renkei.errors import CatalogDamaged, CatalogError, RenkeiError

_log = logging.getLogger(__name__)

DEFAULT_AUTO_COMPACT = 16  # level-0 files per table before a writer compacts
MAX_COMMIT_ATTEMPTS = 200
MEMO_ROWS = 100_000  # rows of kept per-study answers (~1 KiB each), all dropped when more


# Data files this process has checked against their log entry: path -> (size, mtime_ns, sha256).
# Files are immutable, so a file is hashed once per process, and again only if it changes on disk.
_VERIFIED: dict[str, tuple[int, int, str]] = {}
_VERIFIED_LOCK = threading.Lock()


def check_data_file(path: str, entry: FileEntry, table: str) -> None:
    """Raise CatalogDamaged unless the local file at `path` holds what `entry` recorded."""
    if not entry.sha256:
        return  # written before checksums were recorded
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CatalogDamaged(
            f"catalog data file {entry.path} (table {table}, commit {entry.seq}) is missing: {REPAIR_HINT}"
        ) from None
    with _VERIFIED_LOCK:
        if _VERIFIED.get(path) == (st.st_size, st.st_mtime_ns, entry.sha256):
            return
    if entry.size >= 0 and st.st_size != entry.size:
        raise CatalogDamaged(
            f"catalog data file {entry.path} (table {table}, commit {entry.seq}) is truncated "
            f"or altered: {st.st_size} bytes where {entry.size} were written; {REPAIR_HINT}"
        )
    digest, _size = cfs.sha256_file(path)
    if digest != entry.sha256:
        raise CatalogDamaged(
            f"catalog data file {entry.path} (table {table}, commit {entry.seq}) is altered: "
            f"its SHA-256 is not the one recorded when it was written; {REPAIR_HINT}"
        )
    with _VERIFIED_LOCK:
        _VERIFIED[path] = (st.st_size, st.st_mtime_ns, entry.sha256)


def forget_verified() -> None:
    """Forget which files this process has checked, as a new process would (tests and benchmarks)."""
    with _VERIFIED_LOCK:
        _VERIFIED.clear()


def sql_str(value: str) -> str:
    """`value` as a quoted SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


T = TypeVar("T")
# what auto-compaction runs: compact(engine, fanout) (catalog.compaction.compact, given by Catalog)
Compactor = Callable[["TableEngine", int], object]
# DuckDB's errors when a file a view lists is gone (a compaction vacuumed it): re-read the state, retry
_RETRIED = (duckdb.IOException, duckdb.HTTPException, FileNotFoundError)


class TableEngine:
    """The tables of the catalog at `url` (a folder or s3://bucket/prefix), for one process.

    Thread-safe behind its lock; any number of processes may open the same url
    and write at once. Every query first catches up with the commits other
    writers made. `compactor` is what runs when a table has more than
    `auto_compact` level-0 files (none: the files are left for a later compact).
    """

    def __init__(
        self,
        url: str,
        s3_options: Any = None,
        *,
        writer: str | None = None,
        auto_compact: int | None = DEFAULT_AUTO_COMPACT,
        memory_limit: str = "768MB",
        threads: int | None = None,
        vacuum_grace_s: float = 600.0,
        background_compaction: bool = True,
        cache: bool = True,
        backup_url: str | None = None,
        backup_s3_options: Any = None,
        cache_dir: str | os.PathLike[str] | None = None,
        compactor: Compactor | None = None,
    ) -> None:
        self.url = url
        self.fs, self.root = cfs.open_filesystem(url, s3_options)
        self.local = cfs.is_local(self.fs)
        self.log = CommitLog(self.fs, self.root)
        self.writer = writer or f"{socket.gethostname()}:{os.getpid()}"
        self.auto_compact = auto_compact
        self.vacuum_grace_s = vacuum_grace_s
        self._lock = threading.RLock()
        self._state: State | None = None
        self._views_seq = -1
        # answers of the small per-study queries every C-FIND, C-MOVE and decision asks, kept while the
        # tables they read are unchanged: (sql, params) -> (tables' version, rows)
        self._memo: dict[tuple[str, tuple[Any, ...]], tuple[tuple[tuple[int, int], ...], list[dict[str, Any]]]] = {}
        self._memo_rows = 0
        self._executor: ThreadPoolExecutor | None = None
        self.background_compaction = background_compaction
        self._compact = compactor
        self._compactor: threading.Thread | None = None
        self._compact_con: duckdb.DuckDBPyConnection | None = None
        self._tmpdir = tempfile.mkdtemp(prefix="renkei-catalog-")
        weakref.finalize(self, shutil.rmtree, self._tmpdir, True)  # also when close() is never called
        # On S3, immutable data files are read from a local copy (see read_path). With `cache_dir` the
        # copies outlive this object and are shared by every process of the machine (a task's catalog
        # no longer downloads every live file again); a copy found there is checked against its log
        # entry once per process before it is used.
        self._shared_cache = cache_dir is not None and cache and not self.local
        if not cache or self.local:
            self._cache_dir: str | None = None
        elif cache_dir is not None:
            self._cache_dir = os.fspath(cache_dir)
            os.makedirs(self._cache_dir, exist_ok=True)
        else:
            self._cache_dir = os.path.join(self._tmpdir, "files")
        self._cached: set[str] = set()
        self._pruned_at = 0.0
        # the second location: the witness after every commit, backups (catalog/backup.py)
        self.backup: BackupLocation | None = (
            BackupLocation(backup_url, backup_s3_options if backup_s3_options is not None else s3_options)
            if backup_url
            else None
        )
        self._witness_seq = 0
        self.con = duckdb.connect(
            config={
                "memory_limit": memory_limit,
                "threads": threads or max(1, min(4, os.cpu_count() or 1)),
                "preserve_insertion_order": False,
                "temp_directory": self._tmpdir,
            }
        )
        self.con.execute("SET parquet_metadata_cache = true")
        self.con.execute("SET enable_external_file_cache = false")
        if not self.local:
            self.con.register_filesystem(self.fs)
        for name, spec in tables.TABLES.items():
            self.con.register(f"_empty_{name}", spec.schema.empty_table())

    def close(self) -> None:
        self.wait_for_compaction()
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown()
            try:
                if self._compact_con is not None:
                    self._compact_con.close()
                self.con.close()
            finally:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    @property
    def lock(self) -> threading.RLock:
        """Held by every query and commit; a repository holds it across queries that must agree."""
        return self._lock

    @property
    def tmpdir(self) -> str:
        """A folder of this engine's own, removed on close (DuckDB spills there; compaction merges there)."""
        return self._tmpdir

    # ------------------------------------------------------------ storage and file cache
    def abs_path(self, rel: str) -> str:
        """The path DuckDB and fsspec use for a file named relative to the catalog root."""
        full = cfs.join(self.root, rel)
        return full if self.local else f"s3://{full}"

    def read_path(self, rel: str) -> str:
        """Where to read a data file: its own path, or (S3 with a cache) the local copy of it.

        Data files are immutable (a new name for every write), so a local copy
        never goes stale: the reader on S3 then runs at local-disk speed.
        """
        if self._cache_dir is None:
            return self.abs_path(rel)
        self._fetch([rel])
        return os.path.join(self._cache_dir, rel)

    def _fetch(self, rels: Iterable[str], entries: Mapping[str, tuple[str, FileEntry]] | None = None) -> None:
        """Copy data files into the local cache; those in `entries` are checked before they are used."""
        assert self._cache_dir is not None
        missing = []
        for rel in rels:
            local = os.path.join(self._cache_dir, rel)
            if not os.path.exists(local):
                missing.append(rel)
            elif self._shared_cache and entries is not None and rel in entries:
                table, entry = entries[rel]
                try:  # left by another process (or an earlier run): its bytes, once per process
                    check_data_file(local, entry, table)
                except CatalogDamaged:
                    _log.warning("a cached copy of catalog file %s did not match its log entry: fetched again", rel)
                    os.unlink(local)
                    missing.append(rel)
        if not missing:
            return
        temps = []
        for rel in missing:
            local = os.path.join(self._cache_dir, rel)
            os.makedirs(os.path.dirname(local), exist_ok=True)
            temps.append(cfs.temp_sibling(local))
        try:
            try:
                self.fs.get([cfs.join(self.root, r) for r in missing], temps)
            except FileNotFoundError:
                gone = [r for r in missing if not cfs.exists(self.fs, cfs.join(self.root, r))]
                if entries is None or not any(r in entries for r in gone):
                    raise
                table, entry = entries[next(r for r in gone if r in entries)]
                raise CatalogDamaged(
                    f"catalog data file {entry.path} (table {table}, commit {entry.seq}) is missing: {REPAIR_HINT}"
                ) from None
            for rel, tmp in zip(missing, temps):
                if entries is not None and rel in entries:
                    table, entry = entries[rel]
                    check_data_file(tmp, entry, table)
                os.replace(tmp, os.path.join(self._cache_dir, rel))
        finally:
            for tmp in temps:
                if os.path.exists(tmp):
                    os.unlink(tmp)

    def _prune_cache(self, state: State) -> None:
        if self._cache_dir is None:
            return
        keep = {p for files in state.files.values() for p in files} | {p for p, _ in state.removed}
        if self._shared_cache:
            self._prune_shared(keep)
            return
        for rel in list(self._cached):
            if rel not in keep:
                try:
                    os.unlink(os.path.join(self._cache_dir, rel))
                except FileNotFoundError:
                    pass
                self._cached.discard(rel)

    SHARED_PRUNE_EVERY_S = 300.0

    def _prune_shared(self, keep: set[str]) -> None:
        """Copies in the shared cache no state of ours needs, and untouched for the vacuum grace (another
        process on a newer state may have just fetched them), are removed; at most every 5 minutes."""
        now = time.time()
        if now - self._pruned_at < self.SHARED_PRUNE_EVERY_S:
            return
        self._pruned_at = now
        assert self._cache_dir is not None
        for folder, _dirs, files in os.walk(self._cache_dir):
            for name in files:
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, self._cache_dir).replace(os.sep, "/")
                if rel in keep:
                    continue
                try:
                    if now - os.stat(path).st_mtime > self.vacuum_grace_s:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
        self._cached &= keep

    def refresh(self) -> State:
        """Catch up with every commit made so far (by any process); returns the state."""
        with self._lock:
            try:
                if self._state is None:
                    self._state = self._check_witness(self.log.load())
                else:
                    self._state = self.log.catch_up(self._state)
            except RenkeiError:
                raise
            except Exception as exc:  # storage clients raise many types (botocore, aiohttp, OSError)
                raise CatalogError(
                    f"the catalog at {self.url} cannot be read: {exc}; check the center's "
                    "storage (endpoint, credentials, disk)"
                ) from exc
            return self._state

    @property
    def state(self) -> State:
        return self.refresh()

    def ensure_views(self) -> None:
        """Point the tables' views at the live files of the latest state (a commit's builder calls it)."""
        state = self.refresh()
        if self._views_seq == state.seq:
            return
        for attempt in range(2):
            try:
                self._check_live_files(state)
                break
            except CatalogDamaged:
                if attempt:
                    raise
                # a compaction may have removed and vacuumed a file since this state: re-read once
                self._state = None
                state = self.refresh()
        for name in tables.TABLES:
            files = sorted(state.files.get(name, {}).values(), key=lambda f: (f.seq, f.path))
            if files:
                listing = ", ".join(sql_str(self.read_path(f.path)) for f in files)
                # by name: a column added to a table later is NULL in the files written before it
                sql = (
                    f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet([{listing}]"
                    f"{', union_by_name = true' if name == 'conflicts' else ''})"
                )
            else:
                sql = f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM _empty_{name}"
            self.con.execute(sql)
        self._views_seq = state.seq

    def _check_live_files(self, state: State) -> None:
        """Every live data file is there and holds the bytes its log entry recorded (CatalogDamaged if not).

        Locally each file is hashed once per process (then only its size and
        time are compared); on S3 each file is checked as it is copied into
        the local cache. Without a cache (cache=False) only the nightly check
        reads the files on S3.
        """
        entries = {f.path: (t, f) for t, files in state.files.items() for f in files.values()}
        if self._cache_dir is not None:
            live = list(entries)
            self._fetch(live, entries)
            self._cached.update(live)
            self._prune_cache(state)
        elif self.local:
            for rel, (table, entry) in entries.items():
                check_data_file(self.abs_path(rel), entry, table)

    def _tables_version(self, names: Sequence[str]) -> tuple[tuple[int, int], ...]:
        """Changes whenever a commit adds or removes a data file of one of the tables (by any process).

        A commit that adds a file raises its table's highest file seq; one that only removes files
        lowers the count: the pair never comes back to an earlier value.
        """
        state = self.refresh()
        out = []
        for name in names:
            files = state.files.get(name, {})
            out.append((len(files), max((f.seq for f in files.values()), default=0)))
        return tuple(out)

    # ------------------------------------------------------------ the query path
    def _read(self, fetch: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """`fetch(con)` over the current state; retried twice if compaction removed a file meanwhile."""
        with self._lock:
            for attempt in range(3):
                self.ensure_views()
                try:
                    return fetch(self.con)
                except _RETRIED as exc:
                    if attempt == 2:
                        raise CatalogError(f"catalog at {self.url} could not be read: {exc}") from None
                    self._views_seq = -1
                    self._state = None  # re-read from the latest checkpoint
            raise AssertionError("unreachable")

    def batches(self, sql: str, batch_size: int) -> list[list[dict[str, Any]]]:
        """A large answer read in Arrow batches of `batch_size` rows, each as a list of dicts."""
        return self._read(lambda con: [b.to_pylist() for b in con.sql(sql).to_arrow_reader(batch_size)])

    def rows(self, sql: str, params: Sequence[Any] | None = None, memo: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Rows as dicts (the fast path for small answers).

        With `memo` (the tables the query reads), the answer is kept and given again, as copies, until
        a commit changes one of those tables: the questions a C-MOVE asks cost a DuckDB query each.
        """
        with self._lock:
            key = (sql, tuple(params or ()))
            if memo:
                version = self._tables_version(memo)
                hit = self._memo.get(key)
                if hit is not None and hit[0] == version:
                    return [dict(r) for r in hit[1]]
            rows = self._read(lambda con: _dicts(con.execute(sql, list(params or []))))
            if memo and len(rows) <= MEMO_ROWS // 10:
                self._memo_rows += len(rows) + 1
                if self._memo_rows > MEMO_ROWS:
                    self._memo.clear()
                    self._memo_rows = len(rows) + 1
                self._memo[key] = (version, [dict(r) for r in rows])
            return rows

    @contextmanager
    def registered(self, **relations: pa.Table) -> Iterator[None]:
        """The Arrow tables given, queryable by their names on the connection while the block runs."""
        with self._lock:
            for name, table in relations.items():
                self.con.register(name, table)
            try:
                yield
            finally:
                for name in relations:
                    self.con.unregister(name)

    # ------------------------------------------------------------ writing and the commit
    def write_file(self, table: str, data: pa.Table, level: int = 0) -> dict[str, Any]:
        """Write `data` as a new immutable Parquet file of `table`; returns its log record."""
        spec = tables.TABLES[table]
        data = data.select(spec.schema.names).cast(spec.schema)
        if level == 0 and data.num_rows > 1:
            data = data.sort_by([(k, "ascending") for k in spec.sort_keys])
        rel = f"data/{table}/L{level}-{uuid.uuid4().hex}.parquet"
        path = cfs.join(self.root, rel)
        kwargs = dict(spec.parquet_options(), row_group_size=spec.row_group_size)
        sink = pa.BufferOutputStream()
        pq.write_table(data, sink, **kwargs)
        payload = sink.getvalue()
        digest = hashlib.sha256(payload).hexdigest()
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as handle:  # a new name: nobody reads it before the commit
                handle.write(payload)
            _VERIFIED[path] = (payload.size, os.stat(path).st_mtime_ns, digest)
        else:
            self.fs.pipe_file(path, payload.to_pybytes())
            if self._cache_dir is not None:  # what we wrote needs no download
                local = os.path.join(self._cache_dir, rel)
                os.makedirs(os.path.dirname(local), exist_ok=True)
                tmp = cfs.temp_sibling(local)
                with open(tmp, "wb") as handle:
                    handle.write(payload)
                os.replace(tmp, local)  # whole or not at all: the cache may be shared
                with _VERIFIED_LOCK:
                    _VERIFIED[local] = (payload.size, os.stat(local).st_mtime_ns, digest)
        return {"path": rel, "rows": data.num_rows, "level": level, "sha256": digest, "size": payload.size}

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="catalog-write")
        return self._executor

    def delete_files(self, rels: Iterable[str]) -> None:
        """Remove data files (relative to the root); those already gone are skipped."""
        for rel in rels:
            path = cfs.join(self.root, rel)
            try:
                if self.local:
                    os.unlink(path)
                else:
                    self.fs.rm_file(path)
            except FileNotFoundError:
                pass

    def commit(
        self, kind: str, build: Callable[[State, int, dt.datetime], CommitPlan | None]
    ) -> tuple[int | None, Any]:
        """Build a plan against the latest state and commit it as the next log entry.

        `build(state, seq, now)` returns the plan, or None when there is nothing
        to change. When another writer takes the number first, the plan is
        rebuilt against the new state (so its checks see that writer's rows).
        Returns (seq or None, plan.result).
        """
        with self._lock:
            for attempt in range(MAX_COMMIT_ATTEMPTS):
                state = self.refresh()
                seq = state.seq + 1
                now = _now()
                plan = build(state, seq, now)
                if plan is None:
                    return None, None
                written: list[str] = []
                add: dict[str, list[dict[str, Any]]] = {t: list(v) for t, v in plan.prewritten.items()}
                try:
                    todo = [(name, data) for name, data in plan.rows.items() if data is not None and data.num_rows]
                    if len(todo) > 1 and sum(d.num_rows for _, d in todo) > 20_000:
                        records = list(self._pool().map(lambda item: (item[0], self.write_file(*item)), todo))
                    else:
                        records = [(name, self.write_file(name, data)) for name, data in todo]
                    for name, record in records:
                        written.append(record["path"])
                        add.setdefault(name, []).append(record)
                    entry: dict[str, Any] = {
                        "kind": kind,
                        "writer": self.writer,
                        "time": time.time(),
                        "commit_id": new_commit_id(),
                        "prev": state.last_commit,
                    }
                    if plan.audit:
                        rows, head = audit_mod.build_rows(
                            plan.audit, state.audit_count + 1, state.audit_head or audit_mod.GENESIS, now, seq
                        )
                        record = self.write_file("audit", rows)
                        written.append(record["path"])
                        add.setdefault("audit", []).append(record)
                        entry["audit"] = {
                            "prev_count": state.audit_count,
                            "count": state.audit_count + len(plan.audit),
                            "head": head,
                        }
                    entry["add"] = add
                    if plan.remove:
                        entry["remove"] = plan.remove
                    if plan.vacuumed:
                        entry["vacuumed"] = plan.vacuumed
                except BaseException:
                    self.delete_files(written)  # nothing refers to them yet
                    raise
                # From here on the entry may exist even when an error is raised (a lost reply):
                # try_create reads it back, and its files are kept unless another writer's entry won.
                won = self.log.try_create(seq, entry)
                if won:
                    new_state = state.copy()
                    new_state.apply(seq, json.loads(json.dumps({**entry, "seq": seq})))
                    self._state = new_state
                    if plan.audit:
                        self._write_anchor(new_state)
                    self._write_witness(new_state)
                    if kind != "compact":
                        self._maybe_compact(new_state)
                    return seq, plan.result
                self.delete_files(written)
                time.sleep(random.uniform(0, min(0.05, 0.002 * (attempt + 1))))
            raise CatalogError(
                f"could not commit to the catalog at {self.url} after {MAX_COMMIT_ATTEMPTS} attempts: "
                "too many concurrent writers; retry later"
            )

    def _check_witness(self, state: State) -> State:
        """CatalogDamaged when the witness (or the anchor in the catalog) knows of commits the log lacks.

        Both are read first and the log is caught up after them: every commit they record was in the
        log before they were written, so a log read that starts later must hold it. Commits other
        writers make meanwhile move the log on, never the readings past it (reading the witness again
        after catching up would see their newer commits and call that damage).
        """
        anchor_seq, witness, problems = self._read_witnesses()
        state = self.log.catch_up(state)
        if anchor_seq > state.seq:
            problems.append(
                f"the catalog's log ends at entry {state.seq}, but its audit anchor was written "
                f"at entry {anchor_seq}: entries are missing"
            )
        problems.extend(witness_problems(self.log, state, witness))
        if problems:
            raise CatalogDamaged(f"the catalog at {self.url} is damaged: {'; '.join(problems)}; {REPAIR_HINT}")
        self._witness_seq = state.seq
        return state

    def _read_witnesses(self) -> tuple[int, dict[str, Any] | None, list[str]]:
        """The entry the audit anchor was written at (0 if none), the second location's witness, and
        what is wrong with the witness itself."""
        anchor_seq = 0
        try:
            anchor = json.loads(cfs.read_bytes(self.fs, cfs.join(self.root, audit_mod.ANCHOR)))
            anchor_seq = int(anchor.get("seq", 0))
        except (FileNotFoundError, ValueError, AttributeError):
            pass
        witness, problems = None, []
        if self.backup is not None:
            try:
                witness = self.backup.read_witness()
            except CatalogDamaged as exc:
                problems.append(str(exc))
            except Exception as exc:  # the second location is down: the catalog still works
                _log.warning("the catalog's witness at %s cannot be read: %s", self.backup.url, exc)
        return anchor_seq, witness, problems

    def _write_witness(self, state: State) -> None:
        if self.backup is None or state.seq <= self._witness_seq:
            return
        try:
            self.backup.write_witness(state, self.url)
            self._witness_seq = state.seq
        except Exception as exc:  # never fail a commit that succeeded; the next one writes it again
            _log.warning("the catalog's witness at %s could not be written: %s", self.backup.url, exc)

    def _write_anchor(self, state: State) -> None:
        data = json.dumps({"count": state.audit_count, "head": state.audit_head, "seq": state.seq}).encode()
        try:
            cfs.atomic_write(self.fs, cfs.join(self.root, audit_mod.ANCHOR), data, fsync=False)
        except OSError:
            pass  # the log entries hold the head too; the anchor is a second witness

    def _maybe_compact(self, state: State) -> None:
        """Compact when a table has more than `auto_compact` level-0 files (in the background by default)."""
        compact = self._compact
        if not self.auto_compact or compact is None:
            return
        if not any(
            sum(1 for f in files.values() if f.level == 0) > self.auto_compact for files in state.files.values()
        ):
            return
        fanout = self.auto_compact // 2 or 2
        if not self.background_compaction:
            compact(self, fanout)
            return
        if self._compactor is not None and self._compactor.is_alive():
            return

        def run() -> None:
            try:
                compact(self, fanout)
            except Exception as exc:  # the next commit tries again
                _log.warning("background compaction of %s failed: %s", self.url, exc)

        self._compactor = threading.Thread(target=run, name="catalog-compaction", daemon=True)
        self._compactor.start()

    def wait_for_compaction(self, timeout: float | None = None) -> None:
        """Wait until a background compaction started by this process has finished."""
        if self._compactor is not None:
            self._compactor.join(timeout)

    def compaction_connection(self) -> duckdb.DuckDBPyConnection:
        """A second DuckDB connection for compaction, so merging never blocks queries."""
        with self._lock:
            if self._compact_con is None:
                self._compact_con = self.con.cursor()
            return self._compact_con

    # ------------------------------------------------------------ maintenance
    def file_counts(self) -> dict[str, int]:
        """How many live Parquet files each table has (what compaction keeps small)."""
        state = self.refresh()
        return {name: len(state.files.get(name, {})) for name in tables.TABLES}


def _dicts(cur: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    names = [d[0] for d in cur.description or ()]
    return [dict(zip(names, row)) for row in cur.fetchall()]
