"""Where the copies of a study are: the state of each copy per holder (center, edge, PACS).

A location is an event (present, verified, missing, corrupt, removed); the
latest per study, instance and holder is its state. Study-level rows have an
empty SOP Instance UID; instance-level rows are written for exceptions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from renkei.catalog import tables
from renkei.catalog.engine import TableEngine
from renkei.catalog.log import State
from renkei.catalog.normalise import Conditions
from renkei.catalog.records import CommitPlan, LocationRecord, location_record
from renkei.errors import UsageError

# the latest state of a copy, from its location events (grouped by study, holder and perhaps instance)
_LATEST = (
    "arg_max(state, _seq) AS state, arg_max(verified_at, _seq) AS verified_at, arg_max(detail, _seq) AS detail, "
    'arg_max("by", _seq) AS "by", max("at") AS "at"'
)


class Locations:
    """Records and answers the state of every copy, over the engine's tables."""

    def __init__(self, engine: TableEngine) -> None:
        self.engine = engine

    def locations(self, study_uid: str, include_instances: bool = True) -> list[LocationRecord]:
        """Every copy of the study: its latest state per holder (and per instance where recorded)."""
        extra = "" if include_instances else "AND sop_instance_uid = ''"
        rows = self.engine.rows(
            f"SELECT study_uid, sop_instance_uid, holder, {_LATEST} FROM locations "
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
                    "by": e.get("by") or self.engine.writer,
                    "at": now,
                    "_seq": seq,
                }
                for e in entries
            ]
            return CommitPlan(rows={"locations": pa.Table.from_pylist(rows, schema=tables.LOCATIONS)})

        seq, _ = self.engine.commit("locations", build)
        return int(seq or 0)

    def study_locations(self, study_uids: Sequence[str]) -> dict[str, list[LocationRecord]]:
        """The study-level copies (latest state per holder) of several studies, in one query."""
        if not study_uids:
            return {}
        rows = self.engine.rows(
            f"SELECT study_uid, holder, {_LATEST} "
            "FROM locations WHERE sop_instance_uid = '' AND study_uid IN (SELECT unnest(?::VARCHAR[])) "
            "GROUP BY study_uid, holder ORDER BY study_uid, holder",
            [list(study_uids)],
        )
        out: dict[str, list[LocationRecord]] = {uid: [] for uid in study_uids}
        for r in rows:
            out.setdefault(r["study_uid"], []).append(location_record(r))
        return out

    def instance_locations(
        self, by: str | None = None, since: dt.datetime | str | None = None, limit: int | None = 500
    ) -> list[LocationRecord]:
        """Instance-level copies (latest state per instance and holder), newest first.

        Instance-level rows are written for exceptions (the nightly verification
        records what it found missing or corrupt, and whether it was repaired);
        `by` and `since` filter on the latest record's writer and time.
        """
        where = Conditions()
        if by is not None:
            where.add('"by" = ?', by)
        where.since_until('"at"', since)
        rows = self.engine.rows(
            f"SELECT * FROM (SELECT study_uid, sop_instance_uid, holder, {_LATEST} FROM locations "
            "WHERE sop_instance_uid <> '' "
            "GROUP BY study_uid, sop_instance_uid, holder) "
            + where.sql()
            + 'ORDER BY "at" DESC, study_uid, sop_instance_uid'
            + (f" LIMIT {int(limit)}" if limit else ""),
            where.params,
        )
        return [location_record(r) for r in rows]
