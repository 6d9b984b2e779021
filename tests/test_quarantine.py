"""One bad instance or study never blocks the others: it is quarantined with a reason, audited,
shown to the operator, skipped by later runs until released, and the rest flows.

Real parts throughout: the site's edge journal and the catalog and objects of a local-folder
center in a temporary folder, DICOM files written by the synthesiser and stored as the edge's
C-STORE handler stores them. The edge now refuses a UID with a trailing newline, so the bad
rows an older edge let through are written into the journal directly, as it would have.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from helpers_region import layout_of, put_into_edge, region_config

from renkei import synth, transfer
from renkei.catalog.store import ObjectStore
from renkei.cli.main import main as renkei_main
from renkei.edge.journal import JOURNAL_NAME, Journal
from renkei.runtime import open_catalog, open_journal, open_store

SITE = "clinic-a"
STABLE_AGE = 0.2


@pytest.fixture
def region(tmp_path, data_dir):
    config_path = region_config(tmp_path, stable_age=STABLE_AGE, pacs_at=())
    return config_path, layout_of(config_path, data_dir)


def _studies(tmp_path: Path, lay, seeds: tuple[int, ...], slices: int = 3) -> list[synth.SynthStudy]:
    out = []
    for seed in seeds:
        study = synth.write_single_study(tmp_path / "synth" / str(seed), "CT", slices=slices, size=32, seed=seed)
        put_into_edge(lay, SITE, study.files)
        out.append(study)
    time.sleep(STABLE_AGE + 0.1)  # the studies pass stable_age
    return out


def _sql(lay, statement: str, params: tuple = ()) -> None:
    """Write the journal as an older edge (or a damaged disk) left it."""
    con = sqlite3.connect(lay.edge_store(SITE) / JOURNAL_NAME)
    try:
        with con:
            con.execute(statement, params)
    finally:
        con.close()


def _bad_uid(lay, study_uid: str, state: str = "pending", suffix: str = "\n") -> str:
    """Give the study's first instance a SOP Instance UID ending in a newline (the old check let it pass)."""
    with open_journal(lay, SITE) as journal:
        first = journal.instances(study_uid)[0].instance.sop_instance_uid
    _sql(
        lay,
        "UPDATE instances SET sop_instance_uid = ?, upload_state = ? WHERE sop_instance_uid = ?",
        (first + suffix, state, first),
    )
    return first


def _states(journal: Journal, study_uid: str) -> set[str]:
    return {e.upload_state for e in journal.instances(study_uid)}


