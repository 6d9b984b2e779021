"""C-FIND attribute matching (PS3.4 C.2.2.2) on decoded unicode values.

Pure functions, shared by the edge's local source and (later) the center's
catalog source. Values are text as stored: multiple values joined by a
backslash; person names with their component groups separated by '='
(alphabetic=ideographic=phonetic).

Rules:
- universal: an empty query value (or '*') matches everything, even empty values;
- single value: exact, case-sensitive, except person names (case-insensitive),
  leading/trailing spaces insignificant;
- wildcard: '*' any run of characters, '?' exactly one character;
- list: a query of several values (backslash) matches when any of them does;
- range: 'A-B', 'A-', '-B' for DA, TM and DT;
- person names: a query with one group is compared with every stored group
  (alphabetic, ideographic, phonetic); one with '=' compares group by group,
  an empty query group matching anything.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Mapping

RANGE_VRS = frozenset({"DA", "TM", "DT"})
_NO_WILDCARD_VRS = frozenset({"UI", "DA", "TM", "DT", "IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"})


def is_universal(query: str | None) -> bool:
    """True when the query value matches every record (absent, empty or a lone '*')."""
    if query is None:
        return True
    return all(part.strip() in ("", "*") for part in query.split("\\"))


def has_wildcard(query: str) -> bool:
    return "*" in query or "?" in query


@lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        if char == "*":
            parts.append(".*")
        elif char == "?":
            parts.append(".")
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def match_wildcard(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """'*' matches any run of characters (none too), '?' exactly one character."""
    return _wildcard_regex(pattern, ignore_case).fullmatch(value) is not None


def _norm_date(text: str) -> str:
    return text.strip().replace(".", "").replace("-", "")


def _norm_time(text: str, upper: bool = False) -> str:
    """HHMMSS.ffffff, parts not given filled with zeros (or their highest values for an upper bound)."""
    whole, _, frac = text.strip().replace(":", "").partition(".")
    whole = whole[:6]
    if upper:
        whole += "235959"[len(whole):]
        frac = frac[:6] if len(frac) >= 6 else (frac + "999999")[:6]
    else:
        whole += "000000"[len(whole):]
        frac = (frac + "000000")[:6]
    return f"{whole}.{frac}"


def _norm_datetime(text: str, upper: bool = False) -> str:
    """YYYYMMDDHHMMSS.ffffff (a UTC offset is ignored), missing parts filled as for times."""
    text = text.strip()
    for sign in ("+", "-"):
        if sign in text[4:]:
            text = text[: 4 + text[4:].index(sign)]
    date, time_part = text[:8], text[8:]
    date += ("12311231" if upper else "01010101")[len(date) - 4:] if len(date) >= 4 else ""
    return date + _norm_time(time_part, upper)


def _normalise(vr: str, text: str, upper: bool = False) -> str:
    if vr == "DA":
        return _norm_date(text)
    if vr == "TM":
        return _norm_time(text, upper)
    if vr == "DT":
        return _norm_datetime(text, upper)
    return text


def match_range(vr: str, query: str, value: str) -> bool:
    """Range matching 'A-B', 'A-' or '-B' for DA, TM and DT values."""
    if not value.strip():
        return False
    low, _, high = query.partition("-")
    stored_low = _normalise(vr, value)
    stored_high = _normalise(vr, value, upper=True) if vr != "DA" else stored_low
    if low.strip() and stored_high < _normalise(vr, low):
        return False
    if high.strip() and stored_low > _normalise(vr, high, upper=True):
        return False
    return True


def _group_norm(group: str) -> str:
    """A person-name component group without trailing empty components or spaces."""
    return group.strip().rstrip("^").strip()


def _match_name_group(query_group: str, stored_group: str) -> bool:
    q = _group_norm(query_group)
    s = _group_norm(stored_group)
    if q in ("", "*"):
        return True
    if has_wildcard(q):
        return match_wildcard(q, s, ignore_case=True) or match_wildcard(q, stored_group.strip(), True)
    return q.casefold() == s.casefold()


def match_person_name(query: str, value: str) -> bool:
    """Person Name matching on each component group (see the module docstring)."""
    stored_groups = value.split("=")
    if "=" in query:
        query_groups = query.split("=")
        for i, q in enumerate(query_groups[:3]):
            s = stored_groups[i] if i < len(stored_groups) else ""
            if _group_norm(q) and not _match_name_group(q, s):
                return False
        return True
    return any(_match_name_group(query, s) for s in stored_groups)


def _match_one(vr: str, query: str, value: str) -> bool:
    if vr == "PN":
        return match_person_name(query, value)
    if vr in RANGE_VRS and "-" in query:
        return match_range(vr, query, value)
    if vr in RANGE_VRS:
        return _normalise(vr, query) == _normalise(vr, value) if value.strip() else False
    q = query.strip()
    v = value.strip()
    if vr not in _NO_WILDCARD_VRS and has_wildcard(q):
        return match_wildcard(q, v)
    return q == v


def match_attribute(vr: str, query: str | None, value: str | None) -> bool:
    """True when the stored `value` matches the C-FIND `query` value for an attribute of `vr`."""
    if is_universal(query):
        return True
    assert query is not None
    stored = (value or "").split("\\") if vr != "PN" or "\\" in (value or "") else [value or ""]
    queries = query.split("\\") if "\\" in query else [query]
    return any(_match_one(vr, q, s) for q in queries if q.strip() != "" for s in stored)


def match_record(query: Mapping[str, tuple[str, str]], record: Mapping[str, str]) -> bool:
    """True when `record` (keyword -> text) matches every (vr, query text) of `query`."""
    for keyword, (vr, text) in query.items():
        if not match_attribute(vr, text, record.get(keyword, "")):
            return False
    return True
