"""The catalog can be damaged or lost and come back whole (issue 12, points 3-5).

A region's center holds real DICOM objects (synthetic studies); the catalog
holds them plus what the objects do not: a rule grant per clinic study, a
person's grant, a withdrawn consent, a patient link and the audit chain. The
tests back it up, then damage it as storage and people do — a data file
deleted, truncated or bit-flipped; a log entry deleted or corrupted; the last
entry deleted and its number used again; the whole catalog deleted — and
show that `renkei catalog check` and `renkei audit verify` both fail, and
that `renkei catalog restore` (or `rebuild`) brings back totals, grants,
consents, links and the audit chain equal to before. A last test loses the
catalog with no backup at all: `rebuild` registers every object again and the
sharing rules make the clinic studies visible at the hub again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from helpers_parts import EXAMPLE_CONFIG

from renkei import synth
from renkei.catalog import Catalog, GrantRequest, keys
from renkei.catalog import fs as cfs
from renkei.catalog.log import entry_path
from renkei.catalog.store import ObjectStore
from renkei.cli.main import main
from renkei.config import Layout, load_config
from renkei.rebuild import rebuild


def _cli(capsys: pytest.CaptureFixture[str], data_dir: Path, *argv: str) -> tuple[int, str]:
    code = main([*argv, "--data-dir", str(data_dir), "--config", str(EXAMPLE_CONFIG)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _cli_json(capsys: pytest.CaptureFixture[str], data_dir: Path, *argv: str) -> tuple[int, Any]:
    code = main([*argv, "--json", "--data-dir", str(data_dir), "--config", str(EXAMPLE_CONFIG)])
    out = capsys.readouterr().out
    return code, json.loads(out)


def _put_study(layout: Layout, store: ObjectStore, tmp: Path, site: str, seed: int) -> str:
    study = synth.write_single_study(
        tmp / f"s{seed}", "CT", slices=3, size=32, seed=seed, site=layout.config.site(site)
    )
    for path in study.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = keys.object_key(site, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        store.put_file(str(path), key, cfs.sha256_file(str(path))[0])
    return study.info.study_uid


@pytest.fixture
def region(data_dir: Path, tmp_path: Path) -> dict[str, Any]:
    layout = Layout(load_config(EXAMPLE_CONFIG), data_dir)
    store = ObjectStore(layout.center_url)
    uids = {
        "a": _put_study(layout, store, tmp_path, "clinic-a", 1),
        "b": _put_study(layout, store, tmp_path, "clinic-b", 2),
        "hub": _put_study(layout, store, tmp_path, "hub", 3),
    }
    result = rebuild(layout)  # registers the objects and applies the rules: the normal way in
    assert result.instances_registered == 9 and result.rule_grants >= 2
    with Catalog.from_layout(layout, writer="setup") as cat:
        a = cat.study(uids["a"])
        cat.grant_many([GrantRequest(uids["b"], "clinic-a", "person", "dr-sato", "second opinion")])
        cat.set_consent(
            "clinic-b",
            cat.study(uids["b"]).patient_id,
            cat.study(uids["b"]).issuer_of_patient_id,
            "withdrawn",
            "clerk",
            "asked",
        )
        cat.link_patients(
            [("clinic-a", a.patient_id, a.issuer_of_patient_id), ("hub", "H-1", "NAGASAKI-HUB")], "operator", "op"
        )
        cat.append_audit("hub", "dr-sato", "view", uids["a"])
        cat.compact(force=True)  # big (level-1) files under a checkpoint, then small ones after it
        cat.append_audit("hub", "dr-sato", "view", uids["b"])
        cat.append_audit("clinic-a", "dr-ito", "view", uids["a"])
    return {"layout": layout, "uids": uids, "data_dir": data_dir, "before": snapshot(layout, uids)}


def snapshot(layout: Layout, uids: dict[str, str]) -> dict[str, Any]:
    with Catalog.from_layout(layout, writer="snapshot") as cat:
        audit = cat.verify_audit()
        assert audit.ok, audit.problems
        a = cat.study(uids["a"])
        b = cat.study(uids["b"])
        return {
            "totals": [t.to_dict() for t in cat.totals()],
            "grants": {
                k: sorted((g.site, g.action, g.by_kind, g.by, g.current) for g in cat.grants(u))
                for k, u in uids.items()
            },
            "consent": cat.consent_of("clinic-b", b.patient_id, b.issuer_of_patient_id).state,
            "person": cat.person_of("hub", "H-1", "NAGASAKI-HUB"),
            "person_a": cat.person_of("clinic-a", a.patient_id, a.issuer_of_patient_id),
            "audit": (audit.events_checked, cat.state.audit_head),
            "hub_sees": sorted(s.study_uid for s in cat.visible_studies("hub")),
        }


def _backup(capsys, data_dir: Path) -> None:
    code, out = _cli(capsys, data_dir, "catalog", "backup")
    assert code == 0 and "backed up" in out, out


def _catalog_root(layout: Layout) -> Path:
    return Path(layout.catalog_url)


def _live_file(layout: Layout, table: str) -> Path:
    with Catalog.from_layout(layout) as cat:
        files = sorted(cat.state.files[table].values(), key=lambda f: -f.size)
        return _catalog_root(layout) / files[0].path


def _delete_file(layout: Layout) -> None:
    _live_file(layout, "grants").unlink()


def _truncate_file(layout: Layout) -> None:
    path = _live_file(layout, "instances")
    os.truncate(path, path.stat().st_size // 2)


def _flip_byte(layout: Layout) -> None:
    path = _live_file(layout, "instances")
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x20  # inside the data pages: the file still opens
    path.write_bytes(bytes(data))


def _last_seq(layout: Layout) -> int:
    with Catalog.from_layout(layout) as cat:
        return cat.state.seq


def _delete_entry(layout: Layout) -> None:
    Path(entry_path(layout.catalog_url, _last_seq(layout) - 1)).unlink()


def _delete_entry_under_checkpoint(layout: Layout) -> None:
    Path(entry_path(layout.catalog_url, 2)).unlink()


def _corrupt_entry(layout: Layout) -> None:
    path = Path(entry_path(layout.catalog_url, _last_seq(layout)))
    path.write_bytes(path.read_bytes()[:40])


def _cut_last_and_reuse(layout: Layout) -> None:
    last = _last_seq(layout)
    Path(entry_path(layout.catalog_url, last)).unlink()
    # a writer that never saw the cut number takes it again (the way it was reused before)
    entry = {"kind": "locations", "writer": "intruder", "time": 0, "commit_id": "f" * 32, "add": {}}
    Path(entry_path(layout.catalog_url, last)).write_text(json.dumps({**entry, "seq": last}))


def _delete_catalog(layout: Layout) -> None:
    shutil.rmtree(_catalog_root(layout))


DAMAGE: dict[str, Callable[[Layout], None]] = {
    "delete-data-file": _delete_file,
    "truncate-data-file": _truncate_file,
    "bit-flip-data-file": _flip_byte,
    "delete-log-entry": _delete_entry,
    "delete-log-entry-under-checkpoint": _delete_entry_under_checkpoint,
    "corrupt-log-entry": _corrupt_entry,
    "cut-last-entry-and-reuse-its-number": _cut_last_and_reuse,
    "delete-whole-catalog": _delete_catalog,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_detected_and_restored(region, capsys, damage: str) -> None:
    layout, data_dir = region["layout"], region["data_dir"]
    _backup(capsys, data_dir)
    code, out = _cli(capsys, data_dir, "catalog", "check")
    assert code == 0 and "catalog intact" in out, out

    DAMAGE[damage](layout)

    code, out = _cli(capsys, data_dir, "catalog", "check")
    assert code == 1 and "DAMAGED" in out, out
    code, report = _cli_json(capsys, data_dir, "audit", "verify")
    assert code == 1 and not report["ok"] and report["problems"], report
    # the everyday readers name the damage and what to do, no traceback (an entry that a
    # checkpoint covers is not needed to read: only check and audit verify report it)
    code, out = _cli(capsys, data_dir, "catalog", "totals")
    if damage != "delete-log-entry-under-checkpoint":
        assert code != 0 and "restore" in out and "Traceback" not in out, out

    code, out = _cli(capsys, data_dir, "catalog", "restore")
    assert code == 0, out
    code, out = _cli(capsys, data_dir, "catalog", "check")
    assert code == 0 and "catalog intact" in out, out
    code, out = _cli(capsys, data_dir, "audit", "verify")
    assert code == 0 and "intact" in out, out
    assert snapshot(layout, region["uids"]) == region["before"]

    # and the catalog takes new commits after it
    with Catalog.from_layout(layout, writer="after") as cat:
        cat.append_audit("hub", "dr-sato", "view", region["uids"]["hub"])
        assert cat.verify_audit().ok


def test_whole_catalog_lost_is_rebuilt_from_backup_plus_objects(region, capsys, tmp_path) -> None:
    """A study stored after the last backup comes back from the objects; the rest from the backup."""
    layout, data_dir = region["layout"], region["data_dir"]
    _backup(capsys, data_dir)
    store = ObjectStore(layout.center_url)
    late = _put_study(layout, store, tmp_path, "clinic-c", 4)  # after the backup, never registered
    _delete_catalog(layout)
    code, result = _cli_json(capsys, data_dir, "catalog", "rebuild")
    assert code == 0, result
    assert result["restored_from_backup"] and result["instances_registered"] == 3
    after = snapshot(layout, region["uids"])
    before = region["before"]
    assert after["grants"] == before["grants"]
    assert (after["consent"], after["person"], after["person_a"]) == (
        before["consent"],
        before["person"],
        before["person_a"],
    )
    assert late in after["hub_sees"] and set(before["hub_sees"]) <= set(after["hub_sees"])
    totals = {t["site"]: t for t in after["totals"]}
    assert totals["clinic-c"]["instances"] == 3
    assert {s: t for s, t in totals.items() if s != "clinic-c"} == {t["site"]: t for t in before["totals"]}
    code, out = _cli(capsys, data_dir, "audit", "verify")
    assert code == 0, out


def test_catalog_lost_with_no_backup_is_rebuilt_from_the_objects(region, capsys) -> None:
    layout, data_dir = region["layout"], region["data_dir"]
    _delete_catalog(layout)
    code, out = _cli(capsys, data_dir, "audit", "verify")
    assert code == 1 and "witness" in out, out  # the events that existed are gone, and it says so
    code, out = _cli(capsys, data_dir, "catalog", "rebuild")
    assert code == 0 and "9 objects read" in out and "no backup" in out, out
    with Catalog.from_layout(layout) as cat:
        totals = {t.site: t.instances for t in cat.totals()}
        assert totals == {t["site"]: t["instances"] for t in region["before"]["totals"]}
        hub_sees = {s.study_uid for s in cat.visible_studies("hub")}
        # the rules made the clinic studies visible at the hub again
        assert {region["uids"]["a"], region["uids"]["b"]} <= hub_sees
        held = {(l.holder, l.state) for l in cat.locations(region["uids"]["a"], include_instances=False)}
        assert ("center", "present") in held or ("center", "verified") in held
    code, out = _cli(capsys, data_dir, "audit", "verify")
    assert code == 0, out  # the witness recorded the accepted loss at the rebuild


def test_what_killed_writers_left_is_swept(region) -> None:
    """Temporary files in the log folder and data files no commit refers to are removed after a grace period."""
    import time as _time

    from renkei.catalog.compaction import compact

    layout = region["layout"]
    root = _catalog_root(layout)
    stale = [
        root / "_log" / "00000000" / f"{cfs.TEMP_PREFIX}dead-000000000099.json",
        root / "data" / "grants" / "L0-deadbeef.parquet",
    ]
    fresh = root / "_log" / "00000000" / f"{cfs.TEMP_PREFIX}live-000000000100.json"
    for path in [*stale, fresh]:
        path.write_bytes(b"left by a killed writer")
    old = _time.time() - 7200
    for path in stale:
        os.utime(path, (old, old))
    with Catalog.from_layout(layout) as cat:
        result = compact(cat)
    assert result.orphans_removed == 2
    assert not any(p.exists() for p in stale) and fresh.exists()  # one in progress is left alone
    assert snapshot(layout, region["uids"]) == region["before"]


def test_nightly_verification_detects_a_damaged_catalog(region, prefect_api) -> None:
    """The verification flow reads the whole catalog first, fails red with what to do, then backs it up when whole."""
    from renkei.flows.verify_backups import CatalogDamagedRun, verify_backups

    layout, data_dir = region["layout"], region["data_dir"]
    config = str(EXAMPLE_CONFIG)
    report = verify_backups(config=config, data_dir=str(data_dir))
    assert report["catalog_check"]["files"] > 0 and report["catalog_backup"]["files_copied"] > 0
    _flip_byte(layout)
    with pytest.raises(CatalogDamagedRun):
        verify_backups(config=config, data_dir=str(data_dir))
    from renkei.rebuild import restore

    restore(layout)
    report = verify_backups(config=config, data_dir=str(data_dir))
    assert report["catalog_check"]["files"] > 0 and not report["unrecoverable"]