def _cli(capsys, lay, config_path, *args: str) -> tuple[int, str]:
    """`renkei ARGS` in this process (its logging set up for this call only); returns (code, output)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = renkei_main([*args, "--config", str(config_path), "--data-dir", str(lay.data_dir)])
    finally:
        root.handlers[:], root.level = handlers, level
    out = capsys.readouterr()
    return code, out.out + out.err


# ---------------------------------------------------------------- registration
def test_a_study_the_catalog_refuses_is_quarantined_and_the_others_register(tmp_path, region, capsys) -> None:
    config_path, lay = region
    good1, bad, good2 = _studies(tmp_path, lay, (11, 12, 13))
    store = open_store(lay)
    with open_journal(lay, SITE) as journal, open_catalog(lay) as catalog:
        for study in (good1, bad, good2):
            assert transfer.upload_study(journal, store, SITE, study.info.study_uid).ok
        # as an older run left it: the bad study uploaded under its newline UID (then refused by every
        # registration since, and with it every study of the batch)
        _bad_uid(lay, bad.info.study_uid, state="uploaded")
        patient = journal.study_info(bad.info.study_uid, SITE)
        uids = [good1.info.study_uid, bad.info.study_uid, good2.info.study_uid]

        result = transfer.register_studies(journal, catalog, SITE, uids)

        assert set(result.studies) == {good1.info.study_uid, good2.info.study_uid}
        assert result.new_instances == good1.instance_count + good2.instance_count
        for study in (good1, good2):
            assert catalog.study(study.info.study_uid).instance_count == study.instance_count
            assert {l.holder: l.state for l in catalog.locations(study.info.study_uid, False)}["center"] == "verified"
            assert _states(journal, study.info.study_uid) == {"verified"}
        assert catalog.study(bad.info.study_uid) is None
        assert _states(journal, bad.info.study_uid) == {"uploaded"}  # kept as it was, nothing lost

        (held,) = journal.quarantined()
        assert held.study_uid == bad.info.study_uid and held.step == "register"
        assert dict(result.quarantined) == {bad.info.study_uid: held.reason}
        assert "InvalidUID" in held.reason and "SOP Instance UID" in held.reason
        assert len(held.sop_instance_uids) == 1 and held.sop_instance_uids[0].endswith("\n")
        (event,) = catalog.audit(study_uid=bad.info.study_uid, action="quarantine")
        assert event.actor_site == SITE and event.outcome == "quarantined"
        assert event.detail["reason"] == held.reason and event.detail["step"] == "register"
        for text in (held.reason, json.dumps(event.detail)):
            assert patient.patient_id not in text and patient.patient_name.split("^")[0] not in text
        assert catalog.verify_audit().ok
        assert journal.quarantines_to_audit() == []

        # the next run does not touch it: not listed, not uploaded, not registered, not audited again
        assert bad.info.study_uid not in transfer.studies_to_sync(journal, STABLE_AGE)
        skipped = transfer.upload_study(journal, store, SITE, bad.info.study_uid)
        assert skipped.instances == 0 and skipped.quarantined == held.reason and not skipped.ok
        again = transfer.register_studies(journal, catalog, SITE, [bad.info.study_uid])
        assert again.studies == () and again.quarantined == ()
        assert len(catalog.audit(study_uid=bad.info.study_uid, action="quarantine")) == 1

    # the operator sees it ...
    code, out = _cli(capsys, lay, config_path, "edge", "status", "--site", SITE)
    assert code == 0 and "1 study(ies) in quarantine" in out and bad.info.study_uid in out and "InvalidUID" in out
    code, out = _cli(capsys, lay, config_path, "edge", "status", "--site", SITE, "--json")
    (shown,) = json.loads(out)["quarantined"]
    assert shown["study_uid"] == bad.info.study_uid and shown["reason"] == held.reason
    assert bad.info.study_uid not in json.loads(out)["complete_pending_studies"]

    # ... fixes the cause (the UID without its newline) and releases it: it flows again
    _sql(
        lay,
        "UPDATE instances SET sop_instance_uid = rtrim(sop_instance_uid, char(10)) WHERE study_uid = ?",
        (bad.info.study_uid,),
    )
    code, out = _cli(
        capsys, lay, config_path, "edge", "release", "--site", SITE, bad.info.study_uid, "--operator", "tester"
    )
    assert code == 0 and "released study" in out, out
    code, out = _cli(capsys, lay, config_path, "edge", "release", "--site", SITE, bad.info.study_uid)
    assert code != 0 and "not in quarantine" in out
    with open_journal(lay, SITE) as journal, open_catalog(lay) as catalog:
        assert journal.quarantined() == []
        (release,) = catalog.audit(study_uid=bad.info.study_uid, action="quarantine-release")
        assert release.actor == "operator:tester"
        assert bad.info.study_uid in transfer.studies_to_sync(journal, STABLE_AGE)
        assert transfer.upload_study(journal, store, SITE, bad.info.study_uid).ok
        assert transfer.register_studies(journal, catalog, SITE, [bad.info.study_uid]).studies == (bad.info.study_uid,)
        assert catalog.study(bad.info.study_uid).instance_count == bad.instance_count
        assert _states(journal, bad.info.study_uid) == {"verified"}
        assert catalog.verify_audit().ok


def test_catalog_unreachable_is_not_quarantine(tmp_path, region) -> None:
    """Storage trouble is transient: the registration raises (Prefect retries), nothing is quarantined."""
    from renkei.errors import CatalogError

    _config_path, lay = region
    (study,) = _studies(tmp_path, lay, (21,))
    with open_journal(lay, SITE) as journal, open_catalog(lay) as catalog:
        assert transfer.upload_study(journal, open_store(lay), SITE, study.info.study_uid).ok
        catalog.refresh()
        root = Path(lay.catalog_url)
        shutil.move(root, tmp_path / "catalog-away")  # the catalog's storage is gone
        root.write_text("a file where the catalog's folder should be")
        with pytest.raises(CatalogError):
            transfer.register_studies(journal, catalog, SITE, [study.info.study_uid])
        assert journal.quarantined() == []
        assert _states(journal, study.info.study_uid) == {"uploaded"}


def test_a_study_held_as_another_sites_is_quarantined_not_the_batch(tmp_path, region) -> None:
    """The catalog's ownership refusal (RejectedData) is a data error too: the rest of the batch registers."""
    _config_path, lay = region
    theirs = synth.write_single_study(tmp_path / "synth" / "theirs", "CT", slices=2, size=32, seed=61)
    put_into_edge(lay, "clinic-b", theirs.files)
    ours = _studies(tmp_path, lay, (62,))[0]
    put_into_edge(lay, SITE, theirs.files)  # the same study C-STOREd into this site's edge too
    time.sleep(STABLE_AGE + 0.1)
    store = open_store(lay)
    with open_catalog(lay) as catalog:
        with open_journal(lay, "clinic-b") as journal:
            assert transfer.upload_study(journal, store, "clinic-b", theirs.info.study_uid).ok
            assert transfer.register_studies(journal, catalog, "clinic-b", [theirs.info.study_uid]).studies
        with open_journal(lay, SITE) as journal:
            uids = transfer.studies_to_sync(journal, STABLE_AGE)
            assert set(uids) == {theirs.info.study_uid, ours.info.study_uid}
            for uid in uids:
                assert transfer.upload_study(journal, store, SITE, uid).ok
            result = transfer.register_studies(journal, catalog, SITE, uids)
            assert result.studies == (ours.info.study_uid,)
            (held,) = journal.quarantined()
            assert held.study_uid == theirs.info.study_uid and "clinic-b" in held.reason
        assert catalog.study(theirs.info.study_uid).origin_site == "clinic-b"
        assert catalog.study(ours.info.study_uid).instance_count == ours.instance_count


