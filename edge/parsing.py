"""Reading what the journal needs from an instance's bytes, and writing file meta.

The received bytes are never re-encoded: they are parsed here only to learn the
UIDs and the query attributes (decoded to unicode with the dataset's own
Specific Character Set), and stored untouched.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from renkei.errors import RenkeiError
from renkei.records import keywords
from renkei.uids import derive_uid, is_valid_uid, validate_uid

IMPLEMENTATION_CLASS_UID = derive_uid("renkei", "edge", "implementation")
IMPLEMENTATION_VERSION_NAME = "RENKEI_EDGE_01"

# The attributes the journal keeps, per query/retrieve level (the table: renkei.records.ATTRIBUTES).
PATIENT_KEYS: tuple[str, ...] = keywords("PATIENT")
STUDY_KEYS: tuple[str, ...] = keywords("STUDY")
SERIES_KEYS: tuple[str, ...] = keywords("SERIES")
IMAGE_KEYS: tuple[str, ...] = keywords("IMAGE")
ALL_KEYS = PATIENT_KEYS + STUDY_KEYS + SERIES_KEYS + IMAGE_KEYS


class InvalidInstance(RenkeiError):
    """A received dataset cannot be stored: unparseable, or missing or invalid UIDs."""


@dataclass(frozen=True)
class ParsedInstance:
    """The UIDs and decoded query attributes of one received instance."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    specific_character_set: str  # as in the data, values joined by backslash
    attributes: dict[str, str] = field(default_factory=dict)  # keyword -> decoded text
    implicit_vr: bool = False  # the data is implicit VR although its transfer syntax says explicit

    def level(self, keys: tuple[str, ...]) -> dict[str, str]:
        return {k: self.attributes.get(k, "") for k in keys}


# A deflated dataset may inflate to at most this many bytes, and at most INFLATE_RATIO times its
# own size above that: enough for any real image (DICOM deflates 2-10x), never a deflate bomb.
INFLATE_FLOOR = 32 * 1024 * 1024
INFLATE_RATIO = 64


def inflate_bounded(raw: bytes | memoryview, limit: int | None = None) -> bytes:
    """Inflate a deflated dataset (PS3.5 A.5, raw deflate), refusing one that would exceed the limit.

    Inflation stops as soon as the limit is passed, so a small bomb never
    costs more memory than the limit. Raises InvalidInstance.
    """
    if limit is None:
        limit = max(INFLATE_FLOOR, INFLATE_RATIO * len(raw))
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise InvalidInstance(f"deflated dataset cannot be inflated: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise InvalidInstance(
            f"deflated dataset inflates beyond {limit} bytes ({len(raw)} bytes deflated): refused as a deflate bomb"
        )
    return out


@lru_cache(maxsize=64)
def _syntax(transfer_syntax_uid: str) -> tuple[bool, bool, bool]:
    """(deflated, implicit VR, little endian) of a transfer syntax, worked out once per syntax.

    pydicom's UID validates and classifies the string on every use; an edge sees
    a handful of syntaxes, so they are remembered (bounded: a file's meta may say anything).
    """
    ts = UID(transfer_syntax_uid)
    return bool(ts.is_deflated), bool(ts.is_implicit_VR), bool(ts.is_little_endian)  # ValueError if not one


def _stop_after_header(tag: Any, vr: Any, length: Any) -> bool:
    return int(tag) > 0x0032FFFF


