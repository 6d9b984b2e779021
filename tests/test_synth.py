"""Synthetic studies: valid DICOM (dcmtk reads them cleanly), exact Japanese names in both
character sets, CT that compresses like CT, determinism, shared people across sites."""

from __future__ import annotations

import datetime as dt
import re
import subprocess
import sys
import zlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers_parts import EXAMPLE_CONFIG, REPO, require_program
from pydicom.uid import ExplicitVRLittleEndian

from renkei import synth
from renkei.config import RegionConfig, load_config
from renkei.errors import UsageError
from renkei.peers import dcmtk_env
from renkei.uids import is_valid_uid

SEED = 11
SMALL = {"ct_slices": 4, "size": 64}


@pytest.fixture(scope="module")
def config() -> RegionConfig:
    return load_config(EXAMPLE_CONFIG)


@pytest.fixture(scope="module")
def written(config: RegionConfig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, synth.SynthResult]:
    """Five patients at the hub (CT, MR, CR) and at clinic-a (CT, MR, DX), small images."""
    out = tmp_path_factory.mktemp("synth")
    return {
        "hub": synth.generate_site(config, "hub", 5, SEED, out / "hub", **SMALL),
        "clinic-a": synth.generate_site(
            config, "clinic-a", 5, SEED, out / "clinic-a", modalities=("CT", "MR", "DX"), **SMALL
        ),
    }


def _files(result: synth.SynthResult) -> list[Path]:
    return sorted(result.out_dir.rglob("*.dcm"))


def _dcmdump(args: list[str]) -> subprocess.CompletedProcess:
    require_program("dcmdump", "dcmtk")
    return subprocess.run(["dcmdump", *args], capture_output=True, env=dcmtk_env(), timeout=120)


def _problems(proc: subprocess.CompletedProcess) -> list[str]:
    text = proc.stdout.decode("latin-1") + "\n" + proc.stderr.decode("latin-1")
    return [line for line in text.splitlines() if re.match(r"^\s*[EWF]:", line)]


def _jis_pn_bytes(name: str) -> bytes:
    """PN bytes under ISO 2022 IR 6\\ISO 2022 IR 87, encoded here without pydicom: each
    component returns to ASCII before the next '^' or '='."""
    return b"=".join(b"^".join(part.encode("iso2022_jp") for part in group.split("^")) for group in name.split("="))


# -- people ---------------------------------------------------------------------------------


def test_population_is_deterministic_with_one_deliberate_homonym_pair() -> None:
    pool = synth.population(SEED, 300)
    assert pool == synth.population(SEED, 300)
    assert synth.population(SEED, 50) == pool[:50]
    assert synth.population(SEED + 1, 50) != pool[:50]
    first, second = synth.homonym_pair(SEED)
    assert first.person_id != second.person_id
    assert first.demographics == second.demographics
    by_demographics: dict[tuple[str, ...], list[str]] = defaultdict(list)
    for person in pool:
        by_demographics[person.demographics].append(person.person_id)
    duplicated = [ids for ids in by_demographics.values() if len(ids) > 1]
    assert duplicated == [[first.person_id, second.person_id]]
    for person in pool:
        assert person.sex in ("M", "F")
        born = dt.datetime.strptime(person.birth_date, "%Y%m%d").date()
        assert born < synth.REFERENCE_DATE
        assert person.family_romaji.isascii() and person.given_romaji.isascii()
        assert re.fullmatch(r"[\u3041-\u3096\u30a1-\u30f6ー]+", person.family_kana + person.given_kana)
        assert synth.jis_encodable(person.patient_name), person.patient_name
    scripts = {"katakana" if "\u30a1" <= p.family_kana[0] <= "\u30f6" else "hiragana" for p in pool}
    assert scripts == {"katakana", "hiragana"}