# ---------------------------------------------------------------- upload
def test_instances_refused_for_their_data_quarantine_their_study_not_the_others(tmp_path, region) -> None:
    _config_path, lay = region
    newline, damaged, missing, good = _studies(tmp_path, lay, (31, 32, 33, 34))
    _bad_uid(lay, newline.info.study_uid)
    with open_journal(lay, SITE) as journal:
        bad_file = journal.instances(damaged.info.study_uid)[1].path
        bad_file.write_bytes(bad_file.read_bytes()[:-4] + b"XXXX")  # same size, other bytes
        gone = journal.instances(missing.info.study_uid)[0].path
        gone.unlink()
        store = open_store(lay)
        results = {
            s.info.study_uid: transfer.upload_study(journal, store, SITE, s.info.study_uid)
            for s in (newline, damaged, missing, good)
        }

        assert results[good.info.study_uid].ok and results[good.info.study_uid].uploaded == good.instance_count
        expected = {
            newline.info.study_uid: "not a valid DICOM UID",
            damaged.info.study_uid: "damaged",
            missing.info.study_uid: "missing",
        }
        held = {q.study_uid: q for q in journal.quarantined()}
        assert set(held) == set(expected)
        for uid, words in expected.items():
            assert results[uid].quarantined == held[uid].reason and words in held[uid].reason
            assert held[uid].step == "upload" and len(held[uid].sop_instance_uids) == 1
            assert results[uid].failures == ()  # nothing left for Prefect to retry
            # the study's other instances are in the center (uploaded), the refused one stays pending
            assert _states(journal, uid) == {"pending", "uploaded"}
        assert transfer.studies_to_sync(journal, STABLE_AGE) == [good.info.study_uid]
        assert len(journal.quarantines_to_audit()) == 3
        with open_catalog(lay) as catalog:
            assert len(transfer.audit_quarantines(journal, catalog, SITE)) == 3
            assert transfer.audit_quarantines(journal, catalog, SITE) == []  # once only
            assert {e.study_uid for e in catalog.audit(action="quarantine")} == set(expected)


