"""The center's DICOMweb service (PS3.18) as an ASGI app: QIDO-RS, WADO-RS and STOW-RS under one base URL.

`create_app(layout)` returns it; `renkei center serve` runs it with uvicorn.
Routes, under `/dicomweb`:

- QIDO-RS: GET /studies, /studies/{study}/series, /studies/{study}/series/{series}/instances,
  /studies/{study}/instances (application/dicom+json; matching of PS3.4 C.2.2.2, with
  `fuzzymatching=true` for names in any of their forms; limit, offset, includefield);
- WADO-RS: GET /studies/{study}[/series/{series}[/instances/{instance}]] as
  multipart/related; type="application/dicom" (the stored bytes, unchanged and checked against
  the catalog's SHA-256 before they are sent), .../metadata as DICOM JSON, .../frames/{n} and
  .../bulk/{tag} as application/octet-stream parts;
- STOW-RS: POST /studies[/{study}] with multipart/related; type="application/dicom".

Every request carries a site's credential (`Authorization: Bearer`, center/identity.py); an
answer is what that site may see under the one sharing decision (center/service.py). Before
authentication nothing is read beyond the headers; a body is read only once the caller is known.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import shutil
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom import dcmread
from pydicom.encaps import generate_frames
from starlette.concurrency import run_in_threadpool

from renkei.catalog.fs import TEMP_PREFIX
from renkei.catalog.store import ObjectMissing
from renkei.center import dicomweb as dw
from renkei.center.identity import Credentials, Identity, NotAuthenticated
from renkei.center.service import (
    INSTANCE_MATCHABLE,
    INSTANCE_RESULT,
    MAX_INSTANCE_BYTES,
    SERIES_MATCHABLE,
    SERIES_RESULT,
    STUDY_MATCHABLE,
    STUDY_RESULT,
    CenterService,
    Found,
    NotFound,
    StoreOutcome,
)
from renkei.config import Layout
from renkei.errors import IntegrityError, RenkeiError, UsageError
from renkei.uids import is_valid_uid

log = logging.getLogger(__name__)

PREFIX = "/dicomweb"
DICOM = "application/dicom"
OCTETS = "application/octet-stream"
PREFETCH = 4  # instances read ahead of the one being sent (each at most SPOOL_IN_MEMORY)
READERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="wado")
MAX_STOW_PARTS = 10_000


def _uid(value: str, what: str) -> str:
    if not is_valid_uid(value):
        raise dw.BadRequest(f"{what} {value[:80]!r} is not a UID")
    return value


async def _parts(
    center: CenterService, rows: list[Any], heads: list[bytes], tail: bytes, first: bytes
) -> AsyncIterator[bytes]:
    """The parts of a WADO-RS answer: each instance read and verified in a thread, PREFETCH ahead of
    the one being sent, so that the disk and the hash overlap the network. An instance that cannot be
    served ends the body early (the status is sent; the client sees the length short)."""
    loop = asyncio.get_running_loop()
    ahead: deque[asyncio.Future[bytes]] = deque()
    later = iter(rows[1:])

    def refill() -> None:
        while len(ahead) < PREFETCH and (row := next(later, None)) is not None:
            ahead.append(loop.run_in_executor(READERS, center.read_instance, row))

    refill()
    data: bytes | None = first
    try:
        for i, head in enumerate(heads):
            if i:
                try:
                    data = await ahead.popleft()
                except (ObjectMissing, IntegrityError) as exc:
                    log.error("wado: instance %s cannot be served: %s", rows[i]["sop_instance_uid"], exc)
                    return
                refill()
            assert data is not None
            yield b"".join((head, data, b"\r\n"))
            data = None
        yield tail
    finally:
        for pending in ahead:
            pending.cancel()


def _bulk_url(instance_url: str, tag: int) -> str:
    return f"{instance_url}/bulk/{tag:08X}"


def _problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _accepts(request: Request, part_type: str) -> bool:
    """Whether the Accept header allows multipart/related of `part_type` with the stored transfer syntax."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return True
    for entry in accept.split(","):
        main, params = dw.content_type_params(entry)
        if main in ("*/*", "multipart/*"):
            return True
        if main == "multipart/related":
            wanted = params.get("type", part_type).lower()
            if wanted in (part_type, "*/*", "application/*"):
                return True
        if main == part_type and part_type == OCTETS:
            return True
    return False


def _transfer_syntax_wanted(request: Request) -> str | None:
    """The one transfer syntax the client insists on, or None (stored syntax is fine: '*' or none named)."""
    named = []
    for entry in request.headers.get("accept", "").split(","):
        main, params = dw.content_type_params(entry)
        if main in ("*/*", "multipart/*"):
            return None
        ts = params.get("transfer-syntax")
        if ts in (None, "", "*"):
            return None
        named.append(ts)
    return named[0] if named else None


