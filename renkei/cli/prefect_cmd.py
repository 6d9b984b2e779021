"""`renkei server`, `renkei deploy`, `renkei worker`: the region's Prefect side."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from renkei import prefect_db, prefect_logging
from renkei.cli.common import config_of, default_config_path, layout_of
from renkei.cli.config_cmd import deployment_problems
from renkei.config import RegionConfig
from renkei.deployments import CRASH_AFTER_S, HEARTBEAT_S, RUN_TAG, expected, flow_deployment, pool_name, render
from renkei.errors import UsageError

ORDER = 30
REPO = Path(__file__).resolve().parents[2]

# A run whose process died (kill -9 of the worker and the flow, a power cut) stops sending heartbeats; the
# automation below marks it Crashed, which frees its deployment's concurrency slot (a site's sync: limit 1).
# Without it Prefect keeps it "Running" and holds the slot until its lease expires (renewed for 300 s at a time).
SLOT_WAIT_S = 10  # a run waiting for its site's slot asks again this often (`renkei server`; Prefect's default 30)
CRASH_AUTOMATION = "renkei: a run without heartbeats is crashed"


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "server",
        parents=[common],
        help="run a local Prefect server (API and UI) on loopback",
        description="Run Prefect's server for this region on 127.0.0.1, its database under "
        "the data folder. For a region on several machines, run it on PostgreSQL "
        "(docs/operations.md).",
    )
    p.add_argument("--port", type=int, default=4200, help="HTTP port of the API and UI (default 4200)")
    p.set_defaults(func=_server)

    p = sub.add_parser(
        "deploy",
        parents=[common],
        help="create the work pools and deployments of the region's sites",
        description="Create a process work pool per site and one for the center, apply the "
        "deployments generated from the configuration (prefect deploy --all), and the automation "
        "that marks a run without heartbeats Crashed (so a killed run frees its site's slot). "
        "Needs PREFECT_API_URL.",
    )
    p.add_argument(
        "--prefect-file",
        default=None,
        metavar="FILE",
        help="apply this prefect.yaml instead of the one generated from the configuration "
        "(checked against the sites first)",
    )
    p.set_defaults(func=_deploy)

    p = sub.add_parser(
        "deployments",
        parents=[common],
        help="print (or write) the prefect.yaml generated from the configuration",
        description="The region's Prefect deployments as prefect.yaml, generated from the sites of the "
        "configuration: what `renkei deploy` applies. --check compares it with a file (exit 1 if they differ).",
    )
    what = p.add_mutually_exclusive_group()
    what.add_argument("--write", metavar="FILE", help="write it to FILE")
    what.add_argument("--check", metavar="FILE", help="exit 1 unless FILE is exactly what would be generated")
    p.set_defaults(func=_deployments)

    p = sub.add_parser(
        "worker",
        parents=[common],
        help="run a site's (or the center's) Prefect worker",
        description="Run the Prefect worker of a site's work pool, so that its flows run at "
        "the site (next to its edge). Stop with Ctrl-C.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--site", metavar="ID", help="site id")
    who.add_argument("--center", action="store_true", help="the center's pool")
    p.add_argument("--limit", type=int, default=4, help="flow runs at once (default 4)")
    p.set_defaults(func=_worker)

    parser = sub.add_parser(
        "server-db",
        parents=[common],
        help="back up or restore the Prefect server's database (deployments, schedules, pools, run history)",
        description="Back up or restore the Prefect server's database: renkei server's "
        "SQLite file under the data folder, or the PostgreSQL database of "
        "PREFECT_API_DATABASE_CONNECTION_URL (pg_dump/pg_restore).",
    )
    cmds = parser.add_subparsers(title="server-db commands", metavar="ACTION")
    b = cmds.add_parser("backup", parents=[common], help="write a consistent copy (while the server runs)")
    b.add_argument("--to", required=True, metavar="FILE", help="the backup file to write")
    b.set_defaults(func=_db_backup)
    r = cmds.add_parser("restore", parents=[common], help="put a backup in place (stop the server first)")
    r.add_argument("file", metavar="FILE", help="a file written by renkei server-db backup")
    r.set_defaults(func=_db_restore)


def _db_summary(held: dict[str, int]) -> str:
    return (
        ", ".join(f"{n} {table.replace('_', ' ')}{'s' if n != 1 else ''}" for table, n in held.items())
        or "(PostgreSQL dump)"
    )


def _db_backup(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    held = prefect_db.backup(layout, Path(args.to))
    print(f"backed up {prefect_db.database(layout).shown()} to {args.to}: {_db_summary(held)}")
    return 0


def _db_restore(args: argparse.Namespace) -> int:
    layout = layout_of(args)
    held = prefect_db.restore(layout, Path(args.file))
    print(
        f"restored {prefect_db.database(layout).shown()} from {args.file}: {_db_summary(held)}; "
        "start the server again (renkei server)"
    )
    return 0


def prefect_env(args: argparse.Namespace) -> dict[str, str]:
    """Environment of Prefect processes: the region's config and data folder, no analytics."""
    layout = layout_of(args)
    env = dict(os.environ)
    env["RENKEI_CONFIG"] = str(Path(getattr(args, "config", None) or default_config_path()).resolve())
    env["RENKEI_DATA_DIR"] = str(layout.data_dir)
    env["RENKEI_HOME"] = str(REPO)
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    for key, value in prefect_logging.ENV.items():  # no rich rendering on the server's event loop
        env.setdefault(key, value)
    return env