def test_center_storage_down_is_a_transient_failure(tmp_path, region) -> None:
    _config_path, lay = region
    (study,) = _studies(tmp_path, lay, (41,))
    center = tmp_path / "center"
    store = ObjectStore(str(center))
    shutil.rmtree(center)
    center.write_text("the center's storage is not there")  # every write fails (OSError), reads too
    with open_journal(lay, SITE) as journal:
        result = transfer.upload_study(journal, store, SITE, study.info.study_uid)
        assert len(result.failures) == study.instance_count and not result.quarantined
        assert journal.quarantined() == []
        assert transfer.studies_to_sync(journal, STABLE_AGE) == [study.info.study_uid]


# ---------------------------------------------------------------- journal
def test_journal_quarantine_api_and_an_older_journal(tmp_path) -> None:
    root = tmp_path / "edge"
    with Journal.open(root) as journal:
        journal._write(
            [("DROP TABLE quarantine", ()), ("UPDATE meta SET value = '3' WHERE key = 'schema_version'", ())]
        )
    with Journal.open(root, readonly=True) as old:  # a schema-3 journal, read-only: no table
        assert old.quarantined() == [] and old.summary().quarantined == 0 and not old.is_quarantined("1.2")
    with Journal.open(root) as journal:  # a writable open adds it
        assert int(journal.get_meta("schema_version")) >= 4  # 5 since the quiet clock (edge.clock)
        first = journal.quarantine("1.2.3", "  refused:\n bad   UID ", ["1.2.3.4\n"], step="register")
        assert first.reason == "refused: bad UID" and first.sop_instance_uids == ("1.2.3.4\n",)
        assert journal.quarantine("1.2.3", "another reason").reason == "refused: bad UID"  # idempotent
        assert [q.study_uid for q in journal.quarantined()] == ["1.2.3"] and journal.summary().quarantined == 1
        released = journal.release_quarantine("1.2.3", by="operator:x")
        assert released is not None and released.released_by == "operator:x"
        assert journal.release_quarantine("1.2.3") is None and journal.quarantined() == []
        again = journal.quarantine("1.2.3", "refused again")  # history is kept, a new quarantine
        assert again.id != first.id and journal.is_quarantined("1.2.3")
        assert [q.id for q in journal.quarantines_to_audit()] == [first.id, again.id]
        journal.mark_quarantine_audited([first.id, again.id])
        assert journal.quarantines_to_audit() == []


def test_reasons_name_no_patient() -> None:
    from renkei.records import StudyInfo

    info = StudyInfo("1.2.3", SITE, patient_id="4711", patient_name="Yamada^Taro=山田^太郎")
    text = transfer.scrub("patient 4711 Yamada^Taro (山田) in 1.2.34711.5 and 4711.9", info)
    assert "Yamada" not in text and "Taro" not in text and "山田" not in text
    assert "1.2.34711.5" in text and "4711.9" in text and text.startswith("patient <patient>")


