"""Tasks run at the center: publication by an operator, catalog upkeep."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task

from renkei import runtime
from renkei.catalog.backup import BackupResult, CheckResult, backup, check
from renkei.runtime import Region
from renkei.sharing import Sharing
from renkei.tasks.common import IO_RETRIES, IO_RETRY_DELAYS, logger, retry_io_only


@dataclass(frozen=True)
class FileCounts:
    """The catalog's data files per table, before and after a compaction."""

    before: dict[str, int]
    after: dict[str, int]


@task(name="publish-study", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def publish_study(
    region: Region, study_uid: str, sites: list[str], operator: str, reason: str, unpublish: bool
) -> list[str]:
    """Grant (or revoke) the study to the sites in the name of `operator`; returns sites changed."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        sharing = Sharing(lay.config, catalog)
        if unpublish:
            return sharing.unpublish(study_uid, sites, operator, reason)
        return sharing.publish(study_uid, sites, operator, reason)


@task(name="compact-catalog", retries=2, retry_delay_seconds=[10, 60])
def compact(region: Region) -> FileCounts:
    """Merge the catalog's small Parquet files so queries stay fast."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        before = catalog.file_counts()
        catalog.compact(force=True)
        after = catalog.file_counts()
    logger().info("catalog files before %s, after %s", before, after)
    return FileCounts(before, after)


@task(name="check-catalog", retries=1, retry_delay_seconds=[30], retry_condition_fn=retry_io_only)
def check_catalog(region: Region) -> CheckResult:
    """Read the whole catalog: log continuity, every data file's checksum, the witness (catalog.backup.check)."""
    lay = region.layout
    with runtime.open_catalog(lay) as catalog:
        result = check(catalog, catalog.backup)
    logger().info(
        "catalog check: %d entries, %d files, %d problems, %.1f s",
        result.entries,
        result.files,
        len(result.problems),
        result.seconds,
    )
    return result


@task(name="backup-catalog", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS, retry_condition_fn=retry_io_only)
def backup_catalog(region: Region) -> BackupResult:
    """Copy what is new in the catalog to its second location (incremental; catalog.backup.backup)."""
    lay = region.layout
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
    return result
