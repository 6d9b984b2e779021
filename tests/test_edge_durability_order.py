"""The order that makes a C-STORE answer safe, observed on real system calls.

For every stored instance: its file is fsynced (in tmp/), renamed into
instances/<study>/<series>/, that folder is fsynced, the journal record is
committed, and only then is the C-STORE-RSP sent. A journal record therefore
never points at a file a power loss could take back, and an answered instance
is on disk with its name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from renkei.edge import fastnet
from renkei.edge.ingest import Ingestor
from renkei.edge.journal import Journal
from renkei.edge.parsing import split_file_meta
from renkei.edge.server import EdgeServer
from renkei.edge.store import FileStore
from tests.helpers_edge import Region, make_study, meta_of, storescu, write_region


class Events:
    """fsync, rename, journal commit and answer, in the order they happened (all threads)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add(self, kind: str, what: str) -> None:
        with self.lock:
            self.log.append((kind, what))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> Iterator[Events]:
    seen = Events()
    real_fsync, real_rename = os.fsync, os.rename
    real_record = Journal.record_instance

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        real_fsync(fd)
        seen.add("fsync", path)

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        real_rename(src, dst)
        seen.add("rename", f"{os.fspath(src)} -> {os.fspath(dst)}")

    def record_instance(self: Journal, parsed, *args, **kwargs):  # type: ignore[no-untyped-def]
        real_record(self, parsed, *args, **kwargs)
        seen.add("journaled", parsed.sop_instance_uid)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(Journal, "record_instance", record_instance)
    yield seen


def _check_order(log: list[tuple[str, str]], sop_uid: str, answered: bool) -> None:
    """fsync(temporary file) < rename into place < fsync(its folder) < journal commit (< answer)."""

    def indexes(kind: str, test) -> list[int]:  # type: ignore[no-untyped-def]
        return [i for i, (k, what) in enumerate(log) if k == kind and test(what)]

    renames = indexes("rename", lambda w: w.endswith(f"/{sop_uid}.dcm"))
    assert len(renames) == 1, f"{sop_uid} was renamed into place {len(renames)} times"
    placed = renames[0]
    temp, final = log[placed][1].split(" -> ")
    assert "/tmp/" in temp
    # the descriptor still names the temporary file when it is fsynced
    assert [i for i in indexes("fsync", lambda w: w == temp) if i < placed], f"{temp} not fsynced before its rename"
    folder_synced = [i for i in indexes("fsync", lambda w: w == os.path.dirname(final)) if i > placed]
    journaled = indexes("journaled", lambda w: w == sop_uid)
    assert folder_synced and journaled, f"{sop_uid}: folder fsync {folder_synced}, journal {journaled}"
    assert folder_synced[0] < journaled[0], f"{sop_uid} was journaled before its folder was fsynced"
    if answered:
        answers = indexes("answer", lambda w: w == sop_uid)
        assert answers and journaled[0] < answers[0], f"{sop_uid} was answered before it was journaled"


def test_the_ingestor_syncs_file_then_folder_then_journals(tmp_path: Path, events: Events) -> None:
    store_dir = tmp_path / "store"
    ingestor = Ingestor(FileStore(store_dir), Journal(store_dir, synchronous="NORMAL"))
    try:
        _study, files = make_study(tmp_path / "s", 3, series=2)
        for path in files:
            raw = path.read_bytes()
            meta, offset = split_file_meta(raw)
            outcome = ingestor.store_instance(
                memoryview(raw)[offset:],
                meta["TransferSyntaxUID"],
                meta["MediaStorageSOPClassUID"],
                meta["MediaStorageSOPInstanceUID"],
                "STORESCU",
            )
            assert outcome.kind == "stored"
            _check_order(events.log, meta["MediaStorageSOPInstanceUID"], answered=False)
    finally:
        ingestor.close()
        ingestor.journal.close()
    assert not list((store_dir / "tmp").iterdir())


@pytest.mark.usefixtures("dcmtk")
def test_a_real_edge_answers_only_after_file_folder_and_journal(
    tmp_path: Path, events: Events, monkeypatch: pytest.MonkeyPatch
) -> None:
    region: Region = write_region(tmp_path / "region")
    real_encode = fastnet.encode_store_response

    def encode(context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int) -> bytes:
        events.add("answer", sop_instance_uid)
        return real_encode(context_id, message_id, sop_class_uid, sop_instance_uid, status)

    monkeypatch.setattr(fastnet, "encode_store_response", encode)
    server = EdgeServer(region.config, "hub", region.store_dir)
    assert server.fast, "the C-STORE fast path (fastnet) is what this test watches"
    server.start()
    try:
        _study, files = make_study(tmp_path / "s", 6, series=2, size=64)
        storescu(region.edge_port, files)
        assert server.stats.stored == 6
        for path in files:
            _check_order(events.log, meta_of(path)["MediaStorageSOPInstanceUID"], answered=True)
    finally:
        server.stop(timeout=10)
