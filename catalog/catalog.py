"""The catalog: where every study is and who may see it, as Parquet beside the objects.

The storage, the local file cache, DuckDB's views, the one query path and the
commit are catalog.engine's TableEngine; the records are catalog.records, the
input normalisers catalog.normalise. See docs/catalog.md for the design.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from renkei.catalog import audit as audit_mod
from renkei.catalog import fs as cfs
from renkei.catalog import keys, tables
from renkei.catalog.audit import AuditDraft, AuditEvent, AuditVerification
from renkei.catalog.backup import BackupLocation
from renkei.catalog.backup import check as check_catalog
from renkei.catalog.compaction import CompactionResult, compact
from renkei.catalog.engine import DEFAULT_AUTO_COMPACT, TableEngine, check_data_file, sql_str
from renkei.catalog.log import CommitLog, FileEntry, State
from renkei.catalog.normalise import (
    as_ts,
    const_column,
    normalise_grants,
    normalise_instances,
    normalise_studies,
    origin_sites_text,
    validate_grant,
)
from renkei.catalog.records import (
    CommitPlan,
    ConflictRecord,
    ConsentRecord,
    GrantRecord,
    GrantRequest,
    LocationRecord,
    PatientCandidate,
    RegisterResult,
    RegistrationBatch,
    SiteTotals,
    StudyRegistration,
    StudyRow,
    conflict_record,
    consent_record,
    grant_record,
    location_record,
    study_row,
)
from renkei.catalog.search import Search
from renkei.errors import CatalogDamaged, CatalogError, StudyOfAnotherSite, UsageError
from renkei.records import StudyBatch

__all__ = [
    "Catalog",
    "CommitPlan",
    "ConflictRecord",
    "ConsentRecord",
    "GrantRecord",
    "GrantRequest",
    "LocationRecord",
    "PatientCandidate",
    "RegisterResult",
    "RegistrationBatch",
    "SiteTotals",
    "StudyRegistration",
    "StudyRow",
    "check_data_file",
    "origin_sites_text",
    "validate_grant",
]

_STUDY_AGG = ",\n".join(
    [f"arg_max({c}, _seq) AS {c}" for c in tables.STUDY_INFO_FIELDS if c != "study_uid"]
    + [
        "list_sort(list_distinct(flatten(list(modalities)))) AS modalities",
        "sum(series_added)::BIGINT AS series_count",
        "sum(instances_added)::BIGINT AS instance_count",
        "sum(bytes_added)::BIGINT AS bytes",
        "min(registered_at) AS registered_at",
    ]
)


def _visible_sql(studies: str, one_site: bool) -> str:
    """CTEs ending in `visible(site, study_uid, origin_site, why)`: the one visibility rule, as SQL.

    `studies` names a relation with one row per study (study_uid, origin_site,
    patient_id, issuer_of_patient_id). A site sees a study taken there
    ('origin'), and another site's through a grant in force ('grant'); while
    the patient's consent is withdrawn at the origin, only a person's grant
    counts. renkei.policy.decide is the same rule for one study, with its
    explanation; tests check that the two never disagree. With `one_site`, the
    grants are those of one site (a `?` parameter, in this position).
    """
    grants_of = "WHERE site = ? " if one_site else ""
    return f"""
    vg AS (SELECT study_uid, site, arg_max(action, _seq) AS action, arg_max(by_kind, _seq) AS by_kind
           FROM grants {grants_of}GROUP BY study_uid, site),
    vc AS (SELECT site, patient_id, issuer, arg_max(state, _seq) AS state FROM consents
           GROUP BY site, patient_id, issuer),
    visible AS (
        SELECT s.origin_site AS site, s.study_uid, s.origin_site, 'origin' AS why FROM {studies} s
        UNION ALL
        SELECT g.site, s.study_uid, s.origin_site, 'grant' AS why FROM vg g JOIN {studies} s USING (study_uid)
        LEFT JOIN vc c ON c.site = s.origin_site AND c.patient_id = s.patient_id
                      AND c.issuer = s.issuer_of_patient_id
        WHERE g.action = '{tables.GRANT}' AND g.site <> s.origin_site
          AND (c.state IS DISTINCT FROM 'withdrawn' OR g.by_kind = 'person'))"""


_STUDY_KEYS = (
    "study_uid, arg_max(origin_site, _seq) AS origin_site, arg_max(patient_id, _seq) AS patient_id, "
    "arg_max(issuer_of_patient_id, _seq) AS issuer_of_patient_id"
)


class Catalog:
    """The catalog at `url` (a folder or s3://bucket/prefix).

    One instance per process (or thread-safe behind its lock); any number of
    processes may open the same url and write at once. Every query first
    catches up with the commits other writers made. `engine` (catalog.engine)
    holds the storage, the file cache, DuckDB and the commit.
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
    ) -> None:
        self._engine = TableEngine(
            url,
            s3_options,
            writer=writer,
            auto_compact=auto_compact,
            memory_limit=memory_limit,
            threads=threads,
            vacuum_grace_s=vacuum_grace_s,
            background_compaction=background_compaction,
            cache=cache,
            backup_url=backup_url,
            backup_s3_options=backup_s3_options,
            cache_dir=cache_dir,
            compactor=compact,
        )

    @classmethod
    def from_layout(cls, layout: Any, **kwargs: Any) -> Catalog:
        """The catalog of a region: Layout(config, data_dir).catalog_url with the config's S3 options.

        On S3 its data files are cached under the data folder (cache/catalog/<url hash>), shared by
        every catalog the machine's processes open.
        """
        kwargs.setdefault("backup_url", layout.catalog_backup_url)
        url = layout.catalog_url
        if "://" in url and not url.startswith("file://") and kwargs.get("cache", True):
            key = hashlib.sha256(url.encode()).hexdigest()[:16]
            kwargs.setdefault("cache_dir", os.path.join(os.fspath(layout.data_dir), "cache", "catalog", key))
        return cls(url, layout.config.center.s3, **kwargs)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------- the engine's (catalog.engine)
    @property
    def engine(self) -> TableEngine:
        """The table engine every repository of this catalog shares (what compaction drives)."""
        return self._engine

    @property
    def url(self) -> str:
        return self._engine.url

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._engine.fs

    @property
    def root(self) -> str:
        return self._engine.root

    @property
    def local(self) -> bool:
        return self._engine.local

    @property
    def log(self) -> CommitLog:
        return self._engine.log

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        return self._engine.con

    @property
    def writer(self) -> str:
        return self._engine.writer

    @property
    def backup(self) -> BackupLocation | None:
        return self._engine.backup

    @property
    def auto_compact(self) -> int | None:
        return self._engine.auto_compact

    @auto_compact.setter
    def auto_compact(self, value: int | None) -> None:
        self._engine.auto_compact = value

    @property
    def background_compaction(self) -> bool:
        return self._engine.background_compaction

    @background_compaction.setter
    def background_compaction(self, value: bool) -> None:
        self._engine.background_compaction = value

    @property
    def vacuum_grace_s(self) -> float:
        return self._engine.vacuum_grace_s

    @vacuum_grace_s.setter
    def vacuum_grace_s(self, value: float) -> None:
        self._engine.vacuum_grace_s = value

    @property
    def state(self) -> State:
        return self._engine.refresh()

    def refresh(self) -> State:
        """Catch up with every commit made so far (by any process); returns the state."""
        return self._engine.refresh()

    def abs_path(self, rel: str) -> str:
        """The path DuckDB and fsspec use for a file named relative to the catalog root."""
        return self._engine.abs_path(rel)

    def read_path(self, rel: str) -> str:
        """Where to read a data file: its own path, or (S3 with a cache) the local copy of it."""
        return self._engine.read_path(rel)

    def file_counts(self) -> dict[str, int]:
        """How many live Parquet files each table has (what compaction keeps small)."""
        return self._engine.file_counts()

    def compact(self, force: bool = False) -> CompactionResult:
        """Merge small files (see catalog.compaction.compact)."""
        return compact(self._engine, force=force)

    def wait_for_compaction(self, timeout: float | None = None) -> None:
        """Wait until a background compaction started by this process has finished."""
        self._engine.wait_for_compaction(timeout)

    def compaction_connection(self) -> duckdb.DuckDBPyConnection:
        """A second DuckDB connection for compaction, so merging never blocks queries."""
        return self._engine.compaction_connection()

    # ---------------------------------------------------------- registration
    def register(
        self, batch: StudyBatch, origin_site: str | None = None, holder: str = tables.CENTER, actor: str | None = None
    ) -> RegisterResult:
        """Record a study and its instances as held by `holder`; idempotent.

        Instances already registered with the same SHA-256 are counted as
        already present; a different SHA-256 is recorded as a conflict (the
        registered row stays). Returns the RegisterResult.
        """
        origin = origin_site or batch.study.origin_site
        info = batch.study.to_dict()
        info["origin_site"] = origin
        modalities = list(
            dict.fromkeys([*batch.study.modalities, *(i.modality for i in batch.instances if i.modality)])
        )
        info["modalities"] = modalities
        studies = pa.Table.from_pylist([info])
        instances = pa.Table.from_pylist([i.to_dict() for i in batch.instances]) if batch.instances else None
        return self.register_tables(studies, instances, holder=holder, actor=actor)

    def register_many(
        self, batches: Sequence[StudyBatch], holder: str = tables.CENTER, actor: str | None = None
    ) -> RegisterResult:
        """Register several studies in one commit (each batch's study.origin_site is its origin)."""
        infos: list[dict[str, Any]] = []
        inst: list[dict[str, Any]] = []
        for batch in batches:
            info = batch.study.to_dict()
            info["modalities"] = list(
                dict.fromkeys([*batch.study.modalities, *(i.modality for i in batch.instances if i.modality)])
            )
            infos.append(info)
            inst.extend(i.to_dict() for i in batch.instances)
        return self.register_tables(
            pa.Table.from_pylist(infos), pa.Table.from_pylist(inst) if inst else None, holder=holder, actor=actor
        )

    def register_tables(
        self,
        studies: pa.Table,
        instances: pa.Table | None,
        holder: str = tables.CENTER,
        actor: str | None = None,
        audit_each_study: bool | None = None,
    ) -> RegisterResult:
        """The bulk path: studies (StudyInfo columns, with origin_site) and instances (InstanceInfo columns).

        Validates every UID, derives object keys (unless an object_key column
        is given), and commits new instances, series, per-study counts, the
        holder's location and one audit event, all at once.
        """
        studies = normalise_studies(studies)
        instances = normalise_instances(instances, studies)
        origin_sites = sorted(set(studies.column("origin_site").to_pylist()))
        for site in origin_sites:
            keys.validate_site(site)
        study_uids = studies.column("study_uid").to_pylist()
        if audit_each_study is None:
            audit_each_study = len(study_uids) <= 100
        with self._engine.lock:
            self.con.register("_new_studies", studies)
            self.con.register("_new_inst", instances)
            try:
                seq, result = self._engine.commit(
                    "register",
                    lambda state, seq, now: self._plan_register(
                        state, seq, now, studies, instances, holder, actor or self.writer, study_uids, audit_each_study
                    ),
                )
            finally:
                self.con.unregister("_new_studies")
                self.con.unregister("_new_inst")
        if result is None:  # nothing changed
            return RegisterResult(0, instances.num_rows, (), 0, tuple(study_uids), None)
        return RegisterResult(
            result.new_instances, result.already_present, result.conflicts, result.new_series, result.studies, seq
        )

    def _plan_register(
        self,
        state: State,
        seq: int,
        now: dt.datetime,
        studies: pa.Table,
        instances: pa.Table,
        holder: str,
        actor: str,
        study_uids: list[str],
        audit_each_study: bool,
    ) -> CommitPlan | None:
        self._engine.ensure_views()
        con = self.con
        # a site registers only its own studies: a study the catalog holds as another site's
        # (a granted copy C-STOREd back into this site's edge) is refused, never re-owned
        foreign = con.sql(
            "SELECT n.study_uid, n.origin_site AS new_origin, s.origin_site FROM _new_studies n JOIN "
            "(SELECT study_uid, arg_max(origin_site, _seq) AS origin_site FROM studies GROUP BY study_uid) s "
            "ON s.study_uid = n.study_uid WHERE s.origin_site <> n.origin_site"
        ).fetchall()
        if foreign:
            uid, new_origin, origin = foreign[0]
            raise StudyOfAnotherSite(
                f"study {uid} is registered as a study of site {origin}; site {new_origin} cannot register it "
                f"as its own ({len(foreign)} such stud{'y' if len(foreign) == 1 else 'ies'} in this batch)"
            )
        n_in = instances.num_rows
        existing = con.sql(
            "SELECT e.sop_instance_uid, e.sha256, e.object_key, e.study_uid FROM instances e "
            "JOIN _new_inst n ON e.study_uid = n.study_uid AND e.sop_instance_uid = n.sop_instance_uid"
        ).to_arrow_table()
        # duplicates inside the batch itself: keep the first of each SOP Instance UID
        dup_in_batch = 0
        fresh = instances
        if n_in and pc.count_distinct(instances.column("sop_instance_uid")).as_py() != n_in:
            seen: dict[str, str] = {}
            keep = []
            for _i, (sop, sha) in enumerate(
                zip(instances.column("sop_instance_uid").to_pylist(), instances.column("sha256").to_pylist())
            ):
                keep.append(sop not in seen)
                seen.setdefault(sop, sha)
            fresh = instances.filter(pa.array(keep))
            dup_in_batch = n_in - fresh.num_rows
        conflicts: list[ConflictRecord] = []
        already = dup_in_batch
        if existing.num_rows:
            known = dict(
                zip(
                    existing.column("sop_instance_uid").to_pylist(),
                    zip(existing.column("sha256").to_pylist(), existing.column("object_key").to_pylist()),
                )
            )
            mask = pc.invert(pc.is_in(fresh.column("sop_instance_uid"), value_set=existing.column("sop_instance_uid")))
            clashing = fresh.filter(pc.invert(mask))
            versions = {
                (r[0], r[1])
                for r in con.execute(
                    "SELECT c.sop_instance_uid, c.new_sha256 FROM conflicts c JOIN _new_inst n "
                    "ON c.study_uid = n.study_uid AND c.sop_instance_uid = n.sop_instance_uid"
                ).fetchall()
            }
            for row in clashing.select(
                ["study_uid", "series_uid", "sop_instance_uid", "sha256", "origin_site", "size"]
            ).to_pylist():
                old_sha, old_key = known[row["sop_instance_uid"]]
                if old_sha == row["sha256"] or (row["sop_instance_uid"], row["sha256"]) in versions:
                    already += 1  # this version is registered already
                    continue
                conflicts.append(
                    ConflictRecord(
                        row["study_uid"],
                        row["sop_instance_uid"],
                        old_key,
                        old_sha,
                        row["sha256"],
                        keys.object_key(
                            row["origin_site"],
                            row["study_uid"],
                            row["series_uid"],
                            row["sop_instance_uid"],
                            conflict_sha256=row["sha256"],
                        ),
                        row["origin_site"],
                        holder,
                        now,
                        int(row["size"]),
                    )
                )
            fresh = fresh.filter(mask)
        n_new = fresh.num_rows
        # which studies need their location (re)written at this holder
        if n_new == 0 and not conflicts:
            if n_in:
                current = con.execute(
                    "SELECT study_uid, arg_max(state, _seq) AS state FROM locations "
                    "WHERE holder = ? AND sop_instance_uid = '' AND study_uid IN (SELECT study_uid FROM _new_studies) "
                    "GROUP BY study_uid",
                    [holder],
                ).fetchall()
                ok = {uid for uid, st in current if st in ("present", "verified")}
                if all(uid in ok for uid in study_uids):
                    return None
            else:
                known_studies = {
                    r[0]
                    for r in con.execute(
                        "SELECT DISTINCT study_uid FROM studies WHERE study_uid IN (SELECT study_uid FROM _new_studies)"
                    ).fetchall()
                }
                if all(uid in known_studies for uid in study_uids):
                    return None
        con.register("_fresh", fresh)
        try:
            series = con.sql(
                "WITH f AS (SELECT study_uid, series_uid, any_value(modality) AS modality, "
                "  any_value(series_number) AS series_number, any_value(series_description) AS series_description, "
                "  any_value(origin_site) AS origin_site FROM _fresh GROUP BY study_uid, series_uid) "
                "SELECT f.* FROM f ANTI JOIN series e ON e.study_uid = f.study_uid AND e.series_uid = f.series_uid"
            ).to_arrow_table()
            con.register("_fresh_series", series)
            deltas = con.sql(
                "WITH i AS (SELECT study_uid, count(*) AS n, sum(size) AS b FROM _fresh GROUP BY study_uid), "
                "s AS (SELECT study_uid, count(*) AS n FROM _fresh_series GROUP BY study_uid) "
                "SELECT t.*, coalesce(s.n, 0)::BIGINT AS series_added, coalesce(i.n, 0)::BIGINT AS instances_added, "
                "coalesce(i.b, 0)::BIGINT AS bytes_added FROM _new_studies t "
                "LEFT JOIN i USING (study_uid) LEFT JOIN s USING (study_uid)"
            ).to_arrow_table()
            con.unregister("_fresh_series")
        finally:
            con.unregister("_fresh")
        n = deltas.num_rows
        deltas = deltas.append_column("registered_at", const_column(now, n, tables.TS)).append_column(
            "_seq", const_column(seq, n, pa.int64())
        )
        fresh = fresh.append_column("registered_at", const_column(now, n_new, tables.TS)).append_column(
            "_seq", const_column(seq, n_new, pa.int64())
        )
        series = series.append_column("registered_at", const_column(now, series.num_rows, tables.TS)).append_column(
            "_seq", const_column(seq, series.num_rows, pa.int64())
        )
        locations = pa.table(
            {
                "study_uid": studies.column("study_uid"),
                "sop_instance_uid": const_column("", studies.num_rows),
                "holder": const_column(holder, studies.num_rows),
                "state": const_column("present", studies.num_rows),
                "verified_at": pa.nulls(studies.num_rows, tables.TS),
                "detail": const_column("", studies.num_rows),
                "by": const_column(actor, studies.num_rows),
                "at": const_column(now, studies.num_rows, tables.TS),
                "_seq": const_column(seq, studies.num_rows, pa.int64()),
            }
        )
        rows = {"instances": fresh, "series": series, "studies": deltas, "locations": locations}
        if conflicts:
            rows["conflicts"] = pa.Table.from_pylist(
                [{**c.__dict__, "_seq": seq} for c in conflicts], schema=tables.CONFLICTS
            )
        result = RegisterResult(n_new, already, tuple(conflicts), series.num_rows, tuple(study_uids), seq)
        origin_of = dict(zip(study_uids, studies.column("origin_site").to_pylist()))
        drafts: list[AuditDraft] = []
        if audit_each_study:
            per_study = dict(zip(deltas.column("study_uid").to_pylist(), deltas.column("instances_added").to_pylist()))
            for uid in study_uids:
                n_conf = sum(1 for c in conflicts if c.study_uid == uid)
                drafts.append(
                    AuditDraft(
                        origin_of[uid],
                        actor,
                        "register",
                        uid,
                        None,
                        "conflict" if n_conf else "ok",
                        {"holder": holder, "new_instances": per_study.get(uid, 0), "conflicts": n_conf},
                    )
                )
        else:
            drafts.append(
                AuditDraft(
                    origin_sites_text(origin_of.values()),
                    actor,
                    "register",
                    None,
                    None,
                    "conflict" if conflicts else "ok",
                    {
                        "holder": holder,
                        "studies": len(study_uids),
                        "new_instances": n_new,
                        "already_present": already,
                        "conflicts": len(conflicts),
                    },
                )
            )
        return CommitPlan(rows=rows, audit=drafts, result=result)

    # ---------------------------------------------------------- instances
    def instances(self, study_uid: str, version: str = "current") -> list[dict[str, Any]]:
        """The study's registered instances (object key, SHA-256, size, SOP class, transfer syntax).

        version='current' (what every retrieval serves): an instance sent
        again with other bytes has the key, SHA-256 and size of its latest
        version, and `corrected` True; version='first': the rows as first
        registered.
        """
        if version == "first":
            return self._engine.rows(
                "SELECT * EXCLUDE (_seq) FROM instances WHERE study_uid = ? ORDER BY series_uid, instance_number, "
                "sop_instance_uid",
                [study_uid],
                memo=("instances",),
            )
        if version != "current":
            raise UsageError(f"version {version!r}: use 'current' or 'first'")
        return self._engine.rows(
            "WITH v AS (SELECT sop_instance_uid, arg_max(conflict_key, _seq) AS k, arg_max(new_sha256, _seq) AS sha, "
            "  arg_max(new_size, _seq) AS sz FROM conflicts WHERE study_uid = ? GROUP BY sop_instance_uid) "
            "SELECT i.* EXCLUDE (_seq, object_key, sha256, size), coalesce(v.k, i.object_key) AS object_key, "
            "coalesce(v.sha, i.sha256) AS sha256, coalesce(v.sz, i.size) AS size, v.k IS NOT NULL AS corrected "
            "FROM instances i LEFT JOIN v USING (sop_instance_uid) WHERE i.study_uid = ? "
            "ORDER BY i.series_uid, i.instance_number, i.sop_instance_uid",
            [study_uid, study_uid],
            memo=("instances", "conflicts"),
        )

    def iter_instances(self, part: int = 0, parts: int = 1, batch_size: int = 10_000) -> Iterator[list[dict[str, Any]]]:
        """Every registered instance (study, origin, key, SHA-256, size), in batches.

        With `parts` > 1, only the share whose SOP Instance UID hashes to `part`
        (mod `parts`): the nightly verification reads one part a night so that
        everything is read within `parts` nights.
        """
        where = "" if parts <= 1 else f"WHERE hash(i.sop_instance_uid) % {int(parts)} = {int(part) % int(parts)}"
        with self._engine.lock:
            self._engine.ensure_views()
            reader = self.con.sql(
                "SELECT i.study_uid, i.series_uid, i.sop_instance_uid, i.object_key, i.sha256, i.size, "
                "s.origin_site FROM (SELECT study_uid, series_uid, sop_instance_uid, object_key, sha256, size "
                "  FROM instances UNION ALL "
                # every kept version is verified too (versions registered before sizes were recorded: not)
                "  SELECT c.study_uid, f.series_uid, c.sop_instance_uid, c.conflict_key, c.new_sha256, c.new_size "
                "  FROM conflicts c JOIN instances f USING (study_uid, sop_instance_uid) "
                "  WHERE c.new_size IS NOT NULL) i "
                "JOIN (SELECT study_uid, arg_max(origin_site, _seq) AS origin_site "
                f"FROM studies GROUP BY study_uid) s USING (study_uid) {where} "
                "ORDER BY i.object_key"
            ).to_arrow_reader(batch_size)
            batches = [b.to_pylist() for b in reader]
        yield from batches

    def referenced_keys(self) -> set[str]:
        """Every object key a catalog row points to: instances, and the conflicting copies beside them."""
        rows = self._engine.rows("SELECT object_key AS k FROM instances UNION SELECT conflict_key AS k FROM conflicts")
        return {r["k"] for r in rows if r["k"]}

    def instance_count(self) -> int:
        return int(self._engine.rows("SELECT count(*) AS n FROM instances")[0]["n"])

    def series(self, study_uid: str) -> list[dict[str, Any]]:
        return self._engine.rows(
            "SELECT * EXCLUDE (_seq) FROM series WHERE study_uid = ? ORDER BY series_number, series_uid", [study_uid]
        )

    def conflicts(self, study_uid: str | None = None) -> list[ConflictRecord]:
        where, params = ("WHERE study_uid = ?", [study_uid]) if study_uid else ("", [])
        return [
            conflict_record(r)
            for r in self._engine.rows(f'SELECT * FROM conflicts {where} ORDER BY "at", sop_instance_uid', params)
        ]

    # ---------------------------------------------------------- studies
    def study(self, study_uid: str) -> StudyRow | None:
        rows = self._engine.rows(
            f"SELECT study_uid, {_STUDY_AGG} FROM studies WHERE study_uid = ? GROUP BY study_uid",
            [study_uid],
            memo=("studies",),
        )
        return study_row(rows[0]) if rows else None

    def visible_studies(
        self,
        site: str,
        patient_ids: Sequence[tuple[str, str | None]] | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        modalities: Sequence[str] | None = None,
    ) -> list[StudyRow]:
        """Studies `site` may see by the one visibility rule (_visible_sql): its own, or granted (and consented).

        Optionally only those of the given (patient_id, issuer) pairs (issuer
        None matches any), with study_date within [date_from, date_to]
        (YYYYMMDD) and any of `modalities`.
        """
        where: list[str] = []
        params: list[Any] = []
        if patient_ids is not None:
            if not patient_ids:
                return []
            ors = []
            for pid, issuer in patient_ids:
                if issuer is None:
                    ors.append("patient_id = ?")
                    params.append(pid)
                else:
                    ors.append("(patient_id = ? AND issuer_of_patient_id = ?)")
                    params.extend([pid, issuer])
            where.append("(" + " OR ".join(ors) + ")")
        having = []
        if date_from:
            having.append("arg_max(study_date, _seq) >= ?")
            params.append(date_from)
        if date_to:
            having.append("arg_max(study_date, _seq) <= ?")
            params.append(date_to)
        if modalities:
            having.append("list_has_any(list_distinct(flatten(list(modalities))), ?::VARCHAR[])")
            params.append(list(modalities))
        sql = (
            f"SELECT study_uid, {_STUDY_AGG} FROM studies "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "GROUP BY study_uid "
            + (f"HAVING {' AND '.join(having)} " if having else "")
        )
        with self._engine.lock:
            candidates = self._engine.rows(sql, params)
            if not candidates:
                return []
            others = [r["study_uid"] for r in candidates if r["origin_site"] != site]
            granted = self._visible_among(site, others) if others else set()
        rows = [study_row(r) for r in candidates if r["origin_site"] == site or r["study_uid"] in granted]
        rows.sort(key=lambda r: (r.study_date, r.study_time, r.study_uid))
        return rows

    def may_see(self, site: str, study_uid: str) -> bool:
        """Whether `site` may see the study, by the one visibility rule (renkei.policy.decide explains it)."""
        with self._engine.lock:
            return study_uid in self._visible_among(site, [study_uid])

    def _visible_among(self, site: str, study_uids: Sequence[str]) -> set[str]:
        """Those of `study_uids` that `site` may see (the caller holds the lock)."""
        if len(study_uids) <= 500:
            cond = "study_uid IN (" + ", ".join(sql_str(u) for u in study_uids) + ")" if study_uids else "FALSE"
        else:
            self.con.register("_candidates", pa.table({"study_uid": list(study_uids)}))
            cond = "study_uid IN (SELECT study_uid FROM _candidates)"
        try:
            rows = self._engine.rows(
                f"WITH vs AS (SELECT {_STUDY_KEYS} FROM studies WHERE {cond} GROUP BY study_uid), "
                + _visible_sql("vs", one_site=True)
                + " SELECT DISTINCT study_uid FROM visible WHERE site = ?",
                [site, site],
            )
        finally:
            if "_candidates" in cond:
                self.con.unregister("_candidates")
        return {r["study_uid"] for r in rows}

    # ---------------------------------------------------------- locations
    def locations(self, study_uid: str, include_instances: bool = True) -> list[LocationRecord]:
        """Every copy of the study: its latest state per holder (and per instance where recorded)."""
        extra = "" if include_instances else "AND sop_instance_uid = ''"
        rows = self._engine.rows(
            "SELECT study_uid, sop_instance_uid, holder, arg_max(state, _seq) AS state, "
            "arg_max(verified_at, _seq) AS verified_at, arg_max(detail, _seq) AS detail, "
            'arg_max("by", _seq) AS "by", max("at") AS "at" FROM locations '
            f"WHERE study_uid = ? {extra} GROUP BY study_uid, sop_instance_uid, holder "
            "ORDER BY holder, sop_instance_uid",
            [study_uid],
        )
        return [location_record(r) for r in rows]

    def set_location(
        self,
        study_uid: str,
        holder: str,
        state: str,
        sop_instance_uid: str | None = None,
        verified_at: dt.datetime | None = None,
        detail: str = "",
        by: str = "",
    ) -> int:
        """Record the state of a copy ('present', 'verified', 'missing', 'corrupt', 'removed'); returns the commit."""
        return self.set_locations(
            [
                dict(
                    study_uid=study_uid,
                    holder=holder,
                    state=state,
                    sop_instance_uid=sop_instance_uid,
                    verified_at=verified_at,
                    detail=detail,
                    by=by,
                )
            ]
        )

    def set_locations(self, entries: Sequence[Mapping[str, Any]]) -> int:
        """Several location states in one commit (e.g. a night's verification); returns the commit."""
        for e in entries:
            if e["state"] not in tables.LOCATION_STATES:
                raise UsageError(f"location state {e['state']!r} is not one of {', '.join(tables.LOCATION_STATES)}")

        def build(state: State, seq: int, now: dt.datetime) -> CommitPlan:
            rows = [
                {
                    "study_uid": e["study_uid"],
                    "sop_instance_uid": e.get("sop_instance_uid") or "",
                    "holder": e["holder"],
                    "state": e["state"],
                    "verified_at": e.get("verified_at") or (now if e["state"] == "verified" else None),
                    "detail": e.get("detail") or "",
                    "by": e.get("by") or self.writer,
                    "at": now,
                    "_seq": seq,
                }
                for e in entries
            ]
            return CommitPlan(rows={"locations": pa.Table.from_pylist(rows, schema=tables.LOCATIONS)})

        seq, _ = self._engine.commit("locations", build)
        return int(seq or 0)

    # ---------------------------------------------------------- grants
    def grant(
        self,
        study_uid: str,
        site: str,
        by_kind: str,
        by: str,
        reason: str = "",
        rule: str | None = None,
        policy_version: str | None = None,
        actor_site: str = tables.CENTER,
    ) -> GrantRecord:
        """Make the study visible to `site` (no change if already active); returns the current grant."""
        self.grant_many([GrantRequest(study_uid, site, by_kind, by, reason, rule, policy_version)], actor_site)
        return next(g for g in self.grants(study_uid) if g.site == site and g.current)

    def revoke(
        self,
        study_uid: str,
        site: str,
        by_kind: str,
        by: str,
        reason: str = "",
        rule: str | None = None,
        policy_version: str | None = None,
        actor_site: str = tables.CENTER,
    ) -> GrantRecord | None:
        """Withdraw the site's grant (no change if none is active); returns the current record."""
        self.grant_many(
            [GrantRequest(study_uid, site, by_kind, by, reason, rule, policy_version, tables.REVOKE)], actor_site
        )
        return next((g for g in self.grants(study_uid) if g.site == site and g.current), None)

    def grant_many(
        self, requests: Sequence[GrantRequest], actor_site: str = tables.CENTER, skip_unchanged: bool = True
    ) -> int:
        """Write grants and revocations in one commit, each with its audit event.

        With skip_unchanged, a grant already active (or a revocation of one
        not active) is left out. Returns how many events were written.
        """
        for r in requests:
            validate_grant(r)
        if not requests:
            return 0
        table = pa.table(
            {
                name: [getattr(r, name) for r in requests]
                for name in ("study_uid", "site", "action", "by_kind", "by", "reason", "rule", "policy_version")
            }
        )
        return self.grant_table(table, actor_site, skip_unchanged)

    def grant_table(self, table: pa.Table, actor_site: str = tables.CENTER, skip_unchanged: bool = True) -> int:
        """The bulk path of grant_many: columns study_uid, site, by_kind, by, and optionally action
        (default 'grant'), reason, rule, policy_version. Returns how many events were written."""
        if table.num_rows == 0:
            return 0
        table = normalise_grants(table)
        written = {"n": 0}

        def build(state: State, seq: int, now: dt.datetime) -> CommitPlan | None:
            todo = table
            if skip_unchanged:
                self.con.register("_grant_uids", pa.table({"study_uid": pc.unique(table.column("study_uid"))}))
                try:
                    self._engine.ensure_views()
                    current = {
                        (u, s): a
                        for u, s, a in self.con.execute(
                            "SELECT study_uid, site, arg_max(action, _seq) FROM grants "
                            "WHERE study_uid IN (SELECT study_uid FROM _grant_uids) GROUP BY study_uid, site"
                        ).fetchall()
                    }
                finally:
                    self.con.unregister("_grant_uids")
                keep = []
                for uid, site, action in zip(
                    table.column("study_uid").to_pylist(),
                    table.column("site").to_pylist(),
                    table.column("action").to_pylist(),
                ):
                    key = (uid, site)
                    change = (action == tables.GRANT) != (current.get(key) == tables.GRANT)
                    keep.append(change)
                    if change:
                        current[key] = action
                todo = table.filter(pa.array(keep, pa.bool_()))
            if todo.num_rows == 0:
                return None
            written["n"] = todo.num_rows
            rows = todo.append_column("at", const_column(now, todo.num_rows, tables.TS)).append_column(
                "_seq", const_column(seq, todo.num_rows, pa.int64())
            )
            drafts = [
                AuditDraft(
                    actor_site,
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
                for r in todo.to_pylist()
            ]
            return CommitPlan(rows={"grants": rows}, audit=drafts)

        self._engine.commit("grants", build)
        return written["n"]

    def grants(self, study_uid: str) -> list[GrantRecord]:
        """Every grant and revocation of the study, oldest first; `current` marks the latest per site."""
        rows = self._engine.rows(
            "SELECT *, _seq = max(_seq) OVER (PARTITION BY site) AS current FROM grants WHERE study_uid = ? "
            "ORDER BY _seq, site",
            [study_uid],
            memo=("grants",),
        )
        return [grant_record(r) for r in rows]

    def active_grants_for_site(self, site: str) -> list[GrantRecord]:
        """The grants currently active for `site` (one per study)."""
        rows = self._engine.rows(
            "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY study_uid ORDER BY _seq DESC) AS rn "
            "FROM grants WHERE site = ?) WHERE rn = 1 AND action = 'grant' ORDER BY study_uid",
            [site],
        )
        return [grant_record({**r, "current": True}) for r in rows]

    # ---------------------------------------------------------- consents
    def set_consent(
        self,
        site: str,
        patient_id: str,
        issuer: str,
        state: str,
        by: str,
        reason: str = "",
        actor_site: str | None = None,
    ) -> int:
        """Record a patient's consent ('given') or its withdrawal ('withdrawn'); returns the commit."""
        if state not in tables.CONSENT_STATES:
            raise UsageError(f"consent state {state!r} is not one of {', '.join(tables.CONSENT_STATES)}")

        def build(st: State, seq: int, now: dt.datetime) -> CommitPlan:
            row = pa.Table.from_pylist(
                [
                    {
                        "site": site,
                        "patient_id": patient_id,
                        "issuer": issuer,
                        "state": state,
                        "by": by,
                        "reason": reason,
                        "at": now,
                        "_seq": seq,
                    }
                ],
                schema=tables.CONSENTS,
            )
            return CommitPlan(
                rows={"consents": row},
                audit=[AuditDraft(actor_site or site, by, f"consent-{state}", None, site, "ok", {"reason": reason})],
            )

        seq, _ = self._engine.commit("consent", build)
        return int(seq or 0)

    def consent_of(self, site: str, patient_id: str, issuer: str) -> ConsentRecord | None:
        rows = self._engine.rows(
            "SELECT * FROM consents WHERE site = ? AND patient_id = ? AND issuer = ? ORDER BY _seq DESC LIMIT 1",
            [site, patient_id, issuer],
            memo=("consents",),
        )
        return consent_record(rows[0]) if rows else None

    def withdrawn_consents(self) -> list[ConsentRecord]:
        rows = self._engine.rows(
            "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY site, patient_id, issuer "
            "ORDER BY _seq DESC) AS rn FROM consents) WHERE rn = 1 AND state = 'withdrawn'"
        )
        return [consent_record(r) for r in rows]

    # ---------------------------------------------------------- patient links
    def link_patients(
        self, entries: Sequence[tuple[str, str, str]], method: str, by: str, evidence: str | Mapping[str, Any] = ""
    ) -> str:
        """Record that the (site, patient_id, issuer) entries are one person; returns the person id.

        Entries already linked keep their person (the smallest id wins when
        two persons are joined, and every member of the other one moves).
        """
        if method not in tables.LINK_METHODS or method == "unlink":
            raise UsageError(f"link method {method!r} must be 'auto-exact' or 'operator'")
        if len(entries) < 1:
            raise UsageError("link_patients needs at least one (site, patient_id, issuer)")
        evidence_text = evidence if isinstance(evidence, str) else json.dumps(evidence, sort_keys=True, default=str)
        out = {"person": ""}

        def build(state: State, seq: int, now: dt.datetime) -> CommitPlan | None:
            current = self._current_links()
            keys = [(e[0], e[1], e[2]) for e in entries]
            persons = sorted({current[k] for k in keys if current.get(k)})
            person = persons[0] if persons else f"person-{uuid.uuid4().hex[:16]}"
            out["person"] = person
            members = set(keys)
            for key, pid in current.items():
                if pid in persons[1:]:
                    members.add(key)
            todo = sorted(m for m in members if current.get(m) != person)
            if not todo:
                return None
            rows = pa.Table.from_pylist(
                [
                    {
                        "person_id": person,
                        "site": s,
                        "patient_id": p,
                        "issuer": i,
                        "method": method,
                        "by": by,
                        "evidence": evidence_text,
                        "at": now,
                        "_seq": seq,
                    }
                    for s, p, i in todo
                ],
                schema=tables.PATIENT_LINKS,
            )
            return CommitPlan(
                rows={"patient_links": rows},
                audit=[
                    AuditDraft(
                        tables.CENTER,
                        by,
                        "link-patients",
                        None,
                        None,
                        "ok",
                        {"person_id": person, "method": method, "members": len(todo)},
                    )
                ],
            )

        self._engine.commit("link", build)
        return out["person"]

    def unlink_patient(self, site: str, patient_id: str, issuer: str, by: str, reason: str = "") -> bool:
        """Detach one site-local patient ID from its person; False when it was not linked."""

        def build(state: State, seq: int, now: dt.datetime) -> CommitPlan | None:
            if not self._current_links().get((site, patient_id, issuer)):
                return None
            rows = pa.Table.from_pylist(
                [
                    {
                        "person_id": "",
                        "site": site,
                        "patient_id": patient_id,
                        "issuer": issuer,
                        "method": "unlink",
                        "by": by,
                        "evidence": reason,
                        "at": now,
                        "_seq": seq,
                    }
                ],
                schema=tables.PATIENT_LINKS,
            )
            return CommitPlan(
                rows={"patient_links": rows},
                audit=[AuditDraft(tables.CENTER, by, "unlink-patient", None, site, "ok", {"reason": reason})],
            )

        seq, _ = self._engine.commit("unlink", build)
        return seq is not None

    def _current_links(self) -> dict[tuple[str, str, str], str]:
        self._engine.ensure_views()
        rows = self.con.execute(
            "SELECT site, patient_id, issuer, arg_max(person_id, _seq) FROM patient_links "
            "GROUP BY site, patient_id, issuer"
        ).fetchall()
        return {(s, p, i): person for s, p, i, person in rows if person}

    def person_of(self, site: str, patient_id: str, issuer: str) -> str | None:
        rows = self._engine.rows(
            "SELECT arg_max(person_id, _seq) AS person FROM patient_links "
            "WHERE site = ? AND patient_id = ? AND issuer = ?",
            [site, patient_id, issuer],
        )
        return (rows[0]["person"] or None) if rows else None

    def patient_ids_of(self, person_id: str) -> list[tuple[str, str, str]]:
        rows = self._engine.rows(
            "SELECT site, patient_id, issuer FROM (SELECT site, patient_id, issuer, arg_max(person_id, _seq) AS p "
            "FROM patient_links WHERE (site, patient_id, issuer) IN (SELECT (site, patient_id, issuer) "
            "FROM patient_links WHERE person_id = ?) GROUP BY ALL) WHERE p = ? ORDER BY site, patient_id",
            [person_id, person_id],
        )
        return [(r["site"], r["patient_id"], r["issuer"]) for r in rows]

    def find_patients(
        self, name: str | None = None, birth_date: str | None = None, sex: str | None = None, site: str | None = None
    ) -> list[PatientCandidate]:
        """Site-local patients whose demographics match (a name matches on any '='-group, case-insensitive)."""
        where: list[str] = []
        params: list[Any] = []
        if name:
            groups = [g.strip().lower() for g in name.split("=") if g.strip()]
            where.append(
                "list_has_any(list_transform(string_split(lower(patient_name), '='), lambda x: trim(x)), ?::VARCHAR[])"
            )
            params.append(groups)
        if birth_date:
            where.append("patient_birth_date = ?")
            params.append(birth_date)
        if sex:
            where.append("patient_sex = ?")
            params.append(sex)
        if site:
            where.append("origin_site = ?")
            params.append(site)
        rows = self._engine.rows(
            "SELECT origin_site AS site, patient_id, issuer_of_patient_id AS issuer, any_value(patient_name) AS "
            "patient_name, any_value(patient_birth_date) AS patient_birth_date, any_value(patient_sex) AS patient_sex, "
            "count(DISTINCT study_uid) AS studies FROM studies "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "GROUP BY origin_site, patient_id, issuer_of_patient_id ORDER BY site, patient_id",
            params,
        )
        return [PatientCandidate(**r) for r in rows]

    # ---------------------------------------------------------- totals
    def totals(self, pending: Mapping[str, int] | None = None) -> list[SiteTotals]:
        """Per origin site: studies, instances, bytes, and the backlog.

        backlog_studies counts studies an edge holds whose center copy is not
        verified yet; `pending` (per site, e.g. from the edges' journals) is
        reported beside it for what has not reached the catalog at all.
        """
        rows = self._engine.rows("""
            WITH s AS (SELECT study_uid, arg_max(origin_site, _seq) AS origin_site,
                              sum(instances_added) AS n, sum(bytes_added) AS b FROM studies GROUP BY study_uid),
            l AS (SELECT study_uid, holder, arg_max(state, _seq) AS state FROM locations
                  WHERE sop_instance_uid = '' GROUP BY study_uid, holder),
            edge AS (SELECT DISTINCT study_uid FROM l WHERE holder LIKE 'edge:%' AND state IN ('present', 'verified')),
            verified AS (SELECT study_uid FROM l WHERE holder = 'center' AND state = 'verified')
            SELECT origin_site AS site, count(*) AS studies, coalesce(sum(n), 0)::BIGINT AS instances,
                   coalesce(sum(b), 0)::BIGINT AS bytes,
                   count(*) FILTER (WHERE study_uid IN (SELECT study_uid FROM edge)
                                    AND study_uid NOT IN (SELECT study_uid FROM verified)) AS backlog_studies
            FROM s GROUP BY origin_site ORDER BY origin_site""")
        pending = dict(pending or {})
        out = [
            SiteTotals(
                r["site"],
                int(r["studies"]),
                int(r["instances"]),
                int(r["bytes"]),
                int(r["backlog_studies"]),
                int(pending.pop(r["site"], 0)),
            )
            for r in rows
        ]
        out.extend(SiteTotals(site, 0, 0, 0, 0, int(n)) for site, n in sorted(pending.items()))
        return out

    # ---------------------------------------------------------- reports (read-only)
    def registrations(
        self, since: dt.datetime | str | None = None, until: dt.datetime | str | None = None
    ) -> list[RegistrationBatch]:
        """Per origin site and registration commit: studies, instances and bytes registered, oldest first.

        What an operator's throughput chart is drawn from (instances are never
        folded by compaction, so the history stays complete).
        """
        where: list[str] = []
        params: list[Any] = []
        if since is not None:
            where.append("registered_at >= ?::TIMESTAMPTZ")
            params.append(as_ts(since))
        if until is not None:
            where.append("registered_at < ?::TIMESTAMPTZ")
            params.append(as_ts(until))
        rows = self._engine.rows(
            "SELECT origin_site, registered_at AS at, count(DISTINCT study_uid) AS studies, count(*) AS instances, "
            "coalesce(sum(size), 0)::BIGINT AS bytes FROM instances "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "GROUP BY origin_site, registered_at ORDER BY registered_at, origin_site",
            params,
        )
        return [
            RegistrationBatch(r["origin_site"], r["at"], int(r["studies"]), int(r["instances"]), int(r["bytes"]))
            for r in rows
        ]

    def study_registrations(
        self, since: dt.datetime | str | None = None, limit: int | None = None
    ) -> list[StudyRegistration]:
        """Studies by the time their last instance was registered (newest first), with first/last times.

        `since` keeps studies whose last registration is at or after it.
        """
        having, params = [], []
        if since is not None:
            having.append("max(registered_at) >= ?::TIMESTAMPTZ")
            params.append(as_ts(since))
        rows = self._engine.rows(
            "SELECT study_uid, any_value(origin_site) AS origin_site, min(registered_at) AS first_at, "
            "max(registered_at) AS last_at, count(*) AS instances, coalesce(sum(size), 0)::BIGINT AS bytes "
            "FROM instances GROUP BY study_uid "
            + (f"HAVING {' AND '.join(having)} " if having else "")
            + "ORDER BY last_at DESC, study_uid"
            + (f" LIMIT {int(limit)}" if limit else ""),
            params,
        )
        return [
            StudyRegistration(
                r["study_uid"], r["origin_site"], r["first_at"], r["last_at"], int(r["instances"]), int(r["bytes"])
            )
            for r in rows
        ]

    def studies_page(
        self,
        visible_to: str | None = None,
        origin_sites: Sequence[str] | None = None,
        patient_id: str | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        modalities: Sequence[str] | None = None,
        limit: int = 50,
        offset: int = 0,
        search: str | None = None,
        search_names: bool = False,
    ) -> tuple[int, list[StudyRow]]:
        """(how many studies match, one page of them newest first) for a study browser.

        `visible_to` keeps what that site may see by the one visibility rule
        (as visible_studies does); the other filters are those of visible_studies, with
        `origin_sites` added, and `search` (catalog.search: Patient ID,
        accession number, and with `search_names` the patient's name in any
        form, DICOM wildcards allowed). Newest first: study date, time, then UID,
        descending.
        """
        where: list[str] = []
        having: list[str] = []
        outer: list[str] = []
        p_where: list[Any] = []
        p_having: list[Any] = []
        p_cte: list[Any] = []
        p_outer: list[Any] = []
        if patient_id is not None:
            where.append("patient_id = ?")
            p_where.append(patient_id)
        if date_from:
            having.append("arg_max(study_date, _seq) >= ?")
            p_having.append(date_from)
        if date_to:
            having.append("arg_max(study_date, _seq) <= ?")
            p_having.append(date_to)
        if modalities:
            having.append("list_has_any(list_distinct(flatten(list(modalities))), ?::VARCHAR[])")
            p_having.append(list(modalities))
        if origin_sites is not None:
            outer.append("list_contains(?::VARCHAR[], origin_site)")
            p_outer.append(list(origin_sites))
        if search:
            clause, p_search = Search.parse(search).where(names=search_names)
            outer.append(clause)
            p_outer.extend(p_search)
        visible = ""
        if visible_to is not None:
            visible = ", " + _visible_sql("a", one_site=True)
            p_cte.append(visible_to)
            outer.append("study_uid IN (SELECT study_uid FROM visible WHERE site = ?)")
            p_outer.append(visible_to)
        sql = (
            f"WITH a AS (SELECT study_uid, {_STUDY_AGG} FROM studies "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "GROUP BY study_uid "
            + (f"HAVING {' AND '.join(having)} " if having else "")
            + ")"
            + visible
            + " SELECT *, count(*) OVER () AS _total FROM a "
            + (f"WHERE {' AND '.join(outer)} " if outer else "")
            + "ORDER BY study_date DESC, study_time DESC, study_uid DESC "
            + f"LIMIT {max(0, int(limit))} OFFSET {max(0, int(offset))}"
        )
        params = p_where + p_having + p_cte + p_outer
        rows = self._engine.rows(sql, params)
        total = (
            int(rows[0]["_total"])
            if rows
            else (
                self.studies_page(
                    visible_to, origin_sites, patient_id, date_from, date_to, modalities, 1, 0, search, search_names
                )[0]
                if offset
                else 0
            )
        )
        return total, [study_row(r) for r in rows]

    def series_summaries(self, study_uids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The series of several studies with their registered instance counts, by study, in one query."""
        if not study_uids:
            return {}
        rows = self._engine.rows(
            "WITH s AS (SELECT study_uid, series_uid, any_value(modality) AS modality, "
            "any_value(series_number) AS series_number, any_value(series_description) AS series_description "
            "FROM series WHERE study_uid IN (SELECT unnest(?::VARCHAR[])) GROUP BY study_uid, series_uid), "
            "i AS (SELECT study_uid, series_uid, count(*) AS instances FROM instances "
            "WHERE study_uid IN (SELECT unnest(?::VARCHAR[])) GROUP BY study_uid, series_uid) "
            "SELECT s.*, coalesce(i.instances, 0)::BIGINT AS instances FROM s "
            "LEFT JOIN i USING (study_uid, series_uid) "
            "ORDER BY s.study_uid, s.series_number NULLS LAST, s.series_uid",
            [list(study_uids), list(study_uids)],
        )
        out: dict[str, list[dict[str, Any]]] = {uid: [] for uid in study_uids}
        for r in rows:
            out.setdefault(r["study_uid"], []).append(r)
        return out

    def study_locations(self, study_uids: Sequence[str]) -> dict[str, list[LocationRecord]]:
        """The study-level copies (latest state per holder) of several studies, in one query."""
        if not study_uids:
            return {}
        rows = self._engine.rows(
            "SELECT study_uid, holder, arg_max(state, _seq) AS state, arg_max(verified_at, _seq) AS verified_at, "
            'arg_max(detail, _seq) AS detail, arg_max("by", _seq) AS "by", max("at") AS "at" '
            "FROM locations WHERE sop_instance_uid = '' AND study_uid IN (SELECT unnest(?::VARCHAR[])) "
            "GROUP BY study_uid, holder ORDER BY study_uid, holder",
            [list(study_uids)],
        )
        out: dict[str, list[LocationRecord]] = {uid: [] for uid in study_uids}
        for r in rows:
            out.setdefault(r["study_uid"], []).append(location_record(r))
        return out

    def visibility_counts(self) -> dict[tuple[str, str], int]:
        """{(viewer site, origin site): how many studies of the origin the viewer may see} (_visible_sql)."""
        rows = self._engine.rows(
            f"WITH vs AS (SELECT {_STUDY_KEYS} FROM studies GROUP BY study_uid), "
            + _visible_sql("vs", one_site=False)
            + " SELECT site AS viewer, origin_site AS origin, count(DISTINCT study_uid) AS n FROM visible "
            "GROUP BY site, origin_site"
        )
        return {(r["viewer"], r["origin"]): int(r["n"]) for r in rows}

    def recent_audit(
        self, actions: Sequence[str] | None = None, limit: int = 50, since: dt.datetime | str | None = None
    ) -> list[AuditEvent]:
        """The latest audit events (newest first), optionally only of the given actions."""
        where: list[str] = []
        params: list[Any] = []
        if actions is not None:
            if not actions:
                return []
            where.append("list_contains(?::VARCHAR[], action)")
            params.append(list(actions))
        if since is not None:
            where.append('"at" >= ?::TIMESTAMPTZ')
            params.append(as_ts(since))
        rows = self._engine.rows(
            "SELECT * FROM audit "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + f"ORDER BY event_no DESC LIMIT {max(0, int(limit))}",
            params,
        )
        return [audit_mod.event_from_row(r) for r in rows]

    def instance_locations(
        self, by: str | None = None, since: dt.datetime | str | None = None, limit: int | None = 500
    ) -> list[LocationRecord]:
        """Instance-level copies (latest state per instance and holder), newest first.

        Instance-level rows are written for exceptions (the nightly verification
        records what it found missing or corrupt, and whether it was repaired);
        `by` and `since` filter on the latest record's writer and time.
        """
        where: list[str] = []
        params: list[Any] = []
        if by is not None:
            where.append('"by" = ?')
            params.append(by)
        if since is not None:
            where.append('"at" >= ?::TIMESTAMPTZ')
            params.append(as_ts(since))
        rows = self._engine.rows(
            "SELECT * FROM (SELECT study_uid, sop_instance_uid, holder, arg_max(state, _seq) AS state, "
            "arg_max(verified_at, _seq) AS verified_at, arg_max(detail, _seq) AS detail, "
            'arg_max("by", _seq) AS "by", max("at") AS "at" FROM locations WHERE sop_instance_uid <> \'\' '
            "GROUP BY study_uid, sop_instance_uid, holder) "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + 'ORDER BY "at" DESC, study_uid, sop_instance_uid'
            + (f" LIMIT {int(limit)}" if limit else ""),
            params,
        )
        return [location_record(r) for r in rows]

    # ---------------------------------------------------------- audit
    def append_audit(
        self,
        actor_site: str,
        actor: str,
        action: str,
        study_uid: str | None = None,
        target_site: str | None = None,
        outcome: str = "ok",
        detail: dict[str, Any] | None = None,
    ) -> AuditEvent:
        """Append one audit event to the chain; returns it with its number and hash."""
        return self.append_audits([AuditDraft(actor_site, actor, action, study_uid, target_site, outcome, detail)])[0]

    def append_audits(self, drafts: Sequence[AuditDraft]) -> list[AuditEvent]:
        """Append several events in one commit (one place in the total order); returns them."""
        if not drafts:
            return []

        def build(state: State, seq: int, now: dt.datetime) -> CommitPlan:
            return CommitPlan(audit=list(drafts), result=(state.audit_count + 1, seq))

        seq, (first, _) = self._engine.commit("audit", build)
        return self.audit(event_from=first, event_to=first + len(drafts) - 1)

    def audit(
        self,
        study_uid: str | None = None,
        site: str | None = None,
        actor: str | None = None,
        action: str | None = None,
        since: dt.datetime | str | None = None,
        until: dt.datetime | str | None = None,
        limit: int | None = None,
        event_from: int | None = None,
        event_to: int | None = None,
    ) -> list[AuditEvent]:
        """Audit events matching every given filter, in chain order (site matches actor or target)."""
        where: list[str] = []
        params: list[Any] = []
        for col, value in (("study_uid", study_uid), ("actor", actor), ("action", action)):
            if value is not None:
                where.append(f"{col} = ?")
                params.append(value)
        if site is not None:
            where.append("(actor_site = ? OR target_site = ?)")
            params.extend([site, site])
        if since is not None:
            where.append('"at" >= ?::TIMESTAMPTZ')
            params.append(as_ts(since))
        if until is not None:
            where.append('"at" < ?::TIMESTAMPTZ')
            params.append(as_ts(until))
        if event_from is not None:
            where.append("event_no >= ?")
            params.append(event_from)
        if event_to is not None:
            where.append("event_no <= ?")
            params.append(event_to)
        sql = (
            "SELECT * FROM audit "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "ORDER BY event_no"
            + (f" LIMIT {int(limit)}" if limit else "")
        )
        return [audit_mod.event_from_row(r) for r in self._engine.rows(sql, params)]

    def audit_trail(self, study_uid: str) -> list[AuditEvent]:
        return self.audit(study_uid=study_uid)

    def verify_audit(self, deep: bool = True) -> AuditVerification:
        """Recompute the whole hash chain; reports edited, deleted and reordered events.

        Damage to the catalog itself (a missing log entry, an altered data
        file, a witness that knows of more) is reported as problems, not
        raised: this is the question an auditor asks of a damaged catalog.
        `deep` also reads every data file against its checksum (check()).
        """
        with self._engine.lock:
            extra: list[str] = []
            if deep:
                extra += [f"catalog: {p}" for p in check_catalog(self, self.backup).problems]
            try:
                state = self.refresh()
            except CatalogDamaged as exc:
                extra.append(str(exc))
                try:  # what can still be read
                    state = self.log.catch_up(self.log.latest_checkpoint() or State())
                except CatalogError as exc2:
                    return AuditVerification(False, 0, tuple(extra + [str(exc2)]))
            try:
                anchor = json.loads(cfs.read_bytes(self.fs, cfs.join(self.root, audit_mod.ANCHOR)))
            except (FileNotFoundError, ValueError):
                anchor = None
            witness = None
            if self.backup is not None:
                try:
                    witness = self.backup.read_witness()
                except CatalogDamaged as exc:
                    extra.append(str(exc))
            # Read the stored files themselves (never a cached copy or cached metadata).
            files = sorted(state.files.get("audit", {}).values(), key=lambda f: (f.seq, f.path))
            readable = []
            for f in files:
                if not cfs.exists(self.fs, cfs.join(self.root, f.path)):
                    extra.append(f"audit data file {f.path} (commit {f.seq}) is missing")
                else:
                    readable.append(f)
            result = self._verify_audit_files(state, readable, anchor, witness)
            if not extra:
                return result
            problems = tuple(dict.fromkeys(extra + list(result.problems)))
            return AuditVerification(False, result.events_checked, problems[:50])

    def _verify_audit_files(
        self, state: State, files: list[FileEntry], anchor: dict[str, Any] | None, witness: dict[str, Any] | None
    ) -> AuditVerification:
        if not files:
            return audit_mod.verify_rows([], state.audit_count, state.audit_head, anchor, witness)
        source = f"read_parquet([{', '.join(sql_str(self.abs_path(f.path)) for f in files)}])"
        cur = self.con.cursor()
        cur.execute("SET parquet_metadata_cache = false")
        try:
            reader = cur.sql(
                'SELECT event_no, "at", actor_site, actor, action, study_uid, target_site, outcome, detail, '
                f"prev_hash, hash FROM {source} ORDER BY event_no"
            ).to_arrow_reader(50_000)

            def rows() -> Iterable[dict[str, Any]]:
                for batch in reader:
                    yield from batch.to_pylist()

            return audit_mod.verify_rows(rows(), state.audit_count, state.audit_head, anchor, witness)
        except (duckdb.Error, OSError) as exc:
            return AuditVerification(False, 0, (f"the audit files cannot be read: {exc}",))
        finally:
            cur.close()
            self.con.execute("SET parquet_metadata_cache = true")