def _prefect() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else (shutil.which("prefect") or "prefect")


SQLITE_BUSY_TIMEOUT_S = 60
WORKER_POLL_S = 5  # PREFECT_WORKER_QUERY_SECONDS of `renkei worker` (Prefect's default: 10)


def server_settings(database_url: str = "") -> dict[str, str]:
    """The Prefect server's settings renkei relies on (`renkei server`, and the suite's test server)."""
    # a run waiting for its site's slot (held by a run found crashed) starts within SLOT_WAIT_S: with
    # Prefect's 30 s, a crash found after CRASH_AFTER_S left the waiting run up to 30 s more to wait
    settings = {"PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": str(SLOT_WAIT_S)}
    if not database_url.startswith("postgresql"):
        # SQLite has one writer: a busy machine held the lock past Prefect's 10 s and the server answered
        # "database is locked" (lost heartbeats, an admission's run not created within a minute); wait instead
        settings["PREFECT_SERVER_DATABASE_TIMEOUT"] = str(SQLITE_BUSY_TIMEOUT_S)
    return settings


def _server(args: argparse.Namespace) -> int:
    env = prefect_env(args)
    layout = layout_of(args)
    home = layout.data_dir / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    for key, value in server_settings(env.get("PREFECT_API_DATABASE_CONNECTION_URL", "")).items():
        env.setdefault(key, value)
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_API_HOST": "127.0.0.1",
            "PREFECT_SERVER_API_PORT": str(args.port),
            "PREFECT_UI_API_URL": f"http://127.0.0.1:{args.port}/api",
        }
    )
    print(f"Prefect UI and API on http://127.0.0.1:{args.port} (database in {home})", flush=True)
    os.execve(_prefect(), [_prefect(), "server", "start", "--host", "127.0.0.1", "--port", str(args.port)], env)
    return 0


def ensure_pools(site_ids: list[str]) -> list[str]:
    """Create the process work pools that do not exist yet; returns the names created."""
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
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


def absent_deployments(config: RegionConfig) -> list[str]:
    """The region's deployments the server does not have on their work pool, as `flow/deployment`."""
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    absent = []
    with get_client(sync_client=True) as client:
        for e in expected(config):
            name = flow_deployment(e.kind.flow, e.site)
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                absent.append(name)
                continue
            if found.work_pool_name != e.pool:
                absent.append(f"{name} (on pool {found.work_pool_name}, not {e.pool})")
    return absent


def crash_automation(within_s: float = CRASH_AFTER_S, tag: str = RUN_TAG):  # -> prefect AutomationCore
    """Prefect's zombie-run detection: a flow run of a renkei deployment silent for `within_s` is Crashed.

    A proactive trigger per flow run: after a heartbeat, expect another
    heartbeat or any state event of the run (its end included) within
    `within_s`; when none comes, change the run's state to Crashed. The
    Crashed state releases the deployment's concurrency slot at once, so the
    site's next sync starts.
    """
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
    from prefect.automations import AutomationCore, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState

    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=f"A flow run of a deployment tagged {tag!r} that sent no heartbeat for {within_s:.0f} s "
        "(its process was killed or its machine stopped) is marked Crashed, which frees its "
        "deployment's concurrency slot. Created by `renkei deploy`.",
        enabled=True,
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{tag}"},
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {within_s:.0f} s: the run's process is gone (marked by the automation "
                f"{CRASH_AUTOMATION!r}); the site's next run finishes its work",
            )
        ],
    )


