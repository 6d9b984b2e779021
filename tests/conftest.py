"""Fixtures yielding live peers: Orthanc, dcmtk's storescp, an S3 endpoint, a Prefect API.

Each picks free ports and its own folder, waits for its port, and is always
stopped. A part that cannot run here is skipped with a reason naming it, unless
RENKEI_REQUIRE_ALL=1 (CI), where that skip becomes a failure.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# pytest-xdist workers (gw0, gw1, ...) pick free ports in ranges of their own (renkei.peers.free_port)
_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and _worker[2:].isdigit():
    _n = int(_worker[2:]) % 4
    os.environ.setdefault("RENKEI_PORT_RANGE", f"{20000 + _n * 3000}-{20000 + _n * 3000 + 2999}")

from helpers_parts import EXAMPLE_CONFIG, REPO, require_part, require_program  # noqa: E402, F401

from renkei import peers, prefect_logging  # noqa: E402
from renkei.cli.prefect_cmd import server_settings  # noqa: E402

# the test server is set as `renkei server` sets its own (SQLite: a writer waits for the lock instead of
# failing after Prefect's default 10 s; a run waiting for a site's slot asks again every 10 s, not 30),
# and its logs are not rendered by rich
for _key, _value in {**server_settings(), **prefect_logging.ENV}.items():
    os.environ.setdefault(_key, _value)

# ------------------------------------------------------------------ test tiers
# `external`: the test uses a real part (a program, an S3 endpoint, a Prefect API, a browser). Set here
# from what the test uses: its fixtures, and the names its code (and its module's helpers and
# fixtures, two calls deep) refers to. `make test-fast` runs the rest (-m "not external"), and in that
# tier a real part asked for anyway fails the test: the classification is then wrong and is fixed here.
EXTERNAL_FIXTURES = frozenset({"dcmtk", "storescp", "orthanc", "s3_server", "s3_env", "s3_bucket", "prefect_api"})
EXTERNAL_NAMES = frozenset(
    {
        "require_program",
        "require_part",
        "run_dcmtk",
        "findscu_study_uids",
        "start_storescp",
        "start_orthanc",
        "start_moto",
        "start_postgres",
        "RegionRunner",
        "sync_playwright",
        "prefect_test_harness",
        "subprocess",
        "Popen",
        "run_deployment",
        "get_client",
        "dcmtk_env",
    }
)
FAST_TIER_ENV = "RENKEI_TEST_TIER"


def _names(fn: object, module: object, depth: int, seen: set[int]) -> set[str]:
    import inspect
    import types

    fn = inspect.unwrap(fn)  # type: ignore[arg-type]
    code = getattr(fn, "__code__", None)
    if code is None or id(code) in seen:
        return set()
    seen.add(id(code))
    names: set[str] = set()
    stack = [code]
    while stack:  # nested functions and comprehensions have code objects of their own
        c = stack.pop()
        names.update(c.co_names)
        names.update(c.co_varnames)
        names.update(k for k in c.co_consts if isinstance(k, str) and k.isidentifier())  # getfixturevalue("s3_bucket")
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    if depth > 0:
        for name in list(names):
            helper = getattr(module, name, None)
            if isinstance(helper, types.FunctionType):
                names |= _names(helper, module, depth - 1, seen)
    return names


def _external(item: pytest.Item) -> bool:
    fixtures = set(getattr(item, "fixturenames", ()))
    if fixtures & EXTERNAL_FIXTURES:
        return True
    module = getattr(item, "module", None)
    fns = [getattr(item, "function", None)]
    infos = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for defs in infos.values():
        fns.extend(d.func for d in defs if getattr(d, "baseid", "").split("::")[0] == item.nodeid.split("::")[0])
    seen: set[int] = set()
    backend = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
    wanted = EXTERNAL_NAMES | (EXTERNAL_FIXTURES if backend != "local" else frozenset())
    return any(_names(fn, module, 2, seen) & wanted for fn in fns if fn is not None)


# The files that take longest (wall time: a whole region, a Prefect server, minutes of waiting) run
# first: under `--dist loadfile` each worker takes the next file in collection order, and one of these
# started last would run alone at the end (`make test` prints the slowest; bench/suite_cpu.py ranks CPU).
LONGEST_FIRST = (
    "test_demo.py",
    "test_schedules.py",
    "test_run_crash.py",
    "test_access_matrix.py",
    "test_region_e2e.py",
    "test_catalog_concurrency.py",
    "test_prefect_auth.py",
    "test_sync_faults.py",
    "test_region_restore.py",
    "test_needs_action.py",
    "test_edge_region.py",
    "test_dashboard_security.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _external(item):
            item.add_marker(pytest.mark.external)
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def _fast_tier_uses_no_real_part(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In `make test-fast`, a real program asked for means the test is external after all: say so."""
    if os.environ.get(FAST_TIER_ENV) != "fast":
        return

    def refuse(name: str, package: str) -> str:
        pytest.fail(
            f"{request.node.nodeid} runs {name} ({package}) in the fast tier: it is external; "
            "teach tests/conftest.py (EXTERNAL_NAMES or EXTERNAL_FIXTURES) how to see it"
        )

    monkeypatch.setattr(peers, "require_program", refuse)


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


# ------------------------------------------------------------------ CPU per test (the suite's time limit)
# RENKEI_CPU_REPORT=<folder>: each pytest process appends, per test, the CPU seconds it and its reaped
# child processes used (setup and teardown included: a module fixture counts with its first test) and
# the wall time. The suite is bound by CPU on 2 cores; `bench/suite_cpu.py <folder>` ranks the files.
CPU_REPORT_ENV = "RENKEI_CPU_REPORT"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    folder = os.environ.get(CPU_REPORT_ENV)
    if not folder:
        yield
        return
    import resource
    import time

    def cpu() -> tuple[float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    self0, kids0, wall0 = *cpu(), time.monotonic()
    yield
    self1, kids1 = cpu()
    line = f"{item.nodeid}\t{self1 - self0:.2f}\t{kids1 - kids0:.2f}\t{time.monotonic() - wall0:.2f}\n"
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"cpu-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.tsv", "a") as out:
        out.write(line)
