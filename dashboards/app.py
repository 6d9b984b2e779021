"""The operator's web dashboard: FastAPI + Jinja2 pages over dashboards.data, charts with Plotly.

FastAPI, uvicorn and Jinja2 come with Prefect already (no second server
stack). Charts are Plotly figures built in Python and drawn by plotly.js,
which ships inside the plotly package and is served by this app: the page
needs no internet (sites' and operators' browsers often have none).

`create_app(layout, prefect_ui)` returns the ASGI app; `renkei dashboard` serves
it on loopback. It reads the catalog (one Catalog for the app's lifetime,
catching up with other writers on every query) and the edges' journals
(read-only); it writes only audit events (a viewer site's cross-site views)
and its thumbnail cache under <data>/cache/thumbnails.

It has no login, so `BrowserGuard` stands between it and the browser: only the
Host names it was told it serves (DNS rebinding), no cross-site request for
anything but its static files (a hostile page cannot make the browser read a
page or write an audit event), and CSP / frame / cache headers on every answer.
"""

from __future__ import annotations

import base64
import codecs
import datetime as dt
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import plotly
import plotly.graph_objects as go
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from plotly.utils import PlotlyJSONEncoder
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from renkei.catalog.catalog import Catalog
from renkei.config import Layout
from renkei.dashboards import data as d
from renkei.dashboards.thumbnails import PLACEHOLDER, ThumbnailCache, middle_instance, placeholder
from renkei.display import dicom_date
from renkei.errors import CatalogError, IntegrityError, RenkeiError, StorageError, UsageError
from renkei.runtime import open_store
from renkei.sharing import Sharing
from renkei.status import region_status
from renkei.uids import is_valid_uid

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
DEFAULT_PREFECT_UI = "http://127.0.0.1:4200"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def plotly_js_path() -> Path:
    """plotly.min.js as shipped inside the plotly Python package (served locally, never from a CDN)."""
    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


class Dashboard:
    """What the app's routes share: the region, one catalog, the object store and the thumbnail cache."""

    def __init__(self, layout: Layout, prefect_ui: str, refresh_s: int = 0) -> None:
        self.layout = layout
        self.prefect_ui = prefect_ui.rstrip("/")
        self.refresh_s = refresh_s
        self.thumbnails = ThumbnailCache(layout.data_dir / "cache" / "thumbnails")
        self._catalog: Any = None
        self._store: Any = None
        self._lock = threading.Lock()
        self._status: tuple[float, Any] | None = None

    STATUS_TTL_S = 10.0  # every page load (and the auto-refresh of several screens) shares one check

    def needs_action(self) -> Any:
        """`renkei status`'s checks, at most once per STATUS_TTL_S (edges, catalog, Prefect API calls)."""
        cached = self._status
        if cached is not None and time.monotonic() - cached[0] < self.STATUS_TTL_S:
            return cached[1]
        api = os.environ.get("PREFECT_API_URL") or f"{self.prefect_ui}/api"
        status = region_status(self.layout, api, catalog=self.catalog, timeout=3.0)
        self._status = (time.monotonic(), status)
        return status

    @property
    def catalog(self) -> Any:
        with self._lock:
            if self._catalog is None:
                # a reader: never compacts in the background of a web request
                self._catalog = Catalog.from_layout(self.layout, writer="dashboard", auto_compact=None)
            return self._catalog

    @property
    def store(self) -> Any:
        with self._lock:
            if self._store is None:
                self._store = open_store(self.layout)
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._catalog is not None:
                self._catalog.close()
                self._catalog = None


# ------------------------------------------------------------------ the browser guard
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
# no patient data and no audit behind these: any page may load them
UNGUARDED_PREFIXES = ("/static/", "/vendor/")
UNGUARDED_PATHS = ("/healthz",)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Scripts only from the app's own files (the charts' figures sit in <script type="application/json">: data,
# never run). Styles: dashboard.css, plus the two <style> elements plotly.js makes itself -- an empty one it
# fills through CSSOM (allowed by the hash of "") and the map CSS it bundles (allowed by its own hash, read
# from the plotly.min.js served: see plotly_style_hashes). No 'unsafe-inline' anywhere.
EMPTY_STYLE_HASH = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"
_PLOTLY_STYLE_RE = re.compile(
    r"""createElement\("style"\);\w+\.id="[0-9a-f]+",\w+\.textContent="""
    r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
)


