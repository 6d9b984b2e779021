"""Object keys: where an instance's bytes live in center storage.

A key derives only from the origin site and validated UIDs, so it can never
escape its folder (a UID is digits and dots) and is the same on every retry:

    objects/<origin_site>/<study_uid>/<series_uid>/<sop_instance_uid>.dcm

A *different* instance arriving under an existing key (same SOP Instance UID,
other bytes) is kept beside it, never over it, under a key naming its SHA-256:

    objects/<origin_site>/<study_uid>/<series_uid>/<sop_instance_uid>.<sha256>.dcm
"""

from __future__ import annotations

import re

from renkei.errors import InvalidUID, UsageError
from renkei.uids import validate_uid

OBJECTS_PREFIX = "objects"
_SITE_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def validate_site(site: str) -> str:
    """A site id as the configuration allows it (lower-case letters, digits, '-')."""
    if not isinstance(site, str) or not _SITE_RE.fullmatch(site):
        raise UsageError(f"site id {site!r} must be lower-case letters, digits and '-', starting with a letter")
    return site


def validate_sha256(value: str) -> str:
    if not isinstance(value, str) or not _SHA_RE.fullmatch(value):
        raise UsageError(f"{value!r} is not a SHA-256 in lower-case hex (64 characters)")
    return value


def study_prefix(origin_site: str, study_uid: str) -> str:
    """The folder holding every object of one study."""
    return f"{OBJECTS_PREFIX}/{validate_site(origin_site)}/{validate_uid(study_uid, 'Study Instance UID')}"


def object_key(
    origin_site: str, study_uid: str, series_uid: str, sop_instance_uid: str, conflict_sha256: str | None = None
) -> str:
    """The key of one instance; with `conflict_sha256`, the distinct key for a conflicting copy."""
    series = validate_uid(series_uid, "Series Instance UID")
    sop = validate_uid(sop_instance_uid, "SOP Instance UID")
    suffix = f".{validate_sha256(conflict_sha256)}" if conflict_sha256 else ""
    return f"{study_prefix(origin_site, study_uid)}/{series}/{sop}{suffix}.dcm"


def parse_object_key(key: str) -> tuple[str, str, str, str]:
    """(origin_site, study_uid, series_uid, sop_instance_uid) of a key made by object_key."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] != OBJECTS_PREFIX or not parts[4].endswith(".dcm"):
        raise InvalidUID(f"{key!r} is not an object key (objects/<site>/<study>/<series>/<sop>.dcm)")
    sop = parts[4][: -len(".dcm")].split(".")
    if len(sop[-1]) == 64 and _SHA_RE.fullmatch(sop[-1]):
        sop = sop[:-1]
    return parts[1], parts[2], parts[3], validate_uid(".".join(sop), "SOP Instance UID")
