"""C-FIND wildcard matching against an obviously correct (and slow) reference, and its time bounds.

The reference is the textbook recursive definition; the matcher under test never backtracks
over '*' (edge/matching.py). Alphabets mix wildcards, regular-expression metacharacters,
a newline, kana and kanji; no backslash (the DICOM value separator).
"""

from __future__ import annotations

import time
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from renkei.edge.matching import (
    MAX_LIST_VALUES,
    MAX_QUERY_VALUE_CHARS,
    MAX_WILDCARDS,
    QueryTooComplex,
    check_query_value,
    match_attribute,
    match_wildcard,
)
from renkei.errors import RenkeiError

LITERALS = "aAbB.()[]^$+|{}\n山田やマßẞ"
PATTERN_CHARS = LITERALS + "**??"
SMALL = "ab山"  # few letters, so that long random values and patterns do match now and then

BOUND = 0.05  # seconds: a bound against exponential blow-up, not a benchmark


def reference(pattern: str, value: str, ignore_case: bool = False) -> bool:
    """'*' any run, '?' one character, the rest literal; the whole value (PS3.4 C.2.2.2.4)."""
    if ignore_case:
        pattern, value = pattern.casefold(), value.casefold()

    @cache
    def matches(i: int, j: int) -> bool:
        if i == len(pattern):
            return j == len(value)
        if pattern[i] == "*":
            return matches(i + 1, j) or (j < len(value) and matches(i, j + 1))
        return j < len(value) and pattern[i] in ("?", value[j]) and matches(i + 1, j + 1)

    return matches(0, 0)


@st.composite
def pattern_and_matching_value(draw: st.DrawFn, chars: str) -> tuple[str, str]:
    """A pattern and a value made from it (each '*' some run, each '?' one character), then maybe
    mutated by one character: mostly matches, and near misses."""
    pattern = draw(st.text(alphabet=chars + "**??", max_size=14))
    value = []
    for char in pattern:
        if char == "*":
            value.append(draw(st.text(alphabet=chars, max_size=4)))
        elif char == "?":
            value.append(draw(st.sampled_from(chars)))
        else:
            value.append(char)
    text = "".join(value)
    if text and draw(st.booleans()):
        at = draw(st.integers(0, len(text) - 1))
        text = text[:at] + draw(st.sampled_from(["", *chars])) + text[at + 1 :]
    return pattern, text


@st.composite
def segmented_pattern(draw: st.DrawFn) -> str:
    """Segments of 'a', 'b' and '?' between '*': the shapes where the segment searches can go wrong
    (a '?' run at a segment's edge, a leftmost occurrence close to the next segment)."""
    segments = draw(st.lists(st.text(alphabet="ab??", min_size=1, max_size=6), min_size=1, max_size=4))
    return draw(st.sampled_from(["", "*"])) + "*".join(segments) + draw(st.sampled_from(["", "*"]))


def _timed(pattern: str, value: str, ignore_case: bool = False) -> float:
    start = time.perf_counter()
    match_wildcard(pattern, value, ignore_case)
    return time.perf_counter() - start


# ------------------------------------------------------------------ against the reference
@settings(max_examples=600, deadline=None, database=None)
@given(
    pattern=st.text(alphabet=PATTERN_CHARS, max_size=10),
    value=st.text(alphabet=LITERALS, max_size=10),
    ignore_case=st.booleans(),
)
def test_random_patterns_agree_with_the_reference(pattern: str, value: str, ignore_case: bool) -> None:
    assert match_wildcard(pattern, value, ignore_case) is reference(pattern, value, ignore_case)


@settings(max_examples=600, deadline=None, database=None)
@given(case=pattern_and_matching_value(LITERALS), ignore_case=st.booleans())
def test_values_built_from_the_pattern_agree_with_the_reference(case: tuple[str, str], ignore_case: bool) -> None:
    pattern, value = case
    assert match_wildcard(pattern, value, ignore_case) is reference(pattern, value, ignore_case)


@settings(max_examples=600, deadline=None, database=None)
@given(pattern=st.text(alphabet=SMALL + "*??", min_size=1, max_size=16), value=st.text(alphabet=SMALL, max_size=40))
def test_long_values_on_a_small_alphabet_agree_with_the_reference(pattern: str, value: str) -> None:
    # several '?' between literals: the searches anchored on the rarest literal
    assert match_wildcard(pattern, value) is reference(pattern, value)


@settings(max_examples=1000, deadline=None, database=None)
@given(pattern=segmented_pattern(), value=st.text(alphabet="ab", max_size=24))
def test_segmented_patterns_agree_with_the_reference(pattern: str, value: str) -> None:
    assert match_wildcard(pattern, value) is reference(pattern, value)


@settings(max_examples=300, deadline=None, database=None)
@given(case=pattern_and_matching_value(SMALL))
def test_small_alphabet_near_misses_agree_with_the_reference(case: tuple[str, str]) -> None:
    pattern, value = case
    assert match_wildcard(pattern, value) is reference(pattern, value)


@settings(max_examples=300, deadline=None, database=None)
@given(query=st.text(alphabet=LITERALS + " *?", max_size=10), value=st.text(alphabet=LITERALS + " ", max_size=10))
def test_match_attribute_matches_the_reference_on_trimmed_values(query: str, value: str) -> None:
    if not query.strip():
        assert match_attribute("LO", query, value)  # universal
        return
    assert match_attribute("LO", query, value) is reference(query.strip(), value.strip())


