"""Patient links: which site-local patient IDs are one person, and the demographic search behind them."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from renkei.catalog import tables
from renkei.catalog.audit import AuditDraft
from renkei.catalog.engine import TableEngine
from renkei.catalog.log import State
from renkei.catalog.normalise import Conditions
from renkei.catalog.records import CommitPlan, PatientCandidate
from renkei.errors import UsageError


class Patients:
    """Links and unlinks site-local patients to persons, and finds them, over the engine's tables."""

    def __init__(self, engine: TableEngine) -> None:
        self.engine = engine

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

        self.engine.commit("link", build)
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

        seq, _ = self.engine.commit("unlink", build)
        return seq is not None

    def _current_links(self) -> dict[tuple[str, str, str], str]:
        self.engine.ensure_views()
        rows = self.engine.con.execute(
            "SELECT site, patient_id, issuer, arg_max(person_id, _seq) FROM patient_links "
            "GROUP BY site, patient_id, issuer"
        ).fetchall()
        return {(s, p, i): person for s, p, i, person in rows if person}

    def person_of(self, site: str, patient_id: str, issuer: str) -> str | None:
        rows = self.engine.rows(
            "SELECT arg_max(person_id, _seq) AS person FROM patient_links "
            "WHERE site = ? AND patient_id = ? AND issuer = ?",
            [site, patient_id, issuer],
        )
        return (rows[0]["person"] or None) if rows else None

    def patient_ids_of(self, person_id: str) -> list[tuple[str, str, str]]:
        rows = self.engine.rows(
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
        where = Conditions()
        if name:
            groups = [g.strip().lower() for g in name.split("=") if g.strip()]
            where.add(
                "list_has_any(list_transform(string_split(lower(patient_name), '='), lambda x: trim(x)), ?::VARCHAR[])",
                groups,
            )
        if birth_date:
            where.add("patient_birth_date = ?", birth_date)
        if sex:
            where.add("patient_sex = ?", sex)
        if site:
            where.add("origin_site = ?", site)
        rows = self.engine.rows(
            "SELECT origin_site AS site, patient_id, issuer_of_patient_id AS issuer, any_value(patient_name) AS "
            "patient_name, any_value(patient_birth_date) AS patient_birth_date, any_value(patient_sex) AS patient_sex, "
            "count(DISTINCT study_uid) AS studies FROM studies "
            + where.sql()
            + "GROUP BY origin_site, patient_id, issuer_of_patient_id ORDER BY site, patient_id",
            where.params,
        )
        return [PatientCandidate(**r) for r in rows]
