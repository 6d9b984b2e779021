"""Catalog upkeep at the center."""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks.center import compact
from tasks.common import publish_artifacts


@flow(name="compact_catalog")
def compact_catalog(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Merge the catalog's small files (nightly), so that query time does not grow with writes."""
    result = compact(config, data_dir)
    publish_artifacts("compact-catalog", "compact_catalog",
                      ["| table | files before | files after |", "|---|---|---|"]
                      + [f"| {t} | {result['before'].get(t, 0)} | {result['after'].get(t, 0)} |"
                         for t in sorted(result["before"])], [], "Catalog compaction")
    return result