def parse_dataset(
    data: bytes | bytearray | memoryview,
    transfer_syntax_uid: str,
    full: bool = True,
    known: Callable[[str, str], tuple[bool, bool]] | None = None,
) -> ParsedInstance:
    """Parse an encoded dataset (no file meta) and return its UIDs and query attributes.

    `known(study_uid, series_uid)` says whether the journal already holds the
    study and the series: their attributes are then not decoded again (they
    are the same for every instance; decoding names is the costly part).

    With `full`, every element's framing is walked to the end (values stay
    undecoded), so a truncated or garbled dataset is refused. Raises
    InvalidInstance naming what is wrong.
    """
    deflated, declared_implicit, is_little = _syntax(str(transfer_syntax_uid))
    raw: bytes | memoryview = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    if deflated:
        raw = inflate_bounded(raw)
    is_implicit = declared_implicit
    header_end = len(raw)
    found: dict[int, tuple[int, int]] = {}
    if full:
        try:
            header_end = check_framing(raw, is_implicit, is_little, found)
        except InvalidInstance as first:
            # Some senders label implicit VR data as an explicit transfer syntax;
            # dcmtk and pydicom read those, so the edge keeps them too (as received).
            if is_implicit or not is_little:
                raise
            found.clear()
            try:
                header_end = check_framing(raw, True, True, found)
            except InvalidInstance:
                raise first from None
            is_implicit = True
    relabelled = is_implicit and not declared_implicit
    if full and known is not None:
        quick = _quick_instance(raw, found, known)
        if quick is not None:
            return replace(quick, implicit_vr=True) if relabelled else quick
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # only the header is read by pydicom: a small copy, never the pixel data
            ds = read_dataset(BytesIO(bytes(raw[:header_end])), is_implicit, is_little, stop_when=_stop_after_header)
    except Exception as exc:  # pydicom raises many kinds on garbage
        raise InvalidInstance(f"dataset cannot be parsed: {type(exc).__name__}: {exc}") from None
    parsed = describe_dataset(ds, known)
    return replace(parsed, implicit_vr=True) if relabelled else parsed


# Elements whose values are plain ASCII in every character set (UIDs, numbers, dates,
# the character set itself): read straight from the received bytes, no pydicom.
ASCII_TAGS: dict[int, str] = {
    0x00080005: "SpecificCharacterSet",
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x00080023: "ContentDate",
    0x00080033: "ContentTime",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
    0x00200013: "InstanceNumber",
}


def _quick_instance(
    raw: bytes | memoryview, found: dict[int, tuple[int, int]], known: Callable[[str, str], tuple[bool, bool]]
) -> ParsedInstance | None:
    """An instance of a study and series the journal holds, read without pydicom; else None."""
    values: dict[str, str] = {}
    for tag, (offset, length) in found.items():
        text = bytes(raw[offset : offset + length]).decode("ascii", "replace")
        values[ASCII_TAGS[tag]] = "\\".join(part.strip("\x00 ") for part in text.split("\\"))
    study_uid, series_uid = values.get("StudyInstanceUID", ""), values.get("SeriesInstanceUID", "")
    if not (is_valid_uid(study_uid) and is_valid_uid(series_uid)):
        return None  # let the full path say what is wrong
    study_known, series_known = known(study_uid, series_uid)
    if not (study_known and series_known):
        return None
    for keyword, what in (("SOPInstanceUID", "SOP Instance UID"), ("SOPClassUID", "SOP Class UID")):
        if not values.get(keyword):
            raise InvalidInstance(f"the dataset has no {what}")
        try:
            validate_uid(values[keyword], what)
        except RenkeiError as exc:
            raise InvalidInstance(str(exc)) from None
    attributes = {k: values.get(k, "") for k in IMAGE_KEYS}
    attributes.update(StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid)
    return ParsedInstance(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_instance_uid=values["SOPInstanceUID"],
        sop_class_uid=values["SOPClassUID"],
        specific_character_set=values.get("SpecificCharacterSet", ""),
        attributes=attributes,
    )


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD


def check_framing(
    raw: bytes | memoryview, is_implicit: bool, is_little: bool, found: dict[int, tuple[int, int]] | None = None
) -> int:
    """Walk every element's tag and length to the end of `raw` without decoding values.

    Raises InvalidInstance when an element runs past the end, a delimiter is
    missing, or a tag goes backwards at the top level: the signs of a truncated
    or garbled dataset. Cheap: values are skipped, never copied. Returns the
    offset of the first top-level element after the header attributes the
    journal reads (tags above (0032,FFFF)). With `found`, the value offset and
    length of each top-level element of `ASCII_TAGS` are recorded in it.
    """
    marks: list[int] = []
    end = _walk(memoryview(raw), 0, len(raw), is_implicit, is_little, None, 0, marks, found)
    if end != len(raw):
        raise InvalidInstance(f"dataset framing ends at byte {end} of {len(raw)}")
    return marks[0] if marks else len(raw)


