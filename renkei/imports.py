"""Bringing studies from the center into a site: its edge (a cached copy) and its PACS (a reconciled copy).

Pure code (no Prefect). Bytes are read from the center only after their
SHA-256 matches the catalog (`ObjectStore.read_verified`); the PACS receives a
copy carrying the site's own Patient ID (`renkei.priors.reconcile`), sent by
C-STORE from the site's edge AE title.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from renkei.catalog.catalog import Catalog
from renkei.catalog.store import ObjectStore
from renkei.config import Layout
from renkei.edge.center import EdgeCache
from renkei.edge.qr import RetrieveItem
from renkei.edge.scu import send_items, study_instance_count
from renkei.errors import PolicyError
from renkei.priors import reconcile
from renkei.sharing import Sharing

log = logging.getLogger(__name__)

BATCH = 64  # instances held in memory at once while importing


@dataclass(frozen=True)
class ImportResult:
    study_uid: str
    instances: int = 0
    sent: int = 0
    skipped: bool = False
    seconds: float = 0.0
    failures: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.failures


def check_allowed(layout: Layout, catalog: Catalog, site_id: str, study_uid: str) -> None:
    """Refuse (PolicyError) to bring a study to a site that may not see it: this exit asks the decision too."""
    decision = Sharing(layout.config, catalog).decide(site_id, study_uid)
    if not decision.allowed:
        raise PolicyError(f"{site_id} may not receive study {study_uid}: {decision.explanation}")


def import_to_pacs(
    layout: Layout,
    catalog: Catalog,
    store: ObjectStore,
    site_id: str,
    study_uid: str,
    patient_id: str,
    issuer: str,
    skip_if_complete: bool = True,
) -> ImportResult:
    """Send a reconciled copy of a center study to the site's PACS; skipped when it holds it complete."""
    check_allowed(layout, catalog, site_id, study_uid)
    started = time.monotonic()
    site = layout.config.site(site_id)
    if site.pacs is None:
        return ImportResult(study_uid, failures=(f"site {site_id} has no PACS configured",))
    rows = catalog.instances(study_uid)
    if skip_if_complete and rows and study_instance_count(layout.config, site_id, study_uid) >= len(rows):
        return ImportResult(study_uid, len(rows), 0, True, time.monotonic() - started)
    sent = 0
    failures: list[str] = []
    for start in range(0, len(rows), BATCH):
        items = []
        for row in rows[start : start + BATCH]:
            try:
                data = reconcile(
                    store.read_verified(row["object_key"], row["sha256"]),
                    patient_id,
                    issuer,
                    to_utf8=site.pacs.convert_to_utf8,
                )
            except Exception as exc:  # one unreadable object must not stop the others
                failures.append(f"{row['sop_instance_uid']}: {exc}")
                continue
            items.append(
                RetrieveItem(
                    study_uid,
                    row["series_uid"],
                    row["sop_instance_uid"],
                    row["sop_class_uid"],
                    row["transfer_syntax_uid"],
                    data=data,
                    source="center",
                )
            )
        n, failed = send_items(site.edge.ae_title, site.pacs, items, site)
        sent += n
        failures.extend(f"{uid}: the PACS refused it" for uid in failed)
    if sent:
        catalog.set_location(
            study_uid,
            f"pacs:{site_id}",
            "present" if not failures else "missing",
            detail=f"{sent} of {len(rows)} instances imported as {patient_id}",
            by="import",
        )
    log.info("imported %s into the PACS of %s: %d of %d instances", study_uid, site_id, sent, len(rows))
    return ImportResult(study_uid, len(rows), sent, False, time.monotonic() - started, tuple(failures))


@dataclass(frozen=True)
class CacheResult:
    study_uid: str
    instances: int = 0
    fetched: int = 0
    seconds: float = 0.0


def cache_at_edge(layout: Layout, catalog: Catalog, store: ObjectStore, site_id: str, study_uid: str) -> CacheResult:
    """Keep a copy of a center study in the site edge's cache (so its workstations read it locally)."""
    check_allowed(layout, catalog, site_id, study_uid)
    started = time.monotonic()
    rows = catalog.instances(study_uid)
    cache = EdgeCache(layout.edge_store(site_id))
    fetched = 0
    try:
        for row in rows:
            entry = cache.journal.entry(row["sop_instance_uid"])
            if entry is not None and entry.local and entry.instance.sha256 == row["sha256"]:
                continue
            cache.put(store.read_verified(row["object_key"], row["sha256"]))
            fetched += 1
    finally:
        cache.close()
    if rows:
        catalog.set_location(study_uid, f"edge:{site_id}", "present", detail="cached copy", by="deliver")
    return CacheResult(study_uid, len(rows), fetched, time.monotonic() - started)
