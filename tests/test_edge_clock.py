"""Completion by the edge's own quiet clock, never by comparing its timestamps with another machine's.

A real `renkei edge serve` runs with its wall clock an hour behind (or ahead of)
the machine the "worker" (this test) runs on: `RENKEI_EDGE_CLOCK_OFFSET`, which
only tests set, shifts the edge's wall clock (see edge.clock). A half-received
study is never reported ready, whatever the offset; a complete one is ready
`stable_age` after its last instance by the edge's reckoning; a stopped edge's
studies are judged as of its stop.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_wait import eventually

from renkei import peers, transfer
from renkei.edge import clock as edge_clock
from renkei.edge.journal import SCHEMA_VERSION, Journal
from renkei.edge.server import EdgeServer
from tests.conftest import require_program
from tests.helpers_edge import Region, edge_subprocess, make_study, storescu, write_region

STABLE_AGE = 2.0
HOUR = 3600.0


@pytest.fixture
def region(tmp_path: Path) -> Region:
    return write_region(tmp_path / "region", stable_age=STABLE_AGE)


def _start(region: Region, tmp_path: Path, offset: float, monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen:
    """The edge as a real process whose wall clock is `offset` seconds off this process's."""
    with monkeypatch.context() as env:
        env.setenv(edge_clock.CLOCK_OFFSET_ENV, repr(offset))
        proc = edge_subprocess(region, tmp_path / "data", tmp_path / "edge.log")
    try:
        peers.wait_for_port("127.0.0.1", region.edge_port, 60, proc, "renkei edge serve")
    except Exception:
        proc.kill()
        raise AssertionError((tmp_path / "edge.log").read_text(errors="replace")[-3000:]) from None
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def _ready(region: Region) -> list[str]:
    """What the sync's ingest step sees: the completed studies waiting to be synced."""
    with Journal.open(region.store_dir, readonly=True) as journal:
        return transfer.studies_to_sync(journal, STABLE_AGE)


@pytest.fixture
def cleanup() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("offset", [-HOUR, HOUR], ids=["edge-an-hour-behind", "edge-an-hour-ahead"])
def test_a_half_received_study_is_never_ready_whatever_the_edge_clock(
    region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cleanup: list, offset: float
) -> None:
    require_program("storescu", "dcmtk")
    study_uid, files = make_study(tmp_path / "s", 6)
    edge = _start(region, tmp_path, offset, monkeypatch)
    cleanup.append(edge)

    storescu(region.edge_port, files[:3])  # the first half; the modality pauses
    half_sent = time.monotonic()
    with Journal.open(region.store_dir, readonly=True) as journal:
        (row,) = journal.study_rows([study_uid])
        assert abs(row["_last_received"] - (time.time() + offset)) < 60  # stamped on the edge's clock
        heartbeat = journal.last_heartbeat()
        assert heartbeat is not None and abs(heartbeat - (time.time() + offset)) < 60
        # what comparing the edge's stamps with this machine's clock would say
        compared = journal.completed_studies(STABLE_AGE, now=time.time())
        assert compared == ([study_uid] if offset < 0 else [])
    while time.monotonic() - half_sent < STABLE_AGE * 0.6:
        assert _ready(region) == [], "a half-received study was reported ready"
        time.sleep(0.1)

    storescu(region.edge_port, files[3:])  # the rest, within stable_age
    rest_sent = time.monotonic()
    while not _ready(region):
        assert time.monotonic() - rest_sent < STABLE_AGE + 10, "the complete study never became ready"
        time.sleep(0.1)
    waited = time.monotonic() - rest_sent
    assert waited >= STABLE_AGE * 0.9, f"ready {waited:.2f} s after its last instance, before stable_age"
    assert _ready(region) == [study_uid]
    with Journal.open(region.store_dir, readonly=True) as journal:
        assert len(journal.instances(study_uid, "pending")) == 6
    _stop(edge)


