"""The catalog, against a local folder and against S3 (moto over HTTP on loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers_catalog import BACKENDS, ROOT, backend_url, make_batch, total_size

from renkei.catalog import Catalog, GrantRequest
from renkei.catalog import fs as cfs
from renkei.catalog.engine import forget_verified
from renkei.errors import InvalidUID, UsageError


@pytest.fixture(params=BACKENDS)
def cat(request: pytest.FixtureRequest, tmp_path: Path):
    catalog = Catalog(backend_url(request, request.param, tmp_path, "catalog"), writer="test")
    try:
        yield catalog
    finally:
        catalog.close()


def test_registration_is_idempotent_and_counts_derive_from_instances(cat: Catalog) -> None:
    batch = make_batch(1, 6, series=2)
    first = cat.register(batch)
    assert (first.new_instances, first.already_present, first.new_series) == (6, 0, 2)
    state_before = cat.state.seq
    again = cat.register(batch)
    assert (again.new_instances, again.already_present, again.conflicts, again.seq) == (0, 6, (), None)
    assert cat.state.seq == state_before  # nothing was written at all
    late = make_batch(1, 3, series=3, first=7)  # late instances, one of them in a new series
    result = cat.register(late)
    assert (result.new_instances, result.new_series) == (3, 1)
    study = cat.study(f"{ROOT}.1")
    assert study is not None
    assert (study.instance_count, study.series_count) == (9, 3)
    assert study.bytes == total_size([batch, late])
    assert study.origin_site == "clinic-a" and study.modalities == ("CT",)
    assert len(cat.instances(f"{ROOT}.1")) == 9
    assert cat.instance_count() == 9
    keys = {row["object_key"] for row in cat.instances(f"{ROOT}.1")}
    assert f"objects/clinic-a/{ROOT}.1/{ROOT}.1.1/{ROOT}.1.1.1.dcm" in keys


def test_changed_checksum_is_a_conflict_never_an_overwrite(cat: Catalog) -> None:
    cat.register(make_batch(2, 4))
    changed = make_batch(2, 5, salt="edited")  # 4 known instances with other bytes, 1 new
    result = cat.register(changed)
    assert (result.new_instances, result.already_present, len(result.conflicts)) == (1, 0, 4)
    conflict = result.conflicts[0]
    assert conflict.existing_sha256 != conflict.new_sha256
    assert conflict.conflict_key.endswith(f".{conflict.new_sha256}.dcm")
    first = {r["sop_instance_uid"]: r for r in cat.instances(f"{ROOT}.2", version="first")}
    original = {i.sop_instance_uid: i.sha256 for i in make_batch(2, 4).instances}
    assert all(first[sop]["sha256"] == sha for sop, sha in original.items())  # the first rows stay
    # what retrieval serves is the latest version, under its own key
    current = {r["sop_instance_uid"]: r for r in cat.instances(f"{ROOT}.2")}
    edited = {i.sop_instance_uid: i for i in changed.instances}
    for sop in original:
        assert current[sop]["sha256"] == edited[sop].sha256 and current[sop]["corrected"]
        assert current[sop]["object_key"].endswith(f".{edited[sop].sha256}.dcm")
        assert current[sop]["size"] == edited[sop].size
    assert len(cat.conflicts(f"{ROOT}.2")) == 4
    assert "sent again" in cat.conflicts(f"{ROOT}.2")[0].why
    assert cat.study(f"{ROOT}.2").instance_count == 5
    assert cat.audit_trail(f"{ROOT}.2")[-1].outcome == "conflict"
    # the same version again is already registered: nothing recorded twice, nothing overwritten
    again = cat.register(changed)
    assert (len(again.conflicts), again.already_present) == (0, 5)
    assert len(cat.conflicts(f"{ROOT}.2")) == 4
    # both versions are verified by the nightly check
    keys = [r["object_key"] for part in cat.iter_instances() for r in part if r["study_uid"] == f"{ROOT}.2"]
    assert len(keys) == 9


def test_invalid_uids_are_refused(cat: Catalog) -> None:
    batch = make_batch(3, 1)
    bad = batch.instances[0].__class__(**{**batch.instances[0].to_dict(), "sop_instance_uid": "1.2.03"})
    with pytest.raises(InvalidUID):
        cat.register(batch.__class__(batch.study, (bad,)))
    with pytest.raises(UsageError):
        cat.register(make_batch(3, 1, site="Bad Site"))
    assert cat.state.seq == 0


def test_visibility_follows_origin_and_grants(cat: Catalog) -> None:
    cat.register(make_batch(10, 2, site="clinic-a", patient_id="A1", issuer="CLA", study_date="20240110"))
    cat.register(
        make_batch(11, 2, site="clinic-a", patient_id="A1", issuer="CLA", study_date="20240301", modality="MR")
    )
    cat.register(make_batch(12, 2, site="hub", patient_id="H1", issuer="HUB", study_date="20240201"))
    cat.register(make_batch(13, 2, site="clinic-b", patient_id="B1", issuer="CLB"))
    uid = lambda n: f"{ROOT}.{n}"  # noqa: E731

    assert [s.study_uid for s in cat.visible_studies("clinic-a")] == [uid(10), uid(11)]
    assert cat.visible_studies("hub", [("A1", "CLA")]) == []
    cat.grant(
        uid(10),
        "hub",
        "rule",
        "clinic-studies-to-hub",
        "clinic study",
        rule="clinic-studies-to-hub",
        policy_version="1",
    )
    cat.grant(uid(11), "hub", "rule", "clinic-studies-to-hub", "clinic study", rule="clinic-studies-to-hub")
    cat.grant(uid(12), "clinic-a", "person", "dr-tanaka", "referred by clinic A")
    assert [s.study_uid for s in cat.visible_studies("hub", [("A1", "CLA")])] == [uid(10), uid(11)]
    assert [s.study_uid for s in cat.visible_studies("hub", [("A1", None)], date_from="20240201")] == [uid(11)]
    assert [s.study_uid for s in cat.visible_studies("hub", [("A1", "CLA")], modalities=["CT"])] == [uid(10)]
    assert [s.study_uid for s in cat.visible_studies("hub", [("A1", "CLA")], date_to="20240131")] == [uid(10)]
    assert [s.study_uid for s in cat.visible_studies("clinic-a")] == [uid(10), uid(12), uid(11)]
    assert [s.study_uid for s in cat.visible_studies("clinic-b", [("A1", "CLA")])] == []
    assert cat.may_see("hub", uid(10)) and not cat.may_see("clinic-b", uid(10))

    # granting again changes nothing; a revocation hides the study; history is kept
    seq = cat.state.seq
    cat.grant(uid(10), "hub", "rule", "clinic-studies-to-hub", "again")
    assert cat.state.seq == seq
    cat.revoke(uid(10), "hub", "consent", "consent-withdrawn", "patient withdrew consent")
    assert [s.study_uid for s in cat.visible_studies("hub", [("A1", "CLA")])] == [uid(11)]
    history = cat.grants(uid(10))
    assert [(g.action, g.current) for g in history] == [("grant", False), ("revoke", True)]
    assert history[0].rule == "clinic-studies-to-hub" and history[0].policy_version == "1"
    assert not any(g.active for g in history)
    assert [g.study_uid for g in cat.active_grants_for_site("hub")] == [uid(11)]
    actions = [e.action for e in cat.audit_trail(uid(10))]
    assert actions == ["register", "grant", "revoke"]
    with pytest.raises(UsageError):
        cat.grant_many([GrantRequest(uid(10), "hub", "whim", "x")])


def test_locations_latest_state_per_holder(cat: Catalog) -> None:
    uid = f"{ROOT}.20"
    cat.register(make_batch(20, 3), holder="edge:clinic-a")
    cat.register(make_batch(20, 3))
    cat.set_location(uid, "center", "verified", detail="nightly")
    cat.set_location(uid, "pacs:hub", "present")
    cat.set_location(uid, "center", "corrupt", sop_instance_uid=f"{uid}.1.2", detail="sha mismatch")
    where = {(l.holder, l.sop_instance_uid): l for l in cat.locations(uid)}
    assert where[("center", None)].state == "verified" and where[("center", None)].verified_at is not None
    assert where[("edge:clinic-a", None)].state == "present"
    assert where[("pacs:hub", None)].state == "present"
    assert where[("center", f"{uid}.1.2")].state == "corrupt"
    assert [l.holder for l in cat.locations(uid, include_instances=False)] == ["center", "edge:clinic-a", "pacs:hub"]
    cat.set_location(uid, "pacs:hub", "removed")
    assert {l.holder: l.state for l in cat.locations(uid, include_instances=False)}["pacs:hub"] == "removed"
    with pytest.raises(UsageError):
        cat.set_location(uid, "center", "lost")


def test_totals_per_site_with_backlog(cat: Catalog) -> None:
    a1, a2, h1 = make_batch(30, 4), make_batch(31, 2), make_batch(32, 5, site="hub", issuer="HUB")
    cat.register(a1, holder="edge:clinic-a")
    cat.register(a1)
    cat.register(a2, holder="edge:clinic-a")
    cat.register(h1)
    totals = {t.site: t for t in cat.totals(pending={"clinic-a": 7, "clinic-c": 2})}
    # a2 is only at the edge: its 2 instances are counted once, and it is backlog
    assert (totals["clinic-a"].studies, totals["clinic-a"].instances) == (2, 6)
    assert totals["clinic-a"].bytes == total_size([a1, a2])
    assert totals["clinic-a"].backlog_studies == 2 and totals["clinic-a"].pending == 7
    assert (totals["hub"].studies, totals["hub"].instances, totals["hub"].backlog_studies) == (1, 5, 0)
    assert totals["clinic-c"].pending == 2
    cat.set_location(f"{ROOT}.30", "center", "verified")
    assert {t.site: t for t in cat.totals()}["clinic-a"].backlog_studies == 1


def test_patient_links_and_candidates(cat: Catalog) -> None:
    cat.register(make_batch(40, 1, site="clinic-a", patient_id="A7", issuer="CLA"))
    cat.register(make_batch(41, 1, site="hub", patient_id="H7", issuer="HUB"))
    cat.register(make_batch(42, 1, site="clinic-b", patient_id="B7", issuer="CLB", name="Sato^Hanako"))
    found = cat.find_patients(name="山田^太郎", birth_date="19500101", sex="M")
    assert [(c.site, c.patient_id) for c in found] == [("clinic-a", "A7"), ("hub", "H7")]
    assert [c.patient_id for c in cat.find_patients(name="yamada^taro")] == ["A7", "H7"]
    person = cat.link_patients(
        [("clinic-a", "A7", "CLA"), ("hub", "H7", "HUB")],
        "auto-exact",
        "policy",
        {"matched": ["name", "birth_date", "sex"]},
    )
    assert cat.person_of("hub", "H7", "HUB") == person == cat.person_of("clinic-a", "A7", "CLA")
    other = cat.link_patients([("clinic-b", "B7", "CLB"), ("clinic-c", "C7", "CLC")], "operator", "op-1")
    assert other != person
    merged = cat.link_patients([("hub", "H7", "HUB"), ("clinic-b", "B7", "CLB")], "operator", "op-1")
    assert merged == min(person, other)
    assert len(cat.patient_ids_of(merged)) == 4
    assert cat.unlink_patient("clinic-c", "C7", "CLC", "op-1", "wrong person")
    assert cat.person_of("clinic-c", "C7", "CLC") is None
    assert ("clinic-c", "C7", "CLC") not in cat.patient_ids_of(merged)
    assert cat.person_of("clinic-c", "NOPE", "CLC") is None


def test_kept_answers_follow_every_writer_and_compaction(cat: Catalog) -> None:
    """The per-study answers a C-MOVE asks are kept, and never outlive a commit that changes them.

    The writer here is another Catalog object on the same store (as another process would be); the
    reader `cat` has already asked each question once, so every answer after a change is a kept one
    unless the change is seen.
    """
    uid = f"{ROOT}.70"
    cat.register(make_batch(70, 2, site="clinic-a", patient_id="A7", issuer="CLA"))
    other = Catalog(cat.url, writer="other")
    try:
        asked = lambda: (  # noqa: E731
            cat.study(uid).instance_count,
            len(cat.instances(uid)),
            [(g.site, g.action) for g in cat.grants(uid)],
            getattr(cat.consent_of("clinic-a", "A7", "CLA"), "state", None),
        )
        assert asked() == asked() == (2, 2, [], None)
        other.grant(uid, "hub", "rule", "clinic-studies-to-hub", "clinic study")
        assert asked() == (2, 2, [("hub", "grant")], None)
        other.set_consent("clinic-a", "A7", "CLA", "withdrawn", "reception")
        other.revoke(uid, "hub", "consent", "consent-withdrawn", "patient withdrew consent")
        assert asked() == (2, 2, [("hub", "grant"), ("hub", "revoke")], "withdrawn")
        other.register(make_batch(70, 3, site="clinic-a", patient_id="A7", issuer="CLA"))  # a late instance
        assert asked()[:2] == (3, 3)
        edited = other.register(make_batch(70, 3, site="clinic-a", patient_id="A7", issuer="CLA", salt="edited"))
        assert edited.conflicts and all(r["corrected"] for r in cat.instances(uid))
        before = asked()
        other.auto_compact = None
        other.compact(force=True)
        assert asked() == before
        # an answer given is a copy: changing it changes nothing kept
        cat.instances(uid)[0]["object_key"] = "changed by a caller"
        assert "changed by a caller" not in {r["object_key"] for r in cat.instances(uid)}
    finally:
        other.close()


def test_consents_are_events(cat: Catalog) -> None:
    cat.set_consent("clinic-a", "A1", "CLA", "withdrawn", "reception", "paper form")
    assert cat.consent_of("clinic-a", "A1", "CLA").state == "withdrawn"
    assert [c.patient_id for c in cat.withdrawn_consents()] == ["A1"]
    cat.set_consent("clinic-a", "A1", "CLA", "given", "reception")
    assert cat.consent_of("clinic-a", "A1", "CLA").state == "given"
    assert cat.withdrawn_consents() == []
    assert [e.action for e in cat.audit(site="clinic-a")] == ["consent-withdrawn", "consent-given"]


def test_compaction_keeps_answers_and_bounds_files(cat: Catalog) -> None:
    cat.auto_compact = None
    for n in range(12):
        cat.register(make_batch(100 + n, 3, patient_id=f"P{n % 3}"))
        cat.grant(f"{ROOT}.{100 + n}", "hub", "rule", "r", "x")
    cat.set_location(f"{ROOT}.100", "center", "verified")
    before = (
        [s.to_dict() for s in cat.visible_studies("hub")],
        cat.locations(f"{ROOT}.100"),
        cat.totals(),
        cat.grants(f"{ROOT}.105"),
        len(cat.audit()),
    )
    assert cat.file_counts()["instances"] == 12
    result = cat.compact()  # fanout 8: 12 level-0 files fold into one level-1 file
    assert result.merged["instances"] == (12, 36)
    assert cat.file_counts()["instances"] == 1
    after = (
        [s.to_dict() for s in cat.visible_studies("hub")],
        cat.locations(f"{ROOT}.100"),
        cat.totals(),
        cat.grants(f"{ROOT}.105"),
        len(cat.audit()),
    )
    assert after == before
    assert cat.verify_audit().ok
    # a new reader starts from the checkpoint and sees the same
    fresh = Catalog(cat.url, writer="other")
    try:
        assert [s.to_dict() for s in fresh.visible_studies("hub")] == before[0]
    finally:
        fresh.close()
    # removed files are deleted only after the grace period
    removed = [p for p, _ in cat.state.removed]
    assert removed and all(cfs.exists(cat.fs, cfs.join(cat.root, p)) for p in removed)
    cat.compact(force=True)
    from renkei.catalog.compaction import compact

    done = compact(cat, vacuum_grace_s=0)
    assert done.vacuumed >= len(removed)
    assert not any(cfs.exists(cat.fs, cfs.join(cat.root, p)) for p in removed)
    assert after[0] == [s.to_dict() for s in cat.visible_studies("hub")]


def test_auto_compaction_bounds_files(cat: Catalog) -> None:
    cat.auto_compact = 4
    for n in range(10):
        cat.register(make_batch(200 + n, 2))
    cat.wait_for_compaction()
    assert cat.file_counts()["instances"] <= 5
    assert cat.instance_count() == 20
    assert all(cat.study(f"{ROOT}.{200 + n}").instance_count == 2 for n in range(10))


def test_audit_chain_detects_edit_delete_reorder(cat: Catalog) -> None:
    for n in range(3):
        cat.append_audit("hub", f"operator-{n}", "view", f"{ROOT}.{n}", "hub", detail={"n": n})
    events = cat.append_audits([])  # nothing
    assert events == []
    batch = cat.append_audits([])
    assert batch == []
    assert cat.verify_audit().ok and cat.verify_audit().events_checked == 3
    assert [e.event_no for e in cat.audit()] == [1, 2, 3]
    assert cat.audit(actor="operator-1")[0].detail == {"n": 1}
    assert [e.event_no for e in cat.audit(event_from=2)] == [2, 3]

    files = sorted(cat.state.files["audit"].values(), key=lambda f: f.seq)
    path = cfs.join(cat.root, files[1].path)
    original = cfs.read_bytes(cat.fs, path)

    def rewrite(mutate) -> None:
        import io

        table = pq.read_table(io.BytesIO(original))
        sink = io.BytesIO()
        pq.write_table(mutate(table), sink)
        cat.fs.pipe_file(path, sink.getvalue())
        cat.con.execute("SET parquet_metadata_cache = false")  # see the tampered file
        cat.con.execute("SET parquet_metadata_cache = true")

    import pyarrow as pa

    rewrite(lambda t: t.set_column(t.schema.get_field_index("actor"), "actor", pa.array(["mallory"])))
    report = cat.verify_audit()
    assert not report.ok and any("changed" in p for p in report.problems)
    rewrite(lambda t: t.slice(0, 0))  # delete event 2
    report = cat.verify_audit()
    assert not report.ok and any("missing" in p for p in report.problems)
    rewrite(lambda t: t.set_column(0, "event_no", pa.array([9], pa.int64())))  # move it elsewhere
    assert not cat.verify_audit().ok
    cat.fs.pipe_file(path, original)
    cat.con.execute("SET parquet_metadata_cache = false")
    assert cat.verify_audit().ok
    # deleting the LAST event: the log and the anchor still know there were 3
    last = cfs.join(cat.root, files[2].path)
    keep = cfs.read_bytes(cat.fs, last)
    import io

    table = pq.read_table(io.BytesIO(keep))
    sink = io.BytesIO()
    pq.write_table(table.slice(0, 0), sink)
    cat.fs.pipe_file(last, sink.getvalue())
    report = cat.verify_audit()
    assert not report.ok and any("deleted" in p for p in report.problems)
    anchor = json.loads(cfs.read_bytes(cat.fs, cfs.join(cat.root, "_audit/head.json")))
    assert anchor["count"] == 3


def test_s3_without_local_cache_reads_through_fsspec(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """DuckDB reading the Parquet files on S3 through the registered fsspec filesystem (no httpfs)."""
    url = backend_url(request, "s3", tmp_path, "catalog")
    cat = Catalog(url, cache=False, writer="nocache")
    try:
        cat.register(make_batch(300, 4, patient_id="Z1", issuer="CLA"))
        cat.register(make_batch(301, 2, patient_id="Z1", issuer="CLA"))
        cat.grant(f"{ROOT}.300", "hub", "rule", "r", "x")
        assert [s.study_uid for s in cat.visible_studies("hub", [("Z1", "CLA")])] == [f"{ROOT}.300"]
        cat.compact(force=True)
        assert cat.study(f"{ROOT}.300").instance_count == 4
        assert cat.locations(f"{ROOT}.301")[0].holder == "center"
        assert cat.verify_audit().ok
    finally:
        cat.close()


def test_on_s3_a_shared_cache_outlives_the_catalog_and_is_checked(s3_bucket: str, tmp_path: Path) -> None:
    """Tasks open a catalog per call: the second one reads the copies the first one fetched, once checked."""
    cache = tmp_path / "cache"
    first = Catalog(s3_bucket + "/cat", cache_dir=cache)
    try:
        first.register_many([make_batch(n, 3) for n in range(1, 6)])
        first.compact(force=True)
        assert first.totals()
    finally:
        first.close()
    copies = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.rglob("*.parquet")}
    assert copies, "nothing was cached"

    second = Catalog(s3_bucket + "/cat", cache_dir=cache)
    try:
        assert sum(t.studies for t in second.totals()) == 5
        live = {p for p in cache.rglob("*.parquet")}
        kept = {p for p in live if p in copies}
        assert kept and all((p.stat().st_ino, p.stat().st_mtime_ns) == copies[p] for p in kept), "downloaded again"
        in_use = sorted(cache / rel for files in second.state.files.values() for rel in files)
    finally:
        second.close()

    # a copy altered on the local disk is not trusted: a new process fetches it again from S3
    victim = next(p for p in in_use if p in kept)
    victim.write_bytes(b"\0" * victim.stat().st_size)
    forget_verified()  # as in a new process
    third = Catalog(s3_bucket + "/cat", cache_dir=cache)
    try:
        assert sum(t.studies for t in third.totals()) == 5
        assert victim.read_bytes() != b"\0" * victim.stat().st_size
    finally:
        third.close()