@functools.lru_cache(maxsize=1)
def plotly_style_hashes() -> tuple[str, ...]:
    """CSP hashes of the style sheets plotly.min.js writes into <style> elements when it loads.

    plotly.js 4 bundles maplibre's CSS and injects it as an inline <style>; a strict
    style-src refuses it (a console error on every page). Its hash allows that text
    and nothing else. Found again in whatever plotly.min.js is installed, so an
    upgrade needs no edit here; when the pattern is gone, none is added and the
    Chromium test's console check says so.
    """
    text = plotly_js_path().read_text(encoding="utf-8")
    hashes = []
    for match in _PLOTLY_STYLE_RE.finditer(text):
        literal = match.group(1)[1:-1]
        css = codecs.decode(literal, "unicode_escape") if "\\" in literal and literal.isascii() else literal
        digest = base64.b64encode(hashlib.sha256(css.encode("utf-8")).digest()).decode("ascii")
        hashes.append(f"'sha256-{digest}'")
    return tuple(dict.fromkeys(hashes))


def content_security_policy() -> str:
    """The dashboard's CSP: everything from itself only, nothing inline but Plotly's own style sheets."""
    styles = " ".join(("'self'", EMPTY_STYLE_HASH, *plotly_style_hashes()))
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self'",
            f"style-src {styles}",
            "img-src 'self' data:",
            "connect-src 'self'",
            "font-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


