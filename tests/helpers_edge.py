"""Helpers for the edge tests: a region config with free ports, small generated instances,
dcmtk runs, and comparison of stored files."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from renkei import peers
from renkei.config import load_config

REPO = Path(__file__).resolve().parents[1]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SOP_CLASS_OF = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE, "CR": CR_IMAGE_STORAGE}
CHARSET_JIS = ["ISO 2022 IR 6", "ISO 2022 IR 87"]
CHARSET_UTF8 = "ISO_IR 192"
CLIENT_AES = ("STORESCU", "FINDSCU", "MOVESCU", "GETSCU", "ECHOSCU", "STORESCP")


@dataclass
class Region:
    """A one-hub region written for a test: ports, AE titles and the config file."""

    path: Path
    edge_port: int
    pacs_port: int
    storescp_port: int
    store_dir: Path
    edge_ae: str = "HUB_SVR"
    pacs_ae: str = "ORTHANC"
    extra: dict = field(default_factory=dict)

    @property
    def config(self):
        return load_config(self.path)


def write_region(
    folder: Path,
    *,
    stable_age: float = 1.0,
    pacs_port: int | None = None,
    storescp_port: int | None = None,
    tls: dict | None = None,
    edge_port: int | None = None,
) -> Region:
    """Write a region YAML under `folder`: a hub whose edge listens on a free port."""
    folder.mkdir(parents=True, exist_ok=True)
    edge_port = edge_port or peers.free_port()
    pacs_port = pacs_port or peers.free_port()
    storescp_port = storescp_port or peers.free_port()
    store_dir = folder / "edge-store"
    edge = {
        "ae_title": "HUB_SVR",
        "host": "127.0.0.1",
        "port": edge_port,
        "stable_age": stable_age,
        "store": str(store_dir),
    }
    if tls:
        edge["tls"] = tls
    workstations = []
    for ae in CLIENT_AES:
        port = storescp_port if ae == "STORESCP" else peers.free_port()
        workstations.append({"ae_title": ae, "host": "127.0.0.1", "port": port})
    data = {
        "version": 1,
        "region": "test",
        "sites": [
            {
                "id": "hub",
                "name": "Test hub",
                "role": "hub",
                "edge": edge,
                "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port},
                "workstations": workstations,
            },
            {
                "id": "clinic-a",
                "name": "Test clinic",
                "role": "clinic",
                "edge": {"ae_title": "CLA_SVR", "host": "127.0.0.1", "port": peers.free_port()},
            },
        ],
    }
    path = folder / "region.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return Region(path, edge_port, pacs_port, storescp_port, store_dir)


def make_instance(
    out: Path,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    patient_name: str = "Test^Patient",
    patient_id: str = "P1",
    charset: str | list[str] = CHARSET_UTF8,
    modality: str = "CT",
    study_date: str = "20260101",
    study_time: str = "101500",
    instance_number: int = 1,
    size: int = 16,
    seed: int = 0,
    accession: str = "A1",
    description: str = "test study",
) -> Path:
    """Write one small image instance (explicit VR little endian) and return its path."""
    with warnings.catch_warnings():  # tests write invalid UIDs on purpose
        warnings.simplefilter("ignore")
        return _make_instance(
            out,
            study_uid=study_uid,
            series_uid=series_uid,
            sop_uid=sop_uid,
            patient_name=patient_name,
            patient_id=patient_id,
            charset=charset,
            modality=modality,
            study_date=study_date,
            study_time=study_time,
            instance_number=instance_number,
            size=size,
            seed=seed,
            accession=accession,
            description=description,
        )


def _make_instance(
    out: Path,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None,
    patient_name: str,
    patient_id: str,
    charset: str | list[str],
    modality: str,
    study_date: str,
    study_time: str,
    instance_number: int,
    size: int,
    seed: int,
    accession: str,
    description: str,
) -> Path:
    sop_uid = sop_uid or generate_uid()
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SOP_CLASS_OF.get(modality, CT_IMAGE_STORAGE)
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "M"
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.StudyDescription = description
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Rows = size
    ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed + instance_number)
    ds.PixelData = rng.integers(0, 4096, (size, size), dtype=np.uint16).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # tests write invalid UIDs on purpose
        warnings.simplefilter("ignore")
        ds.save_as(out, enforce_file_format=True)
    return out


def make_study(
    folder: Path, count: int, *, study_uid: str | None = None, size: int = 16, series: int = 1, **kwargs
) -> tuple[str, list[Path]]:
    """`count` instances of one study (spread over `series` series); returns (study UID, files)."""
    study_uid = study_uid or generate_uid()
    series_uids = [generate_uid() for _ in range(series)]
    files = []
    for i in range(count):
        files.append(
            make_instance(
                folder / f"{i:05d}.dcm",
                study_uid=study_uid,
                series_uid=series_uids[i % series],
                instance_number=i + 1,
                size=size,
                **kwargs,
            )
        )
    return study_uid, files


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part 10 file (everything after the File Meta group)."""
    from renkei.edge.parsing import split_file_meta

    data = Path(path).read_bytes()
    _meta, offset = split_file_meta(data)
    return data[offset:]


def meta_of(path: Path) -> dict[str, str]:
    from renkei.edge.parsing import split_file_meta

    meta, _offset = split_file_meta(Path(path).read_bytes()[:65536])
    return meta


def run(args: Sequence[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a dcmtk command with TCP_NODELAY; returns the completed process."""
    return peers.run_dcmtk([str(a) for a in args], timeout=timeout, check=check)


def storescu(
    port: int,
    files: Iterable[Path],
    called: str = "HUB_SVR",
    calling: str = "STORESCU",
    extra: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess:
    return run(
        ["storescu", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *[str(f) for f in files]],
        check=check,
    )


def files_by_sop(folder: Path) -> dict[str, Path]:
    """Map SOP Instance UID -> file for every Part 10 file under `folder`."""
    out = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            try:
                out[meta_of(path)["MediaStorageSOPInstanceUID"]] = path
            except Exception:
                continue
    return out


def edge_subprocess(region: Region, data_dir: Path, log: Path) -> subprocess.Popen:
    """`renkei edge serve` as a real process (its own session, output to `log`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    # a lone edge has no deployments to trigger: without this, a Prefect API that another test of the
    # same worker process started would make it log "no deployment sync_site/..." errors
    env.pop("PREFECT_API_URL", None)
    handle = open(log, "ab")
    try:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "renkei.cli.main",
                "edge",
                "serve",
                "--site",
                "hub",
                "--config",
                str(region.path),
                "--data-dir",
                str(data_dir),
            ],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    finally:
        handle.close()


def read_back(path: Path) -> Dataset:
    return dcmread(path)
