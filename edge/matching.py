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
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby

from renkei.errors import RenkeiError

RANGE_VRS = frozenset({"DA", "TM", "DT"})
_NO_WILDCARD_VRS = frozenset({"UI", "DA", "TM", "DT", "IS", "DS", "US", "UL", "SS", "SL", "FL", "FD"})


def is_universal(query: str | None) -> bool:
    """True when the query value matches every record (absent, empty or a lone '*')."""
    if query is None:
        return True
    return all(part.strip() in ("", "*") for part in query.split("\\"))


def has_wildcard(query: str) -> bool:
    return "*" in query or "?" in query


# ------------------------------------------------------------------ limits
MAX_QUERY_VALUE_CHARS = 1024
MAX_WILDCARDS = 32
MAX_LIST_VALUES = 256

_STAR_RUN = re.compile(r"\*{2,}")


class QueryTooComplex(RenkeiError, ValueError):
    """A C-FIND query value over the matching limits (length, wildcards, list values)."""


def _collapse_stars(text: str) -> str:
    """`text` with every run of '*' made one '*' (same meaning, fewer wildcards)."""
    return _STAR_RUN.sub("*", text) if "**" in text else text


@lru_cache(maxsize=4096)
def _complexity_problem(vr: str, text: str) -> str | None:
    """What makes `text` too costly to match, or None (cached: `match_attribute` asks it per record)."""
    values = text.split("\\")
    if len(values) > MAX_LIST_VALUES:
        return f"has {len(values)} values separated by '\\' (at most {MAX_LIST_VALUES}); send several smaller queries"
    longest = max(map(len, values))
    if longest > MAX_QUERY_VALUE_CHARS:
        index = next(i for i, v in enumerate(values) if len(v) == longest)
        which = f"value {index + 1} " if len(values) > 1 else "value "
        return (
            f"{which}is {longest} characters long (at most {MAX_QUERY_VALUE_CHARS}); "
            "shorten it, e.g. keep a prefix and end it with '*'"
        )
    if vr in _NO_WILDCARD_VRS:
        return None  # '*' and '?' are plain characters there: nothing to expand
    if text.count("*") + text.count("?") <= MAX_WILDCARDS:
        return None
    wildcards = (collapsed := _collapse_stars(text)).count("*") + collapsed.count("?")
    if wildcards > MAX_WILDCARDS:
        return (
            f"has {wildcards} wildcards ('*' and '?' together, runs of '*' counted once; "
            f"at most {MAX_WILDCARDS}); use fewer, e.g. one '*' for a run like '?*?*?'"
        )
    return None


def check_query_value(keyword: str, vr: str, text: str) -> None:
    """Raise QueryTooComplex when the query value `text` of `keyword` is over the matching limits.

    Limits: each backslash-separated value at most MAX_QUERY_VALUE_CHARS characters, at most
    MAX_WILDCARDS '*' and '?' in all the values together (a run of '*' counts once), at most
    MAX_LIST_VALUES values. The query layer calls this before matching any record.
    """
    problem = _complexity_problem(vr, text)
    if problem is not None:
        raise QueryTooComplex(f"query key {keyword} {problem}")


# ------------------------------------------------------------------ wildcards
# Matching never backtracks over '*': the pattern is cut at each '*' into segments of
# literal characters and '?' (each of a fixed width); the first segment must match at the
# start, the last at the end, and every other one is placed at its leftmost occurrence
# after the previous one. Leftmost placement is always right: any match can be shifted to
# it, since '*' absorbs what lies between. Each segment is found by str.find or a regular
# expression without any repetition, so the cost is at worst len(pattern) * len(value)
# steps in C, and linear for segments without '?'.


@dataclass(frozen=True)
class _Segment:
    """A run of literal characters and '?' between two '*'."""

    text: str
    pieces: tuple[tuple[int, str], ...]  # (offset, literal characters), '?' between them

    @classmethod
    def of(cls, text: str) -> _Segment:
        pieces = []
        offset = 0
        for literal in text.split("?"):
            if literal:
                pieces.append((offset, literal))
            offset += len(literal) + 1
        return cls(text, tuple(pieces))

    @property
    def width(self) -> int:
        return len(self.text)

    def matches_at(self, value: str, start: int) -> bool:
        return start + self.width <= len(value) and all(
            value.startswith(literal, start + offset) for offset, literal in self.pieces
        )

    def find(self, value: str, start: int, limit: int) -> int:
        """The leftmost position p >= start where the segment matches within value[:limit], or -1."""
        if start + self.width > limit:
            return -1
        if not self.pieces:
            return start
        if len(self.pieces) == 1:
            offset, literal = self.pieces[0]
            found = value.find(literal, start + offset, limit - self.width + offset + len(literal))
            return found - offset if found >= 0 else -1
        # The rarest literal leads the search (found by a fast literal scan), the rest is checked
        # around it: scanning for a common first literal would check the rest almost everywhere.
        anchor = min(
            range(len(self.pieces)),
            key=lambda i: (value.count(self.pieces[i][1], start, limit), -len(self.pieces[i][1]), i),
        )
        offset = self.pieces[anchor][0]
        hit = _anchored_regex(self.text, anchor).search(value, start + offset, limit)
        return hit.start() - offset if hit is not None else -1


