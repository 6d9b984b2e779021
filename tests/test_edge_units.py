"""Edge logic without the network: matching, parsing, the durable store and the journal."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from pydicom.data import get_charset_files
from pydicom.uid import generate_uid

from renkei.edge.ingest import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    SUCCESS,
    Ingestor,
)
from renkei.edge.journal import Journal, JournalError
from renkei.edge.matching import match_attribute, match_person_name, match_record
from renkei.edge.parsing import InvalidInstance, encode_file_meta, parse_dataset, split_file_meta
from renkei.edge.qr import LocalSource
from renkei.edge.store import FileStore
from renkei.errors import InvalidUID
from tests.helpers_edge import CHARSET_JIS, dataset_bytes, make_instance, make_study, meta_of

NAME = "Yamada^Tarou=山田^太郎=やまだ^たろう"


# ------------------------------------------------------------------ matching
@pytest.mark.parametrize(
    "query,expected",
    [
        ("", True),
        ("*", True),
        ("Yamada^Tarou", True),
        ("YAMADA^TAROU", True),
        ("Yamada*", True),
        ("yamada^t?rou", True),
        ("山田*", True),
        ("山田^太郎", True),
        ("山?^太郎", True),
        ("やまだ*", True),
        ("Sato*", False),
        ("山田", False),
        ("山", False),
        ("=山田^太郎", True),
        ("=やまだ*", False),
        ("==やまだ^たろう", True),
        ("Yamada*=山田*", True),
        ("Yamada*=佐藤*", False),
    ],
)
def test_person_name_matches_each_component_group(query: str, expected: bool) -> None:
    assert match_attribute("PN", query, NAME) is expected


def test_person_name_trailing_separators_are_insignificant() -> None:
    assert match_person_name("Yamada^Tarou^^", "Yamada^Tarou")
    assert match_person_name("Yamada^Tarou", "Yamada^Tarou^^^")


@pytest.mark.parametrize(
    "vr,query,value,expected",
    [
        ("DA", "20260101-20260131", "20260115", True),
        ("DA", "20260101-20260131", "20260201", False),
        ("DA", "-20251231", "20260115", False),
        ("DA", "20260115-", "20260115", True),
        ("DA", "20260115", "20260115", True),
        ("DA", "20260101-20260131", "", False),
        ("TM", "0800-1200", "101500", True),
        ("TM", "1100-", "101500", False),
        ("TM", "-10", "101500", True),
        ("TM", "1015", "101500", True),
        ("DT", "2026-2026", "20260501120000", True),
        ("CS", "CT", "CT", True),
        ("CS", "ct", "CT", False),
        ("CS", "CT\\MR", "MR", True),
        ("CS", "MR", "CT\\MR", True),
        ("CS", "US", "CT\\MR", False),
        ("LO", "abc*", "abcdef", True),
        ("LO", "ab?", "abcd", False),
        ("LO", "A*", "", False),
        ("UI", "1.2.3\\1.2.4", "1.2.4", True),
        ("UI", "1.2.*", "1.2.3", False),
    ],
)
def test_single_wildcard_list_and_range_matching(vr: str, query: str, value: str, expected: bool) -> None:
    assert match_attribute(vr, query, value) is expected


def test_match_record_needs_every_key() -> None:
    record = {"PatientName": NAME, "StudyDate": "20260115", "ModalitiesInStudy": "CT\\MR"}
    assert match_record({"PatientName": ("PN", "山田*"), "StudyDate": ("DA", "20260101-")}, record)
    assert not match_record({"PatientName": ("PN", "山田*"), "ModalitiesInStudy": ("CS", "CR")}, record)


# ------------------------------------------------------------------ parsing
def test_parse_decodes_japanese_names_with_the_data_charset() -> None:
    for name, expected in (("chrH31.dcm", NAME), ("chrH32.dcm", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう")):
        path = Path(get_charset_files(name)[0])
        data = path.read_bytes()
        meta, offset = split_file_meta(data)
        parsed = parse_dataset(memoryview(data)[offset:], meta["TransferSyntaxUID"])
        assert parsed.attributes["PatientName"] == expected
        assert "ISO 2022 IR 87" in parsed.specific_character_set


def test_parse_refuses_truncated_data_and_bad_uids(tmp_path: Path) -> None:
    good = make_instance(tmp_path / "a.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    data = dataset_bytes(good)
    ts = meta_of(good)["TransferSyntaxUID"]
    assert parse_dataset(data, ts).sop_instance_uid == meta_of(good)["MediaStorageSOPInstanceUID"]
    with pytest.raises(InvalidInstance, match="runs past the end"):
        parse_dataset(data[:-10], ts)
    with pytest.raises(InvalidInstance):
        parse_dataset(b"\x01\x02garbage" * 10, ts)
    for bad in ("1.2..3", "1.02.3", "1.2.a", "1." + "2" * 70):
        path = make_instance(tmp_path / "bad.dcm", study_uid=bad, series_uid=generate_uid())
        with pytest.raises(InvalidInstance, match="Study Instance UID"):
            parse_dataset(dataset_bytes(path), ts)


def test_file_meta_round_trips_through_pydicom(tmp_path: Path) -> None:
    from io import BytesIO

    from pydicom import dcmread

    header = encode_file_meta("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "CALLER")
    src = make_instance(tmp_path / "x.dcm", study_uid=generate_uid(), series_uid=generate_uid(), sop_uid="1.2.3.4")
    ds = dcmread(BytesIO(header + dataset_bytes(src)))
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.SourceApplicationEntityTitle == "CALLER"
    assert ds.SOPInstanceUID == "1.2.3.4"


# ------------------------------------------------------------------ store and journal
def _ingest_file(ingestor: Ingestor, path: Path, calling_ae: str = "TEST"):
    meta = meta_of(path)
    return ingestor.store_instance(
        dataset_bytes(path),
        meta["TransferSyntaxUID"],
        meta["MediaStorageSOPClassUID"],
        meta["MediaStorageSOPInstanceUID"],
        calling_ae,
    )


def test_store_is_byte_exact_idempotent_and_keeps_conflicts(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    ingestor = Ingestor(FileStore(store_dir), Journal(store_dir))
    study_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    first = make_instance(tmp_path / "1.dcm", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
    other = make_instance(tmp_path / "2.dcm", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, seed=99)
    assert _ingest_file(ingestor, first).kind == "stored"
    stored = store_dir / "instances" / study_uid / series_uid / f"{sop_uid}.dcm"
    assert dataset_bytes(stored) == dataset_bytes(first)
    again = _ingest_file(ingestor, first)
    assert (again.kind, again.status) == ("duplicate", SUCCESS)
    clash = _ingest_file(ingestor, other)
    assert (clash.kind, clash.status) == ("conflict", SUCCESS)
    assert dataset_bytes(stored) == dataset_bytes(first), "the first instance must never be replaced"
    conflicts = ingestor.journal.conflicts()
    assert len(conflicts) == 1 and dataset_bytes(conflicts[0].path) == dataset_bytes(other)
    assert _ingest_file(ingestor, other).kind == "conflict"
    assert len(ingestor.journal.conflicts()) == 1
    assert ingestor.journal.summary().instances == 1
    assert not list((store_dir / "tmp").iterdir())


def test_bad_instances_get_failure_statuses_and_write_nothing(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    ingestor = Ingestor(FileStore(store_dir), Journal(store_dir))
    bad_uid = make_instance(tmp_path / "b.dcm", study_uid="1.2.3..4", series_uid=generate_uid())
    outcome = _ingest_file(ingestor, bad_uid)
    assert outcome.status == DATASET_DOES_NOT_MATCH_SOP_CLASS
    outcome = ingestor.store_instance(
        b"\x08\x00" + b"\xff" * 50, "1.2.840.10008.1.2.1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "TEST"
    )
    assert outcome.status in (CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS)
    assert not list((store_dir / "instances").rglob("*.dcm"))
    with pytest.raises(InvalidUID):
        FileStore(store_dir).instance_path("1.2", "..", "1.3")


def test_completed_studies_reopen_on_late_instances(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    ingestor = Ingestor(FileStore(store_dir), Journal(store_dir))
    study_uid, files = make_study(tmp_path / "s", 3, patient_name=NAME, charset=CHARSET_JIS)
    for f in files[:2]:
        _ingest_file(ingestor, f)
    journal = ingestor.journal
    now = time.time()
    assert journal.completed_studies(60, now=now) == []
    assert journal.completed_studies(60, now=now + 61) == [study_uid]
    uids = [e.instance.sop_instance_uid for e in journal.instances(study_uid)]
    journal.set_upload_state(uids, "uploaded", object_key="k")
    assert journal.completed_studies(60, now=now + 61) == []
    assert journal.completed_studies(60, now=now + 61, state="uploaded") == [study_uid]
    _ingest_file(ingestor, files[2])  # a late instance reopens the study
    assert journal.completed_studies(60, now=time.time() + 61) == [study_uid]
    assert journal.completed_studies(60, now=time.time()) == []
    info = journal.study_info(study_uid, "hub")
    assert info.patient_name == NAME and info.modalities == ("CT",) and info.origin_site == "hub"
    assert [e.upload_state for e in journal.instances(study_uid)].count("pending") == 1


def test_remove_local_copy_refuses_until_every_instance_is_verified(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    ingestor = Ingestor(FileStore(store_dir), Journal(store_dir))
    study_uid, files = make_study(tmp_path / "s", 2)
    for f in files:
        _ingest_file(ingestor, f)
    journal = ingestor.journal
    uids = [e.instance.sop_instance_uid for e in journal.instances(study_uid)]
    journal.set_upload_state(uids[:1], "verified")
    with pytest.raises(JournalError, match="not verified"):
        journal.remove_local_copy(study_uid)
    journal.set_upload_state(uids, "verified")
    paths = journal.remove_local_copy(study_uid)
    assert sorted(paths) == sorted(e.path for e in journal.instances(study_uid))
    assert not any(p.exists() for p in paths)
    assert list(LocalSource(journal).instance_paths(study_uid)) == []
    # an identical resend after removal is stored again, once
    assert _ingest_file(ingestor, files[0]).kind == "duplicate"
    assert len(list(LocalSource(journal).instance_paths(study_uid))) == 1


def _count_in_other_process(store_dir: str, queue: multiprocessing.Queue) -> None:
    with Journal.open(store_dir) as journal:
        queue.put(journal.summary().instances)
        journal.set_upload_state(
            [journal.instances(next(journal.iter_study_uids()))[0].instance.sop_instance_uid], "uploaded"
        )


def test_journal_opens_from_another_process_while_in_use(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    ingestor = Ingestor(FileStore(store_dir), Journal(store_dir, synchronous="NORMAL"))
    study_uid, files = make_study(tmp_path / "s", 3)
    for f in files:
        _ingest_file(ingestor, f)
    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    proc = multiprocessing.get_context("spawn").Process(target=_count_in_other_process, args=(str(store_dir), queue))
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert queue.get(timeout=5) == 3
    assert ingestor.journal.summary().upload_states["uploaded"] == 1


def test_recover_journals_files_left_without_a_record(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = FileStore(store_dir)
    journal = Journal(store_dir)
    study_uid, files = make_study(tmp_path / "s", 2)
    # a file fsynced into place whose journal commit never happened (crash in between)
    meta = meta_of(files[0])
    parsed = parse_dataset(dataset_bytes(files[0]), meta["TransferSyntaxUID"])
    temp = store.write_temp([files[0].read_bytes()])
    store.commit(temp, store.instance_path(study_uid, parsed.series_uid, parsed.sop_instance_uid))
    (store_dir / "tmp" / "left.part").write_bytes(b"partial")
    report = Ingestor(store, journal).recover()
    assert report.files_journaled == 1 and report.temp_files_removed == 1
    assert [e.instance.sop_instance_uid for e in journal.instances(study_uid)] == [parsed.sop_instance_uid]
