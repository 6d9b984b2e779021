"""The edge against real DICOM peers from dcmtk: storescu, storescp, findscu, movescu, getscu.

"Byte for byte as dcmtk's storescp stores it": storescp runs with +B (bit
preserving: it writes the dataset exactly as received, as the edge does; in its
default mode it would re-encode). The dataset part, everything after the File
Meta group, must be identical; in the File Meta group, the Media Storage SOP
Class/Instance UIDs and the Transfer Syntax UID must be equal, while the
Implementation Class UID and Version Name name each program and differ, and
the edge writes no Source AE Title (optional; the journal records the caller).
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import pytest
import yaml
from helpers_wait import eventually
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from renkei import peers, pki
from renkei.edge import fastnet
from renkei.edge.parsing import InvalidInstance, parse_dataset, split_file_meta
from renkei.edge.server import EdgeServer
from renkei.edge.tls import client_context
from renkei.errors import PeerError
from renkei.synth import write_single_study
from tests.conftest import require_part, require_program
from tests.helpers_edge import (
    CHARSET_JIS,
    CHARSET_UTF8,
    Region,
    dataset_bytes,
    files_by_sop,
    make_instance,
    make_study,
    meta_of,
    run,
    storescu,
    write_region,
)

pytestmark = pytest.mark.usefixtures("dcmtk")


@pytest.fixture
def region(tmp_path: Path) -> Region:
    return write_region(tmp_path / "region")


@pytest.fixture(params=["fast", "plain"])
def edge(region: Region, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[EdgeServer]:
    """The hub's edge, on its fast path and again with it off (RENKEI_EDGE_FAST=0: plain pynetdicom)."""
    monkeypatch.setenv(fastnet.FAST_ENV, "1" if request.param == "fast" else "0")
    completed: list[str] = []
    server = EdgeServer(region.config, "hub", region.store_dir, on_study_complete=completed.append)
    assert server.fast == (request.param == "fast" and fastnet.check_compatible())
    server.completed = completed  # type: ignore[attr-defined]
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout=10)


@pytest.fixture
def storescp_bp(region: Region, tmp_path: Path) -> Iterator[peers.Peer]:
    """dcmtk's storescp in bit-preserving mode on the port the region names for STORESCP."""
    require_program("storescp", "dcmtk")
    peer = peers.start_storescp(
        tmp_path / "storescp-out", ae_title="STORESCP", port=region.storescp_port, extra_args=["+B"]
    )
    try:
        yield peer
    finally:
        peer.stop()


def _edge_copies(edge: EdgeServer, sop_uid: str) -> list[Path]:
    """Every file the edge keeps for a SOP Instance UID (the instance and any conflicts)."""
    found = []
    entry = edge.journal.entry(sop_uid)
    if entry is not None:
        found.append(entry.path)
    found += [c.path for c in edge.journal.conflicts() if c.sop_instance_uid == sop_uid]
    return found


# storescu proposes uncompressed syntaxes unless told which compressed one a file needs
_STORESCU_PROPOSE = {
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    JPEGLosslessSV1: "-xs",
    JPEGBaseline8Bit: "-xy",
    JPEGExtended12Bit: "-xx",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
    DeflatedExplicitVRLittleEndian: "-xd",
}


def _storescu_file(port: int, path: Path, called: str = "HUB_SVR") -> subprocess.CompletedProcess:
    option = _STORESCU_PROPOSE.get(meta_of(path)["TransferSyntaxUID"])
    return storescu(port, [path], called=called, extra=[option] if option else [], check=False)


def _sendable_testdata() -> list[Path]:
    files = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            meta, _ = split_file_meta(path.read_bytes()[:65536])
        except InvalidInstance:
            continue
        if {"TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"} <= meta.keys():
            files.append(path)
    return files


