"""Nightly backup verification: the center holds every instance whole, and nothing was lost in transit.

Pure code (no Prefect). `verify_center` reads every object the catalog lists
(or one rotating part of them) and checks size and SHA-256; `check_edges`
checks that every instance an edge journaled as verified is registered in the
center; `check_grants` that every grant names a study. What is missing or
corrupt is repaired from an edge's copy when one exists (uploaded again and
verified); what cannot be repaired is reported as unrecoverable. A study
uploaded or registered again gets the sharing rules applied again
(`reapply_rules`), so that a center or catalog loss does not silently take
away what the rules granted. `check_unreferenced` reports objects no catalog
row points to, and `sweep_temp` removes what killed writers left.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renkei import transfer
from renkei.catalog import keys
from renkei.catalog.catalog import Catalog
from renkei.catalog.store import ObjectMissing, ObjectStore
from renkei.config import Layout
from renkei.edge.journal import JOURNAL_NAME, Journal
from renkei.errors import RenkeiError
from renkei.sharing import Sharing

log = logging.getLogger(__name__)

MISSING = "missing"
CORRUPT = "corrupt"
TRUNCATED = "truncated"
NOT_IN_CENTER = "not-in-center"
ORPHAN_GRANT = "orphan-grant"
UNREFERENCED_LISTED = 20  # unreferenced object keys named in the operator's report (all are counted)
UNREFERENCED_GRACE_S = 3600.0  # an unreferenced object younger than this may be an upload not registered yet
TEMP_GRACE_S = 3600.0  # a temporary file older than this belongs to no live writer


@dataclass(frozen=True)
class Finding:
    """One problem found, and what became of it."""

    kind: str
    study_uid: str
    sop_instance_uid: str = ""
    object_key: str = ""
    detail: str = ""
    repaired: bool = False
    repaired_from: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


@dataclass
class VerificationReport:
    part: int
    parts: int
    instances_checked: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    edge_instances_checked: int = 0
    edges_not_checked: list[str] = field(default_factory=list)  # journals not reachable from here
    grants_checked: int = 0
    findings: list[Finding] = field(default_factory=list)
    rule_grants_reapplied: int = 0  # grants the rules wrote again for studies uploaded or registered again
    objects_listed: int = 0  # objects in the center's store (check_unreferenced)
    unreferenced: int = 0  # of those, how many no catalog row points to (older than the grace period)
    unreferenced_recent: int = 0  # unreferenced but younger than the grace period (an upload in flight)
    unreferenced_keys: list[str] = field(default_factory=list)  # the first UNREFERENCED_LISTED of them
    temp_removed: int = 0  # temporary files / incomplete uploads of killed writers removed (sweep_temp)

    @property
    def repaired(self) -> list[Finding]:
        return [f for f in self.findings if f.repaired]

    @property
    def unrecoverable(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired and f.kind != ORPHAN_GRANT]

    @property
    def mb_s(self) -> float:
        return self.bytes_checked / 1e6 / self.seconds if self.seconds > 0 else 0.0


def _check_object(store: ObjectStore, row: dict[str, Any]) -> tuple[dict[str, Any], str | None, int]:
    """(row, problem kind or None, bytes read)."""
    key, expected, size = row["object_key"], row["sha256"], int(row["size"])
    try:
        actual_size = store.size(key)
    except (ObjectMissing, FileNotFoundError):
        return row, MISSING, 0
    if actual_size != size:
        return row, TRUNCATED if actual_size < size else CORRUPT, 0
    try:
        digest = store.sha256_of(key)
    except (ObjectMissing, FileNotFoundError):
        return row, MISSING, 0
    return row, (None if digest == expected else CORRUPT), actual_size


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def find_edge_copy(layout: Layout, sop_instance_uid: str, sha256: str) -> tuple[str, Path] | None:
    """A site whose edge still holds these exact bytes, and the file's path."""
    for site in layout.config.sites:
        root = layout.edge_store(site.id)
        if not (root / JOURNAL_NAME).exists():
            continue
        with Journal.open(root) as journal:
            entry = journal.entry(sop_instance_uid)
            # a later version of the instance (sent again with other bytes) is kept in conflicts/
            versions = [
                c.path
                for c in journal.conflicts()
                if c.sop_instance_uid == sop_instance_uid and c.received_sha256 == sha256
            ]
        candidates = versions
        if entry is not None and entry.local and entry.instance.sha256 == sha256:
            candidates = [entry.path, *versions]
        for path in candidates:
            try:
                if path.exists() and _file_sha256(path) == sha256:
                    return site.id, path
            except OSError:
                continue
    return None


def _repair(layout: Layout, store: ObjectStore, row: dict[str, Any]) -> tuple[bool, str, str]:
    """Upload the object again from an edge's copy; (repaired, from site, detail)."""
    source = find_edge_copy(layout, row["sop_instance_uid"], row["sha256"])
    if source is None:
        return False, "", "no edge holds a copy with the right SHA-256"
    site_id, path = source
    try:
        store.delete(row["object_key"])
        store.put_file(path, row["object_key"], row["sha256"])
        if store.sha256_of(row["object_key"]) != row["sha256"]:
            return False, site_id, "uploaded again but the read-back SHA-256 differs"
    except (RenkeiError, OSError) as exc:
        return False, site_id, f"upload from {site_id} failed: {exc}"
    return True, site_id, f"uploaded again from the edge of {site_id}"


