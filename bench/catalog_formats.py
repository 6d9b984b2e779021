"""Catalog table formats: the home-made log against Delta Lake (delta-rs), on bench/catalog_scale.py's workload.

Runs the same workload on both engines, each in its own process (so peak RSS
is per engine): registration of N studies x 10 instances in chunks (one commit
per chunk), grants in bulk, the final compaction, then the same random queries
("studies site S may see for patient P", "where are the copies of study X").

- home: the catalog exactly as bench/catalog_scale.py drives it (its
  functions are imported, not copied): Catalog with its witness, automatic
  background compaction, `compact(force=True)` at the end.
- delta: one Delta table per catalog table (same Arrow schemas, same rows,
  same `_seq`), `write_deltalake(mode="append")` once per chunk per table
  (the tables of a chunk in parallel threads), at the end `optimize.z_order`
  on each table's leading sort key (`optimize.compact` where there is none),
  `vacuum` and a checkpoint. The queries are the catalog's own SQL
  (`STUDY_AGG`, `STUDY_KEYS`, `visible_sql`, the locate query: the
  effective state of a key is its row with the highest `_seq`), run by
  DuckDB over `DeltaTable.to_pyarrow_dataset()` (`--delta-reader dataset`),
  or over the snapshot's Parquet files read directly (`--delta-reader
  files`: what DuckDB's `delta` extension does for a table without deletion
  vectors; here for reference).

Both engines answer a sample of the same queries; the bench asserts the
answers are equal. Then the concurrency test: `--writers` processes each make
`--commits` small appends to the same table at once (local folder, and with
`--s3` on moto's S3 server too); commits, conflicts (lost races, retried) and
failures are counted. Ends with one JSON line. Targets (1M studies / 10M
instances, 2 cores): >= 200,000 instances/s, both queries p50 <= 20 ms and
p99 <= 100 ms, peak RSS <= 2 GB.

deltalake is a bench-only dependency (not the project's):

    pip install --target /tmp/deltalib deltalake==1.6.6
    PYTHONPATH=/tmp/deltalib python bench/catalog_formats.py --studies 100000
    PYTHONPATH=/tmp/deltalib python bench/catalog_formats.py            # the full 1M / 10M run
    PYTHONPATH=/tmp/deltalib python bench/catalog_formats.py --concurrency-only --s3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import catalog_scale as scale  # noqa: E402

from renkei.catalog import Catalog, normalise, records, tables  # noqa: E402
from renkei.catalog import audit as audit_mod  # noqa: E402
from renkei.catalog import grants as grants_mod  # noqa: E402
from renkei.catalog import locations as locations_mod  # noqa: E402
from renkei.catalog.engine import sql_str  # noqa: E402
from renkei.catalog.studies import STUDY_AGG  # noqa: E402

DELTA_HINT = (
    "this benchmark needs deltalake, a bench-only dependency (not one of the project's): "
    "pip install deltalake==1.6.6 (outside the project's venv, e.g. "
    "`.venv/bin/pip install --target /tmp/deltalib deltalake==1.6.6`, then run with PYTHONPATH=/tmp/deltalib)"
)
ENGINES = ("home", "delta")
# the Delta tables: every catalog table the workload writes or the queries read
DELTA_TABLES = ("studies", "series", "instances", "locations", "grants", "consents", "audit")
# the natural Delta equivalent of the catalog's sorted compacted files: Z-order on the leading sort key
# (Z-order on one column is a sort on it; on several it interleaves them, which would blur patient_id)
ZORDER = {
    "studies": ["patient_id"],
    "series": ["study_uid"],
    "instances": ["study_uid"],
    "locations": ["study_uid"],
    "grants": ["study_uid"],
}
# Locations.locations(uid): its SQL, as the catalog runs it
LOCATE_SQL = (
    f"SELECT study_uid, sop_instance_uid, holder, {locations_mod._LATEST} FROM locations "
    "WHERE study_uid = ?  GROUP BY study_uid, sop_instance_uid, holder "
    "ORDER BY holder, sop_instance_uid"
)
BARS = {"register_ips": 200_000, "p50_ms": 20, "p99_ms": 100, "peak_rss_mb": 2048}


def require_deltalake() -> Any:
    try:
        import deltalake
    except ImportError:
        sys.exit(DELTA_HINT)
    return deltalake


# ------------------------------------------------------------------ the workload
def chunks(args: argparse.Namespace, n_patients: int, timing: dict[str, float]) -> Iterator[tuple[pa.Table, pa.Table]]:
    """catalog_scale's registration chunks, same seed (so both engines get the same rows)."""
    rng = np.random.default_rng(42)
    start = 0
    while start < args.studies:
        count = min(args.chunk_studies, args.studies - start)
        t0 = time.perf_counter()
        chunk = scale.make_chunk(start, count, args.instances_per_study, n_patients, rng)
        timing["generate_s"] += time.perf_counter() - t0
        yield chunk
        start += count


