"""Fixtures yielding live peers: Orthanc, dcmtk's storescp, an S3 endpoint, a Prefect API.

Each picks free ports and its own folder, waits for its port, and is always
stopped. A part that cannot run here is skipped with a reason naming it, unless
RENKEI_REQUIRE_ALL=1 (CI), where that skip becomes a failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# pytest-xdist workers (gw0, gw1, ...) pick free ports in ranges of their own (renkei.peers.free_port)
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    _n = int(_worker[2:]) % 4
    os.environ.setdefault("RENKEI_PORT_RANGE", f"{20000 + _n * 3000}-{20000 + _n * 3000 + 2999}")

from renkei import peers  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "examples" / "nagasaki.yaml"


def require_part(available: bool, part: str, how: str) -> None:
    """Skip (or, with RENKEI_REQUIRE_ALL=1, fail) when a real part is missing."""
    if available:
        return
    reason = f"{part} is not available here: {how}"
    if os.environ.get("RENKEI_REQUIRE_ALL") == "1":
        pytest.fail(f"RENKEI_REQUIRE_ALL=1 and {reason}")
    pytest.skip(reason)


def require_program(name: str, package: str) -> str:
    path = shutil.which(name)
    require_part(path is not None, f"{name} ({package})", f"apt-get install -y {package}")
    return path  # type: ignore[return-value]


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data folder for one test."""
    path = tmp_path / "renkei-data"
    path.mkdir()
    return path


@pytest.fixture
def dcmtk() -> None:
    """dcmtk's command-line tools are installed."""
    for name in ("storescu", "storescp", "findscu", "movescu", "getscu", "echoscu", "dcmdump"):
        require_program(name, "dcmtk")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[peers.Peer]:
    require_program("storescp", "dcmtk")
    peer = peers.start_storescp(tmp_path / "storescp-out", ae_title="STORESCP")
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[peers.OrthancPeer]:
    require_program("Orthanc", "orthanc")
    peer = peers.start_orthanc(tmp_path / "orthanc", ae_title="ORTHANC")
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.S3Peer]:
    """moto's S3 server on loopback for the whole session; tests use their own buckets."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        require_part(False, "moto[server]", "pip install 'moto[server]'")
    peer = peers.start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture
def s3_env(s3_server: peers.S3Peer, monkeypatch: pytest.MonkeyPatch) -> peers.S3Peer:
    """The S3 endpoint's address and keys in this test's environment."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: peers.S3Peer, request: pytest.FixtureRequest) -> str:
    """A new empty bucket on the S3 endpoint; returns its s3:// URL with a prefix."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:30].strip("-")
    bucket = f"t-{name}-{uuid.uuid4().hex[:8]}"
    s3_env.filesystem().mkdir(bucket)
    return f"s3://{bucket}/renkei"


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect API (prefect_test_harness) for the session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)