def test_every_name_in_the_lists_is_jis_x_0208() -> None:
    for kanji, kana, romaji, *_ in synth.SURNAMES + synth.GIVEN_NAMES_MALE + synth.GIVEN_NAMES_FEMALE:
        assert synth.jis_encodable(kanji + kana + synth.katakana(kana)), kanji
        assert romaji.isascii() and romaji[0].isupper()
    assert not synth.jis_encodable("𠮷野家")  # outside JIS X 0208
    assert synth.katakana("やまだ") == "ヤマダ"


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_any_two_sites_with_five_patients_share_a_person_under_different_ids(config: RegionConfig, seed: int) -> None:
    patients = {site_id: synth.site_patients(config, site_id, 5, seed) for site_id in config.site_ids}
    for site_id, registered in patients.items():
        site = config.site(site_id)
        assert len(registered) == 5
        assert len({p.patient_id for p in registered}) == 5
        assert len({p.person.person_id for p in registered}) == 5
        assert {p.issuer_of_patient_id for p in registered} == {site.issuer}
        assert synth.site_patients(config, site_id, 3, seed) == registered[:3]
    ids = list(config.site_ids)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            people_a = {p.person.person_id: p for p in patients[a]}
            shared = [p for p in patients[b] if p.person.person_id in people_a]
            assert shared, f"{a} and {b} share nobody for seed {seed}"
            for p in shared:
                other = people_a[p.person.person_id]
                assert p.patient_id != other.patient_id
                assert p.person.demographics == other.person.demographics
                assert p.patient_name == other.patient_name
    # each site numbers its patients its own way
    formats = {site_id: re.sub(r"\d", "9", patients[site_id][0].patient_id) for site_id in ids}
    assert len(set(formats.values())) == len(ids), formats
    # both character sets appear at every site
    for registered in patients.values():
        assert {p.specific_character_set for p in registered} == {synth.CHARSET_JIS, synth.CHARSET_UTF8}


def test_homonyms_are_registered_only_on_request(config: RegionConfig) -> None:
    first, second = synth.homonym_pair(SEED)
    default = [p.person.person_id for s in config.site_ids for p in synth.site_patients(config, s, 20, SEED)]
    assert first.person_id not in default and second.person_id not in default
    hub = synth.site_patients(config, "hub", 6, SEED, include_homonyms=True)
    clinic = synth.site_patients(config, "clinic-a", 6, SEED, include_homonyms=True)
    hub_ids = {p.person.person_id: p.patient_id for p in hub}
    assert first.person_id in hub_ids and second.person_id in hub_ids
    assert hub_ids[first.person_id] != hub_ids[second.person_id]
    assert first.person_id in {p.person.person_id for p in clinic}
    assert second.person_id not in {p.person.person_id for p in clinic}


def test_errors_are_usage_errors(config: RegionConfig) -> None:
    with pytest.raises(UsageError, match="at least 1"):
        synth.site_patients(config, "hub", 0, SEED)
    with pytest.raises(UsageError, match="unknown site"):
        synth.site_patients(config, "nowhere", 3, SEED)
    with pytest.raises(UsageError, match="unknown modality"):
        synth.plan_site(config, "hub", synth.site_patients(config, "hub", 1, SEED), SEED, modalities=("PET",))


# -- plans ----------------------------------------------------------------------------------


def test_default_plan_follows_the_issue_sizes(config: RegionConfig) -> None:
    plans = synth.plan_site(config, "hub", synth.site_patients(config, "hub", 6, SEED), SEED)
    by_modality = defaultdict(list)
    for plan in plans:
        for series in plan.series:
            by_modality[series.modality].append(series)
    assert set(by_modality) == {"CT", "MR", "CR"}
    assert all(s.instances >= 100 and s.rows == s.columns == 512 for s in by_modality["CT"])
    assert all(s.rows >= 1024 for s in by_modality["CR"])


def test_hub_exams_ordered_by_a_clinic_name_that_clinic(config: RegionConfig) -> None:
    hub_patients = synth.site_patients(config, "hub", 8, SEED)
    plans = synth.plan_site(config, "hub", hub_patients, SEED, **SMALL)
    ordered = [p for p in plans if config.site_for_name(p.info.requesting_service)]
    assert ordered, "no hub study was ordered by a clinic"
    for plan in ordered:
        clinic = config.site_for_name(plan.info.requesting_service)
        assert config.site(clinic).role == "clinic"
        assert clinic == plan.patient.referring_site
        assert plan.info.referring_physician in synth.site_doctors(config, clinic, SEED)
        # that person is a patient of the clinic too, under the clinic's own ID
        at_clinic = {p.person.person_id: p for p in synth.site_patients(config, clinic, 8, SEED)}
        assert plan.patient.person.person_id in at_clinic
        assert at_clinic[plan.patient.person.person_id].patient_id != plan.patient.patient_id
    local = [p for p in plans if p not in ordered]
    assert local and all(p.info.referring_physician in synth.site_doctors(config, "hub", SEED) for p in local)
    for site_id in ("clinic-a", "clinic-b"):
        clinic_plans = synth.plan_site(config, site_id, synth.site_patients(config, site_id, 5, SEED), SEED, **SMALL)
        assert all(p.info.requesting_service == "" for p in clinic_plans)