# ------------------------------------------------------------------ association control
def test_echo_works_and_unknown_ae_is_rejected(
    edge: EdgeServer, region: Region, caplog: pytest.LogCaptureFixture
) -> None:
    run(["echoscu", "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port])
    with caplog.at_level(logging.WARNING, logger="renkei.edge"):
        rejected = run(["echoscu", "-aet", "INTRUDER", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port], check=False)
        assert rejected.returncode != 0
        assert b"Calling AE Title Not Recognized" in rejected.stderr + rejected.stdout
        eventually(lambda: "INTRUDER" in caplog.text, 5, "the rejection logged")
    assert "INTRUDER" in caplog.text and "rejected" in caplog.text


# ------------------------------------------------------------------ C-STORE, byte for byte
def test_pydicom_test_files_are_stored_as_storescp_stores_them(
    edge: EdgeServer, region: Region, storescp_bp: peers.Peer
) -> None:
    # Files sharing a SOP Instance UID go in successive rounds (storescp names its
    # files by that UID); within a round every file is sent by its own storescu, in parallel.
    rounds: list[dict[str, Path]] = []
    for path in _sendable_testdata():
        sop_uid = meta_of(path)["MediaStorageSOPInstanceUID"]
        for round_ in rounds:
            if sop_uid not in round_:
                round_[sop_uid] = path
                break
        else:
            rounds.append({sop_uid: path})
    compared: list[str] = []
    refused: list[str] = []
    unsendable: list[str] = []
    out = storescp_bp.workdir
    with ThreadPoolExecutor(max_workers=4) as pool:
        for round_ in rounds:
            for f in out.iterdir():
                f.unlink()
            list(pool.map(lambda p: _storescu_file(region.storescp_port, p, "STORESCP"), round_.values()))
            list(pool.map(lambda p: _storescu_file(region.edge_port, p), round_.values()))
            received = files_by_sop(out)
            for sop_uid, path in round_.items():
                if sop_uid not in received:
                    unsendable.append(path.name)  # dcmtk itself cannot send this file
                    continue
                scp_file = received[sop_uid]
                scp_data = dataset_bytes(scp_file)
                copies = _edge_copies(edge, sop_uid)
                try:
                    parse_dataset(scp_data, meta_of(scp_file)["TransferSyntaxUID"])
                except InvalidInstance:
                    assert not any(dataset_bytes(c) == scp_data for c in copies), path.name
                    refused.append(path.name)  # no valid UIDs, or garbled: the edge refuses it
                    continue
                matching = [c for c in copies if dataset_bytes(c) == scp_data]
                assert matching, f"{path.name}: the edge did not store what storescp stored"
                scp_meta, edge_meta = meta_of(scp_file), meta_of(matching[0])
                for key in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID"):
                    assert edge_meta[key] == scp_meta[key], (path.name, key)
                compared.append(path.name)
    summary = f"compared {len(compared)}, refused {refused}, unsendable {unsendable}"
    assert len(compared) >= 100, summary
    assert refused, summary  # pydicom ships files without Study/Series UIDs: the edge refuses them
    # the edge still serves after every refusal
    run(["echoscu", "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port])


def _encapsulated_instance(folder: Path, transfer_syntax: str) -> Path:
    """A small instance in `transfer_syntax` (pixel data fragments are opaque to storage)."""
    base = make_instance(
        folder / f"base-{transfer_syntax}.dcm", study_uid=generate_uid(), series_uid=generate_uid(), size=8
    )
    ds = dcmread(base)
    if transfer_syntax in (
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
        RLELossless,
    ):
        ds.PixelData = encapsulate([b"\xff\xd8 opaque frame \xff\xd9"])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    out = folder / f"{transfer_syntax}.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(out, enforce_file_format=True, implicit_vr=transfer_syntax == ImplicitVRLittleEndian)
    return out


TRANSFER_SYNTAXES = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]


def _send_exactly(port: int, called: str, path: Path) -> int:
    """C-STORE `path` proposing only its own transfer syntax; the bytes go out unchanged."""
    meta = meta_of(path)
    ae = fastnet.FastAE(ae_title="STORESCU")
    ae.add_requested_context(meta["MediaStorageSOPClassUID"], [meta["TransferSyntaxUID"]])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, f"{called} refused {meta['TransferSyntaxUID']}"
    try:
        with fastnet.paused(assoc):
            _m, offset = split_file_meta(path.read_bytes())
            return fastnet.send_stored(
                assoc,
                meta["MediaStorageSOPClassUID"],
                meta["MediaStorageSOPInstanceUID"],
                meta["TransferSyntaxUID"],
                path=path,
                offset=offset,
            )
    finally:
        assoc.release()


def test_every_required_transfer_syntax_is_accepted_and_kept(
    edge: EdgeServer, region: Region, storescp_bp: peers.Peer, tmp_path: Path
) -> None:
    for syntax in TRANSFER_SYNTAXES:
        if syntax == ExplicitVRBigEndian:
            path = Path(get_testdata_files("MR_small_bigendian.dcm")[0])
        else:
            path = _encapsulated_instance(tmp_path / "ts", syntax)
        assert _send_exactly(region.edge_port, "HUB_SVR", path) == 0x0000, syntax
        sop_uid = meta_of(path)["MediaStorageSOPInstanceUID"]
        stored = edge.journal.entry(sop_uid)
        assert stored is not None and stored.instance.transfer_syntax_uid == syntax
        assert dataset_bytes(stored.path) == dataset_bytes(path), syntax
        assert meta_of(stored.path)["TransferSyntaxUID"] == syntax
        if syntax != JPEGLossless:  # storescp +xa does not accept process 14 (non-SV1)
            assert _send_exactly(region.storescp_port, "STORESCP", path) == 0x0000, syntax
            scp_file = files_by_sop(storescp_bp.workdir)[sop_uid]
            assert dataset_bytes(scp_file) == dataset_bytes(stored.path), syntax


def test_synthetic_japanese_studies_match_storescp(
    edge: EdgeServer, region: Region, storescp_bp: peers.Peer, tmp_path: Path
) -> None:
    _uid1, jis = make_study(
        tmp_path / "jis", 5, patient_name="Yamada^Taro=山田^太郎=やまだ^たろう", charset=CHARSET_JIS, series=2
    )
    _uid2, utf8 = make_study(
        tmp_path / "utf8", 5, patient_name="Sato^Hanako=佐藤^花子=さとう^はなこ", charset=CHARSET_UTF8, modality="MR"
    )
    # and the project's own synthetic studies (renkei.synth): CT, MR (two series), CR
    synth = [
        f
        for modality in ("CT", "MR", "CR")
        for f in write_single_study(tmp_path / "synth", modality, slices=3, size=64, seed=11).files
    ]
    sent = jis + utf8 + synth
    storescu(region.storescp_port, sent, called="STORESCP")
    storescu(region.edge_port, sent)
    received = files_by_sop(storescp_bp.workdir)
    assert len(received) == len(sent) == 20
    for sop_uid, scp_file in received.items():
        entry = edge.journal.entry(sop_uid)
        assert entry is not None
        assert dataset_bytes(entry.path) == dataset_bytes(scp_file)


# ------------------------------------------------------------------ bad input
def _send_raw(port: int, dataset: bytes, sop_class: str, sop_uid: str, syntax: str = ExplicitVRLittleEndian) -> int:
    ae = fastnet.FastAE(ae_title="STORESCU")
    ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="HUB_SVR")
    assert assoc.is_established
    try:
        with fastnet.paused(assoc):
            return fastnet.send_stored(assoc, sop_class, sop_uid, syntax, data=dataset)
    finally:
        assoc.release()


def test_bad_input_is_refused_and_the_edge_keeps_serving(
    edge: EdgeServer, region: Region, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    with caplog.at_level(logging.WARNING, logger="renkei.edge"):
        for bad_uid in ("1.2..3", "1.2.03", "1.2.x", "1." + "9" * 70, "../../etc"):
            path = make_instance(tmp_path / "bad.dcm", study_uid=bad_uid, series_uid=generate_uid())
            status = _send_raw(region.edge_port, dataset_bytes(path), ct, meta_of(path)["MediaStorageSOPInstanceUID"])
            assert status == 0xA900, bad_uid
        no_series = make_instance(tmp_path / "noseries.dcm", study_uid=generate_uid(), series_uid="1.2")
        ds = dcmread(no_series)
        del ds.SeriesInstanceUID
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        _m, offset = split_file_meta(buffer.getvalue())
        assert _send_raw(region.edge_port, buffer.getvalue()[offset:], ct, ds.SOPInstanceUID) == 0xA900
        garbage = b"\x08\x00\x18\x00UI\x40\x00" + b"\x07" * 80
        assert _send_raw(region.edge_port, garbage, ct, "1.2.3.4") & 0xF000 in (0xA000, 0xC000)
    assert "STORESCU@127.0.0.1" in caplog.text
    assert not list((region.store_dir / "instances").rglob("*.dcm"))
    assert not list(tmp_path.parent.glob("etc*"))
    good = make_instance(tmp_path / "good.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    storescu(region.edge_port, [good])
    assert edge.journal.summary().instances == 1


def test_resend_is_stored_once_and_a_different_instance_is_kept_as_conflict(
    edge: EdgeServer, region: Region, tmp_path: Path
) -> None:
    study_uid, series_uid, sop_uid = generate_uid(), generate_uid(), generate_uid()
    first = make_instance(tmp_path / "a.dcm", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid)
    second = make_instance(tmp_path / "b.dcm", study_uid=study_uid, series_uid=series_uid, sop_uid=sop_uid, seed=7)
    storescu(region.edge_port, [first, first])
    storescu(region.edge_port, [first])
    assert edge.journal.summary().instances == 1
    storescu(region.edge_port, [second])
    conflicts = edge.journal.conflicts()
    assert len(conflicts) == 1 and conflicts[0].calling_ae == "STORESCU"
    assert dataset_bytes(edge.journal.entry(sop_uid).path) == dataset_bytes(first)
    assert dataset_bytes(conflicts[0].path) == dataset_bytes(second)


def test_full_disk_is_answered_out_of_resources(tmp_path: Path) -> None:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
        == 0
    )
    require_part(mounted, "a small tmpfs to fill", "run the tests as root (mount -t tmpfs)")
    try:
        region = write_region(tmp_path / "region")
        server = EdgeServer(region.config, "hub", mount_point / "store").start()
        try:
            _study, files = make_study(tmp_path / "big", 12, size=256)  # 128 KiB each
            statuses = []
            for path in files:
                meta = meta_of(path)
                sop_class, sop_uid = meta["MediaStorageSOPClassUID"], meta["MediaStorageSOPInstanceUID"]
                statuses.append(_send_raw(region.edge_port, dataset_bytes(path), sop_class, sop_uid))
            assert 0xA700 in statuses and 0x0000 in statuses
            assert set(statuses) <= {0x0000, 0xA700}
            stored = [f for f, s in zip(files, statuses) if s == 0]
            assert server.journal.summary().instances == len(stored)
            for path in stored:
                entry = server.journal.entry(meta_of(path)["MediaStorageSOPInstanceUID"])
                assert entry is not None and dataset_bytes(entry.path) == dataset_bytes(path)
            run(["echoscu", "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port])
        finally:
            server.stop(timeout=10)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


# ------------------------------------------------------------------ study completion
def test_completion_is_announced_and_again_after_a_late_instance(
    edge: EdgeServer, region: Region, tmp_path: Path
) -> None:
    study_uid, files = make_study(tmp_path / "s", 4)
    storescu(region.edge_port, files[:3])
    eventually(lambda: study_uid in edge.completed, 10, "the study announced")  # type: ignore[attr-defined]
    assert edge.completed == [study_uid]  # type: ignore[attr-defined]
    assert edge.journal.completed_studies(region.config.site("hub").edge.stable_age) == [study_uid]
    storescu(region.edge_port, files[3:])
    assert edge.journal.completed_studies(1.0) == []  # reopened
    eventually(lambda: len(edge.completed) >= 2, 10, "the study announced again")  # type: ignore[attr-defined]
    assert edge.completed == [study_uid, study_uid]  # type: ignore[attr-defined]
    assert len(edge.journal.instances(study_uid, "pending")) == 4


# ------------------------------------------------------------------ C-FIND
def _findscu(
    region: Region, tmp_path: Path, keys: list[str], root: str = "-S", query_file: Path | None = None
) -> list[Dataset]:
    out = tmp_path / f"find-{time.monotonic_ns()}"
    out.mkdir()
    args = ["findscu", root, "-aet", "FINDSCU", "-aec", "HUB_SVR", "-X", "-od", out]
    for key in keys:
        args += ["-k", key]
    args += ["127.0.0.1", region.edge_port]
    if query_file is not None:
        args.append(query_file)
    run(args)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def _store_japanese(region: Region, tmp_path: Path) -> dict[str, str]:
    jis_uid, jis = make_study(
        tmp_path / "jis",
        2,
        patient_name="Yamada^Taro=山田^太郎=やまだ^たろう",
        patient_id="J1",
        charset=CHARSET_JIS,
        study_date="20260110",
    )
    utf_uid, utf = make_study(
        tmp_path / "utf",
        2,
        patient_name="Sato^Hanako=佐藤^花子=さとう^はなこ",
        patient_id="U1",
        charset=CHARSET_UTF8,
        study_date="20260220",
        modality="MR",
    )
    h31 = Path(get_charset_files("chrH31.dcm")[0])
    storescu(region.edge_port, [*jis, *utf, h31])
    return {"jis": jis_uid, "utf8": utf_uid, "h31": dcmread(h31).StudyInstanceUID}


def test_findscu_finds_japanese_names_in_their_character_sets(edge: EdgeServer, region: Region, tmp_path: Path) -> None:
    studies = _store_japanese(region, tmp_path)
    keys = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientID", "StudyDate", "ModalitiesInStudy"]

    def found(extra: list[str], charset: str = CHARSET_UTF8) -> dict[str, Dataset]:
        answers = _findscu(region, tmp_path, [*keys, f"SpecificCharacterSet={charset}", *extra])
        return {str(a.StudyInstanceUID): a for a in answers}

    kanji = found(["PatientName=山田*"])
    assert set(kanji) == {studies["jis"], studies["h31"]}
    answer = kanji[studies["jis"]]
    assert answer.SpecificCharacterSet == CHARSET_JIS
    assert str(answer.PatientName) == "Yamada^Taro=山田^太郎=やまだ^たろう"
    assert b"\x1b$B" in answer["PatientName"].value.original_string  # JIS X 0208 escape
    assert str(kanji[studies["h31"]].PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    kana = found(["PatientName=さとう*"])
    assert set(kana) == {studies["utf8"]}
    assert kana[studies["utf8"]].SpecificCharacterSet == CHARSET_UTF8
    assert str(kana[studies["utf8"]].PatientName) == "Sato^Hanako=佐藤^花子=さとう^はなこ"
    assert set(found(["PatientName=yamada*"])) == {studies["jis"], studies["h31"]}
    assert set(found(["PatientName=Sato^Hanako"])) == {studies["utf8"]}
    assert set(found(["PatientName=佐?^花子"])) == {studies["utf8"]}
    assert set(found(["PatientName==山田^太郎"])) == {studies["jis"], studies["h31"]}
    assert set(found(["PatientName", "StudyDate=20260201-20260228"])) == {studies["utf8"]}
    assert set(found(["PatientName", "StudyDate=-20260131"])) == {studies["jis"]}
    assert set(found(["PatientName", "ModalitiesInStudy=MR"])) == {studies["utf8"]}
    assert set(found(["PatientName", "ModalitiesInStudy=CT\\MR"])) == {studies["jis"], studies["utf8"]}
    assert set(found(["PatientName", "PatientID=J1\\U1"])) == {studies["jis"], studies["utf8"]}
    # a query encoded in ISO 2022 IR 87 is decoded with its own character set
    query = Dataset()
    query.SpecificCharacterSet = CHARSET_JIS
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "山田*"
    query.StudyInstanceUID = ""
    query_file = tmp_path / "query-jis.dcm"
    query.save_as(query_file, implicit_vr=False, little_endian=True)
    answers = _findscu(region, tmp_path, [], query_file=query_file)
    assert {str(a.StudyInstanceUID) for a in answers} == {studies["jis"], studies["h31"]}


def test_findscu_levels_in_patient_and_study_root(edge: EdgeServer, region: Region, tmp_path: Path) -> None:
    study_uid, files = make_study(tmp_path / "s", 4, series=2, patient_id="LV1", patient_name="Level^Test")
    storescu(region.edge_port, files)
    patients = _findscu(
        region,
        tmp_path,
        ["QueryRetrieveLevel=PATIENT", "PatientID=LV*", "PatientName", "NumberOfPatientRelatedStudies"],
        root="-P",
    )
    assert [(p.PatientID, str(p.PatientName), int(p.NumberOfPatientRelatedStudies)) for p in patients] == [
        ("LV1", "Level^Test", 1)
    ]
    studies = _findscu(
        region,
        tmp_path,
        ["QueryRetrieveLevel=STUDY", "PatientID=LV1", "StudyInstanceUID", "NumberOfStudyRelatedInstances"],
        root="-P",
    )
    assert [(s.StudyInstanceUID, int(s.NumberOfStudyRelatedInstances)) for s in studies] == [(study_uid, 4)]
    series = _findscu(
        region,
        tmp_path,
        [
            "QueryRetrieveLevel=SERIES",
            f"StudyInstanceUID={study_uid}",
            "SeriesInstanceUID",
            "Modality",
            "NumberOfSeriesRelatedInstances",
        ],
    )
    assert len(series) == 2 and all(int(s.NumberOfSeriesRelatedInstances) == 2 for s in series)
    images = _findscu(
        region,
        tmp_path,
        [
            "QueryRetrieveLevel=IMAGE",
            f"StudyInstanceUID={study_uid}",
            f"SeriesInstanceUID={series[0].SeriesInstanceUID}",
            "SOPInstanceUID",
            "InstanceNumber",
        ],
    )
    expected = {
        meta_of(f)["MediaStorageSOPInstanceUID"]
        for f in files
        if dcmread(f, stop_before_pixels=True).SeriesInstanceUID == series[0].SeriesInstanceUID
    }
    assert {i.SOPInstanceUID for i in images} == expected
    refused = run(
        [
            "findscu",
            "-v",
            "-S",
            "-aet",
            "FINDSCU",
            "-aec",
            "HUB_SVR",
            "-k",
            "QueryRetrieveLevel=PATIENT",
            "-k",
            "PatientID",
            "127.0.0.1",
            region.edge_port,
        ],
        check=False,
    )
    assert b"DataSetDoesNotMatchSOPClass" in refused.stderr + refused.stdout  # 0xA900: no PATIENT level


# ------------------------------------------------------------------ C-MOVE and C-GET
def test_movescu_and_getscu_retrieve_every_instance_byte_for_byte(
    edge: EdgeServer, region: Region, storescp_bp: peers.Peer, tmp_path: Path
) -> None:
    study_uid, files = make_study(tmp_path / "s", 12, series=2)
    big_endian = Path(get_testdata_files("MR_small_bigendian.dcm")[0])
    storescu(region.edge_port, files)
    assert _send_exactly(region.edge_port, "HUB_SVR", big_endian) == 0
    stored = {meta_of(f)["MediaStorageSOPInstanceUID"]: dataset_bytes(f) for f in files}
    run(
        [
            "movescu",
            "-S",
            "-aet",
            "MOVESCU",
            "-aec",
            "HUB_SVR",
            "-aem",
            "STORESCP",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            region.edge_port,
        ]
    )
    moved = files_by_sop(storescp_bp.workdir)
    assert set(moved) == set(stored)
    for sop_uid, path in moved.items():
        assert dataset_bytes(path) == stored[sop_uid]
    get_dir = tmp_path / "get"
    get_dir.mkdir()
    run(
        [
            "getscu",
            "-S",
            "-aet",
            "GETSCU",
            "-aec",
            "HUB_SVR",
            "-od",
            get_dir,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            region.edge_port,
        ]
    )
    got = files_by_sop(get_dir)
    assert set(got) == set(stored)
    for sop_uid, path in got.items():
        assert dataset_bytes(path) == stored[sop_uid]
    # big endian data goes out as stored too (series level move)
    mr = dcmread(big_endian, stop_before_pixels=True)
    for f in storescp_bp.workdir.iterdir():
        f.unlink()
    run(
        [
            "movescu",
            "-S",
            "-aet",
            "MOVESCU",
            "-aec",
            "HUB_SVR",
            "-aem",
            "STORESCP",
            "-k",
            "QueryRetrieveLevel=SERIES",
            "-k",
            f"StudyInstanceUID={mr.StudyInstanceUID}",
            "-k",
            f"SeriesInstanceUID={mr.SeriesInstanceUID}",
            "127.0.0.1",
            region.edge_port,
        ]
    )
    (path,) = files_by_sop(storescp_bp.workdir).values()
    assert meta_of(path)["TransferSyntaxUID"] == ExplicitVRBigEndian
    assert dataset_bytes(path) == dataset_bytes(big_endian)
    unknown = run(
        [
            "movescu",
            "-S",
            "-aet",
            "MOVESCU",
            "-aec",
            "HUB_SVR",
            "-aem",
            "NOWHERE",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            region.edge_port,
        ],
        check=False,
    )
    assert b"MoveDestinationUnknown" in unknown.stderr + unknown.stdout


# ------------------------------------------------------------------ TLS
def _make_certs(folder: Path) -> dict[str, Path]:
    """A region CA (renkei.pki), the edge's site certificate, AE certificates, and a stranger CA's."""
    ca = folder / "ca"
    pki.create_ca(ca, "test")
    paths = {"ca.crt": ca / pki.CA_CERT}
    paths["edge.crt"], paths["edge.key"] = pki.issue(ca, folder, site_id="hub", hosts=["127.0.0.1"], name="edge")
    for ae in ("ECHOSCU", "STORESCU", "MOVESCU"):
        paths[f"{ae}.crt"], paths[f"{ae}.key"] = pki.issue(ca, folder, site_id="hub", ae_title=ae)
    stranger = folder / "stranger-ca"
    pki.create_ca(stranger, "test")
    paths["stranger.crt"], paths["stranger.key"] = pki.issue(
        stranger, folder / "stranger", site_id="hub", ae_title="ECHOSCU"
    )
    return paths


def test_tls_with_dcmtk_and_plain_connections_fail(tmp_path: Path) -> None:
    certs = _make_certs(tmp_path / "certs")
    region = write_region(
        tmp_path / "region",
        tls={"cert": str(certs["edge.crt"]), "key": str(certs["edge.key"]), "ca": str(certs["ca.crt"])},
    )

    def tls(ae: str) -> list[object]:
        return ["+tls", certs[f"{ae}.key"], certs[f"{ae}.crt"], "+cf", certs["ca.crt"]]

    with EdgeServer(region.config, "hub", region.store_dir) as server:
        run(["echoscu", *tls("ECHOSCU"), "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port])
        _uid, files = make_study(tmp_path / "s", 3)
        run(
            ["storescu", *tls("STORESCU"), "-aet", "STORESCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port, *files]
        )
        assert server.journal.summary().instances == 3
        plain = run(
            ["echoscu", "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port], check=False, timeout=60
        )
        assert plain.returncode != 0
        # a certificate of the region CA for another AE title cannot claim this one
        other = run(
            ["echoscu", *tls("MOVESCU"), "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port],
            check=False,
            timeout=60,
        )
        assert other.returncode != 0 and b"Calling AE Title Not Recognized" in other.stderr + other.stdout
        stranger = ["+tls", certs["stranger.key"], certs["stranger.crt"], "+cf", certs["ca.crt"]]
        untrusted = run(
            ["echoscu", *stranger, "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port],
            check=False,
            timeout=60,
        )
        assert untrusted.returncode != 0
        run(["echoscu", *tls("ECHOSCU"), "-aet", "ECHOSCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port])


def test_c_move_to_a_workstation_configured_for_tls_goes_over_tls(tmp_path: Path) -> None:
    """The edge calls a `tls: true` destination over TLS with its own certificate, never in plaintext."""
    certs = _make_certs(tmp_path / "certs")
    region = write_region(
        tmp_path / "region",
        tls={"cert": str(certs["edge.crt"]), "key": str(certs["edge.key"]), "ca": str(certs["ca.crt"])},
    )
    raw = yaml.safe_load(region.path.read_text())
    for ws in raw["sites"][0]["workstations"]:
        if ws["ae_title"] == "STORESCP":
            ws["tls"] = True
    region.path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    study_uid, files = make_study(tmp_path / "s", 3)

    def tls(ae: str) -> list[object]:
        return ["+tls", certs[f"{ae}.key"], certs[f"{ae}.crt"], "+cf", certs["ca.crt"]]

    def move() -> int:
        """C-MOVE over TLS from MOVESCU (pynetdicom: Debian's movescu has no TLS); the final status."""
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        context = client_context(ca=str(certs["ca.crt"]), cert=str(certs["MOVESCU.crt"]), key=str(certs["MOVESCU.key"]))
        assoc = ae.associate("127.0.0.1", region.edge_port, ae_title="HUB_SVR", tls_args=(context, None))
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        try:
            statuses = [
                s.Status
                for s, _ in assoc.send_c_move(query, "STORESCP", StudyRootQueryRetrieveInformationModelMove)
                if s is not None and "Status" in s
            ]
        finally:
            assoc.release()
        return int(statuses[-1])

    with EdgeServer(region.config, "hub", region.store_dir):
        run(
            ["storescu", *tls("STORESCU"), "-aet", "STORESCU", "-aec", "HUB_SVR", "127.0.0.1", region.edge_port, *files]
        )
        # a plaintext listener under that AE title gets nothing: the edge does not fall back to plaintext
        plain = peers.start_storescp(tmp_path / "plain", ae_title="STORESCP", port=region.storescp_port)
        try:
            assert move() != 0x0000
            assert files_by_sop(plain.workdir) == {}
        finally:
            plain.stop()
        # a TLS listener that requires the region CA's client certificate receives the study as stored
        secure = peers.start_storescp(
            tmp_path / "secure",
            ae_title="STORESCP",
            port=region.storescp_port,
            extra_args=["+tls", str(certs["ECHOSCU.key"]), str(certs["ECHOSCU.crt"]), "+cf", str(certs["ca.crt"])],
        )
        try:
            assert move() == 0x0000
            received = files_by_sop(secure.workdir)
            assert set(received) == {meta_of(f)["MediaStorageSOPInstanceUID"] for f in files}
            for path in files:
                assert dataset_bytes(received[meta_of(path)["MediaStorageSOPInstanceUID"]]) == dataset_bytes(path)
        finally:
            secure.stop()


def test_an_edge_without_its_fast_path_does_not_start_unless_told(
    region: Region, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The PDU-level defences live on the fast path: no silent fallback to plain pynetdicom."""
    monkeypatch.setattr(fastnet, "check_compatible", lambda: False)  # as with another pynetdicom
    monkeypatch.delenv(fastnet.FAST_ENV, raising=False)
    with pytest.raises(PeerError, match=r"install the pinned version .*RENKEI_EDGE_FAST=0"):
        EdgeServer(region.config, "hub", region.store_dir)
    monkeypatch.setenv(fastnet.FAST_ENV, "0")
    with caplog.at_level(logging.WARNING, logger="renkei.edge"):
        server = EdgeServer(region.config, "hub", region.store_dir)
    assert not server.fast
    server.journal.close()
    assert any("defences against malformed" in r.getMessage() for r in caplog.records)


def test_plain_pynetdicom_path_when_the_fast_path_is_off(
    region: Region, storescp_bp: peers.Peer, tmp_path: Path
) -> None:
    """With fastnet off (an unknown pynetdicom), the edge still stores and retrieves correctly."""
    with EdgeServer(region.config, "hub", region.store_dir, fast=False) as server:
        study_uid, files = make_study(tmp_path / "s", 3)
        storescu(region.edge_port, files)
        assert server.stats.stored == 3
        for path in files:
            entry = server.journal.entry(meta_of(path)["MediaStorageSOPInstanceUID"])
            assert entry is not None and dataset_bytes(entry.path) == dataset_bytes(path)
        answers = _findscu(
            region,
            tmp_path,
            ["QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study_uid}", "NumberOfStudyRelatedInstances"],
        )
        assert [int(a.NumberOfStudyRelatedInstances) for a in answers] == [3]
        run(
            [
                "movescu",
                "-S",
                "-aet",
                "MOVESCU",
                "-aec",
                "HUB_SVR",
                "-aem",
                "STORESCP",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={study_uid}",
                "127.0.0.1",
                region.edge_port,
            ]
        )
        moved = files_by_sop(storescp_bp.workdir)
        assert {meta_of(f)["MediaStorageSOPInstanceUID"] for f in files} == set(moved)


def test_a_transfer_broken_off_mid_dataset_leaves_nothing(edge: EdgeServer, region: Region, tmp_path: Path) -> None:
    import struct

    path = make_instance(tmp_path / "a.dcm", study_uid=generate_uid(), series_uid=generate_uid(), size=64)
    meta = meta_of(path)
    ae = fastnet.FastAE(ae_title="STORESCU")
    ae.add_requested_context(meta["MediaStorageSOPClassUID"], [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", region.edge_port, ae_title="HUB_SVR")
    assert assoc.is_established
    context_id = next(iter(assoc._accepted_cx))

    def element(elem: int, value: bytes) -> bytes:
        return struct.pack("<HHL", 0, elem, len(value)) + value

    def uid(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join(
        (
            element(0x0002, uid(meta["MediaStorageSOPClassUID"])),
            element(0x0100, struct.pack("<H", 0x0001)),
            element(0x0110, struct.pack("<H", 1)),
            element(0x0700, struct.pack("<H", 0)),
            element(0x0800, struct.pack("<H", 0)),
            element(0x1000, uid(meta["MediaStorageSOPInstanceUID"])),
        )
    )
    command = element(0x0000, struct.pack("<L", len(body))) + body
    half = dataset_bytes(path)[:2000]
    pdvs = (
        struct.pack(">LBB", len(command) + 2, context_id, 0x03)
        + command
        + struct.pack(">LBB", len(half) + 2, context_id, 0x00)
        + half
    )  # not the last fragment
    assoc.dul.socket.send(struct.pack(">BBL", 0x04, 0, len(pdvs)) + pdvs)
    if edge.fast:  # the fast path streams a dataset to tmp/ as it arrives (plain pynetdicom holds it in memory)
        eventually(lambda: list((region.store_dir / "tmp").iterdir()), 5, "the partial dataset in tmp/", 0.01)
    else:
        time.sleep(0.5)  # nothing to observe meanwhile: give the edge the time to (wrongly) store something
    assoc.abort()
    eventually(lambda: not list((region.store_dir / "tmp").iterdir()), 5, "tmp/ emptied after the abort", 0.01)
    assert edge.journal.summary().instances == 0
    storescu(region.edge_port, [path])
    assert edge.journal.summary().instances == 1


def test_large_instances_are_read_back_from_their_file(
    edge: EdgeServer, region: Region, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above fastnet.KEEP_IN_MEMORY a dataset is only written, then checked from its file."""
    monkeypatch.setattr(fastnet, "KEEP_IN_MEMORY", 4096)
    study_uid, files = make_study(tmp_path / "s", 3, size=128)  # 32 KiB of pixels each
    first = files[0]
    storescu(region.edge_port, files + [first])
    assert edge.stats.stored == 3 and edge.stats.duplicates == 1
    for path in files:
        entry = edge.journal.entry(meta_of(path)["MediaStorageSOPInstanceUID"])
        assert entry is not None and dataset_bytes(entry.path) == dataset_bytes(path)
        assert hashlib.sha256(entry.path.read_bytes()).hexdigest() == entry.instance.sha256
    other = make_instance(tmp_path / "t.dcm", study_uid=study_uid, series_uid=generate_uid(), size=128)
    meta = meta_of(other)
    status = _send_raw(
        region.edge_port,
        dataset_bytes(other)[:-100],
        meta["MediaStorageSOPClassUID"],
        meta["MediaStorageSOPInstanceUID"],
    )
    assert status == 0xC000 and edge.stats.refused == 1  # truncated: refused after reading it back
    assert not list((region.store_dir / "tmp").iterdir())
    assert len(edge.journal.instances(study_uid)) == 3
