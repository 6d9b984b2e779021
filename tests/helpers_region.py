"""Helpers for tests that run a region: they live in renkei.testing (the benchmarks use them too),
plus `synced_region`, the one way a test builds a region whose sites' studies are at their edges
(and, with `sync`, moved to the center by real `sync_site` runs)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renkei import synth
from renkei.catalog.catalog import Catalog
from renkei.config import Layout
from renkei.runtime import open_catalog
from renkei.testing import EXAMPLE, LONG_AGO, REPO, dataset_bytes, layout_of, put_into_edge, region_config

__all__ = [
    "EXAMPLE",
    "LONG_AGO",
    "REPO",
    "SyncedRegion",
    "dataset_bytes",
    "layout_of",
    "put_into_edge",
    "region_config",
    "synced_region",
]


@dataclass
class SyncedRegion:
    """A test region: its config file, layout, what each site's edge received, and each sync's summary."""

    config_path: Path
    layout: Layout
    written: dict[str, synth.SynthResult]
    synced: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def config(self) -> str:
        return str(self.config_path)

    @property
    def data_dir(self) -> str:
        return str(self.layout.data_dir)

    @contextmanager
    def catalog(self) -> Iterator[Catalog]:
        with open_catalog(self.layout) as cat:
            yield cat

    def visible_to(self, viewer: str, site: str) -> set[str]:
        """The studies `site` wrote that the catalog lets `viewer` see."""
        with self.catalog() as cat:
            return {s.info.study_uid for s in self.written[site].studies if cat.may_see(viewer, s.info.study_uid)}


def synced_region(
    tmp_path: Path,
    data_dir: Path | str,
    sites: Mapping[str, tuple[int, int]],
    *,
    sync: bool = True,
    ct_slices: int = 3,
    size: int = 64,
    modalities: Sequence[str] = ("CT",),
    stable_age: float = 0.2,
    **config: Any,
) -> SyncedRegion:
    """The example region on free ports with synthetic studies at the sites' edges, received an hour ago.

    `sites` maps a site to (patients, seed). With `sync` (the calling fixture must use `prefect_api`), each
    site's `sync_site` runs once and must move every instance its edge holds. `config` goes to region_config.
    """
    config_path = region_config(tmp_path, stable_age=stable_age, **config)
    lay = layout_of(config_path, data_dir)
    region = SyncedRegion(config_path, lay, {})
    for site, (patients, seed) in sites.items():
        result = synth.generate_site(
            lay.config,
            site,
            patients,
            seed,
            tmp_path / "synth" / site,
            ct_slices=ct_slices,
            size=size,
            modalities=modalities,
        )
        put_into_edge(lay, site, result.files, received_ago=LONG_AGO)
        region.written[site] = result
    if sync:
        from renkei.flows.sync_site import sync_site  # imports Prefect: only for the tests that run flows

        for site in sites:
            summary = sync_site(site, region.config, region.data_dir)
            assert summary["instances"] == region.written[site].instance_count, (site, summary)
            region.synced[site] = summary
    return region
