"""What tests need to know about real parts: where the checkout is, and how a missing part is said.

Imported by conftest.py and by test modules (never `from conftest import`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from renkei import peers

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CONFIG = REPO / "examples" / "nagasaki.yaml"


def require_part(available: bool, part: str, how: str) -> None:
    """Skip (or, with RENKEI_REQUIRE_ALL=1, fail) when a real part is missing."""
    if available:
        return
    reason = f"{part} is not available here: {how}"
    if os.environ.get("RENKEI_REQUIRE_ALL") == "1":
        pytest.fail(f"RENKEI_REQUIRE_ALL=1 and {reason}")
    pytest.skip(reason)


def require_program(name: str, package: str) -> str:
    """The program from Debian's `package` (by its --version, never whatever PATH offers first)."""
    try:
        path: str | None = peers.require_program(name, package)
    except peers.PeerError:
        path = None
    require_part(path is not None, f"{name} ({package})", f"apt-get install -y {package}")
    return path  # type: ignore[return-value]
