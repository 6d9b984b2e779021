"""Sharing applied to a real catalog (local folder): flags, publish/unpublish, consent, explain, audit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from helpers_parts import EXAMPLE_CONFIG

from renkei.catalog.catalog import Catalog
from renkei.cli.main import main
from renkei.config import Layout, load_config
from renkei.errors import PolicyError
from renkei.records import InstanceInfo, StudyBatch, StudyInfo
from renkei.sharing import Sharing
from renkei.uids import derive_uid


def batch(origin: str, n: int, patient_id: str, **study_kw) -> StudyBatch:
    study_uid = derive_uid("study", origin, n)
    series_uid = derive_uid("series", origin, n)
    info = StudyInfo(
        study_uid=study_uid,
        origin_site=origin,
        patient_id=patient_id,
        issuer_of_patient_id=f"{origin.upper()}-ISSUER",
        patient_name="Yamada^Taro=山田^太郎=やまだ^たろう",
        study_date="20261101",
        modalities=("CT",),
        **study_kw,
    )
    inst = InstanceInfo(
        study_uid,
        series_uid,
        derive_uid("sop", origin, n),
        "1.2.840.10008.5.1.4.1.1.2",
        "1.2.840.10008.1.2.1",
        100,
        hashlib.sha256(f"{origin}{n}".encode()).hexdigest(),
        "CT",
    )
    return StudyBatch(info, (inst,))


@pytest.fixture
def region(data_dir):
    config = load_config(EXAMPLE_CONFIG)
    layout = Layout(config, data_dir)
    catalog = Catalog.from_layout(layout)
    studies = {
        "clinic-a": batch("clinic-a", 1, "A-1"),
        "clinic-c": batch("clinic-c", 1, "C-1"),
        "hub-private": batch("hub", 1, "H-1"),
        "hub-for-c": batch("hub", 2, "H-2", requesting_service="Goto Clinic"),
    }
    for b in studies.values():
        catalog.register(b, b.study.origin_site)
    try:
        yield config, catalog, Sharing(config, catalog), {k: b.study.study_uid for k, b in studies.items()}
    finally:
        catalog.close()


def visible(sharing: Sharing, site: str, uids: dict[str, str]) -> set[str]:
    return {k for k, u in uids.items() if sharing.decide(site, u).allowed}


def test_flag_applies_the_source_rules_once(region) -> None:
    config, catalog, sharing, uids = region
    result = sharing.apply_rules(list(uids.values()))
    assert sorted((s, r) for _, s, r in result.granted) == [
        ("clinic-c", "hub-exam-to-referring-clinic"),
        ("hub", "clinic-studies-to-hub"),
        ("hub", "clinic-studies-to-hub"),
    ]
    assert sharing.apply_rules(list(uids.values())).granted == ()  # idempotent
    assert visible(sharing, "hub", uids) == {"clinic-a", "clinic-c", "hub-private", "hub-for-c"}
    assert visible(sharing, "clinic-a", uids) == {"clinic-a"}
    assert visible(sharing, "clinic-b", uids) == set()
    assert visible(sharing, "clinic-c", uids) == {"clinic-c", "hub-for-c"}
    # the catalog's own visibility query agrees with the decision function
    for site in config.site_ids:
        from_catalog = {r.study_uid for r in catalog.visible_studies(site)}
        assert from_catalog == {uids[k] for k in visible(sharing, site, uids)}, site
    actions = [(e.action, e.target_site) for e in catalog.audit()]
    assert actions.count(("grant", "hub")) == 2 and ("grant", "clinic-c") in actions


def test_publish_unpublish_and_no_regrant_by_rule(region) -> None:
    _, catalog, sharing, uids = region
    sharing.apply_rules(list(uids.values()))
    assert sharing.publish(uids["hub-private"], ["clinic-b"], "dr-sato", "consult") == ["clinic-b"]
    assert sharing.decide("clinic-b", uids["hub-private"]).allowed
    assert sharing.unpublish(uids["hub-for-c"], ["clinic-c"], "dr-sato", "wrong patient") == ["clinic-c"]
    assert not sharing.decide("clinic-c", uids["hub-for-c"]).allowed
    sharing.apply_rules([uids["hub-for-c"]])  # a later sync must not undo the person's act
    assert not sharing.decide("clinic-c", uids["hub-for-c"]).allowed
    with pytest.raises(Exception, match="own site"):
        sharing.publish(uids["clinic-a"], ["clinic-a"], "x")
    with pytest.raises(PolicyError, match="not in the catalog"):
        sharing.publish("1.2.3.4", ["hub"], "x")
    trail = [(e.action, e.actor, e.target_site) for e in catalog.audit_trail(uids["hub-private"])]
    assert ("grant", "dr-sato", "clinic-b") in trail


def test_consent_withdrawal_revokes_rule_grants_and_blocks_new_ones(region) -> None:
    _, catalog, sharing, uids = region
    sharing.apply_rules(list(uids.values()))
    assert sharing.decide("hub", uids["clinic-a"]).allowed
    assert sharing.withdraw_consent("clinic-a", "A-1", "CLINIC-A-ISSUER", "clerk-1", "patient asked") == 1
    decision = sharing.decide("hub", uids["clinic-a"])
    assert not decision.allowed and decision.basis == "consent-withdrawn"
    assert sharing.apply_rules([uids["clinic-a"]]).skipped_consent == (uids["clinic-a"],)
    with pytest.raises(PolicyError, match="withdrew consent"):
        sharing.publish(uids["clinic-a"], ["hub"], "dr-x")
    assert sharing.give_consent("clinic-a", "A-1", "CLINIC-A-ISSUER", "clerk-1", "patient agreed") == 1
    assert sharing.decide("hub", uids["clinic-a"]).allowed
    actions = [e.action for e in catalog.audit()]
    assert "consent-withdrawn" in actions and "consent-given" in actions


def test_explain_names_the_rule_or_the_act(region) -> None:
    _, _, sharing, uids = region
    sharing.apply_rules(list(uids.values()))
    text = "\n".join(sharing.explain("hub", uids["clinic-c"]))
    assert "MAY see" in text and "clinic-studies-to-hub" in text
    text = "\n".join(sharing.explain("clinic-a", uids["clinic-c"]))
    assert "may NOT see" in text and "no rule grants" in text
    sharing.unpublish(uids["hub-for-c"], ["clinic-c"], "dr-sato", "wrong patient")
    text = "\n".join(sharing.explain("clinic-c", uids["hub-for-c"]))
    assert "may NOT see" in text and "would grant" in text and "dr-sato" in text and "wrong patient" in text


def test_cli_publish_explain_consent(region, data_dir, capsys) -> None:
    _, catalog, sharing, uids = region
    base = ["--config", str(EXAMPLE_CONFIG), "--data-dir", str(data_dir)]
    assert (
        main(
            [
                "publish",
                uids["hub-private"],
                "--to",
                "clinic-a",
                "--reason",
                "second opinion",
                "--operator",
                "dr-kato",
                *base,
            ]
        )
        == 0
    )
    assert "published" in capsys.readouterr().out
    assert main(["explain", uids["hub-private"], "--site", "clinic-a", *base]) == 0
    out = capsys.readouterr().out
    assert "MAY see" in out and "dr-kato" in out and "second opinion" in out
    assert main(["unpublish", uids["hub-private"], "--from", "clinic-a", *base]) == 0
    assert main(["explain", uids["hub-private"], "--site", "clinic-a", *base]) == 0
    assert "may NOT see" in capsys.readouterr().out
    assert main(["publish", uids["hub-private"], "--to", "clinic-z", *base]) == 2
    assert "unknown site 'clinic-z'" in capsys.readouterr().err
    assert (
        main(["consent", "withdraw", "--site", "clinic-c", "--patient-id", "C-1", "--issuer", "CLINIC-C-ISSUER", *base])
        == 0
    )
    assert "consent withdrawn" in capsys.readouterr().out


def test_deliveries_ask_the_decision_too(region, data_dir) -> None:
    from renkei.errors import PolicyError
    from renkei.imports import cache_at_edge
    from renkei.runtime import open_store

    config, catalog, sharing, uids = region
    sharing.apply_rules(list(uids.values()))
    layout = Layout(config, data_dir)
    with pytest.raises(PolicyError, match="may not receive"):
        cache_at_edge(layout, catalog, open_store(layout), "clinic-b", uids["clinic-a"])


def test_a_study_without_issuer_is_registered_under_its_site_and_consent_reaches_it(tmp_path, data_dir) -> None:
    import pydicom
    from helpers_region import layout_of, put_into_edge, region_config
    from pydicom.data import get_testdata_file

    from renkei import transfer
    from renkei.runtime import open_catalog, open_journal, open_store

    sample = Path(get_testdata_file("CT_small.dcm"))
    assert "IssuerOfPatientID" not in pydicom.dcmread(sample)
    lay = layout_of(region_config(tmp_path, stable_age=0.1, pacs_at=()), data_dir)
    put_into_edge(lay, "clinic-a", [sample])
    with open_journal(lay, "clinic-a") as journal, open_catalog(lay) as catalog:
        uids = transfer.studies_to_sync(journal, 0, now=__import__("time").time() + 1)
        transfer.upload_study(journal, open_store(lay), "clinic-a", uids[0])
        transfer.register_studies(journal, catalog, "clinic-a", uids, default_issuer=lay.config.site("clinic-a").issuer)
        row = catalog.study(uids[0])
        assert row.issuer_of_patient_id == lay.config.site("clinic-a").issuer
        sharing = Sharing(lay.config, catalog)
        sharing.apply_rules(uids)
        assert sharing.decide("hub", uids[0]).allowed
        assert sharing.withdraw_consent("clinic-a", row.patient_id, "", "clerk") == 1
        assert not sharing.decide("hub", uids[0]).allowed
