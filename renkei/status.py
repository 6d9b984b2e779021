"""What needs action in the region, each with its cause and what to do (`renkei status`).

The sites have no IT staff: one operator looks at one list. Each check reads
what the region already records, and a part that cannot be asked (a Prefect
API down, a damaged catalog) is itself a problem, never a silent gap:

- each edge's liveness: the heartbeat its running edge writes into its journal
  (a stopped edge looks like an idle one otherwise);
- the nightly backup verification: its last run from the audit chain, red
  when older than 26 hours or when it found what it could not repair;
- the catalog: readable and whole (a damaged catalog stops everything), and
  its last backup to the second location (older than 1 hour: the schedule
  is not running);
- studies in quarantine at an edge, and sites whose oldest waiting study
  has waited longer than `alerts.stuck_after_min`, with the likely cause
  (edge stopped, pool paused, no worker, late sync) and a link;
- studies that a `deliver` run could not bring to a site (its edge cache or
  its PACS), from the audit chain, until a later delivery of them succeeds;
- Prefect: failed and crashed runs of the last 24 hours and late ones (with
  a link to each), paused work pools and pools no worker polls.

Counts, sites and run names only: no patient data.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Any

from renkei.config import Layout
from renkei.display import local_time
from renkei.errors import RenkeiError

VERIFY_MAX_AGE_H = 26  # defaults of alerts.verification_max_age_h and alerts.backup_max_age_min
BACKUP_MAX_AGE_S = 3600
DELIVERY_LOOKBACK_S = 7 * 86400
EDGE_SILENT_S = 120  # default of alerts.edge_silent_s; heartbeats come every 0.25-2 s from a running edge


@dataclass(frozen=True)
class Problem:
    what: str  # edge | verification | catalog | backup | quarantine | stuck | delivery | run | pool | prefect
    site: str | None
    cause: str
    action: str
    link: str | None = None
    key: str = ""  # stable while the same problem persists (alerts notify each key once)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", f"{self.what}:{self.site or 'region'}")


@dataclass
class Status:
    checked_at: str
    problems: list[Problem] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)  # what was checked and is fine

    @property
    def needs_action(self) -> bool:
        return bool(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at,
            "needs_action": self.needs_action,
            "problems": [asdict(p) for p in self.problems],
            "ok": self.ok,
        }


def region_status(
    layout: Layout, api_url: str | None = None, now: float | None = None, catalog: Any = None, timeout: float = 15.0
) -> Status:
    """What needs action; `catalog` reuses an open Catalog (the dashboard's), `timeout` bounds each API call."""
    now = time.time() if now is None else now
    status = Status(dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds"))
    stuck = _edges(layout, status, now)
    _catalog(layout, status, now, catalog)
    api_url = api_url if api_url is not None else os.environ.get("PREFECT_API_URL")
    if api_url:
        _prefect(api_url, status, now, timeout, layout.config.timezone)
    else:
        status.problems.append(
            Problem(
                "prefect",
                None,
                "PREFECT_API_URL is not set: runs, pools and workers were not checked",
                "set it to the Prefect server's API",
            )
        )
    _stuck(layout, status, stuck, api_url)
    return status


def _stuck(layout: Layout, status: Status, stuck: dict[str, tuple[int, float]], api_url: str | None) -> None:
    """A site whose studies wait too long, with the cause found among the other problems of that site."""
    limit_min = layout.config.alerts.stuck_after_min
    for site, (count, age_s) in stuck.items():
        causes = [p for p in status.problems if p.site == site and p.what in ("edge", "pool")]
        causes += [p for p in status.problems if p.what == "run" and f"sync-{site}" in p.cause]
        ui = (api_url[:-4] if api_url and api_url.endswith("/api") else api_url) or None
        if causes:
            why, action, link = causes[0].cause, causes[0].action, causes[0].link
        else:
            why = "no sync has taken them (look at the site's sync runs)"
            action = f"start one: prefect deployment run sync_site/sync-{site}; then read its log"
            link = f"{ui}/runs" if ui else None
        status.problems.append(
            Problem(
                "stuck",
                site,
                f"{count} stud{'y' if count == 1 else 'ies'} of {site} waiting for "
                f"{age_s / 60:.0f} min (more than {limit_min:g} min) to reach the center: {why}",
                action,
                link,
            )
        )


def _edges(layout: Layout, status: Status, now: float) -> dict[str, tuple[int, float]]:
    """Liveness and quarantine of each edge; returns {site: (studies waiting too long, oldest age s)}."""
    # lazy: `renkei config check` imports this module (through alerts) and needs no pydicom (~0.3 s)
    from renkei.edge.journal import JOURNAL_NAME, Journal

    stuck_s = layout.config.alerts.stuck_after_min * 60
    stuck: dict[str, tuple[int, float]] = {}
    for site in layout.config.sites:
        root = layout.edge_store(site.id)
        if not (root / JOURNAL_NAME).exists():
            if layout.data_dir.exists():
                status.problems.append(
                    Problem(
                        "edge",
                        site.id,
                        f"the edge of {site.id} has never run with this data folder (no journal at {root})",
                        f"start it: renkei edge serve --site {site.id}",
                    )
                )
            continue
        with Journal.open(root, readonly=True) as journal:
            beat = journal.last_heartbeat()
            quarantined = journal.quarantined_study_uids()
            held = len(quarantined)
            waiting = [
                u
                for state in ("pending", "uploaded")
                for u in journal.completed_studies(stuck_s, now=now, state=state)
                if u not in quarantined
            ]
            if waiting:
                waiting = list(dict.fromkeys(waiting))
                oldest = min(float(r["_last_received"]) for r in journal.study_rows(waiting))
                stuck[site.id] = (len(waiting), now - oldest)
        if beat is None or now - beat > layout.config.alerts.edge_silent_s:
            when = "never" if beat is None else f"{(now - beat) / 60:.0f} min ago"
            status.problems.append(
                Problem(
                    "edge",
                    site.id,
                    f"the edge of {site.id} is not running (last heartbeat: {when})",
                    f"start it (renkei edge serve --site {site.id}) and look at its log for why it stopped",
                )
            )
        else:
            status.ok.append(f"edge of {site.id} running")
        if held:
            status.problems.append(
                Problem(
                    "quarantine",
                    site.id,
                    f"{held} stud{'y' if held == 1 else 'ies'} in quarantine at the edge of {site.id}",
                    f"see why: renkei edge status --site {site.id}; then fix at the sender or renkei edge release",
                )
            )
    return stuck


def _catalog(layout: Layout, status: Status, now: float, open_catalog: Any = None) -> None:
    # lazy: `renkei config check` imports this module (through alerts) and needs no duckdb (~0.3 s)
    from renkei.catalog.backup import BackupLocation
    from renkei.catalog.catalog import Catalog

    url = layout.catalog_url
    if "://" not in url and not os.path.isdir(url):
        status.problems.append(
            Problem(
                "catalog",
                None,
                f"there is no catalog at {url}",
                "check --data-dir; after a loss: renkei catalog rebuild",
            )
        )
        return
    since = dt.datetime.fromtimestamp(now - DELIVERY_LOOKBACK_S, dt.UTC)
    try:
        if open_catalog is not None:
            open_catalog.totals()
            events = open_catalog.recent_audit(["verify-backups"], limit=1)
            deliveries = open_catalog.recent_audit(["deliver"], limit=5000, since=since)
        else:
            with Catalog.from_layout(layout, auto_compact=None) as cat:
                cat.totals()
                events = cat.recent_audit(["verify-backups"], limit=1)
                deliveries = cat.recent_audit(["deliver"], limit=5000, since=since)
    except RenkeiError as exc:
        status.problems.append(
            Problem(
                "catalog",
                None,
                str(exc).split(";")[0],
                "renkei catalog check; then renkei catalog restore (or rebuild)",
            )
        )
        return
    status.ok.append("catalog readable")
    _deliveries(deliveries, status)
    if not events:
        status.problems.append(
            Problem(
                "verification",
                None,
                "the backup verification has never run",
                "check that the verify-backups deployment exists (renkei deploy) and that the center's worker runs",
            )
        )
    else:
        last = events[0]
        age_h = (now - last.at.timestamp()) / 3600
        limit_h = layout.config.alerts.verification_max_age_h
        if age_h > limit_h:
            status.problems.append(
                Problem(
                    "verification",
                    None,
                    f"the last backup verification is {_hours(age_h)} old (more than {limit_h:g} h)",
                    "the nightly schedule is not running: check the center's worker and the Prefect server",
                )
            )
        elif last.outcome not in ("ok", "repaired"):
            status.problems.append(
                Problem(
                    "verification",
                    None,
                    f"the last backup verification ended '{last.outcome}'",
                    "read its artifact in the Prefect UI",
                )
            )
        else:
            status.ok.append(f"backup verification {age_h:.1f} h ago")
    location = BackupLocation(layout.catalog_backup_url, layout.config.center.s3)
    try:
        manifest = location.manifest()
    except RenkeiError:
        manifest = None
    if manifest is None:
        status.problems.append(
            Problem(
                "backup",
                None,
                f"the catalog has never been backed up to {layout.catalog_backup_url}",
                "renkei catalog backup, and check the backup-catalog deployment",
            )
        )
    elif now - float(manifest.get("time", 0)) > layout.config.alerts.backup_max_age_min * 60:
        age = (now - float(manifest["time"])) / 3600
        status.problems.append(
            Problem(
                "backup",
                None,
                f"the catalog's last backup is {_hours(age)} old",
                "the backup-catalog schedule is not running: check the center's worker",
            )
        )
    else:
        status.ok.append("catalog backed up")


def _hours(h: float) -> str:
    return f"{h:.0f} h" if h >= 10 else f"{h:.1f} h" if h >= 0.1 else f"{h * 60:.0f} min"


NOT_DELIVERED = {
    "edge-failed": "could not be cached at the edge",
    "pacs-failed": "the PACS refused the import",
    "patient-unknown": "the patient is not known at the site",
    "no-pacs": "the site has no PACS",
}


def _deliveries(events: list[Any], status: Status) -> None:
    """Studies whose latest delivery to a site did not succeed, one problem per site."""
    latest: dict[tuple[str, str], Any] = {}
    for event in events:  # newest first: the first seen is the latest
        if event.study_uid:
            latest.setdefault((event.actor_site, event.study_uid), event)
    by_site: dict[str, list[Any]] = {}
    for (site, _uid), event in latest.items():
        if event.outcome != "ok":
            by_site.setdefault(site, []).append(event)
    for site, failed in sorted(by_site.items()):
        reasons: dict[str, int] = {}
        for event in failed:
            why = NOT_DELIVERED.get(event.outcome, event.outcome)
            reasons[why] = reasons.get(why, 0) + 1
        uids = ", ".join(e.study_uid for e in failed[:3]) + (" ..." if len(failed) > 3 else "")
        action = (
            "register the patient at the site or link the patient's IDs (renkei link), then deliver again"
            if "patient-unknown" in {e.outcome for e in failed}
            else "fix the cause (the site's PACS or edge), then deliver again (prefect deployment run "
            f"deliver/deliver-{site} with the studies)"
        )
        status.problems.append(
            Problem(
                "delivery",
                site,
                f"{len(failed)} stud{'y' if len(failed) == 1 else 'ies'} not delivered to {site} "
                f"({'; '.join(f'{n}: {why}' for why, n in reasons.items())}): {uids}",
                action,
            )
        )


def _get(url: str, body: dict | None = None, timeout: float = 15.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    auth = os.environ.get("PREFECT_API_AUTH_STRING")  # a Prefect server with basic authentication
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _prefect(api: str, status: Status, now: float, timeout: float = 15.0, zone_name: str | None = None) -> None:
    ui = api[:-4] if api.endswith("/api") else api
    since = dt.datetime.fromtimestamp(now - 86400, dt.UTC).isoformat()
    try:
        runs = _get(
            f"{api}/flow_runs/filter",
            {
                "limit": 200,
                "sort": "START_TIME_DESC",
                "flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}}, "start_time": {"after_": since}},
            },
            timeout,
        )
        late = _get(
            f"{api}/flow_runs/filter", {"limit": 50, "flow_runs": {"state": {"name": {"any_": ["Late"]}}}}, timeout
        )
        pools = _get(f"{api}/work_pools/filter", {}, timeout)
    except OSError as exc:
        if getattr(exc, "code", None) in (401, 403):
            status.problems.append(
                Problem(
                    "prefect",
                    None,
                    f"the Prefect API at {api} refuses renkei's requests ({exc})",
                    "set PREFECT_API_AUTH_STRING to the server's user:password (PREFECT_SERVER_API_AUTH_STRING)",
                )
            )
        else:
            status.problems.append(
                Problem(
                    "prefect",
                    None,
                    f"the Prefect API at {api} does not answer ({exc})",
                    "start it (renkei server) and check PREFECT_API_URL",
                )
            )
        return
    for run in runs:
        status.problems.append(
            Problem(
                "run",
                None,
                f"run {run['name']} ended {run['state']['name']}"
                + (f": {run['state'].get('message')}" if run["state"].get("message") else ""),
                "read the run's artifact and log; start it again when the cause is fixed",
                f"{ui}/runs/flow-run/{run['id']}",
                key=f"run:{run['id']}",
            )
        )
    for run in late:
        status.problems.append(
            Problem(
                "run",
                None,
                f"run {run['name']} is late (scheduled {_local(run.get('expected_start_time'), zone_name)})",
                "no worker takes it: start the pool's worker, or resume the pool",
                f"{ui}/runs/flow-run/{run['id']}",
                key=f"late:{run['id']}",
            )
        )
    for pool in pools:
        if not str(pool.get("name", "")).startswith("renkei-"):
            continue
        if pool.get("is_paused"):
            status.problems.append(
                Problem(
                    "pool",
                    pool["name"].removeprefix("renkei-"),
                    f"work pool {pool['name']} is paused",
                    f"resume it: prefect work-pool resume {pool['name']}",
                    f"{ui}/work-pools/work-pool/{pool['name']}",
                    key=f"pool-paused:{pool['name']}",
                )
            )
        elif pool.get("status") == "NOT_READY":
            status.problems.append(
                Problem(
                    "pool",
                    pool["name"].removeprefix("renkei-"),
                    f"no worker polls work pool {pool['name']}",
                    "start it: renkei worker "
                    + (
                        "--center"
                        if pool["name"] == "renkei-center"
                        else f"--site {pool['name'].removeprefix('renkei-')}"
                    ),
                    f"{ui}/work-pools/work-pool/{pool['name']}",
                    key=f"pool-idle:{pool['name']}",
                )
            )
    if not runs and not late:
        status.ok.append("no failed or late runs in 24 h")


def _local(iso: str | None, zone_name: str | None) -> str:
    """An ISO time from Prefect's API in the region's zone, to the minute and zone named."""
    try:
        return local_time(dt.datetime.fromisoformat(iso or ""), zone_name, "%Y-%m-%d %H:%M", with_zone=True)
    except ValueError:
        return str(iso or "?")