def test_study_dates_accessions_and_priors(config: RegionConfig) -> None:
    for site_id in config.site_ids:
        plans = synth.plan_site(config, site_id, synth.site_patients(config, site_id, 10, SEED), SEED, **SMALL)
        accessions = [p.info.accession_number for p in plans]
        assert len(set(accessions)) == len(accessions)
        assert all(0 < len(a) <= 16 for a in accessions)
        assert len({p.info.study_uid for p in plans}) == len(plans)
        per_patient = defaultdict(list)
        for plan in plans:
            study_day = dt.datetime.strptime(plan.info.study_date, "%Y%m%d").date()
            assert dt.datetime.strptime(plan.patient.birth_date, "%Y%m%d").date() < study_day
            assert study_day < synth.REFERENCE_DATE
            assert re.fullmatch(r"\d{6}", plan.info.study_time)
            assert re.fullmatch(r"\d{3}[DWMY]", plan.patient_age)
            per_patient[plan.info.patient_id].append(study_day)
        assert any(len(days) > 1 for days in per_patient.values()), "no patient has priors"
        assert any(max(days) - min(days) > dt.timedelta(days=365) for days in per_patient.values())


# -- files ----------------------------------------------------------------------------------


def test_dcmdump_reads_every_file_without_error_or_warning(written: dict[str, synth.SynthResult]) -> None:
    files = [f for result in written.values() for f in _files(result)]
    seen = set()
    for f in files:
        ds = pydicom.dcmread(f)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.max() <= 4095 and pixels.std() > 1
        seen.add(
            (
                ds.Modality,
                ds.SpecificCharacterSet
                if isinstance(ds.SpecificCharacterSet, str)
                else "\\".join(ds.SpecificCharacterSet),
            )
        )
    assert {m for m, _ in seen} == {"CT", "MR", "CR", "DX"}
    assert {c for _, c in seen} == {synth.CHARSET_JIS, synth.CHARSET_UTF8}
    for chunk in range(0, len(files), 100):
        proc = _dcmdump([str(f) for f in files[chunk : chunk + 100]])
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        assert _problems(proc) == []
        assert proc.stdout.count(b"(7fe0,0010) OW") == len(files[chunk : chunk + 100])


def test_full_size_ct_is_clean_and_compresses_like_ct(tmp_path: Path) -> None:
    study = synth.write_single_study(tmp_path, "CT", slices=4, size=512, seed=SEED)
    assert study.instance_count == 4
    proc = _dcmdump([str(f) for f in study.files])
    assert proc.returncode == 0 and _problems(proc) == []
    for path in study.files:
        ds = pydicom.dcmread(path)
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (512, 512, 16, 12, 0)
        raw = ds.PixelData
        ratio = len(raw) / len(zlib.compress(raw))
        assert 1.5 <= ratio <= 5.0, f"zlib ratio {ratio:.2f}"
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        centre = hu[200:312, 200:312]
        assert ds.pixel_array.max() <= 4095
        assert (hu[:8, 256] < -900).all()  # air above the patient
        assert centre.std() > 5 and -200 < np.median(centre) < 200  # soft tissue with noise, not flat
        assert (hu > 300).sum() > 200  # bone


