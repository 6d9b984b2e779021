"""Compaction: keep the number of Parquet files per table small, so query time stays flat.

Files have levels. Each commit writes level-0 files; when a level holds
`fanout` files or more, they are merged into one file of the next level,
sorted by the table's sort keys (DuckDB sorts, spilling to disk past its
memory limit) and written with small row groups so that min/max statistics
prune. Tables whose history is not needed fold to the latest row per key
(locations) or to one row per study (studies: counts summed).

Safe with concurrent writers and readers: the merged file is written first
under a new name, then one commit swaps it in (adds it, removes the inputs).
That commit is only made while every input is still live, so two compactions
never merge the same rows twice. Removed files stay on storage for a grace
period (readers of an older state may still be reading them), then a later
compaction deletes them (vacuum) and writes a checkpoint of the state.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from renkei.catalog import fs as cfs
from renkei.catalog import tables
from renkei.catalog.engine import TableEngine
from renkei.catalog.log import State
from renkei.catalog.records import CommitPlan

DEFAULT_FANOUT = 8


class HasEngine(Protocol):
    """What holds a table engine: the Catalog facade."""

    @property
    def engine(self) -> TableEngine: ...


@dataclass(frozen=True)
class CompactionResult:
    """What compact() did: per table, (files merged, rows written); files vacuumed; the last commit."""

    merged: dict[str, tuple[int, int]] = field(default_factory=dict)
    vacuumed: int = 0
    orphans_removed: int = 0
    seq: int = 0


def _select_sql(spec: tables.TableSpec, source: str) -> str:
    names = [f'"{n}"' for n in spec.schema.names]
    order = ", ".join(f'"{k}"' for k in spec.sort_keys)
    if spec.name == "studies":
        info = [c for c in tables.STUDY_INFO_FIELDS if c != "study_uid"]
        aggs = ", ".join(
            [f"arg_max({c}, _seq) AS {c}" for c in info]
            + [
                "list_sort(list_distinct(flatten(list(modalities)))) AS modalities",
                "min(registered_at) AS registered_at",
                "sum(series_added)::BIGINT AS series_added",
                "sum(instances_added)::BIGINT AS instances_added",
                "sum(bytes_added)::BIGINT AS bytes_added",
                "max(_seq) AS _seq",
            ]
        )
        return (
            f"SELECT {', '.join(names)} FROM (SELECT study_uid, {aggs} FROM {source} GROUP BY study_uid) "
            f"ORDER BY {order}"
        )
    if spec.latest_by:
        keys = ", ".join(spec.latest_by)
        return (
            f"SELECT {', '.join(names)} FROM (SELECT *, row_number() OVER (PARTITION BY {keys} "
            f"ORDER BY _seq DESC) AS _rn FROM {source}) WHERE _rn = 1 ORDER BY {order}"
        )
    return f"SELECT {', '.join(names)} FROM {source} ORDER BY {order}"


def _merge(catalog: TableEngine, table: str, inputs: list[str], level: int) -> dict[str, Any]:
    """Write the merged, sorted file of `inputs`; returns its log record (not yet committed)."""
    spec = tables.TABLES[table]
    listing = ", ".join("'" + catalog.read_path(p).replace("'", "''") + "'" for p in inputs)
    sql = _select_sql(spec, f"read_parquet([{listing}], union_by_name = true)")
    rel = f"data/{table}/L{level}-{uuid.uuid4().hex}.parquet"
    final = cfs.join(catalog.root, rel)
    local_target = final if catalog.local else os.path.join(catalog.tmpdir, f"merge-{uuid.uuid4().hex}.parquet")
    os.makedirs(os.path.dirname(local_target), exist_ok=True)
    rows = 0
    ordered = None if spec.latest_by or table == "studies" else _disjoint_order(catalog, spec, inputs)
    if ordered is not None:
        # Key ranges do not overlap: concatenating the (sorted) files in order is already sorted.
        with pq.ParquetWriter(local_target, spec.schema, **spec.parquet_options()) as writer:
            for source in ordered:
                with _open(catalog, source) as handle:
                    for batch in pq.ParquetFile(handle).iter_batches(batch_size=spec.row_group_size * 8):
                        data = tables.conform(pa.Table.from_batches([batch]), spec.schema)
                        writer.write_table(data, row_group_size=spec.row_group_size)
                        rows += data.num_rows
        pa.default_memory_pool().release_unused()
        return _publish(catalog, local_target, final, rel_out=rel, rows=rows, level=level)
    if True:  # a connection of its own: merging never blocks the catalog's queries
        reader = catalog.compaction_connection().sql(sql).to_arrow_reader(spec.row_group_size * 8)
        with pq.ParquetWriter(local_target, spec.schema, **spec.parquet_options()) as writer:
            pending: list[pa.RecordBatch] = []
            pending_rows = 0
            for batch in reader:
                pending.append(batch)
                pending_rows += batch.num_rows
                if pending_rows >= spec.row_group_size * 8:
                    data = pa.Table.from_batches(pending).cast(spec.schema)
                    writer.write_table(data, row_group_size=spec.row_group_size)
                    rows += data.num_rows
                    pending, pending_rows = [], 0
            if pending:
                data = pa.Table.from_batches(pending).cast(spec.schema)
                writer.write_table(data, row_group_size=spec.row_group_size)
                rows += data.num_rows
    pa.default_memory_pool().release_unused()
    return _publish(catalog, local_target, final, rel_out=rel, rows=rows, level=level)


def _publish(
    catalog: TableEngine, local_target: str, final: str, rel_out: str, rows: int, level: int
) -> dict[str, Any]:
    digest, size = cfs.sha256_file(local_target)  # recorded in the log entry, checked on every read
    if not catalog.local:
        try:
            catalog.fs.put_file(local_target, final)
        finally:
            os.unlink(local_target)
    return {"path": rel_out, "rows": rows, "level": level, "sha256": digest, "size": size}


def _open(catalog: TableEngine, rel: str) -> Any:
    path = catalog.read_path(rel)
    return catalog.fs.open(path, "rb") if path.startswith("s3://") else open(path, "rb")


def _disjoint_order(catalog: TableEngine, spec: tables.TableSpec, inputs: list[str]) -> list[str] | None:
    """The inputs ordered by key when their ranges of the first sort key do not overlap, else None."""
    key = spec.sort_keys[0]
    ranges = []
    for rel in inputs:
        with _open(catalog, rel) as handle:
            meta = pq.ParquetFile(handle).metadata
        col = meta.schema.to_arrow_schema().get_field_index(key)
        lo = hi = None
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(col).statistics
            if stats is None or not stats.has_min_max:
                return None
            lo = stats.min if lo is None or stats.min < lo else lo
            hi = stats.max if hi is None or stats.max > hi else hi
        if lo is None:
            continue  # an empty file adds nothing
        ranges.append((lo, hi, rel))
    ranges.sort()
    for (_, hi, _), (lo, _, _) in zip(ranges, ranges[1:]):
        if not hi < lo:
            return None
    return [rel for _, _, rel in ranges]


def _groups(state: State, table: str, fanout: int, force: bool) -> list[tuple[list[str], int]]:
    files = list(state.files.get(table, {}).values())
    if force:
        if len(files) > 1 or any(f.level == 0 for f in files):
            return [([f.path for f in sorted(files, key=lambda f: (f.seq, f.path))], max(f.level for f in files) + 1)]
        return []
    by_level: dict[int, list[Any]] = {}
    for f in files:
        by_level.setdefault(f.level, []).append(f)
    for level in sorted(by_level):
        group = by_level[level]
        if len(group) >= fanout:
            return [([f.path for f in sorted(group, key=lambda f: (f.seq, f.path))], level + 1)]
    return []


def compact(
    catalog: TableEngine | HasEngine,
    fanout: int = DEFAULT_FANOUT,
    force: bool = False,
    vacuum_grace_s: float | None = None,
    checkpoint: bool = True,
) -> CompactionResult:
    """Merge files until no level holds `fanout` files (force: one file per table); vacuum; checkpoint.

    Callable by a flow at any time, from any process, while others write. `catalog` is a Catalog or
    its TableEngine.
    """
    if not isinstance(catalog, TableEngine):
        catalog = catalog.engine
    grace = catalog.vacuum_grace_s if vacuum_grace_s is None else vacuum_grace_s
    merged: dict[str, tuple[int, int]] = {}
    last_seq = 0
    for table in tables.TABLES:
        for _round in range(16):
            state = catalog.refresh()
            groups = _groups(state, table, fanout, force and _round == 0)
            if not groups:
                break
            inputs, level = groups[0]
            record = _merge(catalog, table, inputs, level)

            def build(
                st: State,
                seq: int,
                now: Any,
                inputs: list[str] = inputs,
                record: dict[str, Any] = record,
                table: str = table,
            ) -> Any:
                live = st.files.get(table, {})
                if not all(p in live for p in inputs):
                    return None  # another compaction merged some of them first
                return CommitPlan(prewritten={table: [record]}, remove={table: inputs}, result=True)

            seq, done = catalog.commit("compact", build)
            if not done:
                catalog.delete_files([record["path"]])
                continue
            last_seq = seq or last_seq
            before = merged.get(table, (0, 0))
            merged[table] = (before[0] + len(inputs), before[1] + record["rows"])
    vacuumed = _vacuum(catalog, grace)
    orphans = _sweep_orphans(catalog, max(grace, 60.0))
    state = catalog.refresh()
    if checkpoint and (merged or vacuumed):
        catalog.log.write_checkpoint(state)
    return CompactionResult(merged, vacuumed, orphans, state.seq)


def _vacuum(catalog: TableEngine, grace: float) -> int:
    """Delete files that compaction removed more than `grace` seconds ago, and record it."""
    state = catalog.refresh()
    cutoff = time.time() - grace
    old = [path for path, at in state.removed if at <= cutoff]
    if not old:
        return 0
    catalog.delete_files(old)

    def build(st: State, seq: int, now: Any) -> Any:
        still = {p for p, _ in st.removed}
        gone = [p for p in old if p in still]
        return CommitPlan(vacuumed=gone, result=len(gone)) if gone else None

    _seq, n = catalog.commit("compact", build)
    return int(n or 0)


def _sweep_orphans(catalog: TableEngine, grace: float) -> int:
    """Remove data files no commit refers to (left by writers that crashed or lost a race)."""
    state = catalog.refresh()
    referenced = {p for files in state.files.values() for p in files} | {p for p, _ in state.removed}
    cutoff = time.time() - grace
    removed = 0
    for table in tables.TABLES:
        folder = cfs.join(catalog.root, f"data/{table}")
        try:
            entries = catalog.fs.ls(folder, detail=True)
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry["name"].rstrip("/").rpartition("/")[2]
            rel = f"data/{table}/{name}"
            if rel in referenced:
                continue
            mtime = entry.get("mtime") or entry.get("created")
            if mtime is None and entry.get("LastModified") is not None:
                mtime = entry["LastModified"].timestamp()
            if mtime is not None and float(mtime) < cutoff:
                catalog.delete_files([rel])
                removed += 1
    if catalog.local:  # temporary files of writers killed while creating an entry, checkpoint or anchor
        for folder in ("_log", "_checkpoints", "_audit"):
            for dirpath, _dirs, names in os.walk(cfs.join(catalog.root, folder)):
                for name in names:
                    path = os.path.join(dirpath, name)
                    try:
                        if name.startswith(cfs.TEMP_PREFIX) and os.path.getmtime(path) < cutoff:
                            os.unlink(path)
                            removed += 1
                    except FileNotFoundError:
                        pass
    return removed