@pytest.mark.parametrize(
    "pattern,value,ignore_case,expected",
    [
        ("a.c", "abc", False, False),
        ("a.c", "a.c", False, True),
        ("(a|b)", "a", False, False),
        ("[ab]", "a", False, False),
        ("^a$", "^a$", False, True),
        ("a+", "aa", False, False),
        ("a?c", "a\nc", False, True),
        ("*", "\n\n", False, True),
        ("?", "山", False, True),
        ("??", "山", False, False),
        ("山田*", "山田^太郎", False, True),
        ("*太郎", "山田^太郎", False, True),
        ("YAMADA^T?ROU", "Yamada^Tarou", True, True),
        ("YAMADA^T?ROU", "Yamada^Tarou", False, False),
        ("*a*a*", "aa", False, True),
        ("*a*a*", "a", False, False),
        ("a*a", "a", False, False),
        ("?*?", "a", False, False),
        ("?*?", "ab", False, True),
        ("", "", False, True),
        ("STRA*", "Straße", True, True),
        ("*a?*b", "xab", False, False),
        ("*a?*b", "xaxb", False, True),  # '?' at a segment's end
        ("*a?b?*c", "aaaaaxbc", False, False),
        ("*a?b?*c", "aaaaaxbyc", False, True),
        ("*?a?b*", "aab", False, False),
        ("*?a?b*", "xaab", False, True),
    ],
)
def test_examples(pattern: str, value: str, ignore_case: bool, expected: bool) -> None:
    assert match_wildcard(pattern, value, ignore_case) is expected
    assert reference(pattern, value, ignore_case) is expected


# ------------------------------------------------------------------ time bounds
def test_the_pattern_that_stalled_the_node_is_fast() -> None:
    assert _timed("*?*?*?*?*?*?*?*?*X", "a" * 64) < BOUND  # 16 s before (a backtracking regex)


@pytest.mark.parametrize(
    "pattern",
    [
        "*?" * 16 + "X",  # the stalling shape, with the most wildcards allowed
        "*a" * 31 + "*b",  # every literal found at once, but not the end
        "*" + "a*" * 30 + "b*",  # the one missing literal in the middle
        "*" + "a?" * 16 + "b*",  # '?' between literals that are everywhere
        "*a?" + "a" * 900 + "b*",  # a long literal after a common one
    ],
)
def test_thirty_two_wildcards_against_64_kib_are_fast(pattern: str) -> None:
    value = "a" * 65536
    assert pattern.count("*") + pattern.count("?") <= MAX_WILDCARDS
    check_query_value("StudyDescription", "LO", pattern)
    assert _timed(pattern, value) < BOUND
    assert _timed(pattern.upper(), value, ignore_case=True) < BOUND


def test_match_attribute_on_64_kib_values_is_fast() -> None:
    value = "a" * 65536
    for vr in ("LO", "PN"):
        start = time.perf_counter()
        assert not match_attribute(vr, "*?" * 16 + "X", value)
        assert match_attribute(vr, "*?" * 16 + "a", value)
        assert time.perf_counter() - start < 2 * BOUND


def test_a_periodic_value_that_defeats_the_literal_scan_stays_bounded() -> None:
    # 30 literals of 30 characters, each found every other position of 'abab...', that
    # agree with one another but with the last: every candidate has to be checked. The bound is
    # looser (the cost is that of len(pattern) * len(value) steps in C, tens of ms); it
    # guards against anything worse.
    base = "ab" * 600
    literals = [base[31 * i : 31 * i + 30] for i in range(30)] + [base[31 * 30 + 1]]
    pattern = "*" + "?".join(literals) + "*"
    check_query_value("StudyDescription", "LT", pattern)
    assert _timed(pattern, "ab" * 32768) < 10 * BOUND


# ------------------------------------------------------------------ limits
def test_query_values_within_the_limits_pass() -> None:
    check_query_value("StudyDescription", "LO", "x" * MAX_QUERY_VALUE_CHARS)
    check_query_value("StudyDescription", "LO", "?" * MAX_WILDCARDS)
    check_query_value("StudyDescription", "LO", "*" * 500 + "?" * (MAX_WILDCARDS - 1))  # a run of '*' is one
    check_query_value("ModalitiesInStudy", "CS", "\\".join(["CT"] * MAX_LIST_VALUES))
    check_query_value("StudyInstanceUID", "UI", "\\".join(["1.2.3.4"] * MAX_LIST_VALUES))
    check_query_value("SeriesDescription", "LO", "\\".join(["?*"] * (MAX_WILDCARDS // 2)))


@pytest.mark.parametrize(
    "vr,text,says",
    [
        ("LO", "x" * (MAX_QUERY_VALUE_CHARS + 1), "characters long"),
        ("LO", "ok\\" + "x" * (MAX_QUERY_VALUE_CHARS + 1), "value 2 is"),
        ("LO", "?" * (MAX_WILDCARDS + 1), "wildcards"),
        ("LO", "*?" * 8 + "\\" + "*?" * 9, "wildcards"),  # counted over all the values
        ("PN", "*a" * (MAX_WILDCARDS + 1), "wildcards"),
        ("CS", "\\".join(["CT"] * (MAX_LIST_VALUES + 1)), "values"),
    ],
)
def test_query_values_over_a_limit_are_refused_with_what_to_change(vr: str, text: str, says: str) -> None:
    with pytest.raises(QueryTooComplex) as raised:
        check_query_value("StudyDescription", vr, text)
    message = str(raised.value)
    assert "StudyDescription" in message and says in message and "at most" in message
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, RenkeiError)
    with pytest.raises(QueryTooComplex):
        match_attribute(vr, text, "anything")  # matching itself refuses them too


def test_wildcard_characters_are_not_counted_where_they_are_plain_characters() -> None:
    check_query_value("StudyInstanceUID", "UI", "?" * (MAX_WILDCARDS + 1))