def verify_center(
    catalog: Catalog,
    store: ObjectStore,
    layout: Layout,
    part: int = 0,
    parts: int = 1,
    threads: int = 4,
    repair: bool = True,
    report: VerificationReport | None = None,
) -> VerificationReport:
    """Read back every object of the center (or part `part` of `parts`) and repair what is wrong."""
    report = report or VerificationReport(part, parts)
    started = time.monotonic()
    problems: list[tuple[dict[str, Any], str]] = []
    healthy: dict[str, set[str]] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for batch in catalog.iter_instances(part, parts):
            for row, kind, nbytes in pool.map(lambda r: _check_object(store, r), batch):
                report.instances_checked += 1
                report.bytes_checked += nbytes
                if kind is None:
                    healthy.setdefault(row["study_uid"], set()).add(row["sop_instance_uid"])
                else:
                    problems.append((row, kind))
    report.seconds = time.monotonic() - started
    locations: list[dict[str, Any]] = []
    for row, kind in problems:
        repaired, site_id, detail = _repair(layout, store, row) if repair else (False, "", "repair disabled")
        report.findings.append(
            Finding(kind, row["study_uid"], row["sop_instance_uid"], row["object_key"], detail, repaired, site_id)
        )
        locations.append(
            {
                "study_uid": row["study_uid"],
                "sop_instance_uid": row["sop_instance_uid"],
                "holder": "center",
                "state": "verified" if repaired else kind_state(kind),
                "detail": detail,
                "by": "verify_backups",
            }
        )
        if repaired:
            log.warning("repaired %s object %s from %s", kind, row["object_key"], site_id)
        else:
            log.error("unrecoverable %s object %s: %s", kind, row["object_key"], detail)
    # one read of each checked study's recorded states: an instance damaged on an earlier night and
    # whole tonight is cleared, and a study is 'verified' only when none of its instances is left
    # missing or corrupt, tonight or on an earlier night (a rotating share reads only part of it)
    unrepaired = {(f.study_uid, f.sop_instance_uid) for f in report.findings if not f.repaired}
    for study_uid in {*healthy, *(row["study_uid"] for row, _ in problems)}:
        whole = healthy.get(study_uid, set())
        damaged_before = {
            l.sop_instance_uid
            for l in catalog.locations(study_uid)
            if l.holder == "center" and l.sop_instance_uid and l.state in ("missing", "corrupt")
        }
        for sop in sorted(damaged_before & whole):
            locations.append(
                {
                    "study_uid": study_uid,
                    "sop_instance_uid": sop,
                    "holder": "center",
                    "state": "verified",
                    "by": "verify_backups",
                    "detail": "whole again",
                }
            )
        repaired_now = {f.sop_instance_uid for f in report.findings if f.study_uid == study_uid and f.repaired}
        still_damaged = (damaged_before - whole - repaired_now) | {sop for uid, sop in unrepaired if uid == study_uid}
        locations.append(
            {
                "study_uid": study_uid,
                "holder": "center",
                "state": "corrupt" if still_damaged else "verified",
                "by": "verify_backups",
                "detail": f"nightly verification part {part + 1} of {parts}",
            }
        )
    if locations:
        catalog.set_locations(locations)
    return report


def kind_state(kind: str) -> str:
    return "missing" if kind == MISSING else "corrupt"


def check_edges(
    catalog: Catalog, store: ObjectStore, layout: Layout, report: VerificationReport, repair: bool = True
) -> VerificationReport:
    """Every instance an edge journaled as uploaded or verified is registered and stored in the center."""
    for site in layout.config.sites:
        root = layout.edge_store(site.id)
        if not (root / JOURNAL_NAME).exists():
            report.edges_not_checked.append(site.id)
            continue
        with Journal.open(root) as journal:
            for study_uid in journal.iter_study_uids():
                entries = [
                    e
                    for e in journal.instances(study_uid)
                    if e.upload_state in ("uploaded", "verified") and _origin_of(e, site.id) == site.id
                ]
                if not entries:
                    continue
                report.edge_instances_checked += len(entries)
                registered = {r["sop_instance_uid"]: r for r in catalog.instances(study_uid)}
                lost = [
                    e
                    for e in entries
                    if e.instance.sop_instance_uid not in registered
                    or registered[e.instance.sop_instance_uid]["sha256"] != e.instance.sha256
                    and not _conflict_registered(catalog, e)
                ]
                if not lost:
                    continue
                detail = f"{len(lost)} instance(s) journaled at {site.id} are not in the center"
                repaired = False
                if repair and all(e.local for e in lost):
                    journal.set_upload_state([e.instance.sop_instance_uid for e in lost], "pending")
                    up = transfer.upload_study(journal, store, site.id, study_uid)
                    reg = transfer.register_studies(journal, catalog, site.id, [study_uid], default_issuer=site.issuer)
                    repaired = up.ok and study_uid in reg.studies
                    if repaired:
                        report.rule_grants_reapplied += reapply_rules(catalog, layout, [study_uid])
                    detail += "; uploaded again from the edge" if repaired else f"; repair failed: {up.failures[:1]}"
                for e in lost:
                    report.findings.append(
                        Finding(
                            NOT_IN_CENTER,
                            study_uid,
                            e.instance.sop_instance_uid,
                            e.object_key or "",
                            detail,
                            repaired,
                            site.id if repaired else "",
                        )
                    )
    return report


