"""The catalog's read-only report queries (what the operator's dashboard draws from)."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path

import pytest
from helpers_catalog import ROOT, make_batch, total_size

from renkei.catalog import Catalog, GrantRequest
from renkei.config import load_config
from renkei.sharing import Sharing

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nagasaki.yaml"


@pytest.fixture
def cat(tmp_path: Path):
    catalog = Catalog(str(tmp_path / "catalog"), writer="test")
    try:
        yield catalog
    finally:
        catalog.close()


def test_registrations_and_study_registrations(cat: Catalog) -> None:
    a1, a2 = make_batch(1, 3, series=2), make_batch(2, 2)
    hub = make_batch(3, 4, site="hub", issuer="HUB")
    cat.register_many([a1, a2])
    middle = dt.datetime.now(dt.UTC)
    cat.register(hub)
    late = make_batch(1, 2, series=2, first=4)  # two late instances of study 1
    cat.register(late)

    batches = cat.registrations()
    assert [(b.origin_site, b.studies, b.instances, b.bytes) for b in batches] == [
        ("clinic-a", 2, 5, total_size([a1, a2])),
        ("hub", 1, 4, total_size([hub])),
        ("clinic-a", 1, 2, total_size([late])),
    ]
    assert batches[0].at <= batches[1].at <= batches[2].at
    assert [b.origin_site for b in cat.registrations(since=middle)] == ["hub", "clinic-a"]
    assert [b.origin_site for b in cat.registrations(until=middle)] == ["clinic-a"]

    studies = cat.study_registrations()
    assert [s.study_uid for s in studies] == [f"{ROOT}.1", f"{ROOT}.3", f"{ROOT}.2"]  # newest last instance first
    first = studies[0]
    assert (first.instances, first.bytes) == (5, total_size([a1, late]))
    assert first.first_registered_at == batches[0].at and first.last_registered_at == batches[2].at
    assert [s.study_uid for s in cat.study_registrations(limit=1)] == [f"{ROOT}.1"]
    assert {s.study_uid for s in cat.study_registrations(since=middle)} == {f"{ROOT}.1", f"{ROOT}.3"}


def test_visibility_counts_agree_with_every_decision(cat: Catalog) -> None:
    config = load_config(EXAMPLE)
    sharing = Sharing(config, cat)
    batches = [
        make_batch(1, 1, site="clinic-a", patient_id="A1", issuer="OURA-CLINIC"),
        make_batch(2, 1, site="clinic-a", patient_id="A2", issuer="OURA-CLINIC"),
        make_batch(3, 1, site="clinic-b", patient_id="B1", issuer="HANAOKA-CLINIC"),
        make_batch(4, 1, site="clinic-c", patient_id="C1", issuer="GOTO-CLINIC"),
        make_batch(5, 1, site="hub", patient_id="H1", issuer="NAGASAKI-HUB"),
        make_batch(6, 1, site="hub", patient_id="H2", issuer="NAGASAKI-HUB"),
    ]
    cat.register_many(batches)
    uids = [b.study.study_uid for b in batches]
    sharing.apply_rules(uids)  # every clinic study to the hub
    sharing.publish(uids[4], ["clinic-b", "clinic-c"], "operator", "referral")
    sharing.publish(uids[0], ["clinic-b"], "operator", "second opinion")  # a person's grant
    sharing.unpublish(uids[4], ["clinic-c"], "operator", "sent by mistake")
    sharing.withdraw_consent("clinic-a", "A1", "OURA-CLINIC", "operator", "patient asked")
    cat.grant(uids[0], "clinic-c", "rule", "late-rule")  # a rule grant racing the withdrawal: not in force

    counts = cat.visibility_counts()
    # the SQL relation and the decision are one rule: every list, page and single check agrees with decide
    for viewer in config.site_ids:
        listed = {r.study_uid for r in cat.visible_studies(viewer)}
        paged = {r.study_uid for r in cat.studies_page(visible_to=viewer, limit=100)[1]}
        for b in batches:
            uid = b.study.study_uid
            decided = sharing.decide(viewer, uid).allowed
            assert decided == (uid in listed) == (uid in paged) == cat.may_see(viewer, uid), (viewer, uid)
    for viewer, origin in itertools.product(config.site_ids, repeat=2):
        expected = sum(
            1 for b in batches if b.study.origin_site == origin and sharing.decide(viewer, b.study.study_uid).allowed
        )
        assert counts.get((viewer, origin), 0) == expected, (viewer, origin)
    # the cases above really happened: consent stops the rule grant, not the person's
    assert counts[("hub", "clinic-a")] == 1 and counts[("clinic-b", "clinic-a")] == 1
    assert counts[("clinic-b", "hub")] == 1 and ("clinic-c", "hub") not in counts
    assert ("clinic-c", "clinic-a") not in counts


def test_recent_audit_and_instance_locations(cat: Catalog) -> None:
    batch = make_batch(1, 3)
    cat.register(batch)
    for n in range(5):
        cat.append_audit("hub", f"HUB_WS{n}", "find" if n % 2 else "retrieve", batch.study.study_uid, "clinic-a")
    cat.append_audit("center", "verify_backups", "verify-backups", detail={"instances": 3, "findings": 1})

    newest = cat.recent_audit(limit=3)
    assert [e.action for e in newest] == ["verify-backups", "retrieve", "find"]
    assert newest[0].event_no > newest[1].event_no > newest[2].event_no
    access = cat.recent_audit(["find", "retrieve"], limit=10)
    assert [e.actor for e in access] == [f"HUB_WS{n}" for n in (4, 3, 2, 1, 0)]
    assert cat.recent_audit(["verify-backups"], limit=1)[0].detail["findings"] == 1
    assert cat.recent_audit([]) == []

    sop = [i.sop_instance_uid for i in batch.instances]
    cat.set_locations(
        [
            {
                "study_uid": batch.study.study_uid,
                "sop_instance_uid": sop[0],
                "holder": "center",
                "state": "missing",
                "by": "verify_backups",
                "detail": "no edge copy",
            }
        ]
    )
    cat.set_locations(
        [
            {
                "study_uid": batch.study.study_uid,
                "sop_instance_uid": sop[1],
                "holder": "center",
                "state": "verified",
                "by": "verify_backups",
                "detail": "uploaded again",
            }
        ]
    )
    found = cat.instance_locations(by="verify_backups")
    assert [(f.sop_instance_uid, f.state) for f in found] == [(sop[1], "verified"), (sop[0], "missing")]
    assert cat.instance_locations(by="someone-else") == []
    # a later record by another writer replaces the state the filter sees
    cat.set_locations(
        [
            {
                "study_uid": batch.study.study_uid,
                "sop_instance_uid": sop[0],
                "holder": "center",
                "state": "verified",
                "by": "operator",
                "detail": "restored by hand",
            }
        ]
    )
    assert [f.sop_instance_uid for f in cat.instance_locations(by="verify_backups")] == [sop[1]]
    assert len(cat.instance_locations(limit=1)) == 1


def test_series_summaries_and_study_locations_match_the_per_study_queries(cat: Catalog) -> None:
    batches = [make_batch(1, 5, series=2), make_batch(2, 3, series=3), make_batch(3, 1, site="hub")]
    cat.register_many(batches)
    cat.register(make_batch(1, 2, series=3, first=6))  # late instances, one in a new series
    cat.set_locations(
        [
            {"study_uid": f"{ROOT}.1", "holder": "center", "state": "verified", "by": "flow-run:x"},
            {"study_uid": f"{ROOT}.1", "holder": "edge:clinic-a", "state": "present", "by": "flow-run:x"},
        ]
    )
    uids = [f"{ROOT}.{n}" for n in (1, 2, 3)] + [f"{ROOT}.404"]
    series = cat.series_summaries(uids)
    for uid in uids[:3]:
        expected = {}
        for inst in cat.instances(uid):
            expected[inst["series_uid"]] = expected.get(inst["series_uid"], 0) + 1
        assert {s["series_uid"]: s["instances"] for s in series[uid]} == expected
        assert [s["series_uid"] for s in series[uid]] == [s["series_uid"] for s in cat.series(uid)]
    assert series[uids[3]] == [] and cat.series_summaries([]) == {}
    locations = cat.study_locations(uids)
    for uid in uids:
        assert locations[uid] == cat.locations(uid, include_instances=False)
    assert {l.holder: l.state for l in locations[uids[0]]} == {"center": "verified", "edge:clinic-a": "present"}


def test_studies_page_agrees_with_visible_studies(cat: Catalog) -> None:
    batches = [
        make_batch(
            n,
            1,
            site=site,
            patient_id=f"P{n % 3}",
            study_date=f"2024{1 + n % 12:02d}{1 + n:02d}",
            modality=("CT", "MR")[n % 2],
        )
        for n, site in enumerate(["hub", "clinic-a", "clinic-b", "clinic-c"] * 4, start=1)
    ]
    cat.register_many(batches)
    uids = {b.study.study_uid: b for b in batches}
    clinic = [u for u, b in uids.items() if b.study.origin_site != "hub"]
    cat.grant_many([GrantRequest(u, "hub", "rule", "clinic-studies-to-hub") for u in clinic])
    cat.grant_many([GrantRequest(clinic[0], "hub", "person", "operator", action="revoke")])

    def newest(rows: list) -> list:
        return sorted(rows, key=lambda r: (r.study_date, r.study_time, r.study_uid), reverse=True)

    for kwargs in (
        {},
        {"patient_id": "P1"},
        {"date_from": "20240301", "date_to": "20240930"},
        {"modalities": ["MR"]},
        {"patient_id": "P2", "modalities": ["CT"]},
    ):
        for viewer in ("hub", "clinic-a"):
            expected = newest(
                cat.visible_studies(
                    viewer,
                    patient_ids=[(kwargs["patient_id"], None)] if "patient_id" in kwargs else None,
                    **{k: v for k, v in kwargs.items() if k != "patient_id"},
                )
            )
            total, rows = cat.studies_page(visible_to=viewer, limit=100, **kwargs)
            assert (total, rows) == (len(expected), expected), (viewer, kwargs)
    everything = newest(
        [
            r
            for site in ("hub", "clinic-a", "clinic-b", "clinic-c")
            for r in cat.visible_studies(site)
            if r.origin_site == site
        ]
    )
    total, rows = cat.studies_page(origin_sites=["clinic-b", "hub"], limit=100)
    assert rows == [r for r in everything if r.origin_site in ("clinic-b", "hub")] and total == len(rows)
    total, first = cat.studies_page(limit=5)
    total2, second = cat.studies_page(limit=5, offset=5)
    assert total == total2 == len(batches) and len(first) == len(second) == 5
    assert first + second == newest(first + second)
    assert not {r.study_uid for r in first} & {r.study_uid for r in second}
    assert cat.studies_page(limit=5, offset=100) == (len(batches), [])
    assert cat.studies_page(visible_to="clinic-a", origin_sites=["hub"]) == (0, [])


NAMES = {
    1: ("P-0042", "Yamada^Taro=山田^太郎=やまだ^たろう"),
    2: ("P-0043", "SATO^HANAKO=佐藤^花子=サトウ^ハナコ"),
    3: ("Q-7", "Yamamoto^Ken=山本^健=ヤマモト^ケン"),
    4: ("P-0420", "Tanaka^Ichiro"),
}


@pytest.mark.parametrize(
    "text, names, expected",
    [
        ("yamada", True, {1}),
        ("YAMADA taro", True, {1}),  # spaces and case do not matter, nor the ^ between the names
        ("山田", True, {1}),
        ("山田 太郎", True, {1}),
        ("やまもと", True, {3}),  # hiragana finds a katakana reading
        ("サトウ", True, {2}),
        ("さとう", True, {2}),
        ("ｙａｍａ", True, {1, 3}),  # full-width romaji
        ("ﾔﾏﾓﾄ", True, {3}),  # half-width katakana
        ("yama*", True, {1, 3}),  # a wildcard matches a whole component group
        ("*taro", True, {1}),
        ("*ro", True, {1, 4}),
        ("ta?aka*", True, {4}),
        ("0042", True, {1}),  # a part of a Patient ID
        ("p-004?", True, {1, 2}),  # a whole Patient ID with a wildcard
        ("A3", True, {3}),  # an accession number
        ("yamada", False, set()),  # an operator's view searches no names
        ("0042", False, {1}),
        ("*", True, {1, 2, 3, 4}),
        ("a.b(c)[d]+", True, set()),  # regular-expression characters are literal
        ("%", True, set()),
        ("_", True, set()),
    ],
)
def test_search_finds_ids_accessions_and_names_in_every_form(
    cat: Catalog, text: str, names: bool, expected: set[int]
) -> None:
    cat.register_many(
        [make_batch(n, 1, site="clinic-a", patient_id=pid, name=name) for n, (pid, name) in NAMES.items()]
    )
    total, rows = cat.studies_page(search=text, search_names=names, limit=100)
    found = {int(r.study_uid.rsplit(".", 1)[1]) for r in rows}
    assert (total, found) == (len(expected), expected)


def test_a_search_too_long_or_with_control_characters_is_refused(cat: Catalog) -> None:
    from renkei.errors import UsageError

    with pytest.raises(UsageError, match="at most 64"):
        cat.studies_page(search="x" * 65)
    with pytest.raises(UsageError, match="control"):
        cat.studies_page(search="ya\x00ma")