def _walk(
    view: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    until: int | None,
    depth: int,
    marks: list[int] | None = None,
    found: dict[int, tuple[int, int]] | None = None,
) -> int:
    if depth > 32:
        raise InvalidInstance("dataset nests sequences deeper than 32 levels")
    order = "<" if little else ">"
    last_tag = -1
    while pos < end:
        if pos + 8 > end:
            raise InvalidInstance(f"dataset truncated inside an element header at byte {pos}")
        group, elem = struct.unpack_from(order + "HH", view, pos)
        tag = (group << 16) | elem
        if tag in (_ITEM, _ITEM_END, _SEQ_END):
            length = struct.unpack_from(order + "I", view, pos + 4)[0]
            pos += 8
            if tag == until:
                return pos
            raise InvalidInstance(f"unexpected delimiter ({group:04X},{elem:04X}) at byte {pos - 8}")
        if until is None and tag <= last_tag:
            raise InvalidInstance(f"element ({group:04X},{elem:04X}) out of order at byte {pos}")
        if marks is not None and not marks and tag > 0x0032FFFF:
            marks.append(pos)
        last_tag = tag
        vr = b""
        if implicit:
            length = struct.unpack_from(order + "I", view, pos + 4)[0]
            pos += 8
        else:
            vr = bytes(view[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise InvalidInstance(f"dataset truncated inside an element header at byte {pos}")
                length = struct.unpack_from(order + "I", view, pos + 8)[0]
                pos += 12
            elif vr.isalpha() and vr.isupper():
                length = struct.unpack_from(order + "H", view, pos + 6)[0]
                pos += 8
            else:
                raise InvalidInstance(f"element ({group:04X},{elem:04X}) has no valid VR at byte {pos}")
        if length == _UNDEFINED:
            # a sequence, encapsulated pixel data, or UN of undefined length (implicit VR inside)
            inner_implicit = implicit or vr == b"UN"
            pos = _walk_items(view, pos, end, inner_implicit, little if not vr == b"UN" else True, depth)
            continue
        if pos + length > end:
            raise InvalidInstance(
                f"element ({group:04X},{elem:04X}) of {length} bytes runs past the end of the dataset"
            )
        if found is not None and tag in ASCII_TAGS:
            found[tag] = (pos, length)
        if vr == b"SQ" or (implicit and length and _is_sequence_tag(tag)):
            _walk_items(view, pos, pos + length, implicit, little, depth, defined=True)
        pos += length
    if until is not None:
        raise InvalidInstance("dataset ends before a sequence or item delimiter")
    return pos


def _walk_items(
    view: memoryview, pos: int, end: int, implicit: bool, little: bool, depth: int, defined: bool = False
) -> int:
    order = "<" if little else ">"
    while pos < end:
        if pos + 8 > end:
            raise InvalidInstance(f"dataset truncated inside an item header at byte {pos}")
        group, elem = struct.unpack_from(order + "HH", view, pos)
        tag = (group << 16) | elem
        length = struct.unpack_from(order + "I", view, pos + 4)[0]
        pos += 8
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise InvalidInstance(f"expected an item, found ({group:04X},{elem:04X}) at byte {pos - 8}")
        if length == _UNDEFINED:
            pos = _walk(view, pos, end, implicit, little, _ITEM_END, depth + 1)
        else:
            if pos + length > end:
                raise InvalidInstance(f"item of {length} bytes runs past its sequence at byte {pos - 8}")
            pos += length  # item contents (or a pixel data fragment) are not walked further
    if defined:
        return pos
    raise InvalidInstance("dataset ends inside a sequence of undefined length")


def _is_sequence_tag(tag: int) -> bool:
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def describe_dataset(ds: Dataset, known: Callable[[str, str], tuple[bool, bool]] | None = None) -> ParsedInstance:
    """UIDs (validated) and decoded query attributes of a pydicom Dataset."""
    with warnings.catch_warnings():  # pydicom warns on the invalid values refused below
        warnings.simplefilter("ignore")
        return _describe(ds, known)


def _describe(ds: Dataset, known: Callable[[str, str], tuple[bool, bool]] | None) -> ParsedInstance:
    uids: dict[str, str] = {}
    for keyword, what in (
        ("StudyInstanceUID", "Study Instance UID"),
        ("SeriesInstanceUID", "Series Instance UID"),
        ("SOPInstanceUID", "SOP Instance UID"),
        ("SOPClassUID", "SOP Class UID"),
    ):
        try:
            value = ds.get(keyword)
        except Exception as exc:
            raise InvalidInstance(f"{what} cannot be read: {exc}") from None
        if value is None or value == "":
            raise InvalidInstance(f"the dataset has no {what}")
        try:
            uids[keyword] = validate_uid(str(value), what)
        except RenkeiError as exc:
            raise InvalidInstance(str(exc)) from None
    charset = _charset_text(ds)
    attributes: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys: tuple[str, ...] = ALL_KEYS
        if known is not None:
            study_known, series_known = known(uids["StudyInstanceUID"], uids["SeriesInstanceUID"])
            keys = (
                IMAGE_KEYS + (() if series_known else SERIES_KEYS) + (() if study_known else PATIENT_KEYS + STUDY_KEYS)
            )
        for keyword in keys:
            try:
                attributes[keyword] = text_of(ds.get(keyword))
            except Exception:
                attributes[keyword] = ""
    attributes.update(uids)
    return ParsedInstance(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        specific_character_set=charset,
        attributes=attributes,
    )


def _charset_text(ds: Dataset) -> str:
    try:
        value = ds.get("SpecificCharacterSet")
    except Exception:
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def text_of(value: Any) -> str:
    """A DICOM value as text: multiple values joined by backslash, None as ''."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(text_of(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\x00 ")
    return str(value).rstrip("\x00")


# ---------------------------------------------------------------- file meta
def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    group, elem = group_elem >> 16, group_elem & 0xFFFF
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _pad(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str = "") -> bytes:
    """Preamble, 'DICM' and a File Meta Information group (explicit VR little endian)."""
    body = b"".join(
        (
            _element(0x00020001, b"OB", b"\x00\x01"),
            _element(0x00020002, b"UI", _pad(sop_class_uid, b"\x00")),
            _element(0x00020003, b"UI", _pad(sop_instance_uid, b"\x00")),
            _element(0x00020010, b"UI", _pad(transfer_syntax_uid, b"\x00")),
            _element(0x00020012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(0x00020013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
            _element(0x00020016, b"AE", _pad(source_ae.strip(), b" ")) if source_ae.strip() else b"",
        )
    )
    group_length = _element(0x00020000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def split_file_meta(data: bytes | memoryview) -> tuple[dict[str, str], int]:
    """Read the File Meta group of a Part 10 file: (keyword -> value, offset of the dataset)."""
    view = memoryview(data)
    if len(view) < 144 or bytes(view[128:132]) != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 file (no 'DICM' prefix)")
    offset = 132
    values: dict[str, str] = {}
    names = {
        0x0002: "MediaStorageSOPClassUID",
        0x0003: "MediaStorageSOPInstanceUID",
        0x0010: "TransferSyntaxUID",
        0x0016: "SourceApplicationEntityTitle",
        0x0012: "ImplementationClassUID",
    }
    while offset + 8 <= len(view):
        group, elem = struct.unpack_from("<HH", view, offset)
        if group != 0x0002:
            break
        vr = bytes(view[offset + 4 : offset + 6])
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            length = struct.unpack_from("<I", view, offset + 8)[0]
            start = offset + 12
        else:
            length = struct.unpack_from("<H", view, offset + 6)[0]
            start = offset + 8
        if elem in names:
            values[names[elem]] = bytes(view[start : start + length]).decode("ascii", "replace").rstrip("\x00 ")
        offset = start + length
    return values, offset
