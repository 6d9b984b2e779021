"""Catalog upkeep at the center."""

from __future__ import annotations

from typing import Any

from prefect import flow

from renkei.runtime import Region
from renkei.tasks.center import backup_catalog as backup_task
from renkei.tasks.center import compact
from renkei.tasks.common import publish_artifacts


@flow(name="compact_catalog", flow_run_name="compact-catalog")
def compact_catalog(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Merge the catalog's small files (nightly), so that query time does not grow with writes."""
    region = Region(config, data_dir)
    counts = compact(region)
    backed_up = backup_task(region)
    publish_artifacts(
        "compact-catalog",
        "compact_catalog",
        ["| table | files before | files after |", "|---|---|---|"]
        + [f"| {t} | {counts.before.get(t, 0)} | {counts.after.get(t, 0)} |" for t in sorted(counts.before)],
        [],
        "Catalog compaction",
    )
    return {"before": counts.before, "after": counts.after, "backup": backed_up.to_dict()}


@flow(name="backup_catalog", flow_run_name="backup-catalog")
def backup_catalog(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Copy what is new in the catalog to its second location (every 15 minutes; incremental).

    What the DICOM objects do not hold — grants, consents, patient links, the
    audit chain — is lost with the catalog unless it is copied: this bounds
    the loss to the last quarter hour (docs/catalog.md).
    """
    result = backup_task(Region(config, data_dir))
    publish_artifacts(
        "backup-catalog",
        "backup_catalog",
        [
            "| commit | entries copied | files copied | MB | seconds |",
            "|---|---|---|---|---|",
            f"| {result.seq} | {result.entries_copied} | {result.files_copied} | "
            f"{result.bytes_copied / 1e6:.1f} | {result.seconds:.1f} |",
        ],
        [],
        "Catalog backup",
    )
    return result.to_dict()
