"""The region's Prefect deployments, generated from its configuration: one place for their names.

Every site gets its sync, deliver and fetch-priors deployments on its own work
pool (`renkei-<site>`, run by that site's worker); the center gets publish,
the nightly verification, the compaction and the catalog backup on
`renkei-center`. `render(config)` writes them as a prefect.yaml that `renkei
deploy` applies; the prefect.yaml at the repository's root is that rendering
of examples/nagasaki.yaml (a test checks it), so nobody copies entries by
hand for a new site. `flow_deployment` gives the `flow/deployment` name that
tasks start runs of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from renkei.config import RegionConfig

# no heartbeat for this long and a run is taken for dead (Crashed): two lost heartbeats are tolerated, as
# the Prefect server on SQLite drops a burst of them when its one write lock is contended
CRASH_AFTER_S = 90
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of renkei's runs (Prefect's minimum; its default is 180)
RUN_TAG = "renkei"  # the tag of renkei's deployments: the crash automation watches only their runs
CENTER_POOL = "renkei-center"


@dataclass(frozen=True)
class Kind:
    """One kind of deployment: its flow, where it runs, when it runs by itself."""

    short: str  # the deployment's name (per site: `<short>-<site>`)
    flow: str  # the flow's name, as Prefect knows it
    entrypoint: str
    per_site: bool
    schedule: dict[str, Any] | None = None  # without the timezone (the region's)
    concurrency: int | dict[str, Any] | None = None
    why: str = ""


KINDS: tuple[Kind, ...] = (
    Kind(
        "sync",
        "sync_site",
        "flows/sync_site.py:sync_site",
        True,
        {"interval": 300},
        # one sync of a site at a time; a run that dies before it starts running frees the slot after 60 s
        {"limit": 1, "collision_strategy": "ENQUEUE", "grace_period_seconds": 60},
        "a site's completed studies to the center; started by its edge, caught up every 5 minutes",
    ),
    Kind(
        "deliver",
        "deliver",
        "flows/deliver.py:deliver",
        True,
        why="studies published to a site, pushed to its edge (and PACS) ahead of time",
    ),
    Kind(
        "fetch-priors",
        "fetch_priors",
        "flows/fetch_priors.py:fetch_priors",
        True,
        why="an admitted patient's studies from other sites into this site's PACS",
    ),
    Kind("publish", "publish", "flows/publish.py:publish", False, why="publication by an operator"),
    Kind(
        "verify-backups",
        "verify_backups",
        "flows/verify_backups.py:verify_backups",
        False,
        {"cron": "0 2 * * *"},
        1,
        "the nightly verification, 02:00",
    ),
    Kind(
        "compact-catalog",
        "compact_catalog",
        "flows/maintenance.py:compact_catalog",
        False,
        {"cron": "30 3 * * *"},
        1,
        "the nightly compaction, 03:30",
    ),
    Kind(
        "backup-catalog",
        "backup_catalog",
        "flows/maintenance.py:backup_catalog",
        False,
        {"interval": 900},
        1,
        "the catalog's backup every 15 minutes",
    ),
)
BY_SHORT = {k.short: k for k in KINDS}
BY_FLOW = {k.flow: k for k in KINDS}


def pool_name(site_id: str | None) -> str:
    """The work pool of a site's runs, or the center's."""
    return f"renkei-{site_id}" if site_id else CENTER_POOL


def deployment_name(kind: Kind, site_id: str | None) -> str:
    return f"{kind.short}-{site_id}" if kind.per_site else kind.short


def flow_deployment(flow_name: str, site_id: str | None = None) -> str:
    """`flow/deployment` as Prefect names it: sync_site/sync-hub, deliver/deliver-clinic-c, verify_backups/..."""
    kind = BY_FLOW[flow_name]
    return f"{kind.flow}/{deployment_name(kind, site_id if kind.per_site else None)}"


@dataclass(frozen=True)
class Expected:
    name: str
    kind: Kind
    site: str | None

    @property
    def pool(self) -> str:
        return pool_name(self.site)


def expected(config: RegionConfig) -> list[Expected]:
    """Every deployment the region needs, site by site, then the center's."""
    out = [Expected(deployment_name(k, s), k, s) for s in config.site_ids for k in KINDS if k.per_site]
    return out + [Expected(k.short, k, None) for k in KINDS if not k.per_site]


def document(config: RegionConfig) -> dict[str, Any]:
    """The prefect.yaml of the region, as a mapping."""
    deployments = []
    for e in expected(config):
        dep: dict[str, Any] = {"name": e.name, "description": e.kind.why, "entrypoint": e.kind.entrypoint}
        if e.site:
            dep["parameters"] = {"site": e.site}
        dep["work_pool"] = {
            "name": e.pool,
            "work_queue_name": "default",
            "job_variables": {"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
        }
        if e.kind.schedule:
            dep["schedules"] = [{**e.kind.schedule, "timezone": config.timezone}]
        if e.kind.concurrency is not None:
            concurrency = e.kind.concurrency
            dep["concurrency_limit"] = dict(concurrency) if isinstance(concurrency, dict) else concurrency
        dep["tags"] = [RUN_TAG]
        deployments.append(dep)
    # lazy: every CLI command imports this module at start-up (prefect takes ~1 s to import)
    import prefect

    return {
        "name": "renkei",
        "prefect-version": prefect.__version__,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $RENKEI_HOME }}"}}],
        "deployments": deployments,
    }


HEADER = """\
# Deployments of renkei's flows for the region {region!r} ({source}).
# GENERATED by `renkei deployments --write FILE` from the region's configuration: do not edit;
# `renkei deploy` renders and applies them itself (this file is what it applies for {source}).
#
# One work pool per site, so that edge-side steps run on the site's own worker
# (`renkei worker --site SITE`), and one for the center. Workers find the code
# through RENKEI_HOME (the checkout) and the region through RENKEI_CONFIG and
# RENKEI_DATA_DIR, which `renkei worker` sets. Every run sends a heartbeat each
# {heartbeat} s: the automation `renkei deploy` creates marks a run silent for
# {crash} s Crashed, which frees its deployment's slot.
"""


def render(config: RegionConfig, source: str) -> str:
    """prefect.yaml's text for the region (`source` names the configuration in the header)."""
    body = yaml.safe_dump(document(config), sort_keys=False, allow_unicode=True, width=110)
    return HEADER.format(region=config.region, source=source, heartbeat=HEARTBEAT_S, crash=CRASH_AFTER_S) + body
