"""DICOMweb's wire formats (PS3.18), without any I/O: QIDO-RS query parameters, DICOM JSON, multipart.

- `parse_query(params, level)`: a QIDO-RS query string as matching keys (keyword -> (VR, text)),
  the attributes to include, fuzzy matching, limit and offset; bad input raises `BadRequest`.
- `json_attributes(record)`: keyword -> text records (names as 'alpha=ideo=phon') as DICOM JSON.
- `dataset_json(ds, bulk_url)`: a stored instance as DICOM JSON (metadata), every string in UTF-8
  whatever the instance's Specific Character Set (the stored bytes are never changed), large binary
  values as BulkDataURIs.
- `multipart_*`: the framing of `multipart/related` bodies, written and read as streams.
"""

from __future__ import annotations

import base64
import re
import secrets
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from renkei.edge.matching import QueryTooComplex, check_query_value, match_attribute, match_wildcard
from renkei.errors import RenkeiError

DICOM_JSON = "application/dicom+json"
MAX_LIMIT = 1000  # results in one QIDO-RS answer; a client pages with offset for more
DEFAULT_LIMIT = 100
BULK_THRESHOLD = 1024  # binary values over this many bytes are BulkDataURIs, not inline base64

_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_NUMBER_VRS = {"IS": int, "US": int, "UL": int, "SS": int, "SL": int, "UV": int, "SV": int}
_FLOAT_VRS = frozenset({"DS", "FL", "FD"})
_TAG_RE = re.compile(r"^[0-9A-Fa-f]{8}$")


class BadRequest(RenkeiError, ValueError):
    """A request the service cannot answer as asked (HTTP 400, with this message)."""


# ------------------------------------------------------------------ QIDO-RS
@dataclass(frozen=True)
class Query:
    """A QIDO-RS search: what to match, what to return, how many."""

    match: dict[str, tuple[str, str]]  # keyword -> (VR, query text), PS3.4 C.2.2.2 matching
    include: frozenset[str] = frozenset()  # extra keywords asked for (includefield)
    include_all: bool = False
    fuzzy: bool = False
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    ignored: tuple[str, ...] = field(default=())  # keys the service does not match on (a Warning says so)

    def single(self, keyword: str) -> str | None:
        """The query's value of `keyword` when it is one value without wildcards (else None)."""
        vr_text = self.match.get(keyword)
        if vr_text is None:
            return None
        text = vr_text[1].strip()
        if not text or "\\" in text or "*" in text or "?" in text:
            return None
        return text

    def values(self, keyword: str) -> list[str] | None:
        """The query's list of exact values of `keyword` (UID lists), or None."""
        vr_text = self.match.get(keyword)
        if vr_text is None:
            return None
        parts = [p.strip() for p in vr_text[1].split("\\") if p.strip()]
        if not parts or any("*" in p or "?" in p for p in parts):
            return None
        return parts

    def date_range(self, keyword: str = "StudyDate") -> tuple[str | None, str | None]:
        """(from, to) as YYYYMMDD for a date key given as one date or a range (else (None, None))."""
        vr_text = self.match.get(keyword)
        if vr_text is None or "\\" in vr_text[1]:
            return None, None
        text = vr_text[1].strip()
        if "-" in text:
            low, _, high = text.partition("-")
            return (low.strip()[:8] or None), (high.strip()[:8] or None)
        return (text[:8] or None), (text[:8] or None)


def keyword_of(key: str) -> str:
    """A QIDO-RS attribute name (keyword or 8 hex digits) as its keyword; BadRequest if unknown."""
    if _TAG_RE.match(key):
        keyword = keyword_for_tag(int(key, 16))
        if keyword:
            return keyword
        raise BadRequest(f"attribute {key} is not one of the DICOM dictionary's")
    if tag_for_keyword(key) is None:
        raise BadRequest(f"{key!r} is neither a DICOM keyword nor a tag (8 hex digits)")
    return key


def parse_query(params: Iterable[tuple[str, str]], matchable: frozenset[str]) -> Query:
    """A QIDO-RS query string (its (name, value) pairs, repeated names allowed) as a Query.

    Attributes outside `matchable` are accepted and ignored (listed in `ignored`), as PS3.18 allows.
    """
    match: dict[str, tuple[str, str]] = {}
    include: set[str] = set()
    include_all = fuzzy = False
    limit, offset = DEFAULT_LIMIT, 0
    ignored: list[str] = []
    for name, value in params:
        if name == "includefield":
            for part in value.split(","):
                part = part.strip()
                if part == "all":
                    include_all = True
                elif part:
                    include.add(keyword_of(part))
        elif name == "fuzzymatching":
            if value not in ("true", "false"):
                raise BadRequest("fuzzymatching is true or false")
            fuzzy = value == "true"
        elif name in ("limit", "offset"):
            if not value.isdigit() or len(value) > 9:
                raise BadRequest(f"{name} is a non-negative integer, not {value[:20]!r}")
            if name == "limit":
                limit = min(int(value), MAX_LIMIT) or MAX_LIMIT
            else:
                offset = int(value)
        elif name in ("_", "accept", "charset"):  # cache busters and content negotiation of some clients
            continue
        else:
            if "." in name:
                raise BadRequest(f"{name}: matching inside sequences is not supported")
            keyword = keyword_of(name)
            vr = dictionary_VR(keyword)
            try:
                check_query_value(keyword, vr, value)
            except QueryTooComplex as exc:
                raise BadRequest(str(exc)) from None
            if any(unicodedata.category(ch) == "Cc" for ch in value):
                raise BadRequest(f"{keyword}: the value has control characters")
            if keyword in matchable:
                if keyword in match:  # a repeated key: PS3.18 reads it as a list of values
                    value = match[keyword][1] + "\\" + value
                match[keyword] = (vr, value)
            else:
                ignored.append(keyword)
    return Query(match, frozenset(include), include_all, fuzzy, limit, offset, tuple(ignored))