def test_japanese_names_round_trip_exactly_in_both_character_sets(
    written: dict[str, synth.SynthResult],
) -> None:
    checked = defaultdict(int)
    for result in written.values():
        for study in result.studies:
            path = study.files[0]
            data = path.read_bytes()
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            charset = (
                "\\".join(ds.SpecificCharacterSet)
                if not isinstance(ds.SpecificCharacterSet, str)
                else ds.SpecificCharacterSet
            )
            assert charset == study.patient.specific_character_set == study.info.specific_character_set
            name = study.patient.patient_name
            assert str(ds.PatientName) == name == study.info.patient_name
            assert ds.PatientName.ideographic == study.patient.person.kanji_name
            assert ds.PatientName.phonetic == study.patient.person.kana_name
            assert str(ds.ReferringPhysicianName) == study.info.referring_physician
            assert ds.StudyDescription == study.info.study_description
            if charset == synth.CHARSET_JIS:
                expected = _jis_pn_bytes(name)
                assert b"\x1b$B" in expected
                assert name.split("=")[1].encode("utf-8") not in data
            else:
                expected = name.encode("utf-8")
            assert expected + (b" " if len(expected) % 2 else b"") in data
            checked[charset] += 1
    assert checked[synth.CHARSET_JIS] and checked[synth.CHARSET_UTF8]


def test_jis_bytes_that_look_like_delimiters_are_not_delimiters(tmp_path: Path) -> None:
    """山本 encodes as 0x3B 0x33 0x4B 0x5C and 修 as 0x3D 0x24: bytes that are '\\' and '=' in ASCII.
    Only single-byte delimiters count (PS3.5 6.1.2.3), so the name must survive whole."""
    base = synth.person_at(SEED, 0)
    person = synth.Person(base.person_id, "山本", "修", "ヤマモト", "オサム", "Yamamoto", "Osamu", base.birth_date, "M")
    assert b"\\" in "山本".encode("iso2022_jp") and b"=" in "修".encode("iso2022_jp")
    patient = synth.SitePatient(person, "synthetic", "X0001", "SYN", specific_character_set=synth.CHARSET_JIS)
    study = synth.write_single_study(tmp_path, "CR", size=16, patient=patient)
    ds = pydicom.dcmread(study.files[0])
    assert str(ds.PatientName) == person.patient_name
    assert ds.PatientName.ideographic == "山本^修"
    assert _jis_pn_bytes(person.patient_name) in study.files[0].read_bytes()
    proc = _dcmdump([str(study.files[0])])
    assert proc.returncode == 0 and _problems(proc) == []


def test_dcmtk_decodes_the_same_names(written: dict[str, synth.SynthResult]) -> None:
    """dcmtk's view of the bytes: UTF-8 names via +U8, ISO 2022 names as raw escapes."""
    jis = next(s for r in written.values() for s in r.studies if s.patient.specific_character_set == synth.CHARSET_JIS)
    utf8 = next(
        s for r in written.values() for s in r.studies if s.patient.specific_character_set == synth.CHARSET_UTF8
    )
    proc = _dcmdump(["+U8", "+P", "PatientName", str(utf8.files[0])])
    assert proc.returncode == 0 and _problems(proc) == []
    assert f"[{utf8.patient.patient_name}]" in proc.stdout.decode("utf-8")
    # Debian's dcmtk converts with glibc iconv, which has no ISO 2022 IR 87: read the raw value
    proc = _dcmdump(["+P", "PatientName", str(jis.files[0])])
    assert proc.returncode == 0 and _problems(proc) == []
    raw = re.search(rb"PN \[(.*)\]", proc.stdout).group(1)
    # decoded as one ISO 2022 stream: the delimiters are ASCII because every component
    # switches back to ASCII before them (a 2-byte JIS character may hold 0x5E or 0x3D bytes)
    assert raw.decode("iso2022_jp") == jis.patient.patient_name


