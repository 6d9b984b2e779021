"""`renkei demo --once` end to end on free ports, small studies: it completes and its summary is the catalog's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers_parts import require_program
from helpers_region import REPO, region_config

from renkei import peers
from renkei.catalog.catalog import Catalog
from renkei.config import Layout, load_config

DEADLINE_S = 480  # pytest's timeout is 600 s
STOP_S = 90


def test_demo_once_completes_and_its_summary_matches_the_catalog(tmp_path) -> None:
    for program, package in (("storescu", "dcmtk"), ("Orthanc", "orthanc")):
        require_program(program, package)
    config_path = region_config(tmp_path, stable_age=1.0)
    data_dir = tmp_path / "demo-data"
    cmd = [
        sys.executable,
        "-m",
        "renkei.cli.main",
        "-v",  # an unexpected error with its traceback
        "demo",
        "--once",
        "--config",
        str(config_path),
        "--data-dir",
        str(data_dir),
        "--patients",
        "2",
        "--ct-slices",
        "10",
        "--size",
        "128",
        "--stable-age",
        "2",
        "--prefect-port",
        str(peers.free_port()),
        "--dashboard-port",
        str(peers.free_port()),
        "--hl7-port",
        str(peers.free_port()),
    ]
    # as after `source .venv/bin/activate`: pynetdicom's own storescu/findscu/movescu come first on PATH
    # and must not be taken for dcmtk's (they once sent nothing and exited 0)
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "storescu").exists(), "pynetdicom's storescu is not in the venv: this test checks nothing"
    env = {
        **os.environ,
        "VIRTUAL_ENV": str(venv_bin.parent),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    # its own deadline, under pytest's: past it the demo gets SIGTERM and stops its region (Prefect server,
    # workers, edges, Orthanc run in their own sessions: a killed demo would leave them to slow every later test)
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"the demo did not finish in {DEADLINE_S} s:\n{out[-4000:]}{err[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:] + err[-6000:]
    for text in (
        "remote reading",
        "priors for an admitted patient",
        "instant publish",
        "nightly verification",
        "Prefect UI:",
        "Dashboard:",
        "0 findings",
    ):
        assert text in out, text
    # its Prefect server ran on PostgreSQL (SQLite is only the fallback where PostgreSQL is not installed)
    assert "its database PostgreSQL on" in out, out[:2000]
    # the admitted patient's clinic studies reached the hub's PACS (counted after the real run ended)
    imported = re.search(r"fetch_priors put (\d+) instances into HUB_PACS", out)
    assert imported and int(imported.group(1)) > 0, out
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)), float(m.group(4)))
        for m in re.finditer(r"^(hub|clinic-[abc])\s+(\d+)\s+(\d+)\s+([\d.]+)\s+[\d.]+\s*$", out, re.M)
    }
    assert set(rows) == {"hub", "clinic-a", "clinic-b", "clinic-c"}, out
    layout = Layout(load_config(data_dir / "demo-region.yaml"), data_dir)
    with Catalog.from_layout(layout) as catalog:
        totals = {t.site: (t.studies, t.instances, round(t.bytes / 1e6, 1)) for t in catalog.totals()}
    assert rows == totals
