"""One search box for the study browser: Patient ID, accession number and (where names may be shown) name.

What people type, and what it finds:
- a part of a Patient ID or accession number (`0042`), case-insensitive;
- a part of a name in any of its forms, romaji, kanji or kana (`yamada`, `山田`,
  `やまだ` also finds `ヤマダ`); spaces and the `^` between family and given
  name do not matter (`yamada taro` finds `YAMADA^TARO`), nor full- or half-width
  letters (`ｙａｍａｄａ`, `ﾔﾏﾀﾞ`);
- DICOM wildcards `*` (any run) and `?` (one character), which then match a
  whole value (PS3.4 C.2.2.2.4): `yama*` finds YAMADA^TARO, `*taro` too, `0042`
  with a wildcard only that whole ID.

The patterns become RE2 regular expressions in DuckDB (linear time, no
backtracking) with every other character escaped; the text is bounded.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from renkei.errors import UsageError

MAX_LENGTH = 64

_HIRAGANA = "".join(chr(c) for c in range(0x3041, 0x3097))
_KATAKANA = "".join(chr(c + 0x60) for c in range(0x3041, 0x3097))
_TO_KATAKANA = str.maketrans(_HIRAGANA, _KATAKANA)
_TO_HIRAGANA = str.maketrans(_KATAKANA, _HIRAGANA)

# a name as searched: lower case, no '^' or spaces, each component group (alphabetic=ideographic=phonetic)
# between '=' so that a whole-value pattern can be anchored to one group
NAME_SQL = (
    "('=' || replace(replace(replace(lower(coalesce(patient_name, '')), '^', ''), ' ', ''), '\u3000', '') || '=')"
)


@dataclass(frozen=True)
class Search:
    """A search text, normalised; `where(names)` is the SQL filter over a study's aggregated columns."""

    text: str

    @classmethod
    def parse(cls, raw: str) -> Search:
        text = unicodedata.normalize("NFKC", raw).strip().lower()
        if len(text) > MAX_LENGTH:
            raise UsageError(f"a search of {len(text)} characters: at most {MAX_LENGTH}")
        if any(unicodedata.category(ch) == "Cc" for ch in text):
            raise UsageError("a search may not contain control characters")
        return cls(text)

    @property
    def wildcard(self) -> bool:
        return "*" in self.text or "?" in self.text

    @property
    def matches_all(self) -> bool:
        return not self.text.replace("*", "")

    def where(self, names: bool) -> tuple[str, list[str]]:
        """(SQL, parameters): IDs always, names only when `names` (an operator's view shows no names)."""
        if self.matches_all:
            return "TRUE", []
        terms: list[tuple[str, str, str, str]] = [  # (SQL value, text, wildcard's any-character, anchor)
            (f"lower(coalesce({column}, ''))", self.text, ".", "^$") for column in ("patient_id", "accession_number")
        ]
        if names:
            compact = re.sub(r"[\s^]+", "", self.text)
            for variant in dict.fromkeys([compact, compact.translate(_TO_KATAKANA), compact.translate(_TO_HIRAGANA)]):
                if variant:
                    terms.append((NAME_SQL, variant, "[^=]", "=="))
        clauses: list[str] = []
        params: list[str] = []
        for value, text, any_char, anchor in terms:
            if self.wildcard:
                clauses.append(f"regexp_matches({value}, ?)")
                params.append(anchor[0] + _regex(text, any_char) + anchor[1])
            else:
                clauses.append(f"contains({value}, ?)")
                params.append(text)
        return "(" + " OR ".join(clauses) + ")", params


def _regex(pattern: str, any_char: str) -> str:
    """A DICOM wildcard pattern as an RE2 expression: * -> any run, ? -> one character, the rest literal."""
    out = []
    for ch in pattern:
        if ch == "*":
            out.append(any_char + "*")
        elif ch == "?":
            out.append(any_char)
        else:
            out.append(re.escape(ch))
    return "".join(out)