def test_uids_hierarchy_and_sop_classes(written: dict[str, synth.SynthResult], config: RegionConfig) -> None:
    sop_uids, series_of_study = set(), defaultdict(set)
    for site_id, result in written.items():
        site = config.site(site_id)
        infos = {s.info.study_uid: s.info for s in result.studies}
        instance_numbers = defaultdict(list)
        for study in result.studies:
            for path in study.files:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                study_uid, series_uid, sop_uid = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
                assert all(is_valid_uid(u) and u.startswith("2.25.") for u in (study_uid, series_uid, sop_uid))
                assert path.relative_to(result.out_dir).parts == (study_uid, series_uid, f"{sop_uid}.dcm")
                assert sop_uid not in sop_uids
                sop_uids.add(sop_uid)
                series_of_study[study_uid].add(series_uid)
                assert ds.SOPClassUID == synth.SOP_CLASS_OF_MODALITY[ds.Modality]
                meta = ds.file_meta
                assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
                assert meta.MediaStorageSOPInstanceUID == sop_uid
                assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert meta.ImplementationClassUID == synth.IMPLEMENTATION_CLASS_UID
                info = infos[study_uid]
                assert (ds.PatientID, ds.IssuerOfPatientID) == (info.patient_id, site.issuer)
                assert ds.AccessionNumber == info.accession_number
                assert ds.InstitutionName == site.institution_name
                assert ds.Manufacturer == "renkei-synth"
                assert ds.StationName and ds.StudyID == info.study_id
                assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 16
                assert ds.Modality in info.modalities
                instance_numbers[series_uid].append((int(ds.InstanceNumber), ds))
        for numbered in instance_numbers.values():
            numbered.sort(key=lambda x: x[0])
            assert [n for n, _ in numbered] == list(range(1, len(numbered) + 1))
            if numbered[0][1].Modality in ("CT", "MR"):
                z = [float(ds.ImagePositionPatient[2]) for _, ds in numbered]
                assert z == sorted(z, reverse=True) and len(set(z)) == len(z)
                assert [float(ds.SliceLocation) for _, ds in numbered] == z
                assert float(numbered[0][1].SliceThickness) > 0 and len(numbered[0][1].PixelSpacing) == 2
                assert len({ds.FrameOfReferenceUID for _, ds in numbered}) == 1
            if numbered[0][1].Modality == "CT":
                assert (numbered[0][1].RescaleIntercept, numbered[0][1].RescaleSlope) == (-1024, 1)
    all_series = [s for group in series_of_study.values() for s in group]
    assert len(all_series) == len(set(all_series))
    assert not set(all_series) & sop_uids and not set(series_of_study) & sop_uids


def test_same_seed_same_bytes_other_seed_other_files(
    written: dict[str, synth.SynthResult], config: RegionConfig, tmp_path: Path
) -> None:
    again = synth.generate_site(config, "hub", 5, SEED, tmp_path / "again", **SMALL)
    first = {f.relative_to(written["hub"].out_dir): f for f in _files(written["hub"])}
    second = {f.relative_to(again.out_dir): f for f in _files(again)}
    assert first.keys() == second.keys() and len(first) > 10
    for rel, path in first.items():
        assert path.read_bytes() == second[rel].read_bytes(), rel
    assert again.study_infos == written["hub"].study_infos
    other = synth.generate_site(config, "hub", 5, SEED + 1, tmp_path / "other", **SMALL)
    other_files = {f.relative_to(other.out_dir) for f in _files(other)}
    assert not other_files & first.keys()
    assert [p.patient_name for p in other.patients] != [p.patient_name for p in written["hub"].patients]


def test_study_datasets_can_be_sent_without_writing(config: RegionConfig) -> None:
    plan = synth.plan_site(config, "clinic-b", synth.site_patients(config, "clinic-b", 1, SEED), SEED, **SMALL)[0]
    uids = [ds.SOPInstanceUID for ds in synth.study_datasets(plan)]
    assert len(uids) == plan.instance_count == len(set(uids))
    assert uids == [s.sop_instance_uid(i) for s in plan.series for i in range(s.instances)]


def test_institution_outside_jis_falls_back_to_utf8(config: RegionConfig) -> None:
    site = config.site("clinic-c").model_copy(update={"institution_name": "𠮷田クリニック"})
    patient = next(
        p for p in synth.site_patients(config, "clinic-c", 5, SEED) if p.specific_character_set == synth.CHARSET_JIS
    )
    plan = synth.plan_study(
        site,
        patient,
        study_uid="2.25.1",
        modality="CR",
        study_date=dt.date(2025, 1, 6),
        study_time="093000",
        accession_number="C1",
        study_id="1",
        referring_physician="",
        ct_slices=1,
        size=16,
    )
    assert plan.info.specific_character_set == synth.CHARSET_UTF8