def _origin_of(entry: Any, own_site: str) -> str:
    """The site that took the instance (copies delivered from other sites are theirs to check)."""
    return getattr(entry, "origin_site", "") or own_site


def _conflict_registered(catalog: Catalog, entry: Any) -> bool:
    return any(
        c.sop_instance_uid == entry.instance.sop_instance_uid and c.new_sha256 == entry.instance.sha256
        for c in catalog.conflicts(entry.instance.study_uid)
    )


def reapply_rules(catalog: Catalog, layout: Layout, study_uids: Iterable[str]) -> int:
    """Apply the sharing rules to studies uploaded or registered again; returns the grants written.

    The same rules a first registration gets applied (renkei.sharing.Sharing.apply_rules):
    after a catalog loss the studies come back with their rule grants, and a
    (study, site) pair with a history (unpublished, consent) is left alone.
    """
    uids = list(dict.fromkeys(study_uids))
    if not uids:
        return 0
    return len(Sharing(layout.config, catalog).apply_rules(uids).granted)


def reapply_rules_to_repaired(catalog: Catalog, layout: Layout, report: VerificationReport) -> VerificationReport:
    """The rules again for every study whose objects verify_center uploaded again."""
    report.rule_grants_reapplied += reapply_rules(
        catalog, layout, (f.study_uid for f in report.findings if f.repaired and f.kind != NOT_IN_CENTER)
    )
    return report


def _age_s(store: ObjectStore, key: str, now: float) -> float | None:
    try:
        info = store.fs.info(store.path(key))
    except (FileNotFoundError, OSError):
        return None
    mtime = info.get("mtime") or info.get("created")
    if mtime is None and info.get("LastModified") is not None:
        mtime = info["LastModified"].timestamp()
    return None if mtime is None else now - float(mtime)


def check_unreferenced(
    catalog: Catalog,
    store: ObjectStore,
    report: VerificationReport,
    grace_s: float = UNREFERENCED_GRACE_S,
    listed: int = UNREFERENCED_LISTED,
    now: float | None = None,
) -> VerificationReport:
    """Count the objects of the center no catalog row points to; name the first `listed` in the report.

    Nothing is deleted: an unreferenced object may be the only copy of an
    instance whose registration was lost (`renkei catalog rebuild` registers
    it again). One younger than `grace_s` is counted apart (an upload whose
    registration has not happened yet).
    """
    now = time.time() if now is None else now
    referenced = catalog.referenced_keys()
    for key in store.list(f"{keys.OBJECTS_PREFIX}/"):
        report.objects_listed += 1
        if key in referenced:
            continue
        age = _age_s(store, key, now)
        if age is not None and age < grace_s:
            report.unreferenced_recent += 1
            continue
        report.unreferenced += 1
        if len(report.unreferenced_keys) < listed:
            report.unreferenced_keys.append(key)
    return report


def sweep_temp(
    store_url: str, s3_options: Any, report: VerificationReport, grace_s: float = TEMP_GRACE_S
) -> VerificationReport:
    """Remove temporary files (local) or incomplete multipart uploads (S3) older than `grace_s` under objects/."""
    objects = ObjectStore(f"{store_url.rstrip('/')}/{keys.OBJECTS_PREFIX}", s3_options)
    report.temp_removed += objects.sweep_temp(grace_s)
    return report


def check_grants(catalog: Catalog, layout: Layout, report: VerificationReport) -> VerificationReport:
    """Every active grant names a study the catalog holds."""
    for site in layout.config.sites:
        for g in catalog.active_grants_for_site(site.id):
            report.grants_checked += 1
            if catalog.study(g.study_uid) is None:
                report.findings.append(
                    Finding(
                        ORPHAN_GRANT,
                        g.study_uid,
                        detail=f"grant to {site.id} by {g.by_kind} {g.by} names no study in the catalog",
                    )
                )
    return report


def raw_read_rate(paths: Iterable[str], threads: int = 4) -> tuple[int, float]:
    """Bytes and seconds to read the files raw (the benchmark's reference)."""
    started = time.monotonic()

    def read(path: str) -> int:
        n = 0
        with open(path, "rb", buffering=0) as handle:
            while chunk := handle.read(4 << 20):
                n += len(chunk)
        return n

    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(read, paths))
    return total, time.monotonic() - started


def night_part(parts: int, day: int | None = None) -> int:
    """Which part tonight reads: consecutive nights read consecutive parts."""
    day = int(time.time() // 86400) if day is None else day
    return day % max(1, parts)
