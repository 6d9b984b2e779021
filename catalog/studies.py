"""Studies, series and instances: the registration planner and the queries of what is registered.

A registration is one commit: new instances (checked against what is there:
the same SHA-256 is already present, another one is a conflict kept beside it),
new series, per-study counts, the holder's location and its audit events.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from typing import Any, cast

import pyarrow as pa
import pyarrow.compute as pc

from renkei.catalog import keys, tables
from renkei.catalog.audit import AuditDraft
from renkei.catalog.engine import TableEngine
from renkei.catalog.log import State
from renkei.catalog.normalise import (
    Conditions,
    const_column,
    normalise_instances,
    normalise_studies,
    origin_sites_text,
    stamped,
)
from renkei.catalog.records import (
    CommitPlan,
    ConflictRecord,
    InstanceRef,
    InstanceRow,
    RegisterResult,
    SeriesRow,
    StudyRow,
    conflict_record,
    study_row,
)
from renkei.errors import StudyOfAnotherSite, UsageError
from renkei.records import StudyBatch

# a study's columns from its rows in `studies` (one per registration; compaction folds them to one)
STUDY_AGG = ",\n".join(
    [f"arg_max({c}, _seq) AS {c}" for c in tables.STUDY_INFO_FIELDS if c != "study_uid"]
    + [
        "list_sort(list_distinct(flatten(list(modalities)))) AS modalities",
        "sum(series_added)::BIGINT AS series_count",
        "sum(instances_added)::BIGINT AS instance_count",
        "sum(bytes_added)::BIGINT AS bytes",
        "min(registered_at) AS registered_at",
    ]
)


def study_filters(
    having: Conditions, date_from: str | None, date_to: str | None, modalities: Sequence[str] | None
) -> None:
    """Add to a HAVING over STUDY_AGG's groups: study_date within [date_from, date_to], any of `modalities`."""
    if date_from:
        having.add("arg_max(study_date, _seq) >= ?", date_from)
    if date_to:
        having.add("arg_max(study_date, _seq) <= ?", date_to)
    if modalities:
        having.add("list_has_any(list_distinct(flatten(list(modalities))), ?::VARCHAR[])", list(modalities))


