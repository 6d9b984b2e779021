"""Catalog upkeep at the center."""

from __future__ import annotations

from typing import Any

from prefect import flow

from renkei.tasks.center import backup_catalog as backup_task
from renkei.tasks.center import compact
from renkei.tasks.common import publish_artifacts


@flow(name="compact_catalog", flow_run_name="compact-catalog")
def compact_catalog(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Merge the catalog's small files (nightly), so that query time does not grow with writes."""
    result = compact(config, data_dir)
    result["backup"] = backup_task(config, data_dir)
    publish_artifacts(
        "compact-catalog",
        "compact_catalog",
        ["| table | files before | files after |", "|---|---|---|"]
        + [f"| {t} | {result['before'].get(t, 0)} | {result['after'].get(t, 0)} |" for t in sorted(result["before"])],
        [],
        "Catalog compaction",
    )
    return result


@flow(name="backup_catalog", flow_run_name="backup-catalog")
def backup_catalog(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Copy what is new in the catalog to its second location (every 15 minutes; incremental).

    What the DICOM objects do not hold — grants, consents, patient links, the
    audit chain — is lost with the catalog unless it is copied: this bounds
    the loss to the last quarter hour (docs/catalog.md).
    """
    result = backup_task(config, data_dir)
    publish_artifacts(
        "backup-catalog",
        "backup_catalog",
        [
            "| commit | entries copied | files copied | MB | seconds |",
            "|---|---|---|---|---|",
            f"| {result['seq']} | {result['entries_copied']} | {result['files_copied']} | "
            f"{result['bytes_copied'] / 1e6:.1f} | {result['seconds']:.1f} |",
        ],
        [],
        "Catalog backup",
    )
    return result