def test_a_stopped_edge_judges_its_studies_as_of_its_stop(
    region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cleanup: list
) -> None:
    require_program("storescu", "dcmtk")
    quiet_uid, quiet = make_study(tmp_path / "quiet", 2)
    recent_uid, recent = make_study(tmp_path / "recent", 2)
    edge = _start(region, tmp_path, -HOUR, monkeypatch)
    cleanup.append(edge)
    storescu(region.edge_port, quiet)
    eventually(lambda: _ready(region) == [quiet_uid], STABLE_AGE + 10, "the first study quiet", 0.1)
    storescu(region.edge_port, recent)  # then the edge stops before this study is quiet
    _stop(edge)
    time.sleep(STABLE_AGE + 1)  # longer than stable_age by this machine's clock: the edge's stood still
    assert _ready(region) == [quiet_uid]
    with Journal.open(region.store_dir, readonly=True) as journal:
        stopped_at = journal.stored_clock()
        assert journal.get_meta("clean_shutdown") == "1"

    edge = _start(region, tmp_path, -HOUR, monkeypatch)  # its clock goes on from the stop
    cleanup.append(edge)
    restarted = time.monotonic()
    eventually(lambda: recent_uid in _ready(region), STABLE_AGE + 10, "the second study quiet after the restart", 0.1)
    assert time.monotonic() - restarted < STABLE_AGE + 3
    assert _ready(region) == [quiet_uid, recent_uid]
    with Journal.open(region.store_dir, readonly=True) as journal:
        assert journal.stored_clock() > stopped_at
    _stop(edge)


def test_a_step_of_the_edge_wall_clock_does_not_complete_a_study(
    region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NTP corrects a clock that was behind by ten minutes, mid-study: the quiet clock is monotonic."""
    require_program("storescu", "dcmtk")
    study_uid, files = make_study(tmp_path / "s", 4)
    completed: list[str] = []
    with EdgeServer(region.config, "hub", region.store_dir, on_study_complete=completed.append) as edge:
        storescu(region.edge_port, files[:2])
        monkeypatch.setattr(edge_clock, "_OFFSET", 600.0)  # the wall clock jumps ten minutes ahead
        time.sleep(0.5)
        assert edge.journal.completed_studies(STABLE_AGE) == [] and completed == []
        assert edge.check_completion() == []
        storescu(region.edge_port, files[2:])
        eventually(lambda: completed, STABLE_AGE + 10, "the study announced")
        assert completed == [study_uid]
        assert edge.journal.completed_studies(STABLE_AGE) == [study_uid]
        assert len(edge.journal.instances(study_uid)) == 4


def test_an_older_journal_is_migrated_and_its_studies_adopted_by_the_edge(region: Region, tmp_path: Path) -> None:
    require_program("storescu", "dcmtk")
    study_uid, files = make_study(tmp_path / "s", 2)
    announced: list[str] = []
    with EdgeServer(region.config, "hub", region.store_dir, on_study_complete=announced.append):
        storescu(region.edge_port, files)
        eventually(lambda: announced, STABLE_AGE + 10, "the study announced")
    with Journal.open(region.store_dir) as journal:  # as a schema-4 journal was: no quiet clock at all
        journal._write(
            [
                ("DROP INDEX studies_last_clock", ()),
                ("ALTER TABLE studies DROP COLUMN last_clock", ()),
                ("ALTER TABLE studies DROP COLUMN announced_clock", ()),
                ("DELETE FROM meta WHERE key IN ('edge_clock', 'edge_heartbeat')", ()),
                ("UPDATE meta SET value = '4' WHERE key = 'schema_version'", ()),
            ]
        )
    time.sleep(STABLE_AGE)
    with Journal.open(region.store_dir, readonly=True) as old:  # read as it is: by wall time, as before
        assert old.get_meta("schema_version") == "4"
        assert transfer.studies_to_sync(old, STABLE_AGE) == [study_uid]
    with Journal.open(region.store_dir) as journal:  # a writable open migrates it
        assert journal.get_meta("schema_version") == SCHEMA_VERSION == "5"
        assert transfer.studies_to_sync(journal, STABLE_AGE) == [study_uid]  # no reading yet: wall time
    completed: list[str] = []
    with EdgeServer(region.config, "hub", region.store_dir, on_study_complete=completed.append) as edge:
        # adopted at the start: received "now" on the quiet clock, and it was announced before
        assert edge.journal.completed_studies(STABLE_AGE) == []
        eventually(
            lambda: edge.journal.completed_studies(STABLE_AGE) == [study_uid], STABLE_AGE + 10, "the study complete"
        )
        time.sleep(0.5)
        assert completed == []  # announced once, before the upgrade: not again


def test_a_journal_of_a_newer_renkei_is_refused_not_misread(tmp_path: Path) -> None:
    """After a downgrade, an edge must not run on a journal whose meaning it does not know."""
    from renkei.edge.journal import JournalError

    with Journal.open(tmp_path) as journal:
        journal._write([("UPDATE meta SET value = '99' WHERE key = 'schema_version'", ())])
    for readonly in (False, True):
        with pytest.raises(JournalError, match="newer renkei .schema 99"):
            Journal.open(tmp_path, readonly=readonly)
    with Journal.open(tmp_path.parent / "fresh") as fresh:  # a new journal is still created as ever
        assert fresh.get_meta("schema_version") == SCHEMA_VERSION
