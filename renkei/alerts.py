"""Alerts: tell the operator when something needs action (`renkei watch`, `renkei status --notify`).

The checks are `renkei status`'s (renkei/status.py). Each problem has a key
that stays the same while the problem persists; it is notified once, again
after `alerts.repeat_h` if it is still there, and a short "resolved" note
follows when it clears. What was notified is kept in `<data>/alerts.json`,
so a restarted watcher does not repeat itself.

Sending is Apprise's (a maintained library, already installed with Prefect,
which uses it for its own notification blocks): one URL per receiver, e.g.
`json://host:port/path` for a webhook, `mailto://user:pass@host?to=...` for
e-mail, `slack://...`. The watcher is its own process, not a Prefect flow, so
that a Prefect server that is down is itself reported.

Messages carry sites, counts, UIDs and run names only: no patient data.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import apprise

from renkei.config import Layout
from renkei.errors import UsageError
from renkei.status import Problem, Status, region_status

log = logging.getLogger(__name__)

STATE_NAME = "alerts.json"
MAX_CAUSE = 400


def alert_urls(layout: Layout) -> list[str]:
    """The configured Apprise URLs, then those of the environment variable `alerts.notify_env`."""
    cfg = layout.config.alerts
    urls = list(cfg.notify)
    urls += os.environ.get(cfg.notify_env, "").split()
    return urls


class Sender:
    """Sends one message to every receiver; raises UsageError for a URL Apprise does not understand."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self._apprise = apprise.Apprise()
        quiet = logging.getLogger("apprise")
        before = quiet.level
        quiet.setLevel(logging.CRITICAL)  # Apprise logs a refused URL whole, password included
        try:
            refused = [url for url in urls if not self._apprise.add(url)]
        finally:
            quiet.setLevel(before)
        for url in refused:
            if url:
                shown = url.split("://", 1)[0] + "://..."  # never print a password the URL may hold
                raise UsageError(
                    f"alerts: {shown} is not a notification URL Apprise understands "
                    "(e.g. json://host:port/path, mailto://user:pass@host?to=someone@example.org)"
                )

    def __call__(self, title: str, body: str, problem: bool) -> bool:
        kind = apprise.NotifyType.FAILURE if problem else apprise.NotifyType.SUCCESS
        return bool(self._apprise.notify(title=title, body=body, notify_type=kind))


@dataclass
class Round:
    """What one check notified."""

    status: Status
    notified: list[Problem] = field(default_factory=list)
    resolved: list[str] = field(default_factory=list)  # keys
    failed: list[str] = field(default_factory=list)  # keys whose notification could not be sent


def _load(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.warning("alerts: %s is unreadable; starting afresh (problems may be notified again)", path)
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path, state: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _message(region: str, p: Problem) -> tuple[str, str]:
    where = f" at {p.site}" if p.site else ""
    cause = p.cause if len(p.cause) <= MAX_CAUSE else p.cause[:MAX_CAUSE] + "..."
    body = f"{cause}\nWhat to do: {p.action}" + (f"\n{p.link}" if p.link else "")
    return f"renkei {region}: {p.what}{where} needs action", body


def check_and_notify(
    layout: Layout, send: Callable[[str, str, bool], bool], now: float | None = None, status: Status | None = None
) -> Round:
    """One round: check the region, notify each new (or long-standing) problem and each resolved one."""
    now = time.time() if now is None else now
    status = status if status is not None else region_status(layout, now=now)
    path = layout.data_dir / STATE_NAME
    state = _load(path)
    repeat_s = layout.config.alerts.repeat_h * 3600
    region = layout.config.name or layout.config.region
    result = Round(status)
    current: dict[str, Problem] = {}
    for p in status.problems:
        current.setdefault(p.key, p)
    for key, p in current.items():
        seen = state.get(key)
        if seen and now - float(seen.get("notified", 0)) < repeat_s:
            continue
        title, body = _message(region, p)
        if send(title, body, True):
            state[key] = {"first": seen["first"] if seen else now, "notified": now, "what": p.what, "site": p.site}
            result.notified.append(p)
        else:
            result.failed.append(key)
    for key in [k for k in state if k not in current]:
        seen = state[key]
        where = f" at {seen['site']}" if seen.get("site") else ""
        if send(
            f"renkei {region}: {seen.get('what', key)}{where} resolved",
            f"Fine again after {(now - float(seen.get('first', now))) / 60:.0f} min ({key}).",
            False,
        ):
            del state[key]
            result.resolved.append(key)
        else:
            result.failed.append(key)
    if layout.data_dir.is_dir():
        _save(path, state)
    if result.failed:
        log.warning("alerts: %d notification(s) could not be sent; they are tried again next round", len(result.failed))
    return result


def watch(
    layout: Layout,
    every_s: float | None = None,
    rounds: int | None = None,
    report: Callable[[Round], None] | None = None,
) -> None:
    """Check every `every_s` seconds (default alerts.every_s) until stopped (or `rounds` done)."""
    urls = alert_urls(layout)
    if not urls:
        raise UsageError(
            "alerts: nobody to notify: add Apprise URLs under alerts.notify in the region's "
            f"configuration, or in the environment variable {layout.config.alerts.notify_env}"
        )
    send = Sender(urls)
    every = every_s if every_s is not None else layout.config.alerts.every_s
    done = 0
    while rounds is None or done < rounds:
        started = time.monotonic()
        result = check_and_notify(layout, send)
        if report:
            report(result)
        done += 1
        if rounds is not None and done >= rounds:
            break
        time.sleep(max(0.0, every - (time.monotonic() - started)))