def grant_tables(args: argparse.Namespace, n_patients: int) -> Iterator[pa.Table]:
    """catalog_scale's grants (the source system's rules), in the same bulk chunks."""
    start = 0
    while start < args.studies:
        count = min(args.chunk_studies * 5, args.studies - start)
        ids = np.arange(start, start + count, dtype=np.int64)
        site_idx = scale.patient_of(ids, n_patients) % len(scale.SITES)
        clinic = site_idx != 0
        hub_to_clinic = (site_idx == 0) & (ids % 5 == 0)
        pick = clinic | hub_to_clinic
        n = int(pick.sum())
        target = np.where(clinic, "hub", np.array(scale.SITES, dtype=object)[1 + ids % 3])[pick]
        yield pa.table(
            {
                "study_uid": scale.study_uids(ids[pick]),
                "site": pa.array(target, pa.string()),
                "by_kind": pa.array(["rule"] * n),
                "by": pa.array(
                    np.where(clinic, "clinic-studies-to-hub", "hub-exam-to-referring-clinic")[pick], pa.string()
                ),
                "reason": pa.array(["policy"] * n),
                "policy_version": pa.array(["1"] * n),
            }
        )
        start += count


def query_plan(args: argparse.Namespace, n_patients: int, count: int, seed: int) -> list[tuple[str, str, str, str]]:
    """(site, patient_id, issuer, study_uid) of catalog_scale.run_queries's queries, in its order."""
    qrng = random.Random(seed)
    plan = []
    for _ in range(count):
        sid = qrng.randrange(args.studies)
        patient = int(scale.patient_of(np.array([sid]), n_patients)[0])
        origin = scale.SITES[patient % len(scale.SITES)]
        site = qrng.choice(scale.SITES)
        plan.append((site, f"P{patient}", scale.ISSUERS[origin], f"{scale.ROOT}.{sid + 1_000_000_000}"))
    return plan


def visible_answer(rows: list[Any]) -> list[list[Any]]:
    """What both engines must agree on for "studies site S may see for patient P"."""
    return sorted(
        [r.study_uid, r.origin_site, r.patient_id, list(r.modalities), r.series_count, r.instance_count, r.bytes]
        for r in rows
    )


def locate_answer(rows: list[Any]) -> list[list[Any]]:
    return [[r.holder, r.sop_instance_uid, r.state] for r in rows]


def summary(
    name: str, register_s: float, total_instances: int, visible_ms: list[float], locate_ms: list[float]
) -> dict[str, Any]:
    return {
        "engine": name,
        "instances": total_instances,
        "register_s": round(register_s, 2),
        "register_ips": round(total_instances / register_s),
        "visible_p50_ms": round(statistics.median(visible_ms), 2),
        "visible_p99_ms": round(scale.pct(visible_ms, 0.99), 2),
        "locate_p50_ms": round(statistics.median(locate_ms), 2),
        "locate_p99_ms": round(scale.pct(locate_ms, 0.99), 2),
    }


