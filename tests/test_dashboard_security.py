"""The dashboard against a hostile browser page: Host check, cross-site refusals, security headers.

The real `renkei dashboard` process over the demo-like region of
tests/helpers_dashboard.py, on a free loopback port: (a) over plain HTTP with
hand-set headers (a foreign Host, Sec-Fetch-Site, Origin), counting the
catalog's audit events before and after, and (b) in Debian's headless Chromium,
whose resolver maps the attacker's names to 127.0.0.1: a DNS-rebinding page
that fetches the dashboard by its own name, and a cross-site page that embeds
a site view's study page, thumbnails and fetches. Nothing refused may reach a
route: no audit event is written.
"""

from __future__ import annotations

import functools
import http.client
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_dashboard import DemoRegion, module_region
from helpers_parts import REPO, require_program

from renkei import peers
from renkei.runtime import open_catalog

EXTRA_HOST = "dash.test"  # given with --allowed-host
# Chromium's own Local Network Access check stops a public page's requests to loopback before they leave the
# browser; it is turned off so that the test shows the dashboard holding on its own (Firefox, Safari and
# older Chromium have no such check)
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-features=LocalNetworkAccessChecks",
    "--host-resolver-rules=MAP evil.example 127.0.0.1, MAP attacker.example 127.0.0.1",
]
HEADERS = {"x-frame-options": "DENY", "x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}


@pytest.fixture(scope="module")
def region(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> DemoRegion:
    return module_region(tmp_path_factory, "dashboard-security-region")


@pytest.fixture(scope="module")
def server(region: DemoRegion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    """`renkei dashboard --allowed-host dash.test` on a free loopback port, and its log; always stopped."""
    free = peers.free_port()
    log = tmp_path_factory.mktemp("dashboard-security-server") / "server.log"
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
                str(free),
                "--refresh",
                "0",
                "--allowed-host",
                EXTRA_HOST,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:
        peers.wait_for_port("127.0.0.1", free, timeout=60, process=proc, what="renkei dashboard")
        yield free, log
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in (0, -15), log.read_text(errors="replace")


@pytest.fixture(scope="module")
def port(server: tuple[int, Path]) -> int:
    return server[0]


def _request(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body); a 'Host' in `headers` replaces the real one."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def _audit_count(region: DemoRegion) -> int:
    with open_catalog(region.layout) as catalog:
        return len(catalog.audit())


def _targets(region: DemoRegion) -> dict[str, str]:
    """Paths that read patient data as a site (and, but the thumbnail, write a 'view' audit event)."""
    study = region.studies["clinic-a"][0]  # hub may see it: a cross-site view, audited
    with open_catalog(region.layout) as catalog:
        series = catalog.series(study)[0]["series_uid"]
    return {
        "site view": "/?site=hub",
        "study page": f"/studies/{study}?site=hub",
        "thumbnail": f"/thumbnails/{study}/{series}.png?site=hub",
        "api": "/api/studies?site=hub",
    }


# ------------------------------------------------------------------ (a) over HTTP
def test_the_counted_requests_do_write_audit_events(port: int, region: DemoRegion) -> None:
    """Without Sec-Fetch headers or Origin (curl, scripts) the site views are served and audited."""
    targets = _targets(region)
    for what in ("site view", "study page", "api"):
        before = _audit_count(region)
        status, _, body = _request(port, targets[what])
        assert status == 200, (what, body[:300])
        assert _audit_count(region) > before, what  # so "unchanged" below means something
    status, headers, _ = _request(port, targets["thumbnail"])
    assert status == 200 and headers["content-type"] == "image/png"


def test_a_foreign_host_is_refused_before_any_route(port: int, region: DemoRegion) -> None:
    before = _audit_count(region)
    for path in [*_targets(region).values(), "/", "/healthz", "/static/dashboard.css", "/vendor/plotly.min.js"]:
        for host in (
            f"evil.example:{port}",
            "evil.example",
            f"localhost.evil.example:{port}",
            f"{EXTRA_HOST}.evil.example",
            f"127.0.0.1.nip.io:{port}",
            "",
            "bad host",
        ):
            status, headers, body = _request(port, path, {"Host": host})
            assert status == 400, (path, host, status)
            text = body.decode()
            assert f"refused Host {host!r}" in text and "--allowed-host" in text, text
            assert headers["content-type"].startswith("text/plain")
            assert all(headers[k] == v for k, v in HEADERS.items())
    assert _audit_count(region) == before  # the rebinding site view wrote nothing


def test_the_names_it_serves_are_accepted_with_or_without_port(port: int) -> None:
    for host in (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        f"localhost:{port}",
        "LocalHost",
        f"[::1]:{port}",
        "[::1]",
        f"{EXTRA_HOST}:{port}",
        EXTRA_HOST.upper(),
        "localhost:9090",
    ):  # an SSH tunnel's other port
        status, _, body = _request(port, "/healthz", {"Host": host})
        assert status == 200, (host, body)


def test_cross_site_requests_for_patient_data_are_refused(port: int, region: DemoRegion) -> None:
    me = f"http://127.0.0.1:{port}"
    refused = [
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://localhost:{port}"},
        {"Origin": f"https://127.0.0.1:{port}"},
        {"Origin": "http://127.0.0.1:1"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "http://evil.example"},
    ]
    before = _audit_count(region)
    for what, path in [*_targets(region).items(), ("operator view", "/"), ("api", "/api/overview")]:
        for headers in refused:
            status, answer, body = _request(port, path, headers)
            assert status == 403, (what, headers, status)
            assert b"refused GET" in body and b"patient data" in body
            assert answer["cache-control"] == "no-store"
            assert all(answer[k] == v for k, v in HEADERS.items())
    assert _audit_count(region) == before

    # the dashboard's own pages, an address typed in the browser, and clients without the headers
    study_page = _targets(region)["study page"]
    for headers in (
        {},
        {"Sec-Fetch-Site": "same-origin"},
        {"Sec-Fetch-Site": "none"},
        {"Origin": me},
        {"Sec-Fetch-Site": "same-origin", "Origin": me},
        {"Host": "localhost", "Origin": "http://localhost"},
    ):
        before = _audit_count(region)
        status, _, body = _request(port, study_page, headers)
        assert status == 200, (headers, body[:300])
        assert _audit_count(region) == before + 1

    # static files carry no patient data: any page may load them
    assert _request(port, "/static/dashboard.css", {"Sec-Fetch-Site": "cross-site"})[0] == 200
    assert _request(port, "/healthz", {"Origin": "http://evil.example"})[0] == 200


def test_other_methods_need_the_dashboards_own_pages(port: int, region: DemoRegion) -> None:
    me = f"http://127.0.0.1:{port}"
    before = _audit_count(region)
    for headers in (
        {},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"},
        {"Sec-Fetch-Site": "same-site"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "none"},
    ):
        status, _, body = _request(port, "/?site=hub", headers, method="POST")
        assert status == 403 and b"refused POST" in body, (headers, status)
    # from its own page it reaches the app, which has no such route
    assert _request(port, "/?site=hub", {"Sec-Fetch-Site": "same-origin", "Origin": me}, method="POST")[0] == 405
    assert _request(port, "/?site=hub", {"Origin": me}, method="DELETE")[0] == 405
    assert _audit_count(region) == before


def test_security_headers_on_every_answer(port: int, region: DemoRegion) -> None:
    study = region.studies["clinic-a"][0]
    patient_data = [*_targets(region).values(), "/", f"/studies/{study}", "/api/studies", "/api/overview"]
    other = [
        "/healthz",
        "/static/dashboard.css",
        "/static/dashboard.js",
        "/vendor/plotly.min.js",
        "/studies/1.2.3.4.5",
        "/studies/not-a-uid",
        "/?site=osaka",
        "/nothing-here",
        f"/studies/{study}?site=clinic-c",
    ]
    for path in patient_data + other:
        status, headers, _ = _request(port, path)
        assert status < 500, (path, status)
        for name, value in HEADERS.items():
            assert headers.get(name) == value, (path, name, headers)
        csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split("; ")}
        assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"], (path, csp)
        assert csp["frame-ancestors"] == ["'none'"] and csp["object-src"] == ["'none'"]
        assert csp["img-src"] == ["'self'", "data:"]
        assert "'unsafe-inline'" not in headers["content-security-policy"]
        assert "'unsafe-eval'" not in headers["content-security-policy"]
        if path in patient_data and not path.startswith("/thumbnails/"):
            assert headers["cache-control"] == "no-store", path
    # thumbnails keep their own caching (private, a day; placeholders no-store)
    assert _request(port, _targets(region)["thumbnail"])[1]["cache-control"] == "private, max-age=86400"


def test_a_bad_allowed_host_is_refused_at_start(region: DemoRegion) -> None:
    for bad in ("dash.test:8080", "http://dash.test", "*.example.org"):
        done = subprocess.run(
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
                str(peers.free_port()),
                "--allowed-host",
                bad,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert done.returncode == 2, (bad, done.stdout, done.stderr)
        assert "without scheme or port" in done.stdout + done.stderr


# ------------------------------------------------------------------ (b) a hostile page in Chromium
@pytest.fixture
def hostile_site(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A plain web server on loopback for the attacker's pages (reached as attacker.example); always stopped."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    root = tmp_path / "attacker"
    root.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_hostile_pages_in_headless_chromium(
    server: tuple[int, Path], region: DemoRegion, hostile_site: tuple[Path, int]
) -> None:
    chromium = require_program("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    port, log = server
    targets = _targets(region)
    me = f"http://127.0.0.1:{port}"
    root, attacker_port = hostile_site
    fetches = ", ".join(f"'{me}{p}'" for p in targets.values())
    (root / "cross.html").write_text(f"""<!doctype html><html><body>
<img id="thumb" src="{me}{targets["thumbnail"]}">
<iframe id="frame" src="{me}{targets["study page"]}"></iframe>
<script>
window.done = Promise.all([{fetches}].map(u => fetch(u, {{mode: "no-cors", credentials: "include"}})
  .then(r => "answered " + r.type, e => "failed")));
</script></body></html>""")
    rebind_page = """<!doctype html><html><body><script>
window.done = Promise.all(["/?site=hub", "/api/studies?site=hub"].map(u => fetch(u).then(
  r => r.text().then(t => [r.status, t]))));
</script></body></html>"""

    before = _audit_count(region)
    log_start = log.stat().st_size
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            # DNS rebinding: the attacker's page, served under its name and the dashboard's port, then the name
            # points to 127.0.0.1 and its same-origin fetches reach the dashboard with Host evil.example:PORT
            page = browser.new_page()
            page.route(
                f"http://evil.example:{port}/rebind.html",
                lambda route: route.fulfill(status=200, content_type="text/html", body=rebind_page),
            )
            page.goto(f"http://evil.example:{port}/rebind.html", timeout=60_000)
            answers = page.evaluate("window.done")
            assert [status for status, _ in answers] == [400, 400], answers
            assert all(f"refused Host 'evil.example:{port}'" in text for _, text in answers), answers
            assert all("<table" not in text for _, text in answers)
            # the browser's own navigation to the rebound name
            response = page.goto(f"http://evil.example:{port}/?site=hub", timeout=60_000)
            assert response is not None and response.status == 400

            # a cross-site page embedding the site view's study page and thumbnail, and fetching the rest
            page = browser.new_page()
            page.goto(f"http://attacker.example:{attacker_port}/cross.html", wait_until="networkidle", timeout=60_000)
            page.evaluate("window.done")
            assert page.eval_on_selector("#thumb", "e => e.complete && e.naturalWidth") == 0
            assert page.frame_locator("#frame").locator("#study").count() == 0  # never rendered in the frame
        finally:
            browser.close()
    assert _audit_count(region) == before
    # the dashboard itself refused each (the browser's Cross-Origin-Resource-Policy check comes after it)
    refusals = log.read_bytes()[log_start:].decode(errors="replace")
    for path in targets.values():
        assert (
            f"refused GET {path.split('?')[0]}: comes from another web site (Sec-Fetch-Site 'cross-site'" in refusals
        ), (path, refusals)
