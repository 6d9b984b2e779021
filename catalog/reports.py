"""Reports (read-only): per-site totals, registration history, and the study browser's pages."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, cast

from renkei.catalog.engine import TableEngine
from renkei.catalog.grants import visible_sql
from renkei.catalog.normalise import Conditions
from renkei.catalog.records import (
    RegistrationBatch,
    SeriesSummary,
    SiteTotals,
    StudyRegistration,
    StudyRow,
    study_row,
)
from renkei.catalog.search import Search
from renkei.catalog.studies import STUDY_AGG, study_filters


class Reports:
    """The operators' and dashboards' questions over the engine's tables."""

    def __init__(self, engine: TableEngine) -> None:
        self.engine = engine

    def totals(self, pending: Mapping[str, int] | None = None) -> list[SiteTotals]:
        """Per origin site: studies, instances, bytes, and the backlog.

        backlog_studies counts studies an edge holds whose center copy is not
        verified yet; `pending` (per site, e.g. from the edges' journals) is
        reported beside it for what has not reached the catalog at all.
        """
        rows = self.engine.rows("""
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

    def registrations(
        self, since: dt.datetime | str | None = None, until: dt.datetime | str | None = None
    ) -> list[RegistrationBatch]:
        """Per origin site and registration commit: studies, instances and bytes registered, oldest first.

        What an operator's throughput chart is drawn from (instances are never
        folded by compaction, so the history stays complete).
        """
        where = Conditions()
        where.since_until("registered_at", since, until)
        rows = self.engine.rows(
            "SELECT origin_site, registered_at AS at, count(DISTINCT study_uid) AS studies, count(*) AS instances, "
            "coalesce(sum(size), 0)::BIGINT AS bytes FROM instances "
            + where.sql()
            + "GROUP BY origin_site, registered_at ORDER BY registered_at, origin_site",
            where.params,
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
        having = Conditions()
        having.since_until("max(registered_at)", since)
        rows = self.engine.rows(
            "SELECT study_uid, any_value(origin_site) AS origin_site, min(registered_at) AS first_at, "
            "max(registered_at) AS last_at, count(*) AS instances, coalesce(sum(size), 0)::BIGINT AS bytes "
            "FROM instances GROUP BY study_uid "
            + having.sql("HAVING")
            + "ORDER BY last_at DESC, study_uid"
            + (f" LIMIT {int(limit)}" if limit else ""),
            having.params,
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
        where, having, outer = Conditions(), Conditions(), Conditions()
        p_cte: list[Any] = []
        if patient_id is not None:
            where.add("patient_id = ?", patient_id)
        study_filters(having, date_from, date_to, modalities)
        if origin_sites is not None:
            outer.add("list_contains(?::VARCHAR[], origin_site)", list(origin_sites))
        if search:
            clause, p_search = Search.parse(search).where(names=search_names)
            outer.add(clause, *p_search)
        visible = ""
        if visible_to is not None:
            # a page of the whole catalog reads every grant anyway; a filtered one only its studies'
            visible = ", " + visible_sql("a", one_site=True, listed_only=bool(where.params or having.params))
            p_cte.append(visible_to)
            outer.add("study_uid IN (SELECT study_uid FROM visible WHERE site = ?)", visible_to)
        sql = (
            f"WITH a AS (SELECT study_uid, {STUDY_AGG} FROM studies "
            + where.sql()
            + "GROUP BY study_uid "
            + having.sql("HAVING")
            + ")"
            + visible
            + " SELECT *, count(*) OVER () AS _total FROM a "
            + outer.sql()
            + "ORDER BY study_date DESC, study_time DESC, study_uid DESC "
            + f"LIMIT {max(0, int(limit))} OFFSET {max(0, int(offset))}"
        )
        params = where.params + having.params + p_cte + outer.params
        rows = self.engine.rows(sql, params)
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

    def series_summaries(self, study_uids: Sequence[str]) -> dict[str, list[SeriesSummary]]:
        """The series of several studies with their registered instance counts, by study, in one query."""
        if not study_uids:
            return {}
        rows = self.engine.rows(
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
        out: dict[str, list[SeriesSummary]] = {uid: [] for uid in study_uids}
        for r in rows:
            out.setdefault(r["study_uid"], []).append(cast(SeriesSummary, r))
        return out
