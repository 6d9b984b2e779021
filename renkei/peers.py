"""Real DICOM and storage peers as background processes: Orthanc, dcmtk's storescp, an S3 server.

Used by the tests, the benchmarks and the demo. Each starter writes its own
config, binds to loopback where the program allows it, waits until the port
answers (never a fixed sleep), and returns a handle whose `stop()` always ends
the process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from renkei.errors import PeerError

LOOPBACK = "127.0.0.1"


def _port_range() -> tuple[int, int]:
    """Where free_port looks: $RENKEI_PORT_RANGE ("low-high"), else 20000-32767.

    Below Linux's ephemeral range (32768-60999 by default), so that the
    outgoing connections of other processes never take a port between the
    moment it is chosen and the moment a peer binds it; test workers running
    in parallel each get their own share (tests/conftest.py).
    """
    text = os.environ.get("RENKEI_PORT_RANGE", "")
    try:
        low, high = (int(x) for x in text.split("-"))
        if 1024 <= low < high <= 65535:
            return low, high
    except ValueError:
        pass
    return 20000, 32767


_RANDOM = __import__("random").SystemRandom()
_GIVEN: list[int] = []  # handed out recently by this process (maybe not bound yet): never twice in a row


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now (nor was handed out lately here)."""
    low, high = _port_range()
    for _ in range(200):
        port = _RANDOM.randint(low, high)  # never the global random: synthetic data seeds it
        if port in _GIVEN:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _GIVEN.append(port)
        del _GIVEN[: -((high - low) // 2)]
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def avoid(ports: Iterable[int]) -> None:
    """Ports another process has chosen and will bind later (a region's configuration): free_port never
    hands them out here (they look free until then; a PACS once failed to bind its port because this
    process had given it to another PACS's HTTP server in the meantime)."""
    _GIVEN.extend(p for p in ports if p not in _GIVEN)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for_port(
    host: str, port: int, timeout: float = 30.0, process: subprocess.Popen | None = None, what: str = ""
) -> None:
    """Block until something accepts TCP connections on host:port, or raise PeerError."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise PeerError(f"{what or 'process'} exited with code {process.returncode} before port {port} opened")
        if port_open(host, port):
            return
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)
    raise PeerError(f"{what or 'server'} did not open {host}:{port} within {timeout:.0f} s")


def dcmtk_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for dcmtk and Orthanc: TCP_NODELAY on (else ~40 ms stall per C-STORE)."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


# How each package's programs say who they are (`<program> --version`). pynetdicom installs console
# scripts named storescu, findscu, movescu, getscu and echoscu into a venv's bin/: with the venv
# activated they come first on PATH, take other options and exit 0 having sent nothing.
_IDENTITY = {"dcmtk": ("$dcmtk:",), "orthanc": ("Orthanc",), "dicom3tools": ("",), "chromium": ("Chromium",)}
_FOUND: dict[tuple[str, str], str] = {}


def _identifies(path: str, package: str) -> bool:
    marks = _IDENTITY.get(package)
    if not marks or marks == ("",):
        return True
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    text = (proc.stdout + proc.stderr).decode(errors="replace").strip()
    first = text.splitlines()[0] if text else ""
    head = os.path.basename(first.split(" ")[0]) if first else ""  # Orthanc prints its own path first
    return any(first.startswith(m) or head == m for m in marks)


def require_program(name: str, package: str) -> str:
    """The full path of `name` from Debian's `package`, checked by its --version, whatever PATH offers first.

    $RENKEI_<PACKAGE>_BIN (e.g. RENKEI_DCMTK_BIN=/opt/dcmtk/bin) names the folder to use instead.
    """
    key = (name, package)
    if key in _FOUND:
        return _FOUND[key]
    override = os.environ.get(f"RENKEI_{package.upper()}_BIN")
    folders = [override] if override else os.environ.get("PATH", os.defpath).split(os.pathsep)
    wrong = []
    for folder in folders:
        candidate = shutil.which(name, path=folder) if folder else None
        if not candidate:
            continue
        if _identifies(candidate, package):
            _FOUND[key] = candidate
            return candidate
        wrong.append(candidate)
    if wrong:
        raise PeerError(
            f"{name} found at {', '.join(wrong)} is not {package}'s (its --version says otherwise; "
            f"a Python venv's bin/ holds pynetdicom's programs of the same names): install Debian's "
            f"package (apt-get install -y {package}) or set RENKEI_{package.upper()}_BIN"
        )
    raise PeerError(f"{name} is not installed; install Debian's package: apt-get install -y {package}")


@dataclass
class Peer:
    """A running background process listening on `port`."""

    name: str
    process: subprocess.Popen
    host: str
    port: int
    workdir: Path
    log_path: Path | None = None

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        try:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout)

    def log(self) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return ""

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _spawn(
    cmd: Sequence[str], workdir: Path, log_name: str, env: Mapping[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / log_name
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(
            list(cmd),
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    finally:
        log.close()
    return proc, log_path


# --------------------------------------------------------------------- storescp
def start_storescp(
    outdir: Path,
    ae_title: str = "STORESCP",
    port: int | None = None,
    extra_args: Sequence[str] = (),
) -> Peer:
    """dcmtk's storescp writing every received instance to `outdir`, any transfer syntax."""
    exe = require_program("storescp", "dcmtk")
    port = port or free_port()
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "--aetitle",
        ae_title,
        "--output-directory",
        str(outdir),
        "+xa",
        "--filename-extension",
        ".dcm",
        "--max-pdu",
        "131072",
        *extra_args,
        str(port),
    ]
    proc, log = _spawn(cmd, outdir.parent / f"storescp-{port}", "storescp.log", dcmtk_env())
    peer = Peer("storescp", proc, LOOPBACK, port, outdir, log)
    try:
        wait_for_port(LOOPBACK, port, 15, proc, "storescp")
    except PeerError:
        peer.stop()
        raise
    return peer


# --------------------------------------------------------------------- Orthanc
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


@dataclass
class OrthancPeer(Peer):
    http_port: int = 0
    ae_title: str = "ORTHANC"
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def rest(self, method: str, path: str, body: object | None = None, timeout: float = 120) -> object:
        """Call Orthanc's REST API; JSON in and out."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def instances(self) -> list[str]:
        found = self.rest("GET", "/instances")
        return [str(i) for i in found] if isinstance(found, list) else []


def start_orthanc(
    workdir: Path,
    ae_title: str = "ORTHANC",
    dicom_port: int | None = None,
    http_port: int | None = None,
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    dicomweb: Mapping[str, Mapping[str, Any]] | None = None,
) -> OrthancPeer:
    """Orthanc as a site PACS, with its own storage folder, HTTP on loopback only.

    `modalities` maps a name to (AE title, host, port): the peers Orthanc may
    store to and accept queries and retrievals from. With `dicomweb` (a mapping,
    possibly empty, of server name -> {"Url": ..., "HttpHeaders": {...}}), Orthanc's
    DICOMweb plugin (Debian's orthanc-dicomweb) serves /dicom-web/ and knows those
    DICOMweb servers as a client.
    """
    exe = require_program("Orthanc", "orthanc")
    plugins: list[str] = []
    if dicomweb is not None:
        plugin = Path(os.environ.get("RENKEI_ORTHANC_DICOMWEB", DICOMWEB_PLUGIN))
        if not plugin.exists():
            raise PeerError(
                f"Orthanc's DICOMweb plugin is not at {plugin}; install Debian's package: "
                "apt-get install -y orthanc-dicomweb"
            )
        plugins.append(str(plugin))
    dicom_port = dicom_port or free_port()
    http_port = http_port or free_port()
    workdir = Path(workdir)
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    mods = dict(modalities or {})
    config = {
        "Name": ae_title,
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "StorageCompression": False,
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "UnknownSopClassAccepted": True,
        "DicomModalities": {
            name: {
                "AET": ae,
                "Host": host,
                "Port": port,
                "AllowEcho": True,
                "AllowFind": True,
                "AllowMove": True,
                "AllowGet": True,
                "AllowStore": True,
            }
            for name, (ae, host, port) in mods.items()
        },
        "DicomScuTimeout": 30,
        "StableAge": 2,
        "Plugins": plugins,
        **(
            {"DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {k: dict(v) for k, v in dicomweb.items()}}}
            if dicomweb is not None
            else {}
        ),
        "HttpVerbose": False,
        "ConcurrentJobs": 2,
        "SaveJobs": False,
        "OverwriteInstances": True,
    }
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(config, indent=2))
    proc, log = _spawn([exe, str(cfg_path)], workdir, "orthanc.log", dcmtk_env())
    peer = OrthancPeer(
        "orthanc", proc, LOOPBACK, dicom_port, workdir, log, http_port=http_port, ae_title=ae_title, modalities=mods
    )
    try:
        wait_for_port(LOOPBACK, http_port, 60, proc, "Orthanc HTTP")
        wait_for_port(LOOPBACK, dicom_port, 30, proc, "Orthanc DICOM")
    except PeerError as exc:
        peer.stop()
        raise PeerError(f"{exc}\n{peer.log()[-2000:]}") from None
    return peer


# --------------------------------------------------------------------- S3 (moto)
@dataclass
class S3Peer(Peer):
    access_key: str = "renkei-test"
    secret_key: str = "renkei-test-secret"

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point s3fs/boto at this endpoint."""
        return {
            "RENKEI_S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def filesystem(self):  # -> s3fs.S3FileSystem
        # lazy: s3fs (botocore) takes ~0.35 s to import; every test session imports this module, few use S3
        import s3fs

        return s3fs.S3FileSystem(
            key=self.access_key,
            secret=self.secret_key,
            client_kwargs={"endpoint_url": self.endpoint_url},
            skip_instance_cache=True,
        )


# moto's server as `python -m moto.server` starts it, but with one write request at a time. S3 creates an
# object under If-None-Match: * atomically (the catalog's commit log relies on it); moto checks that the
# key is absent, then stores, in each request's own thread, so two writers creating one log entry at
# the same moment could both be told yes (the catalog then reports a fork in its log: two entries 31).
_MOTO_SERVER = """
import os, signal, sys, threading
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

host, port = sys.argv[1], int(sys.argv[2])
os.environ.setdefault("MOTO_PORT", str(port))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
app = DomainDispatcherApplication(create_backend_app)
app.debug = True
writes = threading.Lock()

def one_write_at_a_time(environ, start_response):
    if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE"):
        with writes:
            return list(app(environ, start_response))
    return app(environ, start_response)

run_simple(host, port, one_write_at_a_time, threaded=True, request_handler=MotoRequestHandler)
"""


def start_moto(workdir: Path, port: int | None = None) -> S3Peer:
    """moto's S3 server over HTTP on loopback (objects kept in memory; writes atomic, as S3's)."""
    port = port or free_port()
    cmd = [sys.executable, "-c", _MOTO_SERVER, LOOPBACK, str(port)]
    env = dict(os.environ)
    env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, log = _spawn(cmd, Path(workdir), f"moto-{port}.log", env)
    peer = S3Peer("moto", proc, LOOPBACK, port, Path(workdir), log)
    try:
        wait_for_port(LOOPBACK, port, 30, proc, "moto S3 server")
    except PeerError:
        peer.stop()
        raise
    return peer


# --------------------------------------------------------------------- dcmtk clients
def run_dcmtk(args: Sequence[str], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a dcmtk command line (storescu, findscu, movescu...) with TCP_NODELAY set."""
    exe = require_program(args[0], "dcmtk") if os.sep not in args[0] else args[0]
    proc = subprocess.run([exe, *list(args)[1:]], capture_output=True, timeout=timeout, env=dcmtk_env())
    if check and proc.returncode != 0:
        raise PeerError(
            f"{' '.join(args[:3])}... exited {proc.returncode}: {proc.stderr.decode(errors='replace')[-2000:]}"
        )
    return proc


def findscu_study_uids(host: str, port: int, calling_ae: str, called_ae: str, **keys: str) -> list[str]:
    """Study Instance UIDs a workstation finds at a node, asked with dcmtk's findscu (Study Root)."""
    args = [
        "findscu",
        "-S",
        "-aet",
        calling_ae,
        "-aec",
        called_ae,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
    ]
    for keyword, value in keys.items():
        args += ["-k", f"{keyword}={value}"]
    out = run_dcmtk([*args, host, str(port)], check=False)
    text = out.stderr.decode(errors="replace") + out.stdout.decode(errors="replace")
    # UIDs of odd length come back padded with a NUL
    return [
        line.split("[")[1].split("]")[0].strip("\x00 ")
        for line in text.splitlines()
        if "(0020,000d)" in line and "[" in line
    ]


@dataclass
class PostgresPeer(Peer):
    """A throwaway PostgreSQL cluster on loopback (Debian's package), owned by the `postgres` user."""

    database: str = "prefect"
    bindir: Path = Path("/usr/lib/postgresql")

    @property
    def url(self) -> str:
        """SQLAlchemy URL for Prefect (asyncpg); the cluster trusts loopback connections."""
        return f"postgresql+asyncpg://postgres@{LOOPBACK}:{self.port}/{self.database}"

    def stop(self, timeout: float = 30.0) -> None:
        subprocess.run(
            [
                "runuser",
                "-u",
                "postgres",
                "--",
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.workdir / "data"),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
            capture_output=True,
            timeout=timeout,
        )
        super().stop(timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


def postgres_bin() -> Path:
    """The folder of Debian's PostgreSQL server programs ($RENKEI_POSTGRESQL_BIN, else the newest installed)."""
    override = os.environ.get("RENKEI_POSTGRESQL_BIN")
    folders = (
        [Path(override)]
        if override
        else sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
            reverse=True,
        )
    )
    for folder in folders:
        if (folder / "initdb").is_file() and (folder / "postgres").is_file():
            return folder
    raise PeerError("PostgreSQL's server is not installed; install Debian's package: apt-get install -y postgresql")


def start_postgres(port: int | None = None, database: str = "prefect") -> PostgresPeer:
    """initdb + postgres as the `postgres` user in a fresh folder under /tmp, listening on loopback only."""
    bindir = postgres_bin()
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="renkei-pg-"))
    os.chmod(workdir, 0o755)
    shutil.chown(workdir, "postgres", "postgres")
    data = workdir / "data"

    def as_postgres(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd], capture_output=True, text=True, timeout=120, cwd=workdir
        )

    init = as_postgres(
        str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"
    )
    if init.returncode != 0:
        raise PeerError(f"initdb failed: {init.stderr[-1000:]}")
    log = workdir / "postgres.log"
    out = open(log, "wb")
    process = subprocess.Popen(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-h",
            LOOPBACK,
            "-k",
            str(workdir),
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        start_new_session=True,
    )
    peer = PostgresPeer("postgres", process, LOOPBACK, port, workdir, log, database, bindir)
    try:
        wait_for_port(LOOPBACK, port, 60, process, "PostgreSQL")
        deadline = time.monotonic() + 30
        while True:
            made = as_postgres(str(bindir / "createdb"), "-h", LOOPBACK, "-p", str(port), "-U", "postgres", database)
            if made.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise PeerError(f"createdb failed: {made.stderr[-1000:]}")
            time.sleep(0.5)
    except BaseException:
        peer.stop()
        raise
    return peer
