"""Grants, consents and the one visibility rule: who may see which study.

`visible_sql` is the rule as SQL (a relation of what every site may see);
renkei.policy.decide is the same rule for one study, with its explanation, and
tests check that the two never disagree. visible_studies, may_see and
visibility_counts all ask it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from renkei.catalog import tables
from renkei.catalog.audit import AuditDraft
from renkei.catalog.engine import TableEngine, sql_str
from renkei.catalog.log import State
from renkei.catalog.normalise import Conditions, normalise_grants, stamped, validate_grant
from renkei.catalog.records import (
    CommitPlan,
    ConsentRecord,
    GrantRecord,
    GrantRequest,
    StudyRow,
    consent_record,
    grant_record,
    study_row,
)
from renkei.catalog.studies import STUDY_AGG, study_filters
from renkei.errors import UsageError


def visible_sql(studies: str, one_site: bool, listed_only: bool = True) -> str:
    """CTEs ending in `visible(site, study_uid, origin_site, why)`: the one visibility rule, as SQL.

    `studies` names a relation with one row per study (study_uid, origin_site,
    patient_id, issuer_of_patient_id). A site sees a study taken there
    ('origin'), and another site's through a grant in force ('grant'); while
    the patient's consent is withdrawn at the origin, only a person's grant
    counts. renkei.policy.decide is the same rule for one study, with its
    explanation; tests check that the two never disagree. With `one_site`, the
    grants are those of one site (a `?` parameter, in this position). With
    `listed_only`, only the grants of the studies in `studies` are read, so that
    a question about a few studies does not aggregate every grant of the site
    (at a million studies that was most of its time).
    """
    conds = ["site = ?"] if one_site else []
    if listed_only:
        conds.append(f"study_uid IN (SELECT study_uid FROM {studies})")
    grants_of = f"WHERE {' AND '.join(conds)} " if conds else ""
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


_KEY_COLUMNS = ("study_uid", "origin_site", "patient_id", "issuer_of_patient_id")  # what visible_sql reads
STUDY_KEYS = (
    "study_uid, arg_max(origin_site, _seq) AS origin_site, arg_max(patient_id, _seq) AS patient_id, "
    "arg_max(issuer_of_patient_id, _seq) AS issuer_of_patient_id"
)


class Grants:
    """Writes grants, revocations and consents, and answers what a site may see, over the engine's tables."""

    def __init__(self, engine: TableEngine) -> None:
        self.engine = engine

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
                with self.engine.registered(_grant_uids=pa.table({"study_uid": pc.unique(table.column("study_uid"))})):
                    self.engine.ensure_views()
                    current = {
                        (u, s): a
                        for u, s, a in self.engine.con.execute(
                            "SELECT study_uid, site, arg_max(action, _seq) FROM grants "
                            "WHERE study_uid IN (SELECT study_uid FROM _grant_uids) GROUP BY study_uid, site"
                        ).fetchall()
                    }
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
            rows = stamped(todo, "at", now, seq)
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

        self.engine.commit("grants", build)
        return written["n"]

    def grants(self, study_uid: str) -> list[GrantRecord]:
        """Every grant and revocation of the study, oldest first; `current` marks the latest per site."""
        rows = self.engine.rows(
            "SELECT *, _seq = max(_seq) OVER (PARTITION BY site) AS current FROM grants WHERE study_uid = ? "
            "ORDER BY _seq, site",
            [study_uid],
            memo=("grants",),
        )
        return [grant_record(r) for r in rows]

    def active_grants_for_site(self, site: str) -> list[GrantRecord]:
        """The grants currently active for `site` (one per study)."""
        rows = self.engine.rows(
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

        seq, _ = self.engine.commit("consent", build)
        return int(seq or 0)

    def consent_of(self, site: str, patient_id: str, issuer: str) -> ConsentRecord | None:
        rows = self.engine.rows(
            "SELECT * FROM consents WHERE site = ? AND patient_id = ? AND issuer = ? ORDER BY _seq DESC LIMIT 1",
            [site, patient_id, issuer],
            memo=("consents",),
        )
        return consent_record(rows[0]) if rows else None

    def withdrawn_consents(self) -> list[ConsentRecord]:
        rows = self.engine.rows(
            "SELECT * FROM (SELECT *, row_number() OVER (PARTITION BY site, patient_id, issuer "
            "ORDER BY _seq DESC) AS rn FROM consents) WHERE rn = 1 AND state = 'withdrawn'"
        )
        return [consent_record(r) for r in rows]

    # ---------------------------------------------------------- visibility
    def visible_studies(
        self,
        site: str,
        patient_ids: Sequence[tuple[str, str | None]] | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
        modalities: Sequence[str] | None = None,
        study_uids: Sequence[str] | None = None,
    ) -> list[StudyRow]:
        """Studies `site` may see by the one visibility rule (visible_sql): its own, or granted (and consented).

        Optionally only those of the given (patient_id, issuer) pairs (issuer
        None matches any), of the given study UIDs, with study_date within
        [date_from, date_to] (YYYYMMDD) and any of `modalities`.
        """
        where, having = Conditions(), Conditions()
        if study_uids is not None:
            if not study_uids:
                return []
            where.add("list_contains(?::VARCHAR[], study_uid)", list(dict.fromkeys(study_uids)))
        if patient_ids is not None:
            if not patient_ids:
                return []
            ors: list[str] = []
            p_ors: list[Any] = []
            for pid, issuer in patient_ids:
                if issuer is None:
                    ors.append("patient_id = ?")
                    p_ors.append(pid)
                else:
                    ors.append("(patient_id = ? AND issuer_of_patient_id = ?)")
                    p_ors.extend([pid, issuer])
            where.add("(" + " OR ".join(ors) + ")", *p_ors)
        study_filters(having, date_from, date_to, modalities)
        sql = f"SELECT study_uid, {STUDY_AGG} FROM studies {where.sql()}GROUP BY study_uid {having.sql('HAVING')}"
        with self.engine.lock:
            candidates = self.engine.rows(sql, where.params + having.params)
            if not candidates:
                return []
            others = [r for r in candidates if r["origin_site"] != site]
            granted = self._visible_among(site, [r["study_uid"] for r in others], known=others) if others else set()
        rows = [study_row(r) for r in candidates if r["origin_site"] == site or r["study_uid"] in granted]
        rows.sort(key=lambda r: (r.study_date, r.study_time, r.study_uid))
        return rows

    def may_see(self, site: str, study_uid: str) -> bool:
        """Whether `site` may see the study, by the one visibility rule (renkei.policy.decide explains it)."""
        with self.engine.lock:
            return study_uid in self._visible_among(site, [study_uid])

    def _visible_among(
        self, site: str, study_uids: Sequence[str], known: Sequence[Mapping[str, Any]] | None = None
    ) -> set[str]:
        """Those of `study_uids` that `site` may see (the caller holds the lock).

        `known`: the studies' current rows (study_uid, origin_site, patient_id, issuer_of_patient_id),
        when the caller has just read them: the studies table is then not read again (it is sorted by
        patient, so a lookup by study UID reads all of it: 40-60 ms at a million studies).
        """
        relations: dict[str, pa.Table] = {}
        if known is not None:
            relations["_vs_rows"] = pa.table({c: pa.array([r[c] for r in known], pa.string()) for c in _KEY_COLUMNS})
            studies = "_vs AS (SELECT * FROM _vs_rows)"
        elif len(study_uids) <= 500:
            cond = "study_uid IN (" + ", ".join(sql_str(u) for u in study_uids) + ")" if study_uids else "FALSE"
            studies = f"_vs AS (SELECT {STUDY_KEYS} FROM studies WHERE {cond} GROUP BY study_uid)"
        else:
            relations["_candidates"] = pa.table({"study_uid": list(study_uids)})
            studies = (
                f"_vs AS (SELECT {STUDY_KEYS} FROM studies "
                "WHERE study_uid IN (SELECT study_uid FROM _candidates) GROUP BY study_uid)"
            )
        with self.engine.registered(**relations):
            rows = self.engine.rows(
                f"WITH {studies}, "
                + visible_sql("_vs", one_site=True)
                + " SELECT DISTINCT study_uid FROM visible WHERE site = ?",
                [site, site],
            )
        return {r["study_uid"] for r in rows}

    def visibility_counts(self) -> dict[tuple[str, str], int]:
        """{(viewer site, origin site): how many studies of the origin the viewer may see} (visible_sql)."""
        rows = self.engine.rows(
            f"WITH vs AS (SELECT {STUDY_KEYS} FROM studies GROUP BY study_uid), "
            + visible_sql("vs", one_site=False, listed_only=False)
            + " SELECT site AS viewer, origin_site AS origin, count(DISTINCT study_uid) AS n FROM visible "
            "GROUP BY site, origin_site"
        )
        return {(r["viewer"], r["origin"]): int(r["n"]) for r in rows}