SECURITY_HEADERS = (  # and Content-Security-Policy
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)
_HOST_RE = re.compile(r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?")


def _split_host(value: str) -> tuple[str, int | None] | None:
    """(host, port) of a Host header or an Origin's authority: lower-case, IPv6 in brackets; None if malformed."""
    match = _HOST_RE.fullmatch(value.strip())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 0 < port < 65536:
        return None
    if match["ipv6"] is not None:
        try:
            return f"[{ipaddress.IPv6Address(match['ipv6']).compressed}]", port
        except ValueError:
            return None
    return match["name"].lower(), port


def allowed_host(value: str) -> str:
    """A host name or address the dashboard may be reached as, in the form Host headers carry it.

    '::1' and '[::1]' both give '[::1]'; names are lower-cased. UsageError for a
    port, a scheme, a wildcard or anything that is not a host name or address.
    """
    text = value.strip()
    if text.count(":") > 1 and not text.startswith("["):
        text = f"[{text}]"  # a bare IPv6 address
    parsed = _split_host(text)
    if parsed is None or parsed[1] is not None or not parsed[0].strip("."):
        raise UsageError(
            f"allowed host {value!r} is not a host name or address: write it as the browser's "
            "address bar shows it, without scheme or port (dashboard.example.org, 10.0.0.5, ::1)"
        )
    return parsed[0]


def _origin_matches(origin: str, host: tuple[str, int | None], scheme: str) -> bool:
    """Whether an Origin header names this very server (scheme, host and port as the request reached it)."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or parts.path or parts.query:
        return False  # 'null' (sandboxed frame, file:) among others
    theirs = _split_host(parts.netloc)
    default = {"http": 80, "https": 443}
    return (
        theirs is not None
        and parts.scheme == scheme
        and (theirs[0], theirs[1] or default[parts.scheme]) == (host[0], host[1] or default.get(scheme, 80))
    )


class BrowserGuard:
    """ASGI middleware: what a browser may ask of a dashboard that has no login and shows patient data.

    1. The Host header must name one of `allowed_hosts` (any port: an SSH tunnel
       may use another local port); else 400. A page that rebinds its own DNS
       name to 127.0.0.1 sends its own name, so it is refused before any route.
    2. Everything but static files refuses what the browser says is another
       site's request (Sec-Fetch-Site 'cross-site' or 'same-site', or an Origin
       that is not this server): 403, before the route reads data or audits.
       Requests without those headers (curl, scripts) are served.
    3. A method other than GET/HEAD/OPTIONS must come from the dashboard's own
       pages (Sec-Fetch-Site 'same-origin' or a matching Origin).
    4. Every answer carries the CSP and SECURITY_HEADERS; answers of guarded
       paths without a Cache-Control of their own get 'no-store'.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str], csp: str) -> None:
        self.app = app
        self.allowed_hosts = tuple(dict.fromkeys(allowed_host(h) for h in allowed_hosts))
        self.headers = (("Content-Security-Policy", csp), *SECURITY_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the dashboard has none
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        guarded = not (path.startswith(UNGUARDED_PREFIXES) or path in UNGUARDED_PATHS)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers:
                    headers[name] = value
                if guarded and "cache-control" not in headers:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        refusal = self.refusal(scope, Headers(scope=scope), guarded)
        if refusal is not None:
            status, text = refusal
            await PlainTextResponse(text + "\n", status_code=status)(scope, receive, send_with_headers)
            return
        await self.app(scope, receive, send_with_headers)

    def refusal(self, scope: Scope, headers: Headers, guarded: bool) -> tuple[int, str] | None:
        """(status, why) when the request must not reach the app; None when it may."""
        raw_host = headers.get("host", "")
        host = _split_host(raw_host)
        if host is None or host[0] not in self.allowed_hosts:
            log.warning("dashboard refused Host %r (allowed: %s)", raw_host[:100], ", ".join(self.allowed_hosts))
            return 400, (
                f"renkei dashboard: refused Host {raw_host[:100]!r}. It answers only to "
                f"{', '.join(self.allowed_hosts)} (with any port): it has no login and shows patient "
                "data, and a foreign Host is how a hostile web page reaches it (DNS rebinding). "
                "Open it by one of those names, or start it with --allowed-host NAME to allow a name."
            )
        fetch_site = headers.get("sec-fetch-site", "").lower()
        origin = headers.get("origin")
        origin_ok = origin is None or _origin_matches(origin, host, scope.get("scheme", "http"))
        method = scope["method"].upper()
        if method not in SAFE_METHODS:
            if origin_ok and (fetch_site == "same-origin" or (not fetch_site and origin is not None)):
                return None
            why = "comes from another page than the dashboard's own"
        elif not guarded or (fetch_site not in ("cross-site", "same-site") and origin_ok):
            return None
        else:
            why = "comes from another web site"
        log.warning(
            "dashboard refused %s %s: %s (Sec-Fetch-Site %r, Origin %r)",
            method,
            scope["path"],
            why,
            fetch_site,
            (origin or "")[:100],
        )
        return 403, (
            f"renkei dashboard: refused {method} {scope['path']}: the request {why} (Sec-Fetch-Site "
            f"{fetch_site or 'absent'}, Origin {(origin or 'absent')[:100]}). Its pages show patient data "
            "and record views in the audit log, so only its own pages may ask for them: type the "
            f"dashboard's address (http://{raw_host[:100]}/) in the browser or use a bookmark."
        )


class DashboardApp(FastAPI):
    """FastAPI with BrowserGuard outermost, so that even its last-resort 500 answers carry the headers."""

    def __init__(self, allowed_hosts: Iterable[str], **kwargs: Any) -> None:
        self.allowed_hosts = tuple(allowed_hosts)
        self.csp = content_security_policy()
        super().__init__(**kwargs)

    def build_middleware_stack(self) -> ASGIApp:
        return BrowserGuard(super().build_middleware_stack(), self.allowed_hosts, self.csp)


# ------------------------------------------------------------------ charts
def _color(config: Any, site: str) -> str:
    ids = list(config.site_ids)
    return PALETTE[(ids.index(site) if site in ids else len(ids)) % len(PALETTE)]


def throughput_figure(t: d.Throughput, config: Any) -> dict[str, Any]:
    """The throughput chart (MB/s per site over time) as a Plotly figure."""
    x = [d.local_time(s, config, "%Y-%m-%d %H:%M:%S") for s in t.starts]
    fig = go.Figure()
    for site, values in t.mb_s.items():
        fig.add_trace(
            go.Scatter(
                x=x,
                y=list(values),
                name=site,
                mode="lines+markers",
                line_shape="hv",
                line={"color": _color(config, site)},
                hovertemplate=f"{site}: %{{y:.2f}} MB/s<br>%{{x}}<extra></extra>",
            )
        )
    title = f"MB registered per second, {t.bucket_seconds} s buckets" if t.bucket_seconds else "no data"
    fig.update_layout(_layout(f"time ({config.timezone})", "MB/s", title))
    if not t.starts:
        _empty(fig, "nothing registered in the last 24 h")
    else:
        _pad_x(fig, t.starts, config, max(t.bucket_seconds, 60))
    return fig.to_plotly_json()


def availability_figure(points: list[d.Availability], config: Any) -> dict[str, Any]:
    """Time to availability (edge's last instance -> verified in the center) per study, per site."""
    fig = go.Figure()
    by_site: dict[str, list[d.Availability]] = {}
    for p in points:
        by_site.setdefault(p.origin_site, []).append(p)
    for site in [s for s in config.site_ids if s in by_site] + sorted(set(by_site) - set(config.site_ids)):
        pts = sorted(by_site[site], key=lambda p: p.available_at)
        fig.add_trace(
            go.Scatter(
                x=[d.local_time(p.available_at, config) for p in pts],
                y=[p.seconds for p in pts],
                name=site,
                mode="markers",
                marker={"color": _color(config, site), "size": 8},
                customdata=[p.study_uid for p in pts],
                hovertemplate=f"{site}: %{{y:.1f}} s<br>study %{{customdata}}<br>%{{x}}<extra></extra>",
            )
        )
    fig.update_layout(
        _layout(
            f"available in the center at ({config.timezone})",
            "seconds",
            "last instance at the edge to verified in the center",
        )
    )
    if not points:
        _empty(fig, "no study became available in the last 24 h")
    else:
        _pad_x(fig, [p.available_at for p in points], config, 300)
    return fig.to_plotly_json()


def _layout(x_title: str, y_title: str, title: str) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 13}},
        "height": 300,
        "margin": {"l": 55, "r": 10, "t": 56, "b": 50},
        "xaxis": {"title": {"text": x_title}},
        "yaxis": {"title": {"text": y_title}, "rangemode": "tozero"},
        "legend": {"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom"},
        "title_x": 0.0,
        "template": "plotly_white",
    }


