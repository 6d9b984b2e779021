"""`renkei server`, `renkei deploy`, `renkei worker`: the region's Prefect side."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from renkei.cli.common import default_config_path, layout_of
from renkei.errors import UsageError

ORDER = 30
REPO = Path(__file__).resolve().parents[2]


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("server", parents=[common], help="run a local Prefect server (API and UI) on loopback",
                       description="Run Prefect's server for this region on 127.0.0.1, its database under "
                       "the data folder. For a region on several machines, run it on PostgreSQL "
                       "(docs/operations.md).")
    p.add_argument("--port", type=int, default=4200, help="HTTP port of the API and UI (default 4200)")
    p.set_defaults(func=_server)

    p = sub.add_parser("deploy", parents=[common], help="create the work pools and deployments (prefect.yaml)",
                       description="Create a process work pool per site and one for the center, then apply "
                       "prefect.yaml (prefect deploy --all). Needs PREFECT_API_URL.")
    p.add_argument("--prefect-file", default=str(REPO / "prefect.yaml"), metavar="FILE")
    p.set_defaults(func=_deploy)

    p = sub.add_parser("worker", parents=[common], help="run a site's (or the center's) Prefect worker",
                       description="Run the Prefect worker of a site's work pool, so that its flows run at "
                       "the site (next to its edge). Stop with Ctrl-C.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--site", metavar="ID", help="site id")
    who.add_argument("--center", action="store_true", help="the center's pool")
    p.add_argument("--limit", type=int, default=4, help="flow runs at once (default 4)")
    p.set_defaults(func=_worker)


def pool_name(site: str | None) -> str:
    return f"renkei-{site}" if site else "renkei-center"


def prefect_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of Prefect processes: the region's config and data folder, no analytics."""
    layout = layout_of(args)
    env = dict(os.environ)
    env["RENKEI_CONFIG"] = str(Path(getattr(args, "config", None) or default_config_path()).resolve())
    env["RENKEI_DATA_DIR"] = str(layout.data_dir)
    env["RENKEI_HOME"] = str(REPO)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    return env


def _prefect() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


def _server(args: argparse.Namespace) -> int:
    env = prefect_env(args)
    layout = layout_of(args)
    home = layout.data_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_API_HOST": "127.0.0.1",
                "PREFECT_SERVER_API_PORT": str(args.port),
                "PREFECT_UI_API_URL": f"http://127.0.0.1:{args.port}/api"})
    print(f"Prefect UI and API on http://127.0.0.1:{args.port} (database in {home})", flush=True)
    os.execve(_prefect(), [_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(args.port)], env)
    return 0


def ensure_pools(site_ids: list[str]) -> list[str]:
    """Create the process work pools that do not exist yet; returns the names created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    created = []
    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for name in [pool_name(s) for s in site_ids] + [pool_name(None)]:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
                created.append(name)
            except ObjectAlreadyExists:
                pass
    return created


def _deploy(args: argparse.Namespace) -> int:
    import subprocess

    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError("set PREFECT_API_URL to the Prefect server's API (e.g. http://127.0.0.1:4200/api)")
    layout = layout_of(args)
    created = ensure_pools(list(layout.config.site_ids))
    print(f"work pools: {', '.join(created) or 'all present'}")
    proc = subprocess.run([_prefect(), "--no-prompt", "deploy", "--all", "--prefect-file", args.prefect_file],
                          cwd=REPO, env=prefect_env(args), capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"prefect deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print("deployments applied from", args.prefect_file)
    return 0


def worker_command(site: str | None, limit: int = 4) -> list[str]:
    return [_prefect(), "worker", "start", "--pool", pool_name(site), "--type", "process", "--limit", str(limit)]


def _worker(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    if args.site:
        layout.config.site(args.site)
    env = prefect_env(args)
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")
    env.setdefault("PREFECT_WORKER_PREFETCH_SECONDS", "2")
    cmd = worker_command(args.site, args.limit)
    print(f"worker of pool {pool_name(args.site)} (Ctrl-C stops it)", flush=True)
    os.execve(cmd[0], cmd, env)
    return 0
