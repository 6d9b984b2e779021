"""An edge wired into its region: its own store, the cache of other sites' studies, the
center-held studies the site may see, and the sharing decision at every exit.

`RegionalEdge(layout, site_id, ...)` builds the `EdgeServer` with sources
[local, cache, center] and a `SharingAccess` that asks `renkei.sharing` and
audits every cross-site answer and retrieval in the catalog.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from renkei.catalog.catalog import Catalog
from renkei.catalog.store import ObjectStore
from renkei.config import Layout
from renkei.edge.center import (
    AuditBuffer,
    CenterSource,
    EdgeCache,
    SharingAccess,
    StudyOrigins,
    catalog_origin,
    catalog_recorder,
)
from renkei.edge.server import EdgeServer, edge_file_store
from renkei.sharing import Sharing

LOGGER = logging.getLogger(__name__)


class RegionalEdge:
    """The edge of `site_id` with the region's sources and access decision; start() / stop()."""

    def __init__(
        self, layout: Layout, site_id: str, on_study_complete: Callable[[str], None] | None = None, **server_kwargs: Any
    ) -> None:
        self.layout = layout
        self.site_id = site_id
        store_dir = layout.edge_store(site_id)
        # first: on a full disk the journal reserve is released before the journals open
        files = edge_file_store(
            layout.config,
            site_id,
            store_dir,
            fsync=server_kwargs.get("fsync", True),
            reserve_bytes=server_kwargs.pop("reserve_bytes", None),
            min_free_bytes=server_kwargs.pop("min_free_bytes", None),
        )
        self.catalog = Catalog.from_layout(layout)
        self.store = ObjectStore(layout.center_url, layout.config.center.s3)
        self.cache = EdgeCache(store_dir, space=files)
        self.sharing = Sharing(layout.config, self.catalog)
        self.audit = AuditBuffer(catalog_recorder(self.catalog))
        self.origins = StudyOrigins(site_id, catalog_origin(self.catalog))
        self.access = SharingAccess(
            layout.config,
            site_id,
            decide=lambda site, uid: self.sharing.decide(site, uid).allowed,
            record=self.audit,
            own_studies=self.origins.is_own,
        )
        self.center_source = CenterSource(
            site_id,
            self.catalog,
            self.store,
            self.cache,
            site_issuer=layout.config.site(site_id).issuer,
            issuer_sites={s.issuer: s.id for s in layout.config.sites},
        )
        self.server = EdgeServer(
            layout.config,
            site_id,
            store_dir,
            sources=["local", self.cache.source(), self.center_source],
            access=self.access,
            on_study_complete=on_study_complete,
            store=files,
            **server_kwargs,
        )

    def start(self) -> RegionalEdge:
        self.server.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        try:
            self.server.stop(timeout)
        finally:
            self.audit.close()
            self.cache.close()
            self.catalog.close()

    def __enter__(self) -> RegionalEdge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