def _pad_x(fig: Any, times: Sequence[Any], config: Any, pad_s: float) -> None:
    """All points at one instant: a time axis of a few minutes around it, not of a few microseconds."""
    if times and max(times) - min(times) < dt.timedelta(seconds=pad_s):
        mid = min(times) + (max(times) - min(times)) / 2
        pad = dt.timedelta(seconds=pad_s)
        fig.update_xaxes(range=[d.local_time(mid - pad, config), d.local_time(mid + pad, config)])


def _empty(fig: Any, text: str) -> None:
    """No data: say so, with no axes (Plotly would draw -1..6 and sub-millisecond ticks for nothing)."""
    fig.add_annotation(
        text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5, font={"size": 14, "color": "#666"}
    )
    fig.update_xaxes(visible=False, showgrid=False)
    fig.update_yaxes(visible=False, showgrid=False)


def _json_for_script(value: Any) -> str:
    """JSON safe inside <script type="application/json">."""
    text = json.dumps(value, cls=PlotlyJSONEncoder, ensure_ascii=False)
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


# ------------------------------------------------------------------ the app
def create_app(
    layout: Layout, prefect_ui: str | None = None, refresh_s: int = 0, allowed_hosts: Iterable[str] = ()
) -> FastAPI:
    """The dashboard's ASGI app for the region at `layout` (links runs to the Prefect UI at `prefect_ui`).

    It answers to the loopback names plus `allowed_hosts` (the bind address, --allowed-host); UsageError for
    one that is not a host name or address.
    """
    hosts = tuple(dict.fromkeys(allowed_host(h) for h in (*LOOPBACK_HOSTS, *allowed_hosts)))
    board = Dashboard(layout, prefect_ui or DEFAULT_PREFECT_UI, refresh_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            board.close()

    app = DashboardApp(
        hosts, title="renkei dashboard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.board = board
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.globals.update(
        local_time=lambda v, fmt="%Y-%m-%d %H:%M:%S": d.local_time(v, layout.config, fmt),
        age_text=d.age_text,
        run_url=lambda run: d.run_url(board.prefect_ui, run),
        mb=lambda b: f"{(b or 0) / 1e6:.1f}",
        dicom_date=dicom_date,
        config=layout.config,
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def error(request: Request, status: int, message: str) -> Response:
        if wants_json(request):
            return JSONResponse({"error": message, "status": status}, status_code=status)
        return templates.TemplateResponse(
            request, "error.html", {"status": status, "message": message}, status_code=status
        )

    @app.exception_handler(UsageError)
    async def _bad_request(request: Request, exc: UsageError) -> Response:
        return error(request, 400, str(exc))

    @app.exception_handler(d.NotFound)
    async def _not_found(request: Request, exc: d.NotFound) -> Response:
        return error(request, 404, str(exc))

    @app.exception_handler(d.Forbidden)
    async def _forbidden(request: Request, exc: d.Forbidden) -> Response:
        return error(request, 403, str(exc))

    @app.exception_handler(RenkeiError)
    async def _failed(request: Request, exc: RenkeiError) -> Response:
        log.error("dashboard request %s failed: %s", request.url.path, exc)
        return error(request, 500, str(exc))

    @app.exception_handler(CatalogError)
    async def _catalog_down(request: Request, exc: CatalogError) -> Response:
        return error(request, 503, f"{exc}; check the center's storage, then reload")

    def uid_or_400(value: str, what: str) -> str:
        if not is_valid_uid(value):
            raise d.BadRequest(f"{what} {value[:80]!r} is not a valid DICOM UID (digits and dots)")
        return value

    def no_store(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> Response:
        query = d.parse_query(layout.config, request.query_params)
        cat = board.catalog
        view = d.overview(layout, cat)
        page = d.browse_studies(layout, cat, query)
        needs = board.needs_action()
        context = {
            "view": view,
            "page": page,
            "query": query,
            "prefect_ui": board.prefect_ui,
            "needs": needs,
            "refresh_s": board.refresh_s if not query.viewer else 0,
            "throughput_json": _json_for_script(throughput_figure(view.throughput, layout.config)),
            "availability_json": _json_for_script(availability_figure(list(view.availability), layout.config)),
            "thumb_suffix": f"?site={query.viewer}" if query.viewer else "",
            "modalities": sorted({m for s in page.studies for m in s.modalities} | {"CT", "MR", "CR", "DX"}),
        }
        return no_store(templates.TemplateResponse(request, "index.html", context))

    @app.get("/studies/{study_uid}", response_class=HTMLResponse)
    def study(request: Request, study_uid: str, site: str | None = None) -> Response:
        uid_or_400(study_uid, "Study Instance UID")
        viewer = d.check_site(layout.config, site) if site else None
        detail = d.study_detail(layout, board.catalog, study_uid, viewer)
        return no_store(
            templates.TemplateResponse(
                request,
                "study.html",
                {"detail": detail, "viewer": viewer, "thumb_suffix": f"?site={viewer}" if viewer else ""},
            )
        )

    @app.get("/thumbnails/{study_uid}/{series_uid}.png")
    def thumbnail(study_uid: str, series_uid: str, site: str | None = None) -> Response:
        uid_or_400(study_uid, "Study Instance UID")
        uid_or_400(series_uid, "Series Instance UID")
        cat = board.catalog
        if site:
            d.check_site(layout.config, site)

            verdict = Sharing(layout.config, cat).decide(site, study_uid)
            if not verdict.allowed and cat.study(study_uid) is not None:
                raise d.Forbidden(f"{site} may not see study {study_uid}")
        rows = d.series_instances(cat, study_uid, series_uid)
        inst = middle_instance(rows)
        store = board.store

        def load() -> bytes:
            return store.read_verified(inst["object_key"], inst["sha256"])

        try:
            thumb = board.thumbnails.get(inst["sha256"], load, inst.get("transfer_syntax_uid") or None)
            png, kind = thumb.png, thumb.kind
        except IntegrityError:
            png, kind = placeholder("the center's copy failed its SHA-256 check"), PLACEHOLDER
        except (StorageError, FileNotFoundError, OSError):
            png, kind = placeholder("the center's copy is missing"), PLACEHOLDER
        cache = "no-store" if kind == PLACEHOLDER else "private, max-age=86400"
        return Response(png, media_type="image/png", headers={"X-Renkei-Thumbnail": kind, "Cache-Control": cache})

    @app.get("/api/overview")
    def api_overview() -> Response:
        return JSONResponse(d.overview(layout, board.catalog).to_dict())

    @app.get("/api/studies")
    def api_studies(request: Request) -> Response:
        query = d.parse_query(layout.config, request.query_params)
        return no_store(JSONResponse(d.browse_studies(layout, board.catalog, query).to_dict()))

    @app.get("/vendor/plotly.min.js")
    def plotly_js() -> Response:
        return FileResponse(
            plotly_js_path(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
        )

    @app.get("/healthz")
    def healthz() -> Response:
        return JSONResponse({"ok": True, "region": layout.config.region, "pid": os.getpid()})

    return app
