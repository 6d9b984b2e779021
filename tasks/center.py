"""Tasks run at the center: publication by an operator, catalog upkeep."""

from __future__ import annotations

from typing import Any

from prefect import task

from renkei import runtime
from tasks.common import IO_RETRIES, IO_RETRY_DELAYS, logger, retry_io_only


@task(name="publish-study", retries=IO_RETRIES, retry_delay_seconds=IO_RETRY_DELAYS,
      retry_condition_fn=retry_io_only)
def publish_study(study_uid: str, sites: list[str], operator: str, reason: str, unpublish: bool,
                  config: str | None = None, data_dir: str | None = None) -> list[str]:
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