def _fold(text: str) -> str:
    """A name as fuzzy matching compares it: NFKC (full/half width), case-folded, katakana as hiragana."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(chr(ord(c) - 0x60) if 0x30A1 <= ord(c) <= 0x30F6 else c for c in folded)


def fuzzy_name_match(query: str, value: str) -> bool:
    """Fuzzy Person Name matching: every query word starts a component of one of the name's groups.

    Case, full/half width and katakana/hiragana do not matter; `yamada`, `YAMADA^T`, `やまだ`,
    `ﾔﾏﾀﾞ` and `山田` all find 'Yamada^Taro=山田^太郎=やまだ^たろう'. Wildcards keep their meaning.
    """
    words = [w for w in re.split(r"[\s^=]+", _fold(query)) if w]
    if not words:
        return True
    for group in value.split("="):
        components = [c for c in re.split(r"[\s^]+", _fold(group)) if c]
        if all(
            any(
                match_wildcard(w if w.endswith("*") else w + "*", c) if ("*" in w or "?" in w) else c.startswith(w)
                for c in components
            )
            for w in words
        ):
            return True
    return False


def matches(query: Query, record: Mapping[str, str]) -> bool:
    """True when `record` (keyword -> text) matches every key of the query (keys it lacks match)."""
    for keyword, (vr, text) in query.match.items():
        if keyword not in record:
            continue
        value = record.get(keyword) or ""
        if query.fuzzy and vr == "PN":
            if not any(fuzzy_name_match(q, value) for q in text.split("\\") if q.strip()):
                return False
        elif not match_attribute(vr, text, value):
            return False
    return True


# ------------------------------------------------------------------ DICOM JSON
def _tag(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return f"{tag:08X}"


def _person_name(text: str) -> dict[str, str]:
    groups = text.split("=")
    out = {"Alphabetic": groups[0]}
    if len(groups) > 1 and groups[1]:
        out["Ideographic"] = groups[1]
    if len(groups) > 2 and groups[2]:
        out["Phonetic"] = groups[2]
    return out


def element_json(keyword: str, text: str | None, vr: str | None = None) -> dict[str, Any]:
    """One attribute of a search result: keyword and decoded text as a DICOM JSON element."""
    vr = vr or dictionary_VR(keyword)
    element: dict[str, Any] = {"vr": vr}
    if text is None or text == "":
        return element
    if vr == "PN":
        element["Value"] = [_person_name(v) for v in text.split("\\")]
        return element
    values: list[Any] = text.split("\\") if vr not in ("LT", "ST", "UT", "UR") else [text]
    if vr in _NUMBER_VRS:
        try:
            values = [int(v) for v in values]
        except ValueError:
            return element
    elif vr in _FLOAT_VRS:
        try:
            values = [float(v) for v in values]
        except ValueError:
            return element
    element["Value"] = values
    return element


def json_attributes(record: Mapping[str, Any], keywords: Iterable[str]) -> dict[str, Any]:
    """The DICOM JSON object of a search result: `keywords` of `record` (absent ones left out)."""
    out: dict[str, Any] = {}
    for keyword in keywords:
        if keyword not in record:
            continue
        value = record[keyword]
        if keyword == "RetrieveURL":
            out["00081190"] = {"vr": "UR", "Value": [value]}
            continue
        out[_tag(keyword)] = element_json(keyword, None if value is None else str(value))
    out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}  # the answer is UTF-8 JSON
    return dict(sorted(out.items()))


def dataset_json(ds: Dataset, bulk_url: Callable[[int], str]) -> dict[str, Any]:
    """A stored instance as DICOM JSON (WADO-RS metadata): strings decoded by the instance's character
    set and given in UTF-8, binary values over BULK_THRESHOLD bytes as BulkDataURIs (`bulk_url(tag)`)."""
    out: dict[str, Any] = {}
    for elem in ds:
        tag = int(elem.tag)
        if elem.tag.is_private and elem.VR in _BINARY_VRS:
            continue  # private binary values: not served as metadata
        if elem.VR in _BINARY_VRS and tag == 0x7FE00010:
            out[f"{tag:08X}"] = {"vr": elem.VR, "BulkDataURI": bulk_url(tag)}
            continue
        if elem.VR in _BINARY_VRS and not elem.is_empty and len(elem.value) > BULK_THRESHOLD:
            out[f"{tag:08X}"] = {"vr": elem.VR, "BulkDataURI": bulk_url(tag)}
            continue
        try:
            # nested large binary values are inline (a BulkDataURI names top-level elements only)
            out[f"{tag:08X}"] = elem.to_json_dict(None, BULK_THRESHOLD)
        except Exception:  # a value pydicom cannot convert (garbled in the sender's data): as empty
            out[f"{tag:08X}"] = {"vr": elem.VR}
    out["00080005"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return out


def inline_binary(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ------------------------------------------------------------------ multipart/related
def new_boundary() -> str:
    return "renkei-" + secrets.token_hex(12)


def part_header(content_type: str, boundary: str, location: str | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def closing(boundary: str) -> bytes:
    return f"--{boundary}--\r\n".encode("ascii")


def claimed_sha256(header: str) -> str | None:
    """The SHA-256 (hex) a part's `Content-Digest: sha-256=:<base64>:` header (RFC 9530) names, or None.

    A malformed one counts as a claim no bytes can meet (the part is refused, never stored unchecked)."""
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if sep and name.strip().lower() == "sha-256":
            try:
                raw = base64.b64decode(value.strip().strip(":"), validate=True)
            except ValueError:
                return "malformed"
            return raw.hex() if len(raw) == 32 else "malformed"
    return None


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """('multipart/related', {'type': ..., 'boundary': ...}) of a Content-Type or one Accept entry."""
    main, *rest = value.split(";")
    params: dict[str, str] = {}
    for item in rest:
        key, _, val = item.strip().partition("=")
        if key:
            params[key.strip().lower()] = val.strip().strip('"')
    return main.strip().lower(), params


class MultipartReader:
    """An incremental `multipart/related` parser: feed() bytes as they arrive, get events back.

    Events: ("start", headers dict with lower-case names), ("data", bytes), ("end", None). Bounded:
    part headers of at most MAX_HEADER bytes, at most `max_parts` parts; malformed framing raises
    BadRequest. Never holds more than one chunk plus the delimiter's length in memory.
    """

    MAX_HEADER = 16 * 1024

    def __init__(self, boundary: str, max_parts: int = 100_000) -> None:
        if not boundary or len(boundary) > 200:
            raise BadRequest("the multipart body has no usable boundary")
        self.first = b"--" + boundary.encode("latin-1")
        self.delim = b"\r\n" + self.first
        self.buffer = bytearray()
        self.state = "preamble"
        self.parts = 0
        self.max_parts = max_parts

    def feed(self, chunk: bytes) -> list[tuple[str, Any]]:
        self.buffer += chunk
        events: list[tuple[str, Any]] = []
        while True:
            if self.state == "preamble":
                if self.buffer.startswith(self.first):
                    del self.buffer[: len(self.first)]
                    self.state = "after"
                    continue
                at = self.buffer.find(self.delim)
                if at < 0:
                    if len(self.buffer) > 64 * 1024:
                        raise BadRequest("no multipart boundary within the first 64 KiB of the body")
                    return events
                del self.buffer[: at + len(self.delim)]
                self.state = "after"
            elif self.state == "after":
                if len(self.buffer) < 2:
                    return events
                if self.buffer.startswith(b"--"):
                    self.state = "done"
                    self.buffer.clear()
                    return events
                stripped = self.buffer.lstrip(b" \t")
                if len(stripped) < 2:
                    return events
                if not stripped.startswith(b"\r\n"):
                    raise BadRequest("malformed multipart body: no line break after a boundary")
                del self.buffer[: len(self.buffer) - len(stripped) + 2]
                self.state = "headers"
            elif self.state == "headers":
                at = self.buffer.find(b"\r\n\r\n")
                if at < 0 and self.buffer.startswith(b"\r\n"):
                    at, skip = -2, 2  # a part without headers
                else:
                    skip = 4
                if at == -1:
                    if len(self.buffer) > self.MAX_HEADER:
                        raise BadRequest(f"a part's headers are over {self.MAX_HEADER} bytes")
                    return events
                raw = bytes(self.buffer[: max(at, 0)])
                del self.buffer[: max(at, 0) + skip]
                headers: dict[str, str] = {}
                for line in raw.decode("latin-1").split("\r\n"):
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                self.parts += 1
                if self.parts > self.max_parts:
                    raise BadRequest(f"more than {self.max_parts} parts in one request")
                events.append(("start", headers))
                self.state = "body"
            elif self.state == "body":
                at = self.buffer.find(self.delim)
                if at < 0:
                    keep = len(self.delim) - 1
                    if len(self.buffer) > keep:
                        events.append(("data", bytes(self.buffer[:-keep])))
                        del self.buffer[:-keep]
                    return events
                if at:
                    events.append(("data", bytes(self.buffer[:at])))
                del self.buffer[: at + len(self.delim)]
                events.append(("end", None))
                self.state = "after"
            else:  # done: an epilogue is ignored
                self.buffer.clear()
                return events

    def close(self) -> None:
        if self.state != "done":
            raise BadRequest("the multipart body ended before its closing boundary")
