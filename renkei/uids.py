"""DICOM UIDs: validation (they become storage keys) and generation under renkei's root."""

from __future__ import annotations

import hashlib
import re

from renkei.errors import InvalidUID

# UUID-derived UIDs (2.25.<128-bit integer>, PS3.5 B.2) need no registered root.
UID_ROOT = "2.25"
_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # used with fullmatch: no "$" before a newline


def is_valid_uid(value: object) -> bool:
    """True for a UID of digits and dots, <= 64 chars, no empty part, no leading zero."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.fullmatch(value))


def validate_uid(value: object, what: str = "UID") -> str:
    """Return `value` when it is a valid UID, else raise InvalidUID naming `what`."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.rstrip("\x00 ")
    if not is_valid_uid(value):
        shown = repr(value)[:80]
        raise InvalidUID(f"{what} {shown} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return value  # type: ignore[return-value]


def derive_uid(*parts: object, root: str = UID_ROOT) -> str:
    """A deterministic UID from any parts (same parts, same UID): 2.25.<128-bit hash>."""
    digest = bytearray(hashlib.sha256("|".join(str(p) for p in parts).encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x80  # UUID version 8 (custom), RFC 9562
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    uid = f"{root}.{int.from_bytes(digest, 'big')}"
    return uid[:64]
