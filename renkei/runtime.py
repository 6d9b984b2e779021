"""Opening a region's parts from plain paths: what tasks and flows receive instead of live objects.

Every task takes one typed parameter, a `Region` (the configuration file and the
data folder the flow was given, or $RENKEI_CONFIG and $RENKEI_DATA_DIR, which
`renkei worker` sets), and opens what it needs for the length of one call. The
configuration is parsed once per process and file version, not once per task.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from renkei.config import DATA_DIR_ENV, Layout, load_config, resolve_data_dir

if TYPE_CHECKING:  # the catalog and the edge import renkei: opened here at call time (issue 14 untangles it)
    from renkei.catalog.catalog import Catalog
    from renkei.catalog.store import ObjectStore
    from renkei.edge.journal import Journal

CONFIG_ENV = "RENKEI_CONFIG"
_REPO_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nagasaki.yaml"


def config_path(value: str | None = None) -> str:
    """The configuration file: the argument, else $RENKEI_CONFIG, else the example region."""
    return str(value or os.environ.get(CONFIG_ENV) or _REPO_EXAMPLE)


def layout(config: str | None = None, data_dir: str | None = None) -> Layout:
    """The region's Layout from a config path and a data folder (env and defaults otherwise).

    The file is parsed again only when it changed (its size or modification time).
    """
    path = config_path(config)
    try:
        st = os.stat(path)
        version: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
    except OSError:
        version = None  # load_config says what is wrong with the path
    folder = resolve_data_dir(data_dir or os.environ.get(DATA_DIR_ENV))
    key = (os.path.abspath(path), folder)
    with _parsed_lock:
        known = _parsed.get(key)
    if known is not None and version is not None and known[0] == version:
        return known[1]
    lay = Layout(load_config(path), folder)
    if version is not None:
        with _parsed_lock:
            _parsed[key] = (version, lay)
    return lay


_parsed: dict[tuple[str, Path], tuple[tuple[int, int], Layout]] = {}
_parsed_lock = threading.Lock()


@dataclass(frozen=True)
class Region:
    """The region a task works on: the configuration file and the data folder its flow was given.

    None takes the worker's $RENKEI_CONFIG / $RENKEI_DATA_DIR (then the example region and
    ./renkei-data). Paths only, so that a task's inputs stay small and free of patient data.
    """

    config: str | None = None
    data_dir: str | None = None

    @property
    def layout(self) -> Layout:
        return layout(self.config, self.data_dir)


def open_store(lay: Layout) -> ObjectStore:
    # lazy: every CLI command imports this module at start-up (duckdb and pyarrow take ~0.3 s)
    from renkei.catalog.store import ObjectStore

    return ObjectStore(lay.center_url, lay.config.center.s3)


@contextmanager
def open_catalog(lay: Layout, **kwargs: Any) -> Iterator[Catalog]:
    # lazy: every CLI command imports this module at start-up (duckdb and pyarrow take ~0.3 s)
    from renkei.catalog.catalog import Catalog

    cat = Catalog.from_layout(lay, **kwargs)
    try:
        yield cat
    finally:
        cat.close()


@contextmanager
def open_journal(lay: Layout, site_id: str) -> Iterator[Journal]:
    # lazy: every CLI command imports this module at start-up (pydicom takes ~0.3 s)
    from renkei.edge.journal import Journal

    journal = Journal.open(lay.edge_store(site_id))
    try:
        yield journal
    finally:
        journal.close()
