"""Audit events: append-only, hash-chained in one total order, verifiable.

Each event's hash is SHA-256(previous event's hash + the event's canonical
JSON), and the canonical JSON includes its number, so an edited, deleted or
reordered event breaks the chain from that point on. The events of a commit
are chained against the head of the commit before it; the catalog's commit
log serialises commits, which makes the order total even with many writer
processes. The head (count, hash) is kept in the log entries and also in a
separate anchor file, so that deleting the *last* events is detected too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from renkei.catalog import tables

GENESIS = "0" * 64
ANCHOR = "_audit/head.json"


@dataclass(frozen=True)
class AuditDraft:
    """An event to append (its number, time and hashes are set when it is committed)."""

    actor_site: str
    actor: str
    action: str
    study_uid: str | None = None
    target_site: str | None = None
    outcome: str = "ok"
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class AuditEvent:
    """One committed audit event: who (actor_site, actor) did what (action) to which study, when."""

    event_no: int
    at: dt.datetime
    actor_site: str
    actor: str
    action: str
    study_uid: str | None
    target_site: str | None
    outcome: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_no": self.event_no,
            "at": self.at.isoformat(),
            "actor_site": self.actor_site,
            "actor": self.actor,
            "action": self.action,
            "study_uid": self.study_uid,
            "target_site": self.target_site,
            "outcome": self.outcome,
            "detail": self.detail,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class AuditVerification:
    """The result of checking the chain: ok, how many events were checked, and what is wrong."""

    ok: bool
    events_checked: int
    problems: tuple[str, ...] = field(default_factory=tuple)


def canonical(
    event_no: int,
    at: dt.datetime,
    actor_site: str,
    actor: str,
    action: str,
    study_uid: str | None,
    target_site: str | None,
    outcome: str,
    detail_json: str,
) -> str:
    """The exact text the hash covers (stable key order, UTC microseconds)."""
    stamp = at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps(
        [event_no, stamp, actor_site, actor, action, study_uid or "", target_site or "", outcome, detail_json],
        ensure_ascii=False,
        separators=(",", ":"),
    )


def chain_hash(prev_hash: str, text: str) -> str:
    return hashlib.sha256((prev_hash + text).encode("utf-8")).hexdigest()


def detail_json(detail: dict[str, Any] | None) -> str:
    return json.dumps(detail or {}, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def build_rows(
    drafts: Sequence[AuditDraft], first_no: int, prev_hash: str, at: dt.datetime, seq: int
) -> tuple[pa.Table, str]:
    """The Arrow rows of `drafts` chained after (first_no - 1, prev_hash); returns (table, new head)."""
    cols: dict[str, list[Any]] = {name: [] for name in tables.AUDIT.names}
    head = prev_hash
    for i, draft in enumerate(drafts):
        no = first_no + i
        djson = detail_json(draft.detail)
        text = canonical(
            no,
            at,
            draft.actor_site,
            draft.actor,
            draft.action,
            draft.study_uid,
            draft.target_site,
            draft.outcome,
            djson,
        )
        digest = chain_hash(head, text)
        for name, value in (
            ("event_no", no),
            ("at", at),
            ("actor_site", draft.actor_site),
            ("actor", draft.actor),
            ("action", draft.action),
            ("study_uid", draft.study_uid),
            ("target_site", draft.target_site),
            ("outcome", draft.outcome),
            ("detail", djson),
            ("prev_hash", head),
            ("hash", digest),
            ("_seq", seq),
        ):
            cols[name].append(value)
        head = digest
    return pa.table(cols, schema=tables.AUDIT), head


def event_from_row(row: dict[str, Any]) -> AuditEvent:
    return AuditEvent(
        event_no=int(row["event_no"]),
        at=row["at"],
        actor_site=row["actor_site"],
        actor=row["actor"],
        action=row["action"],
        study_uid=row["study_uid"],
        target_site=row["target_site"],
        outcome=row["outcome"],
        detail=json.loads(row["detail"] or "{}"),
        prev_hash=row["prev_hash"],
        hash=row["hash"],
    )


def verify_rows(
    rows: Iterable[dict[str, Any]],
    expected_count: int,
    expected_head: str,
    anchor: dict[str, Any] | None,
    witness: dict[str, Any] | None = None,
) -> AuditVerification:
    """Recompute the chain over `rows` (in event_no order) and compare with the recorded head."""
    problems: list[str] = []
    head = GENESIS
    expected_no = 1
    hashes: dict[int, str] = {}
    checked = 0
    for row in rows:
        checked += 1
        no = int(row["event_no"])
        if no != expected_no:
            if no < expected_no:
                problems.append(f"event {no} appears more than once or out of order")
            else:
                problems.append(f"events {expected_no}..{no - 1} are missing (deleted?)")
            expected_no = no
        text = canonical(
            no,
            row["at"],
            row["actor_site"],
            row["actor"],
            row["action"],
            row["study_uid"],
            row["target_site"],
            row["outcome"],
            row["detail"],
        )
        digest = chain_hash(head, text)
        if row["prev_hash"] != head:
            problems.append(f"event {no} does not follow the event before it (reordered or one removed)")
        if digest != row["hash"]:
            problems.append(f"event {no} was changed after it was written (its hash does not match)")
        head = row["hash"]
        hashes[no] = row["hash"]
        expected_no = no + 1
    last = expected_no - 1
    if last != expected_count:
        problems.append(
            f"the chain ends at event {last}, but the catalog recorded {expected_count} events "
            "(the last events were deleted or the log was damaged)"
        )
    elif expected_count and head != expected_head:
        problems.append("the last event's hash differs from the head recorded in the catalog log")
    if anchor:
        a_no, a_hash = int(anchor.get("count", 0)), str(anchor.get("head", ""))
        if a_no > last:
            problems.append(
                f"the audit anchor records {a_no} events, but only {last} remain (the last events were deleted)"
            )
        elif a_no and hashes.get(a_no) != a_hash:
            problems.append(f"event {a_no} differs from the hash recorded in the audit anchor")
    if witness:  # outside the catalog: survives the catalog's deletion
        w_no, w_hash = int(witness.get("audit_count", 0)), str(witness.get("audit_head", ""))
        if w_no > last:
            problems.append(
                f"the witness outside the catalog records {w_no} events, but only {last} remain "
                "(events were deleted, or the catalog was lost or restored from an older copy)"
            )
        elif w_no and hashes.get(w_no) != w_hash:
            problems.append(f"event {w_no} differs from the hash the witness outside the catalog recorded")
    # Report each problem once, keeping the first ones (later events all break after a change).
    unique = list(dict.fromkeys(problems))
    return AuditVerification(not unique, checked, tuple(unique[:50]))
