"""One import namespace (issue 14, point 1): everything is `renkei.*`, nothing generic in site-packages.

The design's folders stay at the top of the repository (`edge/`, `catalog/`,
`tasks/`, `flows/`, `dashboards/`); `renkei/<name>` points at each, so they are
imported, type-checked, linted for layers and installed as `renkei.edge`,
`renkei.catalog`, ... A module imported under both names would exist twice
(two caches, two classes): no file imports the bare names.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers_parts import REPO

FOLDERS = ("edge", "catalog", "tasks", "flows", "dashboards")
SOURCES = ("renkei", *FOLDERS, "tests", "bench")


def _python_files() -> list[Path]:
    out = []
    for top in SOURCES:
        root = REPO / top
        if top != "renkei":
            out += root.rglob("*.py")
        else:  # renkei/ without the folders it links to (listed on their own)
            out += [p for p in root.rglob("*.py") if p.relative_to(root).parts[0] not in FOLDERS]
    return sorted(out)


def test_the_folders_are_the_renkei_namespace() -> None:
    for name in FOLDERS:
        link = REPO / "renkei" / name
        assert link.is_symlink() and link.resolve() == (REPO / name).resolve(), f"renkei/{name} -> ../{name}"
    import renkei.catalog.catalog
    import renkei.edge.server

    assert Path(renkei.edge.server.__file__).resolve() == REPO / "edge" / "server.py"
    assert Path(renkei.catalog.catalog.__file__).resolve() == REPO / "catalog" / "catalog.py"


def test_no_file_imports_a_bare_top_level_name() -> None:
    found = []
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in FOLDERS:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name} (use renkei.{name})")
        # code run in another interpreter, written as a string
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for line in node.value.replace(";", "\n").splitlines():
                    words = line.strip().split()
                    if len(words) > 1 and words[0] in ("from", "import") and words[1].split(".")[0] in FOLDERS:
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}: {line.strip()!r} in a string")
    assert not found, "\n".join(found)


def test_the_wheel_installs_only_renkei(tmp_path: Path) -> None:
    """What `pip install renkei` puts into site-packages: one top-level package, the folders inside it."""
    # from a copy of the sources (setuptools writes build/ next to them), as an installer builds it:
    # setuptools per [build-system], from the package registry
    source = tmp_path / "source"
    skip = shutil.ignore_patterns(".git", ".venv*", "build", "dist", "*.egg-info", "renkei-data", "*cache*", "test-*")
    shutil.copytree(REPO, source, symlinks=True, ignore=skip)
    out = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = out.glob("renkei-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"renkei"}, sorted(tops)
    for name in FOLDERS:
        assert any(n.startswith(f"renkei/{name}/") and n.endswith(".py") for n in names), name
    for needed in ("renkei/edge/server.py", "renkei/catalog/catalog.py", "renkei/dashboards/templates/index.html"):
        assert needed in names, needed
