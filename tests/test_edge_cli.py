"""`renkei edge status|echo|send-to-pacs` as an operator runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from renkei import peers
from renkei.edge.server import EdgeServer
from tests.helpers_edge import REPO, make_study, storescu, write_region

pytestmark = pytest.mark.usefixtures("dcmtk")


def _renkei(region_path: Path, data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "renkei.cli.main", *args, "--config", str(region_path), "--data-dir", str(data_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_status_echo_and_send_to_pacs(tmp_path: Path) -> None:
    region = write_region(tmp_path / "region", stable_age=60)
    data_dir = tmp_path / "data"
    missing = _renkei(region.path, data_dir, "edge", "status", "--site", "hub")
    assert missing.returncode == 0 and "no journal yet" in missing.stdout
    pacs = peers.start_storescp(tmp_path / "pacs", ae_title="ORTHANC", port=region.pacs_port)
    try:
        with EdgeServer(region.config, "hub", region.store_dir):
            study_uid, files = make_study(tmp_path / "s", 4)
            storescu(region.edge_port, files)
            status = _renkei(region.path, data_dir, "edge", "status", "--site", "hub", "--json")
            assert status.returncode == 0, status.stderr
            summary = json.loads(status.stdout)
            counts = (summary["studies"], summary["instances"], summary["upload_states"]["pending"])
            assert counts == (1, 4, 4)
            assert summary["complete_pending_studies"] == []  # stable_age 60 s has not passed
            echo = _renkei(region.path, data_dir, "edge", "echo", "--site", "hub", "HUB_SVR")
            assert echo.returncode == 0 and "success" in echo.stdout, echo.stderr
            sent = _renkei(region.path, data_dir, "edge", "send-to-pacs", "--site", "hub", study_uid)
            assert sent.returncode == 0, sent.stderr
            assert "4 instance(s), 0 failed" in sent.stdout
            assert len(list(pacs.workdir.iterdir())) == 4
            unknown = _renkei(region.path, data_dir, "edge", "echo", "--site", "hub", "NOBODY")
            assert unknown.returncode != 0 and "NOBODY" in unknown.stderr
    finally:
        pacs.stop()
