"""`renkei demo --once` end to end on free ports, small studies: it completes and its summary is the catalog's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers_parts import require_program
from helpers_region import REPO, region_config

from catalog.catalog import Catalog
from renkei import peers
from renkei.config import Layout, load_config


def test_demo_once_completes_and_its_summary_matches_the_catalog(tmp_path) -> None:
    for program, package in (("storescu", "dcmtk"), ("Orthanc", "orthanc")):
        require_program(program, package)
    config_path = region_config(tmp_path, stable_age=1.0)
    data_dir = tmp_path / "demo-data"
    cmd = [
        sys.executable,
        "-m",
        "renkei.cli.main",
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
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
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
    rows = {
        m.group(1): (int(m.group(2)), int(m.group(3)), float(m.group(4)))
        for m in re.finditer(r"^(hub|clinic-[abc])\s+(\d+)\s+(\d+)\s+([\d.]+)\s+[\d.]+\s*$", out, re.M)
    }
    assert set(rows) == {"hub", "clinic-a", "clinic-b", "clinic-c"}, out
    layout = Layout(load_config(data_dir / "demo-region.yaml"), data_dir)
    with Catalog.from_layout(layout) as catalog:
        totals = {t.site: (t.studies, t.instances, round(t.bytes / 1e6, 1)) for t in catalog.totals()}
    assert rows == totals
