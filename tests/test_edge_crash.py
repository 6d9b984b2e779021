"""`kill -9` of a real `renkei edge serve` in the middle of a 300-instance send.

Every instance the sender saw succeed must be on disk, intact and journaled
after a restart, and sending the whole study again completes with no duplicate.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from renkei import peers
from renkei.edge.journal import Journal
from tests.conftest import require_program
from tests.helpers_edge import dataset_bytes, edge_subprocess, make_study, meta_of, storescu, write_region


def _wait_port(proc: subprocess.Popen, port: int, log: Path) -> None:
    try:
        peers.wait_for_port("127.0.0.1", port, 30, proc, "renkei edge serve")
    except Exception:
        raise AssertionError(log.read_text(errors="replace")[-3000:]) from None


def test_kill_9_mid_send_loses_nothing_acknowledged(tmp_path: Path) -> None:
    require_program("storescu", "dcmtk")
    region = write_region(tmp_path / "region")
    data_dir = tmp_path / "data"
    log = tmp_path / "edge.log"
    study_uid, files = make_study(tmp_path / "study", 300, size=96, series=3)

    edge = edge_subprocess(region, data_dir, log)
    try:
        _wait_port(edge, region.edge_port, log)
        sender_log = tmp_path / "storescu.log"
        with open(sender_log, "wb") as out:
            sender = subprocess.Popen(
                [
                    peers.require_program("storescu", "dcmtk"),  # dcmtk's, not a venv's pynetdicom one
                    "-v",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "HUB_SVR",
                    "127.0.0.1",
                    str(region.edge_port),
                    *map(str, files),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=peers.dcmtk_env(),
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if sender_log.read_bytes().count(b"Received Store Response (Success)") >= 100:
                break
            if sender.poll() is not None:
                break
            time.sleep(0.005)
        os.kill(edge.pid, signal.SIGKILL)
        edge.wait(10)
        sender.wait(60)
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait(10)

    # which files did the sender see succeed?
    acknowledged: list[Path] = []
    current: Path | None = None
    for line in sender_log.read_text(errors="replace").splitlines():
        sending = re.match(r"I: Sending file: (.+)$", line)
        if sending:
            current = Path(sending.group(1).strip())
        elif "Received Store Response (Success)" in line and current is not None:
            acknowledged.append(current)
            current = None
    assert 100 <= len(acknowledged) < 300, f"killed too late or too early: {len(acknowledged)} acknowledged"

    edge = edge_subprocess(region, data_dir, log)
    try:
        _wait_port(edge, region.edge_port, log)
        with Journal.open(region.store_dir, readonly=True) as journal:
            for path in acknowledged:
                entry = journal.entry(meta_of(path)["MediaStorageSOPInstanceUID"])
                assert entry is not None, f"{path.name} was acknowledged but is not journaled"
                assert dataset_bytes(entry.path) == dataset_bytes(path), f"{path.name} is not intact"
        storescu(region.edge_port, files)  # the whole study again
        with Journal.open(region.store_dir, readonly=True) as journal:
            assert journal.summary().instances == 300
            assert journal.conflicts() == []
            entries = journal.instances(study_uid)
            assert len(entries) == 300
            for entry, path in zip(sorted(entries, key=lambda e: e.instance.instance_number or 0), files):
                assert dataset_bytes(entry.path) == dataset_bytes(path)
        on_disk = list((region.store_dir / "instances").rglob("*.dcm"))
        assert len(on_disk) == 300
        assert not list((region.store_dir / "tmp").iterdir())
        edge.send_signal(signal.SIGTERM)
        assert edge.wait(30) == 0
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait(10)
    text = log.read_text(errors="replace")
    assert "unclean stop" in text and "stopped" in text


def test_sigterm_lets_the_association_in_progress_finish(tmp_path: Path) -> None:
    require_program("storescu", "dcmtk")
    region = write_region(tmp_path / "region")
    log = tmp_path / "edge.log"
    _study_uid, files = make_study(tmp_path / "study", 200, size=96)
    edge = edge_subprocess(region, tmp_path / "data", log)
    try:
        _wait_port(edge, region.edge_port, log)
        sender_log = tmp_path / "storescu.log"
        with open(sender_log, "wb") as out:
            sender = subprocess.Popen(
                [
                    peers.require_program("storescu", "dcmtk"),  # dcmtk's, not a venv's pynetdicom one
                    "-v",
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "HUB_SVR",
                    "127.0.0.1",
                    str(region.edge_port),
                    *map(str, files),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=peers.dcmtk_env(),
            )
        deadline = time.monotonic() + 60
        while sender_log.read_bytes().count(b"Received Store Response (Success)") < 20:
            assert time.monotonic() < deadline and sender.poll() is None
            time.sleep(0.005)
        edge.send_signal(signal.SIGTERM)
        assert sender.wait(60) == 0, sender_log.read_text(errors="replace")[-2000:]
        assert sender_log.read_bytes().count(b"Received Store Response (Success)") == 200
        assert edge.wait(60) == 0
    finally:
        if edge.poll() is None:
            edge.kill()
            edge.wait(10)
    with Journal.open(region.store_dir, readonly=True) as journal:
        assert journal.summary().instances == 200
        assert journal.get_meta("clean_shutdown") == "1"
    text = log.read_text(errors="replace")
    assert "SIGTERM" in text and "stopped" in text