# ---------------------------------------------------------------- the flow
def test_sync_site_flow_quarantines_and_the_rest_flows(tmp_path, region, prefect_api, capsys) -> None:
    import anyio
    from prefect import get_client

    from renkei.flows.sync_site import QUARANTINE_STATE, sync_site

    config_path, lay = region
    good1, refused_at_upload, refused_at_register, good2 = _studies(tmp_path, lay, (51, 52, 53, 54))
    _bad_uid(lay, refused_at_upload.info.study_uid)
    # a UID padded with NUL: the key derivation strips the padding (renkei.uids.validate_uid), the catalog
    # refuses it: uploaded, then refused at registration, the same dead end as the incident's
    bad_uid = _bad_uid(lay, refused_at_register.info.study_uid, suffix="\x00")
    bad = {refused_at_upload.info.study_uid, refused_at_register.info.study_uid}

    state = sync_site(SITE, str(config_path), str(lay.data_dir), return_state=True)

    assert state.is_completed(), state.message
    assert state.name == QUARANTINE_STATE and "2 studies quarantined" in state.message
    assert f"renkei edge status --site {SITE}" in state.message
    summary = state.result()
    assert set(summary["quarantined"]) == bad and summary["failures"] == {}
    assert summary["studies"] == 2 and summary["instances"] == good1.instance_count + good2.instance_count
    with open_journal(lay, SITE) as journal, open_catalog(lay) as catalog:
        for study in (good1, good2):
            assert catalog.study(study.info.study_uid).instance_count == study.instance_count
            assert _states(journal, study.info.study_uid) == {"verified"}
        steps = {q.study_uid: q.step for q in journal.quarantined()}
        assert steps == {refused_at_upload.info.study_uid: "upload", refused_at_register.info.study_uid: "register"}
        assert {e.study_uid for e in catalog.audit(action="quarantine")} == bad

    async def markdown(run) -> str:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

        async with get_client() as client:
            (artifact,) = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[f"sync-{SITE}"]),
                    flow_run_id=ArtifactFilterFlowRunId(any_=[run.state_details.flow_run_id]),
                )
            )
            return artifact.data

    text = anyio.run(markdown, state)
    assert f"2 studies quarantined — see `renkei edge status --site {SITE}`" in text
    assert refused_at_register.info.study_uid in text and "InvalidUID" in text

    # the next run leaves them alone and ends plainly Completed
    second = sync_site(SITE, str(config_path), str(lay.data_dir), return_state=True)
    assert second.is_completed() and second.name == "Completed"
    result = second.result()
    assert result["studies"] == 0 and result["quarantined"] == {} and set(result["held_in_quarantine"]) == bad
    assert "2 studies held in quarantine since earlier runs" in anyio.run(markdown, second)
    with open_catalog(lay) as catalog:
        assert len(catalog.audit(action="quarantine")) == 2
        assert catalog.study(refused_at_register.info.study_uid) is None

    code, out = _cli(capsys, lay, config_path, "edge", "status", "--site", SITE)
    assert "2 study(ies) in quarantine" in out and refused_at_register.info.study_uid in out

    # fixed and released, the third run registers it
    _sql(lay, "UPDATE instances SET sop_instance_uid = ? WHERE sop_instance_uid = ?", (bad_uid, bad_uid + "\x00"))
    code, out = _cli(capsys, lay, config_path, "edge", "release", "--site", SITE, refused_at_register.info.study_uid)
    assert code == 0, out
    third = sync_site(SITE, str(config_path), str(lay.data_dir))
    assert third["studies"] == 1 and third["held_in_quarantine"] == [refused_at_upload.info.study_uid]
    with open_journal(lay, SITE) as journal, open_catalog(lay) as catalog:
        assert catalog.study(refused_at_register.info.study_uid).instance_count == refused_at_register.instance_count
        assert _states(journal, refused_at_register.info.study_uid) == {"verified"}
        assert len(catalog.audit(action="quarantine-release")) == 1
        assert catalog.verify_audit().ok
