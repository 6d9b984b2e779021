"""The sharing policy's pure decisions on the example region (the source system's rules)."""

from __future__ import annotations

import pytest
import yaml
from helpers_parts import EXAMPLE_CONFIG

from renkei.config import load_config, parse_config
from renkei.policy import GrantFact, decide, referring_site, rule_grants
from renkei.records import StudyInfo


@pytest.fixture(scope="module")
def config():
    return load_config(EXAMPLE_CONFIG)


def study(origin: str, **kw) -> StudyInfo:
    return StudyInfo(study_uid=kw.pop("study_uid", "1.2.3"), origin_site=origin, patient_id="P1", **kw)


def test_clinic_study_goes_to_the_hub_only(config) -> None:
    for clinic in ("clinic-a", "clinic-b", "clinic-c"):
        grants = rule_grants(config, study(clinic, modalities=("CT",)))
        assert [(g.site, g.rule) for g in grants] == [("hub", "clinic-studies-to-hub")]


def test_hub_study_is_private_unless_a_clinic_referred_it(config) -> None:
    assert rule_grants(config, study("hub")) == []
    assert rule_grants(config, study("hub", referring_physician="Nakamura^Ken")) == []
    grants = rule_grants(config, study("hub", requesting_service="Goto Clinic"))
    assert [(g.site, g.rule) for g in grants] == [("clinic-c", "hub-exam-to-referring-clinic")]
    assert "RequestingService" in grants[0].reason


def test_referring_site_from_a_mapping_of_physician_names(config) -> None:
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    raw["policy"]["referring_site"] = {"attributes": ["ReferringPhysicianName"], "mapping": {"tanaka^*": "clinic-b"}}
    custom = parse_config(yaml.safe_dump(raw, allow_unicode=True))
    s = study("hub", referring_physician="Tanaka^Ichiro=田中^一郎=たなか^いちろう", requesting_service="Goto Clinic")
    assert referring_site(custom, s) == ("clinic-b", "ReferringPhysicianName")
    assert [g.site for g in rule_grants(custom, s)] == ["clinic-b"]
    # the Japanese alias of a site is recognised too
    assert referring_site(config, study("hub", requesting_service="大浦診療所"))[0] == "clinic-a"


def test_rules_by_modality_and_named_sites() -> None:
    raw = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    raw["policy"]["rules"] = [
        {
            "name": "mr-to-a",
            "when": {"origin_sites": ["clinic-b"], "modalities": ["MR"]},
            "grant_to": {"sites": ["clinic-a"]},
        }
    ]
    custom = parse_config(yaml.safe_dump(raw))
    assert [g.site for g in rule_grants(custom, study("clinic-b", modalities=("MR", "SR")))] == ["clinic-a"]
    assert rule_grants(custom, study("clinic-b", modalities=("CT",))) == []
    assert rule_grants(custom, study("clinic-c", modalities=("MR",))) == []


def test_decide_origin_grant_and_denial(config) -> None:
    s = study("clinic-c")
    assert decide(config, "clinic-c", s, []).basis == "origin"
    denied = decide(config, "hub", s, [])
    assert not denied.allowed and "would grant" in denied.explanation
    granted = decide(
        config, "hub", s, [GrantFact("hub", "rule", "clinic-studies-to-hub", "every hub", "t", "clinic-studies-to-hub")]
    )
    assert granted.allowed and granted.basis == "grant"
    other = decide(config, "clinic-a", s, [GrantFact("hub", "rule", "r", "", "t", "r")])
    assert not other.allowed and "no rule grants" in other.explanation
    assert not decide(config, "hub", None, [], study_uid="9.9").allowed


def test_withdrawn_consent_denies_rule_grants_but_keeps_a_persons_publication(config) -> None:
    s = study("clinic-a")
    rule = GrantFact("hub", "rule", "clinic-studies-to-hub", "", "t", "clinic-studies-to-hub")
    assert not decide(config, "hub", s, [rule], consent_withdrawn=True).allowed
    person = GrantFact("hub", "person", "dr-admin", "emergency", "t")
    assert decide(config, "hub", s, [rule, person], consent_withdrawn=True).allowed