def _json(records: list[dict[str, Any]], found: Found | None = None) -> Response:
    headers = {}
    warnings = []
    if found is not None and found.more:
        warnings.append('299 renkei "There are additional results that can be requested"')
    if found is not None and found.cut:
        warnings.append('299 renkei "The search read only the newest studies; narrow it (a date or a Patient ID)"')
    if warnings:
        headers["Warning"] = ", ".join(warnings)
    body = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return Response(body, media_type=dw.DICOM_JSON, headers=headers)


def create_app(layout: Layout, service: CenterService | None = None, credentials: Credentials | None = None) -> FastAPI:
    center = service or CenterService(layout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(center.close)  # the buffered audit events are written before the end

    app = FastAPI(title="renkei center", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    creds = credentials or Credentials(layout.center_url, layout.config.center.s3)
    app.state.center = center
    app.state.credentials = creds

    @app.middleware("http")
    async def identify(request: Request, call_next: Any) -> Response:
        if request.url.path == "/healthz":
            return await call_next(request)
        try:
            # in a thread: on S3 a lookup may read the credentials file over the network
            request.state.identity = await run_in_threadpool(creds.identify, request.headers.get("authorization"))
        except NotAuthenticated as exc:
            return _problem(401, str(exc), {"WWW-Authenticate": 'Bearer realm="renkei"'})
        except RenkeiError as exc:  # the credentials file unreadable: the center's fault
            log.warning("credentials cannot be read: %s", exc)
            return _problem(503, "the center cannot check credentials now; retry")
        return await call_next(request)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return _problem(400, str(exc))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _problem(404, str(exc))

    async def forbidden(request: Request, exc: Exception) -> Response:
        return _problem(403, str(exc))

    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("the center's storage or catalog failed a request: %s", exc)
        return _problem(503, "the center's storage is not available now; retry")

    app.add_exception_handler(dw.BadRequest, bad_request)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(UsageError, forbidden)
    app.add_exception_handler(ObjectMissing, unavailable)
    app.add_exception_handler(IntegrityError, unavailable)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/identity")
    def whoami(request: Request) -> dict[str, str]:
        """Who the credential says the caller is (a site's machine checks it holds its own site's)."""
        identity = identity_of(request)
        return {"kind": identity.kind, "site": identity.site, "name": identity.name}

    def base_of(request: Request) -> str:
        return str(request.base_url).rstrip("/") + PREFIX

    def identity_of(request: Request) -> Identity:
        identity: Identity = request.state.identity
        return identity

    # ------------------------------------------------------------------ QIDO-RS
    def _result(found: Found, keywords: tuple[str, ...], query: dw.Query) -> Response:
        wanted = keywords + tuple(sorted(query.include))
        return _json(
            [dw.json_attributes(r, wanted if not query.include_all else tuple(r)) for r in found.records], found
        )

    @app.get(PREFIX + "/studies")
    def qido_studies(request: Request) -> Response:
        query = dw.parse_query(request.query_params.multi_items(), STUDY_MATCHABLE)
        found = center.search_studies(identity_of(request), query, base_of(request))
        return _result(found, STUDY_RESULT, query)

    @app.get(PREFIX + "/studies/{study}/series")
    def qido_series(request: Request, study: str) -> Response:
        query = dw.parse_query(request.query_params.multi_items(), SERIES_MATCHABLE)
        found = center.search_series(identity_of(request), _uid(study, "study"), query, base_of(request))
        return _result(found, SERIES_RESULT, query)

    @app.get(PREFIX + "/studies/{study}/instances")
    def qido_study_instances(request: Request, study: str) -> Response:
        query = dw.parse_query(request.query_params.multi_items(), INSTANCE_MATCHABLE)
        found = center.search_instances(identity_of(request), _uid(study, "study"), None, query, base_of(request))
        return _result(found, INSTANCE_RESULT, query)

    @app.get(PREFIX + "/studies/{study}/series/{series}/instances")
    def qido_instances(request: Request, study: str, series: str) -> Response:
        query = dw.parse_query(request.query_params.multi_items(), INSTANCE_MATCHABLE)
        found = center.search_instances(
            identity_of(request), _uid(study, "study"), _uid(series, "series"), query, base_of(request)
        )
        return _result(found, INSTANCE_RESULT, query)

    @app.get(PREFIX + "/series")
    @app.get(PREFIX + "/instances")
    def qido_unscoped(request: Request) -> Response:
        raise dw.BadRequest("search series and instances within a study: /studies/{StudyInstanceUID}/series")

    # ------------------------------------------------------------------ WADO-RS
    def _wado(request: Request, study: str, series: str | None, instance: str | None) -> Response:
        rows = center.retrievable(
            identity_of(request),
            _uid(study, "study"),
            _uid(series, "series") if series else None,
            _uid(instance, "instance") if instance else None,
        )
        if not _accepts(request, DICOM):
            return _problem(406, 'this service answers multipart/related; type="application/dicom"')
        wanted_ts = _transfer_syntax_wanted(request)
        if wanted_ts is not None and any(r["transfer_syntax_uid"] != wanted_ts for r in rows):
            return _problem(406, f"stored in another transfer syntax than {wanted_ts} (ask with transfer-syntax=*)")
        boundary = dw.new_boundary()
        heads = [dw.part_header(f"{DICOM}; transfer-syntax={r['transfer_syntax_uid']}", boundary) for r in rows]
        tail = dw.closing(boundary)
        length = sum(len(h) + int(r["size"]) + 2 for h, r in zip(heads, rows, strict=True)) + len(tail)
        first = center.read_instance(rows[0])  # a missing or corrupt first object fails before any byte is sent
        return StreamingResponse(
            _parts(center, rows, heads, tail, first),
            media_type=f'multipart/related; type="{DICOM}"; boundary={boundary}',
            headers={"Content-Length": str(length)},
        )

    @app.get(PREFIX + "/studies/{study}")
    def wado_study(request: Request, study: str) -> Response:
        return _wado(request, study, None, None)

    @app.get(PREFIX + "/studies/{study}/series/{series}")
    def wado_series(request: Request, study: str, series: str) -> Response:
        return _wado(request, study, series, None)

    @app.get(PREFIX + "/studies/{study}/series/{series}/instances/{instance}")
    def wado_instance(request: Request, study: str, series: str, instance: str) -> Response:
        return _wado(request, study, series, instance)

    def _metadata(request: Request, study: str, series: str | None, instance: str | None) -> Response:
        rows = center.retrievable(
            identity_of(request),
            _uid(study, "study"),
            _uid(series, "series") if series else None,
            _uid(instance, "instance") if instance else None,
        )
        base = base_of(request)
        out = []
        for row in rows:
            with center.open_instance(row) as handle:
                ds = dcmread(handle, force=True)
            url = f"{base}/studies/{study}/series/{row['series_uid']}/instances/{row['sop_instance_uid']}"
            out.append(dw.dataset_json(ds, functools.partial(_bulk_url, url)))
        return _json(out)

    @app.get(PREFIX + "/studies/{study}/metadata")
    def metadata_study(request: Request, study: str) -> Response:
        return _metadata(request, study, None, None)

    @app.get(PREFIX + "/studies/{study}/series/{series}/metadata")
    def metadata_series(request: Request, study: str, series: str) -> Response:
        return _metadata(request, study, series, None)

    @app.get(PREFIX + "/studies/{study}/series/{series}/instances/{instance}/metadata")
    def metadata_instance(request: Request, study: str, series: str, instance: str) -> Response:
        return _metadata(request, study, series, instance)

    def _octet_parts(values: list[bytes]) -> Response:
        boundary = dw.new_boundary()
        chunks = []
        for value in values:
            chunks += [dw.part_header(OCTETS, boundary), value, b"\r\n"]
        chunks.append(dw.closing(boundary))
        return Response(b"".join(chunks), media_type=f'multipart/related; type="{OCTETS}"; boundary={boundary}')

    @app.get(PREFIX + "/studies/{study}/series/{series}/instances/{instance}/bulk/{tag}")
    def bulk(request: Request, study: str, series: str, instance: str, tag: str) -> Response:
        (row,) = center.retrievable(
            identity_of(request), _uid(study, "study"), _uid(series, "series"), _uid(instance, "instance")
        )
        if len(tag) != 8 or any(c not in "0123456789abcdefABCDEF" for c in tag):
            raise dw.BadRequest("a bulk data tag is 8 hex digits")
        with center.open_instance(row) as handle:
            ds = dcmread(handle, force=True)
        elem = ds.get(int(tag, 16))
        if elem is None or not isinstance(elem.value, (bytes, bytearray)):
            raise NotFound(f"the instance has no bulk data element {tag}")
        return _octet_parts([bytes(elem.value)])

    @app.get(PREFIX + "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}")
    def frames(request: Request, study: str, series: str, instance: str, frames: str) -> Response:
        (row,) = center.retrievable(
            identity_of(request), _uid(study, "study"), _uid(series, "series"), _uid(instance, "instance")
        )
        try:
            numbers = [int(n) for n in frames.split(",")]
        except ValueError:
            raise dw.BadRequest("frames are numbers separated by commas, from 1") from None
        if not numbers or min(numbers) < 1 or len(numbers) > 1000:
            raise dw.BadRequest("frames are numbers separated by commas, from 1")
        with center.open_instance(row) as handle:
            ds = dcmread(handle, force=True)
        if "PixelData" not in ds:
            raise NotFound("the instance has no pixel data")
        count = int(ds.get("NumberOfFrames") or 1)
        if max(numbers) > count:
            raise NotFound(f"the instance has {count} frames")
        if ds.file_meta.TransferSyntaxUID.is_encapsulated:
            all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        else:
            size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel") or 1) * int(ds.BitsAllocated) // 8
            data = ds.PixelData
            all_frames = [data[i * size : (i + 1) * size] for i in range(count)]
        return _octet_parts([all_frames[n - 1] for n in numbers])

    # ------------------------------------------------------------------ STOW-RS
    async def _stow(request: Request, study: str | None) -> Response:
        identity = identity_of(request)
        main, params = dw.content_type_params(request.headers.get("content-type", ""))
        if main != "multipart/related" or params.get("type", DICOM).lower() != DICOM:
            return _problem(415, 'send multipart/related; type="application/dicom"')
        reader = dw.MultipartReader(params.get("boundary", ""), max_parts=MAX_STOW_PARTS)
        session = await run_in_threadpool(center.store_session, identity, _uid(study, "study") if study else None)
        try:
            current: Any = None
            digest: Any = None
            size = 0
            path: Path | None = None
            number = 0
            claimed: str | None = None
            async for chunk in request.stream():
                for kind, value in reader.feed(chunk):
                    if kind == "start":
                        part_type = dw.content_type_params(value.get("content-type", DICOM))[0]
                        if part_type != DICOM:
                            raise dw.BadRequest(f"a part of type {part_type!r}: only application/dicom is stored")
                        number += 1  # (not reader.parts: one chunk's events may hold several parts)
                        path = session.spool / f"{TEMP_PREFIX}{number:06d}.dcm"
                        current, digest, size = open(path, "wb"), hashlib.sha256(), 0
                        claimed = dw.claimed_sha256(value.get("content-digest", ""))
                    elif kind == "data":
                        size += len(value)
                        if size > MAX_INSTANCE_BYTES:
                            raise dw.BadRequest(f"an instance of more than {MAX_INSTANCE_BYTES} bytes")
                        digest.update(value)
                        current.write(value)
                    else:
                        current.close()
                        current = None
                        assert path is not None
                        session.add_file(path, digest.hexdigest(), size, claimed)
            reader.close()
            if current is not None:
                current.close()
            outcomes = await run_in_threadpool(session.finish)
        except BaseException:
            await run_in_threadpool(session.abandon)
            raise
        finally:
            shutil.rmtree(session.spool, ignore_errors=True)
        return _stow_answer(outcomes, base_of(request))

    @app.post(PREFIX + "/studies")
    async def stow(request: Request) -> Response:
        return await _stow(request, None)

    @app.post(PREFIX + "/studies/{study}")
    async def stow_study(request: Request, study: str) -> Response:
        return await _stow(request, study)

    return app


def _stow_answer(outcomes: list[StoreOutcome], base: str) -> Response:
    """The STOW-RS response (PS3.18 10.5.3): referenced and failed SOP sequences, 200 / 202 / 409."""
    referenced, failed = [], []
    for o in outcomes:
        item: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [o.sop_class_uid]} if o.sop_class_uid else {"vr": "UI"},
            "00081155": {"vr": "UI", "Value": [o.sop_instance_uid]} if o.sop_instance_uid else {"vr": "UI"},
        }
        if o.failure:
            item["00081197"] = {"vr": "US", "Value": [o.failure]}
            failed.append(item)
        else:
            url = f"{base}/studies/{o.study_uid}/series/{o.series_uid}/instances/{o.sop_instance_uid}"
            item["00081190"] = {"vr": "UR", "Value": [url]}
            if o.warning:
                item["00081196"] = {"vr": "US", "Value": [0xB000]}
            referenced.append(item)
    body: dict[str, Any] = {}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    status = 200 if not failed else (202 if referenced else 409)
    if not outcomes:
        status = 400
    reasons = "; ".join(sorted({o.reason for o in outcomes if o.failure}))[:500]
    shown = reasons.encode("ascii", "replace").decode("ascii").replace('"', "'")
    headers = {"Warning": f'299 renkei "{shown}"'} if reasons else {}
    return Response(
        json.dumps(body, separators=(",", ":")).encode("utf-8"),
        status_code=status,
        media_type=dw.DICOM_JSON,
        headers=headers,
    )
