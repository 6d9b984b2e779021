"""The operator's dashboard over a demo-like region synced by real flow runs.

(a) the data functions against the catalog and the edges' journals, (b) the
HTTP answers (errors, thumbnails), (c) the page in Debian's headless Chromium
driven by Playwright: every section shows the region's data, charts drawn,
thumbnails loaded, numbers equal to the catalog's, no console error, and a
screenshot (also copied to test-output/dashboard.png).
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers_dashboard import DemoRegion, module_region
from helpers_parts import REPO, require_program

from renkei import peers
from renkei.dashboards import data as d
from renkei.dashboards import thumbnails
from renkei.runtime import open_catalog, open_journal

PREFECT_UI = "http://127.0.0.1:4299"  # links only: the test never follows them
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> DemoRegion:
    return module_region(tmp_path_factory, "dashboard-region")


@pytest.fixture(scope="module")
def server(region: DemoRegion, tmp_path_factory: pytest.TempPathFactory):
    """`renkei dashboard` as a user starts it, on a free loopback port; always stopped."""
    port = peers.free_port()
    log = tmp_path_factory.mktemp("dashboard-server") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "renkei.cli.main",
                "dashboard",
                "--config",
                str(region.config_path),
                "--data-dir",
                str(region.layout.data_dir),
                "--port",
                str(port),
                "--refresh",
                "0",
                "--prefect-ui",
                PREFECT_UI,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        peers.wait_for_port("127.0.0.1", port, timeout=60, process=proc, what="renkei dashboard")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), log.read_text(errors="replace")


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _all_studies(catalog, config) -> list:
    return [r for site in config.site_ids for r in catalog.visible_studies(site) if r.origin_site == site]


# ------------------------------------------------------------------ (a) data against the catalog
def test_overview_numbers_equal_the_catalog_and_journals(region: DemoRegion) -> None:
    from renkei.sharing import Sharing

    lay = region.layout
    with open_catalog(lay) as catalog:
        view = d.overview(lay, catalog)
        totals = {t.site: t for t in catalog.totals()}
        sharing = Sharing(lay.config, catalog)
        studies = _all_studies(catalog, lay.config)
        events = catalog.audit()
        instance_count = catalog.instance_count()

        # per site: the catalog's totals and each journal's counts
        for s in view.sites:
            t = totals[s.site]
            assert (s.center_studies, s.center_instances, s.center_bytes, s.center_backlog_studies) == (
                t.studies,
                t.instances,
                t.bytes,
                t.backlog_studies,
            )
            with open_journal(lay, s.site) as journal:
                summary = journal.summary()
            assert (s.received_studies, s.received_instances, s.received_bytes) == (
                summary.studies,
                summary.instances,
                summary.bytes,
            )
            assert s.verified_instances == summary.upload_states["verified"]
            assert s.uploaded_instances == summary.upload_states["uploaded"] + summary.upload_states["verified"]
        by_site = {s.site: s for s in view.sites}
        waiting_site, waiting_uid = region.waiting
        assert by_site[waiting_site].waiting_studies == 1
        assert by_site[waiting_site].oldest_waiting_study == waiting_uid
        age = by_site[waiting_site].oldest_waiting_age_s
        assert age is not None and age >= 0
        assert all(s.waiting_studies == 0 for s in view.sites if s.site != waiting_site)
        for site, uids in region.studies.items():  # everything synced is verified at its own edge
            assert by_site[site].verified_studies == len(uids)

        # throughput: every byte registered today is in some bucket of its site
        for site in lay.config.site_ids:
            assert view.throughput.bytes[site] == totals[site].bytes
            assert sum(view.throughput.mb_s[site]) * view.throughput.bucket_seconds * 1e6 == pytest.approx(
                totals[site].bytes, rel=1e-3
            )
        # time to availability: one point per synced study, after its last instance reached the edge
        synced = {uid for uids in region.studies.values() for uid in uids}
        assert {a.study_uid for a in view.availability} == synced
        assert all(a.seconds >= 0 and a.available_at >= a.edge_last_received for a in view.availability)

        # visibility matrix: every cell equals the decisions of the sharing policy
        for viewer, origin in itertools.product(lay.config.site_ids, repeat=2):
            expected = sum(
                1 for r in studies if r.origin_site == origin and sharing.decide(viewer, r.study_uid).allowed
            )
            assert view.matrix.count(viewer, origin) == expected, (viewer, origin)
        assert view.matrix.count("clinic-b", "hub") >= 1  # published by a person
        assert view.matrix.count("clinic-a", "clinic-b") == 0  # never clinic to clinic

        # last verification: everything read, the damaged object found and repaired
        ver = view.verification
        assert ver is not None and ver.outcome == "ok"
        assert (ver.instances, ver.findings, ver.repaired, ver.unrecoverable) == (instance_count, 1, 1, 0)
        assert [(i.sop_instance_uid, i.state) for i in ver.items] == [(region.repaired_sop, "verified")]

        # cross-site accesses: exactly the access events whose site is not the study's origin
        origin_of = {r.study_uid: r.origin_site for r in studies}
        expected_events = [
            e.event_no
            for e in reversed(events)
            if e.action in d.ACCESS_ACTIONS
            and e.study_uid
            and (e.target_site or origin_of.get(e.study_uid)) != e.actor_site
        ]
        assert [a.event_no for a in view.accesses] == expected_events[: d.DEFAULT_LIMIT]
        hub_own = region.studies["hub"][0]
        assert not any(a.study_uid == hub_own and a.viewer_site == "hub" for a in view.accesses)
        assert {(a.viewer_site, a.actor, a.action) for a in view.accesses} >= {
            ("hub", "HUB_WS1", "find"),
            ("hub", "HUB_WS2", "retrieve"),
            ("clinic-b", "CLB_WS", "retrieve"),
        }


def test_study_browser_operator_and_viewer(region: DemoRegion) -> None:
    from renkei.sharing import Sharing

    lay = region.layout
    with open_catalog(lay) as catalog:
        studies = _all_studies(catalog, lay.config)
        operator = d.browse_studies(lay, catalog, d.parse_query(lay.config, {"limit": "500"}))
        assert operator.total == len(studies) == sum(t.studies for t in catalog.totals())
        assert not operator.names_shown and all(s.patient_name is None for s in operator.studies)
        assert operator.recorded_accesses == 0
        for s in operator.studies:
            assert region.flow_runs[s.origin_site] in s.flow_runs  # the sync run that moved it
            assert sum(x.instances for x in s.series) == s.instance_count
            assert s.center_state == "verified"
        dates = [(s.study_date, s.study_time) for s in operator.studies]
        assert dates == sorted(dates, reverse=True)

        # filters: origin, modality, patient, dates
        only_c = d.browse_studies(lay, catalog, d.parse_query(lay.config, {"origin": "clinic-c", "modality": "ct"}))
        assert {s.origin_site for s in only_c.studies} == {"clinic-c"}
        assert only_c.total == sum(1 for r in studies if r.origin_site == "clinic-c" and "CT" in r.modalities)
        one = studies[0]
        by_patient = d.browse_studies(lay, catalog, d.parse_query(lay.config, {"patient_id": one.patient_id}))
        assert one.study_uid in {s.study_uid for s in by_patient.studies}
        assert all(s.patient_id == one.patient_id for s in by_patient.studies)
        day = f"{one.study_date[:4]}-{one.study_date[4:6]}-{one.study_date[6:]}"
        by_day = d.browse_studies(lay, catalog, d.parse_query(lay.config, {"date_from": day, "date_to": day}))
        assert by_day.total == sum(1 for r in studies if r.study_date == one.study_date)

        # a viewer site sees only what the policy lets it see, with names, and each view is audited
        before = len(catalog.audit(action="view"))
        page = d.browse_studies(lay, catalog, d.parse_query(lay.config, {"site": "clinic-b", "limit": "500"}))
        sharing = Sharing(lay.config, catalog)
        allowed = {r.study_uid for r in studies if sharing.decide("clinic-b", r.study_uid).allowed}
        assert {s.study_uid for s in page.studies} == allowed and page.total == len(allowed)
        assert page.names_shown and all(s.patient_name for s in page.studies)
        others = {s.study_uid for s in page.studies if s.origin_site != "clinic-b"}
        assert others and page.recorded_accesses == len(others)
        views = catalog.audit(action="view")[before:]
        assert {(e.actor_site, e.actor, e.study_uid, e.target_site) for e in views} == {
            ("clinic-b", d.DASHBOARD_ACTOR, uid, next(r.origin_site for r in studies if r.study_uid == uid))
            for uid in others
        }


def test_bad_filters_are_refused_with_a_message(region: DemoRegion) -> None:
    config = region.layout.config
    for params, words in (
        ({"site": "osaka"}, "unknown site"),
        ({"origin": "x"}, "unknown origin site"),
        ({"date_from": "2024-02-30"}, "not a date"),
        ({"date_to": "yesterday"}, "not a date"),
        ({"date_from": "2025-01-02", "date_to": "2025-01-01"}, "is after"),
        ({"modality": "C T"}, "modality"),
        ({"limit": "0"}, "limit"),
    ):
        with pytest.raises(d.BadRequest, match=words):
            d.parse_query(config, params)
    q = d.parse_query(config, {"date_from": "20240101", "date_to": "2024-12-31", "modality": "mr", "limit": "7"})
    assert (q.date_from, q.date_to, q.modality, q.limit) == ("20240101", "20241231", "MR", 7)
    assert d.bucket_seconds(50) == 10 and d.bucket_seconds(86400) == 1800 and d.bucket_seconds(40 * 86400) == 86400


def test_empty_and_single_point_charts_have_sane_axes(region: DemoRegion) -> None:
    import datetime as dt

    from renkei.dashboards.app import availability_figure, throughput_figure

    config = region.layout.config
    empty = throughput_figure(d.Throughput(0, (), {}, {}), config)
    assert empty["layout"]["xaxis"]["visible"] is False and empty["layout"]["yaxis"]["visible"] is False
    assert "nothing registered" in empty["layout"]["annotations"][0]["text"]
    assert availability_figure([], config)["layout"]["xaxis"]["visible"] is False
    at = dt.datetime(2026, 8, 13, 6, 34, 45, tzinfo=dt.UTC)
    one = availability_figure([d.Availability("1.2.3", "hub", at - dt.timedelta(seconds=12.5), at, 12.5)], config)
    low, high = one["layout"]["xaxis"]["range"]
    assert (low, high) == ("2026-08-13 15:29:45", "2026-08-13 15:39:45")  # +-5 min, in Asia/Tokyo


# ------------------------------------------------------------------ thumbnails (pure)
def test_thumbnail_window_comes_from_the_data() -> None:
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    raw = open(get_testdata_file("CT_small.dcm"), "rb").read()
    png = thumbnails.render(raw)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and max(image.size) <= thumbnails.THUMBNAIL_SIZE
    values = np.asarray(image, dtype=float)
    assert values.std() > 10  # windowed by percentiles (the file has no Window Center/Width)
    assert "WindowCenter" not in ds
    # with Window Center/Width, values below the window are black and above it white
    ds.WindowCenter, ds.WindowWidth = 40, 400
    out = io.BytesIO()
    ds.save_as(out)
    windowed = np.asarray(Image.open(io.BytesIO(thumbnails.render(out.getvalue()))), dtype=float)
    hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
    assert windowed.min() == 0 and (hu < -160).any()
    assert not np.array_equal(windowed, values)
    # no pixel data: a labelled placeholder, never a broken image
    rt = open(get_testdata_file("rtplan.dcm"), "rb").read()
    with pytest.raises(thumbnails.ThumbnailError, match="no image"):
        thumbnails.render(rt)
    assert Image.open(io.BytesIO(thumbnails.placeholder("no image"))).size == (128, 128)


# ------------------------------------------------------------------ (b) HTTP
def test_http_errors_and_thumbnails(server: str, region: DemoRegion) -> None:
    from PIL import Image

    assert _get(f"{server}/?site=osaka")[0] == 400
    status, _, body = _get(f"{server}/api/studies?date_from=2024-13-40")
    assert status == 400 and "YYYY-MM-DD" in json.loads(body)["error"]
    assert _get(f"{server}/studies/1.2.3.4.5")[0] == 404
    assert _get(f"{server}/studies/not-a-uid")[0] == 400
    study = region.studies["clinic-a"][0]
    assert _get(f"{server}/thumbnails/{study}/1.2.3.png")[0] == 404
    status, _, body = _get(f"{server}/studies/{study}?site=clinic-c")  # clinic-c may not see clinic-a's study
    assert status == 403 and b"may not see" in body
    with open_catalog(region.layout) as catalog:
        series = catalog.series(study)[0]["series_uid"]
        odd_study, odd_series = region.undecodable
    assert _get(f"{server}/thumbnails/{study}/{series}.png?site=clinic-c")[0] == 403
    status, headers, png = _get(f"{server}/thumbnails/{study}/{series}.png")
    assert status == 200 and headers["content-type"] == "image/png" and headers["x-renkei-thumbnail"] == "rendered"
    assert np.asarray(Image.open(io.BytesIO(png)), dtype=float).std() > 5
    assert _get(f"{server}/thumbnails/{study}/{series}.png")[2] == png  # cached: the same bytes
    if odd_study:
        status, headers, png = _get(f"{server}/thumbnails/{odd_study}/{odd_series}.png")
        assert status == 200 and headers["x-renkei-thumbnail"] == "placeholder"
        assert Image.open(io.BytesIO(png)).size == (128, 128)
    status, _, body = _get(f"{server}/studies/{study}?site=hub")
    assert status == 200 and region.flow_runs["clinic-a"].encode() in body


# ------------------------------------------------------------------ (c) the page in Chromium
def test_page_in_headless_chromium(server: str, region: DemoRegion, tmp_path: Path) -> None:
    import re

    chromium = require_program("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    from renkei.sharing import Sharing

    lay = region.layout
    with open_catalog(lay) as catalog:
        totals = {t.site: t for t in catalog.totals()}
        matrix = catalog.visibility_counts()
        n_studies = len(_all_studies(catalog, lay.config))
        n_instances = catalog.instance_count()

    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
            page.goto(f"{server}/?limit=500", wait_until="networkidle", timeout=60_000)
            page.wait_for_selector("#throughput-chart[data-drawn=true]", timeout=30_000)
            page.wait_for_selector("#availability-chart[data-drawn=true]", timeout=30_000)

            # what needs action comes first, each with its cause (this region's edges are not running)
            assert page.evaluate(
                "document.querySelector('#needs-action').compareDocumentPosition("
                "document.querySelector('#sites')) & Node.DOCUMENT_POSITION_FOLLOWING"
            )
            edges = page.locator("#needs-action li[data-what=edge]")
            assert (
                edges.count() >= 1
                and "not running" in edges.first.inner_text()
                or "never run" in edges.first.inner_text()
            )

            # per-site numbers equal the catalog's
            for site, t in totals.items():
                row = f"#sites tr[data-site='{site}']"
                assert page.inner_text(f"{row} [data-field=center_studies]") == str(t.studies)
                assert page.inner_text(f"{row} [data-field=center_instances]") == str(t.instances)
                assert page.inner_text(f"{row} [data-field=center_mb]") == f"{t.bytes / 1e6:.1f}"
            waiting_site, _ = region.waiting
            assert page.inner_text(f"#sites tr[data-site='{waiting_site}'] [data-field=waiting_studies]") == "1"

            # charts drawn, one trace per site on the throughput chart
            assert page.locator("#throughput-chart .main-svg").count() > 0
            assert page.locator("#throughput-chart .scatterlayer .trace").count() == len(lay.config.site_ids)
            assert page.locator("#availability-chart .scatterlayer .trace .point").count() == sum(
                len(v) for v in region.studies.values()
            )

            # visibility matrix, verification, accesses
            for viewer, origin in itertools.product(lay.config.site_ids, repeat=2):
                cell = page.inner_text(f"#visibility td[data-viewer='{viewer}'][data-origin='{origin}']")
                assert cell == str(matrix.get((viewer, origin), 0)), (viewer, origin)
            assert page.inner_text("#verification [data-field=instances]") == str(n_instances)
            assert page.inner_text("#verification [data-field=repaired]") == "1"
            assert region.repaired_sop in page.inner_text("#verification")
            assert page.locator("#accesses tr[data-event-no]").count() >= 3

            # the study browser: every study, a loaded thumbnail per series, links to the Prefect runs
            assert page.inner_text("#studies [data-field=total]") == str(n_studies)
            assert page.locator("#studies tr[data-study-uid]").count() == n_studies
            images = page.eval_on_selector_all(
                "#studies img.thumb", "els => els.map(e => [e.complete, e.naturalWidth, e.src])"
            )
            assert len(images) >= n_studies and all(done and width > 0 for done, width, _ in images), images
            links = page.eval_on_selector_all("#studies a.run", "els => els.map(e => e.href)")
            for run in region.flow_runs.values():
                assert f"{PREFECT_UI}/runs/flow-run/{run}" in links
            assert page.locator("#studies .name").count() == 0  # operator view: no names

            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)

            # a viewer site: names of the studies it may see
            page.goto(f"{server}/?site=hub", wait_until="networkidle", timeout=60_000)
            page.wait_for_selector("#throughput-chart[data-drawn=true]", timeout=30_000)
            assert page.locator("#studies .name").count() == page.locator("#studies tr[data-study-uid]").count() > 0

            # the browser is first after "needs action", in the first screen, dates as people write them
            assert page.evaluate(
                "document.querySelector('#needs-action').compareDocumentPosition("
                "document.querySelector('#studies')) & Node.DOCUMENT_POSITION_FOLLOWING"
            )
            assert page.evaluate(
                "document.querySelector('#studies').compareDocumentPosition("
                "document.querySelector('#sites')) & Node.DOCUMENT_POSITION_FOLLOWING"
            )
            assert page.locator("#studies").bounding_box()["y"] < 1000
            first_date = page.inner_text("#studies tr[data-study-uid] td >> nth=0")
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}( \d{2}:\d{2})?", first_date), first_date

            # searched by the name's kana reading typed in hiragana: that patient's studies, and only those
            with open_catalog(lay) as catalog:
                sharing = Sharing(lay.config, catalog)
                target = next(
                    r
                    for r in _all_studies(catalog, lay.config)
                    if r.patient_name.count("=") == 2
                    and r.origin_site != "hub"
                    and sharing.decide("hub", r.study_uid).allowed
                )
            family, reading = target.patient_name.split("=")[1].split("^")[0], target.patient_name.split("=")[2]
            hiragana = "".join(chr(ord(c) - 0x60) if "\u30a1" <= c <= "\u30f6" else c for c in reading)
            page.fill("#studies input[name=q]", hiragana.replace("^", " "))
            page.click("#studies button[type=submit]")
            page.wait_for_load_state("networkidle")
            rows = page.locator("#studies tr[data-study-uid]")
            found = [rows.nth(i).get_attribute("data-study-uid") for i in range(rows.count())]
            assert target.study_uid in found
            names = page.eval_on_selector_all("#studies .name", "els => els.map(e => e.textContent)")
            assert names and all(family in n for n in names), (family, names)
            # and by kanji with a wildcard
            page.fill("#studies input[name=q]", family + "*")
            page.click("#studies button[type=submit]")
            page.wait_for_load_state("networkidle")
            assert target.study_uid in page.eval_on_selector_all(
                "#studies tr[data-study-uid]", "els => els.map(e => e.dataset.studyUid)"
            )
        finally:
            browser.close()
    assert problems == []
    assert shot.stat().st_size > 10_000
    out = REPO / "test-output"
    out.mkdir(exist_ok=True)
    shutil.copyfile(shot, out / "dashboard.png")
