"""fetch_priors as real flow runs with Orthanc as the hub's PACS: reconciled priors, nothing when ambiguous."""

from __future__ import annotations

import pytest
from helpers_parts import require_program
from helpers_region import LONG_AGO, layout_of, put_into_edge, region_config

from renkei import peers, synth
from renkei.runtime import open_catalog


@pytest.fixture(scope="module")
def region_with_priors(tmp_path_factory, prefect_api):
    from renkei.flows.sync_site import sync_site

    require_program("Orthanc", "orthanc")
    tmp_path = tmp_path_factory.mktemp("priors")
    data_dir = tmp_path / "renkei-data"
    config_path = region_config(tmp_path, stable_age=0.2, pacs_at=("hub",))
    lay = layout_of(config_path, data_dir)
    patients = {}
    for site in ("hub", "clinic-a", "clinic-b"):
        patients[site] = synth.site_patients(lay.config, site, 4, 5, include_homonyms=True)
        result = synth.generate_site(
            lay.config,
            site,
            patients[site],
            5,
            tmp_path / "synth" / site,
            ct_slices=2,
            size=32,
            modalities=("CT", "CR"),
        )
        put_into_edge(lay, site, result.files, received_ago=LONG_AGO)
    for site in ("hub", "clinic-a", "clinic-b"):
        sync_site(site, str(config_path), str(data_dir))
    hub = lay.config.site("hub")
    orthanc = peers.start_orthanc(
        tmp_path / "hub-pacs",
        ae_title=hub.pacs.ae_title,
        dicom_port=hub.pacs.port,
        modalities={"HUB_SVR": (hub.edge.ae_title, "127.0.0.1", hub.edge.port)},
    )
    try:
        yield config_path, lay, patients, orthanc
    finally:
        orthanc.stop()


def test_an_ambiguous_patient_fetches_nothing(region_with_priors) -> None:
    from renkei.flows.fetch_priors import fetch_priors

    config_path, lay, patients, orthanc = region_with_priors
    first, second = synth.homonym_pair(5)
    homonym = next(p for p in patients["hub"] if p.person == first)
    result = fetch_priors(
        "hub",
        homonym.patient_id,
        homonym.issuer_of_patient_id,
        lookback_years=30,
        config=str(config_path),
        data_dir=str(lay.data_dir),
    )
    assert result["resolution"]["method"] == "ambiguous"
    assert len(result["resolution"]["candidates"]) >= 3 and result["studies"] == []
    assert orthanc.instances() == []


def test_priors_land_in_the_hub_pacs_under_the_hub_patient_id(region_with_priors) -> None:
    from renkei.flows.fetch_priors import fetch_priors

    config_path, lay, patients, orthanc = region_with_priors
    shared = patients["hub"][0]  # registered at every site under each site's own ID
    clinic_ids = {p.patient_id for s in ("clinic-a", "clinic-b") for p in patients[s] if p.person == shared.person}
    assert len(clinic_ids) == 2 and shared.patient_id not in clinic_ids
    result = fetch_priors(
        "hub",
        shared.patient_id,
        shared.issuer_of_patient_id,
        lookback_years=30,
        config=str(config_path),
        data_dir=str(lay.data_dir),
    )
    assert result["resolution"]["method"] == "auto-exact"
    studies = result["studies"]
    assert studies and {s["from"] for s in studies} == {"clinic-a", "clinic-b"}
    with open_catalog(lay) as catalog:
        expected = {s["study_uid"]: catalog.study(s["study_uid"]).instance_count for s in studies}
    in_pacs = {}
    for oid in orthanc.instances():
        tags = orthanc.rest("GET", f"/instances/{oid}/tags?simplify")
        in_pacs.setdefault(tags["StudyInstanceUID"], []).append(tags)
    assert {uid: len(v) for uid, v in in_pacs.items()} == expected
    for tags_list in in_pacs.values():
        for tags in tags_list:
            assert tags["PatientID"] == shared.patient_id
            assert tags["IssuerOfPatientID"] == shared.issuer_of_patient_id
            others = {o["PatientID"] for o in tags["OtherPatientIDsSequence"]}
            assert others & clinic_ids
    # the archived originals are unchanged: still the clinics' IDs in the center
    with open_catalog(lay) as catalog:
        for uid in expected:
            assert catalog.study(uid).patient_id in clinic_ids
    # a second admission finds everything already in the PACS and imports nothing again
    again = fetch_priors(
        "hub",
        shared.patient_id,
        shared.issuer_of_patient_id,
        lookback_years=30,
        config=str(config_path),
        data_dir=str(lay.data_dir),
    )
    assert all(s["result"] == "already in the PACS" for s in again["studies"])
    assert len(orthanc.instances()) == sum(expected.values())


@pytest.mark.parametrize("convert", [False, True], ids=["as-archived", "utf-8"])
def test_an_opt_in_utf8_copy_reads_right_in_orthanc_and_the_archive_is_unchanged(
    region_with_priors, tmp_path, convert: bool
) -> None:
    """Orthanc 1.10 does not decode ISO 2022 IR 87; with pacs.convert_to_utf8 its copy is UTF-8."""
    import dataclasses
    import hashlib

    from renkei.imports import import_to_pacs
    from renkei.runtime import open_store

    config_path, lay, patients, _ = region_with_priors
    hub = lay.config.site("hub")
    with open_catalog(lay) as catalog:
        jis = [
            r
            for r in catalog.visible_studies("hub")
            if r.origin_site != "hub" and "ISO 2022 IR 87" in r.specific_character_set and "=" in r.patient_name
        ]
        assert jis, "no clinic study in ISO 2022 IR 87 granted to the hub"
        study = jis[0]
        rows = catalog.instances(study.study_uid)
        orthanc = peers.start_orthanc(
            tmp_path / "pacs",
            ae_title=hub.pacs.ae_title,
            modalities={"HUB_SVR": (hub.edge.ae_title, "127.0.0.1", hub.edge.port)},
        )
        try:
            pacs = hub.pacs.model_copy(update={"port": orthanc.port, "convert_to_utf8": convert})
            sites = tuple(s.model_copy(update={"pacs": pacs}) if s.id == "hub" else s for s in lay.config.sites)
            layout = dataclasses.replace(lay, config=lay.config.model_copy(update={"sites": sites}))
            store = open_store(layout)
            result = import_to_pacs(
                layout, catalog, store, "hub", study.study_uid, "H-UTF8", "NAGASAKI-HUB", skip_if_complete=False
            )
            assert result.ok and result.sent == len(rows), result.failures
            ideographic = study.patient_name.split("=")[1]
            names = set()
            for oid in orthanc.instances():
                tags = orthanc.rest("GET", f"/instances/{oid}/tags?simplify")
                names.add(tags["PatientName"])
                assert tags["PatientID"] == "H-UTF8"
                if convert:
                    assert tags["SpecificCharacterSet"] == "ISO_IR 192"
            assert len(orthanc.instances()) == len(rows)
            if convert:
                assert names == {study.patient_name}, (names, study.patient_name)
            else:  # what the operator saw, and why the option exists
                assert not any(ideographic in n for n in names), names
            # the archive keeps the bytes it received
            for row in rows:
                data = store.read_verified(row["object_key"], row["sha256"])
                assert hashlib.sha256(data).hexdigest() == row["sha256"]
                assert b"\x1b$B" in data  # still ISO 2022 escapes in the archived copy
        finally:
            orthanc.stop()