class Studies:
    """Registers studies and answers what is registered, over the engine's tables."""

    def __init__(self, engine: TableEngine) -> None:
        self.engine = engine

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
        actor = actor or self.engine.writer
        with self.engine.registered(_new_studies=studies, _new_inst=instances):
            seq, result = self.engine.commit(
                "register",
                lambda state, seq, now: self._plan_register(
                    state, seq, now, studies, instances, holder, actor, study_uids, audit_each_study
                ),
            )
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
        self.engine.ensure_views()
        con = self.engine.con
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
        with self.engine.registered(_fresh=fresh):
            series = con.sql(
                "WITH f AS (SELECT study_uid, series_uid, any_value(modality) AS modality, "
                "  any_value(series_number) AS series_number, any_value(series_description) AS series_description, "
                "  any_value(origin_site) AS origin_site FROM _fresh GROUP BY study_uid, series_uid) "
                "SELECT f.* FROM f ANTI JOIN series e ON e.study_uid = f.study_uid AND e.series_uid = f.series_uid"
            ).to_arrow_table()
            with self.engine.registered(_fresh_series=series):
                deltas = con.sql(
                    "WITH i AS (SELECT study_uid, count(*) AS n, sum(size) AS b FROM _fresh GROUP BY study_uid), "
                    "s AS (SELECT study_uid, count(*) AS n FROM _fresh_series GROUP BY study_uid) "
                    "SELECT t.*, coalesce(s.n, 0)::BIGINT AS series_added, "
                    "coalesce(i.n, 0)::BIGINT AS instances_added, "
                    "coalesce(i.b, 0)::BIGINT AS bytes_added FROM _new_studies t "
                    "LEFT JOIN i USING (study_uid) LEFT JOIN s USING (study_uid)"
                ).to_arrow_table()
        deltas = stamped(deltas, "registered_at", now, seq)
        fresh = stamped(fresh, "registered_at", now, seq)
        series = stamped(series, "registered_at", now, seq)
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
    def instances(self, study_uid: str, version: str = "current") -> list[InstanceRow]:
        """The study's registered instances (object key, SHA-256, size, SOP class, transfer syntax).

        version='current' (what every retrieval serves): an instance sent
        again with other bytes has the key, SHA-256 and size of its latest
        version, and `corrected` True; version='first': the rows as first
        registered.
        """
        if version == "first":
            return cast(
                list[InstanceRow],
                self.engine.rows(
                    "SELECT * EXCLUDE (_seq) FROM instances WHERE study_uid = ? ORDER BY series_uid, instance_number, "
                    "sop_instance_uid",
                    [study_uid],
                    memo=("instances",),
                ),
            )
        if version != "current":
            raise UsageError(f"version {version!r}: use 'current' or 'first'")
        return cast(
            list[InstanceRow],
            self.engine.rows(
                "WITH v AS (SELECT sop_instance_uid, arg_max(conflict_key, _seq) AS k, "
                "arg_max(new_sha256, _seq) AS sha, "
                "  arg_max(new_size, _seq) AS sz FROM conflicts WHERE study_uid = ? GROUP BY sop_instance_uid) "
                "SELECT i.* EXCLUDE (_seq, object_key, sha256, size), coalesce(v.k, i.object_key) AS object_key, "
                "coalesce(v.sha, i.sha256) AS sha256, coalesce(v.sz, i.size) AS size, v.k IS NOT NULL AS corrected "
                "FROM instances i LEFT JOIN v USING (sop_instance_uid) WHERE i.study_uid = ? "
                "ORDER BY i.series_uid, i.instance_number, i.sop_instance_uid",
                [study_uid, study_uid],
                memo=("instances", "conflicts"),
            ),
        )

    def iter_instances(self, part: int = 0, parts: int = 1, batch_size: int = 10_000) -> Iterator[list[InstanceRef]]:
        """Every registered instance (study, origin, key, SHA-256, size), in batches.

        With `parts` > 1, only the share whose SOP Instance UID hashes to `part`
        (mod `parts`): the nightly verification reads one part a night so that
        everything is read within `parts` nights.
        """
        where = "" if parts <= 1 else f"WHERE hash(i.sop_instance_uid) % {int(parts)} = {int(part) % int(parts)}"
        yield from cast(
            Iterator[list[InstanceRef]],
            self.engine.batches(
                "SELECT i.study_uid, i.series_uid, i.sop_instance_uid, i.object_key, i.sha256, i.size, "
                "s.origin_site FROM (SELECT study_uid, series_uid, sop_instance_uid, object_key, sha256, size "
                "  FROM instances UNION ALL "
                # every kept version is verified too (versions registered before sizes were recorded: not)
                "  SELECT c.study_uid, f.series_uid, c.sop_instance_uid, c.conflict_key, c.new_sha256, c.new_size "
                "  FROM conflicts c JOIN instances f USING (study_uid, sop_instance_uid) "
                "  WHERE c.new_size IS NOT NULL) i "
                "JOIN (SELECT study_uid, arg_max(origin_site, _seq) AS origin_site "
                f"FROM studies GROUP BY study_uid) s USING (study_uid) {where} "
                "ORDER BY i.object_key",
                batch_size,
            ),
        )

    def referenced_keys(self) -> set[str]:
        """Every object key a catalog row points to: instances, and the conflicting copies beside them."""
        rows = self.engine.rows("SELECT object_key AS k FROM instances UNION SELECT conflict_key AS k FROM conflicts")
        return {r["k"] for r in rows if r["k"]}

    def instance_count(self) -> int:
        return int(self.engine.rows("SELECT count(*) AS n FROM instances")[0]["n"])

    def series(self, study_uid: str) -> list[SeriesRow]:
        return cast(
            list[SeriesRow],
            self.engine.rows(
                "SELECT * EXCLUDE (_seq) FROM series WHERE study_uid = ? ORDER BY series_number, series_uid",
                [study_uid],
            ),
        )

    def conflicts(self, study_uid: str | None = None) -> list[ConflictRecord]:
        where, params = ("WHERE study_uid = ?", [study_uid]) if study_uid else ("", [])
        rows = self.engine.rows(f'SELECT * FROM conflicts {where} ORDER BY "at", sop_instance_uid', params)
        return [conflict_record(r) for r in rows]

    # ---------------------------------------------------------- studies
    def study(self, study_uid: str) -> StudyRow | None:
        rows = self.engine.rows(
            f"SELECT study_uid, {STUDY_AGG} FROM studies WHERE study_uid = ? GROUP BY study_uid",
            [study_uid],
            memo=("studies",),
        )
        return study_row(rows[0]) if rows else None
