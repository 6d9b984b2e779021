"""A tired operator's mistakes get one line saying what is wrong and what to do (issue 13, point 6).

Each command runs as a real process (`python -m renkei.cli.main`): the test
asserts the exit code, a short error on stderr that names the cause, and no
traceback. Read-only commands never create the data folder they were given.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_parts import EXAMPLE_CONFIG
from helpers_region import REPO, region_config

from renkei import peers


def _renkei(
    *argv: str, env: dict[str, str] | None = None, data_dir: Path | None = None, config: Path = EXAMPLE_CONFIG
) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.pop("PREFECT_API_URL", None)
    full.update(env or {})
    args = [sys.executable, "-m", "renkei.cli.main", *argv, "--config", str(config)]
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    return subprocess.run(args, cwd=REPO, env=full, capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    err = proc.stderr.strip()
    assert proc.returncode == code, (proc.returncode, proc.stdout[-500:], err[-2000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("renkei: error:")]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def region(tmp_path: Path, data_dir: Path) -> tuple[Path, Path]:
    config = region_config(tmp_path, pacs_at=("hub",))
    from helpers_catalog import make_batch
    from helpers_region import layout_of

    from renkei.catalog import Catalog

    with Catalog.from_layout(layout_of(config, data_dir)) as cat:  # a region with a catalog
        cat.register(make_batch(1, 2, site="clinic-a"))
    return config, data_dir


def test_unknown_site_is_refused_never_answered_with_none(region) -> None:
    config, data_dir = region
    proc = _renkei("catalog", "studies", "--site", "hospital", config=config, data_dir=data_dir)
    _one_line_error(proc, 2, "unknown site 'hospital'", "clinic-a")


def test_a_mistyped_data_folder_is_named_and_never_created(tmp_path: Path) -> None:
    missing = tmp_path / "renkei-dta"
    for argv in (("audit", "verify"), ("catalog", "totals"), ("catalog", "check"), ("audit", "show")):
        proc = _renkei(*argv, data_dir=missing)
        _one_line_error(proc, 2, "no catalog", "--data-dir")
        assert not missing.exists(), argv


def test_a_date_that_is_not_a_date(region) -> None:
    config, data_dir = region
    proc = _renkei("audit", "show", "--since", "yesterday", config=config, data_dir=data_dir)
    _one_line_error(proc, 2, "--since 'yesterday' is not a date")


def test_prefect_server_down_or_not_named(region) -> None:
    config, data_dir = region
    closed = f"http://127.0.0.1:{peers.free_port()}/api"
    proc = _renkei("deploy", config=config, data_dir=data_dir, env={"PREFECT_API_URL": closed})
    _one_line_error(proc, 1, "cannot reach", "renkei server")
    proc = _renkei(
        "fetch-priors",
        "--site",
        "hub",
        "--patient-id",
        "H1",
        config=config,
        data_dir=data_dir,
        env={"PREFECT_API_URL": closed},
    )
    _one_line_error(proc, 1, "cannot reach")
    proc = _renkei("worker", "--site", "hub", config=config, data_dir=data_dir)
    _one_line_error(proc, 2, "PREFECT_API_URL")
    proc = _renkei("deploy", config=config, data_dir=data_dir)
    _one_line_error(proc, 2, "PREFECT_API_URL")


def test_echo_to_a_closed_port_names_the_port_not_the_ae_title(region) -> None:
    config, data_dir = region
    proc = _renkei("edge", "echo", "--site", "hub", config=config, data_dir=data_dir)  # the hub's PACS: not running
    _one_line_error(proc, 1, "nothing answers at 127.0.0.1:", "is it running")
