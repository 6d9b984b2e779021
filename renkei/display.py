"""How times, dates and sizes read for people: the region's time zone, whole seconds, decimal units.

One place for the dashboard and the command line, so that a time on the page
and the same time in a terminal read the same (`2026-08-13 15:34:45 JST`), a
DICOM date reads as a date (`2026-08-13 15:34`), and sizes are decimal
megabytes and gigabytes everywhere (the config still accepts MiB and GiB).
JSON output stays machine-readable (ISO 8601 in UTC): only text for people
goes through here.
"""

from __future__ import annotations

import datetime as dt
import functools
from zoneinfo import ZoneInfo

TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


@functools.lru_cache(maxsize=16)
def zone(name: str | None) -> dt.tzinfo:
    """The named IANA zone; UTC for none or an unknown name (config check reports those)."""
    if not name:
        return dt.UTC
    try:
        return ZoneInfo(name)
    except Exception:
        return dt.UTC


def local_time(
    value: dt.datetime | float | None, zone_name: str | None, fmt: str = TIME_FORMAT, with_zone: bool = False
) -> str:
    """A UTC time (aware, naive UTC, or a POSIX timestamp) in the region's zone, to the second."""
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        value = dt.datetime.fromtimestamp(value, dt.UTC)
    elif value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    local = value.astimezone(zone(zone_name))
    text = local.strftime(fmt)
    return f"{text} {local.tzname()}" if with_zone else text


def dicom_date(date: str | None, time: str | None = None) -> str:
    """A DICOM DA (and TM) as people read it: 20260813 153445.123 -> 2026-08-13 15:34.

    DICOM dates and times are the site's local time and are shown as they are;
    anything that is not a well-formed DA is shown unchanged rather than guessed at.
    """
    d = (date or "").strip()
    if len(d) != 8 or not d.isdigit():
        return d
    out = f"{d[:4]}-{d[4:6]}-{d[6:]}"
    t = (time or "").strip().replace(":", "")
    if len(t) >= 4 and t[:4].isdigit():
        out += f" {t[:2]}:{t[2:4]}"
    return out


def size(n_bytes: int | float | None) -> str:
    """A size in decimal units, three significant figures: 980 kB, 12.3 MB, 1.47 GB."""
    if n_bytes is None:
        return ""
    value = float(n_bytes)
    if abs(value) < 1000:
        return f"{int(value)} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if abs(float(f"{value:.3g}")) < 1000 or unit == "PB":
            return f"{float(f'{value:.3g}'):g} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
