"""Backup and restore of the Prefect server's database (`renkei server-db backup|restore`).

What Prefect holds that nothing else does: the deployments and their
schedules, the work pools, the automations (crash detection), the run
history with its artifacts. The catalog has its own backup (`renkei catalog
backup`); together they bring a region back.

- **SQLite** (`renkei server`, its database in `<data>/prefect/prefect.db`):
  SQLite's online backup, consistent while the server runs, then checked
  (`PRAGMA integrity_check`) and counted. Restore needs the server stopped
  (it refuses while a process holds the database open), copies the backup
  into place through a temporary file, and removes the old WAL files.
- **PostgreSQL** (`PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://...`):
  `pg_dump --format=custom` and `pg_restore --clean --if-exists`, PostgreSQL's
  own tools, which must be installed where this runs.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from renkei.config import Layout
from renkei.errors import UsageError

URL_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"
COUNTED = ("deployment", "work_pool", "flow_run", "automation", "artifact")


@dataclass(frozen=True)
class Database:
    kind: str  # sqlite | postgresql
    where: str  # a file path, or a libpq URL (password included: never print it)

    def shown(self) -> str:
        if self.kind == "sqlite":
            return self.where
        parts = urlsplit(self.where)
        host = parts.hostname or ""
        return f"postgresql://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


def database(layout: Layout) -> Database:
    """The server's database: PREFECT_API_DATABASE_CONNECTION_URL, else `renkei server`'s SQLite file."""
    url = os.environ.get(URL_ENV, "")
    if url.startswith("postgresql"):
        parts = urlsplit(url)
        return Database("postgresql", urlunsplit(("postgresql", *parts[1:])))
    if url.startswith("sqlite"):
        return Database("sqlite", url.split(":///", 1)[-1])
    if url:
        raise UsageError(f"{URL_ENV}: only sqlite and postgresql databases are supported")
    return Database("sqlite", str(layout.data_dir / "prefect" / "prefect.db"))


def counts(path: str | Path) -> dict[str, int]:
    """Rows of the tables an operator would miss, from a SQLite database (backup or live)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in COUNTED if t in tables}


def backup(layout: Layout, to: Path) -> dict[str, int]:
    """Write a consistent copy of the server's database to `to`; returns what it holds."""
    db = database(layout)
    to.parent.mkdir(parents=True, exist_ok=True)
    if db.kind == "postgresql":
        _run(["pg_dump", "--format=custom", "--no-owner", f"--file={to}", db.where], "pg_dump")
        return {}
    if not Path(db.where).is_file():
        raise UsageError(f"there is no Prefect database at {db.where}: check --data-dir (or {URL_ENV})")
    tmp = to.with_name(f".{to.name}.tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(f"file:{db.where}?mode=ro", uri=True) as src, sqlite3.connect(tmp) as dst:
        src.backup(dst)
    with sqlite3.connect(tmp) as check:
        result = check.execute("PRAGMA integrity_check").fetchone()[0]
    if result != "ok":
        tmp.unlink(missing_ok=True)
        raise UsageError(
            f"the copy of {db.where} failed SQLite's integrity check ({result}); the database itself may be damaged"
        )
    os.replace(tmp, to)
    return counts(to)


def restore(layout: Layout, source: Path) -> dict[str, int]:
    """Put a backup in place of the server's database (the server must be stopped)."""
    db = database(layout)
    if not source.is_file():
        raise UsageError(f"there is no backup at {source}")
    if db.kind == "postgresql":
        _run(["pg_restore", "--clean", "--if-exists", "--no-owner", f"--dbname={db.where}", str(source)], "pg_restore")
        return {}
    try:
        with sqlite3.connect(f"file:{source}?mode=ro", uri=True) as check:
            result = check.execute("PRAGMA integrity_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise UsageError(f"{source} is not a Prefect database backup ({exc})") from None
    if result != "ok":
        raise UsageError(f"{source} failed SQLite's integrity check ({result}): use an older backup")
    target = Path(db.where)
    holders = _holders(target)
    if holders:
        raise UsageError(
            f"the Prefect server is still running (process {', '.join(map(str, holders))} has "
            f"{target} open): stop it, then restore"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.restore")
    shutil.copyfile(source, tmp)
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    os.replace(tmp, target)
    return counts(target)


def _holders(path: Path) -> list[int]:
    """Processes that have `path` (or its WAL) open, from /proc (Linux)."""
    names = {str(path.resolve()) + s for s in ("", "-wal", "-shm")} if path.exists() else set()
    found = []
    for proc in Path("/proc").iterdir() if names else []:
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in names:
                    found.append(int(proc.name))
                    break
        except OSError:
            continue
    return found


def _run(cmd: list[str], tool: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise UsageError(f"{tool} is not installed here: apt-get install -y postgresql-client")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsageError(f"{tool} failed: {proc.stderr.strip()[-500:]}")
