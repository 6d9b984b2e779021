"""Tasks run at the center: publication by an operator, catalog upkeep."""

from __future__ import annotations

from typing import Any

from prefect import task

from renkei import runtime
from renkei.tasks.common import IO_RETRIES, IO_RETRY_DELAYS, logger, retry_io_only


@task(name="publish-study", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def publish_study(
    study_uid: str,
    sites: list[str],
    operator: str,
    reason: str,
    unpublish: bool,
    config: str | None = None,
    data_dir: str | None = None,
) -> list[str]:
    """Grant (or revoke) the study to the sites in the name of `operator`; returns sites changed."""
    from renkei.sharing import Sharing

    lay = runtime.layout(config, data_dir)
    with runtime.open_catalog(lay) as catalog:
        sharing = Sharing(lay.config, catalog)
        if unpublish:
            return sharing.unpublish(study_uid, sites, operator, reason)
        return sharing.publish(study_uid, sites, operator, reason)


@task(name="compact-catalog", retries=2, retry_delay_seconds=[10, 60])
def compact(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Merge the catalog's small Parquet files so queries stay fast."""
    lay = runtime.layout(config, data_dir)
    with runtime.open_catalog(lay) as catalog:
        before = catalog.file_counts()
        catalog.compact(force=True)
        after = catalog.file_counts()
    logger().info("catalog files before %s, after %s", before, after)
    return {"before": before, "after": after}


@task(name="check-catalog", retries=1, retry_delay_seconds=[30], retry_condition_fn=retry_io_only)
def check_catalog(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Read the whole catalog: log continuity, every data file's checksum, the witness (catalog.backup.check)."""
    from renkei.catalog.backup import check

    lay = runtime.layout(config, data_dir)
    with runtime.open_catalog(lay) as catalog:
        result = check(catalog, catalog.backup)
    logger().info(
        "catalog check: %d entries, %d files, %d problems, %.1f s",
        result.entries,
        result.files,
        len(result.problems),
        result.seconds,
    )
    return result.to_dict()


@task(name="backup-catalog", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def backup_catalog(config: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Copy what is new in the catalog to its second location (incremental; catalog.backup.backup)."""
    from renkei.catalog.backup import backup

    lay = runtime.layout(config, data_dir)
    with runtime.open_catalog(lay) as catalog:
        assert catalog.backup is not None
        result = backup(catalog, catalog.backup)
    logger().info(
        "catalog backup at commit %d: %d entries, %d files (%.1f MB) copied in %.1f s",
        result.seq,
        result.entries_copied,
        result.files_copied,
        result.bytes_copied / 1e6,
        result.seconds,
    )
    return result.to_dict()
