"""What every subcommand shares: the data folder, the configuration file, output helpers."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from renkei.config import DATA_DIR_ENV, Layout, RegionConfig, load_config, resolve_data_dir
from renkei.display import local_time
from renkei.runtime import CONFIG_ENV, config_path


def default_config_path() -> Path:
    """$RENKEI_CONFIG, else the example region shipped with renkei (examples/nagasaki.yaml)."""
    return Path(config_path())


def common_options() -> argparse.ArgumentParser:
    """Options accepted by every subcommand, before or after its name."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help=f"folder holding all state of the region (default: ${DATA_DIR_ENV} or ./renkei-data)",
    )
    parent.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"network configuration file (default: ${CONFIG_ENV} or examples/nagasaki.yaml)",
    )
    parent.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log detail (-vv shows DEBUG, which may include patient data)",
    )
    return parent


# times in tables are shown in the region's zone once a command has read the config (UTC before)
_display_zone: str | None = None


def config_of(args: argparse.Namespace) -> RegionConfig:
    global _display_zone
    config = load_config(getattr(args, "config", None) or default_config_path())
    _display_zone = config.timezone
    return config


def when(value: Any) -> str:
    """A time (datetime or POSIX timestamp) for a terminal: the region's zone, to the second, zone named."""
    return local_time(value, _display_zone, with_zone=True)


def layout_of(args: argparse.Namespace) -> Layout:
    return Layout(config_of(args), resolve_data_dir(getattr(args, "data_dir", None)))


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, ensure_ascii=False, indent=2, default=str)
    sys.stdout.write("\n")


def print_table(
    rows: Sequence[dict[str, Any]] | Iterable[dict[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """A plain aligned text table, for operators reading a terminal."""
    rows = list(rows)
    if not rows:
        print("(none)")
        return
    columns = list(columns or rows[0].keys())
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return when(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)
