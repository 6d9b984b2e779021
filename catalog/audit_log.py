"""The audit log's repository: appending events to the hash chain, reading them, verifying the chain.

The chain itself (rows, hashes, verification of rows) is catalog.audit; this
writes it through the engine's commits and reads it back.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb

from renkei.catalog import audit as audit_mod
from renkei.catalog import fs as cfs
from renkei.catalog.audit import AuditDraft, AuditEvent, AuditVerification
from renkei.catalog.backup import check as check_catalog
from renkei.catalog.engine import TableEngine, sql_str
from renkei.catalog.log import FileEntry, State
from renkei.catalog.normalise import Conditions
from renkei.catalog.records import CommitPlan
from renkei.errors import CatalogDamaged, CatalogError


class AuditLog:
    """Appends, reads and verifies the audit chain, over the engine's tables."""

    def __init__(self, engine: TableEngine) -> None:
        self.engine = engine

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

        seq, (first, _) = self.engine.commit("audit", build)
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
        where = Conditions()
        for col, value in (("study_uid", study_uid), ("actor", actor), ("action", action)):
            if value is not None:
                where.add(f"{col} = ?", value)
        if site is not None:
            where.add("(actor_site = ? OR target_site = ?)", site, site)
        where.since_until('"at"', since, until)
        if event_from is not None:
            where.add("event_no >= ?", event_from)
        if event_to is not None:
            where.add("event_no <= ?", event_to)
        sql = "SELECT * FROM audit " + where.sql() + "ORDER BY event_no" + (f" LIMIT {int(limit)}" if limit else "")
        return [audit_mod.event_from_row(r) for r in self.engine.rows(sql, where.params)]

    def audit_trail(self, study_uid: str) -> list[AuditEvent]:
        return self.audit(study_uid=study_uid)

    def verify_audit(self, deep: bool = True) -> AuditVerification:
        """Recompute the whole hash chain; reports edited, deleted and reordered events.

        Damage to the catalog itself (a missing log entry, an altered data
        file, a witness that knows of more) is reported as problems, not
        raised: this is the question an auditor asks of a damaged catalog.
        `deep` also reads every data file against its checksum (check()).
        """
        with self.engine.lock:
            extra: list[str] = []
            if deep:
                extra += [f"catalog: {p}" for p in check_catalog(self.engine, self.engine.backup).problems]
            try:
                state = self.engine.refresh()
            except CatalogDamaged as exc:
                extra.append(str(exc))
                try:  # what can still be read
                    state = self.engine.log.catch_up(self.engine.log.latest_checkpoint() or State())
                except CatalogError as exc2:
                    return AuditVerification(False, 0, tuple(extra + [str(exc2)]))
            try:
                anchor = json.loads(cfs.read_bytes(self.engine.fs, cfs.join(self.engine.root, audit_mod.ANCHOR)))
            except (FileNotFoundError, ValueError):
                anchor = None
            witness = None
            if self.engine.backup is not None:
                try:
                    witness = self.engine.backup.read_witness()
                except CatalogDamaged as exc:
                    extra.append(str(exc))
            # Read the stored files themselves (never a cached copy or cached metadata).
            files = sorted(state.files.get("audit", {}).values(), key=lambda f: (f.seq, f.path))
            readable = []
            for f in files:
                if not cfs.exists(self.engine.fs, cfs.join(self.engine.root, f.path)):
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
        source = f"read_parquet([{', '.join(sql_str(self.engine.abs_path(f.path)) for f in files)}])"
        cur = self.engine.con.cursor()
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
            self.engine.con.execute("SET parquet_metadata_cache = true")

    def recent_audit(
        self, actions: Sequence[str] | None = None, limit: int = 50, since: dt.datetime | str | None = None
    ) -> list[AuditEvent]:
        """The latest audit events (newest first), optionally only of the given actions."""
        where = Conditions()
        if actions is not None:
            if not actions:
                return []
            where.add("list_contains(?::VARCHAR[], action)", list(actions))
        where.since_until('"at"', since)
        rows = self.engine.rows(
            "SELECT * FROM audit " + where.sql() + f"ORDER BY event_no DESC LIMIT {max(0, int(limit))}", where.params
        )
        return [audit_mod.event_from_row(r) for r in rows]