# ------------------------------------------------------------------ engine: home-made
def run_home(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    url = str(work / "catalog")
    n_patients = max(1, args.studies // 3)
    timing = {"generate_s": 0.0}
    cat = Catalog(url, auto_compact=args.auto_compact or None, writer="bench", backup_url=str(work / "witness"))
    try:
        total_instances, register_s = 0, 0.0
        for studies, instances in chunks(args, n_patients, timing):
            t0 = time.perf_counter()
            result = cat.register_tables(studies, instances)
            register_s += time.perf_counter() - t0
            assert result.new_instances == instances.num_rows, result
            total_instances += instances.num_rows
        t0 = time.perf_counter()
        cat.wait_for_compaction()  # the writer's own background compaction counts as registration work
        register_s += time.perf_counter() - t0

        t0 = time.perf_counter()
        grants = sum(cat.grant_table(t, skip_unchanged=False) for t in grant_tables(args, n_patients))
        grants_s = time.perf_counter() - t0
        cat.wait_for_compaction()

        files_before = sum(cat.file_counts().values())
        before = scale.run_queries(cat, args, n_patients, max(100, args.queries // 5), seed=5)
        rss_before_compaction = round(scale.rss_mb())
        t0 = time.perf_counter()
        cat.compact(force=True)
        compact_s = time.perf_counter() - t0
        files = sum(cat.file_counts().values())

        visible_ms, locate_ms, found = scale.run_queries(cat, args, n_patients, args.queries, seed=7)
        answers = [
            [visible_answer(cat.visible_studies(site, [(pid, issuer)])), locate_answer(cat.locations(uid))]
            for site, pid, issuer, uid in query_plan(args, n_patients, args.check, seed=11)
        ]
        total = sum(t.instances for t in cat.totals())
        assert total == total_instances, (total, total_instances)
        return {
            **summary("home", register_s, total_instances, visible_ms, locate_ms),
            "generate_s": round(timing["generate_s"], 2),
            "grants": grants,
            "grants_s": round(grants_s, 2),
            "compact_s": round(compact_s, 2),
            "peak_rss_mb_before_compaction": rss_before_compaction,
            "files_before_final_compaction": files_before,
            "files_after_compaction": files,
            "visible_p50_ms_before_final_compaction": round(statistics.median(before[0]), 2),
            "locate_p50_ms_before_final_compaction": round(statistics.median(before[1]), 2),
            "visible_rows_per_query": round(found / args.queries, 2),
            "answers": answers,
        }
    finally:
        cat.close()


# ------------------------------------------------------------------ engine: Delta Lake
class DeltaCatalog:
    """The catalog's tables as Delta tables under `root`, written with delta-rs and queried with DuckDB."""

    def __init__(self, root: str, reader: str, storage_options: dict[str, str] | None = None) -> None:
        from deltalake import DeltaTable, WriterProperties

        self.root = root
        self.reader = reader
        self.storage_options = storage_options
        self.paths = {name: f"{root}/{name}" for name in DELTA_TABLES}
        self.props = {
            name: WriterProperties(compression="ZSTD", max_row_group_size=tables.TABLES[name].row_group_size)
            for name in DELTA_TABLES
        }
        for name in DELTA_TABLES:
            DeltaTable.create(self.paths[name], schema=tables.TABLES[name].schema, storage_options=storage_options)
        self.dts = {name: DeltaTable(self.paths[name], storage_options=storage_options) for name in DELTA_TABLES}
        self.con = duckdb.connect(
            config={
                "memory_limit": "768MB",
                "threads": max(1, min(4, os.cpu_count() or 1)),
                "preserve_insertion_order": False,
            }
        )
        self.con.execute("SET parquet_metadata_cache = true")
        self.pool = ThreadPoolExecutor(max_workers=len(DELTA_TABLES))
        self.seq = 0  # our commit number: the `_seq` of every row of one logical commit
        self.audit_count = 0
        self.audit_head = audit_mod.GENESIS
        self.versions: dict[str, int] = {}

    def close(self) -> None:
        self.pool.shutdown()
        self.con.close()

    def append(self, rows: dict[str, pa.Table]) -> None:
        """One Delta commit per table (in parallel): Delta has no commit across tables."""
        from deltalake import write_deltalake

        def write(item: tuple[str, pa.Table]) -> None:
            name, data = item
            write_deltalake(
                self.dts[name],
                tables.conform(data, tables.TABLES[name].schema),
                mode="append",
                writer_properties=self.props[name],
            )

        list(self.pool.map(write, [(n, d) for n, d in rows.items() if d.num_rows]))

    def audit_rows(self, drafts: list[audit_mod.AuditDraft], now: dt.datetime) -> pa.Table:
        rows, self.audit_head = audit_mod.build_rows(drafts, self.audit_count + 1, self.audit_head, now, self.seq)
        self.audit_count += len(drafts)
        return rows

    def refresh(self, names: tuple[str, ...] = DELTA_TABLES) -> None:
        """Point DuckDB's views at each table's latest snapshot (if it changed).

        Every query calls it for the tables it reads, as the catalog looks for a newer log entry before
        each query: both answer on the latest committed state.
        """
        for name in names:
            table = self.dts[name]
            table.update_incremental()
            version = table.version()
            if self.versions.get(name) == version:
                continue
            if self.reader == "dataset":
                self.con.register(name, table.to_pyarrow_dataset())
            else:
                files = table.file_uris()
                if files:
                    listing = ", ".join(sql_str(f) for f in files)
                    self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM read_parquet([{listing}])")
                else:
                    self.con.register(f"_empty_{name}", tables.TABLES[name].schema.empty_table())
                    self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * FROM _empty_{name}")
            self.versions[name] = version

    def register(self, studies: pa.Table, instances: pa.Table, check_existing: bool) -> int:
        """catalog.register_tables's rows for one chunk (validated, with object keys), appended to Delta."""
        studies = normalise.normalise_studies(studies)
        instances = normalise.normalise_instances(instances, studies)
        self.seq += 1
        now = dt.datetime.now(dt.UTC)
        con = self.con
        con.register("_new_studies", studies)
        con.register("_fresh", instances)
        try:
            if check_existing:  # what the catalog checks before a commit: instances and series already there
                self.refresh()
                known = con.execute(
                    "SELECT count(*) FROM instances e JOIN _fresh n "
                    "ON e.study_uid = n.study_uid AND e.sop_instance_uid = n.sop_instance_uid"
                ).fetchall()
                assert known == [(0,)], known
            series = con.sql(
                "SELECT study_uid, series_uid, any_value(modality) AS modality, "
                "any_value(series_number) AS series_number, any_value(series_description) AS series_description, "
                "any_value(origin_site) AS origin_site FROM _fresh GROUP BY study_uid, series_uid"
            ).to_arrow_table()
            con.register("_fresh_series", series)
            deltas = con.sql(
                "WITH i AS (SELECT study_uid, count(*) AS n, sum(size) AS b FROM _fresh GROUP BY study_uid), "
                "s AS (SELECT study_uid, count(*) AS n FROM _fresh_series GROUP BY study_uid) "
                "SELECT t.*, coalesce(s.n, 0)::BIGINT AS series_added, coalesce(i.n, 0)::BIGINT AS instances_added, "
                "coalesce(i.b, 0)::BIGINT AS bytes_added FROM _new_studies t "
                "LEFT JOIN i USING (study_uid) LEFT JOIN s USING (study_uid)"
            ).to_arrow_table()
        finally:
            for name in ("_new_studies", "_fresh", "_fresh_series"):
                con.unregister(name)
        n = studies.num_rows

        def stamp(data: pa.Table) -> pa.Table:
            n_rows = data.num_rows
            data = data.append_column("registered_at", normalise.const_column(now, n_rows, tables.TS))
            return data.append_column("_seq", normalise.const_column(self.seq, n_rows, pa.int64()))

        locations = pa.table(
            {
                "study_uid": studies.column("study_uid"),
                "sop_instance_uid": normalise.const_column("", n),
                "holder": normalise.const_column(tables.CENTER, n),
                "state": normalise.const_column("present", n),
                "verified_at": pa.nulls(n, tables.TS),
                "detail": normalise.const_column("", n),
                "by": normalise.const_column("bench", n),
                "at": normalise.const_column(now, n, tables.TS),
                "_seq": normalise.const_column(self.seq, n, pa.int64()),
            }
        )
        sites = studies.column("origin_site").to_pylist()
        draft = audit_mod.AuditDraft(
            normalise.origin_sites_text(sites),
            "bench",
            "register",
            None,
            None,
            "ok",
            {"holder": tables.CENTER, "studies": n, "new_instances": instances.num_rows},
        )
        self.append(
            {
                "instances": stamp(instances),
                "series": stamp(series),
                "studies": stamp(deltas),
                "locations": locations,
                "audit": self.audit_rows([draft], now),
            }
        )
        return instances.num_rows

    def grant(self, table: pa.Table) -> int:
        """catalog.grant_table(skip_unchanged=False)'s rows: the grants and one audit event each."""
        n = table.num_rows
        self.seq += 1
        now = dt.datetime.now(dt.UTC)
        cols = {name: table.column(name) for name in ("study_uid", "site")}
        cols["action"] = normalise.const_column(tables.GRANT, n)
        for name in ("by_kind", "by", "reason"):
            cols[name] = table.column(name)
        cols["rule"] = pa.nulls(n, pa.string())
        cols["policy_version"] = table.column("policy_version")
        grants = pa.table(cols)
        drafts = [
            audit_mod.AuditDraft(
                tables.CENTER,
                r["by"],
                r["action"],
                r["study_uid"],
                r["site"],
                "ok",
                {
                    "by_kind": r["by_kind"],
                    "reason": r["reason"],
                    "rule": r["rule"],
                    "policy_version": r["policy_version"],
                },
            )
            for r in grants.to_pylist()
        ]
        grants = grants.append_column("at", normalise.const_column(now, n, tables.TS)).append_column(
            "_seq", normalise.const_column(self.seq, n, pa.int64())
        )
        self.append({"grants": grants, "audit": self.audit_rows(drafts, now)})
        return n

    def compact(self) -> dict[str, int]:
        """Z-order (or compact) every table, vacuum what it replaced, checkpoint; returns files per table."""
        files = {}
        for name, table in self.dts.items():
            table.update_incremental()
            if not table.file_uris():
                files[name] = 0
                continue
            if name in ZORDER:
                table.optimize.z_order(ZORDER[name], writer_properties=self.props[name])
            else:
                table.optimize.compact(writer_properties=self.props[name])
            table.vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
            table.create_checkpoint()
            files[name] = len(table.file_uris())
        return files

    def file_count(self) -> int:
        for table in self.dts.values():
            table.update_incremental()
        return sum(len(t.file_uris()) for t in self.dts.values())

    def _rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        cur = self.con.execute(sql, params)  # as the catalog's engine.rows
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def visible_studies(self, site: str, pid: str, issuer: str) -> list[records.StudyRow]:
        """Grants.visible_studies(site, [(pid, issuer)]): the same SQL, step by step."""
        self.refresh(("studies", "grants", "consents"))
        candidates = self._rows(
            f"SELECT study_uid, {STUDY_AGG} FROM studies "
            "WHERE ((patient_id = ? AND issuer_of_patient_id = ?)) GROUP BY study_uid ",
            [pid, issuer],
        )
        if not candidates:
            return []
        others = [r["study_uid"] for r in candidates if r["origin_site"] != site]
        granted: set[str] = set()
        if others:
            cond = "study_uid IN (" + ", ".join(sql_str(u) for u in others) + ")"
            granted = {
                r["study_uid"]
                for r in self._rows(
                    f"WITH vs AS (SELECT {grants_mod.STUDY_KEYS} FROM studies WHERE {cond} GROUP BY study_uid), "
                    + grants_mod.visible_sql("vs", one_site=True)
                    + " SELECT DISTINCT study_uid FROM visible WHERE site = ?",
                    [site, site],
                )
            }
        rows = [records.study_row(r) for r in candidates if r["origin_site"] == site or r["study_uid"] in granted]
        rows.sort(key=lambda r: (r.study_date, r.study_time, r.study_uid))
        return rows

    def locations(self, study_uid: str) -> list[records.LocationRecord]:
        self.refresh(("locations",))
        return [records.location_record(r) for r in self._rows(LOCATE_SQL, [study_uid])]

    def totals(self) -> int:
        return self.con.execute("SELECT count(*) FROM instances").fetchall()[0][0]


def time_queries(
    plan: list[tuple[str, str, str, str]],
    visible: Callable[[str, str, str], list[Any]],
    locate: Callable[[str], list[Any]],
) -> tuple[list[float], list[float], int]:
    visible_ms, locate_ms, found = [], [], 0
    for site, pid, issuer, uid in plan:
        t0 = time.perf_counter()
        rows = visible(site, pid, issuer)
        visible_ms.append((time.perf_counter() - t0) * 1000)
        found += len(rows)
        t0 = time.perf_counter()
        locs = locate(uid)
        locate_ms.append((time.perf_counter() - t0) * 1000)
        assert locs and locs[0].holder == tables.CENTER, (uid, locs)
    return visible_ms, locate_ms, found


def run_delta(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    require_deltalake()
    n_patients = max(1, args.studies // 3)
    timing = {"generate_s": 0.0}
    cat = DeltaCatalog(str(work / "delta"), args.delta_reader)
    try:
        total_instances, register_s = 0, 0.0
        for studies, instances in chunks(args, n_patients, timing):
            t0 = time.perf_counter()
            total_instances += cat.register(studies, instances, check_existing=args.delta_check_existing)
            register_s += time.perf_counter() - t0
            if args.progress:
                print(f"  delta: {total_instances:,} instances, {register_s:.0f} s", file=sys.stderr, flush=True)

        t0 = time.perf_counter()
        grants = sum(cat.grant(t) for t in grant_tables(args, n_patients))
        grants_s = time.perf_counter() - t0

        files_before = cat.file_count()
        cat.refresh()
        before = time_queries(
            query_plan(args, n_patients, max(100, args.queries // 5), seed=5), cat.visible_studies, cat.locations
        )
        rss_before_compaction = round(scale.rss_mb())
        t0 = time.perf_counter()
        files = cat.compact()
        compact_s = time.perf_counter() - t0
        cat.refresh()

        visible_ms, locate_ms, found = time_queries(
            query_plan(args, n_patients, args.queries, seed=7), cat.visible_studies, cat.locations
        )
        answers = [
            [visible_answer(cat.visible_studies(site, pid, issuer)), locate_answer(cat.locations(uid))]
            for site, pid, issuer, uid in query_plan(args, n_patients, args.check, seed=11)
        ]
        total = cat.totals()
        assert total == total_instances, (total, total_instances)
        return {
            **summary("delta", register_s, total_instances, visible_ms, locate_ms),
            "generate_s": round(timing["generate_s"], 2),
            "grants": grants,
            "grants_s": round(grants_s, 2),
            "compact_s": round(compact_s, 2),
            "peak_rss_mb_before_compaction": rss_before_compaction,
            "files_before_final_compaction": files_before,
            "files_after_compaction": sum(files.values()),
            "visible_p50_ms_before_final_compaction": round(statistics.median(before[0]), 2),
            "locate_p50_ms_before_final_compaction": round(statistics.median(before[1]), 2),
            "visible_rows_per_query": round(found / args.queries, 2),
            "delta_reader": args.delta_reader,
            "delta_check_existing": args.delta_check_existing,
            "answers": answers,
        }
    finally:
        cat.close()


# ------------------------------------------------------------------ concurrent writers
def _wait_for(start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))


def _home_writer(url: str, w: int, commits: int, start_at: float, s3: dict[str, str] | None) -> dict[str, Any]:
    """`commits` small commits (one location row each) to one catalog; lost races counted."""
    cat = Catalog(url, writer=f"w{w}", s3_options=s3, backup_url=url + "-witness")
    lost = {"n": 0}
    create = cat.log.try_create

    def counted(seq: int, entry: dict[str, Any], *a: Any, **k: Any) -> bool:
        won = create(seq, entry, *a, **k)
        lost["n"] += not won
        return won

    cat.log.try_create = counted  # type: ignore[method-assign]
    ok = failed = 0
    _wait_for(start_at)
    t0 = time.perf_counter()
    for i in range(commits):
        try:
            cat.set_location(f"{scale.ROOT}.{w}.{i}", f"edge:clinic-{'abc'[w % 3]}", "present", by=f"w{w}")
            ok += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failed += 1
            print(f"home writer {w}: {type(exc).__name__}: {exc}", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    cat.wait_for_compaction()
    cat.close()
    return {"ok": ok, "conflicts": lost["n"], "failed": failed, "s": elapsed}


def _delta_writer(
    path: str, w: int, commits: int, start_at: float, storage: dict[str, str] | None, retries: int | None
) -> dict[str, Any]:
    """`commits` one-row appends to one Delta table. retries=0: delta-rs does not retry a lost race
    itself, we do (and count it); None: its default (15 internal retries, not visible to us)."""
    from deltalake import CommitProperties, write_deltalake
    from deltalake.exceptions import CommitFailedError

    props = CommitProperties(max_commit_retries=retries) if retries is not None else None
    ok = failed = conflicts = 0
    _wait_for(start_at)
    t0 = time.perf_counter()
    for i in range(commits):
        row = pa.table(
            {
                "study_uid": [f"{scale.ROOT}.{w}.{i}"],
                "sop_instance_uid": [""],
                "holder": [f"edge:clinic-{'abc'[w % 3]}"],
                "state": ["present"],
                "verified_at": pa.nulls(1, tables.TS),
                "detail": [""],
                "by": [f"w{w}"],
                "at": pa.array([dt.datetime.now(dt.UTC)], tables.TS),
                "_seq": pa.array([w * commits + i], pa.int64()),
            },
            schema=tables.LOCATIONS,
        )
        for _attempt in range(200):
            try:
                write_deltalake(path, row, mode="append", storage_options=storage, commit_properties=props)
                ok += 1
                break
            except CommitFailedError:
                conflicts += 1
                time.sleep(random.uniform(0, 0.01))
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failed += 1
                print(f"delta writer {w}: {type(exc).__name__}: {exc}", file=sys.stderr)
                break
        else:
            failed += 1
    return {"ok": ok, "conflicts": conflicts, "failed": failed, "s": time.perf_counter() - t0}


def _writer_main(engine: str, target: str, w: int, commits: int, start_at: float, extra: dict[str, Any]) -> None:
    if engine == "home":
        out = _home_writer(target, w, commits, start_at, extra.get("s3"))
    else:
        out = _delta_writer(target, w, commits, start_at, extra.get("storage"), extra.get("retries"))
    extra["queue"].put(out)


def concurrency(
    engine: str,
    target: str,
    writers: int,
    commits: int,
    extra: dict[str, Any],
    check: Callable[[dict[str, int]], dict[str, Any]],
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 3.0 + writers * 0.5  # every process imported and connected before the start
    procs = [
        ctx.Process(target=_writer_main, args=(engine, target, w, commits, start_at, {**extra, "queue": queue}))
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=900) for _ in procs]
    for p in procs:
        p.join()
    wall = max(r["s"] for r in results)
    return {
        "writers": writers,
        "commits_each": commits,
        "ok": sum(r["ok"] for r in results),
        "conflicts": sum(r["conflicts"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "wall_s": round(wall, 2),
        "commits_per_s": round(sum(r["ok"] for r in results) / wall, 1),
        **check({"n": sum(r["ok"] for r in results)}),
    }


def run_concurrency(args: argparse.Namespace, work: Path, where: str, s3: Any = None) -> dict[str, Any]:
    """Both engines: `writers` processes x `commits` small commits to one table at once."""
    out: dict[str, Any] = {}
    n = args.writers * args.commits
    if "home" in args.engines:
        if s3 is None:
            url, s3_options = str(work / "conc-home"), None
        else:
            url, s3_options = f"s3://{s3['bucket']}/conc-home", s3["renkei"]
        Catalog(url, s3_options=s3_options, writer="init").close()

        def home_check(ok: dict[str, int]) -> dict[str, Any]:
            cat = Catalog(url, s3_options=s3_options, writer="check")
            try:
                rows = cat._engine.rows("SELECT count(*) AS n FROM locations")[0]["n"]
                return {"rows": rows, "rows_ok": rows == ok["n"], "log_entries": cat.state.seq}
            finally:
                cat.close()

        out["home"] = concurrency("home", url, args.writers, args.commits, {"s3": s3_options}, home_check)
    if "delta" in args.engines:
        from deltalake import DeltaTable

        storage = None if s3 is None else s3["delta"]
        for label, retries in (("delta", None), ("delta_no_internal_retry", 0)):
            path = str(work / f"conc-{label}") if s3 is None else f"s3://{s3['bucket']}/conc-{label}"
            DeltaTable.create(path, schema=tables.LOCATIONS, storage_options=storage)

            def delta_check(ok: dict[str, int], path: str = path) -> dict[str, Any]:
                table = DeltaTable(path, storage_options=storage)
                rows = table.to_pyarrow_dataset().count_rows()
                return {"rows": rows, "rows_ok": rows == ok["n"], "versions": table.version()}

            out[label] = concurrency(
                "delta", path, args.writers, args.commits, {"storage": storage, "retries": retries}, delta_check
            )
    for name, r in out.items():
        print(
            f"  [{where}] {name:>24}: {r['ok']}/{n} commits, {r['conflicts']} conflicts (lost races, retried), "
            f"{r['failed']} failed, {r['wall_s']} s ({r['commits_per_s']}/s); rows {r['rows']} "
            f"({'= the commits made' if r['rows_ok'] else 'WRONG: not the commits made'})"
        )
    return out


def moto_s3(work: Path) -> tuple[Any, dict[str, Any]]:
    """moto's S3 server (as the tests run it), a bucket, and the options of both engines for it."""
    from renkei import peers

    peer = peers.start_moto(work / "moto")
    bucket = f"bench-{os.getpid()}"
    peer.filesystem().mkdir(bucket)
    for key, value in peer.env().items():
        os.environ[key] = value
    renkei_opts = {"endpoint_url": peer.endpoint_url, "key": peer.access_key, "secret": peer.secret_key}
    delta_opts = {
        "AWS_ENDPOINT_URL": peer.endpoint_url,
        "AWS_ACCESS_KEY_ID": peer.access_key,
        "AWS_SECRET_ACCESS_KEY": peer.secret_key,
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
    }
    return peer, {"bucket": bucket, "renkei": renkei_opts, "delta": delta_opts}


# ------------------------------------------------------------------ main
def run_engine_subprocess(engine: str, argv: list[str], work: Path) -> dict[str, Any]:
    result = work / f"{engine}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--engine-run", engine, "--result", str(result)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the {engine} engine failed (exit {proc.returncode})")
    out = json.loads(result.read_text())
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


def engine_main(args: argparse.Namespace) -> int:
    """Inside the engine's own process: run it, write its figures (with ru_maxrss) to --result."""
    work = Path(args.dir) / args.engine_run
    work.mkdir(parents=True, exist_ok=True)
    try:
        out = (run_home if args.engine_run == "home" else run_delta)(args, work)
        out["peak_rss_mb"] = round(scale.rss_mb())
        out["on_disk_mb"] = round(sum(f.stat().st_size for f in work.rglob("*") if f.is_file()) / 2**20)
        Path(args.result).write_text(json.dumps(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def print_table(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    rows = [
        ("registration, instances/s", "register_ips", ">= 200,000", 1),
        ("visible p50 ms", "visible_p50_ms", "<= 20", 0),
        ("visible p99 ms", "visible_p99_ms", "<= 100", 0),
        ("locate p50 ms", "locate_p50_ms", "<= 20", 0),
        ("locate p99 ms", "locate_p99_ms", "<= 100", 0),
        ("compaction s", "compact_s", "", 0),
        ("peak RSS MB", "peak_rss_mb", "<= 2048", 0),
        ("peak RSS MB before final compaction", "peak_rss_mb_before_compaction", "", 0),
        ("grants s", "grants_s", "", 0),
        ("files before final compaction", "files_before_final_compaction", "", 0),
        ("files after compaction", "files_after_compaction", "", 0),
        ("visible p50 ms, before compaction", "visible_p50_ms_before_final_compaction", "", 0),
        ("locate p50 ms, before compaction", "locate_p50_ms_before_final_compaction", "", 0),
        ("on disk MB", "on_disk_mb", "", 0),
    ]
    home, delta = results.get("home"), results.get("delta")
    ratios = {}
    print(f"{'':36} {'home':>12} {'delta':>12} {'delta/home':>11}  target")
    for label, key, target, _ in rows:
        h = home.get(key) if home else None
        d = delta.get(key) if delta else None
        ratio = d / h if isinstance(h, (int, float)) and isinstance(d, (int, float)) and h else None
        if ratio is not None:
            ratios[key] = round(ratio, 2)
        fmt = lambda v: "-" if v is None else (f"{v:,}" if isinstance(v, int) else f"{v:,.2f}")  # noqa: E731
        print(f"{label:36} {fmt(h):>12} {fmt(d):>12} {('-' if ratio is None else f'{ratio:.2f}'):>11}  {target}")
    return ratios


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=1_000_000)
    ap.add_argument("--instances-per-study", type=int, default=10)
    ap.add_argument("--chunk-studies", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--auto-compact", type=int, default=16, help="home: level-0 files per table before compacting")
    ap.add_argument("--check", type=int, default=200, help="queries whose answers both engines must agree on")
    ap.add_argument("--engines", default="home,delta", help="comma-separated: home, delta")
    ap.add_argument(
        "--delta-reader",
        choices=("dataset", "files"),
        default="dataset",
        help="DuckDB over DeltaTable.to_pyarrow_dataset() (default), or over the snapshot's files (reference)",
    )
    ap.add_argument(
        "--delta-check-existing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="delta: look up the chunk's instances among the registered ones before appending, as the catalog does",
    )
    ap.add_argument("--writers", type=int, default=4, help="concurrency test: writer processes")
    ap.add_argument("--commits", type=int, default=50, help="concurrency test: small commits per writer")
    ap.add_argument("--no-concurrency", action="store_true", help="skip the concurrency test")
    ap.add_argument("--concurrency-only", action="store_true", help="only the concurrency test")
    ap.add_argument("--s3", action="store_true", help="also run the concurrency test on moto's S3 server")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--dir", help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--engine-run", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.engine_run:
        return engine_main(args)
    if "delta" in args.engines:
        require_deltalake()

    work = Path(args.dir or tempfile.mkdtemp(prefix="renkei-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    argv, skip = [], False
    for a in sys.argv[1:]:  # the engines get the scratch folder, and every other option as given
        if skip or a.startswith("--dir"):
            skip = a == "--dir"
            continue
        argv.append(a)
    argv += ["--dir", str(work)]
    try:
        results: dict[str, dict[str, Any]] = {}
        for engine in [] if args.concurrency_only else args.engines:
            load = os.getloadavg()
            results[engine] = run_engine_subprocess(engine, argv, work)
            results[engine]["load_before"] = [round(x, 2) for x in load]
            results[engine]["load_after"] = [round(x, 2) for x in os.getloadavg()]
        answers = {e: r.pop("answers") for e, r in results.items()}
        same = None
        if len(answers) == 2:
            mismatched = [i for i, (a, b) in enumerate(zip(answers["home"], answers["delta"])) if a != b]
            same = not mismatched
            assert same, f"the engines disagree on {len(mismatched)} of {args.check} queries, e.g. #{mismatched[0]}"
        ratios = {}
        if results:
            print(f"\n{args.studies:,} studies x {args.instances_per_study} instances, {args.queries} queries per kind")
            ratios = print_table(results)
        for e, r in results.items():
            print(f"  {e}: load average before {r['load_before']}, after {r['load_after']}; wall {r['wall_s']} s")
        if same is not None:
            print(f"answers: both engines agree on all {args.check} sampled queries (visible studies and locations)")
        conc: dict[str, Any] = {}
        if not args.no_concurrency:
            load = os.getloadavg()
            print(f"concurrency: {args.writers} processes x {args.commits} small commits to one table, at once")
            conc["local"] = run_concurrency(args, work, "local")
            if args.s3:
                peer, s3 = moto_s3(work)
                try:
                    conc["s3_moto"] = run_concurrency(args, work, "s3 moto", s3)
                finally:
                    peer.stop()
            conc["load_before"] = [round(x, 2) for x in load]
            conc["load_after"] = [round(x, 2) for x in os.getloadavg()]
            print(f"  load average before {conc['load_before']}, after {conc['load_after']}")
        out = {
            "studies": args.studies,
            "engines": results,
            "delta_over_home": ratios,
            "answers_agree": same,
            "answers_checked": args.check,
            "concurrency": conc,
        }
        print(json.dumps(out))
        return 0
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
