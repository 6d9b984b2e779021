"""Starting flow runs of deployments from outside Prefect (the edge, the HL7 listener) or from a flow."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from prefect import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from renkei.deployments import flow_deployment

log = logging.getLogger(__name__)


def start_run(
    flow_name: str, site: str | None, parameters: dict[str, Any], tag: str = "", idempotency_key: str | None = None
) -> str:
    """Create a flow run of the deployment and return its id at once (the worker runs it).

    With `idempotency_key`, the same key gives the same run (a retransmitted message starts nothing new).
    """
    name = flow_deployment(flow_name, site)
    run: FlowRun = run_deployment(  # type: ignore[assignment]  # sync here: prefect's stubs say "or a coroutine"
        name,
        parameters=parameters,
        timeout=0,
        as_subflow=False,
        tags=[t for t in ("renkei", tag) if t],
        idempotency_key=idempotency_key,
    )
    log.info("started %s (flow run %s)", name, run.id)
    return str(run.id)


def has_waiting_run(deployment: str) -> bool:
    """Whether the deployment already has a run that has not started (it will see new work)."""
    flow_name, dep_name = deployment.split("/", 1)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[dep_name])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED, StateType.PENDING]))
            ),
            limit=5,
        )
    now = time.time()
    # a scheduled run far in the future (the catch-up schedule) does not count
    return any(r.expected_start_time is None or r.expected_start_time.timestamp() <= now + 5 for r in runs)


class SyncTrigger:
    """Coalesces 'study complete' notices of an edge into sync_site runs of its site.

    The edge calls `notify(study_uid)`; a background thread starts a run within
    about a second unless one is already waiting to start (that run will find the
    study). Failures to reach Prefect are logged and retried; the scheduled
    catch-up run covers anything missed.
    """

    def __init__(
        self,
        site: str,
        parameters: dict[str, Any] | None = None,
        start: Callable[[], str] | None = None,
        interval: float = 1.0,
    ) -> None:
        self.site = site
        self.parameters = {"site": site, **(parameters or {})}
        self._start = start or (lambda: start_run("sync_site", site, self.parameters, tag=f"site:{site}"))
        self.interval = interval
        self._pending = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sync-trigger-{site}", daemon=True)
        self.runs_started: list[str] = []

    def start(self) -> SyncTrigger:
        self._thread.start()
        return self

    def notify(self, study_uid: str) -> None:
        log.info("study %s complete at %s: sync requested", study_uid, self.site)
        self._pending.set()

    def stop(self) -> None:
        self._stop.set()
        self._pending.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._pending.wait()
            if self._stop.is_set():
                return
            time.sleep(self.interval)  # let studies completing together share one run
            self._pending.clear()
            try:
                if has_waiting_run(flow_deployment("sync_site", self.site)):
                    continue
                self.runs_started.append(self._start())
            except ObjectNotFound:
                log.error(
                    "no deployment %s: run `renkei deploy` (the catch-up schedule will not run either)",
                    flow_deployment("sync_site", self.site),
                )
            except Exception as exc:  # Prefect unreachable: try again shortly
                log.warning("could not start a sync of %s: %s; retrying", self.site, exc)
                self._stop.wait(5)
                self._pending.set()