def ensure_crash_detection(within_s: float = CRASH_AFTER_S, tag: str = RUN_TAG) -> str:
    """Create (or bring up to date) the crash-detection automation; returns its id."""
    # lazy: keeps `renkei --help` fast (prefect takes ~1 s to import)
    from prefect import get_client

    wanted = crash_automation(within_s, tag)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(CRASH_AUTOMATION)
        if existing:
            client.update_automation(existing[0].id, wanted)
            for extra in existing[1:]:
                client.delete_automation(extra.id)
            return str(existing[0].id)
        return str(client.create_automation(wanted))


def _source_name(args: argparse.Namespace) -> str:
    path = Path(getattr(args, "config", None) or default_config_path()).resolve()
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return path.name


def _deployments(args: argparse.Namespace) -> int:
    text = render(config_of(args), _source_name(args))
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
        print(f"wrote {args.write}")
    elif args.check:
        try:
            current = Path(args.check).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{args.check}: cannot be read ({exc.strerror})") from None
        if current != text:
            print(
                f"{args.check} is not what the configuration generates: renkei deployments --write {args.check}",
                file=sys.stderr,
            )
            return 1
        print(f"{args.check} matches the configuration")
    else:
        sys.stdout.write(text)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError("set PREFECT_API_URL to the Prefect server's API (e.g. http://127.0.0.1:4200/api)")
    layout = layout_of(args)

    if args.prefect_file is None:  # generated from the configuration: matches its sites by construction
        folder = layout.data_dir / "prefect"
        folder.mkdir(parents=True, exist_ok=True)
        args.prefect_file = str(folder / "prefect.yaml")
        Path(args.prefect_file).write_text(render(layout.config, _source_name(args)), encoding="utf-8")
    problems = deployment_problems(layout.config, args.prefect_file)
    if problems:
        raise UsageError(
            f"the deployments in {args.prefect_file} do not match the sites of the configuration:\n  "
            + "\n  ".join(problems)
        )
    created = ensure_pools(list(layout.config.site_ids))
    print(f"work pools: {', '.join(created) or 'all present'}")
    proc = subprocess.run(
        [_prefect(), "--no-prompt", "deploy", "--all", "--prefect-file", args.prefect_file],
        cwd=REPO,
        env=prefect_env(args),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise UsageError(f"prefect deploy failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    # read back: `prefect deploy` has exited 0 with a deployment missing (a run of it then failed with a 404)
    absent = absent_deployments(layout.config)
    if absent:
        raise UsageError(
            f"prefect deploy exited 0 but the server lacks {len(absent)} deployment(s): {', '.join(absent)}; "
            f"run `renkei deploy` again.\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    print("deployments applied from", args.prefect_file, "and read back from the server")
    ensure_crash_detection()
    print(
        f"automation {CRASH_AUTOMATION!r}: a run silent for {CRASH_AFTER_S} s is marked Crashed "
        "(its site's slot is freed)"
    )
    return 0


def worker_command(site: str | None, limit: int = 4) -> list[str]:
    return [_prefect(), "worker", "start", "--pool", pool_name(site), "--type", "process", "--limit", str(limit)]


def _worker(args: argparse.Namespace) -> int:
    if not os.environ.get("PREFECT_API_URL"):
        raise UsageError(
            "set PREFECT_API_URL to the Prefect server's API (e.g. http://127.0.0.1:4200/api): "
            "the worker takes its runs from there"
        )
    layout = layout_of(args)
    if args.site:
        layout.config.site(args.site)
    env = prefect_env(args)
    # every poll writes to the server's database (the pool's and its queues' readiness): with one worker per
    # site on a SQLite server, 2 s polls held its write lock for a minute on a busy machine; a run starts
    # within WORKER_POLL_S of being created
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(WORKER_POLL_S))
    env.setdefault("PREFECT_WORKER_PREFETCH_SECONDS", "2")
    # heartbeats of the flow runs it starts (prefect.yaml sets it too): a dead run is found within CRASH_AFTER_S
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    cmd = worker_command(args.site, args.limit)
    print(f"worker of pool {pool_name(args.site)} (Ctrl-C stops it)", flush=True)
    os.execve(cmd[0], cmd, env)
    return 0
