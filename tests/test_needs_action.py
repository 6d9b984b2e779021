"""What needs action reaches the operator: the page, the command line and the alert receiver (issue 13, point 4).

A real region on a real Prefect API: the edges run, then the clinic-b edge is
stopped, clinic-a's work pool is paused, a delivery of a clinic-a study into
the hub's PACS fails (the PACS is down), and the backup verification ages
past its limit (the limit is set to seconds by the region's configuration,
which is what an operator would change too). Then:

- `renkei status --json` lists each with its cause and exits 1;
- the dashboard's "Needs action" section, read in headless Chromium, shows
  each with its cause;
- `renkei watch --once` notifies a real HTTP receiver (Apprise's json://)
  once per problem, not again on the next round, and once more when a
  problem is resolved.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import pytest
from helpers_parts import require_program
from helpers_region import layout_of, put_into_edge, region_config

from renkei import peers, synth
from renkei.regionrun import REPO, RegionRunner


class Receiver:
    """A webhook receiver on loopback that keeps every JSON body posted to it."""

    def __init__(self) -> None:
        self.messages: list[dict] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def problems(self) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "failure"]

    def close(self) -> None:
        self.server.shutdown()


@pytest.mark.slow
def test_each_problem_is_shown_with_its_cause_and_notified_once(
    tmp_path: Path, data_dir: Path, prefect_api: str
) -> None:
    from prefect import get_client

    from renkei.flows.deliver import deliver
    from renkei.flows.sync_site import sync_site

    chromium = require_program("chromium", "chromium")
    receiver = Receiver()

    def alerts(raw: dict) -> None:
        raw["alerts"] = {
            "notify": [f"json://127.0.0.1:{receiver.port}/renkei-hook"],
            "edge_silent_s": 6,
            "verification_max_age_h": 0.001,
        }  # 3.6 s

    config_path = region_config(tmp_path, stable_age=0.3, pacs_at=("hub",), edit=alerts)
    layout = layout_of(config_path, data_dir)
    runner = RegionRunner(config_path, layout, prefect_api)
    dashboard = None
    try:
        # a clinic-a study in the center, the way it gets there
        patients = synth.site_patients(layout.config, "clinic-a", 1, 11)
        made = synth.generate_site(
            layout.config, "clinic-a", patients, 1, tmp_path / "synth", ct_slices=2, size=32, modalities=("CT",)
        )
        put_into_edge(layout, "clinic-a", made.files)
        time.sleep(0.5)
        sync_site("clinic-a", str(config_path), str(data_dir))
        from renkei.catalog import Catalog
        from renkei.catalog.backup import backup

        with Catalog.from_layout(layout) as cat:
            study_uid = made.study_infos[0].study_uid
            assert cat.study(study_uid) is not None
            cat.append_audit(
                "center", "verify_backups", "verify-backups", outcome="ok", detail={"instances": 0, "findings": 0}
            )
            backup(cat, cat.backup)

        runner.start_edges()
        runner.wait_until(lambda: _fine(runner, "edge of clinic-b running"), 30, "the edges' heartbeats")

        # 1. an edge stops
        runner.stop_one("edge-clinic-b")

        # 2. a work pool is paused
        async def pause_pool() -> None:
            from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate

            async with get_client() as client:
                try:
                    await client.create_work_pool(WorkPoolCreate(name="renkei-clinic-a", type="process"))
                except Exception:  # it exists from an earlier test on this API
                    pass
                await client.update_work_pool("renkei-clinic-a", WorkPoolUpdate(is_paused=True))

        anyio.run(pause_pool)

        # 3. a delivery fails: the hub's PACS does not answer
        state = deliver(
            "hub", [study_uid], to_pacs=True, config=str(config_path), data_dir=str(data_dir), return_state=True
        )
        assert state.is_failed()

        # 4. the verification ages past its limit (3.6 s here), and the edge's heartbeat past 6 s
        time.sleep(7)

        # the command line
        report = _status_json(runner)
        problems = {(p["what"], p["site"]): p for p in report["problems"]}
        assert "not running" in problems[("edge", "clinic-b")]["cause"]
        assert ("edge", "clinic-a") not in problems and ("edge", "hub") not in problems
        assert problems[("pool", "clinic-a")]["cause"] == "work pool renkei-clinic-a is paused"
        delivery = problems[("delivery", "hub")]
        assert study_uid in delivery["cause"] and "not delivered to hub" in delivery["cause"]
        runs = [p for p in report["problems"] if p["what"] == "run" and "deliver" in p["cause"] and "hub" in p["cause"]]
        assert runs and runs[0]["link"] and "/runs/flow-run/" in runs[0]["link"]
        assert "more than 0.001 h" in problems[("verification", None)]["cause"]
        keys = {p["key"] for p in report["problems"]}

        # the alert receiver: one notification per problem, then nothing new
        watch = _watch_once(runner)
        assert watch.returncode == 1, watch.stderr[-2000:]
        sent = receiver.problems()
        assert len(sent) == len(keys), [m["title"] for m in sent]
        titles = "\n".join(m["title"] for m in sent)
        for what in ("edge at clinic-b", "pool at clinic-a", "delivery at hub", "verification", "run"):
            assert what in titles, titles
        assert any(study_uid in m["message"] for m in sent)
        again = _watch_once(runner)
        assert again.returncode == 1 and len(receiver.problems()) == len(keys), "a problem was notified twice"

        # the page: the same problems, first, each with its cause (headless Chromium)
        port = peers.free_port()
        dashboard = runner.spawn("dashboard", runner.renkei("dashboard", "--port", str(port), "--refresh", "0"))
        peers.wait_for_port("127.0.0.1", port, 60, dashboard.process, "renkei dashboard")
        from playwright.sync_api import sync_playwright
        from test_dashboard import CHROMIUM_ARGS

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            section = page.locator("#needs-action")
            assert "alert" in (section.get_attribute("class") or "")
            items = [
                (li.get_attribute("data-what"), li.get_attribute("data-site") or None, li.inner_text())
                for li in section.locator("li").all()
            ]
            # several problems may share one (what, site): two runs at the hub, say; keep them all
            shown: dict[tuple, str] = {}
            for what, site, text in items:
                shown[(what, site)] = (shown[(what, site)] + "\n" + text) if (what, site) in shown else text
            assert "not running" in shown[("edge", "clinic-b")]
            assert "paused" in shown[("pool", "clinic-a")] and "resume" in shown[("pool", "clinic-a")]
            assert study_uid in shown[("delivery", "hub")]
            assert "more than 0.001 h" in shown[("verification", None)]
            assert any(what == "run" and "deliver" in text for what, _, text in items), items
            page.screenshot(path=str(tmp_path / "needs-action.png"), full_page=False)
            browser.close()

        # a resolved problem is said once
        async def resume_pool() -> None:
            from prefect.client.schemas.actions import WorkPoolUpdate

            async with get_client() as client:
                await client.update_work_pool("renkei-clinic-a", WorkPoolUpdate(is_paused=False))

        anyio.run(resume_pool)
        _watch_once(runner)
        resolved = [m for m in receiver.messages if m.get("type") == "success"]
        assert [m["title"] for m in resolved if "pool at clinic-a" in m["title"]], resolved
    finally:
        runner.stop()
        receiver.close()


def _fine(runner: RegionRunner, what: str) -> bool:
    return what in _status_json(runner)["ok"]


def _status_json(runner: RegionRunner) -> dict:
    proc = subprocess.run(
        runner.renkei("status", "--json"), cwd=REPO, env=runner.env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _watch_once(runner: RegionRunner) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        runner.renkei("watch", "--once"), cwd=REPO, env=runner.env(), capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
