"""`renkei catalog ...` and `renkei audit ...` on a region's data folder."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from helpers_catalog import ROOT, make_batch
from helpers_parts import EXAMPLE_CONFIG

from renkei.catalog import Catalog
from renkei.catalog import fs as cfs
from renkei.cli.main import main
from renkei.config import Layout, load_config


def _run(capsys: pytest.CaptureFixture[str], data_dir: Path, *argv: str) -> tuple[int, str]:
    code = main([*argv, "--data-dir", str(data_dir), "--config", str(EXAMPLE_CONFIG)])
    return code, capsys.readouterr().out


@pytest.fixture
def region(data_dir: Path) -> Path:
    layout = Layout(load_config(EXAMPLE_CONFIG), data_dir)
    cat = Catalog.from_layout(layout, writer="setup")
    try:
        cat.register(make_batch(1, 3, site="clinic-a", patient_id="A1", issuer="OURA-CLINIC"), holder="edge:clinic-a")
        cat.register(make_batch(1, 3, site="clinic-a", patient_id="A1", issuer="OURA-CLINIC"))
        cat.register(make_batch(2, 2, site="hub", patient_id="H1", issuer="NAGASAKI-HUB", modality="MR"))
        cat.grant(f"{ROOT}.1", "hub", "rule", "clinic-studies-to-hub", "clinic study", rule="clinic-studies-to-hub")
    finally:
        cat.close()
    return data_dir


def test_studies_where_grants_audit_totals(region: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, region, "catalog", "studies", "--site", "hub")
    assert code == 0 and f"{ROOT}.1" in out and f"{ROOT}.2" in out and "instances" in out
    code, out = _run(capsys, region, "catalog", "studies", "--site", "hub", "--modality", "MR", "--json")
    assert [s["study_uid"] for s in json.loads(out)] == [f"{ROOT}.2"]
    code, out = _run(capsys, region, "catalog", "studies", "--site", "clinic-b", "--json")
    assert json.loads(out) == []
    code, out = _run(
        capsys, region, "catalog", "studies", "--site", "hub", "--patient-id", "A1", "--issuer", "OURA-CLINIC", "--json"
    )
    assert [s["instance_count"] for s in json.loads(out)] == [3]

    code, out = _run(capsys, region, "catalog", "where", f"{ROOT}.1", "--json")
    holders = {l["holder"]: l["state"] for l in json.loads(out)["locations"]}
    assert holders == {"center": "present", "edge:clinic-a": "present"}
    code, out = _run(capsys, region, "catalog", "where", f"{ROOT}.1")
    assert "edge:clinic-a" in out and "3 instances" in out
    code, out = _run(capsys, region, "catalog", "where", "9.9.9")
    assert code == 1 and "not in the catalog" in out

    code, out = _run(capsys, region, "catalog", "grants", f"{ROOT}.1", "--json")
    assert [(g["site"], g["action"], g["active"]) for g in json.loads(out)] == [("hub", "grant", True)]
    code, out = _run(capsys, region, "catalog", "audit", f"{ROOT}.1")
    assert "register" in out and "grant" in out

    code, out = _run(capsys, region, "catalog", "totals", "--json")
    totals = {t["site"]: t for t in json.loads(out)}
    assert totals["clinic-a"]["instances"] == 3 and totals["clinic-a"]["backlog_studies"] == 1
    assert totals["hub"]["studies"] == 1
    code, out = _run(capsys, region, "catalog", "totals")
    assert "backlog_studies" in out and "clinic-a" in out

    code, out = _run(capsys, region, "catalog", "compact", "--force", "--json")
    assert code == 0 and json.loads(out)["files"]["instances"] == 1


def test_audit_verify_and_show(region: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(capsys, region, "audit", "verify")
    assert code == 0 and "intact" in out
    code, out = _run(capsys, region, "audit", "show", "--action", "grant", "--json")
    events = json.loads(out)
    assert [(e["action"], e["target_site"]) for e in events] == [("grant", "hub")]
    code, out = _run(capsys, region, "audit", "show", "--site", "hub", "--since", "2000-01-01")
    assert "grant" in out and "register" in out
    # times for people: the region's zone (Asia/Tokyo), to the second, zone named; JSON stays UTC
    import re

    shown = re.findall(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(?:\.\d+)? ?\S*", out)
    assert shown and all(re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2} JST", t) for t in shown), shown
    code, as_json = _run(capsys, region, "audit", "show", "--site", "hub", "--json")
    first = dt.datetime.fromisoformat(json.loads(as_json)[0]["at"])
    assert first.utcoffset() == dt.timedelta(0)
    assert first.astimezone(dt.timezone(dt.timedelta(hours=9))).strftime("%Y-%m-%d %H:%M:%S JST") in out
    # a --since without an offset is the region's local time: 9 hours ahead of UTC
    since_utc = first.replace(microsecond=0)
    local = (since_utc + dt.timedelta(hours=9)).strftime("%Y-%m-%dT%H:%M:%S")
    code, out = _run(capsys, region, "audit", "show", "--site", "hub", "--since", local, "--json")
    assert [e["event_no"] for e in json.loads(out)] == [
        e["event_no"] for e in json.loads(as_json) if dt.datetime.fromisoformat(e["at"]) >= since_utc
    ]
    code, out = _run(capsys, region, "audit", "show", "--until", "2000-01-01", "--json")
    assert json.loads(out) == []

    # tamper with the last audit file: verify says so and exits 1
    layout = Layout(load_config(EXAMPLE_CONFIG), region)
    cat = Catalog.from_layout(layout)
    try:
        last = max(cat.state.files["audit"].values(), key=lambda f: f.seq)
        path = cfs.join(cat.root, last.path)
    finally:
        cat.close()
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(
        table.set_column(table.schema.get_field_index("outcome"), "outcome", pa.array(["denied"] * table.num_rows)),
        path,
    )
    code, out = _run(capsys, region, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and report["problems"]
