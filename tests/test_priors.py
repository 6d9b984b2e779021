"""Priors: the person across sites by links or exact demographics, ambiguity, reconciled copies."""

from __future__ import annotations

import io

import pydicom
import pytest
from helpers_parts import EXAMPLE_CONFIG

from renkei import synth
from renkei.catalog.catalog import Catalog
from renkei.config import Layout, load_config
from renkei.priors import Demographics, find_priors, name_groups, reconcile, resolve_person
from renkei.records import StudyBatch
from renkei.sharing import Sharing


def _register_site(catalog: Catalog, config, site: str, patients) -> list:
    plans = synth.plan_site(config, site, patients, seed=11, ct_slices=2, size=32, modalities=("CT", "CR"))
    for plan in plans:
        catalog.register(StudyBatch(plan.info, ()), site)
    return plans


@pytest.fixture
def region(data_dir):
    config = load_config(EXAMPLE_CONFIG)
    catalog = Catalog.from_layout(Layout(config, data_dir))
    try:
        yield config, catalog
    finally:
        catalog.close()


def test_name_groups_fold_katakana_to_hiragana() -> None:
    assert name_groups("Yamada^Taro=山田^太郎=ヤマダ^タロウ") == name_groups("YAMADA^TARO=山田^太郎=やまだ^たろう")
    assert name_groups("Yamada^Taro") == ("", "")


def test_exact_match_links_and_finds_visible_priors(region) -> None:
    config, catalog = region
    hub_patients = synth.site_patients(config, "hub", 5, 11)
    per_site = {
        s: _register_site(catalog, config, s, synth.site_patients(config, s, 5, 11))
        for s in ("hub", "clinic-a", "clinic-b", "clinic-c")
    }
    Sharing(config, catalog).apply_rules([p.info.study_uid for plans in per_site.values() for p in plans])
    shared = hub_patients[0]  # the first people of the pool are registered at every site
    res = resolve_person(config, catalog, "hub", shared.patient_id, shared.issuer_of_patient_id)
    assert res.method == "auto-exact", res.detail
    sites = {s for s, _, _ in res.ids}
    assert sites == {"hub", "clinic-a", "clinic-b", "clinic-c"}
    assert all(pid != shared.patient_id for s, pid, _ in res.ids if s != "hub")
    priors = find_priors(catalog, res, lookback_years=30)
    assert priors and {r.origin_site for r in priors} == {"clinic-a", "clinic-b", "clinic-c"}
    # the link is kept: the next admission resolves without demographics
    again = resolve_person(config, catalog, "hub", shared.patient_id, shared.issuer_of_patient_id)
    assert again.method == "linked" and set(again.ids) == set(res.ids)
    # a clinic sees nothing of the other clinics: only hub exams its own doctors ordered
    clinic_id = next(x for x in res.ids if x[0] == "clinic-a")
    res_a = resolve_person(config, catalog, "clinic-a", clinic_id[1], clinic_id[2])
    priors_a = find_priors(catalog, res_a, lookback_years=30)
    assert {r.origin_site for r in priors_a} <= {"hub"}
    assert all(config.site_for_name(r.requesting_service) == "clinic-a" for r in priors_a)


def test_homonyms_are_ambiguous_and_fetch_nothing(region) -> None:
    config, catalog = region
    hub = synth.site_patients(config, "hub", 4, 11, include_homonyms=True)
    clinic = synth.site_patients(config, "clinic-a", 3, 11, include_homonyms=True)
    _register_site(catalog, config, "hub", hub)
    _register_site(catalog, config, "clinic-a", clinic)
    first, second = synth.homonym_pair(11)
    at_hub = [p for p in hub if p.person in (first, second)]
    assert len(at_hub) == 2
    res = resolve_person(config, catalog, "hub", at_hub[0].patient_id, at_hub[0].issuer_of_patient_id)
    assert res.method == "ambiguous" and not res.resolved
    assert len(res.candidates) == 3 and "renkei link" in res.detail
    assert find_priors(catalog, res) == []


def test_demographics_from_the_admission_when_the_catalog_has_none(region) -> None:
    config, catalog = region
    clinic = synth.site_patients(config, "clinic-b", 2, 11)
    _register_site(catalog, config, "clinic-b", clinic)
    person = clinic[0].person
    res = resolve_person(
        config,
        catalog,
        "hub",
        "NEW-1",
        "NAGASAKI-HUB",
        given=Demographics(person.patient_name, person.birth_date, person.sex),
    )
    assert res.method == "auto-exact" and ("clinic-b", clinic[0].patient_id, clinic[0].issuer_of_patient_id) in res.ids


def test_reconcile_changes_only_the_patient_id_and_keeps_the_original(tmp_path) -> None:
    study = synth.write_single_study(tmp_path, "CT", slices=1, size=32, seed=4)
    original = study.files[0].read_bytes()
    copy = reconcile(original, "H0009999", "NAGASAKI-HUB")
    a = pydicom.dcmread(io.BytesIO(original))
    b = pydicom.dcmread(io.BytesIO(copy))
    assert (b.PatientID, b.IssuerOfPatientID) == ("H0009999", "NAGASAKI-HUB")
    other = b.OtherPatientIDsSequence[0]
    assert (other.PatientID, other.get("IssuerOfPatientID", "")) == (a.PatientID, a.get("IssuerOfPatientID", ""))
    assert b.PatientName == a.PatientName and b.SOPInstanceUID == a.SOPInstanceUID
    assert b.StudyInstanceUID == a.StudyInstanceUID and b.PixelData == a.PixelData
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    assert study.files[0].read_bytes() == original  # the archived file is untouched
