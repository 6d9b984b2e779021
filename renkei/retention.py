"""Edge retention: drop local copies the center holds verified, oldest first, when the disk fills.

Pure code. A study is dropped only when every instance is 'verified' in the
edge journal AND the catalog says the center's copy is verified; its last
instance arrived more than `min_age_days` ago; and the store's disk is fuller
than `disk_usage_threshold`. Never otherwise.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from renkei.catalog.catalog import Catalog
from renkei.catalog.store import ObjectMissing, ObjectStore
from renkei.config import Layout
from renkei.edge.journal import Journal, JournalError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionResult:
    site: str
    disk_usage: float
    removed: tuple[str, ...] = ()
    kept_unverified: int = 0
    freed_bytes: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)


def disk_usage(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return usage.used / usage.total if usage.total else 0.0


def _center_verified(catalog: Catalog, study_uid: str) -> bool:
    """The center's copy is verified as a study and no instance of it is recorded missing or corrupt."""
    locations = [l for l in catalog.locations(study_uid) if l.holder == "center"]
    study_level = [l.state for l in locations if l.sop_instance_uid is None]
    damaged = any(l.state in ("missing", "corrupt") for l in locations if l.sop_instance_uid is not None)
    return study_level == ["verified"] and not damaged


def _center_holds(store: ObjectStore, catalog: Catalog, study_uid: str) -> bool:
    """Every version of every instance is in the center's store with its size (a stat or HEAD each, no read).

    The catalog's "verified" may be older than a loss of the center; the
    edge's copy may be the last one, so it is only dropped after this look.
    """
    rows = catalog.instances(study_uid, version="first") + [
        r for r in catalog.instances(study_uid) if r.get("corrected")
    ]
    try:
        return bool(rows) and all(store.size(r["object_key"]) == int(r["size"]) for r in rows)
    except (ObjectMissing, OSError):
        return False


def apply_retention(
    layout: Layout,
    catalog: Catalog,
    site_id: str,
    now: float | None = None,
    usage: Callable[[Path], float] = disk_usage,
    store: ObjectStore | None = None,
) -> RetentionResult:
    """Remove the oldest verified studies of the site's edge while its disk is above the threshold."""
    site = layout.config.site(site_id)
    policy = site.edge.retention
    root = layout.edge_store(site_id)
    now = time.time() if now is None else now
    current = usage(root)
    if current <= policy.disk_usage_threshold:
        return RetentionResult(site_id, current)
    removed: list[str] = []
    freed = 0
    unverified = 0
    cutoff = now - policy.min_age_days * 86400
    store = store or ObjectStore(layout.center_url, layout.config.center.s3)
    with Journal.open(root) as journal:
        rows = sorted(journal.study_rows(), key=lambda r: r["_last_received"])
        for row in rows:
            if current <= policy.disk_usage_threshold:
                break
            uid = row["StudyInstanceUID"]
            if row["_last_received"] > cutoff or int(row["NumberOfStudyRelatedInstances"]) == 0:
                continue
            states = {e.upload_state for e in journal.instances(uid)}
            if states != {"verified"} or not _center_verified(catalog, uid) or not _center_holds(store, catalog, uid):
                unverified += 1
                continue
            size = sum(e.instance.size for e in journal.instances(uid) if e.local)
            try:
                journal.remove_local_copy(uid)
            except JournalError:  # an instance arrived meanwhile: keep the study
                unverified += 1
                continue
            catalog.set_location(
                uid, f"edge:{site_id}", "removed", detail="retention: disk above threshold", by=f"retention:{site_id}"
            )
            removed.append(uid)
            freed += size
            current = usage(root)
    if removed:
        log.info("retention at %s: %d studies removed, %.1f MB freed", site_id, len(removed), freed / 1e6)
    return RetentionResult(site_id, current, tuple(removed), unverified, freed)
