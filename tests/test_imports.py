"""Imports at the top of the module (issue 14): one left inside a function says why.

An import inside a function hides what a module depends on from whoever reads
its top. One may stay there for a reason (an optional dependency, the CLI's
start-up time, a real cycle), written as a `#`
comment on its line or on the line directly above it; a block of consecutive
imports shares the comment above its first line. A module-level
`if TYPE_CHECKING:` block and a module-level `try: import ... except ImportError:`
are at the top already. Pure `ast` and `tokenize`: nothing is imported.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

from helpers_parts import REPO

# the package's folders (renkei/<name> links to each of the others); renkei/testing.py is checked too
ROOTS = ("renkei", "edge", "catalog", "tasks", "flows", "dashboards", "center")
# a comment that is only a directive to a tool says nothing of why
DIRECTIVES = ("noqa", "type:", "pragma", "fmt:", "isort:")


def _package_files() -> list[Path]:
    out: list[Path] = []
    for top in ROOTS:
        root = REPO / top
        for path in root.rglob("*.py"):
            rel = path.relative_to(root)
            if top == "renkei" and (root / rel.parts[0]).is_symlink():
                continue  # a linked folder, listed under its own name
            out.append(path)
    return sorted(out)


def _reason_lines(source: str) -> tuple[set[int], set[int]]:
    """Lines holding a comment that is a reason, and those of them holding nothing else."""
    any_comment: set[int] = set()
    code_lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if text and not text.startswith(DIRECTIVES):
                any_comment.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return any_comment, any_comment - code_lines


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names |= {k.id for k in kinds if isinstance(k, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def _top_level_allowed(tree: ast.Module) -> set[int]:
    """ids of the import statements at the top of the module (directly, or in the allowed blocks)."""
    allowed: set[int] = set()
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
            blocks = [stmt.body]
        elif isinstance(stmt, ast.Try) and _catches_import_error(stmt):
            blocks = [stmt.body, *(h.body for h in stmt.handlers), stmt.orelse]
        else:
            blocks = [[stmt]]
        allowed |= {id(s) for block in blocks for s in block if isinstance(s, ast.Import | ast.ImportFrom)}
    return allowed


def _bodies(tree: ast.AST) -> list[list[ast.stmt]]:
    """Every list of statements in the tree (module, function, class, if, try, with, loop bodies)."""
    out = []
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody", "handlers"):
            value = getattr(node, field, None)
            if isinstance(value, list) and value and isinstance(value[0], ast.stmt):
                out.append(value)
        if isinstance(node, ast.Match):
            out += [case.body for case in node.cases]
    return out


def _offences(source: str, name: str) -> list[str]:
    """`name:line: import ...` for each import in `source` outside the top of the module, with no reason."""
    tree = ast.parse(source, name)
    any_comment, alone = _reason_lines(source)
    allowed = _top_level_allowed(tree)
    found = []
    for body in _bodies(tree):
        explained = False  # the block of consecutive imports this one belongs to has a reason above
        previous: ast.stmt | None = None
        for stmt in body:
            if not isinstance(stmt, ast.Import | ast.ImportFrom):
                previous = None
                continue
            in_block = previous is not None and stmt.lineno == (previous.end_lineno or previous.lineno) + 1
            if not in_block:
                explained = (stmt.lineno - 1) in alone
            own = any(line in any_comment for line in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
            if id(stmt) not in allowed and not (explained or own):
                found.append(f"{name}:{stmt.lineno}: {ast.unparse(stmt)}")
            previous = stmt
    return sorted(found, key=lambda line: int(line.split(":", 2)[1]))


def test_no_import_inside_a_function_without_a_reason() -> None:
    found = []
    for path in _package_files():
        name = str(path.relative_to(REPO))
        found += _offences(path.read_text(encoding="utf-8"), name)
    assert not found, (
        f"{len(found)} import(s) inside a function (or a block) with no reason given: move each to the top of "
        "its module, or say why on the line above (e.g. `# lazy: keeps `renkei --help` fast`, "
        "`# optional dependency`, `# cycle: a <-> b`):\n" + "\n".join(found)
    )


def test_the_check_sees_what_it_should() -> None:
    """The rule itself, on a small module: what passes, what fails."""
    text = """\
from __future__ import annotations
import os
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import json
try:
    import yaml
except ImportError:
    yaml = None

def bare():
    import re
    return re

def explained():
    # lazy: keeps start-up fast
    import csv
    import gzip
    from io import BytesIO

    import zlib
    return csv, gzip, BytesIO, zlib

def same_line():
    import shutil  # optional dependency
    import glob  # noqa: F401
    return shutil

class C:
    import math
"""
    found = [line.split(": ", 1)[0] for line in _offences(text, "sample.py")]
    assert found == ["sample.py:12", "sample.py:21", "sample.py:26", "sample.py:30"]
