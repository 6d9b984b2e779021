"""`renkei dashboard`: the region operator's web page, served on loopback."""

from __future__ import annotations

import argparse
import ipaddress
import os

from renkei.cli.common import layout_of
from renkei.errors import UsageError

ORDER = 60
DEFAULT_PORT = 8080


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    parser = sub.add_parser(
        "dashboard",
        parents=[common],
        help="serve the operator's web dashboard on loopback",
        description="Serve the region operator's dashboard: per-site flow, throughput and time to "
        "availability, who may see what, the last backup verification, cross-site accesses and a "
        "study browser with thumbnails. It has no login, so it listens on loopback only; reach it "
        "from elsewhere through an SSH tunnel. Stop with Ctrl-C.",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another host name or address the browser may reach the dashboard as (the Host "
        "header, any port), e.g. the name of an SSH tunnel's end in /etc/hosts; repeat for more. "
        "The bind address, localhost, 127.0.0.1 and [::1] are always allowed; any other Host "
        "is refused (DNS rebinding)",
    )
    parser.add_argument(
        "--prefect-ui",
        metavar="URL",
        default=None,
        help="the Prefect UI that flow-run links point to (default $PREFECT_UI_URL, else "
        "$PREFECT_API_URL without /api, else http://127.0.0.1:4200)",
    )
    parser.add_argument(
        "--refresh",
        type=int,
        default=60,
        metavar="SECONDS",
        help="reload the operator view every SECONDS (0: never; default 60)",
    )
    parser.set_defaults(func=_dashboard)


def prefect_ui_url(explicit: str | None = None) -> str:
    """Where the Prefect UI is: the option, $PREFECT_UI_URL, $PREFECT_API_URL less '/api', or port 4200."""
    if explicit:
        return explicit.rstrip("/")
    if os.environ.get("PREFECT_UI_URL"):
        return os.environ["PREFECT_UI_URL"].rstrip("/")
    api = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if api:
        return api[: -len("/api")] if api.endswith("/api") else api
    return "http://127.0.0.1:4200"


def check_loopback(host: str) -> str:
    """The host when it is a loopback address; UsageError otherwise (the dashboard shows patient data)."""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise UsageError(
        f"--host {host!r} is not a loopback address: the dashboard has no login and shows "
        "patient IDs, so it listens on 127.0.0.1 (or ::1) only; use an SSH tunnel to reach it"
    )


def _dashboard(args: argparse.Namespace) -> int:
    # lazy: keeps `renkei --help` fast (uvicorn takes ~20 ms to import)
    import uvicorn

    # lazy: keeps `renkei --help` fast (the dashboard imports fastapi, plotly and the catalog, ~0.4 s)
    from renkei.dashboards.app import create_app

    host = check_loopback(args.host)
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} must be between 1 and 65535")
    if args.refresh < 0:
        raise UsageError("--refresh must be 0 (never) or a number of seconds")
    layout = layout_of(args)
    app = create_app(
        layout, prefect_ui_url(args.prefect_ui), refresh_s=args.refresh, allowed_hosts=[host, *args.allowed_host]
    )
    shown = f"[{host}]" if ":" in host else host
    print(
        f"renkei dashboard of region {layout.config.region!r} on http://{shown}:{args.port}/ "
        f"(data folder {layout.data_dir}); Ctrl-C stops it",
        flush=True,
    )
    uvicorn.run(app, host=host, port=args.port, log_level="warning")
    return 0