def test_dciodvfy_finds_each_iod_complete(written: dict[str, synth.SynthResult]) -> None:
    """dicom3tools' IOD checker, when installed: no error in any modality's IOD."""
    require_program("dciodvfy", "dicom3tools")
    by_modality = {}
    for result in written.values():
        for study in result.studies:
            by_modality.setdefault(study.info.modalities[0], study.files[0])
    assert set(by_modality) == {"CT", "MR", "CR", "DX"}
    for modality, path in by_modality.items():
        proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=60)
        errors = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.startswith("Error")]
        raw = pydicom.dcmread(path, stop_before_pixels=True)
        real = []
        for line in errors:
            # PS3.5 6.1.2.3: a 05/12 byte inside a 2-byte JIS X 0208 character is no delimiter,
            # but dciodvfy (like dcmtk 3.6.7) counts it as one: not an error of the file
            found = re.search(r"Value Multiplicity.*Element=<(\w+)>", line)
            if found and b"\x1b$B" in raw[found.group(1)].value.original_string:
                continue
            # PN allows 64 characters per component group (PS3.5 6.2); dciodvfy checks the whole value
            found = re.search(r"\((0x[0-9a-f]{4}),(0x[0-9a-f]{4})\) PN .*Length invalid", line)
            if found:
                value = raw[int(found.group(1), 16), int(found.group(2), 16)].value.original_string
                if all(len(group) <= 64 for group in value.split(b"=")):
                    continue
            if "contains invalid data values" in line or "Bad attribute Value Multiplicity Type" in line:
                continue  # summaries of the lines above; any real cause is kept in `real`
            real.append(line)
        assert real == [], f"{modality}: {real}"


# -- command line ---------------------------------------------------------------------------


def _renkei(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "renkei.cli.main", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_writes_a_site_and_prints_a_summary(tmp_path: Path, config: RegionConfig) -> None:
    out = tmp_path / "out"
    proc = _renkei(
        "synth",
        "--config",
        str(EXAMPLE_CONFIG),
        "--site",
        "clinic-a",
        "--patients",
        "2",
        "--seed",
        "3",
        "--out",
        str(out),
        "--ct-slices",
        "2",
        "--size",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    patients = synth.site_patients(config, "clinic-a", 2, 3)
    files = list(out.rglob("*.dcm"))
    assert files
    assert re.search(rf"wrote \d+ studies, \d+ series, {len(files)} instances", proc.stdout)
    for p in patients:
        assert p.patient_id in proc.stdout
        for text in (p.person.family_kanji + "^", p.person.family_romaji + "^", p.person.kana_name):
            assert text not in proc.stdout and text not in proc.stderr  # no names in summary or logs


def test_cli_site_all_writes_one_folder_per_site(tmp_path: Path, config: RegionConfig) -> None:
    proc = _renkei(
        "synth",
        "--config",
        str(EXAMPLE_CONFIG),
        "--site",
        "all",
        "--patients",
        "1",
        "--out",
        str(tmp_path),
        "--ct-slices",
        "1",
        "--size",
        "16",
        "--modalities",
        "CR",
    )
    assert proc.returncode == 0, proc.stderr
    for site_id in config.site_ids:
        files = list((tmp_path / site_id).rglob("*.dcm"))
        assert files and all(pydicom.dcmread(f).InstitutionName == config.site(site_id).institution_name for f in files)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--site", "nowhere"], "unknown site 'nowhere'"),
        (["--site", "hub", "--patients", "0"], "--patients must be at least 1"),
        (["--site", "hub", "--modalities", "CT,PET"], "--modalities"),
    ],
)
def test_cli_usage_errors_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = _renkei("synth", "--config", str(EXAMPLE_CONFIG), "--out", str(tmp_path / "o"), *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unwritable_output_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = _renkei(
        "synth",
        "--config",
        str(EXAMPLE_CONFIG),
        "--site",
        "hub",
        "--out",
        str(blocker / "sub"),
        "--ct-slices",
        "1",
        "--size",
        "16",
    )
    assert proc.returncode == 2
    assert "choose a folder you can write to" in proc.stderr and "Traceback" not in proc.stderr
