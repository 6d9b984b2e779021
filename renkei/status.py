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
- studies in quarantine at an edge;
- Prefect: failed and crashed runs of the last 24 hours and late ones (with
  a link to each), paused work pools and pools no worker polls.

Counts, sites and run names only: no patient data.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from renkei.config import Layout

VERIFY_MAX_AGE_H = 26
BACKUP_MAX_AGE_S = 3600
EDGE_SILENT_S = 120  # heartbeats come every 0.25-2 s from a running edge


@dataclass(frozen=True)
class Problem:
    what: str  # edge | verification | catalog | backup | quarantine | run | pool | prefect
    site: str | None
    cause: str
    action: str
    link: str | None = None


@dataclass
class Status:
    checked_at: str
    problems: list[Problem] = field(default_factory=list)
    ok: list[str] = field(default_factory=list)  # what was checked and is fine

    @property
    def needs_action(self) -> bool:
        return bool(self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {"checked_at": self.checked_at, "needs_action": self.needs_action,
                "problems": [asdict(p) for p in self.problems], "ok": self.ok}


def region_status(layout: Layout, api_url: str | None = None, now: float | None = None,
                  catalog: Any = None, timeout: float = 15.0) -> Status:
    """What needs action; `catalog` reuses an open Catalog (the dashboard's), `timeout` bounds each API call."""
    now = time.time() if now is None else now
    status = Status(dt.datetime.fromtimestamp(now, dt.timezone.utc).isoformat(timespec="seconds"))
    _edges(layout, status, now)
    _catalog(layout, status, now, catalog)
    api_url = api_url if api_url is not None else os.environ.get("PREFECT_API_URL")
    if api_url:
        _prefect(api_url, status, now, timeout)
    else:
        status.problems.append(Problem("prefect", None, "PREFECT_API_URL is not set: runs, pools and workers "
                                       "were not checked", "set it to the Prefect server's API"))
    return status


def _edges(layout: Layout, status: Status, now: float) -> None:
    from edge.journal import JOURNAL_NAME, Journal

    for site in layout.config.sites:
        root = layout.edge_store(site.id)
        if not (root / JOURNAL_NAME).exists():
            if layout.data_dir.exists():
                status.problems.append(Problem("edge", site.id, f"the edge of {site.id} has never run with this "
                                               f"data folder (no journal at {root})",
                                               f"start it: renkei edge serve --site {site.id}"))
            continue
        with Journal.open(root, readonly=True) as journal:
            beat = journal.last_heartbeat()
            held = len(journal.quarantined_study_uids())
        if beat is None or now - beat > EDGE_SILENT_S:
            when = "never" if beat is None else f"{(now - beat) / 60:.0f} min ago"
            status.problems.append(Problem("edge", site.id, f"the edge of {site.id} is not running (last heartbeat: "
                                           f"{when})", f"start it (renkei edge serve --site {site.id}) and look at "
                                           "its log for why it stopped"))
        else:
            status.ok.append(f"edge of {site.id} running")
        if held:
            status.problems.append(Problem("quarantine", site.id, f"{held} stud{'y' if held == 1 else 'ies'} in "
                                           f"quarantine at the edge of {site.id}",
                                           f"see why: renkei edge status --site {site.id}; then fix at the "
                                           "sender or renkei edge release"))


def _catalog(layout: Layout, status: Status, now: float, open_catalog: Any = None) -> None:
    from catalog.backup import BackupLocation
    from catalog.catalog import Catalog
    from renkei.errors import RenkeiError

    url = layout.catalog_url
    if "://" not in url and not os.path.isdir(url):
        status.problems.append(Problem("catalog", None, f"there is no catalog at {url}",
                                       "check --data-dir; after a loss: renkei catalog rebuild"))
        return
    try:
        if open_catalog is not None:
            open_catalog.totals()
            events = open_catalog.recent_audit(["verify-backups"], limit=1)
        else:
            with Catalog.from_layout(layout, auto_compact=None) as cat:
                cat.totals()
                events = cat.recent_audit(["verify-backups"], limit=1)
    except RenkeiError as exc:
        status.problems.append(Problem("catalog", None, str(exc).split(";")[0],
                                       "renkei catalog check; then renkei catalog restore (or rebuild)"))
        return
    status.ok.append("catalog readable")
    if not events:
        status.problems.append(Problem("verification", None, "the backup verification has never run",
                                       "check that the verify-backups deployment exists (renkei deploy) and "
                                       "that the center's worker runs"))
    else:
        last = events[0]
        age_h = (now - last.at.timestamp()) / 3600
        if age_h > VERIFY_MAX_AGE_H:
            status.problems.append(Problem("verification", None, f"the last backup verification is {age_h:.0f} h "
                                           f"old (more than {VERIFY_MAX_AGE_H} h)",
                                           "the nightly schedule is not running: check the center's worker and "
                                           "the Prefect server"))
        elif last.outcome not in ("ok", "repaired"):
            status.problems.append(Problem("verification", None, f"the last backup verification ended "
                                           f"'{last.outcome}'", "read its artifact in the Prefect UI"))
        else:
            status.ok.append(f"backup verification {age_h:.1f} h ago")
    location = BackupLocation(layout.catalog_backup_url, layout.config.center.s3)
    try:
        manifest = location.manifest()
    except RenkeiError:
        manifest = None
    if manifest is None:
        status.problems.append(Problem("backup", None, "the catalog has never been backed up to "
                                       f"{layout.catalog_backup_url}",
                                       "renkei catalog backup, and check the backup-catalog deployment"))
    elif now - float(manifest.get("time", 0)) > BACKUP_MAX_AGE_S:
        age = (now - float(manifest["time"])) / 3600
        status.problems.append(Problem("backup", None, f"the catalog's last backup is {age:.1f} h old",
                                       "the backup-catalog schedule is not running: check the center's worker"))
    else:
        status.ok.append("catalog backed up")


def _get(url: str, body: dict | None = None, timeout: float = 15.0) -> Any:
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _prefect(api: str, status: Status, now: float, timeout: float = 15.0) -> None:
    ui = api[:-4] if api.endswith("/api") else api
    since = dt.datetime.fromtimestamp(now - 86400, dt.timezone.utc).isoformat()
    try:
        runs = _get(f"{api}/flow_runs/filter", {
            "limit": 200, "sort": "START_TIME_DESC",
            "flow_runs": {"state": {"type": {"any_": ["FAILED", "CRASHED"]}},
                          "start_time": {"after_": since}}}, timeout)
        late = _get(f"{api}/flow_runs/filter", {"limit": 50, "flow_runs": {"state": {"name": {"any_": ["Late"]}}}},
                    timeout)
        pools = _get(f"{api}/work_pools/filter", {}, timeout)
    except OSError as exc:
        status.problems.append(Problem("prefect", None, f"the Prefect API at {api} does not answer ({exc})",
                                       "start it (renkei server) and check PREFECT_API_URL"))
        return
    for run in runs:
        status.problems.append(Problem("run", None, f"run {run['name']} ended {run['state']['name']}"
                                       + (f": {run['state'].get('message')}" if run["state"].get("message") else ""),
                                       "read the run's artifact and log; start it again when the cause is fixed",
                                       f"{ui}/runs/flow-run/{run['id']}"))
    for run in late:
        status.problems.append(Problem("run", None, f"run {run['name']} is late (scheduled "
                                       f"{run.get('expected_start_time', '')[:16]})",
                                       "no worker takes it: start the pool's worker, or resume the pool",
                                       f"{ui}/runs/flow-run/{run['id']}"))
    for pool in pools:
        if not str(pool.get("name", "")).startswith("renkei-"):
            continue
        if pool.get("is_paused"):
            status.problems.append(Problem("pool", pool["name"].removeprefix("renkei-"), f"work pool {pool['name']} "
                                           "is paused", f"resume it: prefect work-pool resume {pool['name']}",
                                           f"{ui}/work-pools/work-pool/{pool['name']}"))
        elif pool.get("status") == "NOT_READY":
            status.problems.append(Problem("pool", pool["name"].removeprefix("renkei-"), f"no worker polls work pool "
                                           f"{pool['name']}", "start it: renkei worker "
                                           + ("--center" if pool["name"] == "renkei-center" else
                                              f"--site {pool['name'].removeprefix('renkei-')}"),
                                           f"{ui}/work-pools/work-pool/{pool['name']}"))
    if not runs and not late:
        status.ok.append("no failed or late runs in 24 h")
