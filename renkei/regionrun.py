"""A whole region on one machine, as background processes: edges, Prefect workers, site PACS.

Used by `renkei demo` and by the end-to-end tests. Each process is a real
`renkei ...` command (or Orthanc) with its log under `<data>/logs/`; `stop()`
ends them all (SIGINT for Prefect workers, which ignore SIGTERM for a while).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import get_client
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL, temporary_settings

from renkei import peers
from renkei.config import Layout, RegionConfig
from renkei.errors import PeerError, RenkeiError

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Proc:
    name: str
    process: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM
    cmd: tuple[str, ...] = ()
    extra_env: dict[str, str] | None = None
    restarts: int = 0

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


@dataclass
class RegionRunner:
    """Starts and stops the processes of a region described by `config_path`, state in `data_dir`."""

    config_path: Path
    layout: Layout
    api_url: str
    procs: list[Proc] = field(default_factory=list)
    pacs: dict[str, peers.OrthancPeer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the ports the configuration names are bound later, by the processes this starts: the ones it
        # picks itself (a PACS's HTTP port, PostgreSQL) must not be among them
        peers.avoid(config_ports(self.layout.config))

    @property
    def logs(self) -> Path:
        path = self.layout.logs_dir
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_API_URL": self.api_url,
                "RENKEI_CONFIG": str(self.config_path),
                "RENKEI_DATA_DIR": str(self.layout.data_dir),
                "RENKEI_HOME": str(REPO),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_WORKER_PREFETCH_SECONDS": "1",
                "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "INFO"),
                "TCP_NODELAY": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if extra:
            env.update(extra)
        return env

    def renkei(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "renkei.cli.main",
            "--config",
            str(self.config_path),
            "--data-dir",
            str(self.layout.data_dir),
            *args,
        ]

    def spawn(
        self, name: str, cmd: Sequence[str], stop_signal: int = signal.SIGTERM, extra_env: dict[str, str] | None = None
    ) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                list(cmd),
                cwd=REPO,
                env=self.env(extra_env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = Proc(name, process, log, stop_signal, tuple(cmd), extra_env)
        self.procs.append(proc)
        return proc

    MAX_RESTARTS = 3

    def supervise(self, say: Callable[[str], None]) -> list[str]:
        """One look at every part: one that exited is said by name and started again (as systemd's
        Restart=on-failure would), up to MAX_RESTARTS times; the rest of the region keeps running.
        Returns the names of the parts that stopped."""
        stopped = []
        for proc in list(self.procs):
            if proc.alive():
                continue
            stopped.append(proc.name)
            code = proc.process.returncode
            last = proc.tail(400).strip().splitlines()[-1:] or ["(no output)"]
            if proc.restarts >= self.MAX_RESTARTS:
                say(
                    f"{proc.name} stopped again (exit code {code}) after {proc.restarts} restarts; left stopped, "
                    f"the rest of the region keeps running. Its log: {proc.log} (last line: {last[0][:200]})"
                )
                self.procs.remove(proc)
                continue
            say(
                f"{proc.name} stopped (exit code {code}; last line of {proc.log.name}: {last[0][:200]}); "
                "the rest of the region keeps running; starting it again"
            )
            self.procs.remove(proc)
            again = self.spawn(proc.name, proc.cmd, proc.stop_signal, proc.extra_env)
            again.restarts = proc.restarts + 1
        for site_id, orthanc in list(self.pacs.items()):
            if orthanc.process.poll() is not None:
                stopped.append(f"pacs-{site_id}")
                say(
                    f"the PACS of {site_id} (Orthanc) stopped (exit code {orthanc.process.returncode}); "
                    f"imports into it fail until it is back. Its log: {orthanc.log_path}"
                )
                del self.pacs[site_id]
        return stopped

    # -- the parts -----------------------------------------------------------
    def deploy(self, timeout: float = 300) -> None:
        """Work pools and deployments (prefect.yaml), as `renkei deploy` makes them."""
        proc = subprocess.run(
            self.renkei("deploy"), cwd=REPO, env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RenkeiError(f"renkei deploy failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")

    def start_workers(self, sites: Sequence[str] | None = None, center: bool = True) -> None:
        for site in sites if sites is not None else self.layout.config.site_ids:
            self.spawn(f"worker-{site}", self.renkei("worker", "--site", site), signal.SIGINT)
        if center:
            self.spawn("worker-center", self.renkei("worker", "--center"), signal.SIGINT)

    def start_pacs(self, sites: Sequence[str] | None = None) -> None:
        """Orthanc as the PACS of each site that has one (it knows the site's edge, for C-MOVE back)."""
        for site in self.layout.config.sites:
            if site.pacs is None or (sites is not None and site.id not in sites):
                continue
            self.pacs[site.id] = peers.start_orthanc(
                self.layout.data_dir / "pacs" / site.id,
                ae_title=site.pacs.ae_title,
                dicom_port=site.pacs.port,
                modalities={site.edge.ae_title: (site.edge.ae_title, site.edge.host, site.edge.port)},
            )

    def start_edges(self, sites: Sequence[str] | None = None) -> None:
        for site_id in sites if sites is not None else self.layout.config.site_ids:
            self.spawn(f"edge-{site_id}", self.renkei("edge", "serve", "--site", site_id, "--trigger", "on"))
        for site_id in sites if sites is not None else self.layout.config.site_ids:
            site = self.layout.config.site(site_id)
            proc = next(p for p in self.procs if p.name == f"edge-{site_id}")
            try:
                peers.wait_for_port(site.edge.host, site.edge.port, 60, proc.process, f"edge of {site_id}")
            except PeerError as exc:
                raise PeerError(f"{exc}\n{proc.tail()}") from None

    def check(self) -> None:
        """Raise when a process of the region died."""
        for proc in self.procs:
            if not proc.alive():
                raise RenkeiError(f"{proc.name} exited with code {proc.process.returncode}:\n{proc.tail()}")

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.5) -> float:
        """Poll `predicate` until true; returns the seconds it took, or raises naming `what`."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if predicate():
                return time.monotonic() - started
            self.check()
            time.sleep(every)
        raise RenkeiError(f"timed out after {timeout:.0f} s waiting for {what}; flow runs: {self.runs_summary()}")

    def runs_summary(self, limit: int = 30) -> str:
        """The latest flow runs as `name state (message)`, for a timeout's message: names and states only."""
        try:
            with temporary_settings(updates={PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
                runs = client.read_flow_runs(sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)
        except Exception as exc:  # the summary must not hide the timeout it explains
            return f"(not readable: {type(exc).__name__}: {exc})"
        return (
            "; ".join(
                f"{r.name} {r.state.name if r.state else '?'}"
                + (f" ({r.state.message[:120]})" if r.state and r.state.message else "")
                for r in runs
            )
            or "(none)"
        )

    def stop_one(self, name: str, timeout: float = 20) -> None:
        """Stop one part (an edge, a worker...) as an operator or a crash would; the others go on."""
        proc = next(p for p in self.procs if p.name == name)
        if proc.alive():
            try:
                os.killpg(proc.process.pid, proc.stop_signal)
                proc.process.wait(timeout)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.process.pid, signal.SIGKILL)
                proc.process.wait(5)
        self.procs.remove(proc)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                try:
                    os.killpg(proc.process.pid, proc.stop_signal)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.process.wait(5)
        for orthanc in self.pacs.values():
            orthanc.stop()
        self.procs.clear()
        self.pacs.clear()
        self._stop_leftovers()

    def _stop_leftovers(self, grace: float = 5) -> None:
        """Stop what outlived its parent: a flow run a worker started in a process group of its own.

        Found by this region's data folder in its environment (Linux's /proc): a demo's run left running
        after its server had stopped took a core from every later test.
        """
        mark = f"RENKEI_DATA_DIR={self.layout.data_dir}".encode()
        mine = {os.getpid(), os.getppid()}
        left = []
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                if int(entry.name) not in mine and mark in (entry / "environ").read_bytes().split(b"\0"):
                    left.append(int(entry.name))
            except (OSError, ValueError):
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in left:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + grace
            while left and time.monotonic() < deadline:
                left = [pid for pid in left if running(pid)]
                time.sleep(0.1)
            if not left:
                return


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its reaper (Linux's /proc)."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def config_ports(config: RegionConfig) -> set[int]:
    """Every TCP port a region's configuration names (edges, PACS, workstations, listeners)."""
    found: set[int] = set()

    def walk(value: Any, key: str = "") -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, key)
        elif key.endswith("port") and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.add(value)

    walk(config.model_dump())
    return found