def _fixed_regex(text: str) -> str:
    """A regex for literal characters and '?' (a run of them as one fixed-width skip)."""
    parts = []
    for is_wildcard, run in groupby(text, key=lambda char: char == "?"):
        if is_wildcard:
            width = len(list(run))
            parts.append("." if width == 1 else f".{{{width}}}")
        else:
            parts.append(re.escape("".join(run)))
    return "".join(parts)


@lru_cache(maxsize=1024)
def _anchored_regex(text: str, anchor: int) -> re.Pattern[str]:
    """A regex for the segment `text` matching at its `anchor`-th literal, without any repetition.

    The anchor comes first so that the regex engine scans for it as a literal prefix; the
    other literals are fixed-width look-behind and look-ahead around it, checked first on
    their first character only, then in full (in a periodic value most candidates fail early).
    """
    pieces = _Segment.of(text).pieces
    offset, literal = pieces[anchor]
    end = offset + len(literal)
    regex = [re.escape(literal)]
    checks: list[str] = []
    for stage in (1, len(text)):
        masked = ["?"] * len(text)
        for i, (start, other) in enumerate(pieces):
            if i != anchor:
                masked[start : start + min(stage, len(other))] = other[:stage]
        before, after = "".join(masked[:end]), "".join(masked[end:])
        if before.strip("?"):
            checks.append(f"(?<={_fixed_regex(before)})")
        if after.strip("?") or (stage == len(text) and after):  # the full check also needs the width
            checks.append(f"(?={_fixed_regex(after)})")
    regex.extend(dict.fromkeys(checks))  # a check already made by the first stage is not repeated
    return re.compile("".join(regex), re.DOTALL)


@lru_cache(maxsize=1024)
def _segments(pattern: str) -> tuple[_Segment, ...]:
    """The pattern cut at each '*' (runs of '*' taken as one); a single segment when there is none."""
    parts = _collapse_stars(pattern).split("*")
    return tuple(_Segment.of(part) for part in parts)


def match_wildcard(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """True when `value` as a whole matches `pattern`: '*' any run of characters (none too),
    '?' exactly one character, any other character itself.

    With `ignore_case` both are case-folded first, as exact person-name matching does; '?' is
    then one character of the folded text ('ß' folds to 'ss').
    """
    if ignore_case:
        pattern, value = pattern.casefold(), value.casefold()
    segments = _segments(pattern)
    if len(segments) == 1:
        return len(value) == segments[0].width and segments[0].matches_at(value, 0)
    first, *middle, last = segments
    tail = len(value) - last.width
    if tail < first.width or not first.matches_at(value, 0) or not last.matches_at(value, tail):
        return False
    position = first.width
    for segment in middle:
        found = segment.find(value, position, tail)
        if found < 0:
            return False
        position = found + segment.width
    return True


def _norm_date(text: str) -> str:
    return text.strip().replace(".", "").replace("-", "")


def _norm_time(text: str, upper: bool = False) -> str:
    """HHMMSS.ffffff, parts not given filled with zeros (or their highest values for an upper bound)."""
    whole, _, frac = text.strip().replace(":", "").partition(".")
    whole = whole[:6]
    if upper:
        whole += "235959"[len(whole) :]
        frac = frac[:6] if len(frac) >= 6 else (frac + "999999")[:6]
    else:
        whole += "000000"[len(whole) :]
        frac = (frac + "000000")[:6]
    return f"{whole}.{frac}"


def _norm_datetime(text: str, upper: bool = False) -> str:
    """YYYYMMDDHHMMSS.ffffff (a UTC offset is ignored), missing parts filled as for times."""
    text = text.strip()
    for sign in ("+", "-"):
        if sign in text[4:]:
            text = text[: 4 + text[4:].index(sign)]
    date, time_part = text[:8], text[8:]
    date += ("12311231" if upper else "01010101")[len(date) - 4 :] if len(date) >= 4 else ""
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
    problem = _complexity_problem(vr, query)
    if problem is not None:  # the query layer should have refused it (check_query_value)
        raise QueryTooComplex(f"query value {problem}")
    stored = (value or "").split("\\") if vr != "PN" or "\\" in (value or "") else [value or ""]
    queries = query.split("\\") if "\\" in query else [query]
    return any(_match_one(vr, q, s) for q in queries if q.strip() != "" for s in stored)


def match_record(query: Mapping[str, tuple[str, str]], record: Mapping[str, str]) -> bool:
    """True when `record` (keyword -> text) matches every (vr, query text) of `query`."""
    for keyword, (vr, text) in query.items():
        if not match_attribute(vr, text, record.get(keyword, "")):
            return False
    return True
