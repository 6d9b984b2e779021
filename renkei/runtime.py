"""Opening a region's parts from plain paths: what tasks and flows receive instead of live objects.

Tasks get a config path and a data folder (or take them from $RENKEI_CONFIG and
$RENKEI_DATA_DIR, which `renkei worker` sets) and open what they need for the
length of one call.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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
    """The region's Layout from a config path and a data folder (env and defaults otherwise)."""
    return Layout(load_config(config_path(config)), resolve_data_dir(data_dir or os.environ.get(DATA_DIR_ENV)))


def open_store(lay: Layout) -> ObjectStore:
    from renkei.catalog.store import ObjectStore

    return ObjectStore(lay.center_url, lay.config.center.s3)


@contextmanager
def open_catalog(lay: Layout, **kwargs: Any) -> Iterator[Catalog]:
    from renkei.catalog.catalog import Catalog

    cat = Catalog.from_layout(lay, **kwargs)
    try:
        yield cat
    finally:
        cat.close()


@contextmanager
def open_journal(lay: Layout, site_id: str) -> Iterator[Journal]:
    from renkei.edge.journal import Journal

    journal = Journal.open(lay.edge_store(site_id))
    try:
        yield journal
    finally:
        journal.close()
